"""Low-rank factorisations of linear layers: ``W (m x n) ~ B (m x k) @ A (k x n)``.

Three methods, each a pure function over tensors plus a registered handler:

* ``svd``      truncated SVD of the weight alone (minimises ``||W - B A||_F``);
* ``act-pca``  PCA of the layer's outputs ``y = W x + b`` on calibration data, with a
               re-centring bias (minimises ``E||y - ŷ||²`` over rank-k affine maps of y);
* ``svd-llm``  SVD of the whitened weight ``W S`` with ``S = chol(X Xᵀ)`` (minimises
               ``||(W - B A) X||_F`` over rank-k maps of x).

All the maths runs in float64 on the weight's device; factors come back in the weight's
dtype. Shapes: ``m`` outputs, ``n`` inputs, ``k`` the rank.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from analysis.stats import LinearStats
from compression.configs import (
    ActPCAConfig,
    LowRankConfig,
    SVDConfig,
    WhitenedSVDConfig,
)
from compression.registry import register

_F64 = torch.float64
_EPS64 = torch.finfo(_F64).eps


# ----------------------------------------------------------------------------- helpers
def _check_rank(k: int, m: int, n: int) -> None:
    if not 1 <= k <= min(m, n):
        raise ValueError(f"rank {k} is outside 1..{min(m, n)} (= min(out {m}, in {n}))")


def _f64(t: Tensor, device: torch.device) -> Tensor:
    return t.detach().to(device=device, dtype=_F64)


def _symmetrise(a: Tensor) -> Tensor:  # (n, n)
    return 0.5 * (a + a.T)


# ----------------------------------------------------------------------------- spectra
def energy_kept(eigvals_desc: Tensor, k: int) -> float:
    """Fraction of the total energy held by the ``k`` largest of ``eigvals_desc``.

    ``eigvals_desc`` (d,) are nonnegative energies — eigenvalues of a covariance, or the
    *squared* singular values of a matrix — nominally in descending order (they are sorted
    here anyway, so "kept" always means the top k). Small negative round-off is clamped to
    zero. A spectrum with zero total energy loses nothing: the result is 1.0.
    """
    if eigvals_desc.dim() != 1:
        raise ValueError(f"energy_kept expects a 1-D spectrum, got shape {tuple(eigvals_desc.shape)}")
    d = eigvals_desc.numel()
    if not 0 <= k <= d:
        raise ValueError(f"k={k} is outside 0..{d}")
    e = torch.sort(eigvals_desc.detach().to(_F64).clamp_min(0), descending=True).values  # (d,)
    total = float(e.sum())
    if total <= 0.0:
        return 1.0
    return float(e[:k].sum()) / total


def effective_rank(values: Tensor) -> float:
    """Effective rank (Roy & Vetterli 2007): ``exp(H(p))`` with ``p_i = e_i / sum_j e_j``.

    ``values`` (d,) are nonnegative *energies*: pass covariance eigenvalues, or the squared
    singular values ``σ²`` of a matrix (Roy & Vetterli's original definition uses ``σ``
    itself; squaring weights the spectrum by energy, consistent with ``energy_kept``).
    A flat spectrum of length d gives d, a one-hot spectrum gives 1, all zeros give 0.
    Negative round-off up to ``1e-6 * max`` is treated as zero; larger negatives raise.
    """
    if values.dim() != 1:
        raise ValueError(f"effective_rank expects a 1-D spectrum, got shape {tuple(values.shape)}")
    e = values.detach().to(_F64)  # (d,)
    if not bool(torch.isfinite(e).all()):
        raise ValueError("effective_rank: the spectrum has non-finite values")
    if e.numel() == 0:
        return 0.0
    top = float(e.abs().max())
    if float(e.min()) < -1e-6 * top:
        raise ValueError(f"effective_rank: energies must be nonnegative (min {float(e.min()):.3g}); "
                         "pass eigenvalues or squared singular values")
    e = e.clamp_min(0)
    total = e.sum()
    if float(total) <= 0.0:
        return 0.0
    p = e / total  # (d,)
    h = -(p * torch.log(torch.where(p > 0, p, torch.ones_like(p)))).sum()  # 0 log 0 = 0
    return math.exp(float(h))


# ----------------------------------------------------------------------------- factorisations
def svd_factors(w: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Truncated SVD ``W ~ B A`` with the singular values split evenly.

    w (m, n) -> A (k, n) = sqrt(S_k) V_kᵀ, B (m, k) = U_k sqrt(S_k), both in ``w.dtype``.
    """
    m, n = w.shape
    _check_rank(k, m, n)
    w64 = _f64(w, w.device)  # (m, n)
    u, s, vh = torch.linalg.svd(w64, full_matrices=False)  # (m, r), (r,), (r, n)
    root = s[:k].sqrt()  # (k,)
    b = u[:, :k] * root  # (m, k)
    a = root[:, None] * vh[:k]  # (k, n)
    return a.to(w.dtype), b.to(w.dtype)


