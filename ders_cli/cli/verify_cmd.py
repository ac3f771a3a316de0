"""ders verify ARCHIVE [--against MODEL]"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer
from rich.markup import escape
from rich.table import Table

from .console import RichReporter, err, human_bytes, natural_key, out, print_json, reported
from .options import (
    ArchiveArg,
    CacheDirOpt,
    DeviceOpt,
    JsonOpt,
    QuietOpt,
    RevisionOpt,
    TokenOpt,
    WorkersOpt,
    examples,
)

if TYPE_CHECKING:
    from ..verify import VerifyReport

EXAMPLES = examples("ders verify moe.ders                 # checksums and synthesis",
                    "ders verify moe.ders --against ./moe --max-error 0.01",
                    "ders verify org/moe-ders --against org/moe   # both from the Hub")


def verify_cmd(
    archive: ArchiveArg,
    against: Annotated[str | None, typer.Option(
        "--against", metavar="MODEL", show_default=False,
        help="The original model: check it is the archive's source and measure the error of "
             "every reconstructed expert.")] = None,
    max_error: Annotated[float | None, typer.Option(
        "--max-error", metavar="E", show_default=False,
        help="Fail (exit 1) when an expert's relative error exceeds E: measured with --against, "
             "else as recorded when the archive was written.")] = None,
    device: DeviceOpt = "auto",
    workers: WorkersOpt = None,
    revision: RevisionOpt = None,
    token: TokenOpt = None,
    cache_dir: CacheDirOpt = None,
    json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Check an archive and, with --against, measure its error.

    Checks every checksum and the structure, and synthesizes every expert; with --against,
    also that the archive holds that model, and each expert's error and size by layer and
    projection. Exit code 1 when a check fails."""
    from ..verify import verify

    with reported():
        report = verify(archive, against, max_error=max_error, device=device, workers=workers,
                        reporter=RichReporter(quiet or json), revision=revision, token=token,
                        cache_dir=cache_dir)
    if json:
        print_json(report.to_dict())
    else:
        show(report)
    if not report.ok:
        raise typer.Exit(1)


def show(r: VerifyReport) -> None:
    if r.groups:
        measured = all(g.measured for g in r.groups)
        against = " against " + escape(str(r.against))
        table = Table(title="Expert groups by layer and projection" + (
            against if measured else " (errors as recorded when written)"),
            title_justify="left")
        for col, just in (("layer", "right"), ("projection", "left"), ("N", "right"),
                          ("codec", "left"), ("bytes", "right"), ("of original", "right"),
                          ("rel. error (max)", "right"), ("cos (min)", "right")):
            table.add_column(col, justify=just)
        for g in sorted(r.groups, key=lambda g: natural_key(g.key)):
            # Names come from the archive: shown as they are, never read as rich markup.
            table.add_row("-" if g.layer is None else str(g.layer), escape(g.projection),
                          str(g.members), escape(g.codec), human_bytes(g.stored_bytes),
                          f"{g.stored_bytes / g.original_bytes:.1%}", f"{g.max_rel_error:.2e}",
                          f"{g.min_cos:.6f}")
        out.print(table)
        original = sum(g.original_bytes for g in r.groups)
        out.print(f"experts: {human_bytes(original)} stored in "
                  f"{human_bytes(sum(g.stored_bytes for g in r.groups))} "
                  f"({r.expert_ratio:.1%}); whole checkpoint: "
                  f"{human_bytes(r.checkpoint_bytes)} in an archive of "
                  f"{human_bytes(r.archive_bytes)} ({r.ratio:.1%})")
    for p in r.problems:
        err.print(f"[bold red]FAIL:[/] {escape(p)}", soft_wrap=True)
    if r.ok:
        exact = f", {r.passthrough_exact} passthrough tensors bit-exact" if r.against else ""
        if r.experts_exact:
            exact += f", {r.experts_exact} of {r.experts_compared} experts bit-exact"
        out.print(f"[green]OK[/]: {escape(str(r.archive))}: {r.stored_arrays} stored arrays "
                  f"intact, {r.tensors} tensors{exact}")
    else:
        out.print(f"[bold red]FAILED[/]: {escape(str(r.archive))}: {len(r.problems)} "
                  "problem(s)")
