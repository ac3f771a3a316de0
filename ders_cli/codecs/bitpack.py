"""Bit packing of k-bit codes, least significant bit first.

Code j occupies bits [j*k, (j+1)*k) of the stream; stream bit b is bit (b mod 8) of byte
floor(b / 8), counting from the least significant bit. The stream is ceil(n*k / 8) bytes and
the unused high bits of its last byte are zero. ``pack_reference`` states this directly; the
fast paths below must agree with it bit for bit (tests check).
"""

from __future__ import annotations

import numpy as np


def packed_nbytes(n: int, bits: int) -> int:
    return (n * bits + 7) // 8


def _check(codes: np.ndarray, bits: int) -> np.ndarray:
    if not 1 <= bits <= 8:
        raise ValueError(f"codes of {bits} bits cannot be packed into bytes")
    codes = np.ascontiguousarray(codes, dtype=np.uint8).reshape(-1)
    if bits < 8 and codes.size and int(codes.max()) >> bits:
        raise ValueError(f"a code does not fit in {bits} bits")
    return codes


def pack_reference(codes: np.ndarray, bits: int) -> np.ndarray:
    """The definition, one bit at a time through numpy's bit helpers."""
    codes = _check(codes, bits)
    planes = np.unpackbits(codes[:, None], axis=1, count=bits, bitorder="little")
    return np.packbits(planes.reshape(-1), bitorder="little")


def unpack_reference(packed: np.ndarray, bits: int, n: int) -> np.ndarray:
    stream = np.unpackbits(np.asarray(packed, dtype=np.uint8), bitorder="little")
    planes = stream[: n * bits].reshape(n, bits)
    return np.packbits(planes, axis=1, bitorder="little").reshape(-1)


def pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack codes (values < 2^bits) into ceil(n*bits/8) bytes."""
    codes = _check(codes, bits)
    n = codes.size
    if bits == 8:
        return codes.copy()
    if bits == 1:
        return np.packbits(codes, bitorder="little")
    if 8 % bits == 0:  # 2 and 4 bits: whole codes per byte
        per = 8 // bits
        lanes = np.zeros(-(-n // per) * per, dtype=np.uint8)
        lanes[:n] = codes
        lanes = lanes.reshape(-1, per)
        out = lanes[:, 0].copy()
        for j in range(1, per):
            out |= lanes[:, j] << np.uint8(j * bits)
        return out
    if bits == 3:  # eight codes fill three bytes exactly
        lanes = np.zeros(-(-n // 8) * 8, dtype=np.uint32)
        lanes[:n] = codes
        lanes = lanes.reshape(-1, 8)
        word = lanes[:, 0].copy()
        for j in range(1, 8):
            word |= lanes[:, j] << np.uint32(3 * j)
        out = word.astype("<u4").view(np.uint8).reshape(-1, 4)[:, :3].reshape(-1)
        return out[: packed_nbytes(n, 3)].copy()
    return pack_reference(codes, bits)


def unpack(packed: np.ndarray, bits: int, n: int) -> np.ndarray:
    """The first n codes of a packed stream, as uint8."""
    packed = np.ascontiguousarray(packed, dtype=np.uint8).reshape(-1)
    if packed.size < packed_nbytes(n, bits):
        raise ValueError(f"{packed.size} bytes hold fewer than {n} codes of {bits} bits")
    if bits == 8:
        return packed[:n].copy()
    if bits == 1:
        return np.unpackbits(packed, count=n, bitorder="little")
    if 8 % bits == 0:
        per = 8 // bits
        mask = np.uint8((1 << bits) - 1)
        lanes = np.empty((packed.size, per), dtype=np.uint8)
        for j in range(per):
            lanes[:, j] = (packed >> np.uint8(j * bits)) & mask
        return lanes.reshape(-1)[:n]
    if bits == 3:
        groups = -(-n // 8)
        triples = np.zeros(groups * 3, dtype=np.uint8)
        src = packed[: groups * 3]
        triples[: src.size] = src
        buf = np.zeros((groups, 4), dtype=np.uint8)
        buf[:, :3] = triples.reshape(groups, 3)
        word = buf.view("<u4").reshape(-1)
        lanes = np.empty((groups, 8), dtype=np.uint8)
        for j in range(8):
            lanes[:, j] = (word >> np.uint32(3 * j)) & np.uint32(7)
        return lanes.reshape(-1)[:n]
    return unpack_reference(packed, bits, n)
