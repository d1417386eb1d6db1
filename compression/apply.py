"""Apply a plan to a model: the orchestration over the registry's per-linear handlers.

Order: low-rank factorisations (registry handler per config type) -> Lillama refinement of
the modules that asked for it (bottom-first, needs calibration windows) -> quantisation of
plain weights and of low-rank factors -> block-wise tuning when the plan asks for it
(``compression.tune``). SliceGPT is a whole-model transform and is applied
alone. The original model is never modified: it is deep-copied first, so the dense model
stays usable for comparison.
"""
from __future__ import annotations

import copy
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

import compression.lillama  # noqa: F401  (registers the Lillama initialisation handler)
import compression.lowrank  # noqa: F401  (registers the low-rank handlers)
import compression.quant  # noqa: F401  (registers the quantisation handlers)
from analysis.adapters import Adapter, LinearInfo, get_submodule, set_submodule
from analysis.layerwise import capture, run_layer
from analysis.stats import InputStats, LinearStats
from compression.configs import LillamaConfig, QuantConfig, factor_quants
from compression.lowrank import LowRankLinear
from compression.plan import LillamaOptions, Plan, validate
from compression.registry import handler_for

Progress = Callable[[float, str], None]


@dataclass
class ApplyReport:
    seconds: float = 0.0
    modules: list[tuple[str, str, float]] = field(default_factory=list)  # (name, label, seconds)
    warnings: list[str] = field(default_factory=list)
    lillama: object | None = None
    slicegpt: object | None = None
    tune: object | None = None  # compression.tune.TuneReport
    device: str = "cpu"


def _check(should_stop: Callable[[], bool] | None) -> None:
    if should_stop is not None and should_stop():
        raise InterruptedError("compression cancelled; the original model is unchanged")


def factor_stats(stats: LinearStats | None, a_weight: Tensor) -> LinearStats | None:
    """Input statistics of the ``B`` factor, whose input is ``A x``: exact from ``x``'s."""
    if stats is None:
        return None
    a = a_weight.detach().double()
    s = stats.inputs
    dev = a.device
    return LinearStats(InputStats(s.n_tokens, a @ s.x_sum.to(dev), a @ s.xxt.to(dev) @ a.T))


def _teacher(model: nn.Module, dev: torch.device) -> nn.Module:
    """The dense model on ``dev`` (itself when it is there), read-only."""
    return model if next(model.parameters()).device == dev else copy.deepcopy(model).to(dev)


def quantise_module(mod: nn.Module, q: QuantConfig, stats: LinearStats | None) -> nn.Module:
    """Quantise a plain linear, or both factors of a ``LowRankLinear`` (groups shrink to
    ``gcd(group, width)`` along the factors' inner width)."""
    if isinstance(mod, LowRankLinear):
        qa, qb = factor_quants(q, mod.in_features, mod.rank)
        b_stats = factor_stats(stats, mod.A.weight)
        mod.A = handler_for(qa)(mod.A, qa, stats)
        mod.B = handler_for(qb)(mod.B, qb, b_stats)
        return mod
    return handler_for(q)(mod, q, stats)


