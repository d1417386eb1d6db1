import torch

from analysis.layerwise import capture, run_head, run_layer
from analysis.loading import wrap_model
from tests.conftest import tiny_model


@torch.no_grad()
def test_layer_by_layer_replay_equals_full_forward(family):
    lm = wrap_model(tiny_model(family))
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(1))
    ref = lm.model(input_ids=ids, use_cache=False).logits
    li = capture(lm.model, lm.adapter, ids)
    h = li.hidden
    for layer, call in zip(lm.adapter.layers(lm.model), li.calls):
        h = run_layer(layer, h, call)
    torch.testing.assert_close(run_head(lm.model, lm.adapter, h), ref, rtol=1e-4, atol=1e-4)
