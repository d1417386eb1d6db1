"""Lillama: low-rank compression refined by local feature distillation.

SVD (or activation PCA) gives a closed-form rank-k factorisation of one linear. Lillama
keeps that as the *initialisation* and then trains the factors by gradient descent so that
the compressed module reproduces the original module's output features. Because the fit
is done by gradient descent, the "module" can be a single linear, a whole MLP block or a
whole decoder layer (non-linear), and several low-rank linears can be trained jointly.

Objective, per token t with output width D::

    l(Y_t, Ŷ_t) = (1/D) ||Y_t - Ŷ_t||_1 - log σ(cos(Y_t, Ŷ_t))

summed over two inputs of the student module: the *teacher's* input (the output of the
uncompressed stack below) and the *student's* input (the output of the already-compressed
stack below). The target is always the teacher module's output on the teacher's input.

Layers are visited bottom-first (0, 1, ...): each step only needs a partial forward of
cached calibration activations, never a backward pass through the whole model. Peak
memory is about one decoder layer (an fp32 working copy of the teacher's and of the
student's) plus the cached hidden states of the calibration tokens (teacher and student,
``C x L x D`` fp32 each) and the captured inputs of the module being trained.

For a linear fed with the teacher's input only, the optimum of an MSE objective is the
activation-PCA solution; the L1 + cosine objective lands close to it.

Entry points:

* ``lillama_loss(y, y_hat)``    the objective above, averaged over tokens;
* ``refine_linear(...)``        distil one low-rank linear from given input activations;
* ``refine(...)``               distil the named modules of a student model layer by layer;
* ``init_student(...)``         deep-copy a dense model and initialise its Lillama modules;
* the ``LillamaConfig`` handler (``compression.registry``), SVD or act-PCA initialisation.
"""
from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from analysis.adapters import Adapter, Role, get_submodule, linear_shape, set_submodule
from analysis.layerwise import capture, run_layer
from analysis.stats import LinearStats
from compression.configs import ActPCAConfig, LillamaConfig, LowRankConfig, SVDConfig, WhitenedSVDConfig
from compression.lowrank import LowRankLinear
from compression.plan import LILLAMA_INITS, LillamaOptions, Plan
from compression.registry import handler_for, register

Progress = Callable[[float, str], None]
StopCheck = Callable[[], bool]

TOKENS_PER_STEP = 1024  # tokens in one Adam step (for 'layer': whole sequences adding up to about this)
EVAL_TOKENS = 4096  # fixed subset the initial / final losses are measured on
FORWARD_TOKENS = 4096  # tokens per no-grad forward chunk (also bounds the logits capture() computes)
TOP_FIRST_CACHE_BYTES = 4 << 30  # 'top-first' keeps every target layer's inputs up to this size
LOG_EVERY = 10  # a curve point every this many steps (plus the first and the last)
_F32 = torch.float32


# ----------------------------------------------------------------------------- loss
def lillama_loss(y: Tensor, y_hat: Tensor) -> Tensor:
    """Mean over tokens of ``(1/D)||y_t - ŷ_t||_1 - log σ(cos(y_t, ŷ_t))``.

    y, y_hat (T, D) (any leading dims are flattened into tokens) -> scalar. Equals
    ``-log σ(1) ≈ 0.3133`` when ``y_hat == y``, and is larger otherwise.
    """
    if y.shape != y_hat.shape:
        raise ValueError(f"lillama_loss: target {tuple(y.shape)} and prediction {tuple(y_hat.shape)} differ")
    d = y.shape[-1]
    y2, yh = y.reshape(-1, d), y_hat.reshape(-1, d)  # (T, D)
    l1 = (y2 - yh).abs().mean(-1)  # (T,)
    cos = F.cosine_similarity(y2, yh, dim=-1, eps=1e-8)  # (T,)
    return (l1 - F.logsigmoid(cos)).mean()


# ----------------------------------------------------------------------------- handler
# Lillama's initialisations: the low-rank config whose registered handler makes the start
INIT_CONFIGS: dict[str, type[LowRankConfig]] = {"svd": SVDConfig, "act-pca": ActPCAConfig,
                                                "svd-llm": WhitenedSVDConfig}


