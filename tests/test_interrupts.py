"""Ctrl-C and SIGTERM (README "Commands"): one line, "interrupted; nothing was written", exit
130 (143 for SIGTERM), nothing left behind; also while the command is still starting (importing
Typer or torch), which is when an impatient user presses it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import ders_cli as ders
from fixtures.synthetic import upcycled_tensors, write_model

LINE = {signal.SIGINT: "ders: interrupted; nothing was written",
        signal.SIGTERM: "ders: terminated; nothing was written"}

# The command as the console script runs it, with one import made slow (a meta path finder that
# waits): a signal sent once it says so lands inside that import, deterministically.
SLOW_IMPORT = """
import sys, time, importlib.abc
SLOW = sys.argv[1]
class Slow(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == SLOW:
            print("importing", name, flush=True)
            time.sleep(60)
        return None
sys.meta_path.insert(0, Slow())
sys.argv = ["ders", *sys.argv[2:]]
from ders_cli.cli.main import main
main()
"""


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("interrupts")


@pytest.fixture(scope="module")
def model(work):
    """Large enough that a run is still busy when the signal comes (about 12 MB)."""
    tensors = upcycled_tensors(layers=4, experts=8, hidden=128, intermediate=512,
                               dtype=torch.bfloat16)
    return write_model(work / "model", tensors)


@pytest.fixture(scope="module")
def archive(model, work):
    ders.compress(model, ders.LosslessSpec(), work / "a.ders")
    return work / "a.ders"


def finished(proc, sig):
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, (proc.returncode, err)
    assert [line for line in err.splitlines() if line.strip()] == [LINE[sig]], err
    return out


@pytest.mark.parametrize("module", ["typer", "torch"])
def test_an_interrupt_while_starting_is_one_line(archive, module):
    proc = subprocess.Popen([sys.executable, "-c", SLOW_IMPORT, module, "verify", str(archive)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == f"importing {module}"
    proc.send_signal(signal.SIGINT)
    finished(proc, signal.SIGINT)


def run_until_building(args, folder):
    """Start ``ders ARGS`` and return it once its temporary output exists in ``folder``."""
    proc = subprocess.Popen([sys.executable, "-m", "ders_cli", *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not any(".partial-" in n for n in os.listdir(folder)):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.002)
    return proc


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_an_interrupted_compress_leaves_nothing(model, tmp_path, sig):
    proc = run_until_building(["quantize", model, "--bits", "2", "-o", tmp_path / "q.ders"],
                              tmp_path)
    proc.send_signal(sig)
    finished(proc, sig)
    assert list(tmp_path.iterdir()) == []


def test_an_interrupted_expand_leaves_nothing(archive, tmp_path):
    proc = run_until_building(["expand", archive, "-o", tmp_path / "out"], tmp_path)
    proc.send_signal(signal.SIGINT)
    finished(proc, signal.SIGINT)
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def handler():
    """ders' own signal handling in this process, as the entry point installs it; restored."""
    from ders_cli import interrupts
    saved = {s: signal.getsignal(s) for s in interrupts.NAMES}
    state = dict(interrupts._state)
    interrupts.install()
    yield
    for s, h in saved.items():
        signal.signal(s, h)
    interrupts._state.update(state)


@pytest.mark.parametrize("what", ["archive", "folder"])
def test_an_interrupt_as_the_temporary_output_is_made_leaves_nothing(handler, tmp_path,
                                                                     monkeypatch, what):
    """The signal lands between creating the temporary output and handing it to the cleanup
    (where the test above sent it now and then): held, then raised where the cleanup sees it."""
    from ders_cli import outputs
    from ders_cli.archive import ArchiveWriter
    from ders_cli.interrupts import Interrupted

    real = outputs._lock

    def lock_then_signal(fd):
        got = real(fd)
        signal.raise_signal(signal.SIGINT)
        return got

    monkeypatch.setattr(outputs, "_lock", lock_then_signal)
    with pytest.raises(Interrupted):
        if what == "archive":
            ArchiveWriter(tmp_path / "a.ders", reserve=1024)
        else:
            outputs.BuildDir(tmp_path / "out", overwrite=False)
    assert list(tmp_path.iterdir()) == []


# A library that catches the interrupt mid-step and fails in its own way (numba's compiler lock,
# when the signal lands while a kernel loads: "RuntimeError: release unlocked lock").
SWALLOWED = """
import os, signal, sys, time
import ders_cli.cli.app as app
def command():
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)
    except BaseException:
        raise RuntimeError("release unlocked lock") from None
app.app = command
sys.argv = ["ders", "compress"]
from ders_cli.cli.main import main
main()
"""


def test_an_interrupt_a_library_turned_into_another_error_is_still_an_interrupt():
    proc = subprocess.run([sys.executable, "-c", SWALLOWED], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr
    assert proc.stderr.splitlines() == [LINE[signal.SIGTERM]]
