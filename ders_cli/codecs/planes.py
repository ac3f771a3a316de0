"""Words stored as byte planes in one zstd frame: the lossless codec's residuals and encoded bases.

The bytes of a float hold different things: the top byte of a bf16 is its sign and exponent (a
few distinct values), the low byte mostly mantissa (nearly random). Interleaved, an entropy coder
sees one mixed distribution; split into planes (byte 0 of every word, then byte 1, ...), each
plane gets statistics of its own. zstd (RFC 8878) is the entropy coder: any conforming decoder
reads these frames; the settings below are only this writer's choice.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch
import zstandard

from ..lanes import usable_cores, worker_count
from ..profile import stage
from . import jit

# Unsigned words by width in bytes, and the signed types torch can view floats as.
WORD_TYPES: dict[int, type[np.unsignedinteger]] = {2: np.uint16, 4: np.uint32, 8: np.uint64}
_TORCH_INTS = {2: torch.int16, 4: torch.int32, 8: torch.int64}
_NUMPY_INTS = {2: np.int16, 4: np.int32, 8: np.int64}

# Measured on real upcycled bf16 experts (docs/FORMAT.md 5.6, `python -m bench.lossless`):
# residual and base planes are almost all literals of low entropy, and the few matches worth
# taking are long (runs in a residual's high byte). zstd's fast strategy with the smallest hash
# table (64 entries) and the longest minimum match (7) finds those and hardly any chance
# matches: Huffman-coded literals, 37.6% of the real layer's file at ~8x the speed of the
# optimal parser (btopt with the smallest tables: 37.2%), which this writer used before.
# Larger hash tables or shorter minimum matches take chance matches that cost more than the
# literals they replace (hash log 12: 38.3%; minimum match 5: 38.0%).
_PARAMS = zstandard.ZstdCompressionParameters(
    strategy=zstandard.STRATEGY_FAST, window_log=17, hash_log=6, chain_log=6, search_log=1,
    min_match=7, target_length=0, write_content_size=True, write_checksum=False)
# A new block (with its own entropy tables) starts where the caller says the statistics change,
# once at least this many bytes are pending: a table costs tens of bytes.
MIN_BLOCK = 4096


def plane_bytes(words: np.ndarray) -> np.ndarray:
    """``[width, n]`` bytes: row k holds byte k (little-endian) of every word, in order."""
    t = words.dtype.type
    out = np.empty((words.dtype.itemsize, words.shape[0]), dtype=np.uint8)
    if out.shape[0] == 2 and jit.wanted(out.shape[1]):
        _split2(words, out[0], out[1])
        return out
    for k in range(out.shape[0]):
        out[k] = words >> t(8 * k)  # shifts, not a strided transpose: several times faster
    return out


def from_planes(planes: np.ndarray) -> np.ndarray:
    """The inverse of ``plane_bytes``."""
    width = planes.shape[0]
    t = WORD_TYPES[width]
    if width == 2 and jit.wanted(planes.shape[1]):
        words = np.empty(planes.shape[1], dtype=t)
        _join2(planes[0], planes[1], words)
        return words
    words = planes[0].astype(t)
    for k in range(1, width):
        words |= planes[k].astype(t) << t(8 * k)
    return words


# 16-bit words (bf16 and f16 bases, every group of today's checkpoints) in one pass each way,
# where numpy makes four with temporaries: measured 6x faster at 2^22 words (2.2 ms, was 13.4).
@jit.kernel
def _split2(words, lo, hi):  # pragma: no cover - compiled by numba
    for i in range(words.shape[0]):
        x = words[i]
        lo[i] = np.uint8(x & np.uint16(255))
        hi[i] = np.uint8(x >> np.uint16(8))


@jit.kernel
def _join2(lo, hi, words):  # pragma: no cover - compiled by numba
    for i in range(words.shape[0]):
        words[i] = np.uint16(lo[i]) | (np.uint16(hi[i]) << np.uint16(8))


def pack(words: np.ndarray, cuts: Sequence[int] = (), level: int | None = None) -> bytes:
    """One zstd frame of the byte planes of ``words`` (1-D, unsigned), its size recorded in the
    frame header. ``cuts``: ascending element indices where the data's statistics change; the
    encoder begins a block there (and at every plane), so each part is coded on its own.
    ``level``: a plain zstd level instead of this writer's settings (``_PARAMS``)."""
    return pack_planes(plane_bytes(words), cuts, level)


def pack_planes(planes: np.ndarray, cuts: Sequence[int] = (), level: int | None = None
                ) -> bytes:
    """``pack`` of words already split into planes (``[width, n]`` uint8)."""
    with stage("zstd"):
        return _pack_planes(planes, cuts, level)


def _pack_planes(planes: np.ndarray, cuts: Sequence[int], level: int | None) -> bytes:
    n = planes.shape[1]
    bounds = [c for c in cuts if 0 < c < n] + [n]
    out = []
    compressor = (zstandard.ZstdCompressor(compression_params=_PARAMS) if level is None
                  else zstandard.ZstdCompressor(level=level, write_checksum=False))
    z = compressor.compressobj(size=planes.size)
    for plane in planes:
        start = pending = 0
        for end in bounds:
            out.append(z.compress(plane[start:end]))
            pending += end - start
            start = end
            if pending >= MIN_BLOCK or end == n:
                out.append(z.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK))
                pending = 0
    out.append(z.flush())
    return b"".join(out)


