"""Streaming activation profiler: per-linear input statistics, output and weight spectra.

Forward hooks on one linear per input group (q/k/v share the attention norm's output,
gate/up the MLP norm's) accumulate ``sum x`` and ``sum x xᵀ`` (fp32 per batch, fp64
running sums) on the model's device. Output moments follow exactly from the input ones
(``Cov[y] = W Cov[x] Wᵀ``), so a profile costs about one forward pass plus one ``xᵀx`` per
group. In layer-by-layer mode only one decoder layer's inputs are held at a time.
"""
from __future__ import annotations

import datetime as _dt
import json
import shutil
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from analysis.adapters import Adapter, LinearInfo
from analysis.atomic import EXACT_FLOATS, atomic_folder, holds, save_to_cache
from analysis.layerwise import capture, run_layer
from analysis.stats import InputStats, LinearStats

Progress = Callable[[float, str], None]
PROFILE_FORMAT = 3  # 3: batches centred before the fp32 product; 2+: the centred scatter is stored
PROFILE_MARKERS = ("meta.json", "arrays.safetensors")  # what makes a folder a profile (meta.json written last)
SUMMARY_COLUMNS = ["name", "layer", "role", "out_features", "in_features", "eff_rank_act", "eff_rank_weight",
                   "rank90", "rank95", "rank99", "weight_rank95", "break_even"]


class TooFewTokens(UserWarning):
    pass


# ------------------------------------------------------------------------ primitives
def effective_rank(energies: Tensor) -> float:
    """Roy & Vetterli effective rank ``exp(H(p))``, ``p_i = e_i / sum e`` over nonnegative
    energies (eigenvalues, or squared singular values)."""
    e = energies.double().clamp_min(0)
    total = e.sum()
    if total <= 0:
        return 0.0
    p = e / total
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def rank_for_energy(energies_desc: Tensor, fraction: float) -> int:
    """Smallest k whose top-k energies hold ``fraction`` of the total."""
    e = energies_desc.double().clamp_min(0)
    total = e.sum()
    if total <= 0:
        return 0
    cum = torch.cumsum(e, 0) / total
    return int(torch.searchsorted(cum, torch.tensor(fraction - 1e-12, dtype=cum.dtype)).item()) + 1


def psd_sqrt(c: Tensor) -> Tensor:
    """Symmetric square root of a PSD matrix (n, n), eigenvalues clamped at 0."""
    lam, v = torch.linalg.eigh(c)
    return (v * lam.clamp_min(0).sqrt()) @ v.T


def output_eigvals(weight: Tensor, stats: LinearStats, cov_sqrt: Tensor | None = None) -> Tensor:
    """Eigenvalues (descending, >= 0, length min(m, n)) of the output covariance
    ``W Cov[x] Wᵀ``. Its nonzero spectrum equals that of ``C^½ Wᵀ W C^½``, so the smaller of
    the two Gram matrices is decomposed (n x n when m > n). ``cov_sqrt`` (``C^½``, shared by
    the linears of one input group) can be passed in to avoid recomputing it."""
    m, n = weight.shape
    w = weight.detach().double()
    if m <= n:
        g = w @ stats.inputs.cov.to(w.device) @ w.T  # (m, m)
    else:
        r = cov_sqrt if cov_sqrt is not None else psd_sqrt(stats.inputs.cov.to(w.device))  # (n, n)
        g = r @ (w.T @ w) @ r  # (n, n)
    return torch.linalg.eigvalsh(g).flip(0).clamp_min(0)


def weight_singular_values(weight: Tensor) -> Tensor:
    """Singular values of W (descending), from the eigenvalues of the smaller Gram matrix."""
    w = weight.detach().double()
    g = w @ w.T if w.shape[0] <= w.shape[1] else w.T @ w
    return torch.linalg.eigvalsh(g).flip(0).clamp_min(0).sqrt()


