"""What compress decides per group: its setting, and whether it is an upcycled group at all.

A setting per group instead of one for all: ``--max-error`` and ``--target-size`` walk one
ladder of settings, ordered by the bytes they store and measured on real upcycled weights to be
ordered by error the other way (bench/quality.py): 1% of each delta kept unscaled in 4 bits
(close to the base alone, at 0.04 bits an element), then 1, 2, 3, 4 and 8 bits. Every rung has
a random mask or none, so its size is known before encoding (bases counted raw: the archive
comes out smaller by what coding them saves).

``--max-error E`` encodes a group at each rung from the cheapest up and keeps the first whose
every member is within E, or lossless storage when that is smaller (or nothing else is within
E). ``--target-size F`` needs no trial: stored sizes are known before any data is read, so the
budget left after everything that passes through is spread over the groups, each taking the
richest rung that fits.

A group is decomposed only when every member is close to its base (cosine ``threshold`` or
more, measured by the encoder on the way): experts trained from scratch lose far more to a
delta codec than upcycled ones, so they are stored as they are unless ``all_groups``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from .checkpoint import Checkpoint
from .codecs import CodecSpec, LosslessSpec, QuantSpec, SparseSpec
from .decompose import EncodedGroup, GivenEncoding
from .detect import Found, with_members
from .errors import InputError, UsageError
from .plan import estimate_header, group_bytes

LADDER: tuple[CodecSpec, ...] = (
    SparseSpec(0.99, rescale="none", value_bits=4),
    QuantSpec(1), QuantSpec(2), QuantSpec(3), QuantSpec(4), QuantSpec(8),
)
# From this rung up, --max-error also tries lossless and keeps the smaller (the lossless codec
# compresses the base too: on real upcycled weights it stores less than 2 bits does).
LOSSLESS_FROM = 2


@dataclass(frozen=True)
class TargetSpec:
    """Choose per group: the cheapest rung within ``max_error`` (relative Frobenius error of
    every member), or the richest rungs that keep the archive within ``target_size`` (a
    fraction of the checkpoint's bytes)."""

    max_error: float | None = None
    target_size: float | None = None
    codec: str = field(default="auto", init=False)

    def check(self) -> None:
        if (self.max_error is None) == (self.target_size is None):
            raise UsageError("give one of max_error and target_size")
        if self.max_error is not None and not self.max_error > 0.0:
            raise UsageError(f"max_error must be positive, got {self.max_error}",
                             param="max_error")
        if self.target_size is not None and not 0.0 < self.target_size <= 1.0:
            raise UsageError(f"target_size must be in (0, 100%], got {self.target_size:.1%}",
                             param="target_size")

    @property
    def label(self) -> str:
        if self.max_error is not None:
            return f"max error {self.max_error:g}"
        return f"target {self.target_size:.0%}"


def parse_fraction(text: str) -> float:
    """'25%' or '0.25' -> 0.25."""
    try:
        return float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        raise UsageError(f"target_size takes a percentage like 25% or a fraction like "
                         f"0.25, got {text!r}", param="target_size") from None


def plan_target(ckpt: Checkpoint, found: Found, fraction: float) -> dict[str, CodecSpec]:
    """A rung per group so that the archive is at most ``fraction`` of the checkpoint: all
    groups climb together while the whole ladder step fits, then the remaining budget lifts
    groups one by one (largest first). Raises when even the lowest rung does not fit."""
    grouped = {t for g in found.groups for t in g.tensors}
    reserve = estimate_header(ckpt, found)
    fixed = 8 + reserve + (-reserve % 8) + sum(len(s.header.raw) for s in ckpt.shards)
    fixed += ckpt.side_bytes + sum(e.nbytes for n, (_, e) in ckpt.where.items()
                                   if n not in grouped)
    original = ckpt.disk_bytes
    budget = fraction * original - fixed
    # Plan as if every shared-FFN candidate joined: the larger of the two outcomes.
    groups = [with_members(g, found.shared.get(g.key, ())) for g in found.groups]
    sizes = [[group_bytes(g, spec) for spec in LADDER] for g in groups]
    level = [0] * len(groups)
    if sum(s[0] for s in sizes) > budget:
        smallest = (fixed + sum(s[0] for s in sizes)) / original
        raise InputError(f"a target size of {fraction:.1%} is below the smallest archive "
                         f"ders can write for this model: {smallest:.1%}", ckpt.root)
    for rung in range(1, len(LADDER)):
        if sum(s[rung] for s in sizes) <= budget:
            level = [rung] * len(groups)
    spent = sum(s[lv] for s, lv in zip(sizes, level, strict=True))
    for i in sorted(range(len(groups)), key=lambda i: -groups[i].nbytes):
        if level[i] + 1 < len(LADDER):
            extra = sizes[i][level[i] + 1] - sizes[i][level[i]]
            if spent + extra <= budget:
                level[i] += 1
                spent += extra
    return {g.key: LADDER[lv] for g, lv in zip(found.groups, level, strict=True)}


class Trial(NamedTuple):
    """A group encoded with one setting: the encoding and its stored base (array, dtype)."""

    setting: CodecSpec | GivenEncoding
    encoded: EncodedGroup
    base: torch.Tensor
    base_dtype: str

    @property
    def stored_bytes(self) -> int:
        return self.base.numel() * self.base.element_size() + sum(
            t.numel() * t.element_size() for t in self.encoded.arrays.values())


@dataclass(frozen=True)
class NotUpcycled:
    """A group with a member too far from its base, and what becomes of it."""

    reason: str
    stored_as_is: bool  # False with all_groups: compressed anyway


@dataclass(frozen=True)
class Policy:
    """The decisions of one compress run: ``spec`` for every group or per group (a TargetSpec,
    with ``planned`` rungs for --target-size), and the upcycled test (``threshold``,
    ``all_groups``)."""

    spec: CodecSpec | TargetSpec
    threshold: float
    all_groups: bool
    planned: Mapping[str, CodecSpec] = field(default_factory=dict)

    @classmethod
    def for_run(cls, ckpt: Checkpoint, found: Found, spec: CodecSpec | TargetSpec,
                threshold: float, all_groups: bool) -> Policy:
        """The policy for ``spec``; --target-size plans every group's rung here, before any
        weight is read."""
        planned: Mapping[str, CodecSpec] = {}
        if isinstance(spec, TargetSpec) and spec.target_size is not None:
            planned = plan_target(ckpt, found, spec.target_size)
        return cls(spec, threshold, all_groups, planned)

    def verdict(self, cos_to_base: Sequence[float]) -> NotUpcycled | None:
        """None for an upcycled group; otherwise why not, and whether it is stored as it is."""
        worst = min(cos_to_base)
        if worst >= self.threshold:
            return None
        return NotUpcycled(f"not upcycled: an expert has cosine {worst:.4f} to the base "
                           f"(< {self.threshold})", not self.all_groups)

    def choose(self, key: str, encode: Callable[[CodecSpec], Trial]) -> Trial:
        """The encoding of group ``key``: with the setting asked for, the one planned for
        --target-size, or for --max-error the cheapest rung of the ladder within it, or
        lossless when that stores fewer bytes."""
        if not isinstance(self.spec, TargetSpec):
            return encode(self.spec)
        if self.spec.max_error is None:
            return encode(self.planned[key])
        met = len(LADDER)  # the rung that meets the limit; past the end when none does
        for i, spec in enumerate(LADDER):
            trial = encode(spec)
            verdict = self.verdict(trial.encoded.cos_to_base)
            if verdict is not None and verdict.stored_as_is:
                return trial  # not upcycled: stored as it is whatever the setting
            if max(trial.encoded.limit_errors) <= self.spec.max_error:
                met = i
                break
        if met >= LOSSLESS_FROM:  # the rungs of 2 bits and up can lose to lossless in size
            exact = encode(LosslessSpec())
            if met == len(LADDER) or exact.stored_bytes < trial.stored_bytes:
                return exact
        return trial
