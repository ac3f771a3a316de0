"""``--base DENSE``: the dense checkpoint's FFN weight each expert group was upcycled from,
matched by layer, shape and similarity."""

from __future__ import annotations

import torch

from .checkpoint import Checkpoint, ShardFiles
from .constants import FLOAT_DTYPES
from .detect import layer_of
from .errors import InputError
from .records import ExpertGroup
from .safetensors_io import TORCH_DTYPES
from .stats import cosines_to


class DenseMatcher:
    """Finds, for a group, the dense tensor of the same layer and shape most like its mean."""

    def __init__(self, dense: Checkpoint, threshold: float) -> None:
        self.dense = dense
        self.threshold = threshold
        self._files = ShardFiles(dense)
        self._by_shape: dict[tuple[int, ...], list[str]] = {}
        for name, (_, e) in dense.where.items():
            if e.dtype in FLOAT_DTYPES and len(e.shape) >= 2:
                self._by_shape.setdefault(e.shape, []).append(name)

    def close(self) -> None:
        self._files.close()

    def match(self, group: ExpertGroup, mean: torch.Tensor) -> tuple[str, torch.Tensor, float]:
        """(dense tensor name, its weights in the group's dtype, cosine to the group's mean)."""
        layer = layer_of(group.members[0].tensor)
        candidates = [n for n in self._by_shape.get(group.shape, ())
                      if layer is None or layer_of(n) in (layer, None)]
        where = self.dense.root
        if not candidates:
            raise InputError(f"no dense tensor of shape {list(group.shape)} in layer {layer} "
                             f"to serve as base of {group.key!r}", where)
        best = (-2.0, "", None)
        m = mean.reshape(1, -1).float()
        for name in candidates:
            t = self._files.of(name).tensor(self.dense.entry(name))
            cos = float(cosines_to(m, t.reshape(-1).float())[0])
            if cos > best[0]:
                best = (cos, name, t)
        cos, name, t = best
        if cos < self.threshold:
            raise InputError(f"no dense tensor matches {group.key!r}: the closest, {name!r}, has "
                             f"cosine {cos:.4f} to the experts (needs {self.threshold})", where)
        return name, t.to(TORCH_DTYPES[group.dtype]), cos
