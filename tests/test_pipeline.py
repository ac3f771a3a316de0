"""compress / quantize / expand / verify / inspect as library calls, on synthetic checkpoints."""

from __future__ import annotations

import hashlib
import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import ders_cli as ders
from ders_cli.errors import OutputExistsError, UsageError
from ders_cli.inspection import SETTINGS
from fixtures.synthetic import QWEN, upcycled_tensors, write_model

SIDE = {"tokenizer_config.json": '{"a": 1}\n', "sub/dir/vocab.txt": "x\ny\n",
        "blob.bin": bytes(range(256)) * 3}


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("m")
    return write_model(root / "model", upcycled_tensors(layers=2, experts=4), shards=3,
                       side_files=SIDE)


def all_tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def header_bytes(path: Path) -> bytes:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return raw[: 8 + n]


@pytest.mark.parametrize("spec", [ders.SparseSpec(0.9), ders.QuantSpec(2)], ids=["drop", "q2"])
def test_round_trip_restores_the_folder(model, tmp_path, spec):
    result = ders.compress(model, spec, tmp_path / "a.ders")
    assert result.archive_bytes == (tmp_path / "a.ders").stat().st_size
    assert sum(g.stored_bytes for g in result.groups) < 0.4 * sum(
        g.original_bytes for g in result.groups)
    out = ders.expand(tmp_path / "a.ders", tmp_path / "restored").folder
    original = sorted(p.relative_to(model).as_posix() for p in model.rglob("*") if p.is_file())
    restored = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert restored == original
    for rel in original:
        if rel.endswith(".safetensors"):
            assert header_bytes(out / rel) == header_bytes(model / rel)
            assert (out / rel).stat().st_size == (model / rel).stat().st_size
        else:
            assert sha(out / rel) == sha(model / rel), rel
    a, b = all_tensors(model), all_tensors(out)
    assert a.keys() == b.keys()
    for name, t in a.items():
        if ".experts." in name:
            rel = float((b[name].float() - t.float()).norm() / t.float().norm())
            assert rel < 0.05, name
        else:
            assert torch.equal(b[name].view(torch.uint8), t.view(torch.uint8)), name
    report = ders.verify(tmp_path / "a.ders", against=model)
    assert report.ok and report.passthrough_exact == sum(".experts." not in n for n in a)
    assert all(g.measured for g in report.groups)
    assert report.max_rel_error == pytest.approx(max(g.max_rel_error for g in result.groups),
                                                 rel=1e-3)


@pytest.mark.parametrize("spec", SETTINGS, ids=[s.label for s in SETTINGS])
def test_inspect_predicts_the_archive_size_but_for_the_coded_bases(model, tmp_path, spec):
    """Estimates count bases raw; archives store them zstd-coded: that difference exactly."""
    report = ders.inspect_model(model)
    predicted = {e.setting: e.archive_bytes for e in report.estimates}[spec.label]
    actual = ders.compress(model, spec, tmp_path / "a.ders").archive_bytes
    with ders.ArchiveReader(tmp_path / "a.ders") as r:
        raw = sum(2 * g.numel for g in r.manifest.groups)
        coded = sum(r.entry(g.base["array"]).nbytes for g in r.manifest.groups)
    assert coded < raw and actual == predicted - raw + coded


def test_inspect_reports_groups_and_shares(model):
    r = ders.inspect_model(model)
    assert len(r.groups) == 6 and all(g.upcycled for g in r.groups)
    g = r.groups[0]
    assert g.num_experts == 4 and len(g.cos_to_base) == 4 and len(g.cos_between) == 4
    assert g.cos_to_base_min > 0.999 and g.cos_between_min > 0.999
    assert 0.003 < max(g.rel_delta_norm) < 0.02
    assert r.expert_params == 6 * 4 * 16 * 32
    assert r.expert_share == pytest.approx(r.expert_params / r.total_params)
    doc = json.loads(json.dumps(r.to_dict()))
    assert {"tensors", "num_experts", "shape", "dtype", "cos_to_base_min", "upcycled"} <= \
        set(doc["groups"][0])


def test_output_is_deterministic(model, tmp_path):
    ders.compress(model, ders.SparseSpec(0.9, seed=5), tmp_path / "a.ders")
    ders.compress(model, ders.SparseSpec(0.9, seed=5), tmp_path / "b.ders")
    ders.compress(model, ders.SparseSpec(0.9, seed=6), tmp_path / "c.ders")
    assert sha(tmp_path / "a.ders") == sha(tmp_path / "b.ders") != sha(tmp_path / "c.ders")


