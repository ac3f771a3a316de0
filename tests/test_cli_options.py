"""The command line's conventions: flags a mode would ignore are refused (one line, exit 2,
nothing written), choices come from the library, -h/--version, examples and defaults in the
help, help without torch, and docs/CLI.md as the commands define them."""

from __future__ import annotations

import os
import subprocess
import sys
from enum import Enum
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from ders_cli.cli.app import COMMANDS, app
from ders_cli.cli.options import UpcycleMode
from fixtures.synthetic import upcycled_tensors, write_model

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]


def run(*args: object):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli-options")
    return write_model(root / "model", upcycled_tensors(layers=1, hidden=32, intermediate=64))


def refused(r, line: str) -> None:
    assert r.exit_code == 2, r.output
    assert r.stderr.strip().splitlines() == [f"ders: {line}"]
    assert "Traceback" not in r.output


@pytest.mark.parametrize(("args", "line"), [
    (["--lossless", "--mask", "magnitude", "--bits", "4", "--seed", "7"],
     "--mask, --bits and --seed apply only with --drop, not with --lossless"),
    (["--max-error", "0.01", "--rescale", "none"],
     "--rescale applies only with --drop, not with --max-error"),
    (["--target-size", "30%", "--group-size", "64"],
     "--group-size applies only with --drop, not with --target-size"),
    (["--lossless", "--seed", "0"],  # the default value, but typed: still not read
     "--seed applies only with --drop, not with --lossless"),
    (["--rank", "8", "--mask", "magnitude"], "--mask applies only with --drop, not with --rank"),
    (["--drop", "0.9", "--group-size", "64"], "--group-size applies only with --bits"),
    (["--drop", "0.9", "--mask", "magnitude", "--seed", "7"],
     "--seed applies only to random masks, not with --mask magnitude"),
])
def test_compress_refuses_flags_its_mode_ignores(model, tmp_path, args, line):
    out = tmp_path / "a.ders"
    refused(run("compress", model, *args, "-o", out), line)
    assert not out.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("args", "line"), [
    (["--mode", "sparse", "--rank", "8"], "--rank applies only to --mode lowrank, not with "
                                          "--mode sparse"),
    (["--rate", "0.99"], "--rate applies only to --mode sparse, not with --mode lowrank"),
])
def test_upcycle_refuses_the_other_modes_flag(tmp_path, args, line):
    refused(run("upcycle", tmp_path / "dense", "-o", tmp_path / "a.ders", *args), line)


def test_every_flag_of_a_mode_is_accepted_together(model, tmp_path):
    r = run("compress", model, "--drop", "0.9", "--mask", "magnitude", "--rescale", "norm",
            "--bits", "4", "--group-size", "64", "-o", tmp_path / "a.ders", "-q")
    assert r.exit_code == 0, r.output
    r = run("compress", model, "--drop", "0.5", "--seed", "7", "--mask", "random",
            "-o", tmp_path / "b.ders", "-q")
    assert r.exit_code == 0, r.output


def test_library_errors_name_the_flag(model, tmp_path):
    refused(run("compress", model, "--drop", "1.5", "-o", tmp_path / "a.ders"),
            "--drop must be in [0, 1), got 1.5")
    refused(run("quantize", model, "--bits", "5", "-o", tmp_path / "a.ders"),
            "--bits must be one of 1, 2, 3, 4, 8, got 5")
    refused(run("inspect", model, "--threshold", "2"), "--threshold must be in [0, 1], got 2.0")
    refused(run("compress", model, "--target-size", "a quarter", "-o", tmp_path / "a"),
            "--target-size takes a percentage like 25% or a fraction like 0.25, got 'a quarter'")
    refused(run("compress", model, "--drop", "0.5", "--device", "tpu:0", "-o", tmp_path / "a"),
            "--device 'tpu:0' is not a device torch knows")
    refused(run("upcycle", tmp_path / "dense", "-o", tmp_path / "a.ders", "--top-k", "9"),
            "--top-k must be in [1, 4], got 9")
    assert list(tmp_path.iterdir()) == []


def test_library_errors_speak_of_parameters(model):
    import ders_cli as ders

    with pytest.raises(ders.UsageError) as e:
        ders.inspect_model(model, threshold=2)
    assert e.value.param == "threshold"
    assert str(e.value) == "threshold must be in [0, 1], got 2"


# The command and flag that choose each codec; a codec missing here is not offered by the CLI.
CODEC_MODES = {"sparse": ("compress", "--drop"), "lossless": ("compress", "--lossless"),
               "lowrank": ("compress", "--rank"), "quant": ("quantize", "--bits")}


