"""The vanilla checkpoint a model with DeRS experts stands for, described without writing it.

``save_archive`` stores a DeRS model as the archive of the checkpoint ``save_pretrained`` would
write for it with every expert synthesized (so that ``ders expand`` gives that checkpoint back,
file for file). It used to write that checkpoint to a temporary folder and compress it: disk as
large as the expanded model, and every expert synthesized twice (for the files, then again to
measure the given encodings). Here the checkpoint is only described: the tensor names, dtypes,
shapes and shard split come from transformers' own save steps run on the model with its experts
as meta tensors (``revert_weight_conversion``, ``split_torch_state_dict_into_shards``), the shard
headers are serialized as safetensors serializes them, and the small side files (config.json,
generation_config.json, the shard index) are written as ``save_pretrained`` writes them. The
tensors' bytes come through a ``TensorSource``: the model's own tensors, and each expert
synthesized once, when compress reads it.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..checkpoint import Checkpoint, Shard
from ..dtypes import DTYPE_NAMES
from ..families import ROLES, Family
from ..safetensors_io import parse_header_bytes, tensor_bytes
from .experts import DersExperts, DersSharedExpert
from .skeleton import parameters_on_meta

# safetensors writes a header's tensors by dtype, in the reverse of its Dtype enum's order,
# then by name (tests/test_vanilla.py checks this against the installed safetensors).
_DTYPE_ORDER = ("BOOL", "F4", "F6_E2M3", "F6_E3M2", "U8", "I8", "F8_E5M2", "F8_E4M3", "F8_E8M0",
                "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "C64", "F64", "I64", "U64")
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
SAVE_METADATA = {"format": "pt"}  # what transformers' save_pretrained puts in every shard
DEFAULT_SHARD_SIZE = "50GB"  # transformers' save_pretrained default


def safetensors_header(tensors: dict[str, tuple[str, tuple[int, ...]]],
                       metadata: dict[str, str] | None) -> bytes:
    """The header bytes (after the length prefix, padding included) safetensors writes for
    tensors of these dtypes and shapes: sorted by dtype (widest enum first), then by name, laid
    out back to back; compact JSON, ``__metadata__`` first; spaces up to a multiple of 8."""
    from ..safetensors_io import tensor_nbytes

    order = sorted(tensors, key=lambda n: (-_DTYPE_ORDER.index(tensors[n][0]), n))
    doc: dict[str, Any] = {}
    if metadata:
        doc["__metadata__"] = metadata
    offset = 0
    for name in order:
        dtype, shape = tensors[name]
        end = offset + tensor_nbytes(dtype, shape)
        doc[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, end]}
        offset = end
    raw = json.dumps(doc, separators=(",", ":"), ensure_ascii=True).encode()
    return raw + b" " * (-len(raw) % 8)


@contextmanager
def plain(model: nn.Module) -> Iterator[nn.Module]:
    """Inside, ``model`` saves as transformers saves a model of its class: without ders'
    ``save_pretrained`` (``hf.saving``), its quantizer or quantization_config (the archive
    holds the checkpoint the model stands for), and without the weight conversions a
    from_pretrained of a ders folder recorded (it saw no expert tensors): transformers'
    defaults name the experts as the family writes them."""
    held = {k: model.__dict__.pop(k) for k in ("hf_quantizer", "_weight_conversions",
                                                "save_pretrained") if k in model.__dict__}
    qc = model.config.__dict__.pop("quantization_config", None)
    try:
        yield model
    finally:
        model.__dict__.update(held)
        if qc is not None:
            model.config.quantization_config = qc


def ders_blocks(model: nn.Module) -> list[tuple[int, DersExperts]]:
    return [(i, layer.mlp.experts) for i, layer in enumerate(model.model.layers)
            if isinstance(getattr(layer.mlp, "experts", None), DersExperts)]


@contextmanager
def vanilla_view(model: nn.Module, blocks: list[tuple[int, DersExperts]]) -> Iterator[None]:
    """Inside, every DeRS expert module is replaced by the transformers module it stands for,
    with its weights as meta tensors of the groups' dtype: the model is the vanilla MoE, whose
    state_dict names and shapes are the checkpoint's, and whose experts hold no memory."""
    saved = []
    try:
        for layer, experts in blocks:
            block = model.model.layers[layer].mlp
            n = experts.num_experts
            gate, up, down = (experts.projections[r] for r in ROLES)
            dtype = gate.base.dtype
            with parameters_on_meta():
                vanilla = experts.vanilla_cls(model.config)
            vanilla.gate_up_proj = nn.Parameter(torch.empty(
                n, gate.shape[0] + up.shape[0], gate.shape[1], dtype=dtype, device="meta"))
            vanilla.down_proj = nn.Parameter(torch.empty(n, *down.shape, dtype=dtype,
                                                         device="meta"))
            saved.append((block, "experts", experts))
            block.experts = vanilla
            shared = getattr(block, "shared_expert", None)
            if isinstance(shared, DersSharedExpert):
                with parameters_on_meta():
                    mlp = shared.vanilla_cls(model.config, intermediate_size=gate.shape[0])
                for role in ROLES:
                    shape = experts.projections[role].shape
                    getattr(mlp, f"{role}_proj").weight = nn.Parameter(
                        torch.empty(shape, dtype=dtype, device="meta"))
                saved.append((block, "shared_expert", shared))
                block.shared_expert = mlp
        yield
    finally:
        for block, attr, module in reversed(saved):
            setattr(block, attr, module)


