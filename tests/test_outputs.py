"""Writing outputs (docs/FORMAT.md 7, README "Outputs"): whole or not at all, never outside the
output, never over a file that is not the command's own; leftovers of killed runs removed by
the next run; a full disk is one clear line."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys

import pytest
from typer.testing import CliRunner

import ders_cli as ders
from ders_cli.cli.app import app
from ders_cli.errors import OutputError
from ders_cli.outputs import BuildDir, create_temp_file, temp_path
from fixtures.synthetic import upcycled_tensors, write_model

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def one_line(r, *fragments, code=2):
    assert r.exit_code == code, r.output
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, r.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("outputs")


@pytest.fixture(scope="module")
def model(work):
    return write_model(work / "model", upcycled_tensors(layers=1),
                       side_files={"tokenizer.json": "{}"})


@pytest.fixture(scope="module")
def archive(model, work):
    ders.compress(model, ders.QuantSpec(4), work / "a.ders")
    return work / "a.ders"


def listing(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


# --- expand -o EXISTING --force ----------------------------------------------------------------

def test_force_replaces_the_archives_files_and_keeps_every_other(archive, tmp_path):
    out = tmp_path / "out"
    (out / "logs").mkdir(parents=True)
    (out / "README.md").write_text("my notes")
    (out / "logs" / "train.log").write_text("step 1")
    (out / "config.json").write_text("stale")
    r = run("expand", archive, "-o", out, "--force")
    assert r.exit_code == 0, r.output
    assert (out / "README.md").read_text() == "my notes"
    assert (out / "logs" / "train.log").read_text() == "step 1"
    assert (out / "config.json").read_text() != "stale"  # the archive's own file, replaced
    assert listing(out) == ["README.md", "config.json", "logs", "logs/train.log",
                            "model.safetensors", "tokenizer.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary folder left
    again = run("expand", archive, "-o", out, "--force")  # its own files: replaced again
    assert again.exit_code == 0, again.output


def test_force_refuses_weights_it_would_leave_beside_its_own(archive, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "model-00002-of-00002.safetensors").write_bytes(b"old shard")
    r = run("expand", archive, "-o", out, "--force")
    one_line(r, "model-00002-of-00002.safetensors", "does not write", "loader could mix")
    assert listing(out) == ["model-00002-of-00002.safetensors"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_force_refuses_a_folder_where_a_file_goes(archive, tmp_path):
    out = tmp_path / "out"
    (out / "config.json").mkdir(parents=True)
    one_line(run("expand", archive, "-o", out, "--force"), "folder 'config.json'")
    assert listing(out) == ["config.json"]


def test_force_never_writes_through_a_link_inside_the_output(archive, tmp_path):
    """A link in the output folder where the archive writes a file is replaced, not followed."""
    victim = tmp_path / "victim.json"
    victim.write_text("keep")
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").symlink_to(victim)
    assert run("expand", archive, "-o", out, "--force").exit_code == 0
    assert victim.read_text() == "keep" and not (out / "config.json").is_symlink()


@pytest.mark.parametrize("target", ["file", "dangling"])
def test_force_onto_something_that_is_not_a_folder(archive, tmp_path, target):
    out = tmp_path / "out"
    if target == "file":
        out.write_text("precious")
    else:
        out.symlink_to(tmp_path / "nowhere")
    one_line(run("expand", archive, "-o", out), "already exists")
    one_line(run("expand", archive, "-o", out, "--force"), "is not a folder")
    assert os.path.lexists(out) and not (tmp_path / "nowhere").exists()


@pytest.mark.parametrize("where", [".", ".."])
def test_dot_outputs_name_the_folder_they_point_at(archive, tmp_path, monkeypatch, where):
    inner = tmp_path / "inner"
    inner.mkdir()
    monkeypatch.chdir(inner)
    one_line(run("expand", archive, "-o", where), "already exists")
    one_line(run("compress", archive.parent / "model", "--drop", "0.5", "-o", where, "--force"),
             "is a folder; not overwritten by a file")
    r = run("expand", archive, "-o", where, "--force")
    assert r.exit_code == 0, r.output
    assert (inner / where / "model.safetensors").exists()


# --- planted links at the temporary names ---------------------------------------------------

def test_compress_never_follows_a_link_planted_at_its_temporary_name(model, tmp_path):
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep")
    dest = tmp_path / "a.ders"
    temp_path(dest).symlink_to(victim)
    with pytest.raises(OutputError, match="is in the way"):
        create_temp_file(dest)  # the exclusive create itself refuses the link
    result = ders.compress(model, ders.QuantSpec(4), dest)  # the sweep removes it first
    assert victim.read_bytes() == b"keep" and ders.verify(dest).ok
    assert any("left by an interrupted run" in w for w in result.warnings)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.ders", "victim"]


def test_expand_never_follows_a_link_planted_at_its_temporary_name(archive, tmp_path):
    victim = tmp_path / "victim"
    victim.mkdir()
    out = tmp_path / "out"
    temp_path(out).symlink_to(victim)
    with pytest.raises(OutputError, match="is in the way"):
        BuildDir(out, overwrite=False)
    assert ders.expand(archive, out).folder == out
    assert list(victim.iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "victim"]


# --- leftovers of killed runs ---------------------------------------------------------------

HOLD = """
import sys, time
from pathlib import Path
from ders_cli.outputs import BuildDir, create_temp_file
dest = Path(sys.argv[1])
if sys.argv[2] == "dir":
    b = BuildDir(dest, overwrite=False)
    fd = b.create("sub/part.bin")
