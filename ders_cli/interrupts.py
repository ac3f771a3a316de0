"""Ctrl-C and SIGTERM for the ``ders`` command: one line, exit 130 (143), nothing left behind.

Python turns Ctrl-C into KeyboardInterrupt, which click and Typer catch on the way and turn
into a silent exit; and during the first seconds (importing torch) nothing catches it, so a
traceback is printed. The command installs ``install``'s handler first thing instead: it raises
``Interrupted``, a BaseException no library catches, which unwinds through every ``with`` and
``finally`` (the builders remove their temporary outputs) up to ``main``. A second signal while
that cleanup runs is ignored, so that it is not cut short; a signal inside ``critical`` (an
output being moved into place) waits until the move is done, and is then dropped: the output
is complete and the command finishes normally.

The library never installs these handlers: ``import ders_cli`` leaves signals alone.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager

NAMES = {signal.SIGINT: "interrupted", signal.SIGTERM: "terminated"}


class Interrupted(BaseException):
    """The run was interrupted by ``signum``; ``exit_code`` is 128 + signum, as a shell's."""

    def __init__(self, signum: int) -> None:
        super().__init__(NAMES.get(signum, f"signal {signum}"))
        self.signum = signum
        self.exit_code = 128 + signum


_state = {"installed": False, "fired": 0, "critical": 0, "pending": 0}


def _handler(signum: int, frame: object) -> None:
    if _state["fired"]:
        return  # cleaning up after the first: let it finish
    if _state["critical"]:
        _state["pending"] = signum
        return
    _state["fired"] = signum
    raise Interrupted(signum)


def fired() -> Interrupted | None:
    """The interrupt this run received, if any: for an entry point that sees another exception
    instead (a library that caught ``Interrupted`` mid-step and failed in its own way, as
    numba's compiler lock does when the signal lands while it loads a kernel)."""
    signum = _state["fired"]
    return Interrupted(signum) if signum else None


def install() -> None:
    """Handle SIGINT and SIGTERM as above (the command's entry point only)."""
    for signum in NAMES:
        signal.signal(signum, _handler)
    _state["installed"] = True


@contextmanager
def critical() -> Iterator[None]:
    """A step that an interrupt must not cut in two: moving a finished output into place."""
    _state["critical"] += 1
    try:
        yield
    finally:
        _state["critical"] -= 1
        _state["pending"] = 0 if not _state["critical"] else _state["pending"]


@contextmanager
def deferred() -> Iterator[None]:
    """A step an interrupt waits for and then lands after: creating a temporary output and
    handing it to the cleanup that removes it. Between the two, an interrupt would leave the
    file behind; held until both are done, it lands where the cleanup sees the file."""
    _state["critical"] += 1
    try:
        yield
    finally:
        _state["critical"] -= 1
    signum = _state["pending"]
    if signum and not _state["critical"] and not _state["fired"]:
        _state["pending"] = 0
        _state["fired"] = signum
        raise Interrupted(signum)
