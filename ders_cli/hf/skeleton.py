"""Building a transformers model without allocating its weights, then filling it in.

A model is constructed with every parameter on the meta device (buffers such as rotary
frequencies are real: they are computed, not loaded), its expert modules are replaced, and the
remaining parameters are assigned from tensors that already exist. No full copy of the experts
is ever allocated.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn


@contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Inside, every new nn.Parameter lives on the meta device; buffers are allocated as usual."""
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = nn.Parameter(param.to("meta"),
                                                    requires_grad=param.requires_grad)

    nn.Module.register_parameter = register  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


@contextmanager
def quiet_transformers(*, errors_only: bool = True) -> Iterator[None]:
    """Inside, transformers shows no progress bars (and, with ``errors_only``, logs errors only);
    on the way out the user's settings come back: a library must not silence transformers for
    the whole process, where its reports (missing keys, ...) are what users rely on."""
    from transformers.utils import logging

    level, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    if errors_only:
        logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(level)
        if bars:
            logging.enable_progress_bar()


@contextmanager
def no_empty_module_warning() -> Iterator[None]:
    """Inside, no warning about initializing a zero-element tensor: a config without a shared
    expert may still size one at 0 (Qwen2-MoE's ``shared_expert_intermediate_size = 0``), and
    torch warns as the model is built, though nothing is wrong with it."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Initializing zero-element tensors")
        yield


def config_from_dict(doc: Mapping[str, Any]):
    """A transformers config from the contents of a config.json."""
    from transformers import AutoConfig

    doc = dict(doc)
    return AutoConfig.for_model(doc.pop("model_type"), **doc)


def config_from_bytes(raw: bytes):
    return config_from_dict(json.loads(raw))


def empty_model(config: Any, dtype: torch.dtype) -> nn.Module:
    """A causal LM of ``config``'s class with its parameters on meta, to be filled in."""
    from transformers import AutoModelForCausalLM

    with quiet_transformers(), parameters_on_meta():
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def assign(model: nn.Module, tensors: Mapping[str, torch.Tensor], *, trainable: bool) -> None:
    """Put ``tensors`` (by in-memory name) into ``model``'s parameters without copying."""
    for name, t in tensors.items():
        owner, _, leaf = name.rpartition(".")
        module = model.get_submodule(owner)
        if leaf in module._parameters:
            module._parameters[leaf] = nn.Parameter(t, requires_grad=trainable)
        elif leaf in module._buffers:
            module._buffers[leaf] = t
        else:
            raise KeyError(name)


def tie_and_check(model: nn.Module) -> None:
    """Tie output embeddings where the config says so, then insist nothing is left on meta."""
    config = model.config
    if getattr(config, "tie_word_embeddings", False):
        out, inp = model.get_output_embeddings(), model.get_input_embeddings()
        if out is not None:
            out.weight = inp.weight  # one Parameter, not two sharing storage
    missing = [n for n, p in [*model.named_parameters(), *model.named_buffers()]
               if p.device.type == "meta"]
    if missing:
        raise ValueError(f"{len(missing)} tensors were not filled, e.g. {missing[0]!r}")
