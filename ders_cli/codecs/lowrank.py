"""DeRS low-rank deltas: each member's delta, viewed as a ``rows x cols`` matrix, is ``A @ B``
with ``A`` of shape ``[rows, r]`` and ``B`` of shape ``[r, cols]``.

This is what a DeRS-LM model trains (A random, B zero at init), so its deltas are stored as
they are; ``encode`` also gives the best rank-r approximation of any delta (truncated SVD).

Synthesis must give the same bits everywhere, and a matmul does not (BLAS blocking, FMA). So
the product is a sum of r outer products, each product and each sum rounded in the compute
dtype, in order j = 0 .. r-1, starting from +0 (docs/FORMAT.md, "lowrank").
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from ..constants import CODEC_LOWRANK
from ..dtypes import TORCH_DTYPES, compute_dtype
from ..errors import UsageError
from .base import ArraySpec, Calibration, CodecSpec, DeltaCodec, GroupShape, Option


def outer_sum(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` as the specified sum of outer products, in the dtype of ``a`` and ``b``."""
    out = torch.zeros((a.shape[0], b.shape[1]), dtype=a.dtype, device=a.device)
    for j in range(a.shape[1]):
        # Two kernels, never one fused multiply-add: the product is rounded before the sum.
        out += a[:, j, None] * b[None, j]
    return out


def factorize(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The best rank-``rank`` approximation of a 2-D delta, as (A = U S, B = V^T), in f64.
    Each singular pair's sign is fixed (the largest |entry| of U's column positive): the SVD
    leaves it to the LAPACK build, the archive's bytes should not."""
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    sign = torch.sign(u.gather(0, u.abs().argmax(0, keepdim=True)))
    sign[sign == 0] = 1
    u, vh = u * sign, vh * sign.reshape(-1, 1)
    r = min(rank, s.numel())
    a = torch.zeros((delta.shape[0], rank), dtype=torch.float64)
    b = torch.zeros((rank, delta.shape[1]), dtype=torch.float64)
    a[:, :r] = u[:, :r] * s[:r]
    b[:r] = vh[:r]
    return a, b


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


class LowRankCodec(DeltaCodec):
    """Parameters: ``rank`` (r >= 1) and ``rows``, the first dimension of the 2-D view of a
    member (``numel / rows`` is the second)."""

    name = CODEC_LOWRANK
    factored = True  # two thin products per token: far cheaper than synthesizing W
    options = (Option("rank", int, None, "Rank of each delta (a truncated SVD).",
                      required=True),)

    @classmethod
    def check(cls, spec: LowRankSpec) -> None:  # type: ignore[override]
        if not _is_int(spec.rank) or spec.rank < 1:
            raise UsageError(f"rank must be a positive integer, got {spec.rank!r}", param="rank")

    @classmethod
    def label(cls, params: Mapping[str, Any]) -> str:
        return f"rank {params.get('rank')}"

    @classmethod
    def params(cls, rank: int, rows: int) -> dict:
        return {"rank": rank, "rows": rows}

    @classmethod
    def validate(cls, params: dict, members: int, numel: int) -> None:
        rank, rows = params.get("rank"), params.get("rows")
        if not _is_int(rank) or rank < 1:
            raise ValueError(f"lowrank rank must be a positive integer, got {rank!r}")
        if not _is_int(rows) or rows < 1 or numel % rows:
            raise ValueError(f"lowrank rows must be a positive divisor of {numel}, got {rows!r}")

    @classmethod
    def arrays(cls, params: dict, members: int, numel: int, dtype: str) -> dict[str, ArraySpec]:
        rank, rows = params["rank"], params["rows"]
        return {"a": (dtype, (members, rows, rank)), "b": (dtype, (members, rank, numel // rows))}

    @classmethod
    def encode_member(cls, delta: torch.Tensor, dtype: str, params: dict, member: int,
                      calib: Calibration | None = None
                      ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        a, b = factorize(delta.reshape(params["rows"], -1), params["rank"])
        out_dtype = TORCH_DTYPES[dtype]
        row = {"a": a.to(out_dtype), "b": b.to(out_dtype)}
        cd = compute_dtype(dtype)
        return row, outer_sum(row["a"].to(cd), row["b"].to(cd)).reshape(-1)

    @classmethod
    def decode(cls, rows: dict[str, torch.Tensor], params: dict, member: int, numel: int,
               dtype: str) -> torch.Tensor:
        cd = compute_dtype(dtype)
        return outer_sum(rows["a"].to(cd), rows["b"].to(cd)).reshape(-1)

    @classmethod
    def delta(cls, rows: dict[str, torch.Tensor], params: dict, member: int, base: torch.Tensor,
              dtype: str, cache: dict | None = None) -> torch.Tensor:
        cd = compute_dtype(dtype)
        return outer_sum(rows["a"].to(cd), rows["b"].to(cd)).reshape(-1)

    @classmethod
    def apply(cls, x: torch.Tensor, rows: dict[str, torch.Tensor], params: dict, member: int,
              base: torch.Tensor, dtype: str, cache: dict | None = None) -> torch.Tensor:
        # Two thin products, never the [out, in] delta.
        return F.linear(F.linear(x, rows["b"].to(x.dtype)), rows["a"].to(x.dtype))


@dataclass(frozen=True)
class LowRankSpec(CodecSpec):
    """Each delta as its best rank-``rank`` approximation (truncated SVD) of the member's
    ``[shape[0], numel / shape[0]]`` view. DeRS-LM training stores its factors directly."""

    codec: ClassVar[str] = CODEC_LOWRANK
    rank: int

    def settings(self) -> dict:
        return {"rank": self.rank}

    def params(self, group: GroupShape) -> dict:
        return LowRankCodec.params(self.rank, group.shape[0])


LowRankCodec.spec = LowRankSpec