def test_drop_zero_keeps_every_delta(model, tmp_path):
    ders.compress(model, ders.SparseSpec(0.0), tmp_path / "a.ders")
    report = ders.verify(tmp_path / "a.ders", against=model)
    assert report.ok and report.max_rel_error < 1e-3


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_other_float_dtypes(tmp_path, dtype):
    src = write_model(tmp_path / "m", upcycled_tensors(dtype=dtype, naming=QWEN))
    ders.quantize(src, 4, tmp_path / "a.ders")
    out = ders.expand(tmp_path / "a.ders", tmp_path / "r").folder
    a, b = all_tensors(src), all_tensors(out)
    for name in a:
        assert b[name].dtype == dtype
        if ".experts." not in name:
            assert torch.equal(a[name], b[name])
    assert ders.verify(tmp_path / "a.ders", against=src).max_rel_error < 0.01


def test_experts_trained_from_scratch_pass_through(tmp_path):
    tensors = upcycled_tensors(upcycled=False, layers=1)
    src = write_model(tmp_path / "m", tensors)
    result = ders.compress(src, ders.SparseSpec(0.9), tmp_path / "a.ders")
    assert all(g.action == "passthrough" for g in result.groups)
    assert len(result.warnings) == 3 and "not upcycled" in result.warnings[0]
    out = ders.expand(tmp_path / "a.ders", tmp_path / "r").folder
    assert sha(out / "model.safetensors") == sha(src / "model.safetensors")
    with ders.ArchiveReader(tmp_path / "a.ders") as r:
        assert r.manifest.groups == () and len(r.manifest.passthrough_groups) == 3


def dense_source(tmp_path: Path, tensors: dict[str, torch.Tensor], layers: int) -> Path:
    """A dense checkpoint (Llama/Qwen names) whose FFN is close to each layer's experts."""
    dense = {}
    for layer in range(layers):
        for proj in ("gate_proj", "up_proj", "down_proj"):
            e0 = tensors[f"model.layers.{layer}.mlp.experts.0.{proj}.weight"].float()
            dense[f"model.layers.{layer}.mlp.{proj}.weight"] = (e0 * 0.999).to(torch.bfloat16)
    return write_model(tmp_path / "dense", dense)


def test_dense_base(tmp_path):
    tensors = upcycled_tensors(layers=2, naming=QWEN, drift=0.01)
    src = write_model(tmp_path / "m", tensors)
    dense_dir = dense_source(tmp_path, tensors, 2)
    result = ders.compress(src, ders.QuantSpec(4), tmp_path / "a.ders", base=dense_dir)
    assert {g.base for g in result.groups} == {
        f"dense model.layers.{layer}.mlp.{proj}.weight"
        for layer in range(2) for proj in ("gate_proj", "up_proj", "down_proj")}
    assert ders.verify(tmp_path / "a.ders", against=src).ok
    with ders.ArchiveReader(tmp_path / "a.ders") as r:
        g = r.manifest.groups[0]
        assert g.base["kind"] == "dense" and g.base["source"].endswith(".weight")


def test_single_file_model_and_default_paths(tmp_path):
    """Default outputs go beside the model, never into a model folder (where the next compress
    of the folder would meet them): m/model.safetensors -> m-model.ders beside m."""
    src = write_model(tmp_path / "m", upcycled_tensors(layers=1)) / "model.safetensors"
    result = ders.compress(src, ders.QuantSpec(8))
    assert result.archive == tmp_path / "m-model.ders"
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json",
                                                                  "model.safetensors"]
    out = ders.expand(result.archive).folder
    assert out == tmp_path / "m-model-expanded"
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors"]
    folder_result = ders.compress(tmp_path / "m", ders.QuantSpec(8))
    assert folder_result.archive == tmp_path / "m.ders"
    lone = tmp_path / "downloads"
    lone.mkdir()
    (lone / "x.safetensors").write_bytes(src.read_bytes())
    assert ders.compress(lone / "x.safetensors", ders.QuantSpec(8)).archive == lone / "x.ders"


