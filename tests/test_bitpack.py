"""Bit packing of k-bit codes: LSB-first stream, docs/FORMAT.md ("Bit packing")."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from spec_reference import pack_bits

from ders_cli.codecs.bitpack import pack, pack_reference, packed_nbytes, unpack

EXAMPLES = [  # the vectors printed in docs/FORMAT.md
    (1, [1, 0, 1, 1, 0, 0, 1, 0, 1], "4d01"),
    (2, [3, 0, 2, 1, 1], "6301"),
    (3, [5, 1, 7, 2, 0, 6, 3, 4, 1], "cd058f01"),
    (4, [10, 3, 15], "3a0f"),
    (8, [0, 255, 7], "00ff07"),
]


@pytest.mark.parametrize("bits,codes,hexbytes", EXAMPLES)
def test_documented_examples(bits, codes, hexbytes):
    assert pack(np.array(codes, np.uint8), bits).tobytes().hex() == hexbytes
    assert pack_bits(codes, bits).hex() == hexbytes
    assert unpack(np.frombuffer(bytes.fromhex(hexbytes), np.uint8), bits, len(codes)).tolist() \
        == codes


@given(bits=st.integers(1, 8), data=st.data())
def test_round_trip_and_agreement_with_specification(bits, data):
    codes = data.draw(st.lists(st.integers(0, (1 << bits) - 1), max_size=300))
    arr = np.array(codes, dtype=np.uint8)
    packed = pack(arr, bits)
    assert len(packed) == packed_nbytes(len(codes), bits)
    assert packed.tobytes() == pack_bits(codes, bits) == pack_reference(arr, bits).tobytes()
    assert unpack(packed, bits, len(codes)).tolist() == codes


def test_unused_high_bits_are_zero():
    packed = pack(np.full(5, 7, np.uint8), 3)  # 15 bits in 2 bytes: the 16th bit is padding
    assert packed.tobytes() == bytes([0xFF, 0x7F])


def test_rejects_codes_that_do_not_fit():
    with pytest.raises(ValueError):
        pack(np.array([4], np.uint8), 2)
    with pytest.raises(ValueError):
        unpack(np.zeros(1, np.uint8), 3, 3)
