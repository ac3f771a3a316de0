"""The ``ders`` Typer application: commands only parse, refuse conflicting flags, call the
library and print.

Adding a command: a module ``cli/<name>_cmd.py`` with the command function (library imports
inside it, so that ``ders --help`` stays free of torch) and an ``EXAMPLES`` epilog, then one
entry in ``COMMANDS`` below; docs/CLI.md is regenerated with ``python -m ders_cli.cli.reference``
(a test fails until it is).
"""

from __future__ import annotations

from typing import Annotated

import typer

from .. import __version__
from ..constants import FORMAT_VERSION
from . import compress_cmd, eval_cmd, expand_cmd, inspect_cmd, upcycle_cmd, verify_cmd
from .main import main  # noqa: F401  (the entry point lives apart, to handle Ctrl-C early)

app = typer.Typer(
    name="ders",
    help="Make upcycled Mixture-of-Experts checkpoints small: one base per expert group plus "
         "light deltas (DeRS).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)

# name -> (function, examples shown after its help)
COMMANDS = {
    "inspect": (inspect_cmd.inspect_cmd, inspect_cmd.EXAMPLES),
    "compress": (compress_cmd.compress_cmd, compress_cmd.COMPRESS_EXAMPLES),
    "quantize": (compress_cmd.quantize_cmd, compress_cmd.QUANTIZE_EXAMPLES),
    "expand": (expand_cmd.expand_cmd, expand_cmd.EXAMPLES),
    "verify": (verify_cmd.verify_cmd, verify_cmd.EXAMPLES),
    "upcycle": (upcycle_cmd.upcycle_cmd, upcycle_cmd.EXAMPLES),
    "eval": (eval_cmd.eval_cmd, eval_cmd.EXAMPLES),
}
for _name, (_function, _examples) in COMMANDS.items():
    app.command(_name, epilog=_examples)(_function)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"ders {__version__} (archive format version {FORMAT_VERSION})")
        raise typer.Exit()


@app.callback()
def _options(
    version: Annotated[bool, typer.Option(
        "--version", callback=_print_version, is_eager=True,
        help="Print ders' version and the newest archive format it reads, and exit.")] = False,
) -> None:
    pass
