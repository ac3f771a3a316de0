"""The stage profile (ders_cli/profile.py) names where a command's time goes, only when asked,
and bench/warm.py turns it into the README's tables."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from bench.warm import STAGES, Result, Run, tables
from fixtures.make_golden import TINY

ROOT = Path(__file__).resolve().parent.parent


def test_a_profiled_command_writes_its_stages(tmp_path):
    prof = tmp_path / "profile.json"
    env = dict(os.environ, DERS_PROFILE=str(prof))
    cmd = [sys.executable, "-m", "ders_cli", "compress", str(TINY), "--lossless", "-o",
           str(tmp_path / "a.ders"), "--quiet"]
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True)
    doc = json.loads(prof.read_text())
    assert {"read", "hash", "base", "codec", "zstd", "measure", "write"} <= set(doc["stages"])
    assert set(doc["stages"]) <= set(STAGES)
    for v in doc["stages"].values():
        assert v["calls"] >= 1 and v["cpu"] >= 0 and v["wall"] >= 0
    assert doc["process_cpu"] > 0 and doc["process_wall"] > 0


def test_unprofiled_commands_write_nothing(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "DERS_PROFILE"}
    subprocess.run([sys.executable, "-c", "import ders_cli.profile as p; "
                    "assert not p.enabled()"], cwd=tmp_path, env=env, check=True)
    assert not any(tmp_path.iterdir())


def test_warm_tables_are_ratios_to_the_copy_of_the_same_round():
    copies = [Run(2.0, 1.0, 10), Run(4.0, 2.0, 10), Run(2.0, 1.0, 10)]
    runs = [Run(6.0, 4.0, 5 << 20, {"stages": {"codec": {"cpu": 1.5}}}),
            Run(8.0, 6.0, 6 << 20, {"stages": {"codec": {"cpu": 2.5}}}),
            Run(10.0, 8.0, 7 << 20, {"stages": {"codec": {"cpu": 3.5}}})]
    text = tables([Result("compress --drop 0.9", runs, copies, 100_000_000)])
    row = next(line for line in text.splitlines() if line.startswith("| `compress"))
    # wall ratios 3, 2, 5 -> median 3; CPU ratios 4, 3, 8 -> 4; MB/s over the median wall 8 s;
    # then the medians of CPU s, the copy's wall and CPU s, and the peak RSS
    assert row.startswith("| `compress --drop 0.9` | 4.0x | 3.0x | 12 | 8.00 | 6.00 | 2.00 | "
                          "1.00 | 7 |")
    stage_row = [line for line in text.splitlines() if line.startswith("| `compress")][1]
    assert "| 6.00 |" in stage_row and "| 2.50 |" in stage_row  # the median run's stages
