"""What a delta codec is, and the registry that finds one by name.

A codec is one class: the settings a user gives it (a ``CodecSpec`` and the ``options`` it
declares), their validation and label, the parameters and arrays it stores for a group, the
encoding of each member's delta and its decoding, and how a layer applies a stored delta to
its input (``apply``) without building the member. Codecs are pure functions of tensors: no
I/O, no knowledge of files. What a codec stores is fixed by its parameters before any data is
read, so the archive can be planned.

Adding a codec: one module here (its class and its spec), its section in docs/FORMAT.md and a
golden archive in fixtures/golden (tests/test_codec_registry.py asks for all three).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, ClassVar, Protocol

import torch
import torch.nn.functional as F

from ..constants import BASE_PLANES_ZSTD
from ..dtypes import compute_dtype
from ..errors import UsageError

ArraySpec = tuple[str, tuple[int, ...]]  # (safetensors dtype, shape)


@dataclass(frozen=True)
class SparseDelta:
    """A decoded delta defined only at ``positions`` (ascending int64), where it is ``values``
    (compute dtype). Synthesis changes only those elements: the others keep the base's bits."""

    positions: torch.Tensor
    values: torch.Tensor


class ExactDelta(ABC):
    """A decoded delta that is no float: what turns the base's bits into the member's exact
    bits (a lossless codec's residual). A float delta cannot do that: ``cast(base + delta)``
    rounds, and ``member - base`` may not even be representable."""

    @abstractmethod
    def apply(self, base: torch.Tensor) -> torch.Tensor:
        """The member, flattened, in the base's dtype and on its device, from the flattened
        base."""


Decoded = torch.Tensor | SparseDelta | ExactDelta


def densify(decoded: Decoded, numel: int) -> torch.Tensor:
    """A float delta as a dense tensor, zeros where it is not defined."""
    if isinstance(decoded, torch.Tensor):
        return decoded
    out = torch.zeros(numel, dtype=decoded.values.dtype, device=decoded.values.device)
    return out.index_copy_(0, decoded.positions, decoded.values)


@dataclass(frozen=True)
class Calibration:
    """What a calibrated encoder knows of the inputs one member (expert) sees: the second
    moment ``hessian`` = XᵀX of the projection's inputs, ``[in, in]`` float32, over ``tokens``
    tokens. Encoders that ignore it write the same bytes as without it.

    ``base``: the group's base, flattened, in the compute dtype (``encode_group`` fills it in):
    a member is stored as cast(base + δ̂), and calibrated encoders compensate that rounding too.
    """

    hessian: torch.Tensor
    tokens: int
    base: torch.Tensor | None = None

    def fits(self, numel: int) -> bool:
        """Whether a member of ``numel`` elements is a matrix [numel / in, in] this calibration
        describes the inputs of (a member of another shape is encoded uncalibrated)."""
        cols = self.hessian.shape[0]
        return (self.tokens > 0 and self.hessian.dim() == 2 and cols > 0
                and self.hessian.shape[1] == cols and numel % cols == 0
                and (self.base is None or self.base.numel() == numel))


@dataclass(frozen=True)
class Option:
    """One setting a codec takes from a user: a field of its spec, and what the CLI builds a
    flag from. ``name`` is the spec's field and the ``param`` of the errors about it;
    ``default`` None with ``required`` means the user must give it; ``choices`` the values
    allowed (None: any of ``type``, checked by the codec)."""

    name: str
    type: type
    default: Any
    help: str
    choices: tuple[Any, ...] | None = None
    required: bool = False


class GroupShape(Protocol):
    """What a spec needs to know of a group to give its parameters (an ``ExpertGroup``)."""

    @property
    def numel(self) -> int: ...

    @property
    def shape(self) -> tuple[int, ...]: ...

    @property
    def members(self) -> Sequence[Any]: ...  # each with a ``label``


@dataclass(frozen=True)
class CodecSpec:
    """One codec's settings as a user gives them, before any data is read. Subclasses are
    frozen dataclasses whose fields are their codec's ``options``, with a ``codec`` name."""

    codec: ClassVar[str]

    @property
    def impl(self) -> type[DeltaCodec]:
        return get_codec(self.codec)

    def check(self) -> None:
        """Raise UsageError (naming the parameter) when a setting is out of range."""
        self.impl.check(self)

    def settings(self) -> dict:
        """The parameters that do not depend on a group, as a manifest records them."""
        raise NotImplementedError

    def params(self, group: GroupShape) -> dict:
        """The codec parameters for ``group`` (before encoding: some are set by it)."""
        raise NotImplementedError

    @property
    def label(self) -> str:
        """The setting's short name: "drop 0.9", "2-bit", "lossless"."""
        return self.impl.label(self.settings())


