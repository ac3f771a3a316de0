"""Decompose and Synthesis on one group in memory: W_i = W_base + F(delta_i).

``encode_group`` turns a group's members into a base and codec arrays and measures what the
reconstruction will be; ``synthesize`` rebuilds one member. Both the writer's measurement and
every later reader go through ``synthesize``, so the checksum of a reconstruction recorded at
compression time is what ``expand`` must reproduce.
"""

from __future__ import annotations

import hashlib
import math
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from .codecs import (
    ExactCodec,
    ExactDelta,
    LosslessCodec,
    LowRankCodec,
    QuantCodec,
    SparseCodec,
    SparseDelta,
    compute_dtype,
    get_codec,
)
from .codecs.quant import METHODS
from .codecs.sparse import MASKS, RESCALES
from .constants import DEFAULT_GROUP_SIZE, QUANT_BITS
from .errors import UsageError
from .finite import all_finite
from .profile import stage
from .records import ExpertGroup
from .safetensors_io import DTYPE_NAMES, tensor_bytes
from .stats import cos_from_norms, norm


@dataclass(frozen=True)
class SparseSpec:
    """DeRS sparsification: drop a fraction ``drop`` of each delta.

    ``mask``: "random" (the paper's, regenerated from a seed) or "magnitude" (the largest
    |delta|, positions stored). ``rescale`` of the kept values: "inverse" (n/k, the paper's),
    "none" or "norm"; default "inverse" for random masks, "none" for magnitude ones.
    ``value_bits``: quantize the kept values too (drop then quantize), per ``value_group``.
    """

    drop: float
    seed: int = 0
    mask: str = "random"
    rescale: str | None = None
    value_bits: int | None = None
    value_group: int = DEFAULT_GROUP_SIZE
    codec: str = field(default=SparseCodec.name, init=False)

    def check(self) -> None:
        if not 0.0 <= self.drop < 1.0:
            raise UsageError(f"--drop must be in [0, 1), got {self.drop}")
        if not 0 <= self.seed < 2**63:
            raise UsageError(f"--seed must be in [0, 2^63), got {self.seed}")
        if self.mask not in MASKS:
            raise UsageError(f"--mask must be one of {', '.join(MASKS)}, got {self.mask!r}")
        if self.rescale is not None and self.rescale not in RESCALES:
            raise UsageError(f"--rescale must be one of {', '.join(RESCALES)}, "
                             f"got {self.rescale!r}")
        if self.value_bits is not None:
            QuantSpec(self.value_bits, self.value_group).check()

    def params(self, group: ExpertGroup) -> dict:
        return SparseCodec.params(self.drop, group.numel, member_seeds(self.seed, group),
                                  self.mask, self.rescale, self.value_bits, self.value_group)

    @property
    def label(self) -> str:
        return sparse_label(self.drop, self.mask, self.rescale, self.value_bits)


@dataclass(frozen=True)
class QuantSpec:
    """DeRS quantization of each delta to ``bits`` bits, per group of ``group_size`` elements;
    ``method`` "mse" (default: clip search and least-squares refit) or "rtn" (min/max)."""

    bits: int
    group_size: int = DEFAULT_GROUP_SIZE
    method: str = "mse"
    codec: str = field(default=QuantCodec.name, init=False)

    def check(self) -> None:
        if self.bits not in QUANT_BITS:
            raise UsageError(f"--bits must be one of {', '.join(map(str, QUANT_BITS))}, "
                             f"got {self.bits}")
        if self.group_size < 1:
            raise UsageError(f"--group-size must be at least 1, got {self.group_size}")
        if self.method not in METHODS:
            raise UsageError(f"--method must be one of {', '.join(METHODS)}, "
                             f"got {self.method!r}")

    def params(self, group: ExpertGroup) -> dict:
        return QuantCodec.params(self.bits, self.group_size, self.method)

    @property
    def label(self) -> str:
        return f"{self.bits}-bit" + ("" if self.method == "mse" else f" {self.method}")


