"""Tests of compression.export: each translation is read back with the matching rules its tool
documents (restated here as small fixtures, each checked against the tool's own documented
example first) and must give every decoder linear exactly the plan's setting."""
from __future__ import annotations

import re
import shlex
import subprocess
import sys
import types

import pytest
import yaml

from analysis.adapters import LinearInfo
from compression.export import (
    EXPORTERS,
    Export,
    _llamacpp,
    _matches,
    _regexes,
    _verify,
    export_all,
    to_gptqmodel_dynamic,
    to_hqq_dynamic_config,
    to_llamacpp_tensor_types,
    to_llmcompressor_recipe,
    to_torchao_fqn_config,
)
from compression.plan import ModuleSpec, Plan, validate

LLAMA_ROLES = [("q", "self_attn.q_proj", "attn_in"), ("k", "self_attn.k_proj", "attn_in"),
               ("v", "self_attn.v_proj", "attn_in"), ("o", "self_attn.o_proj", "attn_out"),
               ("gate", "mlp.gate_proj", "mlp_in"), ("up", "mlp.up_proj", "mlp_in"),
               ("down", "mlp.down_proj", "mlp_out")]


def llama_linears(n_layers: int = 4, hidden: int = 64, inter: int = 128) -> list[LinearInfo]:
    shape = {"q": (hidden, hidden), "k": (hidden, hidden), "v": (hidden, hidden), "o": (hidden, hidden),
             "gate": (inter, hidden), "up": (inter, hidden), "down": (hidden, inter)}
    return [LinearInfo(f"model.layers.{i}.{path}", i, role, group, *shape[role])
            for i in range(n_layers) for role, path, group in LLAMA_ROLES]


def mixed_plan() -> Plan:
    """Layers 0-1: 4-bit g64 rtn; layer 2: 3-bit; layer 3 dense; layer 1 down_proj 8-bit;
    layer 0 q_proj low-rank + 4-bit; layer 2 up_proj low-rank only."""
    mods = {}
    for _, path, _ in LLAMA_ROLES:
        mods[f"model.layers.2.{path}"] = ModuleSpec(bits=3, group_size=64)
        mods[f"model.layers.3.{path}"] = ModuleSpec()
    mods["model.layers.1.mlp.down_proj"] = ModuleSpec(bits=8, group_size=64)
    mods["model.layers.0.self_attn.q_proj"] = ModuleSpec(rank=16, bits=4, group_size=64)
    mods["model.layers.2.mlp.up_proj"] = ModuleSpec(rank=32)
    return Plan(default=ModuleSpec(bits=4, group_size=64, quant="rtn"), modules=mods)


def expected_int(plan: Plan, name: str) -> tuple[int, int] | None:
    spec = plan.spec_for(name)
    return None if spec.bits is None else (spec.bits, spec.group_size)


@pytest.fixture
def lin() -> list[LinearInfo]:
    return llama_linears()


@pytest.fixture
def plan(lin) -> Plan:
    p = mixed_plan()
    validate(p, lin)  # the fixture plan is a legal RankLab plan
    return p


# ============================================================================ GPTQModel
# GPTQModel README, "QuantizeConfig.dynamic": regex keys; "+:" (or no prefix) = positive match whose dict
# overrides the base config, "-:" = negative match, module skipped. gptqmodel/quantization/config.py
# `dynamic_get` (and vLLM's gptq_utils.get_dynamic_override) re.match each key in dict order and the first
# matching key decides. The README's sample:
GPTQMODEL_DOC_DYNAMIC = {
    r"+:.*\.18\..*gate.*": {"bits": 4, "group_size": 32},
    r".*\.19\..*gate.*": {"bits": 8, "group_size": 64},
    r"-:.*\.20\..*gate.*": {},
    r"-:.*down.*": {},
}
GPTQMODEL_OVERRIDE_KEYS = {"bits", "group_size", "sym", "desc_act", "mse", "pack_dtype"}


def gptqmodel_resolve(cfg: dict, name: str) -> tuple[int, int] | None:
    for pattern, overrides in cfg["dynamic"].items():
        if pattern.startswith("-:"):
            if re.match(pattern.removeprefix("-:"), name):
                return None
        elif re.match(pattern.removeprefix("+:"), name):
            return (overrides.get("bits", cfg["bits"]), overrides.get("group_size", cfg["group_size"]))
    return (cfg["bits"], cfg["group_size"])


