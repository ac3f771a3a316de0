"""The consoles every command shares, and the reporter that draws progress on stderr."""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from ..errors import DersError


def _console(stderr: bool) -> Console:
    # Piped output (a file, a README, CI logs) is not wrapped at 80 columns: tensor names are long.
    probe = Console(stderr=stderr)
    width = None if probe.is_terminal or os.environ.get("COLUMNS") else 160
    return Console(stderr=stderr, highlight=False, width=width)


out = _console(stderr=False)
err = _console(stderr=True)


def human_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    raise AssertionError


def shown(path: Path) -> str:
    """A path as the user would type it: relative to the working folder when inside it; escaped
    for rich markup (a folder named "[red]x" is shown as it is)."""
    try:
        text = str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        text = str(path)
    return escape(text)


def human_count(n: float) -> str:
    for unit in ("", "K", "M", "B"):
        if abs(n) < 1000 or unit == "B":
            return f"{n:.0f}" if unit == "" else f"{n:.2f}{unit}"
        n /= 1000
    raise AssertionError


def natural_key(text: str) -> list:
    """Sort key that orders layer 2 before layer 10: runs of digits compare as numbers (by
    length, then digits: names come from files, and int() refuses a run of 4,300 digits)."""
    parts = re.split(r"([0-9]+)", text)
    return [(len(p.lstrip("0")), p.lstrip("0")) if i % 2 else p for i, p in enumerate(parts)]


def print_json(doc: object) -> None:
    sys.stdout.write(json.dumps(doc, indent=2) + "\n")


# Library parameters whose flag is not "--" and the name with dashes.
_FLAGS = {"value_bits": "--bits", "value_group": "--group-size"}


def flag_of(param: str) -> str:
    return _FLAGS.get(param, "--" + param.replace("_", "-"))


def cli_message(exc: DersError) -> str:
    """An error as the CLI says it: a message about a library parameter names its flag."""
    text = str(exc)
    param = getattr(exc, "param", None)
    if param and exc.path is None and text.startswith(param):
        return flag_of(param) + text[len(param):]
    return text


@contextmanager
def reported() -> Iterator[None]:
    """Turn a DersError into its one line on stderr and its exit code; never a traceback."""
    try:
        yield
    except DersError as exc:
        stop_progress()
        err.print(f"[bold red]ders:[/] {escape(cli_message(exc))}", markup=True, soft_wrap=True)
        raise typer.Exit(exc.exit_code) from None


# Progress bars on the terminal now: an error or an interrupt takes them off before its line.
_ACTIVE: set[Progress] = set()


def stop_progress() -> None:
    for progress in list(_ACTIVE):
        progress.stop()
        _ACTIVE.discard(progress)


class RichReporter:
    """Progress on stderr, bytes and groups; off when quiet or when stderr is not a terminal."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.enabled = not quiet and err.is_terminal
        self._progress: Progress | None = None
        self._task = None

    def start(self, label: str, total_bytes: int, total_groups: int) -> None:
        if not self.enabled:
            return
        self._progress = Progress(
            TextColumn("{task.description}"), BarColumn(), DownloadColumn(binary_units=False),
            TransferSpeedColumn(), TextColumn("{task.fields[done]}/{task.fields[groups]} groups"),
            TimeRemainingColumn(), console=err, transient=True)
        self._progress.start()
        _ACTIVE.add(self._progress)
        self._task = self._progress.add_task(label, total=total_bytes, done=0,
                                             groups=total_groups)

    def advance(self, nbytes: int, groups: int = 0) -> None:
        if self._progress is not None:
            done = self._progress.tasks[0].fields["done"] + groups
            self._progress.update(self._task, advance=nbytes, done=done)

    def warn(self, message: str) -> None:
        if not self.quiet:
            console = self._progress.console if self._progress is not None else err
            console.print(f"[yellow]warning:[/] {escape(message)}", soft_wrap=True)

    def finish(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            _ACTIVE.discard(self._progress)
            self._progress = None
