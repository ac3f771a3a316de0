"""The layout fixtures themselves (fixtures/layouts.py), not ders' detection: each folder has its
files, every expected member with one shape and dtype per group, upcycled experts that are near
copies (and independent ones that are not), and transformers loads and runs it."""

from __future__ import annotations

import importlib.util
import itertools
import json
import math

import pytest
import torch

from fixtures.layouts import LAYOUTS, Layout, headers, read_member

UPCYCLED_COS, SCRATCH_COS = 0.999, 0.5


@pytest.fixture(scope="module", params=[(n, u) for n in LAYOUTS for u in (True, False)],
                ids=lambda p: f"{p[0]}-{'upcycled' if p[1] else 'scratch'}")
def built(request, tmp_path_factory):
    name, upcycled = request.param
    path = LAYOUTS[name].make(tmp_path_factory.mktemp(name) / "model", upcycled=upcycled)
    return LAYOUTS[name], path, upcycled


def _count(layout: Layout, member: str) -> int:
    """Experts in the spec that owns ``member`` (to view fused tensors as [E, ...])."""
    for spec in layout.experts:
        for block, proj in itertools.product(spec.layers, spec.projs + spec.optional):
            if member in spec.members(block, proj):
                return spec.count
    raise KeyError(member)


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0).item()


def test_files(built):
    layout, path, _ = built
    assert (path / "config.json").is_file()
    shards = sorted(path.glob("*.safetensors"))
    assert shards
    if len(shards) > 1:  # the index must name every tensor, each in the shard that holds it
        weight_map = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
        assert set(weight_map) == set(headers(path))
        assert set(weight_map.values()) == {s.name for s in shards}
    if layout.loads_with:
        assert (path / "generation_config.json").is_file()


def test_expected_tensors_exist_with_one_shape_and_dtype(built):
    layout, path, _ = built
    expect, head = layout.expectations(), headers(path)
    json.dumps(expect)  # machine-readable as promised
    groups = expect["expert_groups"] + expect["optional_groups"]
    members = [m for g in groups for m in g]
    assert len(members) == len(set(members))
    assert not set(members) & set(expect["not_groups"])
    for group in groups:
        assert len(group) >= 2
        names = [m.split("[")[0] for m in group]
        assert all(n in head for n in names), names
        assert len({head[n][1] for n in names}) == 1, group
        tensors = [read_member(path, m, _count(layout, m)) for m in group]
        assert len({t.shape for t in tensors}) == 1, group
        if group[0] in expect["shared"]:
            shared = expect["shared"][group[0]]
            assert head[shared][1] == head[names[0]][1]
            assert read_member(path, shared, 1).shape == tensors[0].shape
    for name, form in expect["fused"].items():
        count = _count(layout, f"{name}[0]")
        shape = head[name][0]
        assert shape[0] == count or (form["view"] and shape[0] % count == 0), (name, shape)
    assert all(name in head for name in expect["not_groups"])


def test_experts_are_copies_only_when_upcycled(built):
    layout, path, upcycled = built
    expect = layout.expectations()
    for group in expect["expert_groups"] + expect["optional_groups"]:
        tensors = [read_member(path, m, _count(layout, m)) for m in group]
        cosines = [_cos(a, b) for a, b in itertools.combinations(tensors, 2)]
        if upcycled:
            assert min(cosines) >= UPCYCLED_COS, (group, cosines)
            shared = expect["shared"].get(group[0])
            if shared:
                assert _cos(read_member(path, shared, 1), tensors[0]) >= UPCYCLED_COS, shared
        else:
            assert max(abs(c) for c in cosines) <= SCRATCH_COS, (group, cosines)


def test_llama_moe_experts_are_unequal_disjoint_slices(tmp_path):
    layout = LAYOUTS["llama_moe"]
    assert layout.expectations()["expert_groups"] == []
    path = layout.make(tmp_path)
    head = headers(path)
    gate = {n: head[n][0] for n in head if ".weight_gate." in n}
    assert len({tuple(s) for s in gate.values()}) > 1  # different sizes
    same = [n for n in gate if gate[n] == next(iter(gate.values()))]
    assert len(same) >= 2
    a, b = (read_member(path, n, 1) for n in same[:2])
    assert abs(_cos(a, b)) <= SCRATCH_COS  # slices of one FFN, not copies of it


def test_loads_and_runs_with_transformers(built):
    layout, path, _ = built
    if layout.loads_with is None:
        pytest.skip("hand-written layout: transformers has no such architecture")
    if "fp8" in layout.name and importlib.util.find_spec("accelerate") is None:
        pytest.skip("transformers loads FP8 checkpoints only with accelerate installed")
    import transformers

    config = transformers.AutoConfig.from_pretrained(path)
    auto = (transformers.AutoModelForSeq2SeqLM if config.is_encoder_decoder
            else transformers.AutoModelForCausalLM)
    model = auto.from_pretrained(path).eval()  # the saved dtype: FP8 dequantizes to it
    assert type(model).__name__ == layout.loads_with
    ids = torch.tensor([[1, 5, 9, 3]])
    with torch.no_grad():
        extra = {"decoder_input_ids": ids} if config.is_encoder_decoder else {}
        logits = model(input_ids=ids, **extra).logits
    assert logits.shape[-1] == config.vocab_size
    assert math.isfinite(logits.abs().sum().item())
