"""SliceGPT: rotation invariance at fraction 0 (llama and LayerNorm families, tied heads kept
or untied), the sliced shapes and an honest parameter count, error growing with the
fraction, the primitives, save/reload, and the families it refuses."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from analysis.loading import wrap_model
from compression.slicegpt import (
    SUPPORTED,
    RMSNormNoScale,
    RotatedFinalNorm,
    SlicedDecoderLayer,
    center_writer,
    fold_norm_into_reader,
    pca_basis,
    slice_model,
    sliced_dim,
    sliced_param_count,
)
from tests.conftest import tiny_config, tiny_model

F64 = torch.float64


def build(model_type: str, tied: bool = False, seed: int = 0):
    """A wrapped tiny model; ``tied`` builds it with ``tie_word_embeddings=True``."""
    if not tied:
        return wrap_model(tiny_model(model_type, seed=seed))
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(model_type)
    cfg.tie_word_embeddings = True
    torch.manual_seed(seed)
    return wrap_model(AutoModelForCausalLM.from_config(cfg).eval())


def ids(seed: int, n: int = 8, length: int = 32) -> torch.Tensor:
    return torch.randint(0, 128, (n, length), generator=torch.Generator().manual_seed(seed))


def sliced_copy(lm, fraction: float, calib: torch.Tensor, **kw):
    model = copy.deepcopy(lm.model)
    report = slice_model(model, lm.adapter, calib, fraction, device="cpu", **kw)
    return model, report


@torch.no_grad()
def logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(input_ids=x, use_cache=False).logits


# --------------------------------------------------------------------- invariance
CASES = [("llama", False, True), ("llama", True, True), ("llama", True, False), ("qwen2", False, True),
         ("opt", False, True), ("opt", True, True), ("opt", True, False), ("gpt2", True, True)]


@pytest.mark.parametrize("model_type,tied,keep", CASES)
def test_fraction_zero_keeps_logits(model_type, tied, keep):
    lm = build(model_type, tied)
    assert (lm.model.lm_head.weight is lm.adapter.embed(lm.model).weight) == tied
    x = ids(1)
    ref = logits(lm.model, x)
    model, rep = sliced_copy(lm, 0.0, ids(0), keep_tied_head=keep)
    out = logits(model, x)
    assert (out - ref).abs().max() / ref.abs().max() < 1e-4
    assert rep.hidden_after == rep.hidden_before == 64
    assert rep.head_untied == (tied and not keep)
    assert (model.lm_head.weight is lm.adapter.embed(model).weight) == (tied and keep)
    assert all(isinstance(layer, SlicedDecoderLayer) for layer in lm.adapter.layers(model))


# --------------------------------------------------------------------- shapes and counts
def _expected_llama_params(d: int, D: int = 64, V: int = 128, inter: int = 128, kv: int = 32, layers: int = 2,
                           tied_keep: bool = False) -> int:
    per_layer = (D * d + 2 * kv * d + d * D  # q, k, v read d; o writes d
                 + 2 * inter * d + d * inter  # gate, up read d; down writes d
                 + 2 * d * d)  # shortcuts
    head = d * d if tied_keep else V * d  # kept tie: the final projection instead of a head matrix
    return V * d + head + layers * per_layer


def test_quarter_slice_shapes_and_honest_count():
    lm = build("llama")
    model, rep = sliced_copy(lm, 0.25, ids(0))
    d = sliced_dim(64, 0.25)
    assert d == 48 and rep.hidden_after == 48
    for li in lm.adapter.linears(model):
        if li.group in ("attn_in", "mlp_in"):
            assert li.in_features == d, li.name
        else:
            assert li.out_features == d, li.name
    for layer in lm.adapter.layers(model):
        assert layer.shortcut_attn.shape == (d, d) and layer.shortcut_mlp.shape == (d, d)
        assert isinstance(layer.input_layernorm, RMSNormNoScale) and layer.input_layernorm.mean_dim == 64
    assert lm.adapter.embed(model).weight.shape == (128, d)
    assert model.lm_head.in_features == d and model.lm_head.weight.shape == (128, d)
    held = sum(p.numel() for p in model.parameters()) + sum(b.numel() for _, b in model.named_buffers()
                                                             if "inv_freq" not in _)
    assert rep.params_after == sliced_param_count(model) == held == _expected_llama_params(d)
    assert rep.shortcut_params == 2 * 2 * d * d
    assert rep.params_dense == sliced_param_count(lm.model)
    assert not rep.head_untied and rep.final_proj_params == 0
    logits(model, ids(3))  # runs


def test_tied_head_counts():
    lm = build("llama", tied=True)
    kept, rk = sliced_copy(lm, 0.25, ids(0), keep_tied_head=True)
    untied, ru = sliced_copy(lm, 0.25, ids(0), keep_tied_head=False)
    d = 48
    assert isinstance(lm.adapter.final_norm(kept), RotatedFinalNorm)
    assert rk.final_proj_params == d * d and not rk.head_untied
    assert rk.params_after == sliced_param_count(kept) == _expected_llama_params(d, tied_keep=True)
    assert ru.head_untied and not untied.config.tie_word_embeddings
    assert ru.params_after == sliced_param_count(untied) == _expected_llama_params(d)
    assert ru.params_after - rk.params_after == 128 * d - d * d


def test_layernorm_family_shapes():
    lm = build("opt", tied=True)
    model, rep = sliced_copy(lm, 0.25, ids(0), keep_tied_head=True)
    d = 48
    first = lm.adapter.layers(model)[0]
    assert first.input_map.shape == (d, d)  # centres the (uncentred, tied) embeddings
    assert model.model.decoder.embed_positions.weight.shape[1] == d
    assert rep.shortcut_params == (2 * 2 + 1) * d * d
    assert rep.final_proj_params == d * d + d  # LayerNorm bias -> projection bias
    assert rep.params_after == sliced_param_count(model)


# --------------------------------------------------------------------- quality
@pytest.mark.parametrize("model_type", ["llama", "opt"])
def test_error_grows_with_fraction(model_type):
    lm = build(model_type)
    calib, x = ids(0, n=16), ids(5)
    ref = logits(lm.model, x)
    mse = []
    for f in (0.1, 0.3, 0.5):
        model, _ = sliced_copy(lm, f, calib)
        mse.append(float(((logits(model, x) - ref) ** 2).mean()))
    assert 0 < mse[0] < mse[1] < mse[2], mse


def test_progress_and_stop():
    lm = build("llama")
    seen = []
    sliced_copy(lm, 0.25, ids(0), progress=lambda f, m: seen.append((f, m)))
    assert seen[-1][0] == 1.0 and any("layer 2/2" in m for _, m in seen)
    assert all(a <= b for (a, _), (b, _) in zip(seen, seen[1:]))
    with pytest.raises(InterruptedError):
        sliced_copy(lm, 0.25, ids(0), should_stop=lambda: True)


# --------------------------------------------------------------------- refusals
@pytest.mark.parametrize("model_type", ["gemma3_text", "phi3"])
def test_unsupported_family_raises(model_type):
    lm = build(model_type)
    with pytest.raises(NotImplementedError) as e:
        slice_model(lm.model, lm.adapter, ids(0), 0.25, device="cpu")
    for t in SUPPORTED:
        assert t in str(e.value)


def test_bad_fraction():
    lm = build("llama")
    with pytest.raises(ValueError):
        slice_model(lm.model, lm.adapter, ids(0), 1.0, device="cpu")


# --------------------------------------------------------------------- primitives
def test_sliced_dim():
    assert sliced_dim(64, 0.0) == 64 and sliced_dim(576, 0.25) == 432 and sliced_dim(64, 0.1) == 56
    assert sliced_dim(100, 0.0) == 100 and sliced_dim(64, 0.99) == 8


def test_pca_basis_orders_and_is_orthogonal():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 6, generator=g, dtype=F64) * torch.tensor([1.0, 5, 0.1, 3, 2, 0.5], dtype=F64)
    cov = x.T @ x / 500
    Q = pca_basis(cov)
    assert torch.allclose(Q.T @ Q, torch.eye(6, dtype=F64), atol=1e-10)
    ev = torch.diagonal(Q.T @ cov @ Q)
    assert torch.all(ev[:-1] >= ev[1:])
    assert abs(Q[1, 0]) > 0.99  # the widest axis first


def test_norm_folding_and_centering_are_exact():
    torch.manual_seed(0)  # the linears' initialisation: not whatever the tests before left
    g = torch.Generator().manual_seed(0)
    x = torch.randn(10, 8, generator=g, dtype=F64)
    ln = nn.LayerNorm(8, dtype=F64)
    with torch.no_grad():
        ln.weight.copy_(torch.rand(8, generator=g, dtype=F64) + 0.5)
        ln.bias.copy_(torch.randn(8, generator=g, dtype=F64))
    lin = nn.Linear(8, 5, dtype=F64)
    w, b = fold_norm_into_reader(lin.weight, lin.bias, ln.weight, ln.bias)
    xc = x - x.mean(-1, keepdim=True)
    assert torch.allclose(lin(ln(x)), RMSNormNoScale(8, ln.eps)(xc) @ w.T + b, atol=1e-10)
    writer = nn.Linear(3, 8, dtype=F64)
    wc, bc = center_writer(writer.weight, writer.bias)
    a = torch.randn(4, 3, generator=g, dtype=F64)
    y = a @ wc.T + bc
    assert torch.allclose(y.mean(-1), torch.zeros(4, dtype=F64), atol=1e-12)
    assert torch.allclose(ln(writer(a)), ln(y), atol=1e-10)


def test_rms_norm_no_scale_commutes_with_rotation():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 16, generator=g, dtype=F64)
    Q, _ = torch.linalg.qr(torch.randn(16, 16, generator=g, dtype=F64))
    n = RMSNormNoScale(16, 1e-6)
    assert torch.allclose(n(x @ Q), n(x) @ Q, atol=1e-10)


# --------------------------------------------------------------------- save / reload
@pytest.mark.parametrize("model_type,tied", [("llama", True), ("opt", True), ("gpt2", False)])
def test_save_and_reload(tmp_path, model_type, tied):
    from compression.plan import Plan, SliceGPTOptions
    from compression.saved import load_compressed, save_compressed

    lm = build(model_type, tied)
    model, rep = sliced_copy(lm, 0.25, ids(0))
    plan = Plan(slicegpt=SliceGPTOptions(0.25, True))
    save_compressed(model, tmp_path / "m", plan_json=plan.to_json(), extra_modules=rep.manifest)
    back = load_compressed(tmp_path / "m")
    x = ids(4)
    assert torch.allclose(logits(back.model, x), logits(model, x), atol=1e-5)
    assert (back.model.lm_head.weight is back.adapter.embed(back.model).weight) == tied
    assert sliced_param_count(back.model) == rep.params_after


def test_apply_plan_runs_slicegpt():
    from compression.apply import apply_plan
    from compression.plan import Plan, SliceGPTOptions

    lm = build("llama", tied=True)
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    student, report = apply_plan(lm.model, lm.adapter, Plan(slicegpt=SliceGPTOptions(0.25, True)),
                                 device="cpu", calib_ids=ids(0))
    assert report.slicegpt.hidden_after == 48 and report.slicegpt.params_after == sliced_param_count(student)
    assert all(torch.equal(before[k], v) for k, v in lm.model.state_dict().items())  # original untouched
