"""The numba kernels (ders_cli/codecs/jit.py) choose exactly what the torch code chooses, and
the torch code is what runs where tensors live on a GPU: forced onto the CPU here, it writes the
same archives (no GPU in CI; docs: README "Benchmark")."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import ders_cli as ders
from ders_cli.codecs import quant
from fixtures.synthetic import upcycled_tensors, write_model


def torch_mse(xg, tail, lo, hi, levels):
    return quant._mse_rows(xg, tail, lo, hi, levels)


@pytest.fixture(autouse=True)
def single_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_the_kernels_sum_order_is_torchs_here():
    assert quant._sum_order_is_torchs()


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), rows=st.integers(1, 40),
       g=st.sampled_from([32, 64, 128, 256]), bits=st.sampled_from([2, 3, 4, 8]),
       grid=st.sampled_from([None, 1.0 / 64, 1.0 / 8]), scale=st.sampled_from([1e-6, 1e-2, 3.0]))
def test_mse_kernel_chooses_what_torch_chooses(seed, rows, g, bits, grid, scale):
    """Bit for bit, near-ties included: values on a coarse grid make many candidates' errors
    equal, where only the same summation order and the same strict '<' agree."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, g, generator=gen) * scale
    x[: rows // 3] *= torch.rand(rows // 3, 1, generator=gen)  # some groups nearly flat
    if grid is not None:
        x = torch.round(x / (grid * scale)) * (grid * scale)
    if rows > 2:
        x[1] = x[1, 0]  # a constant group: scale 0
    levels = (1 << bits) - 1
    lo, hi = x.amin(dim=1), x.amax(dim=1)
    got = quant._mse_numba(x.contiguous(), lo, hi, levels)
    want = torch_mse(x, g, lo, hi, levels)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("n", [1, 127, 128, 129, 1000, 128 * 600 + 5])
def test_quantize_with_the_kernel_is_quantize_without(n, monkeypatch, kernels):
    x = torch.randn(n, generator=torch.Generator().manual_seed(n)) * 0.01
    with_kernel = quant.quantize(x.clone(), 2, 128, "mse")
    monkeypatch.setattr(quant, "_SUM_ORDER", [False])  # the torch code, as on a GPU
    without = quant.quantize(x.clone(), 2, 128, "mse")
    for a, b in zip(with_kernel, without, strict=True):
        assert torch.equal(a, b)


def test_the_torch_paths_write_the_same_archives(tmp_path, monkeypatch, kernels):
    """What runs on a GPU (torch's arithmetic, torch's masks) gives the CPU's archive bytes."""
    model = write_model(tmp_path / "m", upcycled_tensors(layers=1, hidden=32, intermediate=64))
    specs = {"q2": ders.QuantSpec(2), "drop": ders.SparseSpec(0.9)}
    for name, spec in specs.items():
        ders.compress(model, spec, tmp_path / f"{name}-cpu.ders")
    monkeypatch.setattr(quant, "_SUM_ORDER", [False])
    kernels("never")  # the fused quantizer and the mask kernel off too
    from ders_cli.codecs import mask, sparse

    torch_positions = mask.mask_positions_torch
    monkeypatch.setattr(sparse, "positions_on",
                        lambda seed, n, k, device: torch_positions(seed, n, k, device))
    for name, spec in specs.items():
        ders.compress(model, spec, tmp_path / f"{name}-torch.ders")
        digests = {hashlib.sha256((tmp_path / f"{name}-{kind}.ders").read_bytes()).hexdigest()
                   for kind in ("cpu", "torch")}
        assert len(digests) == 1, name


# --- the rtn quantizer and the mask generator (ders_cli.codecs.jit modes) ---------------------

@pytest.fixture
def kernels():
    """Runs a test's calls with the kernels forced on; ``kernels("never")`` switches to the
    numpy/torch twins (what runs on a GPU, or in a process with little work)."""
    from ders_cli.codecs import jit

    before = jit.set_mode("always")
    yield jit.set_mode
    jit.set_mode(before)


def _bits(t: torch.Tensor) -> torch.Tensor:
    """A tensor's bits, so that -0.0 and 0.0 differ (torch.equal calls them equal)."""
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()])


