"""Weight quantisation: packing and quantiser primitives, and the ``QuantLinear`` module.

The primitives are small pure functions on tensors (any device; every new tensor is made
on the input's device with an explicit dtype). ``QuantLinear`` stores exactly the buffers
listed in ``compression.configs`` and dequantises its weight on the fly in ``forward``.

Conventions
-----------
* Bit packing is little-endian along the last dimension: code ``j`` occupies bits
  ``j*b .. j*b+b-1`` of a bit stream whose bit ``k`` is bit ``k % 8`` of byte ``k // 8``.
  For ``b`` in {1, 2, 4, 8} that means code ``i`` of a byte sits at shift ``i*b``; 3-bit
  codes pack 8 to 3 bytes and may straddle a byte boundary.
* Affine (RTN / GPTQ) grid, per group of ``g`` consecutive inputs of one output row::

      w ≈ (q - zero) * scale,    q in {0 .. 2^b - 1},
      scale = (max - min) / (2^b - 1),   zero = round(-min / scale)  (an integer code)

  ``scale`` and ``zero`` are stored fp16 (integers up to 255 are exact in fp16), and codes
  are computed with the fp16-rounded scale, so the dequantised weight is exactly the grid
  that was optimised. The zero point is an integer, as in GPTQ and the usual "asymmetric
  RTN": a weight of exactly 0 stays exactly 0. A float zero point (``-min / scale``) has a
  slightly lower weight error, but on SmolLM2 (weights dequantised from a GGUF grid, many of
  them shared values such as 0) its rounding errors are correlated within a group, and
  ppl16 at 4-bit g128 was 34.3 against 27.86 with the integer zero (bench/RESULTS.md).
* Binary: code 1 -> +alpha, 0 -> -alpha. Ternary: codes {0, 1, 2} -> {-alpha, 0, +alpha}.
* FP8: ``w ≈ float(qweight) * scale[row]`` with ``scale = amax(row) / 448``.
* MXFP4: code = ``sign << 3 | index`` into the E2M1 table, low nibble first; the block
  scale is ``2 ** (scale_byte - 127)``.
* VQ: visited columns ``perm[dp] .. perm[dp+d-1]`` of row ``i`` (d = 2 or 4 weights per
  vector) are ``codebook[i // R, dp // C, code[i, p]]`` (``code`` packed at ``d*b`` bits as
  above: 5 bits for 2-d vq at 2.5, 10 for 4-d), times ``codebook_scale[i // R, dp // C, 0]``
  (one fp16 scale per tile and coordinate) when the codebook is int8, times ``row_scale[i]``
  for 4-d vectors.
"""
from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from analysis.stats import LinearStats
from compression.configs import (
    BinaryConfig,
    FP8Config,
    GPTQConfig,
    MXFP4Config,
    QuantConfig,
    RTNConfig,
    TernaryConfig,
    VQConfig,
)
from compression.registry import register

FP8_MAX = 448.0  # largest finite float8_e4m3fn
MX_BLOCK = 32  # OCP MX block size
E2M1_EMAX = 2  # exponent of the largest E2M1 value (6 = 1.5 * 2^2)
E8M0_BIAS = 127
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
_FP16_TINY = 2.0**-24  # smallest positive fp16 (subnormal)
_FP16_MAX = 65504.0


# ----------------------------------------------------------------------------- bit packing
def _check_pack(bits: int, n: int) -> None:
    if not 1 <= bits <= 16:
        raise ValueError(f"bits must be in 1..16, got {bits}")
    if (n * bits) % 8:
        raise ValueError(f"{n} codes x {bits} bits do not fill whole bytes")


def code_dtype(bits: int) -> torch.dtype:
    """The integer type unpacked codes of ``bits`` come in: uint8 up to 8 bits, int32 above."""
    return torch.uint8 if bits <= 8 else torch.int32


