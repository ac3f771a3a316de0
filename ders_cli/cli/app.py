"""The ``ders`` Typer application: commands only parse, call the library and print."""

from __future__ import annotations

import os
import sys

import typer

from .compress_cmd import compress_cmd, quantize_cmd
from .console import err
from .expand_cmd import expand_cmd
from .inspect_cmd import inspect
from .upcycle_cmd import upcycle_cmd
from .verify_cmd import verify_cmd

app = typer.Typer(
    name="ders",
    help="Make upcycled Mixture-of-Experts checkpoints small: one base per expert group plus "
         "light deltas (DeRS).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
app.command("inspect")(inspect)
app.command("compress")(compress_cmd)
app.command("quantize")(quantize_cmd)
app.command("expand")(expand_cmd)
app.command("verify")(verify_cmd)
app.command("upcycle")(upcycle_cmd)


def main() -> None:
    """Entry point: a user never sees a traceback unless DERS_DEBUG is set."""
    try:
        app()
    except KeyboardInterrupt:
        err.print("ders: interrupted; nothing was written")
        sys.exit(130)
    except SystemExit:
        raise
    except Exception as exc:
        if os.environ.get("DERS_DEBUG"):
            raise
        err.print(f"ders: internal error: {type(exc).__name__}: {exc} "
                  "(set DERS_DEBUG=1 for a traceback)", soft_wrap=True, markup=False)
        sys.exit(3)
