"""Where each Mixture-of-Experts family keeps its experts: family knowledge as data, in one table.

A ``Family`` says, for one model family, how its experts are named on disk (per-expert tensors,
or fused/stacked tensors with an expert axis), which always-on FFN sits beside them, how the
dense FFN it was upcycled from is named, which config key counts its experts, its transformers
``model_type`` and, where ders' runtime has been checked with it, how transformers holds the
experts in memory. Everything else reads this table:

- detection (``detect.py``) takes its vocabulary from it (expert containers, fused tensor
  names, shared-FFN containers, expert-count keys), but still decides by names, shapes and
  similarity, so families missing here are found too;
- ``--base DENSE`` (``dense_base.py``) asks which dense tensors form a member and how (as they
  are, transposed, gate and up concatenated or interleaved) before searching every candidate;
- the runtime and training (``hf/``, ``runtime.py``, ``training/``) name experts, shared FFNs
  and in-memory tensors through ``for_model_type``;
- the test fixtures (``fixtures/layouts.py``) write one tiny checkpoint per form of each family
  and derive what detection must find from the entry.

Adding a family is one entry in ``FAMILIES`` plus its fixture (``fixtures/layouts.py``); a test
holds every entry to having one. Names are relative to a layer (``model.layers.{L}``); ``{E}``
is the expert index, ``{P}`` a projection's name.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache

ROLES = ("gate", "up", "down")  # an FFN's projections; two-matrix FFNs have no gate

# A layer or expert index in a tensor name: ASCII digits, at most nine. Names come from files
# anyone may hand ders: str.isdigit() and regex \d also accept "²" and other Unicode digits,
# which int() refuses or reads, and int() refuses more than 4,300 digits; a name part that is
# not such an index is simply not one (the tensor is no layer's or expert's).
INDEX = r"[0-9]{1,9}"
_INDEX = re.compile(INDEX)


def index_part(part: str) -> int | None:
    """``part`` of a dotted tensor name as a layer or expert index, or None."""
    return int(part) if _INDEX.fullmatch(part) else None


@dataclass(frozen=True)
class Form:
    """How a fused or stacked tensor holds its experts."""

    axes: str  # on-disk shape, e.g. "[E, 2I, H]"
    inner: str  # each expert's slice: "out,in" (as nn.Linear), "in,out" (x @ W) or "vector"
    gate_up: str | None = None  # "halves" (gate first) or "interleaved" (gate even, up odd)
    view: str | None = None  # the reshape that exposes the expert axis (DBRX's stacked 2-D)


@dataclass(frozen=True)
class Projection:
    """One expert tensor of a family: what it computes and how it holds the experts."""

    name: str  # the {P} of the member template: "w1.weight", "gate_up_proj"
    roles: tuple[str, ...]  # ("gate",); ("gate", "up") for a fused gate-up; () for biases, norms
    form: Form | None = None  # None: one [out, in] matrix per expert
    optional: bool = False  # a per-expert bias or norm: grouping it is optional


@dataclass(frozen=True)
class Experts:
    """One on-disk form of a family's experts."""

    member: str  # a member's name relative to its layer, e.g. "mlp.experts.{E}.{P}"
    projections: tuple[Projection, ...]

    @property
    def fused(self) -> bool:
        return "{E}" not in self.member

    def projection(self, role: str) -> Projection:
        return next(p for p in self.projections if p.roles == (role,))

    def match(self, name: str) -> tuple[Projection, str] | None:
        """(projection, layer prefix) when ``name`` is a member of this form (a whole fused
        tensor for fused forms)."""
        for p in self.projections:
            m = _template("{prefix}." + self.member, P=p.name).fullmatch(name)
            if m:
                return p, m["prefix"]
        return None


@dataclass(frozen=True)
class Dense:
    """The dense FFN a family's experts were upcycled from, relative to its layer."""

    container: str = "mlp"  # "" when the projections sit directly in the layer (BERT)
    tensors: dict[str, str] = field(default_factory=lambda: {
        "gate": "gate_proj.weight", "up": "up_proj.weight", "down": "down_proj.weight"})

    def name(self, prefix: str, role: str) -> str | None:
        tensor = self.tensors.get(role)
        if tensor is None:
            return None
        return ".".join(p for p in (prefix, self.container, tensor) if p)


