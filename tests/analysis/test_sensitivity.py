"""Sensitivity grid on a tiny llama: exact against applying the plan, zero-ish at full rank /
8 bits, growing as rank and bits fall, the model untouched, artifacts, proxy, CLI."""
import copy
import re
from argparse import Namespace

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from analysis.adapters import LinearInfo, get_submodule
from analysis.data import load_corpus
from analysis.loading import wrap_model
from analysis.metrics import window_nll
from analysis.profile import collect_input_stats
from analysis.sensitivity import (
    BITS_GRID,
    TABLE_COLUMNS,
    TOKEN_CAP,
    SensitivityGrid,
    agreement,
    check_compatible,
    load_or_measure,
    load_or_proxy,
    measure_sensitivity,
    proxy_sensitivity,
    quant_options,
    rank_grid,
    setting_spec,
    settings_for,
)
from analysis.stats import LinearStats
from compression.apply import apply_plan
from compression.plan import ModuleSpec, Plan, weight_bytes
from tests.conftest import CharTokenizer, tiny_model

GS = 32  # the tiny models are 64 wide: the default group size 128 does not fit


pytestmark = pytest.mark.usefixtures("one_thread")


FRACTIONS = (0.25, 0.5, 2.0)  # 2.0 x break-even is clamped to full rank: dloss must vanish there


@torch.no_grad()
def _peaked_llama():
    """A tiny random llama whose layers matter (weights scaled up) and whose calibration text
    is sampled from the model itself: the model is then the best predictor of its data, so
    compressing a linear can only raise the expected loss (a KL divergence)."""
    model = tiny_model("llama")
    for n, p in model.named_parameters():
        if "layers" in n and n.endswith("proj.weight"):
            p.mul_(5.0)
        if n.startswith("lm_head"):
            p.mul_(10.0)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 128, (32, 1), generator=g)
    for _ in range(31):
        probs = torch.softmax(model(input_ids=ids).logits[:, -1].float(), -1)
        ids = torch.cat([ids, torch.multinomial(probs, 1, generator=g)], 1)
    return model, ids


@pytest.fixture(scope="module")
def trained():
    """The peaked tiny llama, 8 calibration windows, statistics from 32 windows."""
    model, all_ids = _peaked_llama()
    lm = wrap_model(model, CharTokenizer(), spec="peaked-tiny")
    ids = all_ids[:8]
    inputs = collect_input_stats(lm.model, lm.adapter, all_ids)
    stats = {li.name: LinearStats(inputs[li.input_key]) for li in lm.adapter.linears(lm.model)}
    return lm, ids, stats


@pytest.fixture(scope="module")
def grid(trained):
    lm, ids, stats = trained
    return measure_sensitivity(lm.model, lm.adapter, ids, stats, group_size=GS, fractions=FRACTIONS,
                               fingerprint=lm.fingerprint, data_label="bigram", data_digest="bigram-32-0")


def test_rank_grid():
    li = LinearInfo("q", 0, "q", "attn_in", 576, 576)  # SmolLM2 q: break-even 288
    assert rank_grid(li) == [72, 144, 216]
    assert rank_grid(LinearInfo("k", 0, "k", "attn_in", 192, 576)) == [40, 72, 112]
    assert rank_grid(LinearInfo("t", 0, "t", "g", 8, 8)) == [8]  # at least 8, at most min(m, n)
    assert rank_grid(LinearInfo("t", 0, "t", "g", 64, 64), FRACTIONS) == [8, 16, 64]
    assert BITS_GRID == (2, 3, 4, 8)


def test_table_schema_and_bytes(trained, grid):
    lm, ids, _ = trained
    t = grid.table
    assert list(t.columns) == TABLE_COLUMNS
    linears = lm.adapter.linears(lm.model)
    assert set(t["name"]) == {li.name for li in linears}
    by = {li.name: li for li in linears}
    for row in t.itertuples():
        spec = setting_spec(row.kind, row.setting, "svd-llm", "rtn", GS)
        assert row.bytes == weight_bytes(spec, by[row.name], 4)
    assert grid.meta["n_tokens"] == ids.numel() and grid.meta["method"] == "svd-llm"
    s, c = window_nll(lm.model, ids)
    assert grid.dense_loss == pytest.approx(s / c, abs=1e-5)


def test_measured_dloss_equals_applying_that_one_setting(trained, grid):
    """The stacked probe is exact: same loss as really compressing the linear with apply_plan,
    and the allocator's additive prediction of that one-linear plan is the grid value."""
    from compression.allocate import Predictor

    lm, ids, stats = trained
    linears = lm.adapter.linears(lm.model)
    pred = Predictor(grid, linears, 10**6, 4, {li.name: False for li in linears})
    t = grid.table
    for name, kind, setting in [(linears[0].name, "rank", 8), (linears[6].name, "bits", 2),
                                (linears[12].name, "rank", 24), (linears[9].name, "bits", 3)]:
        spec = setting_spec(kind, setting, "svd-llm", "rtn", GS)
        comp, _ = apply_plan(lm.model, lm.adapter, Plan(modules={name: spec}), stats)
        s, c = window_nll(comp, ids)
        row = t[(t["name"] == name) & (t["kind"] == kind) & (t["setting"] == setting)]
        assert len(row) == 1
        assert s / c - grid.dense_loss == pytest.approx(row["dloss"].item(), abs=2e-5)
        assert pred.predict(Plan(modules={name: spec})).dloss == row["dloss"].item()  # exactly


