"""SliceGPT (Ashkboos et al. 2024): delete rows and columns after rotating the residual stream.

The idea, in three steps:

1. *Computational invariance.* Make every norm a parameter-free RMSNorm: fold each norm's
   scale (and a LayerNorm's bias) into the linears that read its output; for LayerNorm
   models first make every writer to the residual stream (embeddings, attention output,
   MLP output) produce zero-mean vectors, so the norm's mean subtraction is a no-op. A
   parameter-free RMSNorm commutes with any orthogonal ``Q``: ``rms(x Q) = rms(x)``.
2. *Rotate.* Per block, the PCA basis ``Q`` (eigenvectors of the uncentred second moment
   ``Σ xᵀx`` over calibration tokens, fp64) of the residual signal: readers ``W <- W Q``,
   writers ``W <- Qᵀ W``, embeddings ``E <- E Q``. Blocks that use different bases are
   joined by a ``Q_aᵀ Q_b`` matrix on the skip path (the *shortcut*).
3. *Slice.* Keep the first ``d' = round_down_8(D (1 - fraction))`` principal directions
   everywhere: every matrix on the residual side loses rows or columns.

Residual-stream vectors are rows: ``x`` (…, D); ``nn.Linear`` computes ``x Wᵀ + b`` with
``W`` (out, in). A decoder layer becomes a ``SlicedDecoderLayer`` that keeps the layer's own
sub-modules under their own names (so ``Adapter.linears`` and the plan keys still resolve)
and adds two parameters, ``shortcut_attn`` (d_in, d_mid) and ``shortcut_mlp`` (d_mid, d_out).

Tied embeddings. Folding the final norm's scale into the head breaks the tie, so the
reference implementation unties the head (``keep_tied_head=False``: ``V·d'`` more
parameters: on a small model whose embedding matrix is a large share of it, that eats
most of the saving). With
``keep_tied_head=True`` the head stays the (rotated, sliced) embedding matrix and the final
norm becomes ``RotatedFinalNorm``: a parameter-free RMSNorm followed by a ``d' x d'``
matrix ``Q_eᵀ diag(g) Q_last`` (plus bias ``Q_eᵀ β`` for LayerNorm models) that absorbs the
final norm's scale and the change from the last layer's basis to the embedding's basis
``Q_e``. ``tied_basis`` picks ``Q_e``: ``"embed"`` (PCA of the embedding outputs, what
SliceGPT uses for the first layer), ``"head"`` (PCA of the head's input) or ``"joint"``
(PCA of the sum of both trace-normalised second moments; "head" and "joint" cost one
extra dense pass over the calibration windows). "joint" is the default: on SmolLM2-135M at
25 % it matched the untied reference's perplexity with 21M fewer parameters, where
"embed" and "head" alone were much worse). A tied LayerNorm model cannot centre its
embedding matrix (the head reads it too), so its first layer gets an ``input_map``
(``Q_eᵀ C Q_0``, d' x d') that centres the embeddings and changes to the first layer's
basis. Every extra matrix is counted in the report.

Supported: llama, mistral, qwen2, qwen3 (RMSNorm) and opt, gpt2 (pre-LayerNorm).
"""
from __future__ import annotations

import importlib
import inspect
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from analysis.adapters import ADAPTERS, Adapter, get_submodule, set_submodule
from analysis.layerwise import capture

Progress = Callable[[float, str], None]
_F64 = torch.float64

# the layouts ``SlicedDecoderLayer`` re-implements (an adapter's ``slice_layout``), and the
# model types whose adapter names one
LAYOUTS = ("llama", "opt", "gpt2")
SUPPORTED = tuple(sorted(t for t, cls in ADAPTERS.items() if cls.slice_layout in LAYOUTS))
TIED_BASES = ("joint", "embed", "head")


# ============================================================================ primitives
def sliced_dim(D: int, slice_fraction: float, multiple: int = 8) -> int:
    """Width kept after deleting ``slice_fraction`` of ``D``: rounded down to a multiple of
    ``multiple`` (at least one multiple); ``D`` itself at fraction 0."""
    if not 0 <= slice_fraction < 1:
        raise ValueError(f"slice_fraction {slice_fraction} must be in [0, 1)")
    if slice_fraction == 0:
        return D
    d = int(math.floor(D * (1 - slice_fraction) / multiple)) * multiple
    return min(D, max(multiple, d))


