"""``save_pretrained`` of a model whose experts are ders modules writes a ders folder.

transformers' own ``save_pretrained`` would write the modules' internal tensors
(``experts.gate.base``, ``deltas.0.a``...) as if they were the model's, and ``from_pretrained``
of that folder then initialises random experts. A model built or loaded by ders
(``load_from_archive``, ``from_pretrained`` of a ders folder, ``upcycle_model``,
``load_trainable``) saves instead as a ders folder (``hf.quantizer``): what transformers loads
back with ders imported, and refuses, naming ders, without. ``ders expand`` of its archive gives
the plain checkpoint.
"""

from __future__ import annotations

import types
from pathlib import Path
from typing import Any

from torch import nn

from .. import digests
from ..errors import UsageError
from .quantizer import ARCHIVE_NAME, check_no_plain_weights, write_folder


def save_ders_folder(model: nn.Module, save_directory: str | Path, *,
                     is_main_process: bool = True, push_to_hub: bool = False,
                     digest: str = digests.DEFAULT.name, **ignored: Any) -> None:
    """Write ``model`` as a ders folder: config.json with its quantization_config, the archive
    and the side files it carries. ``state_dict``, ``safe_serialization``, ``max_shard_size``
    (what transformers.Trainer passes) do not apply: the archive is written from the expert
    modules themselves. ``digest``: the hash of the archive's checksums, as ``compress``'s."""
    from ..training.archive_io import save_archive

    if not is_main_process:
        return
    if push_to_hub:
        raise UsageError("push_to_hub: save the folder, then upload it as it is "
                         "(model.push_to_hub(repo_id), or `hf upload REPO DIR`)",
                         param="push_to_hub")
    folder = Path(save_directory)
    if folder.is_file():
        raise UsageError("is a file; save_pretrained writes a folder", folder)
    check_no_plain_weights(folder)
    folder.mkdir(parents=True, exist_ok=True)
    archive = folder / ARCHIVE_NAME
    save_archive(model, archive, overwrite=True, digest=digest)
    write_folder(archive, folder)


def use_ders_folders(model: nn.Module) -> None:
    """Make ``model.save_pretrained`` (and so ``push_to_hub`` and transformers.Trainer's saves)
    write a ders folder."""
    model.save_pretrained = types.MethodType(save_ders_folder, model)
