"""The .ders archive: a streaming writer and a reader that validates before it trusts.

An archive is one safetensors file, or an index and shard files (docs/FORMAT.md 10). The writer
reserves room for a file's header, streams stored arrays after it as they are produced, then
writes the header (manifest or array table, offsets, header hash) into the reserved room and
renames the file into place. If the header outgrows the room, the data is moved up once; the
estimate makes that rare. With a shard size, it goes on to the next file when one is full.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import struct
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from enum import Enum
from pathlib import Path

import torch

from . import digests, safejson
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
    INDEX_HASH_KEY,
    INDEX_PREFIX,
    INDEX_SUFFIX,
    MAX_INDEX_BYTES,
    META_FORMAT,
    META_INDEX,
    META_MANIFEST,
    META_SHARDS,
    META_VERSION,
    SHARD_SUFFIX,
    SHARDED_VERSION,
)
from .digests import Digest
from .errors import (
    CorruptArchiveError,
    InputError,
    InvalidArchiveError,
    NewerFormatError,
    OutputExistsError,
    UsageError,
)
from .hub import HubOptions, resolve_archive
from .interrupts import critical, deferred
from .outputs import create_exclusive, temp_path, write_at
from .profile import stage
from .records import HEX_DIGEST, Manifest, path_problem
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


class WriterState(Enum):
    DATA = "data"
    DONE = "done"
    ABORTED = "aborted"


def archive_stem(dest: Path) -> str:
    """The stem a sharded archive's files are named after: the output's name without a trailing
    ``.safetensors`` (``model.ders.safetensors`` and ``model.ders`` both give ``model.ders``)."""
    name = dest.name
    return name[: -len(SHARD_SUFFIX)] if name.endswith(SHARD_SUFFIX) else name


def index_path(dest: Path) -> Path:
    """Where the index of a sharded archive written to ``dest`` goes (docs/FORMAT.md 10)."""
    return dest.with_name(archive_stem(dest) + INDEX_SUFFIX)


def shard_name(stem: str, number: int, count: int) -> str:
    """transformers' shard names: ``STEM-00001-of-00003.safetensors``."""
    return f"{stem}-{number:05d}-of-{count:05d}{SHARD_SUFFIX}"


def parse_size(size: int | str) -> int:
    """A size as transformers' ``max_shard_size`` takes it: bytes, or "5GB", "500MB", "2GiB"
    (decimal units by powers of 1000, binary ones by powers of 1024)."""
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    else:
        text = str(size).strip()
        m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?", text, re.IGNORECASE)
        if not m:
            raise UsageError(f"max_shard_size must be a number of bytes or a size such as 5GB "
                             f"or 500MB, got {text!r}", param="max_shard_size")
        unit = (m.group(2) or "B").upper()
        scale = 1 if unit == "B" else (1024 if "I" in unit else 1000) ** (
            "KMGT".index(unit[0]) + 1)
        value = int(float(m.group(1)) * scale)
    if value < 1:
        raise UsageError(f"max_shard_size must be at least 1 byte, got {size!r}",
                         param="max_shard_size")
    return value


# A table entry beside its name: dtype, a shape and two offsets of up to 15 digits, the JSON.
_ENTRY_ALLOWANCE = 100


def table_entry_bytes(name: str, dtype: str, shape: tuple[int, ...], begin: int, end: int) -> int:
    """The bytes an array's entry takes in a header's table, with its comma."""
    return len(json.dumps({name: {"dtype": dtype, "shape": list(shape),
                                  "data_offsets": [begin, end]}},
                          separators=(",", ":"), ensure_ascii=True)) - 1


