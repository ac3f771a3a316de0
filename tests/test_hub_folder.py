"""A Hub-ready folder (``ders compress MODEL -o DIR/``): what ``hf upload`` takes as it is,
what ``from_pretrained`` loads with the expanded model's logits, what ``ders expand`` turns back
into the original bytes; and the provenance every archive records (ders' version, the source's
repo id and revision, the settings, the command line without its token)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import ders_cli as ders
from ders_cli.archive import ArchiveReader
from ders_cli.cli.app import app
from ders_cli.hf.quantizer import NEEDS_DERS
from ders_cli.provenance import masked_command
from fixtures.upcycled import Dims, make_upcycled
from tests.test_hub import REVISION, hub_cache  # noqa: F401 - a fixture
from tests.test_hub import ders as ders_process

runner = CliRunner()
TOKENS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(3))
ROOT = Path(__file__).resolve().parents[1]


def tree(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(TOKENS).logits


def expanded(path: Path):
    """The expanded model as transformers loads it by default: the folder's synthesized experts
    compute as its experts implementation does (grouped), bit for bit."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).eval()


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    """A Mixtral saved by transformers, with a tokenizer, its own card and weights in another
    format beside it (which the folder must not carry as plain files)."""
    folder = make_upcycled(tmp_path_factory.mktemp("hf") / "moe", Dims(vocab=128),
                           family="mixtral")
    (folder / "tokenizer.json").write_text('{"model": "a tokenizer"}')
    (folder / "README.md").write_text("---\nlicense: apache-2.0\n---\n# the original card\n")
    (folder / "pytorch_model.bin").write_bytes(b"old weights in another format")
    return folder


def compress_to_folder(model: Path, out: Path, *args: str) -> dict:
    r = runner.invoke(app, ["compress", str(model), *args, "-o", f"{out}/", "--json"])
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".partial-" in p.name)


@pytest.mark.parametrize("shard", [None, "60KB"])
def test_the_folder_loads_with_from_pretrained_as_the_expanded_model(model, tmp_path, shard):
    from transformers import AutoModelForCausalLM

    from ders_cli.runtime import load_from_archive

    out = tmp_path / "moe-ders"
    doc = compress_to_folder(model, out, "--drop", "0.9",
                             *(["--max-shard-size", shard] if shard else []))
    assert Path(doc["archive"]) == out
    names = sorted(p.name for p in out.iterdir())
    archive = [n for n in names if n.startswith("model.ders")]
    assert sorted(Path(f).name for f in doc["files"]) == archive
    if shard:
        assert "model.ders.safetensors.index.json" in archive and len(archive) >= 3
        assert all(n.endswith(".safetensors") for n in archive if "-of-" in n)
    else:
        assert archive == ["model.ders.safetensors"]
    plain = {p.name for p in model.iterdir() if p.suffix not in (".safetensors", ".bin")}
    assert "tokenizer.json" in plain and "generation_config.json" in plain
    assert set(names) - set(archive) == plain  # README.md, config.json: the folder's own
    assert leftovers(tmp_path) == []
    ders.expand(out, tmp_path / "x")
    ref = logits(expanded(tmp_path / "x"))
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert torch.equal(logits(loaded), ref)
    assert torch.equal(logits(load_from_archive(out)), ref)


def test_a_lossless_folder_expands_and_verifies_to_the_original_bytes(model, tmp_path):
    out = tmp_path / "exact"
    compress_to_folder(model, out, "--lossless")
    r = runner.invoke(app, ["expand", str(out), "-o", str(tmp_path / "back")])
    assert r.exit_code == 0, r.output
    assert tree(tmp_path / "back") == tree(model)  # the card, the .bin, the config: all back
    r = runner.invoke(app, ["verify", str(out), "--against", str(model)])
    assert r.exit_code == 0, r.output


def test_the_folder_is_what_hf_upload_takes(model, tmp_path):
    out = tmp_path / "up"
    compress_to_folder(model, out, "--drop", "0.9")
    names = {p.name for p in out.rglob("*")}
    # Nothing a loader without ders would take for the weights, nothing hidden left behind.
    assert not names & {"model.safetensors", "model.safetensors.index.json",
                        "pytorch_model.bin"}
    assert not any(n.startswith(".") for n in names)
    assert (out / "tokenizer.json").read_bytes() == (model / "tokenizer.json").read_bytes()
    config = json.loads((out / "config.json").read_text())
    original = json.loads((model / "config.json").read_text())
    q = config.pop("quantization_config")
    assert q["quant_method"] == "ders" and q["archive"] == "model.ders.safetensors"
    assert q["setting"] == "drop 0.9" and q["ders_version"] == ders.__version__
    assert config.pop("transformers_weights") == NEEDS_DERS
    assert config == original


