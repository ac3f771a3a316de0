"""Sharded archives (docs/FORMAT.md 10): an index holding the manifest and shard files holding the
arrays. Round trips against the one-file archive of the same model, the limit, the layout
transformers reads, and every rule of 10.1 with a crafted archive (edited as an attacker would
and re-signed, so that only the rule can refuse it)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import ders_cli as ders
from ders_cli.archive import ArchiveReader, parse_size
from ders_cli.cli.app import app
from ders_cli.errors import (
    CorruptArchiveError,
    InputError,
    InvalidArchiveError,
    NewerFormatError,
    UsageError,
)
from fixtures.synthetic import upcycled_tensors, write_model
from tests.craft import CraftedSharded

runner = CliRunner()
LIMIT = 40_000


def sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def tree(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): sha(p) for p in sorted(folder.rglob("*"))
            if p.is_file()}


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("sharded")


@pytest.fixture(scope="module")
def model(work):
    return write_model(work / "model", upcycled_tensors(layers=3, hidden=32, intermediate=64),
                       shards=2, side_files={"tokenizer.json": "{}"})


@pytest.fixture(scope="module")
def one_file(model, work):
    return ders.compress(model, ders.QuantSpec(2, 16), work / "one.ders")


@pytest.fixture(scope="module")
def sharded(model, work):
    (work / "out").mkdir()
    return ders.compress(model, ders.QuantSpec(2, 16), work / "out" / "q2.ders",
                         max_shard_size=LIMIT)


def test_parse_size_takes_what_transformers_takes():
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("500MB") == 500 * 10**6
    assert parse_size("2GiB") == 2 * 2**30
    assert parse_size("1.5kb") == 1500
    assert parse_size(123) == 123
    for bad in ("5 XB", "-1", "0", "GB", "1e9"):
        with pytest.raises(UsageError, match="max_shard_size"):
            parse_size(bad)


def test_sharded_archive_files_names_and_limit(sharded, work):
    folder = work / "out"
    names = sorted(p.name for p in folder.iterdir())
    shards = [n for n in names if n.endswith(".safetensors")]
    count = len(shards)
    assert count >= 3
    assert names == sorted(["q2.ders.safetensors.index.json",
                            *(f"q2.ders-{i:05d}-of-{count:05d}.safetensors"
                              for i in range(1, count + 1))])
    assert sharded.archive == folder / "q2.ders.safetensors.index.json"
    assert [Path(f).name for f in sharded.files] == ["q2.ders.safetensors.index.json",
                                                     *shards]
    assert sharded.archive_bytes == sum((folder / n).stat().st_size for n in names)
    with ArchiveReader(sharded.archive) as r:
        for s in shards:
            size = (folder / s).stat().st_size
            arrays = [n for n in r.manifest.stored if r.file_of(n).name == s]
            # A shard is under the limit unless it holds one array (or one group) larger.
            assert size <= LIMIT or len({_unit(a) for a in arrays}) == 1, (s, size)
        # A group's base and codec arrays live in one shard.
        for g in r.manifest.groups:
            files = {r.file_of(g.base["array"])} | {r.file_of(a)
                                                    for a in g.codec["arrays"].values()}
            assert len(files) == 1, g.key


def _unit(array: str) -> str:
    return array.rsplit("/", 1)[0] if array.startswith("ders/g/") else array


def test_sharded_round_trip_equals_the_one_file_archive(sharded, one_file, model, work):
    a = ders.expand(one_file.archive, work / "x1").folder
    b = ders.expand(sharded.archive, work / "x2").folder
    assert tree(a) == tree(b)
    assert ders.verify(sharded.archive, against=model).ok
    with ArchiveReader(one_file.archive) as r1, ArchiveReader(sharded.archive) as r2:
        m1, m2 = r1.manifest, r2.manifest
        assert (m1.version, m2.version) == (4, 4)  # BLAKE3 checksums: both version 4
        assert m1.stored == m2.stored and m1.tensors == m2.tensors and m1.groups == m2.groups
        assert r2.size == sharded.archive_bytes and r2.sharded and not r1.sharded
        assert [e.name for e in r1.data_order()] == [e.name for e in r2.data_order()]


def test_every_way_to_name_a_sharded_archive_opens_it(sharded, work):
    folder = work / "out"
    first = sorted(folder.glob("*-00001-of-*.safetensors"))[0]
    for name in (sharded.archive, folder / "q2.ders", first, folder):
        with ArchiveReader(name) as r:
            assert r.path == sharded.archive, name


def test_an_archive_that_fits_is_the_one_file_archive_byte_for_byte(model, one_file, work):
    r = ders.compress(model, ders.QuantSpec(2, 16), work / "fits.ders",
                      max_shard_size=one_file.archive_bytes + 10**6)
    assert r.archive == work / "fits.ders" and r.files == [str(work / "fits.ders")]
    assert sha(work / "fits.ders") == sha(one_file.archive)


def test_transformers_reads_the_passthrough_tensors_from_the_shards(sharded, model):
    from safetensors import safe_open

    index = json.loads(sharded.archive.read_text())
    assert index["metadata"]["total_size"] > 0
    names = {}
    for file in sorted(set(index["weight_map"].values())):
        with safe_open(sharded.archive.parent / file, "pt") as f:
            names.update({k: f.get_tensor(k) for k in f.keys()})  # noqa: SIM118
    with safe_open(model / "model-00001-of-00002.safetensors", "pt") as f:
        for k in f.keys():  # noqa: SIM118 - safe_open is no mapping
            if "experts" not in k:
                assert torch.equal(names[k], f.get_tensor(k)), k


def test_force_replaces_a_sharded_archive_by_a_one_file_one_and_back(model, work):
    folder = work / "swap"
    folder.mkdir()
    spec = ders.QuantSpec(2, 16)
    ders.compress(model, spec, folder / "a.ders", max_shard_size=LIMIT)
    before = sorted(p.name for p in folder.iterdir())
    with pytest.raises(ders.errors.OutputExistsError):
        ders.compress(model, spec, folder / "a.ders")  # the index is there: no --force, no
    ders.compress(model, spec, folder / "a.ders", overwrite=True)
    assert sorted(p.name for p in folder.iterdir()) == ["a.ders"]
    ders.compress(model, spec, folder / "a.ders", max_shard_size=LIMIT // 2, overwrite=True)
    after = sorted(p.name for p in folder.iterdir())
    assert "a.ders" not in after and len(after) > len(before)
    assert all(n.endswith(f"-of-{len(after) - 1:05d}.safetensors") for n in after
               if n.endswith(".safetensors"))
    assert ders.verify(folder / "a.ders").ok


def test_cli_max_shard_size(model, tmp_path):
    out = tmp_path / "c.ders"
    r = runner.invoke(app, ["quantize", str(model), "--bits", "2", "-o", str(out),
                            "--max-shard-size", "40KB", "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["archive"] == str(tmp_path / "c.ders.safetensors.index.json")
    assert len(doc["files"]) >= 4
    r = runner.invoke(app, ["verify", str(out)])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["expand", str(out), "-o", str(tmp_path / "x")])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["quantize", str(model), "--bits", "2", "-o", str(tmp_path / "d"),
                            "--max-shard-size", "5XB"])
    assert r.exit_code == 2 and "'5XB'" in r.output and not (tmp_path / "d").exists()


# --- every rule of docs/FORMAT.md 10.1, with a crafted archive ------------------------------------

def crafted(sharded, tmp_path, edit, **save) -> Path:
    c = CraftedSharded.load(sharded.archive)
    edit(c)
    return c.save(tmp_path / "c", **save)


def refused(path: Path, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        ArchiveReader(path).close()


def test_an_unedited_crafted_copy_opens(sharded, tmp_path):
    path = crafted(sharded, tmp_path, lambda c: None)
    with ArchiveReader(path) as r:
        assert r.manifest.stored == ArchiveReader(sharded.archive).manifest.stored


def files_of(c: CraftedSharded) -> list[str]:
    return [r["file"] for r in c.metadata["ders.shards"]]


# Rule 1: the index.

def test_index_hash_mismatch_is_damage(sharded, tmp_path):
    path = crafted(sharded, tmp_path, lambda c: None)
    raw = bytearray(path.read_bytes())
    raw[raw.index(b'"weight_map"') + 1] ^= 0x20
    path.write_bytes(bytes(raw))
    refused(path, CorruptArchiveError, "index checksum mismatch")


def test_index_without_the_prefix(sharded, tmp_path):
    path = crafted(sharded, tmp_path, lambda c: None,
                   text_edit=lambda t: t.replace('{"metadata":{', '{"metadata": {', 1))
    refused(path, CorruptArchiveError, "does not begin with the ders index hash")


def test_an_index_of_another_tool_is_not_an_archive(tmp_path):
    (tmp_path / "model.safetensors.index.json").write_text('{"metadata":{},"weight_map":{}}')
    refused(tmp_path / "model.safetensors.index.json", InputError, "not a ders archive")


def test_index_too_large(sharded, tmp_path, monkeypatch):
    monkeypatch.setattr("ders_cli.archive.MAX_INDEX_BYTES", 1000)
    refused(sharded.archive, InputError, "more than the 1000-byte limit")


@pytest.mark.parametrize("edit, match", [
    (lambda t: t.replace('"weight_map":{', '"weight_map":' + "[" * 70 + "]" * 70 + ',"w":{'),
     "nested"),
    (lambda t: t.replace('"ders.format":"ders"', '"ders.format":"ders","ders.format":"ders"'),
     "appears twice"),
    (lambda t: t.replace('"weight_map":', '"weight_mop":'), "lacks its metadata or weight_map"),
    (lambda t: t.replace('"ders.format":"ders"', '"ders.format":"pt"'), "does not name the ders"),
    (lambda t: t.replace('"ders.version":"4"', '"ders.version":"2"'), "has no sharded archives"),
    (lambda t: t.replace('"ders.version":"4"', '"ders.version":"x"'), "is not a number"),
])
def test_index_json_rules(sharded, tmp_path, edit, match):
    refused(crafted(sharded, tmp_path, lambda c: None, text_edit=edit), InvalidArchiveError,
            match)


def test_newer_index_version(sharded, tmp_path):
    path = crafted(sharded, tmp_path, lambda c: None,
                   text_edit=lambda t: t.replace('"ders.version":"4"', '"ders.version":"9"'))
    refused(path, NewerFormatError, "version 9")


def test_manifest_version_must_be_the_index_version(sharded, tmp_path):
    def edit(c):
        c.manifest["version"] = 2
    refused(crafted(sharded, tmp_path, edit), InvalidArchiveError, "manifest version 2")


def test_index_manifest_is_checked_like_any(sharded, tmp_path):
    def edit(c):
        c.manifest["files"][0]["path"] = "../evil"
    refused(crafted(sharded, tmp_path, edit), InvalidArchiveError, "'..'")


@pytest.mark.parametrize("records, match", [
    ([], "lists no shards"),
    ("x", "lists no shards"),
    ([7], "not an object"),
    ([{"size": 1, "header_sha256": "0" * 64}], "no file name"),
    ([{"file": "a.safetensors", "size": -1, "header_sha256": "0" * 64}], "no valid size"),
    ([{"file": "a.safetensors", "size": True, "header_sha256": "0" * 64}], "no valid size"),
    ([{"file": "a.safetensors", "size": 1, "header_sha256": "X" * 64}], "no valid header_sha"),
])
def test_shard_records(sharded, tmp_path, records, match):
    def edit(c):
        c.metadata["ders.shards"] = records
    refused(crafted(sharded, tmp_path, edit, records=False), InvalidArchiveError, match)


# Rule 2: shard names.

@pytest.mark.parametrize("name, match", [
    ("../q2.safetensors", "has a '..' component"),
    ("sub/q2.safetensors", "not a plain file name"),
    ("/tmp/q2.safetensors", "is absolute"),
    ("q2\x1b[2J.safetensors", "control character"),
    ("", "is empty"),
    ("q2.bin", "does not end in .safetensors"),
    ("x" * 300 + ".safetensors", "longer than 255"),
])
def test_shard_names_are_plain_names_in_the_folder(sharded, tmp_path, name, match):
    def edit(c):
        old = files_of(c)[0]
        c.metadata["ders.shards"][0]["file"] = name
        c.weight_map = {k: (name if v == old else v) for k, v in c.weight_map.items()}
    refused(crafted(sharded, tmp_path, edit), InvalidArchiveError, match)


def test_a_shard_listed_twice(sharded, tmp_path):
    def edit(c):
        c.metadata["ders.shards"].append(dict(c.metadata["ders.shards"][0]))
    refused(crafted(sharded, tmp_path, edit), InvalidArchiveError, "collides with")


def test_shard_names_equal_ignoring_case(sharded, tmp_path):
    def edit(c):
        first, second = files_of(c)[:2]
        upper = first.upper().replace(".SAFETENSORS", ".safetensors")
        c.metadata["ders.shards"][1]["file"] = upper
        c.shards[upper] = c.shards.pop(second)
        c.weight_map = {k: (upper if v == second else v) for k, v in c.weight_map.items()}
    refused(crafted(sharded, tmp_path, edit), InvalidArchiveError, "collides with")


# Rule 3: which array lives where.

def test_weight_map_must_name_every_stored_array(sharded, tmp_path):
    def edit(c):
        c.weight_map.pop(next(iter(c.weight_map)))
    refused(crafted(sharded, tmp_path, edit), InvalidArchiveError, "not in weight_map")


def test_weight_map_names_no_other_array(sharded, tmp_path):
    def edit(c):
        c.weight_map["ghost"] = files_of(c)[0]
    refused(crafted(sharded, tmp_path, edit), InvalidArchiveError, "in weight_map but not")


def test_weight_map_points_at_a_shard_of_the_index(sharded, tmp_path):
    def edit(c):
        c.weight_map[next(iter(c.weight_map))] = "elsewhere.safetensors"
    refused(crafted(sharded, tmp_path, edit), InvalidArchiveError, "no shard of the index")


# Rule 4: every shard tied to its index.

def test_a_missing_shard_is_an_incomplete_archive(sharded, tmp_path):
    path = crafted(sharded, tmp_path, lambda c: None)
    (path.parent / files_of(CraftedSharded.load(path))[-1]).unlink()
    refused(path, CorruptArchiveError, "incomplete: shard .* is missing")
    r = runner.invoke(app, ["verify", str(path)])
    assert r.exit_code == 1 and "is missing" in r.output


def test_swapped_shards_are_damage(sharded, tmp_path):
    path = crafted(sharded, tmp_path, lambda c: None)
    a, b = (path.parent / f for f in files_of(CraftedSharded.load(path))[:2])
    a.rename(tmp_path / "tmp")
    b.rename(a)
    (tmp_path / "tmp").rename(b)
    refused(path, CorruptArchiveError, "not the shard its index records")
    r = runner.invoke(app, ["verify", str(path)])
    assert r.exit_code == 1


def test_a_shard_of_another_archive_is_refused(sharded, model, tmp_path):
    (tmp_path / "o").mkdir()
    other = ders.compress(model, ders.QuantSpec(3, 16), tmp_path / "o" / "q2.ders",
                          max_shard_size=LIMIT)
    path = crafted(sharded, tmp_path, lambda c: None)
    first = files_of(CraftedSharded.load(path))[0]
    shutil.copyfile(other.archive.parent / first, path.parent / first)
    refused(path, CorruptArchiveError, "not the shard its index records")


def test_a_shard_whose_size_the_index_misstates(sharded, tmp_path):
    def edit(c):
        c.metadata["ders.shards"][0]["size"] += 8
    refused(crafted(sharded, tmp_path, edit, records=False), CorruptArchiveError,
            "its index records")


def test_a_shard_cut_short(sharded, tmp_path):
    path = crafted(sharded, tmp_path, lambda c: None)
    shard = path.parent / files_of(CraftedSharded.load(path))[0]
    os.truncate(shard, shard.stat().st_size - 1)
    refused(path, CorruptArchiveError, "truncated")


def test_a_shard_header_altered_after_signing(sharded, tmp_path):
    path = crafted(sharded, tmp_path, lambda c: None)
    shard = path.parent / files_of(CraftedSharded.load(path))[0]
    raw = bytearray(shard.read_bytes())
    raw[raw.index(b'"dtype"') + 2] ^= 0x20
    shard.write_bytes(bytes(raw))
    refused(path, CorruptArchiveError, "header checksum mismatch")


def test_a_shard_that_names_another_index(sharded, tmp_path):
    def edit(c):
        c.shards[files_of(c)[0]].metadata["ders.index"] = "other.safetensors.index.json"
    refused(crafted(sharded, tmp_path, edit), InvalidArchiveError, "does not name this index")


def test_a_shard_of_another_version(sharded, tmp_path):
    def edit(c):
        c.shards[files_of(c)[1]].metadata["ders.version"] = "2"
    refused(crafted(sharded, tmp_path, edit), InvalidArchiveError, "does not name this index")


def test_a_shard_holding_an_array_the_index_puts_elsewhere(sharded, tmp_path):
    def edit(c):
        first, second = files_of(c)[:2]
        name = next(iter(c.shards[second].data))
        c.shards[first].put(name, c.shards[second].data.pop(name),
                            **c.shards[second].table.pop(name))
    refused(crafted(sharded, tmp_path, edit), InvalidArchiveError,
            "the shard and the index's weight_map disagree")


def test_a_shard_that_names_an_index_outside_its_folder(sharded, tmp_path):
    def edit(c):
        c.shards[files_of(c)[0]].metadata["ders.index"] = "../q2.ders.safetensors.index.json"
    path = crafted(sharded, tmp_path, edit)
    refused(path.parent / files_of(CraftedSharded.load(path))[0], InvalidArchiveError,
            "not a plain file name")


def test_flipped_data_in_a_shard_fails_verify_not_open(sharded, tmp_path):
    path = crafted(sharded, tmp_path, lambda c: None)
    shard = path.parent / files_of(CraftedSharded.load(path))[-1]
    raw = bytearray(shard.read_bytes())
    raw[-1] ^= 0xFF
    shard.write_bytes(bytes(raw))
    ArchiveReader(path).close()  # only the array's sha256 covers it: found when read
    r = runner.invoke(app, ["verify", str(path)])
    assert r.exit_code == 1 and "checksum mismatch" in r.output
    r = runner.invoke(app, ["expand", str(path), "-o", str(tmp_path / "x")])
    assert r.exit_code == 2 and not (tmp_path / "x").exists()


# --- folders ----------------------------------------------------------------------------------

def test_a_folder_with_several_archives_asks_for_one(one_file, sharded, tmp_path):
    shutil.copyfile(one_file.archive, tmp_path / "a.ders")
    shutil.copyfile(one_file.archive, tmp_path / "b.ders")
    refused(tmp_path, InputError, r"several archives \(a.ders, b.ders\): name one")
    refused(tmp_path / "empty" if (tmp_path / "empty").mkdir() is None else None, InputError,
            "no ders archive in this folder")


def test_load_from_archive_of_a_sharded_archive_and_from_a_hub_cache(tmp_path, monkeypatch):
    """The runtime opens a sharded archive (and a repo id of one) like a one-file archive: the
    logits are those of the expanded checkpoint, bit for bit."""
    from huggingface_hub import constants
    from transformers import AutoModelForCausalLM

    from ders_cli.runtime import load_from_archive
    from fixtures.upcycled import Dims, make_upcycled
    from tests.test_hub import cache_repo

    model = make_upcycled(tmp_path / "m", Dims(vocab=128), family="mixtral")
    (tmp_path / "a").mkdir()
    r = ders.compress(model, ders.SparseSpec(0.9), tmp_path / "a" / "m.ders",
                      max_shard_size=100_000)
    assert len(r.files) > 3
    ders.expand(r.archive, tmp_path / "x")
    tokens = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = AutoModelForCausalLM.from_pretrained(tmp_path / "x").eval()(tokens).logits
        assert torch.equal(load_from_archive(r.archive)(tokens).logits, ref)
    cache_repo(tmp_path / "cache", "acme/m-ders", {Path(f).name: Path(f) for f in r.files},
               "c" * 40)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with torch.no_grad():
        got = load_from_archive("acme/m-ders", cache_dir=tmp_path / "cache")(tokens).logits
    assert torch.equal(got, ref)
