"""A DeRS model to and from a .ders archive.

``save_archive`` stores the vanilla MoE checkpoint the model stands for (each expert synthesized
exactly as the archive synthesizes it), described in memory (``hf.vanilla``), with the model's
own shared FFNs and deltas as the groups' bases and codec arrays: ``ders expand`` of the
archive gives that vanilla checkpoint back byte for byte, and ``load_trainable`` rebuilds the
DeRS model from it.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from .. import digests
from ..archive import ArchiveReader
from ..codecs import LowRankCodec, SparseCodec, codec_label
from ..compress import CompressResult, compress_checkpoint
from ..constants import INDEX_ALL, INDEX_SEED
from ..decompose import GivenEncoding
from ..dtypes import DTYPE_NAMES, TORCH_DTYPES
from ..errors import InputError, UsageError
from ..families import ROLES, for_model_type
from ..groups import group_arrays
from ..hf.archive_model import ArchiveModel, ExpertSlot, open_archive_model
from ..hf.experts import DersExperts, DersProjection, DersSharedExpert
from ..hf.saving import use_ders_folders
from ..hf.side_files import attach, carried, read_side_files, write_side_files
from ..hf.skeleton import assign, empty_model, quiet_transformers, tie_and_check
from ..hf.vanilla import DEFAULT_SHARD_SIZE, ders_blocks, describe
from ..outputs import check_new_output
from ..progress import Reporter
from ..records import ExpertGroup, Member
from .upcycle import UpcycleSpec, upcycle_model


def save_archive(model: nn.Module, out: str | Path, *, overwrite: bool = False,
                 side_files: Iterable[str | Path] = (), reporter: Reporter | None = None,
                 expanded_shard_size: int | str = DEFAULT_SHARD_SIZE,
                 digest: str = digests.DEFAULT.name) -> CompressResult:
    """Write a model with DeRS experts (from ``upcycle_model``, ``load_trainable``,
    ``load_from_archive`` or ``from_pretrained`` of a ders folder) to a .ders archive.

    The archive holds the checkpoint ``save_pretrained`` would write for the vanilla MoE the
    model stands for (shards of ``expanded_shard_size``, as transformers' ``max_shard_size``),
    with the model's shared FFNs and deltas as its groups' bases and codec arrays: ``ders
    expand`` gives that checkpoint back. Nothing but its small side files is written on the
    way (``hf.vanilla``). ``side_files`` (tokenizer files, a README...) are stored too; a model
    loaded from an archive also keeps that archive's side files (a file of the same name in
    ``side_files`` replaces one of those). ``digest``: the hash of the archive's checksums, as
    ``compress``'s.
    """
    out = Path(out)
    family = for_model_type(model.config.model_type)
    blocks = ders_blocks(model)
    if family is None or not blocks:
        raise UsageError("the model has no DeRS experts: save a vanilla MoE with "
                         "save_pretrained and compress it with 'ders compress'")
    given = []
    for layer, experts in blocks:
        shared = isinstance(getattr(model.model.layers[layer].mlp, "shared_expert", None),
                            DersSharedExpert)
        for role, proj in experts.projections.items():
            names = [family.expert_name(layer, e, role) for e in range(experts.num_experts)]
            if shared:
                names.append(family.shared_name(layer, role))
            base = proj.base.detach().cpu()
            group = ExpertGroup(family.expert_name(layer, "{E}", role),  # type: ignore[arg-type]
                                tuple(Member(n) for n in names), tuple(range(len(names))),
                                DTYPE_NAMES[base.dtype], tuple(base.shape))
            codec, params, arrays = proj.encoding()
            given.append(GivenEncoding(group, base, codec, params, arrays, synthesized=True))
    parent = out.parent if str(out.parent) else Path(".")
    # The side files only (a few small files): they are read from a folder.
    with tempfile.TemporaryDirectory(prefix=".ders-save-", dir=parent) as tmp:
        root = Path(tmp)
        with quiet_transformers():  # an inner step, not the user's
            described = describe(model, family, root, out.name.split(".")[0],
                                 expanded_shard_size)
        given_names = {Path(f).name for f in side_files}
        write_side_files({p: data for p, data in carried(model).items()
                          if p not in given_names}, root)
        for f in side_files:
            shutil.copy2(f, root / Path(f).name)
        return compress_checkpoint(described.checkpoint(), described.source, None, out,
                                   given=given, overwrite=overwrite, reporter=reporter,
                                   digest=digest)


def load_trainable(archive: str | Path, *, dtype: torch.dtype | None = None) -> nn.Module:
    """The DeRS model an archive holds, ready to train: shared FFNs and deltas as parameters.

    Every expert group must use the ``sparse`` or ``lowrank`` codec (a DeRS archive, or a
    ``ders compress --drop`` one, whose rescaled values then start the value vectors).
    """
    with ArchiveReader(archive) as reader:
        am = open_archive_model(reader)
        groups = [s.group for s in am.slots.values() if s.group is not None]
        if not groups:
            raise InputError("has no expert groups to train", reader.path)
        dtype = dtype or TORCH_DTYPES[groups[0].dtype]
        model = empty_model(am.config, dtype)
        assign(model, {n: t.to(dtype) for n, t in am.tensors().items()}, trainable=True)
        for layer in am.layers:
            _load_block(am, model, layer, dtype)
        tie_and_check(model)
        attach(model, read_side_files(reader))
    use_ders_folders(model)
    return model


def _load_block(am: ArchiveModel, model: nn.Module, layer: int, dtype: torch.dtype) -> None:
    block = model.model.layers[layer].mlp
    slots = {r: am.slots.get((layer, r)) for r in ROLES}
    if any(s is None or s.group is None or s.loose for s in slots.values()):
        raise InputError(f"layer {layer}: its experts are not all stored as DeRS groups",
                         am.reader.path)
    projections = {r: _load_projection(am, s, dtype) for r, s in slots.items()}
    num_experts = len(slots["gate"].group.members) - int(slots["gate"].has_shared)
    experts = DersExperts(projections["gate"], projections["up"], projections["down"],
                          num_experts, block.experts.act_fn, type(block.experts))
    block.experts = experts
    if slots["gate"].has_shared:
        block.shared_expert = DersSharedExpert(experts, type(block.shared_expert))


def _load_projection(am: ArchiveModel, slot: ExpertSlot, dtype: torch.dtype) -> DersProjection:
    g = slot.group
    r = am.reader
    params = g.codec["params"]
    if len(g.shape) != 2:
        raise InputError(f"group {g.key!r}: members are not 2-D", r.path)
    # Training moves the values at fixed positions (DeRS-SM) or the low-rank factors (DeRS-LM).
    # Positions from a magnitude mask, or quantized values, are no such parameters: refused,
    # not trained at positions regenerated from a seed the group does not have.
    seeded = (g.codec["name"] == SparseCodec.name and "values" not in params
              and params.get("index") in (INDEX_SEED, INDEX_ALL))
    if not seeded and g.codec["name"] != LowRankCodec.name:
        raise InputError(f"group {g.key!r} stores {codec_label(g.codec)!r}: training needs "
                         "sparse deltas at seeded positions (DeRS-SM, compress --drop with its "
                         "random mask) or low-rank deltas", r.path)
    parts = group_arrays(r, g)  # the base decoded, checksums verified
    base = parts.base.reshape(g.shape).to(dtype)
    arrays = {k: v.to(dtype) for k, v in parts.arrays.items()}
    if seeded:
        seeds = [SparseCodec.seed_of(params, i) for i in range(len(g.members))]
        return DersProjection.sparse(base, params["keep"], seeds, drop=params.get("drop"),
                                     values=arrays["values"])
    return DersProjection.lowrank(base, arrays["a"], arrays["b"])


def upcycle_checkpoint(dense: str | Path, out: str | Path, spec: UpcycleSpec, *,
                       overwrite: bool = False, reporter: Reporter | None = None,
                       revision: str | None = None, token: str | bool | None = None,
                       cache_dir: str | Path | None = None,
                       digest: str = digests.DEFAULT.name) -> CompressResult:
    """``ders upcycle``: a dense checkpoint folder (or Hub repo id, at ``revision``, with
    ``token`` and ``cache_dir``) into a DeRS MoE archive, ready to train; ``digest`` as
    ``compress``'s."""
    from transformers import AutoModelForCausalLM

    from ..hub import HubOptions, resolve_model

    spec.check()
    digests.by_name(digest)  # refused before the model is loaded
    dense = resolve_model(dense, HubOptions(revision, token, cache_dir)).path
    if not (dense / "config.json").is_file():
        raise InputError("not a transformers model folder (no config.json)", dense)
    out = Path(out)
    check_new_output(out, overwrite)
    try:
        # Its loading report (missing or unexpected weights) stays visible: it is the user's
        # only sign of a dense checkpoint that does not fit its config.
        with quiet_transformers(errors_only=False):
            model = AutoModelForCausalLM.from_pretrained(dense, dtype="auto")
    except (OSError, ValueError) as exc:
        raise InputError(f"transformers cannot load it: {exc}", dense) from None
    moe = upcycle_model(model, spec)
    side = [p for p in sorted(dense.iterdir()) if p.is_file() and _is_side_file(p.name)]
    return save_archive(moe, out, overwrite=overwrite, side_files=side, reporter=reporter,
                        digest=digest)


# Files of a dense model folder that describe the model rather than the tokenizer or the text:
# the MoE has its own.
_MODEL_FILES = {"config.json", "generation_config.json", "model.safetensors.index.json"}


def _is_side_file(name: str) -> bool:
    return name not in _MODEL_FILES and not name.endswith((".safetensors", ".bin", ".pt"))
