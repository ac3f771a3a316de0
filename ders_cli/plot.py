"""``inspect --plot``: the paper's Figure 1 for any model, one heat map of expert-to-expert
cosine similarity per group, with each expert's cosine to the base beneath."""

from __future__ import annotations

import math
from pathlib import Path

from .errors import InputError, UsageError
from .inspection import InspectReport
from .verify import projection_of

MAX_PANELS = 48


def panel_title(key: str, layer: int | None) -> str:
    """'L3 w1' for 'model.layers.3.block_sparse_moe.experts.{E}.w1.weight'."""
    name = projection_of(key)
    return f"L{layer} {name}" if layer is not None else name


def plot_similarity(report: InspectReport, path: str | Path) -> Path:
    """Write the heat maps to ``path`` (any format matplotlib writes, by its suffix)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UsageError("plot needs matplotlib: pip install 'ders[plot]'", param="plot") from None
    path = Path(path)
    if not path.parent.is_dir():
        raise InputError("output folder does not exist", path.parent)
    groups = report.groups[:MAX_PANELS]
    if not groups:
        raise InputError("no expert groups to plot", report.model)
    cols = min(6, len(groups))
    rows = math.ceil(len(groups) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.4 * rows), squeeze=False)
    low = min(min(min(r) for r in g.cos_between) for g in groups)
    for ax, g in zip(axes.flat, groups, strict=False):
        im = ax.imshow(g.cos_between, vmin=low, vmax=1.0, cmap="viridis")
        ax.set_title(panel_title(g.key, g.layer), fontsize=8)
        ax.set_xticks(range(g.num_experts))
        ax.set_yticks(range(g.num_experts))
        ax.tick_params(labelsize=6)
        ax.set_xlabel(f"min cos to base {g.cos_to_base_min:.6f}", fontsize=7)
    for ax in list(axes.flat)[len(groups):]:
        ax.axis("off")
    fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.6, format="%.5f",
                 label="cosine between experts")
    more = f" (first {MAX_PANELS} of {len(report.groups)})" if len(report.groups) > MAX_PANELS \
        else ""
    fig.suptitle(f"Expert similarity in {report.model}{more}")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
