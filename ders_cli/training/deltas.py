"""The per-expert increments of DeRS upcycling, as trainable PyTorch modules.

Each maps an input ``x [T, in]`` to ``x @ Δ.T [T, out]`` for one expert's delta Δ ``[out, in]``,
and knows how the archive stores it, so a trained model's deltas are an archive's codec arrays
as they are:

- ``SparseDelta`` (DeRS-SM): a fixed index vector I of k unique flat positions (row-major) and a
  trainable value vector V, zero at init; Δ = scatter(V at I). I comes from the archive's mask
  generator and a 64-bit seed, so the ``sparse`` codec regenerates it from the seed alone.
- ``LowRankDelta`` (DeRS-LM): Δ = A @ B with A ``[out, r]`` random and B ``[r, in]`` zero at init:
  the ``lowrank`` codec's ``a`` and ``b`` rows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..codecs.mask import mask_positions


class SparseDelta(nn.Module):
    def __init__(self, out_features: int, in_features: int, keep: int, seed: int,
                 dtype: torch.dtype = torch.float32,
                 values: torch.Tensor | None = None) -> None:
        super().__init__()
        self.shape = (out_features, in_features)
        self.seed = seed
        n = out_features * in_features
        index = torch.from_numpy(mask_positions(seed, n, keep).astype("int64"))
        # Derived from the seed, so never saved: a state dict holds only V.
        self.register_buffer("index", index, persistent=False)
        self.register_buffer("rows", index // in_features, persistent=False)
        self.register_buffer("cols", index % in_features, persistent=False)
        v = torch.zeros(keep, dtype=dtype) if values is None else values.to(dtype)
        self.values = nn.Parameter(v)

    @property
    def keep(self) -> int:
        return self.values.numel()

    def dense(self) -> torch.Tensor:
        n = self.shape[0] * self.shape[1]
        flat = self.values.new_zeros(n).scatter(0, self.index, self.values)
        return flat.view(self.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] * self.keep < self.shape[0] * self.shape[1]:
            # Few tokens or a very sparse delta: touch only the kept positions.
            contrib = x[:, self.cols] * self.values
            return x.new_zeros(x.shape[0], self.shape[0]).index_add(1, self.rows, contrib)
        return F.linear(x, self.dense())


class LowRankDelta(nn.Module):
    def __init__(self, a: torch.Tensor, b: torch.Tensor) -> None:
        super().__init__()
        self.a = nn.Parameter(a)
        self.b = nn.Parameter(b)

    @classmethod
    def init(cls, out_features: int, in_features: int, rank: int, generator: torch.Generator,
             dtype: torch.dtype = torch.float32) -> LowRankDelta:
        # A ~ N(0, 1/r): A A^T is about the identity, so a step on B moves Δ as a step on a
        # full delta would, restricted to A's column space.
        a = torch.randn(out_features, rank, generator=generator, dtype=torch.float32)
        a = (a / rank**0.5).to(dtype)
        return cls(a, torch.zeros(rank, in_features, dtype=dtype))

    @property
    def rank(self) -> int:
        return self.a.shape[1]

    def dense(self) -> torch.Tensor:
        return self.a @ self.b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.b), self.a)
