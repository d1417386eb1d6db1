import torch

from analysis.layerwise import capture, run_head, run_layer
from analysis.loading import wrap_model
from tests.conftest import tiny_config, tiny_model


def _replay_matches_forward(model) -> None:
    lm = wrap_model(model)
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(1))
    ref = lm.model(input_ids=ids, use_cache=False).logits
    li = capture(lm.model, lm.adapter, ids)
    h = li.hidden
    for layer, call in zip(lm.adapter.layers(lm.model), li.calls):
        h = run_layer(layer, h, call)
    torch.testing.assert_close(run_head(lm.model, lm.adapter, h), ref, rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_layer_by_layer_replay_equals_full_forward(family):
    _replay_matches_forward(tiny_model(family))


@torch.no_grad()
def test_replay_through_the_head_of_opt_with_a_projection():
    from transformers import AutoModelForCausalLM

    cfg = tiny_config("opt")
    cfg.word_embed_proj_dim = 32  # OPT-350m's layout: project_in / project_out around the decoder
    model = AutoModelForCausalLM.from_config(cfg).eval()
    assert wrap_model(model).adapter.pre_head(model) is not None
    _replay_matches_forward(model)
