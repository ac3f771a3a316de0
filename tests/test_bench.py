"""The benchmark's checkpoint generator writes valid, upcycled-looking, right-sized checkpoints;
the benchmark itself runs end to end at a tiny size."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors import safe_open

from bench.layout import EXPERT, INDEX_FILE, PROJS, tensor_shapes
from bench.synth import write_checkpoint


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("synth") / "model", 6_000_000,
                            shard_bytes=2_000_000, hidden=64)


def test_size_shards_and_index(ckpt):
    assert abs(ckpt.bytes / 6_000_000 - 1) < 0.10
    shards = [f for f in ckpt.files if f.endswith(".safetensors")]
    assert len(shards) >= 3
    assert sorted(p.name for p in ckpt.folder.iterdir()) == sorted(ckpt.files)
    index = json.loads((ckpt.folder / INDEX_FILE).read_text())
    expected = dict(tensor_shapes(ckpt.dims))
    assert set(index["weight_map"]) == set(expected)
    for shard in shards:
        with safe_open(ckpt.folder / shard, "pt") as f:  # validates header and offsets
            for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                assert index["weight_map"][name] == shard
                t = f.get_tensor(name)
                assert t.dtype == torch.bfloat16 and tuple(t.shape) == expected[name]
                assert bool(torch.isfinite(t).all())
    assert index["metadata"]["total_size"] == sum(math.prod(s) * 2 for s in expected.values())


def test_experts_look_upcycled(ckpt):
    tensors = {}
    for shard in ckpt.files:
        if shard.endswith(".safetensors"):
            with safe_open(ckpt.folder / shard, "pt") as f:
                tensors.update({n: f.get_tensor(n) for n in f.keys()})  # noqa: SIM118
    for layer, proj in ckpt.expert_groups:
        w = torch.stack([tensors[EXPERT.format(L=layer, E=e, P=proj)].double().flatten()
                         for e in range(ckpt.dims.experts)])
        mean = w.mean(0)
        own = (w - mean).norm(dim=1) / mean.norm()
        assert bool(((own > 0.003) & (own < 0.008)).all()), own  # real-slice: 0.5%-0.6%
        cos = w @ mean / w.norm(dim=1) / mean.norm()
        assert float(cos.min()) > 0.9999
    assert len(ckpt.expert_groups) == ckpt.dims.layers * len(PROJS)


def test_same_seed_same_bytes(ckpt, tmp_path):
    again = write_checkpoint(tmp_path / "again", 6_000_000, shard_bytes=2_000_000, hidden=64)
    for f in ckpt.files:
        assert (again.folder / f).read_bytes() == (ckpt.folder / f).read_bytes()


@pytest.mark.slow
def test_benchmark_runs_end_to_end(tmp_path):
    from bench.run import main

    out = tmp_path / "results.json"
    rc = main(["--sizes", "0.004", "--hidden", "64", "--no-drop-cache", "--workdir",
               str(tmp_path / "work"), "--json", str(out)])
    doc = json.loads(out.read_text())
    assert rc == 0, doc
    assert [r["ok"] for r in doc["rows"]] == [True] * 11
    exact = next(r for r in doc["rows"] if r["command"] == "ders expand (lossless)")
    assert "bit-exact" in exact["note"]
    compress = next(r for r in doc["rows"] if r["command"].startswith("ders compress"))
    assert compress["output_bytes"] >= compress["theory_bytes"]
    assert not any((tmp_path / "work").iterdir())  # cleaned up


def test_fidelity_measures_and_the_papers_recipe():
    from bench.fidelity import PROJ, Reference, _one_bit, _rtn, ffn, measure, paper_counterpart
    from ders_cli import QuantSpec, SparseSpec

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 8, generator=gen)
    base = {"w1": torch.randn(16, 8, generator=gen), "w3": torch.randn(16, 8, generator=gen),
            "w2": torch.randn(8, 16, generator=gen)}
    experts = [{p: base[p] + 0.01 * torch.randn(base[p].shape, generator=gen) for p in PROJ}
               for _ in range(2)]
    mean = {p: (experts[0][p] + experts[1][p]) / 2 for p in PROJ}
    outputs = [ffn(x, w) for w in experts]
    ref = Reference(x, experts, outputs,
                    [float((y - ffn(x, mean)).norm()) for y in outputs])
    exact = measure(ref, experts)
    assert exact.output_error == exact.share_lost == exact.weight_error == 0.0
    assert measure(ref, [mean, mean]).share_lost == pytest.approx(1.0)
    # RTN with 2^8 levels is near exact; 1 bit is sign times the mean magnitude per 128.
    d = torch.randn(4, 128, generator=gen)
    assert (_rtn(d, 8) - d).abs().max() < (d.max() - d.min()) / 255
    assert torch.equal(_one_bit(d).abs(), d.abs().mean(1, keepdim=True).expand(4, 128))
    assert paper_counterpart(QuantSpec(2)) == "2-bit RTN"
    assert paper_counterpart(QuantSpec(1)) == "1-bit"
    assert paper_counterpart(SparseSpec(0.9)) == "drop 0.9"
    assert paper_counterpart(SparseSpec(0.9, mask="magnitude")) is None


def test_warm_sweep_tables_and_command_selection():
    """bench.warm --workers 1 2: every command at each count, a scaling table from the first;
    --only adds what an expand or a verify needs, and refuses unknown keys."""
    from bench.warm import Result, Run, selected, tables

    assert [k for k, _, _ in selected("verify")] == ["drop", "verify"]
    assert [k for k, _, _ in selected("expand-lossless,q2")] == ["q2", "lossless",
                                                                 "expand-lossless"]
    with pytest.raises(SystemExit):
        selected("nope")
    copy = Run(wall=1.0, cpu=0.5, peak_rss=10**7)
    one = Result("compress --drop 0.9", [Run(4.0, 4.0, 5 * 10**8)] * 3, [copy] * 3, 10**9, 1)
    two = Result("compress --drop 0.9", [Run(2.5, 4.4, 6 * 10**8)] * 3, [copy] * 3, 10**9, 2)
    text = tables([one, two])
    assert "| `compress --drop 0.9` | 1 | 8.0x | 4.0x |" in text
    assert "| `compress --drop 0.9` | 4.0x | 2.5x | 1.60x | 1.10 |" in text
    assert "speed-up" not in tables([Result("x", [copy], [copy], 10**9)])
