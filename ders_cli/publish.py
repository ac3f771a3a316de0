"""A Hub-ready folder: what ``ders compress MODEL -o DIR/`` writes, uploaded as it is with
``hf upload ORG/NAME DIR``::

    DIR/config.json                the model's config + quantization_config (quant_method "ders")
    DIR/model.ders.safetensors     the archive (over --max-shard-size: its shards
                                   model.ders-0000i-of-0000n.safetensors and their index
                                   model.ders.safetensors.index.json)
    DIR/tokenizer.json, ...        the model's other files, as they are
    DIR/README.md                  a model card: base model, setting, sizes, measured error,
                                   how to load and expand it

This is the ders folder ``from_pretrained`` reads (CONTRACTS 7, ``ders_cli.hf.quantizer``):
after ``import ders_cli``, ``AutoModelForCausalLM.from_pretrained(DIR)`` loads it; without ders
it is refused with a sentence naming ders. ``ders expand DIR`` gives the original checkpoint
back (the archive holds every original file, the model's own card and config included).

A folder output is asked for with a trailing slash (``-o DIR/``; the library also takes
``folder=True``); an existing folder named without it, and ``NAME.ders/``, are refused as
ambiguous. The folder is built whole under ``.DIR.partial-PID`` and moved into place
(ders_cli.outputs): nothing half-written, no weights of another model beside the archive.
"""

from __future__ import annotations

import json
import os
import re
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .archive import ArchiveReader
from .errors import InputError
from .outputs import write_at

if TYPE_CHECKING:
    from .checkpoint import Checkpoint
    from .compress import CompressResult
    from .outputs import BuildDir

CONFIG = "config.json"
CARD = "README.md"
# The archive of a ders folder, one file or sharded (docs/FORMAT.md 10: STEM-0000i-of-0000n).
_ARCHIVE_FILE = re.compile(r"model\.ders(\.safetensors|-\d{5,}-of-\d{5,}\.safetensors"
                           r"|\.safetensors\.index\.json)")
# Side files the folder does not hold as plain files (the archive keeps them all, for expand):
# a weight file or an index would be loaded, or uploaded, as the model's weights.
_WEIGHT_SUFFIXES = (".safetensors", ".safetensors.index.json", ".bin", ".bin.index.json", ".pt",
                    ".pth", ".h5", ".msgpack", ".ckpt", ".gguf", ".onnx", ".pdparams", ".ot",
                    ".tflite", ".mlmodel")
# Names an output with a trailing slash cannot have: they say "a file" (an archive or a
# weight file) while the slash says "a folder".
_FILE_LIKE = (".ders", *_WEIGHT_SUFFIXES)
_MAX_ORIGINAL_CARD = 1 << 20


def is_folder_output(out: str | Path) -> bool:
    """Whether ``out`` asks for a Hub-ready folder: a path written with a trailing slash.
    Anything else is an archive file. Refused as ambiguous: ``NAME.ders/`` (the name says a
    file, the slash a folder), and an existing folder without the slash (a file cannot
    replace it; into it needs the slash)."""
    text = os.fspath(out)
    slash = text.endswith(("/", os.sep))
    path = Path(text.rstrip("/" + os.sep) or text)
    if slash and path.name.endswith(_FILE_LIKE):
        raise InputError(f"is a folder name (trailing slash) ending like a file ({path.suffix}): "
                         f"-o {path.name} writes an archive file, -o {path.stem}/ a Hub-ready "
                         "folder", text)
    if slash and path.exists() and not path.is_dir():
        raise InputError("exists and is not a folder (drop the trailing slash to overwrite it "
                         "with an archive file)", path)
    if not slash and path.is_dir():
        raise InputError("is a folder; not overwritten by a file: -o DIR/ (with the slash) "
                         "writes a Hub-ready folder there, -o DIR/NAME.ders an archive file "
                         "inside it", path)
    return slash