def test_gptqmodel_resolver_reads_the_documented_example():
    cfg = {"bits": 3, "group_size": 128, "dynamic": GPTQMODEL_DOC_DYNAMIC}
    assert gptqmodel_resolve(cfg, "model.layers.18.mlp.gate_proj") == (4, 32)
    assert gptqmodel_resolve(cfg, "model.layers.19.mlp.gate_proj") == (8, 64)
    assert gptqmodel_resolve(cfg, "model.layers.20.mlp.gate_proj") is None
    assert gptqmodel_resolve(cfg, "model.layers.5.mlp.down_proj") is None
    assert gptqmodel_resolve(cfg, "model.layers.5.self_attn.q_proj") == (3, 128)


def test_gptqmodel_dynamic_reproduces_plan(plan, lin):
    notes: list[str] = []
    cfg = to_gptqmodel_dynamic(plan, lin, notes)
    assert (cfg["bits"], cfg["group_size"]) == (4, 64)  # the most common setting is the base
    assert cfg["sym"] is False  # RankLab rtn/gptq grids are asymmetric
    for key, val in cfg["dynamic"].items():
        assert key[:2] in ("+:", "-:")
        assert (val == {}) if key.startswith("-:") else set(val) <= GPTQMODEL_OVERRIDE_KEYS
        re.compile(key[2:])
    for li in lin:
        assert gptqmodel_resolve(cfg, li.name) == expected_int(plan, li.name), li.name
    # order-independence: every module is selected by at most one key
    for li in lin:
        assert sum(_matches(k, li.name) for k in cfg["dynamic"]) <= 1
    assert len(cfg["dynamic"]) < len(lin) // 2  # runs were merged into compact regexes
    assert any("2 low-rank modules" in n and "rank" in n for n in notes)
    assert any("GPTQ" in n and "rtn" in n for n in notes)


def test_gptqmodel_does_not_touch_other_modules(plan, lin):
    cfg = to_gptqmodel_dynamic(plan, lin)
    for other in ("lm_head", "model.embed_tokens", "model.layers.0.input_layernorm",
                  "model.layers.10.self_attn.q_proj", "model.layers.2.self_attn.q_proj.lora_A"):
        assert not any(_matches(k, other) for k in cfg["dynamic"]), other


def test_gptqmodel_layer_indices_do_not_alias():
    lin = llama_linears(12)
    plan = Plan(default=ModuleSpec(bits=4, group_size=64),
                modules={f"model.layers.{i}.{p}": ModuleSpec(bits=3, group_size=64)
                         for i in (1, 10) for _, p, _ in LLAMA_ROLES})
    cfg = to_gptqmodel_dynamic(plan, lin)
    for li in lin:
        assert gptqmodel_resolve(cfg, li.name) == expected_int(plan, li.name), li.name


# ============================================================================ llm-compressor
# A recipe as llm-compressor writes it (recipe.yaml of neuralmagic/Phi-3-medium-128k-instruct-quantized.w4a16
# on the Hugging Face Hub), and compressed-tensors' matching (utils/match.py, match_named_modules): a module in
# `ignore` is skipped; a target matches when it equals the module name, is "re:" + a regex that re.match-es the
# name, or names a class in the module's MRO (e.g. "Linear"). QuantizationArgs fields: num_bits, type (int |
# float), symmetric, group_size, strategy (tensor | channel | group | block | token | tensor_group), ...
LLMCOMPRESSOR_DOC_RECIPE = """
quant_stage:
  quant_modifiers:
    GPTQModifier:
      sequential_update: false
      dampening_frac: 0.01
      block_size: 128
      ignore: [lm_head]
      config_groups:
        group_0:
          targets: [Linear]
          weights: {num_bits: 4, type: int, symmetric: true, strategy: group, group_size: 128}
"""
CT_ARGS = {"num_bits", "type", "symmetric", "group_size", "strategy", "block_structure", "dynamic", "actorder",
           "observer", "observer_kwargs"}
CT_STRATEGIES = {"tensor", "channel", "group", "block", "token", "tensor_group"}


def ct_match(target: str, name: str, cls: str = "Linear") -> bool:
    if target.startswith("re:"):
        return re.match(target.removeprefix("re:"), name) is not None
    return target == name or target == cls


def ct_resolve(modifier: dict, name: str, cls: str = "Linear"):
    if any(ct_match(t, name, cls) for t in modifier.get("ignore", [])):
        return "ignored"
    hits = [g["weights"] for g in modifier["config_groups"].values()
            if any(ct_match(t, name, cls) for t in g["targets"])]
    assert len(hits) <= 1, f"{name} matched by {len(hits)} config groups"
    return hits[0] if hits else None


def _modifier(recipe: dict) -> tuple[str, dict]:
    mods = recipe["quant_stage"]["quant_modifiers"]
    assert len(mods) == 1
    return next(iter(mods.items()))