@dataclass(frozen=True)
class InMemory:
    """How transformers (5.x) holds the experts once loaded. Set only where ders' runtime and
    training have been checked with the family."""

    block: str = "mlp"  # the MoE block's module name (on disk it may differ: block_sparse_moe)
    gate_up: str = "experts.gate_up_proj"  # [E, 2I, H], gate rows first, in the block
    down: str = "experts.down_proj"  # [E, H, I]


@dataclass(frozen=True)
class Family:
    name: str
    forms: dict[str, Experts]  # the first is the form transformers' save_pretrained writes
    model_types: tuple[str, ...] = ()  # transformers' config.model_type; () when it has none
    shared: str | None = None  # always-on FFN beside the experts: "mlp.shared_expert.{P}"
    dense: Dense = Dense()
    count_key: str | None = None  # the config key of the number of experts ("a.b" nested)
    layers: tuple[str, ...] = ("model.layers.{L}",)  # prefixes of its layers
    memory: InMemory | None = None
    upcycled: str = "copies"  # "copies" (DeRS applies), "slices" (not copies) or "scratch"
    disk: str = ""  # what is on disk, in words

    @property
    def experts(self) -> Experts:
        return next(iter(self.forms.values()))

    # ---- names, for the runtime and training (per-expert form, layers model.layers.{L}) ----

    @property
    def block(self) -> str:
        """The MoE block's module name on disk ("block_sparse_moe")."""
        return self.experts.member.split(".", 1)[0]

    def expert_name(self, layer: int | str, expert: int | str, role: str) -> str:
        p = self.experts.projection(role)
        return f"{self.layers[0].format(L=layer)}.{self.experts.member.format(E=expert, P=p.name)}"

    def shared_name(self, layer: int | str, role: str) -> str:
        if self.shared is None:
            raise ValueError(f"{self.name} has no shared expert")
        p = self.experts.projection(role)
        return f"{self.layers[0].format(L=layer)}.{self.shared.format(P=p.name)}"

    def to_memory(self, name: str) -> str:
        """The in-memory parameter name of an on-disk tensor outside the experts."""
        block = self.memory.block if self.memory else self.block
        return name.replace(f".{self.block}.", f".{block}.") if self.block != block else name

    def parse(self, name: str) -> tuple[int, int | None, str] | None:
        """(layer, expert, role) of an expert tensor, expert None for the shared FFN."""
        for p in self.experts.projections:
            if len(p.roles) != 1:
                continue
            m = _template(f"{self.layers[0]}.{self.experts.member}", P=p.name).fullmatch(name)
            if m:
                return int(m["L"]), int(m["E"]), p.roles[0]
            if self.shared is not None:
                m = _template(f"{self.layers[0]}.{self.shared}", P=p.name).fullmatch(name)
                if m:
                    return int(m["L"]), None, p.roles[0]
        return None


@lru_cache(maxsize=4096)  # names are matched against every family, for every tensor
def _template(template: str, **fixed: str) -> re.Pattern:
    """A name template as a regular expression: ``{L}`` and ``{E}`` match integers (groups L
    and E), ``{prefix}`` anything (group prefix), the ``fixed`` placeholders their values."""
    out = re.escape(template)
    for key, value in fixed.items():
        out = out.replace(re.escape(f"{{{key}}}"), re.escape(value))
    for key, group in (("L", f"(?P<L>{INDEX})"), ("E", f"(?P<E>{INDEX})"),
                       ("prefix", "(?P<prefix>.+)")):
        out = out.replace(re.escape(f"{{{key}}}"), group)
    return re.compile(out)


# ---- the table ----------------------------------------------------------------------------------