def test_probes_are_exact_in_every_family(family):
    """Stacked probes against apply_plan + window_nll in every family (fused qkv, biases,
    Gemma 3's sliding-window layers with windows longer than the window)."""
    lm = wrap_model(tiny_model(family))
    ids = torch.randint(0, 128, (3, 48), generator=torch.Generator().manual_seed(0))
    inputs = collect_input_stats(lm.model, lm.adapter, ids)
    linears = lm.adapter.linears(lm.model)
    stats = {li.name: LinearStats(inputs[li.input_key]) for li in linears}
    g = measure_sensitivity(lm.model, lm.adapter, ids, stats, group_size=16, names=[linears[0].name, linears[-1].name],
                            fractions=(0.5,), bits=(2,))
    s, c = window_nll(lm.model, ids)
    assert g.dense_loss == pytest.approx(s / c, abs=2e-6)
    for row in g.table.itertuples():
        spec = setting_spec(row.kind, row.setting, "svd-llm", "rtn", 16)
        comp, _ = apply_plan(lm.model, lm.adapter, Plan(modules={row.name: spec}), stats)
        s2, c2 = window_nll(comp, ids)
        assert s2 / c2 - s / c == pytest.approx(row.dloss, abs=5e-6)


def test_dloss_vanishes_at_full_rank_and_8_bits_and_grows_as_they_fall(trained, grid):
    lm, _, _ = trained
    t = grid.table
    full_rank = {li.name: min(li.out_features, li.in_features) for li in lm.adapter.linears(lm.model)}
    ranks = t[t["kind"] == "rank"]
    full = ranks[ranks["setting"] == ranks["name"].map(full_rank)]
    assert len(full) == len(full_rank) and full["dloss"].abs().max() < 1e-5
    bits = t[t["kind"] == "bits"].pivot(index="name", columns="setting", values="dloss")
    assert bits[8].abs().max() < 5e-3
    mean = bits.mean()
    assert mean[2] > mean[3] > mean[4] > mean[8]
    assert (bits[2] > bits[4]).mean() >= 0.8  # mostly, per linear
    low = ranks.loc[ranks.groupby("name")["setting"].idxmin()].set_index("name")["dloss"]
    mid = ranks[ranks["setting"] < ranks["name"].map(full_rank)]
    mid = mid.loc[mid.groupby("name")["setting"].idxmax()].set_index("name")["dloss"]
    assert low.mean() > mid.mean() > full["dloss"].mean()
    assert (low >= mid).mean() >= 0.8
    assert t["dloss"].max() > 0.05  # compression is noticed


def test_first_order_terms_are_the_weight_gradient_inner_products(trained, grid):
    """grid.first_order = <Ŵ - W, ∂L/∂W> (+ bias part) with ∂L/∂W from a plain backward of the
    mean token NLL; the curvature table is dloss minus it."""
    from analysis.adapters import get_submodule
    from analysis.sensitivity import compressed_affines

    lm, ids, stats = trained
    model = copy.deepcopy(lm.model)
    logits = model(input_ids=ids).logits
    F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).backward()
    fo = grid.first_order.set_index(["name", "kind", "setting"])["dloss_first"]
    for li in lm.adapter.linears(lm.model)[::3]:
        lin = get_submodule(model, li.name)
        settings = settings_for(li, FRACTIONS)
        affines = compressed_affines(get_submodule(lm.model, li.name), li, settings, stats[li.name], "svd-llm", "rtn",
                                     GS)
        for (kind, s), (w_hat, _) in zip(settings, affines):
            ref = float(((w_hat.double() - lin.weight.detach().double()) * lin.weight.grad.double()).sum())
            assert fo.loc[(li.name, kind, s)] == pytest.approx(ref, rel=1e-3, abs=1e-7)
    curv = grid.curvature_table()
    assert list(curv.columns) == TABLE_COLUMNS
    np.testing.assert_allclose(curv["dloss"], grid.table["dloss"] - grid.first_order["dloss_first"])


def test_model_unchanged_after_measuring_and_after_cancel(trained):
    lm, ids, stats = trained
    before = lm.model(input_ids=ids).logits
    state = copy.deepcopy(lm.model.state_dict())
    mods = [type(m) for m in lm.model.modules()]
    names = [li.name for li in lm.adapter.linears(lm.model)][:2]
    measure_sensitivity(lm.model, lm.adapter, ids, stats, group_size=GS, names=names, max_batch_tokens=64)
    calls = iter(range(100))
    with pytest.raises(InterruptedError):
        measure_sensitivity(lm.model, lm.adapter, ids, stats, group_size=GS, should_stop=lambda: next(calls) >= 1)
    assert torch.equal(lm.model(input_ids=ids).logits, before)
    assert [type(m) for m in lm.model.modules()] == mods
    for k, v in lm.model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert all(p.grad is None and p.requires_grad for p in lm.model.parameters())


def test_split_passes_equal_one_pass(trained, grid):
    lm, ids, stats = trained
    name = lm.adapter.linears(lm.model)[5].name
    small = measure_sensitivity(lm.model, lm.adapter, ids, stats, group_size=GS, names=[name],
                                fractions=FRACTIONS, max_batch_tokens=ids.numel() * 2)
    ref = grid.table[grid.table["name"] == name].reset_index(drop=True)
    np.testing.assert_allclose(small.table["dloss"], ref["dloss"], atol=2e-6)


