"""``expand``: an archive back into the checkpoint folder it came from.

Every shard is rebuilt with its original header, byte for byte, and every tensor written at its
original offset: passthrough tensors and side files are checked against the checksum of the
original, synthesized experts against the checksum recorded when the archive was written.
"""

from __future__ import annotations

import os
import struct
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .archive import ArchiveReader
from .constants import INDEX_SUFFIX, SHARD_SUFFIX
from .device import resolve_device
from .errors import CorruptArchiveError
from .groups import GroupArrays, Prefetch, group_arrays
from .lanes import Lane, Workers, computing, release_memory, resolve_workers, thread_buffer
from .outputs import (
    BuildDir,
    check_free_space,
    check_merge,
    check_new_output,
    output_path,
    sweep_leftovers,
    write_at,
    writing,
)
from .profile import stage
from .progress import Reporter, Silent
from .records import Manifest
from .safetensors_io import Header, tensor_bytes


@dataclass
class ExpandResult:
    folder: Path
    files: list[str] = field(default_factory=list)
    bytes_written: int = 0

    def to_dict(self) -> dict:
        return {"folder": str(self.folder), "files": self.files,
                "bytes_written": self.bytes_written}


def default_expand_path(archive: Path) -> Path:
    """ARCHIVE's name without .ders (a sharded archive's without its index's suffix) plus
    -expanded, beside it."""
    stem = archive.name
    for suffix in (INDEX_SUFFIX, SHARD_SUFFIX, ".ders"):
        stem = stem.removesuffix(suffix)
    return archive.parent / f"{stem or archive.name}-expanded"


def expand(archive: str | Path, out: str | Path | None = None, *, overwrite: bool = False,
           device: str = "auto", reporter: Reporter | None = None,
           workers: int | None = None, revision: str | None = None,
           token: str | bool | None = None,
           cache_dir: str | Path | None = None) -> ExpandResult:
    """Write the dense checkpoint an archive holds into folder ``out``; the experts are
    synthesized on ``device``, by ``workers`` threads (default: every core this process may
    use; the files are the same whatever their number). ``archive`` may be a Hub repo id
    (``revision``, ``token``, ``cache_dir``: see ders_cli.hub); its default output is then in
    the working folder."""
    reporter = reporter or Silent()
    where = resolve_device(device)
    resolve_workers(workers)
    with ArchiveReader(archive, revision=revision, token=token, cache_dir=cache_dir) as reader:
        if out is not None:
            shown = Path(out)
        elif reader.source.repo_id is not None:  # beside the user, not in the Hub's cache
            shown = Path.cwd() / f"{reader.source.name}-expanded"
        else:
            named = reader.source.path
            shown = default_expand_path(named if named.is_dir() else reader.path)
        dest = output_path(shown)
        check_new_output(dest, overwrite, folder=True)
        m = reader.manifest
        headers = reader.shard_headers
        files = [f.path for f in m.files] + [s.file for s in m.shards]
        if overwrite:
            check_merge(dest, files)
        total = sum(h.file_size for h in headers) + sum(f.size for f in m.files)
        check_free_space(dest, total)
        for line in sweep_leftovers(dest):
            reporter.warn(line)
        reporter.start("expand", total, len(m.groups))
        result = ExpandResult(shown)
        with writing(dest), BuildDir(dest, overwrite) as build:
            for f in m.files:
                _write_side_file(reader, build, f.path, f.array, f.digest)
                result.files.append(f.path)
                reporter.advance(f.size)
            fds = []
            try:
                for s, h in zip(m.shards, headers, strict=True):
                    fds.append(_create_shard(build, s.file, h))
                    result.files.append(s.file)
                with computing(workers, m.member_elements) as pool:
                    _write_tensors(reader, m, headers, fds, reporter, where, pool)
                for fd in fds:
                    os.fsync(fd)
            finally:
                for fd in fds:
                    os.close(fd)
            build.commit()
        result.bytes_written = total
    reporter.finish()
    return result


def _write_side_file(reader: ArchiveReader, build: BuildDir, rel: str, array: str,
                     sha: str) -> None:
    fd = build.create(rel)
    try:
        reader.copy_to(array, fd, 0, sha, f"side file {rel!r}")
        os.fsync(fd)
    finally:
        os.close(fd)


def _create_shard(build: BuildDir, rel: str, h: Header) -> int:
    fd = build.create(rel)
    write_at(fd, struct.pack("<Q", len(h.raw)) + h.raw, 0)
    os.ftruncate(fd, h.file_size)
    return fd


