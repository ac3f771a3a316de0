"""Fused loops compiled by numba (nopython, GIL released), compiled on first use.

The codecs' hot loops touch every element a few times; written with numpy or torch, each step
is a pass over memory with a temporary of its own. A numba kernel does the whole loop in one
pass at the speed of memory, and releases the GIL, so the threads that run members or groups
in parallel scale. numba is imported and a kernel compiled only when it first runs, so that
``import ders_cli`` and ``ders --help`` stay fast; compiled code is cached on disk
(``cache=True``), so later processes load it in milliseconds. Kernels take and return numpy
arrays on the CPU: where a tensor lives on a GPU the callers keep to torch.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from typing import Any

_LOCK = threading.Lock()


def kernel(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` compiled with ``numba.njit(cache=True, nogil=True)`` when first called. A kernel
    calls no other kernel (each is compiled on its own); ``.py_func`` is the plain Python
    function, for tests that check the compiled one against it."""
    compiled: list[Callable[..., Any]] = []

    @functools.wraps(fn)
    def call(*args: Any) -> Any:
        if not compiled:
            with _LOCK:
                if not compiled:
                    import numba

                    compiled.append(numba.njit(cache=True, nogil=True)(fn))
        return compiled[0](*args)

    call.py_func = fn  # type: ignore[attr-defined]
    return call
