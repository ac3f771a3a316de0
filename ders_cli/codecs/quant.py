"""DeRS quantization: each delta in groups of G consecutive elements (flattened, C order),
k-bit codes bit-packed, one scale and one offset per group.

k >= 2: asymmetric round-to-nearest. offset = bf16(min), scale = bf16((max - offset) / (2^k - 1)),
code = clamp(round((x - offset) / scale), 0, 2^k - 1), computed with the stored (rounded) offset
and scale so that reconstruction sees exactly what encoding assumed.
k == 1: code = [x >= 0], scale = bf16(mean |x|) over the group, x_hat = +-scale.

Reconstruction, in the compute dtype: x_hat = offset + (code * scale), two separately rounded
operations (never fused), so every platform gives the same bits.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from ..constants import (
    CODEC_QUANT,
    DEFAULT_GROUP_SIZE,
    DEFAULT_QUANT_METHOD,
    QUANT_BITS,
    QUANT_METHODS,
    QUANT_PARAM_DTYPE,
    RECORDED_QUANT_METHOD,
)
from ..dtypes import TORCH_DTYPES, compute_dtype
from ..errors import UsageError
from ..lanes import thread_buffer
from . import jit
from .base import ArraySpec, Calibration, CodecSpec, DeltaCodec, GroupShape, Option
from .bitpack import pack, packed_nbytes, unpack
from .jit import kernel

_PARAM = TORCH_DTYPES[QUANT_PARAM_DTYPE]


def num_groups(numel: int, group_size: int) -> int:
    return -(-numel // group_size)


def _grouped(x: torch.Tensor, group_size: int, fill: float) -> torch.Tensor:
    """``x`` padded with ``fill`` to whole groups, as [groups, group_size]."""
    pad = -x.numel() % group_size
    if pad:
        x = torch.cat([x, x.new_full((pad,), fill)])
    return x.view(-1, group_size)


def _reconstruct(q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None, bits: int,
                 numel: int) -> torch.Tensor:
    """The normative arithmetic (docs/FORMAT.md, "quant") on codes grouped as [groups, G]."""
    sc = scale.to(q.dtype)[:, None]
    if bits == 1:
        return ((q * 2 - 1) * sc).reshape(-1)[:numel]
    return (offset.to(q.dtype)[:, None] + q * sc).reshape(-1)[:numel]


SHRINKS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.5)
REFITS = 2


def _codes(xg: torch.Tensor, off: torch.Tensor, sc: torch.Tensor, levels: int) -> torch.Tensor:
    safe = torch.where(sc > 0, sc, torch.ones_like(sc))
    q = torch.sub(xg, off[:, None]).div_(safe[:, None]).round_().clamp_(0, levels)
    return q if bool((sc > 0).all()) else q.mul_((sc > 0)[:, None])


def _sq_error(xg: torch.Tensor, q: torch.Tensor, off: torch.Tensor, sc: torch.Tensor,
              tail: int) -> torch.Tensor:
    """Squared error per group; the last group counts its first ``tail`` elements only."""
    e = torch.mul(q, sc[:, None]).add_(off[:, None]).sub_(xg).square_()
    err = e.sum(dim=1)
    if tail < xg.shape[1]:
        err[-1] = e[-1, :tail].sum()
    return err


# Groups handled at once by mse_range: every step makes a temporary of this many groups, which
# stays in cache (256 KiB of f32 at 128 per group) and is reused by the allocator, where
# member-sized ones went back to the kernel and came back as fresh pages at every step. Each
# group's arithmetic is its own row's, so the result is the same bits whatever the chunking.
_MSE_ROWS = 512


def mse_range(xg: torch.Tensor, tail: int, lo: torch.Tensor, hi: torch.Tensor, levels: int
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """(offset, scale) per group minimising the squared error, never worse than min/max
    rounding: the range shrunk about its centre by the best of SHRINKS (outliers clipped), then
    the least-squares line through (code, value) refitted REFITS times, each change kept only
    where it lowers the group's error. ``tail``: valid elements of the last group."""
    rows, g = xg.shape
    if (xg.device.type == "cpu" and xg.dtype == torch.float32 and g % 32 == 0 and g <= 512
            and xg.is_contiguous() and jit.wanted(xg.numel()) and _sum_order_is_torchs()):
        full = rows if tail == g else rows - 1  # a short last group: torch's code, below
        off, sc = _mse_numba(xg[:full], lo[:full], hi[:full], levels)
        if full == rows:
            return off, sc
        o, s = _mse_rows(xg[full:], tail, lo[full:], hi[full:], levels)
        return torch.cat([off, o]), torch.cat([sc, s])
    if rows <= _MSE_ROWS:
        return _mse_rows(xg, tail, lo, hi, levels)
    off, sc = torch.empty_like(lo), torch.empty_like(lo)
    for start in range(0, rows, _MSE_ROWS):
        end = min(rows, start + _MSE_ROWS)
        o, s = _mse_rows(xg[start:end], tail if end == rows else xg.shape[1], lo[start:end],
                         hi[start:end], levels)
        off[start:end], sc[start:end] = o, s
    return off, sc


