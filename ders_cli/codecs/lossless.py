"""Lossless: every member bit for bit, as the base plus a residual that zstd packs well.

A member's residual is the difference of its bits and the base's, both read as *ordered* words
(integers that sort like the floats they hold), zigzag-coded so that small differences of either
sign are small numbers. A fine-tuning delta of ~1% moves a bf16 weight a few units in the last
place: the residual's high byte is nearly always 0 and its low byte carries ~3.3 bits. (The XOR
of the bits is worse: one carry flips many bits. On real experts: 28% of the input against 25%.)

How many units in the last place a delta spans depends on the weight's exponent (the same delta
is more of them for a smaller weight), so the residual is stored in the order of the base's
exponent, and the encoder starts a zstd block where the exponent changes: each exponent's
residuals get entropy tables of their own (25% of the input becomes 20% on real experts). The
decoder knows the base, hence the order.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Mapping
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from ..constants import BASE_PLANES_ZSTD, CODEC_LOSSLESS, DTYPE_BITS, FLOAT_FIELDS
from .base import ArraySpec, CodecSpec, ExactCodec, ExactDelta, GroupShape
from .jit import kernel
from .planes import frame_pool, tensor_of, unpack_planes, words_of


def ordered(u: np.ndarray) -> np.ndarray:
    """Sign-magnitude float bits -> two's complement integers of the same order (-0 just below
    +0): the magnitude bits of negative numbers flipped. The map is its own inverse."""
    t = u.dtype.type
    top = t(8 * u.dtype.itemsize - 1)
    return u ^ ((u >> top) * t(np.iinfo(t).max >> 1))


def zigzag(d: np.ndarray) -> np.ndarray:
    """Two's complement words -> 0, -1, 1, -2, 2, ... as 0, 1, 2, 3, 4, ..."""
    t = d.dtype.type
    return (d << t(1)) ^ ((d >> t(8 * d.dtype.itemsize - 1)) * t(np.iinfo(t).max))


def unzigzag(z: np.ndarray) -> np.ndarray:
    t = z.dtype.type
    return (z >> t(1)) ^ ((z & t(1)) * t(np.iinfo(t).max))


def residual(member: np.ndarray, base: np.ndarray) -> np.ndarray:
    """zigzag(ordered(member) - ordered(base)), modulo 2^bits: defined for any bits."""
    return zigzag(ordered(member) - ordered(base))


def restore(res: np.ndarray, base: np.ndarray) -> np.ndarray:
    """The member's bits from its residual: the inverse of ``residual``."""
    return ordered(ordered(base) + unzigzag(res))


