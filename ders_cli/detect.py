"""Finding expert groups from tensor names and shapes, without configuration.

A per-expert tensor's name holds one integer component (or ``expert_{E}``) that follows an
experts-like component at most two places before it: ``...experts.{E}.w1.weight``,
``...deepspeed_experts.{E}.fc1.weight``, ``...experts.weight_gate.{E}``,
``...experts.expert_{E}.wi.weight``. Tensors whose names agree once that component is replaced
by ``{E}`` form a group if they also agree in dtype and shape. Whether a group really was
upcycled is decided later, from the weights (see ``stats``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .constants import FLOAT_DTYPES
from .records import ExpertGroup, Member
from .safetensors_io import TensorEntry

# Components that hold experts; family knowledge is data (see LAYOUTS in the docs).
EXPERT_CONTAINERS = frozenset({"experts", "deepspeed_experts", "local_experts"})
_EXPERT_ITEM = re.compile(r"^expert_(\d+)$")
_LAYER_CONTAINERS = frozenset({"layers", "layer", "h", "blocks", "block"})
_WINDOW = 2


@dataclass(frozen=True)
class Skipped:
    """A naming group that is not an expert group, and why: its tensors pass through."""

    key: str
    members: tuple[str, ...]
    reason: str


def expert_slot(name: str) -> tuple[str, int] | None:
    """(group key, expert index) for a per-expert tensor name; None for any other tensor."""
    parts = name.split(".")
    for j, part in enumerate(parts):
        if part.isdigit():
            index, form = int(part), "{E}"
        else:
            m = _EXPERT_ITEM.match(part)
            if not m:
                continue
            index, form = int(m.group(1)), "expert_{E}"
        if any(p in EXPERT_CONTAINERS for p in parts[max(0, j - _WINDOW) : j]):
            return ".".join([*parts[:j], form, *parts[j + 1 :]]), index
    return None


def layer_of(name: str) -> int | None:
    """The layer index in a tensor name (``model.layers.3...`` -> 3), if it has one."""
    parts = name.split(".")
    for j in range(1, len(parts)):
        if parts[j].isdigit() and parts[j - 1] in _LAYER_CONTAINERS:
            return int(parts[j])
    return None


def find_groups(entries: dict[str, TensorEntry]) -> tuple[list[ExpertGroup], list[Skipped]]:
    """Expert groups among a checkpoint's tensors, and the naming groups that do not qualify."""
    by_key: dict[str, dict[int, str]] = {}
    for name in entries:
        slot = expert_slot(name)
        if slot is not None:
            by_key.setdefault(slot[0], {})[slot[1]] = name
    groups, skipped = [], []
    for key, members in by_key.items():
        order = sorted(members)
        names = tuple(members[i] for i in order)
        first = entries[names[0]]
        if len(names) < 2:
            skipped.append(Skipped(key, names, "only one expert"))
        elif any(entries[n].shape != first.shape for n in names):
            skipped.append(Skipped(key, names, "experts differ in shape: not copies of one FFN"))
        elif any(entries[n].dtype != first.dtype for n in names):
            skipped.append(Skipped(key, names, "experts differ in dtype"))
        elif first.dtype not in FLOAT_DTYPES:
            skipped.append(Skipped(key, names, f"{first.dtype} experts pass through (ders "
                                               f"decomposes {', '.join(FLOAT_DTYPES)})"))
        elif first.numel == 0:
            skipped.append(Skipped(key, names, "empty tensors"))
        else:
            groups.append(ExpertGroup(key, tuple(Member(n) for n in names), tuple(order),
                                      first.dtype, first.shape))
    return groups, skipped
