"""The compression plan (budget): a versioned, JSON round-trippable dataclass keyed by
module name. ``default`` applies to every decoder linear; ``modules`` overrides it per
module. ``validate`` checks a plan against a model before any long run and raises
``ValueError`` with a message that says what to change.
"""
from __future__ import annotations

import difflib
import json
import math
import types
import typing
import warnings
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from analysis.adapters import LinearInfo
from analysis.atomic import write_text_atomic
from compression.configs import (
    ActPCAConfig,
    BinaryConfig,
    FP8Config,
    GPTQConfig,
    LillamaConfig,
    LowRankConfig,
    MXFP4Config,
    QuantConfig,
    RTNConfig,
    SVDConfig,
    TernaryConfig,
    VQConfig,
    WhitenedSVDConfig,
    bit_width,
    break_even_rank,
    check_factor_quants,
    ragged,
)

PLAN_VERSION = 1

# Method names (as users and the CLI spell them) -> config types. Lookups, not if/elif.
LOWRANK_METHODS: dict[str, type[LowRankConfig]] = {
    "svd": SVDConfig, "act-pca": ActPCAConfig, "svd-llm": WhitenedSVDConfig, "lillama": LillamaConfig,
}
QUANT_METHODS: dict[str, type[QuantConfig]] = {
    "rtn": RTNConfig, "gptq": GPTQConfig, "binary": BinaryConfig, "ternary": TernaryConfig,
    "fp8": FP8Config, "mxfp4": MXFP4Config, "vq": VQConfig,
}
# bits implied by formats whose code width is fixed
FIXED_BITS = {"binary": 1, "ternary": 2, "fp8": 8, "mxfp4": 4}


class PlanWarning(UserWarning):
    """A legal but wasteful setting (e.g. a rank above break-even)."""


@dataclass(frozen=True)
class ModuleSpec:
    """How to compress one linear. ``rank=None`` keeps it full-rank; ``bits=None`` keeps
    its dtype. With both, the low-rank factors are quantised. ``bits`` is a whole number except
    for vq's 2.5 (a whole-valued float such as 3.0 is stored as 3)."""

    rank: int | None = None
    bits: int | float | None = None
    group_size: int = 128
    lowrank: str = "svd-llm"
    quant: str = "rtn"

    def __post_init__(self) -> None:
        if isinstance(self.bits, float):  # 3.0 -> 3, 2.5 stays; ints stay as given
            object.__setattr__(self, "bits", bit_width(self.bits))

    @property
    def is_dense(self) -> bool:
        return self.rank is None and self.bits is None

    def lowrank_config(self, lillama: LillamaOptions | None = None) -> LowRankConfig | None:
        if self.rank is None:
            return None
        if self.lowrank not in LOWRANK_METHODS:
            raise ValueError(f"unknown low-rank method {self.lowrank!r}; use one of {', '.join(LOWRANK_METHODS)}")
        if self.lowrank == "lillama":
            return LillamaConfig(rank=self.rank, init=(lillama or LillamaOptions()).init)
        return LOWRANK_METHODS[self.lowrank](rank=self.rank)

    def quant_config(self) -> QuantConfig | None:
        if self.bits is None:
            return None
        cls = QUANT_METHODS.get(self.quant)
        if cls is None:
            raise ValueError(f"unknown quantisation method {self.quant!r}; use one of {', '.join(QUANT_METHODS)}")
        if self.quant in FIXED_BITS:
            if self.bits != FIXED_BITS[self.quant]:
                raise ValueError(f"{self.quant} stores {FIXED_BITS[self.quant]}-bit codes; set bits to "
                                 f"{FIXED_BITS[self.quant]} (got {self.bits})")
            kwargs = {} if self.quant in ("fp8", "mxfp4") else {"group_size": self.group_size}
            return cls(**kwargs)
        return cls(bits=self.bits, group_size=self.group_size)

    def errors(self, lillama: LillamaOptions | None = None) -> list[str]:
        """What is wrong with this spec on any model: an unknown method, a bit width or group
        size the quantiser does not take, a rank below 1 (checked before a model loads; the
        checks that need a linear's shape are ``validate``'s)."""
        try:
            lr, q = self.lowrank_config(lillama), self.quant_config()
            if q is not None:
                q.check_settings()
        except ValueError as e:
            return [str(e)]
        if lr is not None and self.rank < 1:
            return [f"{lr.name}: rank {self.rank} must be at least 1"]
        return []

    def label(self, rank_text: str | None = None) -> str:
        """``svd-llm r64 + rtn 4b g128``; ``rank_text`` replaces ``r64`` (to describe several ranks)."""
        parts = []
        if self.rank is not None:
            parts.append(f"{self.lowrank} {rank_text or f'r{self.rank}'}")
        if self.bits is not None:
            g = "" if self.quant in ("fp8", "mxfp4") else f" g{self.group_size}"
            parts.append(f"{self.quant} {self.bits}b{g}")
        return " + ".join(parts) or "dense"