def test_ct_resolver_reads_the_documented_recipe():
    name, mod = _modifier(yaml.safe_load(LLMCOMPRESSOR_DOC_RECIPE))
    assert name == "GPTQModifier"
    assert ct_resolve(mod, "lm_head") == "ignored"
    assert ct_resolve(mod, "model.layers.0.mlp.down_proj")["num_bits"] == 4


def test_llmcompressor_recipe_reproduces_plan(plan, lin):
    notes: list[str] = []
    text = to_llmcompressor_recipe(plan, lin, notes)
    recipe = yaml.safe_load(text)
    name, mod = _modifier(recipe)
    assert name == "QuantizationModifier"  # the plan's methods are rtn
    assert "lm_head" in mod["ignore"]
    assert set(mod) >= {"ignore", "config_groups"}
    for group in mod["config_groups"].values():
        assert set(group) == {"targets", "weights"}
        assert all(t.startswith("re:") for t in group["targets"])
        assert set(group["weights"]) <= CT_ARGS and group["weights"]["strategy"] in CT_STRATEGIES
        assert group["weights"]["type"] in ("int", "float")
    for li in lin:
        got, want = ct_resolve(mod, li.name), expected_int(plan, li.name)
        if want is None:
            assert got == "ignored", li.name
        else:
            assert got == {"num_bits": want[0], "type": "int", "symmetric": False, "strategy": "group",
                           "group_size": want[1]}, li.name
    assert ct_resolve(mod, "lm_head") == "ignored"
    assert ct_resolve(mod, "model.embed_tokens", cls="Embedding") is None
    assert any("2 low-rank modules" in n for n in notes)
    assert all(f"# note: {n}" in text for n in notes)


def test_llmcompressor_uses_gptqmodifier_and_fp8_channel(lin):
    plan = Plan(default=ModuleSpec(bits=4, group_size=64, quant="gptq"),
                modules={"model.layers.0.mlp.down_proj": ModuleSpec(bits=8, quant="fp8"),
                         "model.layers.1.mlp.down_proj": ModuleSpec(bits=4, group_size=64, quant="rtn")})
    validate(plan, lin)
    notes: list[str] = []
    name, mod = _modifier(yaml.safe_load(to_llmcompressor_recipe(plan, lin, notes)))
    assert name == "GPTQModifier"
    assert mod["dampening_frac"] == 0.01 and mod["block_size"] == 128
    assert ct_resolve(mod, "model.layers.0.mlp.down_proj") == {
        "num_bits": 8, "type": "float", "symmetric": True, "strategy": "channel"}
    assert ct_resolve(mod, "model.layers.3.self_attn.q_proj")["num_bits"] == 4
    assert any("GPTQModifier" in n for n in notes)


# ============================================================================ HQQ
# transformers docs, quantization/hqq ("specific layers only"): HqqConfig(dynamic_config={tag: {"nbits",
# "group_size"}}) where a tag is the module path inside the layer; transformers/integrations/hqq.py:
# name_to_linear_tag drops "model", "layers" and numeric parts (model.layers.31.self_attn.k_proj ->
# self_attn.k_proj); a tag missing from dynamic_config is not quantised; nbits in (8, 4, 3, 2, 1).
HQQ_DOC_DYNAMIC = {
    "self_attn.q_proj": {"nbits": 4, "group_size": 64}, "self_attn.k_proj": {"nbits": 4, "group_size": 64},
    "self_attn.v_proj": {"nbits": 4, "group_size": 64}, "self_attn.o_proj": {"nbits": 4, "group_size": 64},
    "mlp.gate_proj": {"nbits": 3, "group_size": 32}, "mlp.up_proj": {"nbits": 3, "group_size": 32},
    "mlp.down_proj": {"nbits": 3, "group_size": 32},
}


def hqq_tag(name: str) -> str:
    return ".".join(n for n in name.split(".") if n not in ("model", "layers") and not n.isnumeric())


def hqq_resolve(config: dict, name: str) -> tuple[int, int] | None:
    """transformers' prepare_for_hqq_linear: dict.fromkeys(linear tags) updated with the dynamic config."""
    c = config.get(hqq_tag(name))
    return None if c is None else (c["nbits"], c["group_size"])


