"""The warm-cache benchmark: every command against a plain copy of the same files, in one run.

    python -m bench.warm                 # a 0.5 GB synthetic checkpoint, 3 alternated runs
    python -m bench.warm --gb 1.4 --runs 5 --json warm.json

The checkpoint (bench/synth.py) is read once so that it sits in the page cache, as it does right
after a download or a training run; then each command is alternated with a copy of the same
files (read, write, fsync: bench/baselines.py), ``--runs`` times, every run a process of its
own. Each command's CPU time (user + system, of all its threads) and wall time are given as
ratios to the copy's in the same round, medians over the rounds, so the machine's speed and
its other load mostly cancel. Every ders run also writes its stage profile (DERS_PROFILE,
ders_cli/profile.py): the second table gives each command's CPU seconds by stage, so each gap
to the copy has a name. Times include starting Python and importing torch (and loading the
compiled numba kernels), what a user waits for; `bench.run` is the cold-cache benchmark.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .run import PY, ROOT, machine

DROP, BITS = 0.9, 2
STAGES = ("read", "hash", "base", "codec", "zstd", "measure", "synth", "write")


@dataclass
class Run:
    wall: float
    cpu: float
    peak_rss: int
    profile: dict = field(default_factory=dict)


@dataclass
class Result:
    command: str
    runs: list[Run]
    copies: list[Run]  # the copy run just before each of ``runs``
    input_bytes: int

    def ratio(self, key: str) -> float:
        return statistics.median(getattr(r, key) / getattr(c, key)
                                 for r, c in zip(self.runs, self.copies, strict=True))

    def median(self, key: str) -> float:
        return statistics.median(getattr(r, key) for r in self.runs)


def run(cmd: list[str], work: Path, profile: bool) -> Run:
    """``cmd`` in a process of its own; its wall, CPU (user + system) and peak RSS."""
    env = dict(os.environ)
    prof = work / "profile.json"
    prof.unlink(missing_ok=True)
    if profile:
        env["DERS_PROFILE"] = str(prof)
    os.sync()  # the previous step's dirty pages must not be flushed during this one
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, cwd=ROOT, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status):
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr.read().decode()}")
    proc.stderr.close()
    stages = json.loads(prof.read_text()) if profile and prof.exists() else {}
    return Run(wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss * 1024, stages)


def ders(*args: str) -> list[str]:
    return [PY, "-m", "ders_cli", *args, "--quiet"]


def bench(folder: Path, work: Path, runs: int, log) -> list[Result]:
    size = sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
    for p in folder.iterdir():  # into the page cache
        if p.is_file():
            with open(p, "rb") as f:
                while f.read(1 << 24):
                    pass
    a = {k: work / f"{k}.ders" for k in ("drop", "q2", "rtn", "lossless")}
    out = work / "out"
    commands = [
        (f"compress --drop {DROP:g}", ders("compress", str(folder), "--drop", str(DROP),
                                           "-o", str(a["drop"]), "--force"), size),
        (f"quantize --bits {BITS} (mse)", ders("quantize", str(folder), "--bits", str(BITS),
                                               "-o", str(a["q2"]), "--force"), size),
        (f"quantize --bits {BITS} --method rtn",
         ders("quantize", str(folder), "--bits", str(BITS), "--method", "rtn", "-o",
              str(a["rtn"]), "--force"), size),
        ("compress --lossless", ders("compress", str(folder), "--lossless", "-o",
                                     str(a["lossless"]), "--force"), size),
        (f"expand (drop {DROP:g})", ders("expand", str(a["drop"]), "-o", str(out),
                                         "--force"), size),
        (f"expand ({BITS}-bit)", ders("expand", str(a["q2"]), "-o", str(out), "--force"),
         size),
        ("expand (lossless)", ders("expand", str(a["lossless"]), "-o", str(out),
                                   "--force"), size),
        (f"verify --against (drop {DROP:g})", ders("verify", str(a["drop"]), "--against",
                                                   str(folder)), size),
    ]
    copy = [PY, "-m", "bench.baselines", "copy", str(folder), str(work / "copy")]
    results = [Result(name, [], [], n) for name, _, n in commands]
    for r in range(runs):
        for res, (name, cmd, _) in zip(results, commands, strict=True):
            shutil.rmtree(work / "copy", ignore_errors=True)
            res.copies.append(run(copy, work, False))
            log(f"[round {r + 1}/{runs}] {name} ...")
            res.runs.append(run(cmd, work, True))
    shutil.rmtree(work / "copy", ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    return results


def tables(results: list[Result]) -> str:
    lines = ["| command | CPU / copy's | wall / copy's | MB/s | wall s | copy wall s | "
             "peak RSS MB |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        copy_wall = statistics.median(c.wall for c in r.copies)
        lines.append(f"| `{r.command}` | {r.ratio('cpu'):.1f}x | {r.ratio('wall'):.1f}x | "
                     f"{r.input_bytes / 1e6 / r.median('wall'):.0f} | {r.median('wall'):.2f} | "
                     f"{copy_wall:.2f} | {max(x.peak_rss for x in r.runs) / 1e6:.0f} |")
    lines += ["", "| command | process CPU s | " + " | ".join(STAGES) + " | other |",
              "|---|" + "---:|" * (len(STAGES) + 2)]
    for r in results:
        # The run of median wall time: its stages, in CPU seconds of the threads that ran them.
        mid = sorted(r.runs, key=lambda x: x.wall)[len(r.runs) // 2]
        st = mid.profile.get("stages", {})
        cells = [st.get(s, {}).get("cpu", 0.0) for s in STAGES]
        other = mid.cpu - sum(cells)
        lines.append(f"| `{r.command}` | {mid.cpu:.2f} | " + " | ".join(
            f"{c:.2f}" if c else "-" for c in cells) + f" | {other:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="ders against a copy of the same files, warm cache")
    ap.add_argument("--gb", type=float, default=0.5, help="synthetic checkpoint size")
    ap.add_argument("--model", type=Path, help="a checkpoint folder instead of a synthetic one")
    ap.add_argument("--hidden", type=int, default=1024, help="hidden size of the synthetic model")
    ap.add_argument("--runs", type=int, default=3, help="alternated rounds (medians)")
    ap.add_argument("--workdir", type=Path, default=ROOT / "bench" / "out")
    ap.add_argument("--json", type=Path, help="also write the raw results here")
    a = ap.parse_args(argv)
    work = a.workdir.resolve() / f"warm-{os.getpid()}"
    work.mkdir(parents=True)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    try:
        folder = a.model
        if folder is None:
            folder = work / "model"
            log(f"generating a {a.gb:g} GB checkpoint ...")
            subprocess.run([PY, "-m", "bench.synth", str(folder), "--gb", str(a.gb),
                            "--hidden", str(a.hidden)], cwd=ROOT, check=True,
                           stdout=subprocess.DEVNULL)
        results = bench(folder, work, a.runs, log)
    finally:
        keep = a.model is not None
        for p in work.iterdir() if work.exists() else ():
            if not (keep and p == a.model):
                shutil.rmtree(p) if p.is_dir() else p.unlink()
        shutil.rmtree(work, ignore_errors=True)
    info = machine()
    size = results[0].input_bytes
    print(f"ders warm-cache benchmark, {info['date']}: {info['cpu']}, {info['cores']} cores, "
          f"{info['ram_gb']} GB RAM; a {size / 1e9:.2f} GB bf16 checkpoint in the page cache, "
          f"medians of {a.runs} rounds\n")
    print(tables(results))
    if a.json:
        a.json.write_text(json.dumps({"machine": info, "results": [asdict(r) for r in results]},
                                     indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
