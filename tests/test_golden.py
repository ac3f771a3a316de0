"""Golden files (fixtures/golden): a format change cannot slip by unnoticed.

Reader side: the committed archives expand to the committed bytes. Writer side: compressing the
committed tiny checkpoint reproduces the committed archives byte for byte. If a change is meant
to alter the format, bump the version and regenerate with ``python -m fixtures.make_golden``.
"""

from __future__ import annotations

import hashlib
import json
import struct

import pytest
import zstandard

import ders_cli as ders
from ders_cli.archive import header_hash
from ders_cli.constants import HEADER_PREFIX
from fixtures.make_golden import (
    ARCHIVES,
    GOLDEN,
    GOLDEN_WRITER_VERSION,
    READER_VECTORS,
    SHARDED,
    TINY,
    digest_of,
    golden_writer,
    spec_of,
)

EXPECTED = json.loads((GOLDEN / "expected.json").read_text())


def sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("name", sorted(ARCHIVES) + sorted(READER_VECTORS))
def test_committed_archive_expands_to_the_recorded_bytes(tmp_path, name):
    assert sha(GOLDEN / name) == EXPECTED[name]["archive_sha256"]
    folder = ders.expand(GOLDEN / name, tmp_path / "x").folder
    got = {p.name: sha(p) for p in sorted(folder.iterdir())}
    assert got == EXPECTED[name]["expanded_sha256"]
    assert ders.verify(GOLDEN / name, against=TINY).ok


@pytest.mark.parametrize("name", sorted(ARCHIVES))
def test_writer_reproduces_the_committed_archive(tmp_path, name):
    zstd = EXPECTED[name].get("zstd")
    if zstd and zstd != ".".join(map(str, zstandard.ZSTD_VERSION)):
        pytest.skip(f"{name} was written with zstd {zstd}, this is {zstandard.ZSTD_VERSION}")
    with golden_writer():
        ders.compress(TINY, spec_of(name), tmp_path / name, reserve=0, digest=digest_of(name))
    assert sha(tmp_path / name) == EXPECTED[name]["archive_sha256"]


@pytest.mark.parametrize("folder", sorted(SHARDED))
def test_committed_sharded_archive_expands_to_the_recorded_bytes(tmp_path, folder):
    want = EXPECTED[folder]
    assert {p.name: sha(p) for p in sorted((GOLDEN / folder).iterdir())} == want["files_sha256"]
    assert len(want["files_sha256"]) == 4  # the index and three shards
    expanded = ders.expand(GOLDEN / folder, tmp_path / "x").folder
    got = {p.name: sha(p) for p in sorted(expanded.iterdir())}
    name = SHARDED[folder][0]
    assert got == want["expanded_sha256"] == EXPECTED[name]["expanded_sha256"]
    assert ders.verify(GOLDEN / folder, against=TINY).ok


@pytest.mark.parametrize("folder", sorted(SHARDED))
def test_writer_reproduces_the_committed_sharded_archive(tmp_path, folder):
    want = EXPECTED[folder]
    if want["zstd"] != ".".join(map(str, zstandard.ZSTD_VERSION)):
        pytest.skip(f"{folder} was written with zstd {want['zstd']}")
    name, limit = SHARDED[folder]
    with golden_writer():
        ders.compress(TINY, spec_of(name), tmp_path / name, reserve=0, max_shard_size=limit,
                      digest=digest_of(name))
    assert {p.name: sha(p) for p in sorted(tmp_path.iterdir())} == want["files_sha256"]


@pytest.mark.parametrize("name", ["tiny-q3.ders", "tiny-q3-blake3.ders"])
def test_header_hash_of_a_committed_archive(name):
    """SHA-256 in every version (version 4's BLAKE3 is the checksums' hash, not the header's)."""
    raw = (GOLDEN / name).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = raw[8 : 8 + n]
    assert header.startswith(HEADER_PREFIX) and n % 8 == 0
    recorded = header[len(HEADER_PREFIX) : len(HEADER_PREFIX) + 64].decode()
    zeroed = header[: len(HEADER_PREFIX)] + b"0" * 64 + header[len(HEADER_PREFIX) + 64 :]
    assert header_hash(raw[:8], header) == recorded == hashlib.sha256(raw[:8] + zeroed
                                                                      ).hexdigest()


def test_passthrough_tensors_of_the_tiny_model_survive_bit_exact(tmp_path):
    folder = ders.expand(GOLDEN / "tiny-q1.ders", tmp_path / "x").folder
    from safetensors.torch import load_file

    a, b = load_file(TINY / "model.safetensors"), load_file(folder / "model.safetensors")
    for name in ("model.embed_tokens.weight", "model.norm.weight", "model.position_ids"):
        assert a[name].dtype == b[name].dtype and a[name].equal(b[name])


def test_the_lossless_archive_expands_to_the_tiny_checkpoint_itself():
    expanded = EXPECTED["tiny-lossless.ders"]["expanded_sha256"]
    assert expanded == {p.name: sha(p) for p in sorted(TINY.iterdir())}


@pytest.mark.parametrize("folder", sorted(SHARDED))
def test_index_hash_of_the_committed_sharded_archive(folder):
    from ders_cli.archive import index_hash
    from ders_cli.constants import INDEX_PREFIX

    raw = (GOLDEN / folder / f"{SHARDED[folder][0]}.safetensors.index.json").read_bytes()
    assert raw.startswith(INDEX_PREFIX) and len(INDEX_PREFIX) == 34
    recorded = raw[len(INDEX_PREFIX) : len(INDEX_PREFIX) + 64].decode()
    assert index_hash(raw) == recorded


def test_golden_archives_record_their_fixed_writer_and_settings():
    from ders_cli.archive import ArchiveReader

    with ArchiveReader(GOLDEN / "tiny-drop0.5.ders") as reader:
        m = reader.manifest
    assert m.extra["writer"] == {"name": "ders", "version": GOLDEN_WRITER_VERSION,
                                 "command": None}
    assert m.source == {"kind": "folder", "name": "tiny", "settings": {
        "setting": "drop 0.5", "codec": "sparse", "drop": 0.5, "seed": 7, "mask": "random",
        "rescale": None, "value_bits": None, "value_group": 128, "base": "mean",
        "threshold": 0.9, "shared": True, "all_groups": False}}
