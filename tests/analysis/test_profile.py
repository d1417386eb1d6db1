import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from analysis.loading import wrap_model
from analysis.profile import (
    Profile,
    TooFewTokens,
    collect_input_stats,
    effective_rank,
    load_or_profile,
    output_eigvals,
    profile_model,
    rank_for_energy,
)
from analysis.stats import InputStats, LinearStats
from tests.conftest import refuse_creation_in, tiny_model


def test_effective_rank_and_energy_rank():
    assert effective_rank(torch.ones(10)) == pytest.approx(10)
    assert effective_rank(torch.tensor([5.0, 0, 0])) == pytest.approx(1)
    ev = torch.tensor([6.0, 3.0, 1.0])
    assert rank_for_energy(ev, 0.5) == 1
    assert rank_for_energy(ev, 0.9) == 2
    assert rank_for_energy(ev, 0.99) == 3


def test_low_rank_inputs_give_that_rank():
    torch.manual_seed(0)
    n, m, r = 32, 48, 5
    lin = nn.Linear(n, m).double()
    x = torch.randn(4096, r, dtype=torch.float64) @ torch.randn(r, n, dtype=torch.float64)
    stats = LinearStats.from_inputs(x)
    ev = output_eigvals(lin.weight, stats)
    assert (ev[:r] > 1e-3 * ev[0]).all() and (ev[r:] < 1e-9 * ev[0]).all()
    assert rank_for_energy(ev, 0.999999) == r


def test_covariance_matches_numpy_on_captured_activations():
    torch.manual_seed(0)
    lin = nn.Linear(16, 24)
    x = torch.randn(3, 50, 16) * torch.linspace(0.1, 3, 16) + 1.0
    stats = LinearStats.from_inputs(x)
    y = (lin(x).detach().reshape(-1, 24)).double().numpy()
    ref = np.cov(y, rowvar=False, bias=True)
    np.testing.assert_allclose(stats.out_cov(lin.weight.detach()).numpy(), ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats.out_mean(lin.weight.detach(), lin.bias.detach()).numpy(), y.mean(0), rtol=1e-5,
                               atol=1e-5)


def test_two_batches_equal_one():
    x = torch.randn(200, 12, generator=torch.Generator().manual_seed(0))
    one = InputStats.zeros(12)
    one.update(x)
    two = InputStats.zeros(12)
    two.update(x[:77])
    two.update(x[77:])
    # fp32 products per batch, fp64 running sums: equal to fp32 rounding
    torch.testing.assert_close(one.xxt, two.xxt, rtol=2e-6, atol=1e-4)
    torch.testing.assert_close(one.x_sum, two.x_sum, rtol=2e-6, atol=1e-5)
    assert one.n_tokens == two.n_tokens == 200
    x64, a, b = x.double(), InputStats.zeros(12), InputStats.zeros(12)
    a.update(x64)
    b.update(x64[:77])
    b.update(x64[77:])
    torch.testing.assert_close(a.xxt, b.xxt, rtol=1e-12, atol=1e-12)


def test_hooks_see_exactly_the_linear_inputs(token_ids):
    lm = wrap_model(tiny_model("llama"))
    got = collect_input_stats(lm.model, lm.adapter, token_ids, batch_size=3)
    # reference: capture q_proj's inputs of layer 1 directly
    seen = []
    q = dict(lm.model.named_modules())["model.layers.1.self_attn.q_proj"]
    h = q.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().reshape(-1, a[0].shape[-1])))
    lm.model(input_ids=token_ids)
    h.remove()
    x = torch.cat(seen).double()
    torch.testing.assert_close(got["1.attn_in"].xxt, x.T @ x, rtol=1e-4, atol=1e-3)
    assert got["1.attn_in"].n_tokens == token_ids.numel()


def test_layerwise_mode_equals_full_mode(token_ids):
    lm = wrap_model(tiny_model("qwen3"))
    a = collect_input_stats(lm.model, lm.adapter, token_ids, batch_size=2)
    b = collect_input_stats(lm.model, lm.adapter, token_ids, batch_size=2, layerwise=True)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k].xxt, b[k].xxt, rtol=1e-4, atol=1e-3)


def test_profile_summary_and_too_few_tokens_warning(token_ids):
    lm = wrap_model(tiny_model("llama"))
    with pytest.warns(TooFewTokens, match="at least 128 tokens"):
        prof = profile_model(lm.model, lm.adapter, token_ids[:1, :16], fingerprint=lm.fingerprint,
                             data_label="t", data_digest="d")
    assert len(prof.summary) == len(lm.adapter.linears(lm.model))
    row = prof.summary.iloc[0]
    assert row.rank90 <= row.rank95 <= row.rank99 <= min(row.out_features, row.in_features)
    assert row.rank99 <= 16  # 16 tokens cannot span more directions