def test_every_codec_option_is_a_flag_with_its_default_and_choices():
    """The flags are written out (so that help needs no torch) but must say what each codec
    declares it takes (Codec.options): name, default and choices."""
    from ders_cli.cli.console import flag_of
    from ders_cli.cli.reference import _choices
    from ders_cli.codecs import DeltaCodec

    group = typer.main.get_command(app)
    for name, codec in DeltaCodec.registry.items():
        assert name in CODEC_MODES, f"codec {name!r} has no CLI flag: offer it in a command"
        command, mode = CODEC_MODES[name]
        flags = {max(p.opts, key=len): p for p in group.commands[command].params
                 if p.param_type_name == "option"}
        assert mode in flags
        for option in codec.options:
            p = flags[flag_of(option.name)]
            if not option.required:
                default = p.default.value if isinstance(p.default, Enum) else p.default
                assert default == option.default, (name, option.name)
            if option.choices and option.type is str:
                assert set(_choices(p)) == set(option.choices), (name, option.name)
            elif option.choices:  # numbers: listed in the help
                assert all(str(c) in p.help for c in option.choices), (name, option.name)


def test_upcycle_modes_are_the_librarys():
    from ders_cli.training.upcycle import MODES

    # "vanilla" is the library's comparison mode: an archive holds DeRS experts
    assert {m.value for m in UpcycleMode} == set(MODES) - {"vanilla"}


def test_a_wrong_choice_lists_the_choices(model):
    r = run("compress", model, "--drop", "0.9", "--mask", "largest")
    assert r.exit_code == 2 and "random" in r.output and "magnitude" in r.output


def test_help_version_examples_and_defaults():
    from ders_cli import __version__
    from ders_cli.constants import FORMAT_VERSION

    r = run("--version")
    assert r.exit_code == 0
    assert r.stdout == f"ders {__version__} (archive format version {FORMAT_VERSION})\n"
    assert run("-h").stdout == run("--help").stdout
    for name in COMMANDS:
        text = run(name, "-h").stdout
        assert text == run(name, "--help").stdout
        assert "Examples:" in text and f"ders {name} " in text.split("Examples:")[1]
        assert "TEXT" not in text and "FLOAT" not in text and "INTEGER" not in text
    compress = run("compress", "-h").stdout
    assert "random|magnitude" in compress and "inverse|none|norm" in compress
    assert "default: MODEL's name with .ders" in " ".join(compress.split())
    assert "mse|rtn" in run("quantize", "-h").stdout
    assert "lowrank|sparse" in run("upcycle", "-h").stdout
    assert "-expanded" in run("expand", "-h").stdout


def test_help_and_version_do_not_import_torch():
    code = ("import sys\nfrom ders_cli.cli.main import run\n"
            "for argv in (['ders', '--help'], ['ders', 'compress', '-h'], ['ders', '--version']):"
            "\n    sys.argv = argv\n    assert run() == 0\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert "Usage: ders compress" in proc.stdout


@pytest.mark.parametrize("env, want", [(None, "1"), ("0", "0")])
def test_the_ders_process_asks_torch_for_huge_pages_unless_told_otherwise(env, want):
    # main() sets it before anything imports torch (whose allocator reads it once); the user's
    # own setting wins.
    code = ("import os, sys\nimport ders_cli.cli.main as m\n"
            "m.run = lambda: print(os.environ.get('THP_MEM_ALLOC_ENABLE'), 'torch' in sys.modules)"
            " or 0\nm.main()\n")
    environ = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    if env is not None:
        environ["THP_MEM_ALLOC_ENABLE"] = env
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=ROOT, env=environ)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [want, "False"]


def test_docs_cli_md_is_current():
    from ders_cli.cli.reference import render

    assert (ROOT / "docs" / "CLI.md").read_text() == render(), (
        "docs/CLI.md is out of date: run python -m ders_cli.cli.reference")


def test_names_that_look_like_markup_are_printed_as_they_are(tmp_path):
    """Tensor names come from the model: rich must not read "[/x]" in one as a closing tag."""
    tensors = {n.replace("w1.weight", "w[/x]1.weight"): t
               for n, t in upcycled_tensors(layers=1, hidden=32, intermediate=64).items()}
    path = write_model(tmp_path / "m", tensors)
    key = "model.layers.0.block_sparse_moe.experts.{E}.w[/x]1.weight"
    for args in (["inspect", path], ["compress", path, "--drop", "0.9", "-o", tmp_path / "a"]):
        r = run(*args)
        assert r.exit_code == 0, r.output
        assert key in r.stdout
