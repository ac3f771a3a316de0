"""``compress`` and ``quantize``: a checkpoint into a .ders archive, one group at a time.

Tensors are visited in file order. A passthrough tensor is copied in chunks; an expert group is
read whole (the only thing held in memory), decomposed, encoded, measured, and written before
the next is read.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .archive import ArchiveWriter
from .checkpoint import Checkpoint, ShardFiles, open_checkpoint
from .codecs import get_codec
from .constants import (
    DEFAULT_UPCYCLED_COS,
    GROUP_ARRAY_NAME,
    SHARD_HEADER_NAME,
    SIDE_FILE_NAME,
)
from .decompose import CodecSpec, EncodedGroup, GivenEncoding, encode_group, measure_group
from .dense_base import DenseMatcher
from .detect import Skipped, find_groups
from .errors import InputError, UsageError
from .outputs import check_new_output
from .progress import Reporter, Silent
from .records import ExpertGroup, FileRecord, GroupRecord, Manifest, ShardRecord, TensorRecord
from .safetensors_io import TORCH_DTYPES, tensor_nbytes
from .stats import cosines_to, mean_base


@dataclass
class GroupSummary:
    key: str
    members: int
    shape: list[int]
    dtype: str
    action: str  # the codec's name, or "passthrough"
    original_bytes: int
    stored_bytes: int
    max_rel_error: float = 0.0
    min_cos: float = 1.0
    base: str = "mean"
    reason: str = ""


@dataclass
class CompressResult:
    archive: Path
    setting: str
    input_bytes: int  # tensor data plus side files of the checkpoint
    archive_bytes: int
    header_bytes: int
    groups: list[GroupSummary] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def ratio(self) -> float:
        return self.archive_bytes / self.input_bytes if self.input_bytes else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["archive"] = str(self.archive)
        d["ratio"] = self.ratio
        return d


def default_archive_path(ckpt: Checkpoint, model: str | Path) -> Path:
    if ckpt.kind == "file":
        return ckpt.root / f"{ckpt.name}.ders"
    if Path(model).expanduser().exists():
        return ckpt.root.resolve().parent / f"{ckpt.name}.ders"
    return Path.cwd() / f"{ckpt.name}.ders"  # a Hub model: beside the user, not in the cache


def compress(model: str | Path, spec: CodecSpec | None, out: str | Path | None = None, *,
             base: str | Path = "mean", threshold: float = DEFAULT_UPCYCLED_COS,
             overwrite: bool = False, reporter: Reporter | None = None,
             reserve: int | None = None, given: Sequence[GivenEncoding] = ()) -> CompressResult:
    """Write a .ders archive of ``model`` with ``spec`` (SparseSpec or QuantSpec).

    ``given`` (with ``spec`` None): the groups, with their base and codec arrays computed
    elsewhere (a DeRS-trained model, see ``ders_cli.training``); they replace detection and are
    stored as they are, measured against the checkpoint's tensors.
    """
    if (spec is None) == (not given):
        raise UsageError("compress needs a codec setting or given encodings, not both")
    if spec is not None:
        spec.check()
    if not 0.0 <= threshold <= 1.0:
        raise UsageError(f"--threshold must be in [0, 1], got {threshold}")
    reporter = reporter or Silent()
    ckpt = open_checkpoint(model)
    if given:
        groups, skipped = [e.group for e in given], []
    else:
        groups, skipped = find_groups({n: e for n, (_, e) in ckpt.where.items()})
    dest = Path(out) if out is not None else default_archive_path(ckpt, model)
    check_new_output(dest, overwrite)
    matcher = None
    if str(base) != "mean":
        matcher = DenseMatcher(open_checkpoint(base), threshold)
    job = _Job(ckpt, spec, matcher, threshold, reporter, given)
    try:
        with ckpt.open() as files, ArchiveWriter(
            dest, reserve if reserve is not None else estimate_header(ckpt, groups), overwrite
        ) as writer:
            size = job.run(files, writer, groups, skipped)
    finally:
        if matcher is not None:
            matcher.close()
    reporter.finish()
    return CompressResult(
        archive=dest,
        setting=job.label,
        input_bytes=ckpt.tensor_bytes + ckpt.side_bytes,
        archive_bytes=size,
        header_bytes=size - writer.data_bytes,
        groups=job.summaries,
        warnings=job.warnings,
    )


def planned_size(ckpt: Checkpoint, groups: list[ExpertGroup], upcycled: set[str],
                 spec: CodecSpec) -> int:
    """The exact size of the archive ``compress`` writes, given which groups are upcycled
    (unless the header outgrows its estimate, which makes it larger)."""
    reserve = estimate_header(ckpt, groups)
    size = 8 + reserve + (-reserve % 8)
    size += sum(len(s.header.raw) for s in ckpt.shards)
    size += ckpt.side_bytes
    grouped = {t for g in groups for t in g.tensors}
    size += sum(e.nbytes for n, (_, e) in ckpt.where.items() if n not in grouped)
    for g in groups:
        if g.key not in upcycled:
            size += g.nbytes
            continue
        arrays = get_codec(spec.codec).arrays(spec.params(g), len(g.members), g.numel, g.dtype)
        size += g.nbytes // len(g.members)  # the base
        size += sum(tensor_nbytes(dtype, shape) for dtype, shape in arrays.values())
    return size


def estimate_header(ckpt: Checkpoint, groups: list[ExpertGroup]) -> int:
    """Room to reserve for the header: a generous estimate of the manifest's length."""
    per_tensor = sum(3 * len(n) + 260 for n in ckpt.where)
    per_group = sum(len(g.key) + 200 * len(g.members) + 400 for g in groups)
    per_file = sum(len(p) + 200 for p in ckpt.side_files) + 200 * len(ckpt.shards)
    return 4096 + (per_tensor + per_group + per_file) * 5 // 4