def pca_basis(cov: Tensor) -> Tensor:
    """Eigenvectors of the symmetric ``cov`` (D, D) as columns of ``Q`` (D, D), by descending
    eigenvalue; computed in float64."""
    c = cov.detach().to(_F64)
    _, vecs = torch.linalg.eigh(0.5 * (c + c.T))  # ascending
    return vecs.flip(-1)


def kept_energy(cov: Tensor, Q: Tensor, d: int) -> float:
    """Fraction of ``tr(cov)`` that the first ``d`` columns of ``Q`` (D, D) keep."""
    c = cov.to(_F64)
    q = Q[:, :d].to(c)
    total = float(torch.trace(c))
    return float(torch.trace(q.T @ c @ q)) / total if total > 0 else 1.0


def fold_norm_into_reader(weight: Tensor, bias: Tensor | None, scale: Tensor, shift: Tensor | None
                          ) -> tuple[Tensor, Tensor | None]:
    """A linear reading ``n g + β`` equals one reading ``n``: ``W (m, D) -> W diag(g)`` and
    ``b (m,) -> b + W β``. Returns (weight (m, D), bias (m,) or None) in float64."""
    W = weight.to(_F64)
    new_w = W * scale.to(_F64)[None, :]
    if shift is None:
        return new_w, None if bias is None else bias.to(_F64)
    b = W @ shift.to(_F64)
    return new_w, b if bias is None else bias.to(_F64) + b