LILLAMA_INITS = ("svd", "act-pca", "svd-llm")
LILLAMA_GRANULARITIES = ("linear", "mlp", "layer")
LILLAMA_ORDERS = ("bottom-first", "top-first")


@dataclass(frozen=True)
class LillamaOptions:
    """Local feature distillation settings (used when a module's ``lowrank`` is 'lillama')."""

    init: str = "svd"  # "svd" (data-free), "act-pca" or "svd-llm" (the CLI's and app's choice: better on real models)
    steps: int = 100
    lr: float = 1e-3
    calib_tokens: int = 8192
    granularity: str = "linear"  # "linear" | "mlp" | "layer"
    order: str = "bottom-first"  # or "top-first" (for the ablation)

    def check(self) -> None:
        """Raise ``ValueError`` naming the first setting out of range."""
        for key, allowed in (("granularity", LILLAMA_GRANULARITIES), ("order", LILLAMA_ORDERS),
                             ("init", LILLAMA_INITS)):
            if getattr(self, key) not in allowed:
                raise ValueError(f"lillama: {key} {getattr(self, key)!r} is not one of {', '.join(allowed)}")
        if self.steps < 0:
            raise ValueError(f"lillama: steps must be >= 0, got {self.steps}")
        if not self.lr > 0:
            raise ValueError(f"lillama: lr must be > 0, got {self.lr}")
        if self.calib_tokens < 1:
            raise ValueError(f"lillama: calib_tokens must be >= 1, got {self.calib_tokens}")


@dataclass(frozen=True)
class TuneOptions:
    """Block-wise tuning after compression (``compression.tune``): each decoder layer's
    rtn / gptq weights (per-weight offsets, per-group scales), vq codebooks and plain low-rank factors are
    trained, bottom-first, so the layer's output on the compressed stack's input matches the
    dense layer's. Sizes are unchanged. Defaults: bench/RESULTS.md §15."""

    steps: int = 60  # Adam steps per layer
    lr: float = 1e-2  # offsets move in units of their quantisation step, scales in log space
    factor_lr: float = 1e-3  # plain low-rank factors, in weight units (Lillama's default)
    calib_tokens: int = 32768  # calibration tokens tuned on (the first windows, cut into seqlen)
    seqlen: int = 512  # sequence length of the tuning windows (shorter windows are taken whole)
    tokens_per_step: int = 1024  # tokens in one Adam step (whole sequences, at least one)

    def check(self) -> None:
        """Raise ``ValueError`` naming the first setting out of range."""
        for key in ("steps", "calib_tokens", "seqlen", "tokens_per_step"):
            low = 0 if key == "steps" else 2 if key == "seqlen" else 1
            if getattr(self, key) < low:
                raise ValueError(f"tune: {key} must be >= {low}, got {getattr(self, key)}")
        for key in ("lr", "factor_lr"):
            if not getattr(self, key) > 0:
                raise ValueError(f"tune: {key} must be > 0, got {getattr(self, key)}")


