"""--workers: the members of a group run on several threads, and nothing a command writes or
reports depends on how many."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import ders_cli as ders
from ders_cli.cli.app import app
from ders_cli.errors import CorruptArchiveError, InputError, UsageError
from ders_cli.lanes import Workers, computing, worker_count
from fixtures.make_golden import ARCHIVES, TINY, spec_of
from fixtures.synthetic import upcycled_tensors, write_model
from tests.test_lossless import rewrite_array

COUNTS = (1, 2, 3)


@pytest.fixture(autouse=True)
def kernels():
    """The numba kernels on, as on any checkpoint of size (these are small enough for the
    torch twins, which tests/test_golden.py covers): they run on the workers' threads."""
    from ders_cli.codecs import jit

    before = jit.set_mode("always")
    yield
    jit.set_mode(before)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("m")
    return write_model(root / "model", upcycled_tensors(layers=2, experts=6, hidden=32,
                                                        intermediate=48), shards=2)


@pytest.mark.parametrize("name", sorted(ARCHIVES))
def test_golden_settings_write_the_same_archive_with_any_worker_count(tmp_path, name):
    shas = set()
    for n in COUNTS:
        ders.compress(TINY, spec_of(name), tmp_path / f"{n}.ders", reserve=0, workers=n)
        shas.add(sha(tmp_path / f"{n}.ders"))
    assert len(shas) == 1


@pytest.mark.parametrize("spec", [ders.SparseSpec(0.9), ders.QuantSpec(2),
                                  ders.SparseSpec(0.8, mask="magnitude", value_bits=3),
                                  ders.LosslessSpec(), ders.TargetSpec(max_error=0.004)],
                         ids=["drop", "q2", "magnitude", "lossless", "max-error"])
def test_archives_expansions_and_reports_do_not_depend_on_the_workers(model, tmp_path, spec):
    archives, expanded, reports = set(), set(), []
    for n in COUNTS:
        archive = tmp_path / f"{n}.ders"
        ders.compress(model, spec, archive, workers=n)
        archives.add(sha(archive))
        folder = ders.expand(archive, tmp_path / f"x{n}", workers=n).folder
        expanded.add(tuple(sha(p) for p in sorted(folder.iterdir())))
        report = ders.verify(archive, against=model, workers=n)
        assert report.ok
        reports.append([(g.key, g.rel_error, g.cos) for g in report.groups])
    assert len(archives) == 1 and len(expanded) == 1
    assert reports[0] == reports[1] == reports[2]


def test_a_non_finite_member_is_named_with_workers(tmp_path):
    tensors = upcycled_tensors(layers=1, experts=4)
    name = next(n for n in tensors if ".experts.2." in n)
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[5] = float("nan")
    model = write_model(tmp_path / "nan", tensors)
    with pytest.raises(InputError, match="contains NaN or Inf") as exc:
        ders.compress(model, ders.QuantSpec(4), tmp_path / "a.ders", workers=2)
    assert name in str(exc.value)
    assert not (tmp_path / "a.ders").exists()


@pytest.mark.parametrize("workers", [1, 2])
def test_a_member_that_does_not_synthesize_stops_expand_and_fails_verify(model, tmp_path,
                                                                         workers):
    archive = tmp_path / "a.ders"
    ders.compress(model, ders.QuantSpec(2), archive)
    with ders.ArchiveReader(archive) as r:
        name = r.manifest.groups[1].codec["arrays"]["codes"]

    def flip(data):
        data[len(data) // 2] ^= 0x55

    rewrite_array(archive, name, flip)  # checksums fixed: only synthesis can tell
    with pytest.raises(CorruptArchiveError, match="differs from the archive's record"):
        ders.expand(archive, tmp_path / "x", workers=workers)
    assert not (tmp_path / "x").exists()
    report = ders.verify(archive, workers=workers)
    assert not report.ok
    assert any("does not reproduce the recorded bytes" in p for p in report.problems)


def test_workers_must_be_positive(model, tmp_path):
    for bad in (0, -1, 1.5, True):
        with pytest.raises(UsageError) as exc:
            ders.compress(model, ders.SparseSpec(0.9), tmp_path / "a.ders", workers=bad)
        assert exc.value.param == "workers"
    result = CliRunner().invoke(app, ["expand", str(tmp_path / "none.ders"), "--workers", "0"])
    assert result.exit_code == 2 and "--workers must be a positive integer" in result.output


def test_workers_run_in_order_and_one_worker_is_a_plain_loop():
    with computing(3) as pool:
        assert pool.parallel and worker_count() == 3 and torch.get_num_threads() == 1
        assert list(pool.map(lambda i: i * i, range(20))) == [i * i for i in range(20)]
        with pytest.raises(ZeroDivisionError):
            list(pool.map(lambda i: 1 // (i - 7), range(20)))
    one = Workers(1)
    assert not one.parallel
    assert list(one.map(lambda i: i + 1, range(3))) == [1, 2, 3]
    assert one.submit(lambda: 4).result() == 4
