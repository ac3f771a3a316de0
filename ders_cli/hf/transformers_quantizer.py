"""The transformers classes of quant_method "ders" (registered by ``quantizer.register``).

How a ders folder loads (transformers 5's ``from_pretrained``):

1. ``update_attn_implementation``, the one hook that sees the config before the weight files are
   resolved, points ``transformers_weights`` at the archive;
2. ``_process_model_before_weight_loading`` opens the archive (header hash, manifest) and puts a
   placeholder where each layer's experts will go, so that transformers expects no expert
   weights from the file and reports none missing;
3. transformers loads every other tensor from the archive (stored under its own name), in the
   dtype and on the devices asked for; the archive's own arrays (``ders/...``) are ignored;
4. ``_process_model_after_weight_loading`` checks the checksum of every tensor transformers read,
   builds the expert modules from the archive on each layer's device, and makes
   ``save_pretrained`` write a ders folder.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers.quantizers.base import HfQuantizer  # the package may be mid-import
from transformers.utils.quantization_config import QuantizationConfigMixin

from ..archive import ArchiveReader
from ..errors import CorruptArchiveError
from .quantizer import ARCHIVE_NAME, QUANT_METHOD


class DersConfig(QuantizationConfigMixin):
    """``quantization_config`` of a ders folder: which file holds the archive. Other keys are
    informative (the writer's version, the setting) and kept as they are."""

    def __init__(self, archive: str = ARCHIVE_NAME, **informative: Any) -> None:
        self.quant_method = QUANT_METHOD
        self.archive = archive
        for k, v in informative.items():
            setattr(self, k, v)


class _Pending(nn.Module):
    """Where a layer's experts will be once the archive's groups are read. Holds meta tensors
    of the stored arrays' sizes (not saved, not loaded) so that ``device_map="auto"`` counts
    them."""

    def __init__(self, original: nn.Module, nbytes: int) -> None:
        super().__init__()
        self._original = [original]  # the transformers module, not registered
        self.register_buffer("stored", torch.empty(nbytes, dtype=torch.uint8, device="meta"),
                             persistent=False)


class DersHfQuantizer(HfQuantizer):
    requires_calibration = True  # only archives load: nothing is quantized on the fly

    def __init__(self, quantization_config: DersConfig, **kwargs: Any) -> None:
        super().__init__(quantization_config, **kwargs)
        self._reader: ArchiveReader | None = None
        self._model: Any = None
        self._layers: dict[int, Any] = {}

    def validate_environment(self, *args: Any, device_map: Any = None, **kwargs: Any) -> None:
        if isinstance(device_map, dict) and "disk" in device_map.values():
            raise ValueError("a ders archive's experts cannot be offloaded to disk: give them a "
                             "device (device_map 'cpu', 'cuda', 'auto' without disk)")

    def _name_the_archive(self, config: Any) -> Any:
        # The config names the archive; its transformers_weights was a sentence for
        # transformers without ders (see quantizer.folder_config). This must happen before
        # transformers resolves the weight files: the hooks below are the ones that see the
        # config then (update_attn_implementation since transformers 5.x, the plan hooks in
        # 5.0).
        config.transformers_weights = self.quantization_config.archive
        return config

    update_attn_implementation = _name_the_archive
    update_tp_plan = _name_the_archive
    update_ep_plan = _name_the_archive

    def _process_model_before_weight_loading(self, model: Any, checkpoint_files: list[str]
                                             | None = None, **kwargs: Any) -> None:
        from ..runtime import plan_layers
        from .archive_model import open_archive_model

        if not checkpoint_files:
            raise ValueError("a ders folder needs its archive file")
        self._reader = ArchiveReader(Path(checkpoint_files[0]))
        am = open_archive_model(self._reader)
        self._model = am
        ignore = {r"^ders/"}
        self._layers = plan_layers(am)
        for layer, plan in self._layers.items():
            block = model.model.layers[layer].mlp
            block.experts = _Pending(block.experts, plan.nbytes)
            if plan.shared:
                block.shared_expert = _Pending(block.shared_expert, 0)
            # Experts stored as they are beside grouped ones: the runtime reads them itself.
            ignore |= {f"^{re.escape(name)}$" for name in plan.loose}
        patterns = getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ()
        model._keys_to_ignore_on_load_unexpected = _Patterns({*patterns, *ignore})

    def _process_model_after_weight_loading(self, model: Any, **kwargs: Any) -> Any:
        from ..runtime import install_experts
        from .saving import use_ders_folders
        from .side_files import attach, read_side_files

        reader, am = self._reader, self._model
        assert reader is not None and am is not None
        try:
            for name, rec in reader.manifest.tensors.items():
                if rec.group is None and not reader.check_digest(name):
                    raise CorruptArchiveError(f"checksum mismatch in stored array {name!r}",
                                              reader.path)
            for layer in self._layers:
                block = model.model.layers[layer].mlp
                for name in ("experts", "shared_expert"):
                    pending = getattr(block, name, None)
                    if isinstance(pending, _Pending):
                        setattr(block, name, pending._original[0])
            install_experts(am, model, dtype=model.dtype, layers=self._layers,
                            device_of=_router_device, **self._runtime())
            attach(model, read_side_files(reader), generation=False)
            use_ders_folders(model)
        finally:
            reader.close()
            self._reader = self._model = None
        return model

    def _runtime(self) -> dict[str, Any]:
        """How the experts compute: ``load_from_archive``'s options, which it passes in the
        quantization_config of the folder it loads (checked: config.json is input)."""
        from ..runtime import MODES

        runtime = getattr(self.quantization_config, "runtime", None) or {}
        mode, cache_gb = runtime.get("mode", "auto"), runtime.get("cache_gb")
        if mode not in MODES:
            raise ValueError(f"quantization_config runtime mode must be one of "
                             f"{', '.join(MODES)}, got {mode!r}")
        if cache_gb is not None and not (isinstance(cache_gb, (int, float)) and cache_gb >= 0):
            raise ValueError(f"quantization_config runtime cache_gb must be >= 0, got "
                             f"{cache_gb!r}")
        return {"mode": mode, "cache_gb": cache_gb}

    def is_serializable(self) -> bool:
        # save_pretrained writes a ders folder (ders_cli.hf.saving), never transformers' own
        # state dict of this model, whose expert tensors are internal.
        return False

    @property
    def is_trainable(self) -> bool:
        return False


class _Patterns(set):
    """Key patterns that transformers 5.0 concatenates to a list and later versions join to a
    set: this one does both."""

    def __add__(self, other: list) -> list:
        return [*self, *other]

    def __radd__(self, other: list) -> list:
        return [*other, *self]


def _router_device(block: nn.Module) -> torch.device:
    """Experts go where their block's router is (device_map places whole layers)."""
    for name, p in block.named_parameters():
        if not name.startswith(("experts.", "shared_expert.")) and p.device.type != "meta":
            return p.device
    return torch.device("cpu")

