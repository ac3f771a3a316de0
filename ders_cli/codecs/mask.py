"""The random mask of the sparse codec: k distinct positions out of n, regenerated from a seed.

The positions are the first k outputs of a keyed pseudo-random permutation of [0, n): a
balanced Feistel network over b bits (2^b >= n) with cycle walking. Only integer arithmetic on
fixed widths is used, so every platform and every future numpy gives the same bits; the
specification is docs/FORMAT.md ("Random masks") and golden vectors pin it in the tests.

Drawing k outputs costs O(k), not O(n): at drop 0.9 that is one tenth of one random number
per element. The first k outputs for a seed are a prefix of the first k' > k, so masks of one
seed are nested across drop rates.
"""

from __future__ import annotations

import numpy as np
import torch

from ..constants import (
    FMIX32_MUL1,
    FMIX32_MUL2,
    MASK_ROUNDS,
    SPLITMIX_GAMMA,
    SPLITMIX_MUL1,
    SPLITMIX_MUL2,
)
from . import jit

_M64 = (1 << 64) - 1


def splitmix64(state: int) -> tuple[int, int]:
    """One step of SplitMix64: (output, next state), all modulo 2^64."""
    state = (state + SPLITMIX_GAMMA) & _M64
    z = state
    z = ((z ^ (z >> 30)) * SPLITMIX_MUL1) & _M64
    z = ((z ^ (z >> 27)) * SPLITMIX_MUL2) & _M64
    return z ^ (z >> 31), state


def round_keys(seed: int) -> list[int]:
    """The 32-bit round keys: the low halves of the first MASK_ROUNDS SplitMix64 outputs."""
    keys, state = [], seed & _M64
    for _ in range(MASK_ROUNDS):
        out, state = splitmix64(state)
        keys.append(out & 0xFFFFFFFF)
    return keys


def half_bits(n: int) -> int:
    """Half the Feistel width: the smallest h >= 1 with 4^h >= n."""
    h = 1
    while (1 << (2 * h)) < n:
        h += 1
    return h


def _fmix32(x: np.ndarray) -> np.ndarray:
    # MurmurHash3's finalizer on uint32 lanes; numpy wraps uint32 products modulo 2^32.
    x = x ^ (x >> np.uint32(16))
    x = x * np.uint32(FMIX32_MUL1)
    x = x ^ (x >> np.uint32(13))
    x = x * np.uint32(FMIX32_MUL2)
    return x ^ (x >> np.uint32(16))


def _feistel(v: np.ndarray, keys: list[int], h: int) -> np.ndarray:
    mask32 = np.uint32((1 << h) - 1)
    left = (v >> np.uint64(h)).astype(np.uint32)
    right = (v & np.uint64((1 << h) - 1)).astype(np.uint32)
    for key in keys:
        left, right = right, left ^ (_fmix32(right ^ np.uint32(key)) & mask32)
    return (left.astype(np.uint64) << np.uint64(h)) | right.astype(np.uint64)


def permutation_prefix(seed: int, n: int, k: int) -> np.ndarray:
    """perm(0), ..., perm(k-1) of the seeded permutation of [0, n), as uint64, unsorted."""
    if not 0 <= k <= n:
        raise ValueError(f"cannot choose {k} of {n} positions")
    if n >= 1 << 64:
        raise ValueError("masks cover at most 2^64 - 1 elements")
    if k == 0:
        return np.empty(0, dtype=np.uint64)
    keys, h = round_keys(seed), half_bits(n)
    if MASK_ROUNDS == 4 and jit.wanted(k):
        v = np.empty(k, dtype=np.uint64)
        # n as uint64: domains up to 2^64 - 1 do not fit the int64 numba gives a Python int.
        _prefix_kernel(np.array(keys, dtype=np.uint64), np.uint64(h), np.uint64(n), v)
        return v
    v = _feistel(np.arange(k, dtype=np.uint64), keys, h)
    # Cycle walking: re-apply the permutation of [0, 4^h) until the value lands in [0, n).
    todo = np.flatnonzero(v >= np.uint64(n))
    while todo.size:
        w = _feistel(v[todo], keys, h)
        v[todo] = w
        todo = todo[w >= np.uint64(n)]
    return v


