"""Reading a model folder (README "Commands", docs/FORMAT.md 4.1): only regular files inside
it are packed; links that leave it, FIFOs, devices and sockets are refused in one line; ders
archives and leftovers are never packed; JSON is read within limits; a file that changes while
it is read is an error naming it. None of these may hang, crash or write anything."""

from __future__ import annotations

import importlib
import json
import os
import socket
import subprocess
import sys
import types

import pytest
from typer.testing import CliRunner

import ders_cli as ders
from ders_cli.archive import ArchiveReader
from ders_cli.cli.app import app
from ders_cli.errors import InputError
from fixtures.synthetic import upcycled_tensors, write_model

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def refused(r, *fragments):
    assert r.exit_code == 2, r.output
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, r.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert "Traceback" not in r.output


@pytest.fixture
def model(tmp_path):
    return write_model(tmp_path / "model", upcycled_tensors(layers=1),
                       side_files={"tokenizer.json": "{}"})


def packed(archive) -> list[str]:
    with ArchiveReader(archive) as r:
        return sorted(f.path for f in r.manifest.files)


def compress(model, tmp_path):
    return run("compress", model, "--drop", "0.5", "-o", tmp_path / "a.ders")


# --- links, FIFOs, devices, sockets ------------------------------------------------------------

def test_a_linked_folder_outside_the_model_is_refused(model, tmp_path):
    secrets = tmp_path / "home" / ".ssh"
    secrets.mkdir(parents=True)
    (secrets / "id_ed25519").write_text("PRIVATE KEY")
    (model / "extra").symlink_to(secrets)
    refused(compress(model, tmp_path), "extra", "is a link to a folder")
    assert not (tmp_path / "a.ders").exists()


def test_a_linked_file_outside_the_model_is_refused(model, tmp_path):
    (tmp_path / "bashrc").write_text("secret")
    (model / "notes.txt").symlink_to(tmp_path / "bashrc")
    refused(compress(model, tmp_path), "notes.txt", "outside the model folder")


def test_a_link_to_dev_zero_is_refused(model, tmp_path):
    (model / "vocab.txt").symlink_to("/dev/zero")
    refused(compress(model, tmp_path), "vocab.txt", "/dev/zero", "outside the model folder")


def test_a_link_inside_the_model_is_packed_as_the_file_it_names(model, tmp_path):
    (model / "special_tokens_map.json").symlink_to(model / "tokenizer.json")
    assert compress(model, tmp_path).exit_code == 0
    assert "special_tokens_map.json" in packed(tmp_path / "a.ders")


def test_a_hugging_face_cache_snapshot_links_into_its_blobs(tmp_path):
    """Snapshots of the Hub cache are links into ../../blobs: inside the repo's cache folder."""
    src = write_model(tmp_path / "src", upcycled_tensors(layers=1))
    repo = tmp_path / "hub" / "models--org--moe"
    snapshot = repo / "snapshots" / "0123abcd"
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for i, f in enumerate(sorted(src.iterdir())):
        blob = repo / "blobs" / f"blob{i}"
        blob.write_bytes(f.read_bytes())
        (snapshot / f.name).symlink_to(os.path.relpath(blob, snapshot))
    result = ders.compress(snapshot, ders.QuantSpec(4), tmp_path / "a.ders")
    assert ders.verify(result.archive, against=src).ok
    assert packed(tmp_path / "a.ders") == ["config.json"]


def test_a_broken_link_is_refused(model, tmp_path):
    (model / "merges.txt").symlink_to(model / "gone.txt")
    refused(compress(model, tmp_path), "merges.txt", "broken link")


def test_a_socket_in_the_model_folder_is_refused(model, tmp_path):
    sock = socket.socket(socket.AF_UNIX)
    try:
        os.chdir(model)  # AF_UNIX paths are short: bind relative to the folder
        sock.bind("agent.sock")
    finally:
        os.chdir(tmp_path)
    try:
        refused(compress(model, tmp_path), "agent.sock", "is a socket")
    finally:
        sock.close()


FIFO_RUN = """
import sys
sys.argv = ["ders"] + sys.argv[1:]
from ders_cli.cli.app import main
main()
"""


