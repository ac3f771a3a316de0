"""A mutation fuzzer over real small archives and safetensors files (docs/FORMAT.md 4.1).

Each case mutates a seed (bytes flipped, cut short, a header length past the end or huge,
the header's JSON edited and re-signed, the manifest edited and re-signed, a stored array's
bytes edited and re-hashed, a model's shard edited) and runs the commands on it in-process:
``verify`` and ``expand`` on archives, ``inspect`` and ``compress`` on models. Every case must
end with exit code 0, 1 (verify: damaged) or a clean 2 with one line on stderr; never an
internal error (3), a traceback, a hang (an alarm per case), more than about 1 GB of new
address space (RLIMIT_AS while the fuzzer runs), a file outside the output, or a partial output.
A sample also runs end to end in a process of its own with its memory measured.

CI runs a few thousand cases (``DERS_FUZZ_SCALE=1``, derandomized: the same cases every run);
``make fuzz`` runs ten times as many, fresh random ones, and flips every byte of every seed
archive in turn, and prints the counts.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import struct
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
import typer.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

import ders_cli as ders
from ders_cli.cli.app import app
from ders_cli.errors import DersError
from fixtures.synthetic import upcycled_tensors, write_model
from tests.craft import Crafted, signed

SCALE = float(os.environ.get("DERS_FUZZ_SCALE", "1"))
RANDOM = os.environ.get("DERS_FUZZ_RANDOM") == "1"  # make fuzz: new cases every run
EXHAUSTIVE = os.environ.get("DERS_FUZZ_EXHAUSTIVE") == "1"  # make fuzz: every byte flipped
CASE_SECONDS = 30  # a case that runs longer hangs
HEADROOM = 1 << 30  # new address space a case may take
ESCAPE = Path("/tmp/ders-fuzz-escape")  # where crafted absolute paths point
runner = CliRunner()
COUNTS: Counter = Counter()


def examples(n: int):
    return settings(max_examples=max(1, int(n * SCALE)), deadline=None, derandomize=not RANDOM,
                    suppress_health_check=list(HealthCheck), database=None)


# --- seeds ----------------------------------------------------------------------------------------

FUSED = "model.layers.0.mlp.experts.gate_up_proj"


@pytest.fixture(scope="module")
def seeds(tmp_path_factory) -> dict[str, Path]:
    """Small archives of every stored form, and the model they came from."""
    work = tmp_path_factory.mktemp("seeds")
    tensors = upcycled_tensors(layers=1, experts=3, hidden=8, intermediate=16)
    g = torch.Generator().manual_seed(3)
    base = torch.randn(16, 8, generator=g)
    tensors[FUSED] = torch.stack([base + 0.01 * torch.randn(16, 8, generator=g)
                                  for _ in range(3)]).to(torch.bfloat16)
    model = write_model(work / "model", tensors, shards=2,
                        side_files={"tokenizer.json": '{"a": 1}', "sub/x.txt": "x"})
    out = {"model": model}
    for name, spec in (("q2", ders.QuantSpec(2, 8)), ("q1", ders.QuantSpec(1, 16)),
                       ("drop", ders.SparseSpec(0.5, value_bits=4, value_group=8)),
                       ("mag", ders.SparseSpec(0.9, mask="magnitude")),
                       ("bitmap", ders.SparseSpec(0.3, mask="magnitude")),
                       ("lossless", ders.LosslessSpec())):
        ders.compress(model, spec, work / f"{name}.ders")
        out[name] = work / f"{name}.ders"
    return out


ARCHIVES = ("q2", "q1", "drop", "mag", "bitmap", "lossless")


# --- the guarantees -------------------------------------------------------------------------------

class Hang(Exception):
    pass


@pytest.fixture(scope="module", autouse=True)
def limits(request):
    """An address-space limit while the fuzzer runs (a case that allocates by an unchecked
    number fails here instead of taking the machine), and the counts printed at the end."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    with open("/proc/self/status") as f:
        size = next(int(line.split()[1]) << 10 for line in f if line.startswith("VmSize:"))
    limit = size + HEADROOM + (512 << 20)  # thread stacks and arenas of the lanes
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))

    def alarm(*_):
        raise Hang(f"a case ran more than {CASE_SECONDS} s")

    # Typer builds the click command anew at every invoke (0.1 s, most of a case): once here.
    command = getattr(typer.testing, "_get_command", None)
    if command is not None:
        built = command(app)
        typer.testing._get_command = lambda _app: built

    old = signal.signal(signal.SIGALRM, alarm)
    yield
    signal.signal(signal.SIGALRM, old)
    if command is not None:
        typer.testing._get_command = command
    resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
    capture = request.config.pluginmanager.getplugin("capturemanager")
    if capture is not None and COUNTS:
        with capture.global_and_fixture_disabled():  # the counts reach the terminal, -q or not
            print(f"\nfuzz cases by family and outcome (scale {SCALE:g}, "
                  f"{'random' if RANDOM else 'derandomized'}):")
            for family in sorted({f for f, _ in COUNTS}):
                parts = ", ".join(f"{o} {n}" for (f, o), n in sorted(COUNTS.items())
                                  if f == family)
                print(f"  {family}: {parts}")
            print(f"  total: {sum(COUNTS.values())}")


