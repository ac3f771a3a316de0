"""Re-running an example script in a fresh process with the same options (clean peak memory)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys


def run_child(script: str, a: argparse.Namespace, *extra: str,
              skip: tuple[str, ...] = ("json",)) -> dict:
    """Run ``script`` with ``a``'s options (less ``skip``) and ``extra``; its last stdout line
    is a JSON document.

    glibc's malloc keeps freed blocks of a few MB in its heap once it has seen some freed
    (a sliding mmap threshold), which would count memory a model no longer holds in its peak
    RSS; a fixed threshold returns them to the system, so peaks measure what is live.
    """
    args = []
    for key, value in vars(a).items():
        if key in skip or value is None or value is False:
            continue
        args.append("--" + key.replace("_", "-"))
        if value is not True:
            args.append(str(value))
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
    out = subprocess.run([sys.executable, script, *args, *extra], check=True,
                         capture_output=True, text=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])
