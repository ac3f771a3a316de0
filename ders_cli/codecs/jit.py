"""Fused loops compiled by numba (nopython, GIL released), loaded only when a command needs them.

The codecs' hot loops touch every element a few times; written with numpy or torch, each step
is a pass over memory with a temporary of its own. A numba kernel does the whole loop in one
pass at the speed of memory, and releases the GIL, so the threads that run members or groups
in parallel scale. Kernels take and return numpy arrays on the CPU: where a tensor lives on a
GPU the callers keep to torch.

The lossy codecs' kernels (quantizer, clip search, mask generator) each have a numpy or torch
twin that gives the same bits (tests/test_kernels.py compares them), so using one is only a
question of speed; the lossless coder's kernels are its only implementation. Loading numba and
its cached machine code costs about a second of CPU per process (importing numba, then its
typing and code-generation machinery at the first kernel), more than small checkpoints take to
compress: so a process runs its first lossy kernel only once its work has reached
``KERNEL_WORK`` elements (``wanted``), and ``import ders_cli`` or ``ders --help`` never load
numba. A command that knows its work up front says so (``expect``, through
``lanes.computing``): then the kernels run from its first member, not after 2^25 elements done
the slow way (measured at 1.4 GB: a third of the mask's positions, 2-3 s of CPU). Compiled
code is cached on disk (``cache=True``): only the first run on a machine compiles.

``DERS_KERNELS=always`` or ``never`` (environment) overrides the choice: tests and benchmarks
compare both paths.
"""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Callable
from typing import Any

_LOCK = threading.Lock()

# Elements of work (summed over a process's calls of ``wanted``) from which the kernels pay
# for their loading: ~1 s of CPU at 30-60 ns saved per element. 2^25 elements: 64 MB of bf16.
KERNEL_WORK = 1 << 25
_MODES = ("auto", "always", "never")
_state = {"mode": os.environ.get("DERS_KERNELS", "auto"), "work": 0, "expected": 0,
          "loaded": False}
if _state["mode"] not in _MODES:
    _state["mode"] = "auto"


def set_mode(mode: str) -> str:
    """Use kernels ``"always"``, ``"never"`` or when the work pays (``"auto"``); returns the
    mode before (tests)."""
    if mode not in _MODES:
        raise ValueError(f"kernel mode must be one of {_MODES}, got {mode!r}")
    before, _state["mode"] = _state["mode"], mode
    return before


def wanted(elements: int) -> bool:
    """Whether to run a kernel for ``elements`` more elements of work: always once a kernel has
    run in this process, otherwise once the process's work, or a command's announced work
    (``expect``), has reached ``KERNEL_WORK``."""
    mode = _state["mode"]
    if mode != "auto":
        return mode == "always"
    if _state["loaded"]:
        return True
    with _LOCK:
        _state["work"] += elements
        return max(_state["work"], _state["expected"]) >= KERNEL_WORK


def expect(elements: int) -> None:
    """A command is about to compute on ``elements`` elements: ``wanted`` decides by that size
    from its first call, rather than by what has been done so far. Kept apart from the work
    counted as done: calls of ``wanted`` count each element more than once (a quantizer's
    search, then its codes), and added to the announced size they would load the kernels
    halfway through a small run (a 14 M-element model's quantize did, compiling them on a
    fresh machine: 17.5 s instead of a few)."""
    with _LOCK:
        _state["expected"] = max(_state["expected"], int(elements))


def loaded() -> bool:
    """Whether a kernel has been loaded in this process."""
    return bool(_state["loaded"])


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
                    _state["loaded"] = True
        return compiled[0](*args)

    call.py_func = fn  # type: ignore[attr-defined]
    return call
