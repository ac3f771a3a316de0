"""A model reads text one decoder layer at a time, and every MoE layer reports what its experts
saw: the input of the MoE block for every token, and which experts each token was routed to.

This is the sequential pipeline of GPTQ and llmcompressor: the embeddings of every sequence are
computed once, then each decoder layer in turn runs on all of them, its outputs becoming the
next layer's inputs. Only one layer's weights exist at a time (``CheckpointLayers`` reads them
from the safetensors files and drops them after), so a checkpoint larger than memory is read in
the memory of one layer plus the hidden states of the text.

What one layer saw (``LayerInputs``) gives each expert's projection its inputs: the gate and up
projections of expert e read the tokens routed to e; its down projection reads that expert's own
activations ``act(x W_gate^T) * (x W_up^T)``, computed from the weights of the layer that ran;
a shared FFN reads every token.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from ..checkpoint import Checkpoint
from ..dtypes import TORCH_DTYPES
from ..errors import InputError
from ..families import INDEX, ROLES, for_model_type
from ..groups import TensorSource
from ..hf.skeleton import config_from_dict, empty_model, no_empty_module_warning
from ..lanes import release_memory

_LAYER = re.compile(rf"^model\.layers\.({INDEX})\.")
EMBEDDINGS = "model.embed_tokens.weight"


class _Caught(Exception):
    """Raised by the hook on the first decoder layer: the embeddings are all we wanted."""


@dataclass
class LayerInputs:
    """What the MoE block of decoder layer ``layer`` saw while the model read the text."""

    layer: int
    x: torch.Tensor  # [tokens, hidden] float32: the block's input (after the layer's norm)
    top_k: torch.Tensor | None  # [tokens, k] int64 expert indices; None: no routed experts
    experts: nn.Module | None  # the block's experts module (transformers' fused weights)
    shared: nn.Module | None  # the block's always-on FFN, if any
    _routed: dict[int, torch.Tensor] = field(default_factory=dict)

    def routed(self, expert: int) -> torch.Tensor:
        """The indices of the tokens routed to ``expert`` (ascending)."""
        if expert not in self._routed:
            if self.top_k is None:
                raise KeyError(expert)
            hit = (self.top_k == expert).any(dim=1)
            self._routed[expert] = torch.nonzero(hit).reshape(-1)
        return self._routed[expert]

    def inputs(self, role: str, expert: int | None) -> torch.Tensor:
        """The inputs [tokens, in] of projection ``role`` of ``expert`` (None: the shared FFN)."""
        if expert is None:
            if self.shared is None:
                raise KeyError("shared")
            x = self.x
            if role == "down":
                m = self.shared
                return m.act_fn(m.gate_proj(x)) * m.up_proj(x)
            return x
        x = self.x.index_select(0, self.routed(expert))
        if role == "down":
            gate_up = self.experts.gate_up_proj[expert].to(x.dtype)
            gate, up = nn.functional.linear(x, gate_up).chunk(2, dim=-1)
            return self.experts.act_fn(gate) * up
        return x


class CheckpointLayers:
    """A transformers model of a MoE checkpoint with no weights but the embeddings, whose
    decoder layers are filled from the safetensors files one at a time (and emptied after)."""

    def __init__(self, ckpt: Checkpoint, source: TensorSource,
                 dtype: torch.dtype = torch.float32) -> None:
        if ckpt.config is None:
            raise InputError("has no config.json: calibration runs the model, which needs it",
                             ckpt.root)
        model_type = ckpt.config.get("model_type")
        layout = for_model_type(str(model_type))
        if layout is None:
            raise InputError(f"calibration runs mixtral, qwen2_moe and qwen3_moe models; this "
                             f"one is {model_type!r}", ckpt.root)
        self.ckpt, self.source, self.dtype, self.layout = ckpt, source, dtype, layout
        config = config_from_dict(ckpt.config)
        config.use_cache = False
        with no_empty_module_warning():
            self.model = empty_model(config, dtype)
        self.by_layer: dict[int, list[str]] = {}
        for name in ckpt.where:
            m = _LAYER.match(name)
            if m:
                self.by_layer.setdefault(int(m[1]), []).append(name)
        if EMBEDDINGS not in ckpt.where:
            raise InputError(f"has no {EMBEDDINGS}", ckpt.root)
        self._assign({EMBEDDINGS: self._read(EMBEDDINGS)})
        self.loaded_bytes = 0  # the weights held now (tests check memory stays at one layer)
        self.peak_bytes = 0

    @property
    def layers(self) -> nn.ModuleList:
        return self.model.model.layers

    def _read(self, name: str) -> torch.Tensor:
        e = self.ckpt.entry(name)
        if e.dtype not in TORCH_DTYPES:
            raise InputError(f"tensor {name!r} has dtype {e.dtype}, which calibration cannot "
                             "compute with", self.source.path_of(name))
        t = torch.empty(e.shape, dtype=TORCH_DTYPES[e.dtype])
        self.source.read_into(name, 0, memoryview(t.view(-1).view(torch.uint8).numpy()))
        return t.to(self.dtype)

    def _assign(self, tensors: dict[str, torch.Tensor]) -> None:
        for name, t in tensors.items():
            owner, _, leaf = name.rpartition(".")
            module = self.model.get_submodule(owner)
            module._parameters[leaf] = nn.Parameter(t, requires_grad=False)

    def load(self, layer: int) -> None:
        """Fill decoder layer ``layer`` from the checkpoint."""
        tensors: dict[str, torch.Tensor] = {}
        experts: dict[str, dict[int, torch.Tensor]] = {r: {} for r in ROLES}
        for name in self.by_layer.get(layer, []):
            where = self.layout.parse(name)
            if where is not None and where[1] is not None:
                experts[where[2]][where[1]] = self._read(name)
            else:
                tensors[self.layout.to_memory(name)] = self._read(name)
        if experts["gate"]:
            n = len(experts["gate"])
            mem = self.layout.memory
            prefix = f"model.layers.{layer}.{mem.block}."
            tensors[prefix + mem.gate_up] = torch.stack(
                [torch.cat([experts["gate"][e], experts["up"][e]]) for e in range(n)])
            tensors[prefix + mem.down] = torch.stack([experts["down"][e] for e in range(n)])
            del experts
        self._assign(tensors)
        self.loaded_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
        self.peak_bytes = max(self.peak_bytes, self.loaded_bytes)
        missing = [n for n, p in self.layers[layer].named_parameters() if p.device.type == "meta"]
        if missing:
            raise InputError(f"layer {layer}: the checkpoint has no tensor for {missing[0]!r}",
                             self.ckpt.root)

    def unload(self, layer: int) -> None:
        """Drop decoder layer ``layer``'s weights (back to the meta device)."""
        for module in self.layers[layer].modules():
            for leaf, p in module._parameters.items():
                if p is not None:
                    module._parameters[leaf] = nn.Parameter(p.to("meta"), requires_grad=False)
        self.loaded_bytes = 0


