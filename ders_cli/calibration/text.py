"""Text a model reads for ``ders eval`` and for calibration: a file or a folder of text files,
tokenized by the model's own tokenizer and cut into sequences of equal length.

Documents are read in sorted path order and joined with the tokenizer's end-of-text token
between them, until ``max_tokens`` are gathered; the tail that does not fill a whole sequence is
left out. What was read is identified by a sha256 over the documents' bytes (each prefixed with
its length, so that moving a boundary between files changes the hash), recorded in calibrated
archives and in every evaluation.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import InputError, UsageError

# Files that are not text: a folder of source or prose may hold some; they are skipped.
_BINARY_SNIFF = 8192


@dataclass(frozen=True)
class TokenizedText:
    """``ids`` [sequences, seq_len] (int64) and how they were made."""

    ids: torch.Tensor
    documents: int  # documents read (the last may be cut)
    sha256: str  # of the documents' bytes, each prefixed by its length (8 bytes, little-endian)
    source: str  # the path as given

    @property
    def seq_len(self) -> int:
        return int(self.ids.shape[1])

    @property
    def tokens(self) -> int:
        return int(self.ids.numel())

    def record(self) -> dict:
        """The manifest's and the reports' description of the text (CONTRACTS.md 6)."""
        return {"tokens": self.tokens, "seq_len": self.seq_len, "documents": self.documents,
                "text_sha256": self.sha256}


def model_tokenizer(root: Path, why: str) -> Any:
    """The tokenizer of the model folder ``root`` (``why``: what needs it, for the error)."""
    from transformers import AutoTokenizer

    from ..hf.skeleton import quiet_transformers

    quiet_transformers()
    try:
        return AutoTokenizer.from_pretrained(root)
    except (OSError, ValueError) as exc:
        raise InputError(f"has no tokenizer transformers can load ({exc.__class__.__name__}); "
                         f"{why} reads the text with the model's own", root) from None


def check_lengths(max_tokens: int, seq_len: int, what: str = "--max-tokens") -> None:
    if seq_len < 2:
        raise UsageError(f"--seq-len must be at least 2, got {seq_len}", )
    if max_tokens < seq_len:
        raise UsageError(f"{what} ({max_tokens}) must be at least --seq-len ({seq_len})")


def text_documents(path: str | Path) -> Iterator[tuple[Path, bytes]]:
    """The documents under ``path`` (a file, or every text file of a folder, recursively, in
    sorted order; hidden entries and files that are not UTF-8 text are skipped)."""
    root = Path(path).expanduser()
    if root.is_file():
        data = root.read_bytes()
        if not _is_text(data):
            raise InputError("is not UTF-8 text", root)
        yield root, data
        return
    if not root.is_dir():
        raise InputError("no such file or folder", root)
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if any(part.startswith(".") for part in rel.parts) or not p.is_file():
            continue
        data = p.read_bytes()
        if _is_text(data):
            yield p, data


def _is_text(data: bytes) -> bool:
    if b"\0" in data[:_BINARY_SNIFF]:
        return False
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def tokenize_text(path: str | Path, tokenizer: Any, *, max_tokens: int, seq_len: int
                  ) -> TokenizedText:
    """Up to ``max_tokens`` tokens of the text at ``path`` as whole sequences of ``seq_len``."""
    check_lengths(max_tokens, seq_len)
    want = max_tokens - max_tokens % seq_len
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    sha = hashlib.sha256()
    documents = 0
    for _, data in text_documents(path):
        if len(ids) >= want:
            break
        sha.update(len(data).to_bytes(8, "little"))
        sha.update(data)
        documents += 1
        doc = tokenizer(data.decode("utf-8"), add_special_tokens=False)["input_ids"]
        if ids and eos is not None:
            ids.append(eos)
        ids.extend(doc)
    n = min(len(ids), want) // seq_len
    if n == 0:
        raise InputError(f"holds {len(ids)} tokens of text, fewer than one sequence of "
                         f"--seq-len {seq_len}", path)
    return TokenizedText(torch.tensor(ids[: n * seq_len], dtype=torch.int64).view(n, seq_len),
                         documents, sha.hexdigest(), str(path))
