"""Architecture adapters: the one place that knows where a family keeps its layers.

Each adapter maps a causal LM to its decoder layers, the named linear *roles* inside a
layer (q, k, v, o, gate, up, down, fc1, fc2, fused qkv ...), the norm in front of each
input group, and the embedding / final norm / head. Everything else in RankLab asks an
adapter; nothing else spells module paths. Adapters are found from ``config.model_type``
through ``ADAPTERS`` (a registry), never guessed from model names.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn


@dataclass(frozen=True)
class Role:
    """One linear inside a decoder layer.

    ``group`` names the input the linear reads: linears of one group share their input
    (q/k/v read the attention norm's output), so they share input statistics.
    """

    role: str  # short name shown to users: q, k, v, o, gate, up, down, qkv, fc1, fc2 ...
    path: str  # attribute path inside the decoder layer, e.g. "self_attn.q_proj"
    group: str  # "attn_in" | "attn_out" | "mlp_in" | "mlp_out"


@dataclass(frozen=True)
class LinearInfo:
    """A decoder linear located in a concrete model."""

    name: str  # full module name, e.g. "model.layers.3.self_attn.q_proj" (plan key)
    layer: int
    role: str
    group: str
    out_features: int
    in_features: int

    @property
    def input_key(self) -> str:
        """Key of the input this linear shares with its group (for shared statistics)."""
        return f"{self.layer}.{self.group}"

    @property
    def break_even(self) -> float:
        m, n = self.out_features, self.in_features
        return m * n / (m + n)


@dataclass
class Adapter:
    """Where one architecture family keeps its parts. Subclasses only set fields."""

    model_types: ClassVar[tuple[str, ...]] = ()
    layers_path: ClassVar[str] = "model.layers"
    embed_path: ClassVar[str] = "model.embed_tokens"
    final_norm_path: ClassVar[str | None] = "model.norm"
    head_path: ClassVar[str] = "lm_head"
    roles: ClassVar[tuple[Role, ...]] = ()
    norms: ClassVar[dict[str, str]] = {}  # input group -> norm path inside the layer
    norm_kind: ClassVar[str] = "rms"  # "rms" or "layernorm" (with bias, mean-centred)
    # SliceGPT (compression.slicegpt): how its explicit-residual layer re-implements this family's
    # decoder layer ("llama": pre-norm attention + GLU MLP; "opt"; "gpt2"), None if not supported
    slice_layout: ClassVar[str | None] = None
    attn_path: ClassVar[str] = "self_attn"  # the attention module inside a decoder layer
    pos_embed_path: ClassVar[str | None] = None  # learned position embeddings (on the residual stream)
    attn_unused_kwargs: ClassVar[tuple[str, ...]] = ()  # layer arguments its attention module does not take
    extra: dict = field(default_factory=dict)

    # ------------------------------------------------------------------ model access
    def prepare(self, model: nn.Module) -> nn.Module:
        """Make the model's linears plain ``nn.Linear`` (families with other layouts override)."""
        return model

    def layers(self, model: nn.Module) -> nn.ModuleList:
        return get_submodule(model, self.layers_path)

    def embed(self, model: nn.Module) -> nn.Module:
        return get_submodule(model, self.embed_path)

    def final_norm(self, model: nn.Module) -> nn.Module | None:
        return get_submodule(model, self.final_norm_path) if self.final_norm_path else None

    def head(self, model: nn.Module) -> nn.Linear:
        return get_submodule(model, self.head_path)

    def pre_head(self, model: nn.Module) -> nn.Module | None:
        """A module between the final norm and the head (None for most families)."""
        return None

    def layer_name(self, i: int) -> str:
        return f"{self.layers_path}.{i}"

    def role_path(self, role: str) -> str:
        """Attribute path of the linear ``role`` inside a decoder layer, e.g. ``"mlp.up_proj"``."""
        for r in self.roles:
            if r.role == role:
                return r.path
        raise KeyError(f"{type(self).__name__} has no role {role!r}; roles: {', '.join(r.role for r in self.roles)}")

    def linears(self, model: nn.Module) -> list[LinearInfo]:
        """Every decoder linear in depth order, then role order."""
        out = []
        for i, layer in enumerate(self.layers(model)):
            for r in self.roles:
                mod = get_submodule(layer, r.path)
                out_f, in_f = linear_shape(mod)
                out.append(LinearInfo(f"{self.layer_name(i)}.{r.path}", i, r.role, r.group, out_f, in_f))
        return out

    def norm_for(self, layer: nn.Module, group: str) -> nn.Module | None:
        path = self.norms.get(group)
        return get_submodule(layer, path) if path else None


def get_submodule(root: nn.Module, path: str) -> nn.Module:
    mod = root
    for part in path.split("."):
        mod = mod[int(part)] if part.isdigit() else getattr(mod, part)
    return mod


def set_submodule(root: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, attr = path.rpartition(".")
    parent = get_submodule(root, parent_path) if parent_path else root
    if attr.isdigit():
        parent[int(attr)] = new
    else:
        setattr(parent, attr, new)


def linear_shape(mod: nn.Module) -> tuple[int, int]:
    """(out_features, in_features) of a linear or of a RankLab replacement module."""
    if hasattr(mod, "out_features") and hasattr(mod, "in_features"):
        return int(mod.out_features), int(mod.in_features)
    raise TypeError(f"{type(mod).__name__} is not a linear layer")


# ---------------------------------------------------------------------------- families
_ATTN = (Role("q", "self_attn.q_proj", "attn_in"), Role("k", "self_attn.k_proj", "attn_in"),
         Role("v", "self_attn.v_proj", "attn_in"), Role("o", "self_attn.o_proj", "attn_out"))
_GLU = (Role("gate", "mlp.gate_proj", "mlp_in"), Role("up", "mlp.up_proj", "mlp_in"),
        Role("down", "mlp.down_proj", "mlp_out"))


@dataclass
class LlamaAdapter(Adapter):
    """Llama-like decoders: llama, mistral, qwen2, qwen3 (pre-norm RMSNorm, GLU MLP)."""

    model_types: ClassVar[tuple[str, ...]] = ("llama", "mistral", "qwen2", "qwen3")
    roles: ClassVar[tuple[Role, ...]] = _ATTN + _GLU
    norms: ClassVar[dict[str, str]] = {"attn_in": "input_layernorm", "mlp_in": "post_attention_layernorm"}
    slice_layout: ClassVar[str | None] = "llama"


@dataclass
class Gemma3Adapter(Adapter):
    """Gemma 3 text decoders: sandwich norms, the MLP reads ``pre_feedforward_layernorm``."""

    model_types: ClassVar[tuple[str, ...]] = ("gemma3_text",)
    roles: ClassVar[tuple[Role, ...]] = _ATTN + _GLU
    norms: ClassVar[dict[str, str]] = {"attn_in": "input_layernorm", "mlp_in": "pre_feedforward_layernorm"}


@dataclass
class Phi3Adapter(Adapter):
    """Phi-3: fused ``qkv_proj`` and ``gate_up_proj``."""

    model_types: ClassVar[tuple[str, ...]] = ("phi3",)
    roles: ClassVar[tuple[Role, ...]] = (
        Role("qkv", "self_attn.qkv_proj", "attn_in"), Role("o", "self_attn.o_proj", "attn_out"),
        Role("gate_up", "mlp.gate_up_proj", "mlp_in"), Role("down", "mlp.down_proj", "mlp_out"))
    norms: ClassVar[dict[str, str]] = {"attn_in": "input_layernorm", "mlp_in": "post_attention_layernorm"}


@dataclass
class OPTAdapter(Adapter):
    """OPT: LayerNorm with bias, fc1/fc2 MLP, ``out_proj``."""

    model_types: ClassVar[tuple[str, ...]] = ("opt",)
    layers_path: ClassVar[str] = "model.decoder.layers"
    embed_path: ClassVar[str] = "model.decoder.embed_tokens"
    final_norm_path: ClassVar[str | None] = "model.decoder.final_layer_norm"
    roles: ClassVar[tuple[Role, ...]] = (
        Role("q", "self_attn.q_proj", "attn_in"), Role("k", "self_attn.k_proj", "attn_in"),
        Role("v", "self_attn.v_proj", "attn_in"), Role("o", "self_attn.out_proj", "attn_out"),
        Role("fc1", "fc1", "mlp_in"), Role("fc2", "fc2", "mlp_out"))
    norms: ClassVar[dict[str, str]] = {"attn_in": "self_attn_layer_norm", "mlp_in": "final_layer_norm"}
    norm_kind: ClassVar[str] = "layernorm"
    slice_layout: ClassVar[str | None] = "opt"
    pos_embed_path: ClassVar[str | None] = "model.decoder.embed_positions"
    attn_unused_kwargs: ClassVar[tuple[str, ...]] = ("use_cache",)

    def final_norm(self, model: nn.Module) -> nn.Module | None:
        return getattr(model.model.decoder, "final_layer_norm", None)

    def pre_head(self, model: nn.Module) -> nn.Module | None:
        """OPT-350m's ``project_out`` (hidden -> word embedding width), when the config has one."""
        return getattr(model.model.decoder, "project_out", None)


@dataclass
class GPT2Adapter(Adapter):
    """GPT-2: fused ``c_attn``; its ``Conv1D`` layers become equivalent ``nn.Linear``."""

    model_types: ClassVar[tuple[str, ...]] = ("gpt2",)
    layers_path: ClassVar[str] = "transformer.h"
    embed_path: ClassVar[str] = "transformer.wte"
    final_norm_path: ClassVar[str | None] = "transformer.ln_f"
    roles: ClassVar[tuple[Role, ...]] = (
        Role("qkv", "attn.c_attn", "attn_in"), Role("o", "attn.c_proj", "attn_out"),
        Role("fc1", "mlp.c_fc", "mlp_in"), Role("fc2", "mlp.c_proj", "mlp_out"))
    norms: ClassVar[dict[str, str]] = {"attn_in": "ln_1", "mlp_in": "ln_2"}
    norm_kind: ClassVar[str] = "layernorm"
    slice_layout: ClassVar[str | None] = "gpt2"
    attn_path: ClassVar[str] = "attn"
    pos_embed_path: ClassVar[str | None] = "transformer.wpe"
    attn_unused_kwargs: ClassVar[tuple[str, ...]] = ("encoder_hidden_states", "encoder_attention_mask")

    def prepare(self, model: nn.Module) -> nn.Module:
        for layer in self.layers(model):
            for r in self.roles:
                mod = get_submodule(layer, r.path)
                if not isinstance(mod, nn.Linear) and hasattr(mod, "nf"):  # transformers Conv1D
                    set_submodule(layer, r.path, conv1d_to_linear(mod))
        return model


def conv1d_to_linear(conv: nn.Module) -> nn.Linear:
    """GPT-2's Conv1D stores ``weight`` as (in, out); an exact ``nn.Linear`` equivalent."""
    n_in, n_out = conv.weight.shape
    lin = nn.Linear(n_in, n_out, bias=conv.bias is not None, device=conv.weight.device, dtype=conv.weight.dtype)
    with torch.no_grad():
        lin.weight.copy_(conv.weight.T)
        if conv.bias is not None:
            lin.bias.copy_(conv.bias)
    return lin


ADAPTERS: dict[str, type[Adapter]] = {}
for _cls in (LlamaAdapter, Gemma3Adapter, Phi3Adapter, OPTAdapter, GPT2Adapter):
    for _t in _cls.model_types:
        ADAPTERS[_t] = _cls


# wrappers whose text decoder one of the families above describes, refused with a clear reason
MULTIMODAL: dict[str, str] = {"gemma3": "Gemma 3's multimodal model (text-only Gemma 3 checkpoints are gemma3_text)"}


def supported_model_types() -> list[str]:
    return sorted(ADAPTERS)


def adapter_for(model_or_config) -> Adapter:
    """The adapter for a model (or its config), chosen by ``config.model_type``."""
    config = getattr(model_or_config, "config", model_or_config)
    mt = getattr(config, "model_type", None)
    if mt in MULTIMODAL:
        raise ValueError(f"model_type {mt!r} is {MULTIMODAL[mt]}, which RankLab does not support yet (its decoder "
                         f"sits inside a vision-language wrapper); supported: {', '.join(supported_model_types())}")
    cls = ADAPTERS.get(mt)
    if cls is None:
        raise ValueError(f"model_type {mt!r} is not supported by RankLab yet; supported: "
                         f"{', '.join(supported_model_types())}")
    return cls()
