"""Archive size and reconstruction error of codec settings on real upcycled weights.

    python -m bench.quality [REAL_SLICE_DIR] [--all]      (default: ../shared/real-slice)

Prints a markdown table: setting, base, bits each expert element costs (the group's base and
arrays over its members), archive share of the input, and the largest and mean relative error
||W - W_hat|| / ||W|| and smallest cosine over all experts. ``--all`` adds the variants
(magnitude masks, rescaling, quantized survivors, rtn against mse); the default is the
main settings with both bases.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import ders_cli as ders
from ders_cli import LosslessSpec, QuantSpec, SparseSpec

MAIN = [SparseSpec(0.5), SparseSpec(0.9), SparseSpec(0.99), QuantSpec(8), QuantSpec(4),
        QuantSpec(2), QuantSpec(1), LosslessSpec()]
VARIANTS = [
    SparseSpec(0.9, rescale="none"), SparseSpec(0.9, rescale="norm"),
    SparseSpec(0.9, mask="magnitude"), SparseSpec(0.9, mask="magnitude", rescale="norm"),
    SparseSpec(0.9, mask="magnitude", rescale="inverse"),
    SparseSpec(0.99, mask="magnitude"), SparseSpec(0.5, mask="magnitude"),
    SparseSpec(0.9, value_bits=4), SparseSpec(0.9, value_bits=2),
    SparseSpec(0.9, mask="magnitude", value_bits=4),
    SparseSpec(0.5, value_bits=2), SparseSpec(0.5, mask="magnitude", value_bits=2),
    SparseSpec(0.75, mask="magnitude", value_bits=4),
    QuantSpec(4, method="rtn"), QuantSpec(3, method="rtn"), QuantSpec(3),
    QuantSpec(2, method="rtn"), QuantSpec(1, method="rtn"), QuantSpec(2, 64), QuantSpec(2, 256),
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folder", nargs="?", type=Path,
                   default=Path(__file__).resolve().parents[1].parent / "shared" / "real-slice")
    p.add_argument("--all", action="store_true", help="also the issue-5 variants (mean base)")
    a = p.parse_args()
    moe, dense = a.folder / "moe-layer0.safetensors", a.folder / "dense-layer0.safetensors"
    if not moe.is_file():
        sys.exit(f"{moe}: not found (pass the real-slice folder)")
    runs = [(s, b) for s in MAIN for b in ("mean", "dense")]
    if a.all:
        runs += [(s, "mean") for s in VARIANTS]
    print("| setting | base | bits per expert element | archive bytes | of input "
          "| max rel. error | mean rel. error | min cosine |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    with tempfile.TemporaryDirectory() as tmp:
        for spec, base in runs:
            r = ders.compress(moe, spec, Path(tmp) / "a.ders", overwrite=True,
                              base="mean" if base == "mean" else dense)
            v = ders.verify(r.archive, against=moe)
            errors = [e for g in v.groups for e in g.rel_error]
            bits = 8 * sum(g.stored_bytes for g in r.groups) / sum(
                g.original_bytes / 2 for g in r.groups)
            print(f"| {spec.label} | {base} | {bits:.3f} | {r.archive_bytes:,} | {r.ratio:.1%} "
                  f"| {max(errors):.2e} | {sum(errors) / len(errors):.2e} "
                  f"| {min(g.min_cos for g in v.groups):.6f} |", flush=True)


if __name__ == "__main__":
    main()
