"""DeRS upcycling for training: exact parameter counts, the dense function at init, and
training steps that move only what DeRS trains."""

from __future__ import annotations

import pytest
import torch

from ders_cli.codecs import SparseCodec
from ders_cli.codecs.mask import mask_positions
from ders_cli.codecs.sparse import keep_count
from ders_cli.errors import UsageError
from ders_cli.training import (
    DersExperts,
    DersProjection,
    UpcycleSpec,
    expert_parameter_counts,
    upcycle_model,
)
from fixtures.tiny_dense import tiny_dense

H, INTER, LAYERS, N = 32, 64, 2, 4
DH = H * INTER  # d*h = 2048 per projection
TOKENS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))


def projections(model) -> list[DersProjection]:
    return [m for m in model.modules() if isinstance(m, DersProjection)]


@pytest.mark.parametrize("universal", [False, True])
@pytest.mark.parametrize("rate", [0.875, 0.9999])
def test_sparse_trainable_expert_parameters_are_exactly_dh_plus_n_dh_1_minus_p(rate, universal):
    model = upcycle_model(tiny_dense(hidden=H, intermediate=INTER, layers=LAYERS), mode="sparse",
                          experts=N, rate=rate, universal=universal)
    members = N + universal
    keep = keep_count(DH, rate)
    if rate == 0.875:
        assert keep == DH * (1 - rate) == 256  # the paper's formula, with no rounding
    projs = projections(model)
    assert len(projs) == LAYERS * 3
    for p in projs:
        assert sum(q.numel() for q in p.parameters() if q.requires_grad) == DH + members * keep
    assert expert_parameter_counts(model)["experts"] == LAYERS * 3 * (DH + members * keep)


@pytest.mark.parametrize("rank", [1, 4])
def test_lowrank_trainable_expert_parameters_are_exactly_dh_plus_n_r_d_plus_h(rank):
    model = upcycle_model(tiny_dense(hidden=H, intermediate=INTER, layers=LAYERS), mode="lowrank",
                          experts=N, rank=rank)
    for p in projections(model):
        assert sum(q.numel() for q in p.parameters() if q.requires_grad) == \
            DH + N * rank * (H + INTER)
    counts = expert_parameter_counts(model)
    assert counts["experts"] == LAYERS * 3 * (DH + N * rank * (H + INTER))


def test_vanilla_upcycling_trains_n_full_copies():
    model = upcycle_model(tiny_dense(hidden=H, intermediate=INTER, layers=LAYERS), mode="vanilla",
                          experts=N)
    assert expert_parameter_counts(model)["experts"] == LAYERS * 3 * N * DH


def test_sparse_index_vectors_are_the_archive_masks_and_values_start_at_zero():
    model = upcycle_model(tiny_dense(), mode="sparse", experts=N, rate=0.9, seed=7)
    seeds = set()
    keep = keep_count(DH, 0.9)
    for p in projections(model):
        assert p.codec == "sparse" and p.params["index"] == "seed" and p.params["keep"] == keep
        assert p.arr_values.shape == (N, keep) and torch.count_nonzero(p.arr_values) == 0
        for m in range(N):
            seed = SparseCodec.seed_of(p.params, m)
            # The delta of member m is its values at the archive's mask positions of its seed.
            with torch.no_grad():
                p.arr_values[m] = torch.arange(1, keep + 1, dtype=p.arr_values.dtype)
            where = torch.nonzero(p.delta(m)).flatten()
            expected = mask_positions(seed, DH, keep)
            assert torch.equal(where, torch.from_numpy(expected.astype("int64")).sort().values)
            seeds.add(seed)
    assert len(seeds) == LAYERS * 3 * N  # one 64-bit seed per expert and projection
    names = "".join(model.state_dict())
    assert "index" not in names and "positions" not in names  # regenerated from the seeds


def test_lowrank_starts_with_a_random_and_b_zero():
    model = upcycle_model(tiny_dense(), mode="lowrank", experts=N, rank=3)
    for p in projections(model):
        assert p.codec == "lowrank" and p.arr_a.shape == (N, p.base.shape[0], 3)
        assert p.arr_b.shape == (N, 3, p.base.shape[1])
        assert torch.count_nonzero(p.arr_b) == 0 and torch.count_nonzero(p.arr_a) == p.arr_a.numel()


