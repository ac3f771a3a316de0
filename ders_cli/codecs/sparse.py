"""DeRS sparsification: keep a subset of each delta and store only the kept values.

Which elements are kept (the mask):
- ``random`` (the paper's): k = round(n * (1 - p)) positions drawn by the seeded generator of
  ``mask``; only the seed is stored.
- ``magnitude``: the k largest |delta| (ties to the lowest positions); the positions are stored
  as a bitmap or as LEB128 gaps (``index``), whichever is smaller.

How kept values are scaled before storing (``rescale``, informative: values are stored scaled):
- ``inverse``: by n / k, the inverse kept fraction (the paper's 1 / (1 - p)): unbiased.
- ``none``: as they are.
- ``norm``: by ||delta|| / ||kept||: the delta keeps its energy.

How kept values are stored (``values``): in the tensor's own dtype, or quantized like the quant
codec (``{"bits", "group_size"}``, groups over the member's k values in position order).
Exactly k positions are kept, so sizes are known before any data is read, and training with a
fixed index vector of that length (DeRS-SM) matches.
"""

from __future__ import annotations

import itertools
import math
import re

import numpy as np
import torch

from ..constants import CODEC_SPARSE, INDEX_ALL, INDEX_SEED, QUANT_BITS
from ..safetensors_io import TORCH_DTYPES
from .base import ArraySpec, Decoded, DeltaCodec, SparseDelta, compute_dtype
from .bitpack import packed_nbytes
from .index import bitmap_decode, bitmap_encode, gaps_decode, gaps_encode
from .mask import positions_on
from .quant import dequantize, quant_arrays, quantize

_SEED = re.compile("[0-9a-f]{16}")
INDEX_BITMAP = "bitmap"
INDEX_GAPS = "gaps"
MASKS = ("random", "magnitude")
RESCALES = ("inverse", "none", "norm")


def keep_count(numel: int, drop: float) -> int:
    """How many positions a drop rate keeps: round half up of numel * (1 - drop)."""
    return min(numel, math.floor(numel * (1.0 - drop) + 0.5))


def rescale_factor(numel: int, keep: int) -> float:
    return numel / keep if keep else 0.0


def top_magnitude(delta: torch.Tensor, k: int) -> torch.Tensor:
    """Positions (ascending) of the k largest |delta|; among equal magnitudes at the threshold,
    the lowest positions, so the mask does not depend on the selection algorithm."""
    n = delta.numel()
    if k >= n:
        return torch.arange(n, dtype=torch.int64, device=delta.device)
    if k == 0:
        return torch.empty(0, dtype=torch.int64, device=delta.device)
    a = delta.abs()
    threshold = torch.kthvalue(a.cpu() if a.device.type != "cpu" else a, n - k + 1).values
    threshold = threshold.to(a.device)
    above = torch.nonzero(a > threshold).reshape(-1)
    ties = torch.nonzero(a == threshold).reshape(-1)[: k - above.numel()]
    return torch.sort(torch.cat([above, ties])).values


def decode_values(values: torch.Tensor, seed: int, numel: int,
                  out_dtype: torch.dtype) -> Decoded:
    """A random-mask member's delta: defined at the kept positions only (all with "all")."""
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
    return out.index_copy_(0, decoded.positions, decoded.values)


def parse_seed(text: str) -> int:
    if not isinstance(text, str) or not _SEED.fullmatch(text):
        raise ValueError(f"a seed is 16 lowercase hex digits, got {str(text)[:20]!r}")
    return int(text, 16)