# The same generator compiled: every output in registers, in two passes. The first applies the
# network to every index with no branch (it vectorizes); the second walks the few cycles that
# left [0, n) (at most 3 in 4 values, about 1 in 6 on average). Measured 2-2.5x faster than one
# loop that walks each value's cycle at once, and 3-5x faster than numpy. uint64 arithmetic
# masked to 32 bits is the uint32 arithmetic of ``_fmix32``.
@jit.kernel
def _prefix_kernel(keys, h, n, out):  # pragma: no cover - compiled by numba
    hh, nn = np.uint64(h), np.uint64(n)
    half = (np.uint64(1) << hh) - np.uint64(1)
    m32, m1, m2 = np.uint64(0xFFFFFFFF), np.uint64(FMIX32_MUL1), np.uint64(FMIX32_MUL2)
    s13, s16 = np.uint64(13), np.uint64(16)
    k0, k1, k2, k3 = keys[0], keys[1], keys[2], keys[3]

    def feistel(v):
        left, right = v >> hh, v & half
        for key in (k0, k1, k2, k3):
            x = right ^ key
            x ^= x >> s16
            x = (x * m1) & m32
            x ^= x >> s13
            x = (x * m2) & m32
            x ^= x >> s16
            left, right = right, left ^ (x & half)
        return (left << hh) | right

    for i in range(out.shape[0]):
        out[i] = feistel(np.uint64(i))
    for i in range(out.shape[0]):
        v = out[i]
        while v >= nn:
            v = feistel(v)
        out[i] = v


def mask_positions(seed: int, n: int, k: int) -> np.ndarray:
    """The kept positions in ascending order (int64), the order values are stored in."""
    if k == n:
        return np.arange(n, dtype=np.int64)
    if (MASK_ROUNDS == 4 and k > 0 and n <= 1 << 32 and SORTED_DENSITY * k >= n
            and jit.wanted(k)):
        out = np.empty(k, dtype=np.int64)
        _sorted_kernel(np.array(round_keys(seed), dtype=np.uint64), half_bits(n), n, out)
        return out
    picked = permutation_prefix(seed, n, k)
    if 8 * k < n:  # few positions: sorting them beats two passes over an n-byte bitmap
        if n <= 1 << 32:  # 4-byte keys sort twice as fast as 8-byte ones
            picked = picked.astype(np.uint32)
        return np.sort(picked).astype(np.int64)
    chosen = np.zeros(n, dtype=bool)
    chosen[picked] = True
    return np.flatnonzero(chosen)


# Masks that keep at least one position in SORTED_DENSITY are put in order by the kernel's
# bitmap (n bits, a scan of n / 64 words); sparser ones are sorted (k log k, fewer bytes).
SORTED_DENSITY = 32

# The index of a 64-bit word's lowest set bit, by de Bruijn multiplication: 63 - clz is not
# something numba exposes, and this is a multiply, a shift and a load.
_DE_BRUIJN = 0x03F79D71B4CB0A89
_LOWEST_BIT = np.zeros(64, dtype=np.uint8)
for _i in range(64):
    _LOWEST_BIT[(((1 << _i) * _DE_BRUIJN) & _M64) >> 58] = _i


