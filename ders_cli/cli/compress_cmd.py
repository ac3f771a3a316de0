"""ders compress MODEL --drop P | --lossless and ders quantize MODEL --bits K"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from ..choose import TargetSpec, parse_fraction
from ..compress import CompressResult, compress
from ..constants import DEFAULT_GROUP_SIZE
from ..decompose import CodecSpec, LosslessSpec, QuantSpec, SparseSpec
from ..errors import UsageError
from .console import RichReporter, human_bytes, natural_key, out, print_json, reported, shown
from .options import (
    DEFAULT_THRESHOLD,
    AllGroupsOpt,
    BaseOpt,
    DeviceOpt,
    ForceOpt,
    GroupSizeOpt,
    JsonOpt,
    ModelArg,
    NoSharedOpt,
    OutOpt,
    QuietOpt,
    ThresholdOpt,
)


def compress_cmd(
    model: ModelArg,
    drop: Annotated[float | None, typer.Option(
        "--drop", help="Fraction of each delta to drop, in [0, 1).", show_default=False)] = None,
    target_size: Annotated[str | None, typer.Option(
        "--target-size", help="Instead of --drop: the archive's size as a share of the "
                              "checkpoint (25% or 0.25); a setting is chosen per group.",
        show_default=False)] = None,
    max_error: Annotated[float | None, typer.Option(
        "--max-error", help="Instead of --drop: the largest relative error of any expert; "
                            "per group the cheapest setting within it.",
        show_default=False)] = None,
    lossless: Annotated[bool, typer.Option(
        "--lossless", help="Instead of --drop: store every expert bit for bit (base plus "
                           "zstd-coded residuals).")] = False,
    out_path: OutOpt = None,
    mask: Annotated[str, typer.Option(
        "--mask", help="random: the paper's seeded mask (nothing stored but a seed); "
                       "magnitude: the largest deltas (positions stored).")] = "random",
    rescale: Annotated[str | None, typer.Option(
        "--rescale", help="Scale of the kept values: inverse (by 1/(1-p), unbiased; default "
                          "for random masks), none (default for magnitude masks), norm "
                          "(the delta keeps its norm).", show_default=False)] = None,
    bits: Annotated[int | None, typer.Option(
        "--bits", help="Also quantize the kept values to this many bits (1, 2, 3, 4, 8).",
        show_default=False)] = None,
    group_size: GroupSizeOpt = DEFAULT_GROUP_SIZE,
    base: BaseOpt = "mean",
    seed: Annotated[int, typer.Option("--seed", help="Seed of the random masks.")] = 0,
    threshold: ThresholdOpt = DEFAULT_THRESHOLD,
    no_shared: NoSharedOpt = False,
    all_groups: AllGroupsOpt = False,
    device: DeviceOpt = "auto",
    force: ForceOpt = False,
    json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """DeRS sparsification (--drop), lossless storage (--lossless), or a setting chosen per
    group (--target-size, --max-error): one base per expert group plus a delta per expert, into
    a .ders file."""
    with reported():
        spec = compress_spec(drop, lossless, target_size, max_error,
                             SparseSpec(drop or 0.0, seed, mask, rescale, bits, group_size))
    _run(model, spec, out_path, json, quiet, base=base, threshold=threshold,
         use_shared=not no_shared, all_groups=all_groups, device=device, overwrite=force)


def quantize_cmd(
    model: ModelArg,
    bits: Annotated[int, typer.Option("--bits", help="Bits per delta element: 1, 2, 3, 4 or 8.")],
    out_path: OutOpt = None,
    group_size: GroupSizeOpt = DEFAULT_GROUP_SIZE,
    method: Annotated[str, typer.Option(
        "--method", help="mse: clip search and least-squares scales (less error); rtn: "
                         "min/max round to nearest (faster).")] = "mse",
    base: BaseOpt = "mean",
    threshold: ThresholdOpt = DEFAULT_THRESHOLD,
    no_shared: NoSharedOpt = False,
    all_groups: AllGroupsOpt = False,
    device: DeviceOpt = "auto",
    force: ForceOpt = False,
    json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """DeRS quantization: one base per expert group plus k-bit deltas, into a .ders file."""
    _run(model, QuantSpec(bits, group_size, method), out_path, json, quiet, base=base,
         threshold=threshold, use_shared=not no_shared, all_groups=all_groups, device=device,
         overwrite=force)


def compress_spec(drop: float | None, lossless: bool, target_size: str | None,
                  max_error: float | None, sparse: SparseSpec) -> CodecSpec | TargetSpec:
    """Exactly one of --drop P, --lossless, --target-size F and --max-error E."""
    given = [name for name, v in (("--drop", drop), ("--lossless", lossless or None),
                                  ("--target-size", target_size), ("--max-error", max_error))
             if v is not None]
    if len(given) != 1:
        raise UsageError("compress needs exactly one of --drop P (DeRS sparsification), "
                         "--lossless (every expert bit for bit), --target-size F and "
                         "--max-error E" + (f" (got {', '.join(given)})" if given else ""))
    if drop is not None:
        return sparse
    if lossless:
        return LosslessSpec()
    fraction = parse_fraction(target_size) if target_size is not None else None
    return TargetSpec(max_error=max_error, target_size=fraction)


def _run(model: str, spec: CodecSpec | TargetSpec, out_path: Path | None, json: bool,
         quiet: bool,
         **options: object) -> None:
    start = time.perf_counter()
    with reported():
        result = compress(model, spec, out_path, reporter=RichReporter(quiet or json),
                          **options)
    if json:
        doc = result.to_dict()
        doc["seconds"] = time.perf_counter() - start
        print_json(doc)
    else:
        show(result, time.perf_counter() - start)


def show(r: CompressResult, seconds: float) -> None:
    table = Table(title=f"{r.setting}: expert groups", title_justify="left")
    for col, just in (("group", "left"), ("N", "right"), ("stored as", "left"),
                      ("bytes", "right"), ("of original", "right"), ("rel. error (max)", "right"),
                      ("cos (min)", "right")):
        table.add_column(col, justify=just, overflow="fold")
    for g in sorted(r.groups, key=lambda g: natural_key(g.key)):
        passthrough = g.action == "passthrough"
        members = str(g.members) + (f" ({len(g.shared)} shared)" if g.shared else "")
        table.add_row(g.key, members, g.setting,
                      human_bytes(g.stored_bytes), f"{g.stored_bytes / g.original_bytes:.1%}",
                      "-" if passthrough else f"{g.max_rel_error:.2e}",
                      "-" if passthrough else f"{g.min_cos:.6f}")
    out.print(table)
    out.print(f"wrote [bold]{shown(r.archive)}[/]: {human_bytes(r.archive_bytes)}, "
              f"{r.ratio:.1%} of {human_bytes(r.input_bytes)}, in {seconds:.1f} s")
