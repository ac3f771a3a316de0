"""Delta codecs: pure functions from a group's deltas to stored arrays and back."""

from .base import DeltaCodec, compute_dtype, get_codec
from .lowrank import LowRankCodec
from .quant import QuantCodec
from .sparse import SparseCodec

__all__ = ["DeltaCodec", "LowRankCodec", "QuantCodec", "SparseCodec", "compute_dtype", "get_codec"]