def center_writer(weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """Make a writer's outputs zero-mean over the hidden dim: ``W (D, n) -> C W``,
    ``b (D,) -> C b`` with ``C = I - 11ᵀ/D``. Float64."""
    W = weight.to(_F64)
    new_w = W - W.mean(dim=0, keepdim=True)
    return new_w, None if bias is None else bias.to(_F64) - bias.to(_F64).mean()


def center_rows(E: Tensor) -> Tensor:
    """Embedding rows (V, D) with their mean over the hidden dim removed. Float64."""
    e = E.to(_F64)
    return e - e.mean(dim=1, keepdim=True)


def rotate_reader(weight: Tensor, Q: Tensor) -> Tensor:
    """A linear reading ``x`` reads ``x Q`` instead: ``W (m, D) -> W Q`` (m, d) for ``Q`` (D, d)."""
    return weight.to(_F64) @ Q.to(_F64)


def rotate_writer(weight: Tensor, bias: Tensor | None, Q: Tensor) -> tuple[Tensor, Tensor | None]:
    """A linear writing ``y`` writes ``y Q`` instead: ``W (D, n) -> Qᵀ W`` (d, n), ``b -> Qᵀ b``."""
    q = Q.to(_F64)
    return q.T @ weight.to(_F64), None if bias is None else q.T @ bias.to(_F64)


def shortcut_matrix(Q_from: Tensor, Q_to: Tensor) -> Tensor:
    """Skip-path map between two sliced bases: ``Q_fromᵀ Q_to`` (d_from, d_to)."""
    return Q_from.to(_F64).T @ Q_to.to(_F64)


def final_projection(Q_last: Tensor, scale: Tensor, shift: Tensor | None, Q_emb: Tensor
                     ) -> tuple[Tensor, Tensor | None]:
    """``nn.Linear`` weight (d_e, d_last) and bias (d_e,) mapping the parameter-free final
    norm's output ``n'`` (in the sliced basis ``Q_last`` (D, d_last)) to the head's input in
    the sliced embedding basis ``Q_emb`` (D, d_e): ``n' Q_lastᵀ diag(g) Q_emb + β Q_emb``."""
    ql, qe = Q_last.to(_F64), Q_emb.to(_F64)
    w = qe.T @ (scale.to(_F64)[:, None] * ql)
    return w, None if shift is None else qe.T @ shift.to(_F64)


# ============================================================================ modules
class RMSNormNoScale(nn.Module):
    """``x / sqrt(Σ x² / mean_dim + eps)`` with no parameters. ``mean_dim`` stays the
    original width after slicing, so the sliced norm approximates the full one."""

    def __init__(self, mean_dim: int, eps: float):
        super().__init__()
        self.mean_dim, self.eps = int(mean_dim), float(eps)

    def forward(self, x: Tensor) -> Tensor:
        dt = x.dtype
        x = x.to(torch.promote_types(dt, torch.float32))  # at least fp32; fp64 stays fp64
        var = x.pow(2).sum(-1, keepdim=True) / self.mean_dim
        return (x * torch.rsqrt(var + self.eps)).to(dt)

    def extra_repr(self) -> str:
        return f"mean_dim={self.mean_dim}, eps={self.eps}"


class RotatedFinalNorm(nn.Module):
    """Final norm of a sliced model whose head stays tied to the embeddings: a
    parameter-free RMSNorm, then ``proj`` (d' x d') into the embedding's basis."""

    def __init__(self, norm: RMSNormNoScale, proj: nn.Linear):
        super().__init__()
        self.norm, self.proj = norm, proj

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(self.norm(x))


class SlicedDecoderLayer(nn.Module):
    """A decoder layer with explicit residual paths: ``x_mid = x S_attn + attn(norm(x))``,
    ``x_out = x_mid S_mlp + mlp(norm(x_mid))``. Holds the original layer's sub-modules under
    their own names plus ``shortcut_attn`` and ``shortcut_mlp`` (None = identity), and for
    the first layer of a LayerNorm model whose head stays tied, ``input_map``: the
    embeddings are then not centred, and ``input_map`` centres them and changes the basis
    (``x <- x M`` before anything else). Inference only (no dropout)."""

    def __init__(self, layer: nn.Module, family: str, attn_norm: str, mlp_norm: str, attn_path: str = "self_attn",
                 attn_unused_kwargs: tuple[str, ...] = ()):
        super().__init__()
        if family not in LAYOUTS:
            raise NotImplementedError(f"no sliced layer for layout {family!r}; layouts: {', '.join(LAYOUTS)}")
        self.family, self.attn_norm, self.mlp_norm = family, attn_norm, mlp_norm
        self.attn_path, self.attn_unused_kwargs = attn_path, tuple(attn_unused_kwargs)
        for name, child in layer.named_children():
            setattr(self, name, child)
        for attr in ("attention_type", "layer_idx"):
            if hasattr(layer, attr) and not isinstance(getattr(layer, attr), nn.Module):
                setattr(self, attr, getattr(layer, attr))
        params = list(inspect.signature(layer.forward).parameters.values())
        self.arg_names = tuple(p.name for p in params[1:] if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD))
        self.input_map: nn.Parameter | None = None  # (d_e, d_in), first layer of a tied LayerNorm model only
        self.shortcut_attn: nn.Parameter | None = None
        self.shortcut_mlp: nn.Parameter | None = None

    # -- calls
    def call_kwargs(self, args: tuple, kwargs: dict) -> dict:
        """Positional arguments after ``hidden_states`` named as the original layer names them."""
        out = dict(kwargs)
        out.update(zip(self.arg_names, args))
        for k in self.attn_unused_kwargs:
            out.pop(k, None)
        return out

    def attn_block(self, x: Tensor, kw: dict) -> Tensor:
        """(B, L, d_in) -> (B, L, d_mid)."""
        x = _apply_shortcut(x, self.input_map)
        h = get_submodule(self, self.attn_norm)(x)
        h = get_submodule(self, self.attn_path)(hidden_states=h, **kw)[0]
        return _apply_shortcut(x, self.shortcut_attn) + h

    def mlp_block(self, x: Tensor) -> Tensor:
        """(B, L, d_mid) -> (B, L, d_out)."""
        h = get_submodule(self, self.mlp_norm)(x)
        if self.family == "opt":
            h = self.fc2(self.activation_fn(self.fc1(h)))
        else:
            h = self.mlp(h)
        return _apply_shortcut(x, self.shortcut_mlp) + h

    def forward(self, hidden_states: Tensor, *args, **kwargs) -> Tensor:
        kw = self.call_kwargs(args, kwargs)
        return self.mlp_block(self.attn_block(hidden_states, kw))


def _apply_shortcut(x: Tensor, S: Tensor | None) -> Tensor:
    return x if S is None else x @ S


# ============================================================================ report
@dataclass
class SliceReport:
    slice_fraction: float
    hidden_before: int
    hidden_after: int
    params_dense: int  # unique tensors of the state dict before slicing
    params_after: int  # the same after slicing: shortcuts, untied head and final projection included
    shortcut_params: int
    head_untied: bool
    seconds: float
    tied_basis: str | None = None  # basis of a kept tied embedding/head ("joint" | "embed" | "head")
    final_proj_params: int = 0  # RotatedFinalNorm's d' x d' matrix (+ bias), kept-tied heads only
    kept_energy: list[float] = field(default_factory=list)  # per PCA, fraction of the signal kept
    manifest: dict[str, dict] = field(default_factory=dict)  # module name -> rebuild entry (compression.saved)

    @property
    def ratio(self) -> float:
        return self.params_after / self.params_dense