def test_cache_reused_and_invalidated(tmp_path, token_ids, monkeypatch):
    lm = wrap_model(tiny_model("llama"))
    calls = []
    import analysis.profile as P

    real = P.collect_input_stats
    monkeypatch.setattr(P, "collect_input_stats", lambda *a, **k: calls.append(1) or real(*a, **k))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TooFewTokens)
        p1, reused1 = load_or_profile(lm.model, lm.adapter, token_ids, fingerprint=lm.fingerprint,
                                      data_label="t", data_digest="d1", cache_root=tmp_path)
        p2, reused2 = load_or_profile(lm.model, lm.adapter, token_ids, fingerprint=lm.fingerprint,
                                      data_label="t", data_digest="d1", cache_root=tmp_path)
        assert (reused1, reused2) == (False, True) and len(calls) == 1  # no second forward pass
        torch.testing.assert_close(p1.inputs["0.mlp_out"].xxt.float(), p2.inputs["0.mlp_out"].xxt.float())
        _, r3 = load_or_profile(lm.model, lm.adapter, token_ids, fingerprint=lm.fingerprint,
                                data_label="t", data_digest="d2", cache_root=tmp_path)
        _, r4 = load_or_profile(lm.model, lm.adapter, token_ids[:2], fingerprint=lm.fingerprint,
                                data_label="t", data_digest="d1", cache_root=tmp_path)
    assert (r3, r4) == (False, False) and len(calls) == 3
    # a damaged cache entry is profiled again, not an error
    (Path(p1.meta["folder"]) / "arrays.safetensors").unlink()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TooFewTokens)
        _, r5 = load_or_profile(lm.model, lm.adapter, token_ids, fingerprint=lm.fingerprint,
                                data_label="t", data_digest="d1", cache_root=tmp_path)
    assert r5 is False and len(calls) == 4 and (Path(p1.meta["folder"]) / "arrays.safetensors").exists()


def test_a_cache_that_cannot_be_written_is_said_and_skipped(tmp_path, token_ids, monkeypatch):

    from analysis.atomic import CacheWarning

    lm = wrap_model(tiny_model("llama"))
    ro = tmp_path / "read-only"
    ro.mkdir()
    refuse_creation_in(monkeypatch, {str(ro)})  # nothing can be created in it (root passes permission bits)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TooFewTokens)
        with pytest.warns(CacheWarning, match="could not cache the profile in .*read-only.* set RANKLAB_CACHE"):
            prof, reused = load_or_profile(lm.model, lm.adapter, token_ids, fingerprint=lm.fingerprint,
                                           data_label="t", data_digest="d1", cache_root=ro)
    assert not reused and "folder" not in prof.meta and len(prof.linears) == 14 and not any(ro.iterdir())


def test_interrupted_save_leaves_nothing_readable(tmp_path, token_ids, monkeypatch):
    lm = wrap_model(tiny_model("llama"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TooFewTokens)
        prof = profile_model(lm.model, lm.adapter, token_ids, fingerprint="f", data_label="t", data_digest="d")
    import analysis.profile as P

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(P, "save_file", boom)
    with pytest.raises(KeyboardInterrupt):
        prof.save(tmp_path / "p")
    assert not (tmp_path / "p").exists() and list(tmp_path.iterdir()) == []
    with pytest.raises(FileNotFoundError):
        Profile.load(tmp_path / "p")


def test_summary_reads_back_bit_for_bit(tmp_path, token_ids):
    """Floats written to an artifact CSV come back exact, also on pandas before 3.1 (whose
    default parser is off in the last bits; ``EXACT_FLOATS``)."""
    lm = wrap_model(tiny_model("llama"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TooFewTokens)
        prof = profile_model(lm.model, lm.adapter, token_ids, fingerprint="f", data_label="t", data_digest="d")
    prof.summary["noise"] = np.random.default_rng(0).random(len(prof.summary)) * 1e-3  # 17-digit floats
    prof.save(tmp_path / "p")
    back = Profile.load(tmp_path / "p")
    assert back.summary.equals(prof.summary)


def test_small_gram_spectra_equal_direct_ones():
    torch.manual_seed(0)
    for m, n in ((40, 16), (16, 40)):
        w = torch.randn(m, n, dtype=torch.float64)
        x = torch.randn(500, n, dtype=torch.float64) @ torch.randn(n, n, dtype=torch.float64)
        st = LinearStats.from_inputs(x)
        direct = torch.linalg.eigvalsh(st.out_cov(w)).flip(0).clamp_min(0)[: min(m, n)]
        torch.testing.assert_close(output_eigvals(w, st), direct, rtol=1e-8, atol=1e-8)
        from analysis.profile import weight_singular_values

        torch.testing.assert_close(weight_singular_values(w), torch.linalg.svdvals(w), rtol=1e-8, atol=1e-8)


def test_statistics_keep_the_covariance_of_inputs_with_large_means_in_memory_and_saved(tmp_path):
    from analysis.profile import PROFILE_FORMAT, Profile

    g = torch.Generator().manual_seed(0)
    x = torch.randn(4096, 16, generator=g, dtype=torch.float64)
    x[:, 3] += 300.0  # a channel with a large mean (like the attention sink's)
    fresh = torch.cov(x.T, correction=0)
    s = InputStats.zeros(16, "cpu")
    for batch in x.float().split(512):  # float32 batches, as the profiling hooks see them
        s.update(batch)
    err = ((s.cov - fresh).abs().max() / fresh.diagonal().min()).item()
    assert err < 1e-5, err  # an uncentred float32 product gave 2.6e-3 here
    lm = wrap_model(tiny_model("llama"))
    li = lm.adapter.linears(lm.model)[0]
    Profile({"format": PROFILE_FORMAT}, [li], {li.input_key: s}).save(tmp_path / "p")
    back = Profile.load(tmp_path / "p").inputs[li.input_key]
    err = ((back.cov - s.cov).abs().max() / fresh.diagonal().min()).item()
    assert err < 1e-6, err  # storing x xᵀ itself in float32 gave 1.6e-3 here
    assert torch.equal(back.x_sum, s.x_sum) and back.n_tokens == 4096
