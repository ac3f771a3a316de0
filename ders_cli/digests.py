"""The hash of an archive's checksums of bytes (stored arrays, tensors, synthesized members):
SHA-256 in format versions 1-3, BLAKE3 from version 4 (docs/FORMAT.md 1 and 9). One home for
which hash a version takes and the names of the fields that hold it.

Why a second hash: a compress hashes about 2.3 bytes per checkpoint byte (every tensor as it is
read, every synthesized member, every stored array), and SHA-256 runs at ~390 MB/s a core on a
CPU without SHA extensions: on a 1.4 GB checkpoint it was the largest stage of compress --drop
(12.4 s of 32.5 s of CPU). BLAKE3 is as strong a checksum against tampering and ran at ~3-4 GB/s
a core on the same machine. The field names say which hash they hold (``sha256``, ``blake3``),
so that no reader takes one for the other. The header and index hashes stay SHA-256 in every
version (a few kilobytes each): so a reader that predates version 4 checks a version-4 header,
reads its version and asks for an upgrade, instead of calling the archive damaged.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import blake3 as _blake3

from .constants import BLAKE3_VERSION
from .errors import UsageError

Bytes = bytes | bytearray | memoryview


@dataclass(frozen=True)
class Digest:
    """One hash as archives use it: ``name`` is also the name (or the suffix of the name) of
    every field that holds one of its checksums (``sha256``, ``recon_sha256``)."""

    name: str
    since: int  # the first format version that takes it (for_version says which takes each)
    _new: Callable[[], Any]

    def new(self) -> Any:
        """An incremental hasher: ``update(bytes)``, ``hexdigest()``; both release the GIL on
        large inputs, so several threads hash at once."""
        return self._new()

    def hex(self, data: Bytes) -> str:
        h = self._new()
        h.update(data)
        return h.hexdigest()

    def takes(self, version: int) -> bool:
        """Whether archives of format ``version`` hold checksums of this hash."""
        return for_version(version) is self

    @property
    def recon_field(self) -> str:
        return f"recon_{self.name}"


SHA256 = Digest("sha256", 1, hashlib.sha256)
BLAKE3 = Digest("blake3", BLAKE3_VERSION, _blake3.blake3)
DIGESTS = (SHA256, BLAKE3)
# What archives are written with unless asked otherwise: the fast one. SHA-256 remains for
# readers older than format version 4 (``digest="sha256"``).
DEFAULT = BLAKE3


def by_name(name: str | Digest) -> Digest:
    """The hash named ``name`` ("blake3" or "sha256")."""
    if isinstance(name, Digest):
        return name
    for d in DIGESTS:
        if d.name == name:
            return d
    raise UsageError(f"digest must be one of {', '.join(d.name for d in DIGESTS)}, got "
                     f"{name!r}", param="digest")


def for_version(version: int) -> Digest:
    """The hash of the checksums of archives of format ``version``."""
    return BLAKE3 if version >= BLAKE3_VERSION else SHA256
