"""ders: DeRS (Decompose, Replace, Synthesis) compression of upcycled Mixture-of-Experts
checkpoints.

Everything the ``ders`` command does is a function here::

    import ders_cli as ders
    report = ders.inspect_model("model/")
    result = ders.compress("model/", ders.SparseSpec(drop=0.9), "model.ders")
    result = ders.compress("model/", ders.QuantSpec(bits=2), "q2.ders")
    result = ders.compress("model/", ders.LosslessSpec(), "exact.ders")
    result = ders.compress("model/", ders.LowRankSpec(rank=8), "r8.ders")
    result = ders.compress("model/", ders.TargetSpec(max_error=0.005), "e.ders")
    ders.verify("model.ders", against="model/")
    ders.expand("model.ders", "restored/")
    ders.evaluate("model/", ["model.ders"], "text/")  # perplexity, per-layer output errors
    ders.upcycle_checkpoint("dense/", "moe.ders", ders.UpcycleSpec(experts=4))
    model = ders.load_from_archive("model.ders", mode="factored")  # inference, no expand

Names are imported on first use, so that ``import ders_cli`` and ``ders --help`` do not load
torch; the last two also need transformers.
"""

from __future__ import annotations

import sys
import types
from importlib import import_module
from typing import TYPE_CHECKING

if sys.byteorder != "little":  # safetensors and the archive are little-endian on disk
    raise ImportError("ders needs a little-endian machine")

from .constants import DEFAULT_GROUP_SIZE
from .errors import (
    CorruptArchiveError,
    DersError,
    InputError,
    InvalidArchiveError,
    NewerFormatError,
    OutputError,
    OutputExistsError,
    UsageError,
    VerificationFailed,
)
from .hf.quantizer import register_on_import as _register_on_import

if TYPE_CHECKING:
    from .compress import CompressResult

__version__ = "0.1.0"

# Public name -> the module (under ders_cli) that defines it. Add new API here.
_API = {
    "ArchiveReader": "archive",
    "TargetSpec": "choose",
    "CompressResult": "compress",
    "compress": "compress",
    "LosslessSpec": "codecs",
    "LowRankSpec": "codecs",
    "QuantSpec": "codecs",
    "SparseSpec": "codecs",
    "EvalResult": "evaluate",
    "evaluate": "evaluate",
    "ExpandResult": "expand",
    "expand": "expand",
    "InspectReport": "inspection",
    "inspect_model": "inspection",
    "VerifyReport": "verify",
    "verify": "verify",
    "upcycle_checkpoint": "training.archive_io",
    "UpcycleSpec": "training.upcycle",
    "load_from_archive": "runtime",
}


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f".{_API[name]}", __name__), name)
    globals()[name] = value
    return value


class _Package(types.ModuleType):
    """``ders_cli.compress`` is the function, also once the module of the same name is loaded:
    the import system would otherwise bind the submodule over it (so for evaluate, expand,
    verify)."""

    def __setattr__(self, name: str, value: object) -> None:
        if not (name in _API and isinstance(value, types.ModuleType)):
            super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package

# AutoModelForCausalLM.from_pretrained of a ders folder: registered with transformers as soon as
# transformers loads its quantizer registry (now, if it already has).
_register_on_import()


def quantize(model, bits: int, out=None, *, group_size: int = DEFAULT_GROUP_SIZE, **kwargs
             ) -> CompressResult:
    """``compress`` with a QuantSpec: the delta of every expert quantized to ``bits`` bits."""
    from .codecs import QuantSpec
    from .compress import compress

    return compress(model, QuantSpec(bits, group_size), out, **kwargs)


__all__ = [
    "CorruptArchiveError",
    "DersError",
    "InputError",
    "InvalidArchiveError",
    "NewerFormatError",
    "OutputError",
    "OutputExistsError",
    "UsageError",
    "VerificationFailed",
    "__version__",
    "quantize",
    *_API,
]
