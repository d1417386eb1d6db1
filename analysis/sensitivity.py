"""Per-linear sensitivity: the calibration-loss increase when *only one* linear is compressed.

For every decoder linear and every setting of a small grid (ranks at fractions of the
break-even rank, and bit widths) ``measure_sensitivity`` replaces that one linear by its
compressed version and measures the mean next-token NLL on calibration windows (the
convention of ``analysis.metrics.window_nll``), minus the dense model's. The allocator
(``compression.allocate``) adds these increases up to predict the loss of a whole plan.

Speed (this is the expensive part of RankLab on a CPU):

* the dense input of every decoder layer is computed once and cached, so a probe of a
  linear in layer ``l`` re-runs only layers ``l .. L-1`` and the head;
* each setting's replacement module is built once (with the real registry handler), and
  its *effective affine map* ``(Ŵ, b̂)`` (``B @ A``, or the dequantised weight) is what the
  probe runs, exactly what the module computes up to float rounding;
* all settings of one linear run as one batch of ``S x C`` windows: a ``_Stacked`` module
  applies setting ``s``'s weight to rows ``s*C .. (s+1)*C`` with one ``bmm``, and every
  layer above sees one big batch (bigger matmuls, one Python pass instead of ``S``);
* logits are formed in token chunks (a 49k vocabulary would otherwise need GBs) and turned
  into log-probabilities in place;
* probes never modify the model (the probed layer runs as a shallow copy holding the stacked
  stand-in, ``with_module``), so on a CPU several run at once: one single-threaded worker
  per core (``workers``). Small element-wise ops and attention parallelise badly over
  OpenMP threads on a 2-core machine; whole probes parallelise perfectly;
* derived widths (``DERIVED_BITS``: 8 bits): not probed but scaled from the 4-bit probe by
  the ratio of the output-Fisher quadratic forms of the two settings (``derive_ratio``, the
  first view's formula, which needs no forward). In the quadratic regime a probe's KL is that
  form, and 8-bit rounding noise is 4-bit noise scaled down: on SmolLM2 (256 tokens) the
  derived 8-bit KL was 0.96x the probed one at the median (0.71-1.21x for 80 % of linears)
  and the 8-bit KLs of all 210 linears add up to 0.0017 nats, 0.4 % of the 4-bit ones.

``proxy_sensitivity`` is the cheap first view: one forward + backward gives the mean
squared gradient of the loss w.r.t. every linear's output (a diagonal Fisher ``F_y``), and
``dloss ≈ ½ tr(diag(F_y) ΔW̃ Σ̃ ΔW̃ᵀ)`` with ``ΔW̃ = [W - Ŵ, b - b̂]`` and ``Σ̃`` the second
moment of ``[x; 1]``: no forward per setting. Two choices set its level (``output_fisher``):

* the targets differentiated are drawn from the model's own next-token distribution, so
  ``F_y`` is the model's Fisher, the curvature of the KL from the dense model that the
  measured grid adds up (the real next tokens give the empirical Fisher, larger where the
  model is unsure: 1.5x on SmolLM2);
* ``Σ̃`` weights each token by its squared output gradient ``|g_t|²`` instead of taking the
  plain profile moment. Tokens with huge activations and little influence on the loss (the
  attention sink at each window's start) dominate the plain moment; with it, the sum over
  linears overestimated SmolLM2's loss increase under 4-bit RTN 9x (2.81 vs 0.315 nats
  measured), with the weighting 1.2x (0.376), and 3-bit 1.33 vs 1.50 measured
  (``bench/bench_first_view.py``; RESULTS §4);
* no token weighs more than ``TOKEN_CAP`` (100) times the median token of its chunk
  (``token_cap``). At the first positions of a window the loss is sharply curved and then
  flat: on SmolLM2, 4-bit RTN of layer 0's v_proj applied at positions 0-1 alone has a
  quadratic term of 7.25 nats and a real KL of 0.0115, while from position 2 on the two
  agree (0.0006 and 0.0006). One such window in the calibration text had made the whole
  first view 43x too high (13.7 nats for 4 bits, 0.315 measured); capped, it gives 0.44,
  and on texts without such a window the cap lowers the sum by 5-10 % (RESULTS §10).

First-order part. A measured dloss on C calibration tokens is ``<Ŵ - W, ∂L/∂W>`` (first
order) plus the curvature part. On SmolLM2-135M with 2 x 256-token halves of the default
text, the first-order part was as large as the whole dloss for the median setting and did
not reproduce between halves (Spearman of raw dloss half vs half 0.45; of dloss minus the
first-order part 0.88; 27 % vs 8 % of settings negative), i.e. it is mostly sampling noise.
``measure_sensitivity`` therefore also records it (``grid.first_order``, one extra backward
pass) and ``SensitivityGrid.curvature_table`` removes it; ``dloss`` itself stays the plain
calibration-loss increase.

KL. Each probe also records the mean ``KL(dense || probe)`` over the predicted tokens
(``grid.kl``, same forward pass; the dense distributions are kept, tokens x vocabulary
floats). It is the loss increase expected on text drawn from the dense model: never
negative, no first-order term, and it compares whole next-token distributions instead of
one sampled target, so it is far less noisy on a few hundred tokens. ``Predictor`` can add
up ``dloss``, ``curvature`` or ``kl`` (``SensitivityGrid.estimate``).

Cost and defaults. A probe (one setting of one linear) re-runs on average half the model
plus the head, so the grid's cost is ~1470 settings x (tokens x ~0.18 GFLOP) on SmolLM2-135M
and is linear in the number of tokens. On the 2-core CPU (bench/RESULTS.md section 4): the
full grid took 701 s at 256 tokens and 346 s at 128 with one 2-thread worker and every
setting probed; with 2 single-thread workers, 8 bits derived and the in-place head, 227 s
at 128 tokens (1.37x on the same linears in one interleaved run: 1.07x head, 1.15x workers,
1.10x derived widths). ``DEFAULT_TOKENS`` is therefore 128 (one window): the KL estimator
ranked 12 random plans with Spearman 0.986 there against 0.993 at 256 tokens. At that size
the first-order part of a raw dloss is mostly noise, which is why ``curvature_table`` and the
KL exist. A head restricted to the union of the dense top-k next tokens (the rest of the
vocabulary held at its dense mass) was tried: it cut ~35 % of a probe, but its error reached
0.002 nats even at top-512 (0.8 % of the probability outside the subset), the size of small
settings' dloss, so it was dropped.
"""
from __future__ import annotations

import copy
import dataclasses
import datetime as _dt
import hashlib
import json
import math
import shutil
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import compression.lowrank  # noqa: F401  (registers the low-rank handlers)
import compression.quant  # noqa: F401  (registers the quantisation handlers)
from analysis.adapters import Adapter, LinearInfo, get_submodule, set_submodule
from analysis.atomic import EXACT_FLOATS, atomic_folder, check_replaceable, holds, save_to_cache
from analysis.layerwise import _Recorder, _Stop, run_head, run_layer
from analysis.stats import InputStats, LinearStats
from compression.configs import bit_width
from compression.lowrank import NESTED, LowRankLinear
from compression.plan import LOWRANK_METHODS, QUANT_METHODS, ModuleSpec, weight_bytes
from compression.quant import QuantLinear
from compression.registry import handler_for

Progress = Callable[[float, str], None]
SENSITIVITY_FORMAT = 1
SENSITIVITY_MARKERS = ("meta.json", "table.csv")  # what makes a folder a sensitivity grid (meta.json last)
TABLE_COLUMNS = ["name", "layer", "role", "kind", "setting", "dloss", "bytes"]
FIRST_ORDER_COLUMNS = ["name", "kind", "setting", "dloss_first"]
KL_COLUMNS = ["name", "kind", "setting", "kl"]
FRACTIONS = (0.25, 0.5, 0.75)
BITS_GRID = (2, 3, 4, 8)
DERIVED_BITS = (8,)  # not probed by default: scaled from the 4-bit probe (module docstring)
TOKEN_CAP = 100.0  # the first view: no token weighs more than this x its chunk's median token (module docstring)
# Defaults that keep the full grid of SmolLM2-135M to ~10 minutes on a 2-core CPU
# (see ``cli_sensitivity``): probes run on DEFAULT_TOKENS tokens, the statistics the
# compressed replacements are fitted on come from a (cached) profile of PROFILE_TOKENS.
DEFAULT_TOKENS = 128
DEFAULT_SEQLEN = 256
PROFILE_TOKENS = 8192
MAX_BATCH_TOKENS = 16384  # tokens per stacked probe pass (settings are split beyond it)
HEAD_CHUNK_TOKENS = 512  # tokens per logits chunk (per probe worker)


# ------------------------------------------------------------------------ grid
def rank_grid(li: LinearInfo, fractions: Sequence[float] = FRACTIONS) -> list[int]:
    """Ranks at ``fractions`` of the break-even rank, rounded to a multiple of 8, at least 8
    and at most ``min(m, n)``; ascending, without duplicates."""
    full = min(li.out_features, li.in_features)
    out = set()
    for f in fractions:
        r = int(math.floor(f * li.break_even / 8 + 0.5)) * 8
        out.add(min(max(8, r), full))
    return sorted(out)


def settings_for(li: LinearInfo, fractions: Sequence[float] = FRACTIONS,
                 bits: Sequence[float] = BITS_GRID) -> list[tuple[str, int | float]]:
    """The grid of one linear: ``[("rank", r) ...] + [("bits", b) ...]`` (b may be vq's 2.5)."""
    return [("rank", r) for r in rank_grid(li, fractions)] + [("bits", b) for b in sorted({bit_width(b) for b in bits})]


def setting_spec(kind: str, setting: float, method: str, quant: str, group_size: int) -> ModuleSpec:
    if kind == "rank":
        return ModuleSpec(rank=int(setting), lowrank=method)
    if kind == "bits":
        return ModuleSpec(bits=bit_width(setting), group_size=group_size, quant=quant)
    raise ValueError(f"unknown setting kind {kind!r}")