else:
    fd, _ = create_temp_file(dest)
import os
os.write(fd, b"x" * 1000)
print("ready", flush=True)
time.sleep(600)
"""


def hold(dest, kind):
    """A process that is building ``dest`` (a folder or a file) and stays in the middle of it."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(dest), kind],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    return proc


@pytest.mark.parametrize("kind", ["dir", "file"])
def test_leftovers_of_a_killed_run_are_removed_by_the_next_and_a_live_one_kept(
        archive, model, tmp_path, kind):
    dest = tmp_path / ("out" if kind == "dir" else "a.ders")
    live = hold(dest, kind)
    killed = hold(dest, kind)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted([f".{dest.name}.partial-{live.pid}",
                            f".{dest.name}.partial-{killed.pid}"])
    try:
        if kind == "dir":
            r = run("expand", archive, "-o", dest)
        else:
            r = run("compress", model, "--drop", "0.5", "-o", dest)
        assert r.exit_code == 0, r.output
        assert f"removed .{dest.name}.partial-{killed.pid}, left by an interrupted run" in \
            " ".join(r.stderr.split())
        names = sorted(p.name for p in tmp_path.iterdir())
        assert names == sorted([dest.name, f".{dest.name}.partial-{live.pid}"])  # live kept
    finally:
        live.kill()
        live.wait()


# --- a full disk ---------------------------------------------------------------------------

def test_a_full_disk_during_expand_is_one_line_naming_the_output(archive, tmp_path,
                                                                 monkeypatch):
    real = os.pwrite
    written = [0]

    def pwrite(fd, data, offset):
        written[0] += len(data)
        if written[0] > 5_000:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)
    out = tmp_path / "out"
    one_line(run("expand", archive, "-o", out), str(out), "no space left", "nothing was written")
    assert list(tmp_path.iterdir()) == []


def test_a_file_size_limit_during_compress_is_one_line_naming_the_output(model, tmp_path):
    """RLIMIT_FSIZE stands in for a full disk without root: writes fail with EFBIG."""
    dest = tmp_path / "a.ders"
    code = ("import resource, sys\n"
            "resource.setrlimit(resource.RLIMIT_FSIZE, (10_000, 10_000))\n"
            "sys.argv = ['ders', 'compress', sys.argv[1], '--lossless', '-o', sys.argv[2]]\n"
            "from ders_cli.cli.app import main\n"
            "main()\n")
    proc = subprocess.run([sys.executable, "-c", code, str(model), str(dest)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "a.ders" in lines[0] and "size the system allows" in lines[0]
    assert list(tmp_path.iterdir()) == []


# --- concurrent writers -----------------------------------------------------------------------

@pytest.mark.parametrize("command", ["compress", "expand"])
def test_two_writers_to_one_output(model, archive, tmp_path, command):
    """Started together without --force: one writes the output, the other refuses in one line;
    the output is whole and no temporary file is left."""
    dest = tmp_path / ("a.ders" if command == "compress" else "out")
    args = (["compress", model, "--drop", "0.5", "-o", dest] if command == "compress"
            else ["expand", archive, "-o", dest])
    procs = [subprocess.Popen([sys.executable, "-m", "ders_cli", *map(str, args)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    refused = next(err for code, err in results if code == 2)
    lines = [line for line in refused.splitlines() if line.strip()]
    assert len(lines) == 1 and ("already exists" in lines[0] or "appeared while writing"
                                in lines[0]), refused
    assert sorted(p.name for p in tmp_path.iterdir()) == [dest.name]
    if command == "compress":
        assert ders.verify(dest).ok
    else:
        assert sorted(p.name for p in dest.iterdir()) == ["config.json", "model.safetensors",
                                                          "tokenizer.json"]
