"""The family table (ders_cli.families): every entry has its fixture, and the names the runtime
asks for are the ones on disk."""

from __future__ import annotations

import pytest

from ders_cli import families
from ders_cli.families import BY_NAME, FAMILIES, ROLES, for_model_type
from fixtures.layouts import LAYOUTS


def test_every_family_and_form_has_a_fixture():
    used = {(spec.family, spec.form or next(iter(BY_NAME[spec.family].forms)))
            for layout in LAYOUTS.values() for spec in layout.experts}
    for family in FAMILIES:
        assert family.name in LAYOUTS, f"{family.name}: add its fixture to fixtures/layouts.py"
        if family.upcycled == "slices":  # not copies: its fixture expects no group
            continue
        for form in family.forms:
            assert (family.name, form) in used, f"{family.name} {form}: no fixture writes it"


def test_entries_are_consistent():
    for family in FAMILIES:
        for experts in family.forms.values():
            for p in experts.projections:
                assert set(p.roles) <= set(ROLES), (family.name, p.name)
                assert experts.fused == (p.form is not None), (family.name, p.name)
                assert bool(p.roles) != p.optional, (family.name, p.name)
                if len(p.roles) == 2:
                    assert p.roles == ("gate", "up") and p.form.gate_up, (family.name, p.name)
            roles = [r for p in experts.projections for r in p.roles]
            assert len(roles) == len(set(roles)) and "down" in roles and "up" in roles
            assert all(family.dense.tensors.get(r) for r in roles), family.name


@pytest.mark.parametrize("model_type", families.RUNTIME_MODEL_TYPES)
def test_runtime_names_round_trip(model_type):
    family = for_model_type(model_type)
    for role in ROLES:
        assert family.parse(family.expert_name(7, 3, role)) == (7, 3, role)
        if family.shared:
            assert family.parse(family.shared_name(7, role)) == (7, None, role)
    assert family.parse("model.layers.7.self_attn.q_proj.weight") is None


def test_runtime_names_are_transformers_names():
    mixtral, qwen2 = for_model_type("mixtral"), for_model_type("qwen2_moe")
    assert mixtral.expert_name(3, 2, "up") == "model.layers.3.block_sparse_moe.experts.2.w3.weight"
    assert mixtral.to_memory("model.layers.0.block_sparse_moe.gate.weight") == (
        "model.layers.0.mlp.gate.weight")
    assert qwen2.shared_name(1, "down") == "model.layers.1.mlp.shared_expert.down_proj.weight"
    assert qwen2.to_memory("model.layers.0.mlp.gate.weight") == "model.layers.0.mlp.gate.weight"
    assert for_model_type("olmoe") is None  # the runtime has not been checked with it


def test_families_sharing_names_agree_on_roles():
    hits = families.members_of("model.layers.4.mlp.experts.12.up_proj.weight")
    assert {f.name for f, *_ in hits} >= {"qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3"}
    assert {(p.roles, prefix) for _, _, p, prefix in hits} == {(("up",), "model.layers.4")}
    assert families.members_of("model.layers.4.mlp.gate.weight") == []