class SparseCodec(DeltaCodec):
    """Parameters: ``drop`` (informative), ``keep``, ``mask``, ``rescale`` (informative),
    ``index`` ("all", "seed", "bitmap" or "gaps"), ``seeds`` (with "seed"), ``index_offsets``
    (with "gaps": N+1 byte offsets into the index array), ``values`` (optional quantization)."""

    name = CODEC_SPARSE

    @classmethod
    def params(cls, drop: float, numel: int, seeds: list[int], mask: str = "random",
               rescale: str | None = None, value_bits: int | None = None,
               value_group: int = 128) -> dict:
        keep = keep_count(numel, drop)
        out: dict = {"drop": drop, "keep": keep, "mask": mask,
                     "rescale": rescale or ("inverse" if mask == "random" else "none")}
        if keep == numel:
            out["index"] = INDEX_ALL
        elif mask == "random":
            out["index"] = INDEX_SEED
            out["seeds"] = [f"{s & (2**64 - 1):016x}" for s in seeds]
        else:
            out["index"] = INDEX_BITMAP  # until combine() sees the positions and picks
        if value_bits is not None:
            out["values"] = {"bits": value_bits, "group_size": value_group}
        return out

    @classmethod
    def validate(cls, params: dict, members: int, numel: int) -> None:
        keep, index, drop = params.get("keep"), params.get("index"), params.get("drop", 0.0)
        if not isinstance(drop, (int, float)) or isinstance(drop, bool) or not 0 <= drop <= 1:
            raise ValueError(f"sparse drop must be a number in [0, 1], got {drop!r}")
        if not isinstance(keep, int) or isinstance(keep, bool) or not 0 <= keep <= numel:
            raise ValueError(f"sparse keep must be an integer in [0, {numel}], got {keep!r}")
        if index not in (INDEX_ALL, INDEX_SEED, INDEX_BITMAP, INDEX_GAPS):
            raise ValueError(f"unknown sparse index encoding {index!r}")
        if (index == INDEX_ALL) != (keep == numel):
            raise ValueError("sparse index 'all' is used exactly when every element is kept")
        if params.get("mask", "random") not in MASKS:
            raise ValueError(f"unknown sparse mask {params.get('mask')!r}")
        if params.get("rescale", "inverse") not in RESCALES:
            raise ValueError(f"unknown sparse rescale {params.get('rescale')!r}")
        if index == INDEX_SEED:
            seeds = params.get("seeds")
            if not isinstance(seeds, list) or len(seeds) != members:
                raise ValueError(f"sparse codec needs {members} seeds")
            for s in seeds:
                parse_seed(s)
        if index == INDEX_GAPS:
            offsets = params.get("index_offsets")
            if (not isinstance(offsets, list) or len(offsets) != members + 1
                    or any(not isinstance(o, int) or isinstance(o, bool) for o in offsets)
                    or offsets[0] != 0
                    or any(b < a for a, b in itertools.pairwise(offsets))):
                raise ValueError("sparse gaps need N+1 ascending byte offsets")
        vq = params.get("values")
        if vq is not None and (not isinstance(vq, dict) or vq.get("bits") not in QUANT_BITS
                               or not isinstance(vq.get("group_size"), int)
                               or vq["group_size"] < 1):
            raise ValueError(f"bad sparse value quantization {vq!r}")

    @classmethod
    def arrays(cls, params: dict, members: int, numel: int, dtype: str) -> dict[str, ArraySpec]:
        keep, vq = params["keep"], params.get("values")
        if vq is None:
            out = {"values": (dtype, (members, keep))}
        else:
            out = quant_arrays(vq["bits"], vq["group_size"], members, keep)
        if params["index"] == INDEX_BITMAP:
            out["index"] = ("U8", (members, packed_nbytes(numel, 1)))
        elif params["index"] == INDEX_GAPS:
            out["index"] = ("U8", (params["index_offsets"][-1],))
        return out

    @classmethod
    def encode_member(cls, delta: torch.Tensor, dtype: str, params: dict, member: int
                      ) -> tuple[dict[str, torch.Tensor], Decoded]:
        keep, numel = params["keep"], delta.numel()
        vq = params.get("values")
        if params["index"] == INDEX_ALL and vq is None:
            # A copy even when the dtypes agree: the returned delta is added to in place.
            values = delta.to(TORCH_DTYPES[dtype], copy=True)
            return {"values": values}, delta.copy_(values)
        if params["index"] == INDEX_ALL:
            pos = torch.arange(numel, dtype=torch.int64, device=delta.device)
        elif params.get("mask", "random") == "random":
            pos = positions_on(parse_seed(params["seeds"][member]), numel, keep, delta.device)
        else:
            pos = top_magnitude(delta, keep)
        # index_select and index_copy_: several times faster than advanced indexing in torch.
        kept = torch.index_select(delta, 0, pos)
        kept *= _scale(params.get("rescale", "inverse"), delta, kept, numel, keep)
        if vq is None:
            values = kept.to(TORCH_DTYPES[dtype])
            row, decoded_values = {"values": values}, values.to(delta.dtype)
        else:
            codes, scale, offset, decoded_values = quantize(kept, vq["bits"], vq["group_size"])
            row = {"codes": codes, "scale": scale}
            if offset is not None:
                row["offset"] = offset
        if params["index"] not in (INDEX_ALL, INDEX_SEED):
            row["positions"] = pos.cpu()  # combine() turns these into the stored index
        if params["index"] == INDEX_ALL:
            return row, decoded_values
        return row, SparseDelta(pos, decoded_values)

    @classmethod
    def combine(cls, rows: list[dict[str, torch.Tensor]], params: dict, numel: int
                ) -> tuple[dict[str, torch.Tensor], dict]:
        positions = [r.pop("positions") for r in rows] if "positions" in rows[0] else None
        arrays, params = super().combine(rows, params, numel)
        if positions is None:
            return arrays, params
        # A stored mask: gaps or bitmap, whichever the whole group needs fewer bytes for.
        gaps = [gaps_encode(p.numpy()) for p in positions]
        params = dict(params)
        if sum(g.size for g in gaps) < len(rows) * packed_nbytes(numel, 1):
            params["index"] = INDEX_GAPS
            params["index_offsets"] = [0, *np.cumsum([g.size for g in gaps]).tolist()]
            arrays["index"] = torch.from_numpy(np.concatenate(gaps).astype(np.uint8))
        else:
            params["index"] = INDEX_BITMAP
            arrays["index"] = torch.from_numpy(np.stack(
                [bitmap_encode(p.numpy(), numel) for p in positions]))
        return arrays, params

    @classmethod
    def member_rows(cls, arrays: dict[str, torch.Tensor], params: dict, member: int
                    ) -> dict[str, torch.Tensor]:
        rows = {k: v[member] for k, v in arrays.items() if k != "index"}
        if params["index"] == INDEX_BITMAP:
            rows["index"] = arrays["index"][member]
        elif params["index"] == INDEX_GAPS:
            start, end = params["index_offsets"][member : member + 2]
            rows["index"] = arrays["index"][start:end]
        return rows

    @classmethod
    def decode(cls, rows: dict[str, torch.Tensor], params: dict, member: int, numel: int,
               dtype: str) -> Decoded:
        cd = compute_dtype(dtype)
        keep, vq, index = params["keep"], params.get("values"), params["index"]
        if vq is None:
            values = rows["values"]
        else:
            values = dequantize(rows["codes"], rows["scale"], rows.get("offset"), vq["bits"],
                                vq["group_size"], keep, cd)
        if index in (INDEX_ALL, INDEX_SEED):
            seed = parse_seed(params["seeds"][member]) if index == INDEX_SEED else 0
            return decode_values(values, seed, numel, cd)
        raw = rows["index"].cpu().numpy()
        pos = bitmap_decode(raw, numel) if index == INDEX_BITMAP else gaps_decode(raw, keep)
        if pos.size != keep:
            raise ValueError(f"index holds {pos.size} positions, expected {keep}")
        if keep and pos[-1] >= numel:  # gaps are ascending by construction; bitmaps hold < n
            raise ValueError(f"index holds position {pos[-1]}, past the member's {numel}")
        return SparseDelta(torch.from_numpy(pos).to(values.device), values.to(cd))


def _scale(rescale: str, delta: torch.Tensor, kept: torch.Tensor, numel: int, keep: int
           ) -> torch.Tensor:
    if rescale == "none" or keep == 0:
        return torch.tensor(1.0, dtype=delta.dtype, device=delta.device)
    if rescale == "norm":
        k_norm = float(torch.linalg.vector_norm(kept))
        factor = float(torch.linalg.vector_norm(delta)) / k_norm if k_norm else 1.0
        return torch.tensor(factor, dtype=delta.dtype, device=delta.device)
    return torch.tensor(rescale_factor(numel, keep), dtype=delta.dtype, device=delta.device)

