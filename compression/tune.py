"""Block-wise tuning after compression: each decoder layer's compressed weights are trained so
that the layer, fed the compressed stack's hidden states, reproduces the dense layer's output.

GPTQ and the low-rank methods fit each linear on its own, to its own inputs. Their errors add
up through the depth, and a layer cannot correct what the layers below got wrong. Tuning
visits the layers bottom-first (as Lillama does) and minimises, per layer ``i``::

    || layer_i^student(h_s) - layer_i^dense(h_t) ||²    (mean over tokens and features)

where ``h_t`` is the dense stack's input of layer ``i`` and ``h_s`` the tuned compressed
stack's. This is block-wise reconstruction as in BRECQ, OmniQuant and EfficientQAT's Block-AP.

What is trained, per layer (nothing else changes; sizes are exactly as before):

* affine-quantised weights (``rtn`` / ``gptq`` ``QuantLinear``, plain or low-rank factors),
  through ``TunableQuant``: an offset per weight in units of its group's step, and a
  log-scale per group (zero points fixed), at ``TuneOptions.lr``. Rounding is
  straight-through. At the end the weights are encoded again on the grid, with the same
  bits and group size;
* vector-quantised weights (``vq`` ``QuantLinear``), through ``TunableVQ``: the codebook
  entries, as offsets in units of their tile's codebook RMS, at ``TuneOptions.lr`` (codes
  fixed; entries rounded straight-through to their storage: the int8 grid of their fixed
  per-tile scales, or fp16);
* plain (unquantised) low-rank factors, in weight units, at ``TuneOptions.factor_lr``.

Memory: besides the hidden states (three ``tokens x hidden`` fp32 tensors), a layer under
training holds about 14 fp32 copies of its weights (offsets, Adam moments, gradients, the
straight-through intermediates); fine for models up to a few billion parameters.

Other quantisation formats (binary, ternary, fp8, mxfp4), dense linears, norms and
embeddings are left as they are (training the norm scales too gave no gain: bench/RESULTS.md
§19), and ``TuneReport.skipped`` names the modules skipped. A
layer whose loss on its evaluation sequences ends above where it started keeps its weights
(``TuneReport.kept``).

Entry points: ``TunableQuant`` / ``TunableVQ`` ``.from_quant`` / ``.to_quant`` (the primitives) and ``tune``
(the orchestration, called by ``compression.apply`` when a plan has ``tune`` options).
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from analysis.adapters import Adapter, get_submodule, set_submodule
from analysis.layerwise import capture, run_layer
from compression.configs import GPTQConfig, RTNConfig, VQConfig
from compression.lillama import EVAL_TOKENS, FORWARD_TOKENS, _Calls, _eval_chunks, _fit, _forward, _work_copy
from compression.lowrank import LowRankLinear
from compression.plan import TuneOptions
from compression.quant import (
    _FP16_TINY,
    QuantLinear,
    codebook_values,
    dequantize_vq,
    int8_steps,
    n_groups,
    pack_bits,
    unpack_bits,
)

Progress = Callable[[float, str], None]
StopCheck = Callable[[], bool]
_F32 = torch.float32
_AFFINE = (RTNConfig, GPTQConfig)
_FP16_MAX = 65504.0


# ----------------------------------------------------------------------------- the primitive
def _per_weight(per_group: Tensor, group_size: int, n: int) -> Tensor:
    """(m, G) -> (m, n): each group's value repeated over its weights (a ragged last group cut)."""
    return per_group.repeat_interleave(group_size, 1)[:, :n]


def _round_ste(x: Tensor) -> Tensor:
    """round(x) forward, identity backward."""
    return x + (x.round() - x).detach()