def invoke(args: list[str]):
    signal.alarm(CASE_SECONDS)
    try:
        return runner.invoke(app, [str(a) for a in args])
    finally:
        signal.alarm(0)


def check(result, command: str) -> str:
    """The outcome of one command on one case, after asserting it is an allowed one."""
    exc = result.exception
    assert exc is None or isinstance(exc, SystemExit), (command, repr(exc), result.output)
    assert result.exit_code in (0, 1, 2), (command, result.exit_code, result.output)
    assert "Traceback" not in result.output and "internal error" not in result.output
    if result.exit_code == 2:
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1, (command, result.stderr)
    return {0: "ok", 1: "damaged", 2: "refused"}[result.exit_code]


def run_archive(path: Path, family: str) -> str:
    """verify and expand one mutated archive; nothing may appear but a complete output.
    Returns verify's verdict."""
    work = path.parent
    before = set(os.listdir(work))
    verdict = check(invoke(["verify", path]), "verify")
    out = work / "out"
    expanded = invoke(["expand", path, "-o", out])
    outcome = check(expanded, "expand")
    after = set(os.listdir(work))
    if outcome == "ok":
        assert after == before | {"out"}, sorted(after - before)
        assert verdict == "ok", "expand wrote an archive that verify refuses"
        shutil.rmtree(out)
    else:
        assert after == before, sorted(after - before)  # nothing half-written
    assert not ESCAPE.exists()
    COUNTS[(family, f"verify {verdict}")] += 1
    return verdict


def resign(body: bytes) -> bytes:
    return signed(body)


# --- archives: raw damage -------------------------------------------------------------------------

@examples(500)
@given(kind=st.sampled_from(ARCHIVES), data=st.data())
def test_byte_flips(seeds, tmp_path_factory, kind, data):
    """Damage, not an edit: every changed archive is detected (verify exit 1, or refused)."""
    raw = bytearray(seeds[kind].read_bytes())
    positions = data.draw(st.sets(st.integers(0, len(raw) - 1), min_size=1, max_size=4))
    for pos in positions:
        raw[pos] ^= data.draw(st.integers(1, 255))
    assert run_archive(write(tmp_path_factory, bytes(raw)), "byte flips") != "ok"


@examples(150)
@given(kind=st.sampled_from(ARCHIVES), data=st.data())
def test_truncations_and_extensions(seeds, tmp_path_factory, kind, data):
    raw = seeds[kind].read_bytes()
    if data.draw(st.booleans()):
        raw = raw[: data.draw(st.integers(0, len(raw) - 1))]
    else:
        raw += data.draw(st.binary(min_size=1, max_size=64))
    assert run_archive(write(tmp_path_factory, raw), "truncations") != "ok"


@examples(100)
@given(kind=st.sampled_from(ARCHIVES),
       length=st.one_of(st.integers(0, 200_000), st.sampled_from(
           [2**63, 2**64 - 1, 100_000_001, 8, 7])))
def test_header_lengths(seeds, tmp_path_factory, kind, length):
    raw = seeds[kind].read_bytes()
    run_archive(write(tmp_path_factory, struct.pack("<Q", length) + raw[8:]), "header lengths")