def plain_side_files(paths: Sequence[str]) -> list[str]:
    """The side files of a checkpoint a ders folder holds as plain files: all but config.json
    (written anew), README.md (the folder's own card) and weights of any format."""
    return [p for p in paths if p not in (CONFIG, CARD) and not p.endswith(_WEIGHT_SUFFIXES)]


def is_archive_file(name: str) -> bool:
    """A file of a ders folder's archive: ``model.ders.safetensors``, its shards, its index."""
    return bool(_ARCHIVE_FILE.fullmatch(name))


def stale_archive_files(folder: Path, keep: Sequence[str]) -> list[str]:
    """Files of an earlier archive in ``folder`` that the new one (``keep``) does not replace:
    a one-file archive replaced by shards, or shards of another count."""
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir()
                  if is_archive_file(p.name) and p.name not in keep and p.is_file()
                  and not p.is_symlink())


def check_folder_output(ckpt: Checkpoint, dest: Path, named: str | Path) -> None:
    """Before any work: the model must be a transformers model (a config.json for the folder to
    carry); the folder must not be, or be inside, the model's folder; an existing folder must
    not hold weights the new folder does not replace (a loader, or an upload, would take them
    with it)."""
    if CONFIG not in ckpt.side_files or not isinstance(ckpt.config, dict):
        raise InputError("has no config.json: a Hub-ready folder is a transformers model "
                         "folder; write an archive file (-o NAME.ders) instead", named)
    if ckpt.repo_id is None:
        root = ckpt.root.resolve()
        if dest.resolve() == root or root in dest.resolve().parents:
            raise InputError(f"is inside the model folder {root}: the next compress of the "
                             "model would pack it in; choose a folder outside it", dest)
    if not dest.is_dir():
        return
    foreign = sorted(p.name for p in dest.iterdir()
                     if p.name.endswith(_WEIGHT_SUFFIXES) and not is_archive_file(p.name))
    if foreign:
        more = f" and {len(foreign) - 1} more" if len(foreign) > 1 else ""
        raise InputError(f"holds {foreign[0]}{more}: a ders folder holds no other weights (a "
                         "loader or an upload would take them); remove it or choose another "
                         "output", dest)


def fill_folder(build: BuildDir, result: CompressResult, ckpt: Checkpoint,
                folder_name: str, repo_id: str | None = None) -> None:
    """Write everything but the archive into the folder being built: the side files as plain
    files (copied from the archive just written and checked against its checksum, so they are
    the bytes it holds), config.json with its quantization_config, and the model card (whose
    snippets name ``repo_id``, the repo the folder is meant for, when given)."""
    from .hf.quantizer import folder_config

    archive = Path(result.archive)
    with ArchiveReader(archive) as reader:
        m = reader.manifest
        for f in m.files:
            if plain_side_files([f.path]):
                _copy(reader, build, f.path, f.array, f.digest)
        errors = [e for g in m.groups for e in g.rel_error]
        cosines = [c for g in m.groups for c in g.cos]
        writer = m.extra.get("writer") if isinstance(m.extra.get("writer"), dict) else {}
        version = m.version
    config = folder_config(ckpt.config or {}, archive.name,
                           ders_version=writer.get("version"), format_version=version,
                           setting=result.setting)
    _write(build, CONFIG, json.dumps(config, indent=2, sort_keys=True) + "\n")
    card = model_card(ckpt, result, archive.name, folder_name, errors, cosines, writer,
                      plain_bytes=_plain_bytes(build), repo_id=repo_id)
    _write(build, CARD, card)


def _plain_bytes(build: BuildDir) -> int:
    """The bytes of the folder's plain files written so far (the side files and config.json)."""
    return sum(os.stat(build.path / rel).st_size for rel in build.files
               if not is_archive_file(rel))


def _copy(reader: ArchiveReader, build: BuildDir, rel: str, array: str, sha: str) -> None:
    fd = build.create(rel)
    try:  # checked against the archive just written: a disk that lies
        reader.copy_to(array, fd, 0, sha, f"side file {rel!r}")
    finally:
        os.close(fd)


def _write(build: BuildDir, rel: str, text: str) -> None:
    fd = build.create(rel)
    try:
        write_at(fd, text.encode("utf-8"), 0)
    finally:
        os.close(fd)