class _Job:
    def __init__(self, ckpt: Checkpoint, spec: CodecSpec | None, matcher: DenseMatcher | None,
                 threshold: float, reporter: Reporter, given: Sequence[GivenEncoding] = ()
                 ) -> None:
        self.ckpt = ckpt
        self.spec = spec
        self.given = {e.group.key: e for e in given}
        self.label = spec.label if spec is not None else "given deltas"
        self.matcher = matcher
        self.threshold = threshold
        self.reporter = reporter
        self.summaries: list[GroupSummary] = []
        self.warnings: list[str] = []
        self.tensors: dict[str, TensorRecord] = {}
        self.records: list[GroupRecord] = []
        self.passthrough: list[dict[str, str]] = []

    def warn(self, message: str) -> None:
        self.warnings.append(message)
        self.reporter.warn(message)

    def run(self, files: ShardFiles, w: ArchiveWriter, groups: list[ExpertGroup],
            skipped: list[Skipped]) -> int:
        ckpt = self.ckpt
        self.reporter.start(self.label, ckpt.tensor_bytes + ckpt.side_bytes, len(groups))
        for s in skipped:
            self.passthrough.append({"key": s.key, "reason": s.reason})
        shards = []
        for i, s in enumerate(ckpt.shards):
            name = SHARD_HEADER_NAME.format(index=i)
            w.add(name, "U8", (len(s.header.raw),), s.header.raw)
            shards.append(ShardRecord(s.file, s.header.file_size, name))
        side = []
        for i, rel in enumerate(ckpt.side_files):
            side.append(self._side_file(w, i, rel))
        for unit in _units(ckpt, groups):
            if isinstance(unit, ExpertGroup):
                self._group(files, w, unit)
            else:
                self._passthrough(files, w, unit)
        tensors = {name: self.tensors[name] for name in ckpt.where}
        manifest = Manifest(
            source={"kind": ckpt.kind, "name": ckpt.name},
            shards=tuple(shards),
            files=tuple(side),
            tensors=tensors,
            groups=tuple(self.records),
            passthrough_groups=tuple(self.passthrough),
            stored=w.stored_sha256,
        )
        return w.finish(manifest)

    def _side_file(self, w: ArchiveWriter, index: int, rel: str) -> FileRecord:
        path = self.ckpt.root / rel
        size = path.stat().st_size
        sha = hashlib.sha256()

        def chunks():
            with open(path, "rb") as f:
                while chunk := f.read(1 << 24):
                    sha.update(chunk)
                    yield chunk

        name = SIDE_FILE_NAME.format(index=index)
        w.add(name, "U8", (size,), chunks())
        self.reporter.advance(size)
        return FileRecord(rel, size, sha.hexdigest(), name)

    def _passthrough(self, files: ShardFiles, w: ArchiveWriter, name: str) -> None:
        shard, e = self.ckpt.where[name]
        sha = w.add(name, e.dtype, e.shape, files.of(name).chunks(e))
        self.tensors[name] = TensorRecord(shard, sha)
        self.reporter.advance(e.nbytes)

    def _group(self, files: ShardFiles, w: ArchiveWriter, g: ExpertGroup) -> None:
        members, shas = read_group(files, self.ckpt, g)
        given = self.given.get(g.key)
        if given is not None:
            summary = GroupSummary(g.key, len(g.members), list(g.shape), g.dtype, given.codec,
                                   g.nbytes, 0, base=given.base_kind)
            enc = measure_group(members, given.base, g.dtype, given.codec, given.params,
                                given.arrays)
            self._store(w, g, enc, {"kind": given.base_kind}, given.codec, shas, summary)
            self.reporter.advance(g.nbytes, 1)
            return
        summary = GroupSummary(g.key, len(g.members), list(g.shape), g.dtype, self.spec.codec,
                               g.nbytes, 0)
        mean = mean_base(members)
        base_rec: dict = {"kind": "mean"}
        base = mean
        if self.matcher is not None:
            source, base, _ = self.matcher.match(g, mean)
            base_rec = {"kind": "dense", "source": source}
            summary.base = f"dense {source}"
        del mean
        cd = torch.float64 if g.dtype == "F64" else torch.float32
        cos = cosines_to(members.reshape(len(g.members), -1).to(cd), base.reshape(-1).to(cd))
        if float(cos.min()) < self.threshold:
            reason = (f"not upcycled: an expert has cosine {float(cos.min()):.4f} to the base "
                      f"(< {self.threshold})")
            self.warn(f"{g.key}: {reason}; stored as it is")
            self.passthrough.append({"key": g.key, "reason": reason})
            for name in g.tensors:  # read again: rare, and keeps one copy path for passthrough
                self._passthrough(files, w, name)
            summary.action, summary.reason = "passthrough", reason
            summary.stored_bytes = g.nbytes
        else:
            enc = encode_group(members, base, g.dtype, self.spec.codec, self.spec.params(g))
            self._store(w, g, enc, base_rec, self.spec.codec, shas, summary)
            self.reporter.advance(g.nbytes, 1)
            return
        self.summaries.append(summary)
        self.reporter.advance(g.nbytes, 1)

    def _store(self, w: ArchiveWriter, g: ExpertGroup, enc: EncodedGroup, base_rec: dict,
               codec: str, shas: dict[str, str], summary: GroupSummary) -> None:
        """Write an encoded group's arrays and record it in the manifest."""
        gid = len(self.records)
        base_rec["array"] = GROUP_ARRAY_NAME.format(group=gid, array="base")
        w.add_tensor(base_rec["array"], enc.base, g.dtype)
        arrays = {}
        for suffix, t in enc.arrays.items():
            arrays[suffix] = GROUP_ARRAY_NAME.format(group=gid, array=suffix)
            w.add_tensor(arrays[suffix], t)
        self.records.append(GroupRecord(
            key=g.key, members=g.members, dtype=g.dtype, shape=g.shape, base=base_rec,
            codec={"name": codec, "params": enc.params, "arrays": arrays},
            recon_sha256=tuple(enc.recon_sha256), rel_error=tuple(enc.rel_error),
            cos=tuple(enc.cos)))
        for i, m in enumerate(g.members):
            member = i if m.slice is None else None
            self.tensors[m.tensor] = TensorRecord(self.ckpt.where[m.tensor][0],
                                                  shas[m.tensor], gid, member)
        summary.stored_bytes = enc.base.numel() * enc.base.element_size() + sum(
            t.numel() * t.element_size() for t in enc.arrays.values())
        summary.max_rel_error = max(enc.rel_error)
        summary.min_cos = min(enc.cos)
        self.summaries.append(summary)