class ModelSource:
    """The bytes of the described checkpoint's tensors (``groups.TensorSource``): the model's
    own tensors, and experts synthesized when compress reads them, each once (the last few
    are kept for compress's reads of one group, from several threads)."""

    KEEP = 4  # members kept synthesized: compress reads a group's members one after another

    def __init__(self, tensors: dict[str, torch.Tensor],
                 members: dict[str, tuple[DersExperts, str, int]]) -> None:
        self._tensors = tensors  # on-disk name -> the model's tensor
        self._members = members  # on-disk name -> (experts, role, member)
        self._synthesized: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()

    def _bytes(self, name: str) -> memoryview:
        t = self._tensors.get(name)
        if t is not None:
            return tensor_bytes(t.detach().cpu().contiguous())
        with self._lock:
            w = self._synthesized.get(name)
            if w is None:
                experts, role, member = self._members[name]
                w = experts.projections[role].weight(member).cpu()
                self._synthesized[name] = w
                while len(self._synthesized) > self.KEEP:
                    self._synthesized.popitem(last=False)
        return tensor_bytes(w)

    def read_into(self, name: str, offset: int, out: memoryview) -> None:
        out = out.cast("B")
        out[:] = self._bytes(name)[offset:offset + len(out)]

    def chunks(self, name: str) -> Iterator[memoryview]:
        data = self._bytes(name)
        for start in range(0, len(data), 1 << 24):
            yield data[start:start + (1 << 24)]

    def path_of(self, name: str) -> Path:
        return Path("<model>") / name


@dataclass
class Described:
    """A checkpoint described in memory: its shards' headers and a source of their tensors'
    bytes; its side files are the files under ``root``."""

    root: Path
    name: str
    shards: tuple[Shard, ...]
    source: ModelSource

    def checkpoint(self) -> Checkpoint:
        """The Checkpoint compress reads, with the side files under ``root`` now."""
        side = tuple(sorted(p.relative_to(self.root).as_posix()
                            for p in self.root.rglob("*") if p.is_file()))
        where = {t: (i, e) for i, s in enumerate(self.shards) for t, e in s.header.tensors.items()}
        config = json.loads((self.root / "config.json").read_text())
        return Checkpoint(self.root, "folder", self.name, self.shards, side, where, config)


def describe(model: nn.Module, family: Family, root: Path, name: str,
             shard_size: int | str = DEFAULT_SHARD_SIZE) -> Described:
    """The checkpoint ``save_pretrained`` would write for ``model`` with its DeRS experts
    synthesized (``max_shard_size=shard_size``), named ``name``: its side files written under
    ``root`` (config.json, generation_config.json, the shard index when sharded), its shard
    headers, and a source of its tensors' bytes."""
    from huggingface_hub.serialization._base import split_state_dict_into_shards_factory
    from huggingface_hub.serialization._torch import get_torch_storage_id
    from transformers.core_model_loading import revert_weight_conversion
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    blocks = ders_blocks(model)
    with plain(model), vanilla_view(model, blocks):
        # What PreTrainedModel.save_pretrained does before it writes a weight.
        config = model.config
        config.dtype = str(model.dtype).split(".")[1]
        config.architectures = [type(model).__name__]
        config.save_pretrained(root)
        if model.can_generate():
            model.generation_config.save_pretrained(root)
        state = model.state_dict()
        for key in model._keys_to_ignore_on_save or ():
            state.pop(key, None)
        state = remove_tied_weights_from_state_dict(state, model)
        state = revert_weight_conversion(model, state)
        total_parameters = model.num_parameters()

    def storage_id(t: torch.Tensor) -> Any:
        # An expert is a view of its layer's fused tensor, as in the checkpoint's own save.
        if t.device.type == "meta":
            return ("meta", id(t._base if t._base is not None else t))
        return get_torch_storage_id(t)

    def storage_size(t: torch.Tensor) -> int:
        base = t._base if t._base is not None else t
        return base.numel() * base.element_size()

    split = split_state_dict_into_shards_factory(
        state, get_storage_size=storage_size, get_storage_id=storage_id,
        filename_pattern=WEIGHTS_NAME.replace(".safetensors", "{suffix}.safetensors"),
        max_shard_size=shard_size)
    if split.is_sharded:
        index = {"metadata": {"total_parameters": total_parameters, **split.metadata},
                 "weight_map": split.tensor_to_filename}
        (root / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n",
                                       encoding="utf-8")
    experts_of = {layer: experts for layer, experts in blocks}
    tensors, members, shards = {}, {}, []
    for file, names in split.filename_to_tensors.items():
        entries = {}
        for key in names:
            t = state[key]
            entries[key] = (DTYPE_NAMES[t.dtype], tuple(t.shape))
            if t.device.type != "meta":
                tensors[key] = t
                continue
            where = family.parse(key)
            if where is None or where[0] not in experts_of:
                raise ValueError(f"{key!r}: a DeRS expert tensor that {family.name} does not "
                                 "name")
            layer, expert, role = where
            experts = experts_of[layer]
            members[key] = (experts, role, experts.num_experts if expert is None else expert)
        raw = safetensors_header(entries, SAVE_METADATA)
        shards.append(Shard(file, parse_header_bytes(root / file, raw, None)))
    return Described(root, name, tuple(shards), ModelSource(tensors, members))