def _quantized_both_ways(x, bits, g, method, set_mode):
    set_mode("always")
    fused = quant.quantize(x.clone(), bits, g, method)
    set_mode("never")
    plain = quant.quantize(x.clone(), bits, g, method)
    set_mode("always")
    for a, b in zip(fused, plain, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            assert a.dtype == b.dtype and a.shape == b.shape
            assert torch.equal(_bits(a), _bits(b))
    return fused


def _edge_cases():
    gen = torch.Generator().manual_seed(7)
    r = torch.randn(1000, generator=gen)
    ties = torch.arange(-64, 64, dtype=torch.float32) / 6  # many values half-way between codes
    zeros_inside = r.clone()
    zeros_inside[::3] = 0.0  # zeros, but never a group's minimum or maximum alone
    zeros_inside[:5] = torch.tensor([-2.0, 0.0, -0.0, 2.0, 0.0])
    min_zero = r.abs()
    min_zero[::7] = 0.0  # a group's minimum is a zero: torch's code decides it
    signed_zeros = torch.tensor([-0.0, 0.0, 1.0, -0.0] * 40)
    constant = torch.full((300,), 0.3125)
    flat_groups = torch.repeat_interleave(torch.randn(10, generator=gen), 128)
    extremes = torch.tensor([3.0e38, -3.0e38, 1.0e-38, -1.0e-30] * 64) / 2
    huge_range = torch.tensor([1.0e30, -1.0e30, 1.0, -1.0] * 64)
    subnormal = torch.tensor([1e-42, -3e-41, 5e-45, 2e-40] * 64)
    tiny_values = r * 1e-30
    return {
        "random": r, "ties": ties, "zeros-inside": zeros_inside, "min-zero": min_zero,
        "signed-zeros": signed_zeros, "constant": constant, "flat-groups": flat_groups,
        "extremes": extremes, "huge-range": huge_range, "subnormal": subnormal,
        "tiny-values": tiny_values, "one": torch.tensor([0.75]), "two": torch.tensor([-1.0, 2.0]),
        "three": torch.tensor([5.0, -5.0, 0.5]),
    }


@pytest.mark.parametrize("case", sorted(_edge_cases()))
@pytest.mark.parametrize("bits", [2, 3, 8])
@pytest.mark.parametrize("g", [1, 3, 100, 128])
@pytest.mark.parametrize("method", ["rtn", "mse"])
def test_fused_quantizer_is_torchs_bit_for_bit(case, bits, g, method, kernels):
    """Codes, stored scale and offset and the decoded delta, every bit (signed zeros
    included), on ties, zeros, constant and flat groups, finite extremes, subnormals, groups of
    one element and members shorter than a group."""
    x = _edge_cases()[case]
    assert torch.isfinite(x).all()
    _quantized_both_ways(x, bits, g, method, kernels)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 3000),
       g=st.sampled_from([2, 16, 32, 64, 128, 256, 1000]), bits=st.sampled_from([2, 3, 4, 8]),
       grid=st.sampled_from([None, 1.0 / 16, 1.0 / 3]), method=st.sampled_from(["rtn", "mse"]))
def test_fused_quantizer_is_torchs_on_random_members(seed, n, g, bits, grid, method):
    from ders_cli.codecs import jit

    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=gen) * 0.02
    if grid is not None:  # values on a grid: exact ties between codes
        x = torch.round(x / (grid * 0.02)) * (grid * 0.02)
    before = jit.set_mode("always")
    try:
        _quantized_both_ways(x, bits, g, method, jit.set_mode)
    finally:
        jit.set_mode(before)


def test_the_fused_quantizer_runs_on_ordinary_members_and_declines_zero_minima():
    x = torch.randn(1024, generator=torch.Generator().manual_seed(3)).numpy()
    lo = np.empty(8, np.float32)
    hi = np.empty(8, np.float32)
    assert quant._minmax_kernel(x, 128, lo, hi)
    assert np.array_equal(lo, x.reshape(8, 128).min(1))
    assert np.array_equal(hi, x.reshape(8, 128).max(1))
    x[128:256] = np.abs(x[128:256])
    x[130] = -0.0
    assert not quant._minmax_kernel(x, 128, lo, hi)


