"""Detection and round trips on every on-disk MoE layout (fixtures/layouts.py): ders finds the
groups the layout's expectations name, lets the shared FFNs join that should, leaves routers,
scale companions and from-scratch experts alone, and what expand writes is the model again."""

from __future__ import annotations

import importlib.util

import pytest
import torch

import ders_cli as ders
from ders_cli.checkpoint import open_checkpoint
from ders_cli.constants import DEFAULT_UPCYCLED_COS
from ders_cli.detect import find_groups
from ders_cli.grouping import load_group
from fixtures.layouts import LAYOUTS

NAMES = sorted(LAYOUTS)
LOADABLE = [n for n in NAMES if LAYOUTS[n].loads_with and "fp8" not in n]
HAS_ACCELERATE = importlib.util.find_spec("accelerate") is not None


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    cache: dict[tuple[str, bool, torch.dtype], object] = {}

    def make(name: str, upcycled: bool = True, dtype: torch.dtype = torch.bfloat16):
        key = (name, upcycled, dtype)
        if key not in cache:
            root = tmp_path_factory.mktemp(f"{name}-{upcycled}")
            cache[key] = LAYOUTS[name].make(root / "model", upcycled=upcycled, dtype=dtype)
        return cache[key]

    return make


def detect(path):
    ckpt = open_checkpoint(path)
    return ckpt, find_groups({n: e for n, (_, e) in ckpt.where.items()}, ckpt.config)


@pytest.mark.parametrize("name", NAMES)
def test_detection_finds_the_expected_groups(built, name):
    expect = LAYOUTS[name].expectations()
    _, found = detect(built(name))
    got = {tuple(m.label for m in g.members) for g in found.groups}
    # FP8 experts are found but cannot be decomposed: they pass through, saying why.
    fp8 = {s.members for s in found.skipped if s.quantized}
    assert got | fp8 == {tuple(g) for g in expect["expert_groups"]}
    assert bool(fp8) == ("fp8" in name)
    grouped = {t for g in found.groups for t in g.tensors} | {t for s in fp8 for t in s}
    assert not grouped & set(expect["not_groups"])
    for g in found.groups:  # members are matrices of one dtype and shape
        assert len(g.shape) >= 2 and g.dtype in ("BF16", "F32", "F16", "F64")


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("upcycled", [True, False], ids=["upcycled", "scratch"])
def test_shared_ffns_join_when_as_similar(built, name, upcycled):
    expectations = LAYOUTS[name].expectations()
    firsts = {g[0] for g in expectations["expert_groups"]}  # not the optional (vector) groups
    expect = {k: v for k, v in expectations["shared"].items() if k in firsts}
    ckpt, found = detect(built(name, upcycled))
    joined = {}
    with ckpt.open() as files:
        for g in found.groups:
            loaded = load_group(files, ckpt, g, found.shared.get(g.key, ()),
                                threshold=DEFAULT_UPCYCLED_COS)
            assert (loaded.min_cos >= DEFAULT_UPCYCLED_COS) == upcycled, g.key
            for c in loaded.shared:
                if c.joined:
                    joined[g.members[0].label] = c.member.label
    # FP8 experts pass through, so nothing can join them.
    assert joined == (expect if upcycled and "fp8" not in name else {})


# With FP8 experts, or LLaMA-MoE's slices (not copies), there is nothing to compress: the run is
# refused (test_nothing_to_compress_is_refused_saying_why).
NOTHING = ("deepseek_v3_fp8", "llama_moe")
COMPRESSIBLE = [n for n in NAMES if n not in NOTHING]


@pytest.mark.parametrize("name", COMPRESSIBLE)
def test_round_trip_keeps_every_other_tensor_bit_exact(built, name, tmp_path):
    src = built(name)
    result = ders.compress(src, ders.QuantSpec(4), tmp_path / "a.ders")
    assert all(g.action == "quant" for g in result.groups)
    report = ders.verify(tmp_path / "a.ders", against=src)
    assert report.ok and report.max_rel_error < 0.01
    out = ders.expand(tmp_path / "a.ders", tmp_path / "r").folder
    for f in src.glob("*.safetensors"):  # headers (names, dtypes, shapes, order) unchanged
        raw = f.read_bytes()
        n = int.from_bytes(raw[:8], "little")
        assert (out / f.name).read_bytes()[: 8 + n] == raw[: 8 + n]