class _Part:
    """One file of an archive being written: room reserved for its header, then the data as it
    comes; the header goes into the room at the end (the data moves up if it outgrew it)."""

    def __init__(self, tmp: Path, reserve: int, metadata: int) -> None:
        self.tmp = tmp
        self.reserve = max(reserve, 64) + (-max(reserve, 64) % 8)
        self.f = os.fdopen(create_exclusive(tmp), "w+b")  # no link followed; locked
        self.entries: dict[str, tuple[str, tuple[int, ...], int, int]] = {}
        self.pos = 0
        self.table = metadata  # the bytes of its header as a shard's, so far
        self.f.seek(8 + self.reserve)

    def record(self, name: str, dtype: str, shape: tuple[int, ...], begin: int) -> None:
        self.entries[name] = (dtype, shape, begin, self.pos)
        self.table += table_entry_bytes(name, dtype, shape, begin, self.pos)

    @property
    def size(self) -> int:
        """The file's size if it were finished now as a shard."""
        header = max(self.reserve, self.table)
        return 8 + header + (-header % 8) + self.pos

    def write_header(self, metadata: dict[str, str]) -> tuple[int, str]:
        """Write the signed header (``metadata`` after the header hash, then the array table)
        and flush; returns the file's size and its header hash."""
        header: dict = {"__metadata__": {HEADER_HASH_KEY: "0" * HASH_HEX_LEN, **metadata}}
        for name, (dtype, shape, begin, end) in self.entries.items():
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [begin, end]}
        raw = encode_header(header, min_len=self.reserve)
        assert raw.startswith(HEADER_PREFIX)
        if len(raw) > self.reserve:
            self._move_data(len(raw) - self.reserve)
        prefix = struct.pack("<Q", len(raw))
        digest = header_hash(prefix, raw)
        start = len(HEADER_PREFIX)
        raw = raw[:start] + digest.encode() + raw[start + HASH_HEX_LEN :]
        self.f.seek(0)
        self.f.write(prefix + raw)
        self.f.flush()
        os.fsync(self.f.fileno())
        return 8 + len(raw) + self.pos, digest

    def _move_data(self, shift: int) -> None:
        # Copy from the end backwards so no byte is overwritten before it is moved.
        start = 8 + self.reserve
        end = start + self.pos
        while end > start:
            n = min(COPY_CHUNK, end - start)
            end -= n
            self.f.seek(end)
            chunk = self.f.read(n)
            self.f.seek(end + shift)
            self.f.write(chunk)
        self.reserve += shift

    def close(self) -> None:
        if not self.f.closed:
            self.f.close()


