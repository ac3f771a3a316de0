"""``compress`` and ``quantize``: a checkpoint into a .ders archive, one group at a time.

Tensors are visited in file order. A passthrough tensor is copied in chunks; an expert group is
read whole (the only thing held in memory), decomposed, encoded, measured, and written before
the next is read.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from . import digests
from .archive import ArchiveWriter, index_path, parse_size
from .calibration.statistics import CalibrationSpec, Statistics, TextCalibration
from .checkpoint import Checkpoint, is_model_folder, open_checkpoint
from .choose import Policy, TargetSpec, Trial
from .codecs import CodecSpec, LosslessSpec, LowRankSpec, get_codec
from .codecs.bases import stored_base
from .constants import (
    BASE_RAW,
    DEFAULT_MAX_SHARD_SIZE,
    DEFAULT_UPCYCLED_COS,
    GROUP_ARRAY_NAME,
    SHARD_HEADER_NAME,
    SIDE_FILE_NAME,
)
from .decompose import GivenEncoding, NonFiniteMember, encode_group, measure_group
from .dense_base import DenseMatcher
from .detect import Found, find_groups, nothing_to_compress, quantized_summary
from .device import resolve_device
from .errors import InputError, UsageError
from .grouping import Fetched, LoadedGroup, fetch_group, non_finite, prepare_group
from .groups import Prefetch, TensorSource
from .hub import HubOptions, check_repo_id
from .lanes import Lane, Workers, computing, release_memory, resolve_workers
from .outputs import check_new_output, output_path, sweep_leftovers, writing
from .plan import estimate_header, estimate_table, units
from .progress import Reporter, Silent
from .provenance import base_label, settings_record, source_record, writer_record
from .publish import compress_folder, is_folder_output
from .records import (
    ExpertGroup,
    FileRecord,
    GroupRecord,
    Manifest,
    ShardRecord,
    TensorRecord,
    required_version,
)
from .safetensors_io import open_regular


@dataclass
class GroupSummary:
    key: str
    members: int
    shape: list[int]
    dtype: str
    action: str  # the codec's name, or "passthrough"
    setting: str  # what was stored: "drop 0.9", "2-bit", "as it is"
    original_bytes: int
    stored_bytes: int
    max_rel_error: float = 0.0
    max_output_error: float | None = None  # with --calibration: on the members' own inputs
    min_cos: float = 1.0
    base: str = "mean"
    reason: str = ""
    shared: list[str] = field(default_factory=list)  # shared FFNs that joined the group


@dataclass
class CompressResult:
    archive: Path  # the file a reader opens: the archive, or a sharded archive's index
    setting: str
    input_bytes: int  # the checkpoint's shard files and side files
    archive_bytes: int  # every file of the archive
    header_bytes: int
    groups: list[GroupSummary] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)  # the archive's files: index first
    calibration: dict | None = None  # what the archive was calibrated on

    @property
    def ratio(self) -> float:
        return self.archive_bytes / self.input_bytes if self.input_bytes else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["archive"] = str(self.archive)
        d["ratio"] = self.ratio
        return d


def default_archive_path(ckpt: Checkpoint, model: str | Path) -> Path:
    """Beside the model, never inside a model folder (where the next compress of the folder
    would meet it): MODEL.ders beside a folder, FOLDER-FILE.ders beside the folder of one file
    of a model folder, FILE.ders beside a lone .safetensors file."""
    if ckpt.kind == "file":
        if is_model_folder(ckpt.root, ckpt.shards[0].file):
            folder = ckpt.root.resolve()
            return folder.parent / f"{folder.name}-{ckpt.name}.ders"
        return ckpt.root / f"{ckpt.name}.ders"
    if Path(model).expanduser().exists():
        return ckpt.root.resolve().parent / f"{ckpt.name}.ders"
    return Path.cwd() / f"{ckpt.name}.ders"  # a Hub model: beside the user, not in the cache


def compress(model: str | Path, spec: CodecSpec | TargetSpec | None,
             out: str | Path | None = None, *, base: str | Path = "mean",
             threshold: float = DEFAULT_UPCYCLED_COS, use_shared: bool = True,
             all_groups: bool = False, overwrite: bool = False, device: str = "auto",
             reporter: Reporter | None = None, reserve: int | None = None,
             given: Sequence[GivenEncoding] = (),
             max_shard_size: int | str | None = DEFAULT_MAX_SHARD_SIZE,
             workers: int | None = None, revision: str | None = None,
             token: str | bool | None = None,
             cache_dir: str | Path | None = None,
             calibration: CalibrationSpec | Statistics | str | Path | None = None,
             command: Sequence[str] | None = None,
             folder: bool | None = None, digest: str = digests.DEFAULT.name,
             repo_id: str | None = None) -> CompressResult:
    """Write a .ders archive of ``model`` with ``spec``: one setting (SparseSpec, QuantSpec,
    LosslessSpec, LowRankSpec) or one chosen per group (TargetSpec: --max-error,
    --target-size).

    ``base``: "mean" or a dense checkpoint. A group is decomposed when every member has cosine
    ``threshold`` or more to its base; other groups are stored as they are, unless
    ``all_groups``. Shared FFNs of the experts' shape join their group when as similar
    (extended DeRS), unless ``use_shared`` is False. ``device``: where the arithmetic runs.

    ``given`` (with ``spec`` None): the groups, with their base and codec arrays computed
    elsewhere (a DeRS-trained model, see ``ders_cli.training``); they replace detection and are
    stored as they are, measured against the checkpoint's tensors.

    ``max_shard_size`` (bytes, or "5GB", "500MB" as transformers takes it; None: no limit): an
    archive larger than this is written as shards and an index named after ``out``
    (docs/FORMAT.md 10); the result's ``archive`` is then the index.

    ``out`` with a trailing slash (a string), or ``folder=True``: a Hub-ready folder (the archive,
    config.json with its quantization_config, the side files as plain files and a model card;
    ders_cli.publish), which ``hf upload`` takes as it is and ``from_pretrained`` loads after
    ``import ders_cli``; its archive is ``model.ders.safetensors`` (sharded: its index).
    ``repo_id`` (NAMESPACE/NAME): the repo the folder is meant for, which its card's snippets
    load (without it, a placeholder the card explains).

    ``workers``: threads that encode the members of a group in parallel (default: every core
    this process may use); the archive is the same whatever their number.

    ``model`` (and ``base``) may be Hub repo ids: ``revision`` (of ``model``), ``token`` and
    ``cache_dir`` as huggingface_hub takes them (ders_cli.hub).

    ``calibration`` (a text file or folder, a ``CalibrationSpec``, or ``Statistics`` computed
    elsewhere): every expert's codes are fitted to its outputs on the inputs it sees while the
    model reads the text, one decoder layer at a time (``ders_cli.calibration``); the format
    is unchanged and the manifest records the text (docs/FORMAT.md).

    ``command``: the command line recorded in the manifest's ``writer`` (the CLI gives its
    own; a token in it is masked). The manifest also records ders' version, the model's repo
    id and commit when it came from the Hub, and the settings (ders_cli.provenance).

    ``digest``: the hash of the archive's checksums, "blake3" (format version 4, the fastest)
    or "sha256" (what readers before version 4 read; docs/FORMAT.md 9).
    """
    _check_settings(spec, given, threshold, device, max_shard_size, workers, calibration)
    digests.by_name(digest)
    if folder is None:
        folder = out is not None and is_folder_output(out)
    elif folder and out is None:
        raise UsageError("folder=True needs out: the folder to write", param="out")
    if repo_id is not None:
        if not folder:
            raise UsageError("repo_id names the Hub repo a Hub-ready folder is uploaded to, "
                             "for its model card: write one (out with a trailing slash, "
                             "-o DIR/)", param="repo_id")
        check_repo_id(repo_id)
    hub = HubOptions(revision, token, cache_dir)
    ckpt = open_checkpoint(model, hub)
    dest = Path(out) if out is not None else default_archive_path(ckpt, model)
    write = (functools.partial(compress_folder, repo_id=repo_id) if folder
             else compress_checkpoint)
    with ckpt.open() as files:
        return write(ckpt, files, spec, dest, base=base, threshold=threshold,
                     use_shared=use_shared, all_groups=all_groups, overwrite=overwrite,
                     device=device, reporter=reporter, reserve=reserve, given=given,
                     max_shard_size=max_shard_size, named=model, workers=workers, hub=hub,
                     calibration=calibration, command=command, digest=digest)


def compress_checkpoint(ckpt: Checkpoint, source: TensorSource,
                        spec: CodecSpec | TargetSpec | None, dest: str | Path, *,
                        base: str | Path = "mean", threshold: float = DEFAULT_UPCYCLED_COS,
                        use_shared: bool = True, all_groups: bool = False,
                        overwrite: bool = False, device: str = "auto",
                        reporter: Reporter | None = None, reserve: int | None = None,
                        given: Sequence[GivenEncoding] = (),
                        max_shard_size: int | str | None = DEFAULT_MAX_SHARD_SIZE,
                        named: str | Path | None = None,
                        workers: int | None = None,
                        hub: HubOptions | None = None,
                        calibration: CalibrationSpec | Statistics | str | Path | None = None,
                        command: Sequence[str] | None = None,
                        digest: str = digests.DEFAULT.name) -> CompressResult:
    """``compress`` of a checkpoint described by ``ckpt`` (its shard headers, side files and
    where every tensor is) whose tensor bytes are read through ``source``: its shard files
    (``ckpt.open()``), or tensors held in memory. Options as ``compress``; ``named``: what
    errors about the checkpoint name (default its root); ``hub``: how to reach a ``base`` that
    is a Hub repo id; ``command``: see ``compress``."""
    where, limit = _check_settings(spec, given, threshold, device, max_shard_size, workers,
                                   calibration)
    hashing = digests.by_name(digest)
    reporter = reporter or Silent()
    if given:
        found = Found([e.group for e in given], [])
    else:
        found = find_groups({n: e for n, (_, e) in ckpt.where.items()}, ckpt.config)
        why = nothing_to_compress(found)
        if why:  # an archive would be the checkpoint again, a little larger
            raise InputError(f"nothing to compress: {why}; no archive written",
                             ckpt.root if named is None else named)
    shown = Path(dest)
    dest = output_path(shown)
    check_new_output(dest, overwrite)
    check_new_output(index_path(dest), overwrite)  # where a sharded archive's index goes
    leftovers = sweep_leftovers(dest) + sweep_leftovers(index_path(dest))
    matcher = stats = None
    if str(base) != "mean":
        matcher = DenseMatcher(open_checkpoint(base, (hub or HubOptions()).without_revision()),
                               threshold)
    try:
        if isinstance(calibration, CalibrationSpec | str | Path):
            stats = TextCalibration(ckpt, source, _calibration_spec(calibration), where)
        elif calibration is not None:
            stats = calibration
        policy = None if spec is None else Policy.for_run(ckpt, found, spec, threshold,
                                                          all_groups)
        quantized = quantized_summary(found.skipped)
        for line in quantized:
            reporter.warn(line)
        with writing(dest), ArchiveWriter(
            dest, reserve if reserve is not None else estimate_header(ckpt, found), overwrite,
            max_shard_size=limit,
            shard_reserve=reserve if reserve is not None else estimate_table(ckpt, found),
            digest=hashing,
        ) as writer, computing(workers, sum(g.elements for g in found.groups)) \
                as pool:
            asked = settings_record(spec, base=base_label(base, matcher and matcher.dense),
                                    threshold=threshold, use_shared=use_shared,
                                    all_groups=all_groups)
            job = _Job(ckpt, source, found, policy, {e.group.key: e for e in given}, matcher,
                       threshold, use_shared, reporter, where, pool,
                       (source_record(ckpt, asked), writer_record(command)), stats)
            for line in leftovers + list(ckpt.skipped):
                job.warn(line)
            size = job.run(writer)
    finally:
        if matcher is not None:
            matcher.close()
        if stats is not None:
            stats.close()
    reporter.finish()
    return CompressResult(
        archive=shown.with_name(writer.path.name),
        setting=job.label,
        input_bytes=ckpt.disk_bytes,
        archive_bytes=size,
        header_bytes=size - writer.data_bytes,
        groups=job.summaries,
        warnings=quantized + job.warnings,
        files=[str(f) for f in writer.files],
        calibration=stats.record() if stats is not None else None,
    )


def _check_settings(spec: CodecSpec | TargetSpec | None, given: Sequence[GivenEncoding],
                    threshold: float, device: str, max_shard_size: int | str | None,
                    workers: int | None,
                    calibration: CalibrationSpec | Statistics | str | Path | None = None
                    ) -> tuple[torch.device, int | None]:
    """Refuse settings that make no sense, before anything is read; the device and the shard
    limit they name."""
    if (spec is None) == (not given):
        raise UsageError("compress needs a codec setting or given encodings, not both")
    if spec is not None:
        spec.check()
    if calibration is not None:
        if given:
            raise UsageError("given encodings are stored as they are: nothing to calibrate",
                             param="calibration")
        if isinstance(spec, LosslessSpec | LowRankSpec):
            raise UsageError(f"calibration fits lossy codes to the outputs: "
                             f"{spec.label} has none to fit", param="calibration")
        if isinstance(calibration, CalibrationSpec | str | Path):
            _calibration_spec(calibration).check()
    where = resolve_device(device)
    limit = None if max_shard_size is None else parse_size(max_shard_size)
    if not 0.0 <= threshold <= 1.0:
        raise UsageError(f"threshold must be in [0, 1], got {threshold}", param="threshold")
    resolve_workers(workers)
    return where, limit


def _calibration_spec(calibration: CalibrationSpec | str | Path) -> CalibrationSpec:
    if isinstance(calibration, CalibrationSpec):
        return calibration
    return CalibrationSpec(calibration)


class _Job:
    """The state of one compress run: what it reads, decides with and has written so far.

    The main thread does the arithmetic of one group while the reader thread fetches the next
    group and the writer lane stores what is done, in archive order."""

    def __init__(self, ckpt: Checkpoint, source: TensorSource, found: Found,
                 policy: Policy | None, given: Mapping[str, GivenEncoding],
                 matcher: DenseMatcher | None, threshold: float, use_shared: bool,
                 reporter: Reporter, device: torch.device, workers: Workers,
                 provenance: tuple[dict, dict], stats: Statistics | None = None) -> None:
        self.ckpt = ckpt
        self.source = source
        self.found = found
        self.policy = policy  # None: every group is given
        self.given = given
        self.matcher = matcher
        self.threshold = threshold  # for shared FFNs joining their group
        self.use_shared = use_shared
        self.reporter = reporter
        self.device = device
        self.workers = workers
        self.provenance = provenance  # the manifest's source and writer records
        self.stats = stats  # calibration: per-member input statistics, layer by layer
        self.summaries: list[GroupSummary] = []
        self.warnings: list[str] = []
        self.tensors: dict[str, TensorRecord] = {}
        self.records: list[GroupRecord] = []
        self.passthrough: list[dict[str, str]] = [
            {"key": s.key, "reason": s.reason} for s in found.skipped]

    @property
    def label(self) -> str:
        return self.policy.spec.label if self.policy is not None else "given"

    def warn(self, message: str) -> None:
        self.warnings.append(message)
        self.reporter.warn(message)

    def run(self, w: ArchiveWriter) -> int:
        self.digest = w.digest
        ckpt = self.ckpt
        self.reporter.start(self.label, ckpt.tensor_bytes + ckpt.side_bytes,
                            len(self.found.groups))
        shards = []
        for i, s in enumerate(ckpt.shards):
            name = SHARD_HEADER_NAME.format(index=i)
            w.add(name, "U8", (len(s.header.raw),), s.header.raw)
            shards.append(ShardRecord(s.file, s.header.file_size, name))
        side = [self._side_file(w, i, rel) for i, rel in enumerate(ckpt.side_files)]
        plan = units(ckpt, self.found)
        if self.stats is not None:  # calibration reads the model layer by layer
            ordered = iter(self.stats.order([u for u in plan if isinstance(u, ExpertGroup)]))
            plan = [next(ordered) if isinstance(u, ExpertGroup) else u for u in plan]
        groups = [u for u in plan if isinstance(u, ExpertGroup)]

        def fetch(g: ExpertGroup) -> Fetched:
            # NaN and Inf are caught by the encoder's norms (see encode_group), not by a pass.
            return fetch_group(self.source, ckpt, g, self.found.shared.get(g.key, ()),
                               check_finite=False, digest=self.digest)

        with Prefetch(groups, fetch) as ahead, Lane("write") as writer, ThreadPoolExecutor(
                1, thread_name_prefix="ders-hash") as hasher:
            for unit in plan:
                if isinstance(unit, str):
                    writer.submit(self._passthrough, w, unit)
                    continue
                fetched = next(ahead)
                self._group(w, writer, hasher, fetched)
                del fetched
                release_memory()
        source, writer = self.provenance
        manifest = Manifest(
            source=source,
            shards=tuple(shards),
            files=tuple(side),
            tensors={name: self.tensors[name] for name in ckpt.where},
            groups=tuple(self.records),
            passthrough_groups=tuple(self.passthrough),
            stored=w.stored_digests,
            version=required_version(self.records, w.digest),
            extra={"writer": writer, **({"calibration": self.stats.record()}
                                        if self.stats is not None else {})},
        )
        return w.finish(manifest)

    def _side_file(self, w: ArchiveWriter, index: int, rel: str) -> FileRecord:
        path = self.ckpt.root / rel
        sha = self.digest.new()
        fd = open_regular(path)  # checked when the folder was read; a swap since is refused
        size = os.fstat(fd).st_size

        def chunks():
            # Exactly ``size`` bytes: a file that shrinks or grows while it is read is an
            # error naming it, not a short array or an archive that grows without end.
            left = size
            while left:
                chunk = os.read(fd, min(left, 1 << 24))
                if not chunk:
                    raise InputError(f"shrank while it was read ({size - left} of {size} bytes)",
                                     path)
                sha.update(chunk)
                left -= len(chunk)
                yield chunk
            if os.read(fd, 1):
                raise InputError(f"grew while it was read (past {size} bytes)", path)

        name = SIDE_FILE_NAME.format(index=index)
        try:
            w.add(name, "U8", (size,), chunks())
        finally:
            os.close(fd)
        self.reporter.advance(size)
        return FileRecord(rel, size, sha.hexdigest(), name)

    def _passthrough(self, w: ArchiveWriter, name: str) -> None:
        """Copy one tensor as it is (runs on the writer lane)."""
        shard, e = self.ckpt.where[name]
        sha = w.add(name, e.dtype, e.shape, self.source.chunks(name))
        self.tensors[name] = TensorRecord(shard, sha)
        self.reporter.advance(e.nbytes)

    def _group(self, w: ArchiveWriter, writer: Lane, hasher: ThreadPoolExecutor,
               fetched: Fetched) -> None:
        loaded = prepare_group(fetched, threshold=self.threshold, matcher=self.matcher,
                               use_shared=self.use_shared, workers=self.workers)
        g = loaded.group
        summary = GroupSummary(g.key, len(g.members), list(g.shape), g.dtype, "", "",
                               g.nbytes, 0, base=loaded.base_label,
                               shared=[c.member.label for c in loaded.shared if c.joined])
        for c in loaded.shared:
            if not c.joined:  # a shared FFN that stays apart is a plain passthrough tensor
                writer.submit(self._passthrough, w, c.member.tensor)
        # Encode first, decide after: the encoder measures every member's cosine to the base
        # on the way, and a group that is not upcycled is the rare case.
        try:
            trial = self._encode(loaded, hasher)
        except NonFiniteMember as exc:
            raise non_finite(self.source, g.members[exc.index]) from None
        setting, enc = trial.setting, trial.encoded
        summary.action, summary.setting = setting.codec, setting.label
        shas, base_rec = loaded.shas, dict(loaded.base_record)
        if isinstance(setting, GivenEncoding):  # a trained model's shared FFN: its own kind
            base_rec = {"kind": setting.base_kind}
            summary.base = setting.base_kind
        del loaded  # the group's weights: free them before the next group is read
        verdict = None if self.policy is None else self.policy.verdict(enc.cos_to_base)
        if verdict is not None:
            if verdict.stored_as_is:
                self.warn(f"{g.key}: {verdict.reason}; stored as it is (--all-groups "
                          "compresses it)")
                self.passthrough.append({"key": g.key, "reason": verdict.reason})
                for name in g.tensors:  # read again: rare, and keeps one copy path
                    writer.submit(self._passthrough, w, name)
                summary.action, summary.setting = "passthrough", "as it is"
                summary.reason = verdict.reason
                summary.stored_bytes = g.nbytes
                self.summaries.append(summary)
                self.reporter.advance(0, 1)
                return
            self.warn(f"{g.key}: {verdict.reason}; compressed anyway (--all-groups)")
        gid = len(self.records)
        base_rec["array"] = GROUP_ARRAY_NAME.format(group=gid, array="base")
        encoding = get_codec(setting.codec).base_encoding
        if encoding != BASE_RAW:  # raw bases are recorded as in version 1: no field
            base_rec["encoding"] = encoding
        arrays = {suffix: GROUP_ARRAY_NAME.format(group=gid, array=suffix)
                  for suffix in enc.arrays}
        self.records.append(GroupRecord(
            key=g.key, members=g.members, dtype=g.dtype, shape=g.shape, base=base_rec,
            codec={"name": setting.codec, "params": enc.params, "arrays": arrays},
            recon_digest=tuple(enc.recon_digest), rel_error=tuple(enc.rel_error),
            cos=tuple(enc.cos)))
        for i, m in enumerate(g.members):
            self.tensors[m.tensor] = TensorRecord(self.ckpt.where[m.tensor][0], shas[m.tensor],
                                                  gid, i if m.slice is None else None)
        stored = [(base_rec["array"], trial.base, trial.base_dtype)] + [
            (arrays[k], t, None) for k, t in enc.arrays.items()]
        writer.submit(self._store, w, stored, g.nbytes)
        summary.stored_bytes = sum(t.numel() * t.element_size() for _, t, _ in stored)
        summary.max_rel_error = max(enc.rel_error)
        measured = [e for e in enc.out_error or () if e is not None]
        summary.max_output_error = max(measured) if measured else None
        summary.min_cos = min(enc.cos)
        self.summaries.append(summary)

    def _encode(self, loaded: LoadedGroup, hasher: ThreadPoolExecutor) -> Trial:
        """The group encoded as the policy chooses, or measured as it was given."""
        g = loaded.group
        given = self.given.get(g.key)
        if given is not None:
            codec = get_codec(given.codec)
            return Trial(given, measure_group(loaded.weights, given, self.digest),
                         *stored_base(given.base, codec.base_encoding, g.dtype,
                                      codec.base_level))

        bases: dict[tuple[str, int | None], Future] = {}  # one per way of storing it
        calib = self.stats.for_group(g) if self.stats is not None else None
        # A whole-tensor member's bytes were hashed as they were read (its tensor's checksum).
        known = [loaded.shas.get(m.tensor) if m.slice is None else None for m in g.members]

        def encode(spec: CodecSpec) -> Trial:
            codec = spec.impl
            how = (codec.base_encoding, codec.base_level)
            if how not in bases:  # coded on a worker while the members are encoded
                bases[how] = self.workers.submit(stored_base, loaded.base, codec.base_encoding,
                                                 g.dtype, codec.base_level)
            enc = encode_group(loaded.weights, loaded.base, g.dtype, spec.codec,
                               spec.params(g), hasher, self.device, calib,
                               workers=self.workers, member_digests=known, digest=self.digest)
            return Trial(spec, enc, *bases[how].result())

        return self.policy.choose(g.key, encode)

    def _store(self, w: ArchiveWriter, stored: list, nbytes: int) -> None:
        """Write a group's base and codec arrays, in one shard (runs on the writer lane)."""
        with w.together(sum(t.numel() * t.element_size() for _, t, _ in stored)):
            for name, t, dtype in stored:
                w.add_tensor(name, t, dtype)
        self.reporter.advance(nbytes, 1)
