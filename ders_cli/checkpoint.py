"""Hugging Face style checkpoints on disk: finding the shards and side files of a model folder
(or a single .safetensors file, or a Hub repo id), and validating every shard header.

No math here: this module knows files, names and offsets.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path

from . import safejson
from .archive import folder_archive_name
from .constants import HEADER_PREFIX, INDEX_PREFIX, INDEX_SUFFIX, RESERVED_PREFIX, SHARD_SUFFIX
from .errors import InputError
from .hub import MODEL_IGNORE, HubOptions, Resolved, resolve_model
from .records import check_paths, text_problem
from .safetensors_io import Header, TensorEntry, TensorFile, not_regular, open_regular, read_header

INDEX_FILE = "model.safetensors.index.json"
# Directories that belong to tools, not to the model: never side files.
SKIP_DIRS = {".git", ".cache", "__pycache__", ".ipynb_checkpoints"}
# What a killed ders run leaves beside its output (ders_cli.outputs); never side files.
_LEFTOVER = re.compile(r"\..+\.(partial|old)-\d+")
# Largest config.json and shard index ders reads (an index of a 1T-parameter model is ~10 MB).
MAX_CONFIG_BYTES = 16 << 20
MAX_INDEX_BYTES = 256 << 20


@dataclass(frozen=True)
class Shard:
    file: str  # relative to the checkpoint's root
    header: Header


@dataclass(frozen=True)
class Checkpoint:
    """A validated checkpoint: its shards, side files and where every tensor is."""

    root: Path  # the model folder (a single file's parent)
    kind: str  # "folder" or "file"
    name: str  # default stem for outputs
    shards: tuple[Shard, ...]
    side_files: tuple[str, ...]  # relative '/'-separated paths, sorted
    where: dict[str, tuple[int, TensorEntry]]  # tensor name -> (shard index, entry)
    config: dict | None = None  # config.json, a hint for detection only
    skipped: tuple[str, ...] = ()  # a line for each file left out on purpose (for warnings)
    repo_id: str | None = None  # the Hub repo it was downloaded from
    revision: str | None = None  # and the commit

    @property
    def tensor_bytes(self) -> int:
        return sum(e.nbytes for _, e in self.where.values())

    @property
    def side_bytes(self) -> int:
        return sum((self.root / p).stat().st_size for p in self.side_files)

    @property
    def disk_bytes(self) -> int:
        """The checkpoint as ``du`` sees it: whole shard files (headers included) and side
        files; every "of original" ratio divides by this."""
        return sum(s.header.file_size for s in self.shards) + self.side_bytes

    def entry(self, name: str) -> TensorEntry:
        return self.where[name][1]

    def open(self) -> ShardFiles:
        return ShardFiles(self)


class ShardFiles:
    """Open readers for every shard of a checkpoint; a context manager. Compress reads tensors
    through ``read_into``, ``chunks`` and ``path_of`` (``groups.TensorSource``), which tensors
    held in memory can provide as well."""

    def __init__(self, ckpt: Checkpoint) -> None:
        self._ckpt = ckpt
        self._stack = ExitStack()
        self.files = [self._stack.enter_context(TensorFile(s.header)) for s in ckpt.shards]

    def of(self, name: str) -> TensorFile:
        return self.files[self._ckpt.where[name][0]]

    def read_into(self, name: str, offset: int, out: memoryview) -> None:
        """Bytes of tensor ``name`` from ``offset`` (counted from its first byte) into ``out``."""
        self.of(name).read_into(self._ckpt.entry(name).begin + offset, out)

    def chunks(self, name: str) -> Iterator[bytearray]:
        return self.of(name).chunks(self._ckpt.entry(name))

    def path_of(self, name: str) -> Path:
        return self.of(name).path

    def close(self) -> None:
        self._stack.close()

    def __enter__(self) -> ShardFiles:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_checkpoint(spec: str | Path, hub: HubOptions | None = None) -> Checkpoint:
    """Find and validate a checkpoint: a folder, a .safetensors file or a Hub repo id (at
    ``hub.revision``; see ders_cli.hub)."""
    found = resolve_model(spec, hub)
    path, local = found.path, found.repo_id is None
    ignore = () if local else MODEL_IGNORE  # a cached snapshot may hold other formats' weights
    if not path.is_dir():
        if path.suffix != ".safetensors":
            raise InputError("expected a model folder or a .safetensors file", path)
        shards = (Shard(path.name, read_header(path)),)  # refuses FIFOs, devices, folders
        return _build(path.parent, "file", path.stem, shards, (), found=found)
    if folder_archive_name(path / "config.json") is not None:
        raise InputError("is a ders folder (its config.json names a ders archive): expand it "
                         "first (ders expand), or load it with from_pretrained", spec)
    files, side, skipped = _model_files(path)
    if not files:
        raise InputError("no .safetensors files in this folder", path)
    _check_index(path, files)
    shards = tuple(Shard(f, read_header(path / f)) for f in files)
    side = [p for p in side if not any(fnmatch(p, pattern) for pattern in ignore)]
    try:
        check_paths(files, side)  # what a reader would refuse, refused before writing
    except ValueError as exc:
        raise InputError(str(exc), path) from None
    # A Hub repo id names its outputs after the repo, not after the cache's snapshot hash.
    name = path.resolve().name if local else found.name
    return _build(path, "folder", name, shards, tuple(side), tuple(skipped), found)


def _build(root: Path, kind: str, name: str, shards: tuple[Shard, ...],
           side: tuple[str, ...], skipped: tuple[str, ...] = (),
           found: Resolved | None = None) -> Checkpoint:
    where: dict[str, tuple[int, TensorEntry]] = {}
    for i, shard in enumerate(shards):
        for tname, entry in shard.header.tensors.items():
            if tname in where:
                other = shards[where[tname][0]].file
                raise InputError(f"tensor {tname!r} appears in both {other} and {shard.file}",
                                 root)
            if tname.startswith(RESERVED_PREFIX):
                raise InputError(f"tensor name {tname!r} uses the prefix {RESERVED_PREFIX!r} "
                                 "that ders reserves", root / shard.file)
            problem = text_problem(tname)
            if problem:
                raise InputError(f"tensor name {tname!r} {problem}", root / shard.file)
            where[tname] = (i, entry)
    config = None
    if "config.json" in side:
        config = _read_json(root / "config.json", MAX_CONFIG_BYTES)
        if not isinstance(config, dict):
            config = None  # a hint only: a config that says nothing is the model's business
    return Checkpoint(root=root, kind=kind, name=name, shards=shards, side_files=side,
                      where=where, config=config, skipped=skipped,
                      repo_id=found.repo_id if found else None,
                      revision=found.revision if found else None)


def _read_json(path: Path, limit: int) -> object:
    """A model's JSON file, within size and depth limits (a config nested 1,000 deep is an
    error naming it, not a crash); None when it is not JSON at all."""
    fd = open_regular(path)
    with os.fdopen(fd, "rb") as f:
        raw = f.read(limit + 1)
    if len(raw) > limit:
        raise InputError(f"is larger than {limit // (1 << 20)} MiB: not a JSON file ders reads",
                         path)
    depth = safejson.nesting_depth(raw)
    if depth > safejson.MAX_DEPTH:
        raise InputError(f"JSON nested {depth} levels deep, more than the limit of "
                         f"{safejson.MAX_DEPTH}", path)
    try:
        return safejson.loads(raw)
    except ValueError:
        return None


def _check_index(folder: Path, files: list[str]) -> None:
    # The index is only a hint (shard headers are the authority), but a shard it names that is
    # missing means an incomplete download: compressing that would lose tensors silently.
    index = folder / INDEX_FILE
    if not os.path.lexists(index):
        return
    doc = _read_json(index, MAX_INDEX_BYTES)
    try:
        shards = {s for s in doc["weight_map"].values() if isinstance(s, str)}
    except (KeyError, TypeError, AttributeError):
        raise InputError("not a valid safetensors index (no weight_map)", index) from None
    missing = sorted(s for s in shards if s not in files)
    if missing:
        raise InputError(f"names shard {missing[0]!r}, which is not in the folder", index)


def is_model_folder(folder: Path, besides: str) -> bool:
    """Whether ``folder`` is a model folder (a config.json, or other .safetensors files than
    ``besides``): then outputs do not belong inside it."""
    try:
        names = os.listdir(folder)
    except OSError:
        return False
    return "config.json" in names or any(n.endswith(".safetensors") and n != besides
                                         for n in names)


def link_root(folder: Path) -> Path:
    """Where the links of a model folder may point: inside the folder, or for a snapshot of
    the Hugging Face cache (``models--org--name/snapshots/REV``, whose files are links into
    ``../../blobs``) inside the repository's cache folder."""
    real = folder.resolve()
    if real.parent.name == "snapshots" and (real.parent.parent / "blobs").is_dir():
        return real.parent.parent
    return real


