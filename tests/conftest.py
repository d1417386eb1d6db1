"""Shared fixtures: tiny random causal LMs of every supported family, built from configs
(CPU, seconds), and a tiny tokenizer-free corpus of token ids."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))

FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma3_text", "gpt2", "opt", "phi3"]


def tiny_config(model_type: str, layers: int = 2, hidden: int = 64, vocab: int = 128):
    from transformers import AutoConfig

    common = dict(vocab_size=vocab, tie_word_embeddings=False)
    heads, kv, inter = 4, 2, 128
    if model_type in ("llama", "mistral", "qwen2", "qwen3", "gemma3_text", "phi3"):
        kw = dict(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
                  num_key_value_heads=kv, max_position_embeddings=256, head_dim=hidden // heads, **common)
        if model_type == "phi3":
            kw.pop("head_dim")
            kw.update(pad_token_id=0, bos_token_id=1, eos_token_id=2)
        if model_type == "gemma3_text":
            kw.update(sliding_window=32, query_pre_attn_scalar=hidden // heads)
        if model_type == "qwen2":
            kw.pop("head_dim")
        return AutoConfig.for_model(model_type, **kw)
    if model_type == "gpt2":
        return AutoConfig.for_model("gpt2", n_embd=hidden, n_layer=layers, n_head=heads, n_positions=256,
                                    n_inner=inter, **common)
    if model_type == "opt":
        return AutoConfig.for_model("opt", hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                                    ffn_dim=inter, max_position_embeddings=256, word_embed_proj_dim=hidden,
                                    pad_token_id=1, **common)
    raise ValueError(model_type)


def tiny_model(model_type: str = "llama", seed: int = 0, dtype=torch.float32, **kw):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, **kw), dtype=dtype)
    return model.eval()


def refuse_creation_in(monkeypatch, locked: set[str]) -> None:
    """Make ``tempfile.mkdtemp`` fail in the folders named in ``locked``, as it does in /proc or
    on a read-only mount (tests run as root pass permission bits, so chmod cannot lock a folder)."""
    import tempfile

    real = tempfile.mkdtemp

    def mkdtemp(suffix=None, prefix=None, dir=None):
        if str(dir) in locked:
            raise PermissionError(13, "Permission denied", str(dir))
        return real(suffix, prefix, dir)

    monkeypatch.setattr(tempfile, "mkdtemp", mkdtemp)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matrices: one thread avoids OpenMP barrier stalls on a busy 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture
def tiny_llama():
    from analysis.loading import wrap_model

    return wrap_model(tiny_model("llama"))


@pytest.fixture
def token_ids() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 128, (4, 32), generator=g)


def tiny_folder(folder: Path) -> tuple[Path, Path]:
    """A tiny llama saved with a real character-level tokenizer (loadable by spec, like any
    model folder), and a text file to calibrate and evaluate on."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {chr(i): i - 32 for i in range(32, 127)}
    vocab["\n"], vocab["[UNK]"] = 95, 96
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]")
    tiny_model("llama").save_pretrained(folder)
    tok.save_pretrained(folder)
    text = folder / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog.\n" * 200)
    return folder, text


class CharTokenizer:
    """A tokenizer stand-in for tiny models: one id per character (mod vocab)."""

    def __init__(self, vocab: int = 128):
        self.vocab = vocab
        self.pad_token_id = 0
        self.eos_token_id = 1
        self.chat_template = None

    def __call__(self, text, add_special_tokens=False, return_attention_mask=False, return_tensors=None):
        ids = [ord(c) % self.vocab for c in text]
        if return_tensors == "pt":
            return {"input_ids": torch.tensor([ids])}
        return {"input_ids": ids}

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(int(i) + 32) for i in ids)

    def save_pretrained(self, folder):
        return None


@pytest.fixture
def tiny_lab(tmp_path, monkeypatch):
    """A Lab on a tiny llama with the default corpus, caches under tmp_path."""
    from analysis.loading import wrap_model
    from compression.lab import Lab, LabSettings

    monkeypatch.setenv("RANKLAB_CACHE", str(tmp_path / "cache"))
    lab = Lab(tmp_path / "ws", LabSettings(seqlen=32, calib_windows=8, eval_windows=2, latency_seqlen=16,
                                           decode_tokens=2, latency_runs=1))
    lab.lm = wrap_model(tiny_model("llama"), CharTokenizer(), spec="tiny")
    lab.set_texts("default", "default")
    return lab
