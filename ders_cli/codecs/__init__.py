"""Delta codecs: pure functions from a group's deltas to stored arrays and back."""

from .base import Decoded, DeltaCodec, SparseDelta, compute_dtype, get_codec
from .quant import QuantCodec
from .sparse import SparseCodec

__all__ = ["Decoded", "DeltaCodec", "QuantCodec", "SparseCodec", "SparseDelta", "compute_dtype",
           "get_codec"]
