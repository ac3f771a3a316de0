"""Upcycling a dense Llama/Mistral/Qwen2-style model into a DeRS Mixture-of-Experts.

Every (or every ``every``-th) FFN becomes a MoE block of a vanilla transformers class (Mixtral,
or Qwen2-MoE where dense layers remain or a universal FFN is asked for), whose experts are
DeRS experts: one trainable shared FFN initialised from the dense FFN plus a zero-initialised
delta per expert. With top-k weights normalised to sum to one, the block computes the dense FFN
at init (up to the rounding of that weighted sum).

With ``universal`` the block also has Qwen2-MoE's always-on FFN, gated by sigmoid(g . x) with g
zero at init (a gate of exactly 1/2), as a further member of each group (extended DeRS). Every
copy's down projection then starts at 2/3 W_down so that routed + gated universal output,
(1 + 1/2) * 2/3 * FFN(x), is the dense FFN again, up to the rounding of 2/3 W_down.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..codecs.sparse import keep_count
from ..errors import UsageError
from ..families import ROLES
from ..hf.experts import DersExperts, DersProjection, DersSharedExpert
from ..hf.saving import use_ders_folders
from ..hf.skeleton import assign, empty_model, tie_and_check

MODES = ("sparse", "lowrank", "vanilla")
DENSE_TYPES = ("llama", "mistral", "qwen2")
UNIVERSAL_DOWN_SCALE = 2.0 / 3.0  # see the module docstring


@dataclass(frozen=True)
class UpcycleSpec:
    """How to upcycle: N experts, top-k routing, and the expert parameterisation.

    ``mode``: "sparse" (DeRS-SM, drop rate ``rate``), "lowrank" (DeRS-LM, rank ``rank``) or
    "vanilla" (N full copies, the usual sparse upcycling, for comparison).
    """

    experts: int = 4
    top_k: int = 2
    mode: str = "lowrank"
    rate: float = 0.9999
    rank: int = 4
    every: int = 1
    universal: bool = False
    seed: int = 0
    aux_loss_coef: float = 0.01
    layers: tuple[int, ...] | None = None  # the MoE layers, when not every ``every``-th

    def check(self) -> None:
        if self.mode not in MODES:
            raise UsageError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}",
                             param="mode")
        if self.experts < 2:
            raise UsageError(f"experts must be at least 2, got {self.experts}", param="experts")
        if not 1 <= self.top_k <= self.experts:
            raise UsageError(f"top_k must be in [1, {self.experts}], got {self.top_k}",
                             param="top_k")
        if self.mode == "sparse" and not 0.0 <= self.rate < 1.0:
            raise UsageError(f"rate must be in [0, 1), got {self.rate}", param="rate")
        if self.mode == "lowrank" and self.rank < 1:
            raise UsageError(f"rank must be at least 1, got {self.rank}", param="rank")
        if self.every < 1:
            raise UsageError(f"every must be at least 1, got {self.every}", param="every")
        if not 0 <= self.seed < 2**63:
            raise UsageError(f"seed must be in [0, 2^63), got {self.seed}", param="seed")
        if self.aux_loss_coef < 0:
            raise UsageError(f"the router loss coefficient must be >= 0, got {self.aux_loss_coef}")

    def is_moe_layer(self, layer: int) -> bool:
        if self.layers is not None:
            return layer in self.layers
        return layer % self.every == 0  # as MoE-LLaVA: layers 0, every, 2*every, ...


def delta_seed(seed: int, layer: int, role: str, member: int) -> int:
    """The 64-bit mask seed of one expert's projection: distinct and reproducible."""
    digest = hashlib.sha256(f"ders-upcycle:{seed}:{layer}:{role}:{member}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def moe_config(dense_config: Any, spec: UpcycleSpec) -> Any:
    """The vanilla MoE config (Mixtral or Qwen2-MoE) a dense config upcycles to."""
    from transformers import MixtralConfig, Qwen2MoeConfig

    d = dense_config
    if d.model_type not in DENSE_TYPES:
        raise UsageError(f"ders upcycles {', '.join(DENSE_TYPES)} models, not {d.model_type!r}")
    if getattr(d, "mlp_bias", False):
        raise UsageError("the dense FFN has biases (mlp_bias), which MoE experts do not have")
    if d.model_type == "llama" and getattr(d, "attention_bias", False):
        raise UsageError("attention_bias: neither Mixtral nor Qwen2-MoE has an o_proj bias")
    layers = d.num_hidden_layers
    common = dict(
        vocab_size=d.vocab_size, hidden_size=d.hidden_size, intermediate_size=d.intermediate_size,
        num_hidden_layers=layers, num_attention_heads=d.num_attention_heads,
        num_key_value_heads=d.num_key_value_heads, hidden_act=d.hidden_act,
        max_position_embeddings=d.max_position_embeddings,
        initializer_range=d.initializer_range, rms_norm_eps=d.rms_norm_eps,
        rope_parameters=d.rope_parameters, tie_word_embeddings=d.tie_word_embeddings,
        attention_dropout=d.attention_dropout, bos_token_id=d.bos_token_id,
        eos_token_id=d.eos_token_id, pad_token_id=d.pad_token_id,
        num_experts_per_tok=spec.top_k, output_router_logits=spec.aux_loss_coef > 0,
        router_aux_loss_coef=spec.aux_loss_coef)
    head_dim = getattr(d, "head_dim", None)
    if head_dim:
        common["head_dim"] = head_dim
    window = getattr(d, "sliding_window", None)
    if d.model_type == "qwen2" and not getattr(d, "use_sliding_window", False):
        window = None
    all_moe = all(spec.is_moe_layer(i) for i in range(layers))
    if d.model_type != "qwen2" and all_moe and not spec.universal:
        return MixtralConfig(num_local_experts=spec.experts, sliding_window=window, **common)
    sliding = {"use_sliding_window": False}
    if window:
        types = getattr(d, "layer_types", None) or ["sliding_attention"] * layers
        sliding = {"use_sliding_window": True, "sliding_window": window,
                   "max_window_layers": layers, "layer_types": list(types)}
    return Qwen2MoeConfig(
        num_experts=spec.experts, moe_intermediate_size=d.intermediate_size,
        shared_expert_intermediate_size=d.intermediate_size if spec.universal else 0,
        norm_topk_prob=True, decoder_sparse_step=1,
        mlp_only_layers=[i for i in range(layers) if not spec.is_moe_layer(i)],
        qkv_bias=d.model_type == "qwen2", **sliding, **common)


def upcycle_model(dense: nn.Module, spec: UpcycleSpec | None = None, **kwargs: Any) -> nn.Module:
    """A DeRS MoE (a transformers Mixtral or Qwen2-MoE model with DeRS experts) from a loaded
    dense causal LM. Keyword arguments build the UpcycleSpec when none is given.

    The MoE reuses the dense model's tensors (attention, norms, embeddings) without copying:
    training it changes them in the dense model too.
    """
    spec = spec or UpcycleSpec(**kwargs)
    spec.check()
    config = moe_config(dense.config, spec)
    dtype = next(dense.parameters()).dtype
    model = empty_model(config, dtype)
    own = {n for n, _ in model.named_parameters()}
    dense_tensors = dict(dense.state_dict(keep_vars=True))
    assign(model, {n: t.data for n, t in dense_tensors.items() if n in own}, trainable=True)
    gen = torch.Generator().manual_seed(spec.seed)
    for i, layer in enumerate(model.model.layers):
        if spec.is_moe_layer(i):
            mlp = dense.model.layers[i].mlp
            ffn = {r: getattr(mlp, f"{r}_proj").weight.data for r in ROLES}
            _upcycle_block(layer.mlp, ffn, spec, i, gen, config)
    tie_and_check(model)
    if spec.mode != "vanilla":
        use_ders_folders(model)
    return model.to(next(dense.parameters()).device)  # routers and deltas were made on the CPU


def _upcycle_block(block: nn.Module, ffn: dict[str, torch.Tensor], spec: UpcycleSpec, layer: int,
                   gen: torch.Generator, config: Any) -> None:
    dtype = ffn["gate"].dtype
    hidden = ffn["gate"].shape[1]
    router = torch.randn(spec.experts, hidden, generator=gen) * config.initializer_range
    block.gate.weight = nn.Parameter(router.to(dtype))
    if spec.universal:
        ffn = dict(ffn, down=(ffn["down"].float() * UNIVERSAL_DOWN_SCALE).to(dtype))
    if hasattr(block, "shared_expert_gate"):
        # Zero: a gate of exactly 1/2 for the universal FFN (and an unused one for a zero-width
        # shared expert).
        block.shared_expert_gate.weight = nn.Parameter(torch.zeros(1, hidden, dtype=dtype))
        if not spec.universal:
            for r in ROLES:  # zero width: real, empty tensors
                lin = getattr(block.shared_expert, f"{r}_proj")
                lin.weight = nn.Parameter(torch.empty(lin.weight.shape, dtype=dtype))
    members = spec.experts + int(spec.universal)
    if spec.mode == "vanilla":
        gate_up = torch.cat([ffn["gate"], ffn["up"]])
        block.experts.gate_up_proj = nn.Parameter(gate_up.expand(spec.experts, -1, -1).clone())
        block.experts.down_proj = nn.Parameter(ffn["down"].expand(spec.experts, -1, -1).clone())
        if spec.universal:
            for r in ROLES:
                getattr(block.shared_expert, f"{r}_proj").weight = nn.Parameter(ffn[r].clone())
        return
    projections = {r: _projection(ffn[r], spec, layer, r, members, gen) for r in ROLES}
    vanilla_cls = type(block.experts)
    experts = DersExperts(projections["gate"], projections["up"], projections["down"],
                          spec.experts, block.experts.act_fn, vanilla_cls, mode="factored")
    block.experts = experts
    if spec.universal:
        block.shared_expert = DersSharedExpert(experts, type(block.shared_expert))


def _projection(weight: torch.Tensor, spec: UpcycleSpec, layer: int, role: str, members: int,
                gen: torch.Generator) -> DersProjection:
    out_f, in_f = weight.shape
    if spec.mode == "sparse":
        keep = keep_count(out_f * in_f, spec.rate)
        seeds = [delta_seed(spec.seed, layer, role, m) for m in range(members)]
        return DersProjection.sparse(weight.clone(), keep, seeds, drop=spec.rate)
    return DersProjection.lowrank_init(weight.clone(), spec.rank, members, gen)


def expert_parameter_counts(model: nn.Module) -> dict[str, int]:
    """Trainable parameters of the experts (shared FFNs and deltas, or full copies) and of all
    of the model."""
    experts = 0
    seen: set[int] = set()
    for name, module in model.named_modules():
        if name.endswith((".experts", ".shared_expert")):
            for p in module.parameters():
                if p.requires_grad and id(p) not in seen:
                    seen.add(id(p))
                    experts += p.numel()
    total = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"experts": experts, "total": total}
