"""The lossless codec and encoded bases: every member and every base bit for bit, over dtypes,
shapes, seeds and edge values; the word arithmetic and zstd frames under them; whole archives
(every file of the model back byte for byte, on every layout); and corrupt residuals caught."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import torch
import zstandard
from hypothesis import given
from hypothesis import strategies as st
from spec_reference import lossless_member, planes
from typer.testing import CliRunner

import ders_cli as ders
from ders_cli.archive import ArchiveReader, header_hash
from ders_cli.cli.app import app
from ders_cli.codecs import LosslessCodec
from ders_cli.codecs.bases import load_base, stored_base
from ders_cli.codecs.lossless import (
    exponent_order,
    frame_of,
    ordered,
    residual,
    restore,
    restore_sorted,
    sorted_planes,
    unzigzag,
    zigzag,
)
from ders_cli.codecs.planes import WORD_TYPES, pack, plane_bytes, unpack, words_of
from ders_cli.constants import BASE_PLANES_ZSTD, DTYPE_BITS, FLOAT_FIELDS, HEADER_PREFIX
from ders_cli.decompose import encode_group
from ders_cli.digests import DEFAULT as DIGEST
from ders_cli.errors import CorruptArchiveError
from ders_cli.groups import synthesize
from ders_cli.safetensors_io import TORCH_DTYPES, tensor_bytes
from ders_cli.stats import mean_base
from fixtures.layouts import LAYOUTS
from fixtures.synthetic import upcycled_tensors, write_model
from tests.test_codecs import FLOATS, group_of, upcycled

shapes = st.tuples(st.integers(1, 24), st.integers(1, 40))


def sha(data) -> str:
    """The checksum this writer records (BLAKE3)."""
    return DIGEST.hex(data)


def edge_words(dtype: str) -> np.ndarray:
    """Bit patterns of the finite edge values of a float dtype: +-0, the smallest and largest
    denormals, the smallest normal, +-1 and +-max."""
    exp_bits, mant_bits = FLOAT_FIELDS[dtype]
    width = DTYPE_BITS[dtype]
    sign = 1 << (width - 1)
    bias = (1 << (exp_bits - 1)) - 1
    top = (((1 << exp_bits) - 2) << mant_bits) | ((1 << mant_bits) - 1)
    patterns = [0, 1, (1 << mant_bits) - 1, 1 << mant_bits, bias << mant_bits, top]
    return np.array(patterns + [p | sign for p in patterns], dtype=WORD_TYPES[width // 8])


def with_edges(members: torch.Tensor, dtype: str, seed: int) -> torch.Tensor:
    """Members with a random tenth of their elements set to edge values (other ones in each
    member, so the base and the members disagree in sign, exponent and class)."""
    rng = np.random.default_rng(seed)
    out = members.clone()
    edges = edge_words(dtype)
    for m in out:
        words = words_of(m)  # a view of m's bits
        n = words.size
        pos = rng.choice(n, size=max(1, n // 10), replace=False)
        words[pos] = edges[rng.integers(0, edges.size, pos.size)]
    return out


def bits(t: torch.Tensor) -> bytes:
    return bytes(tensor_bytes(t))


@given(n_members=st.integers(1, 4), shape=shapes, dtype=st.sampled_from(FLOATS),
       seed=st.integers(0, 10_000), edges=st.booleans(), base_kind=st.sampled_from(
           ["mean", "member", "unrelated"]))
def test_group_round_trip_is_bit_exact(n_members, shape, dtype, seed, edges, base_kind):
    members = upcycled(n_members, shape, dtype, seed)
    if edges:
        members = with_edges(members, dtype, seed)
    base = {"mean": lambda: mean_base(members), "member": lambda: members[0].clone(),
            "unrelated": lambda: with_edges(upcycled(1, shape, dtype, seed + 1), dtype, seed)[0]
            }[base_kind]()
    group = group_of(members, dtype)
    enc = encode_group(members, base, dtype, "lossless", ders.LosslessSpec().params(group))
    planned = LosslessCodec.arrays(enc.params, n_members, group.numel, dtype)
    assert {k: ("U8", tuple(v.shape)) for k, v in enc.arrays.items()} == planned
    stored, stored_dtype = stored_base(base, BASE_PLANES_ZSTD, dtype)
    assert stored_dtype == "U8"
    decoded_base = load_base(stored, BASE_PLANES_ZSTD, dtype, group.numel)
    assert bits(decoded_base) == bits(base)
    for i in range(n_members):
        rows = LosslessCodec.member_rows(enc.arrays, enc.params, i)
        w_hat = synthesize(decoded_base, "lossless", enc.params, rows, i, dtype)
        assert w_hat.dtype == members.dtype
        assert bits(w_hat) == bits(members[i])
        assert enc.recon_digest[i] == sha(bits(members[i]))
        assert enc.rel_error[i] == 0.0


def test_exact_members_reuse_the_checksum_taken_when_read(tmp_path):
    """An exact codec's reconstruction is its input: the encoder records the checksum the reader
    took (no synthesis, no second hash), and the figures are those of a full measurement."""
    members = with_edges(upcycled(4, (24, 40), "BF16", 3), "BF16", 3)
    base = mean_base(members)
    params = ders.LosslessSpec().params(group_of(members, "BF16"))
    full = encode_group(members, base, "BF16", "lossless", params)
    given = encode_group(members, base, "BF16", "lossless", params,
                         member_digests=[sha(bits(m)) for m in members])
    for enc in (full, given):
        assert enc.recon_digest == [sha(bits(m)) for m in members]
        assert enc.rel_error == [0.0] * 4 and enc.cos == [1.0] * 4
    assert given.cos_to_base == full.cos_to_base
    assert all(torch.equal(given.arrays[k], full.arrays[k]) for k in full.arrays)
    model = write_model(tmp_path / "m", upcycled_tensors(layers=1))
    ders.compress(model, ders.LosslessSpec(), tmp_path / "a.ders")
    with ArchiveReader(tmp_path / "a.ders") as r:
        m = r.manifest
        for g in m.groups:
            assert list(g.recon_digest) == [m.tensors[x.tensor].digest for x in g.members]


@pytest.mark.parametrize("dtype", ["BF16", "F16"])
def test_ordered_words_sort_like_the_floats_and_invert_themselves(dtype):
    words = np.arange(1 << 16, dtype=np.uint16)
    values = words_to_float(words, dtype)
    finite = np.isfinite(values)
    signed = ordered(words).view(np.int16)
    order = np.argsort(signed[finite], kind="stable")
    assert np.all(np.diff(values[finite][order]) >= 0)  # the float order, -0 just below +0
    assert signed[0x8000] == -1 and signed[0] == 0
    assert np.array_equal(ordered(ordered(words)), words)


def words_to_float(words: np.ndarray, dtype: str) -> np.ndarray:
    t = torch.from_numpy(words.view(np.int16)).view(TORCH_DTYPES[dtype])
    return t.double().numpy()


@given(width=st.sampled_from([2, 4, 8]), seed=st.integers(0, 2**32 - 1),
       size=st.integers(0, 300))
def test_residuals_invert_for_any_bits(width, seed, size):
    rng = np.random.default_rng(seed)
    t = WORD_TYPES[width]
    member = rng.integers(0, np.iinfo(t).max, size, dtype=t, endpoint=True)
    base = rng.integers(0, np.iinfo(t).max, size, dtype=t, endpoint=True)
    assert np.array_equal(restore(residual(member, base), base), member)
    assert np.array_equal(unzigzag(zigzag(member)), member)


@given(dtype=st.sampled_from(["BF16", "F16", "F32", "F64"]), seed=st.integers(0, 2**32 - 1),
       size=st.integers(0, 3000), near=st.booleans())
def test_the_one_pass_kernels_are_residual_order_and_planes(dtype, seed, size, near):
    """sorted_planes / restore_sorted (numba) against the definitions, one numpy step at a
    time: any bits, and members near their base as real ones are."""
    rng = np.random.default_rng(seed)
    t = WORD_TYPES[DTYPE_BITS[dtype] // 8]
    base = rng.integers(0, np.iinfo(t).max, size, dtype=t, endpoint=True)
    member = (base + rng.integers(0, 3, size).astype(t) if near
              else rng.integers(0, np.iinfo(t).max, size, dtype=t, endpoint=True))
    order, cuts = exponent_order(base, dtype)
    planes, got_cuts = sorted_planes(member, base, dtype)
    assert np.array_equal(planes, plane_bytes(residual(member, base)[order]))
    assert got_cuts == cuts.tolist()
    assert np.array_equal(restore_sorted(planes, base, dtype), member)


def test_zigzag_maps_small_differences_to_small_words():
    d = np.array([0, -1, 1, -2, 2, 127, -128], dtype=np.int16).view(np.uint16)
    assert zigzag(d).tolist() == [0, 1, 2, 3, 4, 254, 255]
    one_ulp_up = np.array([0x3F81], dtype=np.uint16)  # bf16 1.0078125, base 1.0
    assert residual(one_ulp_up, np.array([0x3F80], dtype=np.uint16)).tolist() == [2]
    # Across zero: -0 to +smallest denormal is two steps, whatever XOR would say.
    assert residual(np.array([1], dtype=np.uint16),
                    np.array([0x8000], dtype=np.uint16)).tolist() == [4]


@given(width=st.sampled_from([2, 4, 8]), size=st.integers(0, 5000), seed=st.integers(0, 99))
def test_frames_round_trip_and_any_zstd_frame_of_the_planes_decodes(width, size, seed):
    rng = np.random.default_rng(seed)
    words = rng.integers(0, 300, size).astype(WORD_TYPES[width])
    cuts = sorted(rng.integers(0, size + 1, 3).tolist())
    frame = pack(words, cuts)
    assert zstandard.get_frame_parameters(frame).content_size == size * width
    assert np.array_equal(unpack(frame, size, width), words)
    # The layout is normative, the encoder's settings are not: another writer's frame reads.
    other = zstandard.ZstdCompressor(level=3).compress(plane_bytes(words).tobytes())
    assert np.array_equal(unpack(other, size, width), words)


def test_unpack_refuses_anything_but_one_frame_of_the_right_size():
    words = np.arange(1000, dtype=np.uint16)
    frame = pack(words)
    for bad, n in ((frame[:-3], 1000), (frame + b"\0", 1000), (frame + frame, 1000),
                   (frame, 999), (frame, 1001), (b"not zstd", 1000)):
        with pytest.raises(ValueError):
            unpack(bad, n, 2)


@pytest.mark.parametrize("params", [{"offsets": [0, 5]}, {"offsets": [1, 5, 9]},
                                    {"offsets": [0, 9, 5]}, {"offsets": [0, 5, True]},
                                    {"offsets": "0,5,9"}, {"offsets": None}])
def test_bad_offsets_are_refused(params):
    with pytest.raises(ValueError):
        LosslessCodec.validate(params, 2, 10)


def test_offsets_are_needed_to_plan_the_arrays_and_deltas_cannot_be_encoded():
    LosslessCodec.validate({}, 2, 10)  # before encoding
    with pytest.raises(ValueError, match="offsets"):
        LosslessCodec.arrays({}, 2, 10, "BF16")
    with pytest.raises(TypeError, match="encode_exact"):
        LosslessCodec.encode_member(torch.zeros(3), "F32", {}, 0)


# --- whole archives ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model(tmp_path_factory):
    root = tmp_path_factory.mktemp("lossless")
    tensors = upcycled_tensors(layers=1, experts=4)
    tensors.update({k.replace("layers.0", "layers.1"): v.float() for k, v in
                    upcycled_tensors(layers=1, experts=3, seed=1, extra=False).items()})
    tensors.update({k.replace("layers.0", "layers.2"): v.half() for k, v in
                    upcycled_tensors(layers=1, experts=2, seed=2, extra=False).items()})
    return write_model(root / "model", tensors, shards=2,
                       side_files={"tokenizer.json": '{"x": 1}\n'})


def file_shas(folder):
    return {p.relative_to(folder).as_posix(): sha(p.read_bytes())
            for p in sorted(folder.rglob("*")) if p.is_file()}


def metadata(archive) -> dict:
    raw = archive.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n])["__metadata__"]


def test_expand_restores_every_file_byte_for_byte(model, tmp_path):
    result = ders.compress(model, ders.LosslessSpec(), tmp_path / "a.ders")
    assert {g.action for g in result.groups} == {"lossless"}
    assert {g.dtype for g in result.groups} == {"BF16", "F32", "F16"}
    out = ders.expand(tmp_path / "a.ders", tmp_path / "r").folder
    assert file_shas(out) == file_shas(model)
    report = ders.verify(tmp_path / "a.ders", against=model)
    assert report.ok and report.max_rel_error == 0.0
    assert report.experts_exact == report.experts_compared == 4 * 3 + 3 * 3 + 2 * 3


def test_encoded_bases_make_a_version_2_archive_and_only_they_do(model, tmp_path):
    """With SHA-256 checksums (with BLAKE3 every archive is version 4)."""
    from fixtures.synthetic import upcycled_tensors, write_model

    ders.compress(model, ders.LosslessSpec(), tmp_path / "a.ders", digest="sha256")
    ders.compress(model, ders.QuantSpec(2), tmp_path / "q.ders", digest="sha256")
    scratch = write_model(tmp_path / "s", upcycled_tensors(upcycled=False, layers=1))
    ders.compress(scratch, ders.QuantSpec(2), tmp_path / "s.ders",  # no group: no base
                  digest="sha256")
    assert metadata(tmp_path / "a.ders")["ders.version"] == "2"
    assert metadata(tmp_path / "q.ders")["ders.version"] == "2"
    assert metadata(tmp_path / "s.ders")["ders.version"] == "1"
    for name in ("a.ders", "q.ders"):
        with ArchiveReader(tmp_path / name) as r:
            assert r.manifest.version == 2
            assert {g.base["encoding"] for g in r.manifest.groups} == {BASE_PLANES_ZSTD}
            assert all(r.entry(g.base["array"]).dtype == "U8" for g in r.manifest.groups)


def rewrite_array(archive, name: str, edit) -> None:
    """Change a stored array's bytes and record its new checksum, as a forger would: only the
    codec's own checks are left to notice."""
    raw = bytearray(archive.read_bytes())
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    begin, end = header[name]["data_offsets"]
    data = raw[8 + n + begin : 8 + n + end]
    old = sha(data)
    edit(data)
    raw[8 + n + begin : 8 + n + end] = data
    head = raw[8 : 8 + n].replace(old.encode(), sha(data).encode())
    start = len(HEADER_PREFIX)
    head[start : start + 64] = header_hash(bytes(raw[:8]), bytes(head)).encode()
    archive.write_bytes(bytes(raw[:8] + head + raw[8 + n :]))