def test_outputs_are_never_overwritten_silently(model, tmp_path):
    dest = tmp_path / "a.ders"
    dest.write_text("precious")
    with pytest.raises(OutputExistsError, match="--force"):
        ders.compress(model, ders.SparseSpec(0.9), dest)
    assert dest.read_text() == "precious"
    ders.compress(model, ders.SparseSpec(0.9), dest, overwrite=True)
    assert ders.verify(dest).ok
    (tmp_path / "r").mkdir()
    with pytest.raises(OutputExistsError):
        ders.expand(dest, tmp_path / "r")
    ders.expand(dest, tmp_path / "r", overwrite=True)
    assert (tmp_path / "r" / "blob.bin").read_bytes() == SIDE["blob.bin"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_verify_against_another_model_fails(model, tmp_path):
    ders.compress(model, ders.QuantSpec(2), tmp_path / "a.ders")
    other = write_model(tmp_path / "other", upcycled_tensors(layers=2, experts=4, seed=9),
                        shards=3)
    report = ders.verify(tmp_path / "a.ders", against=other)
    assert not report.ok
    assert any("differs from the archive's source" in p for p in report.problems)


def test_verify_max_error(model, tmp_path):
    ders.compress(model, ders.SparseSpec(0.99), tmp_path / "a.ders")
    assert ders.verify(tmp_path / "a.ders", max_error=0.5).ok
    report = ders.verify(tmp_path / "a.ders", max_error=1e-6)
    assert not report.ok and "exceeds" in report.problems[0]


def test_header_growth_path_gives_a_valid_archive(model, tmp_path):
    ders.compress(model, ders.QuantSpec(3), tmp_path / "a.ders", reserve=0)
    assert ders.verify(tmp_path / "a.ders", against=model).ok
    with safe_open(tmp_path / "a.ders", "pt") as f:
        assert "ders/g/0/codes" in set(f.keys())


@pytest.mark.parametrize("bad", [{"drop": 1.0}, {"drop": -0.1}, {"bits": 5}, {"bits": 0},
                                 {"bits": 2, "group_size": 0}])
def test_settings_out_of_range(model, tmp_path, bad):
    spec = ders.SparseSpec(bad["drop"]) if "drop" in bad else ders.QuantSpec(**bad)
    with pytest.raises(UsageError):
        ders.compress(model, spec, tmp_path / "a.ders")
    assert not (tmp_path / "a.ders").exists()


def long_names(tmp_path: Path) -> Path:
    tensors = {}
    g = torch.Generator().manual_seed(0)
    for layer in range(3):
        base = torch.randn(2, 3, generator=g)
        for e in range(2):
            name = f"model.{'very_long_component.' * 8}layers.{layer}.mlp.experts.{e}.w1.weight"
            tensors[name] = (base + 0.01 * torch.randn(2, 3, generator=g)).to(torch.bfloat16)
        for i in range(20):
            tensors[f"model.layers.{layer}.{'x' * 90}.{i}.bias"] = torch.zeros(1)
    return write_model(tmp_path / "long", tensors, side_files={f"f{i}.txt": "x" for i in range(9)})


@pytest.mark.parametrize("case", ["sparse", "quant", "dense", "scratch", "long"])
def test_header_estimate_covers_what_is_written(model, tmp_path, case):
    from ders_cli.checkpoint import open_checkpoint
    from ders_cli.detect import find_groups
    from ders_cli.plan import estimate_header

    src, kwargs, spec = model, {}, ders.SparseSpec(0.9)
    if case == "quant":
        spec = ders.QuantSpec(1)
    elif case == "dense":
        tensors = upcycled_tensors(naming=QWEN)
        src = write_model(tmp_path / "q", tensors)
        kwargs["base"] = dense_source(tmp_path, tensors, 2)
    elif case == "scratch":
        src = write_model(tmp_path / "s", upcycled_tensors(upcycled=False, experts=2))
    elif case == "long":
        src = long_names(tmp_path)
    ckpt = open_checkpoint(src)
    found = find_groups({n: e for n, (_, e) in ckpt.where.items()}, ckpt.config)
    result = ders.compress(src, spec, tmp_path / "a.ders", reserve=0, **kwargs)
    assert result.header_bytes <= estimate_header(ckpt, found)


def test_verify_reports_bytes_by_layer_and_projection(model, tmp_path):
    result = ders.compress(model, ders.QuantSpec(2), tmp_path / "a.ders")
    report = ders.verify(tmp_path / "a.ders", against=model)
    assert {(g.layer, g.projection) for g in report.groups} == {
        (layer, p) for layer in range(2) for p in ("w1", "w2", "w3")}
    assert sum(g.stored_bytes for g in report.groups) == sum(
        g.stored_bytes for g in result.groups)
    assert report.expert_ratio == pytest.approx(
        sum(g.stored_bytes for g in result.groups) / sum(g.original_bytes for g in result.groups))
    assert report.archive_bytes == result.archive_bytes
    on_disk = sum(f.stat().st_size for f in model.rglob("*") if f.is_file())
    # compress, verify and inspect divide by the same "original": the folder as du sees it
    assert report.checkpoint_bytes == result.input_bytes == on_disk
    assert ders.inspect_model(model).checkpoint_bytes == on_disk
    assert report.ratio == pytest.approx(result.ratio)
    doc = report.to_dict()
    assert {"expert_ratio", "ratio", "max_rel_error"} <= set(doc)
    assert {"layer", "projection", "stored_bytes", "original_bytes", "rel_error", "cos",
            "max_rel_error", "min_cos"} <= set(doc["groups"][0])


def test_everything_the_cli_does_is_importable_from_the_package():
    for name in ders.__all__:
        assert getattr(ders, name) is not None, name
    # transformers waits for the training and inference entry points
    code = "import sys, ders_cli; assert 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
