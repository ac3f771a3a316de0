"""``verify``: prove an archive intact and, against the original model, measure its error.

Integrity: the header hash, the manifest's structure, the checksum of every stored array, that
every passthrough tensor is the original's bytes, and that every expert synthesizes to the
bytes recorded at compression time. With ``against``: that the model is the archive's source
(the checksum of every tensor), and the relative error and cosine of every reconstructed expert.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .archive import ArchiveReader
from .checkpoint import Checkpoint, ShardFiles, open_checkpoint
from .codecs import codec_label, compute_dtype
from .detect import layer_of
from .device import resolve_device
from .errors import CorruptArchiveError
from .finite import all_finite
from .grouping import non_finite, read_members
from .groups import GroupArrays, Prefetch, group_arrays
from .hub import HubOptions
from .lanes import Lane, Workers, computing, release_memory, resolve_workers, thread_buffer
from .profile import stage
from .progress import Reporter, Silent
from .records import GroupRecord
from .safetensors_io import tensor_bytes, tensor_nbytes
from .stats import cos_from_norms, pair_norms


@dataclass
class GroupCheck:
    key: str
    layer: int | None
    projection: str  # the part of the key that names the weight: "w1", "gate_up_proj"
    codec: str
    members: int
    original_bytes: int
    stored_bytes: int  # base and codec arrays
    rel_error: list[float]  # measured against the model, or as recorded when written
    cos: list[float]
    measured: bool  # True when measured against the model given

    @property
    def max_rel_error(self) -> float:
        return max(self.rel_error)

    @property
    def min_cos(self) -> float:
        return min(self.cos)


@dataclass
class VerifyReport:
    archive: Path
    against: str | None
    ok: bool = True
    problems: list[str] = field(default_factory=list)
    stored_arrays: int = 0
    tensors: int = 0
    passthrough_exact: int = 0
    archive_bytes: int = 0
    checkpoint_bytes: int = 0  # the checkpoint the archive holds: shards and side files
    experts_compared: int = 0  # synthesized experts compared with the model (--against)
    experts_exact: int = 0  # of those, the ones bit for bit the original
    groups: list[GroupCheck] = field(default_factory=list)

    @property
    def expert_ratio(self) -> float:
        """Bytes the expert groups take in the archive over their original bytes."""
        original = sum(g.original_bytes for g in self.groups)
        return sum(g.stored_bytes for g in self.groups) / original if original else 0.0

    @property
    def ratio(self) -> float:
        return self.archive_bytes / self.checkpoint_bytes if self.checkpoint_bytes else 0.0

    @property
    def max_rel_error(self) -> float | None:
        vals = [g.max_rel_error for g in self.groups]
        return max(vals) if vals else 0.0

    def fail(self, problem: str) -> None:
        self.ok = False
        self.problems.append(problem)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["archive"] = str(self.archive)
        d["max_rel_error"] = self.max_rel_error
        d["expert_ratio"] = self.expert_ratio
        d["ratio"] = self.ratio
        for g, gd in zip(self.groups, d["groups"], strict=True):
            gd["max_rel_error"] = g.max_rel_error
            gd["min_cos"] = g.min_cos
        return d


def verify(archive: str | Path, against: str | Path | None = None, *,
           max_error: float | None = None, device: str = "auto",
           reporter: Reporter | None = None, workers: int | None = None,
           revision: str | None = None, token: str | bool | None = None,
           cache_dir: str | Path | None = None) -> VerifyReport:
    """Check an archive; ``report.ok`` is False with ``problems`` listed when anything is off.
    ``workers``: threads that check a group's members (default: every core this process may
    use).

    Raises InputError (not a report) when the archive is missing, is no ders archive at all, or
    comes from a newer format version; and when ``against`` cannot be opened. ``archive`` and
    ``against`` may be Hub repo ids (``revision``: the archive's; ``token``, ``cache_dir``).
    """
    reporter = reporter or Silent()
    where = resolve_device(device)
    resolve_workers(workers)
    report = VerifyReport(Path(archive), None if against is None else str(against))
    hub = HubOptions(revision, token, cache_dir)
    ckpt = open_checkpoint(against, hub.without_revision()) if against is not None else None
    try:
        reader = ArchiveReader(archive, revision=revision, token=token, cache_dir=cache_dir)
    except CorruptArchiveError as exc:
        report.fail(str(exc))
        return report
    with reader, computing(workers, reader.manifest.member_elements) as pool:
        try:
            _verify_open(reader, ckpt, report, reporter, where, pool)
        except CorruptArchiveError as exc:
            report.fail(str(exc))
    if max_error is not None:
        for g in report.groups:
            if g.max_rel_error > max_error:
                report.fail(f"{g.key}: relative error {g.max_rel_error:.3e} exceeds {max_error}")
    reporter.finish()
    return report


def _verify_open(reader: ArchiveReader, ckpt: Checkpoint | None, report: VerifyReport,
                 reporter: Reporter, device: torch.device, workers: Workers) -> None:
    m = reader.manifest
    report.tensors = len(m.tensors)
    report.archive_bytes = reader.size
    report.checkpoint_bytes = sum(s.size for s in m.shards) + sum(f.size for f in m.files)
    if ckpt is not None:
        missing = sorted(set(m.tensors) ^ set(ckpt.where))
        if missing:
            report.fail(f"{ckpt.root}: tensor sets differ from the archive's source "
                        f"(first: {missing[0]!r})")
    group_of_base = {g.base["array"]: g for g in m.groups}
    in_groups = {a for g in m.groups for a in g.codec["arrays"].values()}
    order = reader.data_order()
    groups = [group_of_base[e.name] for e in order if e.name in group_of_base]
    reporter.start("verify", reader.size, len(m.groups))
    files = ckpt.open() if ckpt is not None else None
    try:
        with Prefetch(groups, lambda g: _fetch(reader, g, ckpt, files, device)) as ahead, \
                Lane("check") as checker:
            for entry in order:
                report.stored_arrays += 1
                if entry.name in group_of_base:
                    fetched = next(ahead)
                    report.groups.append(_check_group(reader, fetched, report, workers))
                    reporter.advance(entry.nbytes, 1)
                    del fetched
                    release_memory()
                elif entry.name not in in_groups:
                    checker.submit(_check_array, reader, entry.name, ckpt, files, report,
                                   reporter)
                else:
                    reporter.advance(entry.nbytes)
    finally:
        if files is not None:
            files.close()


def _check_array(reader: ArchiveReader, name: str, ckpt: Checkpoint | None,
                 files: ShardFiles | None, report: VerifyReport, reporter: Reporter) -> None:
    """A stored array that is no group's: its checksum, and a passthrough tensor's bytes
    against the original's (runs on the check lane)."""
    m = reader.manifest
    if not reader.check_digest(name):
        report.fail(f"checksum mismatch in stored array {name!r}")
    t = m.tensors.get(name)
    # A passthrough tensor's stored checksum is its record's (checked when the archive opened).
    if t is not None and t.group is None and files is not None and name in ckpt.where:
        if _digest_of(reader, files, name) != t.digest:
            report.fail(f"tensor {name!r} differs from the archive's source")
        else:
            report.passthrough_exact += 1
    reporter.advance(reader.entry(name).nbytes)


def _digest_of(reader: ArchiveReader, files: ShardFiles, name: str) -> str:
    """The checksum of a tensor of the original model, by the archive's hash."""
    sha = reader.digest.new()
    for chunk in files.chunks(name):
        sha.update(chunk)
    return sha.hexdigest()


@dataclass
class _Fetched:
    record: GroupRecord
    parts: GroupArrays | None  # None when its arrays fail their checksums
    problem: str
    original: torch.Tensor | None  # the source model's members, with --against
    changed: list[str]  # tensors of the source model whose checksum is not the recorded one
    files: ShardFiles | None = None  # where ``original`` was read


def _fetch(reader: ArchiveReader, g: GroupRecord, ckpt: Checkpoint | None,
           files: ShardFiles | None, device: torch.device) -> _Fetched:
    """A group's arrays and, with --against, its original members (runs on the reader lane)."""
    try:
        parts, problem = group_arrays(reader, g, device), ""
    except CorruptArchiveError as exc:
        parts, problem = None, str(exc)
    original, changed = None, []
    if files is not None and all(t in ckpt.where for t in g.tensors):
        # NaN and Inf are caught by the members' norms (see _check_group), not by a pass.
        original, shas = read_members(files, ckpt, g.members, g.dtype, g.shape,
                                      check_finite=False, digest=reader.digest)
        changed = [n for n, sha in shas.items() if sha != reader.manifest.tensors[n].digest]
    return _Fetched(g, parts, problem, original, changed, files)


def _check_group(reader: ArchiveReader, f: _Fetched, report: VerifyReport,
                 workers: Workers) -> GroupCheck:
    g = f.record
    rel, cos = list(g.rel_error), list(g.cos)
    stored = reader.entry(g.base["array"]).nbytes + sum(
        reader.entry(a).nbytes for a in g.codec["arrays"].values())
    check = GroupCheck(g.key, layer_of(g.members[0].tensor), projection_of(g.key),
                       codec_label(g.codec), len(g.members),
                       len(g.members) * tensor_nbytes(g.dtype, g.shape), stored, rel, cos, False)
    for name in f.changed:
        report.fail(f"tensor {name!r} differs from the archive's source")
    if f.parts is None:
        report.fail(f.problem)
        return check
    cd = compute_dtype(g.dtype)
    parts = f.parts

    def check_member(i: int) -> tuple[bool, bool, float, float]:
        """Whether member i synthesizes to its recorded bytes, and with --against whether it
        is the original bit for bit, its relative error and cosine (on a worker)."""
        on_cpu = parts.base.device.type == "cpu"
        buf = thread_buffer("member", parts.base.numel(), parts.base.dtype) if on_cpu else None
        w_hat = parts.member(i, buf).cpu()
        with stage("hash"):
            same = reader.digest.hex(tensor_bytes(w_hat)) == g.recon_digest[i]
        if f.original is None:
            return same, False, rel[i], cos[i]
        with stage("measure"):
            # Chunks of the member, not all of it: 2 MB per worker instead of 32 (verify's
            # figures are reported, not recorded: they need not be the encoder's float32
            # reductions bit for bit).
            w_norm, h_norm, e_norm = pair_norms(f.original[i], w_hat, cd)
            # A NaN or an infinity makes the norm non-finite (so can squares that overflow:
            # then the exact test decides).
            if not math.isfinite(w_norm) and not all_finite(f.original[i]):
                raise non_finite(f.files, g.members[i])
            exact = _same_bytes(w_hat, f.original[i])
        return (same, exact, e_norm / w_norm if w_norm else 0.0,
                cos_from_norms(h_norm, w_norm, e_norm))

    results = workers.map(check_member, range(len(g.members)))
    for i, (same, exact, rel_i, cos_i) in enumerate(results):
        rel[i], cos[i] = rel_i, cos_i
        if not same:
            report.fail(f"{g.members[i].label!r}: synthesis does not reproduce the recorded "
                        "bytes")
        if f.original is not None:
            report.experts_compared += 1
            report.experts_exact += exact
    check.measured = f.original is not None
    return check


def projection_of(key: str) -> str:
    """'w1' for 'model.layers.3.block_sparse_moe.experts.{E}.w1.weight', 'gate_up_proj' for
    'model.layers.3.mlp.experts.gate_up_proj[{E}]'."""
    if key.endswith("[{E}]"):
        return key[: -len("[{E}]")].rsplit(".", 1)[-1]
    head, _, tail = key.partition("{E}")
    tail = tail.strip(".").removesuffix("weight").strip(".")
    return tail or head.strip(".").rsplit(".", 1)[-1]


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit for bit (as bytes: a NaN equals itself), without a temporary of their size."""
    return a.nbytes == b.nbytes and torch.equal(a.reshape(-1).view(torch.uint8),
                                                b.reshape(-1).view(torch.uint8))