class TunableQuant(nn.Module):
    """An affine-quantised linear made trainable. With ``s0``, ``z`` the stored per-group scale
    and zero point and ``w0`` the stored weight (on the grid)::

        s = s0 · exp(t)                         t (m, G): trainable log-scale
        w = w0 + d · s0                         d (m, n): trainable offset, in steps
        ŵ = (clamp(round(w / s + z), 0, 2^b - 1) - z) · s

    with straight-through rounding and ``s`` rounded to fp16 as it is stored. At ``d = t = 0``
    the module computes exactly the quantised linear it came from; ``to_quant`` encodes ŵ back
    into a ``QuantLinear`` of the same config (the same bytes)."""

    def __init__(self, config: RTNConfig | GPTQConfig, codes: Tensor, scale: Tensor, zero: Tensor,
                 bias: Tensor | None):
        super().__init__()
        m, n = codes.shape  # codes (m, n) integer-valued; scale, zero (m, G)
        if scale.shape != (m, n_groups(n, config.group_size)) or zero.shape != scale.shape:
            raise ValueError(f"scale {tuple(scale.shape)} / zero {tuple(zero.shape)} do not fit codes "
                             f"{tuple(codes.shape)} in groups of {config.group_size}")
        self.config, self.in_features, self.out_features = config, n, m
        self.qmax = (1 << config.bits) - 1
        self.register_buffer("s0", scale.to(_F32))  # (m, G)
        self.register_buffer("z", zero.to(_F32))  # (m, G)
        self.register_buffer("w0", (codes.to(_F32) - self._full(self.z)) * self._full(self.s0))  # (m, n)
        self.d = nn.Parameter(torch.zeros_like(self.w0))  # (m, n)
        self.t = nn.Parameter(torch.zeros_like(self.s0))  # (m, G)
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(_F32), requires_grad=False)

    @classmethod
    def from_quant(cls, q: QuantLinear) -> TunableQuant:
        if not isinstance(q.config, _AFFINE):
            raise TypeError(f"TunableQuant tunes rtn / gptq grids, not {type(q.config).__name__}")
        codes = unpack_bits(q.qweight, q.config.bits, q.in_features)
        return cls(q.config, codes, q.scale, q.zero, q.bias)

    def _full(self, per_group: Tensor) -> Tensor:
        return _per_weight(per_group, self.config.group_size, self.in_features)

    def scale(self) -> Tensor:
        """(m, G) fp32 holding fp16 values (rounded straight-through)."""
        s = (self.s0 * torch.exp(self.t)).clamp(_FP16_TINY, _FP16_MAX)  # a stored scale is never 0 or inf
        return s + (s.to(torch.float16).to(_F32) - s).detach()

    def _codes(self, s_full: Tensor, rounding: Callable[[Tensor], Tensor]) -> Tensor:
        x = (self.w0 + self.d * self._full(self.s0)) / s_full + self._full(self.z)
        return rounding(x).clamp(0, self.qmax)  # (m, n)

    def weight(self) -> Tensor:
        """The dequantised weight (m, n) fp32, differentiable in ``d`` and ``t``."""
        s = self._full(self.scale())
        return (self._codes(s, _round_ste) - self._full(self.z)) * s

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    @torch.no_grad()
    def to_quant(self, bias_dtype: torch.dtype = _F32) -> QuantLinear:
        """The tuned weight encoded on the grid: a ``QuantLinear`` of the same config."""
        c, m, n = self.config, self.out_features, self.in_features
        out = QuantLinear(c, m, n, bias=self.bias is not None, dtype=bias_dtype, device=self.w0.device)
        scale = self.scale()
        codes = self._codes(self._full(scale), torch.round)
        out.qweight = pack_bits(codes.to(torch.uint8), c.bits)
        out.scale, out.zero = scale.to(torch.float16), self.z.to(torch.float16)
        if self.bias is not None:
            out.bias.copy_(self.bias)
        return out


