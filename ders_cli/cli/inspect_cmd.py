"""ders inspect MODEL"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.markup import escape
from rich.table import Table

from .console import (
    RichReporter,
    human_bytes,
    human_count,
    natural_key,
    out,
    print_json,
    reported,
)
from .options import (
    DEFAULT_THRESHOLD,
    BaseOpt,
    CacheDirOpt,
    JsonOpt,
    ModelArg,
    NoSharedOpt,
    QuietOpt,
    RevisionOpt,
    ThresholdOpt,
    TokenOpt,
    examples,
)

if TYPE_CHECKING:
    from ..inspection import InspectReport

EXAMPLES = examples(
    "ders inspect org/upcycled-moe",
    "ders inspect ./moe --base ./dense --plot cosines.png   # against the dense init",
    "ders inspect ./moe --json > report.json")


def inspect_cmd(
    model: ModelArg,
    base: BaseOpt = "mean",
    threshold: ThresholdOpt = DEFAULT_THRESHOLD,
    no_shared: NoSharedOpt = False,
    plot: Annotated[Path | None, typer.Option(
        "--plot", metavar="PNG", show_default=False,
        help="Also draw the expert-similarity heat maps to this image (pip install "
             "'ders[plot]').")] = None,
    revision: RevisionOpt = None,
    token: TokenOpt = None,
    cache_dir: CacheDirOpt = None,
    json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Find the expert groups and what each setting would save.

    Shows each group's experts and how alike they are (cosines to the base and between
    experts), whether it looks upcycled, and the archive each main setting would write."""
    from ..inspection import inspect_model

    with reported():
        report = inspect_model(model, base=base, threshold=threshold, use_shared=not no_shared,
                               reporter=RichReporter(quiet or json), revision=revision,
                               token=token, cache_dir=cache_dir)
        if plot is not None:
            from ..plot import plot_similarity

            plot_similarity(report, plot)
    if json:
        print_json(report.to_dict())
    else:
        show(report)
        if plot is not None:
            out.print(f"heat maps: {plot}")


def show(r: InspectReport) -> None:
    if r.groups:
        _groups(r)
    for s in r.skipped:
        if "quantized" not in s:
            out.print(f"[yellow]not a group:[/] {escape(s['key'])}: {escape(s['reason'])}")
    for line in r.quantized:
        out.print(f"[yellow]{escape(line)}[/]")
    out.print(f"parameters: {human_count(r.total_params)}; in expert groups: "
              f"{human_count(r.expert_params)} ({r.expert_share:.1%}); upcycled: "
              f"{human_count(r.upcycled_params)}")
    if r.nothing_to_compress:
        out.print(f"[bold yellow]nothing ders can compress:[/] {escape(r.nothing_to_compress)}")
        return
    est = Table(title="What each setting would write", title_justify="left")
    for col in ("setting", "archive", "of original", "saved"):
        est.add_column(col, justify="left" if col == "setting" else "right")
    original = r.checkpoint_bytes
    est.add_row("original", human_bytes(original), "100.0%", "")
    for e in r.estimates:
        est.add_row(e.setting, human_bytes(e.archive_bytes), f"{e.ratio:.1%}",
                    human_bytes(original - e.archive_bytes))
    out.print(est)
    out.print("[dim]at most: bases are counted raw here; zstd-coded they take about a third "
              "less[/]")


def _groups(r: InspectReport) -> None:
    # names come from the model: escaped, so that rich prints them as they are
    table = Table(title=f"Expert groups of {escape(r.model)}", title_justify="left")
    for col, just in (("group", "left"), ("N", "right"), ("shape", "left"), ("dtype", "left"),
                      ("cos to base (min)", "right"), ("cos between (min)", "right"),
                      ("|Δ|/|W| (max)", "right"), ("upcycled", "center")):
        table.add_column(col, justify=just, overflow="fold")
    for g in sorted(r.groups, key=lambda g: natural_key(g.key)):
        joined = sum(s["joins"] for s in g.shared)
        table.add_row(escape(g.key), f"{g.num_experts - joined}+{joined}" if joined else
                      str(g.num_experts), "x".join(map(str, g.shape)), escape(g.dtype),
                      f"{g.cos_to_base_min:.6f}",
                      f"{g.cos_between_min:.6f}" + ("*" if g.cos_between_sampled else ""),
                      f"{max(g.rel_delta_norm):.2%}",
                      "[green]yes[/]" if g.upcycled else "[red]no[/]")
    out.print(table)
    if any(g.cos_between_sampled for g in r.groups):
        out.print("* on a strided sample of elements (many experts)")
    for g in r.groups:
        for s in g.shared:
            verdict = "joins its group (extended DeRS)" if s["joins"] else "stays apart"
            out.print(f"shared FFN {escape(s['tensor'])}: cosine {s['cos']:.6f} to the experts, "
                      f"{verdict}")
    bases = {g.base.split()[0] for g in r.groups}
    if bases:
        out.print("base: " + ("mean of each group" if bases == {"mean"} else
                              "dense checkpoint, matched per group"))
