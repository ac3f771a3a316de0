"""Similarity figures of an expert group: the numbers that say whether it was upcycled.

Upcycled experts have cosines of 0.9999 and more, so ``1 - cos`` is what carries the
information. Computing ``a.b / (|a||b|)`` loses it to rounding; instead every cosine here comes
from three norms, ``cos = (|a|^2 + |b|^2 - |a-b|^2) / (2|a||b|)``, where ``|a-b|`` is the norm of
a difference computed element-wise, exact where it matters. Norms are float32 reductions
(torch's ``vector_norm``), combined in float64. Their error grows with the size (measured on
Gaussian data: 1.6e-6 relative at 2^18 elements, 8e-5 at 2^22; ``pair_norms`` sums chunks of
2^18 instead), but the cosine's inputs err alike, and it keeps six decimals: on a 2^22-element
upcycled member (delta 2% of the weights) it was 1.7e-7 from the float64 cosine, while the
relative error ``|W - B| / |W|`` was off by 4e-4 of itself (0.020063 for 0.020072).
"""

from __future__ import annotations

import math

import torch

from .constants import PAIRWISE_EXACT_BUDGET, PAIRWISE_SAMPLE
from .lanes import Workers, thread_buffer
from .profile import stage

_CHUNK_ELEMENTS = 1 << 23  # float64 scratch for pairwise products: at most 64 MB


def norm(x: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(x))


# Elements per step of ``pair_norms``: float32 copies of 1 MB stay in cache, where a member's
# worth (16 MB per worker per copy) went to memory and stayed resident between members.
PAIR_CHUNK = 1 << 18


def pair_norms(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype
               ) -> tuple[float, float, float]:
    """|a|, |b| and |b - a| of two tensors of one size (any float dtype), computed in
    ``dtype`` a chunk of ``PAIR_CHUNK`` elements at a time, in this thread's buffers (kept from
    call to call: fresh ones cost more in page faults than the arithmetic): each chunk's norm,
    their squares summed in float64. The same figures on any thread."""
    a, b = a.reshape(-1), b.reshape(-1)
    n = a.numel()
    size = min(n, PAIR_CHUNK)
    scratch = (thread_buffer("pair-a", size, dtype, a.device),
               thread_buffer("pair-b", size, dtype, a.device))
    sa = sb = sd = 0.0
    for start in range(0, n, PAIR_CHUNK):
        stop = min(n, start + PAIR_CHUNK)
        x = scratch[0][: stop - start].copy_(a[start:stop])
        y = scratch[1][: stop - start].copy_(b[start:stop])
        sa += norm(x) ** 2
        sb += norm(y) ** 2
        sd += norm(y.sub_(x)) ** 2
    return math.sqrt(sa), math.sqrt(sb), math.sqrt(sd)


def cos_from_norms(a: float, b: float, diff: float) -> float:
    """The cosine of two vectors from their norms and the norm of their difference."""
    if a == 0.0 or b == 0.0:
        return 0.0
    return max(-1.0, min(1.0, (a * a + b * b - diff * diff) / (2.0 * a * b)))


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine of two tensors of one shape, taken flat."""
    a, b = a.reshape(-1), b.reshape(-1)
    return cos_from_norms(norm(a), norm(b), norm(a - b))


_MEAN_CHUNK = 1 << 18  # elements summed at a time: the accumulators stay in cache


def mean_base(members: torch.Tensor, workers: Workers | None = None) -> torch.Tensor:
    """Element-wise mean of ``[N, ...]`` members, summed in expert order, in their own dtype.

    Summed a chunk of elements at a time (the same additions in the same order, so the same
    bits), which keeps the accumulator in cache: several times faster than whole rows. With
    parallel ``workers``, each sums its own stretch of chunks: the same bits again."""
    with stage("base"):
        flat = members.reshape(members.shape[0], -1)
        n = flat.shape[1]
        out = torch.empty(n, dtype=members.dtype, device=members.device)
        chunks = -(-n // _MEAN_CHUNK)
        if workers is None or not workers.parallel or chunks < 2 or members.device.type != "cpu":
            _mean_into(out, flat, 0, n)
        else:
            per = -(-chunks // workers.count) * _MEAN_CHUNK
            stretches = [(s, min(n, s + per)) for s in range(0, n, per)]
            for _ in workers.map(lambda se: _mean_into(out, flat, *se), stretches):
                pass
        return out.view(members.shape[1:])


def _mean_into(out: torch.Tensor, flat: torch.Tensor, begin: int, end: int) -> None:
    """``out[begin:end]`` = the mean of ``flat``'s rows there, chunk by chunk."""
    cd = torch.float64 if flat.dtype == torch.float64 else torch.float32
    acc = torch.empty(min(end - begin, _MEAN_CHUNK), dtype=cd, device=flat.device)
    row = torch.empty_like(acc)
    for start in range(begin, end, _MEAN_CHUNK):
        stop = min(end, start + _MEAN_CHUNK)
        a, b = acc[: stop - start], row[: stop - start]
        a.copy_(flat[0, start:stop])
        for i in range(1, flat.shape[0]):
            a += b.copy_(flat[i, start:stop])
        out[start:stop] = a.div_(flat.shape[0])


def member_stats(members: torch.Tensor, base: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per member: cosine to ``base`` and relative norm of its delta ``|W_i - B| / |W_i|``."""
    cd = torch.float64 if members.dtype == torch.float64 else torch.float32
    flat = members.reshape(members.shape[0], -1)
    b = base.reshape(-1).to(cd)
    b_norm = norm(b)
    w = torch.empty_like(b)
    cos, rel = [], []
    for row in flat:
        w.copy_(row)
        w_norm = norm(w)
        d_norm = norm(w.sub_(b))
        cos.append(cos_from_norms(w_norm, b_norm, d_norm))
        rel.append(d_norm / w_norm if w_norm else 0.0)
    return torch.tensor(cos, dtype=torch.float64), torch.tensor(rel, dtype=torch.float64)


def pairwise_cosines(x: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """Cosines between all rows of ``[N, n]``, and whether a sample of columns was used.

    Exact (float64 products, accumulated over column chunks) while N*N*n stays within budget;
    beyond it, on a fixed, evenly strided subset of columns (deterministic, so reports are
    reproducible).
    """
    n_rows, n = x.shape
    sampled = n_rows * n_rows * n > PAIRWISE_EXACT_BUDGET
    if sampled:
        x = x[:, :: max(1, n // PAIRWISE_SAMPLE)]
    gram = torch.zeros(n_rows, n_rows, dtype=torch.float64)
    step = max(1, _CHUNK_ELEMENTS // n_rows)
    for start in range(0, x.shape[1], step):
        part = x[:, start : start + step].double()
        gram += part @ part.T
    d = gram.diagonal().sqrt().clamp_min(1e-300)
    return (gram / d[:, None] / d[None, :]).clamp(-1.0, 1.0), sampled
