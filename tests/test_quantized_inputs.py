"""Checkpoints whose experts another format already quantized (fixtures/quantized.py): ders names
them and their format, says why they are stored as they are, never lists a companion (a scale, a
1-D weight_shape) as experts, and refuses to write an archive that would compress nothing."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

import ders_cli as ders
from ders_cli.checkpoint import open_checkpoint
from ders_cli.cli.app import app
from ders_cli.detect import find_groups
from fixtures import quantized
from fixtures.synthetic import upcycled_tensors, write_model

runner = CliRunner()
NAMES = {"fp8": "FP8 with block scales weight_scale_inv",
         "ct_fp8": "FP8 with compressed-tensors weight_scale",
         "ct_int4": "compressed-tensors weight_packed integers",
         "gptq": "GPTQ/AWQ qweight integers",
         "mxfp4": "MXFP4 _blocks and _scales"}
WEIGHT = {"fp8": ".weight", "ct_fp8": ".weight", "ct_int4": ".weight_packed",
          "gptq": ".qweight", "mxfp4": "_blocks"}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("quantized")
    out = {fmt: quantized.write(root / fmt, fmt) for fmt in quantized.FORMATS}
    out["mixed"] = quantized.write(root / "mixed", "ct_int4", layers=(1,))
    return out


def found(path):
    ckpt = open_checkpoint(path)
    return ckpt, find_groups({n: e for n, (_, e) in ckpt.where.items()}, ckpt.config)


@pytest.mark.parametrize("fmt", quantized.FORMATS)
def test_quantized_experts_are_named_with_their_format(models, fmt):
    ckpt, f = found(models[fmt])
    assert f.groups == []
    quant = [s for s in f.skipped if s.quantized]
    assert {s.quantized for s in quant} == {NAMES[fmt]}
    assert f.skipped == quant  # no companion (scale, zero point, weight_shape) is listed
    weights = {n for n in ckpt.where if n.endswith(WEIGHT[fmt]) and ".experts." in n}
    members = {m.split("[")[0] for s in quant for m in s.members}
    assert members == weights
    matrices = 2 if fmt == "mxfp4" else 3  # gate_up_proj fused, or gate, up and down
    assert sum(len(s.members) for s in quant) == 2 * matrices * quantized.EXPERTS
    assert all(NAMES[fmt] in s.reason and "does not decompress" in s.reason for s in quant)


@pytest.mark.parametrize("fmt", quantized.FORMATS)
def test_inspect_says_why_and_compress_writes_nothing(models, fmt, tmp_path):
    report = ders.inspect_model(models[fmt])
    assert NAMES[fmt] in report.nothing_to_compress and len(report.quantized) == 1
    r = runner.invoke(app, ["inspect", str(models[fmt])])
    assert r.exit_code == 0
    text = " ".join(r.stdout.split())
    assert "nothing ders can compress: the experts are already quantized" in text
    assert NAMES[fmt] in text and "What each setting would write" not in text
    doc = json.loads(runner.invoke(app, ["inspect", str(models[fmt]), "--json"]).stdout)
    assert {s["quantized"] for s in doc["skipped"]} == {NAMES[fmt]}
    out = tmp_path / "a.ders"
    r = runner.invoke(app, ["compress", str(models[fmt]), "--drop", "0.9", "-o", str(out)])
    assert r.exit_code == 2
    assert r.stderr.strip().splitlines() == [
        f"ders: {models[fmt]}: nothing to compress: the experts are already quantized "
        f"({NAMES[fmt]}) and ders does not decompress other formats yet; no archive written"]
    assert list(tmp_path.iterdir()) == []


def test_a_mixed_checkpoint_compresses_the_rest_and_names_what_it_left(models, tmp_path):
    result = ders.compress(models["mixed"], ders.QuantSpec(4), tmp_path / "a.ders")
    assert [g.key.split(".")[2] for g in result.groups] == ["0"] * 3
    assert result.warnings[0].startswith("12 expert matrices in 3 groups are already "
                                         f"quantized ({NAMES['ct_int4']}")
    report = ders.verify(tmp_path / "a.ders", against=models["mixed"])
    assert report.ok  # the quantized tensors came through bit for bit
    r = runner.invoke(app, ["compress", str(models["mixed"]), "--drop", "0.9",
                            "-o", str(tmp_path / "b.ders")])
    assert r.exit_code == 0 and "already quantized" in r.stderr


def test_a_model_without_experts_is_refused(tmp_path):
    dense = {n: t for n, t in upcycled_tensors(layers=1).items() if ".experts." not in n}
    path = write_model(tmp_path / "dense", dense)
    r = runner.invoke(app, ["compress", str(path), "--lossless", "-o", str(tmp_path / "a.ders")])
    assert r.exit_code == 2 and "nothing to compress: no expert groups found" in r.stderr
    assert not (tmp_path / "a.ders").exists()


def test_experts_from_scratch_say_nothing_was_compressed(tmp_path):
    path = write_model(tmp_path / "m", upcycled_tensors(layers=1, upcycled=False))
    r = runner.invoke(app, ["compress", str(path), "--drop", "0.9", "-o", str(tmp_path / "a")])
    assert r.exit_code == 0
    assert "nothing was compressed: no expert group looks upcycled" in " ".join(r.stdout.split())
