"""Scale in shape, not in bytes: headers with thousands of tensors, offsets past 4 GiB (in a
sparse file, so the test writes almost nothing), masks and packing over 2^32 elements."""

from __future__ import annotations

import json
import struct

import numpy as np
import torch

import ders_cli as ders
from ders_cli.checkpoint import open_checkpoint
from ders_cli.codecs.bitpack import pack, unpack
from ders_cli.codecs.mask import mask_positions
from ders_cli.detect import find_groups
from ders_cli.plan import estimate_header
from fixtures.synthetic import write_model


def test_thousands_of_tensors(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for layer in range(40):
        base = torch.randn(4, 8, generator=g)
        for e in range(8):
            for p in ("w1", "w2", "w3"):
                name = f"model.layers.{layer}.block_sparse_moe.experts.{e}.{p}.weight"
                tensors[name] = (base + 0.01 * torch.randn(4, 8, generator=g)).bfloat16()
        for i in range(20):
            tensors[f"model.layers.{layer}.misc.{i}.bias"] = torch.zeros(3)
    model = write_model(tmp_path / "m", tensors, shards=4)
    assert len(tensors) == 40 * (24 + 20)
    result = ders.compress(model, ders.QuantSpec(4), tmp_path / "a.ders", reserve=0)
    ckpt = open_checkpoint(model)
    found = find_groups({n: e for n, (_, e) in ckpt.where.items()})
    assert len(found.groups) == 120
    assert result.header_bytes - 8 <= estimate_header(ckpt, found)  # the room reserved suffices
    assert ders.verify(tmp_path / "a.ders", against=model).ok
    out = ders.expand(tmp_path / "a.ders", tmp_path / "r").folder
    assert len(list(out.glob("*.safetensors"))) == 4


def test_tensors_beyond_four_gibibytes(tmp_path):
    """A shard whose experts sit after 4.5 GB of other data (a hole in a sparse file)."""
    filler = 4_500_000_000
    g = torch.Generator().manual_seed(1)
    base = torch.randn(16, 8, generator=g)
    experts = [(base + 0.01 * torch.randn(16, 8, generator=g)).bfloat16() for _ in range(3)]
    header: dict = {"__metadata__": {"format": "pt"},
                    "filler": {"dtype": "U8", "shape": [filler], "data_offsets": [0, filler]}}
    pos = filler
    for e in range(3):
        header[f"model.layers.0.mlp.experts.{e}.up_proj.weight"] = {
            "dtype": "BF16", "shape": [16, 8], "data_offsets": [pos, pos + 256]}
        pos += 256
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path = tmp_path / "model.safetensors"
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.seek(8 + len(raw) + filler)
        for t in experts:
            f.write(t.view(torch.uint8).numpy().tobytes())
    report = ders.inspect_model(path)
    (group,) = report.groups
    assert group.upcycled and group.cos_to_base_min > 0.999
    assert report.total_params == filler + 3 * 128


def test_masks_and_packing_over_four_billion_elements():
    n = (1 << 33) + 17  # a tensor of 8.6 billion elements: positions need 64 bits
    pos = mask_positions(3, n, 1000)
    assert pos.dtype == np.int64 and len(np.unique(pos)) == 1000 and pos.max() < n
    assert pos.max() > 2**32  # the mask reaches past 32-bit offsets
    codes = np.random.default_rng(0).integers(0, 8, 3001, dtype=np.uint8)
    assert (unpack(pack(codes, 3), 3, 3001) == codes).all()