class ArchiveWriter:
    """Writes an archive under temporary names; ``finish`` moves it to ``dest``.

    With ``max_shard_size``, arrays stream into one shard file after another (docs/FORMAT.md
    10.2): a new shard begins when the next array, or the arrays added inside ``together``,
    would take the current one past the limit. If everything fits in one shard, ``finish``
    writes the one-file archive at ``dest``; otherwise shards and an index named after
    ``dest`` (``index_path``), and ``path`` is the index. ``reserve``: room for the first
    file's header (a one-file archive's holds the manifest); ``shard_reserve``: for the
    others' (their array tables only). ``digest``: the hash of the stored arrays' checksums
    (BLAKE3, or SHA-256 for readers before format version 4); the manifest's version must take
    it. Header and index hashes are SHA-256 in every version."""

    def __init__(self, dest: Path, reserve: int, overwrite: bool = False, *,
                 max_shard_size: int | None = None, shard_reserve: int | None = None,
                 digest: Digest = digests.DEFAULT) -> None:
        self.dest = Path(dest)
        self.overwrite = overwrite
        self.max_shard_size = max_shard_size
        self.digest = digest
        self._shard_reserve = reserve if shard_reserve is None else shard_reserve
        # A shard's header before its array table: its metadata, with the index's name.
        self._shard_meta = len(encode_header({"__metadata__": {
            HEADER_HASH_KEY: "0" * HASH_HEX_LEN, META_FORMAT: FORMAT_NAME,
            META_VERSION: str(FORMAT_VERSION), META_INDEX: index_path(self.dest).name}}))
        self._parts: list[_Part] = []
        self._sha: dict[str, str] = {}
        self._together = False
        self.state = WriterState.DATA
        self.path = self.dest  # the file a reader opens: the index when sharded
        self.files: list[Path] = []  # every file written, once finished
        try:
            self._new_part(temp_path(self.dest), reserve)
        except BaseException:  # an interrupt held while the file was made lands here
            self.abort()
            raise

    def _require(self, state: WriterState, action: str) -> None:
        if self.state is not state:
            raise RuntimeError(f"cannot {action}: archive writer is {self.state.value}")

    def _room(self, nbytes: int) -> None:
        """Begin a new shard unless ``nbytes`` more (table entries included) fit in the current
        one, or it is empty."""
        part = self._parts[-1]
        if (self.max_shard_size is not None and part.entries
                and part.size + nbytes > self.max_shard_size):
            tmp = temp_path(self.dest).with_name(
                f"{temp_path(self.dest).name}-{len(self._parts)}")
            self._new_part(tmp, self._shard_reserve)

    def _new_part(self, tmp: Path, reserve: int) -> None:
        with deferred():  # the file and its place in _parts (what abort removes) at once
            self._parts.append(_Part(tmp, reserve, self._shard_meta))

    @contextmanager
    def together(self, nbytes: int, arrays: int = 5) -> Iterator[None]:
        """Keep the arrays added inside in one shard (``nbytes``: theirs, summed; ``arrays``:
        how many, at most): a group's base and codec arrays are read together, never split."""
        self._room(nbytes + arrays * _ENTRY_ALLOWANCE)
        self._together = True
        try:
            yield
        finally:
            self._together = False

    def add(self, name: str, dtype: str, shape: tuple[int, ...] | list[int],
            data: Bytes | Iterable[Bytes]) -> str:
        """Append one stored array; returns the checksum of its bytes."""
        self._require(WriterState.DATA, f"add {name!r}")
        if name in self._sha:
            raise ValueError(f"array {name!r} is stored twice")
        expected = tensor_nbytes(dtype, shape)
        if not self._together:
            self._room(expected + len(name) + _ENTRY_ALLOWANCE)
        part = self._parts[-1]
        sha = self.digest.new()
        begin = part.pos
        chunks = [data] if isinstance(data, (bytes, bytearray, memoryview)) else data
        for chunk in chunks:
            view = memoryview(chunk).cast("B")
            with stage("write"):  # a passthrough tensor's hash and read count here too
                sha.update(view)
                part.f.write(view)
            part.pos += len(view)
        if part.pos - begin != expected:
            raise ValueError(f"array {name!r}: wrote {part.pos - begin} bytes, "
                             f"{dtype} {list(shape)} needs {expected}")
        part.record(name, dtype, tuple(shape), begin)
        self._sha[name] = sha.hexdigest()
        return self._sha[name]

    def add_tensor(self, name: str, t: torch.Tensor, dtype: str | None = None) -> str:
        return self.add(name, dtype or DTYPE_NAMES[t.dtype], tuple(t.shape), tensor_bytes(t))

    @property
    def stored_digests(self) -> dict[str, str]:
        return dict(self._sha)

    @property
    def data_bytes(self) -> int:
        return sum(p.pos for p in self._parts)

    @property
    def shards(self) -> int:
        """How many files the arrays went to so far."""
        return len(self._parts)

    def finish(self, manifest: Manifest) -> int:
        """Write the header(s), move the files into place; returns the archive's size in bytes
        (every file of it)."""
        self._require(WriterState.DATA, "finish")
        if not self.digest.takes(manifest.version):
            raise ValueError(f"a version-{manifest.version} manifest does not take "
                             f"{self.digest.name} checksums")
        # Writing the headers may move data (an interrupt there removes all); moving the
        # files into place is one step an interrupt waits for.
        if len(self._parts) == 1:
            size = self._finish_one(manifest)
        else:
            size = self._finish_sharded(manifest)
        self.state = WriterState.DONE
        return size

    def _finish_one(self, manifest: Manifest) -> int:
        part = self._parts[0]
        size, _ = part.write_header({META_FORMAT: FORMAT_NAME, META_VERSION: str(manifest.version),
                                     META_MANIFEST: manifest.to_json()})
        index = index_path(self.dest)
        replaced = self._replaced(index)
        with critical():
            self._place([(part.tmp, self.dest)])
            part.close()  # after the rename: its lock showed the temporary file in use
            self.files = [self.dest]
            if replaced:  # a sharded archive of this name would stay beside the new one
                index.unlink(missing_ok=True)
                for old in replaced:
                    old.unlink(missing_ok=True)
        return size

    def _finish_sharded(self, manifest: Manifest) -> int:
        version = max(manifest.version, SHARDED_VERSION)
        manifest = dataclasses.replace(manifest, version=version)
        stem, count = archive_stem(self.dest), len(self._parts)
        index = index_path(self.dest)
        names = [shard_name(stem, i + 1, count) for i in range(count)]
        records, weight_map, total = [], {}, 0
        for part, file in zip(self._parts, names, strict=True):
            size, digest = part.write_header({META_FORMAT: FORMAT_NAME,
                                              META_VERSION: str(version), META_INDEX: index.name})
            records.append({"file": file, "size": size, "header_sha256": digest})
            weight_map.update(dict.fromkeys(part.entries, file))
            total += part.pos
        raw = index_bytes(version, records, manifest.to_json(), total, weight_map)
        tmp = temp_path(index)
        with os.fdopen(create_exclusive(tmp), "wb") as f:
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())
        replaced = self._replaced(index)
        # Shards first, the index last: an index only ever names shards that are in place.
        moves = [(p.tmp, self.dest.with_name(n)) for p, n in zip(self._parts, names, strict=True)]
        with critical():
            try:
                self._place([*moves, (tmp, index)])
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
            for part in self._parts:
                part.close()
            self.path = index
            self.files = [index, *(dest for _, dest in moves)]
            if self.overwrite:
                # What the previous archive of this name had and this one does not: its
                # one-file form (a reader would open it instead of the index) and shards of
                # another count.
                for old in [self.dest, *replaced]:
                    if old not in self.files and os.path.lexists(old):
                        old.unlink()
        return len(raw) + sum(r["size"] for r in records)

    def _place(self, moves: list[tuple[Path, Path]]) -> None:
        """Rename temporary files into place; without ``overwrite`` none may exist already."""
        if not self.overwrite:
            taken = next((dest for _, dest in moves if os.path.lexists(dest)), None)
            if taken is not None:
                self.abort()
                raise OutputExistsError("appeared while writing; not overwritten", taken)
        for tmp, dest in moves:
            os.replace(tmp, dest)

    def _replaced(self, index: Path) -> list[Path]:
        """With ``overwrite``: the shards that the sharded archive at ``index`` (being replaced)
        names, as paths beside it; plain file names only (the index is not trusted)."""
        if not (self.overwrite and index.is_file()):
            return []
        try:
            doc = safejson.loads(index.read_bytes()[:MAX_INDEX_BYTES])
            files = [r["file"] for r in doc["metadata"][META_SHARDS]]
        except (ValueError, KeyError, TypeError):
            return []
        return [index.parent / f for f in files
                if isinstance(f, str) and path_problem(f) is None and "/" not in f
                and f.endswith(SHARD_SUFFIX)]

    def abort(self) -> None:
        if self.state is WriterState.DATA:
            self.state = WriterState.ABORTED
        for part in self._parts:
            part.tmp.unlink(missing_ok=True)  # while its lock is held: no sweeper races us
            part.close()

    def __enter__(self) -> ArchiveWriter:
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if self.state is not WriterState.DONE:
            self.abort()


