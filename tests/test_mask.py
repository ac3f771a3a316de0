"""The random mask generator: pinned by golden vectors and by a one-element-at-a-time
implementation of docs/FORMAT.md, "Random masks"."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from spec_reference import mask_positions as ref_mask
from spec_reference import perm as ref_perm
from spec_reference import splitmix64_stream

from ders_cli.codecs.mask import half_bits, mask_positions, permutation_prefix, round_keys

# (seed, n, k) -> perm(0..k-1): the vectors printed in docs/FORMAT.md, plus edge cases.
GOLDEN = [
    (0, 10, 10, [4, 2, 8, 7, 5, 3, 9, 6, 0, 1]),
    (0, 10, 3, [4, 2, 8]),
    (1, 100, 5, [34, 31, 28, 26, 45]),
    (42, 1000, 10, [473, 266, 968, 871, 261, 856, 923, 575, 643, 306]),
    (0x0123456789ABCDEF, 1 << 20, 8,
     [303302, 295364, 505164, 459708, 589434, 204820, 189579, 1032402]),
    (1, 1, 1, [0]),
    (2**64 - 1, 2, 2, None),
]


def test_splitmix64_matches_the_published_constant():
    assert splitmix64_stream(0, 1) == [0xE220A8397B1DCDAF]
    assert round_keys(0) == [0x7B1DCDAF, 0xA1B965F4, 0x8009454F, 0x724C81EC]


@pytest.mark.parametrize("seed,n,k,expected", GOLDEN)
def test_golden_vectors(seed, n, k, expected):
    got = permutation_prefix(seed, n, k).tolist()
    if expected is not None:
        assert got == expected
    assert got == [ref_perm(seed, n, i) for i in range(k)]
    assert mask_positions(seed, n, k).tolist() == sorted(got)


@given(seed=st.integers(0, 2**64 - 1), n=st.integers(1, 3000), frac=st.floats(0, 1))
def test_vectorised_equals_specification(seed, n, frac):
    k = int(n * frac)
    assert mask_positions(seed, n, k).tolist() == ref_mask(seed, n, k)


@given(seed=st.integers(0, 2**64 - 1), n=st.integers(1, 5000))
def test_full_prefix_is_a_permutation(seed, n):
    p = permutation_prefix(seed, n, n)
    assert sorted(p.tolist()) == list(range(n))


def test_masks_of_one_seed_are_nested():
    small = set(mask_positions(9, 10_000, 100).tolist())
    large = set(mask_positions(9, 10_000, 1000).tolist())
    assert small < large


def test_positions_are_ascending_distinct_and_in_range():
    p = mask_positions(5, 123_457, 12_345)
    assert p.dtype == np.int64 and len(p) == 12_345
    assert np.all(np.diff(p) > 0) and p[0] >= 0 and p[-1] < 123_457


def test_masks_look_uniform():
    # Every position kept with probability k/n: bucket counts within 6 sigma of the mean.
    n, k, buckets = 1 << 20, 1 << 17, 64
    counts = np.bincount(mask_positions(3, n, k) * buckets // n, minlength=buckets)
    mean = k / buckets
    assert np.all(np.abs(counts - mean) < 6 * mean**0.5)
    # Different seeds give (nearly) independent masks: overlap close to k*k/n.
    a, b = mask_positions(3, n, k), mask_positions(4, n, k)
    assert abs(len(np.intersect1d(a, b)) - k * k / n) < 6 * (k * k / n) ** 0.5


def test_domain_width():
    assert [half_bits(n) for n in (1, 4, 5, 16, 17, 2**32, 2**32 + 1)] == [1, 1, 2, 2, 3, 16, 17]


def test_bad_arguments():
    with pytest.raises(ValueError):
        permutation_prefix(0, 10, 11)
    with pytest.raises(ValueError):
        permutation_prefix(0, 10, -1)
