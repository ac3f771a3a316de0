"""Round-trip properties of the delta codecs over shapes, dtypes, seeds and settings."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from ders_cli.codecs import QuantCodec, QuantSpec, SparseCodec, SparseSpec, compute_dtype, densify
from ders_cli.codecs.mask import mask_positions
from ders_cli.codecs.quant import dequantize, num_groups, quantize
from ders_cli.codecs.sparse import decode_values, keep_count
from ders_cli.decompose import encode_group
from ders_cli.digests import DEFAULT as DIGEST
from ders_cli.groups import synthesize
from ders_cli.records import ExpertGroup, Member
from ders_cli.safetensors_io import TORCH_DTYPES, tensor_bytes
from ders_cli.stats import PAIR_CHUNK, mean_base, pair_norms

FLOATS = ["F32", "F16", "BF16", "F64"]
shapes = st.tuples(st.integers(1, 24), st.integers(1, 40))


def upcycled(n_members: int, shape: tuple[int, ...], dtype: str, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    dense = torch.randn(shape, generator=g, dtype=torch.float64)
    members = [dense + 0.01 * torch.randn(shape, generator=g, dtype=torch.float64)
               for _ in range(n_members)]
    return torch.stack(members).to(TORCH_DTYPES[dtype])


def group_of(members: torch.Tensor, dtype: str) -> ExpertGroup:
    n = members.shape[0]
    return ExpertGroup("layers.0.experts.{E}.w1.weight",
                       tuple(Member(f"layers.0.experts.{i}.w1.weight") for i in range(n)),
                       tuple(range(n)), dtype, tuple(members.shape[1:]))


@given(shape=shapes, dtype=st.sampled_from(FLOATS), seed=st.integers(0, 2**63 - 1),
       drop=st.sampled_from([0.0, 0.3, 0.5, 0.9, 0.99]))
def test_sparse_keeps_exactly_the_masked_values_rescaled(shape, dtype, seed, drop):
    cd = compute_dtype(dtype)
    delta = torch.randn(shape, dtype=cd).reshape(-1)
    n = delta.numel()
    k = keep_count(n, drop)
    params = {"keep": k, "index": "all" if k == n else "seed", "seeds": [f"{seed:016x}"]}
    row, decoded = SparseCodec.encode_member(delta.clone(), dtype, params, 0)
    values = row["values"]
    assert values.shape == (k,) and values.dtype == TORCH_DTYPES[dtype]
    out = densify(decode_values(values, seed, n, cd), n)
    assert torch.equal(out, densify(decoded, n))  # the encoder measures what decoding gives
    pos = torch.from_numpy(mask_positions(seed, n, k))
    scale = torch.tensor(n / k if k else 0.0, dtype=cd)
    expected = torch.zeros(n, dtype=cd)
    expected[pos] = (delta[pos] * scale).to(TORCH_DTYPES[dtype]).to(cd)
    assert torch.equal(out, expected)
    assert int((out != 0).sum()) <= k


def test_keep_count_rounds_half_up_and_covers_the_edges():
    assert keep_count(10, 0.0) == 10 and keep_count(10, 0.95) == 1 and keep_count(10, 0.96) == 0
    assert keep_count(1000, 0.9) == 100 and keep_count(3, 0.5) == 2


@given(shape=shapes, bits=st.sampled_from([1, 2, 3, 4, 8]), group=st.integers(1, 200),
       scale=st.sampled_from([1e-6, 1e-3, 1.0, 300.0]), seed=st.integers(0, 2**31))
def test_quant_error_is_bounded_by_half_a_step(shape, bits, group, scale, seed):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) * scale).reshape(-1)
    n = x.numel()
    codes, s, off, decoded = quantize(x, bits, group)
    assert codes.dtype == torch.uint8 and codes.numel() == (n * bits + 7) // 8
    assert s.dtype == torch.bfloat16 and s.numel() == num_groups(n, group)
    y = dequantize(codes, s, off, bits, group, n, torch.float32)
    assert torch.equal(y, decoded)  # what the encoder measures is what decoding gives
    sc = s.float().repeat_interleave(group)[:n]
    if bits == 1:
        assert torch.equal(y.abs(), sc)
        assert torch.equal(y >= 0, x >= 0)
        return
    lo = torch.nn.functional.pad(x, (0, -n % group), value=float("inf")).view(-1, group).amin(1)
    hi = torch.nn.functional.pad(x, (0, -n % group), value=float("-inf")).view(-1, group).amax(1)
    # bf16 offset and scale cost at most 2^-8 of the group's extremes at its ends (clamping).
    slack = (2.0**-7 * torch.maximum(lo.abs(), hi.abs())).repeat_interleave(group)[:n]
    err = (y - x).abs()
    assert torch.all(err <= sc / 2 * 1.0001 + slack + 1e-30)


def test_quant_handles_constant_and_zero_groups():
    for x in (torch.zeros(300), torch.full((300,), 0.37)):
        for bits in (1, 2, 3, 4, 8):
            y = dequantize(*quantize(x, bits, 128)[:3], bits, 128, 300, torch.float32)
            assert torch.allclose(y, x, rtol=2**-7, atol=0)


@given(n_members=st.integers(1, 4), shape=shapes, dtype=st.sampled_from(FLOATS),
       seed=st.integers(0, 1000),
       spec=st.sampled_from([SparseSpec(0.0), SparseSpec(0.5, 3), SparseSpec(0.9, 11),
                             QuantSpec(1, 7), QuantSpec(2, 16), QuantSpec(3, 5),
                             QuantSpec(4, 128), QuantSpec(8, 64)]))
def test_group_round_trip(n_members, shape, dtype, seed, spec):
    members = upcycled(n_members, shape, dtype, seed)
    group = group_of(members, dtype)
    base = mean_base(members)
    params = spec.params(group)
    enc = encode_group(members, base, dtype, spec.codec, params)
    codec = SparseCodec if spec.codec == "sparse" else QuantCodec
    planned = codec.arrays(params, n_members, group.numel, dtype)
    assert {k: (str(v.dtype), tuple(v.shape)) for k, v in enc.arrays.items()} == {
        k: (str(TORCH_DTYPES[d]), s) for k, (d, s) in planned.items()}
    cd = compute_dtype(dtype)
    for i in range(n_members):
        rows = codec.member_rows(enc.arrays, enc.params, i)
        w_hat = synthesize(base, spec.codec, params, rows, i, dtype)
        assert w_hat.dtype == members.dtype and w_hat.numel() == group.numel
        assert DIGEST.hex(tensor_bytes(w_hat)) == enc.recon_digest[i]
        w = members[i].reshape(-1).to(cd)
        delta = (w - base.reshape(-1).to(cd)).norm() / w.norm()
        rel = float((w_hat.to(cd) - w).norm() / w.norm())
        assert rel == pytest.approx(enc.rel_error[i], rel=1e-4, abs=1e-12)
        # What each setting may lose, relative to the delta it encodes (plus dtype rounding).
        eps = float(torch.finfo(members.dtype).eps)
        if isinstance(spec, SparseSpec):
            # Dropped elements lose their delta, kept ones gain (n/k - 1) times theirs: the
            # error is at most max(1, n/k - 1) times the delta (its typical value is
            # sqrt(n/k - 1) times, but a tiny member can put all of it in one kept element).
            keep = params["keep"] / group.numel
            allowed = float(delta) * (max(1.0, 1 / keep - 1) if keep else 1.0)
        else:
            allowed = float(delta) * {1: 1.0, 2: 0.7, 3: 0.35, 4: 0.2, 8: 0.02}[spec.bits]
        assert rel <= allowed * 1.5 + 2 * eps


def test_drop_zero_reconstructs_up_to_rounding_of_the_delta():
    members = upcycled(4, (64, 48), "BF16", 0)
    group = group_of(members, "BF16")
    base = mean_base(members)
    enc = encode_group(members, base, "BF16", "sparse", SparseSpec(0.0).params(group))
    assert enc.params["index"] == "all"
    for i in range(4):
        w_hat = synthesize(base, "sparse", enc.params, {"values": enc.arrays["values"][i]}, i,
                           "BF16").float()
        w = members[i].reshape(-1).float()
        delta = (w - base.reshape(-1).float()).abs()
        # The delta is stored in bf16 (relative error 2^-9), then one rounding of the sum.
        assert torch.all((w_hat - w).abs() <= delta * 2.0**-8 + w.abs() * 2.0**-8)
        assert np.mean((w_hat == w).numpy()) > 0.95


def test_member_seeds_differ_per_expert_and_group_and_are_stable():
    members = upcycled(3, (4, 4), "F32", 0)
    g = group_of(members, "F32")
    seeds = SparseSpec(0.9, 1).params(g)["seeds"]
    assert len(set(seeds)) == 3
    assert seeds == SparseSpec(0.9, 1).params(g)["seeds"]
    assert seeds != SparseSpec(0.9, 2).params(g)["seeds"]


@pytest.mark.parametrize("dtype", FLOATS)
def test_decomposition_never_modifies_its_inputs(dtype):
    members = upcycled(3, (8, 8), dtype, 1)
    before = members.clone()
    base = mean_base(members)
    encode_group(members, base, dtype, "quant", QuantSpec(2).params(group_of(members, dtype)))
    assert torch.equal(members, before)


@given(values=st.lists(st.integers(0, 2**64 - 1), max_size=200))
def test_varints_round_trip(values):
    from ders_cli.codecs.index import varint_decode, varint_encode

    arr = np.array(values, dtype=np.uint64)
    data = varint_encode(arr)
    assert varint_decode(data).tolist() == values
    assert len(data) == sum(max(1, -(-v.bit_length() // 7)) for v in values)


@given(n=st.integers(1, 3000), frac=st.floats(0, 1), seed=st.integers(0, 1000))
def test_index_encodings_round_trip(n, frac, seed):
    from ders_cli.codecs.index import bitmap_decode, bitmap_encode, gaps_decode, gaps_encode

    k = int(n * frac)
    pos = mask_positions(seed, n, k)
    assert bitmap_decode(bitmap_encode(pos, n), n).tolist() == pos.tolist()
    assert gaps_decode(gaps_encode(pos), k).tolist() == pos.tolist()


def test_documented_gap_example():
    from ders_cli.codecs.index import gaps_encode

    # positions 3, 4, 200: gaps 3, 0, 195 -> 03 00 c3 01
    assert gaps_encode(np.array([3, 4, 200])).tobytes().hex() == "0300c301"


def test_magnitude_mask_keeps_the_largest_and_breaks_ties_low():
    from ders_cli.codecs.sparse import top_magnitude

    d = torch.tensor([0.5, -3.0, 0.0, 2.0, -2.0, 2.0, 0.1])
    assert top_magnitude(d, 3).tolist() == [1, 3, 4]  # |2| three times: the lowest two
    assert top_magnitude(d, 0).tolist() == [] and top_magnitude(d, 7).tolist() == list(range(7))


SPARSE_VARIANTS = [SparseSpec(0.9, 1, "magnitude"), SparseSpec(0.5, 2, "magnitude", "norm"),
                   SparseSpec(0.99, 3, "magnitude", "inverse"), SparseSpec(0.9, 4, "random",
                                                                           "none"),
                   SparseSpec(0.9, 5, value_bits=4, value_group=16),
                   SparseSpec(0.7, 6, "magnitude", value_bits=2, value_group=8),
                   SparseSpec(0.0, 7, value_bits=8), SparseSpec(0.0, 8, "magnitude")]


@given(n_members=st.integers(1, 4), shape=shapes, dtype=st.sampled_from(FLOATS),
       seed=st.integers(0, 1000), spec=st.sampled_from(SPARSE_VARIANTS))
def test_sparse_variants_round_trip(n_members, shape, dtype, seed, spec):
    members = upcycled(n_members, shape, dtype, seed)
    group = group_of(members, dtype)
    base = mean_base(members)
    enc = encode_group(members, base, dtype, "sparse", spec.params(group))
    params = enc.params
    SparseCodec.validate(params, n_members, group.numel)
    planned = SparseCodec.arrays(params, n_members, group.numel, dtype)
    assert {k: tuple(v.shape) for k, v in enc.arrays.items()} == {
        k: s for k, (_, s) in planned.items()}
    if spec.mask == "magnitude" and params["keep"] < group.numel:
        gaps = params["index"] == "gaps"
        bitmap_bytes = n_members * ((group.numel + 7) // 8)
        assert (enc.arrays["index"].numel() < bitmap_bytes) == gaps  # the smaller one
    cd = compute_dtype(dtype)
    for i in range(n_members):
        rows = SparseCodec.member_rows(enc.arrays, params, i)
        w_hat = synthesize(base, "sparse", params, rows, i, dtype)
        assert DIGEST.hex(tensor_bytes(w_hat)) == enc.recon_digest[i]
        w = members[i].reshape(-1).to(cd)
        delta = w - base.reshape(-1).to(cd)
        if spec.mask == "magnitude" and spec.rescale in (None, "none") and spec.value_bits is None:
            # Exactly the k largest deltas survive, up to the dtype's rounding of the sum.
            kept = params["keep"]
            changed = (w_hat.to(cd) != base.reshape(-1).to(cd)).sum()
            assert int(changed) <= kept
            drop_err = delta.abs().sort().values[: group.numel - kept].norm()
            eps = float(torch.finfo(members.dtype).eps)
            assert float((w_hat.to(cd) - w).norm()) <= float(drop_err) * 1.01 + \
                4 * eps * float(w.norm())


@pytest.mark.parametrize("n", [1, 1000, PAIR_CHUNK, 2 * PAIR_CHUNK + 3])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_pair_norms_are_the_norms_in_chunks(n, dtype):
    gen = torch.Generator().manual_seed(n)
    a = torch.randn(n, generator=gen).to(dtype)
    b = (a.float() + 0.01 * torch.randn(n, generator=gen)).to(dtype)
    got = pair_norms(a, b, torch.float32)
    want = [float(t.double().norm()) for t in (a, b, b.double() - a.double())]
    # A float32 norm of 2^18 elements is good to a few parts in a million (torch's vectorized
    # sum): so is each chunk's, and the sum of their squares adds nothing to it.
    assert got == pytest.approx(want, rel=2e-5)
    # The same figures whatever this thread's buffers held, and on another thread.
    nan = torch.full((n,), float("nan"))
    pair_norms(nan, nan, torch.float32)
    assert pair_norms(a, b, torch.float32) == got
    other = ThreadPoolExecutor(1).submit(pair_norms, a, b, torch.float32).result()
    assert other == got
