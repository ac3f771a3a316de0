"""ders expand ARCHIVE"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from .console import RichReporter, human_bytes, out, print_json, reported, shown
from .options import (
    ArchiveArg,
    CacheDirOpt,
    DeviceOpt,
    JsonOpt,
    QuietOpt,
    RevisionOpt,
    TokenOpt,
    WorkersOpt,
    examples,
    out_option,
)

EXAMPLES = examples("ders expand moe.ders                 # writes moe-expanded/",
                    "ders expand moe.ders -o ./moe-restored",
                    "ders expand org/moe-ders --revision v1  # from the Hub: moe-ders-expanded/")


def expand_cmd(
    archive: ArchiveArg,
    out_path: Annotated[Path | None, out_option(
        "The folder to write (default: ARCHIVE's name without .ders plus -expanded, beside "
        "it).")] = None,
    device: DeviceOpt = "auto",
    workers: WorkersOpt = None,
    revision: RevisionOpt = None,
    token: TokenOpt = None,
    cache_dir: CacheDirOpt = None,
    force: Annotated[bool, typer.Option(
        "--force", help="Write into an existing output folder: the archive's files replace "
                        "those of the same name, every other file stays (as hf download "
                        "--local-dir does); refused when the folder holds weights the archive "
                        "does not write, which a loader could mix in.")] = False,
    json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Write the checkpoint back from a .ders archive.

    The same shard files, tensor names, dtypes, index and side files; every expert is checked
    against the checksum recorded when it was encoded."""
    from ..expand import expand

    start = time.perf_counter()
    with reported():
        result = expand(archive, out_path, overwrite=force, device=device, workers=workers,
                        reporter=RichReporter(quiet or json), revision=revision, token=token,
                        cache_dir=cache_dir)
    if json:
        print_json(result.to_dict())
        return
    out.print(f"wrote [bold]{shown(result.folder)}[/]: {len(result.files)} files, "
              f"{human_bytes(result.bytes_written)}, in {time.perf_counter() - start:.1f} s")
