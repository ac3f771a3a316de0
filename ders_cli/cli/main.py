"""The ``ders`` command's entry point: interrupts handled before anything heavy is imported,
and every way a run can end turned into its one line and exit code.

Kept apart from ``app`` (which imports Typer, rich and the commands) so that a Ctrl-C in the
first second of a run, while those load, is already one line and exit 130, not a traceback.
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import NoReturn

from .. import profile
from ..interrupts import Interrupted, fired, install

# The command line this process runs, as typed (None when the app is called another way, as
# tests do): archives record it (ders_cli.provenance masks tokens).
_COMMAND: list[str] | None = None


def command_line() -> list[str] | None:
    """``["ders", ARGS...]`` of the ``ders`` run in progress, None outside ``main()``."""
    return None if _COMMAND is None else list(_COMMAND)


def main() -> NoReturn:
    """The ``ders`` process: ``run()``, then leave without the interpreter's finalization.
    By then every output is written, synced and closed (each command does that inside its own
    ``with`` blocks); what finalization would still do is unregister torch's operator libraries
    one by one (measured: 0.5-1.2 s of CPU and wall after ``import torch``, on every command).

    Before torch is imported, its CPU allocator is asked for transparent huge pages
    (``THP_MEM_ALLOC_ENABLE``, unless the environment says otherwise): a fresh tensor of a
    group's members then costs 2 MB page faults, not 4 KB ones. Measured on ``verify`` at
    1.4 GB: 1.2 M minor page faults became 0.3 M, and CPU fell from 13.5 to 11.2 s (medians of
    4); its peak memory rose by 20-60 MB (a 2 MB page is faulted in whole), which its chunked
    measure (``stats.pair_norms``) then more than gave back.
    """
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    _finish(run())


def run() -> int:
    """Run ``ders`` with ``sys.argv`` in this process and return its exit code: a user never
    sees a traceback unless DERS_DEBUG is set. Exit codes: 0, 1 (verify found damage or a
    difference), 2 (bad input, one line), 3 (a bug: internal error), 130 (Ctrl-C) and 143
    (SIGTERM), both with nothing written (those two leave the process at once)."""
    global _COMMAND
    install()
    _COMMAND = ["ders", *sys.argv[1:]]
    try:
        from .app import app

        app()
    except Interrupted as exc:
        _leave(f"ders: {exc}; nothing was written\n", exc.exit_code)
    except KeyboardInterrupt:  # raised by something other than our handler
        _leave("ders: interrupted; nothing was written\n", 130)
    except SystemExit as exc:
        if exc.code is None or isinstance(exc.code, int):
            return exc.code or 0
        sys.stderr.write(f"{exc.code}\n")  # what Python prints for sys.exit("text")
        return 1
    except Exception as exc:
        interrupted = fired()
        if interrupted is not None:  # the interrupt, turned into another error on its way up
            _leave(f"ders: {interrupted}; nothing was written\n", interrupted.exit_code)
        if os.environ.get("DERS_DEBUG"):
            raise
        _stop_progress()
        sys.stderr.write(f"ders: internal error: {type(exc).__name__}: {exc} "
                         "(set DERS_DEBUG=1 for a traceback)\n")
        return 3
    return 0


def _leave(line: str, code: int) -> NoReturn:
    """End an interrupted run: its cleanup is done (every ``with`` and ``finally`` on the way
    up removed what it had begun), so the process leaves at once, without the interpreter's
    finalization. Finalizing while a native library still winds a thread down can abort the
    process instead (seen once in CI: "terminate called without an active exception", exit -6,
    after the right line), and there is nothing left for it to do."""
    _stop_progress()
    sys.stderr.write(line)
    _finish(code)


def _finish(code: int) -> NoReturn:
    """Leave the process now with ``code``: the profile written (``DERS_PROFILE``, normally at
    exit), the standard streams flushed."""
    profile.write()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed pipe: no one to read it
            stream.flush()
    os._exit(code)


def _stop_progress() -> None:
    """Take a progress bar off the terminal before the last line (if one was ever drawn)."""
    console = sys.modules.get("ders_cli.cli.console")
    if console is not None:
        console.stop_progress()
