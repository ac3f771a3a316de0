"""Where outputs go, and how they get there: whole or not at all, and nowhere else.

Every output is built under a hidden temporary name beside it, ``.NAME.partial-PID``, created
exclusively (never an existing file or a planted link), and renamed into place once complete.
A folder's files are created relative to directory descriptors with ``O_NOFOLLOW|O_EXCL``, so no
name, however crafted, opens anything outside the folder being built. A failure or an interrupt
removes what was built. The builder holds an exclusive ``flock`` on its temporary output while
it lives (the kernel drops it when the process dies, even by SIGKILL), so the next run on the
same output can tell a leftover of a killed run from a concurrent writer, and removes it.

No command overwrites a path without ``--force``; with it, a folder output replaces only the
files the archive holds (``hf download --local-dir`` does the same) and never deletes a file that
is not its own.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import shutil
import stat
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path

from .errors import InputError, OutputError, OutputExistsError
from .interrupts import Interrupted, critical, deferred
from .records import path_problem

# Files a model loader reads as the weights of a folder (transformers prefers model.safetensors,
# then its index, then the .bin forms). A --force expand keeps files it does not write, but not
# these: a loader could take an old one for the checkpoint.
_WEIGHT_SUFFIXES = (".safetensors", ".safetensors.index.json", ".bin", ".bin.index.json", ".pt",
                    ".pth", ".h5", ".msgpack", ".ckpt")
# errno values that mean "the output does not fit": the disk, a quota, a file size limit.
_NO_ROOM = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_NEW_FILE = os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def output_path(path: str | Path) -> Path:
    """An output path made absolute and normal (``-o .``, ``-o ..`` and ``-o out/`` name the
    folder they point at, so that its temporary sibling has a name)."""
    dest = Path(os.path.abspath(os.path.expanduser(str(path))))
    if not dest.name:
        raise InputError("cannot be an output: it is the root folder", dest)
    return dest


def temp_path(dest: Path) -> Path:
    """Where an output is built before it is renamed into place: hidden, beside it."""
    return dest.with_name(f".{dest.name}.partial-{os.getpid()}")


def check_new_output(dest: Path, overwrite: bool, folder: bool = False) -> None:
    """Fail before any work if ``dest`` cannot be written (``folder``: a folder output)."""
    exists = os.path.lexists(dest)  # a dangling link exists too: it is not ours to replace
    if exists and not overwrite:
        raise OutputExistsError("already exists; pass --force to overwrite it", dest)
    if exists:
        is_dir = dest.is_dir()
        if folder and not is_dir:
            raise InputError("exists and is not a folder; not overwritten", dest)
        if not folder and is_dir:
            raise InputError("is a folder; not overwritten by a file", dest)
    parent = dest.parent
    if not parent.is_dir():
        raise InputError("output folder does not exist", parent)
    if not os.access(parent, os.W_OK):
        raise InputError("output folder is not writable", parent)


def check_free_space(dest: Path, nbytes: int) -> None:
    """Fail before any work when ``nbytes`` cannot fit beside ``dest``: an archive of a few
    kilobytes may declare a checkpoint of terabytes (a base of zeros codes to nothing)."""
    free = shutil.disk_usage(dest.parent).free
    if nbytes > free:
        raise OutputError(f"needs {nbytes / 1e9:.2f} GB, its disk has {free / 1e9:.2f} GB free",
                          dest)


def check_merge(dest: Path, files: list[str]) -> None:
    """With --force into an existing folder: refuse (before any work) when the folder holds
    weights the output does not replace, or a folder where a file goes."""
    if not dest.is_dir():
        return
    ours = {f.casefold() for f in files}
    foreign = sorted(p.name for p in dest.iterdir()
                     if p.name.casefold() not in ours and p.name.endswith(_WEIGHT_SUFFIXES))
    if foreign:
        more = f" and {len(foreign) - 1} more" if len(foreign) > 1 else ""
        raise InputError(f"holds {foreign[0]}{more}, which this archive does not write: a "
                         "loader could mix it with the expanded checkpoint; remove it or choose "
                         "another output", dest)
    for rel in files:
        parts = rel.split("/")
        for i in range(1, len(parts) + 1):
            here = dest.joinpath(*parts[:i])
            if not os.path.lexists(here):
                break
            mode = os.lstat(here).st_mode
            if i < len(parts) and not stat.S_ISDIR(mode):
                raise InputError(f"holds {'/'.join(parts[:i])!r} where the archive needs a "
                                 "folder", dest)
            if i == len(parts) and stat.S_ISDIR(mode):
                raise InputError(f"holds a folder {rel!r} where the archive writes a file", dest)


def write_at(fd: int, data: bytes | bytearray | memoryview, offset: int) -> None:
    """All of ``data`` into ``fd`` from byte ``offset`` on (``pwrite`` may write less than asked;
    positioned writes let several threads fill one file)."""
    view = memoryview(data).cast("B")
    while len(view):
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def is_no_room(exc: OSError) -> bool:
    return exc.errno in _NO_ROOM


@contextmanager
def writing(dest: Path) -> Iterator[None]:
    """Turn "the disk is full" (or a quota, or a file size limit) into one clear error naming
    the output; whatever was built is removed by the builders' own cleanup on the way out."""
    try:
        yield
    except OSError as exc:
        if not is_no_room(exc):
            raise
        why = {errno.EFBIG: "a file grew past the size the system allows"}.get(
            exc.errno, "no space left on its disk")
        raise OutputError(f"cannot be written: {why}; nothing was written", dest) from None


