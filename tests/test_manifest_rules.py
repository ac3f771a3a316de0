"""Every rule a reader enforces on a manifest (docs/FORMAT.md 4.1, 8), each with a crafted
archive: edited as an attacker would and re-signed (the header hash has no key), so that only
the rule can refuse it. expand, verify, the runtime and training all open archives through
ArchiveReader; a refused archive is one line naming it and the problem, exit code 2, nothing
written anywhere."""

from __future__ import annotations

import struct
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import ders_cli as ders
from ders_cli.archive import ArchiveReader
from ders_cli.cli.app import app
from ders_cli.errors import CorruptArchiveError, InvalidArchiveError
from fixtures.synthetic import upcycled_tensors, write_model
from tests.craft import Crafted, craft, data_section, error_lines, peak_rss_mb, run_limited, signed

runner = CliRunner()
EXPERT = "model.layers.0.block_sparse_moe.experts.{E}.w1.weight"
FUSED = "model.layers.0.mlp.experts.gate_up_proj"


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("rules")


@pytest.fixture(scope="module")
def model(work):
    tensors = upcycled_tensors(layers=1, experts=4)
    g = torch.Generator().manual_seed(1)
    base = torch.randn(64, 16, generator=g)
    tensors[FUSED] = torch.stack([base + 0.01 * torch.randn(64, 16, generator=g)
                                  for _ in range(4)]).to(torch.bfloat16)
    return write_model(work / "model", tensors,
                       side_files={"tokenizer.json": "{}", "sub/notes.txt": "notes"})


@pytest.fixture(scope="module")
def q2(model, work):
    ders.compress(model, ders.QuantSpec(2, 8), work / "q2.ders")
    return work / "q2.ders"


def group_of(c: Crafted, key: str) -> dict:
    return next(g for g in c.manifest["groups"] if g["key"] == key)


def add_side_file(c: Crafted, path: str, content: bytes = b"x") -> None:
    name = f"ders/file/{len(c.manifest['files'])}"
    c.put(name, content)
    c.manifest["files"].append({"path": path, "size": len(content),
                                c.field: c.digest.hex(content), "array": name})


def side_path(path: str):
    def edit(c: Crafted) -> None:
        c.manifest["files"][0]["path"] = path
    return edit


def shard_path(path: str):
    def edit(c: Crafted) -> None:
        c.manifest["shards"][0]["file"] = path
    return edit


def reshape_in_shard(c: Crafted, name: str, shape: list[int]) -> None:
    """Give tensor ``name`` another shape in the stored shard header, offsets kept consistent."""
    doc = c.shard_header()
    doc[name]["shape"] = shape
    pos = 0
    for e in sorted((e for k, e in doc.items() if k != "__metadata__"),
                    key=lambda e: e["data_offsets"][0]):
        numel = 1
        for d in e["shape"]:
            numel *= d
        size = numel * {"F32": 4, "BF16": 2, "F16": 2}[e["dtype"]]
        e["data_offsets"] = [pos, pos + size]
        pos += size
    c.set_shard_header(doc)


def member_dtype(c: Crafted) -> None:
    group_of(c, EXPERT)["dtype"] = "F16"  # the BF16 -> F16: bf16 bytes under F16


def smaller_slot(c: Crafted) -> None:
    reshape_in_shard(c, EXPERT.format(E=1), [16, 16])


def fused_of_huge(c: Crafted) -> None:
    for m in group_of(c, FUSED + "[{E}]")["members"]:
        m["of"] = 10**9


def fused_first_dim(c: Crafted) -> None:
    reshape_in_shard(c, FUSED, [2, 128, 16])  # same bytes; 2 rows cannot hold 4 slices


def passthrough_dtype(c: Crafted) -> None:
    c.table["model.norm.weight"]["dtype"] = "F16"


def passthrough_sha(c: Crafted) -> None:
    c.manifest["tensors"]["model.norm.weight"][c.field] = "0" * 64


