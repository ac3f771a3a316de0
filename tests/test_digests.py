"""The hash of an archive's checksums (docs/FORMAT.md 1, 9): BLAKE3 from format version 4,
SHA-256 before. Both are written and read; the version and the manifest's field names must
agree (crafted archives); header and index hashes stay SHA-256, so that a reader that predates
version 4 asks for an upgrade instead of calling the archive damaged."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from typer.testing import CliRunner

import ders_cli as ders
from ders_cli import archive, digests
from ders_cli.archive import ArchiveReader
from ders_cli.cli.app import app
from ders_cli.constants import HEADER_PREFIX
from ders_cli.errors import InvalidArchiveError, NewerFormatError, UsageError
from fixtures.make_golden import GOLDEN
from fixtures.synthetic import upcycled_tensors, write_model
from tests.craft import Crafted, craft

runner = CliRunner()


def tree(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    work = tmp_path_factory.mktemp("digests")
    return write_model(work / "model", upcycled_tensors(layers=2, experts=4, hidden=32,
                                                        intermediate=64),
                       side_files={"tokenizer.json": "{}"})


@pytest.fixture(scope="module")
def both(model, tmp_path_factory):
    """The same model compressed with each hash: {name: archive path}."""
    work = tmp_path_factory.mktemp("both")
    out = {}
    for d in digests.DIGESTS:
        out[d.name] = ders.compress(model, ders.QuantSpec(2), work / f"{d.name}.ders",
                                    digest=d.name).archive
    return out


def test_the_hashes_give_their_published_vectors():
    # BLAKE3's and SHA-256's digests of the empty input (their specifications' test vectors).
    assert digests.BLAKE3.hex(b"") == (
        "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262")
    assert digests.SHA256.hex(b"") == (
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855")


def test_each_hash_writes_its_version_and_fields(both):
    with ArchiveReader(both["blake3"]) as b3, ArchiveReader(both["sha256"]) as sha:
        assert (b3.manifest.version, sha.manifest.version) == (4, 2)
        assert (b3.digest, sha.digest) == (digests.BLAKE3, digests.SHA256)
        # The same content; only the checksums differ.
        assert b3.manifest.groups[0].codec == sha.manifest.groups[0].codec
        assert b3.manifest.stored.keys() == sha.manifest.stored.keys()
        assert b3.manifest.stored != sha.manifest.stored
    text = Crafted.load(both["blake3"]).manifest
    group = text["groups"][0]
    assert "recon_blake3" in group and "recon_sha256" not in group
    assert all("blake3" in t and "sha256" not in t for t in text["tensors"].values())
    assert Path(both["blake3"]).read_bytes()[8:47] == HEADER_PREFIX  # signed with SHA-256


def test_a_reader_before_version_4_asks_for_an_upgrade(both, monkeypatch):
    """What a version-3 reader does with a version-4 archive: the header hash holds (SHA-256),
    the version is newer than it reads: "upgrade ders", not "damaged"."""
    monkeypatch.setattr(archive, "FORMAT_VERSION", 3)
    with pytest.raises(NewerFormatError, match="version 4; this ders reads up to 3: upgrade"):
        ArchiveReader(both["blake3"])
    with ArchiveReader(both["sha256"]) as reader:  # what it can read, it still reads
        assert reader.manifest.version == 2


def test_both_expand_to_the_same_bytes_and_verify(both, model, tmp_path):
    a = ders.expand(both["blake3"], tmp_path / "a").folder
    b = ders.expand(both["sha256"], tmp_path / "b").folder
    assert tree(a) == tree(b)
    for path in both.values():
        assert ders.verify(path, against=model).ok


def test_sha256_keeps_the_oldest_versions_sharded_too(model, tmp_path):
    r = ders.compress(model, ders.QuantSpec(2), tmp_path / "s.ders", digest="sha256",
                      max_shard_size=20_000)
    with ArchiveReader(r.archive) as reader:
        assert reader.sharded and reader.manifest.version == 3
        assert reader.digest is digests.SHA256
    r = ders.compress(model, ders.QuantSpec(2), tmp_path / "b.ders", max_shard_size=20_000)
    with ArchiveReader(r.archive) as reader:
        assert reader.sharded and reader.manifest.version == 4
        assert reader.digest is digests.BLAKE3


def test_an_unknown_hash_is_refused_before_anything_is_read(tmp_path):
    with pytest.raises(UsageError, match="digest must be one of sha256, blake3"):
        ders.compress(tmp_path / "missing", ders.QuantSpec(2), tmp_path / "x.ders", digest="md5")


def test_the_cli_writes_either(model, tmp_path):
    out = tmp_path / "s.ders"
    result = runner.invoke(app, ["quantize", str(model), "--bits", "2", "--digest", "sha256",
                                 "-o", str(out), "-q"])
    assert result.exit_code == 0, result.output
    with ArchiveReader(out) as reader:
        assert reader.digest is digests.SHA256 and reader.manifest.version == 2
    result = runner.invoke(app, ["quantize", str(model), "--bits", "2", "--digest", "md5",
                                 "-o", str(tmp_path / "x.ders")])
    assert result.exit_code == 2 and not (tmp_path / "x.ders").exists()


def _version(c: Crafted, version: int) -> None:
    c.metadata["ders.version"] = str(version)
    c.manifest["version"] = version


@pytest.mark.parametrize("digest, version, field", [("blake3", 2, "sha256"),
                                                    ("sha256", 4, "blake3")])
def test_a_version_whose_hash_the_records_do_not_hold_is_refused(both, tmp_path, digest,
                                                                 version, field):
    """An archive relabelled to the other hash's version (and re-signed): its checksum fields
    are not the ones that version names."""
    bad = craft(both[digest], tmp_path / "bad.ders", lambda c: _version(c, version),
                rehash=False)
    with pytest.raises(InvalidArchiveError, match=f"lacks a checksum '{field}'"):
        ArchiveReader(bad)


@pytest.mark.parametrize("where", ["tensor", "file", "group"])
def test_checksums_under_the_other_hashs_names_are_refused(both, tmp_path, where):
    """A version-4 manifest whose records carry sha256 fields (of the right values even):
    the field its version names is missing."""
    def rename(c: Crafted) -> None:
        m = c.manifest
        records = {"tensor": list(m["tensors"].values()), "file": m["files"]}.get(where)
        if where == "group":
            g = m["groups"][0]
            g["recon_sha256"] = g.pop("recon_blake3")
        else:
            r = records[0]
            r["sha256"] = r.pop("blake3")

    bad = craft(both["blake3"], tmp_path / "bad.ders", rename)
    message = "bad recon_blake3" if where == "group" else "lacks a checksum 'blake3'"
    with pytest.raises(InvalidArchiveError, match=message):
        ArchiveReader(bad)


def test_the_golden_archives_of_both_hashes_open(tmp_path):
    for name, digest in (("tiny-q3.ders", digests.SHA256),
                         ("tiny-q3-blake3.ders", digests.BLAKE3)):
        with ArchiveReader(GOLDEN / name) as reader:
            assert reader.digest is digest


def test_upcycle_and_save_pretrained_write_either(tmp_path):
    """Every writer takes the hash: ``ders upcycle --digest`` and ``save_pretrained(...,
    digest=)`` of the model it gives (through save_archive) write versions before 4 with
    sha256, and refuse an unknown hash before loading anything."""
    from ders_cli.training import load_trainable
    from fixtures.tiny_dense import save_tiny_dense

    dense = save_tiny_dense(tmp_path / "dense", "mistral")
    out = tmp_path / "moe.ders"
    result = runner.invoke(app, ["upcycle", str(dense), "-o", str(out), "--digest", "sha256",
                                 "-q"])
    assert result.exit_code == 0, result.output
    with ArchiveReader(out) as reader:
        assert reader.digest is digests.SHA256 and reader.manifest.version < 4
    result = runner.invoke(app, ["upcycle", str(dense), "-o", str(tmp_path / "x.ders"),
                                 "--digest", "md5"])
    assert result.exit_code == 2 and not (tmp_path / "x.ders").exists()
    model = load_trainable(out)
    for d in digests.DIGESTS:
        model.save_pretrained(tmp_path / d.name, digest=d.name)
        archive = next((tmp_path / d.name).glob("*.ders*"))
        with ArchiveReader(archive) as reader:
            assert reader.digest is d