def exponent_order(base: np.ndarray, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """The element indices in ascending order of the base's exponent field, ties by index, and
    where each exponent's run begins in that order. (The codec itself never builds this order:
    its kernels place each element at its rank as they go, see ``sorted_planes``.)"""
    exp_bits, mant_bits = FLOAT_FIELDS[dtype]
    key = ((base >> base.dtype.type(mant_bits)) & base.dtype.type((1 << exp_bits) - 1))
    key = key.astype(np.uint16)  # 16-bit keys: numpy sorts them by radix, in linear time
    order = np.argsort(key, kind="stable")
    cuts = np.cumsum(np.bincount(key, minlength=1 << exp_bits))[:-1]
    return order, cuts


# The stable sort by exponent is a counting sort: each element's rank in the order, computed in
# two passes over the base (counting its exponents, then ranking). It depends only on the base,
# so it is kept for the next member of the group (``_ranked``). With the ranks, one pass turns
# a member into its residual's byte planes in that order, and one pass turns the planes back into
# the member: no argsort, no gathered copy, no word array. Words are handled as uint64 and
# reduced modulo 2^bits (``full``), so one kernel serves every width.

@kernel
def _exponent_ranks(base, mant, emask, ranks):  # pragma: no cover - compiled by numba
    counts = np.zeros(np.int64(emask) + 1, np.int64)
    for j in range(base.shape[0]):
        counts[(np.uint64(base[j]) >> mant) & emask] += 1
    starts = np.empty_like(counts)
    acc = 0
    for k in range(counts.shape[0]):
        starts[k] = acc
        acc += counts[k]
    for j in range(base.shape[0]):
        k = (np.uint64(base[j]) >> mant) & emask
        ranks[j] = starts[k]
        starts[k] += 1
    return counts


@kernel
def _encode_planes(member, base, ranks, top, half, full, planes
                   ):  # pragma: no cover - compiled by numba
    # Two loops, not one: the arithmetic vectorizes in natural order into the residual words
    # (of the member's own width: a quarter of the memory of uint64 words for bf16), and the
    # scatter is then a stream of byte stores, both planes of a 2-byte word at once. Ranks are
    # unsigned so that indexing needs no test for negative indices (measured 1.9x together).
    one, zero, byte = np.uint64(1), np.uint64(0), np.uint64(0xFF)
    n = base.shape[0]
    z = np.empty_like(member)
    for j in range(n):
        b = np.uint64(base[j])
        m = np.uint64(member[j])
        ob = b ^ (((b >> top) & one) * half)
        om = m ^ (((m >> top) & one) * half)
        d = (om - ob) & full
        z[j] = ((d << one) ^ (zero - ((d >> top) & one))) & full
    if planes.shape[0] == 2:
        low, high = planes[0], planes[1]
        for j in range(n):
            r, v = ranks[j], np.uint64(z[j])
            low[r] = np.uint8(v & byte)
            high[r] = np.uint8(v >> np.uint64(8))
        return
    for i in range(planes.shape[0]):
        shift = np.uint64(8 * i)
        row = planes[i]
        for j in range(n):
            row[ranks[j]] = np.uint8((np.uint64(z[j]) >> shift) & byte)


@kernel
def _decode_planes(planes, base, ranks, top, half, full, out
                   ):  # pragma: no cover - compiled by numba
    one, zero = np.uint64(1), np.uint64(0)
    n = base.shape[0]
    z = np.zeros_like(out)
    if planes.shape[0] == 2:
        low, high = planes[0], planes[1]
        for j in range(n):
            r = ranks[j]
            z[j] = np.uint64(low[r]) | (np.uint64(high[r]) << np.uint64(8))
    else:
        for i in range(planes.shape[0]):
            shift = np.uint64(8 * i)
            row = planes[i]
            for j in range(n):
                z[j] |= np.uint64(row[ranks[j]]) << shift
    for j in range(n):
        w = np.uint64(z[j])
        r = ((w >> one) ^ (zero - (w & one))) & full
        b = np.uint64(base[j])
        ob = b ^ (((b >> top) & one) * half)
        o = (ob + r) & full
        out[j] = o ^ (((o >> top) & one) * half)


@kernel
def _same_words(a, b):  # pragma: no cover - compiled by numba
    # Blocks of a fixed length that vectorize, an early exit between them: 1.3 ms for 2^22
    # 16-bit words (np.array_equal: 2.3; an OR of XORs over blocks up to the array's end,
    # which numba widened to int64 and did not vectorize: 5.3, every member of a lossless
    # group paid it at every cache lookup).
    n = a.shape[0]
    full = n - n % 4096
    for start in range(0, full, 4096):
        same = True
        for j in range(start, start + 4096):
            same &= a[j] == b[j]
        if not same:
            return False
    same = True
    for j in range(full, n):
        same &= a[j] == b[j]
    return same


@dataclass(frozen=True)
class _Ranked:
    """A base (a copy of its words), each element's rank in its exponent order, and where each
    exponent's run begins."""

    base: np.ndarray
    dtype: str  # F16 and BF16 words look alike, their exponent fields differ
    ranks: np.ndarray
    cuts: list[int]


# The ranks of the group being coded, whose members share its base: commands code one group
# at a time (the next one is only read meanwhile). Four were kept before, three of them stale:
# at 1.4 GB that was 72 MB of bases and ranks held for nothing, up to a gigabyte for large ones.
_RANKED: deque[_Ranked] = deque(maxlen=1)
_RANKED_BYTES = 1 << 30  # bases larger than a third of this are ranked for every member
_RANKED_LOCK = threading.Lock()
_RANKING_LOCK = threading.Lock()


def _ranked(base: np.ndarray, dtype: str) -> _Ranked:
    """The exponent ranks of ``base``: those of an earlier call when its base had the same
    words (compared in full: a cache by address could serve a reused buffer's stale ranks).
    Ranking holds a lock: the workers start a group's members together, and each ranked the
    same base (at 1.4 GB, 41 rankings for 21 groups in expand --lossless)."""
    found = _cached(base, dtype)
    if found is not None:
        return found
    with _RANKING_LOCK:
        return _cached(base, dtype) or _rank(base, dtype)


def _cached(base: np.ndarray, dtype: str) -> _Ranked | None:
    with _RANKED_LOCK:
        entries = list(_RANKED)
    # Compared outside the lock: the workers look up a group's base at once, for every member.
    for r in entries:
        if (r.dtype == dtype and r.base.shape == base.shape and r.base.dtype == base.dtype
                and _same_words(r.base, base)):
            return r
    return None


def _rank(base: np.ndarray, dtype: str) -> _Ranked:
    exp_bits, mant_bits = FLOAT_FIELDS[dtype]
    ranks = np.empty(base.shape[0], dtype=np.uint32 if base.shape[0] < 2**32 else np.uint64)
    counts = _exponent_ranks(base, np.uint64(mant_bits), np.uint64((1 << exp_bits) - 1), ranks)
    found = _Ranked(base.copy(), dtype, ranks, np.cumsum(counts)[:-1].tolist())
    if base.nbytes + ranks.nbytes <= _RANKED_BYTES // 3:
        with _RANKED_LOCK:
            _RANKED.append(found)
    return found


def _word_constants(width: int) -> tuple[np.uint64, np.uint64, np.uint64]:
    bits = 8 * width
    return (np.uint64(bits - 1), np.uint64((1 << (bits - 1)) - 1),
            np.uint64((1 << bits) - 1))


def sorted_planes(member: np.ndarray, base: np.ndarray, dtype: str
                  ) -> tuple[np.ndarray, list[int]]:
    """The planes (``[width, n]`` uint8) of ``residual(member, base)`` in the base's exponent
    order, and where each exponent's run begins: ``plane_bytes(residual(member, base)[order])``
    and ``cuts`` of ``exponent_order``, in one pass over the member."""
    r = _ranked(base, dtype)
    planes = np.empty((base.dtype.itemsize, base.shape[0]), dtype=np.uint8)
    _encode_planes(member, base, r.ranks, *_word_constants(base.dtype.itemsize), planes)
    return planes, r.cuts


def restore_sorted(planes: np.ndarray, base: np.ndarray, dtype: str) -> np.ndarray:
    """The member's words from ``sorted_planes``' planes: its inverse, in one pass."""
    r = _ranked(base, dtype)
    out = np.empty_like(base)
    _decode_planes(planes, base, r.ranks, *_word_constants(base.dtype.itemsize), out)
    return out


@dataclass(frozen=True)
class SortedResidual(ExactDelta):
    """A member's residual as the byte planes of its words in the base's exponent order."""

    planes: np.ndarray  # [width, n] uint8
    dtype: str
    member: torch.Tensor | None = None  # the encoder's: what the planes decode to

    def apply(self, base: torch.Tensor) -> torch.Tensor:
        if self.member is not None:
            # The encoder's reconstruction is the member itself: the kernels are exact integer
            # maps, checked against the specification's definitions by the tests, and expand
            # and verify check every synthesized member against its recorded checksum.
            return self.member.reshape(-1).to(base.device)
        b = words_of(base)
        return tensor_of(restore_sorted(self.planes, b, self.dtype), base.dtype).to(base.device)


class LosslessCodec(ExactCodec):
    """Parameters: ``offsets`` (set when encoding ends): member i's zstd frame is bytes
    ``[offsets[i], offsets[i+1])`` of the ``residuals`` array."""

    name = CODEC_LOSSLESS
    base_encoding = BASE_PLANES_ZSTD
    base_level = None  # planes._PARAMS, as the residuals: here the base is a third of the archive

    @classmethod
    def params(cls) -> dict:
        return {}

    @classmethod
    def label(cls, params: Mapping[str, Any]) -> str:
        return "lossless"

    @classmethod
    def validate(cls, params: dict, members: int, numel: int) -> None:
        offsets = params.get("offsets")
        if offsets is None and "offsets" not in params:
            return  # before encoding: combine() records them
        if not (isinstance(offsets, list) and len(offsets) == members + 1
                and all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
                and offsets[0] == 0 and offsets == sorted(offsets)):
            raise ValueError(f"lossless offsets must be {members + 1} ascending integers from 0")

    @classmethod
    def arrays(cls, params: dict, members: int, numel: int, dtype: str) -> dict[str, ArraySpec]:
        if "offsets" not in params:
            raise ValueError("lossless parameters lack 'offsets'")
        return {"residuals": ("U8", (params["offsets"][-1],))}

    @classmethod
    def encode_exact(cls, member: torch.Tensor, base: torch.Tensor, dtype: str, params: dict,
                     index: int) -> tuple[dict[str, torch.Tensor], SortedResidual]:
        """The row's frame is coded on the frame pool's threads while the caller goes on:
        ``residuals`` is a Future of the frame until ``combine`` (or ``frame_of``) waits."""
        planes, cuts = sorted_planes(words_of(member), words_of(base), dtype)
        return ({"residuals": frame_pool().submit(planes, cuts)},
                SortedResidual(planes, dtype, member))

    @classmethod
    def combine(cls, rows: list[dict[str, torch.Tensor]], params: dict, numel: int
                ) -> tuple[dict[str, torch.Tensor], dict]:
        frames = [frame_of(r) for r in rows]
        offsets = [0]
        for f in frames:
            offsets.append(offsets[-1] + f.numel())
        return {"residuals": torch.cat(frames)}, {**params, "offsets": offsets}

    @classmethod
    def member_rows(cls, arrays: Mapping[str, torch.Tensor], params: dict, member: int
                    ) -> dict[str, torch.Tensor]:
        begin, end = params["offsets"][member : member + 2]
        return {"residuals": arrays["residuals"][begin:end]}

    @classmethod
    def decode(cls, rows: dict[str, torch.Tensor], params: dict, member: int, numel: int,
               dtype: str) -> SortedResidual:
        frame = rows["residuals"].cpu().numpy()
        try:
            planes = unpack_planes(frame, numel, DTYPE_BITS[dtype] // 8)
        except ValueError as exc:
            raise ValueError(f"member {member}: residual is {exc}") from None
        return SortedResidual(planes, dtype)


def frame_of(row: dict[str, torch.Tensor | Future]) -> torch.Tensor:
    """A row's frame as a uint8 tensor, waiting for its thread when it is still being coded."""
    frame = row["residuals"]
    if isinstance(frame, Future):
        frame = torch.frombuffer(bytearray(frame.result()), dtype=torch.uint8)
        row["residuals"] = frame
    return frame


@dataclass(frozen=True)
class LosslessSpec(CodecSpec):
    """Every expert bit for bit: the base plus a zstd-coded residual of each expert's bits."""

    codec: ClassVar[str] = CODEC_LOSSLESS

    def settings(self) -> dict:
        return LosslessCodec.params()

    def params(self, group: GroupShape) -> dict:
        return LosslessCodec.params()


LosslessCodec.spec = LosslessSpec
