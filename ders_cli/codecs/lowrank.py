"""DeRS low-rank deltas: each member's delta, viewed as a ``rows x cols`` matrix, is ``A @ B``
with ``A`` of shape ``[rows, r]`` and ``B`` of shape ``[r, cols]``.

This is what a DeRS-LM model trains (A random, B zero at init), so its deltas are stored as
they are; ``encode`` also gives the best rank-r approximation of any delta (truncated SVD).

Synthesis must give the same bits everywhere, and a matmul does not (BLAS blocking, FMA). So
the product is a sum of r outer products, each product and each sum rounded in the compute
dtype, in order j = 0 .. r-1, starting from +0 (docs/FORMAT.md, "lowrank").
"""

from __future__ import annotations

import torch

from ..constants import CODEC_LOWRANK
from ..safetensors_io import TORCH_DTYPES
from .base import ArraySpec, DeltaCodec, compute_dtype


def outer_sum(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` as the specified sum of outer products, in the dtype of ``a`` and ``b``."""
    out = torch.zeros((a.shape[0], b.shape[1]), dtype=a.dtype, device=a.device)
    for j in range(a.shape[1]):
        # Two kernels, never one fused multiply-add: the product is rounded before the sum.
        out += a[:, j, None] * b[None, j]
    return out


def factorize(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The best rank-``rank`` approximation of a 2-D delta, as (A = U S, B = V^T), in f64."""
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
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
    def encode_member(cls, delta: torch.Tensor, dtype: str, params: dict, member: int
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
