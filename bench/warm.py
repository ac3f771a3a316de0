"""The warm-cache benchmark: every command against a plain copy of the same files, in one run.

    python -m bench.warm                 # a 0.5 GB synthetic checkpoint, 3 alternated runs
    python -m bench.warm --gb 1.4 --runs 5 --json warm.json
    python -m bench.warm --workers 1 2   # scaling: every command at 1 and at 2 workers

The checkpoint (bench/synth.py) is read once so that it sits in the page cache, as it does right
after a download or a training run; then each command is alternated with a copy of the same
files (read, write, fsync: bench/baselines.py), ``--runs`` times, every run a process of its
own. Each command's CPU time (user + system, of all its threads) and wall time are given as
ratios to the copy's in the same round, medians over the rounds, so the machine's speed and
its other load mostly cancel. Every ders run also writes its stage profile (DERS_PROFILE,
ders_cli/profile.py): the second table gives each command's CPU seconds by stage, so each gap
to the copy has a name. Times include starting Python and importing torch (and loading the
compiled numba kernels), what a user waits for; `bench.run` is the cold-cache benchmark.

``--workers 1 2 ...`` runs every command at each worker count (``--workers N``, alternated
with the copy in the same round) and adds a scaling table: wall and CPU time at N workers over
one worker's. CPU time says what parallel work costs (threads waiting, duplicated setup); the
wall-time speed-up needs a quiet machine, as every wall figure here does.
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
    workers: int | None = None  # --workers given to the command (None: its default, all cores)

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


# Each command: (key for --only, name, arguments after "ders"); {m} the model, {a[k]} archives.
COMMANDS = (
    ("drop", f"compress --drop {DROP:g}", ("compress", "{m}", "--drop", str(DROP), "-o",
                                           "{a[drop]}", "--force")),
    ("q2", f"quantize --bits {BITS} (mse)", ("quantize", "{m}", "--bits", str(BITS), "-o",
                                             "{a[q2]}", "--force")),
    ("rtn", f"quantize --bits {BITS} --method rtn", ("quantize", "{m}", "--bits", str(BITS),
                                                     "--method", "rtn", "-o", "{a[rtn]}",
                                                     "--force")),
    ("lossless", "compress --lossless", ("compress", "{m}", "--lossless", "-o",
                                         "{a[lossless]}", "--force")),
    ("expand-drop", f"expand (drop {DROP:g})", ("expand", "{a[drop]}", "-o", "{out}",
                                                "--force")),
    ("expand-q2", f"expand ({BITS}-bit)", ("expand", "{a[q2]}", "-o", "{out}", "--force")),
    ("expand-lossless", "expand (lossless)", ("expand", "{a[lossless]}", "-o", "{out}",
                                              "--force")),
    ("verify", f"verify --against (drop {DROP:g})", ("verify", "{a[drop]}", "--against",
                                                     "{m}")),
)
# What an expand or a verify needs written first (by the same command at the first count).
NEEDS = {"expand-drop": "drop", "expand-q2": "q2", "expand-lossless": "lossless",
         "verify": "drop"}


def selected(only: str | None) -> list[tuple[str, str, tuple[str, ...]]]:
    """COMMANDS named by ``only`` (keys separated by commas), plus what they need."""
    if not only:
        return list(COMMANDS)
    keys = {k.strip() for k in only.split(",") if k.strip()}
    unknown = keys - {k for k, _, _ in COMMANDS}
    if unknown:
        raise SystemExit(f"--only: unknown {sorted(unknown)}; one of "
                         f"{[k for k, _, _ in COMMANDS]}")
    keys |= {NEEDS[k] for k in keys if k in NEEDS}
    return [c for c in COMMANDS if c[0] in keys]


def bench(folder: Path, work: Path, runs: int, log, workers: list[int | None] | None = None,
          only: str | None = None) -> list[Result]:
    counts = workers or [None]
    size = sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
    for p in folder.iterdir():  # into the page cache
        if p.is_file():
            with open(p, "rb") as f:
                while f.read(1 << 24):
                    pass
    a = {k: work / f"{k}.ders" for k in ("drop", "q2", "rtn", "lossless")}
    out = work / "out"
    results, commands = [], []
    for _key, name, args in selected(only):
        for n in counts:
            cmd = [x.format(m=folder, a=a, out=out) for x in args]
            if n is not None:
                cmd += ["--workers", str(n)]
            label = name if n is None else f"{name} --workers {n}"
            commands.append((label, ders(*cmd)))
            results.append(Result(name, [], [], size, n))
    copy = [PY, "-m", "bench.baselines", "copy", str(folder), str(work / "copy")]
    for r in range(runs):
        for res, (label, cmd) in zip(results, commands, strict=True):
            shutil.rmtree(work / "copy", ignore_errors=True)
            res.copies.append(run(copy, work, False))
            log(f"[round {r + 1}/{runs}] {label} ...")
            res.runs.append(run(cmd, work, True))
    shutil.rmtree(work / "copy", ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    return results


def _label(r: Result) -> str:
    return f"`{r.command}`" if r.workers is None else f"`{r.command}` | {r.workers}"


def tables(results: list[Result]) -> str:
    sweep = any(r.workers is not None for r in results)
    w_head, w_rule = (" workers |", "---:|") if sweep else ("", "")
    lines = [f"| command |{w_head} CPU / copy's | wall / copy's | MB/s | wall s | CPU s | "
             "copy wall s | copy CPU s | peak RSS MB |",
             f"|---|{w_rule}" + "---:|" * 8]
    for r in results:
        copy_wall = statistics.median(c.wall for c in r.copies)
        copy_cpu = statistics.median(c.cpu for c in r.copies)
        lines.append(f"| {_label(r)} | {r.ratio('cpu'):.1f}x | {r.ratio('wall'):.1f}x | "
                     f"{r.input_bytes / 1e6 / r.median('wall'):.0f} | {r.median('wall'):.2f} | "
                     f"{r.median('cpu'):.2f} | {copy_wall:.2f} | {copy_cpu:.2f} | "
                     f"{max(x.peak_rss for x in r.runs) / 1e6:.0f} |")
    lines += ["", f"| command |{w_head} process CPU s | " + " | ".join(STAGES) + " | other |",
              f"|---|{w_rule}" + "---:|" * (len(STAGES) + 2)]
    for r in results:
        # The run of median wall time: its stages, in CPU seconds of the threads that ran them.
        mid = sorted(r.runs, key=lambda x: x.wall)[len(r.runs) // 2]
        st = mid.profile.get("stages", {})
        cells = [st.get(s, {}).get("cpu", 0.0) for s in STAGES]
        other = mid.cpu - sum(cells)
        lines.append(f"| {_label(r)} | {mid.cpu:.2f} | " + " | ".join(
            f"{c:.2f}" if c else "-" for c in cells) + f" | {other:.2f} |")
    if sweep:
        lines += ["", scaling(results)]
    return "\n".join(lines)


def scaling(results: list[Result]) -> str:
    """Each command at every worker count against itself at the fewest: wall speed-up (one
    worker's wall over N's) and CPU cost (N's CPU over one worker's), medians over the rounds
    of ratios within a round."""
    by_command: dict[str, list[Result]] = {}
    for r in results:
        by_command.setdefault(r.command, []).append(r)
    counts = sorted({r.workers for r in results if r.workers is not None})
    first = counts[0]
    head = " | ".join(f"wall / copy's, {n}" for n in counts)
    lines = [f"| command | {head} | " + " | ".join(f"speed-up {first}->{n}" for n in counts[1:])
             + " | " + " | ".join(f"CPU {n} / CPU {first}" for n in counts[1:]) + " |",
             "|---|" + "---:|" * (len(counts) + 2 * (len(counts) - 1))]
    for name, rs in by_command.items():
        at = {r.workers: r for r in rs}
        base = at[first]
        ups = [statistics.median(b.wall / x.wall for b, x in zip(base.runs, at[n].runs,
                                                                   strict=True))
               for n in counts[1:]]
        cost = [statistics.median(x.cpu / b.cpu for b, x in zip(base.runs, at[n].runs,
                                                                  strict=True))
                for n in counts[1:]]
        lines.append(f"| `{name}` | " + " | ".join(f"{at[n].ratio('wall'):.1f}x" for n in counts)
                     + " | " + " | ".join(f"{u:.2f}x" for u in ups) + " | "
                     + " | ".join(f"{c:.2f}" for c in cost) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="ders against a copy of the same files, warm cache")
    ap.add_argument("--gb", type=float, default=0.5, help="synthetic checkpoint size")
    ap.add_argument("--model", type=Path, help="a checkpoint folder instead of a synthetic one")
    ap.add_argument("--hidden", type=int, default=1024, help="hidden size of the synthetic model")
    ap.add_argument("--runs", type=int, default=3, help="alternated rounds (medians)")
    ap.add_argument("--workdir", type=Path, default=ROOT / "bench" / "out")
    ap.add_argument("--json", type=Path, help="also write the raw results here")
    ap.add_argument("--workers", type=int, nargs="+", metavar="N",
                    help="run every command with --workers N, for each N given (a scaling "
                         "table from the first); default: the commands' own (all cores)")
    ap.add_argument("--only", metavar="KEYS",
                    help="commands to run, by key, separated by commas: "
                         + ",".join(k for k, _, _ in COMMANDS))
    a = ap.parse_args(argv)
    if a.workers and min(a.workers) < 1:
        ap.error("--workers: counts are positive")
    selected(a.only)  # refuse unknown keys before generating anything
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
        results = bench(folder, work, a.runs, log, a.workers, a.only)
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
          f"medians of {a.runs} rounds"
          + (f", --workers {' and '.join(map(str, a.workers))}" if a.workers else "") + "\n")
    print(tables(results))
    if a.json:
        a.json.write_text(json.dumps({"machine": info, "results": [asdict(r) for r in results]},
                                     indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
