"""``AutoModelForCausalLM.from_pretrained`` of a ders folder: quant_method ``"ders"``.

transformers 5 lets a library register a quantization method (``register_quantization_config``,
``register_quantizer``, an ``HfQuantizer``), as compressed-tensors, HQQ and bitsandbytes are. A
ders folder is (docs: README, "Training and inference"; CONTRACTS 7)::

    config.json               the model's config + quantization_config + transformers_weights
    model.ders.safetensors    the archive (a safetensors file)
    tokenizer.json, ...       side files, as plain files

transformers reads the tensors outside the experts from the archive itself (they are stored
under their own names), with its own dtype and device_map handling; the ders quantizer puts the
experts in, kept as base plus deltas (``ders_cli.runtime``). Without ders, ``config.json``'s
``transformers_weights`` is a sentence, not a file: transformers refuses the folder with it
(install and import ders), and no file named ``model.safetensors`` is there for it to load
with random experts.

This module does not import transformers: ``import ders_cli`` stays light and registers the
method the moment transformers' quantizer registry is imported (``register_on_import``).
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import json
import shutil
import sys
from pathlib import Path
from typing import Any

QUANT_METHOD = "ders"
ARCHIVE_NAME = "model.ders.safetensors"
NEEDS_DERS = ("this folder holds a ders archive (quant_method 'ders'): pip install ders, then "
              "import ders_cli before from_pretrained")
_REGISTRY_MODULE = "transformers.quantizers.auto"


def quantization_config(archive: str = ARCHIVE_NAME, **informative: Any) -> dict:
    """The ``quantization_config`` of a ders folder's config.json. ``informative`` keys (the
    ders version, the setting...) are recorded as they are; loaders ignore them."""
    if not archive.endswith((".safetensors", ".safetensors.index.json")) or "/" in archive:
        raise ValueError(f"archive must be a file name ending in .safetensors, got {archive!r}")
    return {"quant_method": QUANT_METHOD, "archive": archive, **informative}


def folder_config(config: dict, archive: str = ARCHIVE_NAME, **informative: Any) -> dict:
    """A model's config.json contents made a ders folder's: what transformers needs to load
    the folder with ders, and to refuse it, naming ders, without."""
    out = {k: v for k, v in config.items() if k not in ("quantization_config",
                                                          "transformers_weights")}
    out["quantization_config"] = quantization_config(archive, **informative)
    out["transformers_weights"] = NEEDS_DERS
    return out


def check_no_plain_weights(folder: Path) -> None:
    """A ders folder must not hold weights transformers would load without ders."""
    from ..errors import UsageError

    for plain in ("model.safetensors", "model.safetensors.index.json"):
        if (folder / plain).exists():
            raise UsageError(f"holds {plain}: transformers without ders would load it, not the "
                             "archive; write the ders folder elsewhere", folder)


def write_folder(archive: str | Path, folder: str | Path, *, move: bool = False,
                 **informative: Any) -> Path:
    """Make ``folder`` a ders folder holding ``archive`` (moved there with ``move``): its
    config.json, the archive and every other side file as a plain file. A one-file archive is
    named ARCHIVE_NAME there; a sharded one keeps its files' names (its index names its
    shards), and config.json names its index. Files already in ``folder`` stay, except those
    these names replace."""
    from ..archive import ArchiveReader
    from ..errors import InputError
    from .side_files import read_side_files, write_side_files

    folder = Path(folder)
    check_no_plain_weights(folder)
    with ArchiveReader(archive) as reader:
        files = read_side_files(reader)
        parts = list(reader.files) if reader.sharded else [reader.path]
    if "config.json" not in files:
        raise InputError("has no config.json: not an archive of a transformers model", archive)
    config = json.loads(files.pop("config.json"))
    # A shard index would make transformers without ders load the folder (see the module
    # docstring); the archive holds it for expand.
    files.pop("model.safetensors.index.json", None)
    folder.mkdir(parents=True, exist_ok=True)
    write_side_files(files, folder)
    name = parts[0].name if len(parts) > 1 or parts[0].name.endswith(".index.json") \
        else ARCHIVE_NAME
    for i, part in enumerate(parts):
        dest = folder / (name if i == 0 else part.name)
        if dest.resolve() != part.resolve():
            (shutil.move if move else shutil.copyfile)(part, dest)
    (folder / "config.json").write_text(
        json.dumps(folder_config(config, name, **informative), indent=2, sort_keys=True) + "\n")
    return folder


def register() -> None:
    """Register quant_method "ders" with transformers (idempotent)."""
    from transformers.quantizers import auto

    if QUANT_METHOD not in auto.AUTO_QUANTIZER_MAPPING:
        from . import transformers_quantizer

        auto.register_quantization_config(QUANT_METHOD)(transformers_quantizer.DersConfig)
        auto.register_quantizer(QUANT_METHOD)(transformers_quantizer.DersHfQuantizer)


class _RegisterOnImport(importlib.abc.MetaPathFinder):
    """Registers ders right after transformers imports its quantizer registry, whenever that
    happens: importing transformers ourselves would cost every ``ders`` command seconds."""

    def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
        if name != _REGISTRY_MODULE:
            return None
        sys.meta_path.remove(self)  # once, and not for the lookup below
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        loader = spec.loader
        run = loader.exec_module

        def exec_module(module: Any) -> None:
            run(module)
            register()

        loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


def register_on_import() -> None:
    """Make transformers know quant_method "ders" (now if its registry is loaded, else as soon
    as it is). Called by ``import ders_cli``."""
    if _REGISTRY_MODULE in sys.modules:
        register()
    elif not any(isinstance(f, _RegisterOnImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterOnImport())