class FramePool:
    """Frames coded on threads (zstd releases the GIL) while the caller prepares the next
    member: a pool sized to the machine, at most twice as many frames in flight as threads so
    that the planes waiting for a thread stay a few members' worth. The frames are the same
    bytes whichever thread codes them."""

    def __init__(self, threads: int | None = None) -> None:
        self.threads = threads or usable_cores()
        self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="ders-zstd")
        self._room = threading.BoundedSemaphore(2 * self.threads)

    def submit(self, planes: np.ndarray, cuts: Sequence[int] = ()) -> Future:
        """A future of ``pack_planes(planes, cuts)``."""
        self._room.acquire()
        try:
            future = self._pool.submit(pack_planes, planes, cuts)
        except BaseException:
            self._room.release()
            raise
        future.add_done_callback(lambda _: self._room.release())
        return future


_FRAMES: dict[int, FramePool] = {}
_FRAMES_LOCK = threading.Lock()


def frame_pool() -> FramePool:
    """The process's pool of zstd threads for the running command's worker count (created on
    first use)."""
    threads = worker_count()
    pool = _FRAMES.get(threads)
    if pool is None:
        with _FRAMES_LOCK:
            pool = _FRAMES.get(threads)
            if pool is None:
                pool = _FRAMES[threads] = FramePool(threads)
    return pool


def unpack(frame: bytes | memoryview, n: int, width: int) -> np.ndarray:
    """The ``n`` words of ``width`` bytes whose planes ``frame`` holds: exactly one zstd frame
    of ``n * width`` bytes. Raises ValueError for anything else."""
    return from_planes(unpack_planes(frame, n, width))


def unpack_planes(frame: bytes | memoryview, n: int, width: int) -> np.ndarray:
    """``unpack``'s planes, ``[width, n]`` uint8, before they are joined into words."""
    size = n * width
    try:
        # The decoder allocates what a frame declares, or max_output_size when it declares
        # nothing: a frame of a few bytes could cost gigabytes before failing. A declared size
        # is checked first; an undeclared one is decoded in pieces and stopped past ``size``.
        declared = zstandard.frame_content_size(frame)
        if 0 <= declared != size and declared != zstandard.CONTENTSIZE_UNKNOWN:
            raise ValueError(f"zstd frame declares {declared} bytes, expected {size}")
        with stage("zstd"):
            if declared == size:
                raw = zstandard.ZstdDecompressor().decompress(frame, allow_extra_data=False)
            else:
                raw = _decode_undeclared(frame, size)
    except zstandard.ZstdError as exc:
        raise ValueError(f"not one zstd frame ({exc})") from None
    if len(raw) != size:
        raise ValueError(f"zstd frame holds {len(raw)} bytes, expected {size}")
    return np.frombuffer(raw, dtype=np.uint8).reshape(width, n)


def _frame_length(frame: memoryview) -> int:
    """The bytes one zstd frame takes, from its header and block headers (RFC 8878 3.1.1)."""
    pos = zstandard.frame_header_size(frame)
    while True:
        if pos + 3 > len(frame):
            raise ValueError("zstd frame is cut short")
        head = int.from_bytes(frame[pos : pos + 3], "little")
        kind, length = (head >> 1) & 3, head >> 3
        if kind == 3:
            raise ValueError("zstd frame has a reserved block type")
        pos += 3 + (1 if kind == 1 else length)  # an RLE block stores one byte
        if head & 1:  # the last block; a checksum may follow
            return pos + (4 if frame[4] & 0x04 else 0)


def _decode_undeclared(frame: bytes | memoryview, size: int) -> bytes:
    """A frame without a content size, read in bounded pieces and stopped one byte past
    ``size``; nothing may follow it."""
    view = memoryview(frame).cast("B")
    end = _frame_length(view)
    if end > len(view):
        raise ValueError("zstd frame is cut short")
    if end < len(view):
        raise ValueError("bytes follow the zstd frame")
    reader = zstandard.ZstdDecompressor().stream_reader(view, read_across_frames=False)
    parts, got = [], 0
    while got <= size:
        chunk = reader.read(min(1 << 24, size + 1 - got))
        if not chunk:
            break
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)


def words_of(t: torch.Tensor) -> np.ndarray:
    """The bits of a float tensor as unsigned words (flattened, on the CPU; a view if it can)."""
    width = t.element_size()
    return t.detach().cpu().reshape(-1).view(_TORCH_INTS[width]).numpy().view(WORD_TYPES[width])


def tensor_of(words: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """Words back as a flat float tensor of ``dtype`` (sharing their memory)."""
    signed = words.view(_NUMPY_INTS[words.dtype.itemsize])
    return torch.from_numpy(signed).view(dtype)