def _per_expert(member: str, names: dict[str, str], optional: tuple[str, ...] = ()) -> Experts:
    """Per-expert [out, in] matrices: {P} -> role, plus optional per-expert biases and norms."""
    return Experts(member, tuple(Projection(n, (role,)) for n, role in names.items())
                   + tuple(Projection(n, (), optional=True) for n in optional))


LLAMA_FFN = {"gate_proj.weight": "gate", "up_proj.weight": "up", "down_proj.weight": "down"}
MIXTRAL_FFN = {"w1.weight": "gate", "w2.weight": "down", "w3.weight": "up"}
TWO_MATRIX = Dense(tensors={"up": "fc1.weight", "down": "fc2.weight"})
GATE_UP_OUT_IN = Projection("gate_up_proj", ("gate", "up"), Form("[E, 2I, H]", "out,in", "halves"))
DOWN_OUT_IN = Projection("down_proj", ("down",), Form("[E, H, I]", "out,in"))
FUSED_OUT_IN = Experts("mlp.experts.{P}", (GATE_UP_OUT_IN, DOWN_OUT_IN))
GRANITE = Experts("block_sparse_moe.{P}", (  # fused, without "experts" in the names
    Projection("input_linear.weight", ("gate", "up"), Form("[E, 2I, H]", "out,in", "halves")),
    Projection("output_linear.weight", ("down",), Form("[E, H, I]", "out,in"))))

