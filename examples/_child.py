"""Re-running an example script in a fresh process with the same options (clean peak memory)."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys


def run_child(script: str, a: argparse.Namespace, *extra: str,
              skip: tuple[str, ...] = ("json",)) -> dict:
    """Run ``script`` with ``a``'s options (less ``skip``) and ``extra``; its last stdout line
    is a JSON document. Set MALLOC_MMAP_THRESHOLD_ (glibc) in the environment to have freed
    blocks of a few MB returned to the system at once: peak RSS then counts only live memory,
    at the price of page faults on every new block.
    """
    args = []
    for key, value in vars(a).items():
        if key in skip or value is None or value is False:
            continue
        args.append("--" + key.replace("_", "-"))
        if value is not True:
            args.append(str(value))
    out = subprocess.run([sys.executable, script, *args, *extra], check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])
