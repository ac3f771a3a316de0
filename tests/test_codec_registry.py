"""Every registered codec is complete: its section in docs/FORMAT.md, a golden archive, options
that are its spec's fields, labels that agree with what archives record, and round trips
(encode, the stored arrays' plan, synthesis against the recorded hashes, the runtime's apply).
A new codec that lacks one of these fails here."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ders_cli.archive import ArchiveReader
from ders_cli.codecs import DeltaCodec, codec_label, compute_dtype, get_codec
from ders_cli.decompose import encode_group
from ders_cli.digests import DEFAULT as DIGEST
from ders_cli.dtypes import TORCH_DTYPES
from ders_cli.errors import UsageError
from ders_cli.groups import synthesize
from ders_cli.records import ExpertGroup, Member
from ders_cli.safetensors_io import tensor_bytes
from ders_cli.stats import mean_base
from fixtures.make_golden import ARCHIVES, GOLDEN, spec_of

FORMAT = Path(__file__).parent.parent / "docs" / "FORMAT.md"
CODECS = sorted(DeltaCodec.registry)
GOLDEN_SPECS = {name: spec_of(name) for name in ARCHIVES}
FLOATS = ["F32", "F16", "BF16", "F64"]


def specs_of(codec: str) -> list:
    return [s for s in GOLDEN_SPECS.values() if s.codec == codec]


@pytest.mark.parametrize("name", CODECS)
def test_every_codec_has_a_section_in_the_format(name):
    assert re.search(rf"^### 5\.\d+ `{name}`", FORMAT.read_text(), re.M)


@pytest.mark.parametrize("name", CODECS)
def test_every_codec_has_a_golden_archive_that_uses_it(name):
    archives = [a for a, s in GOLDEN_SPECS.items() if s.codec == name]
    assert archives, f"no golden archive in fixtures/make_golden.py uses {name!r}"
    for a in archives:
        with ArchiveReader(GOLDEN / a) as r:
            assert {g.codec["name"] for g in r.manifest.groups} == {name}
            for g in r.manifest.groups:  # the label of what was asked is what was recorded
                assert codec_label(g.codec) == GOLDEN_SPECS[a].label


@pytest.mark.parametrize("name", CODECS)
def test_options_declare_the_spec_fields(name):
    codec = get_codec(name)
    assert codec.spec.codec == name
    fields = {f.name: f for f in dataclasses.fields(codec.spec)}
    assert [o.name for o in codec.options] == list(fields)
    for o in codec.options:
        f = fields[o.name]
        assert o.required == (f.default is dataclasses.MISSING)
        if not o.required:
            assert o.default == f.default
        assert o.help and o.type in (int, float, str, bool)


@pytest.mark.parametrize("name", [c for c in CODECS if get_codec(c).options])
def test_out_of_range_settings_name_their_parameter(name):
    codec = get_codec(name)
    for o in codec.options:
        if o.choices is None and o.type is not int:
            continue
        bad = "nonesuch" if o.choices is not None and o.type is str else -1
        errors = []
        for spec in specs_of(name):  # a golden setting where the option matters
            try:
                codec.spec(**{**dataclasses.asdict(spec), o.name: bad}).check()
            except UsageError as exc:
                errors.append(exc)
        assert errors, f"{name}: {o.name}={bad!r} passes"
        assert all(e.param == o.name and str(e).startswith(o.name) for e in errors)


def _group(members: torch.Tensor, dtype: str) -> ExpertGroup:
    n = members.shape[0]
    return ExpertGroup("l.0.experts.{E}.w", tuple(Member(f"l.0.experts.{i}.w") for i in range(n)),
                       tuple(range(n)), dtype, tuple(members.shape[1:]))


@given(spec=st.sampled_from(list(GOLDEN_SPECS.values())), n=st.integers(1, 4),
       rows=st.integers(1, 12), cols=st.integers(1, 20), dtype=st.sampled_from(FLOATS),
       seed=st.integers(0, 10_000))
@settings(max_examples=60, deadline=None)
def test_round_trip_of_every_golden_setting(spec, n, rows, cols, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    dense = torch.randn(rows, cols, generator=g, dtype=torch.float64)
    members = torch.stack([dense + 0.01 * torch.randn(rows, cols, generator=g,
                                                       dtype=torch.float64)
                           for _ in range(n)]).to(TORCH_DTYPES[dtype])
    group = _group(members, dtype)
    spec.check()
    codec = spec.impl
    base = mean_base(members)
    enc = encode_group(members, base, dtype, spec.codec, spec.params(group))
    codec.validate(enc.params, n, group.numel)
    planned = codec.arrays(enc.params, n, group.numel, dtype)
    assert {k: (v.dtype, tuple(v.shape)) for k, v in enc.arrays.items()} == {
        k: (TORCH_DTYPES[d], s) for k, (d, s) in planned.items()}
    assert codec.label(enc.params) == spec.label
    cd = compute_dtype(dtype)
    x = torch.randn(3, cols, generator=g, dtype=torch.float64)
    for i in range(n):
        rows_i = codec.member_rows(enc.arrays, enc.params, i)
        w_hat = synthesize(base, spec.codec, enc.params, rows_i, i, dtype)
        assert DIGEST.hex(tensor_bytes(w_hat)) == enc.recon_digest[i]
        # The runtime's view: base + Δ is the member up to rounding, and apply(x) is x Δᵀ.
        delta = codec.delta(rows_i, enc.params, i, base, dtype, {})
        base_c = base.reshape(-1).to(cd)
        eps = float(torch.finfo(members.dtype).eps)
        bound = 2 * eps * (w_hat.to(cd).abs() + base_c.abs())
        assert bool(((base_c + delta - w_hat.to(cd)).abs() <= bound).all())
        y = codec.apply(x, rows_i, enc.params, i, base, dtype, {})
        expected = x @ delta.double().view(rows, cols).T
        # Codecs may order the arithmetic their own way (two thin products for low rank): to
        # the compute dtype's rounding, relative to the size of the layer's whole output.
        scale = float((x.abs() @ members[i].abs().double().T).max())
        assert torch.allclose(y, expected, rtol=0, atol=1e-5 * scale)