# --- leftovers of killed runs ------------------------------------------------------------------

def _lock(fd: int) -> bool:
    """An exclusive lock on ``fd`` without waiting; False when another process holds one."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def sweep_leftovers(dest: Path) -> list[str]:
    """Remove what killed runs left beside ``dest`` (``.NAME.partial-PID``, and the
    ``.NAME.old-PID`` of earlier versions); returns a line for each removed. A leftover whose
    lock another process holds belongs to a concurrent writer and stays."""
    # -N: the further files of a sharded archive being written (ders_cli.archive)
    pattern = re.compile(rf"\.{re.escape(dest.name)}\.(partial|old)-\d+(-\d+)?")
    try:
        names = [n for n in os.listdir(dest.parent) if pattern.fullmatch(n)]
    except OSError:
        return []
    removed = []
    for name in sorted(names):
        path = dest.parent / name
        try:
            st = os.lstat(path)
            if stat.S_ISDIR(st.st_mode):
                fd = os.open(path, _DIR_FLAGS)
            elif stat.S_ISREG(st.st_mode):
                fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
            else:  # a link or anything else with a leftover's name: only the name goes
                os.unlink(path)
                removed.append(name)
                continue
            try:
                if not _lock(fd):
                    continue  # a live writer's
                if stat.S_ISDIR(st.st_mode):
                    shutil.rmtree(path)  # fd-based on Linux: links inside are not followed
                else:
                    os.unlink(path)
            finally:
                os.close(fd)
        except FileNotFoundError:
            continue  # another run removed it first
        except OSError as exc:
            raise OutputError(f"cannot remove {name}, left by an interrupted run "
                              f"({exc.strerror}); remove it by hand", dest.parent) from None
        removed.append(name)
    return [f"removed {n}, left by an interrupted run" for n in removed]


# --- building ----------------------------------------------------------------------------------

def create_exclusive(path: Path) -> int:
    """A new file at ``path``, open for reading and writing and locked: created exclusively
    and without following links (a link planted at a predictable temporary name is refused,
    not followed)."""
    try:
        fd = os.open(path, os.O_RDWR | _NEW_FILE, 0o644)
    except FileExistsError:
        raise OutputError(f"{path.name} is in the way (a file this process did not create); "
                          "remove it", path.parent) from None
    _lock(fd)
    return fd


def create_temp_file(dest: Path) -> tuple[int, Path]:
    """``create_exclusive`` at ``dest``'s temporary name."""
    path = temp_path(dest)
    return create_exclusive(path), path


