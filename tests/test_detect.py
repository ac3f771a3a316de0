"""Expert groups from names and shapes (per-expert layouts; fused layouts in test_layouts)."""

from __future__ import annotations

import pytest

from ders_cli.detect import expert_slot, find_groups, layer_of
from ders_cli.safetensors_io import TensorEntry

NAMES = {
    "model.layers.3.block_sparse_moe.experts.7.w1.weight":
        ("model.layers.3.block_sparse_moe.experts.{E}.w1.weight", 7),
    "model.layers.0.mlp.experts.12.gate_proj.weight":
        ("model.layers.0.mlp.experts.{E}.gate_proj.weight", 12),
    "model.layers.1.mlp.deepspeed_moe.experts.deepspeed_experts.2.fc1.weight":
        ("model.layers.1.mlp.deepspeed_moe.experts.deepspeed_experts.{E}.fc1.weight", 2),
    "model.layers.5.mlp.calculator.experts.weight_gate.3":
        ("model.layers.5.mlp.calculator.experts.weight_gate.{E}", 3),
    "encoder.block.1.layer.1.mlp.experts.expert_4.wi.weight":
        ("encoder.block.1.layer.1.mlp.experts.expert_{E}.wi.weight", 4),
    "model.layers.2.feed_forward.local_experts.0.w2.weight":
        ("model.layers.2.feed_forward.local_experts.{E}.w2.weight", 0),
}
NOT_EXPERTS = [
    "model.layers.3.block_sparse_moe.gate.weight",
    "model.layers.3.self_attn.q_proj.weight",
    "model.layers.0.mlp.shared_expert.gate_proj.weight",
    "model.embed_tokens.weight",
    "model.layers.10.mlp.gate_proj.weight",
]


@pytest.mark.parametrize("name", sorted(NAMES))
def test_expert_slots(name):
    assert expert_slot(name) == NAMES[name]


@pytest.mark.parametrize("name", NOT_EXPERTS)
def test_other_tensors_have_no_slot(name):
    assert expert_slot(name) is None


def test_layer_of():
    assert layer_of("model.layers.12.mlp.experts.3.w1.weight") == 12
    assert layer_of("transformer.h.4.mlp.c_fc.weight") == 4
    assert layer_of("model.embed_tokens.weight") is None


def entries(spec: dict[str, tuple[str, tuple[int, ...]]]) -> dict[str, TensorEntry]:
    out, pos = {}, 0
    for name, (dtype, shape) in spec.items():
        n = 1
        for d in shape:
            n *= d
        size = n * {"BF16": 2, "F32": 4, "F8_E4M3": 1}[dtype]
        out[name] = TensorEntry(name, dtype, shape, pos, pos + size)
        pos += size
    return out


def test_groups_members_in_expert_order_and_reasons_for_the_rest():
    mix = "model.layers.0.block_sparse_moe.experts.{}.w1.weight"
    spec = {mix.format(e): ("BF16", (8, 4)) for e in (2, 0, 10, 1)}
    spec.update({
        "model.layers.1.mlp.experts.0.up_proj.weight": ("BF16", (8, 4)),
        "model.layers.1.mlp.experts.1.up_proj.weight": ("BF16", (4, 4)),
        "model.layers.2.mlp.experts.0.up_proj.weight": ("F8_E4M3", (8, 4)),
        "model.layers.2.mlp.experts.1.up_proj.weight": ("F8_E4M3", (8, 4)),
        "model.layers.3.mlp.experts.0.up_proj.weight": ("BF16", (8, 4)),
        "model.layers.4.mlp.experts.0.up_proj.weight": ("BF16", (8, 4)),
        "model.layers.4.mlp.experts.1.up_proj.weight": ("F32", (8, 4)),
        "model.norm.weight": ("F32", (4,)),
    })
    found = find_groups(entries(spec))
    groups, skipped = found.groups, found.skipped
    assert len(groups) == 1
    g = groups[0]
    assert g.key == "model.layers.0.block_sparse_moe.experts.{E}.w1.weight"
    assert g.experts == (0, 1, 2, 10)
    assert [m.tensor for m in g.members] == [mix.format(e) for e in (0, 1, 2, 10)]
    assert (g.dtype, g.shape, g.numel, g.nbytes) == ("BF16", (8, 4), 32, 4 * 64)
    reasons = {s.key.split(".")[2]: s.reason for s in skipped}
    assert "differ in shape" in reasons["1"]
    assert reasons["2"].startswith("already quantized: F8_E4M3 FP8 without scales")
    assert reasons["3"] == "only one expert"
    assert "differ in dtype" in reasons["4"]
