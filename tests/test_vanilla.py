"""save_archive describes the vanilla checkpoint in memory (hf/vanilla.py) instead of writing it
to a folder and compressing that: the archives are the very bytes the folder way wrote
(tests/save_reference.py), every expert is synthesized once, and no weight touches the disk."""

from __future__ import annotations

import struct

import pytest
import torch
from safetensors.torch import save

from ders_cli.hf.vanilla import safetensors_header
from ders_cli.training import load_trainable, save_archive, upcycle_model
from fixtures.tiny_dense import save_tiny_dense, tiny_dense
from tests.save_reference import reference_save_archive

TOKENS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))


def _trained(family, **kwargs):
    model = upcycle_model(tiny_dense(family, layers=3, tie=family == "llama"), experts=4,
                          top_k=2, **kwargs)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith((".arr_b", ".arr_values", "gate.weight")):
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(3)) * 0.05)
    return model


MODELS = {
    "mixtral-lowrank": lambda: _trained("mistral", mode="lowrank", rank=3),
    "mixtral-sparse-bf16": lambda: _trained("mistral", mode="sparse", rate=0.9)
    .to(torch.bfloat16),
    "qwen2moe-universal-every2": lambda: _trained("qwen2", mode="lowrank", rank=2,
                                                  universal=True, every=2),
    "llama-tied-sparse": lambda: _trained("llama", mode="sparse", rate=0.99),
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_save_archive_writes_the_bytes_the_folder_way_wrote(name, tmp_path):
    model = MODELS[name]()
    (tmp_path / "new").mkdir()
    (tmp_path / "old").mkdir()
    new = save_archive(model, tmp_path / "new" / "m.ders")
    old = reference_save_archive(model, tmp_path / "old" / "m.ders", tmp_path / "ref" / "m")
    assert new.archive.read_bytes() == old.archive.read_bytes()
    assert [p.name for p in (tmp_path / "new").iterdir()] == ["m.ders"]  # nothing left over


def test_sharded_expanded_checkpoint_and_side_files_too(tmp_path):
    dense = save_tiny_dense(tmp_path / "dense", "mistral")
    (dense / "tokenizer.json").write_text('{"version": "1.0"}\n')
    from ders_cli import UpcycleSpec, upcycle_checkpoint

    upcycle_checkpoint(dense, tmp_path / "init.ders", UpcycleSpec(mode="sparse", rate=0.9))
    model = load_trainable(tmp_path / "init.ders")  # carries the tokenizer files
    mine = tmp_path / "README.md"
    mine.write_text("# a model\n")
    new = save_archive(model, tmp_path / "new.ders", side_files=[mine],
                       expanded_shard_size="20KB")
    old = reference_save_archive(model, tmp_path / "old.ders", tmp_path / "ref" / "new",
                                 side_files=[mine], shard_size="20KB")
    assert new.archive.read_bytes() == old.archive.read_bytes()


def test_a_from_pretrained_model_saves_the_bytes_the_folder_way_wrote(tmp_path):
    # Stored (frozen) experts of any codec: here 2-bit deltas of an upcycled Mixtral.
    from ders_cli import QuantSpec, compress
    from ders_cli.runtime import load_from_archive
    from fixtures.upcycled import Dims, make_upcycled

    src = make_upcycled(tmp_path / "mix", Dims(vocab=128), family="mixtral")
    compress(src, QuantSpec(2), tmp_path / "q2.ders")
    model = load_from_archive(tmp_path / "q2.ders")
    new = save_archive(model, tmp_path / "new.ders")
    old = reference_save_archive(model, tmp_path / "old.ders", tmp_path / "ref" / "new")
    assert new.archive.read_bytes() == old.archive.read_bytes()


def test_every_expert_is_synthesized_once(monkeypatch, tmp_path):
    from ders_cli.hf.experts import DersProjection

    model = MODELS["mixtral-lowrank"]()
    calls = []
    real = DersProjection._weight

    def counting(self, member, *args):
        calls.append((id(self), member))
        return real(self, member, *args)

    def again(*args, **kwargs):
        raise AssertionError("compress synthesized a member the model had synthesized")

    monkeypatch.setattr(DersProjection, "_weight", counting)
    monkeypatch.setattr("ders_cli.decompose.synthesize", again)  # what measuring would call
    save_archive(model, tmp_path / "m.ders")
    assert len(calls) == len(set(calls)) == 3 * 3 * 4  # layers x projections x experts


@pytest.mark.parametrize("seed", range(5))
def test_the_header_is_the_one_safetensors_writes(seed):
    gen = torch.Generator().manual_seed(seed)
    dtypes = [torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.uint8,
              torch.float64, torch.int32, torch.bool, torch.int8, torch.int16]
    tensors = {}
    for i in range(int(torch.randint(1, 12, (1,), generator=gen))):
        dt = dtypes[int(torch.randint(0, len(dtypes), (1,), generator=gen))]
        shape = tuple(int(d) for d in torch.randint(0, 5, (int(torch.randint(0, 3, (1,),
                                                                              generator=gen)),),
                                                    generator=gen))
        name = f"layer.{int(torch.randint(0, 99, (1,), generator=gen))}.w{i}"
        tensors[name] = torch.zeros(shape, dtype=dt)
    meta = {"format": "pt"} if seed % 2 else None
    data = save(tensors, metadata=meta)
    n = struct.unpack("<Q", data[:8])[0]
    from ders_cli.dtypes import DTYPE_NAMES

    want = data[8:8 + n]
    got = safetensors_header({k: (DTYPE_NAMES[v.dtype], tuple(v.shape))
                              for k, v in tensors.items()}, meta)
    assert got == want
