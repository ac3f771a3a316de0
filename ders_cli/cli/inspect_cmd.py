"""ders inspect MODEL"""

from __future__ import annotations

from rich.table import Table

from ..inspection import InspectReport, inspect_model
from .console import RichReporter, human_bytes, human_count, out, print_json, reported
from .options import DEFAULT_THRESHOLD, BaseOpt, JsonOpt, ModelArg, QuietOpt, ThresholdOpt


def inspect(model: ModelArg, base: BaseOpt = "mean", threshold: ThresholdOpt = DEFAULT_THRESHOLD,
            json: JsonOpt = False, quiet: QuietOpt = False) -> None:
    """Find the expert groups, show how alike their experts are and what ders would save."""
    with reported():
        report = inspect_model(model, base=base, threshold=threshold,
                               reporter=RichReporter(quiet or json))
    if json:
        print_json(report.to_dict())
    else:
        show(report)


def show(r: InspectReport) -> None:
    table = Table(title=f"Expert groups of {r.model}", title_justify="left")
    for col, just in (("group", "left"), ("N", "right"), ("shape", "left"), ("dtype", "left"),
                      ("cos to base (min)", "right"), ("cos between (min)", "right"),
                      ("|Δ|/|W| (max)", "right"), ("upcycled", "center")):
        table.add_column(col, justify=just)
    for g in r.groups:
        table.add_row(g.key, str(g.num_experts), "x".join(map(str, g.shape)), g.dtype,
                      f"{g.cos_to_base_min:.6f}",
                      f"{g.cos_between_min:.6f}" + ("*" if g.cos_between_sampled else ""),
                      f"{max(g.rel_delta_norm):.2%}",
                      "[green]yes[/]" if g.upcycled else "[red]no[/]")
    out.print(table)
    if any(g.cos_between_sampled for g in r.groups):
        out.print("* on a strided sample of elements (many experts)")
    if r.groups:
        out.print(f"base: {r.groups[0].base if len(r.groups) == 1 else _bases(r)}")
    for s in r.skipped:
        out.print(f"[yellow]not a group:[/] {s['key']}: {s['reason']}")
    out.print(f"parameters: {human_count(r.total_params)}; in expert groups: "
              f"{human_count(r.expert_params)} ({r.expert_share:.1%}); upcycled: "
              f"{human_count(r.upcycled_params)}")
    est = Table(title="What each setting would write", title_justify="left")
    for col in ("setting", "archive", "of original", "saved"):
        est.add_column(col, justify="left" if col == "setting" else "right")
    original = r.tensor_bytes + r.side_bytes
    est.add_row("original", human_bytes(original), "100.0%", "")
    for e in r.estimates:
        est.add_row(e.setting, human_bytes(e.archive_bytes), f"{e.ratio:.1%}",
                    human_bytes(original - e.archive_bytes))
    out.print(est)


def _bases(r: InspectReport) -> str:
    kinds = {g.base.split()[0] for g in r.groups}
    return "mean of each group" if kinds == {"mean"} else "dense checkpoint, matched per group"
