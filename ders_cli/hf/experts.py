"""The DeRS expert modules that drop into transformers' MoE blocks: one module for training and
for inference from an archive.

``DersExperts`` replaces a block's ``experts`` (same call: hidden states, top-k indices, top-k
weights). Per projection (gate, up, down) a ``DersProjection`` holds one shared weight W_base
and every member's delta in the form the archive stores it: a codec's arrays, one row per
member (``ders_cli.codecs``). Expert e computes ``x @ (W_base + Δ_e).T`` one of two ways:

- factored: ``x @ W_base.T + x @ Δ_e.T`` (the codec's ``apply``), never forming W_e. The base
  products are shared by all experts: gate and up projections of the base once per token, the
  down projection once on the routing-weighted sum of the experts' activations (it is linear),
  so a MoE layer costs one dense FFN plus the deltas. What training computes (the deltas are
  parameters and the codecs' ``apply`` is differentiable), and what low-rank deltas are fastest
  with at inference.
- synthesize: W_e = cast(W_base + δ_e), the bytes ``ders expand`` writes, formed when the router
  selects e (and kept in an ``ExpertCache`` within its budget), used in transformers' own expert
  computation (its default grouped one, or its eager loop when the model's
  ``experts_implementation`` is "eager"): the logits of the expanded model loaded the same way,
  bit for bit.

A projection is *trainable* (DeRS training: W_base and the deltas are Parameters, which follow
``model.to(dtype)`` as any parameter) or *stored* (from an archive: buffers that keep their
dtype and bits, so that ``model.to(dtype)`` changes the compute dtype, which follows the
input, and never the experts).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..codecs import LowRankCodec, SparseCodec, get_codec
from ..dtypes import DTYPE_NAMES
from ..groups import synthesize

MODES = ("auto", "synthesize", "factored")


class DersProjection(nn.Module):
    """One projection of an expert group: ``base [out, in]`` and every member's delta as a
    codec stores it (``arrays``: one row per member; ``params``: the codec's parameters)."""

    def __init__(self, base: torch.Tensor, codec: str, params: dict,
                 arrays: dict[str, torch.Tensor], members: int, *, trainable: bool) -> None:
        super().__init__()
        if base.dim() != 2:
            raise ValueError(f"a projection's base is [out, in], got {list(base.shape)}")
        self.codec = codec
        self.params = params
        self.members = members
        self.trainable = trainable
        self.shape = tuple(base.shape)
        self.suffixes = list(arrays)
        if trainable:
            self.base = nn.Parameter(base)
            for k, v in arrays.items():
                self.register_parameter(f"arr_{k}", nn.Parameter(v))
        else:
            self.register_buffer("base", base)
            for k, v in arrays.items():
                self.register_buffer(f"arr_{k}", v)
        self._cache: dict = {}  # what the codec derives from its parameters (positions)

    # --- DeRS training's two parameterisations ---------------------------------------------

    @classmethod
    def sparse(cls, base: torch.Tensor, keep: int, seeds: list[int], drop: float | None = None,
               values: torch.Tensor | None = None) -> DersProjection:
        """DeRS-SM: per member a fixed set of ``keep`` positions (the archive's mask generator
        from the member's 64-bit seed) and a trainable value vector there, zero at init."""
        params = SparseCodec.trained_params(keep, base.numel(), seeds, drop)
        if values is None:
            values = torch.zeros(len(seeds), keep, dtype=base.dtype, device=base.device)
        return cls(base, SparseCodec.name, params, {"values": values.to(base.dtype)},
                   len(seeds), trainable=True)

    @classmethod
    def lowrank(cls, base: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> DersProjection:
        """DeRS-LM: per member Δ = A @ B, A ``[out, r]`` and B ``[r, in]`` (stacked)."""
        params = LowRankCodec.params(a.shape[-1], base.shape[0])
        return cls(base, LowRankCodec.name, params, {"a": a, "b": b}, a.shape[0],
                   trainable=True)

    @classmethod
    def lowrank_init(cls, base: torch.Tensor, rank: int, members: int,
                     generator: torch.Generator) -> DersProjection:
        """DeRS-LM at init: A ~ N(0, 1/r), so that A Aᵀ is about the identity and a step on B
        moves Δ as a step on a full delta would (restricted to A's column space); B = 0."""
        out_f, in_f = base.shape
        a = torch.stack([torch.randn(out_f, rank, generator=generator, dtype=torch.float32)
                         for _ in range(members)]) / rank**0.5
        b = torch.zeros(members, rank, in_f, dtype=base.dtype, device=base.device)
        return cls.lowrank(base, a.to(base.dtype).to(base.device), b)

    # --- what it holds -----------------------------------------------------------------------

    def _apply(self, fn: Any, recurse: bool = True) -> DersProjection:
        if self.trainable:
            return super()._apply(fn, recurse)
        # Stored tensors follow the model to another device but keep their dtype: their bits
        # are what synthesis decodes (``.float()`` on a lossless base breaks the residuals taken
        # against its bf16 bits; ``.half()`` overflows).
        stored = dict(self._buffers)
        self._buffers.clear()
        try:
            super()._apply(fn, recurse)
        finally:
            for k, t in stored.items():
                device = fn(torch.empty(0, dtype=t.dtype, device=t.device)).device
                self._buffers[k] = t if device == t.device else t.to(device)
        return self

    @property
    def dtype_name(self) -> str:
        """The group's dtype: the base's (the stored one, or the trained parameters')."""
        return DTYPE_NAMES[self.base.dtype]

    def arrays(self) -> dict[str, torch.Tensor]:
        return {k: getattr(self, f"arr_{k}") for k in self.suffixes}

    def rows(self, member: int) -> dict[str, torch.Tensor]:
        return get_codec(self.codec).member_rows(self.arrays(), self.params, member)

    def encoding(self) -> tuple[str, dict, dict[str, torch.Tensor]]:
        """(codec name, params, arrays) for an archive writer, on the CPU; trained float
        arrays in the base's dtype (the group's)."""
        arrays = {}
        for k, v in self.arrays().items():
            v = v.detach().cpu()
            arrays[k] = v.to(self.base.dtype) if self.trainable and v.is_floating_point() else v
        return self.codec, self.params, arrays

    # --- computing -----------------------------------------------------------------------------

    def apply_delta(self, x: torch.Tensor, member: int) -> torch.Tensor:
        """x @ Δ_member.T without building W_member (the codec's own way)."""
        return get_codec(self.codec).apply(x, self.rows(member), self.params, member,
                                           self.base, self.dtype_name, self._cache)

    def delta(self, member: int) -> torch.Tensor:
        """Δ_member, flattened, in the compute dtype: zero where the codec leaves the base."""
        return get_codec(self.codec).delta(self.rows(member), self.params, member, self.base,
                                           self.dtype_name, self._cache)

    def forward(self, x: torch.Tensor, member: int) -> torch.Tensor:
        return F.linear(x, self.base.to(x.dtype)) + self.apply_delta(x, member)

    def _synthesis_inputs(self) -> tuple[torch.Tensor, dict, dict[str, torch.Tensor]]:
        """(base, params, arrays) as an archive of this module holds them: a trainable
        module's on the CPU, in the group's dtype (what ``save_archive`` writes)."""
        if not self.trainable:
            return self.base, self.params, self.arrays()
        _, params, arrays = self.encoding()
        return self.base.detach().cpu(), params, arrays

    @torch.no_grad()
    def weight(self, member: int) -> torch.Tensor:
        """W_member in the group's dtype: the bytes ``expand`` writes of an archive of this
        module (the archive's own synthesis)."""
        return self._weight(member, *self._synthesis_inputs())

    def _weight(self, member: int, base: torch.Tensor, params: dict,
                arrays: dict[str, torch.Tensor]) -> torch.Tensor:
        rows = get_codec(self.codec).member_rows(arrays, params, member)
        return synthesize(base, self.codec, params, rows, member,
                          DTYPE_NAMES[base.dtype]).view(self.shape)

    @torch.no_grad()
    def synthesized(self) -> list[torch.Tensor]:
        """Every member's weight as the archive synthesizes it, on the CPU."""
        inputs = self._synthesis_inputs()
        return [self._weight(m, *inputs).cpu() for m in range(self.members)]


class ExpertCache:
    """Synthesized experts of a whole model, kept within a byte budget: the least recently used
    go first. Synthesizing an expert costs 20 to 60 times the matrix-vector products it serves
    in a decoding step (examples/bench_archive_inference.py), so a cache is what makes
    generation from compress/quantize archives as fast as from the expanded model."""

    def __init__(self, budget: int | None = None) -> None:
        self.budget = budget  # bytes; None: no limit
        self.nbytes = 0
        self._items: OrderedDict[tuple[int, int], tuple[torch.Tensor, ...]] = OrderedDict()

    def get(self, key: tuple[int, int], like: torch.Tensor) -> tuple[torch.Tensor, ...] | None:
        """The entry for ``key`` if it is in ``like``'s dtype and on its device."""
        hit = self._items.get(key)
        if hit is None:
            return None
        if hit[0].dtype != like.dtype or hit[0].device != like.device:
            self.drop(key)
            return None
        self._items.move_to_end(key)
        return hit

    def put(self, key: tuple[int, int], value: tuple[torch.Tensor, ...]) -> None:
        size = sum(t.numel() * t.element_size() for t in value)
        if self.budget is not None and size > self.budget:
            return
        self.drop(key)
        self._items[key] = value
        self.nbytes += size
        while self.budget is not None and self.nbytes > self.budget:
            self.drop(next(iter(self._items)))

    def drop(self, key: tuple[int, int]) -> None:
        old = self._items.pop(key, None)
        if old is not None:
            self.nbytes -= sum(t.numel() * t.element_size() for t in old)

    def drop_owner(self, owner: int) -> None:
        for key in [k for k in self._items if k[0] == owner]:
            self.drop(key)


class DersExperts(nn.Module):
    """The routed experts of one MoE block: gate, up and down projections of N (+1) members.

    ``mode``: "factored", "synthesize" or "auto" (factored where every projection's deltas are
    low-rank or trainable, synthesized elsewhere); see the module docstring.
    """

    def __init__(self, gate: DersProjection, up: DersProjection, down: DersProjection,
                 num_experts: int, act_fn: Callable[[torch.Tensor], torch.Tensor],
                 vanilla_cls: type[nn.Module] | None, mode: str = "auto",
                 cache: ExpertCache | None = None, config: Any = None) -> None:
        super().__init__()
        self.gate, self.up, self.down = gate, up, down
        self.num_experts = num_experts
        self.act_fn = act_fn
        self.vanilla_cls = vanilla_cls  # the transformers module this one stands in for
        self.mode = self.resolve(mode)
        self.cache = cache if cache is not None else ExpertCache(0)
        # The model's config, read at each call as transformers' experts read it: synthesized
        # experts follow its ``_experts_implementation`` ("eager": transformers' eager loop;
        # anything else: its grouped computation), so that the logits equal the expanded
        # model's loaded the same way.
        self.config = config

    @property
    def projections(self) -> dict[str, DersProjection]:
        return {"gate": self.gate, "up": self.up, "down": self.down}

    def resolve(self, mode: str) -> str:
        """``mode`` with "auto" decided: factored for trainable or low-rank deltas (two thin
        products cost less than synthesizing), synthesized elsewhere."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        projections = self.projections.values()
        if any(p.trainable for p in projections):
            if mode == "synthesize":
                raise ValueError("trainable experts compute factored: synthesis has no gradient")
            return "factored"
        if mode != "auto":
            return mode
        low_rank = all(p.codec == LowRankCodec.name for p in projections)
        return "factored" if low_rank else "synthesize"

    def _apply(self, fn: Any, recurse: bool = True) -> DersExperts:
        self.cache.drop_owner(id(self))  # on the old device, in the old compute dtype
        return super()._apply(fn, recurse)

    def expert_weights(self, e: int, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(gate_up [2I, H], down [H, I]) of expert e in ``x``'s dtype: synthesized in the
        group's dtype, then cast, as transformers casts a checkpoint loaded in another dtype;
        or from the cache."""
        key = (id(self), e)
        cached = self.cache.get(key, x)
        if cached is not None:
            return cached
        w = (torch.cat([self.gate.weight(e), self.up.weight(e)]).to(x.dtype),
             self.down.weight(e).to(x.dtype))
        self.cache.put(key, w)
        return w

    def member_forward(self, x: torch.Tensor, m: int) -> torch.Tensor:
        """One member (the shared FFN of a group is member N) on all of ``x``."""
        if self.mode == "synthesize":
            gate_up, down = self.expert_weights(m, x)
            gate, up = F.linear(x, gate_up).chunk(2, dim=-1)
            return F.linear(self.act_fn(gate) * up, down)
        h = self.act_fn(self.gate(x, m)) * self.up(x, m)
        return self.down(h, m)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        if self.mode == "factored":
            return self._factored(hidden_states, top_k_index, top_k_weights)
        if getattr(self.config, "_experts_implementation", None) == "eager":
            return self._eager(hidden_states, top_k_index, top_k_weights)
        return self._grouped(hidden_states, top_k_index, top_k_weights)

    def _eager(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
               top_k_weights: torch.Tensor) -> torch.Tensor:
        # transformers' eager loop, step for step, so that the logits match bit for bit.
        final = torch.zeros_like(hidden_states)
        with torch.no_grad():
            mask = F.one_hot(top_k_index, num_classes=self.num_experts + 1).permute(2, 1, 0)
            hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
        for e in hit:
            e = int(e[0])
            if e == self.num_experts:
                continue
            pos, token_idx = torch.where(mask[e])
            gate_up, down = self.expert_weights(e, hidden_states)
            gate, up = F.linear(hidden_states[token_idx], gate_up).chunk(2, dim=-1)
            out = F.linear(self.act_fn(gate) * up, down)
            out = out * top_k_weights[token_idx, pos, None]
            final.index_add_(0, token_idx, out.to(final.dtype))
        return final

    def _grouped(self, x: torch.Tensor, top_k_index: torch.Tensor,
                 top_k_weights: torch.Tensor) -> torch.Tensor:
        """transformers' grouped computation (``grouped_mm_experts_forward``): the (token,
        expert) pairs sorted by expert, each expert's rows in one product, the routing-weighted
        rows summed per token by a reshape (in float32), no ``index_add_`` (which costs more
        than the products in a decoding step on a CPU)."""
        tokens, k = top_k_index.shape
        order = top_k_index.reshape(-1)
        ids, perm = torch.sort(order)
        rows = x[perm // k]
        counts = torch.bincount(ids, minlength=self.num_experts).tolist()  # one sync
        outs, start = [], 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            end = start + n
            if e >= self.num_experts:  # transformers' expert-parallel sentinel: no expert
                outs.append(x.new_zeros(n, x.shape[-1]))
            else:
                gate_up, down = self.expert_weights(e, x)
                gate, up = F.linear(rows[start:end], gate_up).chunk(2, dim=-1)
                outs.append(F.linear(self.act_fn(gate) * up, down))
            start = end
        out = outs[0] if len(outs) == 1 else torch.cat(outs)
        weighted = out * top_k_weights.reshape(-1)[perm].unsqueeze(-1)
        inverse = torch.empty_like(perm)
        inverse[perm] = torch.arange(perm.numel(), device=perm.device)
        return weighted[inverse].view(tokens, k, -1).sum(dim=1).to(x.dtype)

    def _factored(self, x: torch.Tensor, top_k_index: torch.Tensor,
                  top_k_weights: torch.Tensor) -> torch.Tensor:
        """x W_base^T once per token and projection, plus each expert's delta products on its
        rows; the (token, expert) pairs grouped by expert as in ``_grouped`` (no index_add_)."""
        tokens, k = top_k_index.shape
        ids, perm = torch.sort(top_k_index.reshape(-1))
        src = perm // k
        rows = x[src]
        weights = top_k_weights.reshape(-1)[perm].unsqueeze(-1)
        g_base = F.linear(x, self.gate.base.to(x.dtype))[src]
        u_base = F.linear(x, self.up.base.to(x.dtype))[src]
        counts = torch.bincount(ids, minlength=self.num_experts).tolist()  # one sync
        hs, ys, start = [], [], 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            end = start + n
            if e >= self.num_experts:  # transformers' expert-parallel sentinel: no expert
                hs.append(g_base.new_zeros(n, g_base.shape[1]))
                ys.append(x.new_zeros(n, x.shape[1]))
            else:
                xe = rows[start:end]
                g = g_base[start:end] + self.gate.apply_delta(xe, e)
                u = u_base[start:end] + self.up.apply_delta(xe, e)
                h = (self.act_fn(g) * u * weights[start:end]).to(x.dtype)
                hs.append(h)
                ys.append(self.down.apply_delta(h, e).to(x.dtype))
            start = end
        inverse = torch.empty_like(perm)
        inverse[perm] = torch.arange(perm.numel(), device=perm.device)
        h_sum = torch.cat(hs)[inverse].view(tokens, k, -1).sum(dim=1).to(x.dtype)
        y_delta = torch.cat(ys)[inverse].view(tokens, k, -1).sum(dim=1).to(x.dtype)
        # The down projection is linear: its base product once, on the weighted sum.
        return F.linear(h_sum, self.down.base.to(x.dtype)) + y_delta


class DersSharedExpert(nn.Module):
    """A block's always-on FFN stored as the last member of its experts' groups (extended
    DeRS): member N of every projection."""

    def __init__(self, experts: DersExperts, vanilla_cls: type[nn.Module] | None) -> None:
        super().__init__()
        self._experts = [experts]  # registered once, under the experts
        self.vanilla_cls = vanilla_cls

    @property
    def member(self) -> int:
        return self._experts[0].num_experts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._experts[0].member_forward(x, self.member)


def configure(model: nn.Module, *, mode: str = "auto", cache_gb: float | None = None) -> None:
    """Change how a model's stored experts compute (``mode``; ``cache_gb``: the budget of
    experts kept once synthesized, None no limit, 0 none), e.g. after ``from_pretrained``."""
    if cache_gb is not None and not cache_gb >= 0:
        raise ValueError(f"cache_gb must be >= 0, got {cache_gb}")
    cache = ExpertCache(None if cache_gb is None else int(cache_gb * 1e9))
    for module in model.modules():
        if isinstance(module, DersExperts):
            module.mode = module.resolve(mode)
            module.cache = cache

