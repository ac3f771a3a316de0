"""Loading one expert group and deciding what it is: its members' weights, the shared FFNs
that join it (extended DeRS), its base, and how close every member is to that base."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .checkpoint import Checkpoint
from .codecs import compute_dtype
from .dense_base import DenseMatcher
from .detect import with_members
from .digests import Digest
from .dtypes import TORCH_DTYPES
from .errors import InputError
from .finite import all_finite
from .groups import TensorSource
from .lanes import Workers
from .profile import stage
from .records import ExpertGroup, Member
from .stats import cosine, mean_base, member_stats


@dataclass(frozen=True)
class SharedCandidate:
    member: Member
    cos: float  # to the mean of the experts
    joined: bool


@dataclass
class LoadedGroup:
    group: ExpertGroup  # with the shared FFNs that joined, after the experts
    weights: torch.Tensor  # [members, *shape] in the group's dtype
    shas: dict[str, str]  # checksum of every tensor the members live in (empty: not taken)
    base: torch.Tensor  # in the group's dtype and shape
    base_record: dict  # {"kind": "mean"} or {"kind": "dense", "source": description}
    shared: list[SharedCandidate] = field(default_factory=list)
    _stats: tuple[torch.Tensor, torch.Tensor] | None = None

    def stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per member: cosine to the base, and relative norm of the delta."""
        if self._stats is None:
            self._stats = member_stats(self.weights, self.base)
        return self._stats

    @property
    def base_label(self) -> str:
        """'mean', or 'dense ' and the dense weight it came from."""
        if self.base_record["kind"] == "mean":
            return "mean"
        return f"dense {self.base_record['source']}"

    @property
    def min_cos(self) -> float:
        return float(self.stats()[0].min())

    def flat(self) -> torch.Tensor:
        """Members as [N, numel] in the compute dtype (a new tensor)."""
        return self.weights.reshape(len(self.group.members), -1).to(
            compute_dtype(self.group.dtype), copy=True)


def read_members(files: TensorSource, ckpt: Checkpoint, members: tuple[Member, ...],
                 dtype: str, shape: tuple[int, ...], check_finite: bool = True,
                 digest: Digest | None = None) -> tuple[torch.Tensor, dict[str, str]]:
    """Members as one ``[N, *shape]`` tensor, and the checksum (of ``digest``; none without
    one) of each tensor they live in (a fused tensor's slices, hashed in order, are the whole
    tensor). ``check_finite``: refuse a NaN or Inf here (callers that compute norms anyway
    check those instead)."""
    out = torch.empty((len(members), *shape), dtype=TORCH_DTYPES[dtype])
    flat = out.view(len(members), -1).view(torch.uint8)
    views = []
    with stage("read"):
        for i, m in enumerate(members):
            offset, _ = m.byte_range(0, ckpt.entry(m.tensor).nbytes)
            views.append(memoryview(flat[i].numpy()))
            files.read_into(m.tensor, offset, views[i])
    shas = {}
    with stage("hash"):  # the bytes just read, in memory: never a second read
        for name in dict.fromkeys(m.tensor for m in members) if digest else ():
            parts = sorted((m.slice or 0, i) for i, m in enumerate(members) if m.tensor == name)
            sha = digest.new()
            for _, i in parts:
                sha.update(views[i])
            shas[name] = sha.hexdigest()
    if check_finite and not all_finite(out):
        bad = next(i for i in range(len(members)) if not all_finite(out[i]))
        raise non_finite(files, members[bad])
    return out, shas


def non_finite(files: TensorSource, member: Member) -> InputError:
    return InputError(f"tensor {member.label!r} contains NaN or Inf; ders will not decompose it",
                      files.path_of(member.tensor))


@dataclass
class Fetched:
    """A group's bytes as read from disk, before any arithmetic: what the reader lane does."""

    group: ExpertGroup
    weights: torch.Tensor
    shas: dict[str, str]
    candidates: list[tuple[Member, torch.Tensor, dict[str, str]]]


def fetch_group(files: TensorSource, ckpt: Checkpoint, g: ExpertGroup,
                candidates: tuple[Member, ...] = (), check_finite: bool = True,
                digest: Digest | None = None) -> Fetched:
    """Read a group's members and its shared-FFN candidates (I/O, and checksums of ``digest``
    when given)."""
    weights, shas = read_members(files, ckpt, g.members, g.dtype, g.shape, check_finite, digest)
    extra = [(c, *read_members(files, ckpt, (c,), g.dtype, g.shape, digest=digest))
             for c in candidates]
    return Fetched(g, weights, shas, extra)


def prepare_group(f: Fetched, *, threshold: float, matcher: DenseMatcher | None = None,
                  use_shared: bool = True, workers: Workers | None = None) -> LoadedGroup:
    """Let same-shape shared FFNs that are as similar as the experts join the group, and
    choose its base (the mean, or the dense checkpoint's FFN); means on ``workers``."""
    g, weights, shas = f.group, f.weights, dict(f.shas)
    cd = compute_dtype(g.dtype)
    shared = []
    if f.candidates:
        experts_mean = mean_base(weights, workers).reshape(-1).to(cd)
        joined = []
        for c, t, sha in f.candidates:
            cos = cosine(t.to(cd), experts_mean)
            join = use_shared and cos >= threshold
            shared.append(SharedCandidate(c, cos, join))
            if join:
                joined.append(c)
                weights = torch.cat([weights, t])
                shas.update(sha)
        g = with_members(g, tuple(joined))
    base = mean = mean_base(weights, workers)
    base_record: dict = {"kind": "mean"}
    if matcher is not None:
        source, base, _ = matcher.match(g, mean)
        base_record = {"kind": "dense", "source": source}
    return LoadedGroup(g, weights, shas, base, base_record, shared)


def load_group(files: TensorSource, ckpt: Checkpoint, g: ExpertGroup,
               candidates: tuple[Member, ...] = (), *, threshold: float,
               matcher: DenseMatcher | None = None, use_shared: bool = True) -> LoadedGroup:
    """Read a group and decide what it is (``fetch_group`` then ``prepare_group``), without
    checksums."""
    return prepare_group(fetch_group(files, ckpt, g, candidates), threshold=threshold,
                         matcher=matcher, use_shared=use_shared)