def _model_file(root: Path, allowed: Path, rel: str) -> None:
    """A file of a model folder must be a regular file inside it (or inside ``allowed``):
    a link to ~/.ssh, to /dev/zero or a FIFO would be packed into an archive that others
    download, grow it without end, or hang the run."""
    path = root / rel
    if os.path.islink(path):
        real = Path(os.path.realpath(path))
        if not real.is_relative_to(allowed):
            raise InputError(f"is a link to {real}, outside the model folder: ders packs only "
                             "files inside it (copy the file in, or remove the link)", path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise InputError("is a broken link", path) from None
    kind = not_regular(mode)
    if kind is not None:
        raise InputError(f"is {kind}; a model folder holds regular files (remove it)", path)


def _is_archive(path: Path) -> bool:
    """A ders archive under a safetensors name (a shard or the index of a sharded archive,
    ``model.ders.safetensors`` of a Hub folder): its first bytes say so."""
    name = path.name
    if name.endswith(INDEX_SUFFIX):
        prefix, skip = INDEX_PREFIX, 0
    elif name.endswith(SHARD_SUFFIX):
        prefix, skip = HEADER_PREFIX, 8
    else:
        return False
    with os.fdopen(open_regular(path), "rb") as f:
        return f.read(skip + len(prefix))[skip:] == prefix


def _model_files(root: Path) -> tuple[list[str], list[str], list[str]]:
    """The shard files (top-level ``*.safetensors``), the side files (every other file under
    the folder), both checked by ``_model_file``, and a line for each file skipped on purpose:
    ders archives and ders leftovers are never packed into an archive."""
    allowed = link_root(root)
    shards: list[str] = []
    side: list[str] = []
    skipped: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        rel_dir = Path(dirpath).relative_to(root)
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)
        for d in dirnames:
            if os.path.islink(Path(dirpath) / d):
                raise InputError("is a link to a folder: ders packs only plain folders (copy "
                                 "it in, or remove the link)", Path(dirpath) / d)
        for fname in sorted(filenames):
            rel = (rel_dir / fname).as_posix()
            if _LEFTOVER.fullmatch(fname):
                skipped.append(f"skipped {rel}: left by an interrupted ders run")
                continue
            _model_file(root, allowed, rel)
            if fname.endswith(".ders") or _is_archive(root / rel):
                skipped.append(f"skipped {rel}: a ders archive is never packed into another")
                continue
            if rel_dir == Path(".") and fname.endswith(".safetensors"):
                shards.append(rel)
            else:
                side.append(rel)
    return shards, sorted(side), skipped
