"""Lossless mode on real weights: ``ders compress --lossless`` against its peers on the same file,
in the same run (zstd, xz, zipnn plain and in delta mode), and what each choice in the coding of
residuals is worth (cited in docs/FORMAT.md, "Lossless").

    python -m bench.lossless [MODEL] [--runs 3]   # default: ../shared/real-slice/moe-layer0...
    python -m bench.lossless --workers 1 2        # ders' rows at 1 and at 2 workers

Everything runs in this process, timed with warm caches (the file is read once before; ders and
numba run once before they are timed, so starting Python and compiling are not counted): MB/s
is the file's bytes over the median seconds of ``--runs`` runs (xz: one run), both ways, every
method checked to restore the file's bytes; wall seconds, and CPU seconds of the whole process
(every thread), so that a shared machine still gives a fair figure of the work. zipnn ("ZipNN:
lossless compression for AI models", its Python API) runs on as many threads as ders may use;
its delta mode is ders' own question asked zipnn's way: each expert XORed with the group's mean
(stored too, by zipnn), as its authors suggest for fine-tuned models (the Python API's
``compress_delta`` is not implemented in zipnn 0.5.4). Sizes are exact.
"""

from __future__ import annotations

import argparse
import lzma
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zstandard

from ders_cli import LosslessSpec, compress, expand
from ders_cli.checkpoint import open_checkpoint
from ders_cli.codecs.lossless import exponent_order, residual
from ders_cli.codecs.planes import pack, plane_bytes, usable_cores, words_of
from ders_cli.constants import DEFAULT_UPCYCLED_COS
from ders_cli.detect import find_groups
from ders_cli.grouping import load_group

REAL_SLICE = Path(__file__).resolve().parents[2] / "shared/real-slice/moe-layer0.safetensors"


@dataclass(frozen=True)
class Seconds:
    wall: float
    cpu: float  # the process's CPU time, every thread


def timed(fn: Callable[[], object]) -> tuple[object, Seconds]:
    start, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, Seconds(time.perf_counter() - start, time.process_time() - cpu)


def median_time(fn: Callable[[], object], runs: int) -> tuple[object, Seconds]:
    """``fn``'s result and the medians of its wall and CPU seconds over ``runs`` runs."""
    results = [timed(fn) for _ in range(max(1, runs))]
    return results[-1][0], Seconds(statistics.median(t.wall for _, t in results),
                                   statistics.median(t.cpu for _, t in results))


Row = tuple[str, int, Seconds, Seconds, bool]  # name, bytes, compress, decompress, exact


def general(data: bytes, runs: int) -> list[Row]:
    """General-purpose compressors on the whole file."""
    threads = usable_cores()
    rows = []
    for name, comp, decomp, n in (
        (f"zstd -3 ({threads} threads)",
         zstandard.ZstdCompressor(level=3, threads=threads).compress,
         zstandard.ZstdDecompressor().decompress, runs),
        ("zstd -19", zstandard.ZstdCompressor(level=19).compress,
         zstandard.ZstdDecompressor().decompress, 1),
        ("xz -9 (lzma, 1 thread)", lambda d: lzma.compress(d, preset=9), lzma.decompress, 1),
    ):
        packed, c = median_time(lambda comp=comp: comp(data), n)
        back, d = median_time(lambda decomp=decomp, packed=packed: decomp(packed), n)
        rows.append((name, len(packed), c, d, back == data))
    return rows


def with_zipnn(path: Path, data: bytes, runs: int) -> list[Row]:
    """zipnn on the whole file, and in delta mode (each expert XOR the group's mean)."""
    try:
        from zipnn import ZipNN
    except ImportError:
        print("zipnn is not installed (pip install zipnn): its rows are left out",
              file=sys.stderr)
        return []
    threads = usable_cores()
    z = ZipNN(input_format="byte", bytearray_dtype="bfloat16", threads=threads)
    # zipnn 0.5.4's compress() changes the buffer it is given: every call gets a copy.
    packed, c = median_time(lambda: z.compress(bytearray(data)), runs)
    back, d = median_time(lambda: bytes(z.decompress(packed)), runs)
    rows = [(f"zipnn ({threads} threads)", len(packed), c, d, back == data)]

    groups = _groups(path)
    passthrough = len(data) - sum(b.nbytes * (1 + len(ms)) for b, ms in groups)

    def delta_compress() -> list[bytes]:
        out = []
        for base, members in groups:
            out.append(z.compress(bytearray(base.tobytes())))
            out += [z.compress(bytearray((m ^ base).tobytes())) for m in members]
        return out

    def delta_decompress(frames: list[bytes]) -> bool:
        i, same = 0, True
        for base, members in groups:
            b = np.frombuffer(bytes(z.decompress(frames[i])), dtype=base.dtype)
            i += 1
            for m in members:
                x = np.frombuffer(bytes(z.decompress(frames[i])), dtype=base.dtype) ^ b
                same = same and np.array_equal(x, m)
                i += 1
        return same

    frames, c = median_time(delta_compress, runs)
    same, d = median_time(lambda: delta_decompress(frames), runs)
    size = sum(len(f) for f in frames) + max(passthrough, 0)
    rows.append((f"zipnn delta: XOR with the mean ({threads} threads)", size, c, d, same))
    return rows


