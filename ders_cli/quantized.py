"""Checkpoints whose experts another format has already quantized: which tensors make up each
format, as data, so that detection names those experts and says why they are stored as they
are, instead of listing a scale or a shape vector as experts or losing them without a word.

ders does not decompress other formats yet: such experts pass through bit for bit, with their
companions (scales, zero points, shapes, group indices).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from .safetensors_io import TensorEntry

REASON = "stored as they are, ders does not decompress other formats yet"


@dataclass(frozen=True)
class QuantFormat:
    name: str  # as shown to users
    weight: str  # the name of each quantized matrix ends with this
    dtypes: tuple[str, ...]  # ... and it has one of these dtypes
    companions: tuple[str, ...]  # what replaces ``weight`` in the names of its other tensors
    marker: str | None = None  # a companion that must exist for this format to be the one

    def matches(self, name: str, dtype: str, names: Mapping[str, object]) -> bool:
        if not name.endswith(self.weight) or dtype not in self.dtypes:
            return False
        return self.marker is None or self.companion(name, self.marker) in names

    def companion(self, name: str, suffix: str) -> str:
        return name[: len(name) - len(self.weight)] + suffix


FP8 = ("F8_E4M3", "F8_E5M2", "F8_E4M3FNUZ", "F8_E5M2FNUZ")
FORMATS: tuple[QuantFormat, ...] = (
    # DeepSeek-V3/R1 releases, transformers' FineGrainedFP8: per-block inverse scales
    QuantFormat("FP8 with block scales weight_scale_inv", ".weight", FP8, (".weight_scale_inv",),
                marker=".weight_scale_inv"),
    # compressed-tensors float-quantized (llm-compressor FP8), also NVFP4's global scales
    QuantFormat("FP8 with compressed-tensors weight_scale", ".weight", FP8,
                (".weight_scale", ".input_scale"), marker=".weight_scale"),
    QuantFormat("FP8 without scales", ".weight", FP8, ()),
    # compressed-tensors pack-quantized: int4/int8 (W4A16, W8A16) in I32, NVFP4 in U8
    QuantFormat("compressed-tensors weight_packed integers", ".weight_packed",
                ("I32", "U8"), (".weight_scale", ".weight_zero_point", ".weight_shape",
                                ".weight_g_idx", ".weight_global_scale", ".input_global_scale")),
    # AutoGPTQ / GPTQModel and AutoAWQ: int4 packed into I32 along rows (GPTQ) or columns (AWQ)
    QuantFormat("GPTQ/AWQ qweight integers", ".qweight", ("I32",),
                (".qzeros", ".scales", ".g_idx")),
    # gpt-oss releases: MXFP4 blocks of 32 values with an E8M0 scale each
    QuantFormat("MXFP4 _blocks and _scales", "_blocks", ("U8",), ("_scales",)),
)
# Tensors that only make sense beside a quantized weight never form an expert group (nor do
# quantized weights of another dtype than their format's). The first ones are matched without
# their leading dot, as detection always did.
COMPANION_SUFFIXES = tuple(dict.fromkeys((
    "_scale_inv", "_scales", "_blocks", "weight_scale", "input_scale", ".qweight", ".qzeros",
    ".scales", ".g_idx", *(c for f in FORMATS for c in f.companions))))


def quant_format(entry: TensorEntry, entries: Mapping[str, TensorEntry]) -> QuantFormat | None:
    """The format that quantized this tensor, when it is the quantized matrix of one."""
    return next((f for f in FORMATS if f.matches(entry.name, entry.dtype, entries)), None)


def is_companion(name: str) -> bool:
    return name.endswith(COMPANION_SUFFIXES)
