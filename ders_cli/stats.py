"""Similarity figures of an expert group: the numbers that say whether it was upcycled.

Dot products are accumulated in float64 so that cosines near 1 (0.9999 and above, typical of
upcycled experts) keep their last digits.
"""

from __future__ import annotations

import torch

from .constants import PAIRWISE_EXACT_BUDGET, PAIRWISE_SAMPLE

_CHUNK = 1 << 22


def mean_base(members: torch.Tensor) -> torch.Tensor:
    """Element-wise mean of ``[N, ...]`` members, summed in expert order, in their own dtype."""
    cd = torch.float64 if members.dtype == torch.float64 else torch.float32
    acc = members[0].to(cd, copy=True)  # summed in place: never alias the caller's members
    for m in members[1:]:
        acc += m.to(cd)
    return (acc / members.shape[0]).to(members.dtype)


def _gram(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x @ y.T for [N, n] and [M, n], accumulated in float64 over column chunks."""
    out = torch.zeros(x.shape[0], y.shape[0], dtype=torch.float64)
    for start in range(0, x.shape[1], _CHUNK):
        xs = x[:, start : start + _CHUNK].double()
        ys = xs if y is x else y[:, start : start + _CHUNK].double()
        out += xs @ ys.T
    return out


def cosines_to(x: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """Cosine of each row of ``[N, n]`` to ``[n]``."""
    dots = _gram(x, base.reshape(1, -1))[:, 0]
    norms = _row_norms(x)
    bn = _row_norms(base.reshape(1, -1))[0]
    return dots / (norms * bn).clamp_min(1e-300)


def _row_norms(x: torch.Tensor) -> torch.Tensor:
    sq = torch.zeros(x.shape[0], dtype=torch.float64)
    for start in range(0, x.shape[1], _CHUNK):
        xs = x[:, start : start + _CHUNK].double()
        sq += (xs * xs).sum(dim=1)
    return sq.sqrt()


def relative_norms(delta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """||delta_i|| / ||x_i|| for each row."""
    return _row_norms(delta) / _row_norms(x).clamp_min(1e-300)


def pairwise_cosines(x: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """Cosines between all rows, and whether they were computed on a sample of columns.

    Exact while N*N*n stays within budget; beyond it, on a fixed, evenly strided subset of
    columns (deterministic, so reports are reproducible).
    """
    n_rows, n = x.shape
    sampled = n_rows * n_rows * n > PAIRWISE_EXACT_BUDGET
    if sampled:
        step = max(1, n // PAIRWISE_SAMPLE)
        x = x[:, ::step]
    g = _gram(x, x)
    d = g.diagonal().sqrt().clamp_min(1e-300)
    return g / d[:, None] / d[None, :], sampled
