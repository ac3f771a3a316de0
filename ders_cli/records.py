"""Frozen records: expert groups as detection finds them, and the archive manifest.

The manifest is the JSON document stored in an archive's ``__metadata__``; ``Manifest.from_json``
checks every field and cross-reference before anything trusts it (docs/FORMAT.md, "Manifest").
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

from . import safejson
from .constants import (
    BASE_ENCODING_VERSION,
    BASE_KINDS,
    BASE_RAW,
    DTYPE_BITS,
    FLOAT_DTYPES,
    FORMAT_NAME,
    FORMAT_VERSION,
)
from .digests import Digest, for_version

# A checksum as archives write it, whichever the hash: 64 lowercase hex digits.
HEX_DIGEST = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class Member:
    """One expert's weight: a whole tensor, or slice ``slice`` of a tensor holding ``of`` experts
    stacked along its leading axis (viewed as ``[of, -1]``; every slice is contiguous)."""

    tensor: str
    slice: int | None = None
    of: int | None = None

    @property
    def label(self) -> str:
        return self.tensor if self.slice is None else f"{self.tensor}[{self.slice}]"

    def byte_range(self, begin: int, nbytes: int) -> tuple[int, int]:
        """(offset, length) of this member's bytes in a tensor stored at [begin, begin+nbytes)."""
        if self.slice is None:
            return begin, nbytes
        part = nbytes // self.of
        return begin + self.slice * part, part

    def to_json(self) -> str | dict:
        if self.slice is None:
            return self.tensor
        return {"tensor": self.tensor, "slice": self.slice, "of": self.of}

    @staticmethod
    def from_json(doc: object) -> Member:
        if isinstance(doc, str):
            return Member(doc)
        _expect(isinstance(doc, dict) and isinstance(doc.get("tensor"), str)
                and _is_int(doc.get("of")) and doc["of"] >= 1 and _is_int(doc.get("slice"))
                and 0 <= doc["slice"] < doc["of"], f"bad member {doc!r}")
        return Member(doc["tensor"], doc["slice"], doc["of"])


def tensors_of(members: tuple[Member, ...]) -> list[str]:
    """The distinct tensors a group's members live in, in first-use order."""
    return list(dict.fromkeys(m.tensor for m in members))


class _SameShape:
    """What a group found in a checkpoint and a group recorded in an archive both are: members
    of one shape (the dataclasses below declare the fields)."""

    members: tuple[Member, ...]
    shape: tuple[int, ...]  # of one member

    @property
    def tensors(self) -> list[str]:
        return tensors_of(self.members)

    @property
    def numel(self) -> int:
        """Elements of one member."""
        return math.prod(self.shape)

    @property
    def elements(self) -> int:
        """Elements of all the members: the work of encoding or synthesizing them."""
        return self.numel * len(self.members)


@dataclass(frozen=True)
class ExpertGroup(_SameShape):
    """Experts that share an init: same dtype and shape, in expert order."""

    key: str  # the member names with the expert index replaced by {E}
    members: tuple[Member, ...]
    experts: tuple[int, ...]  # the expert index of each member
    dtype: str
    shape: tuple[int, ...]  # of one member

    @property
    def nbytes(self) -> int:
        return self.elements * DTYPE_BITS[self.dtype] // 8


@dataclass(frozen=True)
class ShardRecord:
    file: str  # path relative to the model folder
    size: int  # bytes of the whole shard file
    header: str  # stored array holding the shard's header JSON, byte for byte


@dataclass(frozen=True)
class FileRecord:
    path: str  # relative, '/'-separated
    size: int
    digest: str  # the checksum of its bytes (the archive's hash: Manifest.digest)
    array: str  # stored array holding the file's bytes


@dataclass(frozen=True)
class TensorRecord:
    shard: int
    digest: str  # the checksum of the original tensor's bytes
    group: int | None = None  # None: stored as it is, under its own name
    member: int | None = None  # None with a group: the tensor is all of its slices in that group


@dataclass(frozen=True)
class GroupRecord(_SameShape):
    key: str
    members: tuple[Member, ...]
    dtype: str
    shape: tuple[int, ...]
    base: dict[str, Any]  # {"kind": one of BASE_KINDS, "array": name, ["source": dense tensor],
    #                        ["encoding": how the array stores it, when not "raw"]}
    codec: dict[str, Any]  # {"name": ..., "params": {...}, "arrays": {suffix: name}}
    recon_digest: tuple[str, ...]  # of each synthesized member, so synthesis is checked too
    rel_error: tuple[float, ...]  # ||W - W_hat|| / ||W|| measured when the archive was written
    cos: tuple[float, ...]

    @property
    def base_encoding(self) -> str:
        """How the base array stores the base; version-1 records name none: raw."""
        return self.base.get("encoding", BASE_RAW)


