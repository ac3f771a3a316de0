"""The safetensors dtype names ders computes on, as torch dtypes, and the dtype arithmetic on
them runs in. One table for the codecs, the safetensors reader and the archive alike."""

from __future__ import annotations

import torch

TORCH_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in TORCH_DTYPES.items()}


def compute_dtype(dtype: str) -> torch.dtype:
    """Deltas and reconstructions are computed in f64 for F64 tensors, in f32 otherwise."""
    return torch.float64 if dtype == "F64" else torch.float32