class TunableVQ(nn.Module):
    """A vector-quantised linear made trainable: its codebook entries, codes fixed. With ``c0``
    the stored centroids (Tr, Tc, k, d) as floats, ``s`` their int8 scales (Tr, Tc, 1, d)
    and ``r`` each tile's codebook RMS (Tr, Tc, 1, 1)::

        c = s · clamp(round((c0 + d · r) / s), ±127)   (int8 codebook; fp16(c0 + d · r) for fp16)

    ``d`` (Tr, Tc, k, d) is trainable and unitless; rounding is straight-through and the
    codebook and row scales stay as stored. At ``d = 0`` it computes exactly the quantised linear it came
    from; ``to_quant`` stores ``c`` back into a ``QuantLinear`` of the same config."""

    def __init__(self, config: VQConfig, qweight: Tensor, codebook: Tensor, perm: Tensor, out_features: int,
                 in_features: int, bias: Tensor | None, codebook_scale: Tensor | None = None,
                 row_scale: Tensor | None = None):
        super().__init__()
        self.config, self.in_features, self.out_features = config, in_features, out_features
        self.register_buffer("qweight", qweight)  # packed codes, unchanged
        self.register_buffer("codes", unpack_bits(qweight, config.code_bits, in_features // config.vector))  # (m, n/d)
        self.register_buffer("perm", perm)  # (n,)
        self.register_buffer("s", None if codebook_scale is None else codebook_scale.to(_F32))  # (Tr, Tc, 1, d)
        self.register_buffer("c0", codebook_values(codebook, codebook_scale))  # (Tr, Tc, k, d)
        self.register_buffer("row_scale", None if row_scale is None else row_scale.to(_F32))  # (m,) 4-d only, as stored
        self.register_buffer("r", self.c0.pow(2).mean((2, 3), keepdim=True).sqrt().clamp_min(_FP16_TINY))
        self.d = nn.Parameter(torch.zeros_like(self.c0))
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(_F32), requires_grad=False)

    @classmethod
    def from_quant(cls, q: QuantLinear) -> TunableVQ:
        if not isinstance(q.config, VQConfig):
            raise TypeError(f"TunableVQ tunes vq codebooks, not {type(q.config).__name__}")
        return cls(q.config, q.qweight, q.codebook, q.perm, q.out_features, q.in_features, q.bias,
                   getattr(q, "codebook_scale", None), getattr(q, "row_scale", None))

    def _entries(self) -> Tensor:
        """(Tr, Tc, k, 2) fp32: the int8 entries as floats (codebook / s), or the fp16 values."""
        c = (self.c0 + self.d * self.r).clamp(-_FP16_MAX, _FP16_MAX)
        if self.s is None:
            return c + (c.to(torch.float16).to(_F32) - c).detach()
        e = c / self.s
        return e + (int8_steps(e) - e).detach()

    def codebook(self) -> Tensor:
        """(Tr, Tc, k, 2) fp32 holding stored values (rounded straight-through)."""
        e = self._entries()
        return e if self.s is None else e * self.s

    def weight(self) -> Tensor:
        """The dequantised weight (m, n) fp32, differentiable in ``d``."""
        return dequantize_vq(self.codes, self.codebook(), self.perm, self.config.rows(self.out_features),
                             self.config.cols(self.in_features), row_scale=self.row_scale)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    @torch.no_grad()
    def to_quant(self, bias_dtype: torch.dtype = _F32) -> QuantLinear:
        """The tuned codebook with the same codes: a ``QuantLinear`` of the same config."""
        out = QuantLinear(self.config, self.out_features, self.in_features, bias=self.bias is not None,
                          dtype=bias_dtype, device=self.c0.device)
        out.qweight, out.perm = self.qweight.clone(), self.perm.clone()
        if self.row_scale is not None:
            out.row_scale = self.row_scale.to(torch.float16)
        if self.s is None:
            out.codebook = self.codebook().to(torch.float16)
        else:
            out.codebook, out.codebook_scale = self._entries().to(torch.int8), self.s.to(torch.float16)
        if self.bias is not None:
            out.bias.copy_(self.bias)
        return out


_TUNABLE = {RTNConfig: TunableQuant, GPTQConfig: TunableQuant, VQConfig: TunableVQ}  # config type -> trainable


# ----------------------------------------------------------------------------- a layer's trainables
def tunable_paths(layer: nn.Module) -> tuple[list[str], list[str]]:
    """Paths inside ``layer`` of what ``tune`` trains (affine and vq ``QuantLinear``s, plain
    low-rank factors) and of the compressed modules it cannot train (other quantisation formats)."""
    train, skip = [], []
    for path, mod in layer.named_modules():
        if isinstance(mod, QuantLinear):
            (train if type(mod.config) in _TUNABLE else skip).append(path)
        elif isinstance(mod, nn.Linear) and path.rpartition(".")[2] in ("A", "B") and isinstance(
                get_submodule(layer, path.rpartition(".")[0]), LowRankLinear):
            train.append(path)
    return train, skip


def make_trainable(work: nn.Module, paths: list[str]) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """In ``work`` (an fp32 copy of a layer, frozen), swap the ``QuantLinear`` at each path for
    a ``TunableQuant`` / ``TunableVQ`` and unfreeze plain factors. Returns the trainable
    parameters: the tunables' (unitless offsets, log-scales) and the plain factors' (in weight units)."""
    quant: list[nn.Parameter] = []
    factors: list[nn.Parameter] = []
    for path in paths:
        mod = get_submodule(work, path)
        if isinstance(mod, QuantLinear):
            t = _TUNABLE[type(mod.config)].from_quant(mod)
            set_submodule(work, path, t)
            quant += [p for p in t.parameters() if p.requires_grad]
        else:
            mod.weight.requires_grad_(True)
            factors.append(mod.weight)
    return quant, factors


@torch.no_grad()
def write_back(work: nn.Module, layer: nn.Module, paths: list[str]) -> None:
    """Put the tuned modules of ``work`` into ``layer`` (the model's own), in its dtypes."""
    for path in paths:
        mod, orig = get_submodule(work, path), get_submodule(layer, path)
        if isinstance(mod, (TunableQuant, TunableVQ)):
            bias_dtype = orig.bias.dtype if orig.bias is not None else _F32
            set_submodule(layer, path, mod.to_quant(bias_dtype).to(orig.qweight.device))
        else:
            orig.weight.copy_(mod.weight.detach().to(orig.weight.dtype))
            mod.weight.requires_grad_(False)


# ----------------------------------------------------------------------------- orchestration
@dataclass
class TuneReport:
    losses: dict[str, tuple[float, float]] = field(default_factory=dict)  # layer -> (before, after) on eval seqs
    kept: dict[str, float] = field(default_factory=dict)  # layer -> trained (rejected) loss
    skipped: list[str] = field(default_factory=list)  # compressed modules that cannot be tuned
    tokens: int = 0  # calibration tokens used
    seqlen: int = 0
    seconds: float = 0.0

    def summary(self) -> str:
        if not self.losses:
            return "tune: nothing to tune" + (f" ({len(self.skipped)} module(s) of other formats)"
                                              if self.skipped else "")
        gain = [after / before for before, after in self.losses.values() if before > 0]
        mid = sorted(gain)[len(gain) // 2] if gain else 1.0
        text = (f"tuned {len(self.losses)} layer(s) on {self.tokens} tokens ({self.seqlen}-token sequences) in "
                f"{self.seconds:.0f}s: median layer loss x{mid:.2f}")
        if self.kept:
            text += f"; {len(self.kept)} kept as they were (training did not lower their loss)"
        if self.skipped:
            text += f"; {len(self.skipped)} module(s) of other formats left as they were"
        return text


def tune_ids(calib_ids: Tensor, options: TuneOptions) -> Tensor:
    """Calibration windows (C, L) cut into sequences of ``options.seqlen`` (whole windows when
    shorter), the first ``options.calib_tokens`` tokens' worth (at least one sequence)."""
    if calib_ids.dim() != 2 or calib_ids.numel() == 0 or calib_ids.is_floating_point():
        raise ValueError(f"tune: calibration ids must be a non-empty (C, L) tensor of token ids, "
                         f"got {tuple(calib_ids.shape)} {calib_ids.dtype}")
    c, length = calib_ids.shape
    seq = min(options.seqlen, length)
    ids = calib_ids[:, :length // seq * seq].reshape(-1, seq)  # (C * L // seq, seq)
    return ids[:max(1, options.calib_tokens // seq)]


def tune(teacher: nn.Module, student: nn.Module, adapter: Adapter, options: TuneOptions, calib_ids: Tensor, *,
         device: torch.device | str, progress: Progress | None = None, should_stop: StopCheck | None = None,
         seed: int = 0) -> TuneReport:
    """Tune ``student`` (a compressed copy of the dense ``teacher``, which is read-only) in
    place, layer by layer, bottom-first; see the module docstring. Training is fp32 on
    ``device`` on a copy of each layer; each layer is written back when done, so a stop
    (``should_stop()`` true: ``InterruptedError``) leaves the finished layers tuned (but
    ``apply_plan`` then discards the whole student)."""
    options.check()
    device = torch.device(device)
    t0 = time.perf_counter()
    report = TuneReport()
    layers_t, layers_s = adapter.layers(teacher), adapter.layers(student)
    if len(layers_t) != len(layers_s):
        raise ValueError(f"the student has {len(layers_s)} layers, the teacher {len(layers_t)}")
    plans = [tunable_paths(layer) for layer in layers_s]
    report.skipped = [f"{adapter.layer_name(i)}.{p}" for i, (_, skip) in enumerate(plans) for p in skip]
    todo = [i for i, (train, _) in enumerate(plans) if train]
    if not todo:
        return report
    ids = tune_ids(calib_ids, options)
    n_seq, seqlen = ids.shape
    report.tokens, report.seqlen = ids.numel(), seqlen
    batch = max(1, min(n_seq, options.tokens_per_step // seqlen))
    chunk = max(1, FORWARD_TOKENS // seqlen)
    say = progress or (lambda f, m: None)

    def stop_check() -> None:
        if should_stop is not None and should_stop():
            raise InterruptedError("tuning stopped")

    say(0.0, f"tune: capturing {report.tokens} calibration tokens")
    calls = _Calls(teacher, adapter, ids, device)
    h_t = torch.cat([capture(teacher, adapter, ids[s:s + chunk]).hidden.to(device=device, dtype=_F32)
                     for s in range(0, n_seq, chunk)])  # (C', L', D)
    h_s = h_t.clone()  # compression changes decoder linears only: layer 0's input is the same (one capture pass)
    gen = torch.Generator().manual_seed(seed)
    eval_chunks = _eval_chunks(n_seq, max(1, EVAL_TOKENS // seqlen), batch, device)
    for i in range(todo[-1] + 1):
        stop_check()
        t_layer = _work_copy(layers_t[i], device, force=False)
        y = _forward(t_layer, h_t, calls, i, chunk)  # the dense layer's output: the target, and the next h_t
        if i in todo:
            key = adapter.layer_name(i)
            say(todo.index(i) / len(todo), f"tune {key}: {options.steps} steps")
            work = _work_copy(layers_s[i], device, force=True)
            paths = plans[i][0]
            quant, factors = make_trainable(work, paths)
            groups = [g for g in ({"params": quant}, {"params": factors, "lr": options.factor_lr}) if g["params"]]

            def sample() -> Tensor:
                return torch.randperm(n_seq, generator=gen)[:batch].to(device)

            res = _fit(lambda x, w=work, i=i: run_layer(w, x, calls(x.shape[0], i)), lambda idx: y[idx], groups,
                       h_s, None, steps=options.steps, lr=options.lr, sample=sample, eval_chunks=eval_chunks,
                       should_stop=should_stop, loss_fn=F.mse_loss, what=f"tuning of {key}")
            write_back(work, layers_s[i], paths)
            before, after = res.init_loss / 2, res.final_loss / 2  # _fit doubles a loss with one input
            report.losses[key] = (before, after)
            if res.trained_loss is not None:
                report.kept[key] = res.trained_loss / 2
            say((todo.index(i) + 1) / len(todo), f"tune {key}: output error {before:.4g} -> {after:.4g}")
            del work, quant, factors, groups
        if i < todo[-1]:
            h_s = _forward(_work_copy(layers_s[i], device, force=False), h_s, calls, i, chunk)
        h_t = y
        del t_layer
    report.seconds = time.perf_counter() - t0
    say(1.0, report.summary())
    return report

