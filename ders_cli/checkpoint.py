"""Hugging Face style checkpoints on disk: finding the shards and side files of a model folder
(or a single .safetensors file, or a Hub repo id), and validating every shard header.

No math here: this module knows files, names and offsets.
"""

from __future__ import annotations

import json
import os
import re
from contextlib import ExitStack
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path

from .constants import RESERVED_PREFIX
from .errors import InputError
from .safetensors_io import Header, TensorEntry, TensorFile, read_header

INDEX_FILE = "model.safetensors.index.json"
# Directories that belong to tools, not to the model: never side files.
SKIP_DIRS = {".git", ".cache", "__pycache__", ".ipynb_checkpoints"}
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
# What a Hub download fetches: weights in safetensors form and every small side file.
HUB_IGNORE = ["*.bin", "*.pt", "*.pth", "*.ckpt", "*.h5", "*.msgpack", "*.onnx", "*.gguf",
              "*.ot", "*.tflite", "*.mlmodel", "original/*", "*.pdparams"]


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
    """Open readers for every shard of a checkpoint; a context manager."""

    def __init__(self, ckpt: Checkpoint) -> None:
        self._ckpt = ckpt
        self._stack = ExitStack()
        self.files = [self._stack.enter_context(TensorFile(s.header)) for s in ckpt.shards]

    def of(self, name: str) -> TensorFile:
        return self.files[self._ckpt.where[name][0]]

    def close(self) -> None:
        self._stack.close()

    def __enter__(self) -> ShardFiles:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def resolve(spec: str | Path) -> Path:
    """A local path as it is; a Hub repo id downloaded (or found in the local cache)."""
    path = Path(spec).expanduser()
    if path.exists():
        return path
    text = str(spec)
    if _REPO_ID.match(text.split("@", 1)[0]):
        return _from_hub(text)
    raise InputError("no such file or folder", path)


def _from_hub(spec: str) -> Path:
    repo_id, _, revision = spec.partition("@")
    from huggingface_hub import constants, snapshot_download

    try:
        return Path(snapshot_download(repo_id, revision=revision or None,
                                      ignore_patterns=HUB_IGNORE))
    except Exception as exc:  # the hub raises many types; all mean "cannot get it"
        if constants.HF_HUB_OFFLINE:
            why = "and not in the local Hugging Face cache (HF_HUB_OFFLINE is set)"
        else:
            why = f"and the Hugging Face Hub could not provide it ({type(exc).__name__})"
        raise InputError(f"not a local path, {why}", spec) from None


def open_checkpoint(spec: str | Path) -> Checkpoint:
    """Find and validate a checkpoint: a folder, a .safetensors file or a Hub repo id."""
    local = Path(spec).expanduser().exists()
    path = resolve(spec)
    ignore = () if local else HUB_IGNORE  # a cached snapshot may hold other formats' weights
    if path.is_file():
        if path.suffix != ".safetensors":
            raise InputError("expected a model folder or a .safetensors file", path)
        shards = (Shard(path.name, read_header(path)),)
        return _build(path.parent, "file", path.stem, shards, ())
    if not path.is_dir():
        raise InputError("not a file or folder", path)
    files = sorted(p.name for p in path.glob("*.safetensors") if p.is_file())
    if not files:
        raise InputError("no .safetensors files in this folder", path)
    _check_index(path, files)
    shards = tuple(Shard(f, read_header(path / f)) for f in files)
    side = tuple(sorted(p for p in _side_files(path, set(files))
                        if not any(fnmatch(p, pattern) for pattern in ignore)))
    # A Hub repo id names its outputs after the repo, not after the cache's snapshot hash.
    name = path.resolve().name if local else str(spec).split("@", 1)[0].rsplit("/", 1)[-1]
    return _build(path, "folder", name, shards, side)


def _build(root: Path, kind: str, name: str, shards: tuple[Shard, ...],
           side: tuple[str, ...]) -> Checkpoint:
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
            where[tname] = (i, entry)
    config = None
    if "config.json" in side:
        try:
            config = json.loads((root / "config.json").read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError):
            config = None  # a hint only: a broken config is the model's business, not ours
    return Checkpoint(root=root, kind=kind, name=name, shards=shards, side_files=side,
                      where=where, config=config)


def _check_index(folder: Path, files: list[str]) -> None:
    # The index is only a hint (shard headers are the authority), but a shard it names that is
    # missing means an incomplete download: compressing that would lose tensors silently.
    index = folder / INDEX_FILE
    if not index.is_file():
        return
    try:
        doc = json.loads(index.read_text(encoding="utf-8"))
        shards = set(doc["weight_map"].values())
    except (ValueError, KeyError, TypeError, AttributeError):
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


def _side_files(root: Path, shard_files: set[str]) -> list[str]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)
        rel_dir = Path(dirpath).relative_to(root)
        for fname in filenames:
            rel = (rel_dir / fname).as_posix()
            if rel in shard_files or (fname.startswith(".") and ".partial-" in fname):
                continue
            out.append(rel)
    return out
