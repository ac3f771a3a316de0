"""What a model-building reader needs from an archive of a transformers MoE checkpoint: its
config, its expert groups by layer and projection, and its other tensors by in-memory name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..archive import ArchiveReader
from ..errors import InputError
from ..families import RUNTIME_MODEL_TYPES, Family, for_model_type
from ..records import GroupRecord
from .skeleton import config_from_bytes

CONFIG_FILE = "config.json"


@dataclass
class ExpertSlot:
    """One projection of one MoE layer: its group (experts 0..N-1, then the shared FFN if the
    group holds it), or, for experts stored as they are, their tensors by expert index."""

    layer: int
    role: str
    group: GroupRecord | None = None
    has_shared: bool = False
    loose: dict[int, torch.Tensor] = field(default_factory=dict)


@dataclass
class ArchiveModel:
    reader: ArchiveReader
    config: Any
    layout: Family
    slots: dict[tuple[int, str], ExpertSlot]

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor outside the expert groups, by in-memory name, read and checked; expert
        tensors stored as they are go to their slots instead."""
        out = {}
        for name, rec in self.reader.manifest.tensors.items():
            if rec.group is not None:
                continue
            where = self.layout.parse(name)
            t = self.reader.array(name)
            if where is None or where[1] is None:  # not an expert: a shared FFN stored as is
                out[self.layout.to_memory(name)] = t
            else:
                layer, expert, role = where
                self.slots.setdefault((layer, role), ExpertSlot(layer, role)).loose[expert] = t
        return out

    @property
    def layers(self) -> list[int]:
        return sorted({layer for layer, _ in self.slots})


def open_archive_model(reader: ArchiveReader) -> ArchiveModel:
    m = reader.manifest
    config_rec = next((f for f in m.files if f.path == CONFIG_FILE), None)
    if config_rec is None:
        raise InputError(f"has no {CONFIG_FILE}: not an archive of a transformers model",
                         reader.path)
    config = config_from_bytes(bytes(reader.read_bytes(config_rec.array)))
    layout = for_model_type(config.model_type)
    if layout is None:
        raise InputError(f"model type {config.model_type!r} has no known expert layout (known: "
                         f"{', '.join(sorted(RUNTIME_MODEL_TYPES))})", reader.path)
    slots: dict[tuple[int, str], ExpertSlot] = {}
    for g in m.groups:
        where = [layout.parse(mem.tensor) if mem.slice is None else None for mem in g.members]
        n = len(where)
        shared = n > 0 and where[-1] is not None and where[-1][1] is None
        experts = where[:-1] if shared else where
        ok = (all(w is not None for w in where) and len({(w[0], w[2]) for w in where}) == 1
              and [w[1] for w in experts] == list(range(len(experts))))
        if not ok:
            raise InputError(f"group {g.key!r} is not the experts 0..N-1 of one projection of "
                             f"a {config.model_type} layer", reader.path)
        layer, _, role = where[0]
        slots[(layer, role)] = ExpertSlot(layer, role, g, shared)
    return ArchiveModel(reader, config, layout, slots)