PROBED_LOWRANK = ("svd", "act-pca", "svd-llm")  # closed-form fits: one per probe
PROBED_QUANT = ("rtn", "gptq", "vq")  # quantisers with several widths (vq: 2/2.5/3/4 bits, see ``grid_bits``)


def grid_bits(bits: Sequence[float], quant: str) -> tuple[int | float, ...]:
    """The widths of ``bits`` that ``quant`` stores, and the fractional widths it stores
    between them (vq has no 8-bit codebook and a 2.5-bit one: from the default 2/3/4/8 its
    grid is 2/2.5/3/4). When it stores none of them, ``bits`` unchanged, for
    ``_check_settings`` to refuse."""
    allowed = QUANT_METHODS[quant].allowed_bits if quant in QUANT_METHODS else ()
    widths = sorted({bit_width(b) for b in bits})
    kept = [b for b in widths if b in allowed]
    if not kept:
        return tuple(widths)
    between = [bit_width(b) for b in allowed if not float(b).is_integer() and kept[0] < b < kept[-1]]
    return tuple(sorted(set(kept + between)))


def check_methods(method: str, quant: str) -> None:
    """Raise when the grid cannot probe ``method`` / ``quant``, saying which it can."""
    if method not in PROBED_LOWRANK:
        hint = " (lillama plans use the grid of its initialisation, e.g. svd-llm)" if method == "lillama" else ""
        raise ValueError(f"sensitivity --method {method!r}: probes one of {', '.join(PROBED_LOWRANK)}{hint}")
    if quant not in PROBED_QUANT:
        raise ValueError(f"sensitivity --quant {quant!r}: probes one of {', '.join(PROBED_QUANT)}")


def _check_settings(linears: list[LinearInfo], grid: dict[str, list[tuple[str, int]]], method: str, quant: str,
                    group_size: int) -> None:
    """Raise before any long run if a setting cannot be built (unknown method, bad group size)."""
    check_methods(method, quant)
    errors: dict[str, list[str]] = {}  # message -> the settings it refuses (one line per distinct reason)
    for li in linears:
        for kind, s in grid[li.name]:
            spec = setting_spec(kind, s, method, quant, group_size)
            try:
                lr, q = spec.lowrank_config(), spec.quant_config()
                if lr is not None:
                    lr.check(li.out_features, li.in_features)
                if q is not None:
                    q.check(li.in_features)
            except ValueError as e:
                errors.setdefault(str(e), []).append(f"{li.name} ({kind} {s})")
    if errors:
        lines = [f"{msg} ({len(where)} setting{'s' if len(where) > 1 else ''}, e.g. {where[0]})"
                 for msg, where in list(errors.items())[:6]]
        more = f"\n(and {len(errors) - 6} more reasons)" if len(errors) > 6 else ""
        raise ValueError("sensitivity settings cannot be built:\n- " + "\n- ".join(lines) + more)


# ------------------------------------------------------------------------ replacements
@torch.no_grad()
def effective_affine(mod: nn.Module, in_features: int) -> tuple[Tensor, Tensor | None]:
    """``(Ŵ (m, n), b̂ (m,) or None)`` with ``mod(x) == x Ŵᵀ + b̂`` (up to float rounding)."""
    if isinstance(mod, nn.Linear):
        return mod.weight.detach(), None if mod.bias is None else mod.bias.detach()
    if isinstance(mod, QuantLinear):
        b = None if mod.bias is None else mod.bias.detach()
        return mod.dequantized_weight(b.dtype if b is not None else torch.float32), b
    ref = next(iter(mod.parameters()), None)
    if ref is None:
        ref = next(iter(mod.buffers()))
    dtype = ref.dtype if ref.dtype.is_floating_point else torch.float32
    eye = torch.eye(in_features, dtype=dtype, device=ref.device)
    if isinstance(mod, LowRankLinear):
        w = mod.B(mod.A(eye)).T.contiguous()
        return w, None if mod.bias is None else mod.bias.detach()
    b = mod(torch.zeros(1, in_features, dtype=dtype, device=ref.device))[0]  # generic affine module
    w = (mod(eye) - b).T.contiguous()
    return w, b if bool(b.any()) else None


@contextmanager
def _single_thread(device: torch.device):
    """One intra-op thread for the factorisations on CPU. LAPACK's SVD / eigh of these
    sizes gains little from a second thread, and on a busy 2-core machine OpenMP barriers
    made a 576 x 1536 float64 SVD take 16 s with 2 threads against 0.27 s with one."""
    before = torch.get_num_threads()
    if device.type == "cpu" and before > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


@torch.no_grad()
def truncated_weights(linear: nn.Linear, ranks: Sequence[int], stats: LinearStats | None,
                      method: str) -> list[Tensor] | None:
    """``B @ A`` of a low-rank method at several ranks from *one* decomposition, for methods
    whose factors are nested truncations (their config type is in ``compression.lowrank.NESTED``:
    svd, svd-llm); same maths as their handlers (float64, then the weight's dtype). None for
    other methods, which go through their handler once per rank."""
    cls = LOWRANK_METHODS.get(method)
    nested = NESTED.get(cls) if cls is not None else None
    if nested is None:
        return None
    w = linear.weight.detach()
    m, n = w.shape
    for k in ranks:
        cls(rank=k).check(m, n)
    kmax = max(ranks)
    left, right = nested(w, stats, cls(rank=kmax), kmax)  # (m, kmax), (kmax, n)
    return [(left[:, :k] @ right[:k]).to(w.dtype) for k in ranks]


@torch.no_grad()
def compressed_affines(linear: nn.Module, li: LinearInfo, settings: list[tuple[str, int]], stats: LinearStats | None,
                       method: str, quant: str, group_size: int) -> list[tuple[Tensor, Tensor | None]]:
    """The effective ``(Ŵ, b̂)`` of each setting: each built once with the registry handler,
    except the ranks of svd / svd-llm, which share one decomposition (``truncated_weights``)."""
    out: dict[tuple[str, int], tuple[Tensor, Tensor | None]] = {}
    with _single_thread(linear.weight.device):
        ranks = [s for kind, s in settings if kind == "rank"]
        fast = truncated_weights(linear, ranks, stats, method) if ranks and isinstance(linear, nn.Linear) else None
        if fast is not None:
            bias = None if linear.bias is None else linear.bias.detach()
            out.update({("rank", k): (w, bias) for k, w in zip(ranks, fast)})
        for kind, s in settings:
            if (kind, s) in out:
                continue
            spec = setting_spec(kind, s, method, quant, group_size)
            cfg = spec.lowrank_config() if kind == "rank" else spec.quant_config()
            mod = handler_for(cfg)(linear, cfg, stats)
            w, b = effective_affine(mod, li.in_features)
            out[(kind, s)] = (w.to(linear.weight.dtype), None if b is None else b.to(linear.weight.dtype))
    return [out[ks] for ks in settings]


class _Stacked(nn.Module):
    """Applies weight ``s`` to rows ``s*C .. (s+1)*C`` of a batch of ``S*C`` rows."""

    def __init__(self, weights: Tensor, bias: Tensor | None):
        super().__init__()
        self.weight_t = weights.transpose(1, 2)  # (S, n, m)
        self.bias = bias  # (S, 1, m) or None
        self.in_features, self.out_features = weights.shape[2], weights.shape[1]

    def forward(self, x: Tensor) -> Tensor:
        s = self.weight_t.shape[0]
        xs = x.reshape(s, -1, self.in_features)  # (S, C*L, n)
        y = torch.bmm(xs, self.weight_t) if self.bias is None else torch.baddbmm(self.bias, xs, self.weight_t)
        return y.reshape(*x.shape[:-1], self.out_features)


def _stack(affines: list[tuple[Tensor, Tensor | None]]) -> _Stacked:
    w = torch.stack([a for a, _ in affines])  # (S, m, n)
    if all(b is None for _, b in affines):
        return _Stacked(w, None)
    m = w.shape[1]
    b = torch.stack([torch.zeros(m, dtype=w.dtype, device=w.device) if b is None else b for _, b in affines])
    return _Stacked(w, b[:, None, :])


# ------------------------------------------------------------------------ layer replay
@torch.no_grad()
def _capture(model: nn.Module, adapter: Adapter, ids: Tensor) -> tuple[Tensor, list[tuple[tuple, dict]]]:
    """Like ``analysis.layerwise.capture`` but stops at the last layer (no head on the batch)."""
    layers = adapter.layers(model)
    originals = list(layers)
    recorders = [_Recorder(layer, stop=i == len(originals) - 1) for i, layer in enumerate(originals)]
    try:
        for i, r in enumerate(recorders):
            layers[i] = r
        try:
            model(input_ids=ids.to(next(model.parameters()).device), use_cache=False)
        except _Stop:
            pass
    finally:
        for i, layer in enumerate(originals):
            layers[i] = layer
    calls = [(r.args, {k: v for k, v in r.kwargs.items() if k not in ("past_key_values", "past_key_value")})
             for r in recorders]
    return recorders[0].hidden, calls


@dataclass
class DenseDist:
    """The dense model's next-token distributions on the calibration windows, for the KL of a
    probe: ``KL(p || q) = -H(p) - sum_v p_v log q_v`` per predicted token."""

    probs: Tensor  # (C, L-1, V) float32
    neg_entropy: Tensor  # (C, L-1) float64: sum_v p_v log p_v


