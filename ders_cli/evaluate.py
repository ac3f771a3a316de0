"""``ders eval``: does the model still work? Perplexity of the original model and of each archive
on the user's text, and, layer by layer, how much of what each expert computes is lost.

- Perplexity: the text (``calibration.text``) is cut into sequences of ``seq_len`` tokens; each
  model predicts every token of a sequence from those before it; perplexity is exp of the mean
  negative log-likelihood over all predicted tokens. The original is loaded by transformers
  from the model folder; an archive runs straight from the archive through ders' runtime
  (``runtime.load_from_archive``: experts synthesized from base and delta as they are used, no
  expanded copy anywhere), so the figure is that of the model ``ders expand`` would write.
- Per layer and projection: the original model reads the text one decoder layer at a time
  (``calibration.sequential``); every expert's projection sees the inputs the router sent it,
  and for each archive ``||X (W − Ŵ)ᵀ|| / ||X Wᵀ||`` (output error) and
  ``||X (W − Ŵ)ᵀ|| / ||X (W − W_mean)ᵀ||`` (share lost: 1.0 is as bad as dropping every delta,
  W_mean the mean of the group's experts) are measured; the table shows the largest over the
  experts. Weight error is a proxy; these are what the next layer receives.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .archive import ArchiveReader
from .calibration.sequential import LoadedLayers, read_layers
from .calibration.text import TokenizedText, model_tokenizer, tokenize_text
from .checkpoint import Checkpoint, open_checkpoint
from .codecs import codec_label
from .device import resolve_device
from .dtypes import TORCH_DTYPES
from .errors import InputError, UsageError
from .families import for_model_type
from .groups import group_arrays
from .progress import Reporter, Silent

DEFAULT_MAX_TOKENS = 8192
DEFAULT_SEQ_LEN = 512
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ModelScore:
    """One model's perplexity on the text."""

    name: str  # "original" or the archive's path
    setting: str  # what the archive stores: "2-bit", "drop 0.9", "2-bit, calibrated", ...
    size_bytes: int  # the checkpoint on disk, or the archive
    nll: float  # mean negative log-likelihood of a token, in nats
    calibration: dict | None = None  # the archive's calibration record, if calibrated

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll)


@dataclass
class ProjectionFidelity:
    """What one archive loses of one projection of one MoE layer, on the text's inputs."""

    archive: str
    layer: int
    projection: str  # "gate", "up" or "down"
    group: str  # the group's key
    setting: str
    members: int
    output_error: float  # max over members of ||X(W - Ŵ)ᵀ|| / ||X Wᵀ||
    share_lost: float  # max over members of ||X(W - Ŵ)ᵀ|| / ||X(W - W_mean)ᵀ||
    min_tokens: int  # the fewest tokens any member saw


@dataclass
class EvalResult:
    model: str
    text: dict  # source, tokens, seq_len, documents, text_sha256
    device: str
    dtype: str
    scores: list[ModelScore] = field(default_factory=list)
    layers: list[ProjectionFidelity] = field(default_factory=list)

    @property
    def original(self) -> ModelScore:
        return self.scores[0]

    def change(self, score: ModelScore) -> float:
        """Relative change of perplexity against the original: +0.012 is +1.2%."""
        return score.perplexity / self.original.perplexity - 1.0

    def to_dict(self) -> dict:
        d = asdict(self)
        for s, doc in zip(self.scores, d["scores"], strict=True):
            doc["perplexity"] = s.perplexity
            doc["change"] = self.change(s)
        return d


