"""Threads: the workers a command computes on, and background lanes that read ahead and write
behind them.

Every hot loop releases the GIL: torch's kernels, numpy's, the numba kernels (``nogil``), zstd,
the checksums and the disk. So threads, not processes, share a group's work: the members of a group
are independent (each is encoded, synthesized, hashed and measured on its own), and ``Workers``
runs them on ``--workers`` threads (default: every core this process may use), each with torch
kept to one thread of its own, so that the cores are not asked for more threads than they have.
Memory stays bounded by the workers: a group, the next one being read, and a few members' buffers
per worker, whatever the checkpoint's size.

A lane runs its tasks one at a time in submission order (archive bytes land in order), and holds
at most ``depth`` pending tasks so that memory stays bounded: a submit waits for room.
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, TypeVar

import torch

from .errors import UsageError

T = TypeVar("T")
R = TypeVar("R")


class Lane:
    """One worker thread; tasks run in order; errors surface on the next submit or drain."""

    def __init__(self, name: str, depth: int = 4) -> None:
        self._pool = ThreadPoolExecutor(1, thread_name_prefix=f"ders-{name}")
        self._pending: deque[Future] = deque()
        self._depth = depth

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        while len(self._pending) >= self._depth:
            self._pending.popleft().result()
        self._reap()
        future = self._pool.submit(fn, *args)
        self._pending.append(future)
        return future

    def _reap(self) -> None:
        while self._pending and self._pending[0].done():
            self._pending.popleft().result()

    def drain(self) -> None:
        while self._pending:
            self._pending.popleft().result()

    def close(self) -> None:
        # On an error elsewhere: let queued tasks finish or fail quietly, then stop.
        for f in self._pending:
            f.cancel()
        self._pool.shutdown(wait=True)

    def __enter__(self) -> Lane:
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if exc_type is None:
            self.drain()
        self.close()


def _libc_trim() -> Callable[[], None]:
    # glibc keeps freed large blocks in its heap; after a group of hundreds of MB that reads as
    # resident memory that grows with the checkpoint. malloc_trim hands it back to the kernel.
    try:
        # The process's own symbols, libc's among them: find_library("c") would run ldconfig
        # in a subprocess (23 ms at every import).
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError, TypeError):
        trim = None
    if trim is None:
        return lambda: None
    return lambda: trim(0)


release_memory = _libc_trim()


def usable_cores() -> int:
    """The cores this process may run on (its affinity, not the machine's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def resolve_workers(workers: int | None) -> int:
    """``workers`` threads, or every usable core for None."""
    if workers is None:
        return usable_cores()
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise UsageError(f"workers must be a positive integer, got {workers!r}", param="workers")
    return workers


_ACTIVE: list[int] = []  # the worker counts of the commands running, innermost last
_ACTIVE_LOCK = threading.Lock()


def worker_count() -> int:
    """How many threads the running command computes on (every usable core outside one): what
    helper pools (zstd frames) size themselves to."""
    with _ACTIVE_LOCK:
        return _ACTIVE[-1] if _ACTIVE else usable_cores()


class Workers:
    """The threads a command computes on. With one, tasks run on the calling thread, as a plain
    loop would; with more, on a pool, at most twice as many in flight as threads."""

    def __init__(self, count: int) -> None:
        self.count = count
        self._pool = (ThreadPoolExecutor(count, thread_name_prefix="ders-work")
                      if count > 1 else None)

    @property
    def parallel(self) -> bool:
        return self._pool is not None

    def submit(self, fn: Callable[..., R], *args: Any) -> Future[R]:
        """``fn(*args)`` on a worker, or at once on this thread with one worker."""
        if self._pool is not None:
            return self._pool.submit(fn, *args)
        future: Future[R] = Future()
        try:
            future.set_result(fn(*args))
        except Exception as exc:  # raised by result(), as a pool's would be
            future.set_exception(exc)
        return future

    def map(self, fn: Callable[[T], R], items: Iterable[T]) -> Iterator[R]:
        """``fn(item)`` for every item, results in the items' order. An error is raised when
        its result is reached; tasks not started by then are cancelled."""
        if self._pool is None:
            for item in items:
                yield fn(item)
            return
        pending: deque[Future[R]] = deque()
        try:
            for item in items:
                pending.append(self._pool.submit(fn, item))
                while len(pending) >= 2 * self.count:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for f in pending:
                f.cancel()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)


_LOCAL = threading.local()


def thread_buffer(slot: str, numel: int, dtype: torch.dtype,
                  device: torch.device | str = "cpu") -> torch.Tensor:
    """This thread's flat buffer ``slot``: kept from member to member and group to group (a
    fresh 15 MB tensor costs more in page faults than the arithmetic on it), remade when the
    size or dtype changes. A worker's buffers go with its thread, at the end of the command."""
    buffers = getattr(_LOCAL, "buffers", None)
    if buffers is None:
        buffers = _LOCAL.buffers = {}
    buf = buffers.get(slot)
    if buf is None or buf.numel() != numel or buf.dtype != dtype or buf.device != device:
        buffers.pop(slot, None)  # the old one goes before the new one is made
        buf = buffers[slot] = torch.empty(numel, dtype=dtype, device=device)
    return buf


@contextmanager
def computing(workers: int | None = None, elements: int = 0) -> Iterator[Workers]:
    """The workers of one command (``workers`` threads, or every usable core), and torch's
    intra-op threads to match. With several workers each keeps torch to one thread: they fill
    the cores themselves, and OpenMP threads that find their core taken spin at every barrier
    (measured: each operation tens of times slower). With one, torch gets one core fewer than
    there are, since the lanes keep one busy hashing and moving bytes. Archives do not depend
    on either: every member is computed by one thread the same way. ``elements``: how many
    elements the command will compute on (``jit.expect``)."""
    from .codecs import jit  # here: the codecs' package imports this module

    count = resolve_workers(workers)
    jit.expect(elements)
    before = torch.get_num_threads()
    torch.set_num_threads(1 if count > 1 else max(1, min(before, usable_cores() - 1)))
    with _ACTIVE_LOCK:
        _ACTIVE.append(count)
    pool = Workers(count)
    try:
        yield pool
    finally:
        pool.close()
        with _ACTIVE_LOCK:
            _ACTIVE.remove(count)
        torch.set_num_threads(before)


@contextmanager
def compute_threads() -> Iterator[None]:
    """``computing(1)``: the main thread's arithmetic alone (inspect)."""
    with computing(1):
        yield
