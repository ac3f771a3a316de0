"""Hugging Face Hub repo ids as inputs: a model (``ders compress org/moe``) or an archive
(``ders expand org/moe-ders``), fetched through huggingface_hub and its cache.

One place for what every command and ``load_from_archive`` share: a local path wins; a repo id
(``org/name``, ``org/name@REVISION``, or ``org/name/FILE`` for one archive of a repo holding
several) is resolved with the revision, token and cache the user gave, or huggingface_hub's own
defaults (HF_TOKEN or the saved login, HF_HOME / HF_HUB_CACHE, HF_HUB_OFFLINE). Files come from
the cache when it has them (huggingface_hub checks a file's etag online, and uses the cache
alone offline or when the Hub cannot be reached), and only the files needed are downloaded:
for a model its safetensors and side files, for an archive its index and shards (or its one
file), and config.json to find it.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import InputError, UsageError

_NAME = r"[A-Za-z0-9][A-Za-z0-9._-]*"
_REPO_ID = re.compile(rf"^{_NAME}/{_NAME}$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
# What a model download fetches: weights in safetensors form and every small side file.
MODEL_IGNORE = ["*.bin", "*.pt", "*.pth", "*.ckpt", "*.h5", "*.msgpack", "*.onnx", "*.gguf",
                "*.ot", "*.tflite", "*.mlmodel", "original/*", "*.pdparams"]


@dataclass(frozen=True)
class HubOptions:
    """How to reach the Hub: the revision of the main argument (a branch, tag or commit), the
    token (None: HF_TOKEN or the saved login; False: none), the cache folder (None:
    HF_HUB_CACHE, under HF_HOME)."""

    revision: str | None = None
    token: str | bool | None = None
    cache_dir: str | Path | None = None

    def without_revision(self) -> HubOptions:
        """For a second model of a command (--base, --against): its revision is its own."""
        return HubOptions(None, self.token, self.cache_dir)


@dataclass(frozen=True)
class Resolved:
    """A local path for what the user named, and where it came from on the Hub (if it did)."""

    path: Path
    repo_id: str | None = None
    revision: str | None = None  # the commit the files were taken at

    @property
    def name(self) -> str:
        """What outputs are named after: the repo's name, or the path's."""
        return self.repo_id.rsplit("/", 1)[-1] if self.repo_id else self.path.name


def split_spec(spec: str, revision: str | None = None) -> tuple[str, str | None, str | None]:
    """``org/name[/FILE][@REVISION]`` as (repo id, file in the repo or None, revision); raises
    InputError when ``spec`` is no repo id. A revision in ``spec`` and ``revision`` both given
    must agree."""
    text, at, rev = spec.partition("@")
    parts = text.split("/")
    repo = "/".join(parts[:2])
    if not _REPO_ID.match(repo) or (at and not rev) or any(p in ("", ".", "..") for p in parts):
        raise InputError("no such file or folder", spec)
    file = "/".join(parts[2:]) or None
    if at and revision is not None and rev != revision:
        raise UsageError(f"revision given twice: {spec} and --revision {revision}",
                         param="revision")
    return repo, file, (rev if at else revision)


def check_repo_id(repo_id: str, param: str = "repo_id") -> None:
    """A UsageError naming ``param`` unless ``repo_id`` is a repo id others can load from the
    Hub: NAMESPACE/NAME, by huggingface_hub's rules (characters, length)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
        valid = bool(_REPO_ID.match(repo_id))
    except HFValidationError:
        valid = False
    if not valid:
        raise UsageError(f"{param} must be a Hub repo id, NAMESPACE/NAME (letters, digits, "
                         f"'-', '_', '.'), got {repo_id!r}", param=param)


def is_repo_id(spec: str | Path) -> bool:
    try:
        split_spec(str(spec))
    except InputError:
        return False
    return True


def resolve_model(spec: str | Path, hub: HubOptions | None = None) -> Resolved:
    """A model: a local folder or .safetensors file as it is, else a repo id's snapshot
    (safetensors weights and side files, no other weight formats)."""
    hub = hub or HubOptions()
    path = Path(spec).expanduser()
    if path.exists():
        _no_revision_for_a_path(hub, path)
        return Resolved(path)
    repo, file, revision = split_spec(str(spec), hub.revision)
    if file is not None:
        raise InputError("a model is a repo id (org/name) or a local path, not a file in a "
                         "repo", spec)
    from huggingface_hub import snapshot_download

    folder = _call(spec, snapshot_download, repo, revision=revision, token=hub.token,
                   cache_dir=hub.cache_dir, ignore_patterns=MODEL_IGNORE)
    folder = Path(folder)
    return Resolved(folder, repo, folder.name if _COMMIT.match(folder.name) else revision)


