"""What ders is compared with, each run as its own process so its time and memory are its own:

- ``copy``: read every file of a folder and write it to a new folder, then fsync; the least
  any tool that reads a checkpoint and writes as many bytes can do (like ``cp``, but through
  user space, as ders must).
- ``zstd``: a general-purpose compressor at a fast level on both cores (``zstandard``).
- ``unzstd``: its decompression, the counterpart of ``ders expand``.
- ``xz``: the strongest general-purpose compressor at hand (Python's ``lzma``, preset 9: a
  64 MiB dictionary, which reaches from one expert to the next). One thread only (the module
  has no others) and slow, ~1 MB/s: ``bench.run`` runs it at small sizes.
- ``unxz``: its decompression.

    python -m bench.baselines copy|zstd|unzstd|xz|unxz SRC DST [--level 3] [--threads 2]
        [--preset 9]
"""

from __future__ import annotations

import argparse
import lzma
import os
from pathlib import Path

BUFFER = 8 << 20  # 8 MiB: large enough that the loop's per-call cost is negligible


def _files(src: Path) -> list[Path]:
    return sorted(p for p in src.iterdir() if p.is_file())


def copy_folder(src: Path, dst: Path) -> int:
    """Copy every file of ``src`` into ``dst`` through a user-space buffer; bytes copied."""
    dst.mkdir(parents=True)
    buf = bytearray(BUFFER)
    view = memoryview(buf)
    total = 0
    for path in _files(src):
        with open(path, "rb", buffering=0) as fin, open(dst / path.name, "wb", buffering=0) as fout:
            while n := fin.readinto(buf):
                fout.write(view[:n])
                total += n
            os.fsync(fout.fileno())
    return total


def zstd_folder(src: Path, dst: Path, level: int = 3, threads: int = 2) -> int:
    """Compress every file of ``src`` to ``dst/NAME.zst``; bytes written."""
    import zstandard

    dst.mkdir(parents=True)
    cctx = zstandard.ZstdCompressor(level=level, threads=threads)
    for path in _files(src):
        with open(path, "rb") as fin, open(dst / (path.name + ".zst"), "wb") as fout:
            cctx.copy_stream(fin, fout, size=path.stat().st_size, read_size=BUFFER,
                             write_size=BUFFER)
            os.fsync(fout.fileno())
    return sum(p.stat().st_size for p in _files(dst))


def unzstd_folder(src: Path, dst: Path) -> int:
    """Decompress every ``NAME.zst`` of ``src`` to ``dst/NAME``; bytes written."""
    import zstandard

    dst.mkdir(parents=True)
    dctx = zstandard.ZstdDecompressor()
    total = 0
    for path in _files(src):
        with open(path, "rb") as fin, open(dst / path.name.removesuffix(".zst"), "wb") as fout:
            _, written = dctx.copy_stream(fin, fout, read_size=BUFFER, write_size=BUFFER)
            os.fsync(fout.fileno())
            total += written
    return total


def xz_folder(src: Path, dst: Path, preset: int = 9) -> int:
    """Compress every file of ``src`` to ``dst/NAME.xz`` with lzma at ``preset``; bytes
    written."""
    dst.mkdir(parents=True)
    for path in _files(src):
        cctx = lzma.LZMACompressor(preset=preset)
        with open(path, "rb") as fin, open(dst / (path.name + ".xz"), "wb") as fout:
            while chunk := fin.read(BUFFER):
                fout.write(cctx.compress(chunk))
            fout.write(cctx.flush())
            os.fsync(fout.fileno())
    return sum(p.stat().st_size for p in _files(dst))


def unxz_folder(src: Path, dst: Path) -> int:
    """Decompress every ``NAME.xz`` of ``src`` to ``dst/NAME``; bytes written."""
    dst.mkdir(parents=True)
    total = 0
    for path in _files(src):
        dctx = lzma.LZMADecompressor()
        with open(path, "rb") as fin, open(dst / path.name.removesuffix(".xz"), "wb") as fout:
            while chunk := fin.read(BUFFER):
                data = dctx.decompress(chunk)
                fout.write(data)
                total += len(data)
            os.fsync(fout.fileno())
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description="one baseline, timed by bench.run")
    ap.add_argument("kind", choices=("copy", "zstd", "unzstd", "xz", "unxz"))
    ap.add_argument("src", type=Path)
    ap.add_argument("dst", type=Path)
    ap.add_argument("--level", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--preset", type=int, default=9)
    a = ap.parse_args()
    if a.kind == "copy":
        n = copy_folder(a.src, a.dst)
    elif a.kind == "zstd":
        n = zstd_folder(a.src, a.dst, a.level, a.threads)
    elif a.kind == "unzstd":
        n = unzstd_folder(a.src, a.dst)
    elif a.kind == "xz":
        n = xz_folder(a.src, a.dst, a.preset)
    else:
        n = unxz_folder(a.src, a.dst)
    print(n)


if __name__ == "__main__":
    main()
