"""Finding expert groups from tensor names and shapes, without configuration.

Three on-disk forms (the names each family uses are in ``families.py``; detection takes its
vocabulary from there but decides by names and shapes, so families without an entry are found
too):

- per-expert tensors: one integer component (or ``expert_{E}``) that follows an experts-like
  component at most two places before it: ``...experts.{E}.w1.weight``,
  ``...deepspeed_experts.{E}.fc1.weight``, ``...experts.weight_gate.{E}``,
  ``...experts.expert_{E}.wi.weight``. Names that agree once it is written ``{E}``, with one
  dtype and shape, form a group.
- fused tensors: one tensor ``[E, ...]`` (3-D or more) under an experts-like component, or
  named like Granite's ``input_linear``/``output_linear``; slice ``e`` is expert ``e``.
- stacked 2-D tensors ``[E*I, H]`` under an experts-like component (DBRX), when the config
  says how many experts there are.

Experts are matrices: 1-D per-expert biases and norms pass through, and so do quantization
companions (block scales) whatever their shape. Experts another format has quantized (FP8,
compressed-tensors, GPTQ, MXFP4: ``quantized.py``) are named, with their format, among the
skipped groups: they pass through. Whether a group really was upcycled is decided later, from
the weights.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace

from .constants import FLOAT_DTYPES
from .families import INDEX, VOCABULARY, index_part
from .quantized import REASON, is_companion, quant_format
from .records import ExpertGroup, Member
from .safetensors_io import TensorEntry

_EXPERT_ITEM = re.compile(f"^expert_({INDEX})$")
_WINDOW = 2


@dataclass(frozen=True)
class Skipped:
    """A naming group that is not an expert group, and why: its tensors pass through."""

    key: str
    members: tuple[str, ...]
    reason: str
    quantized: str | None = None  # the format that already quantized these experts

    def to_dict(self) -> dict[str, str]:
        d = {"key": self.key, "reason": self.reason}
        return d | ({"quantized": self.quantized} if self.quantized else {})


@dataclass(frozen=True)
class Found:
    """Detection's result: groups (each with shared-FFN candidates) and what was left out."""

    groups: list[ExpertGroup]
    skipped: list[Skipped]
    shared: dict[str, tuple[Member, ...]] = field(default_factory=dict)  # key -> candidates


def expert_slot(name: str) -> tuple[str, int] | None:
    """(group key, expert index) for a per-expert tensor name; None for any other tensor."""
    parts = name.split(".")
    for j, part in enumerate(parts):
        index = index_part(part)
        if index is not None:
            form = "{E}"
        else:
            m = _EXPERT_ITEM.match(part)
            if not m:
                continue
            index, form = int(m.group(1)), "expert_{E}"
        if any(p in VOCABULARY.containers for p in parts[max(0, j - _WINDOW) : j]):
            return ".".join([*parts[:j], form, *parts[j + 1 :]]), index
    return None


def layer_of(name: str) -> int | None:
    """The layer index in a tensor name (``model.layers.3...`` -> 3), if it has one."""
    key = layer_key(name)
    return None if key is None else int(key.rsplit(".", 1)[1])


def layer_key(name: str) -> str | None:
    """The name up to its layer index (``model.encoder.layers.3``), if it has one."""
    parts = name.split(".")
    for j in range(1, len(parts)):
        if index_part(parts[j]) is not None and parts[j - 1] in VOCABULARY.layers:
            return ".".join(parts[: j + 1])
    return None


def expert_count_hint(config: dict | None) -> int | None:
    """The number of experts a config.json declares, under any family's key."""
    if not isinstance(config, dict):
        return None
    for name in VOCABULARY.count_scopes:
        scope = config.get(name) if name else config
        if not isinstance(scope, dict):
            continue
        for key in VOCABULARY.count_keys:
            value = scope.get(key)
            if isinstance(value, list) and value and all(isinstance(v, int) for v in value):
                value = max(value)  # MoE-LLaVA lists a count per MoE layer
            if isinstance(value, int) and not isinstance(value, bool) and value >= 2:
                return value
    return None


def find_groups(entries: dict[str, TensorEntry], config: dict | None = None) -> Found:
    """Expert groups among a checkpoint's tensors, and the naming groups that do not qualify."""
    by_key: dict[str, dict[int, str]] = {}
    quantized: dict[tuple[str, str, str], dict[int, str]] = {}  # (key, format, dtype) -> members
    rest, skipped = [], []
    for name, e in entries.items():
        fmt = quant_format(e, entries)
        if fmt is not None:
            slot = expert_slot(name)
            if slot is not None:
                quantized.setdefault((slot[0], fmt.name, e.dtype), {})[slot[1]] = name
            elif len(e.shape) >= 3 and any(p in VOCABULARY.containers for p in name.split(".")):
                members = tuple(f"{name}[{i}]" for i in range(e.shape[0]))  # fused: [E, ...]
                skipped.append(_quantized(f"{name}[{{E}}]", members, fmt.name, e.dtype))
            continue
        if is_companion(name):
            continue
        slot = expert_slot(name)
        if slot is not None:
            by_key.setdefault(slot[0], {})[slot[1]] = name
        else:
            rest.append(name)
    for (key, fmt, dtype), members in quantized.items():
        skipped.append(_quantized(key, tuple(members[i] for i in sorted(members)), fmt, dtype))
    groups = []
    for key, members in by_key.items():
        order = sorted(members)
        names = tuple(members[i] for i in order)
        reason = _disqualify(names, entries)
        if reason:
            skipped.append(Skipped(key, names, reason))
            continue
        first = entries[names[0]]
        groups.append(ExpertGroup(key, tuple(Member(n) for n in names), tuple(order),
                                  first.dtype, first.shape))
    hint = expert_count_hint(config)
    for name in rest:
        group = _fused_group(entries[name], hint)
        if group is not None:
            groups.append(group)
    shared = {g.key: _shared_candidates(g, entries) for g in groups}
    return Found(groups, skipped, {k: v for k, v in shared.items() if v})


