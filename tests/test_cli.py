"""The ders command end to end with Typer's CliRunner: output, JSON, exit codes."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from ders_cli.cli.app import app
from fixtures.synthetic import upcycled_tensors, write_model

runner = CliRunner()


def run(*args: str):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    return write_model(root / "model", upcycled_tensors(layers=2, hidden=64, intermediate=128),
                       shards=2)


def test_inspect_table_and_json(model):
    r = run("inspect", model)
    assert r.exit_code == 0, r.output
    assert "block_sparse_moe.experts.{E}.w1.weight" in r.stdout
    assert "drop 0.9" in r.stdout and "2-bit" in r.stdout and "upcycled" in r.stdout
    r = run("inspect", model, "--json")
    doc = json.loads(r.stdout)
    g = doc["groups"][0]
    assert {"tensors", "num_experts", "shape", "dtype", "cos_to_base_min", "upcycled"} <= set(g)
    assert g["num_experts"] == 4 and g["upcycled"] is True and len(g["tensors"]) == 4


def test_compress_verify_expand_quantize(model, tmp_path):
    r = run("compress", model, "--drop", "0.9")
    assert r.exit_code == 0, r.output
    default = model.parent / "model.ders"
    assert default.exists() and "wrote" in r.stdout
    r = run("compress", model, "--drop", "0.9")
    assert r.exit_code == 2 and "already exists; pass --force" in r.stderr
    assert run("compress", model, "--drop", "0.5", "--force", "--seed", "3").exit_code == 0
    r = run("verify", default, "--against", model)
    assert r.exit_code == 0 and "OK" in r.stdout
    doc = json.loads(run("verify", default, "--against", model, "--json").stdout)
    assert doc["ok"] is True and 0 < doc["max_rel_error"] < 0.05
    r = run("expand", default, "-o", tmp_path / "restored")
    assert r.exit_code == 0 and (tmp_path / "restored" / "config.json").exists()
    r = run("quantize", model, "--bits", "2", "-o", tmp_path / "q2.ders", "--json")
    doc = json.loads(r.stdout)
    assert r.exit_code == 0 and doc["setting"] == "2-bit" and doc["ratio"] < 1
    assert run("verify", tmp_path / "q2.ders", "--max-error", "1e-9").exit_code == 1


def test_verify_exit_code_on_a_flipped_byte(model, tmp_path):
    dest = tmp_path / "a.ders"
    assert run("quantize", model, "--bits", "4", "-o", dest).exit_code == 0
    raw = bytearray(dest.read_bytes())
    raw[len(raw) // 2] ^= 0x10
    dest.write_bytes(bytes(raw))
    r = run("verify", dest)
    assert r.exit_code == 1 and "FAIL" in r.stderr


def test_json_output_is_one_document_and_nothing_else(model, tmp_path):
    r = run("compress", model, "--drop", "0.9", "-o", tmp_path / "a.ders", "--json")
    json.loads(r.stdout)
    r = run("expand", tmp_path / "a.ders", "-o", tmp_path / "x", "--json")
    assert json.loads(r.stdout)["folder"].endswith("x")


def test_help_lists_every_command():
    r = run("--help")
    for cmd in ("inspect", "compress", "quantize", "expand", "verify"):
        assert cmd in r.stdout


def test_console_script_maps_errors_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "ders_cli", "compress", str(tmp_path / "nope"),
                           "--drop", "0.9"], capture_output=True, text=True)
    assert proc.returncode == 2
    expected = f"ders: {tmp_path / 'nope'}: no such file or folder"
    assert proc.stderr.strip().splitlines() == [expected]


def test_inspect_plot(model, tmp_path):
    pytest.importorskip("matplotlib")
    r = run("inspect", model, "--plot", tmp_path / "sim.png")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "sim.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    r = run("inspect", model, "--plot", tmp_path / "missing" / "sim.png")
    assert r.exit_code == 2 and "output folder does not exist" in r.stderr


def test_options_reach_the_library(model, tmp_path, monkeypatch):
    seen = {}

    def fake(model_arg, spec, out, **kwargs):
        seen.update(kwargs, spec=spec, out=out)
        raise SystemExit(0)

    # the module, not ders_cli.compress (the function of the same name)
    monkeypatch.setattr(importlib.import_module("ders_cli.compress"), "compress", fake)
    run("quantize", model, "--bits", "3", "--group-size", "64", "--no-shared", "--all-groups",
        "--threshold", "0.5", "--base", "dense/", "--force", "-o", tmp_path / "x.ders")
    assert seen["spec"].bits == 3 and seen["spec"].group_size == 64
    assert seen["use_shared"] is False and seen["all_groups"] is True and seen["overwrite"]
    assert seen["threshold"] == 0.5 and seen["base"] == "dense/"
    assert seen["out"] == str(tmp_path / "x.ders")  # as typed: a trailing slash counts
