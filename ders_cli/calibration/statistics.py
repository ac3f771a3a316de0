"""What calibrated compression knows of each expert: the second moment H = XᵀX of the inputs
its projections see while the model reads the calibration text.

``TextCalibration`` runs the checkpoint one decoder layer at a time (``sequential``) and answers
for one expert group at a time, so compress visits the groups layer by layer (``order``) and
memory stays at one layer: its weights, what its MoE block saw, and the hidden states of the
text. Per member (``Calibration``): the gate and up projections of expert e see the tokens the
router sends to e, its down projection that expert's own activations; a shared FFN that joined
the group sees every token. A member calibration cannot place (a fused or sliced tensor, a
layer the family does not describe) is encoded as without calibration.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from ..checkpoint import Checkpoint
from ..codecs import Calibration
from ..errors import UsageError
from ..families import for_model_type
from ..groups import TensorSource
from ..records import ExpertGroup
from .sequential import CheckpointLayers, LayerInputs, read_layers
from .text import TokenizedText, check_lengths, model_tokenizer, tokenize_text

DEFAULT_TOKENS = 16384
DEFAULT_SEQ_LEN = 512


@dataclass(frozen=True)
class CalibrationSpec:
    """Calibrate on ``text`` (a file or a folder of text files): at most ``tokens`` tokens in
    sequences of ``seq_len``, ``batch`` sequences per forward pass."""

    text: str | Path
    tokens: int = DEFAULT_TOKENS
    seq_len: int = DEFAULT_SEQ_LEN
    batch: int = 8

    def check(self) -> None:
        if self.seq_len < 2:
            raise UsageError(f"calibration_seq_len must be at least 2, got {self.seq_len}",
                             param="calibration_seq_len")
        check_lengths(self.tokens, self.seq_len, "--calibration-tokens")
        if self.batch < 1:
            raise UsageError(f"batch must be at least 1, got {self.batch}", param="batch")


class Statistics(Protocol):
    """What compress asks of a calibration: per member of a group, the statistics of its
    inputs (``for_group``), the order it can answer groups in, and the manifest's record."""

    def for_group(self, group: ExpertGroup) -> list[Calibration | None] | None: ...

    def order(self, groups: Sequence[ExpertGroup]) -> list[ExpertGroup]: ...

    def record(self) -> dict: ...

    def close(self) -> None: ...


class GivenStatistics:
    """Statistics computed elsewhere, by tensor name (benchmarks on a slice of a model that
    cannot run, tests): ``record`` is what the manifest says of them."""

    def __init__(self, by_tensor: dict[str, Calibration], record: dict) -> None:
        self.by_tensor = by_tensor
        self._record = record

    def for_group(self, group: ExpertGroup) -> list[Calibration | None] | None:
        if any(m.slice is not None for m in group.members):
            return None
        return [self.by_tensor.get(m.tensor) for m in group.members]

    def order(self, groups: Sequence[ExpertGroup]) -> list[ExpertGroup]:
        return list(groups)

    def record(self) -> dict:
        return dict(self._record)

    def close(self) -> None:
        pass


class TextCalibration:
    """Per-member input statistics of a checkpoint reading a text, one layer at a time."""

    def __init__(self, ckpt: Checkpoint, source: TensorSource, spec: CalibrationSpec,
                 device: torch.device | None = None) -> None:
        spec.check()
        family = for_model_type(str((ckpt.config or {}).get("model_type")))
        self.family = family
        self.layers = CheckpointLayers(ckpt, source)  # refuses what it cannot run
        tok = model_tokenizer(ckpt.root, "calibration")
        self.text: TokenizedText = tokenize_text(spec.text, tok, max_tokens=spec.tokens,
                                                 seq_len=spec.seq_len)
        self._reader: Iterator[LayerInputs] = read_layers(
            self.layers, self.text.ids, batch=spec.batch, device=device)
        self._current: LayerInputs | None = None
        self._done = -1  # the last layer read
        self._cache: dict[tuple[str, int | None], Calibration] = {}

    def record(self) -> dict:
        """What the manifest says of the calibration (docs/FORMAT.md, "Manifest")."""
        return self.text.record()

    def layer_of(self, group: ExpertGroup) -> int | None:
        where = self._where(group)
        return None if where is None else where[0][0]

    def order(self, groups: Sequence[ExpertGroup]) -> list[ExpertGroup]:
        """``groups`` in the order calibration can answer them: by layer (the others last)."""
        big = 1 << 62
        return sorted(groups, key=lambda g: (self.layer_of(g) if self.layer_of(g) is not None
                                             else big))

    def for_group(self, group: ExpertGroup) -> list[Calibration | None] | None:
        """Per member of ``group`` (which may hold a shared FFN that joined it), the statistics
        of its inputs; None when calibration has nothing to say of this group."""
        where = self._where(group)
        if where is None:
            return None
        layer = where[0][0]
        li = self._advance(layer)
        if li is None:
            return None
        out: list[Calibration | None] = []
        for _, expert, role in where:
            key = ("down" if role == "down" else "in", expert)
            if key not in self._cache:
                try:
                    x = li.inputs(role, expert)
                except KeyError:  # no shared FFN here, or no routing
                    out.append(None)
                    continue
                h = (x.T @ x).float()
                self._cache[key] = Calibration(h.cpu(), int(x.shape[0]))
            out.append(self._cache[key])
        return out

    def close(self) -> None:
        self._reader.close()
        self._current = None
        self._cache.clear()

    def _where(self, group: ExpertGroup) -> list[tuple[int, int | None, str]] | None:
        if self.family is None or any(m.slice is not None for m in group.members):
            return None
        where = [self.family.parse(m.tensor) for m in group.members]
        if any(w is None for w in where) or len({(w[0], w[2]) for w in where}) != 1:
            return None
        return where  # type: ignore[return-value]

    def _advance(self, layer: int) -> LayerInputs | None:
        """What layer ``layer``'s MoE block saw; the layers before are read and dropped."""
        if layer < self._done:
            raise RuntimeError(f"calibration reads layers in order: layer {layer} was asked "
                               f"for after layer {self._done}")
        while self._done < layer:
            self._cache.clear()
            self._current = next(self._reader, None)
            if self._current is None:
                self._done = 1 << 62
                return None
            self._done = self._current.layer
        return self._current if self._done == layer else None

