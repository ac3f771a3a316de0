"""Bad input (the README's promise): one clear line on stderr naming the file and the problem,
exit code 2, no traceback, and nothing written."""

from __future__ import annotations

import json
import re
import struct

import pytest
import torch
from typer.testing import CliRunner

import ders_cli as ders
from ders_cli.archive import header_hash
from ders_cli.cli.app import app
from ders_cli.constants import FORMAT_VERSION, HEADER_PREFIX
from fixtures.synthetic import upcycled_tensors, write_model

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def assert_refused(result, *fragments, code=2):
    assert result.exit_code == code, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert "Traceback" not in result.output
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit)


def nothing_written(folder, *allowed):
    left = sorted(p.name for p in folder.iterdir() if p.name not in allowed)
    assert left == [], left


@pytest.fixture
def model(tmp_path):
    return write_model(tmp_path / "model", upcycled_tensors(layers=1))


def shard(model):
    return model / "model.safetensors"


def rewrite_header(path, edit):
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    edit(header)
    body = json.dumps(header).encode()
    body += b" " * (-len(body) % 8)
    path.write_bytes(struct.pack("<Q", len(body)) + body + raw[8 + n :])


@pytest.mark.parametrize("cmd", [["inspect"], ["compress", "--drop", "0.9"],
                                 ["quantize", "--bits", "2"]])
def test_missing_model(tmp_path, cmd):
    r = run(cmd[0], tmp_path / "nope", *cmd[1:])
    assert_refused(r, str(tmp_path / "nope"), "no such file or folder")
    nothing_written(tmp_path)


@pytest.mark.parametrize("cmd", ["expand", "verify"])
def test_missing_archive(tmp_path, cmd):
    assert_refused(run(cmd, tmp_path / "a.ders"), "a.ders", "no such archive")


