"""Decompose and Synthesis on one group in memory: W_i = W_base + F(delta_i).

``encode_group`` turns a group's members into a base and codec arrays and measures what the
reconstruction will be; ``synthesize`` rebuilds one member. Both the writer's measurement and
every later reader go through ``synthesize``, so the checksum of a reconstruction recorded at
compression time is what ``expand`` must reproduce.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch

from .codecs import LowRankCodec, QuantCodec, SparseCodec, compute_dtype, get_codec
from .constants import DEFAULT_GROUP_SIZE, QUANT_BITS
from .errors import UsageError
from .records import ExpertGroup
from .safetensors_io import DTYPE_NAMES, tensor_bytes
from .stats import cosines_to, relative_norms


@dataclass(frozen=True)
class SparseSpec:
    """DeRS sparsification: drop a fraction ``drop`` of each delta, rescale the rest."""

    drop: float
    seed: int = 0
    codec: str = field(default=SparseCodec.name, init=False)

    def check(self) -> None:
        if not 0.0 <= self.drop < 1.0:
            raise UsageError(f"--drop must be in [0, 1), got {self.drop}")
        if not 0 <= self.seed < 2**63:
            raise UsageError(f"--seed must be in [0, 2^63), got {self.seed}")

    def params(self, group: ExpertGroup) -> dict:
        return SparseCodec.params(self.drop, group.numel, member_seeds(self.seed, group))

    @property
    def label(self) -> str:
        return f"drop {self.drop:g}"


@dataclass(frozen=True)
class QuantSpec:
    """DeRS quantization of each delta to ``bits`` bits, per group of ``group_size`` elements."""

    bits: int
    group_size: int = DEFAULT_GROUP_SIZE
    codec: str = field(default=QuantCodec.name, init=False)

    def check(self) -> None:
        if self.bits not in QUANT_BITS:
            raise UsageError(f"--bits must be one of {', '.join(map(str, QUANT_BITS))}, "
                             f"got {self.bits}")
        if self.group_size < 1:
            raise UsageError(f"--group-size must be at least 1, got {self.group_size}")

    def params(self, group: ExpertGroup) -> dict:
        return QuantCodec.params(self.bits, self.group_size)

    @property
    def label(self) -> str:
        return f"{self.bits}-bit"


CodecSpec = SparseSpec | QuantSpec


def codec_label(codec: dict) -> str:
    """A short human name for a manifest codec record: "drop 0.9", "2-bit"."""
    params = codec.get("params", {})
    if codec.get("name") == SparseCodec.name:
        return f"drop {params.get('drop'):g}"
    if codec.get("name") == QuantCodec.name:
        return f"{params.get('bits')}-bit"
    if codec.get("name") == LowRankCodec.name:
        return f"rank {params.get('rank')}"
    return str(codec.get("name"))


def member_seeds(seed: int, group: ExpertGroup) -> list[int]:
    """A mask seed per member, from the user's seed and the group's name: distinct masks for
    every expert, and the same archive for the same inputs."""
    out = []
    for e in group.experts:
        digest = hashlib.sha256(f"ders-mask:{seed}:{group.key}:{e}".encode()).digest()
        out.append(int.from_bytes(digest[:8], "little"))
    return out


@dataclass
class EncodedGroup:
    base: torch.Tensor  # in the group's dtype and shape
    arrays: dict[str, torch.Tensor]  # by codec suffix
    params: dict
    recon_sha256: list[str]
    rel_error: list[float]
    cos: list[float]


@dataclass(frozen=True)
class GivenEncoding:
    """A group's base and codec arrays computed elsewhere (the shared FFN and the deltas of a
    DeRS-trained model): ``compress`` stores them as they are and measures them like its own."""

    group: ExpertGroup
    base: torch.Tensor  # in the group's dtype and shape
    codec: str
    params: dict
    arrays: dict[str, torch.Tensor]  # by codec suffix, one row per member
    base_kind: str = "shared"


def synthesize(base: torch.Tensor, codec: str, params: dict, rows: dict[str, torch.Tensor],
               member: int, dtype: str) -> torch.Tensor:
    """One member, flattened, in the group's dtype: cast(base + decoded delta)."""
    cd = compute_dtype(dtype)
    delta = get_codec(codec).decode(rows, params, member, base.numel(), dtype)
    return (base.reshape(-1).to(cd) + delta).to(base.dtype)


def encode_group(members: torch.Tensor, base: torch.Tensor, dtype: str, codec: str,
                 params: dict) -> EncodedGroup:
    """Encode ``[N, ...]`` members against ``base`` and measure each reconstruction."""
    n_members = members.shape[0]
    flat = members.reshape(n_members, -1)
    cd = compute_dtype(dtype)
    base_c = base.reshape(-1).to(cd)
    deltas = flat.to(cd, copy=True)  # a copy even in cd: the members are read again below
    deltas -= base_c
    impl = get_codec(codec)
    impl.validate(params, n_members, flat.shape[1])
    arrays = impl.encode(deltas, dtype, params)
    del deltas
    return measure_group(members, base, dtype, codec, params, arrays)


def measure_group(members: torch.Tensor, base: torch.Tensor, dtype: str, codec: str, params: dict,
                  arrays: dict[str, torch.Tensor]) -> EncodedGroup:
    """Synthesize every member from ``base`` and ``arrays`` and measure it against ``members``."""
    n_members = members.shape[0]
    flat = members.reshape(n_members, -1)
    cd = compute_dtype(dtype)
    impl = get_codec(codec)
    impl.validate(params, n_members, flat.shape[1])
    planned = impl.arrays(params, n_members, flat.shape[1], dtype)
    got = {k: (DTYPE_NAMES[v.dtype], tuple(v.shape)) for k, v in arrays.items()}
    if got != planned:
        raise ValueError(f"{codec} arrays {got} differ from what the codec stores: {planned}")
    recon_sha, rel_error, cos = [], [], []
    for i in range(n_members):
        rows = {k: v[i] for k, v in arrays.items()}
        w_hat = synthesize(base, codec, params, rows, i, dtype)
        recon_sha.append(hashlib.sha256(tensor_bytes(w_hat)).hexdigest())
        w = flat[i].to(cd).reshape(1, -1)
        w_hat_c = w_hat.to(cd).reshape(1, -1)
        # Six significant digits: enough to report, and the same on every platform.
        rel_error.append(float(f"{float(relative_norms(w_hat_c - w, w)[0]):.6g}"))
        cos.append(float(f"{float(cosines_to(w_hat_c, w[0])[0]):.6g}"))
    return EncodedGroup(base, arrays, params, recon_sha, rel_error, cos)
