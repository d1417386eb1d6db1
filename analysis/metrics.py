"""Perplexity, memory and latency, each returned with the protocol that produced it."""
from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Progress = Callable[[float, str], None]


@dataclass(frozen=True)
class Protocol:
    data: str
    seqlen: int
    windows: int
    device: str
    dtype: str

    def __str__(self) -> str:
        return f"{self.data}; seqlen {self.seqlen}; {self.windows} windows; {self.device}; {self.dtype}"


@dataclass(frozen=True)
class Perplexity:
    ppl: float
    nll: float  # mean token NLL (nats)
    tokens: int  # predicted tokens
    protocol: Protocol


@dataclass(frozen=True)
class Memory:
    weight_bytes: int  # bytes held by parameters and buffers (shared storage counted once)
    param_bytes: int
    buffer_bytes: int
    peak_allocated: int | None  # CUDA peak during the measured work, None on CPU
    device: str


@dataclass(frozen=True)
class Latency:
    prefill_tok_s: float  # batch 1 x seqlen, median of runs
    decode_ms_per_token: float  # greedy decode with KV cache, median per-token time
    seqlen: int
    decode_tokens: int
    runs: int
    device: str
    dtype: str
    note: str = ""  # what the timings measure when that is not what a deployed model would run
    prefill_range: tuple[float, float] = (math.nan, math.nan)  # slowest and fastest run (tokens/s)
    decode_range: tuple[float, float] = (math.nan, math.nan)  # fastest and slowest run (ms/token)

    @property
    def spread(self) -> float:
        """Slowest over fastest decode run: near 1 on a quiet machine, large when it is busy."""
        return decode_spread(self.decode_range)

    def unsteady_note(self) -> str:
        """``unsteady_note(self.decode_range)``."""
        return unsteady_note(self.decode_range)


UNSTEADY_SPREAD = 1.5  # slowest / fastest decode run above which timings are flagged as unsteady


def decode_spread(decode_range) -> float:
    """Slowest over fastest of a ``(fastest, slowest)`` ms/token pair; NaN when unknown."""
    lo, hi = decode_range if decode_range else (math.nan, math.nan)
    return hi / lo if lo and hi and lo > 0 else math.nan


def unsteady_note(decode_range) -> str:
    """A warning when the decode runs of one measurement disagree by more than
    ``UNSTEADY_SPREAD`` (a busy machine); "" when they agree or are unknown."""
    spread = decode_spread(decode_range)
    if not spread > UNSTEADY_SPREAD:
        return ""
    return (f"the decode runs differed {spread:.1f}x: the machine was busy, so this timing is unsteady; measure "
            "again when it is idle before comparing latencies")


def dequantize_note(model: nn.Module) -> str:
    """Empty for a model of plain modules; otherwise says that its timings include unpacking
    and dequantising weights on every call. Counts modules flagged ``dequantizes_per_call``:
    weight matrices, so a low-rank linear with quantised factors counts two."""
    n = sum(bool(getattr(m, "dequantizes_per_call", False)) for m in model.modules())
    if not n:
        return ""
    return (f"{n} quantised weight matri{'ces are' if n > 1 else 'x is'} unpacked and dequantised on every call "
            "(PyTorch reference path, no fused low-bit kernel), so these timings can be slower than "
            "dense although the weights take fewer bytes")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def model_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    for p in model.parameters():
        if p.dtype.is_floating_point:
            return p.device, p.dtype
    p = next(model.parameters())
    return p.device, p.dtype


@torch.no_grad()
def window_nll(model: nn.Module, ids: Tensor) -> tuple[float, int]:
    """Summed next-token NLL over a batch of windows ``ids`` (B, L) and the token count."""
    logits = model(input_ids=ids, use_cache=False).logits  # (B, L, V)
    nll = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="sum")
    return nll.item(), ids.shape[0] * (ids.shape[1] - 1)


