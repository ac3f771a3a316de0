"""Inference from an archive with experts kept compressed equals the expanded model: bit for bit
when experts are synthesized on selection, to rounding when computed as x W_base^T + x δ^T."""

from __future__ import annotations

import pytest
import torch

from ders_cli import LosslessSpec, QuantSpec, SparseSpec, compress, expand
from ders_cli.errors import UsageError
from ders_cli.hf.experts import DersExperts
from ders_cli.runtime import load_from_archive, resident_bytes
from ders_cli.training import save_archive, upcycle_model
from fixtures.tiny_dense import tiny_dense
from fixtures.upcycled import Dims, make_upcycled

TOKENS = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(2))


def _expanded(path):
    """An expanded checkpoint as transformers loads it (its default experts computation, which
    synthesized experts follow)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).eval()


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(TOKENS).logits.float()


@pytest.fixture(scope="module")
def ders_archive(tmp_path_factory):
    """A DeRS-LM model with a universal FFN, its deltas moved off zero, saved and expanded."""
    tmp = tmp_path_factory.mktemp("rt")
    model = upcycle_model(tiny_dense("qwen2", layers=2), mode="lowrank", rank=3, experts=4,
                          universal=True)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith((".arr_b", "gate.weight")):
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(5)) * 0.05)
    save_archive(model, tmp / "m.ders")
    expand(tmp / "m.ders", tmp / "vanilla")
    return tmp


@pytest.fixture(scope="module")
def compressed(tmp_path_factory):
    """``ders compress`` archives of bf16 upcycled fixtures: Mixtral (sparse, 2-bit) and
    Qwen3-MoE (sparse)."""
    tmp = tmp_path_factory.mktemp("cmp")
    out = {}
    for family, specs in (("mixtral", (SparseSpec(0.9), QuantSpec(2))),
                          ("qwen3_moe", (SparseSpec(0.9),))):
        model = make_upcycled(tmp / family, Dims(vocab=128), family=family)
        for spec in specs:
            name = f"{family}-{spec.codec}"
            compress(model, spec, tmp / f"{name}.ders")
            expand(tmp / f"{name}.ders", tmp / f"{name}-expanded")
            out[name] = tmp
    return out


def test_synthesized_experts_give_the_expanded_models_logits_bit_for_bit(ders_archive):
    ref = _logits(_expanded(ders_archive / "vanilla"))
    model = load_from_archive(ders_archive / "m.ders", mode="synthesize", cache_gb=0)
    assert any(isinstance(m, DersExperts) for m in model.modules())
    assert torch.equal(_logits(model), ref)
    cached = load_from_archive(ders_archive / "m.ders", mode="synthesize")
    assert torch.equal(_logits(cached), ref)
    assert torch.equal(_logits(cached), ref)  # from the cache this time


def test_factored_experts_equal_the_expanded_model_to_f32_rounding(ders_archive):
    ref = _logits(_expanded(ders_archive / "vanilla"))
    out = _logits(load_from_archive(ders_archive / "m.ders", mode="factored"))
    # No W_e is formed: x W_base^T + x A B^T rounds differently from x (W_base + A B)^T.
    assert float((out - ref).abs().max()) <= 1e-5 * float(ref.abs().max())
    assert torch.equal(out.argmax(-1), ref.argmax(-1))


@pytest.mark.parametrize("name", ["mixtral-sparse", "mixtral-quant", "qwen3_moe-sparse"])
def test_archives_of_ders_compress_run_too(compressed, name):
    from transformers import AutoModelForCausalLM

    tmp = compressed[name]
    # transformers' default experts computation (grouped), which the archive's follows.
    expanded = AutoModelForCausalLM.from_pretrained(tmp / f"{name}-expanded").eval()
    ref = _logits(expanded)
    model = load_from_archive(tmp / f"{name}.ders")  # auto: synthesized, cached
    assert all(m.mode == "synthesize" for m in model.modules() if isinstance(m, DersExperts))
    assert torch.equal(_logits(model), ref)
    out = _logits(load_from_archive(tmp / f"{name}.ders", mode="factored"))
    # bf16 model: the factored path skips the bf16 rounding of W_e and sums in another order.
    assert float((out - ref).abs().max()) <= 3e-2 * float(ref.abs().max())
    # Experts stay compressed: the model holds less than the expanded one.
    small = load_from_archive(tmp / f"{name}.ders", cache_gb=0)
    _logits(small)
    assert resident_bytes(small) < 0.7 * resident_bytes(expanded)


def test_unknown_mode_is_a_usage_error(ders_archive):
    with pytest.raises(UsageError, match="mode"):
        load_from_archive(ders_archive / "m.ders", mode="fast")


@pytest.fixture(scope="module")
def lossless(tmp_path_factory):
    """A bf16 Mixtral fixture and its lossless archive: synthesis gives every expert's bits."""
    tmp = tmp_path_factory.mktemp("lossless")
    model = make_upcycled(tmp / "mixtral", Dims(vocab=128), family="mixtral")
    compress(model, LosslessSpec(), tmp / "l.ders")
    return model, tmp / "l.ders"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_a_change_of_dtype_changes_the_compute_dtype_not_the_stored_experts(lossless, dtype):
    # .float() used to cast the stored base of a lossless archive, whose residuals are taken
    # against its bf16 bits: a relative error of 1e-3 in f32, NaN logits in f16.
    from transformers import AutoModelForCausalLM

    model, archive = lossless
    moved = load_from_archive(archive).to(dtype)
    ref = AutoModelForCausalLM.from_pretrained(model).eval()
    assert torch.equal(_logits(moved), _logits(ref.to(dtype)))
    assert torch.equal(_logits(load_from_archive(archive, dtype=dtype)),
                       _logits(_expanded_in(model, dtype)))
    for module in moved.modules():
        if isinstance(module, DersExperts):
            assert module.gate.base.dtype == torch.bfloat16  # as stored


