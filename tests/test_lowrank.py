"""The lowrank codec: the specified synthesis (docs/FORMAT.md, "lowrank"), its vector, and round
trips through encode, decode and a whole archive."""

from __future__ import annotations

import struct

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ders_cli.codecs import LowRankCodec, compute_dtype, get_codec
from ders_cli.codecs.lowrank import outer_sum
from ders_cli.decompose import GivenEncoding, encode_group, measure_group
from ders_cli.digests import DEFAULT as DIGEST
from ders_cli.groups import synthesize
from ders_cli.records import ExpertGroup, Member
from ders_cli.safetensors_io import TORCH_DTYPES, tensor_bytes

FLOATS = ["F32", "F16", "BF16", "F64"]
dims = st.integers(1, 24)


def _f32(hexes: str) -> torch.Tensor:
    raw = bytes.fromhex(hexes.replace(" ", ""))
    return torch.tensor(struct.unpack(f"<{len(raw) // 4}f", raw), dtype=torch.float32)


def test_the_format_vector_and_its_rounding():
    a = _f32("0008803f 0000803f 00000040 0000003f").reshape(2, 2)
    b = _f32("0008803f 00004040 001080bf 0000803e").reshape(2, 2)
    rows = {"a": a, "b": b}
    delta = LowRankCodec.decode(rows, {"rank": 2, "rows": 2}, 0, 4, "F32")
    assert bytes(tensor_bytes(delta)).hex() == "00000000000c50400008c03f0000c440"
    # Exact arithmetic (what a fused multiply-add keeps) gives 2^-24, not the specified +0.
    assert float((a.double() @ b.double())[0, 0]) == 2.0**-24


def reference(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """One element at a time, in plain Python floats rounded to the tensor's dtype."""
    out = torch.zeros((a.shape[0], b.shape[1]), dtype=a.dtype)
    for u in range(a.shape[0]):
        for v in range(b.shape[1]):
            acc = torch.zeros((), dtype=a.dtype)
            for j in range(a.shape[1]):
                acc = acc + a[u, j] * b[j, v]
            out[u, v] = acc
    return out


@given(rows=st.integers(1, 6), cols=st.integers(1, 6), rank=st.integers(1, 5),
       seed=st.integers(0, 2**31), f64=st.booleans())
@settings(max_examples=40, deadline=None, derandomize=True)
def test_outer_sum_is_the_element_wise_definition(rows, cols, rank, seed, f64):
    g = torch.Generator().manual_seed(seed)
    dt = torch.float64 if f64 else torch.float32
    a = torch.randn(rows, rank, generator=g, dtype=dt)
    b = torch.randn(rank, cols, generator=g, dtype=dt)
    assert torch.equal(outer_sum(a, b), reference(a, b))


@given(rows=dims, cols=dims, members=st.integers(1, 4), rank=st.integers(1, 6),
       dtype=st.sampled_from(FLOATS), seed=st.integers(0, 2**31))
@settings(max_examples=60, deadline=None, derandomize=True)
def test_round_trip_of_low_rank_deltas(rows, cols, members, rank, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    cd = compute_dtype(dtype)
    true_rank = min(rank, rows, cols)
    deltas = torch.stack([
        (torch.randn(rows, true_rank, generator=g, dtype=torch.float64)
         @ torch.randn(true_rank, cols, generator=g, dtype=torch.float64)).reshape(-1)
        for _ in range(members)]).to(cd)
    params = LowRankCodec.params(rank, rows)
    LowRankCodec.validate(params, members, rows * cols)
    arrays, params = LowRankCodec.encode(deltas, dtype, params)
    planned = LowRankCodec.arrays(params, members, rows * cols, dtype)
    assert planned == {"a": (dtype, (members, rows, rank)), "b": (dtype, (members, rank, cols))}
    assert {k: tuple(v.shape) for k, v in arrays.items()} == {k: s for k, (_, s) in planned.items()}
    assert all(v.dtype == TORCH_DTYPES[dtype] for v in arrays.values())
    for i in range(members):
        rows_i = {k: v[i] for k, v in arrays.items()}
        out = LowRankCodec.decode(rows_i, params, i, rows * cols, dtype)
        assert out.dtype == cd and out.shape == (rows * cols,)
        expected = outer_sum(arrays["a"][i].to(cd), arrays["b"][i].to(cd)).reshape(-1)
        assert torch.equal(out, expected)
        # A delta of rank <= r is recovered up to the rounding of the factors to ``dtype``.
        tol = {"F64": 1e-9, "F32": 1e-4, "F16": 5e-3, "BF16": 3e-2}[dtype]
        err = (out.double() - deltas[i].double()).norm() / deltas[i].double().norm().clamp_min(1)
        assert float(err) <= tol


def test_trained_factors_synthesize_and_measure_exactly():
    g = torch.Generator().manual_seed(3)
    base = torch.randn(6, 10, generator=g).to(torch.bfloat16)
    a = torch.randn(3, 6, 2, generator=g).to(torch.bfloat16)
    b = torch.randn(3, 2, 10, generator=g).to(torch.bfloat16) * 0.01
    params = LowRankCodec.params(2, 6)
    members = torch.stack([synthesize(base, "lowrank", params, {"a": a[i], "b": b[i]}, i, "BF16")
                           for i in range(3)])
    group = ExpertGroup("e.{E}.w", tuple(Member(f"e.{i}.w") for i in range(3)), (0, 1, 2),
                        "BF16", (6, 10))
    enc = measure_group(members, GivenEncoding(group, base, "lowrank", params,
                                               {"a": a, "b": b}))
    assert enc.rel_error == [0.0, 0.0, 0.0]
    assert enc.recon_digest == [DIGEST.hex(tensor_bytes(m)) for m in members]
    with pytest.raises(ValueError, match="differ"):
        measure_group(members, GivenEncoding(group, base, "lowrank", params,
                                             {"a": a, "b": b[:, :1]}))


@pytest.mark.parametrize("params", [{"rank": 0, "rows": 2}, {"rank": 2, "rows": 3},
                                    {"rank": True, "rows": 2}, {"rank": 2}])
def test_bad_parameters_are_refused(params):
    with pytest.raises(ValueError):
        get_codec("lowrank").validate(params, 2, 8)


def test_encode_group_with_lowrank_is_the_best_approximation():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(8, 12, generator=g)
    members = base + 0.01 * torch.randn(3, 8, 12, generator=g)
    enc = encode_group(members, base, "F32", "lowrank", LowRankCodec.params(8, 8))
    assert max(enc.rel_error) < 1e-6  # full rank: exact up to f32 rounding
    enc = encode_group(members, base, "F32", "lowrank", LowRankCodec.params(2, 8))
    assert min(enc.rel_error) > 0 and max(enc.rel_error) < 0.01
    assert TORCH_DTYPES["F32"] == enc.arrays["a"].dtype
