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

import hashlib
import itertools
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from ..constants import (
    CODEC_SPARSE,
    DEFAULT_GROUP_SIZE,
    INDEX_ALL,
    INDEX_BITMAP,
    INDEX_GAPS,
    INDEX_SEED,
    QUANT_BITS,
    SPARSE_MASKS,
    SPARSE_RESCALES,
)
from ..dtypes import TORCH_DTYPES, compute_dtype
from ..errors import UsageError
from .base import (
    ArraySpec,
    Calibration,
    CodecSpec,
    Decoded,
    DeltaCodec,
    GroupShape,
    Option,
    SparseDelta,
)
from .bitpack import packed_nbytes
from .index import bitmap_decode, bitmap_encode, gaps_decode, gaps_encode
from .mask import positions_on
from .quant import dequantize, quant_arrays, quantize

_SEED = re.compile("[0-9a-f]{16}")
# A seeded member's positions are cached (``cache`` of ``delta``/``apply``) when it keeps at
# most 1/64 of its elements: 8-byte indices then cost at most 1/8 of a full f32 member.
POSITION_CACHE_RATIO = 64


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


def parse_seed(text: str) -> int:
    if not isinstance(text, str) or not _SEED.fullmatch(text):
        raise ValueError(f"a seed is 16 lowercase hex digits, got {str(text)[:20]!r}")
    return int(text, 16)