def test_the_card_holds_the_measured_figures_and_the_hubs_metadata(model, tmp_path):
    out = tmp_path / "card"
    doc = compress_to_folder(model, out, "--drop", "0.9")
    card = (out / "README.md").read_text()
    _, front, body = card.split("---\n", 2)
    assert "library_name: transformers" in front and "- ders" in front
    assert "license: apache-2.0" in front  # the original card's license
    assert "pipeline_tag: text-generation" in front
    assert "base_model" not in front  # a local model: no repo id to name
    with ArchiveReader(out) as reader:
        errors = [e for g in reader.manifest.groups for e in g.rel_error]
        cos = [c for g in reader.manifest.groups for c in g.cos]
    assert f"largest {max(errors):.3e}" in body and f"smallest {min(cos):.6f}" in body
    assert f"{doc['ratio']:.1%} of the original" in body
    for text in ("`drop 0.9`", "import ders_cli", "from_pretrained", "ders expand",
                 "ders verify", "hf upload", "ders eval"):
        assert text in body, text


def test_the_card_loads_the_repo_the_folder_is_meant_for(model, tmp_path):
    plain = (tmp_path / "plain")
    r = runner.invoke(app, ["compress", str(model), "--drop", "0.9", "-o", f"{plain}/"])
    assert r.exit_code == 0, r.output
    assert "hf upload ORG/plain" in r.stdout and "--repo-id ORG/plain names it" in r.stdout
    assert "YOUR-ORG/plain" in (plain / "README.md").read_text()  # a placeholder it explains
    out = tmp_path / "named"
    r = runner.invoke(app, ["compress", str(model), "--drop", "0.9", "-o", f"{out}/",
                            "--repo-id", "me/moe-ders"])
    assert r.exit_code == 0, r.output
    assert "upload it as it is: hf upload me/moe-ders" in r.stdout
    card = (out / "README.md").read_text()
    assert "YOUR-ORG" not in card
    assert 'from_pretrained("me/moe-ders"' in card and 'load_from_archive("me/moe-ders")' in card
    assert "ders expand me/moe-ders" in card and "hf upload me/moe-ders named/" in card
    # The library takes it as repo_id; the archive does not depend on it.
    ders.compress(model, ders.SparseSpec(drop=0.9), f"{tmp_path}/lib/", repo_id="me/x")
    assert 'from_pretrained("me/x"' in (tmp_path / "lib" / "README.md").read_text()
    assert tree(tmp_path / "lib")["model.ders.safetensors"] == tree(out)["model.ders.safetensors"]


@pytest.mark.parametrize("args, why", [
    (["--repo-id", "me/x"], "--repo-id names the Hub repo a Hub-ready folder"),  # not a folder
    (["--repo-id", "moe-ders", "-o", "F/"], "--repo-id must be a Hub repo id, NAMESPACE/NAME"),
    (["--repo-id", "me/a b", "-o", "F/"], "--repo-id must be a Hub repo id"),
    (["--repo-id", "me/../x", "-o", "F/"], "--repo-id must be a Hub repo id"),
    (["--repo-id", "me/x)](http://evil", "-o", "F/"], "--repo-id must be a Hub repo id"),
])
def test_a_repo_id_that_cannot_name_the_folders_repo_is_refused_before_any_work(
        model, tmp_path, args, why):
    args = [a.replace("F/", f"{tmp_path}/f/") for a in args]
    before = tree(tmp_path)
    r = runner.invoke(app, ["compress", str(model), "--drop", "0.9", *args])
    assert r.exit_code == 2, r.output
    assert why in r.output and len(r.output.strip().splitlines()) == 1, r.output
    assert tree(tmp_path) == before and not (tmp_path / "f").exists()
    assert not list(model.parent.glob("*.ders"))  # no archive beside the model either


def test_without_ders_transformers_refuses_the_folder_naming_ders(model, tmp_path):
    out = tmp_path / "plain"
    compress_to_folder(model, out, "--drop", "0.9")
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    r = subprocess.run([sys.executable, "-c", "from transformers import AutoModelForCausalLM "
                        f"as A\nA.from_pretrained({str(out)!r})"], capture_output=True,
                       text=True, env=dict(os.environ, PYTHONPATH=path), timeout=600)
    assert r.returncode != 0 and NEEDS_DERS in r.stderr.strip().splitlines()[-1]


