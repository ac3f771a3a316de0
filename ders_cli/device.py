"""Where the codec arithmetic runs: ``--device auto`` picks a CUDA GPU when there is one.

Reading, hashing and writing stay on the CPU; a group's weights move to the device for the
decomposition and back as compressed arrays. Every operation of synthesis is element-wise and
separately rounded (docs/FORMAT.md, "Synthesis and codecs"), so a GPU reconstructs the same bits
as a CPU.
"""

from __future__ import annotations

import torch

from .errors import UsageError


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """A torch device from "auto", "cpu", "cuda", "cuda:1", ...; refused when absent."""
    if spec is None or str(spec) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(str(spec))
    except RuntimeError:
        raise UsageError(f"device {spec!r} is not a device torch knows", param="device") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"device {spec}: no CUDA device is available",
                             param="device") from None
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"device {spec}: there are {torch.cuda.device_count()} CUDA "
                             "devices", param="device") from None
    elif device.type != "cpu":
        raise UsageError(f"device {spec}: only cpu and cuda are supported", param="device")
    return device