# --- the model card ------------------------------------------------------------------------------

def _original_card_data(ckpt: Checkpoint) -> dict[str, Any]:
    """The original card's metadata a derived model keeps (license, language): empty when
    there is no card, or it has no readable metadata."""
    path = ckpt.root / CARD
    if CARD not in ckpt.side_files:
        return {}
    try:
        from huggingface_hub import ModelCard

        with open(path, "rb") as f:
            text = f.read(_MAX_ORIGINAL_CARD).decode("utf-8", errors="replace")
        data = ModelCard(text, ignore_metadata_errors=True).data.to_dict()
    except Exception:  # a card is a hint: one we cannot read adds nothing
        return {}
    keep = ("license", "license_name", "license_link", "language")
    return {k: data[k] for k in keep if data.get(k)}


def card_metadata(ckpt: Checkpoint) -> dict[str, Any]:
    """The card's YAML header, as the Hub reads it: base_model (a Hub source only: a local
    path is no repo id), the license and languages of the original card, library_name, tags
    and pipeline_tag."""
    meta: dict[str, Any] = {}
    if ckpt.repo_id:
        meta.update(base_model=ckpt.repo_id, base_model_relation="quantized")
    meta.update(_original_card_data(ckpt))
    meta.update(library_name="transformers",
                tags=["ders", "mixture-of-experts", "moe", "compressed"])
    architectures = (ckpt.config or {}).get("architectures")
    if isinstance(architectures, list) and any(
            isinstance(a, str) and a.endswith("ForCausalLM") for a in architectures):
        meta["pipeline_tag"] = "text-generation"
    return meta


def _front_matter(meta: dict[str, Any]) -> str:
    from huggingface_hub import ModelCardData

    return "---\n" + ModelCardData(**meta).to_yaml() + "\n---"


def model_card(ckpt: Checkpoint, result: CompressResult, archive: str, folder: str,
               errors: Sequence[float], cosines: Sequence[float], writer: dict,
               plain_bytes: int = 0, repo_id: str | None = None) -> str:
    """The folder's README.md: the Hub's metadata header, what was compressed and how, the
    sizes and the error measured when it was written, and how to load and expand it. Its
    snippets load ``repo_id`` (the repo the folder is uploaded to); without it, a placeholder
    the card explains."""
    repo = repo_id or f"YOUR-ORG/{folder}"
    if ckpt.repo_id:
        at = f" at revision `{ckpt.revision}`" if ckpt.revision else ""
        source = f"[{ckpt.repo_id}](https://huggingface.co/{ckpt.repo_id}){at}"
    else:
        source = f"`{ckpt.name}`"
    compressed = [g for g in result.groups if g.action != "passthrough"]
    stored = len(result.groups) - len(compressed)
    experts = sum(g.members for g in compressed)
    nfiles = len(result.files)
    rows = [("setting", f"`{result.setting}`"),
            ("original checkpoint", _size(result.input_bytes)),
            ("archive", f"{_size(result.archive_bytes)}, {result.ratio:.1%} of the original"
                        + (f" ({nfiles} files: an index and its shards)" if nfiles > 1 else "")),
            ("this folder", f"{_size(result.archive_bytes + plain_bytes)} (the archive, "
                            "config.json and the plain side files)"),
            ("expert groups", f"{len(compressed)} compressed ({experts} experts)"
                              + (f", {stored} stored as they are (not upcycled)" if stored
                                 else ""))]
    if errors:
        rows += [("relative error of an expert's weights, ‖W − Ŵ‖ / ‖W‖",
                  f"largest {max(errors):.3e}, mean {statistics.fmean(errors):.3e}"),
                 ("cosine of an expert to its original", f"smallest {min(cosines):.6f}")]
    command = writer.get("command")
    rows.append(("written by", f"ders {writer.get('version', '?')}"
                 + (f": `{' '.join(command)}`" if isinstance(command, list) else "")))
    table = "| | |\n| --- | --- |\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)
    exact = result.setting == "lossless"
    back = ("the original checkpoint, bit for bit" if exact
            else "the checkpoint with every expert synthesized as the model computes it")
    kind = ("an index and safetensors shards" if archive.endswith(".index.json")
            else "one safetensors file")
    upload = (f"This folder is uploaded with `hf upload {repo} {folder}/`; on disk, its\n"
              f"path works wherever `{repo}` does." if repo_id else
              f"`{repo}` stands for the repo id this folder is uploaded to\n"
              f"(`hf upload {repo} {folder}/`), or the folder's path on disk.")
    return f"""{_front_matter(card_metadata(ckpt))}

# {folder}

{source}, compressed with [ders](https://arxiv.org/abs/2503.01359) (DeRS: Decompose,
Replace, Synthesis): every group of experts upcycled from one FFN is stored as one base
weight plus a light delta per expert; the rest of the model (attention, norms, embeddings,
routers) as it is. `ders expand` writes back {back}.

{table}

The errors are measured on the weights when the archive was written (every expert,
synthesized as any reader synthesizes it). What a user feels is the model's output:
`ders eval ORIGINAL {repo} --text FILE` measures the perplexity of both, and each
expert's output error, on real text.

The archive is `{archive}` ({kind}); `config.json` names it in its
`quantization_config` (`quant_method: ders`).

## Use it with transformers

```python
import ders_cli  # pip install ders: registers quant_method "ders" with transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("{repo}", dtype="auto", device_map="auto")
tokenizer = AutoTokenizer.from_pretrained("{repo}")
```

The experts stay base plus deltas in memory; everything else is an ordinary transformers
model. Without `import ders_cli`, transformers refuses this folder with a message naming
ders (it never loads random experts).

## Use it with ders

```python
from ders_cli.runtime import load_from_archive

model = load_from_archive("{repo}")  # dtype=, device_map=, revision=, token= as usual
```

## The original checkpoint

```
# the original files: weights, config, tokenizer, card
ders expand {repo} -o {ckpt.name}/
# every checksum; every expert synthesized again
ders verify {repo}
```

{upload}
"""