FAMILIES: tuple[Family, ...] = (
    Family("mixtral", {
        "per-expert": _per_expert("block_sparse_moe.experts.{E}.{P}", MIXTRAL_FFN),
        "fused": FUSED_OUT_IN},
        model_types=("mixtral",), count_key="num_local_experts", memory=InMemory(),
        disk="per-expert [out, in] block_sparse_moe.experts.{E}.w1/w3 [I, H] (gate, up), "
             "w2 [H, I]; transformers 5 holds them fused as mlp.experts.gate_up_proj and "
             "writes that form with save_pretrained(save_original_format=False)"),
    Family("phimoe", {"per-expert": _per_expert("block_sparse_moe.experts.{E}.{P}", MIXTRAL_FFN)},
           model_types=("phimoe",), count_key="num_local_experts",
           disk="Mixtral's names; LayerNorms with biases"),
    Family("qwen2_moe", {"per-expert": _per_expert("mlp.experts.{E}.{P}", LLAMA_FFN)},
           model_types=("qwen2_moe",), shared="mlp.shared_expert.{P}", count_key="num_experts",
           memory=InMemory(),
           disk="per-expert [out, in] mlp.experts.{E}.{gate,up,down}_proj.weight; "
                "mlp.shared_expert.* (its own width) and shared_expert_gate.weight [1, H]"),
    Family("qwen3_moe", {"per-expert": _per_expert("mlp.experts.{E}.{P}", LLAMA_FFN)},
           model_types=("qwen3_moe",), count_key="num_experts", memory=InMemory(),
           disk="per-expert [out, in] mlp.experts.{E}.{gate,up,down}_proj.weight"),
    Family("minimax", {"per-expert": _per_expert("block_sparse_moe.experts.{E}.{P}",
                                                 MIXTRAL_FFN)},
           model_types=("minimax",), count_key="num_local_experts", upcycled="scratch",
           disk="Mixtral's names (block_sparse_moe.experts.{E}.w1/w2/w3.weight)"),
    Family("ernie4_5_moe", {"per-expert": _per_expert("mlp.experts.{E}.{P}", LLAMA_FFN)},
           model_types=("ernie4_5_moe",), shared="mlp.shared_experts.{P}",
           count_key="moe_num_experts", upcycled="scratch",
           disk="per-expert [out, in] mlp.experts.{E}.*_proj.weight, mlp.shared_experts.* "
                "(moe_num_shared_experts wide), router mlp.gate.weight and "
                "mlp.moe_statics.e_score_correction_bias [1, E]"),
    Family("glm4_moe", {"per-expert": _per_expert("mlp.experts.{E}.{P}", LLAMA_FFN)},
           model_types=("glm4_moe",), shared="mlp.shared_experts.{P}",
           count_key="n_routed_experts", upcycled="scratch",
           disk="DeepSeek's names: experts from layer first_k_dense_replace on, "
                "mlp.shared_experts.*, router mlp.gate.weight and e_score_correction_bias"),
    Family("jamba", {"per-expert": _per_expert("feed_forward.experts.{E}.{P}", LLAMA_FFN)},
           model_types=("jamba",), dense=Dense("feed_forward"), count_key="num_experts",
           upcycled="scratch",
           disk="per-expert [out, in] feed_forward.experts.{E}.*_proj.weight every "
                "expert_layer_period-th layer, dense feed_forward.*_proj elsewhere, router "
                "feed_forward.router.weight; Mamba and attention layers between"),
    Family("olmoe", {"per-expert": _per_expert("mlp.experts.{E}.{P}", LLAMA_FFN)},
           model_types=("olmoe",), count_key="num_experts", upcycled="scratch",
           disk="per-expert [out, in] mlp.experts.{E}.{gate,up,down}_proj.weight"),
    Family("deepseek_v3", {"per-expert": _per_expert("mlp.experts.{E}.{P}", LLAMA_FFN)},
           model_types=("deepseek_v3",), shared="mlp.shared_experts.{P}",
           count_key="n_routed_experts", upcycled="scratch",
           disk="per-expert [out, in] mlp.experts.{E}.*_proj.weight from layer "
                "first_k_dense_replace on, dense mlp.* before; mlp.shared_experts.*; the MTP "
                "layer (index num_hidden_layers) has experts too; the release is F8_E4M3 with "
                "F32 *.weight_scale_inv companions"),
    Family("granitemoe", {"fused": GRANITE},
        model_types=("granitemoe",), count_key="num_local_experts", upcycled="scratch",
        disk="fused, no 'experts' in the name: block_sparse_moe.input_linear.weight [E, 2I, H], "
             "output_linear.weight [E, H, I] (JetMoE: mlp.input_linear/output_linear)"),
    Family("granitemoeshared", {"fused": GRANITE},
        model_types=("granitemoeshared",), shared="shared_mlp.{P}",
        count_key="num_local_experts", upcycled="scratch",
        disk="Granite-MoE's fused experts plus shared_mlp.input_linear.weight [2I, H] and "
             "output_linear.weight [H, I], always on (cannot join fused experts)"),
    Family("llama4", {"fused": Experts("feed_forward.experts.{P}", (
        Projection("gate_up_proj", ("gate", "up"), Form("[E, H, 2I]", "in,out", "halves")),
        Projection("down_proj", ("down",), Form("[E, I, H]", "in,out"))))},
        model_types=("llama4", "llama4_text"), shared="feed_forward.shared_expert.{P}",
        count_key="text_config.num_local_experts", upcycled="scratch",
        disk="fused [in, out], no .weight: feed_forward.experts.gate_up_proj [E, H, 2I] (gate "
             "= first half of the last axis), down_proj [E, I, H]; shared_expert.*_proj.weight "
             "[out, in], which cannot join fused experts"),
    Family("gpt_oss", {"fused": Experts("mlp.experts.{P}", (
        Projection("gate_up_proj", ("gate", "up"), Form("[E, H, 2I]", "in,out", "interleaved")),
        Projection("down_proj", ("down",), Form("[E, I, H]", "in,out")),
        Projection("gate_up_proj_bias", (), Form("[E, 2I]", "vector", "interleaved"),
                   optional=True),
        Projection("down_proj_bias", (), Form("[E, H]", "vector"), optional=True)))},
        model_types=("gpt_oss",), count_key="num_local_experts", upcycled="scratch",
        disk="bf16 form, fused [in, out], no .weight: mlp.experts.gate_up_proj [E, H, 2I] with "
             "gate in even and up in odd columns, down_proj [E, I, H], and their biases; the "
             "release is MXFP4 (_blocks, _scales)"),
    Family("dbrx", {"stacked": Experts("ffn.experts.mlp.{P}", (
        Projection("w1", ("gate",), Form("[E*I, H]", "out,in", view="[E, I, H]")),
        Projection("v1", ("up",), Form("[E*I, H]", "out,in", view="[E, I, H]")),
        Projection("w2", ("down",), Form("[E*I, H]", "in,out", view="[E, I, H]"))))},
        model_types=("dbrx",), count_key="ffn_config.moe_num_experts",
        layers=("transformer.blocks.{L}",), upcycled="scratch",
        disk="stacked 2-D, no .weight: ffn.experts.mlp.w1 (gate), v1 (up), w2 (down) each "
             "[E*I, H]; w2 is used as x @ w2 ([in, out]); the count only in the config"),
    Family("nllb_moe", {"per-expert": _per_expert(
        "ffn.experts.expert_{E}.{P}", {"fc1.weight": "up", "fc2.weight": "down"},
        ("fc1.bias", "fc2.bias"))},
        model_types=("nllb-moe",), dense=Dense("ffn", TWO_MATRIX.tensors),
        count_key="num_experts", layers=("model.encoder.layers.{L}", "model.decoder.layers.{L}"),
        upcycled="scratch",
        disk="per-expert ffn.experts.expert_{E}.fc1/fc2.{weight,bias} in every sparse_step-th "
             "layer of encoder and decoder, dense ffn.fc1/fc2 elsewhere"),
    Family("switch", {"per-expert": _per_expert(
        "mlp.experts.expert_{E}.{P}", {"wi.weight": "up", "wo.weight": "down"})},
        model_types=("switch_transformers",),
        dense=Dense(tensors={"up": "wi.weight", "down": "wo.weight"}), count_key="num_experts",
        layers=("encoder.block.{L}.layer.1", "decoder.block.{L}.layer.2"), upcycled="scratch",
        disk="per-expert {encoder,decoder}.block.{L}.layer.{1,2}.mlp.experts.expert_{E}.wi/wo"
             ".weight in every sparse_step-th block, dense mlp.wi/wo elsewhere"),
    Family("moe_llava", {"per-expert": _per_expert(
        "mlp.deepspeed_moe.experts.deepspeed_experts.{E}.{P}", LLAMA_FFN)},
        count_key="moe.num_experts",
        disk="DeepSpeed-MoE (MoE-LLaVA on a LLaMA-style base): "
             "mlp.deepspeed_moe.experts.deepspeed_experts.{E}.*_proj.weight in every other "
             "layer, router deepspeed_moe.gate.wg F32; the config lists a count per MoE layer"),
    Family("med_moe", {"per-expert": _per_expert(
        "mlp.deepspeed_moe.experts.deepspeed_experts.{E}.{P}",
        {"fc1.weight": "up", "fc2.weight": "down"}, ("fc1.bias", "fc2.bias"))},
        shared="mlp.meta_moe.{P}", dense=TWO_MATRIX, count_key="moe.num_experts",
        disk="MoE-LLaVA's DeepSpeed layer on Phi-2: deepspeed_experts.{E}.fc1/fc2.{weight,bias}, "
             "and mlp.meta_moe.*, the original dense MLP, always on (extended DeRS)"),
    Family("xft", {"per-expert": _per_expert(
        "mlp.calculator.experts.weight_{P}.{E}.weight", {"gate": "gate", "up": "up",
                                                        "down": "down"})},
        count_key="num_experts",
        disk="XFT (Coder-MoE): mlp.calculator.experts.weight_{gate,up,down}.{E}.weight, expert "
             "0 the always-selected shared expert (a member of the group like the others)"),
    Family("llama_moe", {"per-expert": _per_expert(
        "mlp.calculator.experts.weight_{P}.{E}", {"gate": "gate", "up": "up", "down": "down"})},
        count_key="num_experts", upcycled="slices",
        disk="LLaMA-MoE: mlp.calculator.experts.weight_{gate,up,down}.{E} (no .weight), "
             "disjoint neuron slices of the dense FFN of unequal sizes: not copies"),
    Family("bert_moe", {"per-expert": _per_expert(
        "moe.experts.{E}.{P}", {"intermediate.dense.weight": "up", "output.dense.weight": "down"},
        ("intermediate.dense.bias", "output.dense.bias", "output.LayerNorm.weight",
         "output.LayerNorm.bias"))},
        dense=Dense("", {"up": "intermediate.dense.weight", "down": "output.dense.weight"}),
        count_key="num_experts", layers=("bert.encoder.layer.{L}",),
        disk="a BERT encoder upcycled the plain way: moe.experts.{E}.intermediate.dense, "
             "output.dense and output.LayerNorm per expert, in every other layer"),
)
BY_NAME: dict[str, Family] = {f.name: f for f in FAMILIES}


