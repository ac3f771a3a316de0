"""Delta codecs: pure functions from a group's deltas to stored arrays and back, one class (and
one settings class) per codec, found by name in ``DeltaCodec.registry``."""

from .base import (
    Calibration,
    CodecSpec,
    Decoded,
    DeltaCodec,
    ExactCodec,
    ExactDelta,
    Option,
    SparseDelta,
    codec_label,
    compute_dtype,
    densify,
    get_codec,
)
from .lossless import LosslessCodec, LosslessSpec
from .lowrank import LowRankCodec, LowRankSpec
from .quant import QuantCodec, QuantSpec
from .sparse import SparseCodec, SparseSpec

__all__ = ["Calibration", "CodecSpec", "Decoded", "DeltaCodec", "ExactCodec", "ExactDelta",
           "LosslessCodec", "LosslessSpec", "LowRankCodec", "LowRankSpec", "Option",
           "QuantCodec", "QuantSpec", "SparseCodec", "SparseDelta", "SparseSpec", "codec_label",
           "compute_dtype", "densify", "get_codec"]
