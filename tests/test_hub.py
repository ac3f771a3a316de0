"""MODEL as a Hugging Face Hub repo id, resolved from a locally populated cache: never the
network (HF_HUB_OFFLINE=1)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

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
