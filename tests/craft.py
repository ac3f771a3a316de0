"""Crafting archives as an attacker would: the header hash has no key, so anyone can edit a
manifest, the array table or the stored bytes and re-sign the result. ``Crafted`` takes an
archive apart (manifest, array table, array bytes), lets a test edit any of it, and writes a
new archive whose header hash and stored checksums are all consistent again (the checksums of
the hash the manifest's version takes: SHA-256 or BLAKE3)."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from ders_cli import digests
from ders_cli.archive import header_hash
from ders_cli.constants import HASH_HEX_LEN, HEADER_PREFIX
from ders_cli.digests import Digest


@dataclass
class Crafted:
    manifest: dict
    table: dict[str, dict]  # array name -> {"dtype", "shape"}, in data order
    data: dict[str, bytes]  # array name -> its bytes
    metadata: dict[str, str]

    @property
    def digest(self) -> Digest:
        """The hash of the checksums the manifest holds (its version's)."""
        return digests.for_version(self.manifest["version"])

    @property
    def field(self) -> str:
        """The name of a record's checksum field ("sha256" or "blake3")."""
        return self.digest.name

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
        """Write the archive; with ``rehash`` every stored checksum is recomputed (an
        attacker's archive), without it the manifest's checksums stay as edited.
        ``text_edit``: a function applied to the manifest's JSON text (for what a dict cannot
        hold: a repeated key)."""
        if rehash:
            self.manifest["stored"] = {n: self.digest.hex(d) for n, d in self.data.items()}
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
            "code = 3\n"
            "try:\n"
            "    from ders_cli.cli.main import run\n"
            "    code = run()\n"
            "finally:\n"
            "    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
            "    sys.stderr.write(f'\\npeak-rss-kb {rss}\\n')\n"
            "sys.exit(code)\n")
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


@dataclass
class CraftedSharded:
    """A sharded archive (docs/FORMAT.md 10) taken apart: the index's metadata and weight_map,
    the manifest, and each shard as a ``Crafted`` (its table, data and metadata). ``save``
    re-signs every shard and the index, and records the shards' sizes and header hashes in
    the index, as an attacker would."""

    index_name: str
    metadata: dict
    weight_map: dict[str, str]
    manifest: dict
    shards: dict[str, Crafted]  # by file name, in the index's order

    @staticmethod
    def load(index: Path) -> CraftedSharded:
        index = Path(index)
        doc = json.loads(index.read_bytes())
        meta = doc["metadata"]
        shards = {}
        for r in meta["ders.shards"]:
            raw = (index.parent / r["file"]).read_bytes()
            (n,) = struct.unpack("<Q", raw[:8])
            header = json.loads(raw[8 : 8 + n])
            metadata = header.pop("__metadata__")
            table, data = {}, {}
            for name, e in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
                b, end = e["data_offsets"]
                table[name] = {"dtype": e["dtype"], "shape": list(e["shape"])}
                data[name] = raw[8 + n + b : 8 + n + end]
            shards[r["file"]] = Crafted({}, table, data, metadata)
        return CraftedSharded(index.name, meta, doc["weight_map"],
                              json.loads(meta["ders.manifest"]), shards)

    def shard_bytes(self, file: str) -> bytes:
        s = self.shards[file]
        meta = {k: v for k, v in s.metadata.items() if k != "ders.header_sha256"}
        header: dict = {"__metadata__": {"ders.header_sha256": "0" * HASH_HEX_LEN, **meta}}
        pos = 0
        for name, e in s.table.items():
            size = len(s.data[name])
            header[name] = {**e, "data_offsets": [pos, pos + size]}
            pos += size
        body = json.dumps(header, separators=(",", ":")).encode()
        return signed(body) + b"".join(s.data.values())

    def save(self, folder: Path, records: bool = True, rehash: bool = True,
             text_edit=None) -> Path:
        """Write the index and every shard into ``folder``; returns the index's path.
        ``records``: the index's shard list gets each shard's real size and header hash.
        ``text_edit``: a function applied to the index's JSON text before it is signed."""
        from ders_cli.archive import index_hash
        from ders_cli.constants import INDEX_PREFIX

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        if rehash:
            digest = digests.for_version(self.manifest["version"])
            self.manifest["stored"] = {n: digest.hex(d)
                                       for s in self.shards.values() for n, d in s.data.items()}
        records = records and isinstance(self.metadata["ders.shards"], list)
        by_file = {r["file"]: r for r in self.metadata["ders.shards"]} if records else {}
        for file in self.shards:
            raw = self.shard_bytes(file)
            (folder / file).write_bytes(raw)
            if records and file in by_file:
                start = 8 + len(HEADER_PREFIX)
                by_file[file]["size"] = len(raw)
                by_file[file]["header_sha256"] = raw[start : start + HASH_HEX_LEN].decode()
        meta = {k: v for k, v in self.metadata.items() if k != "ders.index_sha256"}
        meta["ders.manifest"] = json.dumps(self.manifest, separators=(",", ":"))
        doc = {"metadata": {"ders.index_sha256": "0" * HASH_HEX_LEN, **meta},
               "weight_map": self.weight_map}
        text = json.dumps(doc, separators=(",", ":"))
        raw = (text_edit(text) if text_edit else text).encode()
        if raw.startswith(INDEX_PREFIX):
            start = len(INDEX_PREFIX)
            raw = raw[:start] + index_hash(raw).encode() + raw[start + HASH_HEX_LEN :]
        (folder / self.index_name).write_bytes(raw)
        return folder / self.index_name
