"""Delta codecs: pure functions from a group's deltas to stored arrays and back."""

from .base import (
    Decoded,
    DeltaCodec,
    ExactCodec,
    ExactDelta,
    SparseDelta,
    compute_dtype,
    get_codec,
)
from .lossless import LosslessCodec
from .lowrank import LowRankCodec
from .quant import QuantCodec
from .sparse import SparseCodec

__all__ = ["Decoded", "DeltaCodec", "ExactCodec", "ExactDelta", "LosslessCodec", "LowRankCodec",
           "QuantCodec", "SparseCodec", "SparseDelta", "compute_dtype", "get_codec"]
