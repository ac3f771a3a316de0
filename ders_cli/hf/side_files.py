"""The files of a model folder besides its weights (tokenizer, chat template, README...).

An archive holds them; a model loaded from one carries them, so that whatever it is saved as
next (``save_archive``, ``save_pretrained``) still has them. Without this the documented
training loop (``ders upcycle``, train, ``save_archive``) lost the tokenizer.
"""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath

from torch import nn

from ..archive import ArchiveReader
from ..errors import CorruptArchiveError

# Written anew from the model itself when it is saved: the model's own state wins over the
# copy it was loaded with.
REGENERATED = frozenset({"config.json", "generation_config.json",
                         "model.safetensors.index.json"})
GENERATION_CONFIG = "generation_config.json"
_ATTR = "_ders_side_files"


def read_side_files(reader: ArchiveReader) -> dict[str, bytes]:
    """Every side file of an archive by relative path (checksums verified)."""
    out = {}
    for f in reader.manifest.files:
        rel = PurePosixPath(f.path)
        if rel.is_absolute() or ".." in rel.parts or not rel.parts:
            raise CorruptArchiveError(f"side file path {f.path!r} leaves the model folder",
                                      reader.path)
        out[f.path] = bytes(reader.read_bytes(f.array))
    return out


def attach(model: nn.Module, files: dict[str, bytes], *, generation: bool = True) -> None:
    """Make ``model`` carry an archive's side files and (with ``generation``) use its
    generation config."""
    gen = files.get(GENERATION_CONFIG)
    if generation and gen is not None and getattr(model, "generation_config", None) is not None:
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_dict(json.loads(gen))
    carried = {p: data for p, data in files.items() if p not in REGENERATED}
    setattr(model, _ATTR, carried)


def carried(model: nn.Module) -> dict[str, bytes]:
    """The side files ``model`` was loaded with (none for a model built in memory)."""
    return dict(getattr(model, _ATTR, {}))


def write_side_files(files: dict[str, bytes], folder: Path) -> list[Path]:
    """Write ``files`` under ``folder``; the paths written."""
    written = []
    for rel, data in files.items():
        path = folder.joinpath(*PurePosixPath(rel).parts)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        written.append(path)
    return written