@dataclass(frozen=True)
class LosslessSpec:
    """Every expert bit for bit: the base plus a zstd-coded residual of each expert's bits."""

    codec: str = field(default=LosslessCodec.name, init=False)

    def check(self) -> None:
        pass  # nothing to choose

    def params(self, group: ExpertGroup) -> dict:
        return LosslessCodec.params()

    @property
    def label(self) -> str:
        return "lossless"


CodecSpec = SparseSpec | QuantSpec | LosslessSpec


def sparse_label(drop: float, mask: str, rescale: str | None, value_bits: int | None) -> str:
    """"drop 0.9", "drop 0.9 magnitude", "drop 0.9 +4-bit", ... (defaults left out)."""
    label = f"drop {drop:g}"
    if mask != "random":
        label += f" {mask}"
    if rescale is not None and rescale != ("inverse" if mask == "random" else "none"):
        label += f" rescale {rescale}"
    if value_bits is not None:
        label += f" +{value_bits}-bit"
    return label


def codec_label(codec: dict) -> str:
    """A short human name for a manifest codec record: "drop 0.9", "2-bit"."""
    params = codec.get("params", {})
    if codec.get("name") == SparseCodec.name:
        values = params.get("values") or {}
        return sparse_label(params.get("drop", 0.0), params.get("mask", "random"),
                            params.get("rescale"), values.get("bits"))
    if codec.get("name") == QuantCodec.name:
        method = params.get("method", "rtn")
        return f"{params.get('bits')}-bit" + ("" if method == "mse" else f" {method}")
    if codec.get("name") == LowRankCodec.name:
        return f"rank {params.get('rank')}"
    return str(codec.get("name"))


def member_seeds(seed: int, group: ExpertGroup) -> list[int]:
    """A mask seed per member, from the user's seed and the member's name: distinct masks for
    every expert, and the same archive for the same inputs."""
    out = []
    for m in group.members:
        digest = hashlib.sha256(f"ders-mask:{seed}:{m.label}".encode()).digest()
        out.append(int.from_bytes(digest[:8], "little"))
    return out


@dataclass
class EncodedGroup:
    base: torch.Tensor  # in the group's dtype and shape
    arrays: dict[str, torch.Tensor]  # by codec suffix
    params: dict
    recon_sha256: list[str]
    rel_error: list[float]  # ||W - W_hat|| / ||W||
    cos: list[float]  # cosine of W_hat to W
    cos_to_base: list[float]  # cosine of W to the base


@dataclass
class GivenEncoding:
    """A group's base and codec arrays computed elsewhere (the shared FFN and the deltas of a
    DeRS-trained model): ``compress`` stores them as they are and measures them like its own."""

    group: ExpertGroup
    base: torch.Tensor  # in the group's dtype and shape
    codec: str
    params: dict
    arrays: dict[str, torch.Tensor]  # by codec suffix, one row per member
    base_kind: str = "shared"

    @property
    def label(self) -> str:
        return codec_label({"name": self.codec, "params": self.params})