def sliced_param_count(model: nn.Module) -> int:
    """Elements of every tensor the model holds in its state dict (parameters and
    persistent buffers), shared storage counted once: shortcuts and an untied head count."""
    seen: set = set()
    total = 0
    for t in model.state_dict(keep_vars=True).values():
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()) if t.numel() else id(t)
        if key in seen:
            continue
        seen.add(key)
        total += t.numel()
    return total


# ============================================================================ helpers
def _family(model: nn.Module, adapter: Adapter) -> str:
    mt = getattr(model.config, "model_type", None)
    fam = adapter.slice_layout
    if fam not in LAYOUTS:
        raise NotImplementedError(f"SliceGPT supports the model types {', '.join(SUPPORTED)}; "
                                  f"{mt!r} is not one of them")
    cfg = model.config
    if fam == "opt":
        if not getattr(cfg, "do_layer_norm_before", True):
            raise NotImplementedError("SliceGPT needs pre-norm layers; this OPT applies LayerNorm after the blocks")
        if getattr(cfg, "word_embed_proj_dim", cfg.hidden_size) != cfg.hidden_size:
            raise NotImplementedError("OPT with project_in/project_out (word_embed_proj_dim != hidden_size) "
                                      "is not supported by SliceGPT here")
    if fam == "gpt2" and getattr(cfg, "add_cross_attention", False):
        raise NotImplementedError("GPT-2 with cross-attention is not supported by SliceGPT")
    if adapter.final_norm(model) is None:
        raise NotImplementedError("SliceGPT needs a final norm in front of the head")
    return fam


def _norm_params(norm: nn.Module) -> tuple[Tensor, Tensor | None, float]:
    """(scale (D,), shift (D,) or None, eps) of a norm. Gemma-style norms scale by ``1 + w``."""
    w = getattr(norm, "weight", None)
    if isinstance(norm, nn.LayerNorm):
        D = norm.normalized_shape[-1]
        dev = w.device if w is not None else None
        scale = w.detach() if w is not None else torch.ones(D, device=dev)
        shift = norm.bias.detach() if getattr(norm, "bias", None) is not None else None
        return scale, shift, float(norm.eps)
    eps = getattr(norm, "variance_epsilon", None) or getattr(norm, "eps", None) or 1e-6
    if w is None:
        raise TypeError(f"{type(norm).__name__} has no weight to fold")
    scale = w.detach() + 1.0 if "gemma" in type(norm).__name__.lower() else w.detach()
    return scale, None, float(eps)


def _set_linear(lin: nn.Linear, weight: Tensor, bias: Tensor | None) -> None:
    """Replace ``lin``'s tensors (float64 in, the module's dtype out) and its sizes."""
    dt, dev = lin.weight.dtype, lin.weight.device
    lin.weight = nn.Parameter(weight.to(device=dev, dtype=dt).contiguous(), requires_grad=False)
    lin.bias = None if bias is None else nn.Parameter(bias.to(device=dev, dtype=dt).contiguous(),
                                                      requires_grad=False)
    lin.out_features, lin.in_features = weight.shape


def _set_embedding(emb: nn.Embedding, weight: Tensor) -> None:
    dt, dev = emb.weight.dtype, emb.weight.device
    emb.weight = nn.Parameter(weight.to(device=dev, dtype=dt).contiguous(), requires_grad=False)
    emb.embedding_dim = weight.shape[1]


def _embeddings(model: nn.Module, adapter: Adapter) -> list[nn.Embedding]:
    out = [adapter.embed(model)]
    if adapter.pos_embed_path:
        out.append(get_submodule(model, adapter.pos_embed_path))
    return out


def _role_paths(adapter: Adapter, group: str) -> list[str]:
    return [r.path for r in adapter.roles if r.group == group]


def _is_tied(model: nn.Module, adapter: Adapter) -> bool:
    return adapter.head(model).weight is adapter.embed(model).weight


