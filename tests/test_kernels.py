"""The numba kernels (ders_cli/codecs/jit.py) choose exactly what the torch code chooses, and
the torch code is what runs where tensors live on a GPU: forced onto the CPU here, it writes the
same archives (no GPU in CI; docs: README "Benchmark")."""

from __future__ import annotations

import hashlib

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
def test_quantize_with_the_kernel_is_quantize_without(n, monkeypatch):
    x = torch.randn(n, generator=torch.Generator().manual_seed(n)) * 0.01
    with_kernel = quant.quantize(x.clone(), 2, 128, "mse")
    monkeypatch.setattr(quant, "_SUM_ORDER", [False])  # the torch code, as on a GPU
    without = quant.quantize(x.clone(), 2, 128, "mse")
    for a, b in zip(with_kernel, without, strict=True):
        assert torch.equal(a, b)


def test_the_torch_paths_write_the_same_archives(tmp_path, monkeypatch):
    """What runs on a GPU (torch's arithmetic, torch's masks) gives the CPU's archive bytes."""
    model = write_model(tmp_path / "m", upcycled_tensors(layers=1, hidden=32, intermediate=64))
    specs = {"q2": ders.QuantSpec(2), "drop": ders.SparseSpec(0.9)}
    for name, spec in specs.items():
        ders.compress(model, spec, tmp_path / f"{name}-cpu.ders")
    monkeypatch.setattr(quant, "_SUM_ORDER", [False])
    from ders_cli.codecs import mask, sparse

    torch_positions = mask.mask_positions_torch
    monkeypatch.setattr(sparse, "positions_on",
                        lambda seed, n, k, device: torch_positions(seed, n, k, device))
    for name, spec in specs.items():
        ders.compress(model, spec, tmp_path / f"{name}-torch.ders")
        digests = {hashlib.sha256((tmp_path / f"{name}-{kind}.ders").read_bytes()).hexdigest()
                   for kind in ("cpu", "torch")}
        assert len(digests) == 1, name