# The numba version of _mse_rows: the same arithmetic, one group at a time in registers and a
# 128-float scratch, no temporaries. Every step is the torch code's own, rounded to f32 where it
# rounds (no fused multiply-add, no reassociation), and each sum over a group adds its elements
# in the order torch's CPU sum does for a contiguous row of a multiple of 32 floats: four
# accumulators of 8 lanes, vector i into accumulator i mod 4, the accumulators added in order,
# then the 8 lanes in order. ``_sum_order_is_torchs`` checks that order against torch on the
# running machine before the kernel is used: where it differs, torch's code runs instead, so
# every archive is the same bits either way.

@kernel
def _mse_kernel(xg, lo, hi, levels, shrinks, refits, out_off, out_sc
                ):  # pragma: no cover - compiled by numba
    f32 = np.float32
    rows, g = xg.shape
    lv = f32(levels)
    acc = np.empty(32, np.float32)
    q = np.empty(g, np.float32)

    # Each sum goes straight into acc[8k + lane] (32 independent lanes: the loops vectorize)
    # as the element is computed: no pass of its own over a scratch row. 1.4x the speed of
    # computing codes, then errors, then their sum, with the same bits.
    def total():
        t = f32(0)
        for lane in range(8):
            t = f32(t + f32(f32(f32(acc[lane] + acc[8 + lane]) + acc[16 + lane])
                            + acc[24 + lane]))
        return t

    def ordered_sum(v):
        acc[:] = 0
        for i in range(g // 32):
            for t in range(32):
                acc[t] = f32(acc[t] + v[32 * i + t])
        return total()

    def sq_error(x, off, sc):
        acc[:] = 0
        for i in range(g // 32):
            for t in range(32):
                xj = x[32 * i + t]
                c = min(max(np.rint(f32(f32(xj - off) / sc)), f32(0)), lv) if sc > 0 else f32(0)
                d = f32(f32(f32(c * sc) + off) - xj)
                acc[t] = f32(acc[t] + f32(d * d))
        return total()

    for r in range(rows):
        x = xg[r]
        lo_r, h = lo[r], hi[r]
        centre, half = f32(f32(h + lo_r) / f32(2)), f32(f32(h - lo_r) / f32(2))
        best_off, best_sc = lo_r, f32(f32(h - lo_r) / lv)
        best_err = sq_error(x, best_off, best_sc)
        for s in range(1, shrinks.shape[0]):
            off = f32(centre - f32(f32(shrinks[s]) * half))
            sc = f32(f32(f32(2 * shrinks[s]) * half) / lv)
            err = sq_error(x, off, sc)
            if err < best_err:
                best_off, best_sc, best_err = off, sc, err
        count = f32(g)
        mx = f32(ordered_sum(x) / count)  # the same for every refit
        for _ in range(refits):
            for j in range(g):
                q[j] = (min(max(np.rint(f32(f32(x[j] - best_off) / best_sc)), f32(0)), lv)
                        if best_sc > 0 else f32(0))
            mq = f32(ordered_sum(q) / count)
            acc[:] = 0
            for i in range(g // 32):
                for t in range(32):
                    j = 32 * i + t
                    q[j] = f32(q[j] - mq)
                    acc[t] = f32(acc[t] + f32(q[j] * x[j]))
            cov = total()
            acc[:] = 0
            for i in range(g // 32):
                for t in range(32):
                    j = 32 * i + t
                    acc[t] = f32(acc[t] + f32(q[j] * q[j]))
            var = total()
            sc = f32(cov / max(var, f32(1e-30))) if var > 0 else best_sc
            sc = max(sc, f32(0))
            off = f32(mx - f32(sc * mq))
            err = sq_error(x, off, sc)
            if err < best_err:
                best_off, best_sc, best_err = off, sc, err
        out_off[r], out_sc[r] = best_off, best_sc


_SUM_ORDER: list[bool] = []


def _sum_order_is_torchs() -> bool:
    """Whether the kernel's order of summation gives torch's sums here, bit for bit, on rows
    chosen to expose any other order (checked once per process)."""
    if not _SUM_ORDER:
        gen = torch.Generator().manual_seed(14)
        rows = (torch.randn(512, 128, generator=gen) ** 2 * torch.rand(512, 1, generator=gen)
                * torch.logspace(-8, 2, 512)[:, None])
        lo, hi = rows.amin(dim=1), rows.amax(dim=1)
        got = _mse_numba(rows, lo, hi, 3)
        want = _mse_rows(rows, 128, lo, hi, 3)
        _SUM_ORDER.append(all(torch.equal(a, b) for a, b in zip(got, want, strict=True)))
    return _SUM_ORDER[0]


def _mse_numba(xg: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, levels: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
    off, sc = torch.empty_like(lo), torch.empty_like(lo)
    _mse_kernel(xg.numpy(), lo.numpy(), hi.numpy(), levels, np.array(SHRINKS), REFITS,
                off.numpy(), sc.numpy())
    return off, sc


def _mse_rows(xg: torch.Tensor, tail: int, lo: torch.Tensor, hi: torch.Tensor, levels: int
              ) -> tuple[torch.Tensor, torch.Tensor]:
    centre, half = (hi + lo) / 2, (hi - lo) / 2
    best_off, best_sc = lo, (hi - lo) / levels
    best_err = _sq_error(xg, _codes(xg, best_off, best_sc, levels), best_off, best_sc, tail)

    def keep_better(off: torch.Tensor, sc: torch.Tensor) -> None:
        nonlocal best_off, best_sc, best_err
        err = _sq_error(xg, _codes(xg, off, sc, levels), off, sc, tail)
        better = err < best_err
        best_off, best_sc = torch.where(better, off, best_off), torch.where(better, sc, best_sc)
        best_err = torch.where(better, err, best_err)

    for shrink in SHRINKS[1:]:
        keep_better(centre - shrink * half, 2 * shrink * half / levels)
    valid = torch.ones_like(xg[0])
    valid[tail:] = 0
    count = torch.full_like(best_off, xg.shape[1])
    count[-1] = tail
    for _ in range(REFITS):
        q = _codes(xg, best_off, best_sc, levels)
        q[-1] *= valid  # the padding must not pull the fit (padded values are zeros)
        mq, mx = q.sum(1) / count, xg.sum(1) / count
        dq = q - mq[:, None]
        dq[-1] *= valid
        cov, var = (dq * xg).sum(1), dq.square_().sum(1)
        sc = torch.where(var > 0, cov / var.clamp_min(1e-30), best_sc).clamp_min(0)
        keep_better(mx - sc * mq, sc)
    return best_off, best_sc


def quantize(x: torch.Tensor, bits: int, group_size: int, method: str = "rtn"
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """One flattened delta -> (packed codes uint8, scale bf16, offset bf16 or None for 1 bit,
    the delta as it will be decoded). ``method``: "rtn" (min/max, round to nearest) or "mse"
    (``mse_range``); 1-bit codes are sign times mean |x|, least-squares optimal either way."""
    n = x.numel()
    group_size = min(group_size, max(n, 1))  # one group either way; never pad to a huge G
    if n == 0:  # a sparse member that keeps nothing
        empty = torch.empty(0, dtype=_PARAM, device=x.device)
        return (torch.empty(0, dtype=torch.uint8), empty, None if bits == 1 else empty.clone(),
                x.new_empty(0))
    if bits == 1:
        # Summed in f64 so the stored scale does not depend on the platform's summation order.
        sums = _grouped(x.abs().double(), group_size, 0.0).sum(dim=1)  # f64: exact enough
        counts = torch.full_like(sums, group_size)
        counts[-1] = n - (sums.numel() - 1) * group_size
        scale = (sums / counts).to(x.dtype).to(_PARAM)
        codes = (x >= 0).to(torch.uint8)
        q = _grouped(codes.to(x.dtype), group_size, 0.0)
        return (torch.from_numpy(pack(codes.cpu().numpy(), 1)), scale, None,
                _reconstruct(q, scale, None, 1, n))
    levels = (1 << bits) - 1
    fused = (x.device.type == "cpu" and x.dtype == torch.float32 and x.is_contiguous()
             and jit.wanted(n))
    if fused:
        xn = x.reshape(-1).numpy()
        lo_n = np.empty(num_groups(n, group_size), dtype=np.float32)
        hi_n = np.empty_like(lo_n)
        # False: a group's minimum or maximum is a zero, whose sign torch's reductions may
        # choose otherwise: the torch code below decides those members.
        fused = _minmax_kernel(xn, group_size, lo_n, hi_n)
    if fused:
        lo, hi = torch.from_numpy(lo_n), torch.from_numpy(hi_n)
        if method == "mse":
            xg = _grouped(x, group_size, 0.0)
            lo, step = mse_range(xg, n - (xg.shape[0] - 1) * group_size, lo, hi, levels)
            hi = lo + step * levels
        return _quantize_fused(xn, bits, group_size, lo.numpy(), hi.numpy())
    lo = _grouped(x, group_size, float("inf")).amin(dim=1)
    hi = _grouped(x, group_size, float("-inf")).amax(dim=1)
    xg = _grouped(x, group_size, 0.0)
    if method == "mse":
        lo, step = mse_range(xg, n - (xg.shape[0] - 1) * group_size, lo, hi, levels)
        hi = lo + step * levels
    # Codes are chosen for the parameters as stored (rounded to bf16), not as computed.
    offset = lo.to(_PARAM)
    off = offset.to(x.dtype)
    scale = ((hi - off).clamp_min(0) / levels).to(_PARAM)
    sc = scale.to(x.dtype)
    q = _codes(xg, off, sc, levels)
    codes = q.reshape(-1)[:n].to(torch.uint8)
    return (torch.from_numpy(pack(codes.cpu().numpy(), bits)), scale, offset,
            _reconstruct(q, scale, offset, bits, n))


def quantize_calibrated_member(x: torch.Tensor, bits: int, group_size: int, method: str,
                               calib: Calibration | None, dtype: torch.dtype
                               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None,
                                          torch.Tensor]:
    """``quantize``, with the codes, scales and offsets then fitted to the member's inputs when
    ``calib`` describes them (``calibration.solve``: GPTQ from this start, never worse on the
    calibration inputs); ``dtype``: the member's, for the rounding of base + delta."""
    start = quantize(x, bits, group_size, method)
    n = x.numel()
    if calib is None or n == 0 or not calib.fits(n):
        return start
    # Here, not at the top: the solver's kernels import this package (ders_cli.codecs.jit).
    from ..calibration.solve import quantize_calibrated

    g = min(group_size, n)
    _, scale, offset, _ = start
    q, off, sc = quantize_calibrated(
        x, calib.hessian.to(x.device), bits, g, None if offset is None else offset.to(x.dtype),
        scale.to(x.dtype), base=calib.base, dtype=dtype)
    scale = sc.to(_PARAM)
    offset = None if off is None else off.to(_PARAM)
    return (torch.from_numpy(pack(q.cpu().numpy(), bits)), scale, offset,
            _reconstruct(_grouped(q.to(x.dtype), g, 0.0), scale, offset, bits, n))


def _quantize_fused(x: np.ndarray, bits: int, group_size: int, lo: np.ndarray, hi: np.ndarray
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``quantize``'s last steps (parameters as stored, codes, packing, the decoded delta) in
    one pass, from each group's range."""
    groups = lo.shape[0]
    packed = np.empty(packed_nbytes(x.shape[0], bits), dtype=np.uint8)
    offset = np.empty(groups, dtype=np.uint16)
    scale = np.empty(groups, dtype=np.uint16)
    decoded = np.empty_like(x)
    _finish_kernel(x, group_size, lo, hi, (1 << bits) - 1, bits, packed, offset, scale, decoded)
    return (torch.from_numpy(packed), torch.from_numpy(scale.view(np.int16)).view(_PARAM),
            torch.from_numpy(offset.view(np.int16)).view(_PARAM), torch.from_numpy(decoded))


# The quantizer's element loops compiled: the torch code above, step by step in f32 (every
# operation rounded where torch rounds it: no fused multiply-add), with bf16 rounding done on the
# bits as torch does it (round half to even; no NaN reaches here), so the codes, parameters and
# decoded values are the same bits. Zeros are the one place where torch's vectorized min, max
# and clamp may return either sign: members whose minimum or maximum is a zero, or whose minimum
# is so small (below f32's least normal) that its bf16 offset may round to a signed zero, are
# left to torch (``_minmax_kernel`` returns False). Real deltas never come near: it costs nothing.

_TINY = float(np.finfo(np.float32).tiny)


@kernel
def _minmax_kernel(x, g, lo, hi):  # pragma: no cover - compiled by numba
    n = x.shape[0]
    tiny = np.float32(_TINY)
    for r in range(lo.shape[0]):
        start = r * g
        a = b = x[start]
        for j in range(start + 1, min(n, start + g)):
            v = x[j]
            a = min(a, v)
            b = max(b, v)
        if abs(a) < tiny or b == 0:
            return False
        lo[r], hi[r] = a, b
    return True


@kernel
def _finish_kernel(x, g, lo, hi, levels, bits, packed, offset, scale, decoded
                   ):  # pragma: no cover - compiled by numba
    f32 = np.float32
    n = x.shape[0]
    lv = f32(levels)
    cell = np.empty(1, np.float32)  # a float's bits through memory: numba has no bit cast
    bits_of = cell.view(np.uint32)

    def bf16(v):
        bits_of[0] = 0
        cell[0] = v
        u = bits_of[0]
        return np.uint16((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1)))
                         >> np.uint32(16))

    def widen(h):
        bits_of[0] = np.uint32(h) << np.uint32(16)
        return cell[0]

    def pack_into(codes, bits, packed):
        # LSB first (docs/FORMAT.md 5.3): whole bytes of 2-, 4- and 8-bit codes and three
        # bytes of eight 3-bit codes at a time; what is left one code at a time.
        m = codes.shape[0]
        done = 0
        if bits == 8:
            packed[:m] = codes
            done = m
        elif bits == 2 or bits == 4:
            per = 8 // bits
            c = codes[: m // per * per].reshape(m // per, per)
            for b in range(c.shape[0]):
                v = c[b, 0]
                for t in range(1, per):
                    v |= c[b, t] << (t * bits)
                packed[b] = v
            done = c.shape[0] * per
        elif bits == 3:
            c = codes[: m // 8 * 8].reshape(m // 8, 8)
            for b in range(c.shape[0]):
                w = np.uint32(0)
                for t in range(8):
                    w |= np.uint32(c[b, t]) << np.uint32(3 * t)
                packed[3 * b] = w & 0xFF
                packed[3 * b + 1] = (w >> 8) & 0xFF
                packed[3 * b + 2] = (w >> 16) & 0xFF
            done = c.shape[0] * 8
        acc, filled, out = np.uint64(0), 0, done * bits // 8
        for j in range(done, m):
            acc |= np.uint64(codes[j]) << np.uint64(filled)
            filled += bits
            if filled >= 8:
                packed[out] = np.uint8(acc & np.uint64(0xFF))
                acc >>= np.uint64(8)
                filled -= 8
                out += 1
        if filled > 0:
            packed[out] = np.uint8(acc & np.uint64(0xFF))

    codes = np.empty(n, np.uint8)
    for r in range(lo.shape[0]):
        offset[r] = bf16(lo[r])
        off = widen(offset[r])
        scale[r] = bf16(f32(max(f32(hi[r] - off), f32(0)) / lv))
        sc = widen(scale[r])
        # Slices, not offsets: loops from 0 over a view vectorize (no negative indices).
        xs, cs, ds = x[r * g : r * g + g], codes[r * g : r * g + g], decoded[r * g : r * g + g]
        if sc > 0:
            for j in range(xs.shape[0]):
                q = min(max(np.rint(f32(f32(xs[j] - off) / sc)), f32(0)), lv)
                cs[j] = np.uint8(q)
                ds[j] = f32(off + f32(q * sc))
        else:
            cs[:] = 0
            ds[:] = off
    pack_into(codes, bits, packed)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None, bits: int,
               group_size: int, numel: int, out_dtype: torch.dtype) -> torch.Tensor:
    q = torch.from_numpy(unpack(codes.cpu().numpy(), bits, numel)).to(scale.device, out_dtype)
    # G >= numel is one group, as G = numel: sized by the member, never by a manifest's G
    # (docs/FORMAT.md 5.3).
    group_size = min(group_size, max(numel, 1))
    return _reconstruct(_grouped(q, group_size, 0.0), scale, offset, bits, numel)


# Synthesis of a bf16 member from its codes (``QuantCodec.synthesize_into``) in three passes where
# torch makes six (unpack, widen, scale, offset, add the base, cast): the codes to float32, then
# offset + (code * scale) + base, then the sums rounded to bf16. The same bits as the normative
# arithmetic (tests/test_kernels.py): every operation rounded to float32 where torch's rounds (no
# fused multiply-add: numba does not contract without fastmath), and the cast to nearest even
# as torch's (a NaN, which no ders writer stores, becomes 0xFFFF, as torch's cast gives on
# x86). Three small kernels, because numba vectorizes small loops: one kernel doing all three
# per chunk measured no faster than torch. Measured at 2^22 elements, 2 bits, G = 128: 14 ms,
# torch 25-32. The group of element j is j >> log2(G), so G must be a power of two.
# Each fills q with the codes of whole bytes only (q's length a multiple of 8 / bits); the
# caller decodes the last few codes that share a byte.
@kernel
def _unpack8(codes, q):  # pragma: no cover - compiled by numba
    for j in range(q.shape[0]):
        q[j] = np.float32(codes[j])


@kernel
def _unpack4(codes, q):  # pragma: no cover - compiled by numba
    for b in range(q.shape[0] // 2):
        x = codes[b]
        q[2 * b] = np.float32(x & np.uint8(15))
        q[2 * b + 1] = np.float32(x >> np.uint8(4))


@kernel
def _unpack2(codes, q):  # pragma: no cover - compiled by numba
    for b in range(q.shape[0] // 4):
        x = codes[b]
        q[4 * b] = np.float32(x & np.uint8(3))
        q[4 * b + 1] = np.float32((x >> np.uint8(2)) & np.uint8(3))
        q[4 * b + 2] = np.float32((x >> np.uint8(4)) & np.uint8(3))
        q[4 * b + 3] = np.float32(x >> np.uint8(6))


@kernel
def _unpack1(codes, q):  # pragma: no cover - compiled by numba
    for b in range(q.shape[0] // 8):
        x = codes[b]
        for t in range(8):
            q[8 * b + t] = np.float32((x >> np.uint8(t)) & np.uint8(1))


_UNPACK = {1: _unpack1, 2: _unpack2, 4: _unpack4, 8: _unpack8}


@kernel
def _affine(q, shift, sign, scale, offset, base_c):  # pragma: no cover - compiled by numba
    one, two = np.float32(1), np.float32(2)
    if sign:  # 1 bit: (2 code - 1) * scale
        for j in range(q.shape[0]):
            q[j] = np.float32((q[j] * two - one) * scale[j >> shift]) + base_c[j]
    else:
        for j in range(q.shape[0]):
            g = j >> shift
            q[j] = np.float32(offset[g] + q[j] * scale[g]) + base_c[j]


@kernel
def _round_bf16(bits, out):  # pragma: no cover - compiled by numba
    for j in range(out.shape[0]):
        u = bits[j]
        r = np.int16(np.uint16((u + ((u >> np.uint32(16)) & np.uint32(1)) + np.uint32(0x7FFF))
                               >> np.uint32(16)))
        out[j] = np.int16(-1) if (u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000) else r


def quant_arrays(bits: int, group_size: int, members: int, numel: int) -> dict[str, ArraySpec]:
    """The arrays of ``members`` rows of ``numel`` quantized values each."""
    groups = num_groups(numel, group_size)
    out = {
        "codes": ("U8", (members, packed_nbytes(numel, bits))),
        "scale": (QUANT_PARAM_DTYPE, (members, groups)),
    }
    if bits > 1:
        out["offset"] = (QUANT_PARAM_DTYPE, (members, groups))
    return out


class QuantCodec(DeltaCodec):
    """Parameters: ``bits`` (1, 2, 3, 4 or 8), ``group_size`` and ``method`` (informative)."""

    name = CODEC_QUANT
    options = (
        Option("bits", int, None, "Bits per delta element: 1, 2, 3, 4 or 8.", QUANT_BITS,
               required=True),
        Option("group_size", int, DEFAULT_GROUP_SIZE,
               "Elements sharing one quantization scale and offset."),
        Option("method", str, DEFAULT_QUANT_METHOD, "mse: clip search and least-squares "
               "scales (less error); rtn: min/max round to nearest (faster).", QUANT_METHODS),
    )

    @classmethod
    def check(cls, spec: QuantSpec) -> None:  # type: ignore[override]
        super().check(spec)
        if spec.group_size < 1:
            raise UsageError(f"group_size must be at least 1, got {spec.group_size}",
                             param="group_size")

    @classmethod
    def label(cls, params: Mapping[str, Any]) -> str:
        method = params.get("method", RECORDED_QUANT_METHOD)
        return f"{params.get('bits')}-bit" + ("" if method == "mse" else f" {method}")

    @classmethod
    def params(cls, bits: int, group_size: int, method: str = RECORDED_QUANT_METHOD) -> dict:
        return {"bits": bits, "group_size": group_size, "method": method}

    @classmethod
    def validate(cls, params: dict, members: int, numel: int) -> None:
        bits, gs = params.get("bits"), params.get("group_size")
        if bits not in QUANT_BITS:
            raise ValueError(f"quant bits must be one of {QUANT_BITS}, got {bits!r}")
        if not isinstance(gs, int) or isinstance(gs, bool) or gs < 1:
            raise ValueError(f"quant group_size must be a positive integer, got {gs!r}")
        if params.get("method", RECORDED_QUANT_METHOD) not in QUANT_METHODS:
            raise ValueError(f"unknown quant method {params.get('method')!r}")

    @classmethod
    def arrays(cls, params: dict, members: int, numel: int, dtype: str) -> dict[str, ArraySpec]:
        return quant_arrays(params["bits"], params["group_size"], members, numel)

    @classmethod
    def encode_member(cls, delta: torch.Tensor, dtype: str, params: dict, member: int,
                      calib: Calibration | None = None
                      ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        codes, scale, offset, decoded = quantize_calibrated_member(
            delta, params["bits"], params["group_size"],
            params.get("method", RECORDED_QUANT_METHOD), calib, TORCH_DTYPES[dtype])
        row = {"codes": codes, "scale": scale}
        if offset is not None:
            row["offset"] = offset
        return row, decoded

    @classmethod
    def synthesize_into(cls, rows: dict[str, torch.Tensor], params: dict, base_c: torch.Tensor,
                        out: torch.Tensor) -> bool:
        """bf16 members on the CPU, groups of a power of two (the default 128), by the kernels
        below; anything else by ``decode``."""
        n, bits, g = out.numel(), params["bits"], params["group_size"]
        if not (out.dtype == torch.bfloat16 and base_c.dtype == torch.float32
                and out.device.type == base_c.device.type == "cpu" and bits in _UNPACK
                and g & (g - 1) == 0 and jit.wanted(n)):
            return False
        groups = num_groups(n, min(g, max(n, 1)))
        codes, scale = rows["codes"].reshape(-1), rows["scale"].reshape(-1).float()
        offset = rows["offset"].reshape(-1).float() if bits > 1 else scale
        if codes.numel() < packed_nbytes(n, bits) or min(scale.numel(), offset.numel()) < groups:
            return False  # dequantize says what is wrong
        q = thread_buffer("quant-codes", n, torch.float32).numpy()
        packed, whole = codes.numpy(), n - n % (8 // bits)
        _UNPACK[bits](packed, q[:whole])
        q[whole:] = unpack(packed[whole * bits // 8:], bits, n - whole)
        _affine(q, g.bit_length() - 1, bits == 1, scale.numpy(), offset.numpy(),
                base_c.reshape(-1).numpy())
        _round_bf16(q.view(np.uint32), out.view(torch.int16).numpy())
        return True

    @classmethod
    def decode(cls, rows: dict[str, torch.Tensor], params: dict, member: int, numel: int,
               dtype: str) -> torch.Tensor:
        return dequantize(rows["codes"], rows["scale"], rows.get("offset"), params["bits"],
                          params["group_size"], numel, compute_dtype(dtype))


@dataclass(frozen=True)
class QuantSpec(CodecSpec):
    """DeRS quantization of each delta to ``bits`` bits, per group of ``group_size`` elements;
    ``method`` "mse" (default: clip search and least-squares refit) or "rtn" (min/max)."""

    codec: ClassVar[str] = CODEC_QUANT
    bits: int
    group_size: int = DEFAULT_GROUP_SIZE
    method: str = DEFAULT_QUANT_METHOD

    def settings(self) -> dict:
        return QuantCodec.params(self.bits, self.group_size, self.method)

    def params(self, group: GroupShape) -> dict:
        return self.settings()


QuantCodec.spec = QuantSpec