@dataclass(frozen=True)
class Manifest:
    source: dict[str, str]  # {"kind": "folder" | "file", "name": ...}
    shards: tuple[ShardRecord, ...]
    files: tuple[FileRecord, ...]
    tensors: dict[str, TensorRecord]  # every original tensor
    groups: tuple[GroupRecord, ...]
    passthrough_groups: tuple[dict[str, str], ...]  # groups found but stored as they are
    stored: dict[str, str]  # the checksum of every stored array, by name
    version: int = FORMAT_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def member_elements(self) -> int:
        """Elements of all the groups' members: the work of synthesizing them all."""
        return sum(g.elements for g in self.groups)

    @property
    def digest(self) -> Digest:
        """The hash of every checksum of this manifest (its version's)."""
        return for_version(self.version)

    def to_json(self) -> str:
        name = self.digest.name
        doc = {
            "format": FORMAT_NAME,
            "version": self.version,
            "source": self.source,
            "shards": [vars(s) for s in self.shards],
            "files": [{"path": f.path, "size": f.size, name: f.digest, "array": f.array}
                      for f in self.files],
            "tensors": {
                tensor: {k: v for k, v in (("shard", t.shard), (name, t.digest),
                                           ("group", t.group), ("member", t.member))
                         if v is not None}
                for tensor, t in self.tensors.items()
            },
            "groups": [
                {
                    "key": g.key,
                    "members": [m.to_json() for m in g.members],
                    "dtype": g.dtype,
                    "shape": list(g.shape),
                    "base": g.base,
                    "codec": g.codec,
                    self.digest.recon_field: list(g.recon_digest),
                    "rel_error": list(g.rel_error),
                    "cos": list(g.cos),
                }
                for g in self.groups
            ],
            "passthrough_groups": list(self.passthrough_groups),
            "stored": self.stored,
            **self.extra,
        }
        return json.dumps(doc, separators=(",", ":"), ensure_ascii=True)

    @staticmethod
    def from_json(text: str, header_version: int | None = None) -> Manifest:
        """Parse and check a manifest; raises ValueError naming the first problem.
        ``header_version``: the version its container names, which the manifest's must be
        (checked first: the version says which fields hold the checksums)."""
        doc = safejson.loads(text)
        _expect(isinstance(doc, dict), "manifest is not a JSON object")
        _expect(doc.get("format") == FORMAT_NAME, "manifest format is not 'ders'")
        version = doc.get("version")
        _expect(_is_int(version) and version >= 1, f"manifest version {version!r} is invalid")
        _expect(header_version is None or version == header_version,
                f"manifest version {version} differs from the header's {header_version}")
        digest = for_version(version)
        stored = doc.get("stored")
        _expect(isinstance(stored, dict), "manifest has no 'stored' map")
        for name, sha in stored.items():
            _expect(isinstance(sha, str) and bool(HEX_DIGEST.match(sha)),
                    f"bad {digest.name} for {name!r}")

        # Every stored array has exactly one role: a reader that met one twice (two groups on
        # one base, a side file that is also a tensor) would write one and skip the other.
        used: dict[str, str] = {}

        def ref(name: object, what: str) -> str:
            _expect(isinstance(name, str) and name in stored,
                    f"{what} names a missing array {_cut(str(name))!r}")
            _expect(name not in used, f"{what} and {used.get(name)} share the array {name!r}")
            used[name] = what  # type: ignore[index]
            return name  # type: ignore[return-value]

        for name in stored:
            _expect(text_problem(name) is None,
                    f"stored array name {_cut(name)!r} {text_problem(name)}")
        shards = tuple(
            ShardRecord(_str(s, "file"), _nonneg(s, "size"), ref(s.get("header"), "shard"))
            for s in _list(doc, "shards")
        )
        _expect(len(shards) >= 1, "manifest lists no shard")
        files = tuple(
            FileRecord(_str(f, "path"), _nonneg(f, "size"), _digest(f, digest.name),
                       ref(f.get("array"), "file"))
            for f in _list(doc, "files")
        )
        check_paths([s.file for s in shards], [f.path for f in files])
        groups = tuple(_group(g, ref, digest) for g in _list(doc, "groups"))
        tensors_doc = doc.get("tensors")
        _expect(isinstance(tensors_doc, dict), "manifest has no 'tensors' map")
        tensors: dict[str, TensorRecord] = {}
        # Each fused tensor's slices, gathered once (not a scan of the group per tensor).
        slices: dict[tuple[int, str], list[Member]] = {}
        for gi, g in enumerate(groups):
            for m in g.members:
                if m.slice is not None:
                    slices.setdefault((gi, m.tensor), []).append(m)
        for name, t in tensors_doc.items():
            _expect(text_problem(name) is None,
                    f"tensor name {_cut(name)!r} {text_problem(name)}")
            _expect(isinstance(t, dict), f"tensor record {name!r} is not an object")
            shard = t.get("shard")
            _expect(_is_int(shard) and 0 <= shard < len(shards), f"tensor {name!r}: bad shard")
            group, member = t.get("group"), t.get("member")
            if group is None:
                _expect(member is None, f"tensor {name!r}: member without group")
                ref(name, f"passthrough tensor {_cut(name)!r}")
            else:
                _expect(_is_int(group) and 0 <= group < len(groups), f"tensor {name!r}: bad group")
                g = groups[group]
                if member is None:
                    # Slices are distinct members in [0, of): as many as ``of`` cover it. (Never
                    # a list of ``of`` numbers: a manifest may say of = 10^9.)
                    parts = slices.get((group, name), [])
                    _expect(bool(parts) and all(m.of == parts[0].of for m in parts)
                            and len(parts) == parts[0].of
                            and all(m.tensor != name or m.slice is not None for m in g.members),
                            f"tensor {name!r}: its slices are not all members of its group")
                else:
                    _expect(_is_int(member) and 0 <= member < len(g.members)
                            and g.members[member] == Member(name),
                            f"tensor {name!r}: bad member index")
            tensors[name] = TensorRecord(shard, _digest(t, digest.name), group, member)
        for gi, g in enumerate(groups):
            for mi, m in enumerate(g.members):
                t = tensors.get(m.tensor)
                _expect(t is not None and t.group == gi
                        and t.member == (mi if m.slice is None else None),
                        f"group {g.key!r}: member {m.label!r} has no matching tensor record")
        unused = next((name for name in stored if name not in used), None)
        _expect(unused is None, f"stored array {unused!r} has no role in the manifest")
        passthrough = tuple(_list(doc, "passthrough_groups"))
        _expect(all(isinstance(p, dict) and all(isinstance(v, str) and text_problem(v) is None
                                                for v in p.values()) for p in passthrough),
                "passthrough_groups are not records of printable strings")
        known = {"format", "version", "source", "shards", "files", "tensors", "groups",
                 "passthrough_groups", "stored"}
        source = doc.get("source")
        _expect(isinstance(source, dict), "manifest has no 'source'")
        return Manifest(
            source=source,
            shards=shards,
            files=files,
            tensors=tensors,
            groups=groups,
            passthrough_groups=passthrough,
            stored=stored,
            version=version,
            extra={k: v for k, v in doc.items() if k not in known},
        )


