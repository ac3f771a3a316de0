"""The interface every delta codec implements, and the registry that finds one by name.

A codec turns the deltas of a group's members (W_i - W_base) into a few stored arrays and back.
Codecs are pure functions of tensors: no I/O, no knowledge of files or names. What a codec
stores is fixed by its parameters before any data is read, so the archive can be planned.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..constants import BASE_PLANES_ZSTD

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


def compute_dtype(dtype: str) -> torch.dtype:
    """Deltas and reconstructions are computed in f64 for F64 tensors, in f32 otherwise."""
    return torch.float64 if dtype == "F64" else torch.float32


class DeltaCodec(ABC):
    """One way of storing the deltas of a group. Subclasses register themselves by ``name``."""

    name: ClassVar[str]
    # How the writer stores the group's base with this codec (docs/FORMAT.md, "Encoded bases"),
    # and the zstd level it uses (None: the optimal parser).
    base_encoding: ClassVar[str] = BASE_PLANES_ZSTD
    base_level: ClassVar[int | None] = 1
    registry: ClassVar[dict[str, type[DeltaCodec]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "name" in vars(cls):  # not the abstract families (ExactCodec)
            DeltaCodec.registry[cls.name] = cls

    @classmethod
    @abstractmethod
    def arrays(cls, params: dict, members: int, numel: int, dtype: str) -> dict[str, ArraySpec]:
        """The arrays stored for a group, by suffix: dtype and shape, before any data is read."""

    @classmethod
    @abstractmethod
    def encode_member(cls, delta: torch.Tensor, dtype: str, params: dict, member: int
                      ) -> tuple[dict[str, torch.Tensor], Decoded]:
        """Encode one member's flattened delta (compute dtype). Returns its row of every array
        and the delta as decoding will see it, which may reuse ``delta``'s memory (the caller
        gives up ``delta``): the writer measures reconstructions without decoding again."""

    @classmethod
    def combine(cls, rows: list[dict[str, torch.Tensor]], params: dict, numel: int
                ) -> tuple[dict[str, torch.Tensor], dict]:
        """The stored arrays from every member's rows, and the final parameters. Rows of equal
        length stack into ``[members, ...]``; a codec whose rows vary in length (an entropy
        coder's output) concatenates them and records where each starts in the parameters."""
        return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}, params

    @classmethod
    def member_rows(cls, arrays: dict[str, torch.Tensor], params: dict, member: int
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

    @classmethod
    @abstractmethod
    def decode(cls, rows: dict[str, torch.Tensor], params: dict, member: int, numel: int,
               dtype: str) -> Decoded:
        """The delta of one member (flattened, compute dtype) from its rows of the arrays:
        dense, or a SparseDelta when it is defined at some positions only."""

    @classmethod
    @abstractmethod
    def validate(cls, params: dict, members: int, numel: int) -> None:
        """Raise ValueError when parameters (from a manifest or a user) are out of range."""


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
    def encode_member(cls, delta: torch.Tensor, dtype: str, params: dict, member: int
                      ) -> tuple[dict[str, torch.Tensor], Decoded]:
        raise TypeError(f"codec {cls.name!r} encodes members, not deltas: use encode_exact")


def get_codec(name: str) -> type[DeltaCodec]:
    try:
        return DeltaCodec.registry[name]
    except KeyError:
        raise ValueError(f"unknown codec {name!r}") from None