class DeltaCodec(ABC):
    """One way of storing the deltas of a group. Subclasses register themselves by ``name``."""

    name: ClassVar[str]
    spec: ClassVar[type[CodecSpec]]
    # The settings a user gives (the spec's fields), for the CLI's flags and its help.
    options: ClassVar[tuple[Option, ...]] = ()
    # How the writer stores the group's base with this codec (docs/FORMAT.md, "Encoded bases"),
    # and the zstd level it uses (None: the optimal parser).
    base_encoding: ClassVar[str] = BASE_PLANES_ZSTD
    base_level: ClassVar[int | None] = 1
    # Whether a layer computes best as x W_baseᵀ + ``apply`` rather than with the member
    # synthesized (the runtime's "auto" mode): true where Δ is cheaper than W to apply.
    factored: ClassVar[bool] = False
    registry: ClassVar[dict[str, type[DeltaCodec]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "name" in vars(cls):  # not the abstract families (ExactCodec)
            DeltaCodec.registry[cls.name] = cls

    # --- settings ------------------------------------------------------------------------------

    @classmethod
    def check(cls, spec: CodecSpec) -> None:
        """Validate a user's settings: every declared choice here, ranges in subclasses."""
        for opt in cls.options:
            value = getattr(spec, opt.name)
            if value is not None and opt.choices is not None and value not in opt.choices:
                raise UsageError(f"{opt.name} must be one of "
                                 f"{', '.join(map(str, opt.choices))}, got {value!r}",
                                 param=opt.name)

    @classmethod
    @abstractmethod
    def label(cls, params: Mapping[str, Any]) -> str:
        """A short human name of a setting, from its parameters (a manifest's, or a spec's
        ``settings()``): "drop 0.9", "2-bit"."""

    # --- what is stored ------------------------------------------------------------------------

    @classmethod
    @abstractmethod
    def validate(cls, params: dict, members: int, numel: int) -> None:
        """Raise ValueError when parameters (from a manifest or a user) are out of range."""

    @classmethod
    @abstractmethod
    def arrays(cls, params: dict, members: int, numel: int, dtype: str) -> dict[str, ArraySpec]:
        """The arrays stored for a group, by suffix: dtype and shape, before any data is read."""

    # --- encoding ------------------------------------------------------------------------------

    @classmethod
    @abstractmethod
    def encode_member(cls, delta: torch.Tensor, dtype: str, params: dict, member: int,
                      calib: Calibration | None = None
                      ) -> tuple[dict[str, torch.Tensor], Decoded]:
        """Encode one member's flattened delta (compute dtype). Returns its row of every array
        and the delta as decoding will see it, which may reuse ``delta``'s memory (the caller
        gives up ``delta``): the writer measures reconstructions without decoding again.
        ``calib``: the member's inputs, for encoders that weigh errors by them."""

    @classmethod
    def combine(cls, rows: list[dict[str, torch.Tensor]], params: dict, numel: int
                ) -> tuple[dict[str, torch.Tensor], dict]:
        """The stored arrays from every member's rows, and the final parameters. Rows of equal
        length stack into ``[members, ...]``; a codec whose rows vary in length (an entropy
        coder's output) concatenates them and records where each starts in the parameters."""
        return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}, params

    @classmethod
    def member_rows(cls, arrays: Mapping[str, torch.Tensor], params: dict, member: int
                    ) -> dict[str, torch.Tensor]:
        """One member's rows of the stored arrays (the inverse of ``combine``)."""
        return {k: v[member] for k, v in arrays.items()}

    @classmethod
    def encode(cls, deltas: torch.Tensor, dtype: str, params: dict
               ) -> tuple[dict[str, torch.Tensor], dict]:
        """Encode the flattened deltas ``[members, numel]`` of a group of ``dtype`` tensors:
        the stored arrays and the final parameters."""
        cls.validate(params, deltas.shape[0], deltas.shape[1])
        rows = [cls.encode_member(d.clone(), dtype, params, i)[0] for i, d in enumerate(deltas)]
        return cls.combine(rows, params, deltas.shape[1])

    # --- decoding ------------------------------------------------------------------------------

    @classmethod
    @abstractmethod
    def decode(cls, rows: dict[str, torch.Tensor], params: dict, member: int, numel: int,
               dtype: str) -> Decoded:
        """The delta of one member (flattened, compute dtype) from its rows of the arrays:
        dense, or a SparseDelta when it is defined at some positions only."""

    @classmethod
    def synthesize_into(cls, rows: dict[str, torch.Tensor], params: dict, base_c: torch.Tensor,
                        out: torch.Tensor) -> bool:
        """Write the member ``cast(base + delta)`` into ``out`` straight from its rows, when the
        codec has a faster way than ``decode`` followed by synthesis' addition that gives the
        same bits (``base_c``: the base in the compute dtype; ``out``: flat, the group's
        dtype). False when it has none for these arguments: then the generic path runs."""
        return False

    # --- a layer computing with the stored delta -----------------------------------------------

    @classmethod
    def delta(cls, rows: dict[str, torch.Tensor], params: dict, member: int, base: torch.Tensor,
              dtype: str, cache: dict | None = None) -> torch.Tensor:
        """Δ of one member, flattened, in the compute dtype, on the base's device: zero where
        the codec leaves the base. ``cache``: a dict the caller keeps per group, where a codec
        may keep what it derives from parameters alone (sparse positions)."""
        return densify(cls.decode(rows, params, member, base.numel(), dtype),
                       base.numel()).to(base.device)

    @classmethod
    def apply(cls, x: torch.Tensor, rows: dict[str, torch.Tensor], params: dict, member: int,
              base: torch.Tensor, dtype: str, cache: dict | None = None) -> torch.Tensor:
        """x @ Δᵀ for one member of a group of ``[out, in]`` matrices (``base``): what a layer
        adds to x @ W_baseᵀ. Differentiable in ``rows`` (a trained model's deltas)."""
        d = cls.delta(rows, params, member, base, dtype, cache)
        return F.linear(x, d.to(x.dtype).view(base.shape))


class ExactCodec(DeltaCodec):
    """A codec that stores members bit for bit: it encodes each member against the base's
    bits (not a float delta) and decodes to an ExactDelta."""

    @classmethod
    @abstractmethod
    def encode_exact(cls, member: torch.Tensor, base: torch.Tensor, dtype: str, params: dict,
                     index: int) -> tuple[dict[str, torch.Tensor], ExactDelta]:
        """Encode member ``index`` (flattened, in the group's dtype) against the base (the
        same): its row of every array, and what decoding will give."""

    @classmethod
    def encode_member(cls, delta: torch.Tensor, dtype: str, params: dict, member: int,
                      calib: Calibration | None = None
                      ) -> tuple[dict[str, torch.Tensor], Decoded]:
        raise TypeError(f"codec {cls.name!r} encodes members, not deltas: use encode_exact")

    @classmethod
    def delta(cls, rows: dict[str, torch.Tensor], params: dict, member: int, base: torch.Tensor,
              dtype: str, cache: dict | None = None) -> torch.Tensor:
        # The member's bits, not a float delta: Δ is what separates them from the base's.
        flat = base.reshape(-1)
        exact = cls.decode(rows, params, member, flat.numel(), dtype)
        cd = compute_dtype(dtype)
        return exact.apply(flat).to(cd) - flat.to(cd)


def get_codec(name: str) -> type[DeltaCodec]:
    try:
        return DeltaCodec.registry[name]
    except KeyError:
        raise ValueError(f"unknown codec {name!r}") from None


def codec_label(codec: Mapping[str, Any]) -> str:
    """A short human name for a manifest codec record: "drop 0.9", "2-bit"."""
    impl = DeltaCodec.registry.get(codec.get("name"))
    return impl.label(codec.get("params", {})) if impl is not None else str(codec.get("name"))


def spec_fields(spec: type[CodecSpec]) -> list[str]:
    """The settings a spec class holds (its dataclass fields)."""
    return [f.name for f in fields(spec)]


__all__ = ["ArraySpec", "Calibration", "CodecSpec", "Decoded", "DeltaCodec", "ExactCodec",
           "ExactDelta", "GroupShape", "Option", "SparseDelta", "codec_label", "compute_dtype",
           "densify", "get_codec", "spec_fields"]