@pytest.mark.parametrize("where", ["residuals", "base"])
@pytest.mark.parametrize("damage", ["flip", "truncate-frame"])
def test_a_damaged_frame_with_valid_checksums_is_caught(model, tmp_path, where, damage):
    dest = tmp_path / "a.ders"
    ders.compress(model, ders.LosslessSpec(), dest)
    with ArchiveReader(dest) as r:
        g = r.manifest.groups[0]
        name = g.base["array"] if where == "base" else g.codec["arrays"]["residuals"]
        end = r.entry(name).nbytes if where == "base" else g.codec["params"]["offsets"][1]

    def edit(data):
        if damage == "flip":
            data[end // 2] ^= 0x10
        else:  # the frame's last bytes become zeros: a frame cut short, then padding
            data[end - 4 : end] = b"\0\0\0\0"

    rewrite_array(dest, name, edit)
    with pytest.raises(CorruptArchiveError):
        ders.expand(dest, tmp_path / "r")
    assert not ders.verify(dest).ok


# FP8 experts and LLaMA-MoE's slices leave nothing to compress: test_layouts checks the refusal
@pytest.mark.parametrize("name", sorted(set(LAYOUTS) - {"deepseek_v3_fp8", "llama_moe"}))
def test_every_layout_comes_back_byte_for_byte(name, tmp_path):
    src = LAYOUTS[name].make(tmp_path / "model", upcycled=True)
    result = ders.compress(src, ders.LosslessSpec(), tmp_path / "a.ders")
    assert all(g.action == "lossless" for g in result.groups)
    out = ders.expand(tmp_path / "a.ders", tmp_path / "r").folder
    assert file_shas(out) == file_shas(src)


def test_cli_lossless_and_the_choice_of_setting(model, tmp_path):
    runner = CliRunner()
    r = runner.invoke(app, ["compress", str(model), "--lossless", "-o", str(tmp_path / "a.ders")])
    assert r.exit_code == 0, r.output
    assert "lossless" in r.stdout
    r = runner.invoke(app, ["verify", str(tmp_path / "a.ders"), "--against", str(model)])
    assert r.exit_code == 0 and "27 of 27 experts bit-exact" in " ".join(r.stdout.split())
    for args in ([], ["--lossless", "--drop", "0.5"]):
        r = runner.invoke(app, ["compress", str(model), *args, "-o", str(tmp_path / "b.ders")])
        assert r.exit_code == 2
        assert "exactly one of --drop P" in r.stderr and "Traceback" not in r.output
        assert not (tmp_path / "b.ders").exists()


# --- against the specification, one element at a time (tests/spec_reference.py) ----------------

@given(dtype=st.sampled_from(FLOATS), size=st.integers(0, 200), seed=st.integers(0, 10_000))
def test_decoding_follows_the_specification(dtype, size, seed):
    members = with_edges(upcycled(2, (1, max(size, 1)), dtype, seed), dtype, seed)
    base, member = members[0].reshape(-1)[:size], members[1].reshape(-1)[:size]
    row, _ = LosslessCodec.encode_exact(member, base, dtype, {}, 0)
    width = DTYPE_BITS[dtype] // 8
    z = unpack(frame_of(row).numpy(), size, width)
    assert plane_bytes(z).tobytes() == planes(z.tolist(), width)
    got = lossless_member(words_of(base).tolist(), z.tolist(), dtype)
    assert got == words_of(member).tolist()


def test_the_vectors_of_the_specification():
    u16 = lambda *v: np.array(v, dtype=np.uint16)  # noqa: E731
    assert residual(u16(0x3F81, 0x3F7F, 0x0001, 0xBF80),
                    u16(0x3F80, 0x3F80, 0x8000, 0x3F80)).tolist() == [2, 1, 4, 0xFE01]
    assert planes([0x1234, 0xABCD], 2) == bytes.fromhex("34cd12ab")
    base = torch.tensor([1.0, 0.5, 2.0, 0.75], dtype=torch.bfloat16)
    member = torch.tensor([1.0078125, 0.5, 1.9921875, -0.75], dtype=torch.bfloat16)
    assert words_of(member).tolist() == [0x3F81, 0x3F00, 0x3FFF, 0xBF40]
    row, _ = LosslessCodec.encode_exact(member, base, "BF16", {}, 0)
    content = zstandard.ZstdDecompressor().decompress(frame_of(row).numpy().tobytes())
    assert content == bytes.fromhex("0001020100fd0000")
    assert lossless_member(words_of(base).tolist(), [0, 0xFD01, 2, 1], "BF16") == [
        0x3F81, 0x3F00, 0x3FFF, 0xBF40]


def test_a_base_is_ranked_once_by_workers_that_meet_it_together(monkeypatch):
    import threading

    from ders_cli.codecs import lossless

    calls = []
    rank = lossless._rank
    monkeypatch.setattr(lossless, "_rank", lambda *a: calls.append(1) or rank(*a))
    monkeypatch.setattr(lossless, "_RANKED", type(lossless._RANKED)(maxlen=1))
    base = np.random.default_rng(5).integers(0, 1 << 16, 1 << 16, dtype=np.uint16)
    start = threading.Barrier(4)
    found = []

    def worker() -> None:
        start.wait()
        found.append(lossless._ranked(base, "BF16"))

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and all(f is found[0] for f in found)
    changed = base.copy()
    changed[-1] ^= 1  # the same shape, other words: ranked again, never served stale ranks
    assert lossless._ranked(changed, "BF16") is not found[0] and len(calls) == 2


@pytest.mark.parametrize("n", [0, 1, 4095, 4096, 4097, 3 * 4096 + 5])
@pytest.mark.parametrize("dtype", [np.uint16, np.uint32, np.uint64])
def test_same_words_sees_any_one_word_changed(n, dtype):
    from ders_cli.codecs.lossless import _same_words

    a = np.arange(n, dtype=dtype)
    assert _same_words(a, a.copy())
    for k in sorted({0, n // 2, 4095, 4096, n - 1} & set(range(n))):
        b = a.copy()
        b[k] ^= dtype(1 << (8 * a.itemsize - 1))  # the top bit: no sum or wrap can hide it
        assert not _same_words(a, b), k
