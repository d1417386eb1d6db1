"""Export a RankLab plan to the per-layer configuration formats of batch quantisation tools,
so a budget picked in RankLab can be run at scale elsewhere.

Pure functions over ``(plan, linears)``; none of the tools is imported. Each translator
takes an optional ``notes`` list and appends what the target tool cannot express (ranks are
always dropped: none of these tools stores low-rank factors). Every emitted pattern is anchored
(``^...$``) on one module or tensor name set, and each translator checks before returning that
every decoder linear is matched by exactly the setting intended for it (``RuntimeError`` if not).

=================  ==========================================================================
tool               output
=================  ==========================================================================
GPTQModel          ``QuantizeConfig`` kwargs: base ``bits``/``group_size``/``sym`` + ``dynamic``
                   (``"+:regex"`` overrides, ``"-:regex"`` skips; first matching key decides)
llm-compressor     recipe YAML: ``QuantizationModifier`` (``GPTQModifier`` when the plan uses
                   gptq) with one ``config_groups`` entry per setting, ``re:`` targets, ``ignore``
HQQ                ``HqqConfig(dynamic_config=...)``: ``{linear tag: {nbits, group_size, axis}}``
torchao            Python source building ``FqnToConfig({fqn: config | None})``
llama.cpp          ``llama-quantize`` argv: ``["--tensor-type", "REGEX=type", ...]``
=================  ==========================================================================

Method mapping (where a tool has no exact equivalent, the nearest setting that is *not* more
aggressive is used and a note says so): rtn/gptq are asymmetric per-group integer grids (vq, which
no tool stores, becomes the integer grid of its width, group 128);
binary/ternary become 2-bit asymmetric integers (llama.cpp: ``tq1_0``/``tq2_0``); fp8 is E4M3
with one scale per output row; mxfp4 is E2M1 with a power-of-two scale per 32 inputs.
"""
from __future__ import annotations

import json
import math
import re
import shlex
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from compression.configs import GPTQConfig

if TYPE_CHECKING:  # keep this module free of torch at import time
    from analysis.adapters import LinearInfo
    from compression.plan import ModuleSpec, Plan


@dataclass(frozen=True)
class Export:
    """One tool's translation of a plan: the file to write and what it could not express."""

    tool: str
    filename: str
    text: str
    notes: list[str] = field(default_factory=list)
    usable: bool = True  # False: the plan gives this tool nothing to do (its notes say why); write no file


# ----------------------------------------------------------------------------- common
@dataclass(frozen=True)
class _Want:
    """What the plan asks of one module's weight, tool-independently."""

    kind: str  # "int" | "fp8" | "mxfp4"
    bits: int
    group: int  # inputs per scale; 0 = one scale per output row
    method: str  # the plan's quant method (rtn, gptq, binary, ternary, fp8, mxfp4)


def _want(spec: ModuleSpec) -> _Want | None:
    """``None`` keeps the weight dense (no bits; a rank alone is dropped by every tool)."""
    if spec.bits is None:
        return None
    q = spec.quant
    if q in ("rtn", "gptq"):
        return _Want("int", spec.bits, spec.group_size, q)
    if q in ("binary", "ternary"):  # nearest affine grid that is not coarser: 2-bit
        return _Want("int", 2, spec.group_size, q)
    if q == "fp8":
        return _Want("fp8", 8, 0, q)
    if q == "mxfp4":
        return _Want("mxfp4", 4, 32, q)
    if q == "vq":  # no tool stores codebooks: the integer grid of the same width (2.5 bits: 3, not coarser)
        return _Want("int", math.ceil(spec.bits), 128, q)
    raise ValueError(f"unknown quantisation method {q!r} in the plan")


def _wants(plan: Plan, linears: list[LinearInfo]) -> dict[str, _Want | None]:
    return {li.name: _want(plan.spec_for(li.name)) for li in linears}


def _sink(notes: list[str] | None) -> list[str]:
    return notes if notes is not None else []


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _common_notes(plan: Plan, linears: list[LinearInfo], tool: str, notes: list[str]) -> None:
    """Notes every tool shares: dropped ranks, plan features no tool expresses."""
    specs = [plan.spec_for(li.name) for li in linears]
    ranked = [s for s in specs if s.rank is not None]
    if ranked:
        rank_only = sum(s.bits is None for s in ranked)
        notes.append(
            f"{tool}: low-rank ranks dropped for {_plural(len(ranked), 'low-rank module')} ({tool} has no "
            f"low-rank factorisation): {len(ranked) - rank_only} keep their bits on the full-rank weight, "
            f"{rank_only} stay dense; the exported size is larger than the plan's")
    if plan.slicegpt is not None:
        notes.append(f"{tool}: SliceGPT slicing ({plan.slicegpt.slice_fraction:.0%}) is not exported")
    if plan.tuned:
        notes.append(f"{tool}: RankLab's block-wise tuning ({plan.tune.steps} steps per layer) is not exported: "
                     f"{tool} quantises the weights without it (export the compressed model itself to keep it)")
    vq = [s for s in specs if s.bits is not None and s.quant == "vq"]
    if vq:
        notes.append(f"{tool}: {_plural(len(vq), 'vq module')}: no vector-quantised (codebook) format; exported as "
                     f"asymmetric integers of the same width (3 bits for 2.5), group 128, which lose more than vq at "
                     f"the same bits (one bit more is closer; or export the compressed model itself)")
    known = {li.name for li in linears}
    unknown = [k for k in plan.modules if k not in known]
    if unknown:
        notes.append(f"{tool}: {_plural(len(unknown), 'plan entry')} name no decoder linear and were ignored "
                     f"(e.g. {unknown[0]})")


