"""Inference from an archive with experts kept compressed equals the expanded model: bit for bit
when experts are synthesized on selection, to rounding when computed as x W_base^T + x δ^T."""

from __future__ import annotations

import pytest
import torch

from ders_cli import QuantSpec, SparseSpec, compress, expand
from ders_cli.errors import UsageError
from ders_cli.runtime import ArchiveExperts, load_from_archive, resident_bytes
from ders_cli.training import upcycle_model
from ders_cli.training.archive_io import save_archive
from fixtures.tiny_dense import tiny_dense
from fixtures.upcycled import Dims, make_upcycled

TOKENS = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(2))


def _eager(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, experts_implementation="eager").eval()


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
            if name.endswith((".b", "gate.weight")):
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
    ref = _logits(_eager(ders_archive / "vanilla"))
    model = load_from_archive(ders_archive / "m.ders")
    assert any(isinstance(m, ArchiveExperts) for m in model.modules())
    assert torch.equal(_logits(model), ref)
    cached = load_from_archive(ders_archive / "m.ders", cache_experts=2)
    assert torch.equal(_logits(cached), ref)


def test_factored_experts_equal_the_expanded_model_to_f32_rounding(ders_archive):
    ref = _logits(_eager(ders_archive / "vanilla"))
    out = _logits(load_from_archive(ders_archive / "m.ders", mode="factored"))
    # No W_e is formed: x W_base^T + x A B^T rounds differently from x (W_base + A B)^T.
    assert float((out - ref).abs().max()) <= 1e-5 * float(ref.abs().max())
    assert torch.equal(out.argmax(-1), ref.argmax(-1))


@pytest.mark.parametrize("name", ["mixtral-sparse", "mixtral-quant", "qwen3_moe-sparse"])
def test_archives_of_ders_compress_run_too(compressed, name):
    tmp = compressed[name]
    expanded = _eager(tmp / f"{name}-expanded")
    ref = _logits(expanded)
    model = load_from_archive(tmp / f"{name}.ders")
    assert torch.equal(_logits(model), ref)
    out = _logits(load_from_archive(tmp / f"{name}.ders", mode="factored"))
    # bf16 model: the factored path skips the bf16 rounding of W_e and sums in another order.
    assert float((out - ref).abs().max()) <= 3e-2 * float(ref.abs().max())
    # Experts stay compressed: the model holds less than the expanded one.
    assert resident_bytes(model) < 0.7 * resident_bytes(expanded)


def test_unknown_mode_is_a_usage_error(ders_archive):
    with pytest.raises(UsageError, match="mode"):
        load_from_archive(ders_archive / "m.ders", mode="fast")
