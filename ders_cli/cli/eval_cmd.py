"""ders eval MODEL [ARCHIVE ...] --text PATH"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.markup import escape
from rich.table import Table

from .console import RichReporter, human_bytes, out, print_json, reported
from .options import DeviceOpt, JsonOpt, ModelArg, QuietOpt, examples

if TYPE_CHECKING:
    from ..evaluate import EvalResult

EXAMPLES = examples(
    "ders eval ./moe moe-q2.ders moe-d90.ders --text ./docs     # perplexity of each",
    "ders eval ./moe q1.ders --text notes.txt --max-tokens 32768 --seq-len 1024 --json")

# Defaults repeated here so that `ders --help` needs no torch (tests hold them equal).
DEFAULT_MAX_TOKENS = 8192
DEFAULT_SEQ_LEN = 512


class Dtype(str, Enum):
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


def eval_cmd(
    model: ModelArg,
    text: Annotated[Path, typer.Option(
        "--text", metavar="PATH", show_default=False,
        help="The text to read: a file, or a folder of text files (read in sorted order).")],
    archives: Annotated[list[Path] | None, typer.Argument(
        metavar="ARCHIVE", show_default=False,
        help="Archives of MODEL to evaluate (none: the original alone).")] = None,
    max_tokens: Annotated[int, typer.Option(
        "--max-tokens", metavar="N", help="Read at most this many tokens of the text.")
    ] = DEFAULT_MAX_TOKENS,
    seq_len: Annotated[int, typer.Option(
        "--seq-len", metavar="N", help="Tokens per sequence (each is predicted from its own "
                                       "start).")] = DEFAULT_SEQ_LEN,
    batch: Annotated[int, typer.Option(
        "--batch", metavar="N", help="Sequences per forward pass.")] = 4,
    dtype: Annotated[Dtype | None, typer.Option(
        "--dtype", show_default=False,
        help="Compute dtype (default: float32 on the CPU, the checkpoint's on a GPU).")] = None,
    no_layers: Annotated[bool, typer.Option(
        "--no-layers", help="Perplexity only: skip the per-layer output errors.")] = False,
    device: DeviceOpt = "auto",
    json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Perplexity of a model and of its archives on your text.

    The original is loaded by transformers from MODEL, each archive runs straight from the
    archive (no expanded copy), all read the same tokens with MODEL's tokenizer. Also, per
    layer and projection, what each archive loses of what the experts compute on the inputs
    they see while reading the text: the output error ||X(W - Ŵ)ᵀ|| / ||XWᵀ|| and the share of
    each expert's own contribution lost (1.0: as bad as dropping every delta)."""
    from ..evaluate import evaluate

    with reported():
        result = evaluate(model, list(archives or []), text, max_tokens=max_tokens,
                          seq_len=seq_len, batch=batch, device=device,
                          dtype=dtype.value if dtype else None,
                          layers=not no_layers, reporter=RichReporter(quiet or json))
    if json:
        print_json(result.to_dict())
    else:
        show(result)


def show(r: EvalResult) -> None:
    t = r.text
    table = Table(title=f"Perplexity on {escape(str(t['source']))}: {t['tokens']:,} tokens in "
                        f"{t['tokens'] // t['seq_len']} sequences of {t['seq_len']} "
                        f"({r.device}, {r.dtype})", title_justify="left")
    for col, just in (("model", "left"), ("setting", "left"), ("size", "right"),
                      ("perplexity", "right"), ("change", "right")):
        table.add_column(col, justify=just, overflow="fold")
    for s in r.scores:
        change = "" if s is r.original else f"{r.change(s):+.2%}"
        table.add_row(escape(s.name), escape(s.setting), human_bytes(s.size_bytes),
                      f"{s.perplexity:.4f}", change)
    out.print(table)
    if not r.layers:
        return
    names = {s.name for s in r.scores[1:]}
    layers = Table(title="What each archive loses of the experts' outputs, by layer and "
                         "projection (largest over the experts)", title_justify="left")
    for col, just in (("archive", "left"), ("layer", "right"), ("projection", "left"),
                      ("setting", "left"), ("output error", "right"), ("share lost", "right"),
                      ("tokens (min)", "right")):
        layers.add_column(col, justify=just, overflow="fold")
    for p in sorted(r.layers, key=lambda p: (p.archive, p.layer, p.projection)):
        name = Path(p.archive).name if len(names) > 1 else ""
        layers.add_row(escape(name), str(p.layer), p.projection, escape(p.setting),
                       f"{p.output_error:.2e}", f"{p.share_lost:.3f}", str(p.min_tokens))
    out.print(layers)