def for_model_type(model_type: str) -> Family | None:
    """The family of a transformers ``model_type`` that ders' runtime has been checked with."""
    return next((f for f in FAMILIES if model_type in f.model_types and f.memory), None)


RUNTIME_MODEL_TYPES = tuple(t for f in FAMILIES if f.memory for t in f.model_types)


def members_of(name: str) -> list[tuple[Family, Experts, Projection, str]]:
    """Every (family, form, projection, layer prefix) a tensor name is a member of. Several
    families share names (Mixtral and PhiMoE; Qwen-MoE, OLMoE and DeepSeek): all are returned,
    and they agree on roles; gpt-oss and Mixtral's fused form share names but not forms."""
    out = []
    for family in FAMILIES:
        for experts in family.forms.values():
            hit = experts.match(name)
            if hit is not None:
                out.append((family, experts, hit[0], hit[1]))
    return out


# ---- detection's vocabulary, derived from the table --------------------------------------------

# Names seen in code of families that have no entry (and fixture) yet; detection knows them.
ELSEWHERE_CONTAINERS = ("local_experts",)  # Megatron-core's SequentialMLP
# Arctic's residual MLP, DeRS' universal expert:
ELSEWHERE_SHARED = ("residual_mlp", "universal_expert")
ELSEWHERE_LAYERS = ("h",)  # GPT-2-style bases (Qwen-1, MoE-LLaVA-Qwen)