def evaluate(model: str | Path, archives: list[str | Path], text: str | Path, *,
             max_tokens: int = DEFAULT_MAX_TOKENS, seq_len: int = DEFAULT_SEQ_LEN,
             batch: int = 4, device: str = "auto", dtype: str | None = None,
             layers: bool = True, reporter: Reporter | None = None) -> EvalResult:
    """Perplexity of ``model`` and of each archive of it on ``text`` (a file or a folder of
    text files), and with ``layers`` the output error of every archive's experts on the inputs
    they see while the original reads that text.

    ``dtype``: the compute dtype ("float32", "bfloat16", "float16"); default float32 on the
    CPU and the checkpoint's own on a GPU. ``batch``: sequences per forward pass.
    """
    if batch < 1:
        raise UsageError(f"batch must be at least 1, got {batch}", param="batch")
    reporter = reporter or Silent()
    where = resolve_device(device)
    ckpt = open_checkpoint(model)
    readers = [ArchiveReader(a) for a in archives]
    try:
        for r in readers:
            _check_same_model(r, ckpt)
        compute = _compute_dtype(dtype, where, ckpt, readers)
        tok = model_tokenizer(ckpt.root, "ders eval")
        ids = tokenize_text(text, tok, max_tokens=max_tokens, seq_len=seq_len)
        result = EvalResult(str(model), {"source": str(text), **ids.record()}, str(where),
                            str(compute).removeprefix("torch."))
        reporter.start("eval", len(readers) + 1, len(readers) + 1)
        original = _load_original(ckpt, compute, where)
        result.scores.append(ModelScore("original", "original", ckpt.disk_bytes,
                                        perplexity_nll(original, ids.ids, batch, where)))
        reporter.advance(1, 1)
        if layers and readers:
            result.layers = _layer_fidelity(original, ckpt, readers, ids, batch, where)
        del original
        for r in readers:
            m = _load_archive(r.path, where, compute)
            calibration = calibration_record(r)
            result.scores.append(ModelScore(str(r.path), archive_setting(r), r.size,
                                            perplexity_nll(m, ids.ids, batch, where),
                                            calibration))
            del m
            reporter.advance(1, 1)
    finally:
        for r in readers:
            r.close()
    reporter.finish()
    return result


def perplexity_nll(model: torch.nn.Module, ids: torch.Tensor, batch: int,
                   device: torch.device) -> float:
    """Mean negative log-likelihood (nats) of every token after the first of each sequence."""
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, ids.shape[0], batch):
            x = ids[i : i + batch].to(device)
            logits = model(input_ids=x, use_cache=False).logits[:, :-1].float()
            loss = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum")
            total += float(loss)
            count += x[:, 1:].numel()
    return total / count


def archive_setting(reader: ArchiveReader) -> str:
    """What an archive stores, in words: one label when every group has the same, "mixed"
    otherwise; ", calibrated" when its codes were fitted to a text."""
    labels = sorted({codec_label(g.codec) for g in reader.manifest.groups})
    label = labels[0] if len(labels) == 1 else ("mixed: " + ", ".join(labels) if labels
                                                  else "as it is")
    if calibration_record(reader) is not None:
        label += ", calibrated"
    return label


def _check_same_model(reader: ArchiveReader, ckpt: Checkpoint) -> None:
    ours = set(reader.manifest.tensors)
    theirs = set(ckpt.where)
    if ours != theirs:
        extra = sorted(ours - theirs) or sorted(theirs - ours)
        raise InputError(f"holds another model than {ckpt.root} (tensor {extra[0]!r} is in one "
                         "and not the other)", reader.path)


def _compute_dtype(dtype: str | None, where: torch.device, ckpt: Checkpoint,
                   readers: list[ArchiveReader]) -> torch.dtype:
    if dtype is not None:
        if dtype not in DTYPES:
            raise UsageError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}",
                             param="dtype")
        return DTYPES[dtype]
    if where.type == "cpu":
        return torch.float32  # bf16 matrix products are slow on most CPUs
    for r in readers:
        for g in r.manifest.groups:
            return TORCH_DTYPES[g.dtype]
    name = (ckpt.config or {}).get("torch_dtype") or (ckpt.config or {}).get("dtype")
    return DTYPES.get(str(name), torch.float32)


