"""The errors ders raises. Each carries the one line a user sees and the exit code it maps to."""

from __future__ import annotations

from pathlib import Path


class DersError(Exception):
    """Base of every error ders reports to a user. ``str(err)`` is the whole message."""

    exit_code = 2

    def __init__(self, message: str, path: str | Path | None = None) -> None:
        self.path = None if path is None else str(path)
        super().__init__(f"{self.path}: {message}" if self.path else message)


class InputError(DersError):
    """A path, file or tensor the user gave cannot be used as it is."""


class UsageError(DersError):
    """Options that make no sense together or lie outside their range.

    ``param`` names the library parameter at fault ("drop", "group_size") and the message begins
    with it ("drop must be in [0, 1), got 1.5"); the CLI names its flag instead ("--drop ...").
    """

    def __init__(self, message: str, path: str | Path | None = None, *,
                 param: str | None = None) -> None:
        self.param = param
        super().__init__(message, path)


class OutputExistsError(DersError):
    """The output path exists and ``--force`` was not given."""


class CorruptArchiveError(InputError):
    """An archive fails a structural or checksum check. ``verify`` turns this into exit 1."""


class InvalidArchiveError(InputError):
    """An archive whose header hash holds but whose manifest breaks a rule of docs/FORMAT.md:
    it was written that way (by a buggy or hostile writer), so no byte of it is trusted. Every
    command refuses it with exit code 2, ``verify`` included: exit 1 is for archives whose
    bytes are not the ones their writer hashed (corruption)."""


class OutputError(DersError):
    """The output cannot be written: the disk is full, a file is too large, no permission."""


class NewerFormatError(InputError):
    """An archive written by a newer ders than this one."""


class VerificationFailed(DersError):
    """``verify`` found a difference or corruption."""

    exit_code = 1
