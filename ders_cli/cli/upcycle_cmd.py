"""ders upcycle DENSE -o OUT --experts N --top-k K --mode lowrank|sparse [--rank R | --rate P]"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from .console import RichReporter, human_bytes, out, print_json, reported, shown
from .options import (
    DEFAULT_DIGEST,
    CacheDirOpt,
    DigestOpt,
    ForceOpt,
    JsonOpt,
    QuietOpt,
    RevisionOpt,
    TokenOpt,
    UpcycleMode,
    examples,
    out_option,
    refuse,
)

DenseArg = Annotated[str, typer.Argument(
    metavar="DENSE", show_default=False,
    help="A dense Llama, Mistral or Qwen2-style model folder (config.json + safetensors), or "
         "a Hugging Face Hub repo id.")]

EXAMPLES = examples(
    "ders upcycle ./dense -o moe.ders --experts 8 --mode lowrank --rank 4    # DeRS-LM",
    "ders upcycle ./dense -o moe.ders --mode sparse --rate 0.9999            # DeRS-SM")


def upcycle_cmd(
    ctx: typer.Context,
    dense: DenseArg,
    out_path: Annotated[Path, out_option("The .ders archive to write.")],
    experts: Annotated[int, typer.Option("--experts", metavar="N",
                                         help="Experts per MoE layer.")] = 4,
    top_k: Annotated[int, typer.Option("--top-k", metavar="K",
                                       help="Experts each token is routed to.")] = 2,
    mode: Annotated[UpcycleMode, typer.Option(
        "--mode", help="lowrank (DeRS-LM: A random, B zero) or sparse (DeRS-SM: fixed random "
                       "positions, zero values).")] = UpcycleMode.lowrank,
    rank: Annotated[int, typer.Option("--rank", metavar="R",
                                      help="With --mode lowrank: the deltas' rank.")] = 4,
    rate: Annotated[float, typer.Option(
        "--rate", metavar="P",
        help="With --mode sparse: the deltas' drop rate; each keeps n(1-P) positions.")] = 0.9999,
    every: Annotated[int, typer.Option(
        "--every", metavar="N", help="Make every N-th layer a MoE layer (0, N, 2N, ...).")] = 1,
    universal: Annotated[bool, typer.Option(
        "--universal", help="Add an always-on universal FFN beside the experts (Qwen2-MoE "
                            "shared expert), in the same DeRS group.")] = False,
    seed: Annotated[int, typer.Option("--seed", metavar="N",
                                      help="Seed of routers, masks and A.")] = 0,
    revision: RevisionOpt = None,
    token: TokenOpt = None,
    cache_dir: CacheDirOpt = None,
    digest: DigestOpt = DEFAULT_DIGEST,
    force: ForceOpt = False,
    json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Upcycle a dense model into a DeRS MoE archive that trains.

    Every (or every N-th) FFN becomes a Mixtral or Qwen2-MoE block whose experts are one
    shared weight plus a low-rank or sparse increment each; train it with
    ders_cli.training.load_trainable and save it with save_archive."""
    with reported():
        if mode is UpcycleMode.lowrank:
            refuse(ctx, ("rate",), "to --mode sparse", instead="--mode lowrank")
        else:
            refuse(ctx, ("rank",), "to --mode lowrank", instead="--mode sparse")
    from ..training.archive_io import upcycle_checkpoint
    from ..training.upcycle import UpcycleSpec

    spec = UpcycleSpec(experts=experts, top_k=top_k, mode=mode.value, rate=rate, rank=rank,
                       every=every, universal=universal, seed=seed)
    start = time.perf_counter()
    with reported():
        result = upcycle_checkpoint(dense, out_path, spec, overwrite=force,
                                    reporter=RichReporter(quiet or json), revision=revision,
                                    token=token, cache_dir=cache_dir, digest=digest.value)
    if json:
        doc = result.to_dict()
        doc["seconds"] = time.perf_counter() - start
        print_json(doc)
        return
    stored = sum(g.stored_bytes for g in result.groups)
    members = result.groups[0].members if result.groups else 0
    out.print(f"wrote [bold]{shown(result.archive)}[/]: {len(result.groups)} expert groups of "
              f"{members} members, {human_bytes(stored)} of shared FFNs and deltas, "
              f"{human_bytes(result.archive_bytes)} in all, in {time.perf_counter() - start:.1f} s")
    out.print(f"train it: ders_cli.training.load_trainable({str(result.archive)!r}); "
              "then ders_cli.training.save_archive(model, OUT) and 'ders expand OUT'")