def test_folder_without_safetensors(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text("{}")
    assert_refused(run("compress", tmp_path / "empty", "--drop", "0.9"), "empty",
                   "no .safetensors files")
    nothing_written(tmp_path, "empty")


def test_truncated_shard(model, tmp_path):
    raw = shard(model).read_bytes()
    shard(model).write_bytes(raw[: len(raw) - 100])
    assert_refused(run("compress", model, "--drop", "0.9"), "model.safetensors", "truncated")
    nothing_written(tmp_path, "model")


def test_header_that_lies_about_offsets(model, tmp_path):
    def shift(header):
        name = next(k for k in header if k != "__metadata__")
        header[name]["data_offsets"][1] += 2

    rewrite_header(shard(model), shift)
    assert_refused(run("quantize", model, "--bits", "2"), "model.safetensors", "header lies")
    nothing_written(tmp_path, "model")


def test_unsupported_dtype(model, tmp_path):
    def bad_dtype(header):
        name = next(k for k in header if k != "__metadata__")
        header[name]["dtype"] = "Q4_K"

    rewrite_header(shard(model), bad_dtype)
    assert_refused(run("inspect", model), "model.safetensors", "unsupported dtype 'Q4_K'")


def test_mismatched_dense_base(model, tmp_path):
    unrelated = {f"model.layers.0.mlp.{p}.weight": torch.randn(s) for p, s in
                 (("gate_proj", (32, 16)), ("up_proj", (32, 16)), ("down_proj", (16, 32)))}
    dense = write_model(tmp_path / "dense", unrelated)
    assert_refused(run("compress", model, "--drop", "0.9", "--base", dense), "dense",
                   "no dense tensor matches")
    nothing_written(tmp_path, "model", "dense")
    other_shapes = write_model(tmp_path / "dense2", {"model.layers.0.mlp.gate_proj.weight":
                                                     torch.randn(7, 7)})
    assert_refused(run("compress", model, "--drop", "0.9", "--base", other_shapes),
                   "dense2", "no dense tensor of model.layers.0 can form shape [32, 16]")


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nan_or_inf_in_experts(tmp_path, value):
    tensors = upcycled_tensors(layers=1)
    name = "model.layers.0.block_sparse_moe.experts.2.w3.weight"
    tensors[name][3, 4] = value
    model = write_model(tmp_path / "model", tensors)
    assert_refused(run("compress", model, "--drop", "0.9"), "model.safetensors", name,
                   "NaN or Inf")
    nothing_written(tmp_path, "model")


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nan_or_inf_in_the_model_verify_reads(tmp_path, value):
    """verify --against finds NaN and Inf through the norms it takes anyway (no pass of its
    own): one line naming the file and the tensor, exit 2."""
    tensors = upcycled_tensors(layers=1)
    model = write_model(tmp_path / "model", tensors)
    archive = tmp_path / "a.ders"
    assert run("compress", model, "--drop", "0.9", "-o", archive).exit_code == 0
    name = "model.layers.0.block_sparse_moe.experts.2.w3.weight"
    tensors[name][3, 4] = value
    write_model(tmp_path / "model", tensors)
    assert_refused(run("verify", archive, "--against", model), "model.safetensors", name,
                   "NaN or Inf")


@pytest.mark.parametrize("args,message", [
    (["compress", "--drop", "1.0"], "--drop must be in [0, 1)"),
    (["compress", "--drop", "-0.2"], "--drop must be in [0, 1)"),
    (["quantize", "--bits", "5"], "--bits must be one of 1, 2, 3, 4, 8"),
    (["quantize", "--bits", "2", "--group-size", "0"], "--group-size must be at least 1"),
    (["compress", "--drop", "0.5", "--threshold", "2"], "--threshold must be in [0, 1]"),
])
def test_settings_out_of_range(model, tmp_path, args, message):
    assert_refused(run(args[0], model, *args[1:]), message)
    nothing_written(tmp_path, "model")


def test_option_that_is_not_a_number(model):
    r = run("compress", model, "--drop", "lots")
    assert r.exit_code == 2 and "Traceback" not in r.output


def test_index_that_names_a_missing_shard(tmp_path):
    model = write_model(tmp_path / "model", upcycled_tensors(layers=1), shards=2)
    (model / "model-00002-of-00002.safetensors").unlink()
    assert_refused(run("compress", model, "--drop", "0.9"), "model.safetensors.index.json",
                   "model-00002-of-00002.safetensors")


def newer_archive(model, tmp_path):
    dest = tmp_path / "a.ders"
    ders.compress(model, ders.QuantSpec(2), dest)
    raw = bytearray(dest.read_bytes())
    (n,) = struct.unpack("<Q", raw[:8])
    newer = f'"ders.version":"{FORMAT_VERSION + 1}"'.encode()
    header = bytearray(re.sub(rb'"ders.version":"\d+"', newer, bytes(raw[8 : 8 + n])))
    header[len(HEADER_PREFIX) : len(HEADER_PREFIX) + 64] = header_hash(bytes(raw[:8]),
                                                                        bytes(header)).encode()
    dest.write_bytes(bytes(raw[:8] + header + raw[8 + n :]))
    return dest


@pytest.mark.parametrize("cmd", ["expand", "verify"])
def test_archive_from_a_newer_version(model, tmp_path, cmd):
    dest = newer_archive(model, tmp_path)
    assert_refused(run(cmd, dest), "a.ders", f"format version {FORMAT_VERSION + 1}",
                   "upgrade ders")
    nothing_written(tmp_path, "model", "a.ders")


def test_expand_of_a_plain_safetensors_file(model, tmp_path):
    assert_refused(run("expand", shard(model), "-o", tmp_path / "out"), "not a ders archive")
    nothing_written(tmp_path, "model")


def test_expand_of_a_corrupt_archive_writes_nothing(model, tmp_path):
    dest = tmp_path / "a.ders"
    ders.compress(model, ders.SparseSpec(0.5), dest)
    raw = bytearray(dest.read_bytes())
    raw[-10] ^= 0xFF
    dest.write_bytes(bytes(raw))
    assert_refused(run("expand", dest, "-o", tmp_path / "out"), "a.ders", "checksum")
    nothing_written(tmp_path, "model", "a.ders")


def test_truncated_archive(model, tmp_path):
    dest = tmp_path / "a.ders"
    ders.compress(model, ders.SparseSpec(0.5), dest)
    dest.write_bytes(dest.read_bytes()[:-7])
    assert_refused(run("expand", dest), "a.ders", "truncated")
    r = run("verify", dest)
    assert r.exit_code == 1 and "truncated" in r.stderr


def test_output_folder_that_does_not_exist(model, tmp_path):
    assert_refused(run("compress", model, "--drop", "0.9", "-o", tmp_path / "no" / "a.ders"),
                   "output folder does not exist")


def test_tensor_name_in_the_reserved_namespace(tmp_path):
    tensors = upcycled_tensors(layers=1)
    tensors["ders/g/0/base"] = torch.zeros(2)
    model = write_model(tmp_path / "model", tensors)
    assert_refused(run("compress", model, "--drop", "0.9"), "reserves")


def test_a_name_that_looks_like_markup_is_printed_as_it_is(tmp_path):
    r = run("verify", tmp_path / "[/x][red]a.ders")
    assert_refused(r, "[/x][red]a.ders", "no such archive")


@pytest.mark.parametrize("index", ["\u00b2", "\u0663", "1" * 5000],
                         ids=["superscript", "arabic-indic", "5000 digits"])
def test_a_name_whose_index_is_no_ascii_number_passes_through(tmp_path, index):
    """str.isdigit() and regex \\d accept "²" (which int() refuses) and other Unicode digits,
    and int() refuses more than 4,300 digits: such a part is no layer or expert index, and the
    tensor is stored as it is (it was an internal error)."""
    tensors = upcycled_tensors(layers=1)
    odd = f"model.layers.{index}.block_sparse_moe.experts.{index}.w1.weight"
    tensors[odd] = torch.ones(4, 4)
    model = write_model(tmp_path / "model", tensors)
    assert run("inspect", model).exit_code == 0
    result = run("compress", model, "--drop", "0.9", "-o", tmp_path / "a.ders", "-q")
    assert result.exit_code == 0, result.output
    out = ders.expand(tmp_path / "a.ders", tmp_path / "x").folder
    from safetensors.torch import load_file

    assert torch.equal(load_file(out / "model.safetensors")[odd], tensors[odd])
    assert run("verify", tmp_path / "a.ders", "--against", model).exit_code == 0