@register(LillamaConfig)
@torch.no_grad()
def _lillama(linear: nn.Linear, config: LillamaConfig, stats: LinearStats | None) -> LowRankLinear:
    """The initialisation Lillama refines: the handler of ``INIT_CONFIGS[config.init]`` (truncated
    SVD, activation PCA or whitened SVD; the last two need stats) at the same rank."""
    config.check(linear.out_features, linear.in_features)
    init_cls = INIT_CONFIGS.get(config.init)
    if init_cls is None:
        raise ValueError(f"lillama: unknown init {config.init!r}; use one of {', '.join(LILLAMA_INITS)}")
    init = init_cls(rank=config.rank)
    if stats is None and not init.data_free:
        raise ValueError(f"lillama with init={config.init!r} needs calibration statistics: run the profiler first "
                         "(or use init='svd')")
    return handler_for(init)(linear, init, stats)


def init_student(teacher: nn.Module, adapter: Adapter, plan: Plan,
                 stats: dict[str, LinearStats] | None = None) -> tuple[nn.Module, list[str]]:
    """Deep copy of ``teacher`` whose decoder linears planned as ``lowrank='lillama'`` (with a
    rank) are replaced by their initialised ``LowRankLinear``; returns it and their names
    (in depth order). Other specs are left dense: applying them is the caller's business.
    ``stats`` maps module names to calibration statistics (needed for init='act-pca')."""
    student = copy.deepcopy(teacher)
    names = []
    for li in adapter.linears(teacher):
        spec = plan.spec_for(li.name)
        if spec.rank is None or spec.lowrank != "lillama":
            continue
        config = spec.lowrank_config(plan.lillama)
        linear = get_submodule(student, li.name)
        set_submodule(student, li.name, handler_for(config)(linear, config, (stats or {}).get(li.name)))
        names.append(li.name)
    return student, names


# ----------------------------------------------------------------------------- report
@dataclass
class FitResult:
    """One distillation run. ``curve``: minibatch loss at step 0, every ``LOG_EVERY`` steps
    and at the last step; ``init_loss`` / ``final_loss``: the objective on a fixed subset of
    the calibration tokens before / after training. When training ended with a higher loss
    than it started from (Adam's first steps overshoot on short runs), the initial weights
    are kept: ``final_loss`` is then ``init_loss`` and ``trained_loss`` what training reached."""

    curve: list[float]
    init_loss: float
    final_loss: float
    seconds: float
    steps: int
    trained_loss: float | None = None  # set when training ended above ``init_loss`` and was undone


@dataclass
class LillamaReport:
    """What ``refine`` did. Keys are module names: a linear's for granularity 'linear', the
    MLP block's (e.g. ``model.layers.3.mlp``) for 'mlp', the layer's for 'layer'.
    ``init_loss`` / ``final_loss`` average the per-target losses; ``kept_init`` maps the
    modules whose training ended above their initial loss (and were left as initialised) to
    the loss training reached. ``peak_bytes`` is the CUDA
    peak allocation on a GPU; on the CPU, an estimate of the working set (hidden-state
    caches, captured inputs, layer copies, gradients and Adam moments)."""

    curves: dict[str, list[float]]
    init_loss: float
    final_loss: float
    seconds: float
    peak_bytes: int
    losses: dict[str, tuple[float, float]] = field(default_factory=dict)  # key -> (init, final)
    module_seconds: dict[str, float] = field(default_factory=dict)  # key -> training seconds
    kept_init: dict[str, float] = field(default_factory=dict)  # key -> trained (rejected) loss
    tokens: int = 0  # calibration tokens used (``calib_tokens`` capped by the windows given)


