"""The way save_archive worked before it described the checkpoint in memory (hf/vanilla.py):
synthesize every expert into the transformers module it stands for, write the whole vanilla
checkpoint with transformers' own save_pretrained into a folder, and compress that folder with
the model's encodings given. Kept as the reference the new save_archive must match byte for
byte (tests/test_vanilla.py)."""

from __future__ import annotations

import shutil
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from ders_cli.compress import compress
from ders_cli.decompose import GivenEncoding
from ders_cli.dtypes import DTYPE_NAMES
from ders_cli.families import ROLES, for_model_type
from ders_cli.hf.experts import DersExperts, DersSharedExpert
from ders_cli.hf.side_files import carried, write_side_files
from ders_cli.hf.skeleton import parameters_on_meta, quiet_transformers
from ders_cli.records import ExpertGroup, Member


def reference_save_archive(model: nn.Module, out: Path, folder: Path, side_files=(),
                           shard_size: str = "50GB"):
    """``folder`` (which must not exist) holds the vanilla checkpoint; its name is the
    archive's source name."""
    layout = for_model_type(model.config.model_type)
    blocks = [(i, layer.mlp.experts) for i, layer in enumerate(model.model.layers)
              if isinstance(getattr(layer.mlp, "experts", None), DersExperts)]
    given = []
    for layer, experts in blocks:
        shared = isinstance(getattr(model.model.layers[layer].mlp, "shared_expert", None),
                            DersSharedExpert)
        for role, proj in experts.projections.items():
            names = [layout.expert_name(layer, e, role) for e in range(experts.num_experts)]
            if shared:
                names.append(layout.shared_name(layer, role))
            base = proj.base.detach().cpu()
            group = ExpertGroup(layout.expert_name(layer, "{E}", role),
                                tuple(Member(n) for n in names), tuple(range(len(names))),
                                DTYPE_NAMES[base.dtype], tuple(base.shape))
            codec, params, arrays = proj.encoding()
            given.append(GivenEncoding(group, base, codec, params, arrays))
    folder.mkdir(parents=True)
    with _vanilla_view(model, blocks), quiet_transformers():
        _save_plain(model, folder, shard_size)
    given_names = {Path(f).name for f in side_files}
    write_side_files({p: data for p, data in carried(model).items() if p not in given_names},
                     folder)
    for f in side_files:
        shutil.copy2(f, folder / Path(f).name)
    return compress(folder, None, out, given=given)


def _save_plain(model: nn.Module, folder: Path, shard_size: str) -> None:
    held = {k: model.__dict__.pop(k) for k in ("hf_quantizer", "_weight_conversions")
            if k in model.__dict__}
    qc = model.config.__dict__.pop("quantization_config", None)
    try:
        type(model).save_pretrained(model, folder, max_shard_size=shard_size)
    finally:
        model.__dict__.update(held)
        if qc is not None:
            model.config.quantization_config = qc


@contextmanager
def _vanilla_view(model: nn.Module, blocks):
    saved = []
    try:
        for layer, experts in blocks:
            block = model.model.layers[layer].mlp
            w = {role: proj.synthesized() for role, proj in experts.projections.items()}
            n = experts.num_experts
            with parameters_on_meta():
                vanilla = experts.vanilla_cls(model.config)
            vanilla.gate_up_proj = nn.Parameter(
                torch.stack([torch.cat([w["gate"][e], w["up"][e]]) for e in range(n)]))
            vanilla.down_proj = nn.Parameter(torch.stack(w["down"][:n]))
            saved.append((block, "experts", experts))
            block.experts = vanilla
            shared = getattr(block, "shared_expert", None)
            if isinstance(shared, DersSharedExpert):
                with parameters_on_meta():
                    mlp = shared.vanilla_cls(model.config,
                                             intermediate_size=w["gate"][n].shape[0])
                for role in ROLES:
                    getattr(mlp, f"{role}_proj").weight = nn.Parameter(w[role][n])
                saved.append((block, "shared_expert", shared))
                block.shared_expert = mlp
        yield model
    finally:
        for block, attr, module in reversed(saved):
            setattr(block, attr, module)
