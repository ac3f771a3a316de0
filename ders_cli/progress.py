"""How library functions report progress and warnings without knowing who listens."""

from __future__ import annotations

from typing import Protocol


class Reporter(Protocol):
    def start(self, label: str, total_bytes: int, total_groups: int) -> None: ...

    def advance(self, nbytes: int, groups: int = 0) -> None: ...

    def warn(self, message: str) -> None: ...

    def finish(self) -> None: ...


class Silent:
    """A reporter that drops everything; library results still carry the warnings."""

    def start(self, label: str, total_bytes: int, total_groups: int) -> None:
        pass

    def advance(self, nbytes: int, groups: int = 0) -> None:
        pass

    def warn(self, message: str) -> None:
        pass

    def finish(self) -> None:
        pass