def _pack_bitstream(codes: Tensor, bits: int) -> Tensor:
    """Generic packer for any width 1..16 (used for 3, 5 and 10 bits); same layout as the fast path."""
    *lead, n = codes.shape
    dev = codes.device
    bit_idx = torch.arange(bits, dtype=torch.int32, device=dev)  # (b,)
    planes = (codes.to(torch.int32).unsqueeze(-1) >> bit_idx) & 1  # (..., n, b)
    stream = planes.reshape(*lead, n * bits // 8, 8)  # (..., n*b/8, 8)
    byte_shift = torch.arange(8, dtype=torch.int32, device=dev)  # (8,)
    return (stream << byte_shift).sum(-1, dtype=torch.int32).to(torch.uint8)  # (..., n*b/8)


def _unpack_bitstream(packed: Tensor, bits: int, n: int) -> Tensor:
    *lead, _ = packed.shape
    dev = packed.device
    byte_shift = torch.arange(8, dtype=torch.uint8, device=dev)  # (8,)
    stream = ((packed.unsqueeze(-1) >> byte_shift) & 1).to(torch.int32)  # (..., n*b/8, 8)
    planes = stream.reshape(*lead, n, bits)  # (..., n, b)
    bit_idx = torch.arange(bits, dtype=torch.int32, device=dev)  # (b,)
    return (planes << bit_idx).sum(-1, dtype=torch.int32).to(code_dtype(bits))  # (..., n)


def _word_codes(bits: int) -> int:
    """Codes per whole-byte word: the fewest of ``bits`` that fill whole bytes (8 for 3 or 5 bits, 4 for 10)."""
    return 8 // math.gcd(8, bits)


def _unpack_words(packed: Tensor, bits: int, n: int) -> Tensor:
    """``_unpack_bitstream`` for n a multiple of ``_word_codes(bits)`` = c, without expanding every
    bit: c codes of b bits fill exactly c*b/8 bytes, read as one little-endian integer, then
    shifted out (several times faster on a CPU; on a GPU its many small ops cost more kernel
    launches than the bitstream's few). Words up to 56 bits (not 9, 11, 13 or 15 bits)."""
    *lead, _ = packed.shape
    c = _word_codes(bits)
    nbytes = c * bits // 8
    word_t = torch.int32 if c * bits <= 24 else torch.int64  # kept clear of the sign bit
    chunks = packed.reshape(*lead, n // c, nbytes).to(word_t)  # (..., n/c, c*b/8)
    word = chunks[..., 0]  # (..., n/c)
    for j in range(1, nbytes):
        word = word | (chunks[..., j] << (8 * j))
    mask = (1 << bits) - 1
    codes = [((word >> (bits * k)) & mask).to(code_dtype(bits)) for k in range(c)]  # c x (..., n/c)
    return torch.stack(codes, -1).reshape(*lead, n)  # (..., n)


def pack_bits(codes: Tensor, bits: int) -> Tensor:
    """Pack integer codes (..., n), each < 2**bits (1 to 16), into uint8 (..., n*bits/8)."""
    n = codes.shape[-1]
    _check_pack(bits, n)
    if bits > 8 or 8 % bits:
        return _pack_bitstream(codes, bits)
    codes = codes.to(torch.uint8)
    if bits == 8:
        return codes.clone()
    per = 8 // bits
    *lead, _ = codes.shape
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=codes.device)  # (per,)
    grouped = codes.reshape(*lead, n // per, per)  # (..., n/per, per)
    return (grouped << shifts).sum(-1, dtype=torch.int32).to(torch.uint8)  # (..., n/per)


def unpack_bits(packed: Tensor, bits: int, n: int) -> Tensor:
    """Inverse of ``pack_bits``: uint8 (..., n*bits/8) -> codes (..., n) of ``code_dtype(bits)``."""
    _check_pack(bits, n)
    if packed.dtype != torch.uint8:  # a signed byte would sign-extend into the wider words below
        raise ValueError(f"packed codes must be uint8, got {packed.dtype}")
    if packed.shape[-1] * 8 != n * bits:
        raise ValueError(f"packed width {packed.shape[-1]} does not hold {n} codes of {bits} bits")
    if bits == 8:
        return packed.clone()
    # On a CPU, shifts by a number run a few times faster than one broadcast shift by a tensor
    # of shifts; on a GPU the one broadcast op wins (fewer kernel launches). Same codes either way.
    on_cpu = packed.device.type == "cpu"
    if bits > 8 or 8 % bits:
        words = on_cpu and n % _word_codes(bits) == 0 and _word_codes(bits) * bits <= 56
        return _unpack_words(packed, bits, n) if words else _unpack_bitstream(packed, bits, n)
    return (_unpack_by_scalar_shifts if on_cpu else _unpack_by_broadcast_shift)(packed, bits, n)


def _unpack_by_scalar_shifts(packed: Tensor, bits: int, n: int) -> Tensor:
    """uint8 (..., n*b/8) -> codes (..., n) for b in {1, 2, 4}: one shift per code slot."""
    *lead, _ = packed.shape
    mask = (1 << bits) - 1
    vals = torch.stack([(packed >> (bits * k)) & mask for k in range(8 // bits)], -1)  # (..., n/per, per)
    return vals.reshape(*lead, n)


def _unpack_by_broadcast_shift(packed: Tensor, bits: int, n: int) -> Tensor:
    """Same codes as ``_unpack_by_scalar_shifts``, in one broadcast shift."""
    *lead, _ = packed.shape
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)  # (per,)
    vals = (packed.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)  # (..., n/per, per)
    return vals.reshape(*lead, n)


# ----------------------------------------------------------------------------- affine grid
def n_groups(n: int, group_size: int) -> int:
    """Groups along a row of ``n`` inputs; the last one is ragged when ``g`` does not divide ``n``."""
    return -(-n // group_size)


def _grouped(w: Tensor, group_size: int, pad: str = "edge") -> Tensor:
    """(m, n) -> (m, G, g) with ``G = ceil(n / g)``. A ragged last group is padded with its
    own last value (``edge``: min/max unchanged) or NaN (``nan``: for masked means)."""
    m, n = w.shape
    if group_size <= 0:
        raise ValueError(f"group size {group_size} must be positive")
    extra = n_groups(n, group_size) * group_size - n
    if extra:
        fill = w[:, -1:].expand(m, extra) if pad == "edge" else torch.full((m, extra), float("nan"), device=w.device)
        w = torch.cat([w, fill.to(w.dtype)], 1)
    return w.reshape(m, -1, group_size)  # (m, G, g)


def _ungroup(wg: Tensor, n: int) -> Tensor:
    """(m, G, g) -> (m, n), dropping the padding of a ragged last group."""
    return wg.reshape(wg.shape[0], -1)[:, :n]


def affine_params(wg: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """fp16 ``scale``, ``zero`` of the asymmetric grid of each row of ``wg`` (..., g) -> (...)."""
    qmax = (1 << bits) - 1
    wf = wg.float()
    lo = wf.amin(-1)  # (...)
    hi = wf.amax(-1)  # (...)
    rng = hi - lo
    # constant group: a grid whose end point hits the value; all-zero group: scale 1
    rng = torch.where(rng > 0, rng, torch.maximum(lo.abs(), hi.abs()))
    rng = torch.where(rng > 0, rng, torch.ones_like(rng))
    scale = (rng / qmax).to(torch.float16)
    scale = torch.where(scale > 0, scale, torch.full_like(scale, _FP16_TINY))  # fp16 underflow
    zero = torch.round(-lo / scale.float()).clamp_(0, qmax).to(torch.float16)  # integer code
    return scale, zero


def affine_round(w: Tensor, scale: Tensor, zero: Tensor, bits: int) -> Tensor:
    """Codes of ``w`` on the grid (``scale``, ``zero`` broadcast against ``w``): uint8."""
    qmax = (1 << bits) - 1
    q = torch.round(w.float() / scale.float() + zero.float())
    return q.clamp_(0, qmax).to(torch.uint8)


def affine_value(codes: Tensor, scale: Tensor, zero: Tensor) -> Tensor:
    """``(q - zero) * scale`` in float32 (broadcasting)."""
    return (codes.float() - zero.float()) * scale.float()


def quantize_rtn(w: Tensor, bits: int, group_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """Round-to-nearest on the per-group asymmetric grid.

    w (m, n) -> codes uint8 (m, n), scale fp16 (m, n/g), zero fp16 (m, n/g).
    """
    m, n = w.shape
    wg = _grouped(w.float(), group_size)  # (m, n/g, g)
    scale, zero = affine_params(wg, bits)  # (m, n/g)
    codes = affine_round(wg, scale.unsqueeze(-1), zero.unsqueeze(-1), bits)  # (m, n/g, g)
    return _ungroup(codes, n), scale, zero


def dequantize_affine(codes: Tensor, scale: Tensor, zero: Tensor, group_size: int,
                      dtype: torch.dtype = torch.float32) -> Tensor:
    """codes uint8 (m, n), scale/zero fp16 (m, n/g) -> weight (m, n) in ``dtype``."""
    m, n = codes.shape
    cg = _grouped(codes, group_size)  # (m, n/g, g)
    w = affine_value(cg, scale.unsqueeze(-1), zero.unsqueeze(-1))  # (m, n/g, g)
    return _ungroup(w, n).to(dtype)


# ----------------------------------------------------------------------------- GPTQ
def _inverse_hessian_chol(H: Tensor, damp: float) -> Tensor:
    """Upper Cholesky factor of ``(H + damp*mean(diag H) I)^-1`` (float64 in, float64 out).

    If the damped matrix is still not positive definite numerically, the damping is
    raised tenfold up to four times before giving up.
    """
    n = H.shape[0]
    eye = torch.eye(n, dtype=H.dtype, device=H.device)
    mean_diag = torch.diag(H).mean()
    for attempt in range(5):
        Hd = H + (damp * 10**attempt) * mean_diag * eye
        L, info = torch.linalg.cholesky_ex(Hd)
        if int(info) == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if int(info) == 0:
                return U
    raise ValueError("gptq: the input Hessian X Xᵀ is not positive definite even with 1000x the damping; "
                     "profile on more calibration tokens")


def gptq_quantize(w: Tensor, H: Tensor, bits: int, group_size: int, damp: float = 0.01,
                  block_size: int = 128, act_order: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """GPTQ (Frantar et al. 2022): quantise columns in order, spreading each column's error
    onto the not-yet-quantised columns through the inverse Hessian.

    w (m, n), H = X Xᵀ (n, n) -> codes uint8 (m, n), scale fp16 (m, n/g), zero fp16 (m, n/g),
    on the same grid as ``quantize_rtn``.

    Without ``act_order`` each group's scale/zero is computed when its first column is
    reached, from the already-updated weights. With ``act_order`` columns are visited by
    decreasing ``diag(H)``; groups stay the contiguous groups of the storage layout, so
    their scale/zero are fixed upfront from the weights (static groups).
    """
    m, n = w.shape
    if H.shape != (n, n):
        raise ValueError(f"gptq: Hessian of shape {tuple(H.shape)} does not match {n} inputs")
    if group_size <= 0:
        raise ValueError(f"gptq: group size {group_size} must be positive")
    dev = w.device
    W = w.detach().to(torch.float32).clone()  # (m, n)
    H = H.detach().to(device=dev, dtype=torch.float64).clone()  # (n, n)

    dead = torch.nonzero(torch.diag(H) == 0).squeeze(1)  # (d,) inputs never active
    H[dead, dead] = 1.0
    W[:, dead] = 0.0

    G = n_groups(n, group_size)
    scale = torch.empty(m, G, dtype=torch.float16, device=dev)
    zero = torch.empty(m, G, dtype=torch.float16, device=dev)
    if act_order:
        perm = torch.argsort(torch.diag(H), descending=True)  # (n,)
        scale, zero = affine_params(_grouped(W, group_size), bits)  # static groups (m, n/g)
        W = W[:, perm]
        H = H[perm][:, perm]
        group_of = (perm // group_size).tolist()  # permuted column -> storage group
    else:
        perm = None
        group_of = [j // group_size for j in range(n)]

    Hinv = _inverse_hessian_chol(H, damp).to(torch.float32)  # (n, n) upper
    del H
    Q = torch.empty(m, n, dtype=torch.uint8, device=dev)  # codes, in visiting order
    # blocks made of whole groups, so a group's columns are all up to date when it starts
    bs = group_size * max(1, block_size // group_size)
    for i1 in range(0, n, bs):
        i2 = min(i1 + bs, n)
        W1 = W[:, i1:i2].clone()  # (m, B)
        Err1 = torch.empty_like(W1)  # (m, B)
        Hinv1 = Hinv[i1:i2, i1:i2]  # (B, B)
        for i in range(i2 - i1):
            j = i1 + i
            gi = group_of[j]
            if not act_order and j % group_size == 0:
                s, z = affine_params(W1[:, i:i + group_size], bits)  # (m,)
                scale[:, gi], zero[:, gi] = s, z
            s, z = scale[:, gi], zero[:, gi]  # (m,)
            col = W1[:, i]  # (m,)
            q = affine_round(col, s, z, bits)  # (m,)
            Q[:, j] = q
            err = (col - affine_value(q, s, z)) / Hinv1[i, i]  # (m,)
            W1[:, i:].addr_(err, Hinv1[i, i:], alpha=-1.0)
            Err1[:, i] = err
        W[:, i2:].addmm_(Err1, Hinv[i1:i2, i2:], alpha=-1.0)  # lazy update of later blocks

    if perm is not None:
        codes = torch.empty_like(Q)
        codes[:, perm] = Q  # back to the input order
    else:
        codes = Q
    return codes, scale, zero


# ----------------------------------------------------------------------------- binary / ternary
def quantize_binary(w: Tensor, group_size: int) -> tuple[Tensor, Tensor]:
    """w (m, n) -> codes uint8 (m, n) in {0, 1} (1 = non-negative), alpha fp16 (m, n/g)."""
    m, n = w.shape
    wg = _grouped(w.float(), group_size, pad="nan")  # (m, n/g, g)
    alpha = wg.abs().nanmean(-1).to(torch.float16)  # (m, n/g)
    codes = _ungroup((wg >= 0).to(torch.uint8), n)
    return codes, alpha


def dequantize_binary(codes: Tensor, scale: Tensor, group_size: int,
                      dtype: torch.dtype = torch.float32) -> Tensor:
    """codes (m, n) in {0, 1}, alpha fp16 (m, n/g) -> (m, n): ``±alpha``."""
    m, n = codes.shape
    sign = _grouped(codes, group_size).float() * 2.0 - 1.0  # (m, n/g, g)
    return _ungroup(sign * scale.float().unsqueeze(-1), n).to(dtype)


def quantize_ternary(w: Tensor, group_size: int) -> tuple[Tensor, Tensor]:
    """TWN-style: ``delta = 0.7 mean|w|``, ``alpha = mean |w|`` over ``|w| > delta``.

    w (m, n) -> codes uint8 (m, n) in {0, 1, 2} (= -1, 0, +1), alpha fp16 (m, n/g).
    """
    m, n = w.shape
    wg = _grouped(w.float(), group_size, pad="nan")  # (m, n/g, g)
    a = wg.abs()
    delta = 0.7 * a.nanmean(-1, keepdim=True)  # (m, n/g, 1)
    keep = a > delta  # (m, n/g, g); NaN padding compares False
    count = keep.sum(-1)  # (m, n/g)
    alpha = torch.where(keep, a, 0.0).sum(-1) / count.clamp_min(1)  # (m, n/g); 0 when nothing is kept
    codes = _ungroup((1 + torch.sign(torch.nan_to_num(wg)) * keep).to(torch.uint8), n)
    return codes, alpha.to(torch.float16)


def dequantize_ternary(codes: Tensor, scale: Tensor, group_size: int,
                       dtype: torch.dtype = torch.float32) -> Tensor:
    """codes (m, n) in {0, 1, 2}, alpha fp16 (m, n/g) -> (m, n) in {-alpha, 0, alpha}."""
    m, n = codes.shape
    t = _grouped(codes, group_size).float() - 1.0  # (m, n/g, g)
    return _ungroup(t * scale.float().unsqueeze(-1), n).to(dtype)


# ----------------------------------------------------------------------------- fp8
def quantize_fp8(w: Tensor) -> tuple[Tensor, Tensor]:
    """w (m, n) -> values float8_e4m3fn (m, n), scale fp32 (m,) = amax(row) / 448."""
    wf = w.float()
    amax = wf.abs().amax(-1)  # (m,)
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))  # (m,)
    vals = (wf / scale.unsqueeze(-1)).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return vals, scale


def dequantize_fp8(values: Tensor, scale: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """values float8 (m, n), scale fp32 (m,) -> (m, n)."""
    return (values.float() * scale.float().unsqueeze(-1)).to(dtype)


# ----------------------------------------------------------------------------- mxfp4
def _e2m1_table(device: torch.device | str) -> Tensor:
    return torch.tensor(E2M1_VALUES, dtype=torch.float32, device=device)  # (8,)


def e2m1_round(v: Tensor) -> Tensor:
    """Nearest E2M1 code (sign << 3 | index) of float ``v``, ties to the even index,
    magnitudes beyond 6 saturating to 6. Returns uint8 of ``v``'s shape."""
    table = _e2m1_table(v.device)
    mids = (table[1:] + table[:-1]) / 2  # (7,)
    a = v.abs().clamp(max=E2M1_VALUES[-1]).contiguous()
    down = torch.bucketize(a, mids, right=False)  # a == mid -> lower index
    up = torch.bucketize(a, mids, right=True)  # a == mid -> upper index
    idx = torch.where((down != up) & (up % 2 == 0), up, down)
    sign = (v < 0).to(torch.int64)
    return ((sign << 3) | idx).to(torch.uint8)


def e2m1_value(codes: Tensor) -> Tensor:
    """E2M1 codes (uint8) -> float32 values."""
    table = _e2m1_table(codes.device)
    mag = table[(codes & 7).long()]
    return torch.where(((codes >> 3) & 1) == 1, -mag, mag)


def quantize_mxfp4(w: Tensor) -> tuple[Tensor, Tensor]:
    """OCP MXFP4: w (m, n) -> E2M1 codes uint8 (m, n) (values < 16), E8M0 scales uint8 (m, n/32).

    Each block of 32 shares ``2^e`` with ``e = floor(log2(amax)) - 2`` (clamped to the
    E8M0 range; an all-zero block gets the smallest scale).
    """
    m, n = w.shape
    wb = _grouped(w.float(), MX_BLOCK)  # (m, n/32, 32)
    amax = wb.abs().amax(-1)  # (m, n/32)
    safe = torch.where(amax > 0, amax, torch.ones_like(amax))
    e = torch.floor(torch.log2(safe)) - E2M1_EMAX
    e = torch.where(amax > 0, e, torch.full_like(e, -E8M0_BIAS)).clamp_(-E8M0_BIAS, E8M0_BIAS)  # (m, n/32)
    codes = e2m1_round(wb / torch.exp2(e).unsqueeze(-1)).reshape(m, n)
    return codes, (e + E8M0_BIAS).to(torch.uint8)


def dequantize_mxfp4(codes: Tensor, scale: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """E2M1 codes uint8 (m, n), E8M0 scales uint8 (m, n/32) -> (m, n)."""
    m, n = codes.shape
    vals = e2m1_value(_grouped(codes, MX_BLOCK))  # (m, n/32, 32)
    pow2 = torch.exp2(scale.float() - E8M0_BIAS).unsqueeze(-1)  # (m, n/32, 1)
    return (vals * pow2).reshape(m, n).to(dtype)


# ----------------------------------------------------------------------------- vector (GPTVQ-style)
def weighted_kmeans(v: Tensor, wt: Tensor, counts: list[int], k: int, iters: int,
                    gen: torch.Generator, chunk: int = 1 << 24) -> Tensor:
    """Batched weighted k-means, minimising ``sum wt * (v - c)²`` per batch entry.

    v, wt (T, N, d): vectors and per-coordinate weights (padding rows have weight 0);
    ``counts[t]``: real vectors of entry t (they come first). Initialised on ``k`` distinct
    real vectors drawn with ``gen`` (all of them, repeated, when there are fewer: then the fit
    is exact); an emptied centroid stays put. The assignment step holds at most ``chunk``
    distances at once. Returns centroids (T, k, d)."""
    t, n, d = v.shape
    starts = []
    for i, count in enumerate(counts):
        uniq = torch.unique(v[i, :count], dim=0)  # (U, d)
        order = torch.randperm(len(uniq), generator=gen).to(v.device)
        starts.append(uniq[order[torch.arange(k, device=v.device) % len(uniq)]])  # (k, d)
    c = torch.stack(starts)  # (T, k, d)
    wv = wt * v  # (T, N, d)
    lhs = torch.cat([wt, -2 * wv], -1)  # (T, N, 2d): distances up to a per-vector constant in one product
    step = max(1, chunk // (t * k))  # vectors per assignment chunk
    for _ in range(iters):
        rhs = torch.cat([c * c, c], -1).transpose(1, 2)  # (T, 2d, k)
        a = torch.cat([torch.bmm(lhs[:, s:s + step], rhs).argmin(-1) for s in range(0, n, step)], 1)  # (T, N)
        a = a[..., None].expand(t, n, d)  # (T, N, d)
        num = torch.zeros(t, k, d, dtype=v.dtype, device=v.device).scatter_add_(1, a, wv)
        den = torch.zeros(t, k, d, dtype=v.dtype, device=v.device).scatter_add_(1, a, wt)
        c = torch.where(den > 0, num / den.clamp_min(1e-30), c)
    return c


def int8_steps(x: Tensor) -> Tensor:
    """x in units of its scale -> the nearest int8 codebook step in [-127, 127] (still float)."""
    return x.round().clamp(-127, 127)


def round_codebook(c: Tensor) -> tuple[Tensor, Tensor]:
    """c (..., k, d) float -> (int8 entries (..., k, d), fp16 scale (..., 1, d)): per coordinate,
    ``scale = absmax / 127`` (in fp16) and ``q = round(c / scale)``; ``q * scale`` is what is stored."""
    scale = (c.abs().amax(-2, keepdim=True) / 127).clamp_min(_FP16_TINY).to(torch.float16)  # (..., 1, d)
    return int8_steps(c / scale.to(c.dtype)).to(torch.int8), scale  # (..., k, d), (..., 1, d)


def codebook_values(codebook: Tensor, scale: Tensor | None, dtype: torch.dtype = torch.float32) -> Tensor:
    """The centroids (..., k, d) in ``dtype``: fp16 entries as they are, int8 ones times their scale."""
    return codebook.to(dtype) if scale is None else codebook.to(dtype) * scale.to(dtype)


def weighted_row_rms(w: Tensor, col_weight: Tensor) -> Tensor:
    """w (m, n), col_weight (n,) >= 0 -> each row's RMS weighted by ``col_weight``, in fp16
    (m,), zero rows at the smallest fp16 so that dividing by it is safe."""
    ms = (w.pow(2) * col_weight).sum(1) / col_weight.sum().clamp_min(1e-30)  # (m,)
    return ms.sqrt().clamp(_FP16_TINY, _FP16_MAX).to(torch.float16)


def vq_quantize(w: Tensor, H: Tensor, bits: float, tile_cols: int, tile_rows: int, damp: float = 0.01,
                iters: int = 25, seed: int = 0, codebook_bits: int = 8, dim: int = 2,
                row_scale: bool = False) -> tuple[Tensor, Tensor, Tensor | None, Tensor, Tensor | None]:
    """GPTVQ with ``dim``-dimensional vectors (the layout of ``VQConfig``).

    w (m, n), H = X Xᵀ (n, n) -> codes (m, n/dim) (``code_dtype``: uint8 up to 8-bit codes),
    codebook (Tr, Tc, k, dim) with k = 2^(dim * bits), its scale (Tr, Tc, 1, dim) fp16 or
    None, perm int32 (n,), and the row scales (m,) fp16 or None. Columns are visited by
    decreasing ``diag(H)`` and grouped into vectors in that order; tiles are ``tile_rows``
    rows x ``tile_cols`` visited columns. With ``row_scale`` each row is first divided by
    its RMS (weighted by GPTQ's error scale ``1 / [H⁻¹]_jj``, stored fp16), so that rows of
    different sizes share a codebook. When a tile's columns are reached, its codebook is
    fitted by k-means on the (scaled) weights as updated so far (each coordinate weighted by
    the error scale, times the row scale squared) and rounded to its storage (int8 with the
    scale, ``round_codebook``, at ``codebook_bits`` 8; fp16 at 16); each vector then takes the
    stored centroid that adds the least loss, ``||(w - s c) U⁻¹||²`` with ``U`` the vector's
    block of the upper Cholesky factor of ``H⁻¹``, and its error is spread onto the later
    columns through ``H⁻¹`` as GPTQ does."""
    m, n = w.shape
    if H.shape != (n, n):
        raise ValueError(f"vq: Hessian of shape {tuple(H.shape)} does not match {n} inputs")
    if dim not in (2, 4) or n % dim or tile_cols % dim or tile_cols <= 0:
        raise ValueError(f"vq: input width {n} and tile width {tile_cols} must be multiples of the vector "
                         f"length {dim} (2 or 4)")
    dev = w.device
    k = round(2 ** (dim * bits))
    if not 2 <= k <= 1024:
        raise ValueError(f"vq: {bits} bits per weight gives {k} centroids per {dim}-vector; at most 1,024")
    if codebook_bits not in (8, 16):
        raise ValueError(f"vq: codebook_bits {codebook_bits} must be 8 or 16")
    rows, cols = max(1, min(tile_rows, m)), tile_cols
    n_tr, n_tc = -(-m // rows), -(-n // cols)
    H = H.detach().to(device=dev, dtype=torch.float64).clone()  # (n, n)
    W = w.detach().to(torch.float32).clone()  # (m, n)
    dead = torch.nonzero(torch.diag(H) == 0).squeeze(1)  # (d,) inputs never active
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    perm = torch.argsort(torch.diag(H), descending=True)  # (n,)
    W, H = W[:, perm], H[perm][:, perm]
    U = _inverse_hessian_chol(H, damp).to(torch.float32)  # (n, n) upper
    del H
    err_scale = 1 / torch.diag(U) ** 2  # (n,) GPTQ's weight of each column's error
    s16 = weighted_row_rms(W, err_scale) if row_scale else None  # (m,) fp16
    s = (s16.to(torch.float32) if row_scale else torch.ones(m, device=dev))[:, None]  # (m, 1)
    gen = torch.Generator().manual_seed(seed)
    tile_of_row = torch.arange(m, device=dev) // rows  # (m,)
    row_ids = torch.arange(m, device=dev)
    codes = torch.empty(m, n // dim, dtype=code_dtype(round(dim * bits)), device=dev)
    book = torch.empty(n_tr, n_tc, k, dim, dtype=torch.int8 if codebook_bits == 8 else torch.float16, device=dev)
    book_scale = torch.empty(n_tr, n_tc, 1, dim, dtype=torch.float16, device=dev) if codebook_bits == 8 else None
    pad = n_tr * rows - m
    for tc in range(n_tc):
        c0, c1 = tc * cols, min(n, (tc + 1) * cols)
        vecs = (c1 - c0) // dim
        blk = F.pad(W[:, c0:c1] / s, (0, 0, 0, pad)).reshape(n_tr, rows * vecs, dim)  # (Tr, R * vecs, dim)
        wt = err_scale[c0:c1].reshape(1, vecs, dim) * F.pad(s * s, (0, 0, 0, pad))[:, :, None]  # (Tr R, vecs, dim)
        wt[m:] = 0.0  # padding rows of the last tile
        counts = [min(rows, m - r0) * vecs for r0 in range(0, m, rows)]
        cb = weighted_kmeans(blk, wt.reshape(n_tr, rows * vecs, dim), counts, k, iters, gen)  # (Tr, k, dim)
        if book_scale is None:
            book[:, tc] = cb.to(torch.float16)
        else:
            book[:, tc], book_scale[:, tc] = round_codebook(cb)
        tile_scale = None if book_scale is None else book_scale[:, tc]  # (Tr, 1, dim)
        values = codebook_values(book[:, tc], tile_scale)  # (Tr, k, dim) as stored
        cb_rows = values[tile_of_row] if n_tr > 1 else None  # (m, k, dim): each row's codebook, once per tile
        for j in range(c0, c1, dim):
            u_inv = torch.linalg.inv(U[j:j + dim, j:j + dim])  # (dim, dim) upper
            x = W[:, j:j + dim] / s @ u_inv  # (m, dim) whitened
            if n_tr == 1:  # one codebook for every row: distances as one product
                cw = values[0] @ u_inv  # (k, dim)
                a = ((cw * cw).sum(-1) - 2 * x @ cw.T).argmin(-1)  # (m,)
                q = values[0][a] * s  # (m, dim)
            else:
                a = ((cb_rows @ u_inv - x[:, None, :]) ** 2).sum(-1).argmin(-1)  # (m,)
                q = cb_rows[row_ids, a] * s  # (m, dim)
            codes[:, j // dim] = a.to(codes.dtype)
            err = (W[:, j:j + dim] - q) @ u_inv  # (m, dim)
            W[:, j + dim:] -= err @ U[j:j + dim, j + dim:]
    return codes, book, book_scale, perm.to(torch.int32), s16


def dequantize_vq(codes: Tensor, codebook: Tensor, perm: Tensor, tile_rows: int, tile_cols: int,
                  dtype: torch.dtype = torch.float32, scale: Tensor | None = None,
                  row_scale: Tensor | None = None) -> Tensor:
    """codes (m, n/d) integer, codebook (Tr, Tc, k, d) (int8 with ``scale`` (Tr, Tc, 1, d), or
    float), perm (n,), row_scale (m,) or None -> weight (m, n) in ``dtype``."""
    m, n_vec = codes.shape
    n_tr, n_tc, k, d = codebook.shape
    dev = codes.device
    tile = ((torch.arange(m, device=dev) // tile_rows)[:, None] * n_tc
            + (d * torch.arange(n_vec, device=dev) // tile_cols)[None, :])  # (m, n/d)
    values = codebook_values(codebook, scale, dtype).reshape(n_tr * n_tc * k, d)
    visited = values[tile * k + codes.long()].reshape(m, d * n_vec)
    if row_scale is not None:
        visited = visited * row_scale.to(dtype)[:, None]
    return visited[:, torch.argsort(perm.long())]  # back to the input order


# ----------------------------------------------------------------------------- module
_AFFINE = (RTNConfig, GPTQConfig)
_SUPPORTED = (*_AFFINE, BinaryConfig, TernaryConfig, FP8Config, MXFP4Config, VQConfig)


def _perm_dtype(config: VQConfig, n: int) -> torch.dtype:
    """The integer type of a vq column order over ``n`` inputs (``VQConfig.perm_bytes`` wide)."""
    return torch.int16 if config.perm_bytes(n) == 2 else torch.int32


def _layout(config: QuantConfig, m: int, n: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Buffers (name -> shape, dtype) that ``config`` stores for an (m, n) weight."""
    u8, f16 = torch.uint8, torch.float16
    if isinstance(config, _AFFINE):
        g = config.group_size
        return {"qweight": ((m, n * config.bits // 8), u8), "scale": ((m, n_groups(n, g)), f16),
                "zero": ((m, n_groups(n, g)), f16)}
    if isinstance(config, (BinaryConfig, TernaryConfig)):
        return {"qweight": ((m, n * config.bits // 8), u8), "scale": ((m, n_groups(n, config.group_size)), f16)}
    if isinstance(config, FP8Config):
        return {"qweight": ((m, n), torch.float8_e4m3fn), "scale": ((m,), torch.float32)}
    if isinstance(config, MXFP4Config):
        return {"qweight": ((m, n // 2), u8), "scale": ((m, n // MX_BLOCK), u8)}
    if isinstance(config, VQConfig):
        tr, tc = config.tiles(m, n)
        k, d = config.centroids, config.vector
        if config.codebook_bits == 16:
            book = {"codebook": ((tr, tc, k, d), f16)}
        else:
            book = {"codebook": ((tr, tc, k, d), torch.int8), "codebook_scale": ((tr, tc, 1, d), f16)}
        rows = {"row_scale": ((m,), f16)} if config.row_scaled else {}
        return {"qweight": ((m, config.code_bytes(1, n)), u8), **book, "perm": ((n,), _perm_dtype(config, n)), **rows}
    raise TypeError(f"QuantLinear does not support {type(config).__name__}")


def _encode(config: QuantConfig, w: Tensor, stats: LinearStats | None) -> dict[str, Tensor]:
    """Quantise weight ``w`` (m, n) into the buffers of ``_layout``."""
    if isinstance(config, GPTQConfig):
        if stats is None:
            raise ValueError("gptq needs calibration statistics (X Xᵀ of the layer input); "
                             "profile the model first and pass its LinearStats")
        codes, scale, zero = gptq_quantize(w, stats.inputs.xxt, config.bits, config.group_size,
                                           damp=config.damp, block_size=config.block_size,
                                           act_order=config.act_order)
        return {"qweight": pack_bits(codes, config.bits), "scale": scale, "zero": zero}
    if isinstance(config, VQConfig):
        if stats is None:
            raise ValueError("vq needs calibration statistics (X Xᵀ of the layer input); "
                             "profile the model first and pass its LinearStats")
        m, n = w.shape
        codes, book, book_scale, perm, row_scale = vq_quantize(
            w, stats.inputs.xxt, config.bits, config.cols(n), config.rows(m), damp=config.damp, iters=config.iters,
            seed=config.seed, codebook_bits=config.codebook_bits, dim=config.vector, row_scale=config.row_scaled)
        perm = perm.to(_perm_dtype(config, n))
        scale = {} if book_scale is None else {"codebook_scale": book_scale}
        rows = {} if row_scale is None else {"row_scale": row_scale}
        return {"qweight": pack_bits(codes, config.code_bits), "codebook": book, **scale, "perm": perm, **rows}
    if isinstance(config, RTNConfig):
        codes, scale, zero = quantize_rtn(w, config.bits, config.group_size)
        return {"qweight": pack_bits(codes, config.bits), "scale": scale, "zero": zero}
    if isinstance(config, BinaryConfig):
        codes, scale = quantize_binary(w, config.group_size)
        return {"qweight": pack_bits(codes, 1), "scale": scale}
    if isinstance(config, TernaryConfig):
        codes, scale = quantize_ternary(w, config.group_size)
        return {"qweight": pack_bits(codes, 2), "scale": scale}
    if isinstance(config, FP8Config):
        vals, scale = quantize_fp8(w)
        return {"qweight": vals, "scale": scale}
    if isinstance(config, MXFP4Config):
        codes, scale = quantize_mxfp4(w)
        return {"qweight": pack_bits(codes, 4), "scale": scale}
    raise TypeError(f"QuantLinear does not support {type(config).__name__}")


class QuantLinear(nn.Module):
    """A linear layer whose weight is stored quantised (buffers as in ``compression.configs``)
    and dequantised on the fly in ``forward``. ``bias`` stays in the model dtype."""

    qweight: Tensor
    scale: Tensor
    zero: Tensor | None
    # Read by ``analysis.metrics.latency``: timings of a model holding these measure PyTorch's
    # unpack + dequantise + dense matmul on every call, not a fused low-bit kernel.
    dequantizes_per_call: ClassVar[bool] = True

    def __init__(self, config: QuantConfig, out_features: int, in_features: int, bias: bool = False,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> None:
        super().__init__()
        config.check(in_features)
        self.config = config
        self.in_features = in_features
        self.out_features = out_features
        layout = _layout(config, out_features, in_features)
        for name, (shape, buf_dtype) in layout.items():
            self.register_buffer(name, torch.zeros(shape, dtype=buf_dtype, device=device))
        if "zero" not in layout:
            self.register_buffer("zero", None)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None

    @classmethod
    def empty(cls, config: QuantConfig, out_features: int, in_features: int, bias: bool,
              dtype: torch.dtype, device: torch.device | str | None = None) -> QuantLinear:
        """An unfilled module of the right layout, to ``load_state_dict`` a saved one into."""
        return cls(config, out_features, in_features, bias=bias, dtype=dtype, device=device)

    @classmethod
    def from_linear(cls, linear: nn.Linear, config: QuantConfig,
                    stats: LinearStats | None = None) -> QuantLinear:
        """Quantise ``linear`` with ``config`` (GPTQ needs ``stats``). Stays on its device."""
        if not isinstance(config, _SUPPORTED):
            raise TypeError(f"QuantLinear does not support {type(config).__name__}")
        m, n = linear.out_features, linear.in_features
        config.check(n)
        w = linear.weight.detach()
        has_bias = linear.bias is not None
        mod = cls(config, m, n, bias=has_bias, dtype=w.dtype, device=w.device)
        with torch.no_grad():
            for name, t in _encode(config, w, stats).items():
                buf = getattr(mod, name)
                if t.shape != buf.shape or t.dtype != buf.dtype:
                    raise AssertionError(f"{name}: got {tuple(t.shape)} {t.dtype}, "
                                         f"layout says {tuple(buf.shape)} {buf.dtype}")
                setattr(mod, name, t.contiguous())
            if has_bias:
                mod.bias.copy_(linear.bias.detach())
                mod.bias.requires_grad_(linear.bias.requires_grad)
        return mod

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The weight (out_features, in_features) in ``dtype``."""
        c, n = self.config, self.in_features
        if isinstance(c, _AFFINE):
            codes = unpack_bits(self.qweight, c.bits, n)
            return dequantize_affine(codes, self.scale, self.zero, c.group_size, dtype)
        if isinstance(c, BinaryConfig):
            return dequantize_binary(unpack_bits(self.qweight, 1, n), self.scale, c.group_size, dtype)
        if isinstance(c, TernaryConfig):
            return dequantize_ternary(unpack_bits(self.qweight, 2, n), self.scale, c.group_size, dtype)
        if isinstance(c, FP8Config):
            return dequantize_fp8(self.qweight, self.scale, dtype)
        if isinstance(c, MXFP4Config):
            return dequantize_mxfp4(unpack_bits(self.qweight, 4, n), self.scale, dtype)
        if isinstance(c, VQConfig):
            codes = unpack_bits(self.qweight, c.code_bits, n // c.vector)
            return dequantize_vq(codes, self.codebook, self.perm, c.rows(self.out_features), c.cols(n), dtype,
                                 getattr(self, "codebook_scale", None), getattr(self, "row_scale", None))
        raise TypeError(f"QuantLinear does not support {type(c).__name__}")

    def forward(self, x: Tensor) -> Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantized_weight(x.dtype), bias)

    def quantized_nbytes(self) -> int:
        """Bytes of the stored weight (parameters and buffers, bias excluded)."""
        tensors = [p for name, p in self.named_parameters() if name != "bias"] + list(self.buffers())
        return sum(t.numel() * t.element_size() for t in tensors)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, config={self.config}")


# ----------------------------------------------------------------------------- registry
@register(RTNConfig)
def _rtn(linear: nn.Linear, config: RTNConfig, stats: LinearStats | None) -> nn.Module:
    return QuantLinear.from_linear(linear, config, stats)


@register(GPTQConfig)
def _gptq(linear: nn.Linear, config: GPTQConfig, stats: LinearStats | None) -> nn.Module:
    return QuantLinear.from_linear(linear, config, stats)


@register(VQConfig)
def _vq(linear: nn.Linear, config: VQConfig, stats: LinearStats | None) -> nn.Module:
    return QuantLinear.from_linear(linear, config, stats)


@register(BinaryConfig)
def _binary(linear: nn.Linear, config: BinaryConfig, stats: LinearStats | None) -> nn.Module:
    return QuantLinear.from_linear(linear, config, stats)


@register(TernaryConfig)
def _ternary(linear: nn.Linear, config: TernaryConfig, stats: LinearStats | None) -> nn.Module:
    return QuantLinear.from_linear(linear, config, stats)


@register(FP8Config)
def _fp8(linear: nn.Linear, config: FP8Config, stats: LinearStats | None) -> nn.Module:
    return QuantLinear.from_linear(linear, config, stats)


@register(MXFP4Config)
def _mxfp4(linear: nn.Linear, config: MXFP4Config, stats: LinearStats | None) -> nn.Module:
    return QuantLinear.from_linear(linear, config, stats)
