"""The model reads text one decoder layer at a time: what each MoE layer sees equals what it
sees inside the whole model's forward pass, and only one layer's weights are ever loaded."""

from __future__ import annotations

import pytest
import torch

from ders_cli.calibration.sequential import CheckpointLayers, LoadedLayers, read_layers
from ders_cli.checkpoint import open_checkpoint
from fixtures.upcycled import Dims, make_upcycled

IDS = torch.randint(0, 256, (5, 24), generator=torch.Generator().manual_seed(4))


def _seen(source, batch):
    out = []
    for li in read_layers(source, IDS, batch=batch):
        out.append((li.layer, li.x.clone(), li.top_k.clone(),
                    {(role, e): li.inputs(role, e).clone()
                     for role in ("gate", "down") for e in (0, 3)}))
    return out


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_layer_by_layer_equals_the_whole_model(tmp_path, family):
    from transformers import AutoModelForCausalLM

    folder = make_upcycled(tmp_path / "m", Dims(layers=3), family=family)
    ckpt = open_checkpoint(folder)
    with ckpt.open() as files:
        streamed = _seen(CheckpointLayers(ckpt, files), batch=2)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    # What the whole model's MoE blocks see in one forward pass, by hooks.
    blocks, routing, hooks = [], [], []
    for layer in model.model.layers:
        hooks.append(layer.mlp.register_forward_pre_hook(
            lambda _m, a: blocks.append(a[0].reshape(-1, a[0].shape[-1]))))
        hooks.append(layer.mlp.experts.register_forward_pre_hook(
            lambda _m, a: routing.append(a[1])))
    with torch.no_grad():
        model(IDS)
    for h in hooks:
        h.remove()
    loaded = _seen(LoadedLayers(model), batch=5)
    assert [s[0] for s in streamed] == [0, 1, 2] == [s[0] for s in loaded]
    for (_, x, top, inputs), (_, x2, top2, inputs2), x3, top3 in zip(
            streamed, loaded, blocks, routing, strict=True):
        torch.testing.assert_close(x, x3, rtol=0, atol=1e-5)
        torch.testing.assert_close(x2, x3, rtol=0, atol=1e-5)
        assert torch.equal(top, top3) and torch.equal(top2, top3)
        for key, v in inputs.items():
            torch.testing.assert_close(v, inputs2[key], rtol=0, atol=1e-5)
            assert v.shape[0] == int((top == key[1]).any(1).sum())


def test_one_layer_of_weights_at_a_time(tmp_path):
    folder = make_upcycled(tmp_path / "m", Dims(layers=8))
    ckpt = open_checkpoint(folder)
    layer0 = [n for n in ckpt.where if n.startswith("model.layers.0.")]
    one_layer = sum(ckpt.entry(n).numel for n in layer0) * 4  # float32
    with ckpt.open() as files:
        source = CheckpointLayers(ckpt, files)
        held = []
        for li in read_layers(source, IDS, batch=5):
            loaded = [n for n, p in source.model.named_parameters() if p.device.type != "meta"
                      and n.startswith("model.layers.")]
            held.append({int(n.split(".")[2]) for n in loaded})
            assert li.x.shape == (IDS.numel(), 64)
        assert held == [{i} for i in range(8)]
        assert source.peak_bytes == one_layer
        assert source.loaded_bytes == 0
