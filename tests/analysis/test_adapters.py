"""One contract suite, run against a tiny random model of every supported family."""
import pytest
import torch
from torch import nn

from analysis.adapters import adapter_for, get_submodule, supported_model_types
from analysis.loading import wrap_model
from tests.conftest import FAMILIES, tiny_config, tiny_model


def test_every_family_listed_is_supported():
    assert set(FAMILIES) <= set(supported_model_types())


def test_contract(family):
    lm = wrap_model(tiny_model(family))
    model, ad = lm.model, lm.adapter
    layers = ad.layers(model)
    assert len(layers) == 2
    lins = ad.linears(model)
    assert len(lins) == 2 * len(ad.roles)
    names = [li.name for li in lins]
    assert len(set(names)) == len(names)
    modules = dict(model.named_modules())
    for li in lins:
        mod = modules[li.name]  # the plan key is the real module name
        assert isinstance(mod, nn.Linear)
        assert (mod.out_features, mod.in_features) == (li.out_features, li.in_features)
        assert mod.weight.shape == (li.out_features, li.in_features)
        assert 0 < li.break_even < min(li.out_features, li.in_features)
        assert get_submodule(layers[li.layer], ad.role_path(li.role)) is mod  # the role's path inside its layer
    with pytest.raises(KeyError, match="no role"):
        ad.role_path("nope")
    # every input group that has a norm in front of it finds a real norm module
    for group in ("attn_in", "mlp_in"):
        norm = ad.norm_for(layers[0], group)
        assert norm is not None and sum(p.numel() for p in norm.parameters()) > 0
    # linears of one group read the same width
    by_group = {}
    for li in lins:
        by_group.setdefault(li.input_key, set()).add(li.in_features)
    assert all(len(v) == 1 for v in by_group.values())
    assert ad.embed(model).weight.shape[0] == model.config.vocab_size
    assert ad.head(model).out_features == model.config.vocab_size
    assert ad.final_norm(model) is not None
    # what SliceGPT reads from the adapter exists where it says
    attn = get_submodule(layers[0], ad.attn_path)
    assert all(get_submodule(layers[0], r.path) in set(attn.modules()) for r in ad.roles if r.group == "attn_in")
    if ad.pos_embed_path:
        assert isinstance(get_submodule(model, ad.pos_embed_path), nn.Embedding)
    # the model still runs after prepare() (gpt2's Conv1D -> Linear keeps outputs)
    ids = torch.randint(0, 128, (1, 8))
    assert torch.isfinite(model(ids).logits).all()


def test_gpt2_conv1d_swap_is_exact():
    raw = tiny_model("gpt2")
    ids = torch.randint(0, 128, (2, 16))
    before = raw(ids).logits
    lm = wrap_model(raw)
    assert isinstance(get_submodule(lm.adapter.layers(lm.model)[0], "attn.c_attn"), nn.Linear)
    torch.testing.assert_close(lm.model(ids).logits, before, rtol=1e-5, atol=1e-5)


def test_unsupported_model_type_names_the_supported_ones():
    cfg = tiny_config("llama")
    cfg.model_type = "bert"
    with pytest.raises(ValueError, match="supported: .*llama.*opt"):
        adapter_for(cfg)
    cfg.model_type = "gemma3"  # the vision-language wrapper: its layers are not where gemma3_text's are
    with pytest.raises(ValueError, match="Gemma 3's multimodal model .*gemma3_text.*does not support yet"):
        adapter_for(cfg)