def index_bytes(version: int, shards: list[dict], manifest: str, total_size: int,
                weight_map: dict[str, str]) -> bytes:
    """A sharded archive's index, signed (docs/FORMAT.md 10)."""
    doc = {"metadata": {INDEX_HASH_KEY: "0" * HASH_HEX_LEN, META_FORMAT: FORMAT_NAME,
                        META_VERSION: str(version), META_SHARDS: shards,
                        META_MANIFEST: manifest, "total_size": total_size},
           "weight_map": weight_map}
    raw = json.dumps(doc, separators=(",", ":"), ensure_ascii=True).encode("ascii")
    assert raw.startswith(INDEX_PREFIX)
    start = len(INDEX_PREFIX)
    return raw[:start] + index_hash(raw).encode() + raw[start + HASH_HEX_LEN :]


def index_hash(raw: bytes) -> str:
    """sha256 of an index with its own 64 hash digits read as zeros."""
    start = len(INDEX_PREFIX)
    return hashlib.sha256(raw[:start] + b"0" * HASH_HEX_LEN + raw[start + HASH_HEX_LEN :]
                          ).hexdigest()


class ArchiveReader:
    """An opened archive whose whole header has been checked before anything trusts it: the
    header hash, the version, the manifest's structure and names, every stored array's dtype
    and shape, and the original shard headers against the manifest (docs/FORMAT.md 4.1); for a
    sharded archive first its index and every shard (10.1). expand, verify, the runtime and
    training all open archives here, so they all refuse the same archives, before a byte is
    written or a buffer sized by the archive is allocated.

    ``path``: a one-file archive, a sharded archive's index or one of its shards, a folder
    holding one archive (a ders folder: config.json names it), an output name a sharded
    archive was written to (its index is found beside it), or a Hugging Face Hub repo id
    (``org/name``, ``org/name/FILE``), downloaded through huggingface_hub at ``revision``
    with ``token`` and ``cache_dir`` (ders_cli.hub); ``source`` says where it came from.

    A check that fails because bytes differ from what the writer hashed raises
    CorruptArchiveError; one that fails on bytes the header hash vouches for (the archive was
    written that way) raises InvalidArchiveError."""

    def __init__(self, path: str | Path, *, revision: str | None = None,
                 token: str | bool | None = None, cache_dir: str | Path | None = None) -> None:
        self._files: list[TensorFile] = []
        self.source = resolve_archive(path, HubOptions(revision, token, cache_dir))
        self.path = locate_archive(self.source.path)
        try:
            if self.path.name.endswith(INDEX_SUFFIX):
                self._open_index(self.path)
            else:
                header = self._read_signed(self.path)
                meta = header.metadata or {}
                if META_INDEX in meta and META_MANIFEST not in meta:  # a shard: its index
                    self._check_version(meta)
                    index = _sibling(self.path, meta[META_INDEX])
                    if index is None or not index.name.endswith(INDEX_SUFFIX):
                        raise self._invalid(f"names the index {meta[META_INDEX][:80]!r}, which "
                                            "is not a plain file name beside it")
                    self.path = index
                    self._open_index(index)
                else:
                    self._open_one(header)
            self._check_arrays()
            self.shard_headers: list[Header] = self._read_shard_headers()
            self._check_against_shards()
        except BaseException:
            self.close()
            raise

    # --- opening ---------------------------------------------------------------------------

    def _read_signed(self, path: Path) -> Header:
        """A ders safetensors file (a one-file archive or a shard): its header hash checked
        before its JSON is parsed, then the JSON parsed and its length checked."""
        try:
            kind = not_regular(os.stat(path).st_mode)
        except FileNotFoundError:
            raise InputError("no such archive", path) from None
        except OSError as exc:
            raise InputError(f"cannot be read ({exc.strerror})", path) from None
        if kind is not None:
            raise InputError(f"is {kind}, expected a .ders archive", path)
        try:
            raw, size = read_header_bytes(path)
        except InputError as exc:
            raise _unreadable(exc, path) from None
        signed = raw.startswith(HEADER_PREFIX)
        if signed:  # the hash first: no JSON an attacker altered reaches the parser unnoticed
            stored = raw[len(HEADER_PREFIX) : len(HEADER_PREFIX) + HASH_HEX_LEN]
            if header_hash(struct.pack("<Q", len(raw)), raw).encode() != stored:
                raise CorruptArchiveError("header checksum mismatch: the header was altered",
                                          path)
        try:
            header = parse_header_bytes(path, raw, None if signed else size)
        except InputError as exc:
            if signed:
                raise _invalid(_strip_path(exc, path), path) from None
            raise _unreadable(exc, path) from None
        try:  # a signed header that is whole: now the file's length is damage, if wrong
            check_length(path, header.file_size - header.data_start, size - header.data_start)
        except InputError as exc:
            raise CorruptArchiveError(_strip_path(exc, path), path) from None
        meta = header.metadata or {}
        if not signed:
            if META_FORMAT not in meta:
                raise InputError("not a ders archive: a safetensors file without a ders "
                                 "manifest", path)
            raise CorruptArchiveError("header does not begin with the ders header hash", path)
        if meta.get(META_FORMAT) != FORMAT_NAME:
            raise _invalid("metadata does not name the ders format", path)
        return header

    def _check_version(self, meta: dict, least: int = 1) -> int:
        """The format version ``meta`` names, checked: a number, at most the newest this ders
        reads, at least ``least``; it says which hash the checksums are of (``digest``, from
        the manifest that must name the same version)."""
        version = meta.get(META_VERSION, "")
        if not (isinstance(version, str) and version.isascii() and version.isdigit()):
            raise self._invalid(f"format version {str(version)[:20]!r} is not a number")
        # Compared as digits before int(): Python refuses to convert more than 4,300 of them
        # (a ValueError, not an answer), and a header may hold millions.
        digits = version.lstrip("0") or "0"
        if len(digits) > len(str(FORMAT_VERSION)) or int(digits) > FORMAT_VERSION:
            shown = digits if len(digits) <= 20 else f"{digits[:20]}... ({len(digits)} digits)"
            raise NewerFormatError(
                f"written in ders format version {shown}; this ders reads up to "
                f"{FORMAT_VERSION}: upgrade ders", self.path)
        number = int(digits)
        if number < least:
            raise self._invalid(f"format version {number} has no sharded archives (version "
                                f"{least} and later)")
        return number

    def _read_manifest(self, text: object, version: int) -> None:
        try:
            if not isinstance(text, str):
                raise ValueError("it is not a string")
            self.manifest = Manifest.from_json(text, version)
        except ValueError as exc:
            raise self._invalid(f"manifest: {exc}") from None

    def _open_one(self, header: Header) -> None:
        meta = header.metadata or {}
        self._read_manifest(meta.get(META_MANIFEST, ""), self._check_version(meta))
        self._entries = dict(header.tensors)
        self._where = dict.fromkeys(header.tensors, 0)
        self._files.append(TensorFile(header))
        self.files = [self.path]
        self._size = header.file_size

    def _open_index(self, index: Path) -> None:
        """A sharded archive (docs/FORMAT.md 10.1): the index, then every shard against it."""
        raw, meta, weight_map = read_index(index)
        version = self._check_version(meta, least=SHARDED_VERSION)
        self._read_manifest(meta.get(META_MANIFEST), version)
        shards = _shard_records(meta.get(META_SHARDS))
        if isinstance(shards, str):
            raise self._invalid(shards)
        stored = self.manifest.stored
        if set(weight_map) != set(stored):
            name = min(set(weight_map) ^ set(stored))
            where = "in weight_map but not stored" if name in weight_map else "not in weight_map"
            raise self._invalid(f"array {name[:80]!r} is {where}")
        files = {s[0] for s in shards}
        lost = next((n for n, f in weight_map.items() if f not in files), None)
        if lost is not None:
            raise self._invalid(f"weight_map puts {lost[:80]!r} in {str(weight_map[lost])[:80]!r}, "
                                "which is no shard of the index")
        holds: dict[str, set[str]] = {f: set() for f in files}
        for name, f in weight_map.items():
            holds[f].add(name)
        self._entries, self._where = {}, {}
        self._size = len(raw)
        self.files = [index]
        for i, (file, size, digest) in enumerate(shards):
            path = index.parent / file
            if not os.path.lexists(path):
                raise CorruptArchiveError(f"incomplete: shard {file!r} is missing", index)
            header = self._read_signed(path)
            if header.raw[len(HEADER_PREFIX) : len(HEADER_PREFIX) + HASH_HEX_LEN] != \
                    digest.encode():
                raise CorruptArchiveError("is not the shard its index records (another "
                                          "archive's, or shards swapped)", path)
            if header.file_size != size:
                raise CorruptArchiveError(f"is {header.file_size} bytes, its index records "
                                          f"{size}", path)
            smeta = header.metadata or {}
            if smeta.get(META_VERSION) != str(version) or smeta.get(META_INDEX) != index.name:
                raise _invalid("does not name this index and its version", path)
            if set(header.tensors) != holds[file]:
                name = min(set(header.tensors) ^ holds[file])
                raise _invalid(f"array {name[:80]!r}: the shard and the index's weight_map "
                               "disagree", path)
            self._files.append(TensorFile(header))
            self._entries.update(header.tensors)
            self._where.update(dict.fromkeys(header.tensors, i))
            self.files.append(path)
            self._size += size

    def _invalid(self, problem: str) -> InvalidArchiveError:
        return _invalid(problem, self.path)

    # --- the manifest against the arrays and the original shard headers ----------------------

    def _check_arrays(self) -> None:
        m = self.manifest
        entries = self._entries
        if set(entries) != set(m.stored):
            missing = sorted(set(m.stored) - set(entries)) or sorted(set(entries) - set(m.stored))
            raise self._invalid(f"stored arrays disagree with the manifest ({missing[0]!r})")
        for s in m.shards:
            self._expect_array(s.header, "U8", None)
        for f in m.files:
            self._expect_array(f.array, "U8", (f.size,))
            if m.stored[f.array] != f.digest:
                raise self._invalid(f"side file {f.path!r}: its checksum is not that of the "
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
        e = self._entries[name]
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
        checksum) or as a member of a group of its dtype whose slots have the member's size."""
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
            e, stored = headers[t.shard].tensors[name], self._entries[name]
            if (e.dtype, e.shape) != (stored.dtype, stored.shape):
                raise self._invalid(f"tensor {name!r} is {e.dtype} {list(e.shape)} in its shard "
                                    f"but stored as {stored.dtype} {list(stored.shape)}")
            if m.stored[name] != t.digest:
                raise self._invalid(f"tensor {name!r}: its checksum is not that of the bytes "
                                    "stored for it")
        for g in m.groups:
            for member in g.members:
                e = headers[m.tensors[member.tensor].shard].tensors[member.tensor]
                problem = _member_problem(e, member.of, g.dtype, g.shape, g.numel)
                if problem:
                    raise self._invalid(f"group {g.key!r}: member {member.label!r} {problem}")

    # --- reading ---------------------------------------------------------------------------

    def close(self) -> None:
        for f in self._files:
            f.close()

    def __enter__(self) -> ArchiveReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def size(self) -> int:
        """Bytes of every file of the archive."""
        return self._size

    @property
    def digest(self) -> Digest:
        """The hash of the archive's checksums: its version's."""
        return self.manifest.digest

    @property
    def sharded(self) -> bool:
        return self.path.name.endswith(INDEX_SUFFIX)

    def entry(self, name: str) -> TensorEntry:
        """Where a stored array is: its offsets are in the file of ``file_of(name)``."""
        return self._entries[name]

    def file_of(self, name: str) -> Path:
        return self.files[self._where[name] + self.sharded]

    def data_order(self) -> list[TensorEntry]:
        """Stored arrays in the order they were written: file by file, front to back."""
        return sorted(self._entries.values(), key=lambda e: (self._where[e.name], e.begin))

    def _file(self, name: str) -> TensorFile:
        return self._files[self._where[name]]

    def chunks(self, name: str, check: bool = True) -> Iterable[bytearray]:
        """A stored array's bytes in order; with ``check`` the last read verifies its checksum."""
        sha = self.digest.new()
        for chunk in self._file(name).chunks(self.entry(name)):
            if check:
                sha.update(chunk)
            yield chunk
        if check:
            self._compare(name, sha.hexdigest())

    def copy_to(self, name: str, fd: int, offset: int, checksum: str, what: str) -> int:
        """Write stored array ``name``'s bytes into ``fd`` from ``offset`` on, a chunk at a time,
        hashing them as they pass: raises CorruptArchiveError naming ``what`` ("side file
        'x'") unless they match ``checksum`` (the manifest's record of the file or tensor they
        become). Returns the bytes written."""
        digest, pos = self.digest.new(), offset
        for chunk in self.chunks(name, check=False):
            digest.update(chunk)
            write_at(fd, chunk, pos)
            pos += len(chunk)
        if digest.hexdigest() != checksum:
            raise CorruptArchiveError(f"{what} does not match its checksum", self.path)
        return pos - offset

    def read_bytes(self, name: str, check: bool = True) -> bytearray:
        e = self.entry(name)
        buf = self._file(name).read_bytes(e.begin, e.nbytes)
        if check:
            self._compare(name, self.digest.hex(buf))
        return buf

    def array(self, name: str, check: bool = True) -> torch.Tensor:
        """A stored array as a tensor of its own dtype and shape."""
        e = self.entry(name)
        t = self._file(name).tensor(e)
        if check:
            self._compare(name, self.digest.hex(tensor_bytes(t)))
        return t

    def check_digest(self, name: str) -> bool:
        """Whether a stored array's bytes have the checksum the manifest records."""
        sha = self.digest.new()
        for chunk in self._file(name).chunks(self.entry(name)):
            sha.update(chunk)
        return sha.hexdigest() == self.manifest.stored[name]

    def _compare(self, name: str, digest: str) -> None:
        if digest != self.manifest.stored[name]:
            raise CorruptArchiveError(f"checksum mismatch in stored array {name!r}", self.path)