class SparseCodec(DeltaCodec):
    """Parameters: ``drop`` (informative), ``keep``, ``mask``, ``rescale`` (informative),
    ``index`` ("all", "seed", "bitmap" or "gaps"), ``seeds`` (with "seed"), ``index_offsets``
    (with "gaps": N+1 byte offsets into the index array), ``values`` (optional quantization)."""

    name = CODEC_SPARSE
    options = (
        Option("drop", float, None, "Fraction of each delta to drop, in [0, 1).",
               required=True),
        Option("seed", int, 0, "Seed of the random masks."),
        Option("mask", str, "random", "random: the paper's seeded mask (nothing stored but a "
               "seed); magnitude: the largest deltas (positions stored).", SPARSE_MASKS),
        Option("rescale", str, None, "Scale of the kept values: inverse (by 1/(1-p), "
               "unbiased; default for random masks), none (default for magnitude masks), norm "
               "(the delta keeps its norm).", SPARSE_RESCALES),
        Option("value_bits", int, None, "Also quantize the kept values to this many bits "
               "(1, 2, 3, 4, 8).", QUANT_BITS),
        Option("value_group", int, DEFAULT_GROUP_SIZE,
               "Kept values sharing one quantization scale and offset."),
    )

    @classmethod
    def check(cls, spec: SparseSpec) -> None:  # type: ignore[override]
        if not 0.0 <= spec.drop < 1.0:
            raise UsageError(f"drop must be in [0, 1), got {spec.drop}", param="drop")
        if not 0 <= spec.seed < 2**63:
            raise UsageError(f"seed must be in [0, 2^63), got {spec.seed}", param="seed")
        super().check(spec)
        if spec.value_bits is not None and spec.value_group < 1:
            raise UsageError(f"value_group must be at least 1, got {spec.value_group}",
                             param="value_group")

    @classmethod
    def label(cls, params: Mapping[str, Any]) -> str:
        """"drop 0.9", "drop 0.9 magnitude", "drop 0.9 +4-bit", ... (defaults left out)."""
        mask, rescale = params.get("mask", "random"), params.get("rescale")
        label = f"drop {params.get('drop', 0.0):g}"
        if mask != "random":
            label += f" {mask}"
        if rescale is not None and rescale != default_rescale(mask):
            label += f" rescale {rescale}"
        values = params.get("values") or {}
        if values.get("bits") is not None:
            label += f" +{values['bits']}-bit"
        return label

    @classmethod
    def member_seeds(cls, seed: int, labels: Sequence[str]) -> list[int]:
        """A mask seed per member, from the user's seed and the member's name: distinct masks
        for every expert, and the same archive for the same inputs."""
        out = []
        for label in labels:
            digest = hashlib.sha256(f"ders-mask:{seed}:{label}".encode()).digest()
            out.append(int.from_bytes(digest[:8], "little"))
        return out

    @classmethod
    def seed_of(cls, params: Mapping[str, Any], member: int) -> int:
        """The mask seed of a member of a seeded (or keep-all) group."""
        return parse_seed(params["seeds"][member]) if params["index"] == INDEX_SEED else 0

    @classmethod
    def trained_params(cls, keep: int, numel: int, seeds: list[int], drop: float | None = None
                       ) -> dict:
        """The parameters of deltas trained at ``keep`` seeded positions (DeRS-SM): the rate
        only labels the setting, ``keep`` is what was trained."""
        params = cls.params(1.0 - keep / numel if drop is None else drop, numel, seeds)
        params["keep"] = keep
        params["index"] = INDEX_ALL if keep == numel else INDEX_SEED
        return params

    @classmethod
    def params(cls, drop: float, numel: int, seeds: list[int], mask: str = "random",
               rescale: str | None = None, value_bits: int | None = None,
               value_group: int = DEFAULT_GROUP_SIZE) -> dict:
        keep = keep_count(numel, drop)
        out: dict = {"drop": drop, "keep": keep, "mask": mask,
                     "rescale": rescale or default_rescale(mask)}
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
        if params.get("mask", "random") not in SPARSE_MASKS:
            raise ValueError(f"unknown sparse mask {params.get('mask')!r}")
        if params.get("rescale", "inverse") not in SPARSE_RESCALES:
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
    def encode_member(cls, delta: torch.Tensor, dtype: str, params: dict, member: int,
                      calib: Calibration | None = None
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
        if calib is not None and calib.fits(numel):
            # Calibrated: the kept values that give the member's outputs best (least squares
            # on its inputs), whatever the rescale asked for. (Imported here: the solver's
            # kernels import this package.)
            from ..calibration.solve import sparse_values

            kept = sparse_values(delta, pos, calib.hessian.to(delta.device))
        else:
            # index_select and index_copy_: several times faster than advanced indexing.
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
    def member_rows(cls, arrays: Mapping[str, torch.Tensor], params: dict, member: int
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

    @classmethod
    def _seeded(cls, params: Mapping[str, Any]) -> bool:
        """Positions from seeds and values as they are (DeRS-SM archives, ``--drop``): a layer
        can compute on the kept positions alone."""
        return "values" not in params and params["index"] in (INDEX_SEED, INDEX_ALL)

    @classmethod
    def _positions(cls, params: Mapping[str, Any], member: int, numel: int,
                   device: torch.device, cache: dict | None) -> torch.Tensor:
        """A seeded member's kept positions, regenerated from its seed; kept in ``cache`` only
        when they are few (DeRS-SM): at drop 0.9 they would outweigh the values they index."""
        cached = cache.get(member) if cache is not None else None
        if cached is not None:
            if cached.device != device:  # the model was moved
                cache[member] = cached = cached.to(device)
            return cached
        keep = params["keep"]
        pos = positions_on(cls.seed_of(params, member), numel, keep, torch.device("cpu"))
        pos = pos.to(torch.int64).to(device)
        if cache is not None and keep * POSITION_CACHE_RATIO <= numel:
            cache[member] = pos
        return pos

    @classmethod
    def delta(cls, rows: dict[str, torch.Tensor], params: dict, member: int, base: torch.Tensor,
              dtype: str, cache: dict | None = None) -> torch.Tensor:
        if not cls._seeded(params):
            return super().delta(rows, params, member, base, dtype, cache)
        cd = compute_dtype(dtype)
        out = torch.zeros(base.numel(), dtype=cd, device=base.device)
        pos = cls._positions(params, member, base.numel(), base.device, cache)
        return out.index_copy_(0, pos, rows["values"].to(cd))

    @classmethod
    def apply(cls, x: torch.Tensor, rows: dict[str, torch.Tensor], params: dict, member: int,
              base: torch.Tensor, dtype: str, cache: dict | None = None) -> torch.Tensor:
        n_out, n_in = base.shape
        if cls._seeded(params) and x.shape[0] * params["keep"] < base.numel():
            # Few tokens or a very sparse delta: touch only the kept positions.
            pos = cls._positions(params, member, base.numel(), base.device, cache)
            contrib = x[:, pos % n_in] * rows["values"].to(x.dtype)
            return x.new_zeros(x.shape[0], n_out).index_add_(1, pos // n_in, contrib)
        d = cls.delta(rows, params, member, base, dtype, cache)
        return F.linear(x, d.to(x.dtype).view(base.shape))


def default_rescale(mask: str) -> str:
    """Random masks keep the paper's unbiased scaling; magnitude ones keep values as they are."""
    return "inverse" if mask == "random" else "none"


@dataclass(frozen=True)
class SparseSpec(CodecSpec):
    """DeRS sparsification: drop a fraction ``drop`` of each delta.

    ``mask``: "random" (the paper's, regenerated from a seed) or "magnitude" (the largest
    |delta|, positions stored). ``rescale`` of the kept values: "inverse" (n/k, the paper's),
    "none" or "norm"; default "inverse" for random masks, "none" for magnitude ones.
    ``value_bits``: quantize the kept values too (drop then quantize), per ``value_group``.
    """

    codec: ClassVar[str] = CODEC_SPARSE
    drop: float
    seed: int = 0
    mask: str = "random"
    rescale: str | None = None
    value_bits: int | None = None
    value_group: int = DEFAULT_GROUP_SIZE

    def settings(self) -> dict:
        out: dict = {"drop": self.drop, "mask": self.mask,
                     "rescale": self.rescale or default_rescale(self.mask)}
        if self.value_bits is not None:
            out["values"] = {"bits": self.value_bits, "group_size": self.value_group}
        return out

    def params(self, group: GroupShape) -> dict:
        seeds = SparseCodec.member_seeds(self.seed, [m.label for m in group.members])
        return SparseCodec.params(self.drop, group.numel, seeds, self.mask, self.rescale,
                                  self.value_bits, self.value_group)


SparseCodec.spec = SparseSpec


def _scale(rescale: str, delta: torch.Tensor, kept: torch.Tensor, numel: int, keep: int
           ) -> torch.Tensor:
    if rescale == "none" or keep == 0:
        return torch.tensor(1.0, dtype=delta.dtype, device=delta.device)
    if rescale == "norm":
        k_norm = float(torch.linalg.vector_norm(kept))
        factor = float(torch.linalg.vector_norm(delta)) / k_norm if k_norm else 1.0
        return torch.tensor(factor, dtype=delta.dtype, device=delta.device)
    return torch.tensor(rescale_factor(numel, keep), dtype=delta.dtype, device=delta.device)

