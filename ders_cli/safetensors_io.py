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
import stat
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from . import safejson
from .constants import COPY_CHUNK, DTYPE_BITS, HEADER_ALIGN, MAX_HEADER_BYTES
from .dtypes import DTYPE_NAMES, TORCH_DTYPES  # noqa: F401 (DTYPE_NAMES: re-exported)
from .errors import InputError

# No file has more bytes than a 64-bit offset reaches, so no tensor has more elements.
MAX_ELEMENTS = 1 << 64


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


def parse_header_bytes(path: Path, raw: bytes, file_size: int | None) -> Header:
    """Validate a header's JSON against the file's size. ``raw`` excludes the length prefix.
    ``file_size`` None: the size the header implies (the caller compares it with the file's;
    see ``check_length``)."""
    try:
        obj = safejson.loads(raw)
    except ValueError as exc:
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
    tensors: dict[str, TensorEntry] = {}
    for name, info in obj.items():
        tensors[name] = _parse_entry(path, name, info, data_start)
    covered = _check_coverage(path, tensors, data_start)
    if file_size is None:
        file_size = data_start + covered
    check_length(path, covered, file_size - data_start)
    return Header(path=path, raw=raw, metadata=metadata, tensors=tensors, file_size=file_size)


def _parse_entry(path: Path, name: str, info: object, data_start: int) -> TensorEntry:
    if not isinstance(info, dict):
        raise InputError(f"tensor {name!r}: header entry is not an object", path)
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
        raise InputError(f"tensor {name!r} has unsupported dtype {dtype!r}", path)
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise InputError(f"tensor {name!r} has a malformed shape "
                         f"{_short(shape) if isinstance(shape, list) else repr(shape)}", path)
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets)
        or offsets[0] > offsets[1]
    ):
        raise InputError(f"tensor {name!r} has malformed data_offsets {offsets!r}", path)
    # Multiplied with an early stop: a shape of a million huge dimensions would otherwise cost
    # minutes of big-integer products before the offsets could refute it.
    numel = 0 if 0 in shape else 1
    for d in shape if numel else ():
        numel *= d
        if numel > MAX_ELEMENTS:
            raise InputError(f"tensor {name!r}: shape {_short(shape)} has more than 2^64 "
                             "elements", path)
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


def _short(shape: list) -> str:
    return str(shape) if len(shape) <= 8 else f"[{shape[0]}, ... {len(shape)} dimensions]"


def _check_coverage(path: Path, tensors: dict[str, TensorEntry], start: int) -> int:
    """The bytes of data the tensors cover, which must be one run from the data's start: no
    holes, no overlaps."""
    pos = start
    for entry in sorted(tensors.values(), key=lambda e: (e.begin, e.end)):
        if entry.begin != pos:
            what = ("overlaps the tensor before it" if entry.begin < pos
                    else "leaves a hole before it")
            raise InputError(f"header lies about offsets: tensor {entry.name!r} {what}", path)
        pos = entry.end
    return pos - start


def check_length(path: Path, covered: int, length: int) -> None:
    """The data the header covers must be the file's data, to the byte: nothing past the end,
    nothing after the last tensor. (Apart from parsing: a file cut short or grown is damage,
    where a header that contradicts itself was written that way.)"""
    if covered > length:
        raise InputError(
            f"truncated: the header needs {covered} bytes of tensor data, "
            f"the file has {max(length, 0)}",
            path,
        )
    if covered < length:
        raise InputError(
            f"{length - covered} bytes after the last tensor that no header entry covers",
            path,
        )


_KINDS = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"),
          (stat.S_ISDIR, "a directory"))


def not_regular(mode: int) -> str | None:
    """What a file is when it is not a regular file ("a FIFO", ...), or None."""
    if stat.S_ISREG(mode):
        return None
    return next((what for test, what in _KINDS if test(mode)), "not a regular file")


def open_regular(path: Path, what: str = "a regular file") -> int:
    """A read-only descriptor of ``path``, which must be a regular file. Opened without
    blocking, so that a FIFO is refused instead of waiting forever for a writer; /dev/zero and
    the like are refused too (they never end)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise InputError("no such file", path) from None
    except PermissionError:
        raise InputError("permission denied", path) from None
    except OSError as exc:
        raise InputError(f"cannot be opened ({exc.strerror})", path) from None
    kind = not_regular(os.fstat(fd).st_mode)
    if kind is not None:
        os.close(fd)
        raise InputError(f"is {kind}, expected {what}", path)
    os.set_blocking(fd, True)
    return fd


def read_header(path: str | Path) -> Header:
    """Read and validate the header of a safetensors file."""
    path = Path(path)
    raw, size = read_header_bytes(path)
    return parse_header_bytes(path, raw, size)


def read_header_bytes(path: Path) -> tuple[bytes, int]:
    """A safetensors file's header bytes (without the length prefix) and the file's size,
    unparsed: an archive's header hash is checked before its JSON is parsed."""
    fd = open_regular(path, "a .safetensors file")
    with os.fdopen(fd, "rb") as f:
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
        if len(raw) != n:
            raise InputError("changed while it was read", path)
    return raw, size


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
        self._fd = open_regular(self.path, "a .safetensors file")
        if os.fstat(self._fd).st_size != header.file_size:
            os.close(self._fd)
            self._fd = -1
            raise InputError("changed since its header was read", self.path)

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
