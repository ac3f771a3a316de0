"""What an archive will hold, before any weight is read: the order tensors and groups are
visited in, the room its header needs, and its size for a given setting (exact but for the
bases, which are zstd-coded and counted raw here: the archive is smaller by what that saves)."""

from __future__ import annotations

from .checkpoint import Checkpoint
from .codecs import CodecSpec, get_codec
from .detect import Found
from .records import ExpertGroup
from .safetensors_io import tensor_nbytes


def owned_tensors(found: Found) -> set[str]:
    """Tensors a group unit handles: its members' and its shared-FFN candidates'."""
    owned = {t for g in found.groups for t in g.tensors}
    owned |= {m.tensor for cands in found.shared.values() for m in cands}
    return owned


def units(ckpt: Checkpoint, found: Found) -> list[ExpertGroup | str]:
    """Passthrough tensor names and groups, in the order their first bytes sit on disk."""
    owned = owned_tensors(found)

    def pos(name: str) -> tuple[int, int]:
        shard, e = ckpt.where[name]
        return shard, e.begin

    out: list[tuple[tuple[int, int], ExpertGroup | str]] = [
        (pos(n), n) for n in ckpt.where if n not in owned]
    out += [(min(pos(t) for t in g.tensors), g) for g in found.groups]
    out.sort(key=lambda u: u[0])
    return [u for _, u in out]


def group_bytes(g: ExpertGroup, spec: CodecSpec) -> int:
    """Bytes a compressed group stores: its base and its codec arrays."""
    arrays = get_codec(spec.codec).arrays(spec.params(g), len(g.members), g.numel, g.dtype)
    return tensor_nbytes(g.dtype, g.shape) + sum(
        tensor_nbytes(dtype, shape) for dtype, shape in arrays.values())


def planned_size(ckpt: Checkpoint, found: Found, final: dict[str, ExpertGroup | None],
                 spec: CodecSpec) -> int:
    """The size of the archive ``compress`` writes, bases counted raw (unless the header
    outgrows its estimate, which makes it larger). ``final`` maps each group's key to the group
    as it will be compressed (shared FFNs joined), or None when it will be stored as it is."""
    reserve = estimate_header(ckpt, found)
    size = 8 + reserve + (-reserve % 8)
    size += sum(len(s.header.raw) for s in ckpt.shards) + ckpt.side_bytes
    compressed = {t for g in final.values() if g is not None for t in g.tensors}
    size += sum(e.nbytes for n, (_, e) in ckpt.where.items() if n not in compressed)
    size += sum(group_bytes(g, spec) for g in final.values() if g is not None)
    return size


def estimate_header(ckpt: Checkpoint, found: Found) -> int:
    """Room to reserve for the header: a slight over-estimate of the manifest and array table.

    Measured costs per item (JSON with escapes): a tensor record is its name plus ~110 bytes; a
    passthrough array adds its name twice plus ~150 (stored hash, table entry); a group member
    its name plus ~120 (member entry, reconstruction hash, statistics, seed); a group ~1100 plus
    twice its key (base and codec arrays, parameters). A group that turns out not upcycled is
    stored as passthrough tensors instead: each group counts as the larger of the two.
    """
    grouped = {t for g in found.groups for t in g.tensors}
    size = 2048 + sum(len(n) + 110 for n in ckpt.where)
    size += sum(2 * len(n) + 150 for n in ckpt.where if n not in grouped)
    for g in found.groups:
        members = g.members + found.shared.get(g.key, ())
        compressed = sum(len(m.label) + 120 for m in members) + 2 * len(g.key) + 1100
        raw = sum(2 * len(t) + 150 for t in g.tensors)
        size += max(compressed, raw)
    size += sum(len(p) + 380 for p in ckpt.side_files) + sum(len(s.file) + 330 for s in ckpt.shards)
    return size * 27 // 25


def estimate_table(ckpt: Checkpoint, found: Found) -> int:
    """Room to reserve for a shard's header (docs/FORMAT.md 10): the array table of the whole
    archive, an upper bound of any shard's. A table entry is its name plus ~70 bytes; a group
    stores at most five arrays (base, codec arrays), or its tensors when stored as they are."""
    size = 512 + sum(len(n) + 90 for n in ckpt.where)
    size += len(found.groups) * 5 * 100
    size += 100 * (len(ckpt.side_files) + len(ckpt.shards))
    return size * 27 // 25