def resolve_archive(spec: str | Path, hub: HubOptions | None = None) -> Resolved:
    """An archive: a local path as it is (a file, an index, a shard, a folder, or the name a
    sharded archive was written to), else a repo id's archive downloaded: the one config.json
    names (a ders folder), else the one archive in the repo, or the FILE of ``org/name/FILE``;
    for a sharded archive its index and then the shards the index lists."""
    from .archive import index_path

    hub = hub or HubOptions()
    path = Path(spec).expanduser()
    if path.exists() or index_path(path).is_file():
        _no_revision_for_a_path(hub, path)
        return Resolved(path)
    try:
        repo, file, revision = split_spec(str(spec), hub.revision)
    except InputError:
        raise InputError("no such archive", path) from None
    files, commit = _listing(spec, repo, revision, hub)
    if file is None:
        file = _choose_archive(spec, repo, commit, files, hub)
    elif file not in files:
        raise InputError(f"has no file {file!r}", f"{repo}@{commit[:12]}")
    local = _download(spec, repo, file, commit, hub)
    from .archive import index_shards
    from .constants import INDEX_SUFFIX

    if file.endswith(INDEX_SUFFIX):
        folder = file.rpartition("/")[0]
        for shard in index_shards(local):
            _download(spec, repo, f"{folder}/{shard}" if folder else shard, commit, hub)
    return Resolved(local, repo, commit)


def _no_revision_for_a_path(hub: HubOptions, path: Path) -> None:
    if hub.revision is not None:
        raise UsageError(f"revision applies to Hub repo ids, and {path} is a local path",
                         param="revision")


def _listing(spec: str | Path, repo: str, revision: str | None,
             hub: HubOptions) -> tuple[list[str], str]:
    """The repo's files at ``revision`` and the commit it resolves to: asked of the Hub, or
    (offline, or the Hub out of reach) read from the cached snapshot."""
    from huggingface_hub import HfApi, constants, snapshot_download

    if not constants.HF_HUB_OFFLINE:
        try:
            info = HfApi().model_info(repo, revision=revision, token=hub.token)
            return [s.rfilename for s in info.siblings or ()], info.sha
        except Exception as exc:  # classified below; out of reach: the cache answers
            if not _unreachable(exc):
                raise _hub_error(spec, exc) from None
    folder = Path(_call(spec, snapshot_download, repo, revision=revision,
                        cache_dir=hub.cache_dir, local_files_only=True))
    files = [p.relative_to(folder).as_posix() for p in sorted(folder.rglob("*"))
             if p.is_file()]
    return files, folder.name


def _choose_archive(spec: str | Path, repo: str, commit: str, files: list[str],
                    hub: HubOptions) -> str:
    from .archive import archive_names, folder_archive_name

    if "config.json" in files:
        named = folder_archive_name(_download(spec, repo, "config.json", commit, hub))
        if named is not None:
            return named
    found = archive_names(f for f in files if "/" not in f)
    if len(found) == 1:
        return found[0]
    where = f"{repo}@{commit[:12]}"
    if not found:
        raise InputError("holds no ders archive (a *.ders file, a ders folder's config.json, "
                         "or a sharded archive's *.ders.safetensors.index.json)", where)
    raise InputError(f"holds several archives ({', '.join(found[:4])}"
                     f"{', ...' if len(found) > 4 else ''}): name one as {repo}/FILE", where)


def _download(spec: str | Path, repo: str, file: str, commit: str, hub: HubOptions) -> Path:
    from huggingface_hub import hf_hub_download

    return Path(_call(f"{repo}/{file}", hf_hub_download, repo, file, revision=commit,
                      token=hub.token, cache_dir=hub.cache_dir, named=True))


def _call(spec: str | Path, function: Callable, *args: Any, named: bool = False,
          **kwargs: Any) -> Any:
    """``function(...)``, its failure one line naming ``spec`` (``named``: a file of a repo
    whose files were listed, rather than what the user typed)."""
    try:
        return function(*args, **kwargs)
    except Exception as exc:  # the hub raises many types; each is one line
        raise _hub_error(spec, exc, named) from None


def _unreachable(exc: Exception) -> bool:
    """The Hub could not be asked (no network, offline mode, a timeout), as opposed to an
    answer such as "no such repository"."""
    from huggingface_hub.utils import HfHubHTTPError

    return isinstance(exc, (ConnectionError, TimeoutError, OSError)) and not isinstance(
        exc, HfHubHTTPError)


def _hub_error(spec: str | Path, exc: Exception, named: bool = False) -> InputError:
    from huggingface_hub import constants
    from huggingface_hub.utils import (
        EntryNotFoundError,
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if isinstance(exc, GatedRepoError):
        why = ("is a gated repository: accept its conditions on the Hub, then log in (hf auth "
               "login) or pass --token")
    elif isinstance(exc, RepositoryNotFoundError):
        why = ("not a local path, and no repository of the Hugging Face Hub (or a private "
               "one: log in with hf auth login or pass --token)")
    elif isinstance(exc, RevisionNotFoundError):
        why = "the Hugging Face Hub has no such revision of this repository"
    elif isinstance(exc, LocalEntryNotFoundError) or constants.HF_HUB_OFFLINE:
        why = (("" if named else "not a local path, and ") + "not in the local Hugging Face cache"
               + (" (HF_HUB_OFFLINE is set)" if constants.HF_HUB_OFFLINE
                  else " (and the Hub could not be reached)"))
    elif isinstance(exc, EntryNotFoundError):
        why = "a file the repository should hold is missing from it"
    else:
        why = ("not a local path, and the Hugging Face Hub could not provide it "
               f"({type(exc).__name__})")
    return InputError(why, spec)
