"""ders compress MODEL --drop P | --lossless | --max-error E | --target-size F, and ders quantize
MODEL --bits K"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.markup import escape
from rich.table import Table

from ..constants import DEFAULT_GROUP_SIZE
from ..errors import UsageError
from .console import RichReporter, human_bytes, natural_key, out, print_json, reported, shown
from .options import (
    DEFAULT_DIGEST,
    DEFAULT_METHOD,
    DEFAULT_THRESHOLD,
    AllGroupsOpt,
    BaseOpt,
    CacheDirOpt,
    DeviceOpt,
    DigestOpt,
    ForceOpt,
    GroupSizeOpt,
    JsonOpt,
    Mask,
    MaxShardSizeOpt,
    MethodOpt,
    ModelArg,
    NoSharedOpt,
    QuietOpt,
    RepoIdOpt,
    Rescale,
    RevisionOpt,
    ThresholdOpt,
    TokenOpt,
    WorkersOpt,
    examples,
    out_option,
    refuse,
)

if TYPE_CHECKING:
    from ..choose import TargetSpec
    from ..codecs import CodecSpec, SparseSpec
    from ..compress import CompressResult

# A string, not a Path: the trailing slash of -o DIR/ (a Hub-ready folder) must survive.
ArchiveOut = Annotated[str | None, out_option(
    "The archive to write (default: MODEL's name with .ders, beside MODEL, never inside a "
    "model folder: FOLDER-FILE.ders beside the folder for one .safetensors file of it; for a "
    "Hub repo id, in the working folder). DIR/ (with the slash): a Hub-ready folder to "
    "upload as it is (the archive, config.json, tokenizer, "
    "model card), which from_pretrained loads after import ders_cli.")]
# The flags of --drop's sparsification; every other mode ignores them.
SPARSE_OPTIONS = ("mask", "rescale", "bits", "group_size", "seed")

COMPRESS_EXAMPLES = examples(
    "ders compress ./moe --drop 0.9                      # the paper's DeRS sparsification",
    "ders compress ./moe --drop 0.9 --bits 4 -o moe-d90q4.ders",
    "ders compress ./moe --lossless                      # every expert bit for bit",
    "ders compress ./moe --rank 8                        # low-rank deltas",
    "ders compress ./moe --max-error 0.005               # per group the cheapest within it",
    "ders compress ./moe --drop 0.9 --calibration ./text # kept values fitted to the outputs",
    "ders compress org/moe --revision v1 --target-size 25% -o moe.ders",
    "ders compress org/moe --drop 0.9 -o moe-ders/       # a Hub-ready folder: hf upload it",
    "ders compress org/moe --drop 0.9 -o moe-ders/ --repo-id me/moe-ders  # the card loads it")
QUANTIZE_EXAMPLES = examples(
    "ders quantize ./moe --bits 2",
    "ders quantize ./moe --bits 1 --calibration ./text   # GPTQ on the deltas",
    "ders quantize ./moe --bits 4 --method rtn -o moe-q4.ders")


# Defaults repeated here so that `ders --help` needs no torch (tests hold them equal).
DEFAULT_CALIBRATION_TOKENS = 16384
DEFAULT_CALIBRATION_SEQ_LEN = 512
CALIBRATION_OPTIONS = ("calibration_tokens", "calibration_seq_len")
CalibrationOpt = Annotated[Path | None, typer.Option(
    "--calibration", metavar="PATH", show_default=False,
    help="Fit every expert's codes to what it computes: the model reads this text (a file or "
         "a folder of text files) one layer at a time, and each expert's deltas are encoded "
         "against the inputs it sees (GPTQ for --bits, least-squares kept values for --drop). "
         "Same format; slower.")]
CalibrationTokensOpt = Annotated[int, typer.Option(
    "--calibration-tokens", metavar="N",
    help="With --calibration: read at most this many tokens of the text.")]
CalibrationSeqLenOpt = Annotated[int, typer.Option(
    "--calibration-seq-len", metavar="N",
    help="With --calibration: tokens per sequence.")]


def compress_cmd(
    ctx: typer.Context,
    model: ModelArg,
    drop: Annotated[float | None, typer.Option(
        "--drop", metavar="P", show_default=False,
        help="DeRS sparsification: drop this fraction of each delta, in [0, 1).")] = None,
    lossless: Annotated[bool, typer.Option(
        "--lossless", help="Instead of --drop: store every expert bit for bit (base plus "
                           "zstd-coded residuals).")] = False,
    rank: Annotated[int | None, typer.Option(
        "--rank", metavar="R", show_default=False,
        help="Instead of --drop: each delta as its best rank-R approximation (truncated "
             "SVD), two thin factors per expert.")] = None,
    max_error: Annotated[float | None, typer.Option(
        "--max-error", metavar="E", show_default=False,
        help="Instead of --drop: the largest relative error of any expert (of its weights; "
             "with --calibration, of its outputs on the inputs it sees); per group the "
             "cheapest setting within it.")] = None,
    target_size: Annotated[str | None, typer.Option(
        "--target-size", metavar="F", show_default=False,
        help="Instead of --drop: the archive's size as a share of the checkpoint (25% or "
             "0.25); a setting is chosen per group.")] = None,
    out_path: ArchiveOut = None,
    repo_id: RepoIdOpt = None,
    mask: Annotated[Mask, typer.Option(
        "--mask", help="With --drop: random, the paper's seeded mask (nothing stored but a "
                       "seed); magnitude, the largest deltas (positions stored).")] = Mask.random,
    rescale: Annotated[Rescale | None, typer.Option(
        "--rescale", show_default=False,
        help="With --drop, the scale of the kept values: inverse (by 1/(1-p), unbiased; "
             "default for random masks), none (default for magnitude masks), norm (the delta "
             "keeps its norm).")] = None,
    bits: Annotated[int | None, typer.Option(
        "--bits", metavar="K", show_default=False,
        help="With --drop: also quantize the kept values to K bits (1, 2, 3, 4, 8).")] = None,
    group_size: Annotated[int, typer.Option(
        "--group-size", metavar="N",
        help="With --bits: kept values sharing one scale and offset.")] = DEFAULT_GROUP_SIZE,
    seed: Annotated[int, typer.Option(
        "--seed", metavar="N", help="With --drop and random masks: the masks' seed.")] = 0,
    calibration: CalibrationOpt = None,
    calibration_tokens: CalibrationTokensOpt = DEFAULT_CALIBRATION_TOKENS,
    calibration_seq_len: CalibrationSeqLenOpt = DEFAULT_CALIBRATION_SEQ_LEN,
    base: BaseOpt = "mean",
    threshold: ThresholdOpt = DEFAULT_THRESHOLD,
    no_shared: NoSharedOpt = False,
    all_groups: AllGroupsOpt = False,
    device: DeviceOpt = "auto",
    max_shard_size: MaxShardSizeOpt = "5GB",
    workers: WorkersOpt = None,
    digest: DigestOpt = DEFAULT_DIGEST,
    revision: RevisionOpt = None,
    token: TokenOpt = None,
    cache_dir: CacheDirOpt = None,
    force: ForceOpt = False,
    json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Compress a model into a .ders archive.

    One base per expert group plus a delta per expert: DeRS sparsification (--drop), every bit
    kept (--lossless), low-rank deltas (--rank), or a setting chosen per group (--max-error,
    --target-size). Give exactly one of these five."""
    with reported():
        modes = [flag for flag, on in (("--drop", drop is not None), ("--lossless", lossless),
                                       ("--rank", rank is not None),
                                       ("--max-error", max_error is not None),
                                       ("--target-size", target_size is not None)) if on]
        if len(modes) != 1:
            raise UsageError("compress needs exactly one of --drop P (DeRS sparsification), "
                             "--lossless (every expert bit for bit), --rank R (low-rank "
                             "deltas), --max-error E and --target-size F"
                             + (f" (got {', '.join(modes)})" if modes else ""))
        if drop is None:
            refuse(ctx, SPARSE_OPTIONS, "with --drop", instead=modes[0])
        else:
            if bits is None:
                refuse(ctx, ("group_size",), "with --bits")
            if mask is Mask.magnitude:
                refuse(ctx, ("seed",), "to random masks", instead="--mask magnitude")
        if calibration is None:
            refuse(ctx, CALIBRATION_OPTIONS, "with --calibration")
        elif lossless or rank is not None:
            raise UsageError(f"--calibration fits lossy codes to the outputs: {modes[0]} has "
                             "none to fit")
        spec = compress_spec(drop, lossless, rank, target_size, max_error,
                             sparse=dict(seed=seed, mask=mask.value, rescale=rescale and
                                         rescale.value, value_bits=bits, value_group=group_size))
    _run(model, spec, out_path, json, quiet, base=base, threshold=threshold,
         use_shared=not no_shared, all_groups=all_groups, device=device, overwrite=force,
         max_shard_size=max_shard_size, workers=workers, revision=revision, token=token,
         cache_dir=cache_dir, digest=digest.value, repo_id=repo_id,
         calibration=_calibration(calibration, calibration_tokens, calibration_seq_len))


