"""ders expand ARCHIVE"""

from __future__ import annotations

import time

from ..expand import expand
from .console import RichReporter, human_bytes, out, print_json, reported, shown
from .options import ArchiveArg, DeviceOpt, ForceOpt, JsonOpt, OutOpt, QuietOpt


def expand_cmd(archive: ArchiveArg, out_path: OutOpt = None, device: DeviceOpt = "auto",
               force: ForceOpt = False, json: JsonOpt = False, quiet: QuietOpt = False) -> None:
    """Write the dense checkpoint back: same shards, names, dtypes, index and side files."""
    start = time.perf_counter()
    with reported():
        result = expand(archive, out_path, overwrite=force, device=device,
                        reporter=RichReporter(quiet or json))
    if json:
        print_json(result.to_dict())
        return
    out.print(f"wrote [bold]{shown(result.folder)}[/]: {len(result.files)} files, "
              f"{human_bytes(result.bytes_written)}, in {time.perf_counter() - start:.1f} s")