# ------------------------------------------------------------------------ the profile
@dataclass
class Profile:
    meta: dict
    linears: list[LinearInfo]
    inputs: dict[str, InputStats]  # by LinearInfo.input_key
    act_eigvals: dict[str, Tensor] = field(default_factory=dict)  # by module name, descending
    weight_sv: dict[str, Tensor] = field(default_factory=dict)
    summary: pd.DataFrame | None = None

    def stats(self, name: str) -> LinearStats:
        li = self.info(name)
        return LinearStats(self.inputs[li.input_key])

    def info(self, name: str) -> LinearInfo:
        for li in self.linears:
            if li.name == name:
                return li
        raise KeyError(f"{name} is not a profiled linear")

    def all_stats(self) -> dict[str, LinearStats]:
        return {li.name: LinearStats(self.inputs[li.input_key]) for li in self.linears}

    # -------------------------------------------------------------------- artifact
    def save(self, folder: Path, cache: bool = False) -> None:
        """Write atomically: a temp folder renamed into place, ``meta.json`` last inside it,
        so an interrupted save never leaves an artifact that reads as complete (``cache``: into
        RankLab's cache, see ``atomic_folder``)."""
        folder = Path(folder).expanduser()
        with atomic_folder(folder, PROFILE_MARKERS, "a profile", cache=cache) as tmp:
            arrays = {}
            for key, s in self.inputs.items():
                # the centred scatter in float32, the sum in float64: E[x xᵀ] rebuilt on load keeps the
                # covariance to float32 precision (storing x xᵀ itself in float32 lost it to cancellation
                # for inputs with large means: +0.2 % variance on a channel of mean 300)
                arrays[f"in.{key}.cxx"] = _centred(s).float().cpu().contiguous()
                arrays[f"in.{key}.sum"] = s.x_sum.cpu().contiguous()
            for name, v in self.act_eigvals.items():
                arrays[f"act_eig.{name}"] = v.cpu().contiguous()
            for name, v in self.weight_sv.items():
                arrays[f"weight_sv.{name}"] = v.cpu().contiguous()
            save_file(arrays, tmp / "arrays.safetensors")
            if self.summary is not None:
                self.summary.to_csv(tmp / "summary.csv", index=False)
            meta = {**self.meta, "linears": [li.__dict__ for li in self.linears],
                    "n_tokens_by_input": {k: s.n_tokens for k, s in self.inputs.items()}}
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2))

    @classmethod
    def load(cls, folder: Path, device: torch.device | str = "cpu") -> Profile:
        folder = Path(folder).expanduser()
        if not (folder / "meta.json").exists():
            raise FileNotFoundError(f"{folder} holds no complete profile (meta.json missing)")
        meta = json.loads((folder / "meta.json").read_text())
        if meta.get("format") != PROFILE_FORMAT:
            raise ValueError(f"{folder}: profile format {meta.get('format')} is not {PROFILE_FORMAT}; profile again")
        arrays = load_file(folder / "arrays.safetensors", device=str(device))
        linears = [LinearInfo(**d) for d in meta.pop("linears")]
        counts = meta.pop("n_tokens_by_input")
        inputs = {k: _uncentred(counts[k], arrays[f"in.{k}.sum"], arrays[f"in.{k}.cxx"]) for k in counts}
        act = {k[len("act_eig."):]: v for k, v in arrays.items() if k.startswith("act_eig.")}
        wsv = {k[len("weight_sv."):]: v for k, v in arrays.items() if k.startswith("weight_sv.")}
        summary = pd.read_csv(folder / "summary.csv", **EXACT_FLOATS) if (folder / "summary.csv").exists() else None
        return cls(meta, linears, inputs, act, wsv, summary)


def _centred(s: InputStats) -> Tensor:
    """``Σ (x - μ)(x - μ)ᵀ = Σ x xᵀ - (Σ x)(Σ x)ᵀ / N`` (n, n), float64."""
    n = max(s.n_tokens, 1)
    return s.xxt - torch.outer(s.x_sum, s.x_sum) / n