def required_version(groups: tuple[GroupRecord, ...], digest: Digest) -> int:
    """The oldest format version that holds these groups with checksums of ``digest``: with
    SHA-256, 1 unless a base is encoded, so that older readers read every archive that needs
    nothing newer; with BLAKE3, the version that brought it."""
    return max([1, digest.since] + [BASE_ENCODING_VERSION[g.base_encoding] for g in groups])


def _group(g: Any, ref: Any, digest: Digest) -> GroupRecord:
    _expect(isinstance(g, dict), "group record is not an object")
    key = _str(g, "key")
    _expect(text_problem(key) is None, f"group key {_cut(key)!r} {text_problem(key)}")
    raw_members = g.get("members")
    _expect(isinstance(raw_members, list) and len(raw_members) >= 1,
            f"group {key!r}: bad members")
    members = [Member.from_json(m) for m in raw_members]
    _expect(len(set(members)) == len(members), f"group {key!r}: a member appears twice")
    dtype = g.get("dtype")
    _expect(dtype in FLOAT_DTYPES, f"group {key!r}: dtype {dtype!r} cannot be synthesized")
    shape = g.get("shape")
    _expect(isinstance(shape, list) and all(_is_int(d) and d >= 0 for d in shape),
            f"group {key!r}: bad shape")
    base = g.get("base")
    _expect(isinstance(base, dict) and base.get("kind") in BASE_KINDS,
            f"group {key!r}: bad base")
    ref(base.get("array"), f"group {key!r} base")
    _expect(isinstance(base.get("encoding", BASE_RAW), str)
            and base.get("encoding", BASE_RAW) in BASE_ENCODING_VERSION,
            f"group {key!r}: unknown base encoding {base.get('encoding')!r}")
    codec = g.get("codec")
    _expect(isinstance(codec, dict) and isinstance(codec.get("name"), str)
            and isinstance(codec.get("params"), dict) and isinstance(codec.get("arrays"), dict),
            f"group {key!r}: bad codec record")
    for suffix, name in codec["arrays"].items():
        ref(name, f"group {key!r} codec array {suffix!r}")
    n = len(members)
    recon = g.get(digest.recon_field)
    _expect(isinstance(recon, list) and len(recon) == n
            and all(isinstance(s, str) and HEX_DIGEST.match(s) for s in recon),
            f"group {key!r}: bad {digest.recon_field}")
    stats = {}
    for k in ("rel_error", "cos"):
        v = g.get(k)
        _expect(isinstance(v, list) and len(v) == n
                and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v),
                f"group {key!r}: bad {k}")
        stats[k] = tuple(float(x) for x in v)
    return GroupRecord(key, tuple(members), dtype, tuple(shape), base, codec, tuple(recon),
                       stats["rel_error"], stats["cos"])