# ----------------------------------------------------------------------------- the fitting loop
def _fit(student_fn: Callable[[Tensor], Tensor], target_fn: Callable[[Tensor], Tensor],
         params: list[nn.Parameter] | list[dict], x_t: Tensor, x_s: Tensor | None, *, steps: int, lr: float,
         sample: Callable[[], Tensor], eval_chunks: list[Tensor], should_stop: StopCheck | None,
         loss_fn: Callable[[Tensor, Tensor], Tensor] = lillama_loss, what: str = "lillama") -> FitResult:
    """Adam on ``params`` for ``steps`` minibatches. Items are indexed along dim 0 of
    ``x_t`` / ``x_s`` (tokens, or whole sequences); ``target_fn(idx)`` is the teacher's output
    for items ``idx``; ``x_s=None`` means the student's input equals the teacher's (the loss
    then counts the teacher-input term twice, keeping its scale). ``loss_fn(target, output)``
    defaults to ``lillama_loss`` (``compression.tune`` passes the mean squared error, and
    ``params`` as Adam parameter groups with their own learning rates)."""
    t0 = time.perf_counter()

    def loss_on(idx: Tensor) -> Tensor:
        with torch.no_grad():
            y = target_fn(idx)
        loss = loss_fn(y, student_fn(x_t[idx]))
        return 2 * loss if x_s is None else loss + loss_fn(y, student_fn(x_s[idx]))

    @torch.no_grad()
    def evaluate() -> float:
        total, count = 0.0, 0
        for idx in eval_chunks:
            total += float(loss_on(idx)) * idx.numel()
            count += idx.numel()
        return total / max(count, 1)

    init = evaluate()
    curve: list[float] = []
    groups = params if params and isinstance(params[0], dict) else [{"params": params}]
    params = [p for g in groups for p in g["params"]]
    start = [p.detach().clone() for p in params] if steps > 0 else []
    if steps > 0:
        opt = torch.optim.Adam(groups, lr=lr)
        with torch.enable_grad():
            for step in range(steps):
                if should_stop is not None and should_stop():
                    raise InterruptedError(f"{what} stopped at step {step} of {steps}")
                loss = loss_on(sample())
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if step % LOG_EVERY == 0 or step == steps - 1:
                    curve.append(float(loss.detach()))
        del opt
        for p in params:
            p.grad = None
    final = evaluate() if steps > 0 else init
    trained = None
    if not final <= init:  # worse on the evaluation tokens (or NaN): keep the initialisation
        with torch.no_grad():
            for p, p0 in zip(params, start, strict=True):
                p.copy_(p0)
        trained, final = final, init
    return FitResult(curve, init, final, time.perf_counter() - t0, steps, trained)


def _token_sampler(n_items: int, batch: int, device: torch.device, seed: int) -> Callable[[], Tensor]:
    gen = torch.Generator().manual_seed(seed)
    if n_items <= batch:
        every = torch.arange(n_items, device=device)
        return lambda: every
    return lambda: torch.randint(0, n_items, (batch,), generator=gen).to(device)


def _eval_chunks(n_items: int, limit: int, chunk: int, device: torch.device) -> list[Tensor]:
    if n_items <= limit:
        idx = torch.arange(n_items)
    else:  # evenly spread over the calibration set
        idx = torch.linspace(0, n_items - 1, limit).round().long().unique()
    return [c.to(device) for c in idx.split(max(chunk, 1))]


def _trainable(module: LowRankLinear) -> list[nn.Parameter]:
    return [module.A.weight, module.B.weight] + ([module.bias] if module.bias is not None else [])


def _fit_linear(teacher: nn.Module, student: LowRankLinear, x_t: Tensor, x_s: Tensor | None, *, steps: int,
                lr: float, tokens_per_step: int, seed: int, should_stop: StopCheck | None,
                params: list[nn.Parameter] | None = None) -> FitResult:
    """Token-wise distillation of ``student`` (or, with ``params``, of a token-wise block
    whose trainable ``params`` are given) towards ``teacher``; x (T, n) fp32."""
    dev = x_t.device
    n_tok = x_t.shape[0]
    return _fit(student, lambda idx: teacher(x_t[idx]), params or _trainable(student), x_t, x_s,
                steps=steps, lr=lr, sample=_token_sampler(n_tok, tokens_per_step, dev, seed),
                eval_chunks=_eval_chunks(n_tok, EVAL_TOKENS, FORWARD_TOKENS, dev), should_stop=should_stop)


