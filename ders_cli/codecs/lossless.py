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

from dataclasses import dataclass

import numpy as np
import torch

from ..constants import BASE_PLANES_ZSTD, CODEC_LOSSLESS, DTYPE_BITS, FLOAT_FIELDS
from .base import ArraySpec, ExactCodec, ExactDelta
from .planes import pack, tensor_of, unpack, words_of


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
    where each exponent's run begins in that order."""
    exp_bits, mant_bits = FLOAT_FIELDS[dtype]
    key = ((base >> base.dtype.type(mant_bits)) & base.dtype.type((1 << exp_bits) - 1))
    key = key.astype(np.uint16)  # 16-bit keys: numpy sorts them by radix, in linear time
    order = np.argsort(key, kind="stable")
    cuts = np.cumsum(np.bincount(key, minlength=1 << exp_bits))[:-1]
    return order, cuts


@dataclass(frozen=True)
class SortedResidual(ExactDelta):
    """A member's residual words in the base's exponent order (``order``, when the encoder
    knows it already: the sort is most of the decoding's work)."""

    words: np.ndarray
    dtype: str
    order: np.ndarray | None = None

    def apply(self, base: torch.Tensor) -> torch.Tensor:
        b = words_of(base)
        order = self.order if self.order is not None else exponent_order(b, self.dtype)[0]
        res = np.empty_like(self.words)
        res[order] = self.words
        return tensor_of(restore(res, b), base.dtype).to(base.device)


class LosslessCodec(ExactCodec):
    """Parameters: ``offsets`` (set when encoding ends): member i's zstd frame is bytes
    ``[offsets[i], offsets[i+1])`` of the ``residuals`` array."""

    name = CODEC_LOSSLESS
    base_encoding = BASE_PLANES_ZSTD
    base_level = None  # the optimal parser: here the base is a large part of the archive

    @classmethod
    def params(cls) -> dict:
        return {}

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
        b = words_of(base)
        order, cuts = exponent_order(b, dtype)
        res = residual(words_of(member), b)[order]
        frame = torch.frombuffer(bytearray(pack(res, cuts)), dtype=torch.uint8)
        return {"residuals": frame}, SortedResidual(res, dtype, order)

    @classmethod
    def combine(cls, rows: list[dict[str, torch.Tensor]], params: dict, numel: int
                ) -> tuple[dict[str, torch.Tensor], dict]:
        frames = [r["residuals"] for r in rows]
        offsets = [0]
        for f in frames:
            offsets.append(offsets[-1] + f.numel())
        return {"residuals": torch.cat(frames)}, {**params, "offsets": offsets}

    @classmethod
    def member_rows(cls, arrays: dict[str, torch.Tensor], params: dict, member: int
                    ) -> dict[str, torch.Tensor]:
        begin, end = params["offsets"][member : member + 2]
        return {"residuals": arrays["residuals"][begin:end]}

    @classmethod
    def decode(cls, rows: dict[str, torch.Tensor], params: dict, member: int, numel: int,
               dtype: str) -> SortedResidual:
        frame = rows["residuals"].cpu().numpy()
        try:
            words = unpack(frame, numel, DTYPE_BITS[dtype] // 8)
        except ValueError as exc:
            raise ValueError(f"member {member}: residual is {exc}") from None
        return SortedResidual(words, dtype)

