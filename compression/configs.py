"""Method configs: small frozen dataclasses, one per method, each knowing the exact bytes
its replacement module will hold. The registry (``compression.registry``) maps each config
*type* to the function that builds the module, so these classes carry no behaviour beyond
validation and size accounting.

Storage layouts (what ``nbytes`` counts, and what the modules really allocate):

=========  =====================================================================
method     buffers of the replacement for a linear of ``m`` outputs, ``n`` inputs
=========  =====================================================================
rtn/gptq   ``qweight`` uint8 (m, n*b/8) packed codes; ``scale``, ``zero`` fp16 (m, G)
binary     ``qweight`` uint8 (m, n/8) sign bits; ``scale`` fp16 (m, G)
ternary    ``qweight`` uint8 (m, n/4) 2-bit codes {0,1,2}->{-1,0,+1}; ``scale`` fp16 (m, G)
fp8        ``qweight`` float8_e4m3fn (m, n); ``scale`` fp32 (m,)
mxfp4      ``qweight`` uint8 (m, n/2) E2M1 codes; ``scale`` uint8 E8M0 (m, n/32)
vq         ``qweight`` uint8 (m, n*b/8): one d*b-bit index per vector of d weights (d = 2 or
           4; b = 2, 2.5, 3 or 4); ``codebook`` int8 (ceil(m/R), ceil(n/C), 2^(d*b), d):
           the centroids of each tile of R rows x C visited columns (2-d: C = g; 4-d:
           C = n), and ``codebook_scale`` fp16 (ceil(m/R), ceil(n/C), 1, d), one per tile
           and coordinate (``codebook_bits=16``: an fp16 ``codebook``, no scale); ``perm``
           (n,) the column visiting order, int16 (int32 for widths above 32768); 4-d only:
           ``row_scale`` fp16 (m,)
low-rank   ``A`` (k, n) and ``B`` (m, k) in the model dtype, or each a quantised module
=========  =====================================================================
``G = ceil(n / g)``: when the group size does not divide the width, the last group of each
row is ragged (narrower); validation says so. A bias, when the layer has one, stays in the
model dtype (``m`` values). Activation PCA always produces a bias (it re-centres the
output), so it counts one even when the original layer had none.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

FP16_BYTES = 2


def bit_width(b: float) -> int | float:
    """A bit width as plans and grids hold it: whole numbers as ``int`` (3, never 3.0), others
    as ``float`` (vq's 2.5)."""
    f = float(b)
    return int(f) if f.is_integer() else f


def n_groups(n: int, group_size: int) -> int:
    """Groups along a row of ``n`` inputs: ``ceil(n / g)``; the last is ragged when ``g``
    does not divide ``n`` (SmolLM2's 576-wide rows hold 4 groups of 128 and one of 64)."""
    return -(-n // group_size)


def ragged(n: int, group_size: int) -> bool:
    return group_size > 0 and n % group_size != 0


def factor_group(group_size: int, n: int) -> int:
    """Group size used along an input width ``n`` that ``group_size`` may not divide
    (the factors of a low-rank layer, whose inner width is the rank): ``gcd(g, n)``."""
    return math.gcd(group_size, n)


def factor_quants(quant: QuantConfig, n: int, k: int) -> tuple[QuantConfig, QuantConfig]:
    """Quantisers of a rank-``k`` layer's factors ``A (k x n)`` and ``B (m x k)``: groups
    shrink to ``gcd(group, width)`` along each factor's input width (``n``, then ``k``)."""
    if quant.group_size <= 0:  # 0 (or a bad negative one) is left for ``check`` to judge
        return quant, quant
    return (quant.with_group(factor_group(quant.group_size, n)),
            quant.with_group(factor_group(quant.group_size, k)))


def check_factor_quants(quant: QuantConfig, n: int, k: int, m: int | None = None) -> None:
    """Raise ``ValueError`` saying what to change if ``quant`` cannot quantise both factors of
    a rank-``k`` layer with ``n`` inputs (factor B's input width is the rank itself); with the
    output width ``m``, the ranks it suggests stay below full rank ``min(m, n)``."""
    qa, qb = factor_quants(quant, n, k)
    qa.check(n)
    try:
        qb.check(k)
    except ValueError:
        top = min(m, n) - 1 if m is not None else k + 64
        near = [r for r in sorted(range(max(1, k - 64), min(k + 64, top) + 1), key=lambda r: (abs(r - k), r))
                if _factor_ok(quant, n, r)]
        hint = f"; ranks that work near it: {', '.join(map(str, sorted(near[:2])))}" if near else ""
        raise ValueError(f"{quant.name}: rank {k} with {quant.bits}-bit factors cannot be quantised (factor B has "
                         f"{k} inputs, grouped by {qb.group_size}){hint}") from None


def _factor_ok(quant: QuantConfig, n: int, k: int) -> bool:
    try:
        for q, width in zip(factor_quants(quant, n, k), (n, k)):
            q.check(width)
    except ValueError:
        return False
    return True


# ----------------------------------------------------------------------------- quantisers
@dataclass(frozen=True)
class QuantConfig:
    """Base of the weight-quantisation configs. ``bits`` is the code width per weight (a whole
    number, except vq's 2.5: 5-bit codes for pairs of weights)."""

    bits: int
    group_size: int = 128
    allowed_bits: ClassVar[tuple[int, ...]] = ()
    name: ClassVar[str] = ""
    data_free: ClassVar[bool] = True  # needs no calibration statistics
    # settings that differed before sensitivity grids recorded them (``analysis.sensitivity.recorded_quant_options``)
    legacy_options: ClassVar[dict] = {}

    def _check_bits(self) -> None:
        if self.bits not in self.allowed_bits:
            raise ValueError(f"{self.name}: {self.bits} bits is not supported; use one of {list(self.allowed_bits)}")

    def check_settings(self) -> None:
        """Raise ``ValueError`` if the settings are wrong whatever the width (checked before a
        model loads)."""
        self._check_bits()
        if self.group_size <= 0 or self.group_size % 8:
            raise ValueError(f"{self.name}: group size {self.group_size} must be a positive multiple of 8")

    def check(self, n: int) -> None:
        """Raise ``ValueError`` saying what to change if this config cannot quantise width n
        (the group-size message names a divisor of n)."""
        self._check_bits()
        if self.group_size <= 0 or self.group_size % 8:
            near = _divisor_near(n, self.group_size)
            raise ValueError(f"{self.name}: group size {self.group_size} must be a positive multiple of 8 (a group "
                             f"wider than the input width {n} means one group per row)"
                             + (f"; a divisor of {n} such as {near} avoids a ragged last group" if near else ""))
        step = self.width_step()
        if n % step:
            raise ValueError(f"{self.name}: {n} inputs x {self.bits} bits do not fill whole bytes; "
                             f"the width must be a multiple of {step}")

    def width_step(self) -> int:
        """Input widths must be multiples of this for a row's codes to fill whole bytes."""
        return 8 // math.gcd(8, int(self.bits))

    def code_bytes(self, m: int, n: int) -> int:
        return m * n * self.bits // 8

    def scale_bytes(self, m: int, n: int) -> int:
        return 2 * m * n_groups(n, self.group_size) * FP16_BYTES  # scale + zero

    def nbytes(self, m: int, n: int) -> int:
        """Bytes of the quantised weight (codes + scales), bias excluded."""
        return self.code_bytes(m, n) + self.scale_bytes(m, n)

    def with_group(self, group_size: int) -> QuantConfig:
        return type(self)(**{**self.__dict__, "group_size": group_size})


@dataclass(frozen=True)
class RTNConfig(QuantConfig):
    """Per-group asymmetric round-to-nearest."""

    allowed_bits: ClassVar[tuple[int, ...]] = (2, 3, 4, 8)
    name: ClassVar[str] = "rtn"


@dataclass(frozen=True)
class GPTQConfig(QuantConfig):
    """GPTQ: RTN grid with error compensation through the input Hessian ``X Xᵀ``."""

    damp: float = 0.01
    block_size: int = 128
    act_order: bool = True  # columns by decreasing Hessian diagonal, groups fixed up front (static groups)
    # sequential GPTQ counts each window's first token ``max(1, sink_weight * L)`` times in
    # X Xᵀ (windows of L tokens): it is the attention sink that every later token reads
    sink_weight: float = 1 / 128
    allowed_bits: ClassVar[tuple[int, ...]] = (2, 3, 4, 8)
    name: ClassVar[str] = "gptq"
    data_free: ClassVar[bool] = False  # the input Hessian X Xᵀ


@dataclass(frozen=True)
class BinaryConfig(QuantConfig):
    """``sign(w) * alpha`` with one fp16 ``alpha = mean|w|`` per group."""

    bits: int = 1
    allowed_bits: ClassVar[tuple[int, ...]] = (1,)
    name: ClassVar[str] = "binary"

    def scale_bytes(self, m: int, n: int) -> int:
        return m * n_groups(n, self.group_size) * FP16_BYTES


@dataclass(frozen=True)
class TernaryConfig(QuantConfig):
    """``{-1, 0, +1} * alpha`` (threshold ``0.7 mean|w|``), 2-bit codes, fp16 alpha per group."""

    bits: int = 2
    allowed_bits: ClassVar[tuple[int, ...]] = (2,)
    name: ClassVar[str] = "ternary"

    def scale_bytes(self, m: int, n: int) -> int:
        return m * n_groups(n, self.group_size) * FP16_BYTES


@dataclass(frozen=True)
class FP8Config(QuantConfig):
    """FP8 E4M3 values (torch.float8_e4m3fn) with one fp32 scale per output row."""

    bits: int = 8
    group_size: int = 0  # per row; no groups
    allowed_bits: ClassVar[tuple[int, ...]] = (8,)
    name: ClassVar[str] = "fp8"

    def check_settings(self) -> None:
        if self.bits != 8:
            raise ValueError("fp8: only 8 bits (E4M3)")

    def check(self, n: int) -> None:
        self.check_settings()

    def code_bytes(self, m: int, n: int) -> int:
        return m * n

    def scale_bytes(self, m: int, n: int) -> int:
        return 4 * m

    def with_group(self, group_size: int) -> FP8Config:
        return self


@dataclass(frozen=True)
class MXFP4Config(QuantConfig):
    """OCP microscaling MXFP4: E2M1 values, one shared power-of-two (E8M0) scale per 32."""

    bits: int = 4
    group_size: int = 32
    allowed_bits: ClassVar[tuple[int, ...]] = (4,)
    name: ClassVar[str] = "mxfp4"

    def check_settings(self) -> None:
        if self.group_size != 32:
            raise ValueError("mxfp4: the block size is fixed at 32")

    def check(self, n: int) -> None:
        self.check_settings()
        if n % 32:
            raise ValueError(f"mxfp4: input width {n} is not a multiple of the block size 32")

    def scale_bytes(self, m: int, n: int) -> int:
        return m * (n // 32)  # one E8M0 byte per block

    def with_group(self, group_size: int) -> MXFP4Config:
        return self


@dataclass(frozen=True)
class VQConfig(QuantConfig):
    """GPTVQ-style vector quantisation (van Baalen et al. 2024): columns visited by
    decreasing input-Hessian diagonal, consecutive visited columns grouped into vectors of
    ``dim`` weights, each vector coded as one of ``2^(dim * bits)`` centroids of a k-means
    codebook per tile, with GPTQ's error compensation. ``bits`` per weight: 2, 2.5, 3 or 4
    (2.5 gives 5-bit codes for pairs, 10-bit codes for 4-vectors).

    ``dim``: 2, 4, or 0 (the default: automatic, 4 at 2 and 2.5 bits and 2 at 3 and 4 bits,
    where 4-vectors would need 4,096 or 65,536 centroids).

    * 2-d tiles are ``tile_rows`` rows x ``group_size`` visited columns; ``tile_rows = 0``
      picks the fewest rows whose codebook, were it fp16, would cost at most 1/8 bit per weight.
    * 4-d tiles span every visited column (256 or 1,024 centroids are too many for one
      column group) and ``tile_rows`` rows (0: every row, one codebook per matrix). Each row
      has an fp16 scale (its RMS weighted by GPTQ's error scale), so one codebook serves rows
      of different sizes. On SmolLM2's linears this has 0.82x the output error of pairs at 2
      bits (for 0.04 fewer bits per weight) and 0.76x at 2.5 (for 0.02 more): bench/RESULTS.md §22.

    ``codebook_bits``: 8 stores each centroid coordinate as an int8 times a per-tile,
    per-coordinate fp16 scale (absmax / 127; rounded before the codes are chosen, so GPTQ's
    compensation sees it), about 1/16 bit per weight for 2-d tiles; 16 stores fp16
    entries (the format before, which compressed models saved without ``codebook_bits``
    have). bench/RESULTS.md §20."""

    tile_rows: int = 0
    codebook_bits: int = 8  # 8: int8 entries x an fp16 scale per tile and coordinate; 16: fp16 entries
    dim: int = 0  # weights per vector: 2, 4, or 0 (4 at 2 and 2.5 bits, 2 at 3 and 4)
    damp: float = 0.01
    iters: int = 25  # k-means iterations per tile
    seed: int = 0  # k-means initialisation
    sink_weight: float = 1 / 128  # as GPTQConfig's, when quantised sequentially
    allowed_bits: ClassVar[tuple[float, ...]] = (2, 2.5, 3, 4)
    name: ClassVar[str] = "vq"
    data_free: ClassVar[bool] = False  # the input Hessian X Xᵀ
    codebook_overhead: ClassVar[float] = 1 / 8  # bits per weight an fp16 codebook of the automatic tile height may take
    max_centroids: ClassVar[int] = 1024
    # grids and models from before a field existed: fp16 codebooks (before int8), pairs (before 4-vectors)
    legacy_options: ClassVar[dict] = {"codebook_bits": 16, "dim": 2}

    @property
    def vector(self) -> int:
        """Weights per vector: ``dim``, or the automatic choice."""
        return self.dim or (4 if self.bits <= 2.5 else 2)

    @property
    def row_scaled(self) -> bool:
        """4-vectors: tiles span the whole width, and each row has an fp16 scale."""
        return self.vector == 4

    @property
    def code_bits(self) -> int:
        """Bits of one vector's index."""
        return round(self.vector * self.bits)

    @property
    def centroids(self) -> int:
        return 2**self.code_bits

    def width_step(self) -> int:
        return self.vector * (8 // math.gcd(8, self.code_bits))  # whole vectors whose codes fill whole bytes

    def code_bytes(self, m: int, n: int) -> int:
        return m * (n // self.vector) * self.code_bits // 8

    @staticmethod
    def perm_bytes(n: int) -> int:
        """Bytes per entry of the column order: int16 while every index fits."""
        return 2 if n <= 2**15 else 4

    def rows(self, m: int) -> int:
        """Tile height for a weight of ``m`` rows."""
        if self.tile_rows:
            return max(1, min(m, self.tile_rows))
        if self.row_scaled:
            return m
        auto = -(-self.centroids * self.vector * 16 // round(self.codebook_overhead * self.group_size))
        return -(-m // -(-m // auto))  # as many tiles as ``auto`` rows need, of even height (no ragged tile)

    def cols(self, n: int) -> int:
        """Tile width (visited columns) for a weight of ``n`` inputs."""
        return n if self.row_scaled else self.group_size

    def tiles(self, m: int, n: int) -> tuple[int, int]:
        return -(-m // self.rows(m)), n_groups(n, self.cols(n))

    def _check_tiles(self) -> None:
        if self.tile_rows < 0:
            raise ValueError(f"vq: tile_rows {self.tile_rows} must be 0 (automatic) or positive")
        if self.iters < 1:
            raise ValueError(f"vq: iters {self.iters} must be at least 1")
        if self.codebook_bits not in (8, 16):
            raise ValueError(f"vq: codebook_bits {self.codebook_bits} must be 8 (int8 entries and scales) or 16 (fp16)")
        if self.dim not in (0, 2, 4):
            raise ValueError(f"vq: dim {self.dim} must be 2, 4 or 0 (automatic: 4 at 2 and 2.5 bits, 2 above)")
        if self.centroids > self.max_centroids:
            raise ValueError(f"vq: {self.vector}-d vectors at {self.bits} bits need {self.centroids:,} centroids "
                             f"(at most {self.max_centroids:,}); use dim 2 or 0 (automatic) at this width")

    def check_settings(self) -> None:
        super().check_settings()
        self._check_tiles()

    def check(self, n: int) -> None:  # a width that is no multiple of the vector fails the base check
        self._check_bits()
        self._check_tiles()  # before the width, whose step depends on the vector length
        super().check(n)

    def scale_bytes(self, m: int, n: int) -> int:
        tr, tc = self.tiles(m, n)
        book = self.centroids * self.vector * self.codebook_bits // 8  # one tile's entries
        book += self.vector * FP16_BYTES if self.codebook_bits == 8 else 0  # and their scales
        rows = m * FP16_BYTES if self.row_scaled else 0
        return tr * tc * book + self.perm_bytes(n) * n + rows  # codebooks (and their scales), column order, row scales


# ----------------------------------------------------------------------------- low rank
@dataclass(frozen=True)
class LowRankConfig:
    """Base of the low-rank configs: ``W (m x n) ~ B (m x k) @ A (k x n)``."""

    rank: int
    name: ClassVar[str] = ""
    adds_bias: ClassVar[bool] = False
    data_free: ClassVar[bool] = True  # needs no calibration statistics or text

    def check(self, m: int, n: int) -> None:
        if not 1 <= self.rank <= min(m, n):
            raise ValueError(f"{self.name}: rank {self.rank} is outside 1..{min(m, n)} (= min(out {m}, in {n}))")

    def nbytes(self, m: int, n: int, dtype_bytes: int, quant: QuantConfig | None = None) -> int:
        """Bytes of both factors, bias excluded."""
        k = self.rank
        if quant is None:
            return k * (m + n) * dtype_bytes
        qa, qb = factor_quants(quant, n, k)
        return qa.nbytes(k, n) + qb.nbytes(m, k)


@dataclass(frozen=True)
class SVDConfig(LowRankConfig):
    """Truncated SVD of the weight alone."""

    name: ClassVar[str] = "svd"


@dataclass(frozen=True)
class ActPCAConfig(LowRankConfig):
    """PCA of the layer's outputs on calibration data, with mean/bias correction (AFM/LORD)."""

    name: ClassVar[str] = "act-pca"
    adds_bias: ClassVar[bool] = True
    data_free: ClassVar[bool] = False


@dataclass(frozen=True)
class WhitenedSVDConfig(LowRankConfig):
    """SVD-LLM: SVD of ``W S`` with ``S = chol(X Xᵀ)``; right factor ``V_kᵀ S⁻¹``."""

    damp: float = 1e-4  # relative diagonal damping used only if X Xᵀ is not positive definite
    name: ClassVar[str] = "svd-llm"
    data_free: ClassVar[bool] = False


@dataclass(frozen=True)
class LillamaConfig(LowRankConfig):
    """Lillama: a low-rank initialisation (``init``: 'svd' or 'act-pca') refined by local
    feature distillation, bottom-first (see ``compression.lillama``). Same storage as SVD."""

    init: str = "svd"
    name: ClassVar[str] = "lillama"
    data_free: ClassVar[bool] = False  # distils on calibration text

    @property
    def adds_bias(self) -> bool:  # act-pca initialisation re-centres the output with a bias
        return self.init == "act-pca"


def _divisor_near(n: int, g: int) -> int | None:
    """The multiple of 8 dividing ``n`` nearest to ``g`` (to the usual 128 when ``g`` is not
    positive); None if there is none."""
    divs = [d for d in range(8, n + 1, 8) if n % d == 0]
    want = g if g > 0 else 128
    return min(divs, key=lambda d: abs(d - want)) if divs else None


def break_even_rank(m: int, n: int) -> float:
    """Rank below which ``k (m + n) < m n``: the factorisation saves memory."""
    return m * n / (m + n)