def test_folder_outputs_exist_or_not(model, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    r = runner.invoke(app, ["compress", str(model), "--drop", "0.9", "-o", str(empty)])
    assert r.exit_code == 2 and "-o DIR/ (with the slash)" in r.output  # a file or a folder?
    r = runner.invoke(app, ["compress", str(model), "--drop", "0.9", "-o", f"{empty}/"])
    assert r.exit_code == 0, r.output  # an empty folder needs no --force
    assert (empty / "config.json").is_file()
    r = runner.invoke(app, ["compress", str(model), "--drop", "0.9", "-o", f"{empty}/"])
    assert r.exit_code == 2 and "--force" in r.output
    # --force into it with a sharded archive: the one-file archive it replaces goes, the
    # user's own files stay.
    (empty / "notes.txt").write_text("mine")
    r = runner.invoke(app, ["compress", str(model), "--drop", "0.9", "-o", f"{empty}/",
                            "--max-shard-size", "60KB", "--force"])
    assert r.exit_code == 0, r.output
    names = sorted(p.name for p in empty.iterdir())
    assert "model.ders.safetensors" not in names and "notes.txt" in names
    assert json.loads((empty / "config.json").read_text())["quantization_config"][
        "archive"] == "model.ders.safetensors.index.json"
    assert ders.verify(empty).ok
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("target, why", [
    ("x.ders/", "ending like a file"),
    ("inside/", "inside the model folder"),
    ("weights/", "holds model.safetensors"),
    ("file/", "not a folder"),
])
def test_ambiguous_or_unsafe_folder_outputs_are_refused_before_any_work(model, tmp_path,
                                                                       target, why):
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "model.safetensors").write_bytes(b"someone's weights")
    (tmp_path / "file").write_text("a file")
    before = tree(tmp_path)
    out = model / "sub" if target == "inside/" else tmp_path / target
    r = runner.invoke(app, ["compress", str(model), "--drop", "0.9", "-o", f"{out}/"])
    assert r.exit_code == 2, r.output
    assert why in r.output and len(r.output.strip().splitlines()) == 1, r.output
    assert tree(tmp_path) == before and not (model / "sub").exists()


def test_a_model_without_config_cannot_be_a_folder(tmp_path):
    from fixtures.synthetic import upcycled_tensors, write_model

    bare = write_model(tmp_path / "bare", upcycled_tensors(layers=1)) / "model.safetensors"
    r = runner.invoke(app, ["compress", str(bare), "--drop", "0.9", "-o", f"{tmp_path}/o/"])
    assert r.exit_code == 2 and "config.json" in r.output
    assert not (tmp_path / "o").exists()


def test_a_failure_while_the_folder_is_built_leaves_nothing(model, tmp_path, monkeypatch):
    from ders_cli import publish

    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(publish, "fill_folder", broken)
    r = runner.invoke(app, ["compress", str(model), "--drop", "0.9", "-o", f"{tmp_path}/o/"])
    assert r.exit_code == 2 and "no space left" in r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == []


# --- provenance -------------------------------------------------------------------------------

def test_every_archive_records_its_writer_source_and_settings(hub_cache, tmp_path):  # noqa: F811
    r = ders_process("compress", "acme/tiny-moe", "--drop", "0.9", "--seed", "3", "--token",
                     "hf_SECRETSECRETSECRETSECRET", "-o", "t.ders", cache=hub_cache,
                     cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    with ArchiveReader(tmp_path / "t.ders") as reader:
        m = reader.manifest
    assert m.extra["writer"] == {
        "name": "ders", "version": ders.__version__,
        "command": ["ders", "compress", "acme/tiny-moe", "--drop", "0.9", "--seed", "3",
                    "--token", "***", "-o", "t.ders"]}
    assert m.source["repo_id"] == "acme/tiny-moe" and m.source["revision"] == REVISION
    settings = m.source["settings"]
    assert settings["setting"] == "drop 0.9" and settings["drop"] == 0.9
    assert settings["seed"] == 3 and settings["base"] == "mean"
    assert b"SECRET" not in (tmp_path / "t.ders").read_bytes()


def test_a_folder_of_a_hub_model_names_its_base_model(hub_cache, tmp_path):  # noqa: F811
    r = ders_process("compress", "acme/tiny-moe", "--drop", "0.9", "-o", "card/",
                     cache=hub_cache, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "hf upload" in r.stdout
    card = (tmp_path / "card" / "README.md").read_text()
    front = card.split("---\n")[1]
    assert "base_model: acme/tiny-moe" in front and "base_model_relation: quantized" in front
    assert f"revision `{REVISION}`" in card
    r = ders_process("verify", "card", cache=hub_cache, cwd=tmp_path)
    assert r.returncode == 0, r.stderr


def test_the_library_call_records_no_command(model, tmp_path):
    ders.compress(model, ders.QuantSpec(2), tmp_path / "q.ders")
    with ArchiveReader(tmp_path / "q.ders") as reader:
        assert reader.manifest.extra["writer"]["command"] is None
        settings = reader.manifest.source["settings"]
        assert settings["bits"] == 2 and settings["codec"] == "quant"
        assert "repo_id" not in reader.manifest.source


def test_tokens_are_masked_wherever_they_are():
    assert masked_command(["ders", "x", "--token", "abc", "--token=def", "-o",
                           "hf_abcdefghijklmnopqrstu/x"]) == [
        "ders", "x", "--token", "***", "--token=***", "-o", "***/x"]


def test_the_library_writes_the_folder_with_folder_true(model, tmp_path):
    result = ders.compress(model, ders.SparseSpec(0.9), tmp_path / "lib", folder=True)
    assert result.archive == tmp_path / "lib" and ders.verify(result.archive).ok
    assert (tmp_path / "lib" / "README.md").is_file()
    with pytest.raises(ders.InputError, match="with the slash"):
        ders.compress(model, ders.SparseSpec(0.9), tmp_path / "lib", overwrite=True)
