"""Where a command's time goes, by stage (#14): off unless ``DERS_PROFILE`` is set.

``DERS_PROFILE=path ders compress ...`` writes, when the process ends, a JSON object with each
stage's CPU seconds (of the threads that ran it), wall seconds and call count, and the process's
own CPU and wall time: ``bench/warm.py`` puts them in its stage table. Stages may run on any
thread (the reader, writer, hashing and zstd threads too); a stage's CPU is what its threads
spent in it, so stages on different threads can add up to more than the wall time.

Stages: ``read`` (bytes from files into memory), ``hash`` (checksums of bytes in memory), ``base``
(the group's base: its mean, its encoding or decoding), ``codec`` (a codec's encoding or
decoding of members, on the main thread), ``zstd`` (entropy coding on the zstd threads),
``measure`` (the encoder's norms and reconstructions), ``synth`` (synthesizing members from
the stored arrays), ``write`` (bytes to files). Off, ``stage`` costs one attribute test.
"""

from __future__ import annotations

import atexit
import json
import os
import resource
import threading
import time
from typing import Any

_PATH = os.environ.get("DERS_PROFILE") or None
_TOTALS: dict[str, list[float]] = {}
_LOCK = threading.Lock()
_START = time.perf_counter()


class stage:
    """``with stage("codec"): ...`` adds the block's thread CPU and wall time to the stage."""

    __slots__ = ("_cpu", "_name", "_wall")

    def __init__(self, name: str) -> None:
        self._name = name

    def __enter__(self) -> None:
        if _PATH is not None:
            self._cpu, self._wall = time.thread_time(), time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        if _PATH is not None:
            cpu, wall = time.thread_time() - self._cpu, time.perf_counter() - self._wall
            with _LOCK:
                t = _TOTALS.setdefault(self._name, [0.0, 0.0, 0])
                t[0] += cpu
                t[1] += wall
                t[2] += 1


def enabled() -> bool:
    return _PATH is not None


def report() -> dict[str, Any]:
    """The stages so far, and the process's CPU and wall seconds."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    with _LOCK:
        stages = {k: {"cpu": round(v[0], 4), "wall": round(v[1], 4), "calls": int(v[2])}
                  for k, v in sorted(_TOTALS.items())}
    return {"stages": stages, "process_cpu": round(usage.ru_utime + usage.ru_stime, 4),
            "process_wall": round(time.perf_counter() - _START, 4)}


def write() -> None:
    """Write the profile now (when on): processes that leave without the interpreter's exit
    handlers (``ders``'s do) call this first."""
    if _PATH is None:
        return
    try:
        with open(_PATH, "w") as f:
            json.dump(report(), f, indent=1)
    except OSError:
        pass  # a profile is a measurement aid: never the reason a command fails


if _PATH is not None:
    atexit.register(write)