def apply_plan(model: nn.Module, adapter: Adapter, plan: Plan, stats: dict[str, LinearStats] | None = None, *,
               device: torch.device | str | None = None, calib_ids: Tensor | None = None,
               progress: Progress | None = None, should_stop: Callable[[], bool] | None = None,
               by_input: bool = False) -> tuple[nn.Module, ApplyReport]:
    """Compress a deep copy of ``model`` per ``plan``; returns (compressed model, report).

    ``stats`` (from ``analysis.profile``) feeds act-pca, svd-llm and gptq; ``calib_ids``
    (C, L) is needed by Lillama and SliceGPT, and makes GPTQ and vq sequential. ``by_input``
    collects their statistics one input group at a time (GPTQ's true-sequential; off by default:
    on SmolLM2 it gained 1.9 % on uniform GPTQ 3-bit and lost 6.7 % on a 2.5-bit vq plan,
    bench/RESULTS.md §21). ``device`` defaults to the model's."""
    t0 = time.perf_counter()
    tuning = plan.tuned
    outer = progress or (lambda f, m: None)
    say = (lambda f, m: outer(0.5 * f, m)) if tuning else outer  # tuning takes the second half
    linears = adapter.linears(model)
    report = ApplyReport()
    report.warnings = validate(plan, linears)
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    report.device = str(dev)
    student = copy.deepcopy(model).to(dev)

    if plan.slicegpt is not None:
        if any(not plan.spec_for(li.name).is_dense for li in linears):
            raise ValueError("a SliceGPT plan slices the whole model; leave every module dense in it "
                             "(combine with other methods in a later run)")
        if calib_ids is None:
            raise ValueError("SliceGPT needs calibration windows (calib_ids)")
        from compression.slicegpt import slice_model

        report.slicegpt = slice_model(student, adapter, calib_ids, plan.slicegpt.slice_fraction, device=dev,
                                      keep_tied_head=plan.slicegpt.keep_tied_head, progress=say,
                                      should_stop=should_stop)
        report.seconds = time.perf_counter() - t0
        return student, report

    todo = [li for li in linears if not plan.spec_for(li.name).is_dense]
    lillama_names = []
    for j, li in enumerate(todo):  # 1) low-rank factorisations
        spec = plan.spec_for(li.name)
        lr = spec.lowrank_config(plan.lillama)
        if lr is None:
            continue
        _check(should_stop)
        t = time.perf_counter()
        st = stats.get(li.name) if stats else None
        new = handler_for(lr)(get_submodule(student, li.name), lr, st)
        set_submodule(student, li.name, new)
        if isinstance(lr, LillamaConfig):
            lillama_names.append(li.name)
        report.modules.append((li.name, lr.name + f" r{lr.rank}", time.perf_counter() - t))
        say(0.6 * (j + 1) / len(todo), f"low-rank {li.name}")

    if lillama_names:  # 2) local feature distillation, bottom-first
        if calib_ids is None:
            raise ValueError("Lillama needs calibration windows (calib_ids)")
        from compression.lillama import refine

        teacher = _teacher(model, dev)
        options = plan.lillama or LillamaOptions()  # a plan may name lillama modules without options
        report.lillama = refine(teacher, student, adapter, lillama_names, options, calib_ids, device=dev,
                                progress=lambda f, m: say(0.6 + 0.3 * f, m), should_stop=should_stop)
        del teacher  # a device copy is not kept while quantising (tuning makes its own)

    quant = [(li, q) for li in todo if (q := plan.spec_for(li.name).quant_config()) is not None]
    sequential = calib_ids is not None and any(not q.data_free for _, q in quant)  # gptq, vq
    if sequential:  # 3) GPTQ's recipe: each layer's Hessian from the compressed layers below
        _sequential_quantise(student, adapter, quant, calib_ids, dev, report, should_stop,
                             lambda f, m: say(0.9 + 0.1 * f, m), by_input=by_input)
    else:  # 3) quantisation with the dense model's statistics (RTN needs none)
        for j, (li, q) in enumerate(quant):
            _check(should_stop)
            t = time.perf_counter()
            st = stats.get(li.name) if stats else None
            set_submodule(student, li.name, quantise_module(get_submodule(student, li.name), q, st))
            report.modules.append((li.name, f"{q.name} {q.bits}b", time.perf_counter() - t))
            say(0.9 + 0.1 * (j + 1) / len(quant), f"quantise {li.name}")
    if tuning:  # 4) block-wise tuning of the compressed layers, bottom-first
        if calib_ids is None:
            raise ValueError("tuning needs calibration windows (calib_ids)")
        from compression.tune import tune

        teacher = _teacher(model, dev)
        report.tune = tune(teacher, student, adapter, plan.tune, calib_ids, device=dev,
                           progress=lambda f, m: outer(0.5 + 0.5 * f, m), should_stop=should_stop)
    report.seconds = time.perf_counter() - t0
    outer(1.0, "done")
    return student, report


def weighted_first_token(rest: InputStats, first: InputStats, weight: float) -> InputStats:
    """Input moments with each window's first token counted ``weight`` times: the first token
    is the attention sink that every later token reads, and in a Hessian where it is 1/2048 of
    the tokens GPTQ trades its error away. On SmolLM2 (GPTQ 4-bit g128, 8 calibration windows
    of 2048; ppl on the first 4 windows of the *validation* split) weights 1 / 16 / 64 gave
    17.51 / 16.43 / 16.77, hence ``GPTQConfig.sink_weight`` = 16 / 2048 (bench/RESULTS.md)."""
    return InputStats(rest.n_tokens + round(weight * first.n_tokens), rest.x_sum + weight * first.x_sum,
                      rest.xxt + weight * first.xxt)


