"""The text ``ders eval`` and calibration read: files in sorted order, documents joined by the
end-of-text token, whole sequences only, and a hash that names exactly what was read."""

from __future__ import annotations

import pytest

from ders_cli.calibration.text import text_documents, tokenize_text
from ders_cli.errors import InputError, UsageError
from fixtures.tokenizer import byte_tokenizer

EOS = 256


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


def test_folder_in_sorted_order_skipping_hidden_and_binary(tmp_path, tok):
    (tmp_path / "b.txt").write_text("bb")
    (tmp_path / "a.txt").write_text("aa")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.md").write_text("cc")
    (tmp_path / ".hidden.txt").write_text("hh")
    (tmp_path / "image.png").write_bytes(b"\x89PNG\x00\x00")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    names = [p.name for p, _ in text_documents(tmp_path)]
    assert names == ["a.txt", "b.txt", "c.md"]
    t = tokenize_text(tmp_path, tok, max_tokens=8, seq_len=4)
    assert t.ids.tolist() == [[97, 97, EOS, 98], [98, EOS, 99, 99]]
    assert t.documents == 3 and t.tokens == 8 and t.seq_len == 4


def test_only_whole_sequences_up_to_max_tokens(tmp_path, tok):
    f = tmp_path / "t.txt"
    f.write_text("x" * 100)
    assert tokenize_text(f, tok, max_tokens=50, seq_len=16).ids.shape == (3, 16)
    assert tokenize_text(f, tok, max_tokens=1000, seq_len=16).ids.shape == (6, 16)


def test_hash_names_what_was_read(tmp_path, tok):
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    two.mkdir()
    (one / "a.txt").write_text("abcd")
    (one / "b.txt").write_text("ef")
    (two / "a.txt").write_text("abc")  # the same bytes, another boundary between files
    (two / "b.txt").write_text("def")
    h1 = tokenize_text(one, tok, max_tokens=4, seq_len=2).sha256
    h2 = tokenize_text(two, tok, max_tokens=4, seq_len=2).sha256
    assert h1 != h2
    assert h1 == tokenize_text(one, tok, max_tokens=4, seq_len=2).sha256
    # Documents past what was needed are not read, so they are not in the hash.
    (one / "c.txt").write_text("more")
    assert h1 == tokenize_text(one, tok, max_tokens=4, seq_len=2).sha256


def test_refusals(tmp_path, tok):
    with pytest.raises(UsageError, match="--seq-len must be at least 2"):
        tokenize_text(tmp_path, tok, max_tokens=8, seq_len=1)
    with pytest.raises(UsageError, match="must be at least --seq-len"):
        tokenize_text(tmp_path, tok, max_tokens=8, seq_len=16)
    with pytest.raises(InputError, match="no such file or folder"):
        tokenize_text(tmp_path / "missing", tok, max_tokens=8, seq_len=4)
    (tmp_path / "short.txt").write_text("ab")
    with pytest.raises(InputError, match="fewer than one sequence"):
        tokenize_text(tmp_path, tok, max_tokens=8, seq_len=4)
    binary = tmp_path / "x.bin"
    binary.write_bytes(b"\x00\x01")
    with pytest.raises(InputError, match="not UTF-8 text"):
        tokenize_text(binary, tok, max_tokens=8, seq_len=4)