def _check_hqq_shape(config: dict, lin: list[LinearInfo]) -> None:
    tags = {hqq_tag(li.name) for li in lin}
    assert set(HQQ_DOC_DYNAMIC) == tags  # the doc's tags are this model's tags
    for tag, c in config.items():
        assert tag in tags
        # transformers hands each entry to hqq's BaseQuantizeConfig as it is (its axis=1 default applies only
        # without dynamic_config), whose own default axis=0 groups along the outputs: axis 1 must be written
        assert set(c) == set(next(iter(HQQ_DOC_DYNAMIC.values()))) | {"axis"} and c["axis"] == 1
        assert c["nbits"] in (8, 4, 3, 2, 1)
        assert c["group_size"] > 0


def _never_coarser(got: tuple[int, int] | None, want: tuple[int, int] | None) -> bool:
    if got is None:
        return True
    return want is not None and (got[0] > want[0] or (got[0] == want[0] and got[1] <= want[1]))


def test_hqq_dense_layer_keeps_tag_dense(plan, lin):
    notes: list[str] = []
    config = to_hqq_dynamic_config(plan, lin, notes)
    _check_hqq_shape(config, lin)
    assert config == {}  # layer 3 is dense, so every tag stays dense
    assert sum("varies across layers" in n and "per tag" in n for n in notes) == 7
    assert any("empty dynamic_config" in n for n in notes)
    assert any("2 low-rank modules" in n for n in notes)


def test_hqq_picks_the_least_aggressive_setting_per_tag(lin):
    plan = Plan(default=ModuleSpec(bits=4, group_size=64),
                modules={**{f"model.layers.2.{p}": ModuleSpec(bits=3, group_size=32) for _, p, _ in LLAMA_ROLES},
                         "model.layers.1.mlp.down_proj": ModuleSpec(bits=8, group_size=64),
                         "model.layers.0.self_attn.k_proj": ModuleSpec(bits=4, group_size=32)})
    notes: list[str] = []
    config = to_hqq_dynamic_config(plan, lin, notes)
    _check_hqq_shape(config, lin)
    assert config["mlp.down_proj"] == {"nbits": 8, "group_size": 64, "axis": 1}
    assert config["self_attn.k_proj"] == {"nbits": 4, "group_size": 32, "axis": 1}  # same bits, finer group
    assert config["self_attn.q_proj"] == {"nbits": 4, "group_size": 64, "axis": 1}
    for li in lin:
        assert _never_coarser(hqq_resolve(config, li.name), expected_int(plan, li.name)), li.name
    assert any("mlp.down_proj varies" in n for n in notes)


def test_hqq_keep_dense_false_quantises_the_tag(plan, lin):
    notes: list[str] = []
    config = to_hqq_dynamic_config(plan, lin, notes, keep_dense=False)
    assert config["mlp.down_proj"] == {"nbits": 8, "group_size": 64, "axis": 1}
    assert config["self_attn.q_proj"] == {"nbits": 4, "group_size": 64, "axis": 1}
    assert any("dense in layer 3 but quantised" in n for n in notes)


def test_hqq_tags_follow_transformers_rule_for_gpt2():
    lin = [LinearInfo(f"transformer.h.{i}.{p}", i, r, g, 64, 64) for i in range(2)
           for r, p, g in [("qkv", "attn.c_attn", "attn_in"), ("fc2", "mlp.c_proj", "mlp_out")]]
    config = to_hqq_dynamic_config(Plan(default=ModuleSpec(bits=4, group_size=32)), lin)
    assert set(config) == {"transformer.h.attn.c_attn", "transformer.h.mlp.c_proj"}


# ============================================================================ torchao
# torchao docs, torchao.quantization.FqnToConfig: an ordered dict from (1) a module/parameter FQN, (2) "re:" +
# a regex that must fully match, or (3) "_default", to an AOBaseConfig or None; exact FQNs take precedence.
# Config names checked in the torchao API reference: Int4WeightOnlyConfig(group_size in 32/64/128/256),
# IntxWeightOnlyConfig(weight_dtype=torch.intN (1..8), granularity=PerGroup(g) | PerAxis(0),
# mapping_type=MappingType.ASYMMETRIC | SYMMETRIC), Float8WeightOnlyConfig(), all exported by torchao.quantization.
class _Cfg:
    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs

    def __eq__(self, other):
        return type(self) is type(other) and (self.args, self.kwargs) == (other.args, other.kwargs)

    def __repr__(self):
        return f"{type(self).__name__}{self.args}{self.kwargs}"