class LoadedLayers:
    """A model already in memory (``ders eval``'s original): nothing to load or drop."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    @property
    def layers(self) -> nn.ModuleList:
        return self.model.model.layers

    def load(self, layer: int) -> None:
        pass

    def unload(self, layer: int) -> None:
        pass


def read_layers(source: CheckpointLayers | LoadedLayers, ids: torch.Tensor, *,
                batch: int = 8, device: torch.device | None = None) -> Iterator[LayerInputs]:
    """Run the sequences ``ids`` [n, seq_len] through ``source``'s model one decoder layer at a
    time, yielding what each layer's MoE block saw (layers without routed experts are run and
    skipped). The next layer is computed when the consumer asks for it."""
    model = source.model
    device = device or torch.device("cpu")
    hidden, kwargs = _embed(model, ids, batch, device)
    for index, layer in enumerate(source.layers):
        source.load(index)
        layer.to(device)
        block = getattr(layer, "mlp", None)
        experts = getattr(block, "experts", None)
        shared = getattr(block, "shared_expert", None)
        seen = _Seen()
        hooks = []
        if experts is not None:
            hooks.append(block.register_forward_pre_hook(seen.block_input))
            hooks.append(experts.register_forward_pre_hook(seen.routing, with_kwargs=True))
        try:
            with torch.no_grad():
                hidden = [layer(h, **kw) for h, kw in zip(hidden, kwargs, strict=True)]
                hidden = [h[0] if isinstance(h, tuple) else h for h in hidden]
        finally:
            for h in hooks:
                h.remove()
        if experts is not None:
            yield LayerInputs(index, torch.cat(seen.x), torch.cat(seen.top_k), experts, shared)
        del seen
        source.unload(index)
        # A layer's float32 weights and activations are freed into glibc's heap, which keeps
        # them as resident memory: ~0.4 GB more peak RSS by the MoE layers of SmolLM2-135M.
        release_memory()


class _Seen:
    """What the hooks of one layer record: the MoE block's inputs and the routing."""

    def __init__(self) -> None:
        self.x: list[torch.Tensor] = []
        self.top_k: list[torch.Tensor] = []

    def block_input(self, _module: nn.Module, args: tuple) -> None:
        self.x.append(args[0].reshape(-1, args[0].shape[-1]).float())

    def routing(self, _module: nn.Module, args: tuple, kwargs: dict) -> None:
        self.top_k.append((args[1] if len(args) > 1 else kwargs["top_k_index"]).long())


def _embed(model: nn.Module, ids: torch.Tensor, batch: int, device: torch.device
           ) -> tuple[list[torch.Tensor], list[dict]]:
    """The first decoder layer's inputs (hidden states and keyword arguments) for every batch
    of sequences: the model runs up to that layer and is stopped there."""
    caught: list[tuple[torch.Tensor, dict]] = []

    def catch(_m: nn.Module, args: tuple, kwargs: dict) -> None:
        caught.append((args[0] if args else kwargs.pop("hidden_states"), kwargs))
        raise _Caught

    hook = model.model.layers[0].register_forward_pre_hook(catch, with_kwargs=True)
    try:
        with torch.no_grad():
            for i in range(0, ids.shape[0], batch):
                with contextlib.suppress(_Caught):
                    model.model(input_ids=ids[i : i + batch].to(device), use_cache=False)
    finally:
        hook.remove()
    return [h for h, _ in caught], [kw for _, kw in caught]