@torch.no_grad()
def dense_dist(model: nn.Module, adapter: Adapter, hidden: Tensor,
               chunk_tokens: int = HEAD_CHUNK_TOKENS) -> DenseDist:
    """``DenseDist`` from the dense last hidden state (C, L, D). Memory: C x (L-1) x V floats."""
    c, length = hidden.shape[:2]
    rows = max(1, chunk_tokens // length)
    probs, neg_h = [], []
    for i in range(0, c, rows):
        logp = run_head(model, adapter, hidden[i:i + rows, :-1]).float()  # (r, L-1, V)
        logp -= torch.logsumexp(logp, -1, keepdim=True)
        p = logp.exp()
        probs.append(p)
        neg_h.append((p * logp).sum(-1).double())  # the same sum as a probe's cross term
    return DenseDist(torch.cat(probs), torch.cat(neg_h))


def _window_nll(model: nn.Module, adapter: Adapter, hidden: Tensor, targets: Tensor,
                chunk_tokens: int = HEAD_CHUNK_TOKENS) -> Tensor:
    """Summed next-token NLL per window (B,) float64 (see ``_window_losses``)."""
    return _window_losses(model, adapter, hidden, targets, None, chunk_tokens)[0]


def _window_losses(model: nn.Module, adapter: Adapter, hidden: Tensor, targets: Tensor,
                   dense: DenseDist | None = None,
                   chunk_tokens: int = HEAD_CHUNK_TOKENS) -> tuple[Tensor, Tensor | None]:
    """Summed next-token NLL per window (B,) float64, from the last hidden state (B, L, D)
    and ``targets`` = ids[:, 1:] (C, L-1), where ``B`` is a multiple of ``C`` (a stacked
    probe batch: window ``i`` is calibration window ``i % C``); and, given the dense model's
    distributions ``dense``, the summed KL(dense || this) per window (B,) (else None).

    Logits are made a few windows at a time and turned into log-probabilities in place (no
    vocabulary-sized temporaries beyond the logits, logsumexp's and one window's product buffer).
    ``Σ_v p_v log q_v`` is a float32 cascade sum of ``p * log q``: ``p·z - lse`` would skip the
    in-place pass but subtracts numbers ~20x larger, and a ``bmm`` dot product sums sequentially;
    both lost ~1e-4 nats against a float64 reference, this keeps ~1e-5."""
    b, length = hidden.shape[:2]
    c = targets.shape[0]
    rows = max(1, chunk_tokens // length)
    out, kls = [], []
    for i in range(0, b, rows):
        idx = torch.arange(i, min(i + rows, b), device=targets.device) % c  # calibration window of each row
        logq = run_head(model, adapter, hidden[i:i + rows, :-1]).float()  # (r, L-1, V) logits ...
        logq -= torch.logsumexp(logq, -1, keepdim=True)  # ... now log q, in place
        nll = -logq.gather(-1, targets[idx].unsqueeze(-1)).squeeze(-1)  # (r, L-1)
        out.append(nll.double().sum(1))
        if dense is not None:
            buf = torch.empty_like(logq[0])  # (L-1, V), reused row after row
            for k, w in enumerate(idx.tolist()):
                cross = torch.mul(dense.probs[w], logq[k], out=buf).sum(-1)  # (L-1,) Σ_v p_v log q_v
                kls.append((dense.neg_entropy[w] - cross.double()).sum().view(1))
    return torch.cat(out), (torch.cat(kls) if kls else None)


def _check_stop(should_stop: Callable[[], bool] | None, what: str) -> None:
    if should_stop is not None and should_stop():
        raise InterruptedError(f"{what} cancelled; the model is unchanged")


@contextmanager
def _frozen(model: nn.Module):
    """Parameters temporarily not requiring grad: activation gradients only, no ``.grad``."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def _layer_output_grads(model: nn.Module, adapter: Adapter, h0: Tensor, ids: Tensor, count: int,
                        chunk_tokens: int = 512) -> list[Tensor]:
    """Gradient of the mean token NLL (over ``count`` predicted tokens) w.r.t. every decoder
    layer's output, (C, L, D) each; windows are processed a few at a time."""
    layers = adapter.layers(model)
    grads = [torch.empty_like(h0) for _ in layers]
    rows = max(1, chunk_tokens // ids.shape[1])
    calls_by_rows: dict[int, list] = {}
    for i in range(0, ids.shape[0], rows):
        batch = ids[i:i + rows]
        n = batch.shape[0]
        if n not in calls_by_rows:
            calls_by_rows[n] = _capture(model, adapter, batch)[1]
        calls = calls_by_rows[n]
        with torch.enable_grad():
            x = h0[i:i + rows].detach().requires_grad_(True)
            outs = []
            for j, layer in enumerate(layers):
                x = run_layer(layer, x, calls[j])
                outs.append(x)
            logits = run_head(model, adapter, x[:, :-1])
            loss = F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten(), reduction="sum") / count
            for j, g in enumerate(torch.autograd.grad(loss, outs)):
                grads[j][i:i + rows] = g
    return grads


class _Tap(nn.Module):
    """Runs ``inner`` and records ``(input, output)`` under ``name`` in ``seen``."""

    def __init__(self, inner: nn.Module, name: str, seen: dict):
        super().__init__()
        self.inner, self.name, self.seen = inner, name, seen

    def forward(self, x: Tensor) -> Tensor:
        y = self.inner(x)
        self.seen[self.name] = (x, y)
        return y


def _layer_weight_grads(layer: nn.Module, modules: dict[str, nn.Module], paths: dict[str, str], x_in: Tensor,
                        call: tuple[tuple, dict], grad_out: Tensor) -> dict[str, tuple[Tensor, Tensor, Tensor]]:
    """For the linears ``modules`` of one layer: ``(∂L/∂W, ∂L/∂b, F)`` = ``(Σ_t g_t x_tᵀ, Σ_t g_t,
    Σ_t g_t²)`` with ``g_t`` the loss gradient at the linear's output, from the layer's dense
    input and the gradient at its output (a local backward; no parameter ``.grad`` is written).
    ``F`` (m,) is the diagonal output Fisher up to a constant (what ``derive_ratio`` needs)."""
    seen: dict[str, tuple[Tensor, Tensor]] = {}
    twin = layer
    for name, mod in modules.items():  # taps on a private copy: no hooks on shared modules
        twin = with_module(twin, paths[name], _Tap(mod, name, seen))
    with torch.enable_grad():
        x = x_in.detach().requires_grad_(True)
        out = run_layer(twin, x, call)
        names = [n for n in modules if n in seen]
        gys = torch.autograd.grad(out, [seen[n][1] for n in names], grad_outputs=grad_out, allow_unused=True)
    res = {}
    for name, gy in zip(names, gys):
        xin = seen[name][0].detach()
        m, n = modules[name].out_features, modules[name].in_features
        if gy is None:
            zero = torch.zeros(m, dtype=torch.float64, device=x_in.device)
            res[name] = (torch.zeros(m, n, dtype=torch.float64, device=x_in.device), zero, zero)
            continue
        g2 = gy.reshape(-1, m).double()
        res[name] = (g2.T @ xin.reshape(-1, n).double(), g2.sum(0), g2.pow(2).sum(0))
    return res


def first_order_terms(weight: Tensor, bias: Tensor | None, affines: list[tuple[Tensor, Tensor | None]],
                      grad_w: Tensor, grad_b: Tensor) -> list[float]:
    """``<Ŵ - W, ∂L/∂W> + <b̂ - b, ∂L/∂b>`` per setting: the first-order part of each dloss."""
    w = weight.detach().double()
    b = torch.zeros(w.shape[0], dtype=torch.float64, device=w.device) if bias is None else bias.detach().double()
    out = []
    for wh, bh in affines:
        db = (torch.zeros_like(b) if bh is None else bh.double()) - b
        out.append(float(((wh.double() - w) * grad_w).sum() + (db * grad_b).sum()))
    return out


# ------------------------------------------------------------------------ the grid artifact
@dataclass
class SensitivityGrid:
    """Measured (or proxy) loss increases per linear and setting, with how they were made."""

    meta: dict
    table: pd.DataFrame  # TABLE_COLUMNS
    proxy: pd.DataFrame | None = None  # same schema: the gradient proxy, when computed alongside
    first_order: pd.DataFrame | None = None  # FIRST_ORDER_COLUMNS: the first-order part of each measured dloss
    kl: pd.DataFrame | None = None  # KL_COLUMNS: mean KL(dense || probe) per predicted token
    folder: str | None = field(default=None, compare=False)

    @property
    def dense_loss(self) -> float:
        return float(self.meta["dense_loss"])

    def save(self, folder: str | Path, cache: bool = False) -> None:
        """Write atomically: a temp folder renamed into place, ``meta.json`` written last
        (``cache``: into RankLab's cache, see ``atomic_folder``)."""
        folder = Path(folder).expanduser()
        with atomic_folder(folder, SENSITIVITY_MARKERS, "a sensitivity grid", cache=cache) as tmp:
            self.table[TABLE_COLUMNS].to_csv(tmp / "table.csv", index=False)
            if self.proxy is not None:
                self.proxy[TABLE_COLUMNS].to_csv(tmp / "proxy.csv", index=False)
            if self.first_order is not None:
                self.first_order[FIRST_ORDER_COLUMNS].to_csv(tmp / "first_order.csv", index=False)
            if self.kl is not None:
                self.kl[KL_COLUMNS].to_csv(tmp / "kl.csv", index=False)
            (tmp / "meta.json").write_text(json.dumps(self.meta, indent=2))
        self.folder = str(folder)

    @classmethod
    def load(cls, folder: str | Path) -> SensitivityGrid:
        folder = Path(folder).expanduser()
        if not (folder / "meta.json").exists():
            raise FileNotFoundError(f"{folder} holds no complete sensitivity grid (meta.json missing); "
                                    "measure one with `python -m analysis sensitivity --out FOLDER`")
        meta = json.loads((folder / "meta.json").read_text())
        if not (folder / "table.csv").exists():  # another RankLab artefact, named for what it is
            what = ("a profile (spectra), not a sensitivity grid" if (folder / "arrays.safetensors").exists()
                    else "no sensitivity table (table.csv)")
            raise ValueError(f"{folder} holds {what}: give the --out folder of `python -m analysis sensitivity`")
        if meta.get("format") != SENSITIVITY_FORMAT:
            raise ValueError(f"{folder}: sensitivity format {meta.get('format')} is not {SENSITIVITY_FORMAT}; "
                             "measure it again")
        table = _read_table(folder / "table.csv")
        proxy = _read_table(folder / "proxy.csv") if (folder / "proxy.csv").exists() else None
        first = None
        if (folder / "first_order.csv").exists():
            first = pd.read_csv(folder / "first_order.csv", dtype={"name": str, "kind": str}, **EXACT_FLOATS)
            first = first.astype({"setting": float, "dloss_first": float})[FIRST_ORDER_COLUMNS]
        kl = None
        if (folder / "kl.csv").exists():
            kl = pd.read_csv(folder / "kl.csv", dtype={"name": str, "kind": str}, **EXACT_FLOATS)
            kl = kl.astype({"setting": float, "kl": float})[KL_COLUMNS]
        return cls(meta, table, proxy, first, kl, str(folder))

    def curvature_table(self) -> pd.DataFrame:
        """The table with ``dloss`` minus its first-order part ``<Ŵ - W, ∂L/∂W>``: the second-
        and higher-order part, which is what carries over to other text (the first-order part
        on a finite calibration sample is mostly sampling noise; see the module docstring)."""
        if self.first_order is None:
            raise ValueError("this sensitivity grid holds no first-order terms; measure it again "
                             "(measure_sensitivity(first_order=True))")
        t = self.table.merge(self.first_order, on=["name", "kind", "setting"], how="left", validate="one_to_one")
        if t["dloss_first"].isna().any():
            raise ValueError("the first-order terms do not cover every row of the table")
        t["dloss"] = t["dloss"] - t.pop("dloss_first")
        return t[TABLE_COLUMNS]

    def kl_table(self) -> pd.DataFrame:
        """The table with ``dloss`` replaced by the mean KL(dense || probe) per predicted token:
        the loss increase expected on text drawn from the dense model itself. It is never
        negative and has no first-order term, so a few hundred tokens give a stable estimate."""
        if self.kl is None:
            raise ValueError("this sensitivity grid holds no KL divergences; measure it again "
                             "(measure_sensitivity(kl=True))")
        t = self.table.drop(columns="dloss").merge(self.kl, on=["name", "kind", "setting"], how="left",
                                                    validate="one_to_one")
        if t["kl"].isna().any():
            raise ValueError("the KL divergences do not cover every row of the table")
        return t.rename(columns={"kl": "dloss"})[TABLE_COLUMNS]

    def default_estimator(self) -> str:
        """What predictions add up by default: ``kl`` when the grid has it (stable on a few
        hundred probe tokens, never negative), else ``dloss``."""
        return "kl" if self.kl is not None else "dloss"

    def estimate(self, estimator: str) -> pd.DataFrame:
        """The table a predictor adds up: ``dloss`` (measured loss increase), ``curvature``
        (minus its first-order part) or ``kl``."""
        tables = {"dloss": lambda: self.table, "curvature": self.curvature_table, "kl": self.kl_table}
        if estimator not in tables:
            raise ValueError(f"unknown estimator {estimator!r}; use one of {', '.join(tables)}")
        return tables[estimator]()


def _read_table(path: Path) -> pd.DataFrame:
    t = pd.read_csv(path, dtype={"name": str, "role": str, "kind": str}, **EXACT_FLOATS)
    missing = [c for c in TABLE_COLUMNS if c not in t.columns]
    if missing:
        raise ValueError(f"{path} lacks columns {missing}")
    return t.astype({"layer": int, "setting": float, "dloss": float, "bytes": "int64"})[TABLE_COLUMNS]


def quant_options(quant: str) -> dict:
    """The settings of ``quant``'s probes besides bits and group size (e.g. vq's
    ``codebook_bits``), as the grid's meta records them: a grid measured with other settings
    (an older storage format) is not reused."""
    cls = QUANT_METHODS.get(quant)
    if cls is None or not cls.allowed_bits:
        return {}
    opts = dataclasses.asdict(cls(bits=cls.allowed_bits[0]))
    return {k: v for k, v in opts.items() if k not in ("bits", "group_size")}


def recorded_quant_options(meta: dict) -> dict:
    """The quantiser settings a grid was measured with. Grids from before they were recorded
    used the settings of then: today's, except for what ``legacy_options`` names (vq's fp16
    codebooks and pairs); a setting added since a grid recorded its own was, then, its
    ``legacy_options`` value (vq's pairs, before 4-vectors)."""
    cls = QUANT_METHODS.get(meta.get("quant", ""))
    legacy = cls.legacy_options if cls is not None else {}
    if "quant_options" in meta:
        return {**{k: v for k, v in legacy.items() if k not in meta["quant_options"]}, **meta["quant_options"]}
    return {**quant_options(meta.get("quant", "")), **legacy}


def sensitivity_key(fingerprint: str, data_digest: str, n_tokens: int, method: str, quant: str,
                    group_size: int) -> str:
    return f"{fingerprint}-{data_digest}-{n_tokens}-{method}-{quant}-g{group_size}"


def check_compatible(grid: SensitivityGrid, fingerprint: str, data_digest: str | None = None,
                     dtype: str | None = None) -> None:
    """Raise ``ValueError`` saying why ``grid`` does not belong to this model (or data); a
    model loaded in another ``dtype`` than the grid's has other weights, and is named as such."""
    where = grid.folder or "the sensitivity grid"
    got = grid.meta.get("fingerprint")
    if got != fingerprint:
        measured = grid.meta.get("dtype")
        if dtype is not None and measured and measured != dtype:
            raise ValueError(f"{where} was measured on weights in {measured} and this model is loaded in {dtype}, so "
                             f"their fingerprints differ (grid {got}, model {fingerprint}): if the grid is this "
                             f"model's, load it with --dtype {measured}; otherwise measure this model's sensitivity")
        raise ValueError(f"{where} was measured on another model (fingerprint {got}, this model is {fingerprint}); "
                         "measure the sensitivity of this model with `python -m analysis sensitivity`")
    if data_digest is not None and grid.meta.get("data_digest") != data_digest:
        raise ValueError(f"{where} was measured on other calibration data ({grid.meta.get('data')}, digest "
                         f"{grid.meta.get('data_digest')}; expected digest {data_digest}); measure it again")
    quant = grid.meta.get("quant", "")
    now, then = quant_options(quant), recorded_quant_options(grid.meta)
    if then != now:
        changed = {k: then.get(k) for k in sorted(set(then) | set(now)) if then.get(k) != now.get(k)}
        raise ValueError(f"{where} was measured with {quant} settings {changed} and {quant} now quantises with "
                         f"{ {k: now.get(k) for k in changed} } (another storage format, other sizes): "
                         "measure it again")


def _meta(kind: str, model: nn.Module, calib_ids: Tensor, *, method: str, quant: str, group_size: int,
          fractions: Sequence[float], bits: Sequence[float], dense_loss: float, seconds: float, device,
          fingerprint: str | None, data_label: str | None, data_digest: str | None,
          stats: dict[str, LinearStats], **extra) -> dict:
    n_stats = max((s.n_tokens for s in stats.values()), default=0)
    return dict(format=SENSITIVITY_FORMAT, estimator=kind, fingerprint=fingerprint, data=data_label,
                data_digest=data_digest, n_tokens=int(calib_ids.numel()), windows=int(calib_ids.shape[0]),
                seqlen=int(calib_ids.shape[1]), stats_tokens=int(n_stats), method=method, quant=quant,
                group_size=int(group_size), quant_options=quant_options(quant),
                fractions=[float(f) for f in fractions], bits=[bit_width(b) for b in bits],
                dense_loss=float(dense_loss), seconds=round(float(seconds), 3), device=str(device),
                dtype=str(next(model.parameters()).dtype).replace("torch.", ""), torch_threads=torch.get_num_threads(),
                date=_dt.datetime.now().isoformat(timespec="seconds"), **extra)


# ------------------------------------------------------------------------ measurement
def with_module(layer: nn.Module, path: str, module: nn.Module) -> nn.Module:
    """A shallow copy of ``layer`` whose submodule at ``path`` (e.g. ``"mlp.down_proj"``) is
    ``module``; every other submodule and parameter is shared, ``layer`` is left unchanged.
    Probes run through such copies, so several can run at once on one model."""
    head, _, rest = path.partition(".")
    twin = copy.copy(layer)
    twin._modules = dict(layer._modules)
    if head not in twin._modules:
        raise KeyError(f"{type(layer).__name__} has no submodule {head!r}")
    twin._modules[head] = module if not rest else with_module(layer._modules[head], rest, module)
    return twin


def default_workers(device: torch.device) -> int:
    """Probe workers: on a CPU, one single-threaded worker per intra-op thread (on the 2-core
    machine this beat one worker with 2 threads, see the module docstring); on a GPU one."""
    return max(1, torch.get_num_threads()) if device.type == "cpu" else 1


class _LayerGrads:
    """``_layer_weight_grads`` of one layer at a time, computed on first use by whichever
    worker needs it (under a lock) and dropped when that layer's last linear is done."""

    def __init__(self, compute: Callable[[int], dict], counts: dict[int, int]):
        self._compute, self._left = compute, dict(counts)
        self._done: dict[int, dict] = {}
        self._lock = threading.Lock()

    def get(self, layer: int) -> dict:
        with self._lock:
            if layer not in self._done:
                self._done[layer] = self._compute(layer)
            return self._done[layer]

    def release(self, layer: int) -> None:
        with self._lock:
            self._left[layer] -= 1
            if self._left[layer] == 0:
                self._done.pop(layer, None)


def derived_widths(bits: Sequence[float], derive_bits: Sequence[int]) -> dict[int, int | float]:
    """``{derived width: probed width it is scaled from}``: each width of ``derive_bits`` in
    ``bits`` with a lower width in ``bits`` that is itself probed (the largest such)."""
    derive = {bit_width(b) for b in derive_bits} & {bit_width(b) for b in bits}
    out = {}
    for b in sorted(derive):
        lower = [bit_width(x) for x in bits if x < b and bit_width(x) not in derive]
        if lower:
            out[b] = max(lower)
    return out


def derive_ratio(fisher: Tensor, weight: Tensor, bias: Tensor | None, base: tuple[Tensor, Tensor | None],
                 target: tuple[Tensor, Tensor | None], stats: LinearStats) -> float | None:
    """``proxy(target) / proxy(base)``: how much smaller the output-Fisher quadratic form
    ``½ Σ_i F_i E[(Δy_i)²]`` of one setting is than another's (None when the base's is 0).
    Used to scale a measured 4-bit probe to 8 bits (module docstring, "Derived widths")."""
    lo, hi = proxy_dloss(fisher, weight, bias, [base, target], stats.inputs)
    return None if lo <= 0 else hi / lo


@torch.no_grad()
def measure_sensitivity(model: nn.Module, adapter: Adapter, calib_ids: Tensor, stats: dict[str, LinearStats], *,
                        method: str = "svd-llm", quant: str = "rtn", group_size: int = 128,
                        fractions: Sequence[float] = FRACTIONS, bits: Sequence[float] = BITS_GRID,
                        derive_bits: Sequence[int] = DERIVED_BITS,
                        device: torch.device | str | None = None, names: Sequence[str] | None = None,
                        fingerprint: str | None = None, data_label: str | None = None,
                        data_digest: str | None = None, max_batch_tokens: int = MAX_BATCH_TOKENS,
                        first_order: bool = True, kl: bool = True, workers: int | None = None,
                        progress: Progress | None = None,
                        should_stop: Callable[[], bool] | None = None) -> SensitivityGrid:
    """Loss increase of compressing each decoder linear alone, on windows ``calib_ids`` (C, L).

    ``stats`` (``Profile.all_stats()``) feeds svd-llm / act-pca / gptq. ``names`` limits the
    probes to some linears (default: all). The model is never modified: a probe runs its layer
    as a shallow copy holding the stacked stand-in (``with_module``).
    ``first_order`` also records each dloss's first-order part ``<Ŵ - W, ∂L/∂W>`` (one extra
    backward pass, under 1 % of the time) in ``grid.first_order``.
    ``kl`` also records each probe's mean KL(dense || probe) per token (``grid.kl``; memory:
    tokens x vocabulary floats for the dense distributions).
    ``derive_bits``: widths in ``bits`` that are not probed but scaled from the next lower
    probed width (``derive_ratio``; listed in ``meta["derived"]``); ``()`` probes every setting.
    ``workers``: probes run in parallel by this many threads (default ``default_workers``),
    each with one intra-op thread on a CPU; results do not depend on it beyond float rounding."""
    bits = grid_bits(bits, quant)
    t0 = time.perf_counter()
    say = progress or (lambda f, m: None)
    orig_dev = next(model.parameters()).device
    dev = torch.device(device) if device is not None else orig_dev
    all_linears = adapter.linears(model)
    linears = all_linears if names is None else [li for li in all_linears if li.name in set(names)]
    if names is not None and len(linears) != len(set(names)):
        unknown = sorted(set(names) - {li.name for li in linears})
        raise ValueError(f"unknown linears {unknown[:3]}; names look like {all_linears[0].name}")
    grid = {li.name: settings_for(li, fractions, bits) for li in linears}
    _check_settings(linears, grid, method, quant, group_size)
    if calib_ids.dim() != 2 or calib_ids.shape[1] < 2:
        raise ValueError(f"calib_ids must be (windows, seqlen >= 2), got {tuple(calib_ids.shape)}")
    derived_from = derived_widths(bits, derive_bits)
    dtype_bytes = next(model.parameters()).element_size()
    n_workers = max(1, min(int(workers) if workers else default_workers(dev), len(linears)))
    moved = dev != orig_dev
    dense: DenseDist | None = None
    try:
        if moved:
            model.to(dev)
        ids = calib_ids.to(dev)
        c, length = ids.shape
        layers = adapter.layers(model)
        # 1) dense inputs of every layer, once
        h0, calls_c = _capture(model, adapter, ids)
        inputs = [h0]
        for j, layer in enumerate(layers):
            inputs.append(run_layer(layer, inputs[-1], calls_c[j]))
        targets = ids[:, 1:]
        dense_loss = float(_window_nll(model, adapter, inputs[-1], targets).sum()) / targets.numel()
        dense = dense_dist(model, adapter, inputs[-1]) if kl else None
        del inputs[-1]  # only layer inputs are needed from here on
        need_grads = first_order or bool(derived_from)
        out_grads = None
        if need_grads:
            with _frozen(model):
                out_grads = _layer_output_grads(model, adapter, h0, ids, targets.numel())
        probed = {li.name: [ks for ks in grid[li.name] if not (ks[0] == "bits" and ks[1] in derived_from)]
                  for li in linears}
        n_probes = sum(len(v) for v in probed.values())
        per_pass = max(1, max_batch_tokens // (c * length))
        calls = {1: calls_c}
        sizes = set()  # every batch size a probe pass may use (a derived width can fall back to a probe) ...
        for li in linears:
            for n in range(len(probed[li.name]), len(grid[li.name]) + 1):
                sizes |= {min(per_pass, n), n % per_pass} - {0}
        for g in sorted(sizes - set(calls)):  # ... recorded now: _capture swaps the model's layers, workers can't
            calls[g] = _capture(model, adapter, ids.repeat(g, 1))[1]

        paths = {li.name: adapter.role_path(li.role) for li in linears}  # inside the layer: "mlp.up_proj"

        def compute_grads(layer: int) -> dict:
            mods = {x.name: get_submodule(model, x.name) for x in linears if x.layer == layer}
            with _frozen(model):
                return _layer_weight_grads(layers[layer], mods, paths, inputs[layer], calls_c[layer],
                                           out_grads[layer])

        counts: dict[int, int] = {}
        for li in linears:
            counts[li.layer] = counts.get(li.layer, 0) + 1
        layer_grads = _LayerGrads(compute_grads, counts)

        def probe(li: LinearInfo) -> tuple[list[dict], list[dict], list[dict], int]:
            """Every setting of one linear: (table rows, first-order rows, KL rows, derived)."""
            _check_stop(should_stop, "sensitivity measurement")
            settings = grid[li.name]
            orig = get_submodule(model, li.name)
            affines = dict(zip(settings, compressed_affines(orig, li, settings, stats.get(li.name), method, quant,
                                                            group_size)))
            firsts: dict[tuple[str, int], float] = {}
            fisher = None
            if out_grads is not None:
                grads = layer_grads.get(li.layer)
                gw, gb, fisher = grads[li.name]
                firsts = dict(zip(settings, first_order_terms(orig.weight, orig.bias, list(affines.values()), gw, gb)))
                layer_grads.release(li.layer)
            todo = list(probed[li.name])
            ratios: dict[tuple[str, int], tuple[tuple[str, int], float]] = {}
            st = stats.get(li.name)
            for b, lo in derived_from.items():
                r = None if st is None or fisher is None else derive_ratio(
                    fisher, orig.weight, orig.bias, affines[("bits", lo)], affines[("bits", b)], st)
                if r is None:  # nothing to scale from: probe it after all
                    todo.append(("bits", b))
                else:
                    ratios[("bits", b)] = (("bits", lo), r)
            losses: dict[tuple[str, int], float] = {}
            kls: dict[tuple[str, int], float] = {}
            for g0 in range(0, len(todo), per_pass):
                group = todo[g0:g0 + per_pass]
                g = len(group)
                h = inputs[li.layer].repeat(g, 1, 1)  # (g*C, L, D), setting-major
                h = run_layer(with_module(layers[li.layer], paths[li.name], _stack([affines[k] for k in group])), h,
                              calls[g][li.layer])
                for k in range(li.layer + 1, len(layers)):
                    h = run_layer(layers[k], h, calls[g][k])
                nll, kl_sum = _window_losses(model, adapter, h, targets, dense)
                losses.update(zip(group, (nll.view(g, c).sum(1) / targets.numel() - dense_loss).tolist()))
                if kl_sum is not None:
                    kls.update(zip(group, (kl_sum.view(g, c).sum(1) / targets.numel()).tolist()))
                del h
            for ks, (lo, r) in ratios.items():  # scaled from the lower width: first-order part kept exact
                curv = losses[lo] - firsts.get(lo, 0.0)
                losses[ks] = firsts.get(ks, 0.0) + curv * r
                if lo in kls:
                    kls[ks] = kls[lo] * r
            rows = [dict(name=li.name, layer=li.layer, role=li.role, kind=kind, setting=float(s),
                         dloss=losses[(kind, s)],
                         bytes=int(weight_bytes(setting_spec(kind, s, method, quant, group_size), li, dtype_bytes)))
                    for kind, s in settings]
            first_rows = [dict(name=li.name, kind=k, setting=float(s), dloss_first=firsts[(k, s)])
                          for k, s in settings] if first_order else []
            kl_rows = [dict(name=li.name, kind=k, setting=float(s), kl=kls[(k, s)]) for k, s in settings] \
                if dense is not None else []
            return rows, first_rows, kl_rows, len(ratios)

        say(0.0, f"dense loss {dense_loss:.4f}; probing {len(linears)} linears x settings ({n_probes} probes, "
                 f"{n_workers} worker{'s' if n_workers > 1 else ''})")
        t_probe, cpu_probe = time.perf_counter(), time.process_time()
        results: dict[str, tuple] = {}
        if n_workers == 1:
            for j, li in enumerate(linears):
                results[li.name] = probe(li)
                say((j + 1) / len(linears), f"sensitivity {li.name} ({len(grid[li.name])} settings)")
        else:
            def run(li: LinearInfo):  # grad mode is per thread
                with torch.no_grad():
                    return probe(li)

            threads_before = torch.get_num_threads()
            one = dict(initializer=torch.set_num_threads, initargs=(1,)) if dev.type == "cpu" else {}
            try:
                with ThreadPoolExecutor(n_workers, thread_name_prefix="ranklab-probe", **one) as pool:
                    futures = {pool.submit(run, li): li for li in linears}
                    try:
                        for j, fut in enumerate(as_completed(futures)):
                            li = futures[fut]
                            results[li.name] = fut.result()
                            say((j + 1) / len(linears), f"sensitivity {li.name} ({len(grid[li.name])} settings)")
                    except BaseException:
                        for f in futures:
                            f.cancel()
                        raise
            finally:  # the workers' set_num_threads(1) is process-wide for MKL: restore it
                torch.set_num_threads(threads_before)
        t_probes, cpu_probes = time.perf_counter() - t_probe, time.process_time() - cpu_probe
    finally:
        if moved:
            model.to(orig_dev)
    rows = [r for li in linears for r in results[li.name][0]]
    first_rows = [r for li in linears for r in results[li.name][1]]
    kl_rows = [r for li in linears for r in results[li.name][2]]
    n_derived = sum(results[li.name][3] for li in linears)
    n_probes = len(rows) - n_derived  # some derived widths may have fallen back to a probe
    seconds = time.perf_counter() - t0
    table = pd.DataFrame(rows, columns=TABLE_COLUMNS)
    meta = _meta("measured", model, calib_ids, method=method, quant=quant, group_size=group_size,
                 fractions=fractions, bits=bits, dense_loss=dense_loss, seconds=seconds, device=dev,
                 fingerprint=fingerprint, data_label=data_label, data_digest=data_digest, stats=stats,
                 probes=n_probes, seconds_per_probe=round(t_probes / max(n_probes, 1), 4),
                 cpu_seconds_per_probe=round(cpu_probes / max(n_probes, 1), 4),
                 linears=len(linears), first_order=bool(first_order), kl=dense is not None, workers=n_workers,
                 derived=dict(bits=sorted(derived_from), settings=n_derived,
                              rule="scaled from the next lower probed width by the ratio of the output-Fisher "
                                   "quadratic forms (first-order part exact)") if derived_from else None)
    first = pd.DataFrame(first_rows, columns=FIRST_ORDER_COLUMNS) if first_order else None
    kl_table = pd.DataFrame(kl_rows, columns=KL_COLUMNS) if dense is not None else None
    return SensitivityGrid(meta, table, first_order=first, kl=kl_table)


class SettingProbe:
    """The grid's probe for one setting at a time, for settings the grid does not hold (ranks
    with quantised factors, ``compression.allocate.allocate_measured``): ``probe(name, spec)``
    compresses linear ``name`` alone as ``compression.apply`` would (its low-rank method, then
    its factors or weight quantised, on ``stats``), runs the model on ``calib_ids`` (C, L) and
    returns the mean KL(dense || probe) per predicted token (``estimator="kl"``) or the mean
    next-token loss increase (``"dloss"``), the units of ``SensitivityGrid.estimate``. The model
    is restored after each probe (also on error)."""

    def __init__(self, model: nn.Module, calib_ids: Tensor, stats: dict[str, LinearStats], estimator: str = "kl"):
        if estimator not in ("kl", "dloss"):
            raise ValueError(f"a setting probe measures kl or dloss, not {estimator!r} (the curvature estimator needs "
                             "the grid's first-order pass)")
        if calib_ids.dim() != 2 or calib_ids.shape[1] < 2:
            raise ValueError(f"calib_ids must be (windows, seqlen >= 2), got {tuple(calib_ids.shape)}")
        self.model, self.stats, self.estimator = model, stats, estimator
        self.ids = calib_ids.to(next(model.parameters()).device)
        self.dense_logp, self.dense_nll = self._run()  # (C, L-1, V), float

    @torch.no_grad()
    def _run(self) -> tuple[Tensor, float]:
        logp = torch.log_softmax(self.model(input_ids=self.ids).logits[:, :-1].float(), -1)  # (C, L-1, V)
        nll = -logp.gather(-1, self.ids[:, 1:].unsqueeze(-1)).mean()
        return logp, float(nll)

    @torch.no_grad()
    def __call__(self, name: str, spec: ModuleSpec) -> float:
        from compression.apply import quantise_module
        from compression.registry import handler_for

        if name not in self.stats:
            raise ValueError(f"{name} has no profile statistics: is it a decoder linear of this model?")
        dense = get_submodule(self.model, name)
        mod = copy.deepcopy(dense)
        if spec.rank is not None:
            lr = spec.lowrank_config()
            mod = handler_for(lr)(mod, lr, self.stats[name])
        if spec.bits is not None:
            mod = quantise_module(mod, spec.quant_config(), self.stats[name])
        set_submodule(self.model, name, mod)
        try:
            logq, nll = self._run()
        finally:
            set_submodule(self.model, name, dense)
        if self.estimator == "dloss":
            return nll - self.dense_nll
        p = self.dense_logp.exp()
        return float((p * (self.dense_logp - logq)).sum(-1).mean())


def load_or_measure(model: nn.Module, adapter: Adapter, calib_ids: Tensor, stats: dict[str, LinearStats], *,
                    fingerprint: str, data_label: str, data_digest: str, cache_root: str | Path,
                    method: str = "svd-llm", quant: str = "rtn", group_size: int = 128,
                    fractions: Sequence[float] = FRACTIONS, bits: Sequence[float] = BITS_GRID,
                    derive_bits: Sequence[int] = DERIVED_BITS, cached_only: bool = False,
                    **kw) -> tuple[SensitivityGrid | None, bool]:
    """The cached grid for (model, data, token count, method, quant, group size, linears) if
    one is complete and made with the same grid, else a new one (saved), or None when
    ``cached_only``. Returns (grid, reused). A grid of some linears only (``names=``) is cached
    apart from the whole model's."""
    bits = grid_bits(bits, quant)
    names = kw.get("names")
    wanted = sorted(set(names)) if names is not None else sorted(li.name for li in adapter.linears(model))
    key = sensitivity_key(fingerprint, data_digest, calib_ids.numel(), method, quant, group_size)
    if names is not None:
        key += "-linears-" + hashlib.sha1(",".join(wanted).encode()).hexdigest()[:12]
    derived = sorted(derived_widths(bits, derive_bits))

    def matches(grid: SensitivityGrid) -> bool:
        return (grid.meta.get("fingerprint") == fingerprint and grid.meta.get("n_tokens") == calib_ids.numel()
                and recorded_quant_options(grid.meta) == quant_options(quant)
                and _same_grid(grid, fractions, bits, stats, wanted)
                and (grid.first_order is not None or not kw.get("first_order", True))
                and (grid.kl is not None or not kw.get("kl", True))
                and sorted((grid.meta.get("derived") or {}).get("bits", [])) == derived)

    return _load_or_compute(Path(cache_root) / "sensitivity" / key, matches, lambda: measure_sensitivity(
        model, adapter, calib_ids, stats, method=method, quant=quant, group_size=group_size, fractions=fractions,
        bits=bits, derive_bits=derive_bits, fingerprint=fingerprint, data_label=data_label, data_digest=data_digest,
        **kw), "the sensitivity grid", cached_only)


def _same_grid(grid: SensitivityGrid, fractions: Sequence[float], bits: Sequence[float],
               stats: dict[str, LinearStats], names: list[str]) -> bool:
    """``grid`` holds these settings, for these linears, on statistics of as many tokens."""
    return (grid.meta.get("fractions") == [float(f) for f in fractions]
            and grid.meta.get("bits") == [bit_width(b) for b in bits]
            and grid.meta.get("stats_tokens") == max((s.n_tokens for s in stats.values()), default=0)
            and sorted(grid.table["name"].unique()) == names)


def _load_or_compute(folder: Path, matches: Callable[[SensitivityGrid], bool],
                     compute: Callable[[], SensitivityGrid], what: str,
                     cached_only: bool) -> tuple[SensitivityGrid | None, bool]:
    """The grid cached in ``folder`` if it ``matches``, else ``compute()`` saved there (a cache
    that cannot be written is warned about, see ``save_to_cache``), or None when
    ``cached_only``. Returns (grid, reused)."""
    if (folder / "meta.json").exists():
        try:
            grid = SensitivityGrid.load(folder)
        except (ValueError, OSError):
            grid = None
        if grid is not None and matches(grid):
            return grid, True
    if cached_only:
        return None, False
    grid = compute()

    def save() -> None:
        if folder.exists() and not holds(folder, SENSITIVITY_MARKERS):
            shutil.rmtree(folder)  # a broken cache entry (RankLab's own cache): rebuilt
        grid.save(folder, cache=True)

    save_to_cache(save, what, folder)
    return grid, False


# ------------------------------------------------------------------------ gradient proxy
@dataclass(frozen=True)
class WeightedMoments:
    """Input moments of one linear with each token weighted by ``w_t = |g_t|²``, the squared
    gradient at the linear's output: ``second_moment`` (n, n) and ``mean`` (n,), float64."""
    second_moment: Tensor
    mean: Tensor


def output_fisher(model: nn.Module, adapter: Adapter, calib_ids: Tensor, *, windows: int | None = None,
                  chunk_tokens: int = 1024, device: torch.device | str | None = None, targets: str = "model",
                  seed: int = 0, token_cap: float | None = None, should_stop: Callable[[], bool] | None = None,
                  progress: Progress | None = None
                  ) -> tuple[dict[str, Tensor], float, int, dict[str, WeightedMoments]]:
    """Mean over tokens of the squared gradient of the *summed* token NLL w.r.t. each decoder
    linear's output: ``F_y[name]`` (m,) float64; and each linear's gradient-weighted input
    moments. Returns (fisher, mean NLL of the real next tokens, tokens predicted, moments).

    ``targets="model"``: the NLL differentiated is that of next tokens drawn from the model's
    own distribution (seeded), which makes ``F_y`` the model's Fisher, the curvature of the KL
    from the dense model; ``"data"``: the real next tokens (the empirical Fisher, larger where
    the model is unsure). ``token_cap``: scale down the gradient of any token whose ``|g_t|²``
    exceeds ``token_cap`` x the median over its chunk's tokens (per linear), in both outputs
    (``proxy_sensitivity`` passes ``TOKEN_CAP``; the module docstring says why).
    Parameters are frozen for the pass (and restored): no ``.grad``."""
    if targets not in ("model", "data"):
        raise ValueError(f"targets must be 'model' or 'data', got {targets!r}")
    orig_dev = next(model.parameters()).device
    dev = torch.device(device) if device is not None else orig_dev
    ids = calib_ids[:windows] if windows else calib_ids
    linears = adapter.linears(model)
    modules = {li.name: get_submodule(model, li.name) for li in linears}
    acc = {li.name: torch.zeros(li.out_features, dtype=torch.float64, device=dev) for li in linears}
    sxx = {li.name: torch.zeros(li.in_features, li.in_features, dtype=torch.float64, device=dev) for li in linears}
    sx = {li.name: torch.zeros(li.in_features, dtype=torch.float64, device=dev) for li in linears}
    wsum = dict.fromkeys(acc, 0.0)
    flags = [(p, p.requires_grad) for p in model.parameters()]
    handles = []

    def make_hook(name):
        def hook(_mod, args, out):
            if not out.requires_grad:
                return
            x = args[0].detach().flatten(0, -2).float()  # (T, n) this chunk's inputs

            def grad_hook(g: Tensor) -> None:
                g2 = g.detach().flatten(0, -2).float().pow(2)  # (T, m)
                w = g2.sum(-1)  # (T,) token weights |g_t|²
                if token_cap is not None:  # no token above token_cap x the chunk's median (none if it is 0)
                    cap = token_cap * w.median()  # () on the device: no host sync per linear
                    keep = torch.where(cap > 0, (cap / w.clamp_min(1e-30)).clamp_max(1.0), 1.0)  # (T,)
                    g2, w = g2 * keep[:, None], w * keep
                acc[name].add_(g2.sum(0).double())
                xw = x * w[:, None]  # (T, n)
                sxx[name].add_((xw.T @ x).double())
                sx[name].add_(xw.sum(0).double())
                wsum[name] += float(w.double().sum())
            out.register_hook(grad_hook)
        return hook

    total, count = 0.0, 0
    gen = torch.Generator().manual_seed(seed)  # on the CPU: the same draws on every device
    moved = dev != orig_dev
    try:
        if moved:
            model.to(dev)
        for p, _ in flags:
            p.requires_grad_(False)
        for name, mod in modules.items():
            handles.append(mod.register_forward_hook(make_hook(name)))
        layers = adapter.layers(model)
        rows = max(1, chunk_tokens // ids.shape[1])
        for i in range(0, ids.shape[0], rows):
            _check_stop(should_stop, "sensitivity proxy")
            if progress:
                progress(i / ids.shape[0], f"gradient pass: windows {i + 1}-{min(i + rows, ids.shape[0])} "
                                           f"of {ids.shape[0]}")
            batch = ids[i:i + rows].to(dev)
            h0, calls = _capture(model, adapter, batch)
            with torch.enable_grad():
                h = h0.detach().requires_grad_(True)
                x = h
                for j, layer in enumerate(layers):
                    x = run_layer(layer, x, calls[j])
                logits = run_head(model, adapter, x[:, :-1]).flatten(0, 1).float()  # (B (L-1), V)
                with torch.no_grad():
                    nll = F.cross_entropy(logits, batch[:, 1:].flatten(), reduction="sum")
                    drawn = (draw_tokens(torch.softmax(logits, -1), gen)
                             if targets == "model" else batch[:, 1:].flatten())  # (B (L-1),)
                loss = F.cross_entropy(logits, drawn, reduction="sum")
                torch.autograd.grad(loss, [h])
            total += float(nll)
            count += batch[:, 1:].numel()
    finally:
        for hd in handles:
            hd.remove()
        for p, flag in flags:
            p.requires_grad_(flag)
        if moved:
            model.to(orig_dev)
    # per predicted token: the measured dloss is a mean over the ``count`` predicted tokens
    moments = {k: WeightedMoments(sxx[k] / max(wsum[k], 1e-300), sx[k] / max(wsum[k], 1e-300)) for k in acc}
    return {k: v / max(count, 1) for k, v in acc.items()}, total / max(count, 1), count, moments


@torch.no_grad()
def draw_tokens(probs: Tensor, gen: torch.Generator, rows: int = 256) -> Tensor:
    """One token per row of ``probs`` (T, V) by inverse-CDF sampling: uniforms from the CPU
    generator ``gen``, so a GPU draws the same tokens as the CPU (up to float64 rounding of
    the cumulative sums). Returns (T,) int64 on ``probs``' device."""
    u = torch.rand(probs.shape[0], 1, generator=gen, dtype=torch.float64).to(probs.device)  # (T, 1)
    out = []
    for i in range(0, probs.shape[0], rows):  # float64 sums of ``rows`` rows at a time: bounded memory
        cdf = probs[i:i + rows].double().cumsum(-1)  # (rows, V)
        # right=True: the first token whose cumulative sum exceeds the draw, never a zero-probability one
        out.append(torch.searchsorted(cdf, u[i:i + rows] * cdf[:, -1:], right=True).squeeze(-1))
    return torch.cat(out).clamp_max(probs.shape[-1] - 1)


@torch.no_grad()
def proxy_dloss(fisher: Tensor, weight: Tensor, bias: Tensor | None,
                affines: list[tuple[Tensor, Tensor | None]], moments: InputStats | WeightedMoments) -> list[float]:
    """``½ Σ_i F_i [ΔW̃ Σ̃ ΔW̃ᵀ]_ii`` per setting, ``ΔW̃ = [W - Ŵ, b - b̂]``, ``Σ̃ = E[[x;1][x;1]ᵀ]``
    over tokens (``moments``: plain, or weighted by each token's output gradient).

    All settings in one float32 matmul ``(S m, n) @ (n, n)`` (a float64 one costs twice as
    much; a proxy does not need it); the quadratic forms are clamped at 0 (round-off)."""
    dev = fisher.device
    w = weight.detach().to(dev, torch.float32)  # (m, n)
    m = w.shape[0]
    zero = torch.zeros(m, dtype=torch.float32, device=dev)
    b = zero if bias is None else bias.detach().to(dev, torch.float32)
    dw = torch.stack([w - wh.to(dev, torch.float32) for wh, _ in affines])  # (S, m, n)
    db = torch.stack([b - (zero if bh is None else bh.to(dev, torch.float32)) for _, bh in affines])  # (S, m)
    s2 = moments.second_moment.to(dev, torch.float32)  # (n, n) E[x xᵀ]
    mu = moments.mean.to(dev, torch.float32)  # (n,)
    quad = ((dw @ s2) * dw).sum(-1)  # (S, m)
    diag = (quad.double() + 2 * (dw @ mu).double() * db.double() + db.double() ** 2).clamp_min(0)  # E[(Δy_i)²]
    return (0.5 * (diag * fisher.to(torch.float64)).sum(-1)).tolist()


def proxy_sensitivity(model: nn.Module, adapter: Adapter, calib_ids: Tensor, stats: dict[str, LinearStats], *,
                      method: str = "svd-llm", quant: str = "rtn", group_size: int = 128,
                      fractions: Sequence[float] = FRACTIONS, bits: Sequence[float] = BITS_GRID,
                      windows: int | None = None, token_cap: float | None = TOKEN_CAP,
                      device: torch.device | str | None = None,
                      fingerprint: str | None = None, data_label: str | None = None,
                      data_digest: str | None = None, progress: Progress | None = None,
                      should_stop: Callable[[], bool] | None = None) -> SensitivityGrid:
    """Predicted loss increase per linear and setting from one forward + backward over (the
    first ``windows`` of) ``calib_ids``: the output-Fisher quadratic form (module docstring).
    Same table schema as ``measure_sensitivity``; no forward per setting."""
    bits = grid_bits(bits, quant)
    t0 = time.perf_counter()
    say = progress or (lambda f, m: None)
    linears = adapter.linears(model)
    grid = {li.name: settings_for(li, fractions, bits) for li in linears}
    _check_settings(linears, grid, method, quant, group_size)
    say(0.0, "gradient pass for the sensitivity proxy")
    fisher, dense_loss, _, moments = output_fisher(model, adapter, calib_ids, windows=windows, device=device,
                                                   token_cap=token_cap, should_stop=should_stop,
                                                   progress=lambda f, m: say(0.2 * f, m))
    dtype_bytes = next(model.parameters()).element_size()
    rows = []
    for j, li in enumerate(linears):
        _check_stop(should_stop, "sensitivity proxy")
        lin = get_submodule(model, li.name)
        st = stats.get(li.name)
        if st is None:
            raise ValueError(f"the proxy needs input statistics of {li.name}: profile the model first")
        affines = compressed_affines(lin, li, grid[li.name], st, method, quant, group_size)
        dl = proxy_dloss(fisher[li.name], lin.weight, lin.bias, affines, moments[li.name])
        for (kind, s), d in zip(grid[li.name], dl):
            spec = setting_spec(kind, s, method, quant, group_size)
            rows.append(dict(name=li.name, layer=li.layer, role=li.role, kind=kind, setting=float(s), dloss=d,
                             bytes=int(weight_bytes(spec, li, dtype_bytes))))
        say(0.2 + 0.8 * (j + 1) / len(linears), f"proxy {li.name}")
    n_used = int((calib_ids[:windows] if windows else calib_ids).numel())
    meta = _meta("proxy-fisher", model, calib_ids, method=method, quant=quant, group_size=group_size,
                 fractions=fractions, bits=bits, dense_loss=dense_loss, seconds=time.perf_counter() - t0,
                 device=device or next(model.parameters()).device, fingerprint=fingerprint, data_label=data_label,
                 data_digest=data_digest, stats=stats, gradient_tokens=n_used, token_cap=token_cap)
    return SensitivityGrid(meta, pd.DataFrame(rows, columns=TABLE_COLUMNS))


def load_or_proxy(model: nn.Module, adapter: Adapter, calib_ids: Tensor, stats: dict[str, LinearStats], *,
                  fingerprint: str, data_label: str, data_digest: str, cache_root: str | Path,
                  method: str = "svd-llm", quant: str = "rtn", group_size: int = 128,
                  fractions: Sequence[float] = FRACTIONS, bits: Sequence[float] = BITS_GRID,
                  token_cap: float | None = TOKEN_CAP, cached_only: bool = False,
                  **kw) -> tuple[SensitivityGrid | None, bool]:
    """The cached first view (``proxy_sensitivity`` over all of ``calib_ids``) for this model,
    data, grid and token cap if there is one, else a new one (saved), or None when
    ``cached_only``. Returns (grid, reused). The proxy is deterministic (its Fisher targets are
    seeded), so a cached one is the one that would be computed."""
    bits = grid_bits(bits, quant)
    key = sensitivity_key(fingerprint, data_digest, calib_ids.numel(), method, quant, group_size) + "-proxy"
    wanted = sorted(li.name for li in adapter.linears(model))
    n = calib_ids.numel()

    def matches(grid: SensitivityGrid) -> bool:
        m = grid.meta
        return (m.get("estimator") == "proxy-fisher" and m.get("fingerprint") == fingerprint
                and m.get("data_digest") == data_digest and m.get("n_tokens") == n and m.get("gradient_tokens") == n
                and m.get("token_cap") == token_cap and _same_grid(grid, fractions, bits, stats, wanted))

    return _load_or_compute(Path(cache_root) / "sensitivity" / key, matches, lambda: proxy_sensitivity(
        model, adapter, calib_ids, stats, method=method, quant=quant, group_size=group_size, fractions=fractions,
        bits=bits, token_cap=token_cap, fingerprint=fingerprint, data_label=data_label, data_digest=data_digest,
        **kw), "the first sensitivity view", cached_only)


def agreement(proxy: SensitivityGrid | pd.DataFrame, measured: SensitivityGrid | pd.DataFrame) -> dict:
    """Spearman rank correlation of proxy vs measured dloss over the settings both hold,
    overall and per kind: ``{"spearman", "n", "by_kind": {kind: {"spearman", "n"}}}``."""
    from scipy.stats import spearmanr

    p = proxy.table if isinstance(proxy, SensitivityGrid) else proxy
    m = measured.table if isinstance(measured, SensitivityGrid) else measured
    j = p.merge(m, on=["name", "kind", "setting"], suffixes=("_proxy", "_measured"))

    def rho(d: pd.DataFrame) -> dict:
        n = len(d)
        if n < 3 or d["dloss_proxy"].nunique() < 2 or d["dloss_measured"].nunique() < 2:
            return dict(spearman=float("nan"), n=n)
        return dict(spearman=float(spearmanr(d["dloss_proxy"], d["dloss_measured"]).statistic), n=n)

    out = rho(j)
    out["by_kind"] = {k: rho(d) for k, d in j.groupby("kind", sort=True)}
    if isinstance(measured, SensitivityGrid) and measured.first_order is not None:
        c = p.merge(measured.curvature_table(), on=["name", "kind", "setting"], suffixes=("_proxy", "_measured"))
        out["curvature"] = rho(c)  # against the measurement without its first-order part
    if isinstance(measured, SensitivityGrid) and measured.kl is not None:
        k = p.merge(measured.kl_table(), on=["name", "kind", "setting"], suffixes=("_proxy", "_measured"))
        out["kl"] = rho(k)  # against the probes' KL from the dense model (what the grid predicts with)
    return out


# ------------------------------------------------------------------------ command line
def parse_bits(text: str) -> tuple[int, ...]:
    """``"8"`` / ``"4,8"`` / ``""`` -> bit widths; says what is wrong otherwise."""
    try:
        out = tuple(int(x) for x in str(text).replace(" ", "").split(",") if x)
    except ValueError:
        raise ValueError(f"--derive-bits {text!r}: give comma-separated bit widths such as 8 or 4,8, "
                         "or '' to probe every setting") from None
    allowed = BITS_GRID[1:]  # a derived width is scaled from a lower probed one
    if any(b not in allowed for b in out):
        raise ValueError(f"--derive-bits {text!r}: derived widths are among {', '.join(map(str, allowed))} (the grid's "
                         f"widths above its lowest, {BITS_GRID[0]}, which is always probed)")
    return out


def probe_digest(corpus_digest: str, seqlen: int, seed: int) -> str:
    """The ``data_digest`` of the command line's probe windows (``probe_inputs``)."""
    return f"{corpus_digest}-{seqlen}-{seed}"


def probe_windowing(data_digest: str | None) -> tuple[str, int, int] | None:
    """``(corpus digest, window length, seed)`` of a grid measured by the command line (its
    ``data_digest``, ``probe_digest``); None for a grid whose windows were drawn otherwise (the app's)."""
    parts = (data_digest or "").rsplit("-", 2)
    if len(parts) != 3 or not (parts[1].isdigit() and parts[2].isdigit()):
        return None
    return parts[0], int(parts[1]), int(parts[2])


def probe_inputs(lm, corpus, *, tokens: int, seqlen: int, seed: int, profile_tokens: int,
                 progress: Progress | None = None, say: Callable[[str], None] | None = None
                 ) -> tuple[Tensor, object, str, str]:
    """The command line's probe windows of ``corpus`` and the profile their replacements are
    fitted on (cached): ``(ids (C, L), profile, data digest, data label)``. The profile covers at
    least ``profile_tokens`` tokens in windows of ``seqlen`` drawn with ``seed``; the probe windows
    are its first windows (same seed, same draw order), cut to ``tokens`` tokens."""
    from analysis.data import calibration_windows, tokenize
    from analysis.loading import cache_dir
    from analysis.profile import load_or_profile

    say = say or (lambda _m: None)
    lm.check_seqlen(seqlen)
    toks = tokenize(lm.tokenizer, corpus)
    n_win = max(1, -(-tokens // seqlen))
    n_prof = max(n_win, -(-profile_tokens // seqlen))
    prof_ids = calibration_windows(toks, seqlen, n_prof, seed)
    ids = prof_ids[:n_win, :tokens] if tokens < seqlen else prof_ids[:n_win]  # N tokens: N tokens
    digest = probe_digest(corpus.digest, seqlen, seed)
    prof_label = f"{corpus.label}, {n_prof} x {seqlen} tokens (seed {seed})"
    prof, reused = load_or_profile(lm.model, lm.adapter, prof_ids, fingerprint=lm.fingerprint, data_label=prof_label,
                                   data_digest=digest, cache_root=cache_dir(), progress=progress)
    say(("reused cached profile " if reused else "profiled ") + prof_label)
    return ids, prof, digest, f"{corpus.label}, {ids.shape[0]} x {ids.shape[1]} tokens (seed {seed})"


def cli_sensitivity(args, progress: Progress | None = None, say: Callable[[str], None] | None = None) -> dict:
    """``python -m analysis sensitivity``: measure the grid (cached), add the proxy and its
    agreement, save everything to ``args.out``; returns a summary dict."""
    from analysis.cli import require_at_least_one
    from analysis.data import load_corpus
    from analysis.loading import cache_dir, load_model

    say = say or (lambda _m: None)
    check_replaceable(args.out, SENSITIVITY_MARKERS, "a sensitivity grid")  # before the long work
    check_methods(args.method, args.quant)
    derive = parse_bits(getattr(args, "derive_bits", ",".join(map(str, DERIVED_BITS))))
    require_at_least_one(("--tokens", args.tokens), ("--seqlen", args.seqlen),
                         ("--profile-tokens", getattr(args, "profile_tokens", None)),
                         ("--workers", getattr(args, "workers", None)), ("--group-size", args.group_size))
    t0 = time.perf_counter()
    corpus = load_corpus(args.text)  # a missing text file is said before the model loads
    lm = load_model(args.model, args.device, args.dtype, trust_remote_code=args.trust_remote_code, progress=say)
    lm.require_dense("the sensitivity grid")
    profile_tokens = getattr(args, "profile_tokens", None) or max(args.tokens, PROFILE_TOKENS)
    ids, prof, digest, label = probe_inputs(lm, corpus, tokens=args.tokens, seqlen=args.seqlen, seed=args.seed,
                                            profile_tokens=profile_tokens, progress=progress, say=say)
    stats = prof.all_stats()
    common = dict(method=args.method, quant=args.quant, group_size=args.group_size)
    say(f"measuring sensitivity on {ids.numel()} tokens ({label}) on {lm.device}")
    grid, reused = load_or_measure(lm.model, lm.adapter, ids, stats, fingerprint=lm.fingerprint, data_label=label,
                                   data_digest=digest, cache_root=cache_dir(), progress=progress,
                                   derive_bits=derive, workers=getattr(args, "workers", None), **common)
    # the cached grid keeps its proxy too, unless that proxy was made another way (before the token cap)
    if grid.proxy is None or "agreement" not in grid.meta or grid.meta.get("proxy_token_cap") != TOKEN_CAP:
        say("gradient proxy and its agreement with the measurement")
        proxy = proxy_sensitivity(lm.model, lm.adapter, ids, stats, fingerprint=lm.fingerprint, data_label=label,
                                  data_digest=digest, **common)
        grid.proxy = proxy.table
        grid.meta = {**grid.meta, "agreement": agreement(proxy, grid), "proxy_seconds": proxy.meta["seconds"],
                     "profile_data": prof.meta.get("data"), "proxy_token_cap": TOKEN_CAP}
        if grid.folder:
            save_to_cache(lambda: grid.save(Path(grid.folder), cache=True), "the first view", Path(grid.folder))
    agree = grid.meta["agreement"]
    cached_at = grid.folder
    grid.save(Path(args.out))
    return dict(out=str(args.out), reused=reused, cache=cached_at, seconds=round(time.perf_counter() - t0, 2),
                seconds_measure=grid.meta["seconds"], seconds_proxy=grid.meta["proxy_seconds"],
                probes=int(len(grid.table)), probed=int(grid.meta.get("probes", len(grid.table))),
                derived=int((grid.meta.get("derived") or {}).get("settings", 0)),
                workers=grid.meta.get("workers"), seconds_per_probe=grid.meta.get("seconds_per_probe"),
                linears=int(grid.table["name"].nunique()), dense_loss=grid.dense_loss,
                dense_ppl=float(np.exp(grid.dense_loss)), n_tokens=int(ids.numel()), data=label,
                method=args.method, quant=args.quant, group_size=args.group_size, device=str(lm.device),
                agreement=dict(spearman=agree["spearman"], n=agree["n"],
                               **{f"spearman_{k}": v["spearman"] for k, v in agree["by_kind"].items()},
                               **{f"spearman_{k}": agree[k]["spearman"] for k in ("curvature", "kl") if k in agree}))