def quantize_cmd(
    ctx: typer.Context,
    model: ModelArg,
    bits: Annotated[int, typer.Option(
        "--bits", metavar="K", help="Bits per delta element: 1, 2, 3, 4 or 8.")],
    out_path: ArchiveOut = None,
    repo_id: RepoIdOpt = None,
    group_size: GroupSizeOpt = DEFAULT_GROUP_SIZE,
    method: MethodOpt = DEFAULT_METHOD,
    calibration: CalibrationOpt = None,
    calibration_tokens: CalibrationTokensOpt = DEFAULT_CALIBRATION_TOKENS,
    calibration_seq_len: CalibrationSeqLenOpt = DEFAULT_CALIBRATION_SEQ_LEN,
    base: BaseOpt = "mean",
    threshold: ThresholdOpt = DEFAULT_THRESHOLD,
    no_shared: NoSharedOpt = False,
    all_groups: AllGroupsOpt = False,
    device: DeviceOpt = "auto",
    max_shard_size: MaxShardSizeOpt = "5GB",
    workers: WorkersOpt = None,
    digest: DigestOpt = DEFAULT_DIGEST,
    revision: RevisionOpt = None,
    token: TokenOpt = None,
    cache_dir: CacheDirOpt = None,
    force: ForceOpt = False,
    json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Compress a model into a .ders archive of k-bit deltas.

    One base per expert group plus each expert's delta quantized to K bits (DeRS
    quantization)."""
    from ..codecs import QuantSpec

    if calibration is None:
        with reported():
            refuse(ctx, CALIBRATION_OPTIONS, "with --calibration")
    _run(model, QuantSpec(bits, group_size, method.value), out_path, json, quiet, base=base,
         threshold=threshold, use_shared=not no_shared, all_groups=all_groups, device=device,
         overwrite=force, max_shard_size=max_shard_size, workers=workers, revision=revision,
         token=token, cache_dir=cache_dir, digest=digest.value, repo_id=repo_id,
         calibration=_calibration(calibration, calibration_tokens, calibration_seq_len))


def _calibration(text: Path | None, tokens: int, seq_len: int) -> object:
    if text is None:
        return None
    from ..calibration.statistics import CalibrationSpec

    return CalibrationSpec(text, tokens, seq_len)


def compress_spec(drop: float | None, lossless: bool, rank: int | None, target_size: str | None,
                  max_error: float | None, sparse: dict) -> CodecSpec | TargetSpec:
    """The library's setting for the one mode given (``sparse``: SparseSpec's other fields)."""
    from ..choose import TargetSpec, parse_fraction
    from ..codecs import LosslessSpec, LowRankSpec, SparseSpec

    if drop is not None:
        return SparseSpec(drop, **sparse)
    if lossless:
        return LosslessSpec()
    if rank is not None:
        return LowRankSpec(rank)
    fraction = parse_fraction(target_size) if target_size is not None else None
    return TargetSpec(max_error=max_error, target_size=fraction)


def _run(model: str, spec: CodecSpec | SparseSpec | TargetSpec, out_path: str | None,
         json: bool, quiet: bool, repo_id: str | None = None, **options: object) -> None:
    from ..compress import compress
    from .main import command_line

    start = time.perf_counter()
    with reported():
        result = compress(model, spec, out_path, reporter=RichReporter(quiet or json),
                          command=command_line(), repo_id=repo_id, **options)
    if json:
        doc = result.to_dict()
        doc["seconds"] = time.perf_counter() - start
        print_json(doc)
    else:
        show(result, time.perf_counter() - start, repo_id)


def show(r: CompressResult, seconds: float, repo_id: str | None = None) -> None:
    title = f"{escape(r.setting)}: expert groups"
    calibrated = r.calibration is not None
    if calibrated:
        title += (f", calibrated on {r.calibration['tokens']:,} tokens (output error: on each "
                  "expert's own inputs" + (", what --max-error limits)" if
                                            r.setting.startswith("max error") else ")"))
    table = Table(title=title, title_justify="left")
    columns = [("group", "left"), ("N", "right"), ("stored as", "left"), ("bytes", "right"),
               ("of original", "right"), ("rel. error (max)", "right")]
    if calibrated:
        columns.append(("output error (max)", "right"))
    for col, just in [*columns, ("cos (min)", "right")]:
        table.add_column(col, justify=just, overflow="fold")
    for g in sorted(r.groups, key=lambda g: natural_key(g.key)):
        passthrough = g.action == "passthrough"
        members = str(g.members) + (f" ({len(g.shared)} shared)" if g.shared else "")
        row = [escape(g.key), members, escape(g.setting), human_bytes(g.stored_bytes),
               f"{g.stored_bytes / g.original_bytes:.1%}",
               "-" if passthrough else f"{g.max_rel_error:.2e}"]
        if calibrated:
            row.append("-" if passthrough or g.max_output_error is None
                       else f"{g.max_output_error:.2e}")
        table.add_row(*row, "-" if passthrough else f"{g.min_cos:.6f}")
    out.print(table)
    if r.groups and all(g.action == "passthrough" for g in r.groups):
        out.print("[bold yellow]nothing was compressed:[/] no expert group looks upcycled, so "
                  "every one is stored as it is (--all-groups compresses them anyway)")
    if r.archive.is_dir():  # a Hub-ready folder
        out.print(f"wrote [bold]{shown(r.archive)}/[/] (a Hub-ready folder): archive "
                  f"{human_bytes(r.archive_bytes)}, {r.ratio:.1%} of "
                  f"{human_bytes(r.input_bytes)}, in {seconds:.1f} s")
        repo = repo_id or f"ORG/{r.archive.name}"
        out.print(f"upload it as it is: hf upload {escape(repo)} {shown(r.archive)}"
                  + ("" if repo_id else f" (--repo-id {escape(repo)} names it in the card)"))
        return
    out.print(f"wrote [bold]{shown(r.archive)}[/]: {human_bytes(r.archive_bytes)}, "
              f"{r.ratio:.1%} of {human_bytes(r.input_bytes)}, in {seconds:.1f} s")