CASES = [("mistral", "sparse", {}), ("mistral", "lowrank", {}), ("llama", "lowrank", {}),
         ("qwen2", "sparse", {}), ("mistral", "lowrank", {"every": 2}),
         ("llama", "sparse", {"universal": True}), ("qwen2", "lowrank", {"universal": True}),
         ("mistral", "vanilla", {})]


@pytest.mark.parametrize(("family", "mode", "extra"), CASES)
def test_at_init_the_moe_computes_the_dense_model(family, mode, extra):
    dense = tiny_dense(family, layers=3, tie=family == "llama")
    with torch.no_grad():
        ref = dense(TOKENS).logits
    model = upcycle_model(dense, mode=mode, experts=N, top_k=2, rate=0.9, **extra).eval()
    expected = "Qwen2Moe" if family == "qwen2" or extra else "Mixtral"
    assert type(model).__name__ == f"{expected}ForCausalLM"
    with torch.no_grad():
        out = model(TOKENS).logits
    # f32: the top-k weights sum to 1 only up to rounding (and with a universal FFN, 2/3 W_down
    # is rounded once), so each logit may move by a few ulps of the largest activations.
    assert float((out - ref).abs().max()) <= 1e-5 * float(ref.abs().max())
    assert torch.equal(out.argmax(-1), ref.argmax(-1))


def test_a_plain_training_loop_moves_values_factors_router_and_base_only_as_trained():
    model = upcycle_model(tiny_dense(), mode="sparse", experts=N, rate=0.9).train()
    params_before = [dict(p.params) for p in projections(model)]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(3):
        out = model(TOKENS, labels=TOKENS)
        assert out.aux_loss is not None  # the router's load-balancing loss is in the loss
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(out.loss))
    assert losses[-1] < losses[0]
    for p in projections(model):
        assert all(torch.count_nonzero(v) > 0 for v in p.arr_values)
    assert [p.params for p in projections(model)] == params_before  # the seeds stay


def test_lowrank_gradients_reach_b_first():
    model = upcycle_model(tiny_dense(), mode="lowrank", experts=N, rank=2).train()
    model(TOKENS, labels=TOKENS).loss.backward()
    experts = next(m for m in model.modules() if isinstance(m, DersExperts))
    b_grad, a_grad = experts.gate.arr_b.grad, experts.gate.arr_a.grad
    assert b_grad is not None and torch.count_nonzero(b_grad) > 0
    # B = 0 at init, so dL/dA = (dL/dΔ) B^T is exactly zero on the first step.
    assert a_grad is None or torch.count_nonzero(a_grad) == 0


def test_the_hf_trainer_trains_it(tmp_path):
    pytest.importorskip("accelerate")
    from torch.utils.data import Dataset
    from transformers import Trainer, TrainingArguments

    class Tokens(Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, i):
            return {"input_ids": TOKENS[i % 2], "labels": TOKENS[i % 2]}

    model = upcycle_model(tiny_dense(), mode="lowrank", experts=N, rank=2)
    before = [p.arr_b.detach().clone() for p in projections(model)]
    args = TrainingArguments(tmp_path, max_steps=2, per_device_train_batch_size=2,
                             learning_rate=1e-2, report_to=[], save_strategy="no",
                             use_cpu=True, logging_strategy="no")
    Trainer(model=model, args=args, train_dataset=Tokens()).train()
    after = [p.arr_b for p in projections(model)]
    assert any(not torch.equal(a, b) for a, b in zip(after, before, strict=True))


@pytest.mark.parametrize("spec", [
    UpcycleSpec(mode="dense"), UpcycleSpec(experts=1), UpcycleSpec(top_k=5),
    UpcycleSpec(mode="sparse", rate=1.0), UpcycleSpec(rank=0), UpcycleSpec(every=0)])
def test_bad_settings_are_usage_errors(spec):
    with pytest.raises(UsageError):
        upcycle_model(tiny_dense(), spec)


def test_only_llama_mistral_qwen2_are_upcycled():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32))
    with pytest.raises(UsageError, match="gpt2"):
        upcycle_model(gpt2)