def _stub_torchao(monkeypatch, with_fqn: bool = True) -> types.ModuleType:
    q = types.ModuleType("torchao.quantization")
    for cls in ("Int4WeightOnlyConfig", "Int8WeightOnlyConfig", "IntxWeightOnlyConfig", "Float8WeightOnlyConfig",
                "PerGroup", "PerAxis", "ModuleFqnToConfig"):
        setattr(q, cls, type(cls, (_Cfg,), {}))
    if with_fqn:
        q.FqnToConfig = type("FqnToConfig", (_Cfg,), {})
    q.MappingType = types.SimpleNamespace(ASYMMETRIC="ASYMMETRIC", SYMMETRIC="SYMMETRIC")
    pkg = types.ModuleType("torchao")
    pkg.quantization = q
    monkeypatch.setitem(sys.modules, "torchao", pkg)
    monkeypatch.setitem(sys.modules, "torchao.quantization", q)
    return q


def _run_torchao(text: str) -> dict:
    ns: dict = {}
    exec(compile(text, "torchao_fqn_config.py", "exec"), ns)
    return ns


def test_torchao_text_builds_fqn_config(plan, lin, monkeypatch):
    import torch

    notes: list[str] = []
    text = to_torchao_fqn_config(plan, lin, notes)
    compile(text, "torchao_fqn_config.py", "exec")
    q = _stub_torchao(monkeypatch)
    cfg = _run_torchao(text)["quant_config"]
    assert type(cfg).__name__ == "FqnToConfig"
    mapping = cfg.args[0]
    assert list(mapping) == [li.name for li in lin]  # exact FQNs, no regex or _default keys
    for li in lin:
        want, got = expected_int(plan, li.name), mapping[li.name]
        if want is None:
            assert got is None, li.name
        elif want[0] == 4:
            assert got == q.Int4WeightOnlyConfig(group_size=want[1]), li.name
        else:
            assert got == q.IntxWeightOnlyConfig(weight_dtype=getattr(torch, f"int{want[0]}"),
                                                 granularity=q.PerGroup(want[1]),
                                                 mapping_type="ASYMMETRIC"), li.name
    assert any("2 low-rank modules" in n for n in notes)


def test_torchao_falls_back_to_module_fqn_to_config(plan, lin, monkeypatch):
    _stub_torchao(monkeypatch, with_fqn=False)
    cfg = _run_torchao(to_torchao_fqn_config(plan, lin))["quant_config"]
    assert type(cfg).__name__ == "ModuleFqnToConfig"


def test_torchao_fp8_and_mxfp4(lin, monkeypatch):
    plan = Plan(default=ModuleSpec(bits=8, quant="fp8"),
                modules={"model.layers.0.mlp.up_proj": ModuleSpec(bits=4, quant="mxfp4")})
    notes: list[str] = []
    text = to_torchao_fqn_config(plan, lin, notes)
    q = _stub_torchao(monkeypatch)
    mapping = _run_torchao(text)["quant_config"].args[0]
    assert mapping["model.layers.1.self_attn.q_proj"] == q.Float8WeightOnlyConfig()
    assert mapping["model.layers.0.mlp.up_proj"] == q.Int4WeightOnlyConfig(group_size=32)
    assert any("mxfp4" in n for n in notes)


# ============================================================================ llama.cpp
# llama-quantize --help: "--tensor-type TENSOR=TYPE: quantize this tensor to this ggml_type. example:
# --tensor-type attn_q=q8_0", may be given several times. tools/quantize/quantize.cpp parse_tensor_type splits
# at the first '=', lower-cases the name, and parses the type case-insensitively against ggml type names;
# src/llama-quant.cpp std::regex_search-es each pattern on GGUF tensor names (blk.N.attn_q.weight ...).
LLAMACPP_DOC_EXAMPLE = ["--tensor-type", "attn_q=q8_0"]
GGML_TYPE_NAMES = {"f32", "f16", "bf16", "q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "q2_k", "q3_k", "q4_k", "q5_k",
                   "q6_k", "iq2_xxs", "iq2_xs", "iq3_xxs", "iq1_s", "iq4_nl", "iq3_s", "iq2_s", "iq4_xs", "iq1_m",
                   "tq1_0", "tq2_0", "mxfp4"}
GGUF_OF_ROLE = {"q": "attn_q", "k": "attn_k", "v": "attn_v", "o": "attn_output", "gate": "ffn_gate",
                "up": "ffn_up", "down": "ffn_down"}


def llamacpp_overrides(argv: list[str]) -> list[tuple[str, str]]:
    assert len(argv) % 2 == 0
    out = []
    for flag, arg in zip(argv[::2], argv[1::2], strict=True):
        assert flag == "--tensor-type"
        name, sep, qtype = arg.partition("=")
        assert sep and name and qtype and qtype.lower() in GGML_TYPE_NAMES, arg
        out.append((name.lower(), qtype.lower()))
    return out