@torch.no_grad()
def _sequential_quantise(student: nn.Module, adapter: Adapter, quant: list[tuple[LinearInfo, QuantConfig]],
                         calib_ids: Tensor, dev: torch.device, report: ApplyReport,
                         should_stop: Callable[[], bool] | None, say: Progress, batch_size: int = 4,
                         by_input: bool = False) -> None:
    """Quantise layer by layer. Before a layer is quantised, its linears' input statistics
    are collected on the hidden states produced by the already-quantised layers below; then
    the quantised layer produces the next layer's inputs. With ``by_input`` (GPTQ's
    "true-sequential") a layer's linears are quantised one input group at a time in forward
    order (q/k/v, then o, then gate/up, then down), each group's statistics collected with
    the groups before it already quantised; otherwise every group's statistics come from the
    layer as it was. Peak memory: the calibration hidden states plus one layer."""
    layers = adapter.layers(student)
    batches, seqlen = list(calib_ids.split(batch_size)), calib_ids.shape[1]
    states = [capture(student, adapter, b.to(dev)) for b in batches]
    hidden = [st.hidden for st in states]
    by_layer: dict[int, list[tuple[LinearInfo, QuantConfig]]] = {}
    for li, q in quant:
        by_layer.setdefault(li.layer, []).append((li, q))
    label = "sequential by input" if by_input else "sequential"
    for i, layer in enumerate(layers):
        _check(should_stop)
        items = by_layer.get(i, [])
        groups = [items] if not by_input else [  # consecutive linears reading one input, in forward order
            list(g) for _, g in itertools.groupby(items, key=lambda item: item[0].input_key)]
        for group in groups if items else []:
            stats = _layer_input_stats(student, layer, [li for li, _ in group], hidden,
                                       [st.calls[i] for st in states], seqlen, dev, stop=by_input)
            for li, q in group:
                t = time.perf_counter()
                w = max(1.0, getattr(q, "sink_weight", 0.0) * seqlen)
                st = LinearStats(weighted_first_token(*stats[li.input_key], w))
                set_submodule(student, li.name, quantise_module(get_submodule(student, li.name), q, st))
                report.modules.append((li.name, f"{q.name} {q.bits}b ({label})", time.perf_counter() - t))
        for b in range(len(batches)):
            hidden[b] = run_layer(layer, hidden[b], states[b].calls[i])
        say((i + 1) / len(layers), f"quantise layer {i + 1}/{len(layers)}")


class _Recorded(Exception):
    """Raised by the last input hook when the rest of the layer need not run."""


def _layer_input_stats(student: nn.Module, layer: nn.Module, linears: list[LinearInfo], hidden: list[Tensor],
                       calls: list[tuple[tuple, dict]], seqlen: int, dev: torch.device,
                       stop: bool) -> dict[str, tuple[InputStats, InputStats]]:
    """Input moments of ``linears`` over the calibration batches run through ``layer``:
    input key -> (moments of every token but each window's first, moments of the first ones).
    With ``stop`` the layer is cut short once the last of those inputs has been seen (the
    linears must then be read in forward order)."""
    heads: dict[str, LinearInfo] = {}
    for li in linears:
        heads.setdefault(li.input_key, li)
    rest = {k: InputStats.zeros(li.in_features, dev) for k, li in heads.items()}
    first = {k: InputStats.zeros(li.in_features, dev) for k, li in heads.items()}
    last = list(heads)[-1]

    def record(k: str, x: Tensor) -> None:  # x (B, L, n), or (B L, n) in OPT's MLP: first tokens apart
        x = x.reshape(-1, seqlen, x.shape[-1])
        first[k].update(x[:, :1])
        rest[k].update(x[:, 1:])
        if stop and k == last:
            raise _Recorded

    hooks = [get_submodule(student, li.name).register_forward_pre_hook(
        lambda _m, args, k=k: record(k, args[0])) for k, li in heads.items()]
    try:
        for x, call in zip(hidden, calls, strict=True):
            try:
                run_layer(layer, x, call)
            except _Recorded:
                pass
    finally:
        for hook in hooks:
            hook.remove()
    return {k: (rest[k], first[k]) for k in heads}