class _Moment:
    """Uncentred second moment ``Σ xᵀx`` (D, D) over tokens, float64."""

    def __init__(self, D: int, device: torch.device):
        self.sum = torch.zeros(D, D, dtype=_F64, device=device)
        self.n = 0

    def add(self, x: Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).to(_F64)
        self.sum += x.T @ x
        self.n += x.shape[0]

    @property
    def cov(self) -> Tensor:
        return self.sum / max(self.n, 1)


def _moment(xs: list[Tensor]) -> Tensor:
    m = _Moment(xs[0].shape[-1], xs[0].device)
    for x in xs:
        m.add(x)
    return m.cov


def _normalised(c: Tensor) -> Tensor:
    t = torch.trace(c)
    return c / t if t > 0 else c


# ============================================================================ folding
@torch.no_grad()
def fold_layer_norms(model: nn.Module, adapter: Adapter, *, center_embeddings: bool = True) -> None:
    """Make the decoder layers' norms parameter-free (the final norm is left to the head
    step). LayerNorm models: centre every writer to the residual stream first (the
    embeddings too unless ``center_embeddings`` is False: the caller then centres the
    first layer's input). The model's output is unchanged."""
    layers = adapter.layers(model)
    if adapter.norm_kind == "layernorm":
        if center_embeddings:
            for emb in _embeddings(model, adapter):
                _set_embedding(emb, center_rows(emb.weight))
        for layer in layers:
            for path in _role_paths(adapter, "attn_out") + _role_paths(adapter, "mlp_out"):
                lin = get_submodule(layer, path)
                _set_linear(lin, *center_writer(lin.weight, lin.bias))
    D = adapter.embed(model).weight.shape[1]
    for layer in layers:
        for group, norm_path in adapter.norms.items():
            scale, shift, eps = _norm_params(get_submodule(layer, norm_path))
            for path in _role_paths(adapter, group):
                lin = get_submodule(layer, path)
                _set_linear(lin, *fold_norm_into_reader(lin.weight, lin.bias, scale, shift))
            set_submodule(layer, norm_path, RMSNormNoScale(D, eps))


def _untie_head(model: nn.Module, adapter: Adapter) -> nn.Linear:
    """Give the head its own copy of the embedding matrix (what the reference implementation does)."""
    head = adapter.head(model)
    w = head.weight
    new = nn.Linear(w.shape[1], w.shape[0], bias=head.bias is not None, device=w.device, dtype=w.dtype)
    _set_linear(new, w.detach().to(_F64), None if head.bias is None else head.bias.detach().to(_F64))
    set_submodule(model, adapter.head_path, new)
    model.config.tie_word_embeddings = False
    return new


def _param(t: Tensor, dtype: torch.dtype) -> nn.Parameter:
    return nn.Parameter(t.to(dtype).contiguous(), requires_grad=False)


