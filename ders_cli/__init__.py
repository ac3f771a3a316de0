"""ders: DeRS (Decompose, Replace, Synthesis) compression of upcycled Mixture-of-Experts
checkpoints.

Everything the ``ders`` command does is a function here::

    import ders_cli as ders
    report = ders.inspect_model("model/")
    result = ders.compress("model/", ders.SparseSpec(drop=0.9), "model.ders")
    result = ders.compress("model/", ders.QuantSpec(bits=2), "q2.ders")
    result = ders.compress("model/", ders.LosslessSpec(), "exact.ders")
    result = ders.compress("model/", ders.TargetSpec(max_error=0.005), "e.ders")
    ders.verify("model.ders", against="model/")
    ders.expand("model.ders", "restored/")
    ders.upcycle_checkpoint("dense/", "moe.ders", ders.UpcycleSpec(experts=4))
    model = ders.load_from_archive("model.ders", mode="factored")  # inference, no expand

The last two need transformers and are imported on first use.
"""

import sys

if sys.byteorder != "little":  # safetensors and the archive are little-endian on disk
    raise ImportError("ders needs a little-endian machine")

from .archive import ArchiveReader
from .choose import TargetSpec
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


# transformers-backed parts: loaded on first use, so that `import ders_cli` stays light.
_LAZY = {
    "upcycle_checkpoint": ("training.archive_io", "upcycle_checkpoint"),
    "UpcycleSpec": ("training.upcycle", "UpcycleSpec"),
    "load_from_archive": ("runtime", "load_from_archive"),
}


def __getattr__(name: str):
    if name in _LAZY:
        from importlib import import_module

        module, attr = _LAZY[name]
        return getattr(import_module(f".{module}", __name__), attr)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
    "TargetSpec",
    "UpcycleSpec",
    "UsageError",
    "VerificationFailed",
    "VerifyReport",
    "__version__",
    "compress",
    "expand",
    "inspect_model",
    "load_from_archive",
    "quantize",
    "upcycle_checkpoint",
    "verify",
]
