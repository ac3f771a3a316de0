"""The numba kernels against their numpy/torch twins, on whole commands, in one process.

    python -m bench.kernels                  # the real slice's layer, 3 alternated rounds
    python -m bench.kernels --gb 0.25        # a synthetic checkpoint (bench/synth.py) instead
    python -m bench.kernels --workers 1 2    # each mode at 1 and at 2 workers

Each lossy command (compress --drop 0.9, quantize --bits 2 with mse and with rtn) runs with
the kernels forced on and forced off (``ders_cli.codecs.jit.set_mode``: "always", "never"),
alternated within each round after one untimed run of each (numba loads and compiles there),
and is timed by the process's CPU seconds (every thread) and wall seconds; medians. The
archives of both modes are compared byte for byte: the kernels change speed, never bytes. CPU
time holds on a shared machine; wall time needs a quiet one.
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ders_cli import QuantSpec, SparseSpec, compress
from ders_cli.codecs import jit

from .run import PY, ROOT

REAL_SLICE = ROOT.parent / "shared" / "real-slice" / "moe-layer0.safetensors"
SPECS = {
    "compress --drop 0.9": SparseSpec(0.9),
    "quantize --bits 2 (mse)": QuantSpec(2),
    "quantize --bits 2 --method rtn": QuantSpec(2, method="rtn"),
}


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="ders' numba kernels against their twins")
    ap.add_argument("model", type=Path, nargs="?", help="a checkpoint (default: the real slice)")
    ap.add_argument("--gb", type=float, help="a synthetic checkpoint of this size instead")
    ap.add_argument("--runs", type=int, default=3, help="alternated rounds (medians)")
    ap.add_argument("--workers", type=int, nargs="+", metavar="N", default=[1],
                    help="worker counts to run each mode at (default 1)")
    a = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = a.model
        if a.gb:
            model = tmp / "model"
            subprocess.run([PY, "-m", "bench.synth", str(model), "--gb", str(a.gb)], cwd=ROOT,
                           check=True, stdout=subprocess.DEVNULL)
        elif model is None:
            model = REAL_SLICE
        if not model.exists():
            print(f"{model} is not there: give a checkpoint or --gb", file=sys.stderr)
            return 2
        size = (sum(p.stat().st_size for p in model.iterdir() if p.is_file())
                if model.is_dir() else model.stat().st_size)
        cases = [(name, n, mode) for name in SPECS for n in a.workers
                 for mode in ("never", "always")]
        times: dict[tuple, list[tuple[float, float]]] = {c: [] for c in cases}
        shas: dict[tuple, set[str]] = {}
        for r in range(a.runs + 1):  # round 0: untimed (loading, compiling, page cache)
            for case in cases:
                name, n, mode = case
                before = jit.set_mode(mode)
                out = tmp / "a.ders"
                try:
                    wall, cpu = time.perf_counter(), time.process_time()
                    compress(model, SPECS[name], out, workers=n, overwrite=True)
                    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
                finally:
                    jit.set_mode(before)
                shas.setdefault((name, n), set()).add(_sha(out))
                if r:
                    times[case].append((cpu, wall))
                print(f"[round {r}/{a.runs}] {name}, {n} worker(s), kernels {mode}: "
                      f"{cpu:.2f} s CPU", file=sys.stderr, flush=True)
    print(f"{model.name}: {size / 1e6:.0f} MB, medians of {a.runs} rounds in one process\n")
    print("| command | workers | CPU s, twins | CPU s, kernels | CPU saved | wall s, twins | "
          "wall s, kernels | MB per CPU s, kernels | same archive |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---|")
    same = True
    for name in SPECS:
        for n in a.workers:
            off = times[(name, n, "never")]
            on = times[(name, n, "always")]
            c0, c1 = (statistics.median(t[0] for t in x) for x in (off, on))
            w0, w1 = (statistics.median(t[1] for t in x) for x in (off, on))
            one = len(shas[(name, n)]) == 1
            same = same and one
            print(f"| `{name}` | {n} | {c0:.2f} | {c1:.2f} | {1 - c1 / c0:.0%} | {w0:.2f} | "
                  f"{w1:.2f} | {size / 1e6 / c1:.0f} | {'yes' if one else 'NO'} |")
    if not same:
        print("the kernels changed an archive", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