# ============================================================================ main
@torch.no_grad()
def slice_model(model: nn.Module, adapter: Adapter, calib_ids: Tensor, slice_fraction: float, *,
                device: torch.device | str, keep_tied_head: bool = True, tied_basis: str = "joint",
                batch_size: int = 8, progress: Progress | None = None,
                should_stop: Callable[[], bool] | None = None) -> SliceReport:
    """Rotate and slice ``model`` in place with calibration windows ``calib_ids`` (C, L).

    Every residual-side width becomes ``sliced_dim(D, slice_fraction)``. ``keep_tied_head``
    matters only for models whose head shares the embedding matrix (see the module doc);
    ``tied_basis`` then picks the shared basis. Raises ``NotImplementedError`` for
    unsupported families and ``InterruptedError`` when ``should_stop()`` turns true (the
    model is then left partly sliced: work on a copy)."""
    t0 = time.perf_counter()
    say = progress or (lambda f, m: None)
    fam = _family(model, adapter)
    if tied_basis not in TIED_BASES:
        raise ValueError(f"tied_basis {tied_basis!r} is not one of {', '.join(TIED_BASES)}")
    if calib_ids.dim() != 2 or calib_ids.numel() == 0:
        raise ValueError("calib_ids must be a non-empty (windows, seqlen) tensor of token ids")
    dev = torch.device(device)
    model.to(dev).eval()
    dtype = adapter.embed(model).weight.dtype
    D = adapter.embed(model).weight.shape[1]
    d = sliced_dim(D, slice_fraction)
    params_dense = sliced_param_count(model)
    was_tied = _is_tied(model, adapter)
    keep_tied = was_tied and keep_tied_head
    layernorm = adapter.norm_kind == "layernorm"
    energy: list[float] = []

    def check():
        if should_stop is not None and should_stop():
            raise InterruptedError("SliceGPT cancelled; the model is partly sliced")

    def pca(cov: Tensor) -> Tensor:
        Q = pca_basis(cov)
        energy.append(kept_energy(cov, Q, d))
        return Q

    # 1) computational invariance: parameter-free norms, explicit residual paths
    say(0.0, "folding norms")
    if was_tied and not keep_tied:
        _untie_head(model, adapter)
    center_input = layernorm and keep_tied  # a tied embedding cannot be centred: the head reads it
    fold_layer_norms(model, adapter, center_embeddings=not center_input)
    layers = adapter.layers(model)
    n_layers = len(layers)
    for i in range(n_layers):
        layers[i] = SlicedDecoderLayer(layers[i], fam, adapter.norms["attn_in"], adapter.norms["mlp_in"],
                                       adapter.attn_path, adapter.attn_unused_kwargs)
    eye = torch.eye(D, dtype=_F64, device=dev)
    centering = eye - 1.0 / D  # C = I - 11ᵀ/D (D, D)
    if center_input:
        layers[0].input_map = _param(centering, dtype)
    final_norm = adapter.final_norm(model)
    g, beta, eps = _norm_params(final_norm)
    head = adapter.head(model)
    if not keep_tied:  # the head is its own matrix: fold the final norm into it now
        _set_linear(head, *fold_norm_into_reader(head.weight, head.bias, g, beta))
        set_submodule(model, adapter.final_norm_path, RMSNormNoScale(D, eps))

    # 2) bases of the embeddings (Q_e; shared with a tied head) and of the first layer's input (Q_0)
    batches = [b.to(dev) for b in calib_ids.split(batch_size)]
    states = [capture(model, adapter, b) for b in batches]
    kws = [[layers[i].call_kwargs(*s.calls[i]) for s in states] for i in range(n_layers)]
    hidden = [s.hidden for s in states]  # (B, L, D) embedding outputs
    cov_emb = _moment(hidden)
    if keep_tied and tied_basis != "embed":
        head_in = _Moment(D, dev)
        for b, h in enumerate(hidden):
            for i, layer in enumerate(layers):
                h = layer(h, **kws[i][b])
            head_in.add(final_norm(h))  # what the head reads: n g + β
        cov_e = head_in.cov if tied_basis == "head" else _normalised(cov_emb) + _normalised(head_in.cov)
    else:
        cov_e = cov_emb
    Q_e = pca(cov_e)
    q_e = Q_e[:, :d]
    for emb in _embeddings(model, adapter):
        _set_embedding(emb, emb.weight.to(_F64) @ q_e)
    hidden = [(h.to(_F64) @ q_e).to(dtype) for h in hidden]  # the sliced embedding outputs (B, L, d)
    if center_input:
        Q_in = pca(centering @ cov_emb @ centering)  # second moment of the centred embeddings
        layers[0].input_map = _param(q_e.T @ centering @ Q_in[:, :d], dtype)
    else:
        Q_in = Q_e

    # 3) layer by layer: rotate readers, PCA of the next signal, rotate writers, shortcuts
    attn_in, attn_out = _role_paths(adapter, "attn_in"), _role_paths(adapter, "attn_out")
    mlp_in, mlp_out = _role_paths(adapter, "mlp_in"), _role_paths(adapter, "mlp_out")
    for i, w in enumerate(layers):
        check()
        q_in = Q_in[:, :d]
        for p in attn_in:
            lin = get_submodule(w, p)
            _set_linear(lin, rotate_reader(lin.weight, q_in), lin.bias)
        w.shortcut_attn = _param(q_in.T, dtype)  # back to the full original basis, for the PCA
        mids = [w.attn_block(h, kw) for h, kw in zip(hidden, kws[i])]  # (B, L, D)
        q_mid = pca(_moment(mids))[:, :d]
        w.shortcut_attn = _param(shortcut_matrix(q_in, q_mid), dtype)
        for p in attn_out:
            lin = get_submodule(w, p)
            _set_linear(lin, *rotate_writer(lin.weight, lin.bias, q_mid))
        for p in mlp_in:
            lin = get_submodule(w, p)
            _set_linear(lin, rotate_reader(lin.weight, q_mid), lin.bias)
        mids = [(m.to(_F64) @ q_mid).to(dtype) for m in mids]  # = the sliced attention block's output
        w.shortcut_mlp = _param(q_mid.T, dtype)
        outs = [w.mlp_block(m) for m in mids]  # (B, L, D)
        Q_in = pca(_moment(outs))
        q_out = Q_in[:, :d]
        w.shortcut_mlp = _param(shortcut_matrix(q_mid, q_out), dtype)
        for p in mlp_out:
            lin = get_submodule(w, p)
            _set_linear(lin, *rotate_writer(lin.weight, lin.bias, q_out))
        hidden = [(o.to(_F64) @ q_out).to(dtype) for o in outs]
        del mids, outs
        say((i + 1) / (n_layers + 1), f"sliced layer {i + 1}/{n_layers}")

    # 4) final norm and head
    check()
    q_last = Q_in[:, :d]
    final_proj_params = 0
    if keep_tied:
        wq, bq = final_projection(q_last, g, beta, q_e)
        proj = nn.Linear(d, d, bias=bq is not None, device=dev, dtype=dtype)
        _set_linear(proj, wq, bq)
        set_submodule(model, adapter.final_norm_path, RotatedFinalNorm(RMSNormNoScale(D, eps), proj))
        head.weight = adapter.embed(model).weight
        head.in_features = d
        final_proj_params = sum(p.numel() for p in proj.parameters())
    else:
        _set_linear(head, rotate_reader(head.weight, q_last), None if head.bias is None else head.bias.to(_F64))
    shortcut_params = sum(p.numel() for w in layers for p in (w.input_map, w.shortcut_attn, w.shortcut_mlp)
                          if p is not None)
    say(1.0, "done")
    report = SliceReport(slice_fraction, D, d, params_dense, sliced_param_count(model), shortcut_params,
                         was_tied and not keep_tied, time.perf_counter() - t0,
                         tied_basis if keep_tied else None, final_proj_params, energy)
    report.manifest = slice_manifest(model, adapter)
    return report