@pytest.mark.parametrize("where", ["model", "archive", "shard"])
def test_a_fifo_never_hangs(model, tmp_path, where):
    """A FIFO waits forever for a writer when opened for reading: ders must not open one."""
    if where == "model":
        os.mkfifo(model / "vocab.txt")
        args = ["compress", str(model), "--drop", "0.5", "-o", str(tmp_path / "a.ders")]
        expect = "is a FIFO"
    elif where == "archive":
        os.mkfifo(tmp_path / "x.ders")
        args = ["verify", str(tmp_path / "x.ders")]
        expect = "is a FIFO, expected a .ders archive"
    else:
        os.mkfifo(tmp_path / "x.safetensors")
        args = ["inspect", str(tmp_path / "x.safetensors")]
        expect = "is a FIFO, expected a .safetensors file"
    proc = subprocess.run([sys.executable, "-c", FIFO_RUN, *args], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and expect in lines[0], proc.stderr
    assert not (tmp_path / "a.ders").exists()


# --- ders' own files ------------------------------------------------------------------------------

def test_archives_and_leftovers_in_the_model_folder_are_never_packed(model, tmp_path):
    ders.compress(model, ders.QuantSpec(4), model / "inside.ders")
    (model / ".old.ders.partial-12345").write_bytes(b"half an archive")
    r = compress(model, tmp_path)
    assert r.exit_code == 0, r.output
    text = " ".join(r.stderr.split())
    assert "skipped inside.ders: a ders archive is never packed into another" in text
    assert "skipped .old.ders.partial-12345: left by an interrupted ders run" in text
    assert packed(tmp_path / "a.ders") == ["config.json", "tokenizer.json"]


def test_a_sharded_archive_in_the_model_folder_is_never_read_as_the_model(model, tmp_path):
    """Its shards and index end in .safetensors and .safetensors.index.json, like a model's."""
    result = ders.compress(model, ders.QuantSpec(4), model / "inner.ders", max_shard_size=4000)
    assert result.archive.name.endswith(".safetensors.index.json")
    r = compress(model, tmp_path)
    assert r.exit_code == 0, r.output
    assert "inner.ders-00001-of-" in r.stderr and "never packed" in r.stderr
    assert packed(tmp_path / "a.ders") == ["config.json", "tokenizer.json"]
    with ArchiveReader(tmp_path / "a.ders") as reader:
        assert [s.file for s in reader.manifest.shards] == ["model.safetensors"]


# --- JSON within limits ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["config.json", "model.safetensors.index.json"])
def test_a_json_file_nested_1000_deep_is_refused_naming_it(model, tmp_path, name):
    (model / name).write_text("[" * 1000 + "]" * 1000)
    refused(compress(model, tmp_path), name, "nested 1000 levels deep")
    refused(run("inspect", model), name, "nested 1000 levels deep")


def test_a_safetensors_header_nested_1000_deep_is_refused_naming_it(model, tmp_path):
    shard = model / "model.safetensors"
    body = ('{"x":' + "[" * 1000 + "]" * 1000 + "}").encode()
    shard.write_bytes(len(body).to_bytes(8, "little") + body)
    refused(compress(model, tmp_path), "model.safetensors", "nested 1001 levels deep")


def test_a_config_that_is_not_an_object_is_only_ignored(model, tmp_path):
    (model / "config.json").write_text(json.dumps([1, 2, 3]))
    assert compress(model, tmp_path).exit_code == 0


# --- files that change while they are read --------------------------------------------------------

@pytest.mark.parametrize("change", ["grew", "shrank"])
def test_a_side_file_that_changes_size_while_read_is_an_error_naming_it(model, tmp_path,
                                                                        monkeypatch, change):
    """The size seen when the file was opened differs from the bytes it then gives."""
    real = os.fstat
    target = model / "tokenizer.json"

    def fstat(fd):
        st = real(fd)
        if os.path.samestat(st, os.stat(target)):
            delta = -1 if change == "grew" else 1  # the file then holds more, or fewer
            return os.stat_result((*st[:6], st.st_size + delta, *st[7:10]))
        return st

    proxy = types.SimpleNamespace(**{k: getattr(os, k) for k in dir(os) if k[:2] != "__"})
    proxy.fstat = fstat  # only compress.py's view of os: shard readers keep the real one
    monkeypatch.setattr(importlib.import_module("ders_cli.compress"), "os", proxy)
    with pytest.raises(InputError, match=f"tokenizer.json: {change} while it was read"):
        ders.compress(model, ders.QuantSpec(4), tmp_path / "a.ders")
    assert list(tmp_path.iterdir()) == [model]
