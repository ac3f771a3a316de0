"""MODEL as a Hugging Face Hub repo id, resolved from a locally populated cache: never the
network (HF_HUB_OFFLINE=1)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from fixtures.synthetic import upcycled_tensors, write_model

REVISION = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub_cache(tmp_path) -> Path:
    cache = tmp_path / "hub"
    repo = cache / "models--acme--tiny-moe"
    snapshot = write_model(repo / "snapshots" / REVISION,
                           upcycled_tensors(layers=1, hidden=32, intermediate=64), shards=2)
    (snapshot / "pytorch_model.bin").write_bytes(b"other weights, not to be archived")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REVISION)
    return cache


def ders(*args: str, cache: Path, cwd: Path) -> subprocess.CompletedProcess:
    root = str(Path(__file__).resolve().parents[1])
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    env = dict(os.environ, HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1", PYTHONPATH=path)
    return subprocess.run([sys.executable, "-m", "ders_cli", *args], capture_output=True,
                          text=True, env=env, cwd=cwd)


def tree(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_repo_id_from_the_local_cache(hub_cache, tmp_path):
    r = ders("compress", "acme/tiny-moe", "--drop", "0.9", "--json", cache=hub_cache,
             cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    archive = Path(json.loads(r.stdout)["archive"])
    assert archive == tmp_path / "tiny-moe.ders"  # named after the repo, beside the user
    r = ders("inspect", "acme/tiny-moe", "--json", cache=hub_cache, cwd=tmp_path)
    assert r.returncode == 0 and len(json.loads(r.stdout)["groups"]) == 3
    r = ders("expand", str(archive), "-o", "out", cache=hub_cache, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    restored = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert "pytorch_model.bin" not in restored  # only safetensors, index and side files
    assert "model.safetensors.index.json" in restored and "config.json" in restored
    r = ders("verify", str(archive), "--against", "acme/tiny-moe", cache=hub_cache, cwd=tmp_path)
    assert r.returncode == 0, r.stderr


def test_unknown_repo_offline_is_one_clear_line(hub_cache, tmp_path):
    r = ders("compress", "acme/missing", "--drop", "0.9", cache=hub_cache, cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "ders: acme/missing: not a local path, and not in the local Hugging Face cache "
        "(HF_HUB_OFFLINE is set)"]
    assert list(tmp_path.iterdir()) == [hub_cache]


# --- archives from the Hub ----------------------------------------------------------------------

COMMIT_A = "a" * 40
COMMIT_B = "b" * 40


def cache_repo(cache: Path, repo: str, files: dict[str, Path | bytes], commit: str,
               refs: tuple[str, ...] = ("main",)) -> Path:
    """A repo snapshot in a Hugging Face cache laid out as huggingface_hub lays it out: the
    files under snapshots/COMMIT, each ref naming the commit."""
    folder = cache / ("models--" + repo.replace("/", "--"))
    snapshot = folder / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
        data = content.read_bytes() if isinstance(content, Path) else content
        (snapshot / name).write_bytes(data)
    (folder / "refs").mkdir(exist_ok=True)
    for ref in refs:
        (folder / "refs" / ref).write_text(commit)
    return snapshot


@pytest.fixture(scope="module")
def archives(tmp_path_factory) -> dict[str, Path]:
    """A model, its one-file archive and its sharded archive (files by name)."""
    work = tmp_path_factory.mktemp("archives")
    model = write_model(work / "model", upcycled_tensors(layers=2, hidden=32, intermediate=64),
                        side_files={"tokenizer.json": "{}", "config.json": "{}"})
    import ders_cli as ders

    ders.compress(model, ders.QuantSpec(2, 16), work / "one.ders")
    (work / "sh").mkdir()
    ders.compress(model, ders.QuantSpec(2, 16), work / "sh" / "model.ders.safetensors",
                  max_shard_size=30_000)
    return {"model": model, "one": work / "one.ders", "sharded": work / "sh"}


def sharded_files(archives) -> dict[str, Path]:
    return {p.name: p for p in sorted(archives["sharded"].iterdir())}


def ders_folder_config() -> bytes:
    return json.dumps({"model_type": "mixtral", "quantization_config": {
        "quant_method": "ders", "archive": "model.ders.safetensors.index.json"}}).encode()


def test_an_archive_repo_id_is_expanded_and_verified_from_the_cache(archives, tmp_path):
    cache = tmp_path / "hub"
    files = {**sharded_files(archives), "config.json": ders_folder_config(),
             "tokenizer.json": b"{}", "other.ders": archives["one"]}
    cache_repo(cache, "acme/moe-ders", files, COMMIT_A)
    r = ders("expand", "acme/moe-ders", cache=cache, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    restored = tmp_path / "moe-ders-expanded"  # beside the user, not in the cache
    r2 = ders("expand", str(archives["one"]), "-o", "ref", cache=cache, cwd=tmp_path)
    assert r2.returncode == 0, r2.stderr
    assert tree(restored) == tree(tmp_path / "ref")
    r = ders("verify", "acme/moe-ders", "--against", str(archives["model"]), cache=cache,
             cwd=tmp_path)
    assert r.returncode == 0, r.stderr


def test_a_repo_with_several_archives_asks_for_one(archives, tmp_path):
    cache = tmp_path / "hub"
    cache_repo(cache, "acme/two", {"a.ders": archives["one"], "b.ders": archives["one"],
                                   "README.md": b"two"}, COMMIT_A)
    r = ders("verify", "acme/two", cache=cache, cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr.strip() == (f"ders: acme/two@{COMMIT_A[:12]}: holds several archives "
                                "(a.ders, b.ders): name one as acme/two/FILE")
    r = ders("verify", "acme/two/b.ders", cache=cache, cwd=tmp_path)
    assert r.returncode == 0, r.stderr


def test_revision_option_and_at_syntax(archives, tmp_path):
    cache = tmp_path / "hub"
    cache_repo(cache, "acme/r", {"x.ders": archives["one"]}, COMMIT_A, refs=("main",))
    cache_repo(cache, "acme/r", {**sharded_files(archives),
                                 "config.json": ders_folder_config()}, COMMIT_B, refs=("v1",))
    for args in (["acme/r", "--revision", "v1"], ["acme/r@v1"], ["acme/r", "--revision", COMMIT_B]):
        r = ders("verify", *args, "--json", cache=cache, cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["archive_bytes"] == sum(
            p.stat().st_size for p in archives["sharded"].iterdir())
    r = ders("verify", "acme/r", "--json", cache=cache, cwd=tmp_path)
    assert json.loads(r.stdout)["archive_bytes"] == archives["one"].stat().st_size
    r = ders("verify", "acme/r@v1", "--revision", "main", cache=cache, cwd=tmp_path)
    assert r.returncode == 2 and "revision given twice" in r.stderr
    r = ders("verify", str(archives["one"]), "--revision", "v1", cache=cache, cwd=tmp_path)
    assert r.returncode == 2 and "is a local path" in r.stderr


def test_cache_dir_option_instead_of_the_environment(archives, tmp_path):
    cache = tmp_path / "elsewhere"
    cache_repo(cache, "acme/c", {"x.ders": archives["one"]}, COMMIT_A)
    r = ders("verify", "acme/c", cache=tmp_path / "empty", cwd=tmp_path)
    assert r.returncode == 2 and "not in the local Hugging Face cache" in r.stderr
    r = ders("verify", "acme/c", "--cache-dir", str(cache), cache=tmp_path / "empty",
             cwd=tmp_path)
    assert r.returncode == 0, r.stderr


def test_a_shard_missing_from_the_cache_is_named(archives, tmp_path):
    cache = tmp_path / "hub"
    files = sharded_files(archives)
    last = sorted(n for n in files if n.endswith("-of-" + n[-17:-12] + ".safetensors"))[-1]
    files.pop(last)
    cache_repo(cache, "acme/part", {**files, "config.json": ders_folder_config()}, COMMIT_A)
    r = ders("expand", "acme/part", cache=cache, cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr.strip() == (f"ders: acme/part/{last}: not in the local Hugging Face cache "
                                "(HF_HUB_OFFLINE is set)")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hub"]


def test_only_the_archive_files_are_downloaded(archives, tmp_path, monkeypatch):
    """Online, as huggingface_hub would be asked (its functions replaced by a local repo)."""
    import huggingface_hub
    from huggingface_hub import constants

    from ders_cli.archive import ArchiveReader

    repo = {**sharded_files(archives), "config.json": ders_folder_config(),
            "tokenizer.json": b"{}", "other.ders": archives["one"],
            "weights/big.bin": b"x" * 100}
    asked: list[tuple[str, str | None]] = []

    info = SimpleNamespace(sha=COMMIT_A, siblings=[SimpleNamespace(rfilename=n) for n in repo])

    class Api:
        def model_info(self, repo_id, revision=None, token=None):
            asked.append(("info", revision))
            assert (repo_id, token) == ("acme/online", "hf_secret")
            return info

    def download(repo_id, filename, revision=None, token=None, cache_dir=None):
        asked.append((filename, revision))
        assert token == "hf_secret" and revision == COMMIT_A
        path = tmp_path / "cache" / COMMIT_A / filename
        path.parent.mkdir(parents=True, exist_ok=True)
        content = repo[filename]
        path.write_bytes(content.read_bytes() if isinstance(content, Path) else content)
        return str(path)

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "HfApi", Api)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    with ArchiveReader("acme/online", revision="v1", token="hf_secret") as r:
        assert r.source.repo_id == "acme/online" and r.source.revision == COMMIT_A
        assert r.sharded
    shards = sorted(n for n in repo if n.startswith("model.ders-"))
    assert asked == [("info", "v1"), ("config.json", COMMIT_A),
                     ("model.ders.safetensors.index.json", COMMIT_A),
                     *((s, COMMIT_A) for s in shards)]


def test_model_revision_token_and_cache_options(hub_cache, tmp_path):
    (hub_cache / "models--acme--tiny-moe" / "refs" / "v1").write_text(REVISION)
    r = ders("inspect", "acme/tiny-moe", "--revision", "v1", "--json", cache=hub_cache,
             cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    r = ders("inspect", "acme/tiny-moe", "--revision", "v2", cache=hub_cache, cwd=tmp_path)
    assert r.returncode == 2 and "not in the local Hugging Face cache" in r.stderr
    r = ders("inspect", "acme/tiny-moe@v1", "--revision", "main", cache=hub_cache,
             cwd=tmp_path)
    assert r.returncode == 2 and "revision given twice" in r.stderr
    r = ders("compress", "acme/tiny-moe", "--drop", "0.9", "--cache-dir", str(hub_cache),
             "--token", "hf_unused", "-o", "t.ders", cache=tmp_path / "empty", cwd=tmp_path)
    assert r.returncode == 0, r.stderr


def test_a_ders_folder_is_no_model_to_compress(archives, tmp_path):
    folder = tmp_path / "folder"
    folder.mkdir()
    for name, path in sharded_files(archives).items():
        (folder / name).write_bytes(path.read_bytes())
    (folder / "config.json").write_bytes(ders_folder_config())
    r = ders("compress", str(folder), "--drop", "0.5", cache=tmp_path, cwd=tmp_path)
    assert r.returncode == 2 and "is a ders folder" in r.stderr
    r = ders("verify", str(folder), cache=tmp_path, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
