"""What the commands share, defined once: arguments and options with their metavars and
choices, and the check that refuses a flag the chosen mode would ignore.

Nothing here (or in any command module, at import time) loads torch: ``ders --help`` builds
every command's help from these alone. The choices come from constants.py, which the codecs use
too; tests/test_cli_options.py holds each codec's declared options (``Codec.options``) and the
flags equal.
"""

from __future__ import annotations

from collections.abc import Iterable
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from .. import digests
from ..constants import (
    DEFAULT_QUANT_METHOD,
    DEFAULT_UPCYCLED_COS,
    QUANT_METHODS,
    SPARSE_MASKS,
    SPARSE_RESCALES,
)
from ..errors import UsageError


def _choices(name: str, values: Iterable[str]) -> type[Enum]:
    """An Enum of strings, which Typer lists as the option's choices."""
    return Enum(name, [(v, v) for v in values], type=str)


Mask = _choices("Mask", SPARSE_MASKS)
Rescale = _choices("Rescale", SPARSE_RESCALES)
Method = _choices("Method", sorted(QUANT_METHODS))
UpcycleMode = _choices("UpcycleMode", ("lowrank", "sparse"))  # an archive holds DeRS experts
DEFAULT_METHOD = Method(DEFAULT_QUANT_METHOD)
DigestName = _choices("DigestName", [d.name for d in digests.DIGESTS])
DEFAULT_DIGEST = DigestName(digests.DEFAULT.name)


ModelArg = Annotated[str, typer.Argument(
    metavar="MODEL", show_default=False,
    help="A folder of *.safetensors (one file or shards with their index), a single "
         ".safetensors file, or a Hugging Face Hub repo id (org/name; a revision with "
         "--revision, or org/name@REVISION).")]
ArchiveArg = Annotated[str, typer.Argument(
    metavar="ARCHIVE", show_default=False,
    help="A .ders archive: its file, a sharded archive's index (or the name it was written "
         "to), a folder holding one (a ders folder), or a Hugging Face Hub repo id (org/name, "
         "org/name/FILE for one of several).")]
RepoIdOpt = Annotated[str | None, typer.Option(
    "--repo-id", metavar="NAMESPACE/NAME", show_default=False,
    help="With -o DIR/: the Hub repo the folder will be uploaded to, which its model card's "
         "snippets load (default: a placeholder, YOUR-ORG/DIR).")]
RevisionOpt = Annotated[str | None, typer.Option(
    "--revision", metavar="REV", show_default=False,
    help="For a Hub repo id: the branch, tag or commit to read (default: main).")]
TokenOpt = Annotated[str | None, typer.Option(
    "--token", metavar="TOKEN", show_default=False,
    help="Hugging Face token for private or gated repos (default: HF_TOKEN, or the login "
         "saved by hf auth login).")]
CacheDirOpt = Annotated[Path | None, typer.Option(
    "--cache-dir", metavar="DIR", show_default=False,
    help="The Hugging Face cache to read and fill (default: HF_HUB_CACHE, or HF_HOME/hub); "
         "HF_HUB_OFFLINE=1 reads it alone.")]
BaseOpt = Annotated[str, typer.Option(
    "--base", metavar="mean|DENSE",
    help="The base of each group: 'mean' (the element-wise mean of its experts) or a dense "
         "checkpoint whose FFN the experts were upcycled from.")]
ThresholdOpt = Annotated[float, typer.Option(
    "--threshold", metavar="COS",
    help="A group counts as upcycled when every expert has at least this cosine to its base; "
         "other groups are stored as they are.")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Overwrite the output if it exists.")]
NoSharedOpt = Annotated[bool, typer.Option(
    "--no-shared", help="Keep shared/universal FFNs out of their expert group (no extended "
                        "DeRS), even when they are as similar as the experts.")]
AllGroupsOpt = Annotated[bool, typer.Option(
    "--all-groups", help="Compress every expert group, also those that do not look upcycled "
                         "(experts trained from scratch lose much more).")]
GroupSizeOpt = Annotated[int, typer.Option(
    "--group-size", metavar="N", help="Elements sharing one quantization scale and offset.")]
MethodOpt = Annotated[Method, typer.Option(
    "--method", help="mse: clip search and least-squares scales (less error); rtn: min/max "
                     "round to nearest (about 4x faster).")]
DeviceOpt = Annotated[str, typer.Option(
    "--device", metavar="DEVICE", help="Where the codec arithmetic runs: auto (a CUDA GPU "
                                       "when there is one), cpu, cuda, cuda:N.")]
MaxShardSizeOpt = Annotated[str, typer.Option(
    "--max-shard-size", metavar="SIZE",
    help="Split an archive larger than this into shards and an index, as transformers' "
         "save_pretrained does (bytes, or 500MB, 5GB, 2GiB); an archive that fits is one "
         "file.")]
WorkersOpt = Annotated[int | None, typer.Option(
    "--workers", metavar="N", show_default=False,
    help="Threads that compute (default: every core ders may use); the output is the same "
         "whatever their number.")]
DigestOpt = Annotated[DigestName, typer.Option(
    "--digest", help="The hash of the archive's checksums: blake3 (format version 4, hashing "
                     "about 8x faster) or sha256 (format versions 1-3, for readers that predate "
                     "version 4).")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or warnings.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout.")]

DEFAULT_THRESHOLD = DEFAULT_UPCYCLED_COS


def out_option(help: str) -> typer.models.OptionInfo:
    """``-o/--out PATH``; ``help`` names the default."""
    return typer.Option("-o", "--out", metavar="PATH", show_default=False, help=help)


def examples(*lines: str) -> str:
    """A command's epilog: example command lines, shown as they are (``\\b`` keeps click from
    re-wrapping them)."""
    return "Examples:\n\n\b\n" + "\n".join(f"  {line}" for line in lines)


# ---- flags a mode would ignore ------------------------------------------------------------------

def given(ctx: typer.Context, name: str) -> bool:
    """Whether the user set parameter ``name`` (on the command line or from the environment),
    rather than leaving its default."""
    source = ctx.get_parameter_source(name)
    return source is not None and source.name in ("COMMANDLINE", "ENVIRONMENT")


def flag(ctx: typer.Context, name: str) -> str:
    """The flag of parameter ``name`` as the user would type it (its longest spelling)."""
    for p in ctx.command.params:
        if p.name == name:
            return max(p.opts, key=len)
    raise KeyError(name)


def _listed(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def refuse(ctx: typer.Context, names: Iterable[str], only: str, instead: str = "") -> None:
    """Refuse the flags among ``names`` that the user gave: they apply ``only`` (e.g. "with
    --drop") and the chosen mode (``instead``, e.g. "--lossless") would ignore them."""
    flags = [flag(ctx, n) for n in names if given(ctx, n)]
    if flags:
        verb = "applies" if len(flags) == 1 else "apply"
        raise UsageError(f"{_listed(flags)} {verb} only {only}"
                         + (f", not with {instead}" if instead else ""))
