"""Inference straight from a .ders archive: the model is built with its experts kept as base plus
compressed deltas, and an expert exists in full only while the router uses it.

Two ways to compute an expert (``mode``):

- ``"synthesize"``: W_e = cast(base + δ_e) is synthesized when the router selects expert e,
  exactly as ``expand`` writes it, and used in transformers' own expert loop; the logits are
  those of the expanded model loaded with ``experts_implementation="eager"``, bit for bit.
- ``"factored"``: x @ W_e.T = x @ W_base.T + x @ δ_e.T without materialising W_e. The base
  products are shared by all experts: gate and up projections of the base are computed once per
  token, and the down projection once on the routing-weighted sum of the experts' activations
  (it is linear), so a MoE layer costs one dense FFN plus the deltas (low-rank: two thin
  products; sparse: the kept positions only). Equal to the expanded model up to rounding.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .archive import ArchiveReader
from .codecs import get_codec
from .errors import InputError, UsageError
from .families import ROLES
from .groups import group_arrays, synthesize
from .hf.archive_model import CONFIG_FILE, ArchiveModel, ExpertSlot, open_archive_model
from .hf.skeleton import assign, quiet_transformers
from .records import GroupRecord
from .safetensors_io import TORCH_DTYPES

MODES = ("auto", "synthesize", "factored")
GENERATION_FILE = "generation_config.json"


class StoredProjection(nn.Module):
    """One projection of a group as the archive stores it: the base and the codec arrays."""

    def __init__(self, group: GroupRecord, base: torch.Tensor, arrays: dict[str, torch.Tensor]
                 ) -> None:
        super().__init__()
        self.codec = group.codec["name"]
        self.num_members = len(group.members)
        self.params = group.codec["params"]
        self.dtype_name = group.dtype
        self.shape = tuple(group.shape)
        self.register_buffer("base", base.reshape(self.shape))
        self.suffixes = list(arrays)
        for k, v in arrays.items():
            self.register_buffer(f"arr_{k}", v)
        self._cache: dict = {}  # what the codec derives from its parameters (positions)

    def _apply(self, fn: Any, recurse: bool = True) -> StoredProjection:
        # The stored tensors follow the model to another device but keep their dtype: their
        # bits are what synthesis decodes (``.float()`` on a lossless base breaks the residuals
        # taken against its bf16 bits; ``.half()`` overflows). ``.to(dtype)`` of the model
        # changes the compute dtype instead, which follows the input.
        stored = dict(self._buffers)
        self._buffers.clear()
        try:
            super()._apply(fn, recurse)
        finally:
            for k, t in stored.items():
                device = fn(torch.empty(0, dtype=t.dtype, device=t.device)).device
                self._buffers[k] = t if device == t.device else t.to(device)
        return self

    def rows(self, member: int) -> dict[str, torch.Tensor]:
        arrays = {k: getattr(self, f"arr_{k}") for k in self.suffixes}
        return get_codec(self.codec).member_rows(arrays, self.params, member)

    def delta(self, member: int) -> torch.Tensor:
        """δ_member, flattened, in the compute dtype: zero where the codec leaves the base."""
        return get_codec(self.codec).delta(self.rows(member), self.params, member, self.base,
                                           self.dtype_name, self._cache)

    @property
    def members(self) -> int:
        return self.num_members

    def encoding(self) -> tuple[str, dict, dict[str, torch.Tensor]]:
        """(codec name, params, arrays) as the archive stores them, for a writer."""
        return self.codec, self.params, {k: getattr(self, f"arr_{k}").cpu()
                                         for k in self.suffixes}

    @torch.no_grad()
    def synthesized(self) -> list[torch.Tensor]:
        """Every member's weight exactly as the archive synthesizes it, on the CPU."""
        return [self.weight(m).cpu() for m in range(self.members)]

    def weight(self, member: int) -> torch.Tensor:
        """W_member, the bytes ``expand`` writes (the archive's own synthesis)."""
        return synthesize(self.base, self.codec, self.params, self.rows(member), member,
                          self.dtype_name).view(self.shape)

    def apply_delta(self, x: torch.Tensor, member: int) -> torch.Tensor:
        """x @ δ_member.T without building W_member (the codec's own way)."""
        return get_codec(self.codec).apply(x, self.rows(member), self.params, member, self.base,
                                           self.dtype_name, self._cache)