@pytest.mark.parametrize("method", ["svd", "svd-llm"])
def test_one_decomposition_for_all_ranks_equals_the_handler(trained, method):
    from analysis.adapters import get_submodule
    from analysis.sensitivity import effective_affine, truncated_weights
    from compression.registry import handler_for

    lm, _, stats = trained
    for li in lm.adapter.linears(lm.model)[:7]:
        lin = get_submodule(lm.model, li.name)
        ranks = rank_grid(li, FRACTIONS)
        fast = truncated_weights(lin, ranks, stats[li.name], method)
        for k, w in zip(ranks, fast):
            cfg = setting_spec("rank", k, method, "rtn", GS).lowrank_config()
            ref, _ = effective_affine(handler_for(cfg)(lin, cfg, stats[li.name]), li.in_features)
            torch.testing.assert_close(w, ref, rtol=1e-4, atol=1e-5)


def test_bad_group_size_is_refused_before_running(trained):
    lm, ids, stats = trained
    with pytest.raises(ValueError, match="group size 12 must be"):
        measure_sensitivity(lm.model, lm.adapter, ids, stats, group_size=12)


def test_save_load_round_trip_and_compatibility(tmp_path, trained, grid):
    lm, ids, stats = trained
    grid.save(tmp_path / "sens")
    back = SensitivityGrid.load(tmp_path / "sens")
    assert back.meta == grid.meta
    assert back.table.equals(grid.table) and back.first_order.equals(grid.first_order)
    check_compatible(back, lm.fingerprint, "bigram-32-0")
    other = wrap_model(tiny_model("llama", seed=1))
    with pytest.raises(ValueError, match="another model") as e:
        check_compatible(back, other.fingerprint)
    assert other.fingerprint in str(e.value) and str(tmp_path / "sens") in str(e.value)
    with pytest.raises(ValueError, match="other calibration data"):
        check_compatible(back, lm.fingerprint, "another-digest")
    # a vq grid measured before int8 codebooks (no quant_options): other sizes, refused with the reason
    old_vq = SensitivityGrid({**back.meta, "quant": "vq"}, back.table)
    old_vq.meta.pop("quant_options")
    with pytest.raises(ValueError, match=r"with vq settings \{'codebook_bits': 16, 'dim': 2\} and vq now quantises "
                                         r"with \{'codebook_bits': 8, 'dim': 0\}"):
        check_compatible(old_vq, lm.fingerprint)
    # one measured with int8 codebooks before 4-vectors: its options lack ``dim``, which was 2 then
    pairs_vq = SensitivityGrid({**back.meta, "quant": "vq", "quant_options": {
        k: v for k, v in quant_options("vq").items() if k != "dim"}}, back.table)
    with pytest.raises(ValueError, match=r"with vq settings \{'dim': 2\} and vq now quantises with \{'dim': 0\}"):
        check_compatible(pairs_vq, lm.fingerprint)
    old_rtn = SensitivityGrid(dict(back.meta), back.table)  # rtn's settings have not changed: still accepted
    old_rtn.meta.pop("quant_options")
    check_compatible(old_rtn, lm.fingerprint)
    with pytest.raises(FileNotFoundError, match="meta.json"):
        SensitivityGrid.load(tmp_path / "nothing")


def test_load_or_measure_reuses_the_cache(tmp_path, trained):
    lm, ids, stats = trained
    names = [lm.adapter.linears(lm.model)[3].name]
    kw = dict(fingerprint=lm.fingerprint, data_label="bigram", data_digest="d", cache_root=tmp_path, group_size=GS,
              names=names)
    first, reused = load_or_measure(lm.model, lm.adapter, ids, stats, **kw)
    assert not reused
    again, reused = load_or_measure(lm.model, lm.adapter, ids, stats, **kw)
    assert reused and again.table.equals(first.table)
    _, reused = load_or_measure(lm.model, lm.adapter, ids, stats, **{**kw, "group_size": 16})
    assert not reused
    two = [*names, lm.adapter.linears(lm.model)[5].name]  # other linears: their own grid, not the cached one
    wider, reused = load_or_measure(lm.model, lm.adapter, ids, stats, **{**kw, "names": two})
    assert not reused and sorted(wider.table["name"].unique()) == sorted(two)
    again, reused = load_or_measure(lm.model, lm.adapter, ids, stats, **kw)  # the first is still cached
    assert reused and again.table.equals(first.table)
    # the same grid measured with other quantiser settings (an older storage format) is measured again
    import json

    for meta_path in (tmp_path / "sensitivity").glob("*/meta.json"):
        meta = json.loads(meta_path.read_text())
        meta_path.write_text(json.dumps({**meta, "quant_options": {"storage": "older"}}))
    _, reused = load_or_measure(lm.model, lm.adapter, ids, stats, **kw)
    assert not reused


def test_load_or_proxy_reuses_the_cache_and_only_a_matching_one(tmp_path, trained):
    lm, ids, stats = trained
    kw = dict(fingerprint=lm.fingerprint, data_label="bigram", data_digest="d", cache_root=tmp_path, group_size=GS,
              fractions=FRACTIONS)
    assert load_or_proxy(lm.model, lm.adapter, ids, stats, cached_only=True, **kw) == (None, False)
    first, reused = load_or_proxy(lm.model, lm.adapter, ids, stats, **kw)
    assert not reused and first.meta["estimator"] == "proxy-fisher"
    fresh = proxy_sensitivity(lm.model, lm.adapter, ids, stats, group_size=GS, fractions=FRACTIONS)
    assert first.table.equals(fresh.table)  # seeded: what the cache holds is what would be computed
    again, reused = load_or_proxy(lm.model, lm.adapter, ids, stats, cached_only=True, **kw)
    assert reused and again.table.equals(first.table)
    for other in (dict(token_cap=None), dict(data_digest="e"), dict(fingerprint="f")):
        assert load_or_proxy(lm.model, lm.adapter, ids, stats, **{**kw, "cached_only": True, **other}) == (None, False)
    _, reused = load_or_proxy(lm.model, lm.adapter, ids[:1], stats, **kw)  # fewer windows: computed anew
    assert not reused


