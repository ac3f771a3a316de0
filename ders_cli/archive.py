"""The .ders archive: a streaming writer and a reader that validates before it trusts.

An archive is one safetensors file (docs/FORMAT.md). The writer reserves room for the header,
streams stored arrays after it as they are produced, then writes the header (manifest, offsets,
header hash) into the reserved room and renames the file into place. If the header outgrows
the room, the data is moved up once; the estimate makes that rare.
"""

from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Iterable
from enum import Enum
from pathlib import Path

import torch

from .codecs import DeltaCodec, get_codec
from .codecs.bases import stored_base_dtype
from .constants import (
    BASE_RAW,
    COPY_CHUNK,
    FORMAT_NAME,
    FORMAT_VERSION,
    HASH_HEX_LEN,
    HEADER_HASH_KEY,
    HEADER_PREFIX,
    META_FORMAT,
    META_MANIFEST,
    META_VERSION,
)
from .errors import CorruptArchiveError, InputError, InvalidArchiveError, NewerFormatError
from .profile import stage
from .records import Manifest
from .safetensors_io import (
    DTYPE_NAMES,
    Header,
    TensorEntry,
    TensorFile,
    check_length,
    encode_header,
    not_regular,
    open_regular,
    parse_header_bytes,
    read_header_bytes,
    tensor_bytes,
    tensor_nbytes,
)

Bytes = bytes | bytearray | memoryview


def header_hash(prefix: bytes, raw: bytes) -> str:
    """sha256 of the length prefix and header, with the hash's own 64 digits read as zeros."""
    start = len(HEADER_PREFIX)
    zeroed = raw[:start] + b"0" * HASH_HEX_LEN + raw[start + HASH_HEX_LEN :]
    return hashlib.sha256(prefix + zeroed).hexdigest()


def temp_path(dest: Path) -> Path:
    """Where an output is built before it is renamed into place: hidden, beside it."""
    return dest.with_name(f".{dest.name}.partial-{os.getpid()}")


class WriterState(Enum):
    DATA = "data"
    DONE = "done"
    ABORTED = "aborted"


class ArchiveWriter:
    """Writes an archive under a temporary name; ``finish`` renames it to ``dest``."""

    def __init__(self, dest: Path, reserve: int, overwrite: bool = False) -> None:
        self.dest = Path(dest)
        self.overwrite = overwrite
        self._tmp = temp_path(self.dest)
        self._reserve = max(reserve, 64) + (-max(reserve, 64) % 8)
        self._f = open(self._tmp, "w+b")  # noqa: SIM115 - closed by finish/abort
        self._entries: dict[str, tuple[str, tuple[int, ...], int, int]] = {}
        self._sha: dict[str, str] = {}
        self._pos = 0
        self.state = WriterState.DATA
        self._f.seek(8 + self._reserve)

    def _require(self, state: WriterState, action: str) -> None:
        if self.state is not state:
            raise RuntimeError(f"cannot {action}: archive writer is {self.state.value}")

    def add(self, name: str, dtype: str, shape: tuple[int, ...] | list[int],
            data: Bytes | Iterable[Bytes]) -> str:
        """Append one stored array; returns the sha256 of its bytes."""
        self._require(WriterState.DATA, f"add {name!r}")
        if name in self._entries:
            raise ValueError(f"array {name!r} is stored twice")
        expected = tensor_nbytes(dtype, shape)
        sha = hashlib.sha256()
        begin = self._pos
        chunks = [data] if isinstance(data, (bytes, bytearray, memoryview)) else data
        for chunk in chunks:
            view = memoryview(chunk).cast("B")
            with stage("write"):  # a passthrough tensor's hash and read count here too
                sha.update(view)
                self._f.write(view)
            self._pos += len(view)
        if self._pos - begin != expected:
            raise ValueError(f"array {name!r}: wrote {self._pos - begin} bytes, "
                             f"{dtype} {list(shape)} needs {expected}")
        self._entries[name] = (dtype, tuple(shape), begin, self._pos)
        self._sha[name] = sha.hexdigest()
        return self._sha[name]

    def add_tensor(self, name: str, t: torch.Tensor, dtype: str | None = None) -> str:
        return self.add(name, dtype or DTYPE_NAMES[t.dtype], tuple(t.shape), tensor_bytes(t))

    @property
    def stored_sha256(self) -> dict[str, str]:
        return dict(self._sha)

    @property
    def data_bytes(self) -> int:
        return self._pos

    def finish(self, manifest: Manifest) -> int:
        """Write the header, move the file into place; returns the archive's size in bytes."""
        self._require(WriterState.DATA, "finish")
        header: dict = {
            "__metadata__": {
                HEADER_HASH_KEY: "0" * HASH_HEX_LEN,
                META_FORMAT: FORMAT_NAME,
                META_VERSION: str(manifest.version),
                META_MANIFEST: manifest.to_json(),
            }
        }
        for name, (dtype, shape, begin, end) in self._entries.items():
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [begin, end]}
        raw = encode_header(header, min_len=self._reserve)
        assert raw.startswith(HEADER_PREFIX)
        if len(raw) > self._reserve:
            self._move_data(len(raw) - self._reserve)
        prefix = struct.pack("<Q", len(raw))
        digest = header_hash(prefix, raw).encode()
        start = len(HEADER_PREFIX)
        raw = raw[:start] + digest + raw[start + HASH_HEX_LEN :]
        self._f.seek(0)
        self._f.write(prefix + raw)
        self._f.flush()
        os.fsync(self._f.fileno())
        size = self._f.tell() + self._pos
        self._f.close()
        if self.dest.exists() and not self.overwrite:
            self.abort()
            raise InputError("appeared while writing; not overwritten", self.dest)
        os.replace(self._tmp, self.dest)
        self.state = WriterState.DONE
        return size

    def _move_data(self, shift: int) -> None:
        # Copy from the end backwards so no byte is overwritten before it is moved.
        start = 8 + self._reserve
        end = start + self._pos
        while end > start:
            n = min(COPY_CHUNK, end - start)
            end -= n
            self._f.seek(end)
            chunk = self._f.read(n)
            self._f.seek(end + shift)
            self._f.write(chunk)
        self._reserve += shift

    def abort(self) -> None:
        if self.state is WriterState.DATA:
            self.state = WriterState.ABORTED
        if not self._f.closed:
            self._f.close()
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> ArchiveWriter:
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if self.state is not WriterState.DONE:
            self.abort()