def _method_notes(wants: dict[str, _Want | None], tool: str, how: dict[str, str], notes: list[str]) -> None:
    """One note per plan method the tool only approximates, with the module count."""
    counts = Counter(w.method for w in wants.values() if w is not None)
    for method, text in how.items():
        if counts.get(method):
            notes.append(f"{tool}: {_plural(counts[method], method + ' module')}: {text}")


def _split(name: str, layer: int) -> tuple[str, str] | None:
    """``model.layers.3.self_attn.q_proj`` -> (``model.layers``, ``self_attn.q_proj``)."""
    m = re.match(rf"^(.+?)\.{layer}\.(.+)$", name)
    return (m.group(1), m.group(2)) if m else None


def _alt(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else "(" + "|".join(parts) + ")"


def _regexes(items: Iterable[tuple[str | None, int, str, str]]) -> list[str]:
    """Compact anchored regexes over ``(prefix, layer, path, full_name)`` items that share one
    setting: one regex per prefix and layer set, alternating the paths that share that layer set,
    e.g. ``^model\\.layers\\.(0|1)\\.(self_attn\\.q_proj|mlp\\.up_proj)$``. Items whose name does
    not split as prefix.layer.path (``prefix`` None) get an exact regex."""
    tree: dict[str, dict[str, set[int]]] = defaultdict(lambda: defaultdict(set))
    exact: list[str] = []
    for prefix, layer, path, name in items:
        if prefix is None:
            exact.append("^" + re.escape(name) + "$")
        else:
            tree[prefix][path].add(layer)
    out = []
    for prefix, paths in tree.items():
        by_layers: dict[tuple[int, ...], list[str]] = defaultdict(list)
        for path, layers in paths.items():
            by_layers[tuple(sorted(layers))].append(path)
        for layers, ps in by_layers.items():
            out.append(f"^{re.escape(prefix)}\\.{_alt([str(i) for i in layers])}\\."
                       f"{_alt([re.escape(p) for p in ps])}$")
    return out + exact


def _item(name: str, layer: int) -> tuple[str | None, int, str, str]:
    """``(prefix, layer, path, name)`` for ``_regexes``."""
    parts = _split(name, layer)
    return (parts[0], layer, parts[1], name) if parts else (None, layer, "", name)


def _module_items(lis: Iterable[LinearInfo]) -> list[tuple[str | None, int, str, str]]:
    return [_item(li.name, li.layer) for li in lis]


def _grouped(settings: dict[str, object], linears: list[LinearInfo]) -> dict[object, list[LinearInfo]]:
    """Linears grouped by their tool setting, in first-appearance order."""
    out: dict[object, list[LinearInfo]] = {}
    for li in linears:
        out.setdefault(settings[li.name], []).append(li)
    return out


_PREFIXES = ("+:", "-:", "re:")


def _matches(regex: str, name: str, how: str = "match") -> bool:
    """Whether a tool's pattern selects ``name``. Tool prefixes (``+:``, ``-:``, ``re:``) are
    stripped; ``how`` is the tool's matching rule: ``match`` (anchored at the start: GPTQModel,
    compressed-tensors), ``fullmatch`` (torchao) or ``search`` (llama.cpp's ``std::regex_search``).
    Every pattern exported here is ``^...$`` anchored, so the three agree on them."""
    for p in _PREFIXES:
        if regex.startswith(p):
            regex = regex[len(p):]
            break
    return getattr(re, how)(regex, name) is not None


def _verify(tool: str, expected: dict[str, object], resolve: Callable[[str], object]) -> None:
    """Raise if any name resolves to something other than its intended setting."""
    bad = [f"{n}: wanted {want!r}, the export gives {resolve(n)!r}" for n, want in expected.items()
           if resolve(n) != want]
    if bad:
        raise RuntimeError(f"{tool} export does not reproduce the plan:\n- " + "\n- ".join(bad[:12]))


def _fusable(linears: list[LinearInfo]) -> list[list[LinearInfo]]:
    """Linears that read the same input (q/k/v, gate/up), which vLLM fuses into one layer."""
    by_input: dict[str, list[LinearInfo]] = defaultdict(list)
    for li in linears:
        if li.group in ("attn_in", "mlp_in"):
            by_input[li.input_key].append(li)
    return [lis for lis in by_input.values() if len(lis) > 1]


def _fused_notes(settings: dict[str, object], linears: list[LinearInfo], tool: str, notes: list[str]) -> None:
    """vLLM fuses linears that read the same input (q/k/v, gate/up); they must share a setting."""
    mixed = sorted({li.layer for lis in _fusable(linears)
                    if len({repr(settings[li.name]) for li in lis}) > 1 for li in lis})
    if mixed:
        verb = "gives" if len(mixed) == 1 else "give"
        notes.append(f"{tool}: {_layers_phrase(mixed)} {verb} different settings to linears that read the "
                     "same input (q/k/v or gate/up); the tool quantises them, but vLLM fuses them into one "
                     "layer and cannot serve mixed settings there")


_FUSED = {("k", "q", "v"): "qkv_proj", ("gate", "up"): "gate_up_proj"}  # vLLM's merged layer names


def _fused_names(settings: dict[str, object], linears: list[LinearInfo]) -> dict[str, tuple[int, object]]:
    """The names vLLM gives fused layers (``...self_attn.qkv_proj``, ``...mlp.gate_up_proj``)
    whose members share one setting, with their layer and that setting. vLLM looks a fused
    layer's setting up by the fused name, so an export that names only q/k/v (or gate/up) would
    give it the base."""
    out = {}
    for lis in _fusable(linears):
        fused = _FUSED.get(tuple(sorted(li.role for li in lis)))
        parents = {li.name.rsplit(".", 1)[0] for li in lis}
        same = len({repr(settings[li.name]) for li in lis}) == 1
        if fused and same and len(parents) == 1 and all(li.name.endswith(f".{li.role}_proj") for li in lis):
            out[f"{parents.pop()}.{fused}"] = (lis[0].layer, settings[lis[0].name])
    return out


def _ragged_notes(wants: dict[str, _Want | None], linears: list[LinearInfo], tool: str, consequence: str,
                  notes: list[str]) -> None:
    """Groups that do not divide a module's input width: RankLab gives each row a ragged last
    group; ``consequence`` says what ``tool`` does with them."""
    ragged = [li for li in linears if (w := wants.get(li.name)) is not None and w.kind == "int" and w.group > 0
              and li.in_features % w.group]
    if ragged:
        li = ragged[0]
        notes.append(f"{tool}: {_plural(len(ragged), 'module')} have a group size that does not divide their input "
                     f"width (e.g. {li.name}: {li.in_features} inputs, group {wants[li.name].group}; RankLab gives "
                     f"each row a ragged last group): {consequence}. Pick a group that divides the width (the plan's "
                     "validation suggests one) before a batch run")


def _layers_phrase(layers: Iterable[int]) -> str:
    xs = sorted(set(layers))
    return ("layer " if len(xs) == 1 else "layers ") + _layers_str(xs)


def _layers_str(layers: Iterable[int]) -> str:
    """[0, 1, 2, 5] -> '0-2, 5'."""
    xs = sorted(set(layers))
    runs, start = [], None
    for i, x in enumerate(xs):
        if start is None:
            start = x
        if i + 1 == len(xs) or xs[i + 1] != x + 1:
            runs.append(str(start) if start == x else f"{start}-{x}")
            start = None
    return ", ".join(runs)


# ----------------------------------------------------------------------------- GPTQModel
def _gptqmodel_setting(w: _Want | None) -> tuple[int, int] | None:
    if w is None:
        return None
    return (w.bits, w.group if w.group > 0 else -1)  # GPTQModel: group_size -1 = per output channel


def to_gptqmodel_dynamic(plan: Plan, linears: list[LinearInfo], notes: list[str] | None = None) -> dict:
    """``QuantizeConfig`` keyword arguments: the base ``bits``/``group_size`` (the most common
    setting), ``sym=False`` (RankLab's grids are asymmetric), ``desc_act=False``, ``dynamic``:
    ``"-:regex": {}`` skips dense modules, ``"+:regex": {"bits", "group_size"}`` overrides the
    rest that differ from the base, and ``meta`` (``QuantizeConfig``'s field for producer
    information) with the notes, so the file says what it could not express. GPTQModel and vLLM
    ``re.match`` each key in order and the first match decides; keys here are anchored and
    disjoint, so order does not matter. Where q/k/v (gate/up) share a setting, the keys also name
    vLLM's fused ``qkv_proj`` (``gate_up_proj``), which vLLM looks the setting up by."""
    notes = _sink(notes)
    tool = "GPTQModel"
    wants = _wants(plan, linears)
    settings = {n: _gptqmodel_setting(w) for n, w in wants.items()}
    quantised = Counter(s for s in settings.values() if s is not None)
    base = quantised.most_common(1)[0][0] if quantised else (4, 128)
    dynamic: dict[str, dict] = {}
    fused = _fused_names(settings, linears)
    items: dict[object, list] = defaultdict(list)  # setting -> regex items, fused names (for vLLM) included
    for s, lis in _grouped(settings, linears).items():
        items[s] += _module_items(lis)
    for name, (layer, s) in fused.items():
        items[s].append(_item(name, layer))
    if None in items:
        for rx in _regexes(items[None]):
            dynamic["-:" + rx] = {}
    for s, its in items.items():
        if s is not None and s != base:
            for rx in _regexes(its):
                dynamic["+:" + rx] = {"bits": s[0], "group_size": s[1]}

    def resolve(name: str):
        for key, override in dynamic.items():
            if _matches(key, name):
                return None if key.startswith("-:") else (override["bits"], override["group_size"])
        return base

    _verify(tool, {**settings, **{n: s for n, (_, s) in fused.items()}}, resolve)  # fused names too
    _common_notes(plan, linears, tool, notes)
    if not quantised:
        notes.append(f"{tool}: the plan quantises nothing; every decoder linear is skipped")
    if any(w is not None and w.method == "gptq" for w in wants.values()):
        notes.append(f"{tool}: RankLab's GPTQ orders columns by activation (act-order with static groups); this "
                     "config leaves desc_act off (the simplest kernels): set desc_act=True and static_groups=True "
                     "to match RankLab's numbers more closely")
    if any(w is not None and w.method == "rtn" for w in wants.values()):
        notes.append(f"{tool}: runs GPTQ (needs calibration data) on every quantised module, including the "
                     "plan's rtn ones (same grid, error-compensated)")
    _method_notes(wants, tool, {
        "binary": "no binary format; exported as 2-bit asymmetric GPTQ",
        "ternary": "no ternary format; exported as 2-bit asymmetric GPTQ",
        "fp8": "no fp8 format; exported as 8-bit integer GPTQ, per output channel (group_size -1)",
        "mxfp4": "no MX format; exported as 4-bit integer GPTQ with group_size 32 (fp16 scale + zero "
                 "instead of a shared power-of-two scale)",
    }, notes)
    _fused_notes(settings, linears, tool, notes)
    _ragged_notes(wants, linears, tool, "GPTQModel's kernels and vLLM expect groups that divide the input width "
                  "and may refuse such modules", notes)
    return {"bits": base[0], "group_size": base[1], "sym": False, "desc_act": False, "dynamic": dynamic,
            "meta": {"producer": "RankLab", "ranklab_notes": list(notes)}}


# ----------------------------------------------------------------------------- llm-compressor
def _ct_weights(w: _Want) -> tuple[tuple[str, object], ...]:
    """compressed-tensors ``QuantizationArgs`` for the weights, as a hashable tuple."""
    if w.kind == "fp8":
        return (("num_bits", 8), ("type", "float"), ("symmetric", True), ("strategy", "channel"))
    if w.kind == "mxfp4":
        return (("num_bits", 4), ("type", "float"), ("symmetric", True), ("strategy", "group"),
                ("group_size", 32))
    if w.group > 0:
        return (("num_bits", w.bits), ("type", "int"), ("symmetric", False), ("strategy", "group"),
                ("group_size", w.group))
    return (("num_bits", w.bits), ("type", "int"), ("symmetric", False), ("strategy", "channel"))


def _yaml_scalar(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    return json.dumps(str(v))  # a JSON string is a valid YAML double-quoted scalar


def _yaml_lines(obj: dict, indent: int = 0) -> list[str]:
    pad, lines = "  " * indent, []
    for k, v in obj.items():
        if isinstance(v, dict):
            lines += [f"{pad}{k}: {{}}"] if not v else [f"{pad}{k}:", *_yaml_lines(v, indent + 1)]
        elif isinstance(v, list):
            lines += [f"{pad}{k}: []"] if not v else [f"{pad}{k}:", *(f"{pad}  - {_yaml_scalar(x)}" for x in v)]
        else:
            lines.append(f"{pad}{k}: {_yaml_scalar(v)}")
    return lines


def _llmcompressor_recipe(plan: Plan, linears: list[LinearInfo], notes: list[str]) -> dict:
    tool = "llm-compressor"
    wants = _wants(plan, linears)
    settings = {n: (None if w is None else _ct_weights(w)) for n, w in wants.items()}
    groups = _grouped(settings, linears)
    ignore = ["lm_head"] + ["re:" + rx for rx in _regexes(_module_items(groups.get(None, [])))]
    config_groups = {}
    for s, lis in groups.items():
        if s is not None:
            config_groups[f"group_{len(config_groups)}"] = {
                "targets": ["re:" + rx for rx in _regexes(_module_items(lis))], "weights": dict(s)}
    use_gptq = any(w is not None and w.method == "gptq" for w in wants.values())
    modifier: dict = {"ignore": ignore, "config_groups": config_groups}
    if use_gptq:
        g = GPTQConfig(bits=4)
        modifier = {"block_size": g.block_size, "dampening_frac": g.damp, **modifier}

    def resolve(name: str):  # compressed-tensors: ignore wins, then the (single) matching group
        if any(_matches(t, name) for t in ignore):
            return None
        hits = [grp["weights"] for grp in config_groups.values() if any(_matches(t, name) for t in grp["targets"])]
        return tuple(hits[0].items()) if len(hits) == 1 else ("matched by", len(hits))

    _verify(tool, settings, resolve)
    _common_notes(plan, linears, tool, notes)
    if use_gptq and any(w is not None and w.method != "gptq" for w in wants.values()):
        notes.append(f"{tool}: the plan uses gptq, so the recipe uses GPTQModifier, which also runs GPTQ on the "
                     "plan's other quantised modules (no per-group modifier choice in one stage)")
    _method_notes(wants, tool, {
        "binary": "no binary format; exported as 2-bit asymmetric int",
        "ternary": "no ternary format; exported as 2-bit asymmetric int",
        "mxfp4": "exported as 4-bit float, group 32 (the shape of compressed-tensors' MXFP4A16 preset); "
                 "its power-of-two (uint8 E8M0) scale dtype is not set here, so scales stay fp16",
    }, notes)
    _fused_notes(settings, linears, tool, notes)
    low = sorted({w.bits for w in wants.values() if w is not None and w.kind == "int" and w.bits not in (4, 8)})
    if low:
        notes.append(f"{tool}: {'/'.join(map(str, low))}-bit asymmetric int weights are produced, but vLLM serves "
                     "asymmetric (zero-point) compressed-tensors weights at 4 and 8 bits only")
    _ragged_notes(wants, linears, tool, "compressed-tensors checkpoints with such groups may be refused by vLLM",
                  notes)
    return {"quant_stage": {"quant_modifiers": {"GPTQModifier" if use_gptq else "QuantizationModifier": modifier}}}


def to_llmcompressor_recipe(plan: Plan, linears: list[LinearInfo], notes: list[str] | None = None) -> str:
    """llm-compressor recipe YAML. Each ``config_groups`` entry targets its modules with anchored
    ``re:`` regexes (compressed-tensors ``re.match``-es them on module names) and gives the
    weights' ``num_bits``/``type``/``symmetric``/``strategy``/``group_size``; dense modules and
    ``lm_head`` go to ``ignore``. ``GPTQModifier`` replaces ``QuantizationModifier`` (RTN) when any
    module's method is gptq."""
    notes = _sink(notes)
    recipe = _llmcompressor_recipe(plan, linears, notes)
    header = ["# llm-compressor recipe generated by RankLab from a compression plan"]
    header += [f"# note: {n}" for n in notes]
    return "\n".join(header + _yaml_lines(recipe)) + "\n"


# ----------------------------------------------------------------------------- HQQ
def hqq_linear_tag(name: str) -> str:
    """The tag transformers' HQQ integration keys ``dynamic_config`` by: the module name without
    ``model``, ``layers`` and numeric parts (``model.layers.3.self_attn.q_proj`` -> ``self_attn.q_proj``)."""
    return ".".join(p for p in name.split(".") if p not in ("model", "layers") and not p.isnumeric())


def _hqq_setting(w: _Want | None, li: LinearInfo) -> tuple[int, int] | None:
    if w is None:
        return None
    if w.kind == "fp8":
        return (8, li.in_features)  # one scale per output row
    return (w.bits, w.group if w.group > 0 else li.in_features)


def _hqq_desc(s: tuple[int, int] | None) -> str:
    return "dense" if s is None else f"{s[0]}b g{s[1]}"


def to_hqq_dynamic_config(plan: Plan, linears: list[LinearInfo], notes: list[str] | None = None,
                          keep_dense: bool = True) -> dict:
    """``HqqConfig(dynamic_config=...)``: ``{tag: {"nbits", "group_size", "axis": 1}}`` (transformers
    passes each entry to HQQ as it is, whose own default ``axis=0`` would group along the
    outputs; RankLab's groups run along the inputs, as ``axis=1`` does). HQQ configures a tag
    (e.g. ``self_attn.q_proj``) for all layers at once, so where the plan varies across layers the
    least aggressive setting of the tag is kept (a dense layer keeps the whole tag dense; else most
    bits, then smallest group) and a note says so. ``keep_dense=False`` instead ignores dense layers
    when choosing (they get quantised too; a note names them). Tags left out are not quantised;
    ``lm_head`` is in ``HqqConfig``'s default ``skip_modules``."""
    notes = _sink(notes)
    tool = "HQQ"
    wants = _wants(plan, linears)
    per_tag: dict[str, dict[tuple[int, int] | None, list[int]]] = defaultdict(lambda: defaultdict(list))
    for li in linears:
        per_tag[hqq_linear_tag(li.name)][_hqq_setting(wants[li.name], li)].append(li.layer)
    config: dict[str, dict] = {}
    chosen_for: dict[str, tuple[int, int] | None] = {}
    for tag, by_setting in per_tag.items():
        quantised = [s for s in by_setting if s is not None]
        dense_wins = None in by_setting and (keep_dense or not quantised)
        chosen = None if dense_wins else max(quantised, key=lambda s: (s[0], -s[1]))
        chosen_for[tag] = chosen
        if chosen is not None and None in by_setting:
            notes.append(f"{tool}: {tag} is dense in {_layers_phrase(by_setting[None])} but quantised there too "
                         "(keep_dense=False)")
        if chosen is not None:  # axis 1: groups of consecutive inputs in a row (HQQ's own default is 0)
            config[tag] = {"nbits": chosen[0], "group_size": chosen[1], "axis": 1}
        if len(by_setting) > 1:
            spread = "; ".join(f"{_hqq_desc(s)} in {_layers_phrase(ls)}" for s, ls in by_setting.items())
            notes.append(f"{tool}: {tag} varies across layers ({spread}); HQQ's dynamic_config is per tag, not per "
                         f"layer, so every layer gets {_hqq_desc(chosen)} (the least aggressive; never more "
                         "aggressive than the plan)")

    def resolve(name: str):
        c = config.get(hqq_linear_tag(name))
        return None if c is None else (c["nbits"], c["group_size"])

    _verify(tool, {li.name: chosen_for[hqq_linear_tag(li.name)] for li in linears}, resolve)
    _common_notes(plan, linears, tool, notes)
    if not config:
        notes.append(f"{tool}: no tag is quantised; do not pass an empty dynamic_config (transformers would "
                     "then apply it as one global config) - skip HQQ instead")
    # methods as exported: a module whose tag took another layer's setting is covered by the tag's note
    exported = {li.name: w for li in linears if (w := wants[li.name]) is not None
                and _hqq_setting(w, li) == chosen_for[hqq_linear_tag(li.name)]}
    _method_notes(exported, tool, {
        "binary": "no sign-times-mean format; exported as 2-bit HQQ (affine)",
        "ternary": "no ternary format; exported as 2-bit HQQ (affine)",
        "fp8": "no fp8 format; exported as 8-bit HQQ with one group per row",
        "mxfp4": "no MX format; exported as 4-bit HQQ with group 32 (affine, fp16 scale/zero)",
    }, notes)
    _ragged_notes(exported, linears, tool, "HQQ groups the flattened weight, so its groups would cross rows there",
                  notes)
    return config


# ----------------------------------------------------------------------------- torchao
_INT4_GROUPS = (32, 64, 128, 256)  # Int4WeightOnlyConfig's documented group_size choices


def _torchao_expr(w: _Want | None, li: LinearInfo) -> str | None:
    if w is None:
        return None
    if w.kind == "fp8":
        return "Float8WeightOnlyConfig()"  # E4M3, per-row (per-channel) scale
    group = w.group if w.group > 0 else li.in_features
    if w.bits == 4 and group in _INT4_GROUPS:
        return f"Int4WeightOnlyConfig(group_size={group})"
    return (f"IntxWeightOnlyConfig(weight_dtype=torch.int{w.bits}, granularity=PerGroup({group}), "
            "mapping_type=MappingType.ASYMMETRIC)")


def to_torchao_fqn_config(plan: Plan, linears: list[LinearInfo], notes: list[str] | None = None) -> str:
    """Python source that builds ``quant_config = FqnToConfig({fqn: config | None})`` keyed by
    exact module FQNs (the highest-precedence key kind); dense linears map to ``None``. 4-bit with
    a group of 32/64/128/256 uses ``Int4WeightOnlyConfig``, fp8 ``Float8WeightOnlyConfig``, other
    integer settings ``IntxWeightOnlyConfig`` (asymmetric, ``PerGroup``). Apply with
    ``quantize_(model, quant_config)`` or ``TorchAoConfig(quant_type=quant_config)``."""
    notes = _sink(notes)
    tool = "torchao"
    wants = _wants(plan, linears)
    exprs = {li.name: _torchao_expr(wants[li.name], li) for li in linears}
    names: dict[str, str] = {}
    for e in exprs.values():
        if e is not None and e not in names:
            names[e] = f"cfg_{len(names)}"
    _common_notes(plan, linears, tool, notes)
    _method_notes(wants, tool, {
        "binary": "no binary config; exported as IntxWeightOnlyConfig int2 (asymmetric)",
        "ternary": "no ternary config; exported as IntxWeightOnlyConfig int2 (asymmetric)",
        "mxfp4": "no weight-only MX config outside torchao.prototype; exported as Int4WeightOnlyConfig(group_size=32)",
    }, notes)
    if any(e is not None and e.startswith("Int4") for e in exprs.values()):
        notes.append(f"{tool}: Int4WeightOnlyConfig targets CUDA kernels; CPU int4 needs another packing format "
                     "or config, whose name changes between torchao versions: see your version's documentation")
    _ragged_notes(wants, linears, tool, "torchao refuses them (the input width must be divisible by the block "
                  "size)", notes)
    used = sorted({m for e in names for m in re.findall(r"[A-Z]\w*(?=[(.])", e)})
    lines = ["# torchao FqnToConfig generated by RankLab from a compression plan"]
    lines += [f"# note: {n}" for n in notes]
    if any("torch." in e for e in names):
        lines.append("import torch")
    if used:
        lines.append(f"from torchao.quantization import {', '.join(used)}")
    lines += ["", "try:", "    from torchao.quantization import FqnToConfig",
              "except ImportError:  # torchao before FqnToConfig named it ModuleFqnToConfig",
              "    from torchao.quantization import ModuleFqnToConfig as FqnToConfig", ""]
    lines += [f"{var} = {e}" for e, var in names.items()]
    lines += ["", "quant_config = FqnToConfig({"]
    lines += [f"    {json.dumps(n)}: {names[e] if e is not None else 'None'}," for n, e in exprs.items()]
    lines += ["})", "# quantize_(model, quant_config)  or  TorchAoConfig(quant_type=quant_config)"]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- llama.cpp
GGUF_TENSORS = {"q": "attn_q", "k": "attn_k", "v": "attn_v", "o": "attn_output", "qkv": "attn_qkv",
                "gate": "ffn_gate", "up": "ffn_up", "down": "ffn_down", "fc1": "ffn_up", "fc2": "ffn_down",
                "gate_up": "ffn_up"}
GGUF_BLOCK = {"f16": 1, "bf16": 1, "q8_0": 32, "q4_0": 32, "q4_1": 32, "mxfp4": 32,
              "q4_k": 256, "q3_k": 256, "q2_k": 256, "tq1_0": 256, "tq2_0": 256}
# llama-quantize's positional type (an ftype) for a base made mostly of one ggml type
_GGUF_FTYPE = {"q8_0": "Q8_0", "q4_0": "Q4_0", "q4_1": "Q4_1", "q4_k": "Q4_K_M", "q3_k": "Q3_K_M", "q2_k": "Q2_K",
               "tq1_0": "TQ1_0", "tq2_0": "TQ2_0", "mxfp4": "MXFP4_MOE"}


def _gguf_type(w: _Want | None, li: LinearInfo, dense_type: str) -> str:
    if w is None:
        return dense_type
    if w.method == "binary":
        return "tq1_0"
    if w.method == "ternary":
        return "tq2_0"
    if w.kind == "mxfp4":
        return "mxfp4"
    if w.kind == "fp8" or w.bits == 8:
        return "q8_0"
    if w.bits == 4:  # k-quants need rows that are a multiple of 256; q4_1 (scale + min) takes multiples of 32
        return "q4_k" if li.in_features % 256 == 0 else "q4_1"
    return {3: "q3_k", 2: "q2_k"}[w.bits]


def _llamacpp(plan: Plan, linears: list[LinearInfo], notes: list[str], dense_type: str):
    tool = "llama.cpp"
    wants = _wants(plan, linears)
    types: dict[str, str] = {}  # GGUF tensor name -> ggml type
    infos: dict[str, LinearInfo] = {}
    unmapped = []
    for li in linears:
        t = GGUF_TENSORS.get(li.role)
        if t is None:
            unmapped.append(li.role)
            continue
        gguf = f"blk.{li.layer}.{t}.weight"
        types[gguf], infos[gguf] = _gguf_type(wants[li.name], li, dense_type), li
    by_type: dict[str, list[str]] = {}
    for g, t in types.items():
        by_type.setdefault(t, []).append(g)
    rules = []
    for t, gs in by_type.items():
        items = [("blk", infos[g].layer, g.split(".", 2)[2], g) for g in gs]
        rules += [(rx, t) for rx in _regexes(items)]

    def resolve(g: str):  # llama-quantize regex_search-es every pattern; patterns are disjoint
        hits = [t for rx, t in rules if _matches(rx, g, "search")]
        return hits[0] if len(hits) == 1 else ("matched by", len(hits))

    _verify(tool, types, resolve)
    _common_notes(plan, linears, tool, notes)
    if unmapped:
        notes.append(f"{tool}: roles {sorted(set(unmapped))} have no GGUF tensor name here and were not exported")
    if any(w is not None and w.kind == "int" and w.method in ("rtn", "gptq") for w in wants.values()):
        notes.append(f"{tool}: GGUF types fix their own blocks (32 for q8_0/q4_1, 256 for k-quants); the plan's "
                     "group sizes are not carried, and llama.cpp quantises without GPTQ (use --imatrix)")
    _method_notes(wants, tool, {
        "fp8": "GGUF has no fp8 weight type; exported as q8_0 (nearest)",
        "binary": "no binary type; exported as tq1_0 (ternary, one scale per 256; a superset of binary)",
        "ternary": "exported as tq2_0 (ternary, one scale per 256 instead of per group)",
        "mxfp4": "exported as mxfp4 (E2M1, E8M0 scale per 32); llama-quantize documents MXFP4 only as the "
                 "MXFP4_MOE file type, so check your build quantises dense tensors to it",
    }, notes)
    misfit = Counter(t for g, t in types.items() if infos[g].in_features % GGUF_BLOCK.get(t, 1))
    for t, n in misfit.items():
        notes.append(f"{tool}: {_plural(n, 'tensor')} typed {t} have rows that are not a multiple of "
                     f"{GGUF_BLOCK[t]}; llama.cpp falls back to another type for them")
    quantised = Counter(t for t in types.values() if t in _GGUF_FTYPE)
    base = _GGUF_FTYPE[quantised.most_common(1)[0][0]] if quantised else "Q8_0"
    if base not in ("Q8_0", "Q4_0", "Q4_1") and any(infos[g].in_features % 256 for g in types):
        # older llama-quantize builds apply a --tensor-type override only where the base type's own
        # choice for the tensor fits it; a 32-block base fits every row a multiple of 32
        notes.append(f"{tool}: some rows are not a multiple of 256, so the base file type is Q8_0 instead of "
                     f"{base}: older llama-quantize builds drop a --tensor-type override where the base type's "
                     "own choice does not fit the tensor. Every decoder linear is typed explicitly either way")
        base = "Q8_0"
    return rules, base


def to_llamacpp_tensor_types(plan: Plan, linears: list[LinearInfo], notes: list[str] | None = None,
                             dense_type: str = "f16") -> list[str]:
    """``llama-quantize`` argv: ``["--tensor-type", "REGEX=type", ...]`` with one pair per
    (type, layer set) over GGUF tensor names ``blk.{i}.{attn_q|...}.weight``. Every decoder
    linear is typed explicitly (dense ones as ``dense_type``), so the base file type's mixture
    rules do not change them. llama-quantize lower-cases the pattern and ``regex_search``-es it;
    the patterns are anchored and use no upper-case escapes."""
    rules, _ = _llamacpp(plan, linears, _sink(notes), dense_type)
    return [tok for rx, t in rules for tok in ("--tensor-type", f"{rx}={t}")]


def _llamacpp_script(plan: Plan, linears: list[LinearInfo], notes: list[str], dense_type: str = "f16") -> str:
    rules, base = _llamacpp(plan, linears, notes, dense_type)
    args = [f"--tensor-type {shlex.quote(f'{rx}={t}')}" for rx, t in rules]
    args += ["--leave-output-tensor", f"--token-embedding-type {dense_type}"]
    lines = ["#!/bin/sh", "# llama-quantize arguments generated by RankLab from a compression plan",
             "# usage: sh llama_quantize.sh model-f16.gguf model-out.gguf  (every decoder linear is typed by a "
             "--tensor-type rule; the base type only names the file type)"]
    lines += [f"# note: {n}" for n in notes]
    lines += ["llama-quantize \\"] + [f"  {a} \\" for a in args] + [f'  "$1" "$2" {base}', ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- registry
def _quantises(plan: Plan, linears: list[LinearInfo]) -> bool:
    return any(plan.spec_for(li.name).bits is not None for li in linears)


def _export(tool: str, filename: str, text: str, notes: list[str], usable: bool) -> Export:
    """``usable=False``: the plan gives ``tool`` nothing to do; say so instead of a file."""
    if not usable:
        notes.append(f"{tool}: the plan quantises no linear; nothing for {tool} to do (no file written)")
    return Export(tool, filename, text, notes, usable)


def _export_gptqmodel(plan: Plan, linears: list[LinearInfo]) -> Export:
    notes: list[str] = []
    cfg = to_gptqmodel_dynamic(plan, linears, notes)
    return _export("gptqmodel", "gptqmodel_quantize_config.json", json.dumps(cfg, indent=2) + "\n", notes,
                   _quantises(plan, linears))


def _export_llmcompressor(plan: Plan, linears: list[LinearInfo]) -> Export:
    notes: list[str] = []
    return _export("llm-compressor", "recipe.yaml", to_llmcompressor_recipe(plan, linears, notes), notes,
                   _quantises(plan, linears))


def _export_hqq(plan: Plan, linears: list[LinearInfo]) -> Export:
    notes: list[str] = []
    cfg = to_hqq_dynamic_config(plan, linears, notes)
    return Export("hqq", "hqq_dynamic_config.json", json.dumps(cfg, indent=2) + "\n", notes, usable=bool(cfg))


def _export_torchao(plan: Plan, linears: list[LinearInfo]) -> Export:
    notes: list[str] = []
    return _export("torchao", "torchao_fqn_config.py", to_torchao_fqn_config(plan, linears, notes), notes,
                   _quantises(plan, linears))


def _export_llamacpp(plan: Plan, linears: list[LinearInfo]) -> Export:
    notes: list[str] = []
    return _export("llama.cpp", "llama_quantize.sh", _llamacpp_script(plan, linears, notes), notes,
                   _quantises(plan, linears))


EXPORTERS: dict[str, Callable[[Plan, list[LinearInfo]], Export]] = {
    "gptqmodel": _export_gptqmodel,
    "llm-compressor": _export_llmcompressor,
    "hqq": _export_hqq,
    "torchao": _export_torchao,
    "llama.cpp": _export_llamacpp,
}


def export_all(plan: Plan, linears: list[LinearInfo]) -> dict[str, Export]:
    """Every registered translation of ``plan``, keyed by tool."""
    return {tool: fn(plan, linears) for tool, fn in EXPORTERS.items()}
