"""DeRS expert modules that drop into transformers' MoE blocks.

``DersExperts`` replaces a block's ``experts`` (same call: hidden states, top-k indices, top-k
weights) and holds, per projection, one trainable shared weight W_base and one delta per expert:
expert e computes ``x @ (W_base + Δ_e).T`` as ``x @ W_base.T + Δ_e(x)``, never materialising W_e.
``DersSharedExpert`` replaces a block's always-on FFN when it belongs to the same group
(extended DeRS): it is member N of every projection.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..codecs import LowRankCodec, SparseCodec
from ..dtypes import DTYPE_NAMES
from ..groups import synthesize
from .deltas import LowRankDelta, SparseDelta


class DersProjection(nn.Module):
    """One projection of a group: a shared ``base [out, in]`` and one delta per member."""

    def __init__(self, base: torch.Tensor, deltas: list[nn.Module], drop: float | None = None
                 ) -> None:
        super().__init__()
        self.base = nn.Parameter(base)
        self.deltas = nn.ModuleList(deltas)
        self.drop = drop  # DeRS-SM's rate p, recorded in the archive (informative)
        kinds = {type(d) for d in deltas}
        if len(kinds) != 1 or not kinds <= {SparseDelta, LowRankDelta}:
            raise ValueError("a projection's deltas must all be sparse or all low-rank")

    def forward(self, x: torch.Tensor, member: int) -> torch.Tensor:
        return F.linear(x, self.base) + self.deltas[member](x)

    @property
    def members(self) -> int:
        return len(self.deltas)

    def encoding(self) -> tuple[str, dict, dict[str, torch.Tensor]]:
        """(codec name, params, arrays) of the archive's codec that stores these deltas."""
        out_f, in_f = self.base.shape
        first = self.deltas[0]
        if isinstance(first, SparseDelta):
            params = SparseCodec.trained_params(first.keep, out_f * in_f,
                                                [d.seed for d in self.deltas], self.drop)
            values = torch.stack([d.values.detach() for d in self.deltas]).cpu()
            return SparseCodec.name, params, {"values": values.to(self.base.dtype)}
        params = LowRankCodec.params(first.rank, out_f)
        a = torch.stack([d.a.detach() for d in self.deltas]).cpu().to(self.base.dtype)
        b = torch.stack([d.b.detach() for d in self.deltas]).cpu().to(self.base.dtype)
        return LowRankCodec.name, params, {"a": a, "b": b}

    @torch.no_grad()
    def synthesized(self) -> list[torch.Tensor]:
        """Every member's weight exactly as the archive synthesizes it (bit for bit)."""
        codec, params, arrays = self.encoding()
        base = self.base.detach().cpu()
        return [synthesize(base, codec, params, {k: v[m] for k, v in arrays.items()}, m,
                           DTYPE_NAMES[base.dtype]).view(base.shape)
                for m in range(self.members)]


class DersExperts(nn.Module):
    """The routed experts of one MoE block: gate, up and down projections of N (+1) members."""

    def __init__(self, gate: DersProjection, up: DersProjection, down: DersProjection,
                 num_experts: int, act_fn: Callable[[torch.Tensor], torch.Tensor],
                 vanilla_cls: type[nn.Module]) -> None:
        super().__init__()
        self.gate, self.up, self.down = gate, up, down
        self.num_experts = num_experts
        self.act_fn = act_fn
        self.vanilla_cls = vanilla_cls  # the transformers module this one stands in for

    @property
    def projections(self) -> dict[str, DersProjection]:
        return {"gate": self.gate, "up": self.up, "down": self.down}

    def member_forward(self, x: torch.Tensor, member: int) -> torch.Tensor:
        h = self.act_fn(self.gate(x, member)) * self.up(x, member)
        return self.down(h, member)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        # transformers' eager expert loop, with each expert computed as base plus delta.
        final = torch.zeros_like(hidden_states)
        for e in range(self.num_experts):
            token_idx, pos = torch.where(top_k_index == e)
            if token_idx.numel() == 0:
                continue
            out = self.member_forward(hidden_states[token_idx], e)
            out = out * top_k_weights[token_idx, pos, None]
            final.index_add_(0, token_idx, out.to(final.dtype))
        return final


class DersSharedExpert(nn.Module):
    """A block's always-on FFN stored as the last member of its experts' groups."""

    def __init__(self, experts: DersExperts, vanilla_cls: type[nn.Module]) -> None:
        super().__init__()
        # A plain list keeps the experts' parameters registered once, under the experts.
        self._experts = [experts]
        self.vanilla_cls = vanilla_cls

    @property
    def member(self) -> int:
        return self._experts[0].num_experts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._experts[0].member_forward(x, self.member)
