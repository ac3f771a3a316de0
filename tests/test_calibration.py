"""Calibrated compression (--calibration): the model reads a text one layer at a time and every
expert's codes are fitted to the inputs it sees. Mechanics only (the quality figures live in
bench/fidelity.py and bench/small_model.py): the output error on other text falls, the archive
format and decoder are unchanged, the manifest names the text, memory stays at one layer, and
--max-error limits the output error."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

import ders_cli as ders
from ders_cli.archive import ArchiveReader
from ders_cli.calibration import sequential
from ders_cli.calibration.solve import quantize_calibrated, sparse_values, weighted_error
from ders_cli.calibration.statistics import CalibrationSpec
from ders_cli.choose import TargetSpec
from ders_cli.cli.app import app
from ders_cli.codecs import QuantSpec, SparseSpec
from ders_cli.codecs.quant import quantize
from ders_cli.errors import UsageError
from fixtures.tokenizer import VOCAB, save_byte_tokenizer
from fixtures.upcycled import Dims, make_upcycled
from tests.test_eval import write_text

runner = CliRunner()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("calib")
    model = make_upcycled(tmp / "moe", Dims(vocab=VOCAB, layers=2))
    save_byte_tokenizer(model)
    write_text(tmp / "text", documents=8)
    (tmp / "calib").mkdir()
    (tmp / "held").mkdir()
    for i, doc in enumerate(sorted((tmp / "text").iterdir())):  # disjoint halves
        doc.rename(tmp / ("calib" if i % 2 else "held") / doc.name)
    return tmp


SPECS = [QuantSpec(2), QuantSpec(1), SparseSpec(0.9)]


@pytest.fixture(scope="module")
def archives(tiny):
    out = {}
    for spec in SPECS:
        for calibrated in (False, True):
            dest = tiny / f"{spec.label.replace(' ', '')}-{calibrated}.ders"
            options = {"calibration": CalibrationSpec(tiny / "calib", tokens=2048,
                                                      seq_len=128)} if calibrated else {}
            out[spec.label, calibrated] = ders.compress(tiny / "moe", spec, dest, **options)
    return out


def test_calibrated_output_error_is_lower_on_other_text(tiny, archives):
    paths = [archives[key].archive for key in sorted(archives)]
    result = ders.evaluate(tiny / "moe", paths, tiny / "held", max_tokens=1024, seq_len=128)
    worst: dict[tuple[str, bool], float] = {}
    for key, r in archives.items():
        rows = [p for p in result.layers if p.archive == str(r.archive)]
        assert len(rows) == 6  # 2 layers x 3 projections
        worst[key] = max(p.output_error for p in rows)
    for spec in SPECS:
        assert worst[spec.label, True] < 0.8 * worst[spec.label, False], spec.label


def test_format_unchanged_and_the_manifest_names_the_text(tiny, archives):
    for spec in SPECS:
        plain, calibrated = archives[spec.label, False], archives[spec.label, True]
        assert plain.calibration is None
        assert calibrated.calibration["tokens"] == 2048
        assert calibrated.calibration["seq_len"] == 128
        assert len(calibrated.calibration["text_sha256"]) == 64
        with ArchiveReader(plain.archive) as a, ArchiveReader(calibrated.archive) as b:
            assert "calibration" not in a.manifest.extra
            assert b.manifest.extra["calibration"] == calibrated.calibration
            assert a.manifest.version == b.manifest.version
            for ga, gb in zip(a.manifest.groups, b.manifest.groups, strict=True):
                assert ga.key == gb.key and ga.codec["name"] == gb.codec["name"]
                assert {k: v for k, v in ga.codec["params"].items()} == gb.codec["params"]
                for k in ga.codec["arrays"]:
                    ea = a.entry(ga.codec["arrays"][k])
                    eb = b.entry(gb.codec["arrays"][k])
                    assert (ea.dtype, ea.shape) == (eb.dtype, eb.shape)
        # The decoder is the same: every synthesized expert matches its recorded checksum.
        assert ders.verify(calibrated.archive, against=tiny / "moe").ok
        assert all(g.max_output_error is not None for g in calibrated.groups)


def test_gptq_never_worse_than_its_start_on_the_calibration_inputs():
    gen = torch.Generator().manual_seed(0)
    # Correlated inputs of uneven energy, as a layer's are: what error feedback exploits.
    x = (torch.randn(256, 6, generator=gen) @ torch.randn(6, 32, generator=gen)
         + 0.1 * torch.randn(256, 32, generator=gen)) * torch.linspace(0.2, 2, 32)
    h = x.T @ x
    base = torch.randn(48, 32, generator=gen).to(torch.bfloat16).float()
    member = (base + 0.01 * torch.randn(48, 32, generator=gen)).to(torch.bfloat16).float()
    delta = (member - base).reshape(-1)
    for bits in (1, 2, 4):
        _, scale, offset, start = quantize(delta, bits, 64, "rtn")
        q, off, sc = quantize_calibrated(delta, h, bits, 64,
                                         None if offset is None else offset.float(),
                                         scale.float(), base=base.reshape(-1),
                                         dtype=torch.bfloat16)
        assert q.dtype == torch.uint8 and int(q.max()) < 2**bits
        qg = q.float().view(-1, 64)
        fitted = (qg * 2 - 1) * sc[:, None] if bits == 1 else off[:, None] + qg * sc[:, None]

        def err(d):
            stored = (base + d.view(48, 32)).to(torch.bfloat16).float()
            return weighted_error(stored - member, h)

        assert err(fitted.reshape(-1)) < 0.7 * err(start)
        # Scales and offsets are values of the stored dtype.
        assert torch.equal(sc, sc.to(torch.bfloat16).float())


def test_sparse_values_are_the_least_squares_values():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(512, 16, generator=gen)
    h = x.T @ x
    delta = torch.randn(8 * 16, generator=gen)
    pos = torch.sort(torch.randperm(128, generator=gen)[:40]).values
    v = sparse_values(delta, pos, h, damp=0.0)
    fitted = torch.zeros(128).index_copy_(0, pos, v)
    best = weighted_error((fitted - delta).view(8, 16), h)
    for _ in range(5):  # any other values on those positions give more output error
        other = fitted.clone()
        other[pos] += 0.01 * torch.randn(pos.numel(), generator=gen)
        assert weighted_error((other - delta).view(8, 16), h) > best
    # Kept values that are the delta's own give more error than the fitted ones.
    plain = torch.zeros(128).index_copy_(0, pos, delta[pos])
    assert weighted_error((plain - delta).view(8, 16), h) > best


def test_one_layer_of_weights_at_a_time(tmp_path, monkeypatch):
    model = make_upcycled(tmp_path / "moe", Dims(vocab=VOCAB, layers=6))
    save_byte_tokenizer(model)
    write_text(tmp_path / "text", documents=2)
    held: list[set[int]] = []
    load = sequential.CheckpointLayers.load

    def spy(self, layer):
        load(self, layer)
        held.append({int(n.split(".")[2]) for n, p in self.model.named_parameters()
                     if p.device.type != "meta" and n.startswith("model.layers.")})

    monkeypatch.setattr(sequential.CheckpointLayers, "load", spy)
    r = ders.compress(model, QuantSpec(2), tmp_path / "q.ders",
                      calibration=CalibrationSpec(tmp_path / "text", tokens=512, seq_len=64))
    assert held == [{i} for i in range(6)]
    assert len(r.groups) == 18 and all(g.max_output_error is not None for g in r.groups)


def test_max_error_limits_the_output_error(tiny):
    r = ders.compress(tiny / "moe", TargetSpec(max_error=2e-3), tiny / "e.ders",
                      calibration=CalibrationSpec(tiny / "calib", tokens=1024, seq_len=128))
    plain = ders.compress(tiny / "moe", TargetSpec(max_error=2e-3), tiny / "e0.ders")
    for g in r.groups:
        assert g.setting == "lossless" or g.max_output_error <= 2e-3
    # The output error of these experts is below their weight error, so the same limit keeps
    # cheaper settings than the weight error would.
    assert r.archive_bytes < plain.archive_bytes


def test_refusals(tiny, tmp_path):
    with pytest.raises(UsageError, match="has none to fit"):
        ders.compress(tiny / "moe", ders.LosslessSpec(), tmp_path / "x.ders",
                      calibration=tiny / "calib")
    cases = [
        (["compress", str(tiny / "moe"), "--drop", "0.9", "--calibration-tokens", "64"],
         "--calibration-tokens applies only with --calibration"),
        (["quantize", str(tiny / "moe"), "--bits", "2", "--calibration-seq-len", "64"],
         "--calibration-seq-len applies only with --calibration"),
        (["compress", str(tiny / "moe"), "--lossless", "--calibration", str(tiny / "calib")],
         "has none to fit"),
        (["quantize", str(tiny / "moe"), "--bits", "2", "--calibration", str(tmp_path / "no")],
         "no such file or folder"),
        (["quantize", str(tiny / "moe"), "--bits", "2", "--calibration", str(tiny / "calib"),
          "--calibration-tokens", "10"], "must be at least --seq-len"),
    ]
    bare = make_upcycled(tmp_path / "bare", Dims(vocab=VOCAB, layers=1))  # no tokenizer
    cases.append((["quantize", str(bare), "--bits", "2", "--calibration", str(tiny / "calib")],
                  "has no tokenizer"))
    for args, message in cases:
        r = runner.invoke(app, [*args, "-o", str(tmp_path / "out.ders")])
        assert r.exit_code == 2, r.output
        assert message in " ".join(r.output.split())
        assert "Traceback" not in r.output
        assert not (tmp_path / "out.ders").exists()


def test_cli_table_says_output_error(tiny, tmp_path):
    r = runner.invoke(app, ["quantize", str(tiny / "moe"), "--bits", "2", "--calibration",
                            str(tiny / "calib"), "--calibration-tokens", "512",
                            "--calibration-seq-len", "128", "-o", str(tmp_path / "c.ders")])
    assert r.exit_code == 0, r.output
    assert "output error (max)" in r.output and "calibrated on 512 tokens" in r.output
    r = runner.invoke(app, ["quantize", str(tiny / "moe"), "--bits", "2", "--calibration",
                            str(tiny / "calib"), "--calibration-tokens", "512",
                            "--calibration-seq-len", "128", "-o", str(tmp_path / "d.ders"),
                            "--json"])
    doc = json.loads(r.output)
    assert doc["calibration"]["tokens"] == 512
    assert all(g["max_output_error"] > 0 for g in doc["groups"])


def test_cli_defaults_are_the_librarys():
    from ders_cli.calibration import statistics
    from ders_cli.cli import compress_cmd

    assert compress_cmd.DEFAULT_CALIBRATION_TOKENS == statistics.DEFAULT_TOKENS
    assert compress_cmd.DEFAULT_CALIBRATION_SEQ_LEN == statistics.DEFAULT_SEQ_LEN


def test_target_size_measures_output_error_and_workers_change_nothing(tiny, tmp_path):
    calib = CalibrationSpec(tiny / "calib", tokens=512, seq_len=128)
    archives = []
    for workers in (1, 2):
        dest = tmp_path / f"t{workers}.ders"
        r = ders.compress(tiny / "moe", TargetSpec(target_size=0.5), dest, calibration=calib,
                          workers=workers)
        assert r.calibration["tokens"] == 512
        assert all(g.max_output_error is not None for g in r.groups)
        archives.append(dest.read_bytes())
    assert archives[0] == archives[1]