def _quantized(key: str, members: tuple[str, ...], fmt: str, dtype: str) -> Skipped:
    return Skipped(key, members, f"already quantized: {dtype} {fmt}; {REASON}", fmt)


def quantized_summary(skipped: list[Skipped]) -> list[str]:
    """One line per format of the experts that are already quantized."""
    by_format: dict[str, list[Skipped]] = {}
    for s in skipped:
        if s.quantized:
            by_format.setdefault(s.quantized, []).append(s)
    return [f"{sum(len(s.members) for s in found)} expert matrices in {len(found)} groups are "
            f"already quantized ({fmt}; e.g. {found[0].key}): {REASON}"
            for fmt, found in by_format.items()]


def nothing_to_compress(found: Found) -> str | None:
    """Why no group can be compressed, when none was found; None when there are groups."""
    if found.groups:
        return None
    formats = list(dict.fromkeys(s.quantized for s in found.skipped if s.quantized))
    if formats:
        return (f"the experts are already quantized ({'; '.join(formats)}) and ders does not "
                "decompress other formats yet")
    if found.skipped:
        s = found.skipped[0]
        if len(found.skipped) > 1:
            return (f"no expert group qualifies ({len(found.skipped)} candidates, e.g. "
                    f"{s.key}: {s.reason})")
        return f"no expert group qualifies (one candidate, {s.key}: {s.reason})"
    return ("no expert groups found: ders finds experts by their names and shapes "
            "(ders_cli/families.py lists the known layouts)")


def _disqualify(names: tuple[str, ...], entries: dict[str, TensorEntry]) -> str:
    first = entries[names[0]]
    if len(names) < 2:
        return "only one expert"
    if any(entries[n].shape != first.shape for n in names):
        return "experts differ in shape: not copies of one FFN"
    if any(entries[n].dtype != first.dtype for n in names):
        return "experts differ in dtype"
    if first.dtype not in FLOAT_DTYPES:
        return f"{first.dtype} experts pass through (ders decomposes {', '.join(FLOAT_DTYPES)})"
    if len(first.shape) < 2:
        return "per-expert vectors (biases, norms) pass through"
    if first.numel == 0:
        return "empty tensors"
    return ""


def _fused_group(e: TensorEntry, hint: int | None) -> ExpertGroup | None:
    parts = e.name.split(".")
    under_experts = any(p in VOCABULARY.containers for p in parts)
    if e.dtype not in FLOAT_DTYPES or e.numel == 0:
        return None
    if len(e.shape) >= 3 and (under_experts or any(p in VOCABULARY.fused for p in parts)):
        count, shape = e.shape[0], e.shape[1:]
    elif (len(e.shape) == 2 and under_experts and hint is not None and e.shape[0] % hint == 0
          and e.shape[0] > hint):
        count, shape = hint, (e.shape[0] // hint, e.shape[1])  # DBRX: [E*I, H] as [E, I, H]
    else:
        return None
    if count < 2:
        return None
    members = tuple(Member(e.name, i, count) for i in range(count))
    return ExpertGroup(f"{e.name}[{{E}}]", members, tuple(range(count)), e.dtype, tuple(shape))


def _shared_candidates(g: ExpertGroup, entries: dict[str, TensorEntry]) -> tuple[Member, ...]:
    """Always-on FFN tensors of the same layer, role, dtype and shape as the group's experts
    (Med-MoE's meta_moe, Qwen2-MoE's shared_expert, DeepSeek's shared_experts, ...): the
    candidates of extended DeRS. Similarity decides later whether they join."""
    first = g.members[0]
    if first.slice is not None:
        return ()
    key = g.key
    for form in ("{E}", "expert_{E}"):
        if f".{form}." in key:
            head, suffix = key.split(f".{form}.", 1)
            break
    else:
        return ()
    parts = head.split(".")
    container = max(i for i, p in enumerate(parts) if p in VOCABULARY.containers)
    out = []
    for depth in range(container, 0, -1):
        ancestor = ".".join(parts[:depth])
        for shared in VOCABULARY.shared:
            name = f"{ancestor}.{shared}.{suffix}"
            e = entries.get(name)
            if e is not None and e.shape == g.shape and e.dtype == g.dtype:
                out.append(Member(name))
    return tuple(dict.fromkeys(out))


def with_members(g: ExpertGroup, extra: tuple[Member, ...]) -> ExpertGroup:
    """The group with ``extra`` members (joined shared FFNs) after its experts."""
    return replace(g, members=g.members + extra,
                   experts=g.experts + tuple(-1 - i for i in range(len(extra))))
