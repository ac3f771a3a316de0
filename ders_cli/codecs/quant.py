"""DeRS quantization: each delta in groups of G consecutive elements (flattened, C order),
k-bit codes bit-packed, one scale and one offset per group.

k >= 2: asymmetric round-to-nearest. offset = bf16(min), scale = bf16((max - offset) / (2^k - 1)),
code = clamp(round((x - offset) / scale), 0, 2^k - 1), computed with the stored (rounded) offset
and scale so that reconstruction sees exactly what encoding assumed.
k == 1: code = [x >= 0], scale = bf16(mean |x|) over the group, x_hat = +-scale.

Reconstruction, in the compute dtype: x_hat = offset + (code * scale), two separately rounded
operations (never fused), so every platform gives the same bits.
"""

from __future__ import annotations

import torch

from ..constants import CODEC_QUANT, QUANT_BITS, QUANT_PARAM_DTYPE
from ..safetensors_io import TORCH_DTYPES
from .base import ArraySpec, DeltaCodec, compute_dtype
from .bitpack import pack, packed_nbytes, unpack

_PARAM = TORCH_DTYPES[QUANT_PARAM_DTYPE]


def num_groups(numel: int, group_size: int) -> int:
    return -(-numel // group_size)


def _grouped(x: torch.Tensor, group_size: int, fill: float) -> torch.Tensor:
    """``x`` padded with ``fill`` to whole groups, as [groups, group_size]."""
    pad = -x.numel() % group_size
    if pad:
        x = torch.cat([x, x.new_full((pad,), fill)])
    return x.view(-1, group_size)


def _reconstruct(q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None, bits: int,
                 numel: int) -> torch.Tensor:
    """The normative arithmetic (docs/FORMAT.md 5.3) on codes grouped as [groups, G]."""
    sc = scale.to(q.dtype)[:, None]
    if bits == 1:
        return ((q * 2 - 1) * sc).reshape(-1)[:numel]
    return (offset.to(q.dtype)[:, None] + q * sc).reshape(-1)[:numel]


def quantize(x: torch.Tensor, bits: int, group_size: int
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """One flattened delta -> (packed codes uint8, scale bf16, offset bf16 or None for 1 bit,
    the delta as it will be decoded)."""
    n = x.numel()
    if n == 0:
        raise ValueError("cannot quantize an empty tensor")
    if bits == 1:
        # Summed in f64 so the stored scale does not depend on the platform's summation order.
        sums = _grouped(x.abs().double(), group_size, 0.0).sum(dim=1)  # f64: exact enough
        counts = torch.full_like(sums, group_size)
        counts[-1] = n - (sums.numel() - 1) * group_size
        scale = (sums / counts).to(x.dtype).to(_PARAM)
        codes = (x >= 0).to(torch.uint8)
        q = _grouped(codes.to(x.dtype), group_size, 0.0)
        return (torch.from_numpy(pack(codes.cpu().numpy(), 1)), scale, None,
                _reconstruct(q, scale, None, 1, n))
    levels = (1 << bits) - 1
    lo = _grouped(x, group_size, float("inf")).amin(dim=1)
    hi = _grouped(x, group_size, float("-inf")).amax(dim=1)
    offset = lo.to(_PARAM)
    off = offset.to(x.dtype)
    scale = ((hi - off).clamp_min(0) / levels).to(_PARAM)
    sc = scale.to(x.dtype)
    safe = torch.where(sc > 0, sc, torch.ones_like(sc))
    q = torch.round((_grouped(x, group_size, 0.0) - off[:, None]) / safe[:, None])
    q = torch.where(sc[:, None] > 0, q, torch.zeros_like(q)).clamp_(0, levels)
    codes = q.reshape(-1)[:n].to(torch.uint8)
    return (torch.from_numpy(pack(codes.cpu().numpy(), bits)), scale, offset,
            _reconstruct(q, scale, offset, bits, n))


def dequantize(codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None, bits: int,
               group_size: int, numel: int, out_dtype: torch.dtype) -> torch.Tensor:
    q = torch.from_numpy(unpack(codes.cpu().numpy(), bits, numel)).to(scale.device, out_dtype)
    return _reconstruct(_grouped(q, group_size, 0.0), scale, offset, bits, numel)


class QuantCodec(DeltaCodec):
    """Parameters: ``bits`` (1, 2, 3, 4 or 8) and ``group_size``."""

    name = CODEC_QUANT

    @classmethod
    def params(cls, bits: int, group_size: int) -> dict:
        return {"bits": bits, "group_size": group_size}

    @classmethod
    def validate(cls, params: dict, members: int, numel: int) -> None:
        bits, gs = params.get("bits"), params.get("group_size")
        if bits not in QUANT_BITS:
            raise ValueError(f"quant bits must be one of {QUANT_BITS}, got {bits!r}")
        if not isinstance(gs, int) or isinstance(gs, bool) or gs < 1:
            raise ValueError(f"quant group_size must be a positive integer, got {gs!r}")

    @classmethod
    def arrays(cls, params: dict, members: int, numel: int, dtype: str) -> dict[str, ArraySpec]:
        bits, gs = params["bits"], params["group_size"]
        groups = num_groups(numel, gs)
        out = {
            "codes": ("U8", (members, packed_nbytes(numel, bits))),
            "scale": (QUANT_PARAM_DTYPE, (members, groups)),
        }
        if bits > 1:
            out["offset"] = (QUANT_PARAM_DTYPE, (members, groups))
        return out

    @classmethod
    def encode_member(cls, delta: torch.Tensor, dtype: str, params: dict, member: int
                      ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        codes, scale, offset, decoded = quantize(delta, params["bits"], params["group_size"])
        row = {"codes": codes, "scale": scale}
        if offset is not None:
            row["offset"] = offset
        return row, decoded

    @classmethod
    def decode(cls, rows: dict[str, torch.Tensor], params: dict, member: int, numel: int,
               dtype: str) -> torch.Tensor:
        return dequantize(rows["codes"], rows["scale"], rows.get("offset"), params["bits"],
                          params["group_size"], numel, compute_dtype(dtype))