# ============================================================================ save / reload
def slice_manifest(model: nn.Module, adapter: Adapter) -> dict[str, dict]:
    """Entries (module name -> JSON description) that ``rebuild_module`` turns back into
    empty modules of the sliced shapes, in an order that keeps a tied head tied (the
    embedding before the head). Used by ``compression.saved`` (``extra_modules``)."""
    layers = adapter.layers(model)
    if not layers or not isinstance(layers[0], SlicedDecoderLayer):
        raise ValueError("the model is not sliced")
    fam = layers[0].family
    embed, head = adapter.embed(model), adapter.head(model)
    tied = head.weight is embed.weight
    out: dict[str, dict] = {}
    embeddings = [(adapter.embed_path, embed)]
    if adapter.pos_embed_path:
        embeddings.append((adapter.pos_embed_path, get_submodule(model, adapter.pos_embed_path)))
    for path, emb in embeddings:
        cls = type(emb)
        out[path] = {"kind": "embedding", "class": f"{cls.__module__}.{cls.__qualname__}",
                     "num": emb.num_embeddings, "dim": emb.embedding_dim, "padding_idx": emb.padding_idx,
                     "attrs": {k: getattr(emb, k) for k in ("offset",) if hasattr(emb, k)},
                     "tie_key": path if (tied and emb is embed) else None}
    specs = []
    for w in layers:
        lins = {r.path: get_submodule(w, r.path) for r in adapter.roles}
        spec = {"linears": {p: [m.out_features, m.in_features, m.bias is not None] for p, m in lins.items()},
                "norms": {p: [get_submodule(w, p).mean_dim, get_submodule(w, p).eps]
                          for p in (w.attn_norm, w.mlp_norm)}}
        for k in ("input_map", "shortcut_attn", "shortcut_mlp"):
            t = getattr(w, k)
            spec[k] = None if t is None else list(t.shape)
        specs.append(spec)
    cfg = model.config.to_dict()
    out[adapter.layers_path] = {"kind": "sliced_layers", "family": fam, "model_type": cfg.get("model_type"),
                                "config": cfg, "attn_norm": layers[0].attn_norm, "mlp_norm": layers[0].mlp_norm,
                                "layers": specs}
    norm = adapter.final_norm(model)
    if isinstance(norm, RotatedFinalNorm):
        out[adapter.final_norm_path] = {"kind": "rotated_final_norm", "mean_dim": norm.norm.mean_dim,
                                        "eps": norm.norm.eps, "out": norm.proj.out_features,
                                        "in": norm.proj.in_features, "bias": norm.proj.bias is not None}
    else:
        out[adapter.final_norm_path] = {"kind": "rmsnorm_noscale", "mean_dim": norm.mean_dim, "eps": norm.eps}
    out[adapter.head_path] = {"kind": "linear", "out": head.out_features, "in": head.in_features,
                              "bias": head.bias is not None, "tie_key": adapter.embed_path if tied else None}
    return out


