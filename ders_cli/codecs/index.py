"""Stored index encodings of a sparse mask that no seed can regenerate (a magnitude mask):
a bitmap, or gaps between kept positions as unsigned LEB128 varints. The sparse codec keeps
whichever is smaller.

Bitmap: n bits, bit p set when position p is kept, packed least significant bit first
(``numpy.packbits(..., bitorder="little")``), ceil(n/8) bytes.
Gaps: for kept positions p_0 < p_1 < ..., g_0 = p_0 and g_j = p_j - p_{j-1} - 1, each written
as LEB128 (7 bits a byte, low bits first, high bit set on every byte but the last).
"""

from __future__ import annotations

import numpy as np

MAX_VARINT_BYTES = 10  # 64-bit values


def bitmap_encode(positions: np.ndarray, n: int) -> np.ndarray:
    bits = np.zeros(n, dtype=np.uint8)
    bits[positions] = 1
    return np.packbits(bits, bitorder="little")


def bitmap_decode(data: np.ndarray, n: int) -> np.ndarray:
    bits = np.unpackbits(np.asarray(data, dtype=np.uint8), count=n, bitorder="little")
    return np.flatnonzero(bits).astype(np.int64)


def _varint_lengths(values: np.ndarray) -> np.ndarray:
    lengths = np.ones(values.shape, dtype=np.int64)
    for j in range(1, MAX_VARINT_BYTES):
        lengths += values >= np.uint64(1) << np.uint64(7 * j)
    return lengths


def varint_encode(values: np.ndarray) -> np.ndarray:
    values = np.asarray(values, dtype=np.uint64)
    lengths = _varint_lengths(values)
    starts = np.cumsum(lengths) - lengths
    out = np.empty(int(lengths.sum()), dtype=np.uint8)
    for j in range(int(lengths.max()) if values.size else 0):
        sel = lengths > j
        byte = (values[sel] >> np.uint64(7 * j)) & np.uint64(0x7F)
        more = (lengths[sel] > j + 1).astype(np.uint64) << np.uint64(7)
        out[starts[sel] + j] = (byte | more).astype(np.uint8)
    return out


def varint_decode(data: np.ndarray) -> np.ndarray:
    data = np.asarray(data, dtype=np.uint8)
    ends = np.flatnonzero(data < 0x80)
    if data.size and (ends.size == 0 or ends[-1] != data.size - 1):
        raise ValueError("varint stream ends inside a value")
    starts = np.concatenate([[0], ends[:-1] + 1]).astype(np.int64)
    lengths = ends - starts + 1
    if lengths.size and lengths.max() > MAX_VARINT_BYTES:
        raise ValueError("varint longer than 64 bits")
    values = np.zeros(ends.size, dtype=np.uint64)
    for j in range(int(lengths.max()) if lengths.size else 0):
        sel = lengths > j
        values[sel] |= (data[starts[sel] + j].astype(np.uint64) & np.uint64(0x7F)) << \
            np.uint64(7 * j)
    return values


def gaps_encode(positions: np.ndarray) -> np.ndarray:
    positions = np.asarray(positions, dtype=np.int64)
    gaps = np.diff(positions, prepend=-1) - 1
    return varint_encode(gaps.astype(np.uint64))


def gaps_decode(data: np.ndarray, k: int) -> np.ndarray:
    gaps = varint_decode(data)
    if gaps.size != k:
        raise ValueError(f"gap stream holds {gaps.size} positions, expected {k}")
    return np.cumsum(gaps.astype(np.int64)) + np.arange(k, dtype=np.int64)