def _copy_passthrough(reader: ArchiveReader, name: str, sha: str, fd: int, offset: int,
                      reporter: Reporter) -> None:
    reporter.advance(reader.copy_to(name, fd, offset, sha, f"tensor {name!r}"))


def _write_member(reader: ArchiveReader, label: str, w: torch.Tensor, sha: str, fd: int,
                  offset: int, reporter: Reporter) -> None:
    data = tensor_bytes(w)
    with stage("hash"):
        digest = reader.digest.hex(data)
    if digest != sha:
        raise CorruptArchiveError(
            f"synthesized {label!r} differs from the archive's record "
            "(corrupt archive, or a platform that computes differently)", reader.path)
    with stage("write"):
        write_at(fd, data, offset)
    reporter.advance(len(data))


class _Ring:
    """A few member-sized buffers reused across a group's members: a fresh allocation per
    member costs a page fault per 4 KiB (a third of expand's time on large experts). A slot is
    reused only once the writer has finished with the member it held."""

    SLOTS = 6

    def __init__(self, parts: GroupArrays) -> None:
        base, count = parts.base, len(parts.record.members)
        self._bufs = ([torch.empty(base.numel(), dtype=base.dtype)
                       for _ in range(min(self.SLOTS, count))]
                      if base.device.type == "cpu" else [])
        self._futures: list[Future | None] = [None] * len(self._bufs)
        self._next = 0

    def take(self) -> torch.Tensor | None:
        if not self._bufs:
            return None
        slot = self._next
        if self._futures[slot] is not None:
            self._futures[slot].result()
        return self._bufs[slot]

    def guard(self, future: Future) -> None:
        if self._bufs:
            self._futures[self._next] = future
            self._next = (self._next + 1) % len(self._bufs)


def _write_tensors(reader: ArchiveReader, m: Manifest, headers: list[Header], fds: list[int],
                   reporter: Reporter, device: torch.device, workers: Workers) -> None:
    """Stored arrays in archive order (the archive is read front to back): passthrough tensors
    are copied on the writer lane; a group's arrays are read on the reader thread while the
    previous group's members are synthesized, checked and written: on the workers, or with one
    worker, synthesized on this thread and checked and written on the writer lane."""
    group_of_base = {g.base["array"]: g for g in m.groups}
    order = [e.name for e in reader.data_order()]
    groups = [group_of_base[n] for n in order if n in group_of_base]
    with Prefetch(groups, lambda g: group_arrays(reader, g, device)) as ahead, \
            Lane("write") as writer:
        for name in order:
            t = m.tensors.get(name)
            if t is not None and t.group is None:
                target = headers[t.shard].tensors[name]
                writer.submit(_copy_passthrough, reader, name, t.digest, fds[t.shard],
                              target.begin, reporter)
            elif name in group_of_base:
                parts = next(ahead)
                _write_group(reader, m, headers, fds, parts, writer, workers, reporter)
                writer.submit(reporter.advance, 0, 1)
                del parts
                release_memory()


def _write_group(reader: ArchiveReader, m: Manifest, headers: list[Header], fds: list[int],
                 parts: GroupArrays, writer: Lane, workers: Workers, reporter: Reporter) -> None:
    """Synthesize, check and write every member of a group: on the workers, each written where
    it goes (a pwrite at its own offset: no order to keep); or with one worker, synthesized on
    this thread while the writer lane checks and writes the ones before."""
    g = parts.record

    def place(i: int) -> tuple[int, int]:
        """The shard file and offset member ``i`` is written at."""
        member = g.members[i]
        rec = m.tensors[member.tensor]
        entry = headers[rec.shard].tensors[member.tensor]
        return fds[rec.shard], member.byte_range(entry.begin, entry.nbytes)[0]

    if workers.parallel and parts.base.device.type == "cpu":
        def synthesize_and_write(i: int) -> None:
            buf = thread_buffer("member", parts.base.numel(), parts.base.dtype)
            _write_member(reader, g.members[i].label, parts.member(i, buf), g.recon_digest[i],
                          *place(i), reporter)

        for _ in workers.map(synthesize_and_write, range(len(g.members))):
            pass
        return
    ring = _Ring(parts)
    for i, member in enumerate(g.members):
        w = parts.member(i, ring.take())
        ring.guard(writer.submit(_write_member, reader, member.label, w, g.recon_digest[i],
                                 *place(i), reporter))