def side_sha(c: Crafted) -> None:
    c.manifest["files"][0][c.field] = "1" * 64


def tensor_without_record(c: Crafted) -> None:
    c.manifest["tensors"].pop("model.norm.weight")
    c.data.pop("model.norm.weight")
    c.table.pop("model.norm.weight")


def record_without_tensor(c: Crafted) -> None:
    c.put("ghost", b"\0\0\0\0", "F32", [1])
    c.manifest["tensors"]["ghost"] = {"shard": 0, c.field: "0" * 64}


def shared_array(c: Crafted) -> None:
    add_side_file(c, "other.txt")
    c.manifest["files"][-1]["array"] = c.manifest["files"][0]["array"]
    c.manifest["files"][-1]["size"] = c.manifest["files"][0]["size"]
    c.manifest["files"][-1][c.field] = c.manifest["files"][0][c.field]


def unused_array(c: Crafted) -> None:
    c.put("stray", b"abc")


def version_mismatch(c: Crafted) -> None:
    c.manifest["version"] = 1


def bits_as_text(c: Crafted) -> None:
    g = group_of(c, EXPERT)
    g["codec"]["params"]["bits"] = "2"  # a string where a number belongs


# (rule, edit, what the one line says); docs/FORMAT.md 4.1 lists the same rules.
RULES = [
    ("side file escaping upwards", side_path("../../x"), "has a '..' component"),
    ("side file at an absolute path", side_path("/tmp/ders-rules/x"), "is absolute"),
    ("shard at an absolute path", shard_path("/tmp/ders-rules/x.safetensors"), "is absolute"),
    ("empty path", side_path(""), "is empty"),
    ("'.' component", side_path("a/./b"), "has a '.' component"),
    ("empty component", side_path("a//b"), "has an empty component"),
    ("trailing slash", side_path("a/"), "has an empty component"),
    ("backslash", side_path("..\\x"), "contains a backslash"),
    ("NUL", side_path("a\x00b"), "contains a control character"),
    ("terminal escape", side_path("a\x1b[2Jb"), "contains a control character"),
    ("bidi override", side_path("txt.\u202eexe"), "contains a control character"),
    ("lone surrogate", side_path("a\udc80"), "lone surrogate"),
    ("long name", side_path("x" * 256), "longer than 255 bytes"),
    ("duplicate path", lambda c: add_side_file(c, "config.json"), "collides with"),
    ("case-only twin", lambda c: add_side_file(c, "CONFIG.json"), "collides with"),
    ("shard named like a side file", shard_path("config.json"), "does not end in .safetensors"),
    ("shard colliding with a side file", lambda c: add_side_file(c, "model.safetensors"),
     "collides with"),
    ("file where a folder is needed", lambda c: add_side_file(c, "sub"), "needs a folder"),
    ("member dtype", member_dtype, "is BF16 in its shard, the group is F16"),
    ("member in a smaller slot", smaller_slot, "has shape [16, 16] in its shard"),
    ("fused slices of 10^9", fused_of_huge, "slices are not all members"),
    ("fused tensor's first dimension", fused_first_dim, "is a slice of 4 of a tensor"),
    ("passthrough dtype", passthrough_dtype, "stored as F16"),
    ("passthrough checksum", passthrough_sha, "its checksum is not that of the bytes stored"),
    ("side file checksum", side_sha, "its checksum is not that of the bytes stored"),
    ("tensor without a record", tensor_without_record, "has no record"),
    ("record without a tensor", record_without_tensor, "is in no stored shard header"),
    ("array with two roles", shared_array, "share the array"),
    ("array without a role", unused_array, "has no role"),
    ("manifest and header versions", version_mismatch, "differs from the header's"),
    ("codec parameter of the wrong type", bits_as_text, "quant bits must be one of"),
]