MASK_CASES = [(0, 1, 1), (5, 2, 1), (5, 3, 3), (1, 4, 4), (1, 5, 5), (9, 16, 7), (9, 17, 17),
              (2**64 - 1, 1000, 100), (42, 4097, 4097), (3, (1 << 20) + 1, 50_000),
              (0x0123456789ABCDEF, 1 << 20, 8), (77, 10**7, 10**6), (11, 2**40 + 3, 1000),
              (12, 2**64 - 1, 300), (13, 2**63 + 5, 64)]


@pytest.mark.parametrize("seed,n,k", MASK_CASES)
def test_mask_kernel_is_the_numpy_generator(seed, n, k, kernels):
    """Domains of one to 2^64 - 1 elements, around powers of four (the Feistel width), whole
    permutations and short prefixes: the same positions in the same order."""
    from ders_cli.codecs import mask

    fast = mask.permutation_prefix(seed, n, k)
    kernels("never")
    plain = mask.permutation_prefix(seed, n, k)
    assert fast.dtype == plain.dtype == np.uint64
    assert np.array_equal(fast, plain)
    if n <= 5000:
        assert sorted(fast.tolist()) == sorted(set(fast.tolist())) and int(fast.max()) < n


# Domains at the edges of the sorted kernel's uint32 lanes (h = 16 at n = 2^32: both halves,
# and every value the cycle walk meets, just fit) and masks at its density limit, bitmap words
# filled to their last bit.
SORTED_CASES = [(1, 2**32, 1000), (2, 2**32 - 1, 64), (3, 4**12 + 1, 4**12 // 32 + 1),
                (4, 4**10, 4**10 - 1), (5, 64, 2), (6, 128, 127), (7, 4**8 + 1, 4**8 // 32 + 1),
                (8, 10**7, 10**7 // 32), (9, 10**7, 10**7 // 32 - 1), (10, 4096, 4095)]


@pytest.mark.parametrize("seed,n,k", SORTED_CASES)
def test_sorted_mask_kernel_is_the_numpy_generator(seed, n, k, kernels):
    """The kernel that puts positions in order with a bitmap gives the positions that sorting
    the numpy generator's gives, from tiny domains to 2^32."""
    from ders_cli.codecs import mask

    fast = mask.mask_positions(seed, n, k)
    kernels("never")
    plain = mask.mask_positions(seed, n, k)
    assert fast.dtype == plain.dtype == np.int64
    assert np.array_equal(fast, plain)


# Run in a process of its own: the kernel's bitmap of 2^32 bits is 512 MB, and the pages its
# few set bits touch (whole huge pages, where the kernel backs memory with them) would raise
# this process's peak memory, which every child process it starts then reports as its own.
TWO_TO_THE_32 = """
import numpy as np
from ders_cli.codecs import mask
for seed, n in ((1, 2**32), (2, 2**32 - 5), (3, 4**15 + 1)):
    out = np.empty(2000, dtype=np.int64)
    mask._sorted_kernel(np.array(mask.round_keys(seed), dtype=np.uint64), mask.half_bits(n), n,
                        out)
    want = np.sort(mask.permutation_prefix(seed, n, 2000)).astype(np.int64)
    assert np.array_equal(out, want), (seed, n)
"""


def test_sorted_mask_kernel_at_two_to_the_32():
    """Half-widths of 16 bits, the widest the kernel's lanes hold: called directly with fewer
    positions than ``mask_positions`` would give it, against the sorted prefix."""
    import subprocess
    import sys
    from pathlib import Path

    proc = subprocess.run([sys.executable, "-c", TWO_TO_THE_32], capture_output=True,
                          text=True, timeout=300, cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr


@given(seed=st.integers(0, 2**64 - 1), n=st.integers(1, 5000), frac=st.floats(0, 1))
def test_mask_kernel_is_the_numpy_generator_on_random_domains(seed, n, frac):
    from ders_cli.codecs import jit, mask

    k = int(n * frac)
    before = jit.set_mode("always")
    try:
        fast = mask.mask_positions(seed, n, k)
        jit.set_mode("never")
        assert np.array_equal(fast, mask.mask_positions(seed, n, k))
    finally:
        jit.set_mode(before)


@pytest.mark.parametrize("mode", ["always", "never"])
def test_golden_archives_either_way(tmp_path, mode, kernels):
    """The committed golden archives come out of the kernels and out of their twins alike."""
    import json

    from fixtures.make_golden import ARCHIVES, GOLDEN, TINY, digest_of, golden_writer, spec_of

    expected = json.loads((GOLDEN / "expected.json").read_text())
    kernels(mode)
    import zstandard

    for name in sorted(ARCHIVES):
        if "lossless" in name:
            continue  # one coder (numba): nothing to compare
        zstd = expected[name].get("zstd")
        if zstd and zstd != ".".join(map(str, zstandard.ZSTD_VERSION)):
            continue  # written with another zstd (tests/test_golden.py skips it too)
        with golden_writer():  # the writer version goldens record
            ders.compress(TINY, spec_of(name), tmp_path / name, reserve=0,
                          digest=digest_of(name))
        digest = hashlib.sha256((tmp_path / name).read_bytes()).hexdigest()
        assert digest == expected[name]["archive_sha256"], name


def test_kernel_modes():
    from ders_cli.codecs import jit

    before = jit.set_mode("never")
    try:
        assert not jit.wanted(1 << 40)
        jit.set_mode("always")
        assert jit.wanted(1)
        with pytest.raises(ValueError):
            jit.set_mode("sometimes")
    finally:
        jit.set_mode(before)


def test_a_command_that_expects_much_work_runs_kernels_from_its_first_call(monkeypatch):
    from ders_cli.codecs import jit

    for key, value in (("mode", "auto"), ("work", 0), ("expected", 0), ("loaded", False)):
        monkeypatch.setitem(jit._state, key, value)
    assert not jit.wanted(10)
    # A small command's announced size and its own counting are not added up: a quantizer
    # counts each element twice, and must not load the kernels halfway through.
    jit.expect(jit.KERNEL_WORK - 100)
    assert not jit.wanted(jit.KERNEL_WORK // 2)
    jit.expect(jit.KERNEL_WORK)
    assert jit.wanted(10)


@pytest.mark.parametrize("dtype", [np.uint16, np.int16])
def test_plane_kernels_are_the_numpy_planes(dtype, kernels):
    """16-bit words split into planes and joined back, by the kernels and by numpy: the same
    bytes (every value, and a strided view as the lossless coder passes)."""
    from ders_cli.codecs import planes

    words = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(dtype)[::-1]
    fast = planes.plane_bytes(words)
    joined = planes.from_planes(fast)
    kernels("never")
    assert np.array_equal(fast, planes.plane_bytes(words))
    assert np.array_equal(joined, planes.from_planes(fast))
    assert np.array_equal(joined.view(dtype), words)


def test_sparse_bf16_synthesis_kernel_is_torchs(kernels):
    """A bf16 member from a sparse delta, by the kernel and by torch: the same bits for every
    non-NaN bf16 base value (infinities, subnormals, -0.0 included) and values that tie,
    overflow, cancel and land on subnormals; the kept values measured alike."""
    from ders_cli.codecs.base import SparseDelta
    from ders_cli.groups import synthesize_decoded

    g = torch.Generator().manual_seed(5)
    every = torch.arange(1 << 16, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    base = every[~torch.isnan(every)]
    n = base.numel()
    pos = torch.sort(torch.randperm(n, generator=g)[: n // 2]).values
    b = base[pos].float()
    special = torch.cat([
        torch.randn(pos.numel() // 4, generator=g) * 1e-2,
        -b[pos.numel() // 4: pos.numel() // 2],  # cancels: +0.0, -0.0
        (b[pos.numel() // 2: 3 * pos.numel() // 4].abs() + 1e-30) * 2 ** -8,  # near ties
        torch.full((pos.numel() - 3 * pos.numel() // 4,), 3e38),  # overflows
    ])
    for values in (special, torch.randn(pos.numel(), generator=g) * 1e-40):
        fast = synthesize_decoded(SparseDelta(pos, values.clone()), base,
                                  out=torch.empty_like(base))
        kernels("never")
        plain = synthesize_decoded(SparseDelta(pos, values.clone()), base,
                                   out=torch.empty_like(base))
        kernels("always")
        assert torch.equal(_bits(fast.member), _bits(plain.member))
        assert torch.equal(_bits(fast.kept), _bits(plain.kept))
        assert torch.equal(_bits(fast.kept_base), _bits(plain.kept_base))


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("n,group_size", [(4096, 128), (1003, 128), (999, 2**31), (7, 4),
                                          (1003, 100)])
def test_quant_bf16_synthesis_kernels_are_torchs(bits, n, group_size, kernels):
    """A bf16 member synthesized from its codes by the kernels and by dequantize plus torch's
    addition and cast: the same bits, for every width (3 bits and G = 100 take torch's path
    either way), members that end inside a byte and inside a group, one group of G >= n, and
    bases with infinities, zeros of both signs and subnormals."""
    from ders_cli.codecs.quant import QuantCodec
    from ders_cli.groups import synthesize

    g = torch.Generator().manual_seed(bits * 1000 + n)
    base = (torch.randn(n, generator=g) * 0.05).to(torch.bfloat16)
    base[:4] = torch.tensor([float("inf"), -0.0, 0.0, 1e-39])
    delta = torch.randn(n, generator=g) * 0.01
    params = {"bits": bits, "group_size": group_size, "method": "rtn"}
    rows, _ = QuantCodec.encode_member(delta, "BF16", params, 0)
    base_c = base.float()
    fast = synthesize(base, "quant", params, rows, 0, "BF16", base_c, torch.empty_like(base))
    took = QuantCodec.synthesize_into(rows, params, base_c, torch.empty_like(base))
    assert took == (bits != 3 and group_size != 100)
    kernels("never")
    plain = synthesize(base, "quant", params, rows, 0, "BF16", base_c, torch.empty_like(base))
    assert torch.equal(_bits(fast), _bits(plain))


# --- GPTQ's columns (ders_cli.calibration.solve) ---------------------------------------------

@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), rows=st.integers(1, 24), cols=st.sampled_from([8, 64, 200]),
       bits=st.sampled_from([1, 2, 3, 4, 8]), g=st.sampled_from([8, 32, 64]),
       member=st.sampled_from([None, torch.float32, torch.bfloat16]),
       grid=st.sampled_from([None, 1.0 / 16]))
def test_gptq_block_kernel_is_the_torch_loop(seed, rows, cols, bits, g, member, grid):
    """The codes of every round of a calibrated quantizer, bit for bit, with the member's
    rounding (float32, bfloat16) fed back or not, near-ties on a grid included, and groups
    whose scale is zero."""
    from ders_cli.calibration import solve
    from ders_cli.codecs import jit

    gen = torch.Generator().manual_seed(seed)
    delta = torch.randn(rows * cols, generator=gen) * 0.01
    if grid is not None:
        delta = torch.round(delta / (grid * 0.01)) * (grid * 0.01)
    delta[:g] = delta[0]  # a flat group: scale 0
    x = torch.randn(4 * cols, cols, generator=gen) * torch.rand(cols, generator=gen)
    h = x.T @ x
    base = None
    if member is not None:
        base = (torch.randn(rows * cols, generator=gen) * 0.02).to(member).float()
    _, scale, offset, _ = quant.quantize(delta.clone(), bits, g, "rtn")
    offset = None if offset is None else offset.float()
    runs = []
    for mode in ("always", "never"):
        before = jit.set_mode(mode)
        try:
            runs.append(solve.quantize_calibrated(delta, h, bits, g, offset, scale.float(),
                                                  base=base, dtype=member))
        finally:
            jit.set_mode(before)
    for got, want in zip(*runs, strict=True):
        assert (got is None) == (want is None)
        if got is not None:
            assert torch.equal(_bits(got), _bits(want))


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), rows=st.integers(1, 24), width=st.integers(1, 40),
       bits=st.sampled_from([1, 2, 4]), member=st.sampled_from([None, torch.float32,
                                                                 torch.bfloat16]))
def test_gptq_block_kernel_leaves_the_block_and_errors_of_the_torch_loop(seed, rows, width,
                                                                         bits, member):
    """One block, every intermediate compared: the columns' errors and the block after the
    feedback, not only the codes (which a last-bit difference in the feedback rarely moves)."""
    from ders_cli.calibration import solve

    gen = torch.Generator().manual_seed(seed)
    block = torch.randn(rows, width, generator=gen) * 0.01
    x = torch.randn(3 * width, width, generator=gen)
    fb = solve._inverse_factor(solve.damped(x.T @ x).double()).float()
    groups = 5
    gid = torch.randint(0, groups, (rows, width), generator=gen)
    scale = (torch.rand(groups, generator=gen) * 0.004).to(torch.bfloat16).float()
    scale[0] = 0.0
    offset = (-torch.rand(groups, generator=gen) * 0.02).to(torch.bfloat16).float()
    offset[0] = -2.0  # scale 0: a code of 0 whatever the division by the safe scale says
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    base = None if member is None else (torch.randn(rows, width, generator=gen) * 0.02).to(
        member).float()
    levels = (1 << bits) - 1
    want_block, want_errs = block.clone(), torch.empty_like(block)
    want_codes = torch.empty_like(block)
    zero = torch.zeros(width, dtype=torch.int64)
    for i in range(width):
        # The torch loop on column i alone (its group: row_start + order[c] with group size 1,
        # here gid[:, i] + 0), then its feedback into the later columns, as the loop does it.
        solve._torch_block(want_block[:, i:i + 1], fb[i:i + 1, i:i + 1], want_errs[:, i:i + 1],
                           want_codes, i, gid[:, i], zero, offset, scale, safe, levels, bits, 1,
                           base, member or torch.float32)
        want_block[:, i + 1:] -= want_errs[:, i:i + 1] * fb[i:i + 1, i + 1:]
    # The kernel's layout: a column per row.
    got_block = block.T.contiguous()
    got_errs, got_codes = torch.empty_like(got_block), torch.empty_like(got_block)
    rounding = solve._BF16 if member == torch.bfloat16 else solve._NO_ROUNDING
    solve._gptq_block(got_block.numpy(), fb.contiguous().numpy(), gid.T.contiguous().numpy(),
                      scale.numpy(), offset.numpy(), safe.numpy(), levels, bits,
                      solve._EMPTY if base is None else base.T.contiguous().numpy(), rounding,
                      got_codes.numpy(), got_errs.numpy())
    assert torch.equal(_bits(got_codes.T), _bits(want_codes))
    assert torch.equal(_bits(got_errs.T), _bits(want_errs))
    assert torch.equal(_bits(got_block.T), _bits(want_block))


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), rows=st.integers(1, 30), cols=st.sampled_from([4, 16, 50]),
       frac=st.sampled_from([0.05, 0.3, 0.9]))
def test_sparse_values_systems_kernel_is_torchs_gather(seed, rows, cols, frac):
    """A calibrated --drop's kept values, bit for bit, rows keeping nothing or everything
    included (their systems are padded with the identity)."""
    from ders_cli.calibration import solve
    from ders_cli.codecs import jit

    gen = torch.Generator().manual_seed(seed)
    delta = torch.randn(rows * cols, generator=gen) * 0.01
    keep = torch.rand(rows * cols, generator=gen) < frac
    keep[:cols] = False  # a row that keeps nothing
    keep[-cols:] = True  # and one that keeps everything
    positions = torch.nonzero(keep).reshape(-1)
    x = torch.randn(3 * cols, cols, generator=gen)
    h = x.T @ x
    runs = []
    for mode in ("always", "never"):
        before = jit.set_mode(mode)
        try:
            runs.append(solve.sparse_values(delta, positions, h))
        finally:
            jit.set_mode(before)
    assert torch.equal(_bits(runs[0]), _bits(runs[1]))