@pytest.mark.parametrize("name", COMPRESSIBLE)
def test_experts_from_scratch_are_stored_as_they_are(built, name, tmp_path):
    src = built(name, upcycled=False)
    result = ders.compress(src, ders.SparseSpec(0.9), tmp_path / "a.ders")
    assert all(g.action == "passthrough" for g in result.groups)
    assert len(result.warnings) == len(result.groups)
    out = ders.expand(tmp_path / "a.ders", tmp_path / "r").folder
    for f in src.glob("*.safetensors"):
        assert (out / f.name).read_bytes() == f.read_bytes()


@pytest.mark.parametrize(("name", "why"), [
    ("deepseek_v3_fp8", r"the experts are already quantized \(FP8 with block scales "
                        r"weight_scale_inv\) and ders does not decompress other formats yet"),
    ("llama_moe", r"no expert group qualifies \(3 candidates, e.g. "
                  r"model.layers.0.mlp.calculator.experts.weight_\w+.{E}: experts differ in "
                  r"shape: not copies of one FFN\)")])
def test_nothing_to_compress_is_refused_saying_why(built, tmp_path, name, why):
    with pytest.raises(ders.InputError, match=f"nothing to compress: {why}; no archive written"):
        ders.compress(built(name), ders.QuantSpec(4), tmp_path / "a.ders")
    assert not (tmp_path / "a.ders").exists()


def test_all_groups_compresses_them_anyway(built, tmp_path):
    src = built("mixtral", upcycled=False)
    result = ders.compress(src, ders.QuantSpec(8), tmp_path / "a.ders", all_groups=True)
    assert [g.action for g in result.groups] == ["quant"] * 3
    assert all("compressed anyway" in w for w in result.warnings)


def test_no_shared_keeps_the_shared_ffn_apart(built, tmp_path):
    src = built("med_moe")
    with_shared = ders.compress(src, ders.QuantSpec(4), tmp_path / "a.ders")
    apart = ders.compress(src, ders.QuantSpec(4), tmp_path / "b.ders", use_shared=False)
    assert [g.shared for g in with_shared.groups] == [
        ["model.layers.0.mlp.meta_moe.fc1.weight"], ["model.layers.0.mlp.meta_moe.fc2.weight"]]
    assert all(g.shared == [] for g in apart.groups)
    assert [g.members for g in with_shared.groups] == [4, 4]
    assert with_shared.archive_bytes < apart.archive_bytes
    for archive in ("a.ders", "b.ders"):
        assert ders.verify(tmp_path / archive, against=src).ok