def _components(template: str) -> list[str]:
    return template.split(".")


@dataclass(frozen=True)
class Vocabulary:
    """The names detection knows, from every family's entry."""

    containers: frozenset[str]  # components an expert index follows: "experts"
    fused: frozenset[str]  # fused expert tensors named without "experts": "input_linear"
    shared: tuple[str, ...]  # always-on FFNs beside the experts: "shared_expert"
    count_scopes: tuple[str, ...]  # config sections that may hold the expert count ("" = top)
    count_keys: tuple[str, ...]  # keys of the expert count: "num_local_experts"
    layers: frozenset[str]  # components a layer index follows: "layers"


def _vocabulary() -> Vocabulary:
    containers, fused, shared, scopes, counts, layers = set(), set(), [], [], [], set()
    for family in FAMILIES:
        for experts in family.forms.values():
            parts = _components(experts.member)
            if not experts.fused:  # the component(s) just before the expert index
                e = next(i for i, p in enumerate(parts) if "{E}" in p)
                containers.update(p for p in parts[max(0, e - 2):e]
                                  if "experts" in p and "{" not in p)
            elif not any("experts" in p for p in parts):  # fused, named without "experts"
                fused.update(p.name.split(".")[0] for p in experts.projections)
        if family.shared:
            shared.append(_components(family.shared)[-2])
        if family.count_key:
            scope, _, key = family.count_key.rpartition(".")
            scopes.append(scope)
            counts.append(key)
        for prefix in family.layers:
            parts = _components(prefix)
            layers.add(parts[parts.index("{L}") - 1])
    return Vocabulary(
        frozenset(containers | set(ELSEWHERE_CONTAINERS)), frozenset(fused),
        tuple(dict.fromkeys([*shared, *ELSEWHERE_SHARED])), tuple(dict.fromkeys(scopes)),
        tuple(dict.fromkeys(counts)), frozenset(layers | set(ELSEWHERE_LAYERS)))


VOCABULARY = _vocabulary()