def test_proxy_has_the_same_schema_and_ranks_like_the_measurement(trained, grid):
    lm, ids, stats = trained
    before = lm.model(input_ids=ids).logits
    proxy = proxy_sensitivity(lm.model, lm.adapter, ids, stats, group_size=GS, fractions=FRACTIONS)
    assert list(proxy.table.columns) == TABLE_COLUMNS
    assert proxy.table[["name", "kind", "setting", "bytes"]].equals(grid.table[["name", "kind", "setting", "bytes"]])
    assert (proxy.table["dloss"] >= 0).all()
    assert proxy.meta["dense_loss"] == pytest.approx(grid.dense_loss, abs=1e-5)
    a = agreement(proxy, grid)
    assert a["n"] == len(grid.table) and set(a["by_kind"]) == {"rank", "bits"}
    assert a["spearman"] > 0.5
    assert a["kl"]["n"] == len(grid.table) and a["kl"]["spearman"] > 0.5, a["kl"]
    assert torch.equal(lm.model(input_ids=ids).logits, before)
    assert all(p.grad is None and p.requires_grad for p in lm.model.parameters())


@pytest.mark.parametrize("cap", [None, 1.5])
def test_proxy_fisher_matches_autograd(trained, cap):
    """F_y of one linear and its gradient-weighted input moments against a direct computation
    with a retained output gradient (real next tokens as targets); with a token cap, every
    token above cap x the median |g_t|² is scaled down to it."""
    from analysis.sensitivity import output_fisher

    lm, ids, _ = trained
    fisher, loss, count, moments = output_fisher(lm.model, lm.adapter, ids, targets="data", token_cap=cap)
    name = "model.layers.1.mlp.down_proj"
    mod = dict(lm.model.named_modules())[name]
    outs, ins = [], []

    def keep(_m, a, o):
        o.retain_grad()
        outs.append(o)
        ins.append(a[0].detach())

    h = mod.register_forward_hook(keep)
    try:
        logits = lm.model(input_ids=ids).logits
        nll = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="sum")
        nll.backward()
    finally:
        h.remove()
        lm.model.zero_grad(set_to_none=True)
    g = outs[0].grad.double().flatten(0, -2)  # (T, m): one chunk (256 tokens)
    if cap is not None:
        w0 = g.pow(2).sum(-1)
        capped = w0 > cap * w0.median()
        assert 0 < int(capped.sum()) < len(w0)  # the cap bites, on some tokens
        g = g * (cap * w0.median() / w0).clamp_max(1.0).sqrt()[:, None]
    ref = g.pow(2).sum(0) / count
    torch.testing.assert_close(fisher[name], ref, rtol=1e-4, atol=1e-10)
    assert loss == pytest.approx(nll.item() / count, rel=1e-5)
    w = g.pow(2).sum(-1)  # (T,) token weights
    x = ins[0].double().flatten(0, -2)  # (T, n)
    s2, mu = (x * w[:, None]).T @ x / w.sum(), (x * w[:, None]).sum(0) / w.sum()  # float32 products inside
    torch.testing.assert_close(moments[name].second_moment, s2, rtol=1e-4, atol=1e-5 * float(s2.abs().max()))
    torch.testing.assert_close(moments[name].mean, mu, rtol=1e-4, atol=1e-5 * float(mu.abs().max()))


def test_proxy_fisher_with_the_models_own_targets(trained):
    """Drawn targets: seeded (same result twice), a different Fisher from the real tokens',
    the same reported NLL (always of the real tokens); an unknown target kind is refused."""
    from analysis.sensitivity import output_fisher

    lm, ids, _ = trained
    f1, loss1, _, m1 = output_fisher(lm.model, lm.adapter, ids)
    f2, loss2, _, _ = output_fisher(lm.model, lm.adapter, ids)
    fd, lossd, _, _ = output_fisher(lm.model, lm.adapter, ids, targets="data")
    name = "model.layers.1.mlp.down_proj"
    assert torch.equal(f1[name], f2[name]) and loss1 == loss2 == pytest.approx(lossd, rel=1e-6)
    assert not torch.allclose(f1[name], fd[name], rtol=1e-3)
    assert m1[name].second_moment.shape == (lm.model.config.intermediate_size,) * 2
    with pytest.raises(ValueError, match="targets must be"):
        output_fisher(lm.model, lm.adapter, ids, targets="labels")


def test_proxy_quadratic_form_matches_explicit_outputs():
    """½ Σ_i F_i E[(Δy_i)²] from the input moments equals the average over explicit tokens."""
    from torch import nn

    from analysis.sensitivity import proxy_dloss

    torch.manual_seed(0)
    lin = nn.Linear(16, 8)
    x = torch.randn(500, 16) * torch.linspace(0.2, 3, 16) + 0.5
    st = LinearStats.from_inputs(x)
    settings = [(lin.weight + 0.05 * torch.randn(8, 16), lin.bias + 0.1 * torch.randn(8)),
                (lin.weight.detach().clone(), None), (0.5 * lin.weight.detach(), lin.bias.detach())]
    f = torch.rand(8, dtype=torch.float64)
    got = proxy_dloss(f, lin.weight, lin.bias, settings, st.inputs)
    with torch.no_grad():
        for (w_hat, b_hat), g in zip(settings, got):
            dy = lin(x) - (x @ w_hat.T + (0 if b_hat is None else b_hat))
            assert g == pytest.approx(float(0.5 * (f * dy.double().pow(2).mean(0)).sum()), rel=1e-4)


