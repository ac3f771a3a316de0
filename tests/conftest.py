"""Shared test fixtures. Tests that use ../shared skip cleanly when it is not there."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import settings

ROOT = Path(__file__).resolve().parents[1]
REAL_SLICE = ROOT.parent / "shared" / "real-slice"
GOLDEN = ROOT / "fixtures" / "golden"

# Property tests run a fixed number of examples with no deadline: codec calls on larger shapes
# take milliseconds and the 2-core CI machine is not a timing instrument.
settings.register_profile("ders", max_examples=60, deadline=None, derandomize=True)
settings.load_profile("ders")


@pytest.fixture(scope="session")
def real_slice() -> Path:
    if not (REAL_SLICE / "moe-layer0.safetensors").is_file():
        pytest.skip("../shared/real-slice is not beside the repository")
    return REAL_SLICE
