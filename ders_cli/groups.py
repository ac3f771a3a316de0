"""Expert groups as every command reads them: one synthesis routine, one group reader, one
prefetching iterator, and the interface compress reads a checkpoint's tensors through.

Synthesis is the format's one piece of arithmetic (docs/FORMAT.md, section 5): the writer
measures and hashes its reconstructions with ``synthesize_decoded`` and every reader (expand,
verify, the runtime, training) rebuilds members with it, so a checksum recorded at compression
time is what a reader must reproduce, bit for bit.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, NamedTuple, Protocol, TypeVar

import numpy as np
import torch

from .archive import ArchiveReader
from .codecs import Decoded, ExactDelta, SparseDelta, get_codec, jit
from .codecs.bases import load_base
from .dtypes import compute_dtype
from .errors import CorruptArchiveError
from .profile import stage
from .records import GroupRecord

# --- synthesis ---------------------------------------------------------------------------------


class Synthesized(NamedTuple):
    """A synthesized member, and for a delta defined at a few positions what synthesis computed
    there: the base's values (compute dtype) and the member's (its dtype), which the writer's
    measurements reuse."""

    member: torch.Tensor
    kept_base: torch.Tensor | None = None
    kept: torch.Tensor | None = None


def synthesize_decoded(decoded: Decoded, base: torch.Tensor, base_c: torch.Tensor | None = None,
                       out: torch.Tensor | None = None) -> Synthesized:
    """One member from its decoded delta: ``cast(base + delta)`` wherever the delta is defined,
    the base's own bits elsewhere; an exact delta's own bits. ``base`` is flat, in the group's
    dtype; ``base_c`` the same in the compute dtype when the caller has it (several members);
    ``out`` a flat buffer of the group's dtype to write into (reused buffers save a page fault
    per element), possibly on another device than the base. A float ``decoded`` is consumed."""
    if out is None:
        out = torch.empty_like(base)
    if isinstance(decoded, ExactDelta):
        return Synthesized(out.copy_(decoded.apply(base)))
    if isinstance(decoded, SparseDelta):
        pos = decoded.positions
        if (base.dtype == torch.bfloat16 and decoded.values.dtype == torch.float32
                and base.device.type == out.device.type == pos.device.type == "cpu"
                and decoded.values.device.type == "cpu" and jit.wanted(base.numel())):
            kept_base = torch.empty(pos.numel(), dtype=torch.float32)
            kept = torch.empty(pos.numel(), dtype=torch.bfloat16)
            out.copy_(base)
            _sparse_bf16(base.view(torch.int16).numpy(), pos.numpy(),
                         decoded.values.numpy(), out.view(torch.int16).numpy(),
                         kept_base.numpy(), kept.view(torch.int16).numpy())
            return Synthesized(out, kept_base, kept)
        kept_base = torch.index_select(base if base_c is None else base_c, 0, pos)
        kept_base = kept_base.to(decoded.values.dtype)
        kept = (kept_base + decoded.values).to(base.dtype)
        out.copy_(base).index_copy_(0, pos.to(out.device), kept.to(out.device))
        return Synthesized(out, kept_base, kept)
    if base_c is None:
        base_c = base.to(decoded.dtype)
    return Synthesized(out.copy_(decoded.add_(base_c)))


# A bf16 member's kept positions from its sparse delta in one pass where torch makes four
# (gather, add, cast, scatter; the copy of the base stays torch's, at memory speed): the same
# bits (tests/test_kernels.py), as the arithmetic is the same: bf16 to float32 is exact (the
# bits shifted up), the sum is one IEEE float32 addition, and the cast back rounds to nearest
# even as torch's does (a NaN, which no ders writer stores, becomes 0xFFFF, as torch's cast
# gives on x86). Measured at 2^22 elements, k = n / 10: 4.2 ms with the copy, torch 8.1.
# Floats are reinterpreted through one-element arrays: numba has no scalar bit cast.
@jit.kernel
def _sparse_bf16(base, pos, values, out, kept_base, kept):  # pragma: no cover - numba
    kb_bits = kept_base.view(np.uint32)
    total = np.empty(1, dtype=np.float32)
    total_bits = total.view(np.uint32)
    one, bias, s16 = np.uint32(1), np.uint32(0x7FFF), np.uint32(16)
    for j in range(pos.shape[0]):
        p = pos[j]
        kb_bits[j] = np.uint32(np.uint16(base[p])) << s16
        total[0] = kept_base[j] + values[j]
        if total[0] != total[0]:
            v = np.int16(-1)
        else:
            u = total_bits[0]
            v = np.int16(np.uint16((u + ((u >> s16) & one) + bias) >> s16))
        kept[j] = v
        out[p] = v


def synthesize(base: torch.Tensor, codec: str, params: dict, rows: dict[str, torch.Tensor],
               member: int, dtype: str, base_c: torch.Tensor | None = None,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """Member ``member`` of a group, flattened, in the group's dtype, from its rows of the
    codec arrays (``synthesize_decoded`` after the codec's decoding)."""
    flat = base.reshape(-1)
    impl = get_codec(codec)
    if out is not None and base_c is not None and impl.synthesize_into(rows, params, base_c,
                                                                        out):
        return out
    delta = impl.decode(rows, params, member, flat.numel(), dtype)
    return synthesize_decoded(delta, flat, base_c, out).member


# --- reading one group from an archive ---------------------------------------------------------


@dataclass
class GroupArrays:
    """What synthesizing a group's members needs, read once: checksums verified."""

    record: GroupRecord
    base: torch.Tensor  # flat, in the group's dtype
    base_c: torch.Tensor  # flat, in the compute dtype
    arrays: dict[str, torch.Tensor]
    archive: Path | None = None  # named by errors

    def rows(self, i: int) -> dict[str, torch.Tensor]:
        """Member ``i``'s rows of the codec arrays."""
        g = self.record
        return get_codec(g.codec["name"]).member_rows(self.arrays, g.codec["params"], i)

    def member(self, i: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """Member ``i``, flattened (into ``out`` when given)."""
        g = self.record
        try:
            with stage("synth"):
                return synthesize(self.base, g.codec["name"], g.codec["params"], self.rows(i),
                                  i, g.dtype, self.base_c, out)
        except ValueError as exc:  # stored bytes that do not decode (an entropy coder's)
            raise CorruptArchiveError(f"group {g.key!r}: {exc}", self.archive) from None


def group_arrays(reader: ArchiveReader, g: GroupRecord,
                 device: torch.device | None = None) -> GroupArrays:
    """Read a group's base and arrays (checksums verified; the reader checked their dtypes and
    shapes against the codec's plan when it opened the archive) and put them on ``device``."""
    device = device or torch.device("cpu")
    try:
        base = load_base(reader.array(g.base["array"]), g.base_encoding, g.dtype, g.numel)
    except ValueError as exc:
        raise CorruptArchiveError(f"group {g.key!r}: base is {exc}", reader.path) from None
    base = base.to(device)
    arrays = {k: reader.array(name).to(device) for k, name in g.codec["arrays"].items()}
    return GroupArrays(g, base, base.to(compute_dtype(g.dtype)), arrays, reader.path)


# --- reading ahead -----------------------------------------------------------------------------

T = TypeVar("T")
U = TypeVar("U")


class Prefetch(Generic[T, U]):
    """``fetch(item)`` for every item, in order, on a reader thread that runs ``depth`` items
    ahead of the consumer: the next group is read (I/O and hashing, which release the GIL)
    while the current one is computed on. At most ``depth`` fetched items wait, so memory is
    bounded by them. A context manager: leaving it early cancels what was not started."""

    def __init__(self, items: Sequence[U], fetch: Callable[[U], T], depth: int = 1) -> None:
        self._items = list(items)
        self._fetch = fetch
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="ders-read")
        self._pending: deque[Future[T]] = deque()
        self._next = 0
        for _ in range(max(1, depth)):
            self._submit()

    def _submit(self) -> None:
        if self._next < len(self._items):
            self._pending.append(self._pool.submit(self._fetch, self._items[self._next]))
            self._next += 1

    def __iter__(self) -> Iterator[T]:
        return self

    def __next__(self) -> T:
        if not self._pending:
            raise StopIteration
        future = self._pending.popleft()
        self._submit()
        return future.result()

    def close(self) -> None:
        for f in self._pending:
            f.cancel()
        self._pending.clear()
        self._pool.shutdown(wait=True)

    def __enter__(self) -> Prefetch[T, U]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- where compress reads tensors from ---------------------------------------------------------


class TensorSource(Protocol):
    """The bytes of a checkpoint's tensors, as compress reads them: the shard files on disk
    (``checkpoint.ShardFiles``), or tensors already in memory (a trained model). Offsets count
    from a tensor's first byte; the bytes are the tensor's little-endian safetensors bytes.
    Implementations are called from several threads at once."""

    def read_into(self, name: str, offset: int, out: memoryview) -> None:
        """Fill ``out`` with the bytes of tensor ``name`` from ``offset`` on."""

    def chunks(self, name: str) -> Iterable[bytes | bytearray | memoryview]:
        """All the bytes of tensor ``name``, in order, in pieces of bounded size."""

    def path_of(self, name: str) -> Path:
        """The file errors about tensor ``name`` name."""
