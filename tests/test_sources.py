"""compress reads tensors through a TensorSource only: tensors held in memory (a trained model,
not yet saved) give the very archive their files give."""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import load_file

import ders_cli as ders
from ders_cli.checkpoint import open_checkpoint
from ders_cli.compress import compress_checkpoint
from ders_cli.safetensors_io import tensor_bytes
from fixtures.make_golden import TINY, spec_of


class MemorySource:
    """Tensors in memory, by name: what a trained model can hand to compress."""

    def __init__(self, tensors: dict) -> None:
        self.bytes = {n: tensor_bytes(t) for n, t in tensors.items()}

    def read_into(self, name: str, offset: int, out: memoryview) -> None:
        out = out.cast("B")
        out[:] = self.bytes[name][offset : offset + len(out)]

    def chunks(self, name: str):
        data = self.bytes[name]
        for start in range(0, len(data), 7):  # small pieces: nothing assumes one chunk
            yield data[start : start + 7]

    def path_of(self, name: str) -> Path:
        return Path("<memory>") / name


def test_tensors_in_memory_make_the_archive_their_files_make(tmp_path):
    ckpt = open_checkpoint(TINY)
    source = MemorySource(load_file(TINY / "model.safetensors"))
    for name in ("tiny-q3.ders", "tiny-drop0.5.ders", "tiny-lossless.ders"):
        memory, files = tmp_path / f"m-{name}", tmp_path / f"f-{name}"
        compress_checkpoint(ckpt, source, spec_of(name), memory, reserve=0)
        ders.compress(TINY, spec_of(name), files, reserve=0)
        assert memory.read_bytes() == files.read_bytes()
        assert ders.verify(memory, against=TINY).ok
