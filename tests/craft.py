"""Crafting archives as an attacker would: the header hash has no key, so anyone can edit a
manifest, the array table or the stored bytes and re-sign the result. ``Crafted`` takes an
archive apart (manifest, array table, array bytes), lets a test edit any of it, and writes a
new archive whose header hash and stored sha256s are all consistent again."""

from __future__ import annotations

import hashlib
import json
import struct
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from ders_cli.archive import header_hash
from ders_cli.constants import HASH_HEX_LEN, HEADER_PREFIX


@dataclass
class Crafted:
    manifest: dict
    table: dict[str, dict]  # array name -> {"dtype", "shape"}, in data order
    data: dict[str, bytes]  # array name -> its bytes
    metadata: dict[str, str]

    @staticmethod
    def load(path: Path) -> Crafted:
        raw = Path(path).read_bytes()
        (n,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8 : 8 + n])
        metadata = header.pop("__metadata__")
        start = 8 + n
        table, data = {}, {}
        for name, e in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            b, end = e["data_offsets"]
            table[name] = {"dtype": e["dtype"], "shape": list(e["shape"])}
            data[name] = raw[start + b : start + end]
        return Crafted(json.loads(metadata["ders.manifest"]), table, data, metadata)

    def put(self, name: str, data: bytes, dtype: str = "U8", shape: list[int] | None = None
            ) -> None:
        """Store (or replace) an array; a U8 vector by default."""
        self.data[name] = bytes(data)
        self.table[name] = {"dtype": dtype, "shape": [len(data)] if shape is None else shape}

    def shard_header(self, i: int = 0) -> dict:
        return json.loads(self.data[self.manifest["shards"][i]["header"]])

    def set_shard_header(self, doc: dict, i: int = 0) -> None:
        """Replace shard ``i``'s stored header (padded to 8 bytes) and keep its size right."""
        body = json.dumps(doc, separators=(",", ":")).encode()
        body += b" " * (-len(body) % 8)
        data_len = max((e["data_offsets"][1] for k, e in doc.items() if k != "__metadata__"),
                       default=0)
        self.put(self.manifest["shards"][i]["header"], body)
        self.manifest["shards"][i]["size"] = 8 + len(body) + data_len

    def save(self, path: Path, rehash: bool = True, text_edit=None) -> Path:
        """Write the archive; with ``rehash`` every stored sha256 is recomputed (an attacker's
        archive), without it the manifest's sha256s stay as edited. ``text_edit``: a function
        applied to the manifest's JSON text (for what a dict cannot hold: a repeated key)."""
        if rehash:
            self.manifest["stored"] = {n: hashlib.sha256(d).hexdigest()
                                       for n, d in self.data.items()}
        meta = dict(self.metadata)
        meta["ders.header_sha256"] = "0" * HASH_HEX_LEN
        text = json.dumps(self.manifest, separators=(",", ":"))
        meta["ders.manifest"] = text_edit(text) if text_edit else text
        header: dict = {"__metadata__": {"ders.header_sha256": meta.pop("ders.header_sha256"),
                                         **meta}}
        pos = 0
        for name, e in self.table.items():
            size = len(self.data[name])
            header[name] = {**e, "data_offsets": [pos, pos + size]}
            pos += size
        body = json.dumps(header, separators=(",", ":")).encode()
        Path(path).write_bytes(signed(body) + b"".join(self.data.values()))
        return Path(path)


def signed(body: bytes) -> bytes:
    """Length prefix and header bytes (padded to 8), with the header hash recomputed."""
    body = bytearray(body + b" " * (-len(body) % 8))
    assert body.startswith(HEADER_PREFIX)
    prefix = struct.pack("<Q", len(body))
    start = len(HEADER_PREFIX)
    body[start : start + HASH_HEX_LEN] = header_hash(prefix, bytes(body)).encode()
    return prefix + bytes(body)


def data_section(path: Path) -> bytes:
    raw = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return raw[8 + n :]


def craft(src: Path, dest: Path, edit, rehash: bool = True) -> Path:
    """``dest``: ``src`` with ``edit(crafted)`` applied and everything re-signed."""
    c = Crafted.load(src)
    edit(c)
    return c.save(dest, rehash)


def run_limited(args: list[str], memory: int = 2 << 30, timeout: float = 120,
                cwd: Path | None = None) -> subprocess.CompletedProcess:
    """``ders ARGS`` in a process of its own with at most ``memory`` bytes of address space
    (a crafted archive that made ders allocate by an unchecked number dies here, not the
    machine) and ``timeout`` seconds; returns the finished process (stdout, stderr, returncode).
    The child reports its peak resident memory on the last line of stderr, as
    ``peak-rss-kb N`` (see ``_limited``)."""
    code = ("import resource, sys, runpy\n"
            f"resource.setrlimit(resource.RLIMIT_AS, ({memory}, {memory}))\n"
            "sys.argv = ['ders'] + sys.argv[1:]\n"
            "try:\n"
            "    from ders_cli.cli.app import main\n"
            "    main()\n"
            "finally:\n"
            "    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
            "    sys.stderr.write(f'\\npeak-rss-kb {rss}\\n')\n")
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd)


def peak_rss_mb(proc: subprocess.CompletedProcess) -> float:
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("peak-rss-kb "), proc.stderr
    return int(line.split()[1]) / 1024


def error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    """stderr's lines without the memory report and blank lines."""
    return [line for line in proc.stderr.splitlines()
            if line.strip() and not line.startswith("peak-rss-kb ")]