@dataclass(frozen=True)
class SliceGPTOptions:
    slice_fraction: float = 0.25
    keep_tied_head: bool = True


@dataclass
class Plan:
    default: ModuleSpec = field(default_factory=ModuleSpec)
    modules: dict[str, ModuleSpec] = field(default_factory=dict)
    lillama: LillamaOptions | None = None
    slicegpt: SliceGPTOptions | None = None
    tune: TuneOptions | None = None
    meta: dict = field(default_factory=dict)  # free-form: model fingerprint, who made it, target ...
    version: int = PLAN_VERSION

    def spec_for(self, name: str) -> ModuleSpec:
        return self.modules.get(name, self.default)

    @property
    def tuned(self) -> bool:
        """Whether applying the plan ends with block-wise tuning (``tune`` with steps > 0)."""
        return self.tune is not None and self.tune.steps > 0

    def option_errors(self) -> list[str]:
        """What is wrong with the Lillama, SliceGPT and tuning options (no model needed: checked
        before one loads)."""
        errors = []
        for options in (self.lillama, self.tune):
            if options is not None:
                try:
                    options.check()
                except ValueError as e:
                    errors.append(str(e))
        if self.tune is not None and self.slicegpt is not None:
            errors.append("tune does not apply to a SliceGPT plan (it tunes quantised and low-rank weights): "
                          "set 'tune' to null, or compress with ranks or bits instead")
        if self.slicegpt is not None and not 0 <= self.slicegpt.slice_fraction < 1:
            errors.append(f"slicegpt slice_fraction {self.slicegpt.slice_fraction} must be in [0, 1)")
        return errors

    def spec_errors(self) -> list[str]:
        """``ModuleSpec.errors`` of the default and of every module entry, each line naming
        where it is (no model needed: checked before one loads)."""
        specs = [("default", self.default)] + sorted(self.modules.items())
        return [f"{where}: {e}" for where, spec in specs for e in spec.errors(self.lillama)]

    def with_module(self, name: str, spec: ModuleSpec) -> Plan:
        return replace(self, modules={**self.modules, name: spec})

    # ------------------------------------------------------------------ JSON
    def to_dict(self) -> dict:
        d = {"version": self.version, "default": asdict(self.default),
             "modules": {k: asdict(v) for k, v in sorted(self.modules.items())},
             "lillama": asdict(self.lillama) if self.lillama else None,
             "slicegpt": asdict(self.slicegpt) if self.slicegpt else None, "meta": self.meta}
        if self.tune is not None:  # only when set: plans without it stay readable by earlier RankLab
            d["tune"] = asdict(self.tune)
        return d

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, d: dict) -> Plan:
        if not isinstance(d, dict):
            raise ValueError("a plan is a JSON object with 'version', 'default' and 'modules'")
        unknown = sorted(set(d) - PLAN_KEYS)
        if unknown:
            hints = [f"{k!r} (did you mean {close[0]!r}?)" if (close := difflib.get_close_matches(k, PLAN_KEYS, n=1))
                     else repr(k) for k in unknown]
            raise ValueError(f"unknown plan key(s) {', '.join(hints)}; a plan has only "
                             f"{', '.join(sorted(PLAN_KEYS))}")
        version = d.get("version")
        if version != PLAN_VERSION:
            raise ValueError(f"plan version {version!r} is not supported (this RankLab reads version {PLAN_VERSION})")
        modules = d.get("modules") or {}
        if not isinstance(modules, dict):
            raise ValueError("the plan's 'modules' must be an object mapping module names to settings")
        if d.get("slicegpt") == {}:  # ambiguous: slice with the defaults, or not at all?
            raise ValueError("the plan's 'slicegpt' is empty: give {\"slice_fraction\": 0.25} (the fraction of the "
                             "hidden width to delete) to slice, or null not to")
        meta = d.get("meta") or {}
        if not isinstance(meta, dict):
            raise ValueError("the plan's 'meta' must be an object")
        return cls(default=_typed(ModuleSpec, d.get("default", {}), "default"),
                   modules={k: _typed(ModuleSpec, v, f"modules[{k!r}]") for k, v in modules.items()},
                   lillama=_typed(LillamaOptions, d["lillama"], "lillama") if d.get("lillama") is not None else None,
                   slicegpt=_typed(SliceGPTOptions, d["slicegpt"], "slicegpt") if d.get("slicegpt") is not None
                   else None,
                   tune=_typed(TuneOptions, d["tune"], "tune") if d.get("tune") is not None else None,
                   meta=meta, version=version)

    @classmethod
    def from_json(cls, text: str) -> Plan:
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as e:
            raise ValueError(f"the plan is not valid JSON: {e}") from e

    def save(self, path: str | Path) -> None:
        """Write atomically (a temp file renamed into place). An existing file is replaced only
        if it is a plan (a JSON object with a 'version' and 'modules'); anything else is refused."""
        p = Path(path).expanduser()
        check_plan_path(p)
        write_text_atomic(p, self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        p = Path(path).expanduser()
        if not p.exists():
            raise FileNotFoundError(f"plan file {p} not found")
        return cls.from_json(p.read_text())


PLAN_KEYS = frozenset({"version", "default", "modules", "lillama", "slicegpt", "tune", "meta"})


def check_plan_path(path: str | Path) -> None:
    """Raise ``ValueError`` if a plan may not be written to ``path``: a folder, or an existing
    file that is not a plan (only an earlier plan is ever replaced)."""
    p = Path(path).expanduser()
    if p.is_dir():
        raise ValueError(f"{p} is a folder; the plan is one JSON file: give a file name such as {p / 'plan.json'}")
    if p.exists() and not _is_plan_file(p):
        raise ValueError(f"{p} exists and is not a RankLab plan; refusing to overwrite it: pick another file name")


def _is_plan_file(p: Path) -> bool:
    try:
        d = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(d, dict) and "version" in d and "modules" in d


def _accepts(hint, value) -> bool:
    """Whether a JSON ``value`` fits a field's type hint (int, float, str, bool, X | None)."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return any(_accepts(h, value) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _typed(cls, d, where: str):
    """``cls(**d)`` for a plan entry read from JSON, refusing unknown keys and wrong types with a
    message naming the entry and the field."""
    if not isinstance(d, dict):
        raise ValueError(f"plan entry {where} must be an object of settings, got {json.dumps(d)}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in fields(cls)]
    for key, value in d.items():
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            raise ValueError(f"plan entry {where}: unknown setting {key!r}"
                             + (f" (did you mean {close[0]!r}?)" if close else f"; settings are {', '.join(names)}"))
        if not _accepts(hints[key], value):
            want = str(hints[key]).replace("<class '", "").replace("'>", "")
            want = want.replace("NoneType", "null").replace("None", "null")
            raise ValueError(f"plan entry {where}: {key} must be {want}, got {json.dumps(value)}")
    return cls(**d)


# --------------------------------------------------------------------------- description
def describe_plan(plan: Plan, linears: list[LinearInfo]) -> str:
    """One line saying what ``plan`` does to a model's decoder linears, for run tables and
    default run labels: each setting with how many linears use it, ranks as their mean
    fraction of the break-even rank (as the app's sliders give them), e.g.
    ``svd-llm rank 60% of break-even x 120 · rtn 4b g128 x 90``."""
    if plan.slicegpt is not None:
        return f"slicegpt {plan.slicegpt.slice_fraction:.0%} of the hidden width deleted"
    groups: dict[str, list[float]] = {}
    for li in linears:
        s = plan.spec_for(li.name)
        key = s.label(rank_text="rank")
        groups.setdefault(key, []).append(s.rank / li.break_even if s.rank else 1.0)
    out = []
    for key, fracs in sorted(groups.items(), key=lambda kv: (kv[0] == "dense", -len(kv[1]))):
        mean = f" {sum(fracs) / len(fracs):.0%} of break-even" if "rank" in key else ""
        out.append(f"{key.replace(' rank', ' rank' + mean, 1)} x {len(fracs)}")
    text = " · ".join(out)
    if plan.lillama is not None and any("lillama" in k for k in groups):
        text += f" (lillama from {plan.lillama.init}, {plan.lillama.steps} steps)"
    if plan.tuned:
        text += f", tuned {plan.tune.steps} steps per layer"
    return text


# --------------------------------------------------------------------------- validation
def _made_for_another(plan: Plan, fingerprint: str) -> str | None:
    """"this plan was made for another model (`spec`), fingerprint …, not this one (…)" when
    ``plan``'s ``meta["base_fingerprint"]`` names another model; None otherwise."""
    theirs = plan.meta.get("base_fingerprint")
    if not theirs or theirs == fingerprint:
        return None
    model = plan.meta.get("base_model") or plan.meta.get("model")
    made = f" (`{model}`)" if model else ""
    return f"this plan was made for another model{made}, fingerprint {theirs}, not this one ({fingerprint})"


def other_model_notes(plan: Plan, fingerprint: str) -> list[str]:
    """A note when ``plan`` says it was made for another model (its ``meta["base_fingerprint"]``):
    its names and shapes may still fit (same architecture, another dtype or fine-tune), but its
    ranks and bits were chosen for that model's weights."""
    other = _made_for_another(plan, fingerprint)
    if other is None:
        return []
    return [f"{other}: its ranks and bits were chosen for that model's weights (another dtype or fine-tune also "
            "changes the fingerprint); allocate again for this model to be sure"]


def validate_for_model(plan: Plan, linears: list[LinearInfo], fingerprint: str) -> list[str]:
    """``validate`` (notes not emitted as warnings) and ``other_model_notes`` for the model with
    ``fingerprint``. A plan that does not fit and names another model says that first: its
    unknown module names are that model's, not typing slips."""
    try:
        notes = validate(plan, linears, warn=False)
    except ValueError as e:
        other = _made_for_another(plan, fingerprint)
        if other is None:
            raise
        raise ValueError(f"{other}, and it does not fit this one; load that model, or allocate a plan for this "
                         f"one. {e}") from None
    return notes + other_model_notes(plan, fingerprint)


def validate(plan: Plan, linears: list[LinearInfo], warn: bool = True) -> list[str]:
    """Check ``plan`` against a model's decoder linears. Raises ``ValueError`` listing every
    problem and what to change; returns the warnings (and, if ``warn``, emits them as
    ``PlanWarning``: callers that show them themselves pass ``warn=False`` rather than filter
    warnings, whose filters are process-wide and not thread-safe)."""
    by_name = {li.name: li for li in linears}
    errors, notes = [], []
    ragged_notes: dict[tuple[int, int], list[str]] = {}
    for name in plan.modules:
        if name not in by_name:
            close = difflib.get_close_matches(name, list(by_name), n=3)
            hint = f" did you mean {', '.join(close)}?" if close else " names look like " + linears[0].name
            errors.append(f"unknown module {name!r};{hint}")
    for li in linears:
        spec = plan.spec_for(li.name)
        m, n = li.out_features, li.in_features
        try:
            lr, q = spec.lowrank_config(plan.lillama), spec.quant_config()
        except ValueError as e:
            errors.append(f"{li.name}: {e}")
            continue
        if lr is not None:
            try:
                lr.check(m, n)
            except ValueError as e:
                errors.append(f"{li.name}: {e}")
                continue
            if spec.rank > break_even_rank(m, n):
                notes.append(f"{li.name}: rank {spec.rank} is above break-even {break_even_rank(m, n):.0f} "
                             "(the factors take more memory than the dense weight)")
        if q is not None:
            try:
                q.check(n) if lr is None else check_factor_quants(q, n, spec.rank, m)
            except ValueError as e:
                errors.append(f"{li.name}: {e}")
                continue
            if lr is None and q.group_size and ragged(n, q.group_size):
                ragged_notes.setdefault((n, q.group_size), []).append(li.name)
    for (n, g), names in ragged_notes.items():
        tail = (f"each row is one group of {n} (the group is wider than the row)" if g > n else
                f"each row ends with a ragged group of {n % g}; a divisor of {n} avoids it")
        notes.append(f"group size {g} does not divide the input width {n} of {len(names)} linear(s) "
                     f"(e.g. {names[0]}): {tail}")
    errors += plan.option_errors()
    if errors:
        errors = _merge_same(errors, {li.name for li in linears})
        more = f"\n(and {len(errors) - 12} more)" if len(errors) > 12 else ""
        raise ValueError("the plan cannot be applied:\n- " + "\n- ".join(errors[:12]) + more)
    for w in notes if warn else ():
        warnings.warn(w, PlanWarning, stacklevel=2)
    return notes


def _merge_same(errors: list[str], names: set[str]) -> list[str]:
    """'name: problem' lines with the same problem become one line naming how many modules."""
    by_problem: dict[str, list[str]] = {}  # problem -> the modules that have it ([] for plan-wide lines)
    for e in errors:
        name, sep, problem = e.partition(": ")
        if sep and name in names:
            by_problem.setdefault(problem, []).append(name)
        else:
            by_problem.setdefault(e, [])
    out = []
    for problem, who in by_problem.items():
        if len(who) > 1:
            out.append(f"{len(who)} modules (e.g. {who[0]}): {problem}")
        else:
            out.append(f"{who[0]}: {problem}" if who else problem)
    return out


def needs_statistics(plan: Plan, linears: list[LinearInfo]) -> bool:
    """Whether applying ``plan`` needs the profile's input statistics: false when every
    module's methods are data-free (svd, rtn, binary, ternary, fp8, mxfp4) and it is not SliceGPT."""
    if plan.slicegpt is not None:
        return True
    for li in linears:
        spec = plan.spec_for(li.name)
        configs = (spec.lowrank_config(plan.lillama), spec.quant_config())
        if any(c is not None and not c.data_free for c in configs):
            return True
    return False


def needs_calibration(plan: Plan, linears: list[LinearInfo]) -> bool:
    """Whether applying ``plan`` reads calibration text: statistics (``needs_statistics``) or
    only windows (tuning after a data-free method)."""
    return plan.tuned or needs_statistics(plan, linears)


# ---------------------------------------------------------------------------- sizes
def weight_bytes(spec: ModuleSpec, li: LinearInfo, dtype_bytes: int, lillama: LillamaOptions | None = None) -> int:
    """Exact bytes of the compressed weight of ``li``: factors, codes, scales; no bias."""
    m, n = li.out_features, li.in_features
    lr, q = spec.lowrank_config(lillama), spec.quant_config()
    if lr is not None:
        return lr.nbytes(m, n, dtype_bytes, q)
    return m * n * dtype_bytes if q is None else q.nbytes(m, n)


def keeps_bias(spec: ModuleSpec, has_bias: bool, lillama: LillamaOptions | None = None) -> bool:
    """Whether the replacement holds a bias (activation PCA always adds one)."""
    lr = spec.lowrank_config(lillama)
    return has_bias or (lr is not None and lr.adds_bias)


@dataclass(frozen=True)
class SizeReport:
    total_bytes: int  # whole model after compression
    dense_total_bytes: int
    linear_bytes: int  # decoder linears after compression (factors, codes, scales; no bias)
    dense_linear_params: int

    @property
    def bits_per_weight(self) -> float:
        """Average over the decoder linears: stored bits / dense decoder-linear parameters."""
        return self.linear_bytes * 8 / max(self.dense_linear_params, 1)

    @property
    def ratio(self) -> float:
        return self.total_bytes / self.dense_total_bytes


def plan_size(plan: Plan, linears: list[LinearInfo], dense_total_bytes: int, dtype_bytes: int,
              biases: dict[str, bool]) -> SizeReport:
    """Bytes the compressed model will hold, computed without applying the plan.
    ``biases`` says which linears have a bias; ``dense_total_bytes`` is the dense model's
    ``model_bytes``."""
    total, lin_bytes, params = dense_total_bytes, 0, 0
    for li in linears:
        spec, hb = plan.spec_for(li.name), biases.get(li.name, False)
        w = weight_bytes(spec, li, dtype_bytes, plan.lillama)
        bias_delta = (int(keeps_bias(spec, hb, plan.lillama)) - int(hb)) * li.out_features * dtype_bytes
        total += w - li.out_features * li.in_features * dtype_bytes + bias_delta
        lin_bytes += w
        params += li.out_features * li.in_features
    return SizeReport(total, dense_total_bytes, lin_bytes, params)


# ---------------------------------------------------------------------------- builders
def rank_for_ratio(li: LinearInfo, param_ratio: float) -> int:
    """The largest rank keeping at most ``param_ratio`` of the layer's parameters,
    ``k (m + n) <= r m n`` (at least 1): a ratio of 1 never makes the factors larger than the
    weight."""
    if not 0 < param_ratio <= 1:
        raise ValueError(f"param ratio {param_ratio} must be in (0, 1]")
    k = math.floor(param_ratio * break_even_rank(li.out_features, li.in_features) + 1e-9)
    return max(1, min(k, min(li.out_features, li.in_features)))


def uniform_plan(method: str, linears: list[LinearInfo], *, param_ratio: float | None = None, bits: int | None = None,
                 group_size: int = 128, lillama: LillamaOptions | None = None,
                 slice_fraction: float | None = None) -> Plan:
    """The plan the CLI builds from ``--method``: uniform over layers."""
    if method == "slicegpt":
        if slice_fraction is None:
            raise ValueError("slicegpt needs --slice S (fraction of the hidden width to delete, e.g. 0.25)")
        return Plan(slicegpt=SliceGPTOptions(slice_fraction), meta={"method": method})
    if method in LOWRANK_METHODS:
        if param_ratio is None:
            raise ValueError(f"{method} is a low-rank method: give --param-ratio R (fraction of decoder-linear "
                             "parameters kept, e.g. 0.8)")
        if not 0 < param_ratio <= 1:
            raise ValueError(f"--param-ratio {param_ratio} must be in (0, 1]: the fraction of each linear's "
                             "parameters the factors keep, e.g. 0.8")
        mods = {li.name: ModuleSpec(rank=rank_for_ratio(li, param_ratio), lowrank=method) for li in linears}
        return Plan(modules=mods, lillama=(lillama or LillamaOptions()) if method == "lillama" else None,
                    meta={"method": method, "param_ratio": param_ratio})
    if method in QUANT_METHODS:
        b = FIXED_BITS.get(method, bits)
        if b is None:
            raise ValueError(f"{method} needs --bits B (one of {list(QUANT_METHODS[method].allowed_bits)})")
        allowed = QUANT_METHODS[method].allowed_bits  # checked here, before any model loads
        if b not in allowed:
            *most, last = map(str, allowed)
            raise ValueError(f"--bits {b}: {method} takes {', '.join(most) + ' or ' if most else ''}{last} bits")
        if method not in ("fp8", "mxfp4") and (group_size < 1 or group_size % 8):
            raise ValueError(f"--group-size {group_size} must be a positive multiple of 8, e.g. 64 or 128")
        return Plan(default=ModuleSpec(bits=b, group_size=group_size, quant=method),
                    meta={"method": method, "bits": b, "group_size": group_size})
    known = sorted([*LOWRANK_METHODS, *QUANT_METHODS, "slicegpt"])
    raise ValueError(f"unknown method {method!r}; use one of {', '.join(known)}")