def llamacpp_resolve(overrides: list[tuple[str, str]], tensor: str) -> str | None:
    hits = [t for pattern, t in overrides if re.search(pattern, tensor)]
    assert len(hits) <= 1, f"{tensor} matched by {len(hits)} patterns"  # so first/last-match rules agree
    return hits[0] if hits else None


def gguf_tensors(n_layers: int) -> list[str]:
    names = ["token_embd.weight", "output_norm.weight", "output.weight"]
    for i in range(n_layers):
        names += [f"blk.{i}.{t}.weight" for t in ("attn_norm", "ffn_norm", *GGUF_OF_ROLE.values())]
    return names


def test_llamacpp_parser_reads_the_documented_example():
    ov = llamacpp_overrides(LLAMACPP_DOC_EXAMPLE)
    assert llamacpp_resolve(ov, "blk.7.attn_q.weight") == "q8_0"
    assert llamacpp_resolve(ov, "blk.7.attn_k.weight") is None


def test_llamacpp_tensor_types_reproduce_plan(plan, lin):
    notes: list[str] = []
    argv = to_llamacpp_tensor_types(plan, lin, notes)
    ov = llamacpp_overrides(argv)
    assert all(p == p.lower() and "=" not in p for p, _ in ov)  # survives llama.cpp's lower-casing
    gguf_type = {4: "q4_1", 3: "q3_k", 8: "q8_0", None: "f16"}  # rows of 64/128: no 4-bit k-quant
    want = {f"blk.{li.layer}.{GGUF_OF_ROLE[li.role]}.weight":
            gguf_type[None if (e := expected_int(plan, li.name)) is None else e[0]] for li in lin}
    for tensor in gguf_tensors(4):
        assert llamacpp_resolve(ov, tensor) == want.get(tensor), tensor
    assert any("2 low-rank modules" in n for n in notes)
    assert any("q3_k" in n and "256" in n for n in notes)  # k-quant rows too narrow: llama.cpp falls back


def test_llamacpp_k_quants_for_wide_rows_and_special_methods():
    lin = llama_linears(2, hidden=256, inter=512)
    plan = Plan(default=ModuleSpec(bits=4, group_size=128),
                modules={"model.layers.0.self_attn.q_proj": ModuleSpec(bits=8, quant="fp8"),
                         "model.layers.0.self_attn.k_proj": ModuleSpec(bits=2, quant="ternary", group_size=64),
                         "model.layers.0.self_attn.v_proj": ModuleSpec(bits=1, quant="binary", group_size=64),
                         "model.layers.0.self_attn.o_proj": ModuleSpec(bits=4, quant="mxfp4"),
                         "model.layers.1.mlp.up_proj": ModuleSpec(bits=2, group_size=64)})
    validate(plan, lin)
    notes: list[str] = []
    ov = llamacpp_overrides(to_llamacpp_tensor_types(plan, lin, notes))
    assert llamacpp_resolve(ov, "blk.0.attn_q.weight") == "q8_0"
    assert llamacpp_resolve(ov, "blk.0.attn_k.weight") == "tq2_0"
    assert llamacpp_resolve(ov, "blk.0.attn_v.weight") == "tq1_0"
    assert llamacpp_resolve(ov, "blk.0.attn_output.weight") == "mxfp4"
    assert llamacpp_resolve(ov, "blk.1.ffn_up.weight") == "q2_k"
    assert llamacpp_resolve(ov, "blk.1.ffn_down.weight") == "q4_k"
    joined = " ".join(notes)
    assert "fp8" in joined and "q8_0" in joined and "tq1_0" in joined and "tq2_0" in joined and "mxfp4" in joined


def test_llamacpp_fused_roles_map_to_gguf_names():
    lin = [LinearInfo(f"model.layers.0.{p}", 0, r, g, 64, 64) for r, p, g in
           [("qkv", "self_attn.qkv_proj", "attn_in"), ("o", "self_attn.o_proj", "attn_out"),
            ("gate_up", "mlp.gate_up_proj", "mlp_in"), ("down", "mlp.down_proj", "mlp_out")]]
    ov = llamacpp_overrides(to_llamacpp_tensor_types(Plan(default=ModuleSpec(bits=8, group_size=32)), lin))
    for t in ("attn_qkv", "attn_output", "ffn_up", "ffn_down"):
        assert llamacpp_resolve(ov, f"blk.0.{t}.weight") == "q8_0"


