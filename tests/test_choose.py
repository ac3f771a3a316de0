"""--max-error and --target-size: a setting per group, and the promise kept."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

import ders_cli as ders
from ders_cli.choose import LADDER, TargetSpec, parse_fraction
from ders_cli.cli.app import app
from ders_cli.errors import InputError, UsageError
from fixtures.synthetic import upcycled_tensors, write_model


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return write_model(tmp_path_factory.mktemp("c") / "m",
                       upcycled_tensors(layers=2, hidden=64, intermediate=128))


def test_the_ladder_is_ordered_by_size_and_error(model, tmp_path):
    sizes, errors = [], []
    for i, spec in enumerate(LADDER):
        r = ders.compress(model, spec, tmp_path / f"{i}.ders")
        sizes.append(r.archive_bytes)
        errors.append(max(g.max_rel_error for g in r.groups))
    assert sizes == sorted(sizes) and errors == sorted(errors, reverse=True)


@pytest.fixture(scope="module")
def rungs(model, tmp_path_factory):
    """Each group's stored bytes and error at every rung of the ladder, and lossless."""
    out = {}
    folder = tmp_path_factory.mktemp("rungs")
    for i, spec in enumerate((*LADDER, ders.LosslessSpec())):
        for g in ders.compress(model, spec, folder / f"{i}.ders").groups:
            out[g.key, spec.label] = (g.stored_bytes, g.max_rel_error)
    return out


@pytest.mark.parametrize("limit", [0.02, 0.004, 5e-4])
def test_max_error_takes_the_cheapest_setting_within(model, tmp_path, limit, rungs):
    result = ders.compress(model, TargetSpec(max_error=limit), tmp_path / "a.ders")
    report = ders.verify(tmp_path / "a.ders", against=model)
    assert report.ok and report.max_rel_error <= limit
    labels = [spec.label for spec in LADDER]
    for g in result.groups:
        meeting = [lb for lb in labels if rungs[g.key, lb][1] <= limit]
        cheapest = min(meeting, key=lambda lb: labels.index(lb)) if meeting else None
        if g.setting == "lossless":  # smaller than the cheapest rung within the limit
            assert g.max_rel_error == 0.0
            assert cheapest is None or g.stored_bytes < rungs[g.key, cheapest][0]
        else:
            assert g.setting == cheapest


@pytest.mark.parametrize("target", [0.45, 0.6, 0.8])
def test_target_size_is_kept(model, tmp_path, target):
    result = ders.compress(model, TargetSpec(target_size=target), tmp_path / "a.ders")
    assert result.ratio <= target
    assert ders.verify(tmp_path / "a.ders", against=model).ok
    richer = ders.compress(model, TargetSpec(target_size=target + 0.15), tmp_path / "b.ders")
    assert max(g.max_rel_error for g in richer.groups) <= max(
        g.max_rel_error for g in result.groups)


def test_an_impossible_target_is_refused(model, tmp_path):
    with pytest.raises(InputError, match="below the smallest archive"):
        ders.compress(model, TargetSpec(target_size=0.01), tmp_path / "a.ders")
    assert not (tmp_path / "a.ders").exists()


def test_fractions_and_flags(model, tmp_path):
    assert parse_fraction("25%") == 0.25 and parse_fraction("0.4") == 0.4
    with pytest.raises(UsageError):
        parse_fraction("lots")
    runner = CliRunner()
    for args, message in ((["--drop", "0.9", "--max-error", "0.1"], "exactly one of"),
                          ([], "exactly one of"), (["--target-size", "150%"], "(0, 100%]"),
                          (["--max-error", "-1"], "must be positive")):
        r = runner.invoke(app, ["compress", str(model), *args, "-o", str(tmp_path / "x.ders")])
        assert r.exit_code == 2 and message in r.stderr, r.output
    r = runner.invoke(app, ["compress", str(model), "--target-size", "50%", "-o",
                            str(tmp_path / "y.ders"), "--json"])
    assert r.exit_code == 0 and '"setting": "target 50%"' in r.stdout
