"""The shape of a synthetic upcycled checkpoint: tensors, shards and headers, from sizes alone.

No torch here: ``bench.run`` plans and checks with this module and keeps its own process small
(a child's peak RSS, as the kernel reports it, starts at the size of the parent that forked it).
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import asdict, dataclass
from pathlib import Path

BF16 = 2  # bytes per element
EXPERT = "model.layers.{L}.block_sparse_moe.experts.{E}.{P}.weight"
PROJS = ("w1", "w2", "w3")  # gate [I, H], down [H, I], up [I, H]
INDEX_FILE = "model.safetensors.index.json"

Shape = tuple[int, ...]


@dataclass(frozen=True)
class Dims:
    hidden: int = 1024
    intermediate: int = 3584
    experts: int = 8
    layers: int = 1
    vocab: int = 32000
    heads: int = 16
    kv_heads: int = 4

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def proj_shape(self, proj: str) -> tuple[int, int]:
        h, i = self.hidden, self.intermediate
        return (h, i) if proj == "w2" else (i, h)

    def replace(self, **changes: int) -> Dims:
        return Dims(**{**asdict(self), **changes})


def tensor_shapes(d: Dims) -> list[tuple[str, Shape]]:
    """Every tensor of the model, in ``state_dict`` order (the order shards are filled in)."""
    h, kv = d.hidden, d.kv_heads * d.head_dim
    out: list[tuple[str, Shape]] = [("model.embed_tokens.weight", (d.vocab, h))]
    for L in range(d.layers):
        p = f"model.layers.{L}."
        out += [(p + "self_attn.q_proj.weight", (h, h)), (p + "self_attn.k_proj.weight", (kv, h)),
                (p + "self_attn.v_proj.weight", (kv, h)), (p + "self_attn.o_proj.weight", (h, h)),
                (p + "block_sparse_moe.gate.weight", (d.experts, h))]
        for e in range(d.experts):
            out += [(EXPERT.format(L=L, E=e, P=proj), d.proj_shape(proj)) for proj in PROJS]
        out += [(p + "input_layernorm.weight", (h,)),
                (p + "post_attention_layernorm.weight", (h,))]
    out += [("model.norm.weight", (h,)), ("lm_head.weight", (d.vocab, h))]
    return out


def model_bytes(d: Dims) -> int:
    return sum(math.prod(s) for _, s in tensor_shapes(d)) * BF16


def dims_for(target_bytes: int, hidden: int = 1024, experts: int = 8) -> Dims:
    """Fixed layer shapes (so the largest expert group is the same at every size), as many
    layers as fit, and a vocabulary that takes up the rest."""
    base = Dims(hidden=hidden, intermediate=hidden * 7 // 2, experts=experts, vocab=0)
    per_layer = model_bytes(base.replace(layers=2)) - model_bytes(base)
    per_token = 2 * hidden * BF16  # one row of the embedding and one of lm_head
    layers = max(1, (target_bytes - 1024 * per_token) // per_layer)
    vocab = (target_bytes - model_bytes(base.replace(layers=layers))) // per_token
    return base.replace(layers=layers, vocab=max(1024, vocab // 64 * 64))


def shard_plan(d: Dims, shard_bytes: int) -> list[list[tuple[str, Shape]]]:
    """Tensors split into shards as transformers does: in model order, a new shard when the
    next tensor would overflow; each shard's tensors sorted by name, as safetensors stores them."""
    shards: list[list[tuple[str, Shape]]] = [[]]
    size = 0
    for name, shape in tensor_shapes(d):
        n = math.prod(shape) * BF16
        if shards[-1] and size + n > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += n
    return [sorted(s) for s in shards]


def shard_name(i: int, count: int) -> str:
    return f"model-{i + 1:05d}-of-{count:05d}.safetensors"


def safetensors_header(tensors: list[tuple[str, Shape]]) -> bytes:
    """The 8-byte length and the JSON header of a bf16 safetensors file, data in list order."""
    header: dict = {"__metadata__": {"format": "pt"}}
    pos = 0
    for name, shape in tensors:
        n = math.prod(shape) * BF16
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [pos, pos + n]}
        pos += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def config(d: Dims) -> dict:
    """A transformers MixtralConfig for these dimensions."""
    return {
        "architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
        "hidden_size": d.hidden, "intermediate_size": d.intermediate,
        "num_hidden_layers": d.layers, "num_attention_heads": d.heads,
        "num_key_value_heads": d.kv_heads, "num_local_experts": d.experts,
        "num_experts_per_tok": 2, "vocab_size": d.vocab, "torch_dtype": "bfloat16",
        "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
    }


@dataclass
class Synthetic:
    """A written checkpoint: where, its dimensions, its files and their total size."""

    folder: Path
    dims: Dims
    files: list[str]
    bytes: int

    @property
    def expert_groups(self) -> list[tuple[int, str]]:
        """(layer, projection) of every group of experts DeRS should find."""
        return [(L, p) for L in range(self.dims.layers) for p in PROJS]

    def to_json(self) -> str:
        return json.dumps({"folder": str(self.folder), "dims": asdict(self.dims),
                           "files": self.files, "bytes": self.bytes})

    @staticmethod
    def from_json(text: str) -> Synthetic:
        doc = json.loads(text)
        return Synthetic(Path(doc["folder"]), Dims(**doc["dims"]), doc["files"], doc["bytes"])