_TIED: dict[str, nn.Parameter] = {}  # tie_key -> weight of an embedding rebuilt just before its head


def _import(qualname: str):
    mod, _, name = qualname.rpartition(".")
    return getattr(importlib.import_module(mod), name)


def _empty_linear(out_f: int, in_f: int, bias: bool, dtype: torch.dtype) -> nn.Linear:
    return nn.Linear(in_f, out_f, bias=bias, dtype=dtype, device="meta").to_empty(device="cpu")


def rebuild_module(entry: dict, dtype: torch.dtype) -> nn.Module:
    """An empty module of the sliced shapes described by a ``slice_manifest`` entry (the
    caller loads the tensors). A tied head must come after its embedding."""
    kind = entry["kind"]
    if kind == "embedding":
        cls = _import(entry["class"])
        mod = cls.__new__(cls)
        nn.Embedding.__init__(mod, entry["num"], entry["dim"], padding_idx=entry["padding_idx"], dtype=dtype)
        for k, v in entry.get("attrs", {}).items():
            setattr(mod, k, v)
        if entry.get("tie_key"):
            _TIED[entry["tie_key"]] = mod.weight
        return mod
    if kind == "linear":
        lin = _empty_linear(entry["out"], entry["in"], entry["bias"], dtype)
        if entry.get("tie_key"):
            if entry["tie_key"] not in _TIED:
                raise ValueError(f"tied head: its embedding {entry['tie_key']!r} must be rebuilt first")
            lin.weight = _TIED.pop(entry["tie_key"])
        return lin
    if kind == "rmsnorm_noscale":
        return RMSNormNoScale(entry["mean_dim"], entry["eps"])
    if kind == "rotated_final_norm":
        return RotatedFinalNorm(RMSNormNoScale(entry["mean_dim"], entry["eps"]),
                                _empty_linear(entry["out"], entry["in"], entry["bias"], dtype))
    if kind == "sliced_layers":
        return _rebuild_layers(entry, dtype)
    raise ValueError(f"unknown SliceGPT module kind {kind!r}")


def _rebuild_layers(entry: dict, dtype: torch.dtype) -> nn.ModuleList:
    """The sliced decoder layers, empty. The original layers come from the base model built
    on the meta device the way ``compression.saved`` builds it, so the attention
    implementation (which decides the mask format) resolves the same way."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from analysis.adapters import adapter_for

    cfg = dict(entry["config"])
    config = AutoConfig.for_model(cfg.pop("model_type", entry["model_type"]), **cfg)
    with torch.device("meta"):
        base = AutoModelForCausalLM.from_config(config, dtype=dtype)
    adapter = adapter_for(base)
    originals = adapter.layers(base)
    out = nn.ModuleList()
    for layer, spec in zip(originals, entry["layers"], strict=True):
        if any(True for _ in layer.buffers()):
            raise NotImplementedError(f"{type(layer).__name__} holds buffers; SliceGPT cannot rebuild it empty")
        w = SlicedDecoderLayer(layer, entry["family"], entry["attn_norm"], entry["mlp_norm"], adapter.attn_path,
                               adapter.attn_unused_kwargs)
        for path, (o, n, b) in spec["linears"].items():
            set_submodule(w, path, nn.Linear(n, o, bias=b, dtype=dtype, device="meta"))
        for path, (mean_dim, eps) in spec["norms"].items():
            set_submodule(w, path, RMSNormNoScale(mean_dim, eps))
        for k in ("input_map", "shortcut_attn", "shortcut_mlp"):
            if spec.get(k) is not None:
                setattr(w, k, nn.Parameter(torch.empty(*spec[k], dtype=dtype, device="meta"), requires_grad=False))
        out.append(w)
    return out.to_empty(device="cpu")