def act_pca_factors(w: Tensor, b: Tensor | None, out_mean: Tensor, out_cov: Tensor,
                    k: int) -> tuple[Tensor, Tensor, Tensor]:
    """Rank-k PCA of the outputs ``y = W x + b``.

    w (m, n); b (m,) or None (taken as 0); out_mean (m,) = E[y] = W E[x] + b (bias
    included); out_cov (m, m) = Cov[y] = W Cov[x] Wᵀ. With U_k (m, k) the top-k
    eigenvectors of Cov[y], the map ``ŷ = U_k U_kᵀ y + (I - U_k U_kᵀ) mu`` is returned as
    A (k, n) = U_kᵀ W, B (m, k) = U_k, bias (m,) = U_k U_kᵀ b + (I - U_k U_kᵀ) mu, in
    ``w.dtype``. It minimises E||y - ŷ||² over all rank-k affine maps of y.
    """
    m, n = w.shape
    _check_rank(k, m, n)
    dev = w.device
    if out_mean.shape != (m,):
        raise ValueError(f"out_mean has shape {tuple(out_mean.shape)}, expected ({m},)")
    if out_cov.shape != (m, m):
        raise ValueError(f"out_cov has shape {tuple(out_cov.shape)}, expected ({m}, {m})")
    if b is not None and b.shape != (m,):
        raise ValueError(f"bias has shape {tuple(b.shape)}, expected ({m},)")
    cov = _symmetrise(_f64(out_cov, dev))  # (m, m)
    mu = _f64(out_mean, dev)  # (m,)
    if not (bool(torch.isfinite(cov).all()) and bool(torch.isfinite(mu).all())):
        raise ValueError("act-pca: the output statistics have non-finite values")
    w64 = _f64(w, dev)  # (m, n)
    b64 = torch.zeros(m, dtype=_F64, device=dev) if b is None else _f64(b, dev)  # (m,)
    _, vecs = torch.linalg.eigh(cov)  # ascending eigenvalues; vecs (m, m)
    u = vecs[:, -k:].flip(-1)  # (m, k) top-k, largest first
    a = u.T @ w64  # (k, n)
    proj_b = u @ (u.T @ b64)  # (m,)
    bias = proj_b + mu - u @ (u.T @ mu)  # (m,)
    return a.to(w.dtype), u.to(w.dtype), bias.to(w.dtype)


def whitening_factor(xxt: Tensor, damp: float = 1e-4, retries: int = 4) -> Tensor:
    """Lower-triangular S (n, n), float64 on ``xxt``'s device, with ``S Sᵀ ≈ X Xᵀ``.

    First the plain Cholesky factor of xxt (n, n). If xxt is not (numerically) positive
    definite — Cholesky fails or a pivot is below ``n * eps * max(diag)`` — retry with
    ``damp * mean(diag) * I`` added, the damping growing x10 per try, ``retries`` times.
    If that still fails, take the symmetric eigen square root with eigenvalues clamped to
    ``max(damp, n*eps) * mean(diag)`` and re-triangularise it by QR (so S stays lower
    triangular). Raises ``ValueError`` when xxt is non-finite, has no positive diagonal
    (no data), is clearly indefinite (not a Gram matrix), or no factor could be formed.
    """
    if xxt.dim() != 2 or xxt.shape[0] != xxt.shape[1]:
        raise ValueError(f"X Xᵀ must be square, got shape {tuple(xxt.shape)}")
    if damp < 0:
        raise ValueError(f"damp must be >= 0, got {damp}")
    n = xxt.shape[0]
    g = _symmetrise(xxt.detach().to(_F64))  # (n, n)
    if not bool(torch.isfinite(g).all()):
        raise ValueError("svd-llm: X Xᵀ has non-finite entries; the calibration statistics are corrupt")
    diag = torch.diagonal(g)  # (n,)
    mean_diag = float(diag.mean())
    if not mean_diag > 0.0:
        raise ValueError("svd-llm: X Xᵀ has no positive diagonal (no calibration tokens?)")
    pivot_floor = n * _EPS64 * float(diag.max())
    eye = torch.eye(n, dtype=_F64, device=g.device)

    def chol(a: Tensor) -> Tensor | None:
        lower, info = torch.linalg.cholesky_ex(a)
        if int(info) != 0:
            return None
        piv = torch.diagonal(lower) ** 2  # (n,)
        if not bool(torch.isfinite(lower).all()) or float(piv.min()) <= pivot_floor:
            return None
        return lower

    s = chol(g)
    if s is not None:
        return s
    lam = damp * mean_diag
    for _ in range(retries if damp > 0 else 0):
        s = chol(g + lam * eye)
        if s is not None:
            return s
        lam *= 10.0

    # symmetric eigen square root, clamped, then made lower-triangular: if Q R = sqrt(G)
    # (symmetric) then L = Rᵀ satisfies L Lᵀ = Rᵀ R = sqrt(G)ᵀ sqrt(G) = G.
    evals, evecs = torch.linalg.eigh(g)  # (n,), (n, n)
    top = float(evals.max())
    if float(evals.min()) < -1e-3 * max(top, 0.0):
        raise ValueError(f"svd-llm: X Xᵀ is not positive semi-definite (eigenvalues {float(evals.min()):.3g} .. "
                         f"{top:.3g}); it is not a Gram matrix of inputs")
    floor = max(damp, n * _EPS64) * mean_diag
    root = (evecs * evals.clamp_min(floor).sqrt()) @ evecs.T  # (n, n) symmetric
    _, r = torch.linalg.qr(root)  # root = Q R
    sign = torch.where(torch.diagonal(r) < 0, -1.0, 1.0).to(_F64)  # (n,)
    s = r.T * sign  # (n, n) lower, positive diagonal
    if not bool(torch.isfinite(s).all()) or float(torch.diagonal(s).min()) <= 0.0:
        raise ValueError("svd-llm: could not form a whitening factor of X Xᵀ, even with damping and an "
                         "eigenvalue floor")
    return s