class BuildDir:
    """A folder built under ``.NAME.partial-PID`` beside ``dest`` and moved into place by
    ``commit``; leaving the ``with`` block without a commit removes all it wrote."""

    def __init__(self, dest: Path, overwrite: bool) -> None:
        self.dest = dest
        self.overwrite = overwrite
        self.path = temp_path(dest)
        self.files: list[str] = []  # what was created, in order
        self._done = False
        try:
            with deferred():  # made and locked at once: an interrupt waits, then removes it
                try:
                    os.mkdir(self.path)
                except FileExistsError:
                    raise OutputError(f"{self.path.name} is in the way (a folder this process "
                                      "did not create); remove it", dest.parent) from None
                self._fd = os.open(self.path, _DIR_FLAGS)
                _lock(self._fd)
        except Interrupted:
            self.__exit__()
            raise

    def create(self, rel: str) -> int:
        """A new file at ``rel`` inside the folder, open for writing: every component is
        opened relative to its parent's descriptor, links never followed, nothing replaced."""
        problem = path_problem(rel)
        if problem:  # archives are checked when opened; this holds for any caller
            raise ValueError(f"path {rel!r} {problem}")
        parts = rel.split("/")
        parent = self._open_dirs(self._fd, parts[:-1], create=True)
        try:
            fd = os.open(parts[-1], os.O_WRONLY | _NEW_FILE, 0o644, dir_fd=parent)
        finally:
            if parent != self._fd:
                os.close(parent)
        self.files.append(rel)
        return fd

    @staticmethod
    def _open_dirs(root: int, parts: list[str], create: bool) -> int:
        """The descriptor of folder ``parts`` under ``root`` (``root`` itself for none)."""
        fd = root
        for part in parts:
            if create:
                with suppress(FileExistsError):
                    os.mkdir(part, dir_fd=fd)
            try:
                nxt = os.open(part, _DIR_FLAGS, dir_fd=fd)
            finally:
                if fd != root:
                    os.close(fd)
            fd = nxt
        return fd

    def adopt(self, rel: str) -> None:
        """Count ``rel`` as part of the output: a file another builder created in the folder
        (the archive writer's exclusive temporaries, renamed into place when complete)."""
        self.files.append(rel)

    def commit(self, replaces: Sequence[str] = ()) -> None:
        """Move the folder into place. Without ``overwrite`` the output must still be absent;
        with it, an existing folder receives the built files one by one (each replaced whole
        by a rename) and keeps every other file it holds, except ``replaces``: files of the
        output's earlier version under names this one does not use (an archive's shards of
        another count), removed once the new files are in."""
        with critical():  # an interrupt now waits: the output is complete
            if not os.path.lexists(self.dest):
                try:
                    os.rename(self.path, self.dest)
                except OSError:  # something took the name meanwhile
                    raise OutputExistsError("appeared while writing; not overwritten",
                                            self.dest) from None
            elif not self.overwrite:
                raise OutputExistsError("appeared while writing; not overwritten", self.dest)
            else:
                check_merge(self.dest, self.files + list(replaces))
                self._merge()
                for rel in replaces:
                    if rel not in self.files:
                        with suppress(FileNotFoundError):
                            os.unlink(self.dest / rel)
            self._done = True
        os.close(self._fd)

    def _merge(self) -> None:
        dest_fd = os.open(self.dest, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            for rel in self.files:
                parts = rel.split("/")
                src = self._open_dirs(self._fd, parts[:-1], create=False)
                dst = self._open_dirs(dest_fd, parts[:-1], create=True)
                try:
                    os.rename(parts[-1], parts[-1], src_dir_fd=src, dst_dir_fd=dst)
                finally:
                    for fd in (src, dst):
                        if fd not in (self._fd, dest_fd):
                            os.close(fd)
        finally:
            os.close(dest_fd)
        shutil.rmtree(self.path)  # only the emptied folders are left

    def __enter__(self) -> BuildDir:
        return self

    def __exit__(self, *exc: object) -> None:
        if not self._done:
            os.close(self._fd)
            shutil.rmtree(self.path, ignore_errors=True)
