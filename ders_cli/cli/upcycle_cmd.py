"""ders upcycle DENSE -o OUT --experts N --top-k K --mode lowrank|sparse [--rank R | --rate P]"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from ..training.upcycle import UpcycleSpec
from .console import RichReporter, human_bytes, out, print_json, reported, shown
from .options import ForceOpt, JsonOpt, QuietOpt

DenseArg = Annotated[Path, typer.Argument(
    help="A dense Llama, Mistral or Qwen2-style model folder (config.json + safetensors).",
    show_default=False)]


def upcycle_cmd(
    dense: DenseArg,
    out_path: Annotated[Path, typer.Option("-o", "--out", help="The .ders archive to write.",
                                           show_default=False)],
    experts: Annotated[int, typer.Option("--experts", help="Experts per MoE layer.")] = 4,
    top_k: Annotated[int, typer.Option("--top-k", help="Experts each token is routed to.")] = 2,
    mode: Annotated[str, typer.Option(
        "--mode", help="'lowrank' (DeRS-LM: A random, B zero) or 'sparse' (DeRS-SM: fixed "
                       "random positions, zero values).")] = "lowrank",
    rank: Annotated[int, typer.Option("--rank", help="Rank r of DeRS-LM deltas.")] = 4,
    rate: Annotated[float, typer.Option(
        "--rate", help="Drop rate p of DeRS-SM deltas: each keeps n(1-p) positions.")] = 0.9999,
    every: Annotated[int, typer.Option(
        "--every", help="Make every N-th layer a MoE layer (0, N, 2N, ...).")] = 1,
    universal: Annotated[bool, typer.Option(
        "--universal", help="Add an always-on universal FFN beside the experts (Qwen2-MoE "
                            "shared expert), in the same DeRS group.")] = False,
    seed: Annotated[int, typer.Option("--seed", help="Seed of routers, masks and A.")] = 0,
    force: ForceOpt = False,
    json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Upcycle a dense model into a DeRS MoE archive that trains (ders_cli.training)."""
    from ..training.archive_io import upcycle_checkpoint

    if mode == "vanilla":
        raise typer.BadParameter("an archive holds DeRS experts: use 'lowrank' or 'sparse'",
                                 param_hint="--mode")
    spec = UpcycleSpec(experts=experts, top_k=top_k, mode=mode, rate=rate, rank=rank,
                       every=every, universal=universal, seed=seed)
    start = time.perf_counter()
    with reported():
        result = upcycle_checkpoint(dense, out_path, spec, overwrite=force,
                                    reporter=RichReporter(quiet or json))
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
