"""Straight-from-the-specification implementations (docs/FORMAT.md), one element at a time in
plain Python integers, against which the vectorised library code is checked."""

from __future__ import annotations

M32 = 0xFFFFFFFF
M64 = 0xFFFFFFFFFFFFFFFF


def splitmix64_stream(seed: int, count: int) -> list[int]:
    out, state = [], seed & M64
    for _ in range(count):
        state = (state + 0x9E3779B97F4A7C15) & M64
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
        out.append(z ^ (z >> 31))
    return out


def fmix32(x: int) -> int:
    x ^= x >> 16
    x = (x * 0x85EBCA6B) & M32
    x ^= x >> 13
    x = (x * 0xC2B2AE35) & M32
    return x ^ (x >> 16)


def perm(seed: int, n: int, i: int) -> int:
    h = 1
    while 4**h < n:
        h += 1
    mask = (1 << h) - 1
    keys = [k & M32 for k in splitmix64_stream(seed, 4)]

    def feistel(v: int) -> int:
        left, right = v >> h, v & mask
        for key in keys:
            left, right = right, left ^ (fmix32(right ^ key) & mask)
        return (left << h) | right

    v = feistel(i)
    while v >= n:
        v = feistel(v)
    return v


def mask_positions(seed: int, n: int, k: int) -> list[int]:
    return sorted(perm(seed, n, i) for i in range(k))


def pack_bits(codes: list[int], bits: int) -> bytes:
    stream = 0
    for j, c in enumerate(codes):
        stream |= c << (j * bits)
    return stream.to_bytes((len(codes) * bits + 7) // 8, "little")


# Section 5.4: a lossless member from the base's words and its frame's words, as written there.
FLOAT_FIELDS = {"F64": (8, 11, 52), "F32": (4, 8, 23), "F16": (2, 5, 10), "BF16": (2, 8, 7)}


def lossless_member(base: list[int], z: list[int], dtype: str) -> list[int]:
    w, e, m = FLOAT_FIELDS[dtype]
    bits = 8 * w
    mask = (1 << bits) - 1

    def ordered(u: int) -> int:
        return u ^ ((u >> (bits - 1)) * ((1 << (bits - 1)) - 1))

    key = [(b >> m) & ((1 << e) - 1) for b in base]
    order = sorted(range(len(base)), key=lambda j: (key[j], j))
    out = [0] * len(base)
    for k, j in enumerate(order):
        r = (z[k] >> 1) ^ ((0 - (z[k] & 1)) & mask)
        out[j] = ordered((ordered(base[j]) + r) & mask)
    return out


def planes(words: list[int], width: int) -> bytes:
    """Section 5.5: byte 0 of every word, then byte 1, ..."""
    return bytes((x >> (8 * k)) & 0xFF for k in range(width) for x in words)