def test_cli_sensitivity_then_allocate(tmp_path, monkeypatch, trained):
    from analysis.sensitivity import cli_sensitivity
    from compression.allocate import cli_allocate

    lm, _, _ = trained
    monkeypatch.setenv("RANKLAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr("analysis.loading.load_model", lambda spec, *a, **k: lm)
    args = Namespace(model="tiny", text="default", tokens=96, seqlen=32, seed=0, method="svd-llm", quant="rtn",
                     group_size=GS, out=str(tmp_path / "sens"), device="cpu", dtype="float32",
                     trust_remote_code=False, json=True, profile_tokens=512)
    out = cli_sensitivity(args, progress=lambda f, m: None, say=lambda m: None)
    assert out["probes"] == sum(len(settings_for(li)) for li in lm.adapter.linears(lm.model))
    assert out["n_tokens"] == 96
    n_lin = len(lm.adapter.linears(lm.model))
    assert out["derived"] == n_lin and out["probed"] == out["probes"] - n_lin  # 8 bits scaled from 4 bits
    assert {"seconds", "dense_loss", "agreement", "seconds_per_probe"} <= set(out)
    assert {"spearman", "spearman_curvature", "spearman_kl"} <= set(out["agreement"])
    grid = SensitivityGrid.load(tmp_path / "sens")
    assert grid.proxy is not None and "agreement" in grid.meta and grid.meta["stats_tokens"] == 512
    said = []
    again = cli_sensitivity(args, progress=None, say=said.append)  # cached measurement, cached proxy
    assert again["reused"] and not any("gradient proxy" in m for m in said)
    cached = SensitivityGrid.load(again["cache"])  # a proxy made before the token cap: made again
    cached.meta.pop("proxy_token_cap")
    cached.save(again["cache"])
    said.clear()
    assert cli_sensitivity(args, progress=None, say=said.append)["reused"] and any("gradient proxy" in m for m in said)
    assert SensitivityGrid.load(again["cache"]).meta["proxy_token_cap"] == TOKEN_CAP
    short = cli_sensitivity(Namespace(**{**vars(args), "tokens": 20, "out": str(tmp_path / "short")}),
                            progress=None, say=None)  # fewer tokens than a window: the start of one window
    assert short["n_tokens"] == 20 and "1 x 20 tokens" in short["data"] and not short["reused"]
    plan_out = cli_allocate(Namespace(model="tiny", sensitivity=str(tmp_path / "sens"), target_bytes=None,
                                      target_ratio=None, target_bits=12.0, only="bits",
                                      out=str(tmp_path / "plan.json"), device="cpu", dtype="float32",
                                      trust_remote_code=False), say=lambda m: None)
    assert plan_out["bits_per_weight"] <= 12.0 and plan_out["modules"]["rank"] == 0
    assert Plan.load(tmp_path / "plan.json").meta["estimator"] == "kl"  # auto: the measured grid has KL
    assert plan_out["measured_picks"] is None


def test_cli_allocate_measures_its_picks_on_the_grids_own_windows(tmp_path, monkeypatch, trained):
    from analysis.sensitivity import SettingProbe, cli_sensitivity, probe_inputs, probe_windowing
    from compression.allocate import Predictor, cli_allocate

    lm, _, _ = trained
    monkeypatch.setenv("RANKLAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr("analysis.loading.load_model", lambda spec, *a, **k: lm)
    text = tmp_path / "t.txt"
    text.write_text("other text for the allocation. " * 400)
    cli_sensitivity(Namespace(model="tiny", text="default", tokens=48, seqlen=32, seed=3, method="svd-llm",
                              quant="rtn", group_size=GS, out=str(tmp_path / "sens"), device="cpu", dtype="float32",
                              trust_remote_code=False, json=True, profile_tokens=256), progress=None, say=None)
    grid = SensitivityGrid.load(tmp_path / "sens")
    assert probe_windowing(grid.meta["data_digest"])[1:] == (32, 3)  # window length and seed, from the digest
    assert probe_windowing("0123abcd") is None  # the app's windows: a digest of its own
    args = Namespace(model="tiny", sensitivity=str(tmp_path / "sens"), target_bytes=None, target_ratio=None,
                     target_bits=3.0, only=None, out=str(tmp_path / "plan.json"), device="cpu", dtype="float32",
                     trust_remote_code=False, measure_picks=True, text="default")
    said = []
    out = cli_allocate(args, say=said.append)
    mp, plan = out["measured_picks"], Plan.load(tmp_path / "plan.json")
    assert mp["converged"] and mp["measured"] == mp["known"] > 0 and plan.meta["measured_picks"] == mp
    assert out["bits_per_weight"] <= 3.0 and any(f"measured {mp['measured']} rank(s)" in m for m in said)
    assert not any("rank and bits together" in m for m in said)
    # each measured cost is the setting probe's on the grid's own probe windows (rebuilt from the text)
    ids, prof, digest, _ = probe_inputs(lm, load_corpus("default"), tokens=48, seqlen=32, seed=3, profile_tokens=256)
    assert digest == grid.meta["data_digest"] and ids.numel() == grid.meta["n_tokens"]
    probe = SettingProbe(lm.model, ids, prof.all_stats(), "kl")
    name, spec = next((n, s) for n, s in plan.modules.items() if s.rank is not None and s.bits is not None)
    linears = lm.adapter.linears(lm.model)
    pred = Predictor(grid, linears, 1, 4, {}, estimator="kl")
    from compression.allocate import load_measured

    assert load_measured(pred, tmp_path / "cache") == mp["known"]  # cached for later allocations
    assert pred.dloss(name, spec) == pytest.approx(probe(name, spec), rel=1e-6)
    # a second allocation on the grid reuses them: the same plan, nothing measured again
    said.clear()
    again = cli_allocate(Namespace(**{**vars(args), "out": str(tmp_path / "again.json")}), say=said.append)
    assert again["measured_picks"]["measured"] == 0 and Plan.load(tmp_path / "again.json").modules == plan.modules
    assert any(f"using {mp['known']} measured cost(s)" in m for m in said)
    # refused before the model loads: another text, --only, an estimator a probe does not measure
    monkeypatch.setattr("analysis.loading.load_model", lambda *a, **k: pytest.fail("loaded the model"))
    for change, match in (({"text": str(text)}, "is not the text the grid was measured on"),
                          ({"only": "bits"}, "drop --only"),
                          ({"estimator": "curvature"}, "use --estimator kl"),
                          ({"measure_picks": False}, "--text is read only with --measure-picks")):
        with pytest.raises(ValueError, match=match):
            cli_allocate(Namespace(**{**vars(args), **change}), say=lambda m: None)


# ----------------------------------------------------------------------------- KL estimator
@torch.no_grad()
def test_kl_matches_a_direct_computation_and_is_nonnegative(trained, grid):
    lm, ids, stats = trained
    assert grid.kl is not None and grid.meta["kl"] is True
    kl = grid.kl_table()
    assert (kl.dloss >= -1e-9).all() and len(kl) == len(grid.table)
    full = kl[(kl.kind == "rank") & (kl.setting >= 64)]  # 2 x break-even clamps to full rank: KL vanishes
    assert len(full) and full.dloss.abs().max() < 1e-5
    # one probe recomputed by applying its plan: mean over predicted tokens of KL(dense || compressed)
    row = kl[(kl.kind == "bits") & (kl.setting == 2)].iloc[0]
    comp, _ = apply_plan(lm.model, lm.adapter, Plan(modules={row["name"]: setting_spec("bits", 2, "svd-llm", "rtn",
                                                                                        GS)}), stats)
    logp = torch.log_softmax(lm.model(ids).logits[:, :-1].double(), -1)
    logq = torch.log_softmax(comp(ids).logits[:, :-1].double(), -1)
    direct = float((logp.exp() * (logp - logq)).sum(-1).mean())
    assert row["dloss"] == pytest.approx(direct, rel=1e-3, abs=1e-6)
    assert grid.estimate("dloss") is grid.table
    with pytest.raises(ValueError, match="estimator"):
        grid.estimate("nope")


def test_setting_probe_reproduces_the_grid_and_measures_ranks_with_quantised_factors(trained, grid):
    from analysis.sensitivity import SettingProbe

    lm, ids, stats = trained
    kl, dl = grid.kl_table(), grid.table
    name = lm.adapter.linears(lm.model)[2].name
    probes = {e: SettingProbe(lm.model, ids, stats, e) for e in ("kl", "dloss")}
    rank = int(dl[(dl.name == name) & (dl.kind == "rank")].setting.min())
    for kind, setting in (("rank", rank), ("bits", 2)):  # the grid's own probes, one at a time
        spec = setting_spec(kind, setting, "svd-llm", "rtn", GS)
        for est, table in (("kl", kl), ("dloss", dl)):
            want = table[(table.name == name) & (table.kind == kind) & (table.setting == setting)].dloss.item()
            assert probes[est](name, spec) == pytest.approx(want, rel=2e-3, abs=1e-6)
    # a rank with quantised factors, which the grid does not probe: what applying that one-linear plan gives
    both = ModuleSpec(rank=rank, bits=2, group_size=GS, lowrank="svd-llm", quant="rtn")
    comp, _ = apply_plan(lm.model, lm.adapter, Plan(modules={name: both}), stats)
    with torch.no_grad():
        logp = torch.log_softmax(lm.model(ids).logits[:, :-1].double(), -1)
        logq = torch.log_softmax(comp(ids).logits[:, :-1].double(), -1)
    direct = float((logp.exp() * (logp - logq)).sum(-1).mean())
    assert probes["kl"](name, both) == pytest.approx(direct, rel=1e-3)
    assert direct > kl[(kl.name == name) & (kl.kind == "rank") & (kl.setting == rank)].dloss.item()
    assert isinstance(get_submodule(lm.model, name), torch.nn.Linear)  # the model is back as it was
    with pytest.raises(ValueError, match="curvature estimator"):
        SettingProbe(lm.model, ids, stats, "curvature")
    with pytest.raises(ValueError, match="no profile statistics"):
        probes["kl"]("model.nope", both)


def test_kl_survives_save_and_load(tmp_path, grid):
    grid.save(tmp_path / "g")
    back = SensitivityGrid.load(tmp_path / "g")
    pd.testing.assert_frame_equal(back.kl_table(), grid.kl_table(), check_exact=False, rtol=1e-9)


def test_with_module_shares_everything_but_the_swapped_linear(trained):
    from analysis.sensitivity import with_module

    lm, ids, _ = trained
    layer = lm.adapter.layers(lm.model)[0]
    old = layer.mlp.down_proj
    new = torch.nn.Linear(old.in_features, old.out_features, bias=False)
    twin = with_module(layer, "mlp.down_proj", new)
    assert layer.mlp.down_proj is old and twin.mlp.down_proj is new
    assert twin.mlp is not layer.mlp and twin.self_attn is layer.self_attn and twin.mlp.up_proj is layer.mlp.up_proj
    with pytest.raises(KeyError, match="nope"):
        with_module(layer, "nope.down_proj", new)


def test_parallel_workers_give_the_one_worker_grid(trained, grid):
    lm, ids, stats = trained
    before = lm.model(input_ids=ids).logits
    two = measure_sensitivity(lm.model, lm.adapter, ids, stats, group_size=GS, fractions=FRACTIONS, workers=3,
                              fingerprint=lm.fingerprint, data_label="bigram", data_digest="bigram-32-0")
    assert two.meta["workers"] == 3 and grid.meta["workers"] == 1
    np.testing.assert_allclose(two.table["dloss"], grid.table["dloss"], atol=2e-6)
    np.testing.assert_allclose(two.kl["kl"], grid.kl["kl"], atol=2e-6)
    np.testing.assert_allclose(two.first_order["dloss_first"], grid.first_order["dloss_first"], atol=1e-9)
    assert torch.equal(lm.model(input_ids=ids).logits, before)
    calls = iter(range(100))
    with pytest.raises(InterruptedError):  # a stop request reaches the workers
        measure_sensitivity(lm.model, lm.adapter, ids, stats, group_size=GS, workers=2,
                            should_stop=lambda: next(calls) >= 2)


def test_derived_widths():
    from analysis.sensitivity import derived_widths

    assert derived_widths((2, 3, 4, 8), (8,)) == {8: 4}
    assert derived_widths((8,), (8,)) == {}  # nothing below to scale from: probed
    assert derived_widths((2, 4, 8), (4, 8)) == {4: 2, 8: 2}
    assert derived_widths((2, 3, 4), (8,)) == {}


def test_derived_8_bits_track_the_probed_ones(trained, grid):
    """8 bits are scaled from the 4-bit probe by the ratio of the Fisher quadratic forms: close
    to probing them, far below 4 bits; the 4-bit rows themselves are probes."""
    lm, ids, stats = trained
    assert grid.meta["derived"]["bits"] == [8] and grid.meta["derived"]["settings"] == len(grid.table.name.unique())
    probed = measure_sensitivity(lm.model, lm.adapter, ids, stats, group_size=GS, fractions=(), bits=(4, 8),
                                 derive_bits=())
    assert probed.meta["derived"] is None and probed.meta["probes"] == len(probed.table)
    key = ["name", "setting"]
    d = grid.kl[grid.kl.kind == "bits"].merge(probed.kl, on=key, suffixes=("", "_probed"))
    d8, d4 = d[d.setting == 8], d[d.setting == 4]
    np.testing.assert_allclose(d4["kl"], d4["kl_probed"], rtol=1e-5, atol=1e-9)
    ratio = d8["kl"].to_numpy() / d8["kl_probed"].to_numpy()
    assert 0.5 < np.median(ratio) < 2.0, ratio
    assert (d8["kl"].to_numpy() < 0.05 * d4["kl"].to_numpy()).all()


def test_parse_derive_bits():
    from analysis.sensitivity import parse_bits

    assert parse_bits("8") == (8,) and parse_bits("4, 8") == (4, 8) and parse_bits("") == ()
    with pytest.raises(ValueError, match="comma-separated"):
        parse_bits("eight")
    for bad in ("32", "5", "2"):  # not a grid width, or the lowest (nothing below to scale from)
        with pytest.raises(ValueError, match="derived widths are among 3, 4, 8"):
            parse_bits(bad)


def test_a_width_without_statistics_to_scale_from_is_probed(trained):
    lm, ids, stats = trained
    names = [li.name for li in lm.adapter.linears(lm.model)][:3]
    some = {k: v for k, v in stats.items() if k != names[0]}  # no statistics: 8 bits cannot be derived
    g = measure_sensitivity(lm.model, lm.adapter, ids, some, group_size=GS, fractions=(), bits=(4, 8), names=names,
                            workers=2)
    exact = measure_sensitivity(lm.model, lm.adapter, ids, stats, group_size=GS, fractions=(), bits=(4, 8),
                                names=names[:1], derive_bits=())
    assert g.meta["derived"]["settings"] == 2 and g.meta["probes"] == 4
    row = g.kl[(g.kl.name == names[0]) & (g.kl.setting == 8)]["kl"].item()
    assert row == pytest.approx(exact.kl[exact.kl.setting == 8]["kl"].item(), rel=1e-5, abs=1e-9)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_grid_and_first_view_on_cuda_match_the_cpu(trained, grid):
    """The probes and the first view run on the GPU (model on the CPU, device="cuda") and
    give the CPU's numbers: the same settings and bytes, dloss and KL within rounding."""
    lm, ids, stats = trained
    gpu = measure_sensitivity(lm.model, lm.adapter, ids, stats, group_size=GS, fractions=FRACTIONS, device="cuda",
                              fingerprint=lm.fingerprint, data_label="bigram", data_digest="bigram-32-0")
    keys = ["name", "kind", "setting", "bytes"]
    assert gpu.table[keys].equals(grid.table[keys])
    assert gpu.dense_loss == pytest.approx(grid.dense_loss, abs=1e-4)
    np.testing.assert_allclose(gpu.table["dloss"], grid.table["dloss"], atol=2e-4, rtol=2e-2)
    np.testing.assert_allclose(gpu.kl["kl"], grid.kl["kl"], atol=2e-4, rtol=2e-2)
    cpu_view = proxy_sensitivity(lm.model, lm.adapter, ids, stats, group_size=GS, fractions=FRACTIONS)
    gpu_view = proxy_sensitivity(lm.model, lm.adapter, ids, stats, group_size=GS, fractions=FRACTIONS, device="cuda")
    np.testing.assert_allclose(gpu_view.table["dloss"], cpu_view.table["dloss"], atol=1e-5, rtol=1e-2)
    assert all(p.device.type == "cpu" and p.grad is None for p in lm.model.parameters())


def test_draw_tokens_samples_the_distribution_and_never_a_zero_probability_token():
    from analysis.sensitivity import draw_tokens

    probs = torch.tensor([0.5, 0.0, 0.3, 0.2, 0.0])
    rows = probs.repeat(20_000, 1)  # (T, V)
    drawn = draw_tokens(rows, torch.Generator().manual_seed(1))
    assert torch.equal(drawn, draw_tokens(rows, torch.Generator().manual_seed(1), rows=7_000))  # any chunking
    freq = torch.bincount(drawn, minlength=5).double() / len(drawn)
    assert freq[1] == 0 and freq[4] == 0
    torch.testing.assert_close(freq, probs.double(), atol=0.015, rtol=0)  # ~4.5 standard errors
    again = draw_tokens(rows, torch.Generator().manual_seed(1))
    assert torch.equal(drawn, again)
    one_hot = torch.zeros(3, 5)
    one_hot[:, 4] = 1.0  # the last token, the one a rounded cumulative sum could overshoot
    assert draw_tokens(one_hot, torch.Generator().manual_seed(0)).tolist() == [4, 4, 4]


def test_settings_that_cannot_be_built_are_refused_once_per_reason(trained):
    lm, ids, stats = trained
    with pytest.raises(ValueError) as e:
        measure_sensitivity(lm.model, lm.adapter, ids, stats, group_size=12, fractions=FRACTIONS)
    lines = str(e.value).splitlines()
    n_bits = len(lm.adapter.linears(lm.model)) * 4  # every linear, at every probed width
    # one line per distinct reason (here: per input width), not one per linear and width
    assert lines[0] == "sensitivity settings cannot be built:" and 2 <= len(lines) <= 3
    assert sum(int(re.search(r"\((\d+) settings?, e\.g\.", ln).group(1)) for ln in lines[1:]) == n_bits
    assert "group size 12 must be a positive multiple of 8" in lines[1] and "e.g. model.layers.0." in lines[1]


def test_a_vq_grid_probes_its_own_widths_exactly(trained):
    """vq stores 2/2.5/3/4-bit codebooks (no 8): its grid holds those widths, a probe equals
    really compressing that linear with vq (2.5 bits too), and its damage falls with the width."""
    from analysis.sensitivity import grid_bits

    assert grid_bits((2, 3, 4, 8), "vq") == (2, 2.5, 3, 4) and grid_bits((2, 3, 4, 8), "gptq") == (2, 3, 4, 8)
    assert grid_bits((3, 4), "vq") == (3, 4) and grid_bits((2, 3), "vq") == (2, 2.5, 3)  # 2.5 only between
    lm, ids, stats = trained
    linears = lm.adapter.linears(lm.model)
    names = [linears[2].name, linears[6].name]
    vq = measure_sensitivity(lm.model, lm.adapter, ids, stats, quant="vq", group_size=GS, fractions=(0.5,),
                             names=names, first_order=False)
    bits = vq.table[vq.table["kind"] == "bits"]
    assert sorted(bits["setting"].unique()) == [2, 2.5, 3, 4] and vq.meta["bits"] == [2, 2.5, 3, 4]
    kl = vq.kl[vq.kl["kind"] == "bits"]
    for name in names:  # the KL from the dense model (dloss itself is noisy on 256 tokens)
        d = kl[kl["name"] == name].set_index("setting")["kl"]
        size = bits[bits["name"] == name].set_index("setting")["bytes"]
        assert d[2] > d[2.5] > 0 and d[2] > d[3] > d[4] > 0, (name, d.to_dict())
        # 2 and 2.5 bits are 4-vectors with one codebook per matrix: on these 64-wide matrices the
        # 1,024 centroids at 2.5 bits cost more bytes than any other width (and hold most vectors exactly)
        assert max(size[2], size[3], size[4]) < size[2.5], (name, size.to_dict())
    for width in (2, 2.5):
        spec = setting_spec("bits", float(width), "svd-llm", "vq", GS)
        assert spec.bits == width and type(spec.bits) is type(width)  # 2, not 2.0: plans stay as written
        comp, _ = apply_plan(lm.model, lm.adapter, Plan(modules={names[1]: spec}), stats)
        s, c = window_nll(comp, ids)
        row = bits[(bits["name"] == names[1]) & (bits["setting"] == width)]
        assert s / c - vq.dense_loss == pytest.approx(row["dloss"].item(), abs=2e-5)