def logits(path, inputs):
    import transformers

    cls = getattr(transformers, open_checkpoint(path).config["architectures"][0])
    model = cls.from_pretrained(path, dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        return model(**inputs).logits


def inputs_for(name):
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    if name in ("nllb_moe", "switch"):
        return {"input_ids": ids, "decoder_input_ids": ids[:, :6]}
    return {"input_ids": ids}


@pytest.mark.parametrize("name", LOADABLE)
def test_transformers_logits(built, name, tmp_path):
    src = built(name, dtype=torch.float32)
    x = inputs_for(name)
    reference = logits(src, x)
    for spec, bound in ((ders.SparseSpec(0.0), 1e-6), (ders.SparseSpec(0.9), 2e-2),
                        (ders.QuantSpec(4), 2e-3)):
        archive = tmp_path / f"{spec.label}.ders"
        ders.compress(src, spec, archive)
        out = ders.expand(archive, tmp_path / spec.label).folder
        got = logits(out, x)
        rel = float((got - reference).norm() / reference.norm())
        assert rel < bound, (spec.label, rel)


def dense_weights(member: torch.Tensor, form: dict | None) -> dict[str, torch.Tensor]:
    """The dense FFN matrices ([out, in], as nn.Linear stores them) one expert was made from,
    undoing the layout's fusion and orientation."""
    m = member if form is None or form["inner"] == "out,in" else member.T
    if form is None or form["gate_up"] is None:
        return {"w": m}
    if form["gate_up"] == "halves":
        half = m.shape[0] // 2
        return {"gate": m[:half], "up": m[half:]}
    return {"gate": m[0::2], "up": m[1::2]}


@pytest.mark.parametrize("name", COMPRESSIBLE)
def test_dense_base_is_found_in_every_layout(built, name, tmp_path):
    """A dense checkpoint with Llama-style [out, in] FFN matrices (here: each group's expert 0,
    slightly changed) serves as the base of every group, whatever the fusion and orientation."""
    from ders_cli.detect import layer_key
    from fixtures.layouts import read_member
    from fixtures.synthetic import write_model

    expect = LAYOUTS[name].expectations()
    src = built(name)
    dense, sources = {}, {}
    for i, group in enumerate(expect["expert_groups"]):
        first = group[0]
        tensor = first.split("[")[0]
        form = expect["fused"].get(tensor)
        member = read_member(src, first, len(group)) * 0.999
        layer = layer_key(tensor) or "model"
        names = {}
        for role, w in dense_weights(member, form).items():
            names[role] = f"{layer}.dense_mlp_{i}.{role}.weight"
            dense[names[role]] = w.contiguous().to(torch.bfloat16)
        sources[first] = names
    dense_dir = write_model(tmp_path / "dense", dense)
    result = ders.compress(src, ders.QuantSpec(4), tmp_path / "a.ders", base=dense_dir)
    assert len(result.groups) == len(expect["expert_groups"])
    with ders.ArchiveReader(tmp_path / "a.ders") as reader:
        for g in reader.manifest.groups:
            names = sources[g.members[0].label]
            source = g.base["source"]
            assert g.base["kind"] == "dense"
            if "gate" in names:  # gate and up, fused: concatenated or interleaved, maybe .T
                assert names["gate"] in source and names["up"] in source
                assert source.index(names["gate"]) < source.index(names["up"])
            else:
                assert source in (names["w"], names["w"] + ".T")
    assert ders.verify(tmp_path / "a.ders", against=src).ok


@pytest.mark.parametrize("name", NAMES)
def test_the_family_table_names_every_group(built, name):
    """ders_cli.families, which the runtime and --base DENSE read, names every group detection
    finds in what transformers (or the family's own code) wrote, with one role per matrix."""
    from ders_cli.families import members_of

    family = {spec.family for spec in LAYOUTS[name].experts}
    _, found = detect(built(name))
    firsts = [g.members[0].tensor for g in found.groups]
    firsts += [s.members[0] for s in found.skipped if s.quantized]
    for tensor in firsts:
        hits = members_of(tensor)
        assert family & {f.name for f, *_ in hits}, tensor
        assert len({p.roles for _, _, p, _ in hits}) == 1, tensor  # families agree on roles


@pytest.mark.parametrize("name", COMPRESSIBLE)
def test_dense_base_named_as_the_family_says_needs_no_search(built, name, tmp_path,
                                                             monkeypatch):
    """With the dense model's own names (Mistral's for Mixtral, Phi-2's for Med-MoE, ...), the
    family's entry alone gives every group's dense source: the brute-force search never runs."""
    from ders_cli.dense_base import DenseMatcher
    from ders_cli.families import members_of
    from fixtures.layouts import read_member
    from fixtures.synthetic import write_model

    expect = LAYOUTS[name].expectations()
    src = built(name)
    dense, sources = {}, {}
    for group in expect["expert_groups"]:
        first = group[0]
        tensor = first.split("[")[0]
        family, _, proj, prefix = next(
            h for h in members_of(tensor) if h[0].name == LAYOUTS[name].experts[0].family)
        member = read_member(src, first, len(group)) * 0.999
        names = [family.dense.name(prefix, role) for role in proj.roles]
        for n, w in zip(names, dense_weights(member, expect["fused"].get(tensor)).values(),
                        strict=True):
            dense[n] = w.contiguous().to(torch.bfloat16)
        sources[first] = names
    dense_dir = write_model(tmp_path / "dense", dense)

    def no_search(*args, **kwargs):
        raise AssertionError("the brute-force search ran")

    monkeypatch.setattr(DenseMatcher, "_candidates", no_search)
    ders.compress(src, ders.QuantSpec(4), tmp_path / "a.ders", base=dense_dir)
    with ders.ArchiveReader(tmp_path / "a.ders") as reader:
        for g in reader.manifest.groups:
            source = g.base["source"]
            assert g.base["kind"] == "dense"
            names = sources[g.members[0].label]
            assert all(n in source for n in names), (source, names)