def locate_archive(path: Path) -> Path:
    """The file to open for ``path``: a folder's one archive, or the index of a sharded archive
    written to ``path`` (which then does not exist itself)."""
    if path.is_dir():
        return _archive_in_folder(path)
    if not os.path.lexists(path):
        index = index_path(path)
        if index.is_file():
            return index
    return path


def archive_names(names: Iterable[str]) -> list[str]:
    """The names among ``names`` that are archives ders wrote: ``*.ders`` files, a ders
    folder's ``*.ders.safetensors`` and sharded archives' indexes."""
    return sorted(n for n in names if not n.startswith(".") and n.endswith(ARCHIVE_SUFFIXES))


ARCHIVE_SUFFIXES = (".ders", ".ders" + SHARD_SUFFIX, ".ders" + INDEX_SUFFIX)


def folder_archive_name(config: Path) -> str | None:
    """The archive a ders folder's config.json names (``quantization_config.archive`` with
    quant_method "ders"), or None."""
    try:
        if config.stat().st_size > MAX_INDEX_BYTES:
            return None
        doc = safejson.loads(config.read_bytes())
    except (OSError, ValueError):
        return None
    q = doc.get("quantization_config") if isinstance(doc, dict) else None
    if not isinstance(q, dict) or q.get("quant_method") != FORMAT_NAME:
        return None
    name = q.get("archive")
    return name if isinstance(name, str) else None