class ArchiveReader:
    """An opened archive whose whole header has been checked before anything trusts it: the
    header hash, the version, the manifest's structure and names, every stored array's dtype
    and shape, and the original shard headers against the manifest (docs/FORMAT.md 8). expand,
    verify, the runtime and training all open archives here, so they all refuse the same
    archives, before a byte is written or a buffer sized by the archive is allocated.

    A check that fails because bytes differ from what the writer hashed raises
    CorruptArchiveError; one that fails on bytes the header hash vouches for (the archive was
    written that way) raises InvalidArchiveError."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            kind = not_regular(os.stat(self.path).st_mode)
        except FileNotFoundError:
            raise InputError("no such archive", self.path) from None
        except OSError as exc:
            raise InputError(f"cannot be read ({exc.strerror})", self.path) from None
        if kind is not None:
            raise InputError(f"is {kind}, expected a .ders archive", self.path)
        try:
            raw, size = read_header_bytes(self.path)
        except InputError as exc:
            raise self._unreadable(exc) from None
        signed = raw.startswith(HEADER_PREFIX)
        if signed:  # the hash first: no JSON an attacker altered reaches the parser unnoticed
            self._check_header_hash(raw)
        try:
            header = parse_header_bytes(self.path, raw, None if signed else size)
        except InputError as exc:
            if signed:
                raise self._invalid(_strip_path(exc, self.path)) from None
            raise self._unreadable(exc) from None
        try:  # a signed header that is whole: now the file's length is damage, if wrong
            check_length(self.path, header.file_size - header.data_start,
                         size - header.data_start)
        except InputError as exc:
            raise CorruptArchiveError(_strip_path(exc, self.path), self.path) from None
        self.header: Header = header
        meta = header.metadata or {}
        if not signed:
            if META_FORMAT not in meta:
                raise InputError("not a ders archive: a safetensors file without a ders "
                                 "manifest", self.path)
            raise CorruptArchiveError("header does not begin with the ders header hash",
                                      self.path)
        if meta.get(META_FORMAT) != FORMAT_NAME:
            raise self._invalid("metadata does not name the ders format")
        version = meta.get(META_VERSION, "")
        if not (version.isascii() and version.isdigit()):
            raise self._invalid(f"format version {version[:20]!r} is not a number")
        if int(version) > FORMAT_VERSION:
            raise NewerFormatError(
                f"written in ders format version {version}; this ders reads up to "
                f"{FORMAT_VERSION}: upgrade ders", self.path)
        try:
            self.manifest = Manifest.from_json(meta.get(META_MANIFEST, ""))
        except ValueError as exc:
            raise self._invalid(f"manifest: {exc}") from None
        if self.manifest.version != int(version):
            raise self._invalid(f"manifest version {self.manifest.version} differs from the "
                                f"header's {version}")
        self._check_arrays()
        self._file = TensorFile(header)
        try:
            self.shard_headers: list[Header] = self._read_shard_headers()
            self._check_against_shards()
        except BaseException:
            self._file.close()
            raise

    def _invalid(self, problem: str) -> InvalidArchiveError:
        return InvalidArchiveError(f"invalid archive: {problem}", self.path)

    def _unreadable(self, exc: InputError) -> InputError:
        """A file that is no readable safetensors file: a damaged archive when it looks like
        one (its name or its first bytes), else simply not an archive."""
        if _looks_like_archive(self.path):
            return CorruptArchiveError(_strip_path(exc, self.path), self.path)
        return InputError(f"not a ders archive ({_strip_path(exc, self.path)})", self.path)

    def _check_header_hash(self, raw: bytes) -> None:
        stored = raw[len(HEADER_PREFIX) : len(HEADER_PREFIX) + HASH_HEX_LEN]
        prefix = struct.pack("<Q", len(raw))
        if header_hash(prefix, raw).encode() != stored:
            raise CorruptArchiveError("header checksum mismatch: the header was altered",
                                      self.path)

    def _check_arrays(self) -> None:
        m = self.manifest
        entries = self.header.tensors
        if set(entries) != set(m.stored):
            missing = sorted(set(m.stored) - set(entries)) or sorted(set(entries) - set(m.stored))
            raise self._invalid(f"stored arrays disagree with the manifest ({missing[0]!r})")
        for s in m.shards:
            self._expect_array(s.header, "U8", None)
        for f in m.files:
            self._expect_array(f.array, "U8", (f.size,))
            if m.stored[f.array] != f.sha256:
                raise self._invalid(f"side file {f.path!r}: its sha256 is not that of the "
                                    "bytes stored for it")
        for g in m.groups:
            raw = g.base_encoding == BASE_RAW
            self._expect_array(g.base["array"], stored_base_dtype(g.base_encoding, g.dtype),
                               g.shape if raw else None)
            if g.codec["name"] not in DeltaCodec.registry:
                raise NewerFormatError(f"group {g.key!r} uses codec {g.codec['name']!r}, which "
                                       "this ders does not know: upgrade ders", self.path)
            try:
                codec = get_codec(g.codec["name"])
                codec.validate(g.codec["params"], len(g.members), g.numel)
                planned = codec.arrays(g.codec["params"], len(g.members), g.numel, g.dtype)
            except (ValueError, TypeError, KeyError, IndexError) as exc:
                raise self._invalid(f"group {g.key!r}: {exc}") from None
            if set(planned) != set(g.codec["arrays"]):
                raise self._invalid(f"group {g.key!r}: codec arrays differ from plan")
            for suffix, (dtype, shape) in planned.items():
                self._expect_array(g.codec["arrays"][suffix], dtype, shape)

    def _expect_array(self, name: str, dtype: str, shape: tuple[int, ...] | None) -> None:
        """``shape`` None: any one-dimensional array (an encoded base, a shard header)."""
        e = self.header.tensors[name]
        if e.dtype != dtype or (e.shape != tuple(shape) if shape is not None
                                else len(e.shape) != 1):
            raise self._invalid(
                f"array {name!r} is {e.dtype} {list(e.shape)}, the manifest implies "
                f"{dtype} {list(shape) if shape is not None else '[n]'}")

    def _read_shard_headers(self) -> list[Header]:
        """The original shard headers, checksums verified, parsed against their shard's size.
        They are small (the JSON of one safetensors header each) and every rule about tensors
        needs them."""
        out = []
        for s in self.manifest.shards:
            raw = bytes(self.read_bytes(s.header))
            try:
                out.append(parse_header_bytes(Path(s.file), raw, s.size))
            except InputError as exc:
                raise self._invalid(f"stored header of shard {s.file!r}: "
                                    f"{_strip_path(exc, Path(s.file))}") from None
        return out

    def _check_against_shards(self) -> None:
        """Every tensor of every shard has one record, stored as it was (same dtype, shape and
        sha256) or as a member of a group of its dtype whose slots have the member's size."""
        m, headers = self.manifest, self.shard_headers
        count = 0
        for i, h in enumerate(headers):
            for name in h.tensors:
                t = m.tensors.get(name)
                if t is None or t.shard != i:
                    raise self._invalid(f"tensor {name!r} of shard {m.shards[i].file!r} has no "
                                        "record of that shard")
            count += len(h.tensors)
        if count != len(m.tensors):
            extra = next(n for n, t in m.tensors.items() if n not in headers[t.shard].tensors)
            raise self._invalid(f"tensor {extra!r} is in no stored shard header")
        for name, t in m.tensors.items():
            if t.group is not None:
                continue
            e, stored = headers[t.shard].tensors[name], self.header.tensors[name]
            if (e.dtype, e.shape) != (stored.dtype, stored.shape):
                raise self._invalid(f"tensor {name!r} is {e.dtype} {list(e.shape)} in its shard "
                                    f"but stored as {stored.dtype} {list(stored.shape)}")
            if m.stored[name] != t.sha256:
                raise self._invalid(f"tensor {name!r}: its sha256 is not that of the bytes "
                                    "stored for it")
        for g in m.groups:
            for member in g.members:
                e = headers[m.tensors[member.tensor].shard].tensors[member.tensor]
                problem = _member_problem(e, member.of, g.dtype, g.shape, g.numel)
                if problem:
                    raise self._invalid(f"group {g.key!r}: member {member.label!r} {problem}")

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> ArchiveReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def size(self) -> int:
        return self.header.file_size

    def entry(self, name: str) -> TensorEntry:
        return self.header.tensors[name]

    def data_order(self) -> list[TensorEntry]:
        return sorted(self.header.tensors.values(), key=lambda e: e.begin)

    def chunks(self, name: str, check: bool = True) -> Iterable[bytearray]:
        """A stored array's bytes in order; with ``check`` the last read verifies its sha256."""
        sha = hashlib.sha256()
        for chunk in self._file.chunks(self.entry(name)):
            if check:
                sha.update(chunk)
            yield chunk
        if check:
            self._compare(name, sha.hexdigest())

    def read_bytes(self, name: str, check: bool = True) -> bytearray:
        e = self.entry(name)
        buf = self._file.read_bytes(e.begin, e.nbytes)
        if check:
            self._compare(name, hashlib.sha256(buf).hexdigest())
        return buf

    def array(self, name: str, check: bool = True) -> torch.Tensor:
        """A stored array as a tensor of its own dtype and shape."""
        e = self.entry(name)
        t = self._file.tensor(e)
        if check:
            self._compare(name, hashlib.sha256(tensor_bytes(t)).hexdigest())
        return t

    def check_sha(self, name: str) -> bool:
        sha = hashlib.sha256()
        for chunk in self._file.chunks(self.entry(name)):
            sha.update(chunk)
        return sha.hexdigest() == self.manifest.stored[name]

    def _compare(self, name: str, digest: str) -> None:
        if digest != self.manifest.stored[name]:
            raise CorruptArchiveError(f"checksum mismatch in stored array {name!r}", self.path)


def _member_problem(e: TensorEntry, of: int | None, dtype: str, shape: tuple[int, ...],
                    numel: int) -> str:
    """Why a group member cannot live in tensor ``e`` (slice of ``of`` when given), or ''."""
    if e.dtype != dtype:
        return f"is {e.dtype} in its shard, the group is {dtype}"
    if of is None:
        if e.shape != shape:
            return f"has shape {list(e.shape)} in its shard, the group {list(shape)}"
        return ""
    if not e.shape or e.shape[0] % of:
        return f"is a slice of {of} of a tensor of shape {list(e.shape)}"
    if e.numel != of * numel:
        return (f"is one of {of} slices of {e.numel} elements, the group's shape "
                f"{list(shape)} has {numel}")
    return ""


def _looks_like_archive(path: Path) -> bool:
    try:
        fd = open_regular(path)
    except InputError:
        return path.suffix == ".ders"
    with os.fdopen(fd, "rb") as f:
        return f.read(8 + len(HEADER_PREFIX))[8:] == HEADER_PREFIX or path.suffix == ".ders"


def _strip_path(exc: Exception, path: Path) -> str:
    text = str(exc)
    lead = f"{path}: "
    return text[len(lead):] if text.startswith(lead) else text