# --- archives: edits an attacker re-signs ---------------------------------------------------------

def deep(n: int) -> list:
    """A list nested ``n`` deep (the crafting tool's own json.dumps recurses: n < 900)."""
    out: list = []
    for _ in range(n):
        out = [out]
    return out


HOSTILE = st.one_of(
    st.sampled_from([0, -1, 1, 2, 7, 2**31, 2**32 + 1, 2**63, -(2**63), 10**30, 1.5, -0.0,
                     float("inf"), None, True, False, "", ".", "..", "../x", "../../x",
                     str(ESCAPE / "x"), str(ESCAPE / "x.safetensors"), "a\\b", "a\x00b",
                     "a\x1b[2Jb", "[/x]", "config.json", "model.safetensors", "CONFIG.JSON",
                     "sub", "F16", "BF16", "U8", "Q4_K", "planes-zstd", "raw", "gaps", "bitmap",
                     "seed", "all", "0" * 64, "f" * 16, "x" * 300, "9" * 5000, [], {}, [0], [2**31],
                     [-1, 5], [5, 3], [0, 2**62], [[[[[[]]]]]]]),
    st.integers(), st.text(max_size=12), st.lists(st.integers(-3, 2**40), max_size=4),
    st.integers(60, 200).map(lambda n: deep(n)),
)
# What a renamed key's dotted part becomes: digits int() refuses ("²") or reads ("٣"), more
# digits than int() converts, and near-indices.
NAME_PARTS = ["\u00b2", "\u0663", "1" * 5000, "9" * 10, "-1", "07", "", "x"]


