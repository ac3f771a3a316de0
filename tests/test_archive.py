"""The archive container: writer state machine, header growth, header hash, and detection of
any flipped byte."""

from __future__ import annotations

import json
import re
import struct

import pytest
import torch

import ders_cli as ders
from ders_cli.archive import ArchiveReader, ArchiveWriter, WriterState, header_hash
from ders_cli.constants import HEADER_PREFIX
from ders_cli.errors import CorruptArchiveError, InputError, NewerFormatError
from ders_cli.outputs import temp_path
from ders_cli.records import Manifest, ShardRecord
from fixtures.synthetic import write_model


def minimal_manifest(stored: dict[str, str]) -> Manifest:
    return Manifest(source={"kind": "file", "name": "x"},
                    shards=(ShardRecord("x.safetensors", 0, "h"),), files=(), tensors={},
                    groups=(), passthrough_groups=(), stored=stored)


def test_writer_round_trip_and_state_machine(tmp_path):
    dest = tmp_path / "a.ders"
    w = ArchiveWriter(dest, reserve=4096)
    w.add("h", "U8", (3,), b"abc")
    w.add("t", "F32", (2,), [memoryview(b"\x00" * 4), b"\x00\x00\x80\x3f"])
    with pytest.raises(ValueError, match="stored twice"):
        w.add("h", "U8", (1,), b"x")
    with pytest.raises(ValueError, match="needs 8"):
        w.add("short", "F32", (2,), b"1234")
    w.finish(minimal_manifest(w.stored_digests))
    assert w.state is WriterState.DONE and dest.exists() and not temp_path(dest).exists()
    with pytest.raises(RuntimeError, match="writer is done"):
        w.add("late", "U8", (1,), b"x")
    raw = dest.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    assert n % 8 == 0 and n >= 4096 and raw[8:].startswith(HEADER_PREFIX)


@pytest.mark.parametrize("reserve", [0, 64, 1 << 16])
def test_header_that_outgrows_its_room_moves_the_data(tmp_path, reserve):
    dest = tmp_path / "a.ders"
    payload = bytes(range(256)) * 300
    with ArchiveWriter(dest, reserve=reserve) as w:
        w.add("h", "U8", (len(payload),), payload)
        manifest = minimal_manifest(w.stored_digests)
        w.finish(manifest)
    from safetensors import safe_open

    with safe_open(dest, "pt") as f:  # still a valid safetensors file for the reference library
        assert bytes(f.get_tensor("h").numpy()) == payload


def test_aborted_writer_leaves_nothing(tmp_path):
    dest = tmp_path / "a.ders"
    with pytest.raises(RuntimeError, match="boom"), ArchiveWriter(dest, reserve=0) as w:
        w.add("h", "U8", (1,), b"x")
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def tiny_model(tmp_path):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(2, 4, generator=g)
    tensors = {f"model.layers.0.mlp.experts.{e}.up_proj.weight":
               (base + 0.01 * torch.randn(2, 4, generator=g)).to(torch.bfloat16) for e in range(2)}
    tensors["model.norm.weight"] = torch.ones(2)
    return write_model(tmp_path / "m", tensors, side_files={"config.json": "{}"})


@pytest.fixture
def small_archive(tmp_path):
    ders.compress(tiny_model(tmp_path), ders.QuantSpec(3, 4), tmp_path / "a.ders", reserve=0)
    return tmp_path / "a.ders"


def test_header_hash_covers_the_padding(tmp_path):
    dest = tmp_path / "padded.ders"
    ders.compress(tiny_model(tmp_path), ders.QuantSpec(2), dest, reserve=1 << 15)
    raw = bytearray(dest.read_bytes())
    (n,) = struct.unpack("<Q", raw[:8])
    assert raw[8 + n - 1] == 0x20  # the reserved room is padding spaces
    assert header_hash(bytes(raw[:8]), bytes(raw[8 : 8 + n])) == \
        raw[8 + len(HEADER_PREFIX) : 8 + len(HEADER_PREFIX) + 64].decode()
    raw[8 + n - 1] = 0x09  # a tab: still valid JSON whitespace, so only the hash can tell
    dest.write_bytes(bytes(raw))
    with pytest.raises(CorruptArchiveError, match="header checksum mismatch"):
        ArchiveReader(dest)


def test_every_flipped_byte_is_detected(small_archive):
    """verify reports a problem (or refuses the file as corrupt) for a flip of any byte, and
    never fails in any other way."""
    original = small_archive.read_bytes()
    assert 2000 < len(original) < 20000
    assert ders.verify(small_archive).ok
    undetected = []
    for pos in range(len(original)):
        for mask in (0x01, 0x80) if pos < 64 else (0x01,):
            corrupt = bytearray(original)
            corrupt[pos] ^= mask
            small_archive.write_bytes(bytes(corrupt))
            try:
                report = ders.verify(small_archive)
            except (CorruptArchiveError, NewerFormatError, InputError):
                continue
            if report.ok:
                undetected.append(pos)
    assert undetected == []


@pytest.mark.parametrize("version, shown", [
    ("9", "version 9;"),
    ("0009", "version 9;"),
    # More digits than Python's int() converts (4,300): refused as newer, not an internal error.
    ("1" * 5000, "version 11111111111111111111... (5000 digits);"),
])
def test_newer_version_is_refused_with_an_upgrade_hint(small_archive, version, shown):
    raw = bytearray(small_archive.read_bytes())
    (n,) = struct.unpack("<Q", raw[:8])
    pattern = rb'"ders.version":"\d+"'
    header = bytes(raw[8 : 8 + n])
    header = re.sub(pattern, b'"ders.version":"' + version.encode() + b'"', header)
    header = bytearray(header + b" " * (-len(header) % 8))
    prefix = struct.pack("<Q", len(header))
    start = len(HEADER_PREFIX)
    header[start : start + 64] = header_hash(prefix, bytes(header)).encode()
    small_archive.write_bytes(prefix + bytes(header) + bytes(raw[8 + n :]))
    with pytest.raises(NewerFormatError, match=re.escape(shown) + ".*upgrade ders"):
        ArchiveReader(small_archive)


def test_a_plain_safetensors_file_is_not_an_archive(tmp_path):
    model = tiny_model(tmp_path)
    with pytest.raises(InputError, match="not a ders archive") as info:
        ArchiveReader(model / "model.safetensors")
    assert not isinstance(info.value, CorruptArchiveError)


def test_unknown_codec_is_refused_as_newer(small_archive):
    raw = bytearray(small_archive.read_bytes())
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    manifest = json.loads(header["__metadata__"]["ders.manifest"])
    manifest["groups"][0]["codec"]["name"] = "fancy"
    header["__metadata__"]["ders.manifest"] = json.dumps(manifest, separators=(",", ":"))
    body = json.dumps(header, separators=(",", ":")).encode()
    body += b" " * (-len(body) % 8)
    prefix = struct.pack("<Q", len(body))
    body = bytearray(body)
    start = len(HEADER_PREFIX)
    body[start : start + 64] = header_hash(prefix, bytes(body)).encode()
    small_archive.write_bytes(prefix + bytes(body) + raw[8 + n :])
    with pytest.raises(NewerFormatError, match="codec 'fancy'"):
        ArchiveReader(small_archive)