def _groups(path: Path) -> list[tuple[np.ndarray, list[np.ndarray]]]:
    """Each expert group's mean base and members, as words (what ders decomposes)."""
    ckpt = open_checkpoint(path)
    found = find_groups({n: e for n, (_, e) in ckpt.where.items()}, ckpt.config)
    out = []
    with ckpt.open() as files:
        for g in found.groups:
            loaded = load_group(files, ckpt, g, threshold=DEFAULT_UPCYCLED_COS)
            out.append((words_of(loaded.base).copy(),
                        [words_of(m).copy() for m in loaded.weights]))
    return out


def with_ders(path: Path, runs: int, workers: int | None = None) -> Row:
    """ders compress --lossless and ders expand, in this process, after one untimed run, with
    ``workers`` threads (None: every usable core, the default)."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        counter = iter(range(10**6))

        def comp() -> int:
            return compress(path, LosslessSpec(), tmp / f"a{next(counter)}.ders",
                            workers=workers).archive_bytes

        def decomp() -> bool:
            i = next(counter)
            folder = expand(tmp / "a0.ders", tmp / f"x{i}", workers=workers).folder
            return (folder / path.name).read_bytes() == path.read_bytes()

        comp()  # numba's kernels load (or compile) once per process
        size, c = median_time(comp, runs)
        decomp()
        same, d = median_time(decomp, runs)
    name = "ders compress --lossless" + ("" if workers is None else f" --workers {workers}")
    return (name, size, c, d, same)


def ablation(path: Path) -> dict[str, int]:
    """Bytes of every expert group's residuals (against the mean, as ders stores them) coded
    in simpler ways, and of its base raw and encoded."""
    z19 = zstandard.ZstdCompressor(level=19)
    sizes = dict.fromkeys([
        "residuals: XOR of the bits, words interleaved, zstd -19",
        "residuals: XOR of the bits, byte planes, zstd -19",
        "residuals: ordered difference, words interleaved, zstd -19",
        "residuals: ordered difference, byte planes, zstd -19",
        "residuals: ordered difference, byte planes by exponent (ders)",
        "base: raw", "base: byte planes, zstd (ders)"], 0)
    keys = list(sizes)
    ckpt = open_checkpoint(path)
    found = find_groups({n: e for n, (_, e) in ckpt.where.items()}, ckpt.config)
    with ckpt.open() as files:
        for g in found.groups:
            loaded = load_group(files, ckpt, g, threshold=DEFAULT_UPCYCLED_COS)
            base = words_of(loaded.base)
            order, cuts = exponent_order(base, g.dtype)
            for member in loaded.weights:
                w = words_of(member)
                xor, diff = w ^ base, residual(w, base)
                sizes[keys[0]] += len(z19.compress(xor.tobytes()))
                sizes[keys[1]] += sum(len(z19.compress(p.tobytes())) for p in plane_bytes(xor))
                sizes[keys[2]] += len(z19.compress(diff.tobytes()))
                sizes[keys[3]] += sum(len(z19.compress(p.tobytes())) for p in plane_bytes(diff))
                sizes[keys[4]] += len(pack(diff[order], cuts))
            sizes[keys[5]] += base.nbytes
            sizes[keys[6]] += len(pack(base))
    return sizes


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="ders --lossless against zstd, xz and zipnn")
    ap.add_argument("model", type=Path, nargs="?", default=REAL_SLICE,
                    help="a .safetensors file of upcycled experts")
    ap.add_argument("--runs", type=int, default=3, help="timed runs per method (median)")
    ap.add_argument("--no-ablation", action="store_true", help="skip the second table")
    ap.add_argument("--workers", type=int, nargs="+", metavar="N",
                    help="ders' rows with --workers N, for each N given (default: all cores)")
    a = ap.parse_args(argv)
    if a.workers and min(a.workers) < 1:
        ap.error("--workers: counts are positive")
    data = a.model.read_bytes()
    n = len(data)
    print(f"{a.model.name}: {n} bytes, {usable_cores()} cores\n")
    print("| method | of the file | compress MB/s | decompress MB/s | compress MB per CPU s | "
          "decompress MB per CPU s | bytes restored |")
    print("|---|---:|---:|---:|---:|---:|---|")
    rows = general(data, a.runs) + with_zipnn(a.model, data, a.runs)
    rows += [with_ders(a.model, a.runs, w) for w in (a.workers or [None])]
    for name, size, c, d, same in rows:
        print(f"| {name} | {size / n:.1%} | {n / 1e6 / c.wall:.0f} | {n / 1e6 / d.wall:.0f} | "
              f"{n / 1e6 / c.cpu:.0f} | {n / 1e6 / d.cpu:.0f} | {'yes' if same else 'NO'} |")
    if not all(r[4] for r in rows):
        print("a method did NOT restore the file", file=sys.stderr)
        return 1
    if a.no_ablation:
        return 0
    print("\n| part of the archive, coded as | bytes | of the file |")
    print("|---|---:|---:|")
    for name, size in ablation(a.model).items():
        print(f"| {name} | {size} | {size / n:.1%} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
