"""``ders eval``: perplexity of a model and of its archives on a text, run straight from the
archive, equals transformers' own on the expanded checkpoint; per-layer output errors are zero
for a lossless archive and grow with what a setting drops; bad inputs are one line, exit 2."""

from __future__ import annotations

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from ders_cli import LosslessSpec, QuantSpec, SparseSpec, compress, expand
from ders_cli.calibration.text import tokenize_text
from ders_cli.cli.app import app
from ders_cli.evaluate import evaluate, perplexity_nll
from fixtures.tokenizer import VOCAB, save_byte_tokenizer
from fixtures.upcycled import Dims, make_upcycled

runner = CliRunner()


def write_text(folder, documents: int = 6) -> None:
    """Deterministic prose-like text: a few documents of words and numbers."""
    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(3)
    words = ["expert", "delta", "base", "the", "of", "layer", "token", "route", "sum", "and",
             "weight", "archive", "model", "text", "is", "a", "to", "in"]
    for d in range(documents):
        picks = torch.randint(0, len(words), (400,), generator=gen).tolist()
        body = " ".join(words[i] + (str(i) if i % 5 == 0 else "") for i in picks)
        (folder / f"doc{d:02d}.txt").write_text(body + "\n", encoding="utf-8")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eval")
    model = make_upcycled(tmp / "moe", Dims(vocab=VOCAB, layers=2))
    save_byte_tokenizer(model)
    write_text(tmp / "text")
    for name, spec in (("q2", QuantSpec(2)), ("d99", SparseSpec(0.99)),
                       ("exact", LosslessSpec())):
        compress(model, spec, tmp / f"{name}.ders")
    return tmp


@pytest.fixture(scope="module")
def result(tiny):
    return evaluate(tiny / "moe", [tiny / "q2.ders", tiny / "d99.ders", tiny / "exact.ders"],
                    tiny / "text", max_tokens=1024, seq_len=128, device="cpu")


def _direct_nll(folder, tiny) -> float:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(tiny / "moe")
    ids = tokenize_text(tiny / "text", tok, max_tokens=1024, seq_len=128).ids
    return perplexity_nll(model, ids, 4, torch.device("cpu"))


def test_archive_perplexity_equals_transformers_on_the_expanded_model(tiny, result):
    expand(tiny / "q2.ders", tiny / "q2-expanded")
    direct = _direct_nll(tiny / "q2-expanded", tiny)
    score = result.scores[1]
    assert score.setting == "2-bit"
    assert score.nll == pytest.approx(direct, rel=1e-6)
    assert result.scores[0].nll == pytest.approx(_direct_nll(tiny / "moe", tiny), rel=1e-6)


def test_scores_and_text_record(tiny, result):
    assert [s.name for s in result.scores] == ["original", *(str(tiny / f"{n}.ders")
                                                            for n in ("q2", "d99", "exact"))]
    assert result.text["tokens"] == 1024 and result.text["seq_len"] == 128
    assert len(result.text["text_sha256"]) == 64
    orig, q2, d99, exact = result.scores
    # Every expert bit for bit: the very same perplexity. (A random tiny model's perplexity
    # hardly moves with the others: their order is the per-layer test's business.)
    assert exact.nll == orig.nll
    assert result.change(exact) == 0.0 and d99.size_bytes < q2.size_bytes
    assert q2.size_bytes < orig.size_bytes
    assert math.isfinite(orig.perplexity)


def test_per_layer_errors(result):
    rows = {(p.archive.rsplit("/", 1)[-1], p.layer, p.projection): p for p in result.layers}
    assert len(rows) == 3 * 2 * 3  # archives x layers x projections
    for (name, _, _), p in rows.items():
        assert p.members == 4 and p.min_tokens > 0
        if name == "exact.ders":
            assert p.output_error == 0.0 and p.share_lost == 0.0
        else:
            assert 0.0 < p.output_error < 0.2
    for layer in (0, 1):
        for proj in ("gate", "up", "down"):
            q2 = rows["q2.ders", layer, proj]
            d99 = rows["d99.ders", layer, proj]
            assert q2.output_error < d99.output_error
            # Random drop at 0.99 with the paper's rescale loses more than dropping everything.
            assert d99.share_lost > 1.0 > q2.share_lost


def test_cli_table_and_json(tiny):
    args = ["eval", str(tiny / "moe"), str(tiny / "q2.ders"), "--text", str(tiny / "text"),
            "--max-tokens", "256", "--seq-len", "128", "--no-layers"]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    assert "perplexity" in r.output and "2-bit" in r.output and "original" in r.output
    r = runner.invoke(app, [*args, "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.output)
    assert [s["setting"] for s in doc["scores"]] == ["original", "2-bit"]
    assert doc["scores"][0]["change"] == 0.0 and doc["layers"] == []


@pytest.mark.parametrize("extra, message", [
    (["--seq-len", "1"], "--seq-len must be at least 2"),
    (["--max-tokens", "10", "--seq-len", "128"], "must be at least --seq-len"),
    (["--dtype", "int8"], "int8"),
])
def test_cli_refuses_bad_lengths(tiny, extra, message):
    r = runner.invoke(app, ["eval", str(tiny / "moe"), "--text", str(tiny / "text"), *extra])
    assert r.exit_code == 2
    assert message in r.output


def test_bad_inputs_are_one_line(tiny, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "blob.bin").write_bytes(b"\x00\x01binary")
    cases = [
        ([str(tiny / "moe"), "--text", str(tmp_path / "nope")], "no such file or folder"),
        ([str(tiny / "moe"), "--text", str(empty)], "fewer than one sequence"),
    ]
    other = make_upcycled(tmp_path / "other", Dims(vocab=VOCAB, layers=1))
    compress(other, QuantSpec(2), tmp_path / "other.ders")
    cases.append(([str(tiny / "moe"), str(tmp_path / "other.ders"), "--text",
                   str(tiny / "text")], "holds another model"))
    for args, message in cases:
        r = runner.invoke(app, ["eval", *args, "--seq-len", "8", "--max-tokens", "64"])
        assert r.exit_code == 2, r.output
        assert message in r.output
        assert "Traceback" not in r.output


def test_cli_defaults_are_the_librarys():
    import importlib

    import ders_cli
    from ders_cli.cli import eval_cmd

    library = importlib.import_module("ders_cli.evaluate")
    assert ders_cli.evaluate is library.evaluate  # the function, as compress and expand are

    assert eval_cmd.DEFAULT_MAX_TOKENS == library.DEFAULT_MAX_TOKENS
    assert eval_cmd.DEFAULT_SEQ_LEN == library.DEFAULT_SEQ_LEN
    assert {d.value for d in eval_cmd.Dtype} == set(library.DTYPES)
