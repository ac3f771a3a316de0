"""Options shared by several commands, defined once."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..constants import DEFAULT_UPCYCLED_COS

ModelArg = Annotated[str, typer.Argument(
    help="Model folder of *.safetensors (one file or shards with an index), a single "
         ".safetensors file, or a Hugging Face Hub repo id.", show_default=False)]
ArchiveArg = Annotated[Path, typer.Argument(help="A .ders archive.", show_default=False)]
OutOpt = Annotated[Path | None, typer.Option("-o", "--out", help="Output path.",
                                             show_default=False)]
BaseOpt = Annotated[str, typer.Option(
    "--base", help="'mean' (the element-wise mean of each group) or a dense checkpoint whose "
                   "FFN the experts were upcycled from.")]
ThresholdOpt = Annotated[float, typer.Option(
    "--threshold", help="A group counts as upcycled when every expert has at least this cosine "
                        "to its base; other groups are stored as they are.")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Overwrite the output if it exists.")]
NoSharedOpt = Annotated[bool, typer.Option(
    "--no-shared", help="Keep shared/universal FFNs out of their expert group (no extended "
                        "DeRS), even when they are as similar as the experts.")]
AllGroupsOpt = Annotated[bool, typer.Option(
    "--all-groups", help="Compress every expert group, also those that do not look upcycled "
                         "(experts trained from scratch lose much more).")]
GroupSizeOpt = Annotated[int, typer.Option(
    "--group-size", help="Elements sharing one quantization scale and offset.")]
DeviceOpt = Annotated[str, typer.Option(
    "--device", help="Where the codec arithmetic runs: auto (a CUDA GPU when there is one), "
                     "cpu, cuda, cuda:N.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or warnings.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout.")]

DEFAULT_THRESHOLD = DEFAULT_UPCYCLED_COS