def _units(ckpt: Checkpoint, groups: list[ExpertGroup]) -> list[ExpertGroup | str]:
    """Passthrough tensor names and groups, in the order their first bytes sit on disk."""
    grouped = {t for g in groups for t in g.tensors}

    def pos(name: str) -> tuple[int, int]:
        shard, e = ckpt.where[name]
        return shard, e.begin

    units: list[tuple[tuple[int, int], ExpertGroup | str]] = [
        (pos(n), n) for n in ckpt.where if n not in grouped]
    units += [(min(pos(t) for t in g.tensors), g) for g in groups]
    units.sort(key=lambda u: u[0])
    return [u for _, u in units]


def read_group(files: ShardFiles, ckpt: Checkpoint, g: ExpertGroup
               ) -> tuple[torch.Tensor, dict[str, str]]:
    """All members as one ``[N, ...]`` tensor of the group's dtype, and the sha256 of each
    tensor they live in (a fused tensor's slices, hashed in order, are the whole tensor)."""
    out = torch.empty((len(g.members), *g.shape), dtype=TORCH_DTYPES[g.dtype])
    flat = out.view(len(g.members), -1).view(torch.uint8)
    views = []
    for i, m in enumerate(g.members):
        e = ckpt.entry(m.tensor)
        offset, _ = m.byte_range(e.begin, e.nbytes)
        views.append(memoryview(flat[i].numpy()))
        files.of(m.tensor).read_into(offset, views[i])
    shas = {}
    for name in g.tensors:
        parts = sorted((m.slice or 0, i) for i, m in enumerate(g.members) if m.tensor == name)
        sha = hashlib.sha256()
        for _, i in parts:
            sha.update(views[i])
        shas[name] = sha.hexdigest()
    if not bool(torch.isfinite(out).all()):
        bad = next(m for i, m in enumerate(g.members) if not bool(torch.isfinite(out[i]).all()))
        raise InputError(f"tensor {bad.label!r} contains NaN or Inf; ders will not decompose it",
                         files.of(bad.tensor).path)
    return out, shas
