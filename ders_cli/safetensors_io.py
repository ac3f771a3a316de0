"""Reading safetensors files: a header parser that validates before it trusts an offset, and
positional reads of one tensor's bytes.

Why not ``safe_open``: ders needs each tensor's raw bytes and file offsets (passthrough tensors
are copied byte for byte, whatever their dtype, and shards are rebuilt at the same offsets),
and it must name the exact problem of a broken file. Reads go through ``preadv`` into buffers
ders owns, so resident memory stays at one group however large the checkpoint is (a memory map
would count every page it touched).
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from .constants import COPY_CHUNK, DTYPE_BITS, HEADER_ALIGN, MAX_HEADER_BYTES
from .errors import InputError

TORCH_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in TORCH_DTYPES.items()}


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a safetensors file: where its bytes are, and what they mean."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int  # absolute offset of the first byte in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class Header:
    """A parsed, validated safetensors header."""

    path: Path
    raw: bytes  # the JSON bytes exactly as in the file, padding included
    metadata: dict[str, str] | None
    tensors: dict[str, TensorEntry]  # in the header's own order
    file_size: int

    @property
    def data_start(self) -> int:
        return 8 + len(self.raw)


def tensor_nbytes(dtype: str, shape: tuple[int, ...] | list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n * DTYPE_BITS[dtype] // 8


def _reject_duplicates(pairs: list[tuple[str, object]]) -> dict:
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"key {key!r} appears twice")
        out[key] = value
    return out


def parse_header_bytes(path: Path, raw: bytes, file_size: int) -> Header:
    """Validate a header's JSON against the file's size. ``raw`` excludes the length prefix."""
    try:
        obj = json.loads(raw.decode("utf-8"), object_pairs_hook=_reject_duplicates)
    except (UnicodeDecodeError, ValueError) as exc:
        raise InputError(f"not a safetensors file: its header is not valid JSON ({exc})",
                         path) from None
    if not isinstance(obj, dict):
        raise InputError("not a safetensors file: its header is not a JSON object", path)
    metadata = obj.pop("__metadata__", None)
    if metadata is not None and (
        not isinstance(metadata, dict)
        or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())
    ):
        raise InputError("safetensors __metadata__ must map strings to strings", path)
    data_start = 8 + len(raw)
    data_len = file_size - data_start
    tensors: dict[str, TensorEntry] = {}
    for name, info in obj.items():
        tensors[name] = _parse_entry(path, name, info, data_start)
    _check_coverage(path, tensors, data_start, data_len)
    return Header(path=path, raw=raw, metadata=metadata, tensors=tensors, file_size=file_size)


def _parse_entry(path: Path, name: str, info: object, data_start: int) -> TensorEntry:
    if not isinstance(info, dict):
        raise InputError(f"tensor {name!r}: header entry is not an object", path)
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if dtype not in DTYPE_BITS:
        raise InputError(f"tensor {name!r} has unsupported dtype {dtype!r}", path)
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise InputError(f"tensor {name!r} has a malformed shape {shape!r}", path)
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets)
        or offsets[0] > offsets[1]
    ):
        raise InputError(f"tensor {name!r} has malformed data_offsets {offsets!r}", path)
    numel = 1
    for d in shape:
        numel *= d
    bits = numel * DTYPE_BITS[dtype]
    if bits % 8:
        raise InputError(f"tensor {name!r}: {numel} x {dtype} is not a whole number of bytes", path)
    if offsets[1] - offsets[0] != bits // 8:
        raise InputError(
            f"header lies about tensor {name!r}: {dtype} {shape} needs {bits // 8} bytes, "
            f"its offsets {offsets} span {offsets[1] - offsets[0]}",
            path,
        )
    return TensorEntry(name, dtype, tuple(shape), data_start + offsets[0], data_start + offsets[1])


def _check_coverage(path: Path, tensors: dict[str, TensorEntry], start: int, length: int) -> None:
    # The data buffer must be covered exactly: no holes, no overlaps, nothing past the end.
    pos = start
    for entry in sorted(tensors.values(), key=lambda e: (e.begin, e.end)):
        if entry.begin != pos:
            what = ("overlaps the tensor before it" if entry.begin < pos
                    else "leaves a hole before it")
            raise InputError(f"header lies about offsets: tensor {entry.name!r} {what}", path)
        pos = entry.end
    if pos - start > length:
        raise InputError(
            f"truncated: the header needs {pos - start} bytes of tensor data, "
            f"the file has {max(length, 0)}",
            path,
        )
    if pos - start < length:
        raise InputError(
            f"{length - (pos - start)} bytes after the last tensor that no header entry covers",
            path,
        )


def read_header(path: str | Path) -> Header:
    """Read and validate the header of a safetensors file."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            prefix = f.read(8)
            if len(prefix) < 8:
                raise InputError(f"not a safetensors file: only {size} bytes long", path)
            (n,) = struct.unpack("<Q", prefix)
            if n > MAX_HEADER_BYTES:
                raise InputError(
                    f"not a safetensors file: header length {n} exceeds the "
                    f"{MAX_HEADER_BYTES}-byte limit",
                    path,
                )
            if 8 + n > size:
                raise InputError(
                    f"truncated: header length {n} but the file has only {size} bytes", path
                )
            raw = f.read(n)
    except IsADirectoryError:
        raise InputError("is a directory, expected a .safetensors file", path) from None
    except FileNotFoundError:
        raise InputError("no such file", path) from None
    except PermissionError:
        raise InputError("permission denied", path) from None
    return parse_header_bytes(path, raw, size)


