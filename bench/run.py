"""The ders benchmark: size, speed and memory of every command on synthetic upcycled
checkpoints, against a plain read-and-write of the same bytes and against zstd and xz.

    python -m bench.run                      # 0.25 and 1 GB: ten minutes, most of it xz
    python -m bench.run --sizes 0.25,1,4,16  # the full run: an hour, ~3.5x the largest size free
    python -m bench.run --json results.json --keep

Every command runs in a process of its own, so each peak RSS is that command's alone (read from
``wait4``); the page cache is dropped before each one when the machine allows it. Times include
starting Python (and, for ders, importing torch): what a user waits for. One markdown table is
printed, ready for the README.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import math
import os
import platform
import shutil
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from .layout import BF16, Synthetic, tensor_shapes

DROP = 0.9
BITS, GROUP_SIZE = 2, 128
ZSTD_LEVEL = 3
XZ_PRESET = 9
XZ_MAX_GB = 0.25  # xz runs at ~1 MB/s on one core: only at sizes up to this (--xz-max-gb)
ROOT = Path(__file__).resolve().parent.parent  # the repository: children run from here
DEFAULT_WORKDIR = ROOT / "bench" / "out"
PY = sys.executable


@dataclass
class Row:
    size: str  # the target size, as asked: "0.25 GB"
    command: str
    checkpoint_bytes: int  # the uncompressed checkpoint: what GB/s is measured on
    input_bytes: int
    output_bytes: int
    compressed_bytes: int | None  # the compressed form this command makes or reads
    seconds: float
    peak_rss: int  # bytes
    baseline_seconds: float | None = None
    theory_bytes: int | None = None  # what the codecs need, for compress and quantize
    note: str = ""
    ok: bool = True


@dataclass
class Measured:
    seconds: float
    peak_rss: int
    rc: int
    stdout: str
    stderr: str


def measure(cmd: list[str], cache: CacheControl, workdir: Path) -> Measured:
    """Run ``cmd`` in a process of its own, from a cold cache when possible."""
    cache.prepare()
    out, err = workdir / "stdout.txt", workdir / "stderr.txt"
    with open(out, "wb") as fo, open(err, "wb") as fe:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=fo, stderr=fe, stdin=subprocess.DEVNULL, cwd=ROOT)
        # wait4, not RUSAGE_CHILDREN: the latter is the maximum over every child so far.
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    return Measured(seconds, usage.ru_maxrss * 1024, proc.returncode,  # ru_maxrss is in KiB
                    out.read_text(errors="replace"), err.read_text(errors="replace"))


class CacheControl:
    """Drops the page cache before each command when permitted (root, a writable /proc)."""

    def __init__(self, enabled: bool) -> None:
        self.dropping = enabled and self._drop()
        if self.dropping:
            self.state = "dropped before every command (sync; echo 3 > /proc/sys/vm/drop_caches)"
        elif enabled:
            self.state = "NOT dropped (not permitted here): reads may come from the page cache"
        else:
            self.state = "NOT dropped (--no-drop-cache): reads may come from the page cache"

    @staticmethod
    def _drop() -> bool:
        os.sync()
        try:
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("3\n")
        except OSError:
            return False
        return True

    def prepare(self) -> None:
        os.sync()  # the previous step's dirty pages must not be flushed during the next one
        if self.dropping:
            self._drop()


def base_bytes(archive: Path) -> int:
    """Bytes the archive's group bases take as stored (zstd-coded: their size depends on the
    data), read from its header without importing ders (torch would count in every child's
    peak memory)."""
    with open(archive, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    manifest = json.loads(header["__metadata__"]["ders.manifest"])
    spans = [header[g["base"]["array"]]["data_offsets"] for g in manifest["groups"]]
    return sum(end - begin for begin, end in spans)


def theory_bytes(ck: Synthetic, codec: str, bases: int) -> int:
    """The bytes DeRS needs in principle: untouched tensors, shard headers and side files as
    they are; the group bases as stored (``bases``); per expert either the kept bf16 values and
    an 8-byte mask seed (sparse) or packed codes and a bf16 scale and offset per group of
    GROUP_SIZE elements (quant). What the archive has beyond is its own overhead."""
    d = ck.dims
    experts = {n for n, _ in tensor_shapes(d) if ".experts." in n}
    total = sum(math.prod(s) * BF16 for n, s in tensor_shapes(d) if n not in experts)
    for name in ck.files:
        path = ck.folder / name
        if name.endswith(".safetensors"):
            with open(path, "rb") as f:
                total += struct.unpack("<Q", f.read(8))[0]  # the header; its length is implied
        else:
            total += path.stat().st_size
    total += bases
    for _, proj in ck.expert_groups:
        n = math.prod(d.proj_shape(proj))
        if codec == "sparse":
            keep = math.floor(n * (1 - DROP) + 0.5)
            total += d.experts * (BF16 * keep + 8)
        else:
            total += d.experts * (-(-n * BITS // 8) + 2 * 2 * -(-n // GROUP_SIZE))
    return total


def ders(*args: str) -> list[str]:
    return [PY, "-m", "ders_cli", *args]


def bench_size(gb: float, work: Path, cache: CacheControl, shard_gb: float | None,
               hidden: int, keep: bool, log: Callable[[str], None],
               xz_max_gb: float = XZ_MAX_GB) -> list[Row]:
    """Generate a checkpoint of ``gb`` GB and measure every command on it."""
    label = f"{gb:g} GB"
    shard = int((shard_gb or min(2.0, gb / 2)) * 1e9)
    log(f"[{label}] generating the checkpoint ...")
    gen = measure([PY, "-m", "bench.synth", str(work / "model"), "--gb", str(gb), "--shard-gb",
                   str(shard / 1e9), "--hidden", str(hidden), "--json"], cache, work)
    if gen.rc:
        raise RuntimeError(f"bench.synth failed:\n{gen.stderr}")
    ck = Synthetic.from_json(gen.stdout)
    log(f"[{label}] {ck.bytes / 1e9:.3f} GB in {len(ck.files)} files, {ck.dims.layers} layers, "
        f"generated in {gen.seconds:.1f} s, peak RSS {gen.peak_rss / 1e6:.0f} MB")
    size = ck.bytes
    rows: list[Row] = []

    def run(command: str, cmd: list[str], inp: int, out_path: Path | None,
            compressed: int | None = None) -> tuple[Row, Measured]:
        log(f"[{label}] {command} ...")
        m = measure(cmd, cache, work)
        out = _size_of(out_path) if out_path is not None and out_path.exists() else 0
        row = Row(label, command, size, inp, out, compressed if compressed is not None else out,
                  m.seconds, m.peak_rss, ok=m.rc == 0)
        if m.rc:
            row.note = f"FAILED (exit {m.rc}): {m.stderr.strip().splitlines()[-1:]}"
            log(m.stderr)
        rows.append(row)
        return row, m

    copy_dir = work / "copy"
    run("read+write (baseline)", [PY, "-m", "bench.baselines", "copy", str(ck.folder),
                                  str(copy_dir)], size, copy_dir, compressed=size)
    shutil.rmtree(copy_dir, ignore_errors=True)

    zst, unz = work / "zst", work / "unzstd"
    zrow, _ = run(f"zstd -{ZSTD_LEVEL} (2 threads)",
                  [PY, "-m", "bench.baselines", "zstd", str(ck.folder), str(zst),
                   "--level", str(ZSTD_LEVEL), "--threads", "2"], size, zst)
    run("zstd -d", [PY, "-m", "bench.baselines", "unzstd", str(zst), str(unz)],
        zrow.output_bytes, unz, compressed=zrow.output_bytes)
    shutil.rmtree(zst, ignore_errors=True)
    shutil.rmtree(unz, ignore_errors=True)
    if gb <= xz_max_gb:
        xz, unxz = work / "xz", work / "unxz"
        xrow, _ = run(f"xz -{XZ_PRESET} (lzma, 1 thread)",
                      [PY, "-m", "bench.baselines", "xz", str(ck.folder), str(xz), "--preset",
                       str(XZ_PRESET)], size, xz)
        run("xz -d", [PY, "-m", "bench.baselines", "unxz", str(xz), str(unxz)],
            xrow.output_bytes, unxz, compressed=xrow.output_bytes)
        shutil.rmtree(xz, ignore_errors=True)
        shutil.rmtree(unxz, ignore_errors=True)

    archive = work / "model.ders"
    crow, _ = run(f"ders compress --drop {DROP:g}",
                  ders("compress", str(ck.folder), "--drop", str(DROP), "-o", str(archive),
                       "--json", "--quiet"), size, archive)
    if crow.ok:
        crow.theory_bytes = theory_bytes(ck, "sparse", base_bytes(archive))
    q2 = work / "q2.ders"
    qrow, _ = run(f"ders quantize --bits {BITS}",
                  ders("quantize", str(ck.folder), "--bits", str(BITS), "--group-size",
                       str(GROUP_SIZE), "-o", str(q2), "--json", "--quiet"), size, q2)
    if qrow.ok:
        qrow.theory_bytes = theory_bytes(ck, "quant", base_bytes(q2))
    q2.unlink(missing_ok=True)
    for r in (crow, qrow):
        if r.ok:
            r.note = (f"archive {r.output_bytes / r.theory_bytes - 1:+.3%} vs codec theory "
                      f"({r.theory_bytes / 1e9:.4f} GB)")

    def expand_and_compare(command: str, archive: Path, compressed: int, exact: bool) -> None:
        """Expand ``archive``; compare every restored file with the checkpoint's: its size, or
        (``exact``) its sha256."""
        restored = work / "restored"
        row, _ = run(command, ders("expand", str(archive), "-o", str(restored), "--quiet"),
                     compressed, restored, compressed=compressed)
        if row.ok:
            key = _sha256 if exact else (lambda p: p.stat().st_size)
            row.ok = all(key(restored / f) == key(ck.folder / f) for f in ck.files)
            same, how = ("bit-exact", " (sha256)") if exact else ("sizes match", "")
            row.note = f"{len(ck.files)} files, {same if row.ok else 'DIFFER'}{how}"
        shutil.rmtree(restored, ignore_errors=True)

    if crow.ok:
        expand_and_compare("ders expand", archive, crow.output_bytes, exact=False)
        vrow, vm = run("ders verify --against", ders("verify", str(archive), "--against",
                                                     str(ck.folder), "--json", "--quiet"),
                       crow.output_bytes + size, None, compressed=crow.output_bytes)
        if vm.stdout.strip():
            report = json.loads(vm.stdout)
            vrow.ok = vrow.ok and report["ok"]
            vrow.note = (f"{'ok' if report['ok'] else 'FAILED'}, max rel. error "
                         f"{report['max_rel_error']:.2e}")
    exact = work / "exact.ders"
    lrow, _ = run("ders compress --lossless",
                  ders("compress", str(ck.folder), "--lossless", "-o", str(exact), "--json",
                       "--quiet"), size, exact)
    if lrow.ok:
        expand_and_compare("ders expand (lossless)", exact, lrow.output_bytes, exact=True)
    exact.unlink(missing_ok=True)
    if not keep:
        archive.unlink(missing_ok=True)
        shutil.rmtree(ck.folder, ignore_errors=True)
    baseline = rows[0].seconds
    for r in rows:
        r.baseline_seconds = baseline
    return rows


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def _size_of(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        mem = next(int(line.split()[1]) * 1024 for line in
                   Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal"))
    except (OSError, StopIteration):
        mem = 0
    return {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "cpu": cpu, "cores": os.cpu_count(), "ram_gb": round(mem / 1e9, 1),
            "python": platform.python_version(), "system": platform.platform()}


def table(rows: list[Row]) -> str:
    head = ["size", "command", "input GB", "output GB", "ratio", "seconds", "GB/s",
            "baseline s", "x baseline", "peak RSS MB", "notes"]
    lines = ["| " + " | ".join(head) + " |",
             "|" + "|".join("---" if i < 2 or i == len(head) - 1 else "---:"
                            for i in range(len(head))) + "|"]
    for r in rows:
        ratio = f"{r.compressed_bytes / r.checkpoint_bytes:.3f}" if r.compressed_bytes else "-"
        lines.append("| " + " | ".join([
            r.size, r.command, f"{r.input_bytes / 1e9:.3f}",
            f"{r.output_bytes / 1e9:.3f}" if r.output_bytes else "-",
            ratio, f"{r.seconds:.1f}", f"{r.checkpoint_bytes / 1e9 / r.seconds:.3f}",
            f"{r.baseline_seconds:.1f}", f"{r.seconds / r.baseline_seconds:.1f}",
            f"{r.peak_rss / 1e6:.0f}", r.note]) + " |")
    return "\n".join(lines)


def flatness(rows: list[Row]) -> list[str]:
    """Peak RSS of each command at the smallest and the largest size."""
    sizes = list(dict.fromkeys(r.size for r in rows))
    if len(sizes) < 2:
        return []
    out = []
    for cmd in dict.fromkeys(r.command for r in rows):
        lo = next((r for r in rows if r.command == cmd and r.size == sizes[0]), None)
        hi = next((r for r in rows if r.command == cmd and r.size == sizes[-1]), None)
        if lo and hi:
            out.append(f"{cmd}: {lo.peak_rss / 1e6:.0f} -> {hi.peak_rss / 1e6:.0f} MB "
                       f"({hi.peak_rss / lo.peak_rss - 1:+.1%})")
    return [f"Peak RSS from {sizes[0]} to {sizes[-1]}: " + "; ".join(out) + "."]


def write_json(path: Path, rows: list[Row], cache: CacheControl, startup: Measured) -> None:
    path.write_text(json.dumps({"machine": machine(), "page_cache": cache.state,
                                "startup_seconds": startup.seconds,
                                "startup_peak_rss": startup.peak_rss,
                                "rows": [asdict(r) for r in rows]}, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Benchmark ders against read+write, zstd, xz.")
    ap.add_argument("--sizes", default="0.25,1", help="checkpoint sizes in GB, comma-separated")
    ap.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    ap.add_argument("--shard-gb", type=float, default=None,
                    help="shard size (default: half the checkpoint, at most 2 GB)")
    ap.add_argument("--hidden", type=int, default=1024, help="hidden size of the model")
    ap.add_argument("--no-drop-cache", action="store_true",
                    help="never drop the page cache (it is system-wide)")
    ap.add_argument("--xz-max-gb", type=float, default=XZ_MAX_GB,
                    help="run the (slow) xz baseline only at sizes up to this")
    ap.add_argument("--json", type=Path, help="also write the raw results here")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    a = ap.parse_args(argv)
    sizes = [float(s) for s in a.sizes.split(",")]
    a.workdir = a.workdir.resolve()
    a.workdir.mkdir(parents=True, exist_ok=True)
    work = a.workdir / f"run-{os.getpid()}"
    work.mkdir()
    free = shutil.disk_usage(a.workdir).free
    if free < 3.5 * max(sizes) * 1e9:
        print(f"bench: {a.workdir} has {free / 1e9:.0f} GB free; {max(sizes):g} GB needs about "
              f"{3.5 * max(sizes):.0f} GB", file=sys.stderr)
        return 2

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    cache = CacheControl(not a.no_drop_cache)
    # What every ders command loads before it works: the CLI and torch (import ders_cli alone
    # no longer imports torch).
    startup = measure([PY, "-c", "import ders_cli.cli.app, torch"], cache, work)
    rows: list[Row] = []
    try:
        for gb in sizes:
            size_dir = work / f"{gb:g}gb"
            size_dir.mkdir()
            rows += bench_size(gb, size_dir, cache, a.shard_gb, a.hidden, a.keep, log,
                               a.xz_max_gb)
            # A full run takes most of an hour: keep what is done if it is cut short. After the
            # last size this is the whole result.
            log(table(rows))
            if a.json:
                write_json(a.json, rows, cache, startup)
    finally:
        if a.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    info = machine()
    group_mb = 8 * a.hidden * (a.hidden * 7 // 2) * 2 / 1e6
    print(f"ders benchmark, {info['date']}: {info['cpu']}, {info['cores']} cores, "
          f"{info['ram_gb']} GB RAM, Python {info['python']}\n")
    print(table(rows))
    print()
    notes = [
        f"Page cache: {cache.state}.",
        "Baseline: read every file of the checkpoint and write it to a new folder, fsync "
        "(bench/baselines.py). x baseline = seconds / baseline seconds; GB/s is over the "
        "checkpoint's bytes in every row; ratio = compressed size / checkpoint size.",
        f"Times include process start: Python, ders' CLI and torch take {startup.seconds:.1f} s "
        f"and {startup.peak_rss / 1e6:.0f} MB to load, in every ders row.",
        f"Largest expert group: 8 experts x [{a.hidden * 7 // 2}, {a.hidden}] bf16 = "
        f"{group_mb:.0f} MB at every size (layers are added to reach a size, shapes fixed).",
        *flatness(rows),
        "Codec theory (compress): the bases as stored (zstd-coded) + per expert the kept bf16 "
        f"values and an 8-byte seed (drop {DROP:g}) or {BITS}-bit codes + bf16 scale and offset "
        f"per {GROUP_SIZE} elements; plus untouched tensors, shard headers and side files.",
        (f"xz: Python's lzma, preset {XZ_PRESET} (64 MiB dictionary), one thread, at sizes up "
         f"to {a.xz_max_gb:g} GB." if a.xz_max_gb > 0 else "xz: not run (--xz-max-gb 0).")
        + " Lossless: every expert bit for bit (base and residuals zstd-coded, docs/FORMAT.md); "
        "its expand row compares the sha256 of every restored file.",
    ]
    print("\n".join(f"- {n}" for n in notes))
    return 0 if all(r.ok for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
