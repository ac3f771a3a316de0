"""What an archive records about how it was made (docs/FORMAT.md 4, informative fields): the
writer (ders' version, the command line), where the checkpoint came from (a Hub repo id and
the commit it was read at) and the settings asked for. A stranger's archive from the Hub says
what it is without its author.

Nothing here depends on where the files were on the writer's disk: the same checkpoint
compressed the same way gives the same bytes anywhere (the golden archives rely on it), and a
published archive does not carry its author's home folder. The command line is recorded as it
was typed, a token masked.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .checkpoint import Checkpoint

WRITER_NAME = "ders"
MASK = "***"
_TOKEN_FLAGS = ("--token",)
# Hugging Face user access tokens: hf_ and 30-odd letters and digits. A token pasted anywhere
# on the command line is masked too, not only after --token.
_HF_TOKEN = re.compile(r"hf_[A-Za-z0-9]{16,}")


def masked_command(argv: Sequence[str]) -> list[str]:
    """``argv`` with every token masked: the value after ``--token``, ``--token=...``, and
    anything that looks like a Hugging Face token."""
    out: list[str] = []
    hide_next = False
    for arg in argv:
        if hide_next:
            out.append(MASK)
            hide_next = False
            continue
        flag, eq, _ = arg.partition("=")
        if flag in _TOKEN_FLAGS:
            if eq:
                out.append(f"{flag}={MASK}")
            else:
                out.append(arg)
                hide_next = True
            continue
        out.append(_HF_TOKEN.sub(MASK, arg))
    return out


def writer_record(command: Sequence[str] | None) -> dict[str, Any]:
    """The manifest's ``writer``: ders' version (read when called: the golden writer pins it)
    and the command line, masked (None for a library call)."""
    import ders_cli

    return {"name": WRITER_NAME, "version": ders_cli.__version__,
            "command": None if command is None else masked_command(command)}


def source_record(ckpt: Checkpoint, settings: dict[str, Any]) -> dict[str, Any]:
    """The manifest's ``source``: the checkpoint's kind and name as before, its Hub repo id and
    commit when it came from the Hub, and the settings asked for."""
    source: dict[str, Any] = {"kind": ckpt.kind, "name": ckpt.name}
    if ckpt.repo_id is not None:
        source["repo_id"] = ckpt.repo_id
        if ckpt.revision is not None:
            source["revision"] = ckpt.revision
    source["settings"] = settings
    return source


def settings_record(spec: Any, *, base: Any, threshold: float, use_shared: bool,
                    all_groups: bool) -> dict[str, Any]:
    """What was asked for, under the library's parameter names: the setting's label, the
    codec's settings (or the per-group target), the base, the upcycled threshold and the two
    group switches. How the work was done (device, workers, shard size) is not recorded: it
    does not change what the archive holds."""
    if spec is None:  # encodings computed elsewhere (a DeRS-trained model, save_archive)
        out: dict[str, Any] = {"setting": "given"}
    else:
        fields = {f.name: getattr(spec, f.name) for f in dataclasses.fields(spec)}
        out = {"setting": spec.label, "codec": spec.codec, **fields}
    out.update(base=base, threshold=threshold, shared=use_shared, all_groups=all_groups)
    return out


def base_label(base: str | Path, dense: Checkpoint | None) -> str:
    """``"mean"``, or the dense checkpoint the bases came from: its repo id (with the commit)
    or its name, never a path on the writer's disk."""
    if dense is None:
        return str(base)
    if dense.repo_id is not None:
        return dense.repo_id + (f"@{dense.revision}" if dense.revision else "")
    return dense.name
