"""JSON from files ders did not write: a safetensors header, an archive's manifest, a model's
config.json or index. Python's parser recurses once per nesting level and has no size limit, so
a document nested 1,000 deep is a RecursionError, not a parse error. Here the nesting depth and
the size are checked before parsing (docs/FORMAT.md 1), duplicate keys are refused (which of
two values a reader takes is a lie waiting to happen), and every failure is a ValueError.
"""

from __future__ import annotations

import json
import re
from typing import Any

import numpy as np

# serde_json, which the reference safetensors implementation uses, stops at 128; the deepest
# document ders writes (a manifest) nests 6 levels.
MAX_DEPTH = 64
# JSON strings: their brackets do not nest. The unrolled form runs at C speed on large headers.
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_OPEN = np.zeros(256, dtype=np.int8)
_OPEN[[ord("["), ord("{")]] = 1
_OPEN[[ord("]"), ord("}")]] = -1


def nesting_depth(data: bytes) -> int:
    """The deepest nesting of arrays and objects in a JSON text (strings skipped)."""
    skeleton = _STRING.sub(b"", data)
    if not skeleton:
        return 0
    steps = _OPEN[np.frombuffer(skeleton, dtype=np.uint8)]
    return int(np.cumsum(steps, dtype=np.int64).max(initial=0))


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict:
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"key {key!r} appears twice")
        out[key] = value
    return out


def loads(data: bytes | str, *, max_bytes: int | None = None,
          max_depth: int = MAX_DEPTH) -> Any:
    """Parse JSON within limits; raises ValueError naming the problem."""
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else bytes(data)
    if max_bytes is not None and len(raw) > max_bytes:
        raise ValueError(f"{len(raw)} bytes of JSON, more than the {max_bytes}-byte limit")
    depth = nesting_depth(raw)
    if depth > max_depth:
        raise ValueError(f"JSON nested {depth} levels deep, more than the limit of {max_depth}")
    try:
        text = raw.decode("utf-8") if not isinstance(data, str) else data
        return json.loads(text, object_pairs_hook=_no_duplicates)
    except UnicodeDecodeError as exc:
        raise ValueError(f"not UTF-8 ({exc.reason} at byte {exc.start})") from None
    except RecursionError:  # unreachable after the depth check; kept as the last line
        raise ValueError("JSON nested too deeply") from None
    except json.JSONDecodeError as exc:
        raise ValueError(str(exc)) from None