@torch.no_grad()
def perplexity(model: nn.Module, ids: Tensor, data_label: str, progress: Progress | None = None,
               should_stop: Callable[[], bool] | None = None) -> Perplexity:
    """exp(mean token NLL) over non-overlapping windows ``ids`` (W, seqlen), one window at a time."""
    device, dtype = model_device_dtype(model)
    total, count = 0.0, 0
    for i in range(ids.shape[0]):
        if should_stop is not None and should_stop():
            raise InterruptedError("perplexity evaluation cancelled")
        s, c = window_nll(model, ids[i: i + 1].to(device))
        total, count = total + s, count + c
        if progress:
            progress((i + 1) / ids.shape[0], f"perplexity window {i + 1}/{ids.shape[0]}")
    nll = total / count
    proto = Protocol(data_label, ids.shape[1], ids.shape[0], str(device), str(dtype).replace("torch.", ""))
    return Perplexity(float(torch.tensor(nll).exp()), nll, count, proto)


def reset_cuda_peak(device: torch.device | str) -> None:
    """Start a new CUDA peak-memory window (``Memory.peak_allocated`` reads the peak since);
    nothing to do on other devices."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def model_bytes(model: nn.Module) -> Memory:
    """Bytes actually held by the model's parameters and buffers; shared storage counted once.
    ``peak_allocated`` is the CUDA peak since the last ``reset_cuda_peak`` (call it before the
    work to measure; the CUDA counter otherwise runs from the process start)."""
    seen: set[tuple[int, int]] = set()
    params = buffers = 0
    for kind, tensors in (("p", model.parameters()), ("b", model.buffers())):
        for t in tensors:
            key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()) if t.numel() else (id(t), 0)
            if key in seen:
                continue
            seen.add(key)
            if kind == "p":
                params += t.numel() * t.element_size()
            else:
                buffers += t.numel() * t.element_size()
    device, _ = model_device_dtype(model)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return Memory(params + buffers, params, buffers, peak, str(device))


@torch.no_grad()
def latency(model: nn.Module, seqlen: int = 2048, decode_tokens: int = 32, runs: int = 3, warmup: int = 1,
            prompt_tokens: int = 64, vocab_size: int | None = None, seed: int = 0) -> Latency:
    """Prefill tokens/s at batch 1 x seqlen and decode ms/token (greedy, KV cache), each the
    median of ``runs`` after ``warmup``, with the device synchronised around every timing."""
    device, dtype = model_device_dtype(model)
    vocab = vocab_size or model.config.vocab_size
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (1, seqlen), generator=g).to(device)
    prefill = []
    for r in range(warmup + runs):
        _sync(device)
        t = time.perf_counter()
        model(input_ids=ids, use_cache=False)
        _sync(device)
        if r >= warmup:
            prefill.append(seqlen / (time.perf_counter() - t))
    decode = []
    prompt = ids[:, :prompt_tokens]
    for r in range(warmup + runs):
        out = model(input_ids=prompt, use_cache=True)
        past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
        _sync(device)
        t = time.perf_counter()
        for _ in range(decode_tokens):
            out = model(input_ids=nxt, past_key_values=past, use_cache=True)
            past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
        _sync(device)
        if r >= warmup:
            decode.append((time.perf_counter() - t) * 1000 / decode_tokens)
    return Latency(statistics.median(prefill), statistics.median(decode), seqlen, decode_tokens, runs,
                   str(device), str(dtype).replace("torch.", ""), dequantize_note(model),
                   prefill_range=(min(prefill), max(prefill)), decode_range=(min(decode), max(decode)))


def as_dict(obj) -> dict:
    return asdict(obj)


def linear_weight_bytes(model: nn.Module, linears) -> int:
    """Bytes held by the weights of the given linears (factors, packed codes, scales and
    zeros; biases excluded): the numerator of bits per decoder-linear weight."""
    mods = dict(model.named_modules())
    return sum(t.numel() * t.element_size() for li in linears
               for n, t in [*mods[li.name].named_parameters(), *mods[li.name].named_buffers()]
               if not n.endswith("bias"))


def linear_biases(model: nn.Module, linears) -> dict[str, bool]:
    """Which of the given linears hold a bias (size accounting needs it)."""
    mods = dict(model.named_modules())
    return {li.name: getattr(mods[li.name], "bias", None) is not None for li in linears}
