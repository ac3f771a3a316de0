"""Lossless mode on real weights: ``ders compress --lossless`` against zstd and xz on the same
file, and what each choice in the coding of residuals is worth (cited in docs/FORMAT.md,
"Lossless").

    python -m bench.lossless [MODEL]    # default: ../shared/real-slice/moe-layer0.safetensors

Everything runs in this process on one core, about two minutes for the real slice (xz -9 and
zstd -19 are most of it). Sizes are exact; seconds are wall-clock, without starting Python.
"""

from __future__ import annotations

import argparse
import lzma
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import zstandard

from ders_cli import LosslessSpec, compress, expand
from ders_cli.checkpoint import open_checkpoint
from ders_cli.codecs.lossless import exponent_order, residual
from ders_cli.codecs.planes import pack, plane_bytes, words_of
from ders_cli.constants import DEFAULT_UPCYCLED_COS
from ders_cli.detect import find_groups
from ders_cli.grouping import load_group

REAL_SLICE = Path(__file__).resolve().parents[2] / "shared/real-slice/moe-layer0.safetensors"


def timed(fn: Callable[[], object]) -> tuple[object, float]:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def whole_file(data: bytes) -> list[tuple[str, int, float, float]]:
    """(name, bytes, compress s, decompress s) of general-purpose compressors on the file."""
    rows = []
    for name, comp, decomp in (
        ("zstd -3", zstandard.ZstdCompressor(level=3).compress,
         zstandard.ZstdDecompressor().decompress),
        ("zstd -19", zstandard.ZstdCompressor(level=19).compress,
         zstandard.ZstdDecompressor().decompress),
        ("xz -9 (lzma)", lambda d: lzma.compress(d, preset=9), lzma.decompress),
    ):
        packed, c = timed(lambda comp=comp: comp(data))
        back, d = timed(lambda decomp=decomp, packed=packed: decomp(packed))
        assert back == data
        rows.append((name, len(packed), c, d))
    return rows


def with_ders(path: Path) -> tuple[int, float, float, bool]:
    """(archive bytes, compress s, expand s, every byte restored)."""
    with tempfile.TemporaryDirectory() as tmp:
        result, c = timed(lambda: compress(path, LosslessSpec(), Path(tmp) / "a.ders"))
        folder, d = timed(lambda: expand(Path(tmp) / "a.ders", Path(tmp) / "x").folder)
        same = (folder / path.name).read_bytes() == path.read_bytes()
        return result.archive_bytes, c, d, same


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
    ap = argparse.ArgumentParser(description="ders --lossless against zstd and xz")
    ap.add_argument("model", type=Path, nargs="?", default=REAL_SLICE,
                    help="a .safetensors file of upcycled experts")
    a = ap.parse_args(argv)
    data = a.model.read_bytes()
    n = len(data)
    print(f"{a.model.name}: {n} bytes\n")
    print("| method | bytes | of the file | compress s | decompress s |")
    print("|---|---:|---:|---:|---:|")
    for name, size, c, d in whole_file(data):
        print(f"| {name} | {size} | {size / n:.1%} | {c:.2f} | {d:.2f} |")
    size, c, d, same = with_ders(a.model)
    print(f"| ders compress --lossless | {size} | {size / n:.1%} | {c:.2f} | {d:.2f} |")
    if not same:
        print("ders expand did NOT restore the file", file=sys.stderr)
        return 1
    print("\n| part of the archive, coded as | bytes | of the file |")
    print("|---|---:|---:|")
    for name, size in ablation(a.model).items():
        print(f"| {name} | {size} | {size / n:.1%} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