def refine_linear(teacher: nn.Module, student: LowRankLinear, x_teacher: Tensor, x_student: Tensor | None = None, *,
                  steps: int = 100, lr: float = 1e-3, tokens_per_step: int = TOKENS_PER_STEP, seed: int = 0,
                  should_stop: StopCheck | None = None) -> FitResult:
    """Distil one low-rank linear in place: ``student`` learns ``teacher(x_teacher)`` from both
    ``x_teacher`` and ``x_student`` (..., n) (None: the teacher's input only). Training runs in
    fp32 on a copy on the student's device; the result is written back in the student's
    dtype (on ``InterruptedError`` the student is left as it was)."""
    if not isinstance(student, LowRankLinear):
        raise TypeError(f"refine_linear trains a LowRankLinear, got {type(student).__name__}")
    n = student.in_features
    if linear_shape(teacher) != (student.out_features, n):
        raise ValueError(f"teacher {linear_shape(teacher)} and student {(student.out_features, n)} shapes differ")
    dev = student.A.weight.device
    work = copy.deepcopy(student).to(device=dev, dtype=_F32)
    ref = copy.deepcopy(teacher).to(device=dev, dtype=_F32).requires_grad_(False)
    work.requires_grad_(False)
    params = _trainable(work)
    for p in params:
        p.requires_grad_(True)
    x_t = x_teacher.reshape(-1, n).to(device=dev, dtype=_F32)
    x_s = None if x_student is None else x_student.reshape(-1, n).to(device=dev, dtype=_F32)
    if x_s is not None and x_s.shape != x_t.shape:
        raise ValueError(f"teacher inputs {tuple(x_t.shape)} and student inputs {tuple(x_s.shape)} differ")
    res = _fit_linear(ref, work, x_t, x_s, steps=steps, lr=lr, tokens_per_step=tokens_per_step, seed=seed,
                      should_stop=should_stop)
    _sync(list(zip(_trainable(student), params, strict=True)))
    return res


def _pairs(orig_layer: nn.Module, work_layer: nn.Module,
           members: list[tuple[str, Role]]) -> list[tuple[nn.Parameter, nn.Parameter]]:
    """(model param, work-copy param) for the trainable params of ``members`` in a layer."""
    return [(p, q) for _, role in members
            for p, q in zip(_trainable(get_submodule(orig_layer, role.path)),
                            _trainable(get_submodule(work_layer, role.path)), strict=True)]


@torch.no_grad()
def _sync(pairs: list[tuple[nn.Parameter, nn.Parameter]]) -> None:
    """Write trained fp32 ``work`` params into the model's ``dst`` params, then round the work
    copy to what the model now holds (so the student's stack below is what it will compute)."""
    for dst, work in pairs:
        dst.copy_(work)
        if dst.dtype != work.dtype:
            work.copy_(dst)


# ----------------------------------------------------------------------------- model plumbing
class _Captured(Exception):
    """Raised from a hook once a module's input is recorded, to skip the rest of the layer."""


