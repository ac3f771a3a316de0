"""ders: DeRS (Decompose, Replace, Synthesis) compression of upcycled Mixture-of-Experts
checkpoints.

Everything the ``ders`` command does is a function here::

    import ders_cli as ders
    report = ders.inspect_model("model/")
    result = ders.compress("model/", ders.SparseSpec(drop=0.9), "model.ders")
    result = ders.compress("model/", ders.QuantSpec(bits=2), "q2.ders")
    result = ders.compress("model/", ders.LosslessSpec(), "exact.ders")
    ders.verify("model.ders", against="model/")
    ders.expand("model.ders", "restored/")
"""

import sys

if sys.byteorder != "little":  # safetensors and the archive are little-endian on disk
    raise ImportError("ders needs a little-endian machine")

from .archive import ArchiveReader
from .compress import CompressResult, compress
from .decompose import LosslessSpec, QuantSpec, SparseSpec
from .errors import (
    CorruptArchiveError,
    DersError,
    InputError,
    NewerFormatError,
    OutputExistsError,
    UsageError,
    VerificationFailed,
)
from .expand import ExpandResult, expand
from .inspection import InspectReport, inspect_model
from .verify import VerifyReport, verify

__version__ = "0.1.0"


def quantize(model, bits: int, out=None, *, group_size: int = 128, **kwargs) -> CompressResult:
    """``compress`` with a QuantSpec: the delta of every expert quantized to ``bits`` bits."""
    return compress(model, QuantSpec(bits, group_size), out, **kwargs)


__all__ = [
    "ArchiveReader",
    "CompressResult",
    "CorruptArchiveError",
    "DersError",
    "ExpandResult",
    "InputError",
    "InspectReport",
    "LosslessSpec",
    "NewerFormatError",
    "OutputExistsError",
    "QuantSpec",
    "SparseSpec",
    "UsageError",
    "VerificationFailed",
    "VerifyReport",
    "__version__",
    "compress",
    "expand",
    "inspect_model",
    "quantize",
    "verify",
]