def test_llamacpp_script_quotes_the_patterns(plan, lin):
    text = export_all(plan, lin)["llama.cpp"].text
    assert subprocess.run(["sh", "-n"], input=text, text=True).returncode == 0
    cmd = " ".join(line.rstrip("\\").strip() for line in text.splitlines() if not line.startswith("#"))
    tokens = shlex.split(cmd)
    assert tokens[0] == "llama-quantize" and "--leave-output-tensor" in tokens
    pairs = [tokens[i + 1] for i, tok in enumerate(tokens) if tok == "--tensor-type"]
    assert pairs == to_llamacpp_tensor_types(plan, lin)[1::2]  # backslashes and parentheses survive the shell


# ============================================================================ registry, helpers
def test_export_all_returns_every_tool_with_rank_notes(plan, lin):
    out = export_all(plan, lin)
    assert set(out) == set(EXPORTERS)
    for tool, exp in out.items():
        assert isinstance(exp, Export) and exp.tool == tool and exp.filename and exp.text
        assert any("ranks dropped" in n and "2 low-rank modules" in n for n in exp.notes), tool
        assert not any("tuning" in n for n in exp.notes), tool
    from dataclasses import replace

    from compression.plan import TuneOptions

    for tool, exp in export_all(replace(plan, tune=TuneOptions(steps=7)), lin).items():
        assert any("block-wise tuning (7 steps per layer) is not exported" in n for n in exp.notes), tool


def test_quantisers_with_nothing_to_quantise_write_no_file(plan, lin):
    """A rank-only plan gives every quantisation tool nothing to do: not usable, a note says so."""
    # the mixed plan quantises some linears, but no HQQ tag in every layer (a tag is one setting for all layers)
    assert {t for t, e in export_all(plan, lin).items() if not e.usable} == {"hqq"}
    rank_only = Plan(default=ModuleSpec(rank=8, lowrank="svd-llm"))
    out = export_all(rank_only, lin)
    assert {t for t, e in out.items() if not e.usable} == set(EXPORTERS)
    for tool in ("gptqmodel", "llm-compressor", "torchao", "llama.cpp"):
        assert any(f"nothing for {tool} to do (no file written)" in n for n in out[tool].notes), tool
    assert any("skip HQQ" in n for n in out["hqq"].notes)


def test_binary_and_ternary_notes_everywhere(lin):
    plan = Plan(default=ModuleSpec(bits=2, quant="ternary", group_size=64),
                modules={"model.layers.0.mlp.down_proj": ModuleSpec(bits=1, quant="binary", group_size=64)})
    for tool, exp in export_all(plan, lin).items():
        text = " ".join(exp.notes)
        assert "ternary" in text and "binary" in text, tool
    cfg = to_gptqmodel_dynamic(plan, lin)
    assert all(gptqmodel_resolve(cfg, li.name) == (2, 64) for li in lin)  # never below the plan's code width


def test_matches_and_verify():
    assert _matches(r"+:^model\.layers\.(1|10)\.mlp\.up_proj$", "model.layers.10.mlp.up_proj")
    assert not _matches(r"-:^model\.layers\.(1|10)\.mlp\.up_proj$", "model.layers.100.mlp.up_proj")
    assert _matches(r"re:^lm_head$", "lm_head", "fullmatch")
    assert _matches(r"^blk\.0\.attn_q\.weight$", "blk.0.attn_q.weight", "search")
    rx = _regexes([("model.layers", 1, "mlp.up_proj", "model.layers.1.mlp.up_proj"),
                   ("model.layers", 10, "mlp.up_proj", "model.layers.10.mlp.up_proj"),
                   ("model.layers", 1, "mlp.down_proj", "model.layers.1.mlp.down_proj")])
    assert len(rx) == 2
    with pytest.raises(RuntimeError, match="does not reproduce"):
        _verify("x", {"a": 1}, lambda n: 2)


# ============================================================================ serving-side names, ragged groups
def test_gptqmodel_keys_also_name_vllms_fused_layers(plan, lin):
    """vLLM looks a fused layer's setting up by its own name (``qkv_proj``, ``gate_up_proj``,
    vllm gptq_utils.get_dynamic_override), with the same first-match rule."""
    notes: list[str] = []
    cfg = to_gptqmodel_dynamic(plan, lin, notes)
    assert gptqmodel_resolve(cfg, "model.layers.2.self_attn.qkv_proj") == (3, 64)  # q/k/v all 3-bit
    assert gptqmodel_resolve(cfg, "model.layers.3.self_attn.qkv_proj") is None  # all dense: skipped
    assert gptqmodel_resolve(cfg, "model.layers.3.mlp.gate_up_proj") is None
    assert gptqmodel_resolve(cfg, "model.layers.1.mlp.gate_up_proj") == (4, 64)  # the base
    for li in lin:  # the members still resolve to the plan
        assert gptqmodel_resolve(cfg, li.name) == expected_int(plan, li.name), li.name
    # layer 2: gate is 3-bit while up is rank-only (dense bits): no fused key, and a note says vLLM cannot fuse
    assert not any(_matches(k, "model.layers.2.mlp.gate_up_proj") for k in cfg["dynamic"])
    assert any("layer 2 gives different settings" in n for n in notes)
    assert cfg["meta"] == {"producer": "RankLab", "ranklab_notes": notes}  # the file says what it lost