class ExpertCache:
    """Synthesized experts of a whole model, kept within a byte budget: the least recently used
    go first. Synthesizing an expert costs 20 to 60 times the matrix-vector products it serves
    in a decoding step (measured in examples/bench_archive_inference.py), so a cache is what
    makes generation from compress/quantize archives as fast as from the expanded model."""

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


class ArchiveExperts(nn.Module):
    """Stands in for a transformers experts module (same call) with stored projections.

    ``mode`` "synthesize": each expert the router selects is synthesized (the bytes ``expand``
    writes) and kept in ``cache``; "factored": x W_base^T + x δ^T, no W_e formed.
    """

    def __init__(self, projections: dict[str, StoredProjection], num_experts: int,
                 act_fn: Any, mode: str, cache: ExpertCache | None = None,
                 vanilla_cls: type[nn.Module] | None = None) -> None:
        super().__init__()
        self.gate, self.up, self.down = (projections[r] for r in ROLES)
        self.num_experts = num_experts
        self.act_fn = act_fn
        self.vanilla_cls = vanilla_cls  # the transformers module this one stands in for
        self.mode = self.resolve(mode)
        self.cache = cache if cache is not None else ExpertCache(0)

    def resolve(self, mode: str) -> str:
        """``mode`` with "auto" decided: factored where every projection's deltas are low-rank
        (two thin products cost less than synthesizing), synthesized elsewhere."""
        if mode != "auto":
            return mode
        factored = all(get_codec(p.codec).factored for p in self.projections.values())
        return "factored" if factored else "synthesize"

    @property
    def projections(self) -> dict[str, StoredProjection]:
        return {"gate": self.gate, "up": self.up, "down": self.down}

    def _apply(self, fn: Any, recurse: bool = True) -> ArchiveExperts:
        self.cache.drop_owner(id(self))  # on the old device, in the old compute dtype
        return super()._apply(fn, recurse)

    def expert_weights(self, e: int, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(gate_up [2I, H], down [H, I]) of expert e in ``x``'s dtype: synthesized in the
        archive's dtype (the bytes ``expand`` writes), then cast, as transformers casts a
        checkpoint loaded in another dtype; or from the cache."""
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
        g = F.linear(x, self.gate.base.to(x.dtype)) + self.gate.apply_delta(x, m)
        u = F.linear(x, self.up.base.to(x.dtype)) + self.up.apply_delta(x, m)
        h = self.act_fn(g) * u
        return F.linear(h, self.down.base.to(h.dtype)) + self.down.apply_delta(h, m)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        if self.mode == "factored":
            return self._factored(hidden_states, top_k_index, top_k_weights)
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

    def _factored(self, x: torch.Tensor, top_k_index: torch.Tensor,
                  top_k_weights: torch.Tensor) -> torch.Tensor:
        g_base = F.linear(x, self.gate.base.to(x.dtype))
        u_base = F.linear(x, self.up.base.to(x.dtype))
        h_sum = x.new_zeros(x.shape[0], g_base.shape[1])
        y_delta = torch.zeros_like(x)
        for e in torch.unique(top_k_index).tolist():
            if e >= self.num_experts:
                continue
            token_idx, pos = torch.where(top_k_index == e)
            xe = x[token_idx]
            g = g_base[token_idx] + self.gate.apply_delta(xe, e)
            u = u_base[token_idx] + self.up.apply_delta(xe, e)
            h = self.act_fn(g) * u
            w = top_k_weights[token_idx, pos, None]
            h_sum.index_add_(0, token_idx, (h * w).to(h_sum.dtype))
            y_delta.index_add_(0, token_idx, (self.down.apply_delta(h, e) * w).to(x.dtype))
        return F.linear(h_sum, self.down.base.to(x.dtype)) + y_delta


class ArchiveSharedExpert(nn.Module):
    """A block's always-on FFN kept in its experts' groups (member N)."""

    def __init__(self, experts: ArchiveExperts, vanilla_cls: type[nn.Module] | None = None
                 ) -> None:
        super().__init__()
        self._experts = [experts]  # registered once, under the experts
        self.vanilla_cls = vanilla_cls

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        experts = self._experts[0]
        return experts.member_forward(x, experts.num_experts)


def load_from_archive(archive: str | Path, *, mode: str = "auto",
                      dtype: torch.dtype | str | None = None, device_map: Any = None,
                      device: str | None = None, cache_gb: float | None = None,
                      revision: str | None = None, token: str | bool | None = None,
                      cache_dir: str | Path | None = None) -> nn.Module:
    """A transformers causal LM whose experts stay base plus deltas (module docstring): what
    ``AutoModelForCausalLM.from_pretrained`` gives for a ders folder holding ``archive``.

    ``mode``: "auto" (factored where the deltas are low-rank, synthesize elsewhere),
    "synthesize" or "factored". ``dtype``: the compute dtype (a torch dtype or its name;
    default the experts' dtype in the archive): the tensors outside the experts are cast to
    it, the experts stay as stored, are synthesized in their own dtype and computed in
    ``dtype``, so that the model equals the expanded checkpoint loaded with ``dtype=``;
    ``model.to(dtype)`` later changes the compute dtype the same way. ``device_map`` as
    transformers takes it ("cpu", "cuda", "auto", a dict); ``device`` is short for a device_map
    of one device. ``cache_gb``: the budget, in GB, of experts kept once synthesized (default:
    no limit, the speed of the expanded model; 0: synthesize at every use, the least memory).
    ``archive``: anything ArchiveReader opens (a file, a sharded archive, a ders folder, a Hub
    repo id at ``revision``, with ``token`` and ``cache_dir``).
    """
    if mode not in MODES:
        raise UsageError(f"mode must be one of {', '.join(MODES)}, got {mode!r}", param="mode")
    if device is not None and device_map is not None:
        raise UsageError("give device or device_map, not both", param="device")
    if cache_gb is not None and not cache_gb >= 0:
        raise UsageError(f"cache_gb must be >= 0, got {cache_gb}", param="cache_gb")
    from transformers import AutoModelForCausalLM

    from .hf.quantizer import ARCHIVE_NAME, folder_config, register

    register()
    with ArchiveReader(archive, revision=revision, token=token, cache_dir=cache_dir) as reader:
        am = open_archive_model(reader)
        default = _dtype(am)
        # A sharded archive keeps its files' names: its index names its shards.
        parts = list(reader.files) if reader.sharded else [reader.path]
        name = parts[0].name if reader.sharded else ARCHIVE_NAME
        files = {f.path: f for f in reader.manifest.files}
        config = json.loads(bytes(reader.read_bytes(files[CONFIG_FILE].array)))
        gen = files.get(GENERATION_FILE)
        generation = bytes(reader.read_bytes(gen.array)) if gen is not None else None
    # The folder from_pretrained reads: the archive linked in, its config and generation config.
    with tempfile.TemporaryDirectory(prefix="ders-load-") as tmp:
        folder = Path(tmp)
        for i, part in enumerate(parts):
            _link(part.resolve(), folder / (name if i == 0 else part.name))
        runtime = {"mode": mode, "cache_gb": cache_gb}
        (folder / CONFIG_FILE).write_text(json.dumps(folder_config(config, name,
                                                                   runtime=runtime)))
        if generation is not None:
            (folder / GENERATION_FILE).write_bytes(generation)
        with quiet_transformers(errors_only=False):
            model = AutoModelForCausalLM.from_pretrained(
                folder, dtype=_torch_dtype(dtype) if dtype is not None else default,
                device_map=device_map if device is None else device)
    model.config.name_or_path = str(parts[0])
    return model.eval()


def configure(model: nn.Module, *, mode: str = "auto", cache_gb: float | None = None) -> None:
    """Change how a loaded model's experts compute (``mode``, ``cache_gb``: see
    load_from_archive), e.g. after ``from_pretrained`` of a ders folder."""
    if mode not in MODES:
        raise UsageError(f"mode must be one of {', '.join(MODES)}, got {mode!r}", param="mode")
    if cache_gb is not None and not cache_gb >= 0:
        raise UsageError(f"cache_gb must be >= 0, got {cache_gb}", param="cache_gb")
    cache = ExpertCache(None if cache_gb is None else int(cache_gb * 1e9))
    for module in model.modules():
        if isinstance(module, ArchiveExperts):
            module.mode = module.resolve(mode)
            module.cache = cache


def _link(target: Path, link: Path) -> None:
    """``link`` names ``target``: a symbolic link, else a hard link, else a copy."""
    try:
        link.symlink_to(target)
    except OSError:
        try:
            os.link(target, link)
        except OSError:
            shutil.copyfile(target, link)


def _torch_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        return dtype
    found = getattr(torch, dtype, None) if isinstance(dtype, str) else None
    if not isinstance(found, torch.dtype) or not found.is_floating_point:
        raise UsageError(f"dtype must be a floating torch dtype, got {dtype!r}")
    return found


def _dtype(am: ArchiveModel) -> torch.dtype:
    for slot in am.slots.values():
        if slot.group is not None:
            return TORCH_DTYPES[slot.group.dtype]
    dtype = getattr(am.config, "dtype", None) or torch.float32
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


@dataclass(frozen=True)
class LayerPlan:
    """How a layer's experts come out of an archive."""

    grouped: bool  # every projection is a group: the layer computes from base plus deltas
    shared: bool  # the groups hold the block's always-on FFN too (member N)
    loose: tuple[str, ...]  # in a partly grouped layer, the expert tensors stored as they are
    nbytes: int  # what its groups store


def plan_layers(am: ArchiveModel) -> dict[int, LayerPlan]:
    """Every layer with an expert group, and how its experts are built."""
    plans = {}
    for layer in am.layers:
        slots = [am.slots.get((layer, r)) for r in ROLES]
        groups = [s.group for s in slots if s is not None and s.group is not None]
        if not groups:
            continue  # experts stored as they are: the layer loads as transformers has it
        grouped = all(s is not None and s.group is not None and not s.loose for s in slots)
        names = [] if grouped else [am.layout.expert_name(layer, e, s.role)
                                    for s in slots if s is not None for e in sorted(s.loose)]
        nbytes = sum(am.reader.entry(n).nbytes for g in groups
                     for n in (g.base["array"], *g.codec["arrays"].values()))
        plans[layer] = LayerPlan(grouped, any(s.has_shared for s in slots if s is not None),
                                 tuple(names), nbytes)
    return plans


def install_experts(am: ArchiveModel, model: nn.Module, *, dtype: torch.dtype,
                    layers: Iterable[int] | None = None, mode: str = "auto",
                    cache_gb: float | None = None,
                    device_of: Callable[[nn.Module], torch.device] | None = None) -> None:
    """Put the experts of ``layers`` (default: those with groups) into ``model``: modules that
    compute from the stored groups (``mode``, ``cache_gb``: see load_from_archive), or, where a
    layer mixes groups and experts stored as they are, transformers' own module with every
    expert synthesized. ``device_of(block)``: where a block's experts go (default the CPU)."""
    cache = ExpertCache(None if cache_gb is None else int(cache_gb * 1e9))
    for layer in (plan_layers(am) if layers is None else layers):
        block = model.model.layers[layer].mlp
        device = device_of(block) if device_of is not None else torch.device("cpu")
        _install(am, block, layer, mode, cache, dtype, device)


def _install(am: ArchiveModel, block: nn.Module, layer: int, mode: str, cache: ExpertCache,
             dtype: torch.dtype, device: torch.device) -> None:
    slots: dict[str, ExpertSlot] = {r: am.slots.get((layer, r)) for r in ROLES}
    r = am.reader
    if all(s is not None and s.group is not None and not s.loose for s in slots.values()):
        projections = {}
        for role, s in slots.items():
            parts = group_arrays(r, s.group, device)  # the base decoded, checksums verified
            projections[role] = StoredProjection(s.group, parts.base.reshape(s.group.shape),
                                                 parts.arrays)
        n = len(slots["gate"].group.members) - int(slots["gate"].has_shared)
        experts = ArchiveExperts(projections, n, block.experts.act_fn, mode, cache,
                                 type(block.experts))
        block.experts = experts
        if slots["gate"].has_shared:
            block.shared_expert = ArchiveSharedExpert(experts, type(block.shared_expert))
        return
    # A projection of this layer is stored as it is: build the layer as transformers has it.
    if any(s is not None and s.has_shared for s in slots.values()):
        raise InputError(f"layer {layer}: a shared FFN grouped beside experts stored as they "
                         "are", r.path)
    weights = {role: _members(am, s) for role, s in slots.items()}
    n = len(weights["gate"])
    assign(block.experts, {
        "gate_up_proj": torch.stack([torch.cat([weights["gate"][e], weights["up"][e]])
                                     for e in range(n)]).to(device, dtype),
        "down_proj": torch.stack(weights["down"]).to(device, dtype)}, trainable=False)


def _members(am: ArchiveModel, slot: ExpertSlot | None) -> list[torch.Tensor]:
    if slot is None:
        return []
    if slot.group is None:
        return [slot.loose[e] for e in sorted(slot.loose)]
    g = slot.group
    parts = group_arrays(am.reader, g)
    return [parts.member(i).view(g.shape) for i in range(len(g.members))]


def resident_bytes(model: nn.Module) -> int:
    """Bytes of every distinct tensor storage a model holds (parameters and buffers)."""
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total
