"""Quality on real upcycled weights (../shared/real-slice: SmolLM2 upcycled into 4 experts and
fine-tuned). Skipped when ../shared is not beside the repository."""

from __future__ import annotations

import pytest

import ders_cli as ders

MOE = "moe-layer0.safetensors"
DENSE = "dense-layer0.safetensors"


@pytest.fixture(scope="module")
def results(real_slice, tmp_path_factory):
    out = {}
    root = tmp_path_factory.mktemp("real")
    for base in ("mean", "dense"):
        for spec in (ders.SparseSpec(0.9), ders.QuantSpec(2), ders.QuantSpec(1)):
            dest = root / f"{base}-{spec.label}.ders".replace(" ", "")
            r = ders.compress(real_slice / MOE, spec, dest,
                              base="mean" if base == "mean" else real_slice / DENSE)
            out[base, spec.label] = r
    return out


def test_every_group_is_upcycled_and_dense_bases_match_by_role(results):
    r = results["dense", "2-bit"]
    assert [g.action for g in r.groups] == ["quant"] * 3
    roles = {g.key.rsplit(".", 2)[-2]: g.base.rsplit(".", 2)[-2] for g in r.groups}
    assert roles == {"w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"}


def test_two_bit_deltas_reconstruct_well_under_one_percent(results):
    for base in ("mean", "dense"):
        assert max(g.max_rel_error for g in results[base, "2-bit"].groups) < 5e-3


def test_random_drop_error_is_what_rescaling_implies(results, real_slice):
    # Dropping 90% and rescaling the rest by 10 makes the error sqrt(1/0.1 - 1) = 3 times the
    # delta's norm: the paper's estimator is unbiased, not small in Frobenius norm.
    report = ders.inspect_model(real_slice / MOE)
    for g, rep in zip(results["mean", "drop 0.9"].groups, report.groups, strict=True):
        assert g.max_rel_error == pytest.approx(3 * max(rep.rel_delta_norm), rel=0.05)
        assert g.min_cos > 0.9997


def test_the_mean_is_a_better_base_than_the_dense_init(results):
    for setting in ("drop 0.9", "1-bit"):
        mean = max(g.max_rel_error for g in results["mean", setting].groups)
        dense = max(g.max_rel_error for g in results["dense", setting].groups)
        assert mean < dense


def test_sizes(results):
    # Each group is 4 bf16 experts; the base, zstd-coded, takes about two thirds of its raw
    # quarter; the deltas take exactly what their codec says.
    for setting, delta_bits in (("drop 0.9", 0.1 * 16), ("2-bit", 2 + 32 / 128)):
        for g in results["mean", setting].groups:
            base = g.stored_bytes - g.original_bytes * delta_bits / 16
            assert 0.6 < base / (g.original_bytes / 4) < 0.75, setting


def test_lossless_is_bit_exact_and_well_under_xz(real_slice, tmp_path):
    # Measured 37.2% of the file (zstd 1.5.7); xz -9 reaches 48.1% and zstd -19 74.9%.
    src = real_slice / MOE
    r = ders.compress(src, ders.LosslessSpec(), tmp_path / "a.ders")
    assert r.archive_bytes / src.stat().st_size < 0.38
    for g in r.groups:  # each group: the base and four residuals, about 37% of its bytes
        assert g.stored_bytes / g.original_bytes < 0.39
    out = ders.expand(tmp_path / "a.ders", tmp_path / "r").folder
    assert (out / MOE).read_bytes() == src.read_bytes()
    report = ders.verify(tmp_path / "a.ders", against=src)
    assert report.ok and report.max_rel_error == 0.0 and report.experts_exact == 12
