"""Where a transformers MoE model keeps its experts, on disk and in memory: family knowledge as
data. On disk (``save_pretrained``) experts are per-expert 2-D tensors; in memory transformers 5
fuses them into ``experts.gate_up_proj [E, 2I, H]`` (gate rows first) and ``experts.down_proj
[E, H, I]`` of the block ``model.layers.{L}.mlp``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

ROLES = ("gate", "up", "down")


@dataclass(frozen=True)
class MoeLayout:
    model_type: str
    block: str  # the MoE block's name on disk ("block_sparse_moe"); in memory it is "mlp"
    projections: tuple[str, str, str]  # on-disk names of the gate, up and down projections
    shared: str | None = None  # the always-on FFN beside the experts, on disk and in memory

    def expert_name(self, layer: int, expert: int, role: str) -> str:
        proj = self.projections[ROLES.index(role)]
        return f"model.layers.{layer}.{self.block}.experts.{expert}.{proj}.weight"

    def shared_name(self, layer: int, role: str) -> str:
        if self.shared is None:
            raise ValueError(f"{self.model_type} has no shared expert")
        return f"model.layers.{layer}.mlp.{self.shared}.{role}_proj.weight"

    def to_memory(self, name: str) -> str:
        """The in-memory parameter name of an on-disk tensor outside the experts."""
        return name.replace(f".{self.block}.", ".mlp.") if self.block != "mlp" else name

    def parse(self, name: str) -> tuple[int, int | None, str] | None:
        """(layer, expert, role) of an expert tensor, expert None for the shared FFN."""
        projs = "|".join(map(re.escape, self.projections))
        m = re.fullmatch(rf"model\.layers\.(\d+)\.{self.block}\.experts\.(\d+)\.({projs})\.weight",
                         name)
        if m:
            return int(m[1]), int(m[2]), ROLES[self.projections.index(m[3])]
        if self.shared is not None:
            m = re.fullmatch(rf"model\.layers\.(\d+)\.mlp\.{self.shared}\.(gate|up|down)_proj"
                             r"\.weight", name)
            if m:
                return int(m[1]), None, m[2]
        return None


_HF_NAMES = ("gate_proj", "up_proj", "down_proj")
LAYOUTS = {
    "mixtral": MoeLayout("mixtral", "block_sparse_moe", ("w1", "w3", "w2")),
    "qwen2_moe": MoeLayout("qwen2_moe", "mlp", _HF_NAMES, shared="shared_expert"),
    "qwen3_moe": MoeLayout("qwen3_moe", "mlp", _HF_NAMES),
}


def layout_of(model_type: str) -> MoeLayout | None:
    return LAYOUTS.get(model_type)