@pytest.mark.parametrize("rule,edit,message", RULES, ids=[r[0] for r in RULES])
def test_each_rule_refuses_a_crafted_archive(q2, tmp_path, rule, edit, message):
    bad = craft(q2, tmp_path / "bad.ders", edit)
    t0 = time.perf_counter()
    with pytest.raises(InvalidArchiveError) as info:
        ArchiveReader(bad)
    assert time.perf_counter() - t0 < 2  # refused from the header, before any large work
    assert message in str(info.value) and str(bad) in str(info.value)
    assert not isinstance(info.value, CorruptArchiveError)


NAME_RULES = RULES[:18]  # the rules on where files go, end to end through the commands


@pytest.mark.parametrize("rule,edit,message", NAME_RULES, ids=[r[0] for r in NAME_RULES])
@pytest.mark.parametrize("cmd", ["expand", "verify"])
def test_commands_refuse_it_in_one_line_and_write_nothing(q2, tmp_path, rule, edit, message,
                                                          cmd, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a").mkdir()
    bad = craft(q2, tmp_path / "a" / "bad.ders", edit)
    before = sorted(p for p in tmp_path.rglob("*"))
    args = [cmd, str(bad)] + (["-o", str(tmp_path / "a" / "out")] if cmd == "expand" else [])
    r = runner.invoke(app, args)
    assert r.exit_code == 2, r.output
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0] and "bad.ders" in lines[0], r.stderr
    assert "Traceback" not in r.output
    assert sorted(p for p in tmp_path.rglob("*")) == before
    assert not Path("/tmp/ders-rules").exists()


def test_the_manifest_must_not_repeat_a_key(q2, tmp_path):
    bad = Crafted.load(q2).save(tmp_path / "bad.ders",
                                text_edit=lambda text: '{"format":"ders",' + text[1:])
    with pytest.raises(InvalidArchiveError, match="key 'format' appears twice"):
        ArchiveReader(bad)


@pytest.mark.parametrize("where", ["manifest", "shard header", "archive header"])
def test_json_nested_1000_deep_is_refused_cleanly(q2, tmp_path, where):
    deep = "[" * 1000 + "]" * 1000
    c = Crafted.load(q2)
    if where == "manifest":
        bad = c.save(tmp_path / "bad.ders", text_edit=lambda t: t[:-1] + ',"x":' + deep + "}")
    elif where == "shard header":
        body = c.data[c.manifest["shards"][0]["header"]].rstrip()
        c.put(c.manifest["shards"][0]["header"], body[:-1] + b',"x":' + deep.encode() + b"}")
        bad = c.save(tmp_path / "bad.ders")
    else:
        c.metadata["x"] = "1"
        bad = c.save(tmp_path / "bad.ders")
        raw = bad.read_bytes()
        (n,) = struct.unpack("<Q", raw[:8])
        body = raw[8 : 8 + n].rstrip().replace(b'"x":"1"', b'"x":' + deep.encode())
        bad.write_bytes(signed(body) + data_section(bad))
    with pytest.raises(InvalidArchiveError, match=r"nested 100\d levels deep"):
        ArchiveReader(bad)
    r = runner.invoke(app, ["verify", str(bad)])
    assert r.exit_code == 2 and "levels deep, more than the limit of 64" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


# --- codec parameters bounded by the shapes (docs/FORMAT.md 5.3, 5.1, 5.6) ---------------------

def huge_group_size(c: Crafted) -> None:
    """group_size 2^31 with arrays consistent with it (one scale and offset per member):
    a valid archive whose quantization groups a reader must size by the member, not by G."""
    g = group_of(c, EXPERT)
    g["codec"]["params"]["group_size"] = 2**31
    for suffix in ("scale", "offset"):
        name = g["codec"]["arrays"][suffix]
        rows, cols = c.table[name]["shape"]
        data = c.data[name]
        c.put(name, b"".join(data[r * cols * 2 : r * cols * 2 + 2] for r in range(rows)),
              "BF16", [rows, 1])


