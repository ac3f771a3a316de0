"""``AutoModelForCausalLM.from_pretrained`` of a ders folder (transformers' quantizer API): the
experts stay base plus deltas and compute what the expanded checkpoint computes; without ders
the folder is refused with a message naming ders, never loaded with random experts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ders_cli import QuantSpec, SparseSpec, compress, expand
from ders_cli.hf.experts import DersExperts
from ders_cli.hf.quantizer import ARCHIVE_NAME, NEEDS_DERS, write_folder
from ders_cli.training import save_archive, upcycle_model
from fixtures.tiny_dense import tiny_dense
from fixtures.upcycled import Dims, make_upcycled

TOKENS = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(2))
ROOT = Path(__file__).resolve().parents[1]


def _auto():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(TOKENS).logits.float()


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """ders folders (and expanded checkpoints) of a 2-bit Mixtral, a drop-0.9 Qwen3-MoE and a
    DeRS-trained Qwen2-MoE whose shared FFN is a member of its groups."""
    tmp = tmp_path_factory.mktemp("fp")
    out = {}
    for family, spec in (("mixtral", QuantSpec(2)), ("qwen3_moe", SparseSpec(0.9))):
        model = make_upcycled(tmp / family, Dims(vocab=128), family=family)
        compress(model, spec, tmp / f"{family}.ders")
        out[family] = tmp / family
    ders = upcycle_model(tiny_dense("qwen2", layers=2), mode="lowrank", rank=3, experts=4,
                         universal=True)
    with torch.no_grad():
        for name, p in ders.named_parameters():
            if name.endswith((".arr_b", "gate.weight")):
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(5)) * 0.05)
    save_archive(ders, tmp / "qwen2_moe.ders")
    out["qwen2_moe"] = tmp / "qwen2_moe"
    for family in out:
        expand(tmp / f"{family}.ders", tmp / f"{family}-expanded")
        write_folder(tmp / f"{family}.ders", tmp / f"{family}-folder")
    return tmp


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "qwen2_moe"])
def test_from_pretrained_equals_the_expanded_checkpoint(folders, family):
    folder = folders / f"{family}-folder"
    assert sorted(p.name for p in folder.iterdir() if p.suffix == ".safetensors") == \
        [ARCHIVE_NAME]
    config = json.loads((folder / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "ders"
    for dtype in ("auto", torch.float32):
        model = _auto().from_pretrained(folder, dtype=dtype, device_map="cpu")
        ref = _auto().from_pretrained(folders / f"{family}-expanded", dtype=dtype)
        assert model.dtype == ref.dtype
        experts = [m for m in model.modules() if isinstance(m, DersExperts)]
        out, want = _logits(model), _logits(ref)
        if family == "qwen2_moe":  # low-rank deltas: x W_base^T + x A B^T, no W_e formed
            assert {m.mode for m in experts} == {"factored"}
            assert float((out - want).abs().max()) <= 1e-5 * float(want.abs().max())
        else:  # synthesized: the expanded model's bytes
            assert experts and {m.mode for m in experts} == {"synthesize"}
            assert torch.equal(out, want)


def test_nothing_is_reported_missing_or_unexpected(folders):
    _, info = _auto().from_pretrained(folders / "qwen2_moe-folder", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))


def _python(code: str, **env: str) -> subprocess.CompletedProcess:
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=path, **env), timeout=600)


def test_without_ders_the_folder_is_refused_naming_ders(folders):
    r = _python("from transformers import AutoModelForCausalLM as A\n"
                f"A.from_pretrained({str(folders / 'mixtral-folder')!r})")
    assert r.returncode != 0
    assert NEEDS_DERS in r.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("first", ["ders_cli", "transformers"])
def test_import_ders_cli_registers_in_either_order(folders, first):
    imports = ["import ders_cli", "from transformers import AutoModelForCausalLM as A"]
    if first == "transformers":
        imports.reverse()
    r = _python("\n".join([*imports, "from transformers import AutoModelForCausalLM as A",
                           f"m = A.from_pretrained({str(folders / 'mixtral-folder')!r})",
                           "print(type(m.model.layers[0].mlp.experts).__name__)"]))
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["DersExperts"]


def test_a_repo_id_from_the_local_hub_cache_offline(folders, tmp_path):
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--acme--moe-ders"
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True)
    for f in (folders / "mixtral-folder").iterdir():
        (snapshot / f.name).symlink_to(f)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    r = _python("import ders_cli, torch\n"
                "from transformers import AutoModelForCausalLM as A\n"
                "m = A.from_pretrained('acme/moe-ders', dtype=torch.float32)\n"
                "print(m.dtype, type(m.model.layers[0].mlp.experts).__name__)",
                HF_HUB_CACHE=str(tmp_path / "hub"), HF_HUB_OFFLINE="1")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["torch.float32", "DersExperts"]


def test_a_tensor_changed_in_the_archive_is_detected(folders, tmp_path):
    from ders_cli import ArchiveReader
    from ders_cli.errors import CorruptArchiveError

    folder = write_folder(folders / "mixtral.ders", tmp_path / "f")
    archive = folder / ARCHIVE_NAME
    with ArchiveReader(archive) as r:
        e = r.entry("model.embed_tokens.weight")
        at = e.begin  # absolute
    data = bytearray(archive.read_bytes())
    data[at] ^= 1
    archive.write_bytes(bytes(data))
    with pytest.raises(CorruptArchiveError, match="embed_tokens"):
        _auto().from_pretrained(folder)


def test_a_ders_folder_is_never_written_beside_plain_weights(folders, tmp_path):
    from ders_cli.errors import UsageError

    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(UsageError, match="holds model"):
        write_folder(folders / "mixtral.ders", tmp_path)
    assert not (tmp_path / ARCHIVE_NAME).exists()


INTERNAL = ("experts.gate.base", "deltas.", "arr_", ".base")


def _stored_names(folder: Path) -> list[str]:
    from safetensors import safe_open

    names = []
    for f in folder.glob("*.safetensors"):
        with safe_open(f, "pt") as st:
            names += list(st.keys())
    return names


def _check_ders_folder(folder: Path) -> None:
    assert not (folder / "model.safetensors").exists()
    assert (folder / ARCHIVE_NAME).is_file()
    names = _stored_names(folder)
    assert names and not [n for n in names if any(i in n for i in INTERNAL)]


def test_save_pretrained_of_an_archive_model_writes_a_ders_folder(folders, tmp_path):
    # It used to write the modules' internal tensors (experts.gate.base, arr_codes), which
    # from_pretrained then loaded as random experts without a word.
    from ders_cli.runtime import load_from_archive

    model = load_from_archive(folders / "mixtral.ders")
    model.save_pretrained(tmp_path / "a")
    _check_ders_folder(tmp_path / "a")
    back = _auto().from_pretrained(tmp_path / "a")
    assert torch.equal(_logits(back), _logits(model))
    # And again from what from_pretrained gave, as transformers.Trainer would save it.
    back.save_pretrained(tmp_path / "b", state_dict=back.state_dict(), safe_serialization=True)
    _check_ders_folder(tmp_path / "b")
    assert torch.equal(_logits(_auto().from_pretrained(tmp_path / "b")), _logits(model))


def test_save_pretrained_of_a_trainable_model_writes_a_ders_folder(folders, tmp_path):
    from ders_cli.training import load_trainable

    model = load_trainable(folders / "qwen2_moe.ders").eval()
    model.save_pretrained(tmp_path / "t")
    _check_ders_folder(tmp_path / "t")
    back = _auto().from_pretrained(tmp_path / "t")
    ref = _logits(model)
    # The trainable modules compute x W_base^T + x Δ^T; the archive synthesizes W = W_base + Δ.
    assert float((_logits(back) - ref).abs().max()) <= 1e-5 * float(ref.abs().max())


def test_save_pretrained_refuses_a_folder_with_plain_weights(folders, tmp_path):
    from ders_cli.errors import UsageError
    from ders_cli.runtime import load_from_archive

    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(UsageError, match="holds model"):
        load_from_archive(folders / "mixtral.ders").save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]


def test_a_sharded_archive_loads_the_same(folders, tmp_path):
    from ders_cli.runtime import load_from_archive

    model = folders / "mixtral"
    result = compress(model, QuantSpec(2), tmp_path / "s.ders", max_shard_size=40_000)
    assert len(result.files) > 2  # an index and shards
    folder = write_folder(result.archive, tmp_path / "folder")
    config = json.loads((folder / "config.json").read_text())
    assert config["quantization_config"]["archive"] == "s.ders.safetensors.index.json"
    ref = _logits(_auto().from_pretrained(folders / "mixtral-expanded"))
    assert torch.equal(_logits(_auto().from_pretrained(folder)), ref)
    assert torch.equal(_logits(load_from_archive(result.archive)), ref)