def _uncentred(n_tokens: int, x_sum: Tensor, cxx: Tensor) -> InputStats:
    """``InputStats`` from the centred scatter (float32 on disk) and the float64 sum."""
    x_sum = x_sum.double()
    return InputStats(n_tokens, x_sum, cxx.double() + torch.outer(x_sum, x_sum) / max(n_tokens, 1))


def profile_key(fingerprint: str, data_digest: str, n_tokens: int) -> str:
    return f"{fingerprint}-{data_digest}-{n_tokens}"


# ------------------------------------------------------------------------ accumulation
def _group_heads(linears: list[LinearInfo]) -> dict[str, LinearInfo]:
    """One linear per shared input: the first of each (layer, group)."""
    heads: dict[str, LinearInfo] = {}
    for li in linears:
        heads.setdefault(li.input_key, li)
    return heads


@torch.no_grad()
def collect_input_stats(model: nn.Module, adapter: Adapter, ids: Tensor, batch_size: int = 4,
                        layerwise: bool = False, progress: Progress | None = None,
                        should_stop: Callable[[], bool] | None = None) -> dict[str, InputStats]:
    """Accumulate per-group input statistics over calibration windows ``ids`` (C, L)."""
    linears = adapter.linears(model)
    heads = _group_heads(linears)
    device = next(model.parameters()).device
    stats = {k: InputStats.zeros(li.in_features, device) for k, li in heads.items()}
    handles = []
    modules = dict(model.named_modules())
    for key, li in heads.items():
        def hook(_mod, args, key=key):
            stats[key].update(args[0])
        handles.append(modules[li.name].register_forward_pre_hook(hook))
    batches = list(ids.split(batch_size))
    try:
        if not layerwise:
            body = model.base_model
            for b, batch in enumerate(batches):
                _check_stop(should_stop)
                if progress:  # said before the batch: the first one can take a while
                    progress(b / len(batches), f"profiling batch {b + 1}/{len(batches)}")
                body(input_ids=batch.to(device), use_cache=False)
        else:
            layers = adapter.layers(model)
            if progress:
                progress(0.0, f"capturing the first layer's inputs ({len(batches)} batches)")
            states = [capture(model, adapter, batch) for batch in batches]
            hidden = [s.hidden for s in states]
            for i, layer in enumerate(layers):
                _check_stop(should_stop)
                for b in range(len(batches)):
                    hidden[b] = run_layer(layer, hidden[b], states[b].calls[i])
                if progress:
                    progress((i + 1) / len(layers), f"profiling layer {i + 1}/{len(layers)}")
    finally:
        for h in handles:
            h.remove()
    return stats


def _check_stop(should_stop: Callable[[], bool] | None) -> None:
    if should_stop is not None and should_stop():
        raise InterruptedError("profiling cancelled")


@torch.no_grad()
def spectra(model: nn.Module, linears: list[LinearInfo], inputs: dict[str, InputStats],
            progress: Progress | None = None) -> tuple[dict[str, Tensor], dict[str, Tensor], pd.DataFrame, float]:
    """Output eigenvalues and weight singular values of every linear, plus the summary
    table. Returns (act_eigvals, weight_sv, summary, seconds spent in eigensolvers)."""
    modules = dict(model.named_modules())
    act, wsv, rows = {}, {}, []
    t_eig = 0.0
    roots: dict[str, Tensor] = {}  # C^½ per input group, only for linears wider out than in
    for j, li in enumerate(linears):
        w = modules[li.name].weight
        t = time.perf_counter()
        st = LinearStats(inputs[li.input_key])
        root = None
        if li.out_features > li.in_features:
            if li.input_key not in roots:
                roots[li.input_key] = psd_sqrt(st.inputs.cov.to(w.device))
            root = roots[li.input_key]
        ev = output_eigvals(w, st, root).cpu()
        sv = weight_singular_values(w).cpu()
        t_eig += time.perf_counter() - t
        act[li.name], wsv[li.name] = ev, sv
        full = min(li.out_features, li.in_features)
        rows.append(dict(name=li.name, layer=li.layer, role=li.role, out_features=li.out_features,
                         in_features=li.in_features, eff_rank_act=effective_rank(ev),
                         eff_rank_weight=effective_rank(sv ** 2),
                         rank90=min(rank_for_energy(ev, 0.90), full), rank95=min(rank_for_energy(ev, 0.95), full),
                         rank99=min(rank_for_energy(ev, 0.99), full), weight_rank95=rank_for_energy(sv ** 2, 0.95),
                         break_even=li.break_even))
        if progress:
            progress((j + 1) / len(linears), f"spectra {j + 1}/{len(linears)}")
    return act, wsv, pd.DataFrame(rows, columns=SUMMARY_COLUMNS), t_eig