def _size(n: int) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    raise AssertionError


# --- the folder ---------------------------------------------------------------------------------

def compress_folder(ckpt: Checkpoint, source: Any, spec: Any, out: str | Path, *,
                    overwrite: bool = False, named: str | Path | None = None,
                    reporter: Any = None, repo_id: str | None = None,
                    **options: Any) -> CompressResult:
    """``compress`` into a Hub-ready folder ``out`` (new, empty, or with ``overwrite`` a
    folder whose other files stay): the archive streamed into the folder being built,
    then its plain files, config.json and card (naming ``repo_id``); moved into place whole.
    ``options`` as ``compress_checkpoint``. The result's ``archive`` is the folder (every
    command opens it), ``files`` the archive's files in it."""
    from .compress import compress_checkpoint
    from .hf.quantizer import ARCHIVE_NAME
    from .outputs import BuildDir, check_new_output, output_path, sweep_leftovers, writing

    dest = output_path(out)
    check_folder_output(ckpt, dest, named if named is not None else ckpt.root)
    # An empty folder made for the output (mkdir DIR, hf download's habit) needs no --force.
    replace = overwrite or (dest.is_dir() and not dest.is_symlink() and not any(dest.iterdir()))
    check_new_output(dest, replace, folder=True)
    leftovers = sweep_leftovers(dest)
    if reporter is not None:
        for line in leftovers:
            reporter.warn(line)
    with writing(dest), BuildDir(dest, replace) as build:
        result = compress_checkpoint(ckpt, source, spec, build.path / ARCHIVE_NAME,
                                     named=named, reporter=reporter, **options)
        names = [Path(f).name for f in result.files]
        for name in names:
            build.adopt(name)
        fill_folder(build, result, ckpt, dest.name, repo_id)
        build.commit(replaces=stale_archive_files(dest, names))
    result.archive = dest
    result.files = [str(dest / name) for name in names]
    result.warnings = leftovers + result.warnings
    return result
