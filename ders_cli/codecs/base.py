"""The interface every delta codec implements, and the registry that finds one by name.

A codec turns the deltas of a group's members (W_i - W_base) into a few stored arrays and back.
Codecs are pure functions of tensors: no I/O, no knowledge of files or names. What a codec
stores is fixed by its parameters before any data is read, so the archive can be planned.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch

ArraySpec = tuple[str, tuple[int, ...]]  # (safetensors dtype, shape)


def compute_dtype(dtype: str) -> torch.dtype:
    """Deltas and reconstructions are computed in f64 for F64 tensors, in f32 otherwise."""
    return torch.float64 if dtype == "F64" else torch.float32


class DeltaCodec(ABC):
    """One way of storing the deltas of a group. Subclasses register themselves by ``name``."""

    name: ClassVar[str]
    registry: ClassVar[dict[str, type[DeltaCodec]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        DeltaCodec.registry[cls.name] = cls

    @classmethod
    @abstractmethod
    def arrays(cls, params: dict, members: int, numel: int, dtype: str) -> dict[str, ArraySpec]:
        """The arrays stored for a group, by suffix: dtype and shape, before any data is read."""

    @classmethod
    @abstractmethod
    def encode(cls, deltas: torch.Tensor, dtype: str, params: dict) -> dict[str, torch.Tensor]:
        """Encode the flattened deltas ``[members, numel]`` of a group of ``dtype`` tensors."""

    @classmethod
    @abstractmethod
    def decode(cls, rows: dict[str, torch.Tensor], params: dict, member: int, numel: int,
               dtype: str) -> torch.Tensor:
        """The delta of one member (flattened, compute dtype) from its rows of the arrays."""

    @classmethod
    @abstractmethod
    def validate(cls, params: dict, members: int, numel: int) -> None:
        """Raise ValueError when parameters (from a manifest or a user) are out of range."""


def get_codec(name: str) -> type[DeltaCodec]:
    try:
        return DeltaCodec.registry[name]
    except KeyError:
        raise ValueError(f"unknown codec {name!r}") from None