def _to_device(obj, device: torch.device):
    if isinstance(obj, Tensor):
        return obj.to(device=device, dtype=_F32) if obj.is_floating_point() else obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_to_device(o, device) for o in obj)
    if isinstance(obj, list):
        return [_to_device(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    return obj


class _Calls:
    """Per-layer call arguments (masks, rotary tables ...) for a batch of ``b`` calibration
    sequences, captured once per batch size and cast to fp32 on the work device."""

    def __init__(self, model: nn.Module, adapter: Adapter, ids: Tensor, device: torch.device):
        self.model, self.adapter, self.ids, self.device = model, adapter, ids, device
        self.cache: dict[int, list[tuple[tuple, dict]]] = {}

    def seed(self, b: int, calls: list[tuple[tuple, dict]]) -> None:
        self.cache[b] = _to_device(calls, self.device)

    def __call__(self, b: int, i: int) -> tuple[tuple, dict]:
        if b not in self.cache:
            self.cache[b] = _to_device(capture(self.model, self.adapter, self.ids[:b]).calls, self.device)
        return self.cache[b][i]


@torch.no_grad()
def _forward(layer: nn.Module, hidden: Tensor, calls: _Calls, i: int, chunk: int) -> Tensor:
    """Layer ``i`` on hidden (C, L, D) in chunks of sequences -> (C, L, D)."""
    out = torch.empty_like(hidden)
    for s in range(0, hidden.shape[0], chunk):
        h = hidden[s:s + chunk]
        out[s:s + chunk] = run_layer(layer, h, calls(h.shape[0], i))
    return out


@torch.no_grad()
def _capture_input(layer: nn.Module, module: nn.Module, hidden: Tensor, calls: _Calls, i: int,
                   chunk: int) -> Tensor:
    """Input of ``module`` inside layer ``i`` run on hidden (C, L, D), as (C*L, n) fp32 tokens
    in the hidden states' order. The layer stops right after the module is reached."""
    parts: list[Tensor] = []

    def hook(_mod, args, kwargs):
        x = args[0] if args else next(iter(kwargs.values()))
        parts.append(x.detach().reshape(-1, x.shape[-1]).to(_F32))
        raise _Captured

    handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for s in range(0, hidden.shape[0], chunk):
            h = hidden[s:s + chunk]
            try:
                run_layer(layer, h, calls(h.shape[0], i))
            except _Captured:
                pass
    finally:
        handle.remove()
    if len(parts) != -(-hidden.shape[0] // chunk):
        raise RuntimeError(f"layer {i}: the module to distil was not called by the layer's forward")
    return torch.cat(parts)


def _work_copy(layer: nn.Module, device: torch.device, *, force: bool) -> nn.Module:
    """An fp32 copy of ``layer`` on ``device`` with no trainable params (``force=False``: the
    layer itself when it already is fp32 on ``device``; only used read-only then)."""
    p = next(layer.parameters(), None)
    if not force and (p is None or (p.device == device and p.dtype == _F32)):
        return layer
    work = copy.deepcopy(layer).to(device=device, dtype=_F32).eval()
    return work.requires_grad_(False)


def _nbytes(*objs) -> int:
    total = 0
    for o in objs:
        if o is None:
            continue
        if isinstance(o, Tensor):
            total += o.numel() * o.element_size()
        elif isinstance(o, nn.Module):
            total += sum(t.numel() * t.element_size() for t in list(o.parameters()) + list(o.buffers()))
        elif isinstance(o, Iterable):
            total += _nbytes(*o)
    return total


class _Peak:
    def __init__(self, device: torch.device):
        self.device, self.estimate = device, 0
        self.cuda = device.type == "cuda"
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(device)

    def note(self, *objs, trainable: list[nn.Parameter] | None = None) -> None:
        # gradients + Adam's two moments: 3 x the trainable parameters
        self.estimate = max(self.estimate, _nbytes(*objs) + 3 * _nbytes(trainable or []))

    def value(self) -> int:
        return int(torch.cuda.max_memory_allocated(self.device)) if self.cuda else self.estimate


@dataclass
class _Stage:
    kind: str  # "linear" (a group of linears sharing one input), "block" (the MLP) or "layer"
    key: str  # report key of a block / layer
    members: list[tuple[str, Role]]
    path: str = ""  # block path inside the layer


def _locate(teacher: nn.Module, student: nn.Module, adapter: Adapter,
            names: list[str]) -> dict[int, list[tuple[str, Role]]]:
    """Layer index -> [(name, role)] in role order; checks the student holds LowRankLinears."""
    n_layers = len(adapter.layers(teacher))
    if len(adapter.layers(student)) != n_layers:
        raise ValueError(f"the student has {len(adapter.layers(student))} layers, the teacher {n_layers}")
    index = {f"{adapter.layer_name(i)}.{r.path}": (i, r) for i in range(n_layers) for r in adapter.roles}
    order = {r.path: k for k, r in enumerate(adapter.roles)}
    out: dict[int, list[tuple[str, Role]]] = {}
    for name in dict.fromkeys(names):
        if name not in index:
            raise ValueError(f"{name!r} is not a decoder linear of this model; names look like {next(iter(index))}")
        mod, ref = get_submodule(student, name), get_submodule(teacher, name)
        if not isinstance(mod, LowRankLinear) or not (isinstance(mod.A, nn.Linear) and isinstance(mod.B, nn.Linear)):
            raise ValueError(f"{name}: the student's module is {type(mod).__name__}, not a LowRankLinear with plain "
                             "factors; initialise it with the LillamaConfig handler first")
        if mod is ref:
            raise ValueError(f"{name}: the student shares this module with the teacher; pass a deep copy")
        if linear_shape(ref) != (mod.out_features, mod.in_features):
            raise ValueError(f"{name}: teacher {linear_shape(ref)} and student "
                             f"{(mod.out_features, mod.in_features)} shapes differ")
        i, role = index[name]
        out.setdefault(i, []).append((name, role))
    for members in out.values():
        members.sort(key=lambda nr: order[nr[1].path])
    return out


def _mlp_path(adapter: Adapter) -> str:
    parents = {r.path.rpartition(".")[0] for r in adapter.roles if r.group in ("mlp_in", "mlp_out")}
    if len(parents) != 1 or "" in parents:
        raise ValueError(f"{type(adapter).__name__}: the MLP linears have no MLP module of their own; use "
                         "granularity 'linear' or 'layer'")
    return parents.pop()


def _stages(adapter: Adapter, i: int, members: list[tuple[str, Role]], granularity: str) -> list[_Stage]:
    layer_key = adapter.layer_name(i)
    if granularity == "layer":
        return [_Stage("layer", layer_key, members)]
    stages: list[_Stage] = []
    mlp = _mlp_path(adapter) if granularity == "mlp" else ""
    for name, role in members:
        if mlp and role.group in ("mlp_in", "mlp_out"):
            key = f"{layer_key}.{mlp}"
            if not stages or stages[-1].key != key:
                stages.append(_Stage("block", key, [], mlp))
        elif not stages or stages[-1].kind != "linear" or stages[-1].key != role.group:
            stages.append(_Stage("linear", role.group, []))
        stages[-1].members.append((name, role))
    return stages


def _limit_ids(calib_ids: Tensor, calib_tokens: int) -> Tensor:
    if calib_ids.dim() != 2 or calib_ids.numel() == 0:
        raise ValueError(f"calibration ids must be a non-empty (C, L) tensor, got shape {tuple(calib_ids.shape)}")
    if calib_ids.is_floating_point():
        raise ValueError("calibration ids must be integer token ids")
    c, length = calib_ids.shape
    if calib_tokens < length:
        return calib_ids[:1, :calib_tokens]
    return calib_ids[:min(c, calib_tokens // length)]


# ----------------------------------------------------------------------------- refine
def refine(teacher: nn.Module, student: nn.Module, adapter: Adapter, names: list[str], options: LillamaOptions,
           calib_ids: Tensor, *, device: torch.device | str, progress: Progress | None = None,
           should_stop: StopCheck | None = None, tokens_per_step: int = TOKENS_PER_STEP,
           seed: int = 0, cache_bytes: int = TOP_FIRST_CACHE_BYTES) -> LillamaReport:
    """Local feature distillation of the student's modules ``names`` (already LowRankLinear,
    e.g. from ``init_student``) towards the dense ``teacher`` (read-only).

    ``options.granularity``: 'linear' distils each linear's output; 'mlp' distils the MLP
    block's output, its low-rank linears jointly (attention linears stay per linear);
    'layer' distils the decoder layer's output, all its low-rank linears jointly.
    ``options.order``: 'bottom-first' refines layer 0, 1, ... so each layer's student input
    comes from the refined stack below; 'top-first' (ablation) goes from the last layer
    down, its student inputs coming from the initialised, not yet refined, stack below
    (those inputs are computed once and kept when they fit in ``cache_bytes``; otherwise
    the stack is re-run for every layer: quadratic in depth, no extra memory).

    The first ``options.calib_tokens`` tokens of ``calib_ids`` (C, L) are used (whole
    sequences, or a prefix of the first one). Each module gets ``options.steps`` Adam steps
    (lr ``options.lr``) on minibatches of ``tokens_per_step`` tokens (whole sequences for
    'layer'). Training is fp32 on ``device`` on layer copies; each trained module is written
    back (in the student's dtype) when done, so a stop leaves finished modules refined and
    the others as initialised. ``progress(frac, msg)`` is called per module / layer;
    ``should_stop()`` is polled every step and raises ``InterruptedError`` when true.
    """
    options.check()
    if tokens_per_step < 1:
        raise ValueError(f"lillama: tokens_per_step must be >= 1, got {tokens_per_step}")
    device = torch.device(device)
    targets = _locate(teacher, student, adapter, names)
    t_start = time.perf_counter()
    peak = _Peak(device)
    report = LillamaReport({}, 0.0, 0.0, 0.0, 0)
    if not targets:
        return report
    ids = _limit_ids(calib_ids, options.calib_tokens)
    n_seq, seq_len = ids.shape
    report.tokens = ids.numel()
    chunk = max(1, FORWARD_TOKENS // seq_len)
    stages = {i: _stages(adapter, i, members, options.granularity) for i, members in targets.items()}
    n_targets = sum(len(st.members) if st.kind == "linear" else 1 for per in stages.values() for st in per)
    done = 0

    def stop_check() -> None:
        if should_stop is not None and should_stop():
            raise InterruptedError("lillama stopped")

    def tell(msg: str) -> None:
        if progress is not None:
            progress(done / n_targets, msg)

    tell("lillama: capturing calibration activations")
    calls = _Calls(teacher, adapter, ids, device)
    h0_t, h0_s = [], []
    for s in range(0, n_seq, chunk):  # in chunks: capture() also runs the LM head on every token
        li_t, li_s = capture(teacher, adapter, ids[s:s + chunk]), capture(student, adapter, ids[s:s + chunk])
        if s == 0:
            calls.seed(li_t.hidden.shape[0], li_t.calls)
        h0_t.append(li_t.hidden.detach().to(device=device, dtype=_F32))
        h0_s.append(li_s.hidden.detach().to(device=device, dtype=_F32))
        del li_t, li_s
    h0_t, h0_s = torch.cat(h0_t), torch.cat(h0_s)  # (C, L, D) each
    layers_t, layers_s = adapter.layers(teacher), adapter.layers(student)

    def record(key: str, res: FitResult) -> None:
        nonlocal done
        report.curves[key] = res.curve
        report.losses[key] = (res.init_loss, res.final_loss)
        report.module_seconds[key] = res.seconds
        done += 1
        if res.trained_loss is not None:
            report.kept_init[key] = res.trained_loss
            tell(f"{key}: loss {res.init_loss:.4g}, kept the initialisation (training ended at "
                 f"{res.trained_loss:.4g}) ({res.seconds:.1f}s)")
        else:
            tell(f"{key}: loss {res.init_loss:.4g} -> {res.final_loss:.4g} ({res.seconds:.1f}s)")

    def refine_layer(i: int, t_layer: nn.Module, s_layer: nn.Module, h_t: Tensor, h_s: Tensor) -> Tensor | None:
        """Train layer i's targets inside ``s_layer`` (a work copy). Returns the teacher's
        output of the layer when it was computed on the way ('layer' granularity)."""
        t_next = None
        s_orig = layers_s[i]
        same_input = torch.equal(h_t, h_s)
        for st_i, stage in enumerate(stages[i]):
            stop_check()
            seed_i = seed + 1000 * i + st_i
            if stage.kind == "layer":
                tell(f"{stage.key}: distilling the layer output")
                t_next = _forward(t_layer, h_t, calls, i, chunk)
                pairs = _pairs(s_orig, s_layer, stage.members)
                params = [q for _, q in pairs]
                for q in params:
                    q.requires_grad_(True)
                b = max(1, min(n_seq, tokens_per_step // seq_len))
                gen = torch.Generator().manual_seed(seed_i)
                sample = (lambda: torch.arange(n_seq, device=device)) if b >= n_seq else (
                    lambda: torch.randperm(n_seq, generator=gen)[:b].to(device))
                n_eval = max(1, EVAL_TOKENS // seq_len)
                peak.note(h_t, h_s, t_next, t_layer if t_layer is not layers_t[i] else None, s_layer, trainable=params)
                res = _fit(lambda x: run_layer(s_layer, x, calls(x.shape[0], i)), lambda idx: t_next[idx], params,
                           h_t, None if same_input else h_s, steps=options.steps, lr=options.lr, sample=sample,
                           eval_chunks=_eval_chunks(n_seq, n_eval, b, device), should_stop=should_stop)
                for q in params:
                    q.requires_grad_(False)
                _sync(pairs)
                record(stage.key, res)
                continue
            # token-wise stages: capture the (shared) input of the group / the block
            path = stage.path or stage.members[0][1].path
            x_t = _capture_input(t_layer, get_submodule(t_layer, path), h_t, calls, i, chunk)
            x_s = _capture_input(s_layer, get_submodule(s_layer, path), h_s, calls, i, chunk)
            x_s_arg = None if torch.equal(x_t, x_s) else x_s
            peak.note(h_t, h_s, x_t, x_s, t_layer if t_layer is not layers_t[i] else None, s_layer)
            if stage.kind == "block":
                tell(f"{stage.key}: distilling the MLP output")
                pairs = _pairs(s_orig, s_layer, stage.members)
                params = [q for _, q in pairs]
                for q in params:
                    q.requires_grad_(True)
                peak.note(h_t, h_s, x_t, x_s, t_layer if t_layer is not layers_t[i] else None, s_layer,
                          trainable=params)
                res = _fit_linear(get_submodule(t_layer, path), get_submodule(s_layer, path), x_t, x_s_arg,
                                  steps=options.steps, lr=options.lr, tokens_per_step=tokens_per_step, seed=seed_i,
                                  should_stop=should_stop, params=params)
                for q in params:
                    q.requires_grad_(False)
                _sync(pairs)
                record(stage.key, res)
            else:
                for k, (name, role) in enumerate(stage.members):
                    stop_check()
                    tell(f"{name}: distilling the linear output")
                    work = get_submodule(s_layer, role.path)
                    params = _trainable(work)
                    for q in params:
                        q.requires_grad_(True)
                    res = _fit_linear(get_submodule(t_layer, role.path), work, x_t, x_s_arg, steps=options.steps,
                                      lr=options.lr, tokens_per_step=tokens_per_step, seed=seed_i + 100 * k,
                                      should_stop=should_stop)
                    for q in params:
                        q.requires_grad_(False)
                    _sync(_pairs(s_orig, s_layer, [(name, role)]))
                    record(name, res)
            del x_t, x_s, x_s_arg
        return t_next

    def copies(i: int) -> tuple[nn.Module, nn.Module]:
        return _work_copy(layers_t[i], device, force=False), _work_copy(layers_s[i], device, force=True)

    if options.order == "bottom-first":
        h_t, h_s = h0_t, h0_s
        last = max(targets)
        for i in range(last + 1):
            stop_check()
            t_layer, s_layer = copies(i)
            t_next = refine_layer(i, t_layer, s_layer, h_t, h_s) if i in targets else None
            if i < last:
                t_next = t_next if t_next is not None else _forward(t_layer, h_t, calls, i, chunk)
                h_s = _forward(s_layer, h_s, calls, i, chunk)
                h_t = t_next
            del t_layer, s_layer, t_next
    else:
        # Going down, refining layer i never changes the stack below it, so every layer's
        # inputs are those of the initialised model: computed in one bottom-up pass and kept
        # when they fit in ``cache_bytes``, else the stack below is re-run for every layer.
        order = sorted(targets, reverse=True)

        def stack_inputs(upto: int, keep: dict[int, tuple[Tensor, Tensor]] | None = None) -> tuple[Tensor, Tensor]:
            """(teacher, student) inputs of layer ``upto`` from the stack below as it is now
            (initialised, not refined); with ``keep``, also those of every target on the way."""
            h_t, h_s = h0_t, h0_s
            for j in range(upto):
                if keep is not None and j in targets:
                    keep[j] = (h_t, h_s)
                stop_check()
                t_layer, s_layer = copies(j)
                h_t, h_s = _forward(t_layer, h_t, calls, j, chunk), _forward(s_layer, h_s, calls, j, chunk)
                del t_layer, s_layer
            return h_t, h_s

        inputs: dict[int, tuple[Tensor, Tensor]] = {}
        need = 2 * h0_t.numel() * h0_t.element_size() * len(order)
        if need <= cache_bytes:
            tell(f"lillama: caching the inputs of {len(order)} layers ({need / 2**20:.0f} MiB)")
            inputs[order[0]] = stack_inputs(order[0], keep=inputs)
            peak.note(list(inputs.values()))
        for i in order:
            h_t, h_s = inputs.pop(i) if i in inputs else stack_inputs(i)
            t_layer, s_layer = copies(i)
            refine_layer(i, t_layer, s_layer, h_t, h_s)
            del t_layer, s_layer, h_t, h_s

    losses = list(report.losses.values())
    report.init_loss = math.fsum(a for a, _ in losses) / len(losses)
    report.final_loss = math.fsum(b for _, b in losses) / len(losses)
    report.seconds = time.perf_counter() - t_start
    report.peak_bytes = peak.value()
    tell(f"lillama: done, loss {report.init_loss:.4g} -> {report.final_loss:.4g} in {report.seconds:.1f}s")
    return report
