"""The safetensors header parser: agrees with the safetensors library on good files, and names
the exact problem of every kind of broken one."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ders_cli.errors import InputError
from ders_cli.safetensors_io import TensorFile, encode_header, read_header


def write_raw(path, header: dict, data: bytes, pad: bool = True):
    raw = json.dumps(header).encode()
    if pad:
        raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


@pytest.fixture
def good(tmp_path):
    tensors = {
        "a": torch.arange(6, dtype=torch.float32).reshape(2, 3),
        "b": torch.tensor([1.5, -2.0], dtype=torch.bfloat16),
        "c": torch.tensor([True, False, True]),
        "d": torch.zeros(0, 4, dtype=torch.float16),
        "e": torch.tensor([7], dtype=torch.int64),
    }
    save_file(tensors, tmp_path / "m.safetensors", metadata={"format": "pt"})
    return tmp_path / "m.safetensors", tensors


def test_agrees_with_the_safetensors_library(good):
    path, tensors = good
    h = read_header(path)
    assert h.metadata == {"format": "pt"}
    with safe_open(path, "pt") as ref, TensorFile(h) as f:
        assert set(h.tensors) == set(ref.keys())
        for name, entry in h.tensors.items():
            assert list(entry.shape) == ref.get_slice(name).get_shape()
            assert entry.dtype == ref.get_slice(name).get_dtype()
            assert torch.equal(f.tensor(entry), tensors[name])
            assert b"".join(f.chunks(entry, chunk=3)) == f.read_bytes(entry.begin, entry.nbytes)


def test_sub_byte_and_exotic_dtypes_are_sized_by_bits(tmp_path):
    header = {"f4": {"dtype": "F4", "shape": [4], "data_offsets": [0, 2]},
              "f8": {"dtype": "F8_E4M3", "shape": [3], "data_offsets": [2, 5]},
              "c": {"dtype": "C64", "shape": [1], "data_offsets": [5, 13]}}
    h = read_header(write_raw(tmp_path / "x.safetensors", header, bytes(13)))
    assert [h.tensors[n].nbytes for n in ("f4", "f8", "c")] == [2, 3, 8]


def test_encode_header_pads_with_spaces_to_eight(tmp_path):
    raw = encode_header({"__metadata__": {"k": "v"}}, min_len=30)
    assert len(raw) == 32 and raw.endswith(b" ") and json.loads(raw) == {"__metadata__": {"k": "v"}}


BAD = {
    "empty file": (b"", "only 0 bytes long"),
    "header longer than the file": (struct.pack("<Q", 1000) + b"{}", "truncated: header length"),
    "huge header length": (struct.pack("<Q", 2**40) + b"{}", "exceeds the"),
    "not JSON": (struct.pack("<Q", 4) + b"{{{{", "not valid JSON"),
    "not an object": (struct.pack("<Q", 2) + b"[]", "not a JSON object"),
    "not UTF-8": (struct.pack("<Q", 2) + b"\xff\xfe", "not valid JSON"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_broken_containers(tmp_path, case):
    content, message = BAD[case]
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(InputError, match=message) as info:
        read_header(path)
    assert str(info.value).startswith(str(path))


BAD_HEADERS = {
    "unknown dtype": ({"a": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 2]}}, 2,
                      "unsupported dtype 'Q4'"),
    "size disagrees with shape": ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}},
                                  4, "header lies about tensor 'a'"),
    "overlap": ({"a": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]},
                 "b": {"dtype": "U8", "shape": [4], "data_offsets": [2, 6]}}, 6, "overlaps"),
    "hole": ({"a": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]},
              "b": {"dtype": "U8", "shape": [2], "data_offsets": [4, 6]}}, 6, "hole"),
    "past the end": ({"a": {"dtype": "U8", "shape": [8], "data_offsets": [0, 8]}}, 4,
                     "truncated: the header needs 8 bytes"),
    "trailing bytes": ({"a": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]}}, 5,
                       "3 bytes after the last tensor"),
    "negative shape": ({"a": {"dtype": "U8", "shape": [-1], "data_offsets": [0, 0]}}, 0,
                       "malformed shape"),
    "bad offsets": ({"a": {"dtype": "U8", "shape": [1], "data_offsets": [1, 0]}}, 0,
                    "malformed data_offsets"),
    "metadata not strings": ({"__metadata__": {"a": 1}}, 0, "must map strings to strings"),
    "entry not an object": ({"a": 3}, 0, "not an object"),
}


@pytest.mark.parametrize("case", sorted(BAD_HEADERS))
def test_headers_that_lie(tmp_path, case):
    header, data_len, message = BAD_HEADERS[case]
    path = write_raw(tmp_path / "bad.safetensors", header, bytes(data_len))
    with pytest.raises(InputError, match=message):
        read_header(path)


def test_duplicate_keys_are_refused(tmp_path):
    raw = b'{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},' \
          b'"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}'
    path = tmp_path / "dup.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\x00")
    with pytest.raises(InputError, match="appears twice"):
        read_header(path)


def test_missing_and_directory_paths(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        read_header(tmp_path / "nope.safetensors")
    with pytest.raises(InputError, match="is a directory"):
        read_header(tmp_path)