# C0 and C1 controls, and the bidirectional overrides and isolates that make text display in an
# order other than its own.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")
_SURROGATE = re.compile("[\ud800-\udfff]")
# Longest file or folder name, and path, that every common file system takes.
MAX_NAME_BYTES = 255
MAX_PATH_BYTES = 4096


def text_problem(text: str) -> str | None:
    """Why a name read from an archive cannot be printed or used as it is, or None: control
    characters (a terminal obeys them: a name could redraw what ``verify`` prints) and lone
    surrogates (no file system or terminal encoding takes them)."""
    if _CONTROL.search(text):
        return "contains a control character"
    if _SURROGATE.search(text):
        return "is not valid Unicode (a lone surrogate)"
    return None


def path_problem(path: str) -> str | None:
    """Why ``path`` is not a relative POSIX path of plain components that stays inside the
    folder it is joined to, or None (docs/FORMAT.md 4, "Names")."""
    if path == "":
        return "is empty"
    problem = text_problem(path)
    if problem:
        return problem
    if "\\" in path:
        return "contains a backslash"
    if path.startswith("/"):
        return "is absolute"
    if len(path.encode("utf-8")) > MAX_PATH_BYTES:
        return f"is longer than {MAX_PATH_BYTES} bytes"
    for part in path.split("/"):
        if part in ("", ".", ".."):
            return f"has a {part!r} component" if part else "has an empty component"
        if len(part.encode("utf-8")) > MAX_NAME_BYTES:
            return f"has a component longer than {MAX_NAME_BYTES} bytes"
    return None


def check_paths(shards: list[str], files: list[str]) -> None:
    """Every file an archive expands to: a safe path, a .safetensors name for a shard, and no
    two that one folder cannot hold side by side (the same name, names differing in case only,
    which a case-insensitive file system merges, or a file where another needs a folder)."""
    seen: dict[str, str] = {}
    for what, paths in (("shard", shards), ("side file", files)):
        for path in paths:
            problem = path_problem(path)
            _expect(problem is None, f"{what} path {_cut(path)!r} {problem}")
            if what == "shard":
                _expect(path.endswith(".safetensors"),
                        f"shard path {path!r} does not end in .safetensors")
            key = path.casefold()
            _expect(key not in seen, f"{what} path {path!r} collides with {seen.get(key)!r}")
            seen[key] = path
    for key, path in seen.items():
        parts = key.split("/")
        for i in range(1, len(parts)):
            folder = "/".join(parts[:i])
            _expect(folder not in seen,
                    f"path {path!r} needs a folder where {seen.get(folder)!r} is a file")


def _cut(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def _expect(cond: bool, message: str) -> None:
    if not cond:
        raise ValueError(message)


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _list(doc: dict, key: str) -> list:
    v = doc.get(key)
    _expect(isinstance(v, list), f"manifest field {key!r} is not a list")
    return v


def _str(d: Any, key: str) -> str:
    _expect(isinstance(d, dict) and isinstance(d.get(key), str), f"record lacks string {key!r}")
    return d[key]


def _nonneg(d: Any, key: str) -> int:
    v = d.get(key) if isinstance(d, dict) else None
    _expect(_is_int(v) and v >= 0, f"record lacks non-negative integer {key!r}")
    return v  # type: ignore[return-value]


def _digest(d: Any, key: str) -> str:
    v = d.get(key) if isinstance(d, dict) else None
    _expect(isinstance(v, str) and bool(HEX_DIGEST.match(v)), f"record lacks a checksum {key!r}")
    return v  # type: ignore[return-value]