def whitened_svd_factors(w: Tensor, xxt: Tensor, k: int, damp: float = 1e-4) -> tuple[Tensor, Tensor]:
    """SVD-LLM: truncated SVD of the whitened weight.

    w (m, n); xxt (n, n) = sum_t x_t x_tᵀ. With S = whitening_factor(xxt) (lower, S Sᵀ =
    X Xᵀ) and W S = U Σ Vᵀ: B (m, k) = U_k Σ_k^½, A (k, n) = Σ_k^½ V_kᵀ S⁻¹ (a triangular
    solve), in ``w.dtype``. Minimises ||(W - B A) X||_F over rank-k B A.
    """
    m, n = w.shape
    _check_rank(k, m, n)
    if xxt.shape != (n, n):
        raise ValueError(f"X Xᵀ has shape {tuple(xxt.shape)}, expected ({n}, {n}) for a weight of {n} inputs")
    dev = w.device
    w64 = _f64(w, dev)  # (m, n)
    s = whitening_factor(_f64(xxt, dev), damp)  # (n, n) lower
    u, sig, vh = torch.linalg.svd(w64 @ s, full_matrices=False)  # (m, r), (r,), (r, n)
    root = sig[:k].sqrt()  # (k,)
    b = u[:, :k] * root  # (m, k)
    a = torch.linalg.solve_triangular(s, root[:, None] * vh[:k], upper=False, left=False)  # (k, n): a S = .
    if not (bool(torch.isfinite(a).all()) and bool(torch.isfinite(b).all())):
        raise ValueError("svd-llm: the factors are not finite (X Xᵀ too ill-conditioned); raise damp")
    return a.to(w.dtype), b.to(w.dtype)


