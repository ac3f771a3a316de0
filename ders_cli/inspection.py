"""``inspect``: the expert groups of a model, how alike their experts are, and what each main
setting of ``compress`` and ``quantize`` would write."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .checkpoint import open_checkpoint
from .compress import planned_size, read_group
from .constants import DEFAULT_UPCYCLED_COS
from .decompose import CodecSpec, QuantSpec, SparseSpec
from .dense_base import DenseMatcher
from .detect import find_groups, layer_of
from .errors import UsageError
from .progress import Reporter, Silent
from .stats import cosines_to, mean_base, pairwise_cosines, relative_norms

SETTINGS: tuple[CodecSpec, ...] = (
    SparseSpec(0.5), SparseSpec(0.9), SparseSpec(0.99),
    QuantSpec(8), QuantSpec(4), QuantSpec(2), QuantSpec(1),
)


@dataclass
class GroupReport:
    key: str
    tensors: list[str]
    num_experts: int
    layer: int | None
    shape: list[int]
    dtype: str
    nbytes: int
    base: str
    cos_to_base: list[float]
    cos_to_base_min: float
    cos_between: list[list[float]]
    cos_between_min: float
    cos_between_sampled: bool
    rel_delta_norm: list[float]
    upcycled: bool


@dataclass
class Estimate:
    setting: str
    archive_bytes: int
    ratio: float


@dataclass
class InspectReport:
    model: str
    threshold: float
    total_params: int
    expert_params: int
    upcycled_params: int
    tensor_bytes: int
    side_bytes: int
    groups: list[GroupReport] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)
    estimates: list[Estimate] = field(default_factory=list)

    @property
    def expert_share(self) -> float:
        return self.expert_params / self.total_params if self.total_params else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["expert_share"] = self.expert_share
        return d


def inspect_model(model: str | Path, *, base: str | Path = "mean",
                  threshold: float = DEFAULT_UPCYCLED_COS,
                  reporter: Reporter | None = None) -> InspectReport:
    """Measure every expert group of ``model`` against its base (mean, or a dense checkpoint)."""
    if not 0.0 <= threshold <= 1.0:
        raise UsageError(f"--threshold must be in [0, 1], got {threshold}")
    reporter = reporter or Silent()
    ckpt = open_checkpoint(model)
    groups, skipped = find_groups({n: e for n, (_, e) in ckpt.where.items()})
    matcher = DenseMatcher(open_checkpoint(base), threshold) if str(base) != "mean" else None
    side = ckpt.side_bytes
    total_params = sum(e.numel for _, e in ckpt.where.values())
    report = InspectReport(str(model), threshold, total_params,
                           sum(g.numel * len(g.members) for g in groups), 0,
                           ckpt.tensor_bytes, side,
                           skipped=[{"key": s.key, "reason": s.reason} for s in skipped])
    reporter.start("inspect", sum(g.nbytes for g in groups), len(groups))
    try:
        with ckpt.open() as files:
            for g in groups:
                members, _ = read_group(files, ckpt, g)
                n = len(g.members)
                cd = torch.float64 if g.dtype == "F64" else torch.float32
                flat = members.reshape(n, -1).to(cd)
                mean = mean_base(members)
                base_name, b = "mean", mean
                if matcher is not None:
                    source, b, _ = matcher.match(g, mean)
                    base_name = f"dense {source}"
                bc = b.reshape(-1).to(cd)
                cos = cosines_to(flat, bc)
                pair, sampled = pairwise_cosines(flat)
                off_diag = pair[~torch.eye(n, dtype=torch.bool)]
                rel = relative_norms(flat - bc, flat)
                report.groups.append(GroupReport(
                    key=g.key, tensors=[m.label for m in g.members], num_experts=n,
                    layer=layer_of(g.members[0].tensor), shape=list(g.shape), dtype=g.dtype,
                    nbytes=g.nbytes, base=base_name,
                    cos_to_base=cos.tolist(), cos_to_base_min=float(cos.min()),
                    cos_between=pair.tolist(), cos_between_min=float(off_diag.min()),
                    cos_between_sampled=sampled, rel_delta_norm=rel.tolist(),
                    upcycled=bool(float(cos.min()) >= threshold)))
                reporter.advance(g.nbytes, 1)
    finally:
        if matcher is not None:
            matcher.close()
    upcycled = {r.key for r in report.groups if r.upcycled}
    report.upcycled_params = sum(g.numel * len(g.members) for g in groups if g.key in upcycled)
    original = ckpt.tensor_bytes + side
    for spec in SETTINGS:
        size = planned_size(ckpt, groups, upcycled, spec)
        report.estimates.append(Estimate(spec.label, size, size / original if original else 0))
    reporter.finish()
    return report
