"""Background lanes: reading ahead and writing behind the main thread's arithmetic.

Disk reads, writes and sha256 release the GIL, and so do torch's kernels, so one thread per
kind of work keeps the disk busy while the cores compute. A lane runs its tasks one at a time
in submission order (archive bytes land in order), and holds at most ``depth`` pending tasks so
that memory stays bounded: a submit waits for room.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import torch


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
    name = ctypes.util.find_library("c")
    try:
        trim = ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        trim = None
    if trim is None:
        return lambda: None
    return lambda: trim(0)


release_memory = _libc_trim()


@contextmanager
def compute_threads() -> Iterator[None]:
    """torch's intra-op threads for the main thread's arithmetic: one core fewer than the
    machine has, since the lanes keep one busy hashing and moving bytes. On a 2-core machine
    that is one thread: OpenMP threads that find their core taken spin at every barrier, and
    were measured to make each operation tens of times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, min(before, (os.cpu_count() or 2) - 1)))
    try:
        yield
    finally:
        torch.set_num_threads(before)
