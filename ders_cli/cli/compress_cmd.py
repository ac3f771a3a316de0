"""ders compress MODEL --drop P | --lossless and ders quantize MODEL --bits K"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from ..compress import CompressResult, compress
from ..constants import DEFAULT_GROUP_SIZE
from ..decompose import CodecSpec, LosslessSpec, QuantSpec, SparseSpec
from ..errors import UsageError
from .console import RichReporter, human_bytes, natural_key, out, print_json, reported
from .options import (
    DEFAULT_THRESHOLD,
    AllGroupsOpt,
    BaseOpt,
    DeviceOpt,
    ForceOpt,
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
        "--drop", help="Fraction of each delta to drop, in [0, 1); survivors are rescaled.",
        show_default=False)] = None,
    lossless: Annotated[bool, typer.Option(
        "--lossless", help="Store every expert bit for bit instead (base plus zstd-coded "
                           "residuals); not with --drop.")] = False,
    out_path: OutOpt = None,
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
    """DeRS sparsification (--drop) or lossless storage (--lossless): one base per expert
    group plus a delta per expert, into a .ders file."""
    with reported():
        spec = compress_spec(drop, lossless, seed)
    _run(model, spec, out_path, base, threshold, no_shared, all_groups, device, force, json,
         quiet)


def compress_spec(drop: float | None, lossless: bool, seed: int) -> CodecSpec:
    """--drop P or --lossless: exactly one of them."""
    if lossless == (drop is not None):
        raise UsageError("compress needs exactly one of --drop P (DeRS sparsification) and "
                         "--lossless (every expert bit for bit)")
    return LosslessSpec() if lossless else SparseSpec(drop, seed)


def quantize_cmd(
    model: ModelArg,
    bits: Annotated[int, typer.Option("--bits", help="Bits per delta element: 1, 2, 3, 4 or 8.")],
    out_path: OutOpt = None,
    group_size: Annotated[int, typer.Option(
        "--group-size", help="Elements sharing one scale and offset.")] = DEFAULT_GROUP_SIZE,
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
    _run(model, QuantSpec(bits, group_size), out_path, base, threshold, no_shared, all_groups,
         device, force, json, quiet)


def _run(model: str, spec: CodecSpec, out_path: Path | None, base: str, threshold: float,
         no_shared: bool, all_groups: bool, device: str, force: bool, json: bool,
         quiet: bool) -> None:
    start = time.perf_counter()
    with reported():
        result = compress(model, spec, out_path, base=base, threshold=threshold,
                          use_shared=not no_shared, all_groups=all_groups, overwrite=force,
                          device=device, reporter=RichReporter(quiet or json))
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
        table.add_row(g.key, members, "as it is" if passthrough else r.setting,
                      human_bytes(g.stored_bytes), f"{g.stored_bytes / g.original_bytes:.1%}",
                      "-" if passthrough else f"{g.max_rel_error:.2e}",
                      "-" if passthrough else f"{g.min_cos:.6f}")
    out.print(table)
    out.print(f"wrote [bold]{r.archive}[/]: {human_bytes(r.archive_bytes)}, "
              f"{r.ratio:.1%} of {human_bytes(r.input_bytes)}, in {seconds:.1f} s")
