"""A trained DeRS model to a .ders archive and back: the archive's codecs hold exactly the trained
deltas, ``expand`` gives a vanilla Mixtral / Qwen2-MoE checkpoint that transformers loads with
the model's logits, and ``load_trainable`` gives the model back. Plus the ``ders upcycle`` CLI."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from ders_cli import ArchiveReader, expand, verify
from ders_cli.cli.app import app
from ders_cli.families import for_model_type
from ders_cli.groups import group_arrays
from ders_cli.training import DersProjection, load_trainable, save_archive, upcycle_model
from fixtures.tiny_dense import save_tiny_dense, tiny_dense

TOKENS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
SETTINGS = {
    "sm": dict(family="mistral", mode="sparse", rate=0.9),
    "lm": dict(family="mistral", mode="lowrank", rank=3),
    "lm-universal-every2": dict(family="qwen2", mode="lowrank", rank=2, universal=True, every=2),
}


def trained(family: str, steps: int = 2, **kwargs):
    """A DeRS model after a few optimizer steps: every delta, router and base has moved."""
    model = upcycle_model(tiny_dense(family, layers=3), experts=4, top_k=2, **kwargs).train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(steps):
        model(TOKENS, labels=TOKENS).loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


@pytest.fixture(scope="module", params=sorted(SETTINGS))
def saved(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(request.param)
    model = trained(**SETTINGS[request.param])
    result = save_archive(model, tmp / "moe.ders")
    expand(tmp / "moe.ders", tmp / "vanilla")
    return model, result, tmp


def test_the_archive_verifies_and_its_groups_hold_the_trained_deltas(saved):
    model, result, tmp = saved
    assert verify(tmp / "moe.ders").ok
    layout = for_model_type(model.config.model_type)
    projs = [m for m in model.modules() if isinstance(m, DersProjection)]
    with ArchiveReader(tmp / "moe.ders") as r:
        groups = r.manifest.groups
        assert len(groups) == len(projs)
        for g in groups:
            layer, expert, role = layout.parse(g.members[0].tensor)
            assert expert == 0
            p = model.model.layers[layer].mlp.experts.projections[role]
            assert g.base["kind"] == "shared"
            base = group_arrays(r, g).base  # decoded: bases are stored zstd-coded
            assert torch.equal(base.reshape(p.base.shape), p.base.detach())
            assert g.codec["name"] == p.codec and g.codec["params"] == p.params
            if p.codec == "sparse":
                assert g.codec["params"]["index"] == "seed"
                values = r.array(g.codec["arrays"]["values"])  # stored as trained: no rescaling
                assert torch.equal(values, p.arr_values.detach())
            else:
                assert g.codec["params"]["rank"] == p.arr_a.shape[-1]
                assert torch.equal(r.array(g.codec["arrays"]["a"]), p.arr_a.detach())
                assert torch.equal(r.array(g.codec["arrays"]["b"]), p.arr_b.detach())
            # The vanilla checkpoint was written from these very encodings.
            assert g.rel_error == tuple(0.0 for _ in g.members)
    assert all(s.action in ("sparse", "lowrank") for s in result.groups)


def test_transformers_loads_the_expanded_vanilla_moe_with_the_same_logits(saved):
    from transformers import AutoModelForCausalLM

    model, _, tmp = saved
    config = json.loads((tmp / "vanilla" / "config.json").read_text())
    assert config["model_type"] in ("mixtral", "qwen2_moe")
    vanilla = AutoModelForCausalLM.from_pretrained(tmp / "vanilla").eval()
    assert type(vanilla).__name__ == type(model).__name__
    with torch.no_grad():
        ref, out = model(TOKENS).logits, vanilla(TOKENS).logits
    # The DeRS model computes x W_base^T + x Δ^T, the vanilla one x (W_base + Δ)^T with W rounded
    # to f32 once: the logits agree to f32 rounding of the largest activations.
    assert float((out - ref).abs().max()) <= 1e-5 * float(ref.abs().max())
    assert torch.equal(out.argmax(-1), ref.argmax(-1))


def test_load_trainable_gives_back_the_same_model(saved):
    model, _, tmp = saved
    back = load_trainable(tmp / "moe.ders").eval()
    with torch.no_grad():
        assert torch.equal(back(TOKENS).logits, model(TOKENS).logits)
    mine = {n: p for n, p in model.named_parameters()}
    theirs = {n: p for n, p in back.named_parameters()}
    assert mine.keys() == theirs.keys()
    assert all(torch.equal(mine[n], theirs[n]) for n in mine)


def test_a_model_without_ders_experts_is_refused(tmp_path):
    from ders_cli.errors import UsageError

    with pytest.raises(UsageError, match="no DeRS experts"):
        save_archive(upcycle_model(tiny_dense(), mode="vanilla"), tmp_path / "x.ders")
    assert list(tmp_path.iterdir()) == []


runner = CliRunner()


def test_ders_upcycle_writes_an_archive_that_trains_and_expands(tmp_path):
    dense = save_tiny_dense(tmp_path / "dense", "mistral")
    out = tmp_path / "moe.ders"
    res = runner.invoke(app, ["upcycle", str(dense), "-o", str(out), "--experts", "4",
                              "--top-k", "2", "--mode", "lowrank", "--rank", "4"])
    assert res.exit_code == 0, res.output
    assert "wrote" in res.output and out.is_file()
    model = load_trainable(out)
    with torch.no_grad():
        ref = tiny_dense("mistral")(TOKENS).logits
        assert float((model(TOKENS).logits - ref).abs().max()) <= 1e-5 * float(ref.abs().max())
    expand(out, tmp_path / "vanilla")
    assert (tmp_path / "vanilla" / "tokenizer_config.json").read_text() == \
        (dense / "tokenizer_config.json").read_text()
    # No overwrite without --force, and nothing else is written.
    res = runner.invoke(app, ["upcycle", str(dense), "-o", str(out), "--mode", "sparse"])
    assert res.exit_code == 2 and "already exists" in res.output
    res = runner.invoke(app, ["upcycle", str(dense), "-o", str(out), "--mode", "sparse",
                              "--rate", "0.999", "--every", "2", "--universal", "--force",
                              "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.output)
    assert {g["action"] for g in doc["groups"]} == {"sparse"} and len(doc["groups"]) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dense", "moe.ders", "vanilla"]


@pytest.mark.parametrize(("args", "message"), [
    (["--mode", "dense"], "--mode"), (["--rate", "1.5", "--mode", "sparse"], "--rate"),
    (["--top-k", "9"], "--top-k"), (["--mode", "vanilla"], "--mode")])
def test_ders_upcycle_bad_options_exit_2_with_one_line(tmp_path, args, message):
    dense = save_tiny_dense(tmp_path / "dense", "mistral")
    res = runner.invoke(app, ["upcycle", str(dense), "-o", str(tmp_path / "o.ders"), *args])
    assert res.exit_code == 2 and message in res.output
    assert "Traceback" not in res.output and not (tmp_path / "o.ders").exists()


def test_ders_upcycle_of_a_missing_folder(tmp_path):
    res = runner.invoke(app, ["upcycle", str(tmp_path / "nope"), "-o", str(tmp_path / "o.ders")])
    assert res.exit_code == 2 and "no such file or folder" in res.output


def test_the_tokenizer_of_an_upcycled_archive_survives_training_and_save_archive(tmp_path):
    # The documented loop: ders upcycle, load_trainable, train, save_archive. Every side file
    # of the archive (tokenizer, chat template...) must reach the trained archive.
    from ders_cli import UpcycleSpec, upcycle_checkpoint

    dense = save_tiny_dense(tmp_path / "dense", "mistral")
    (dense / "tokenizer.json").write_text('{"version": "1.0", "model": {}}\n')
    upcycle_checkpoint(dense, tmp_path / "init.ders", UpcycleSpec(mode="lowrank", rank=2))
    model = load_trainable(tmp_path / "init.ders")
    model.generation_config.max_length = 77  # the model's own state wins over the archive's
    save_archive(model, tmp_path / "trained.ders")
    expand(tmp_path / "trained.ders", tmp_path / "out")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "out" / name).read_bytes() == (dense / name).read_bytes()
    gen = json.loads((tmp_path / "out" / "generation_config.json").read_text())
    assert gen["max_length"] == 77
    # A side file given to save_archive replaces the archive's own.
    mine = tmp_path / "tokenizer_config.json"
    mine.write_text('{"model_max_length": 64}\n')
    save_archive(model, tmp_path / "again.ders", side_files=[mine])
    expand(tmp_path / "again.ders", tmp_path / "again")
    assert (tmp_path / "again" / "tokenizer_config.json").read_bytes() == mine.read_bytes()


def test_load_trainable_refuses_deltas_it_cannot_train(tmp_path):
    # A magnitude mask stores its positions: they used to be regenerated from a seed the group
    # does not have (0), so training moved values at the wrong positions without a word.
    from ders_cli import SparseSpec, compress
    from ders_cli.errors import InputError
    from fixtures.upcycled import Dims, make_upcycled

    model = make_upcycled(tmp_path / "m", Dims(vocab=128), family="mixtral")
    compress(model, SparseSpec(0.9, mask="magnitude"), tmp_path / "mag.ders")
    with pytest.raises(InputError, match="seeded positions"):
        load_trainable(tmp_path / "mag.ders")
    compress(model, SparseSpec(0.9), tmp_path / "drop.ders")  # random mask: seeded, trainable
    trainable = load_trainable(tmp_path / "drop.ders")
    ref = load_from_archive_logits(tmp_path / "drop.ders")
    with torch.no_grad():
        out = trainable(TOKENS).logits.float()
    assert float((out - ref).abs().max()) <= 2e-2 * float(ref.abs().max())  # bf16, factored


def load_from_archive_logits(path):
    from ders_cli.runtime import load_from_archive

    with torch.no_grad():
        return load_from_archive(path, mode="synthesize")(TOKENS).logits.float()
