"""What expand writes is the model the user had: transformers loads it and computes (nearly)
the same logits. Checkpoints are made by transformers' own save_pretrained."""

from __future__ import annotations

import pytest
import torch

import ders_cli as ders
from fixtures.upcycled import Dims, make_dense, make_upcycled

transformers = pytest.importorskip("transformers")
DIMS = Dims(vocab=128, hidden=64, intermediate=128, layers=2, experts=4)


def logits(path, tokens):
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        return model(tokens).logits


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    dense = make_dense(root / "dense", DIMS, dtype=torch.float32)
    out = {"dense": dense}
    for family in ("mixtral", "qwen3_moe"):
        out[family] = make_upcycled(root / family, DIMS, family=family, dense=dense,
                                    dtype=torch.float32, max_shard_size="200KB")
    return out


TOKENS = torch.randint(0, DIMS.vocab, (2, 24), generator=torch.Generator().manual_seed(0))


def rel(a, b):
    return float((a - b).norm() / a.norm())


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_lossless_setting_gives_the_same_logits(models, tmp_path, family):
    src = models[family]
    assert len(list(src.glob("*.safetensors"))) > 1  # sharded, with an index
    ders.compress(src, ders.SparseSpec(0.0), tmp_path / "a.ders")
    out = ders.expand(tmp_path / "a.ders", tmp_path / "restored").folder
    # F32 experts, all deltas kept: only the rounding of base + delta in f32 remains (measured:
    # none at all on these fixtures).
    assert rel(logits(src, TOKENS), logits(out, TOKENS)) < 1e-6


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
@pytest.mark.parametrize("spec,bound", [(ders.SparseSpec(0.9), 1e-2), (ders.QuantSpec(4), 5e-4),
                                        (ders.QuantSpec(2), 2e-3)],
                         ids=["drop0.9", "q4", "q2"])
def test_lossy_settings_give_close_logits(models, tmp_path, family, spec, bound):
    src = models[family]
    ders.compress(src, spec, tmp_path / "a.ders")
    out = ders.expand(tmp_path / "a.ders", tmp_path / "restored").folder
    reference, restored = logits(src, TOKENS), logits(out, TOKENS)
    # Measured on these fixtures (experts ~1% from their dense init): 3e-3 (drop 0.9), 1e-4
    # (4-bit), 5e-4 (2-bit) relative logit error; the bounds leave a factor of 3 to 5.
    assert rel(reference, restored) < bound
    assert float((reference.argmax(-1) == restored.argmax(-1)).float().mean()) > 0.9


def test_dense_base_from_the_dense_checkpoint(models, tmp_path):
    result = ders.compress(models["mixtral"], ders.QuantSpec(4), tmp_path / "a.ders",
                           base=models["dense"])
    assert all(g.base.startswith("dense model.layers.") for g in result.groups)
    w1 = [g for g in result.groups if g.key.endswith(".w1.weight")]
    assert all(g.base.endswith("gate_proj.weight") for g in w1)
    out = ders.expand(tmp_path / "a.ders", tmp_path / "restored").folder
    assert rel(logits(models["mixtral"], TOKENS), logits(out, TOKENS)) < 0.01


def test_experts_from_scratch_are_left_alone(tmp_path):
    src = make_upcycled(tmp_path / "scratch", DIMS, upcycled=False, dtype=torch.float32)
    result = ders.compress(src, ders.SparseSpec(0.9), tmp_path / "a.ders")
    assert result.groups and all(g.action == "passthrough" for g in result.groups)
    out = ders.expand(tmp_path / "a.ders", tmp_path / "restored").folder
    assert torch.equal(logits(src, TOKENS), logits(out, TOKENS))