# ``mask_positions`` compiled, for domains of at most 2^32 elements (every tensor in practice):
# then both Feistel halves fit 16 bits, so the network runs on uint32 lanes (measured twice as
# fast as on uint64 lanes: twice as many per vector); the positions are marked in an n-bit
# bitmap as the cycles are walked, and read back in order, which replaces the sort (measured at
# n = 2^22, k = n / 10: 3.1 ms, where the 64-bit kernel and a sort took 10.4).
@jit.kernel
def _sorted_kernel(keys, h, n, out):  # pragma: no cover - compiled by numba
    k = out.shape[0]
    hh, half = np.uint32(h), np.uint32((1 << h) - 1)
    m1, m2 = np.uint32(FMIX32_MUL1), np.uint32(FMIX32_MUL2)
    s13, s16 = np.uint32(13), np.uint32(16)
    k0, k1 = np.uint32(keys[0]), np.uint32(keys[1])
    k2, k3 = np.uint32(keys[2]), np.uint32(keys[3])

    def feistel(v):
        left, right = np.uint32(v >> hh), np.uint32(v & half)
        for key in (k0, k1, k2, k3):
            x = np.uint32(right ^ key)
            x = np.uint32(x ^ (x >> s16))
            x = np.uint32(x * m1)
            x = np.uint32(x ^ (x >> s13))
            x = np.uint32(x * m2)
            x = np.uint32(x ^ (x >> s16))
            left, right = right, np.uint32(left ^ (x & half))
        return np.uint32((left << hh) | right)

    picked = np.empty(k, dtype=np.uint32)
    for i in range(k):
        picked[i] = feistel(np.uint32(i))
    nn, one = np.uint64(n), np.uint64(1)
    words = np.zeros((n + 63) >> 6, dtype=np.uint64)
    for i in range(k):
        v = np.uint64(picked[i])
        while v >= nn:
            v = np.uint64(feistel(np.uint32(v)))
        words[v >> np.uint64(6)] |= one << (v & np.uint64(63))
    j, db, s58 = 0, np.uint64(_DE_BRUIJN), np.uint64(58)
    for w_i in range(words.shape[0]):
        w, at = words[w_i], w_i << 6
        while w:
            low = w & (~w + one)
            out[j] = at + _LOWEST_BIT[(low * db) >> s58]
            j += 1
            w ^= low


# The same generator on torch tensors, for masks drawn where the weights are (a GPU). uint32
# lanes live in int64: products of two 32-bit values wrap modulo 2^64 and the low 32 bits kept
# by the mask are exact, as in the numpy version; shifts only ever see non-negative values.
_M32 = 0xFFFFFFFF


def _fmix32_t(x: torch.Tensor) -> torch.Tensor:
    x = x ^ (x >> 16)
    x = (x * FMIX32_MUL1) & _M32
    x = x ^ (x >> 13)
    x = (x * FMIX32_MUL2) & _M32
    return x ^ (x >> 16)


def _feistel_t(v: torch.Tensor, keys: list[int], h: int) -> torch.Tensor:
    mask = (1 << h) - 1
    left, right = v >> h, v & mask
    for key in keys:
        left, right = right, left ^ (_fmix32_t(right ^ key) & mask)
    return (left << h) | right


def mask_positions_torch(seed: int, n: int, k: int, device: torch.device | str) -> torch.Tensor:
    """``mask_positions`` computed on ``device`` (int64, ascending); the same positions."""
    if not 0 <= k <= n:
        raise ValueError(f"cannot choose {k} of {n} positions")
    if n > 1 << 62:
        raise ValueError("torch masks cover at most 2^62 elements")
    if k == n:
        return torch.arange(n, dtype=torch.int64, device=device)
    if k == 0:
        return torch.empty(0, dtype=torch.int64, device=device)
    keys, h = round_keys(seed), half_bits(n)
    v = _feistel_t(torch.arange(k, dtype=torch.int64, device=device), keys, h)
    todo = torch.nonzero(v >= n).reshape(-1)
    while todo.numel():
        w = _feistel_t(v[todo], keys, h)
        v[todo] = w
        todo = todo[w >= n]
    return torch.sort(v).values


def positions_on(seed: int, n: int, k: int, device: torch.device) -> torch.Tensor:
    """The mask where the delta is: numpy on the CPU (faster there), torch elsewhere."""
    if device.type == "cpu":
        return torch.from_numpy(mask_positions(seed, n, k))
    return mask_positions_torch(seed, n, k, device)
