"""Tests of analysis.loading that need no model files: the model fingerprint."""
from __future__ import annotations

import pytest
import torch

from analysis.loading import load_model, model_fingerprint
from tests.conftest import tiny_model


def test_fingerprint_sees_any_single_weight_and_nothing_else():
    a, b = tiny_model("llama", seed=0), tiny_model("llama", seed=0)
    assert model_fingerprint(a) == model_fingerprint(b)  # same content, other objects
    w = dict(b.named_parameters())["model.layers.0.mlp.up_proj.weight"]
    before = w.view(-1)[1].item()
    with torch.no_grad():
        w.view(-1)[1] += 1.0  # one element that a strided sample of the tensor would skip
    assert model_fingerprint(a) != model_fingerprint(b)
    with torch.no_grad():
        w.view(-1)[1] = before
    assert model_fingerprint(a) == model_fingerprint(b)
    assert model_fingerprint(a) != model_fingerprint(a.to(torch.bfloat16))  # dtype is content too
    assert model_fingerprint(tiny_model("llama", seed=1)) != model_fingerprint(b)


def test_model_specs_that_cannot_load_say_what_to_give(tmp_path):
    for spec in ("", "   "):
        with pytest.raises(ValueError, match="no model given: type 'default'"):
            load_model(spec)
    with pytest.raises(ValueError, match="holds no config.json, so it is not a transformers model folder"):
        load_model(str(tmp_path))
    (tmp_path / "weights.txt").write_text("x")
    with pytest.raises(ValueError, match="is a file but not a .gguf"):
        load_model(str(tmp_path / "weights.txt"))
    with pytest.raises(FileNotFoundError, match="GGUF file .* not found"):
        load_model(str(tmp_path / "missing.gguf"))
    (tmp_path / "empty.gguf").write_bytes(b"")
    with pytest.raises(ValueError, match="empty.gguf is empty, so it is not a GGUF model file"):
        load_model(str(tmp_path / "empty.gguf"))
    (tmp_path / "page.gguf").write_bytes(b"<html>not found</html>")
    with pytest.raises(ValueError, match="does not start with the GGUF magic bytes"):
        load_model(str(tmp_path / "page.gguf"))
    with pytest.raises(FileNotFoundError, match="no model folder at"):
        load_model(str(tmp_path / "missing"))