def test_ragged_groups_are_named_for_every_tool_that_carries_groups():
    lin = llama_linears(2, hidden=96, inter=192)  # 96 inputs: group 64 leaves a ragged last group
    plan = Plan(default=ModuleSpec(bits=4, group_size=64))
    out = export_all(plan, lin)
    for tool in ("gptqmodel", "llm-compressor", "hqq", "torchao"):
        ragged = [n for n in out[tool].notes if "does not divide their input width" in n]
        assert len(ragged) == 1 and "12 modules" in ragged[0] and "96 inputs, group 64" in ragged[0], tool
    assert "torchao refuses them" in " ".join(out["torchao"].notes)
    assert not any("does not divide" in n for n in out["llama.cpp"].notes)  # GGUF types fix their own blocks
    even = export_all(Plan(default=ModuleSpec(bits=4, group_size=32)), lin)
    assert not any("does not divide" in n for e in even.values() for n in e.notes)


def test_llmcompressor_says_vllm_serves_zero_point_ints_at_4_and_8_bits_only(plan, lin):
    notes: list[str] = []
    to_llmcompressor_recipe(plan, lin, notes)
    assert any("3-bit asymmetric int weights are produced" in n for n in notes)
    four: list[str] = []
    to_llmcompressor_recipe(Plan(default=ModuleSpec(bits=4, group_size=64)), lin, four)
    assert not any("vLLM serves" in n for n in four)


def test_hqq_method_notes_describe_what_was_exported(lin):
    # layer 1 down_proj ternary, but the tag's other layers are 4-bit: the tag exports 4-bit, and the ternary
    # layer is covered by the tag's note, not by a "ternary exported as 2-bit" note
    plan = Plan(default=ModuleSpec(bits=4, group_size=64),
                modules={"model.layers.1.mlp.down_proj": ModuleSpec(bits=2, quant="ternary", group_size=64)})
    notes: list[str] = []
    config = to_hqq_dynamic_config(plan, lin, notes)
    assert config["mlp.down_proj"] == {"nbits": 4, "group_size": 64, "axis": 1}
    assert not any("ternary module" in n for n in notes)
    assert any("mlp.down_proj varies across layers" in n for n in notes)


def test_llamacpp_base_type_fits_every_row_so_old_builds_keep_the_overrides():
    lin = llama_linears(2, hidden=96, inter=192)  # rows of 96 / 192: no k-quant block fits
    notes: list[str] = []
    rules, base = _llamacpp(Plan(default=ModuleSpec(bits=3, group_size=32)), lin, notes, "f16")
    assert base == "Q8_0" and any("base file type is Q8_0 instead of Q3_K_M" in n for n in notes)
    wide = llama_linears(2, hidden=256, inter=512)
    _, base_wide = _llamacpp(Plan(default=ModuleSpec(bits=3, group_size=32)), wide, [], "f16")
    assert base_wide == "Q3_K_M"
    text = export_all(Plan(default=ModuleSpec(bits=3, group_size=32)), lin)["llama.cpp"].text
    assert text.rstrip().endswith('"$1" "$2" Q8_0') and "--pure" not in text


def test_vq_is_exported_as_integers_of_its_width_with_a_note_everywhere(lin):
    plan = Plan(default=ModuleSpec(bits=3, quant="vq", group_size=64))
    for tool, exp in export_all(plan, lin).items():
        assert any("vq module" in n and "no vector-quantised (codebook) format" in n for n in exp.notes), tool
    cfg = to_gptqmodel_dynamic(plan, lin)
    assert all(gptqmodel_resolve(cfg, li.name) == (3, 128) for li in lin)  # same width, never fewer bits


def test_half_bit_vq_is_exported_one_step_wider(lin):
    """2.5-bit vq has no integer grid of its width: it goes out as 3 bits, never 2."""
    half = Plan(default=ModuleSpec(bits=2.5, quant="vq", group_size=64))
    assert all(gptqmodel_resolve(to_gptqmodel_dynamic(half, lin), li.name) == (3, 128) for li in lin)
    assert any("3 bits for 2.5" in n for n in export_all(half, lin)["gptqmodel"].notes)
