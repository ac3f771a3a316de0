"""``inspect``: the expert groups of a model, how alike their experts are, and what each main
setting of ``compress`` and ``quantize`` would write."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .checkpoint import open_checkpoint
from .codecs import CodecSpec, QuantSpec, SparseSpec
from .constants import DEFAULT_UPCYCLED_COS
from .dense_base import DenseMatcher
from .detect import find_groups, layer_of, nothing_to_compress, quantized_summary
from .errors import UsageError
from .grouping import load_group
from .hub import HubOptions
from .lanes import compute_threads
from .plan import planned_size
from .progress import Reporter, Silent
from .records import ExpertGroup
from .stats import pairwise_cosines

SETTINGS: tuple[CodecSpec, ...] = (
    SparseSpec(0.5), SparseSpec(0.9), SparseSpec(0.99),
    QuantSpec(8), QuantSpec(4), QuantSpec(2), QuantSpec(1),
)


@dataclass
class GroupReport:
    key: str
    tensors: list[str]  # member labels: tensor names, "name[i]" for slices of a fused tensor
    num_experts: int  # members, shared FFNs that joined included
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
    shared: list[dict] = field(default_factory=list)  # {"tensor", "cos", "joins"}


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
    checkpoint_bytes: int  # shard files and side files, as on disk
    groups: list[GroupReport] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)  # key, reason[, quantized]
    estimates: list[Estimate] = field(default_factory=list)
    quantized: list[str] = field(default_factory=list)  # a line per format already quantized
    nothing_to_compress: str | None = None  # why, when no group can be compressed

    @property
    def expert_share(self) -> float:
        return self.expert_params / self.total_params if self.total_params else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["expert_share"] = self.expert_share
        return d


def inspect_model(model: str | Path, *, base: str | Path = "mean",
                  threshold: float = DEFAULT_UPCYCLED_COS, use_shared: bool = True,
                  reporter: Reporter | None = None, revision: str | None = None,
                  token: str | bool | None = None,
                  cache_dir: str | Path | None = None) -> InspectReport:
    """Measure every expert group of ``model`` against its base (mean, or a dense checkpoint).
    Hub repo ids take ``revision`` (of ``model``), ``token`` and ``cache_dir``."""
    if not 0.0 <= threshold <= 1.0:
        raise UsageError(f"threshold must be in [0, 1], got {threshold}", param="threshold")
    reporter = reporter or Silent()
    hub = HubOptions(revision, token, cache_dir)
    ckpt = open_checkpoint(model, hub)
    found = find_groups({n: e for n, (_, e) in ckpt.where.items()}, ckpt.config)
    matcher = (DenseMatcher(open_checkpoint(base, hub.without_revision()), threshold)
               if str(base) != "mean" else None)
    report = InspectReport(str(model), threshold, sum(e.numel for _, e in ckpt.where.values()),
                           0, 0, ckpt.tensor_bytes, ckpt.side_bytes, ckpt.disk_bytes,
                           skipped=[s.to_dict() for s in found.skipped],
                           quantized=quantized_summary(found.skipped),
                           nothing_to_compress=nothing_to_compress(found))
    final: dict[str, ExpertGroup | None] = {}
    reporter.start("inspect", sum(g.nbytes for g in found.groups), len(found.groups))
    try:
        with ckpt.open() as files, compute_threads():
            for g in found.groups:
                loaded = load_group(files, ckpt, g, found.shared.get(g.key, ()),
                                    threshold=threshold, matcher=matcher, use_shared=use_shared)
                g = loaded.group
                flat = loaded.flat()
                n = len(g.members)
                pair, sampled = pairwise_cosines(flat)
                off_diag = pair[~torch.eye(n, dtype=torch.bool)] if n > 1 else pair.reshape(-1)
                cos_to_base, rel = loaded.stats()
                upcycled = loaded.min_cos >= threshold
                final[g.key] = g if upcycled else None
                report.expert_params += g.elements
                report.upcycled_params += g.elements if upcycled else 0
                report.groups.append(GroupReport(
                    key=g.key, tensors=[m.label for m in g.members], num_experts=n,
                    layer=layer_of(g.members[0].tensor), shape=list(g.shape), dtype=g.dtype,
                    nbytes=g.nbytes, base=loaded.base_label,
                    cos_to_base=cos_to_base.tolist(), cos_to_base_min=loaded.min_cos,
                    cos_between=pair.tolist(), cos_between_min=float(off_diag.min()),
                    cos_between_sampled=sampled, rel_delta_norm=rel.tolist(),
                    upcycled=upcycled,
                    shared=[{"tensor": c.member.label, "cos": c.cos, "joins": c.joined}
                            for c in loaded.shared]))
                reporter.advance(g.nbytes, 1)
    finally:
        if matcher is not None:
            matcher.close()
    original = ckpt.disk_bytes
    for spec in SETTINGS:
        size = planned_size(ckpt, found, final, spec)
        report.estimates.append(Estimate(spec.label, size, size / original if original else 0))
    reporter.finish()
    return report