def _archive_in_folder(folder: Path) -> Path:
    named = folder_archive_name(folder / "config.json")
    if named is not None:
        path = _sibling(folder / "config.json", named)
        if path is None:
            raise InvalidArchiveError(f"config.json names the archive {named[:80]!r}, which is "
                                      "not a plain file name in the folder", folder)
        return path
    try:
        found = archive_names(os.listdir(folder))
    except OSError as exc:
        raise InputError(f"cannot be read ({exc.strerror})", folder) from None
    if len(found) == 1:
        return folder / found[0]
    if not found:
        raise InputError("no ders archive in this folder (a *.ders file, a sharded archive's "
                         "*.safetensors.index.json, or a ders folder's config.json)", folder)
    raise InputError(f"holds several archives ({', '.join(found[:4])}"
                     f"{', ...' if len(found) > 4 else ''}): name one", folder)


def _sibling(path: Path, name: str) -> Path | None:
    """``name`` beside ``path`` when it is a plain file name, else None."""
    if path_problem(name) is not None or "/" in name:
        return None
    return path.parent / name


def read_index(index: Path) -> tuple[bytes, dict, dict]:
    """A sharded archive's index (docs/FORMAT.md 10.1, rule 1 but the version and manifest):
    its bytes, its metadata and weight_map, the index hash checked before the JSON is parsed."""
    fd = open_regular(index, "an archive index")
    with os.fdopen(fd, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size > MAX_INDEX_BYTES:
            raise InputError(f"not a ders archive index: {size} bytes, more than the "
                             f"{MAX_INDEX_BYTES}-byte limit", index)
        raw = f.read(size)
    if not raw.startswith(INDEX_PREFIX):
        if b'"ders.' not in raw[:4096]:
            raise InputError("not a ders archive: an index without a ders manifest", index)
        raise CorruptArchiveError("index does not begin with the ders index hash", index)
    if index_hash(raw).encode() != raw[len(INDEX_PREFIX) : len(INDEX_PREFIX) + HASH_HEX_LEN]:
        raise CorruptArchiveError("index checksum mismatch: the index was altered", index)
    try:
        doc = safejson.loads(raw)
    except ValueError as exc:
        raise _invalid(f"index: {exc}", index) from None
    meta = doc.get("metadata") if isinstance(doc, dict) else None
    weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(meta, dict) or not isinstance(weight_map, dict):
        raise _invalid("index lacks its metadata or weight_map object", index)
    if meta.get(META_FORMAT) != FORMAT_NAME:
        raise _invalid("index metadata does not name the ders format", index)
    return raw, meta, weight_map


def index_shards(index: Path) -> list[str]:
    """The shard file names a sharded archive's index lists, checked (docs/FORMAT.md 10.1,
    rules 1-2): what to fetch beside it."""
    _, meta, _ = read_index(index)
    shards = _shard_records(meta.get(META_SHARDS))
    if isinstance(shards, str):
        raise _invalid(shards, index)
    return [s[0] for s in shards]


def _shard_records(records: object) -> list[tuple[str, int, str]] | str:
    """The index's shard list checked (docs/FORMAT.md 10.1, rules 1-2), or why it is not."""
    if not isinstance(records, list) or not records:
        return "index lists no shards"
    out, seen = [], {}
    for r in records:
        if not isinstance(r, dict):
            return "a shard record is not an object"
        file, size, digest = r.get("file"), r.get("size"), r.get("header_sha256")
        if not isinstance(file, str):
            return "a shard record has no file name"
        problem = path_problem(file) or ("is not a plain file name" if "/" in file else None)
        if problem:
            return f"shard {file[:80]!r} {problem}"
        if not file.endswith(SHARD_SUFFIX):
            return f"shard {file!r} does not end in {SHARD_SUFFIX}"
        if file.casefold() in seen:
            return f"shard {file!r} collides with {seen[file.casefold()]!r}"
        seen[file.casefold()] = file
        if not (isinstance(size, int) and not isinstance(size, bool) and size >= 0):
            return f"shard {file!r} has no valid size"
        if not (isinstance(digest, str) and HEX_DIGEST.fullmatch(digest)):
            return f"shard {file!r} has no valid header_sha256"
        out.append((file, size, digest))
    return out


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


def _invalid(problem: str, path: Path) -> InvalidArchiveError:
    return InvalidArchiveError(f"invalid archive: {problem}", path)


def _unreadable(exc: InputError, path: Path) -> InputError:
    """A file that is no readable safetensors file: a damaged archive when it looks like one
    (its name or its first bytes), else simply not an archive."""
    if _looks_like_archive(path):
        return CorruptArchiveError(_strip_path(exc, path), path)
    return InputError(f"not a ders archive ({_strip_path(exc, path)})", path)


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
