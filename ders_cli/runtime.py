"""Inference straight from a .ders archive: a transformers model whose experts stay base plus
deltas (``hf.experts``: synthesized when the router selects them and cached, or computed
factored), loaded by transformers' ``from_pretrained`` through the ders quantizer
(``hf.quantizer``), with its ``dtype`` and ``device_map``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .archive import ArchiveReader
from .errors import InputError, UsageError
from .families import ROLES
from .groups import group_arrays
from .hf.archive_model import CONFIG_FILE, ArchiveModel, ExpertSlot, open_archive_model
from .hf.experts import MODES, DersExperts, DersProjection, DersSharedExpert, ExpertCache
from .hf.experts import configure as configure_experts
from .hf.skeleton import assign, quiet_transformers
from .safetensors_io import TORCH_DTYPES

GENERATION_FILE = "generation_config.json"


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
    configure_experts(model, mode=mode, cache_gb=cache_gb)


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
            g = s.group
            projections[role] = DersProjection(parts.base.reshape(g.shape), g.codec["name"],
                                               g.codec["params"], parts.arrays, len(g.members),
                                               trainable=False)
        n = len(slots["gate"].group.members) - int(slots["gate"].has_shared)
        experts = DersExperts(projections["gate"], projections["up"], projections["down"], n,
                              block.experts.act_fn, type(block.experts), mode, cache,
                              config=getattr(block.experts, "config", None))
        block.experts = experts
        if slots["gate"].has_shared:
            block.shared_expert = DersSharedExpert(experts, type(block.shared_expert))
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