def _load_original(ckpt: Checkpoint, dtype: torch.dtype, where: torch.device
                   ) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    from .hf.skeleton import no_empty_module_warning, quiet_transformers

    # No progress bar in the middle of eval's own report.
    with quiet_transformers(errors_only=False), no_empty_module_warning():
        model = AutoModelForCausalLM.from_pretrained(ckpt.root, dtype=dtype)
    model.eval()
    return model.to(where)


def _load_archive(path: Path, where: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    from .runtime import load_from_archive

    return load_from_archive(path, dtype=dtype, device=str(where))


def calibration_record(reader: ArchiveReader) -> dict | None:
    """The archive's record of the text it was calibrated on (informative; from a stranger's
    archive, so only the known fields of the known types are kept)."""
    doc = reader.manifest.extra.get("calibration")
    if not isinstance(doc, dict):
        return None
    known = {"tokens": int, "seq_len": int, "documents": int, "text_sha256": str}
    return {k: v for k, v in doc.items()
            if k in known and isinstance(v, known[k]) and not isinstance(v, bool)
            and (not isinstance(v, str) or len(v) <= 64)}


def _layer_fidelity(model: torch.nn.Module, ckpt: Checkpoint, readers: list[ArchiveReader],
                    ids: TokenizedText, batch: int, where: torch.device
                    ) -> list[ProjectionFidelity]:
    family = for_model_type(str(model.config.model_type))
    if family is None:
        return []
    # Each archive's groups by the layer their members belong to.
    by_layer: dict[int, list[tuple[ArchiveReader, Any, list[tuple[int | None, str]]]]] = {}
    for r in readers:
        for g in r.manifest.groups:
            where_ = [family.parse(m.tensor) if m.slice is None else None for m in g.members]
            if any(w is None for w in where_) or len({(w[0], w[2]) for w in where_}) != 1:
                continue  # not one projection of one layer as this family names it
            by_layer.setdefault(where_[0][0], []).append(
                (r, g, [(w[1], w[2]) for w in where_]))
    out: list[ProjectionFidelity] = []
    with torch.no_grad():
        for li in read_layers(LoadedLayers(model), ids.ids, batch=batch, device=where):
            out += _layer_rows(li, by_layer.get(li.layer, []), where)
    return out


def _layer_rows(li: Any, groups: list, where: torch.device) -> list[ProjectionFidelity]:
    """One row per archive group of this layer: its members' errors on their own inputs."""
    out = []
    for r, g, members in groups:
        role = members[0][1]
        parts = group_arrays(r, g, where)
        originals = [_original(li, e, role) for e, _ in members]
        experts = [w for (e, _), w in zip(members, originals, strict=True) if e is not None]
        mean = torch.stack(experts or originals).mean(0)
        errors, shares, tokens = [], [], []
        for i, ((e, _), w) in enumerate(zip(members, originals, strict=True)):
            x = li.inputs(role, e).to(w.dtype)
            tokens.append(int(x.shape[0]))
            if x.shape[0] == 0:
                continue
            w_hat = parts.member(i).view(g.shape).to(w.dtype)
            err = float(torch.linalg.vector_norm(x @ (w - w_hat).T))
            errors.append(err / max(float(torch.linalg.vector_norm(x @ w.T)), 1e-30))
            own = float(torch.linalg.vector_norm(x @ (w - mean).T))
            shares.append(err / own if own > 0 else 0.0)
        out.append(ProjectionFidelity(
            str(r.path), li.layer, role, g.key, codec_label(g.codec), len(members),
            max(errors, default=0.0), max(shares, default=0.0), min(tokens)))
    return out


def _original(li: Any, expert: int | None, role: str) -> torch.Tensor:
    """The original weight [out, in] of one expert's projection, as the model holds it."""
    if expert is None:
        return getattr(li.shared, f"{role}_proj").weight.detach().float()
    if role == "down":
        return li.experts.down_proj[expert].detach().float()
    gate, up = li.experts.gate_up_proj[expert].detach().float().chunk(2, dim=0)
    return gate if role == "gate" else up
