"""Where outputs go, and the rule that no command overwrites a path without being told to."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from .archive import temp_path
from .errors import InputError, OutputError, OutputExistsError


def check_new_output(dest: Path, overwrite: bool) -> None:
    """Fail before any work if ``dest`` cannot be written."""
    if dest.exists() and not overwrite:
        raise OutputExistsError("already exists; pass --force to overwrite it", dest)
    parent = dest.parent if str(dest.parent) else Path(".")
    if not parent.is_dir():
        raise InputError("output folder does not exist", parent)
    if not os.access(parent, os.W_OK):
        raise InputError("output folder is not writable", parent)


def check_free_space(dest: Path, nbytes: int) -> None:
    """Fail before any work when ``nbytes`` cannot fit beside ``dest``: an archive of a few
    kilobytes may declare a checkpoint of terabytes (a base of zeros codes to nothing)."""
    parent = dest.parent if str(dest.parent) else Path(".")
    free = shutil.disk_usage(parent).free
    if nbytes > free:
        raise OutputError(f"needs {nbytes / 1e9:.2f} GB, its disk has {free / 1e9:.2f} GB free",
                          dest)


class BuildDir:
    """A folder built under a hidden temporary name and renamed into place on ``commit``."""

    def __init__(self, dest: Path, overwrite: bool) -> None:
        self.dest = dest
        self.overwrite = overwrite
        self.path = temp_path(dest)
        if self.path.exists():
            shutil.rmtree(self.path)
        self.path.mkdir()
        self._done = False

    def commit(self) -> None:
        if self.dest.exists():
            if not self.overwrite:
                raise OutputExistsError("appeared while writing; not overwritten", self.dest)
            old = self.dest.with_name(f".{self.dest.name}.old-{os.getpid()}")
            os.replace(self.dest, old)
            os.replace(self.path, self.dest)
            if old.is_dir():
                shutil.rmtree(old)
            else:
                old.unlink()
        else:
            os.replace(self.path, self.dest)
        self._done = True

    def __enter__(self) -> BuildDir:
        return self

    def __exit__(self, *exc: object) -> None:
        if not self._done:
            shutil.rmtree(self.path, ignore_errors=True)