def synthesize(base: torch.Tensor, codec: str, params: dict, rows: dict[str, torch.Tensor],
               member: int, dtype: str, base_c: torch.Tensor | None = None,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """One member, flattened, in the group's dtype: cast(base + decoded delta) wherever the
    delta is defined, the base's own bits elsewhere. ``base_c`` is the base already in the
    compute dtype, when the caller synthesizes several members; ``out`` a flat buffer of the
    group's dtype to write the member into (reused buffers save a page fault per element)."""
    cd = compute_dtype(dtype)
    flat = base.reshape(-1)
    delta = get_codec(codec).decode(rows, params, member, flat.numel(), dtype)
    if out is None:
        out = torch.empty_like(flat)
    if isinstance(delta, ExactDelta):
        return out.copy_(delta.apply(flat))
    if isinstance(delta, SparseDelta):
        pos = delta.positions
        kept = torch.index_select(flat if base_c is None else base_c, 0, pos).to(cd)
        return out.copy_(flat).index_copy_(0, pos, (kept + delta.values).to(base.dtype))
    if base_c is None:
        base_c = flat.to(cd)
    return out.copy_(delta.add_(base_c))


RECON_BUFFERS = 3  # reconstructions in flight: one being built, the others being hashed


class NonFiniteMember(ValueError):
    """Member ``index`` of a group holds a NaN or an infinity."""

    def __init__(self, index: int) -> None:
        super().__init__(f"member {index} holds NaN or Inf")
        self.index = index


def encode_group(members: torch.Tensor, base: torch.Tensor, dtype: str, codec: str,
                 params: dict, hash_pool: ThreadPoolExecutor | None = None,
                 device: torch.device | None = None) -> EncodedGroup:
    """Encode ``[N, ...]`` members against ``base`` and measure each reconstruction.

    One member at a time through buffers allocated once per group (a fresh 15 MB tensor costs
    more in page faults than the arithmetic on it): memory is the group itself plus a few
    members. Reconstructions are built from what the codec says decoding will give (the
    arithmetic of ``synthesize``); their sha256 is taken on ``hash_pool`` if given, while the
    next member is encoded. The arrays come back on the CPU.
    """
    n_members = members.shape[0]
    flat = members.reshape(n_members, -1)
    cd = compute_dtype(dtype)
    impl = get_codec(codec)
    impl.validate(params, n_members, flat.shape[1])
    base_flat = base.reshape(-1).to(device or base.device)
    base_c = base_flat.to(cd)
    base_norm = norm(base_c)
    w, delta = torch.empty_like(base_c), torch.empty_like(base_c)
    ring = [torch.empty(flat.shape[1], dtype=members.dtype) for _ in range(RECON_BUFFERS)]
    rows, shas, rel_error, cos, cos_base = [], [], [], [], []
    for i in range(n_members):
        with stage("measure"):
            w.copy_(flat[i])
            w_norm = norm(w)
            # A NaN or an infinity makes the norm non-finite: the check costs no pass of its
            # own. (So can squares that overflow: then the exact test decides.)
            if not math.isfinite(w_norm) and not all_finite(flat[i]):
                raise NonFiniteMember(i)
            d_norm = norm(torch.sub(w, base_c, out=delta))
            cos_base.append(_six(cos_from_norms(w_norm, base_norm, d_norm)))
        with stage("codec"):
            if issubclass(impl, ExactCodec):
                row, decoded = impl.encode_exact(flat[i], base_flat, dtype, params, i)
            else:
                # Codecs may overwrite ``delta`` but keep no reference to it in their rows.
                row, decoded = impl.encode_member(delta, dtype, params, i)
        rows.append(row)
        recon = ring[i % RECON_BUFFERS]
        if i >= RECON_BUFFERS and isinstance(shas[i - RECON_BUFFERS], Future):
            shas[i - RECON_BUFFERS].result()  # its hash has read the buffer: it is free again
        with stage("measure"):
            if isinstance(decoded, ExactDelta):
                exact, r_norm, e_norm = _exact_recon(base_flat, w, decoded)
                recon.copy_(exact)
            elif isinstance(decoded, SparseDelta):
                r_norm, e_norm = _sparse_recon(base_flat, base_c, base_norm, w, d_norm,
                                               decoded, recon)
            else:
                r_norm, e_norm = _dense_recon(base_c, w, decoded, recon)
        view = tensor_bytes(recon)
        shas.append(hash_pool.submit(_sha, view, recon) if hash_pool else _sha(view, recon))
        rel_error.append(_six(e_norm / w_norm if w_norm else 0.0))
        cos.append(_six(cos_from_norms(r_norm, w_norm, e_norm)))
        del decoded
    with stage("codec"):
        arrays, params = impl.combine(rows, params, flat.shape[1])
    arrays = {k: v.cpu() for k, v in arrays.items()}
    recon_sha = [s.result() if isinstance(s, Future) else s for s in shas]
    return EncodedGroup(base, arrays, params, recon_sha, rel_error, cos, cos_base)


def _dense_recon(base_c: torch.Tensor, w: torch.Tensor, decoded: torch.Tensor,
                 recon: torch.Tensor) -> tuple[float, float]:
    """Write the reconstruction (group dtype) into ``recon``; return its norm and the norm of
    its error. ``decoded`` is the codec's own tensor: used as scratch."""
    recon.copy_(decoded.add_(base_c))
    recon_c = decoded.copy_(recon)  # back in the compute dtype, as rounded
    r_norm = norm(recon_c)
    return r_norm, norm(recon_c.sub_(w))


def _exact_recon(base_flat: torch.Tensor, w: torch.Tensor, decoded: ExactDelta
                 ) -> tuple[torch.Tensor, float, float]:
    """As ``_dense_recon`` for an exact codec: the member from the base's bits, no arithmetic."""
    recon = decoded.apply(base_flat)
    recon_c = recon.to(w.dtype, copy=True)  # a copy: the reconstruction is hashed meanwhile
    return recon, norm(recon_c), norm(recon_c.sub_(w))


def _sparse_recon(base_flat: torch.Tensor, base_c: torch.Tensor, base_norm: float,
                  w: torch.Tensor, d_norm: float, decoded: SparseDelta, recon: torch.Tensor
                  ) -> tuple[float, float]:
    """As ``_dense_recon`` for a delta defined at a few positions: only those are touched.
    Elsewhere the reconstruction is the base, so its error there is the delta itself and the
    norms follow from sums over the kept positions."""
    pos = decoded.positions
    kept_base = torch.index_select(base_c, 0, pos)
    kept = (kept_base + decoded.values).to(base_flat.dtype)
    recon.copy_(base_flat).index_copy_(0, pos.cpu(), kept.cpu())
    kept_c, kept_w = kept.to(base_c.dtype), torch.index_select(w, 0, pos)
    r2 = base_norm**2 - norm(kept_base) ** 2 + norm(kept_c) ** 2
    e2 = d_norm**2 - norm(kept_w - kept_base) ** 2 + norm(kept_c - kept_w) ** 2
    return max(r2, 0.0) ** 0.5, max(e2, 0.0) ** 0.5


def _sha(view: memoryview, keep_alive: torch.Tensor) -> str:
    del keep_alive  # held by the caller until the hash is done
    with stage("hash"):
        return hashlib.sha256(view).hexdigest()


def _six(x: float) -> float:
    # Six significant digits: enough to report, and the same on every platform.
    return float(f"{x:.6g}")


def measure_group(members: torch.Tensor, given: GivenEncoding) -> EncodedGroup:
    """Synthesize every member from a given base and arrays, and measure it against
    ``members`` (the checkpoint's tensors) as ``encode_group`` measures its own encodings."""
    g, n_members = given.group, members.shape[0]
    flat = members.reshape(n_members, -1)
    impl = get_codec(given.codec)
    impl.validate(given.params, n_members, flat.shape[1])
    planned = impl.arrays(given.params, n_members, flat.shape[1], g.dtype)
    got = {k: (DTYPE_NAMES[v.dtype], tuple(v.shape)) for k, v in given.arrays.items()}
    if got != planned:
        raise ValueError(f"{given.codec} arrays {got} differ from what the codec stores: "
                         f"{planned}")
    cd = compute_dtype(g.dtype)
    base_flat = given.base.reshape(-1)
    base_c = base_flat.to(cd)
    base_norm = norm(base_c)
    shas, rel_error, cos, cos_base = [], [], [], []
    for i in range(n_members):
        rows = impl.member_rows(given.arrays, given.params, i)
        w_hat = synthesize(given.base, given.codec, given.params, rows, i, g.dtype, base_c)
        shas.append(hashlib.sha256(tensor_bytes(w_hat)).hexdigest())
        w, hc = flat[i].to(cd), w_hat.to(cd)
        w_norm, e_norm = norm(w), norm(hc - w)
        cos_base.append(_six(cos_from_norms(w_norm, base_norm, norm(w - base_c))))
        rel_error.append(_six(e_norm / w_norm if w_norm else 0.0))
        cos.append(_six(cos_from_norms(norm(hc), w_norm, e_norm)))
    return EncodedGroup(given.base, given.arrays, given.params, shas, rel_error, cos, cos_base)
