"""How a group's base is stored (docs/FORMAT.md, "Encoded bases"): as it is, an array of the
group's dtype and shape, or encoded: byte planes in a zstd frame, about two thirds of its size.
With 4 experts the base is a quarter of the experts' bytes, so every codec stores it encoded;
the lossy ones with a fast zstd level (their arrays are small, the base is most of the work),
lossless with the slower optimal parser (there every byte counts)."""

from __future__ import annotations

import torch

from ..constants import BASE_RAW, DTYPE_BITS
from ..dtypes import TORCH_DTYPES
from ..profile import stage
from .planes import pack, tensor_of, unpack, words_of


def stored_base(base: torch.Tensor, encoding: str, dtype: str, level: int | None = None
                ) -> tuple[torch.Tensor, str]:
    """The array that stores ``base`` (a tensor of ``dtype``) and that array's dtype; ``level``
    as ``planes.pack``."""
    if encoding == BASE_RAW:
        return base, dtype
    with stage("base"):
        frame = pack(words_of(base), level=level)
    return torch.frombuffer(bytearray(frame), dtype=torch.uint8), "U8"


def stored_base_dtype(encoding: str, dtype: str) -> str:
    """The dtype of a stored base array; raw bases also have the group's shape, encoded ones
    are one-dimensional."""
    return dtype if encoding == BASE_RAW else "U8"


def load_base(array: torch.Tensor, encoding: str, dtype: str, numel: int) -> torch.Tensor:
    """The base, flattened, in ``dtype``, from its stored array. Raises ValueError when an
    encoded base does not decode to ``numel`` elements."""
    if encoding == BASE_RAW:
        return array.reshape(-1)
    with stage("base"):
        words = unpack(array.cpu().numpy(), numel, DTYPE_BITS[dtype] // 8)
    return tensor_of(words, TORCH_DTYPES[dtype])

