"""Synthetic upcycled MoE checkpoints of any size, written as a sharded bf16 Mixtral folder.

Every expert is W_e = bf16(D + S + O_e): a dense FFN D, a fine-tuning update S shared by the
experts of a layer and an update O_e of each expert's own, each update about 0.6% of ||D|| and
partly low rank, so that ||W_e - D|| / ||D|| is about 0.85% as in `real-slice/` (which measures
0.7% to 1.3%, with ~20% of bf16 deltas exactly zero: the cast does that here too).

The checkpoint is written streaming, one tensor at a time (large ones in chunks): each shard's
header is computed from the shapes first (bench/layout.py), then tensors are generated in data
order. Memory stays at one layer's D + S whatever the size. Randomness is cheap: every tensor
is cut from one pool of Gaussian numbers at random offsets with its own scale, so no two
tensors share bytes.

    python -m bench.synth OUT_DIR --gb 1
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from .layout import (
    INDEX_FILE,
    PROJS,
    Dims,
    Synthetic,
    config,
    dims_for,
    model_bytes,
    safetensors_header,
    shard_name,
    shard_plan,
)

CHUNK = 1 << 22  # elements generated at once: bounds the generator's memory
SIGMA = 0.02  # std of a dense weight, as in Llama/Mixtral inits
SHARED_REL = 0.006  # ||S|| / ||D||, measured on real-slice: 0.60%-0.62%
OWN_REL = (0.005, 0.0065)  # ||O_e|| / ||D||, measured: 0.52%-0.63%
LOW_RANK, LOW_RANK_ENERGY = 8, 0.15  # real updates hold 10%-16% of their energy in 8 directions


class _Values:
    """Tensor values, generated chunk by chunk from one pool of Gaussian numbers."""

    def __init__(self, d: Dims, seed: int) -> None:
        self.d = d
        self.seed = seed
        g = torch.Generator().manual_seed(seed)
        # One extra CHUNK past a prime length: any offset gives a contiguous view, and views of
        # different tensors are mutually shifted, never aligned copies.
        n = 8_388_617  # the first prime above 2^23
        pool = torch.randn(n, generator=g)
        self.pool = torch.cat([pool, pool[:CHUNK]])
        self.n = n
        self.layer = -1
        self.base: dict[str, torch.Tensor] = {}  # D + S of the current layer, float32

    def _rng(self, *key: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, *key])

    def _noise(self, rng: np.random.Generator, numel: int) -> Iterator[torch.Tensor]:
        for start in range(0, numel, CHUNK):
            yield self.pool.narrow(0, int(rng.integers(self.n)), min(CHUNK, numel - start))

    def _update(self, rng: np.random.Generator, shape: tuple[int, int], rel: float
                ) -> torch.Tensor:
        # Low rank plus noise, with norm rel * ||D||: what fine-tuning adds to a weight.
        std = rel * SIGMA
        g = torch.Generator().manual_seed(int(rng.integers(2**63)))
        low = torch.randn(shape[0], LOW_RANK, generator=g) @ torch.randn(LOW_RANK, shape[1],
                                                                         generator=g)
        low *= std * math.sqrt(LOW_RANK_ENERGY / LOW_RANK)
        noise = torch.cat(list(self._noise(rng, math.prod(shape))))
        return low.view(-1).add_(noise, alpha=std * math.sqrt(1 - LOW_RANK_ENERGY))

    def _load_layer(self, layer: int) -> None:
        self.base = {}
        for k, proj in enumerate(PROJS):
            shape = self.d.proj_shape(proj)
            rng = self._rng(1, layer, k)
            dense = torch.cat(list(self._noise(rng, math.prod(shape)))) * SIGMA
            self.base[proj] = dense.add_(self._update(rng, shape, SHARED_REL))
        self.layer = layer

    def chunks(self, name: str, shape: tuple[int, ...]) -> Iterator[torch.Tensor]:
        """The bf16 values of tensor ``name``, flattened, in chunks."""
        parts = name.split(".")
        rng = self._rng(2, *name.encode())
        if "experts" in parts:
            layer, proj = int(parts[2]), parts[6]  # model.layers.L.block_sparse_moe.experts.E.P
            if layer != self.layer:
                self._load_layer(layer)
            own = self._update(rng, shape, float(rng.uniform(*OWN_REL)))
            yield own.add_(self.base[proj]).to(torch.bfloat16)
            return
        if name.endswith("norm.weight"):  # RMSNorm gains: near 1 after training
            yield (1 + 0.05 * self.pool.narrow(0, int(rng.integers(self.n)), shape[0])).bfloat16()
            return
        std = SIGMA * float(rng.uniform(0.8, 1.25))  # a scale of its own: no shared bytes
        for noise in self._noise(rng, math.prod(shape)):
            yield (noise * std).bfloat16()


def write_checkpoint(folder: str | Path, target_bytes: int, *, shard_bytes: int = 2 * 10**9,
                     hidden: int = 1024, experts: int = 8, seed: int = 0) -> Synthetic:
    """Write a synthetic upcycled Mixtral checkpoint of about ``target_bytes`` into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    d = dims_for(target_bytes, hidden, experts)
    shards = shard_plan(d, shard_bytes)
    values = _Values(d, seed)
    names, weight_map = [], {}
    for i, tensors in enumerate(shards):
        names.append(shard_name(i, len(shards)))
        with open(folder / names[-1], "wb") as f:
            f.write(safetensors_header(tensors))
            for name, shape in tensors:
                weight_map[name] = names[-1]
                for chunk in values.chunks(name, shape):
                    f.write(memoryview(chunk.view(torch.uint8).numpy()))
    index = {"metadata": {"total_size": model_bytes(d)}, "weight_map": dict(sorted(
        weight_map.items()))}
    (folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    (folder / "config.json").write_text(json.dumps(config(d), indent=2) + "\n")
    files = [*names, INDEX_FILE, "config.json"]
    return Synthetic(folder, d, files, sum((folder / f).stat().st_size for f in files))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--gb", type=float, default=1.0, help="target size in GB (10^9 bytes)")
    ap.add_argument("--shard-gb", type=float, default=2.0)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true", help="print what was written as JSON")
    a = ap.parse_args()
    s = write_checkpoint(a.out, int(a.gb * 1e9), shard_bytes=int(a.shard_gb * 1e9),
                         hidden=a.hidden, seed=a.seed)
    print(s.to_json() if a.json else
          f"{s.folder}: {s.bytes / 1e9:.3f} GB in {len(s.files)} files, {s.dims}")


if __name__ == "__main__":
    main()