def profile_model(model: nn.Module, adapter: Adapter, ids: Tensor, *, fingerprint: str, data_label: str,
                  data_digest: str, batch_size: int = 4, layerwise: bool = False, progress: Progress | None = None,
                  should_stop: Callable[[], bool] | None = None) -> Profile:
    """Profile ``model`` on calibration windows ``ids`` (C, L): statistics, spectra, summary."""
    linears = adapter.linears(model)
    n_tokens = ids.numel()
    widest = max(max(li.in_features, li.out_features) for li in linears)
    if n_tokens < widest:
        warnings.warn(f"{n_tokens} calibration tokens are fewer than the widest layer ({widest}): covariances "
                      f"will be rank-deficient; use at least {widest} tokens (ideally {8 * widest})",
                      TooFewTokens, stacklevel=2)
    say = progress or (lambda f, m: None)
    t0 = time.perf_counter()
    inputs = collect_input_stats(model, adapter, ids, batch_size, layerwise,
                                 lambda f, m: say(0.7 * f, m), should_stop)
    t_stats = time.perf_counter() - t0
    act, wsv, summary, t_eig = spectra(model, linears, inputs, lambda f, m: say(0.7 + 0.3 * f, m))
    device = next(model.parameters()).device
    meta = dict(format=PROFILE_FORMAT, fingerprint=fingerprint, data=data_label, data_digest=data_digest,
                n_tokens=n_tokens, seqlen=ids.shape[1], windows=ids.shape[0], dtype=str(next(model.parameters()).dtype),
                device=str(device), layerwise=layerwise, date=_dt.datetime.now().isoformat(timespec="seconds"),
                seconds_stats=round(t_stats, 3), seconds_eig=round(t_eig, 3))
    return Profile(meta, linears, inputs, act, wsv, summary)


def load_or_profile(model: nn.Module, adapter: Adapter, ids: Tensor, *, fingerprint: str, data_label: str,
                    data_digest: str, cache_root: Path, cached_only: bool = False,
                    **kw) -> tuple[Profile | None, bool]:
    """The cached profile for (model, data, token count) if one is complete, else a new one
    (saved), or None when ``cached_only``. Returns (profile, reused)."""
    folder = Path(cache_root) / "profiles" / profile_key(fingerprint, data_digest, ids.numel())
    if (folder / "meta.json").exists():
        try:
            prof = Profile.load(folder, next(model.parameters()).device)
        except (ValueError, OSError, KeyError):
            prof = None  # a broken cache entry: profiled again below
        if prof is not None and prof.meta.get("fingerprint") == fingerprint \
                and prof.meta.get("n_tokens") == ids.numel():
            return prof, True
    if cached_only:
        return None, False
    prof = profile_model(model, adapter, ids, fingerprint=fingerprint, data_label=data_label,
                         data_digest=data_digest, **kw)

    def save() -> None:
        if folder.exists() and not holds(folder, PROFILE_MARKERS):
            shutil.rmtree(folder)  # a broken cache entry (RankLab's own cache): rebuilt
        prof.save(folder, cache=True)

    if save_to_cache(save, "the profile", folder):
        prof.meta["folder"] = str(folder)
    return prof, False