def test_dtype_names_and_bad_dtypes(lossless):
    _, archive = lossless
    assert load_from_archive(archive, dtype="float32").dtype == torch.float32
    with pytest.raises(UsageError, match="dtype"):
        load_from_archive(archive, dtype="int8")


def test_loading_leaves_transformers_logging_as_the_user_set_it(lossless):
    # ders used to set transformers' verbosity to "error" for the whole process, hiding the
    # missing-keys report of every later from_pretrained.
    from transformers.utils import logging

    _, archive = lossless
    before = logging.get_verbosity()
    logging.set_verbosity_info()
    logging.enable_progress_bar()
    try:
        load_from_archive(archive)
        assert logging.get_verbosity() == logging.INFO
        assert logging.is_progress_bar_enabled()
    finally:
        logging.set_verbosity(before)


def _expanded_in(path, dtype):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()


def test_configure_and_a_cache_budget_keep_the_logits(ders_archive):
    from ders_cli.runtime import configure

    ref = _logits(_expanded(ders_archive / "vanilla"))
    model = load_from_archive(ders_archive / "m.ders")
    experts = [m for m in model.modules() if isinstance(m, DersExperts)]
    assert {m.mode for m in experts} == {"factored"}  # auto, for low-rank deltas
    one = sum(t.numel() * t.element_size() for t in experts[0].expert_weights(0, TOKENS.float()))
    configure(model, mode="synthesize", cache_gb=1.5 * one / 1e9)  # room for one expert
    assert torch.equal(_logits(model), ref)
    cache = experts[0].cache
    assert 0 < cache.nbytes <= 1.5 * one
    with pytest.raises(UsageError, match="mode"):
        configure(model, mode="fast")


@pytest.fixture(scope="module")
def top3(tmp_path_factory):
    """A bf16 Mixtral routing to 3 of 4 experts (the per-token sum of 3 rounds differently in
    transformers' eager and grouped computations) and its lossless archive."""
    tmp = tmp_path_factory.mktemp("top3")
    model = make_upcycled(tmp / "mixtral", Dims(vocab=128, top_k=3), family="mixtral")
    compress(model, LosslessSpec(), tmp / "l.ders")
    return model, tmp / "l.ders"


@pytest.mark.parametrize("implementation", [None, "eager"])
def test_synthesized_experts_follow_the_models_experts_implementation(top3, implementation):
    # The archive's experts compute as the expanded model's do when loaded the same way:
    # transformers' default grouped computation (no index_add_, the faster on a CPU) or, with
    # experts_implementation="eager", its eager loop; bit for bit from a lossless archive.
    from transformers import AutoModelForCausalLM

    model, archive = top3
    options = {} if implementation is None else {"experts_implementation": implementation}
    ref = _logits(AutoModelForCausalLM.from_pretrained(model, **options).eval())
    loaded = load_from_archive(archive)
    if implementation is not None:
        loaded.set_experts_implementation(implementation)
    assert torch.equal(_logits(loaded), ref)
    assert torch.equal(_logits(loaded), ref)  # warm: from the cache
    other = "eager" if implementation is None else "grouped_mm"
    assert not torch.equal(_logits(AutoModelForCausalLM.from_pretrained(
        model, experts_implementation=other).eval()), ref)  # the two do differ here