def paths(doc, prefix=()):
    """Every place in a JSON document: (path, value)."""
    yield prefix, doc
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield from paths(v, (*prefix, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            yield from paths(v, (*prefix, i))


def mutate_json(doc, data):
    """One edit of a JSON document: a value replaced by a hostile one, a key dropped or renamed
    (one dotted part of it replaced by a hostile one), a list item repeated or dropped, or a
    value nested deep."""
    places = [p for p, _ in paths(doc) if p]
    if not places:
        return doc
    path = places[data.draw(st.integers(0, len(places) - 1))]
    parent = doc
    for key in path[:-1]:
        parent = parent[key]
    op = data.draw(st.sampled_from(["replace", "replace", "replace", "drop", "repeat", "deep",
                                    "rename"]))
    last = path[-1]
    if op == "rename" and isinstance(parent, dict):
        parts = last.split(".")
        parts[data.draw(st.integers(0, len(parts) - 1))] = data.draw(st.sampled_from(NAME_PARTS))
        parent[".".join(parts)] = parent.pop(last)
    elif op == "replace":
        parent[last] = data.draw(HOSTILE)
    elif op == "drop":
        del parent[last]
    elif op == "repeat" and isinstance(parent, list):
        parent.insert(last, parent[last])
    elif op == "deep":
        parent[last] = deep(data.draw(st.integers(1, 800)))
    return doc


@examples(700)
@given(kind=st.sampled_from(ARCHIVES), data=st.data())
def test_manifest_edits_resigned(seeds, tmp_path_factory, kind, data):
    c = Crafted.load(seeds[kind])
    rehash = data.draw(st.booleans())
    c.manifest = mutate_json(c.manifest, data)
    work = fresh(tmp_path_factory)
    try:
        c.save(work / "a.ders", rehash=rehash)
    except (TypeError, ValueError, KeyError, AttributeError):
        return  # the edit broke the crafting tool itself (a non-JSON key): no archive
    run_archive(work / "a.ders", "manifest edits")


@examples(400)
@given(kind=st.sampled_from(ARCHIVES), data=st.data())
def test_array_table_edits_resigned(seeds, tmp_path_factory, kind, data):
    """The safetensors header of the archive: shapes, dtypes, offsets, keys (re-signed)."""
    raw = seeds[kind].read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    meta = header.pop("__metadata__")
    header = mutate_json(header, data)
    if data.draw(st.booleans()):  # a key given twice: a dict cannot hold it, so in the text
        body = json.dumps({"__metadata__": meta, **header}, separators=(",", ":"))
        dup = next((k for k in header), None)
        if dup is not None:
            body = body[:-1] + "," + json.dumps(dup) + ":" + json.dumps(header[dup]) + "}"
    else:
        body = json.dumps({"__metadata__": meta, **header}, separators=(",", ":"))
    work = fresh(tmp_path_factory)
    (work / "a.ders").write_bytes(resign(body.encode()) + raw[8 + n :])
    run_archive(work / "a.ders", "array table edits")


@examples(500)
@given(kind=st.sampled_from(ARCHIVES), data=st.data())
def test_stored_array_edits_rehashed(seeds, tmp_path_factory, kind, data):
    """A stored array's bytes changed and every checksum made to agree: the decoders (zstd
    frames, gaps, bitmaps, codes) meet bytes no writer made."""
    c = Crafted.load(seeds[kind])
    names = sorted(c.data)
    name = names[data.draw(st.integers(0, len(names) - 1))]
    blob = bytearray(c.data[name])
    op = data.draw(st.sampled_from(["flip", "cut", "extend", "zero", "random"]))
    if op == "flip" and blob:
        for _ in range(data.draw(st.integers(1, 3))):
            blob[data.draw(st.integers(0, len(blob) - 1))] ^= data.draw(st.integers(1, 255))
    elif op == "cut" and blob:
        blob = blob[: data.draw(st.integers(0, len(blob) - 1))]
    elif op == "extend":
        blob += data.draw(st.binary(min_size=1, max_size=32))
    elif op == "zero":
        blob = bytearray(len(blob))
    else:
        blob = bytearray(data.draw(st.binary(max_size=max(len(blob), 1))))
    if c.table[name]["dtype"] == "U8" and len(c.table[name]["shape"]) == 1:
        c.put(name, bytes(blob))
    elif len(blob) == len(c.data[name]):
        c.data[name] = bytes(blob)
    else:
        return  # a typed array's shape would have to change too: the table edits cover that
    work = fresh(tmp_path_factory)
    c.save(work / "a.ders")
    run_archive(work / "a.ders", "stored array edits")


# --- models: safetensors files from anywhere ------------------------------------------------------

@examples(300)
@given(data=st.data())
def test_safetensors_files(seeds, tmp_path_factory, data):
    """A model's shard mutated: inspect and compress either work or refuse in one line, and a
    refused compress leaves nothing."""
    work = fresh(tmp_path_factory)
    model = work / "model"
    shutil.copytree(seeds["model"], model)
    shard = sorted(model.glob("*.safetensors"))[data.draw(st.integers(0, 1))]
    raw = bytearray(shard.read_bytes())
    (n,) = struct.unpack("<Q", raw[:8])
    op = data.draw(st.sampled_from(["flip", "cut", "length", "json", "json"]))
    if op == "flip":
        raw[data.draw(st.integers(0, len(raw) - 1))] ^= data.draw(st.integers(1, 255))
    elif op == "cut":
        raw = raw[: data.draw(st.integers(0, len(raw) - 1))]
    elif op == "length":
        raw[:8] = struct.pack("<Q", data.draw(st.one_of(st.integers(0, 2 * len(raw)),
                                                        st.just(2**64 - 1))))
    else:
        header = mutate_json(json.loads(raw[8 : 8 + n]), data)
        body = json.dumps(header).encode()
        body += b" " * (-len(body) % 8)
        raw = bytearray(struct.pack("<Q", len(body)) + body + raw[8 + n :])
    shard.write_bytes(bytes(raw))
    check(invoke(["inspect", model]), "inspect")
    before = set(os.listdir(work))
    outcome = check(invoke(["compress", model, "--drop", "0.5", "-o", work / "a.ders"]),
                    "compress")
    after = set(os.listdir(work))
    assert after == (before | {"a.ders"} if outcome == "ok" else before)
    COUNTS[("safetensors files", f"compress {outcome}")] += 1


# --- make fuzz: every single-bit flip of every byte ---------------------------------------------

@pytest.mark.skipif(not EXHAUSTIVE, reason="make fuzz only (DERS_FUZZ_EXHAUSTIVE=1)")
@pytest.mark.parametrize("kind", ARCHIVES)
def test_every_byte_flipped(seeds, tmp_path, kind):
    """Each byte of each seed flipped in turn (bit 0; bits 0 and 7 in the length prefix): the
    library's verify reports damage or refuses the file, never OK and never another error."""
    raw = seeds[kind].read_bytes()
    path = tmp_path / "a.ders"
    for pos in range(len(raw)):
        for mask in (0x01, 0x80) if pos < 8 else (0x01,):
            damaged = bytearray(raw)
            damaged[pos] ^= mask
            path.write_bytes(bytes(damaged))
            signal.alarm(CASE_SECONDS)
            try:
                verdict = "damaged" if not ders.verify(path).ok else "ok"
            except DersError:
                verdict = "refused"
            finally:
                signal.alarm(0)
            assert verdict != "ok", (kind, pos, mask)
            COUNTS[("every byte flipped", f"verify {verdict}")] += 1


# --- end to end: a process of its own -------------------------------------------------------------

DRIVER = """
import io, resource, sys, time
resource.setrlimit(resource.RLIMIT_AS, (int(sys.argv[1]), int(sys.argv[1])))
from ders_cli.cli.main import run
report = sys.stdout
for path in sys.argv[2:]:
    for cmd in (["verify", path], ["expand", path, "-o", path + ".out"]):
        sys.argv = ["ders", *cmd]
        sys.stdout, sys.stderr = io.StringIO(), io.StringIO()
        start = time.perf_counter()
        code = run()
        text = sys.stderr.getvalue()
        sys.stdout, sys.stderr = report, sys.__stderr__
        lines = [line for line in text.splitlines() if line.strip()]
        print("RESULT", code, len(lines), round(time.perf_counter() - start, 2), cmd[0], path,
              flush=True)
print("peak-rss-kb", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, flush=True)
"""


def test_end_to_end_sample_under_a_memory_limit(seeds, tmp_path):
    """A sample of mutated archives through the real entry point, in one process with 2 GiB
    of address space: exit codes 0, 1 or 2 (2 with one line), resident memory under 1 GB."""
    import random

    rng = random.Random(7)
    paths = []
    for i in range(int(24 * max(SCALE, 1))):
        kind = ARCHIVES[i % len(ARCHIVES)]
        raw = bytearray(seeds[kind].read_bytes())
        if i % 3 == 0:
            raw[rng.randrange(len(raw))] ^= 1 << rng.randrange(8)
        elif i % 3 == 1:
            c = Crafted.load(seeds[kind])
            g = c.manifest["groups"][0]
            g["shape"] = [2**28] if i % 2 else [g["shape"][0], 2**20]
            c.save(tmp_path / "tmp.ders")
            raw = bytearray((tmp_path / "tmp.ders").read_bytes())
        else:
            raw = raw[: rng.randrange(len(raw))]
        path = tmp_path / f"{i}.ders"
        path.write_bytes(bytes(raw))
        paths.append(str(path))
    proc = subprocess.run([sys.executable, "-c", DRIVER, str(2 << 30), *paths],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    rss_kb = int(lines[-1].split()[1])
    results = [line for line in lines if line.startswith("RESULT ")]
    assert len(results) == 2 * len(paths), proc.stdout
    for line in results:
        _, code, count, seconds, cmd, path = line.split(maxsplit=5)
        assert code in ("0", "1", "2"), line
        assert code != "2" or count == "1", line
        assert float(seconds) < CASE_SECONDS, line
        COUNTS[("end to end", f"{cmd} exit {code}")] += 1
    assert rss_kb < 1024 * 1024, f"peak resident memory {rss_kb / 1024:.0f} MB"
    COUNTS[("end to end", f"peak RSS MB {rss_kb // 1024}")] += 1
    assert not ESCAPE.exists()


# --- helpers --------------------------------------------------------------------------------------

def fresh(factory) -> Path:
    """A new empty folder per case (hypothesis runs many cases in one test)."""
    return factory.mktemp("case", numbered=True)


def write(factory, raw: bytes) -> Path:
    path = fresh(factory) / "a.ders"
    path.write_bytes(raw)
    return path

