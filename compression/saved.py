"""Save a compressed model to a folder and load it back.

The folder holds ``model.safetensors`` (every parameter and buffer, packed codes as they
are), ``ranklab.json`` (the base config, the plan, and a manifest of the replaced modules
with what is needed to rebuild them empty), and the tokenizer. ``load_compressed`` builds
the base architecture from its config, swaps in empty replacement modules, and loads the
tensors strictly, so the reloaded model gives the same logits.
"""
from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_model as st_load_model
from safetensors.torch import save_model as st_save_model
from torch import nn

from analysis.atomic import atomic_folder
from analysis.loading import COMPRESSED_MARKER, LoadedModel, model_fingerprint
from compression import configs as C
from compression.lowrank import LowRankLinear
from compression.quant import QuantLinear

SAVE_FORMAT = 1
_CONFIG_TYPES = {cls.__name__: cls for cls in (C.RTNConfig, C.GPTQConfig, C.BinaryConfig, C.TernaryConfig,
                                                C.FP8Config, C.MXFP4Config, C.VQConfig)}


def _describe(mod: nn.Module) -> dict | None:
    """Manifest entry of a RankLab replacement module (None for a plain module)."""
    if isinstance(mod, QuantLinear):
        return {"kind": "quant", "config_type": type(mod.config).__name__, "config": dataclasses.asdict(mod.config),
                "out": mod.out_features, "in": mod.in_features, "bias": mod.bias is not None}
    if isinstance(mod, LowRankLinear):
        return {"kind": "lowrank", "out": mod.out_features, "in": mod.in_features, "rank": mod.rank,
                "bias": mod.bias is not None, "A": _describe(mod.A), "B": _describe(mod.B)}
    return None


def _build(entry: dict, dtype: torch.dtype, device: torch.device) -> nn.Module:
    if entry["kind"] == "quant":
        cls = _CONFIG_TYPES[entry["config_type"]]
        cfg = cls(**{**cls.legacy_options, **entry["config"]})  # a field the manifest lacks: as saved then
        return QuantLinear.empty(cfg, entry["out"], entry["in"], entry["bias"], dtype, device)
    if entry["kind"] == "lowrank":
        mod = LowRankLinear.empty(entry["out"], entry["in"], entry["rank"], entry["bias"], dtype, device)
        if entry.get("A"):
            mod.A = _build(entry["A"], dtype, device)
        if entry.get("B"):
            mod.B = _build(entry["B"], dtype, device)
        return mod
    raise ValueError(f"unknown module kind {entry['kind']!r} in the manifest")


def manifest(model: nn.Module) -> dict[str, dict]:
    out = {}
    for name, mod in model.named_modules():
        d = _describe(mod)
        if d is not None and not any(name.startswith(p + ".") for p in out):
            out[name] = d
    return out


def save_compressed(model: nn.Module, folder: str | Path, *, plan_json: str, tokenizer=None, meta: dict | None = None,
                    extra_modules: dict[str, dict] | None = None) -> Path:
    """Write the compressed model atomically (temp folder renamed into place). A sliced model's
    reshaped modules are described in ``extra_modules`` (found from the model when not given)."""
    folder = Path(folder).expanduser()
    if extra_modules is None:
        extra_modules = _sliced_modules(model)
    with atomic_folder(folder, (COMPRESSED_MARKER,), "a compressed model") as tmp:
        st_save_model(model, str(tmp / "model.safetensors"))
        dtype = next(p for p in model.parameters() if p.dtype.is_floating_point).dtype
        info = {"format": SAVE_FORMAT, "config": model.config.to_dict(), "dtype": str(dtype).replace("torch.", ""),
                "plan": json.loads(plan_json), "modules": manifest(model), "extra": extra_modules or {},
                "meta": meta or {}}
        (tmp / COMPRESSED_MARKER).write_text(json.dumps(info, indent=1, default=str))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return folder


def _sliced_modules(model: nn.Module) -> dict[str, dict] | None:
    """SliceGPT's rebuild entries for a sliced model (its embeddings and layers changed shape),
    None for any other: without them the folder could not be loaded back."""
    from analysis.adapters import adapter_for
    from compression.slicegpt import SlicedDecoderLayer, slice_manifest

    adapter = adapter_for(model)
    layers = adapter.layers(model)
    return slice_manifest(model, adapter) if len(layers) and isinstance(layers[0], SlicedDecoderLayer) else None


def load_compressed(folder: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
                    progress: Callable[[str], None] | None = None) -> LoadedModel:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from analysis.adapters import adapter_for, set_submodule

    folder = Path(folder).expanduser()
    damaged = "the folder is damaged or incomplete (an interrupted copy?): copy it again, or compress and save anew"
    try:
        info = json.loads((folder / COMPRESSED_MARKER).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{folder / COMPRESSED_MARKER} is not valid JSON ({e}); {damaged}") from e
    if not isinstance(info, dict) or info.get("format") != SAVE_FORMAT:
        found = info.get("format") if isinstance(info, dict) else None
        raise ValueError(f"{folder}: saved format {found} is not {SAVE_FORMAT}")
    missing = [k for k in ("config", "dtype", "modules") if k not in info]
    if missing:
        raise ValueError(f"{folder / COMPRESSED_MARKER} lacks {', '.join(missing)}; {damaged}")
    saved_dtype = getattr(torch, info["dtype"])
    if dtype is not None and dtype != saved_dtype and progress:
        progress(f"note: the compressed model was saved in {info['dtype']}; loading it in that dtype")
    cfg_dict = dict(info["config"])
    model_type = cfg_dict.pop("model_type")
    config = AutoConfig.for_model(model_type, **cfg_dict)
    device = torch.device(device)
    model = AutoModelForCausalLM.from_config(config, dtype=saved_dtype)
    adapter = adapter_for(model)
    model = adapter.prepare(model)
    for name, entry in info.get("extra", {}).items():
        from compression.slicegpt import rebuild_module  # only SliceGPT writes extra entries

        set_submodule(model, name, rebuild_module(entry, saved_dtype))
    for name, entry in info["modules"].items():
        set_submodule(model, name, _build(entry, saved_dtype, torch.device("cpu")))
    weights = folder / "model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} is missing; {damaged}")
    try:
        missing, unexpected = st_load_model(model, str(weights), strict=False)
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{weights} could not be read ({e}); {damaged}") from e
    if missing or unexpected:
        raise ValueError(f"{folder}: tensors do not match the manifest (missing {missing[:3]}, unexpected "
                         f"{unexpected[:3]})")
    model = model.to(device).eval()
    tok = AutoTokenizer.from_pretrained(str(folder)) if (folder / "tokenizer_config.json").exists() else None
    base = str((info.get("meta") or {}).get("base_model") or "")
    return LoadedModel(model, tok, adapter, model_fingerprint(model), str(folder), f"compressed folder {folder}",
                       device, saved_dtype, compressed_from=base)
