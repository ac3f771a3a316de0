"""``--base DENSE``: the dense checkpoint's FFN weight each expert group was upcycled from,
matched by layer, shape and similarity.

A member of a group is not always one dense tensor as it is: fused layouts hold gate and up
together ([2I, H] halves in Mixtral's fused form and Granite, interleaved in gpt-oss) and some
store matrices as [in, out] (Llama-4, gpt-oss, DBRX's w2). So the candidates for a group are the
dense tensors of its layer, transposed or not, and ordered pairs of them concatenated or
interleaved along rows (and transposed), whichever have the member's shape; the one most like
the group's mean is the base.

Where the member's family is known (``families.py``), its entry names the dense tensors and how
they are joined and oriented, and that one candidate is tried first; the search over every
candidate runs only when it is absent or not similar enough (another family's or unusual names).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from itertools import permutations

import torch

from .checkpoint import Checkpoint, ShardFiles
from .constants import FLOAT_DTYPES
from .detect import layer_key, layer_of
from .errors import InputError
from .families import members_of
from .records import ExpertGroup
from .safetensors_io import TORCH_DTYPES
from .stats import cosine

Candidate = tuple[str, Callable[[], torch.Tensor]]


def _interleave(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.stack([a, b], dim=1).reshape(2 * a.shape[0], *a.shape[1:])


def _cat(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.cat([a, b])


# How gate and up rows are joined into one matrix, by the name of Form.gate_up in families.py.
JOINS = {"halves": ("cat", _cat), "interleaved": ("interleave", _interleave)}


class DenseMatcher:
    """Finds, for a group, the dense weight (or pair of weights) most like its experts."""

    def __init__(self, dense: Checkpoint, threshold: float) -> None:
        self.dense = dense
        self.threshold = threshold
        self._files = ShardFiles(dense)
        self._matrices = [n for n, (_, e) in dense.where.items()
                          if e.dtype in FLOAT_DTYPES and len(e.shape) == 2]
        self._cache: dict[str, torch.Tensor] = {}

    def close(self) -> None:
        self._files.close()

    def _load(self, name: str) -> torch.Tensor:
        if name not in self._cache:
            self._cache[name] = self._files.of(name).tensor(self.dense.entry(name)).float()
        return self._cache[name]

    def _layer_tensors(self, group: ExpertGroup) -> list[str]:
        first = group.members[0].tensor
        key, index = layer_key(first), layer_of(first)
        same_key = [n for n in self._matrices if key is not None and layer_key(n) == key]
        if same_key:
            return same_key
        # Another architecture's names (an MoE upcycled from a differently named dense model).
        return [n for n in self._matrices if index is None or layer_of(n) in (index, None)]

    def _candidates(self, group: ExpertGroup, names: list[str]) -> Iterator[Candidate]:
        target = tuple(group.shape)
        shape = {n: self.dense.entry(n).shape for n in names}
        for n in names:
            if shape[n] == target:
                yield n, lambda n=n: self._load(n)
            if shape[n][::-1] == target:
                yield f"{n}.T", lambda n=n: self._load(n).T
        for a, b in permutations(names, 2):
            if shape[a] != shape[b]:
                continue
            rows, cols = shape[a]
            for how, join in JOINS.values():
                def make(a=a, b=b, join=join):
                    return join(self._load(a), self._load(b))

                if (2 * rows, cols) == target:
                    yield f"{how}({a}, {b})", make
                if (cols, 2 * rows) == target:
                    yield f"{how}({a}, {b}).T", lambda make=make: make().T

    def _family_candidates(self, group: ExpertGroup) -> Iterator[Candidate]:
        """What the families that name this member say its dense source is: the dense FFN's
        tensors of the member's roles, joined and oriented as the family's form holds them."""
        matrices = set(self._matrices)
        for family, _, proj, prefix in members_of(group.members[0].tensor):
            names = [family.dense.name(prefix, role) for role in proj.roles]
            if not names or not all(n in matrices for n in names):
                continue
            form = proj.form
            if len(names) == 1:
                desc, make = names[0], lambda n=names[0]: self._load(n)
            elif len(names) == 2 and form is not None and form.gate_up in JOINS:
                how, join = JOINS[form.gate_up]
                desc = f"{how}({names[0]}, {names[1]})"

                def make(a=names[0], b=names[1], join=join):
                    return join(self._load(a), self._load(b))
            else:
                continue
            if form is not None and form.inner == "in,out":
                yield f"{desc}.T", lambda make=make: make().T
            else:
                yield desc, make

    def _best(self, group: ExpertGroup, mean: torch.Tensor, candidates: Iterator[Candidate]
              ) -> tuple[float, str, torch.Tensor | None]:
        best: tuple[float, str, torch.Tensor | None] = (-2.0, "", None)
        seen = set()
        for desc, make in candidates:
            if desc in seen:
                continue
            seen.add(desc)
            t = make().contiguous()
            if tuple(t.shape) != tuple(group.shape):
                continue
            cos = cosine(mean, t)
            if cos > best[0]:
                best = (cos, desc, t)
        return best

    def match(self, group: ExpertGroup, mean: torch.Tensor) -> tuple[str, torch.Tensor, float]:
        """(description of the dense source, its weights in the group's dtype and shape, cosine
        to the group's mean)."""
        names = self._layer_tensors(group)
        layer = layer_key(group.members[0].tensor) or "the checkpoint"
        m = mean.float()
        cos, desc, t = self._best(group, m, self._family_candidates(group))
        if t is None or cos < self.threshold:
            cos, desc, t = self._best(group, m, self._candidates(group, names))
        where = self.dense.root
        if t is None:
            raise InputError(f"no dense tensor of {layer} can form shape {list(group.shape)} "
                             f"to serve as base of {group.key!r}", where)
        if cos < self.threshold:
            raise InputError(f"no dense tensor matches {group.key!r}: the closest, {desc}, has "
                             f"cosine {cos:.4f} to the experts (needs {self.threshold})", where)
        self._cache = {n: v for n, v in self._cache.items() if n in names}  # this layer only
        return desc, t.to(TORCH_DTYPES[group.dtype]), cos
