"""Archive size and reconstruction error of every main setting on real upcycled weights.

    python -m bench.quality [REAL_SLICE_DIR]      (default: ../shared/real-slice)

Prints a markdown table: setting, base, archive bytes, share of the input, and the largest and
mean relative error ||W - W_hat|| / ||W|| and smallest cosine over all experts.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import ders_cli as ders

SETTINGS = [ders.SparseSpec(0.5), ders.SparseSpec(0.9), ders.SparseSpec(0.99),
            ders.QuantSpec(8), ders.QuantSpec(4), ders.QuantSpec(2), ders.QuantSpec(1)]


def main() -> None:
    root = Path(sys.argv[1]) if len(sys.argv) > 1 else \
        Path(__file__).resolve().parents[1].parent / "shared" / "real-slice"
    moe, dense = root / "moe-layer0.safetensors", root / "dense-layer0.safetensors"
    if not moe.is_file():
        sys.exit(f"{moe}: not found (pass the real-slice folder)")
    print("| setting | base | archive bytes | of input | max rel. error | mean rel. error "
          "| min cosine |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    with tempfile.TemporaryDirectory() as tmp:
        for spec in SETTINGS:
            for base in ("mean", "dense"):
                r = ders.compress(moe, spec, Path(tmp) / "a.ders", overwrite=True,
                                  base="mean" if base == "mean" else dense)
                v = ders.verify(r.archive, against=moe)
                errors = [e for g in v.groups for e in g.rel_error]
                print(f"| {spec.label} | {base} | {r.archive_bytes:,} | {r.ratio:.1%} "
                      f"| {max(errors):.2e} | {sum(errors) / len(errors):.2e} "
                      f"| {min(g.min_cos for g in v.groups):.6f} |")


if __name__ == "__main__":
    main()