def test_a_group_size_of_2_31_costs_no_memory(q2, tmp_path):
    bad = craft(q2, tmp_path / "bad.ders", huge_group_size)
    with ArchiveReader(bad):
        pass  # a valid archive: G >= n is one group
    proc = run_limited(["verify", str(bad)], memory=3 << 30)
    assert proc.returncode == 1, proc.stderr  # its members synthesize to other bytes
    assert "synthesis does not reproduce" in proc.stderr and "Traceback" not in proc.stderr
    assert peak_rss_mb(proc) < 1024
    proc = run_limited(["expand", str(bad), "-o", str(tmp_path / "out")], memory=3 << 30)
    assert proc.returncode == 2 and len(error_lines(proc)) == 1, proc.stderr
    assert "differs from the archive's record" in proc.stderr and peak_rss_mb(proc) < 1024
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.ders"]


@pytest.fixture(scope="module")
def magnitude(model, work):
    ders.compress(model, ders.SparseSpec(0.9, mask="magnitude"), work / "mag.ders")
    return work / "mag.ders"


def test_sparse_positions_past_the_member_are_refused(magnitude, tmp_path):
    def past_the_end(c: Crafted) -> None:
        g = group_of(c, EXPERT)
        p = g["codec"]["params"]
        assert p["index"] == "gaps"
        name = g["codec"]["arrays"]["index"]
        k, n = p["keep"], 32 * 16
        # member 0: k-1 gaps of 0, then a gap that lands at position n + 5
        stream = bytes(k - 1) + _varint(n + 5 - (k - 1))
        rest = c.data[name][p["index_offsets"][1]:]
        offsets = [0, len(stream)] + [o - p["index_offsets"][1] + len(stream)
                                      for o in p["index_offsets"][2:]]
        p["index_offsets"] = offsets
        c.put(name, stream + rest)

    bad = craft(magnitude, tmp_path / "bad.ders", past_the_end)
    report = ders.verify(bad)
    assert not report.ok and any("past the member" in p for p in report.problems)
    with pytest.raises(CorruptArchiveError, match="past the member"):
        ders.expand(bad, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def _varint(v: int) -> bytes:
    out = bytearray()
    while True:
        out.append((v & 0x7F) | (0x80 if v >= 0x80 else 0))
        v >>= 7
        if not v:
            return bytes(out)


def test_a_zstd_frame_that_declares_a_huge_size_allocates_nothing(q2, tmp_path):
    """A base frame whose header declares 2^40 bytes of content: refused from its header."""
    import zstandard

    def declare_huge(c: Crafted) -> None:
        name = group_of(c, EXPERT)["base"]["array"]
        frame = zstandard.ZstdCompressor(level=1).compress(bytes(32 * 16 * 2))
        # Rebuild the header with an 8-byte content size: descriptor FCS flag 3, no single
        # segment (so a window descriptor follows the descriptor).
        body = frame[zstandard.frame_header_size(frame):]
        header = frame[:4] + bytes([0xC0]) + bytes([0x50]) + (1 << 40).to_bytes(8, "little")
        c.put(name, header + body)

    bad = craft(q2, tmp_path / "bad.ders", declare_huge)
    proc = run_limited(["verify", str(bad)], memory=3 << 30)
    assert proc.returncode == 1 and "declares 1099511627776 bytes" in proc.stderr, proc.stderr
    assert peak_rss_mb(proc) < 1024


def test_expand_refuses_an_output_larger_than_the_free_disk(q2, tmp_path, monkeypatch):
    """An archive of kilobytes may declare terabytes (a zero base codes to nothing): expand
    compares what the archive declares with the disk's free space before writing."""
    import shutil

    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
    r = runner.invoke(app, ["expand", str(q2), "-o", str(tmp_path / "out")])
    assert r.exit_code == 2 and "GB free" in r.stderr and "out" in r.stderr, r.output
    assert not (tmp_path / "out").exists()
