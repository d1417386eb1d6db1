"""Run a causal LM one decoder layer at a time.

``capture`` records, for a batch shape, the hidden state entering layer 0 and the extra
arguments every layer receives (masks, rotary tables, cache positions: they differ per
layer in some families, e.g. Gemma 3's sliding layers), by replacing each layer with a
recorder for one cheap pass. ``run_layer`` then replays any layer on any hidden state.
This is what profiling in layer-by-layer mode, sensitivity probes (re-run only the layers
from l upward) and Lillama's bottom-first distillation build on.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from analysis.adapters import Adapter


class _Stop(Exception):
    pass


class _Recorder(nn.Module):
    """Stands in for a decoder layer: records its call and passes the hidden state on."""

    def __init__(self, layer: nn.Module, stop: bool):
        super().__init__()
        self.layer, self.stop = layer, stop
        self.hidden: Tensor | None = None
        self.args: tuple = ()
        self.kwargs: dict = {}

    def forward(self, hidden_states, *args, **kwargs):
        self.hidden, self.args, self.kwargs = hidden_states, args, kwargs
        if self.stop:
            raise _Stop
        return hidden_states


@dataclass
class LayerInputs:
    """What replaying the decoder layers needs for one batch shape."""

    hidden: Tensor  # (B, L, D) input of layer 0
    calls: list[tuple[tuple, dict]]  # per layer: positional and keyword arguments after hidden


@torch.no_grad()
def capture(model: nn.Module, adapter: Adapter, ids: Tensor) -> LayerInputs:
    """Hidden state entering layer 0 for ``ids`` (B, L) and every layer's call arguments.
    Costs the embedding and one pass through identity layers (no layer compute)."""
    layers = adapter.layers(model)
    originals = list(layers)
    recorders = [_Recorder(layer, stop=False) for layer in originals]
    try:
        for i, r in enumerate(recorders):
            layers[i] = r
        model(input_ids=ids.to(_device_of(model)), use_cache=False)
    finally:
        for i, layer in enumerate(originals):
            layers[i] = layer
    calls = [(r.args, {k: v for k, v in r.kwargs.items() if k not in ("past_key_values", "past_key_value")})
             for r in recorders]
    return LayerInputs(recorders[0].hidden, calls)


def run_layer(layer: nn.Module, hidden: Tensor, call: tuple[tuple, dict]) -> Tensor:
    """One decoder layer on ``hidden`` (B, L, D) with recorded arguments; returns (B, L, D)."""
    args, kwargs = call
    out = layer(hidden, *args, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def run_head(model: nn.Module, adapter: Adapter, hidden: Tensor) -> Tensor:
    """Final norm and LM head on the last hidden state: logits (B, L, V)."""
    norm = adapter.final_norm(model)
    h = norm(hidden) if norm is not None else hidden
    pre = adapter.pre_head(model)
    if pre is not None:
        h = pre(h)
    logits = adapter.head(model)(h)
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device