def encode_header(obj: dict, min_len: int = 0) -> bytes:
    """Compact JSON padded with spaces to a multiple of 8 bytes (and to at least ``min_len``)."""
    raw = json.dumps(obj, separators=(",", ":"), ensure_ascii=True).encode("ascii")
    target = max(len(raw), min_len)
    target += -target % HEADER_ALIGN
    return raw + b" " * (target - len(raw))


class TensorFile:
    """Positional reads from one safetensors file; safe to share between threads."""

    def __init__(self, header: Header) -> None:
        self.header = header
        self.path = header.path
        self._fd = os.open(self.path, os.O_RDONLY)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> TensorFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def read_into(self, offset: int, out: memoryview) -> None:
        view = out.cast("B") if out.format != "B" else out
        done = 0
        while done < len(view):
            got = os.preadv(self._fd, [view[done:]], offset + done)
            if got == 0:
                raise InputError(f"truncated while reading at byte {offset + done}", self.path)
            done += got

    def read_bytes(self, offset: int, length: int) -> bytearray:
        buf = bytearray(length)
        self.read_into(offset, memoryview(buf))
        return buf

    def chunks(self, entry: TensorEntry, chunk: int = COPY_CHUNK) -> Iterator[bytearray]:
        """The bytes of one tensor in order, ``chunk`` bytes at a time."""
        pos = entry.begin
        while pos < entry.end:
            n = min(chunk, entry.end - pos)
            yield self.read_bytes(pos, n)
            pos += n

    def tensor(self, entry: TensorEntry) -> torch.Tensor:
        """One tensor in its own dtype; only for dtypes torch has (see TORCH_DTYPES)."""
        dtype = TORCH_DTYPES.get(entry.dtype)
        if dtype is None:
            raise InputError(f"tensor {entry.name!r}: ders cannot compute on {entry.dtype}",
                             self.path)
        out = torch.empty(entry.shape, dtype=dtype)
        if entry.nbytes:
            self.read_into(entry.begin, memoryview(out.view(-1).view(torch.uint8).numpy()))
        return out


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The little-endian bytes of a tensor, without a copy when it is contiguous."""
    t = t.detach().contiguous().cpu()
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.view(-1).view(torch.uint8).numpy())
