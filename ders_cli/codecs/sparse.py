"""DeRS sparsification: keep a random subset of each delta, rescaled, and regenerate the subset
from a seed instead of storing its indices.

The paper drops each element with probability p and rescales the survivors by 1/(1-p). Here
exactly k = round(n * (1 - p)) positions are kept (so sizes are known before any data is read,
and training with a fixed index vector of that length matches), and survivors are rescaled by
n / k, the exact inverse of the kept fraction. Values are stored rescaled, in the tensor's own
dtype, in ascending position order.
"""

from __future__ import annotations

import math

import torch

from ..constants import CODEC_SPARSE, INDEX_ALL, INDEX_SEED
from ..safetensors_io import TORCH_DTYPES
from .base import ArraySpec, Decoded, DeltaCodec, SparseDelta, compute_dtype
from .mask import positions_on


def keep_count(numel: int, drop: float) -> int:
    """How many positions a drop rate keeps: round half up of numel * (1 - drop)."""
    return min(numel, math.floor(numel * (1.0 - drop) + 0.5))


def rescale_factor(numel: int, keep: int) -> float:
    return numel / keep if keep else 0.0


def decode_values(values: torch.Tensor, seed: int, numel: int,
                  out_dtype: torch.dtype) -> Decoded:
    """One member's delta: defined at the kept positions only (all of them with index "all")."""
    keep = values.numel()
    if keep == numel:
        return values.to(out_dtype, copy=True)  # callers add to it in place
    positions = positions_on(seed, numel, keep, values.device)
    return SparseDelta(positions, values.to(out_dtype))


def densify(decoded: Decoded, numel: int) -> torch.Tensor:
    """A decoded delta as a dense tensor, zeros where it is not defined."""
    if isinstance(decoded, torch.Tensor):
        return decoded
    out = torch.zeros(numel, dtype=decoded.values.dtype, device=decoded.values.device)
    return out.scatter_(0, decoded.positions, decoded.values)


def parse_seed(text: str) -> int:
    if not isinstance(text, str) or len(text) != 16:
        raise ValueError(f"a seed is 16 hex digits, got {text!r}")
    return int(text, 16)


class SparseCodec(DeltaCodec):
    """Parameters: ``drop`` (informative), ``keep``, ``index`` ("seed" or "all"), ``seeds``."""

    name = CODEC_SPARSE

    @classmethod
    def params(cls, drop: float, numel: int, seeds: list[int]) -> dict:
        keep = keep_count(numel, drop)
        return {
            "drop": drop,
            "keep": keep,
            "index": INDEX_ALL if keep == numel else INDEX_SEED,
            "seeds": [f"{s & (2**64 - 1):016x}" for s in seeds],
        }

    @classmethod
    def validate(cls, params: dict, members: int, numel: int) -> None:
        keep, index, seeds = params.get("keep"), params.get("index"), params.get("seeds")
        if not isinstance(keep, int) or isinstance(keep, bool) or not 0 <= keep <= numel:
            raise ValueError(f"sparse keep must be an integer in [0, {numel}], got {keep!r}")
        if index not in (INDEX_ALL, INDEX_SEED):
            raise ValueError(f"unknown sparse index encoding {index!r}")
        if (index == INDEX_ALL) != (keep == numel):
            raise ValueError("sparse index 'all' is used exactly when every element is kept")
        if index == INDEX_SEED:
            if not isinstance(seeds, list) or len(seeds) != members:
                raise ValueError(f"sparse codec needs {members} seeds")
            for s in seeds:
                parse_seed(s)

    @classmethod
    def arrays(cls, params: dict, members: int, numel: int, dtype: str) -> dict[str, ArraySpec]:
        return {"values": (dtype, (members, params["keep"]))}

    @classmethod
    def encode_member(cls, delta: torch.Tensor, dtype: str, params: dict, member: int
                      ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        keep, numel = params["keep"], delta.numel()
        if params["index"] == INDEX_ALL:
            # A copy even when the dtypes agree: the returned delta is added to in place.
            values = delta.to(TORCH_DTYPES[dtype], copy=True)
            return {"values": values}, delta.copy_(values)
        pos = positions_on(parse_seed(params["seeds"][member]), numel, keep, delta.device)
        scale = torch.tensor(rescale_factor(numel, keep), dtype=delta.dtype)
        # index_select and scatter_: several times faster than advanced indexing in torch.
        values = (torch.index_select(delta, 0, pos) * scale).to(TORCH_DTYPES[dtype])
        return {"values": values}, SparseDelta(pos, values.to(delta.dtype))

    @classmethod
    def decode(cls, rows: dict[str, torch.Tensor], params: dict, member: int, numel: int,
               dtype: str) -> Decoded:
        seed = parse_seed(params["seeds"][member]) if params["index"] == INDEX_SEED else 0
        return decode_values(rows["values"], seed, numel, compute_dtype(dtype))

