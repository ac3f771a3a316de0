"""--device: where the arithmetic runs. No GPU is needed here: the torch mask generator a GPU
uses is checked against the numpy one bit for bit, and an archive written through it is the
same archive."""

from __future__ import annotations

import hashlib

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from typer.testing import CliRunner

import ders_cli as ders
from ders_cli.cli.app import app
from ders_cli.codecs import mask as mask_module
from ders_cli.codecs.mask import mask_positions, mask_positions_torch
from ders_cli.device import resolve_device
from ders_cli.errors import UsageError
from fixtures.synthetic import upcycled_tensors, write_model


@given(seed=st.integers(0, 2**64 - 1), n=st.integers(1, 5000), frac=st.floats(0, 1))
def test_torch_masks_equal_numpy_masks(seed, n, frac):
    k = int(n * frac)
    assert mask_positions_torch(seed, n, k, "cpu").tolist() == mask_positions(seed, n, k).tolist()


@pytest.mark.parametrize("n", [2**32 - 1, 2**32 + 5, 2**40 + 3])
def test_torch_masks_on_wide_domains(n):
    assert mask_positions_torch(7, n, 200, "cpu").tolist() == mask_positions(7, n, 200).tolist()


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    for bad in ("tpu", "nonsense", "mps"):
        with pytest.raises(UsageError):
            resolve_device(bad)
    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match="no CUDA device"):
            resolve_device("cuda")


def test_cli_refuses_a_missing_gpu(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    model = write_model(tmp_path / "m", upcycled_tensors(layers=1))
    r = CliRunner().invoke(app, ["compress", str(model), "--drop", "0.9", "--device", "cuda"])
    assert r.exit_code == 2 and "no CUDA device is available" in r.stderr
    assert not (tmp_path / "m.ders").exists()


def test_the_torch_mask_path_writes_the_same_archive(tmp_path, monkeypatch):
    model = write_model(tmp_path / "m", upcycled_tensors(layers=1, hidden=32, intermediate=64))
    ders.compress(model, ders.SparseSpec(0.9), tmp_path / "numpy.ders")
    monkeypatch.setattr(mask_module, "positions_on",
                        lambda seed, n, k, device: mask_positions_torch(seed, n, k, device))
    monkeypatch.setattr("ders_cli.codecs.sparse.positions_on", mask_module.positions_on)
    ders.compress(model, ders.SparseSpec(0.9), tmp_path / "torch.ders")
    digest = [hashlib.sha256((tmp_path / n).read_bytes()).hexdigest()
              for n in ("numpy.ders", "torch.ders")]
    assert digest[0] == digest[1]
    assert ders.verify(tmp_path / "torch.ders", against=model).ok