# ----------------------------------------------------------------------------- module
class LowRankLinear(nn.Module):
    """``y = B(A(x)) (+ bias)`` with ``A = Linear(n, k)``, ``B = Linear(k, m)``, no inner biases.

    ``A`` and ``B`` are plain submodules so they can later be swapped for quantised ones;
    ``bias`` (m,) stays in the model dtype (or is None).
    """

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = False, *,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        _check_rank(rank, out_features, in_features)
        self.in_features = in_features
        self.out_features = out_features
        self.rank = rank
        kw = {"device": device, "dtype": dtype}
        self.A = nn.utils.skip_init(nn.Linear, in_features, rank, bias=False, **kw)
        self.B = nn.utils.skip_init(nn.Linear, rank, out_features, bias=False, **kw)
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, **kw))
        else:
            self.register_parameter("bias", None)

    def forward(self, x: Tensor) -> Tensor:
        y = self.B(self.A(x))
        if self.bias is not None:
            y = y + self.bias
        return y

    @classmethod
    def from_linear(cls, linear: nn.Linear, A: Tensor, B: Tensor, bias: Tensor | None = None) -> LowRankLinear:
        """Build on ``linear``'s device and dtype from A (k, n), B (m, k) and optionally a bias
        (m,); with ``bias=None`` the linear's own bias (if any) is kept."""
        m, n = linear.out_features, linear.in_features
        k = A.shape[0]
        if A.shape != (k, n) or B.shape != (m, k):
            raise ValueError(f"factors A {tuple(A.shape)}, B {tuple(B.shape)} do not fit a linear of "
                             f"{m} outputs x {n} inputs; expected A (k, {n}), B ({m}, k)")
        if bias is not None and bias.shape != (m,):
            raise ValueError(f"bias has shape {tuple(bias.shape)}, expected ({m},)")
        w = linear.weight
        src_bias = bias if bias is not None else linear.bias
        mod = cls(n, m, k, bias=src_bias is not None, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            mod.A.weight.copy_(A)
            mod.B.weight.copy_(B)
            if src_bias is not None:
                mod.bias.copy_(src_bias)
        return mod

    @classmethod
    def empty(cls, out_features: int, in_features: int, rank: int, bias: bool, dtype: torch.dtype,
              device: torch.device | str) -> LowRankLinear:
        """Uninitialised module of the given shape, for loading a state dict into."""
        return cls(in_features, out_features, rank, bias=bias, device=device, dtype=dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"bias={self.bias is not None}")


# ----------------------------------------------------------------------------- handlers
# ------------------------------------------------------------------------ nested truncations
# Config types whose factors at every rank are truncations of one decomposition: given the
# weight (m, n) and stats, ``(left (m, kmax), right (kmax, n))`` in float64 with
# ``B_k A_k = left[:, :k] @ right[:k]`` for every k <= kmax (what the handler builds, before
# the split of the singular values between the factors). Sensitivity grids use it to make every
# grid rank from one decomposition.
NestedFactors = Callable[[Tensor, LinearStats | None, LowRankConfig, int], tuple[Tensor, Tensor]]
NESTED: dict[type[LowRankConfig], NestedFactors] = {}


def _nested_svd(w: Tensor, stats: LinearStats | None, config: LowRankConfig, kmax: int) -> tuple[Tensor, Tensor]:
    u, sig, vh = torch.linalg.svd(w.double(), full_matrices=False)
    return u[:, :kmax] * sig[:kmax], vh[:kmax]


def _nested_whitened(w: Tensor, stats: LinearStats | None, config: WhitenedSVDConfig,
                     kmax: int) -> tuple[Tensor, Tensor]:
    n = w.shape[1]
    st = _require_stats(config, stats, n)
    s = whitening_factor(st.inputs.xxt.to(w.device, torch.float64), config.damp)
    u, sig, vh = torch.linalg.svd(w.double() @ s, full_matrices=False)
    right = torch.linalg.solve_triangular(s, vh[:kmax], upper=False, left=False)  # (kmax, n) = V_kᵀ S⁻¹
    if not bool(torch.isfinite(right).all()):
        raise ValueError("svd-llm: the factors are not finite (X Xᵀ too ill-conditioned); raise damp")
    return u[:, :kmax] * sig[:kmax], right


NESTED[SVDConfig] = _nested_svd
NESTED[WhitenedSVDConfig] = _nested_whitened


def _require_stats(config: LowRankConfig, stats: LinearStats | None, n: int) -> LinearStats:
    if stats is None:
        raise ValueError(f"{config.name} needs calibration statistics: run the profiler first")
    if stats.inputs.xxt.shape != (n, n):
        raise ValueError(f"{config.name}: statistics are for {stats.inputs.xxt.shape[0]} inputs, "
                         f"the layer has {n}")
    if stats.n_tokens <= 0:
        raise ValueError(f"{config.name}: the calibration statistics hold no tokens: run the profiler first")
    return stats


@register(SVDConfig)
@torch.no_grad()
def _svd(linear: nn.Linear, config: SVDConfig, stats: LinearStats | None) -> LowRankLinear:
    m, n = linear.out_features, linear.in_features
    config.check(m, n)
    a, b = svd_factors(linear.weight, config.rank)
    return LowRankLinear.from_linear(linear, a, b)


@register(ActPCAConfig)
@torch.no_grad()
def _act_pca(linear: nn.Linear, config: ActPCAConfig, stats: LinearStats | None) -> LowRankLinear:
    m, n = linear.out_features, linear.in_features
    config.check(m, n)
    st = _require_stats(config, stats, n)
    w, b = linear.weight, linear.bias
    a, u, bias = act_pca_factors(w, b, st.out_mean(w, b), st.out_cov(w), config.rank)
    return LowRankLinear.from_linear(linear, a, u, bias)


@register(WhitenedSVDConfig)
@torch.no_grad()
def _whitened_svd(linear: nn.Linear, config: WhitenedSVDConfig, stats: LinearStats | None) -> LowRankLinear:
    m, n = linear.out_features, linear.in_features
    config.check(m, n)
    st = _require_stats(config, stats, n)
    a, b = whitened_svd_factors(linear.weight, st.inputs.xxt, config.rank, config.damp)
    return LowRankLinear.from_linear(linear, a, b)
