"""Predictor and allocator: interpolation rules, targets never exceeded, brute-force optimality
on small problems, the dense plan at the dense size, and the CLI refusing another model."""
import json
import math
from argparse import Namespace

import numpy as np
import pandas as pd
import pytest
import torch

from analysis.adapters import LinearInfo
from analysis.sensitivity import TABLE_COLUMNS, SensitivityGrid
from compression.allocate import Predictor, allocate, candidate_options
from compression.plan import ModuleSpec, Plan, plan_size, validate, weight_bytes

DT = 4  # float32


pytestmark = pytest.mark.usefixtures("one_thread")


def _linears(shapes=((64, 64), (32, 64), (128, 64), (64, 128))) -> list[LinearInfo]:
    roles = ["q", "k", "gate", "down"]
    return [LinearInfo(f"model.layers.{i // 4}.x.{roles[i % 4]}{i}", i // 4, roles[i % 4], "g", m, n)
            for i, (m, n) in enumerate(shapes)]


def _grid(linears, ranks=(8, 16), bits=(2, 4), seed=0, method="svd-llm", quant="rtn", group_size=32,
          negative=False) -> SensitivityGrid:
    """Synthetic grid: dloss falls with rank and bits (random magnitudes per linear)."""
    rng = np.random.default_rng(seed)
    rows = []
    for li in linears:
        scale = rng.uniform(0.01, 1.0)
        for r in ranks:
            if r < min(li.out_features, li.in_features):
                d = scale * (1 - r / min(li.out_features, li.in_features)) ** 2 * rng.uniform(0.5, 1.5)
                spec = ModuleSpec(rank=r, lowrank=method)
                rows.append(dict(name=li.name, layer=li.layer, role=li.role, kind="rank", setting=r, dloss=d,
                                 bytes=weight_bytes(spec, li, DT)))
        for b in bits:
            d = scale * 2.0 ** (-2 * b) * rng.uniform(0.5, 1.5) * 10
            if negative and b == max(bits):
                d = -1e-4
            spec = ModuleSpec(bits=b, group_size=group_size, quant=quant)
            rows.append(dict(name=li.name, layer=li.layer, role=li.role, kind="bits", setting=b, dloss=d,
                             bytes=weight_bytes(spec, li, DT)))
    meta = dict(format=1, fingerprint="fp-test", dense_loss=2.0, method=method, quant=quant, group_size=group_size,
                data_digest="d", n_tokens=100)
    return SensitivityGrid(meta, pd.DataFrame(rows, columns=TABLE_COLUMNS))


def _predictor(linears=None, biases=None, **kw) -> Predictor:
    linears = linears or _linears()
    dense_lin = sum(li.out_features * li.in_features for li in linears) * DT
    other = 50_000  # embeddings, norms ...
    return Predictor(_grid(linears, **kw), linears, dense_lin + other, DT, biases or {})


def _bytes_of(p: Predictor, plan: Plan) -> tuple[int, float]:
    rep = plan_size(plan, p.linears, p.dense_total_bytes, p.dtype_bytes, p.biases)
    return rep.total_bytes, rep.bits_per_weight


# ---------------------------------------------------------------------------- predictor
def test_predictor_interpolation_rules():
    p = _predictor()
    li = p.linears[0]  # 64 x 64: grid ranks 8, 16; full rank 64
    t = p.grid.table
    d8 = t[(t.name == li.name) & (t.kind == "rank") & (t.setting == 8)].dloss.item()
    d16 = t[(t.name == li.name) & (t.kind == "rank") & (t.setting == 16)].dloss.item()
    b2 = t[(t.name == li.name) & (t.kind == "bits") & (t.setting == 2)].dloss.item()
    b4 = t[(t.name == li.name) & (t.kind == "bits") & (t.setting == 4)].dloss.item()
    assert p.dloss(li.name, ModuleSpec(rank=8)) == d8  # grid points exactly
    assert p.dloss(li.name, ModuleSpec(rank=12)) == pytest.approx((d8 + d16) / 2)
    assert p.dloss(li.name, ModuleSpec(rank=40)) == pytest.approx(d16 * (64 - 40) / (64 - 16))  # towards 0 at full
    assert p.dloss(li.name, ModuleSpec(rank=64)) == 0.0
    below = d8 + max(d8 - d16, 0) / (16 - 8) * (8 - 4)  # the line through the two smallest grid ranks, extended
    assert p.dloss(li.name, ModuleSpec(rank=4)) == pytest.approx(below) and below > d8
    assert p.below_grid(Plan(modules={li.name: ModuleSpec(rank=4)})) == [(li.name, 4, 8)]
    assert p.below_grid(Plan(modules={li.name: ModuleSpec(rank=8)})) == []
    assert p.dloss(li.name, ModuleSpec(bits=4)) == b4
    assert p.dloss(li.name, ModuleSpec(bits=3)) == b2  # nearest lower grid width
    assert p.dloss(li.name, ModuleSpec(bits=8)) == b4
    assert p.dloss(li.name, ModuleSpec(rank=16, bits=2)) == pytest.approx(d16 + b2)  # additive
    # ... which the plans that use it are told of (quantised factors lose more than the sum)
    other = p.linears[1].name
    both = Plan(modules={li.name: ModuleSpec(rank=16, bits=2), other: ModuleSpec(bits=2)})
    assert p.rank_and_bits(both) == [li.name]
    assert p.rank_and_bits(Plan(default=ModuleSpec(rank=16))) == []
    assert p.rank_and_bits(Plan(default=ModuleSpec(rank=16, bits=4))) == [x.name for x in p.linears]
    # a measured cost replaces the sum for that setting only (rank part the grid's, bits part the rest)
    p.set_measured(li.name, 16, 2, 5 * (d16 + b2))
    assert p.dloss(li.name, ModuleSpec(rank=16, bits=2)) == pytest.approx(5 * (d16 + b2))
    assert p.dloss_parts(li.name, ModuleSpec(rank=16, bits=2))[0] == pytest.approx(d16)
    assert p.dloss(li.name, ModuleSpec(rank=8, bits=2)) == pytest.approx(d8 + b2)  # not measured: still the sum
    assert p.rank_and_bits(both) == []
    with pytest.raises(ValueError, match="not a decoder linear"):
        p.set_measured("model.nope", 16, 2, 1.0)
    assert p.dloss(li.name, ModuleSpec()) == 0.0


def test_allocate_measured_leaves_ranks_whose_factors_measure_worse_and_measures_each_setting_once():
    from compression.allocate import allocate_measured

    kw = dict(target_bits=2.5, quant="rtn", group_size=32)  # below 2-bit g32's 3 bits: ranks with factors needed
    first = allocate(_predictor(ranks=(8, 16, 24), bits=(2, 3, 4, 8)), **kw)
    assert _predictor().rank_and_bits(first)
    p = _predictor(ranks=(8, 16, 24), bits=(2, 3, 4, 8))
    additive = _predictor(ranks=(8, 16, 24), bits=(2, 3, 4, 8))
    calls = []

    def probe(name, spec):  # quantised factors cost 3x the sum of the parts, as on SmolLM2 (RESULTS §23)
        calls.append((name, spec.rank, spec.bits))
        return 3 * additive.dloss(name, spec)

    plan, rounds = allocate_measured(p, probe, **kw)
    assert len(calls) == len(set(calls)) and rounds[-1]["unmeasured"] == 0 and p.rank_and_bits(plan) == []
    assert sum(len(r["measured"]) for r in rounds) == len(calls) and len(rounds) >= 2
    assert _bytes_of(p, plan)[1] <= 2.5
    # judged by the measured costs, the last plan is no worse than the first (whose picks were all measured)
    assert p.predict(plan).dloss <= p.predict(first).dloss + 1e-12
    assert p.predict(first).dloss > additive.predict(first).dloss
    # when the parts do add up, one round of measuring confirms the first plan
    q = _predictor(ranks=(8, 16, 24), bits=(2, 3, 4, 8))
    same, rounds = allocate_measured(q, lambda n, s: additive.dloss(n, s), **kw)
    assert same.modules == first.modules and len(rounds) == 2 and rounds[-1]["unmeasured"] == 0
    # a probe that fails stops the loop with its error (nothing swallowed)
    with pytest.raises(RuntimeError, match="probe failed"):
        allocate_measured(_predictor(ranks=(8, 16, 24), bits=(2, 3, 4, 8)),
                          lambda n, s: (_ for _ in ()).throw(RuntimeError("probe failed")), **kw)


def test_allocate_measured_stops_when_asked_and_keeps_what_it_measured():
    from compression.allocate import allocate_measured

    kw = dict(target_bits=2.5, quant="rtn", group_size=32)
    p = _predictor(ranks=(8, 16, 24), bits=(2, 3, 4, 8))
    asked = []

    def stop() -> bool:  # Cancel pressed while the second setting is measured
        asked.append(1)
        return len(asked) > 2

    with pytest.raises(InterruptedError, match=r"cancelled in round \d+ after measuring 2 setting"):
        allocate_measured(p, lambda n, s: 1.0, should_stop=stop, **kw)
    assert len(p.measured) == 2 and set(p.measured.values()) == {1.0}


def test_measured_costs_round_trip_through_the_cache_per_grid_and_estimator(tmp_path):
    from analysis.atomic import CacheWarning
    from compression.allocate import load_measured, measured_path, save_measured

    p = _predictor(ranks=(8, 16, 24), bits=(2, 3, 4, 8))
    names = [li.name for li in p.linears]
    assert not save_measured(p, tmp_path)  # nothing measured: nothing written
    p.set_measured(names[0], 16, 2, 0.5)
    p.set_measured(names[1], 8, 3, 0.25)
    assert save_measured(p, tmp_path)
    q = _predictor(ranks=(8, 16, 24), bits=(2, 3, 4, 8))
    assert load_measured(q, tmp_path) == 2 and q.measured == p.measured
    assert q.dloss(names[0], ModuleSpec(rank=16, bits=2)) == 0.5
    # another estimator, or the grid measured again (another date), has costs of its own
    other = _predictor(ranks=(8, 16, 24), bits=(2, 3, 4, 8))
    other.estimator = "kl"
    assert load_measured(other, tmp_path) == 0 and measured_path(other, tmp_path) != measured_path(p, tmp_path)
    again = _predictor(ranks=(8, 16, 24), bits=(2, 3, 4, 8))
    again.grid.meta["date"] = "2026-11-25T00:00:00"
    assert load_measured(again, tmp_path) == 0
    # a linear this model lacks is skipped; an unreadable file is said and skipped, not fatal
    path = measured_path(p, tmp_path)
    data = json.loads(path.read_text())
    data["measured"].append(dict(name="model.nope", rank=8, bits=2, dloss=1.0))
    path.write_text(json.dumps(data))
    assert load_measured(_predictor(ranks=(8, 16, 24), bits=(2, 3, 4, 8)), tmp_path) == 2
    path.write_text("{not json")
    with pytest.warns(CacheWarning, match="cannot be read"):
        assert load_measured(_predictor(ranks=(8, 16, 24), bits=(2, 3, 4, 8)), tmp_path) == 0


def test_prediction_of_a_one_linear_plan_is_its_grid_value():
    p = _predictor()
    for _, row in p.grid.table.iterrows():
        spec = ModuleSpec(rank=int(row.setting)) if row.kind == "rank" else \
            ModuleSpec(bits=int(row.setting), group_size=32)
        plan = Plan(modules={row["name"]: spec})
        pred = p.predict(plan)
        assert pred.dloss == row.dloss
        assert pred.loss == p.dense_loss + row.dloss and pred.ppl == pytest.approx(math.exp(pred.loss))
        assert pred.bytes == p.dense_total_bytes - _dense_w(p, row["name"]) + row.bytes
    dense = p.predict(Plan())
    assert dense.dloss == 0 and dense.bytes == p.dense_total_bytes and dense.ratio == 1.0
    assert dense.bits_per_weight == 32.0


def _dense_w(p, name):
    li = p.by_name[name]
    return li.out_features * li.in_features * DT


def test_curvature_only_predictor_subtracts_the_first_order_part():
    p = _predictor()
    t = p.grid.table
    p.grid.first_order = pd.DataFrame({"name": t["name"], "kind": t["kind"], "setting": t["setting"],
                                       "dloss_first": 0.1 * t["dloss"]})
    pc = Predictor(p.grid, p.linears, p.dense_total_bytes, DT, {}, curvature_only=True)
    for row in t.itertuples():
        spec = ModuleSpec(rank=int(row.setting)) if row.kind == "rank" else ModuleSpec(bits=int(row.setting))
        assert pc.dloss(row.name, spec) == pytest.approx(0.9 * row.dloss)
    assert allocate(pc, target_ratio=0.6).meta["curvature_only"] is True
    p.grid.first_order = None
    with pytest.raises(ValueError, match="no first-order terms"):
        Predictor(p.grid, p.linears, p.dense_total_bytes, DT, {}, curvature_only=True)


def test_kl_predictor_adds_the_kl_table():
    p = _predictor()
    t = p.grid.table
    p.grid.kl = pd.DataFrame({"name": t["name"], "kind": t["kind"], "setting": t["setting"], "kl": 2.0 * t["dloss"]})
    pk = Predictor(p.grid, p.linears, p.dense_total_bytes, DT, {}, estimator="kl")
    for row in t.itertuples():
        spec = ModuleSpec(rank=int(row.setting)) if row.kind == "rank" else ModuleSpec(bits=int(row.setting))
        assert pk.dloss(row.name, spec) == pytest.approx(2.0 * row.dloss)
    assert allocate(pk, target_ratio=0.6).meta["estimator"] == "kl"
    p.grid.kl = None
    with pytest.raises(ValueError, match="no KL"):
        Predictor(p.grid, p.linears, p.dense_total_bytes, DT, {}, estimator="kl")


# ---------------------------------------------------------------------------- allocator
TARGETS = [("ratio", r) for r in (0.95, 0.8, 0.6, 0.45)] + [("bits", b) for b in (24.0, 12.0, 6.0, 3.2)]


def _target_kw(p, kind, value):
    return {"ratio": dict(target_ratio=value), "bits": dict(target_bits=value),
            "bytes": dict(target_bytes=int(value))}[kind]


@pytest.mark.parametrize("solver", ["auto", "lagrangian"])
@pytest.mark.parametrize("only", [None, "rank", "bits"])
def test_allocator_never_exceeds_its_target(solver, only):
    p = _predictor()
    smallest = min(_bytes_of(p, Plan(modules={li.name: ModuleSpec(rank=8, bits=2, group_size=32)
                                               for li in p.linears}))[0], p.dense_total_bytes)
    targets = TARGETS + [("bytes", p.dense_total_bytes - 3000), ("bytes", (p.dense_total_bytes + smallest) // 2)]
    for kind, value in targets:
        try:
            plan = allocate(p, solver=solver, only=only, **_target_kw(p, kind, value))
        except ValueError as e:
            assert "smallest plan" in str(e)
            continue
        total, bpw = _bytes_of(p, plan)
        if kind == "ratio":
            assert total <= value * p.dense_total_bytes
        elif kind == "bytes":
            assert total <= value
        else:
            assert bpw <= value
        validate(plan, p.linears)
        assert plan.meta["predicted_loss"] == pytest.approx(p.predict(plan).loss)
        assert plan.meta["target"] == {"kind": kind, "value": value}
        for spec in plan.modules.values():
            if only == "rank":
                assert spec.bits is None
            if only == "bits":
                assert spec.rank is None


def test_half_bit_vq_widths_are_allocated_and_round_trip():
    """A vq grid holds 2.5 bits: the predictor reads it exactly (not as 2, the width below it),
    the allocator offers it, and a plan that uses it keeps 2.5 through JSON. (SmolLM2's widths:
    on 64-wide matrices one 4-d codebook of 1,024 centroids costs more bits than the codes.)"""
    p = _predictor(_linears(((576, 576), (192, 576), (1536, 576), (576, 1536))), bits=(2, 2.5, 3, 4), quant="vq")
    t, li = p.grid.table, p.linears[0]
    half = t[(t.name == li.name) & (t.kind == "bits") & (t.setting == 2.5)].dloss.item()
    assert p.dloss(li.name, ModuleSpec(bits=2.5, quant="vq", group_size=32)) == half
    assert p.grid_bits(li.name) == [2, 2.5, 3, 4] and type(p.grid_bits(li.name)[0]) is int
    opts = candidate_options(p, only="bits")
    assert all(2.5 in [o.spec.bits for o in opts[x.name]] for x in p.linears)
    plans = [allocate(p, target_bits=b, only="bits") for b in (2.6, 2.8, 3.0, 3.2, 3.4)]
    used = [s for plan in plans for s in plan.modules.values() if s.bits == 2.5]
    assert used, [sorted(s.bits for s in plan.modules.values()) for plan in plans]
    for plan in plans:
        back = Plan.from_json(plan.to_json())
        assert back.modules == plan.modules and _bytes_of(p, back) == _bytes_of(p, plan)


def test_dense_plan_at_the_dense_size():
    p = _predictor()
    for kw in (dict(target_ratio=1.0), dict(target_bytes=p.dense_total_bytes), dict(target_bits=32.0),
               dict(target_ratio=1.5)):
        plan = allocate(p, **kw)
        assert plan.modules == {} and all(plan.spec_for(li.name).is_dense for li in p.linears)
        assert plan.meta["predicted_loss"] == p.dense_loss
    # negative measured dloss (noise) never makes the allocator compress when dense fits
    pn = _predictor(negative=True)
    assert allocate(pn, target_ratio=1.0).modules == {}


def test_impossible_target_names_the_smallest_reachable_size():
    p = _predictor()
    opts = candidate_options(p)
    smallest = Plan(modules={li.name: min(opts[li.name], key=lambda o: o.delta_bytes).spec for li in p.linears})
    total, bpw = _bytes_of(p, smallest)
    with pytest.raises(ValueError, match=f"{total:,} bytes") as e:
        allocate(p, target_bytes=total - 1)
    assert "ratio" in str(e.value) and "bits per weight" in str(e.value)
    plan = allocate(p, target_bytes=total)  # exactly the smallest is reachable
    assert _bytes_of(p, plan)[0] == total
    with pytest.raises(ValueError, match="smallest plan"):
        allocate(p, target_bits=0.2)
    with pytest.raises(ValueError, match="allow ranks and bits together \\(this allocation changes"):
        allocate(p, target_bits=2.5, only="bits")
    with pytest.raises(ValueError, match="exactly one"):
        allocate(p, target_bits=3.0, target_ratio=0.5)
    for kw, flag in (("target_bits", "--target-bits"), ("target_ratio", "--target-ratio"),
                     ("target_bytes", "--target-bytes")):
        for bad in (float("inf"), float("nan"), 0, -5):
            with pytest.raises(ValueError, match=f"\\({flag}\\) must be a finite positive number, got {bad}"):
                allocate(p, **{kw: bad})
    base = allocate(p, target_ratio=0.5)  # numpy scalars are numbers too
    assert allocate(p, target_ratio=np.float32(0.5)).modules == base.modules
    with pytest.raises(ValueError, match="must be a whole number of bytes, got 10.5"):
        allocate(p, target_bytes=10.5)


def _brute_force(p, opts, kind, value):
    """Least total dloss over every combination of options meeting the target (numpy)."""
    names = [li.name for li in p.linears]
    grids = np.meshgrid(*[np.arange(len(opts[n])) for n in names], indexing="ij")
    picks = [g.ravel() for g in grids]
    d = sum(np.array([o.dloss for o in opts[n]])[k] for n, k in zip(names, picks))
    if kind == "bits":
        w = sum(np.array([o.weight_bytes for o in opts[n]])[k] for n, k in zip(names, picks))
        params = sum(li.out_features * li.in_features for li in p.linears)
        ok = w * 8 / params <= value
    else:
        total = p.dense_total_bytes + sum(np.array([o.delta_bytes for o in opts[n]])[k] for n, k in zip(names, picks))
        ok = total <= (value * p.dense_total_bytes if kind == "ratio" else value)
    if not ok.any():
        return math.inf
    j = int(np.argmin(np.where(ok, d, np.inf)))
    # the option byte counts are plan_size's: check on the winner
    chosen = {n: opts[n][int(k[j])].spec for n, k in zip(names, picks)}
    plan = Plan(modules={n: s for n, s in chosen.items() if not s.is_dense})
    total, bpw = _bytes_of(p, plan)
    assert (bpw <= value) if kind == "bits" else (total <= (value * p.dense_total_bytes if kind == "ratio" else value))
    return float(d[j])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_exact_allocation_matches_brute_force(seed):
    """4 linears x 9 options (dense, 2 ranks, 2 bits, 4 pairs): 6561 plans, all tried."""
    p = _predictor(seed=seed)
    opts = candidate_options(p)
    assert all(len(o) == 9 for o in opts.values())
    p_bytes = p.dense_total_bytes
    targets = TARGETS + [("bytes", p_bytes - 9000), ("bytes", p_bytes - 40000), ("ratio", 0.5)]
    checked = 0
    for kind, value in targets:
        best = _brute_force(p, opts, kind, value)
        if best == math.inf:
            with pytest.raises(ValueError):
                allocate(p, **_target_kw(p, kind, value))
            continue
        plan = allocate(p, solver="exact", **_target_kw(p, kind, value))
        assert plan.meta["solver"] in ("exact", "dense")
        assert p.predict(plan).dloss == pytest.approx(best, abs=1e-9)
        lag = allocate(p, solver="lagrangian", **_target_kw(p, kind, value))
        assert p.predict(lag).dloss >= best - 1e-9  # a heuristic: never better than the optimum
        checked += 1
    assert checked >= 8


def test_act_pca_bias_bytes_are_counted():
    """act-pca adds a bias: the allocator's byte accounting must match plan_size exactly."""
    linears = _linears()
    p = _predictor(linears, method="act-pca")
    for kind, value in TARGETS:
        try:
            plan = allocate(p, **_target_kw(p, kind, value))
        except ValueError:
            continue
        total, bpw = _bytes_of(p, plan)
        assert (bpw <= value) if kind == "bits" else (total <= value * p.dense_total_bytes)
        assert plan.meta["predicted_bytes"] == total


def test_lillama_allocation_keeps_the_grid_method_choices_and_initialises_from_it():
    """``lowrank='lillama'``: the same ranks and bytes as the grid's method (svd-llm, no bias),
    refined by Lillama initialised from that method; the caller's predictor is not changed."""
    p = _predictor()
    ref = allocate(p, target_ratio=0.8, only="rank")
    lil = allocate(p, target_ratio=0.8, only="rank", lowrank="lillama")
    assert p.base_plan.lillama is None
    assert lil.lillama is not None and lil.lillama.init == "svd-llm"
    assert ref.modules and {n: s.rank for n, s in ref.modules.items()} == {n: s.rank for n, s in lil.modules.items()}
    assert {s.lowrank for s in lil.modules.values()} == {"lillama"}
    assert lil.meta["predicted_bytes"] == ref.meta["predicted_bytes"] == _bytes_of(p, lil)[0]
    assert Plan.from_json(lil.to_json()).lillama == lil.lillama
    validate(lil, p.linears)
    with pytest.raises(ValueError, match="unknown low-rank method 'lilama'; use one of .*lillama"):
        allocate(p, target_ratio=0.8, only="rank", lowrank="lilama")
    with pytest.raises(ValueError, match="unknown quantiser 'gtpq'"):
        allocate(p, target_ratio=0.8, quant="gtpq")


def test_lagrangian_on_a_larger_problem_is_fast_and_feasible():
    rng = np.random.default_rng(0)
    shapes = [tuple(int(x) for x in rng.choice([64, 128, 192], 2)) for _ in range(60)]
    linears = [LinearInfo(f"model.layers.{i}.mlp.up_proj", i, "up", "mlp_in", m, n) for i, (m, n) in enumerate(shapes)]
    p = _predictor(linears, ranks=(8, 16, 32), bits=(2, 3, 4, 8))
    plans = [allocate(p, target_ratio=r) for r in (0.9, 0.7, 0.5, 0.35)]
    losses = [p.predict(pl).loss for pl in plans]
    assert all(a <= b + 1e-12 for a, b in zip(losses, losses[1:]))  # a looser target never predicts worse
    for pl, r in zip(plans, (0.9, 0.7, 0.5, 0.35)):
        assert _bytes_of(p, pl)[0] <= r * p.dense_total_bytes


# ---------------------------------------------------------------------------- CLI
def test_cli_allocate_writes_a_loadable_plan_and_refuses_another_model(tmp_path, monkeypatch):
    from analysis.loading import wrap_model
    from analysis.metrics import model_bytes
    from tests.conftest import CharTokenizer, tiny_model

    monkeypatch.setenv("RANKLAB_CACHE", str(tmp_path / "cache"))
    lm = wrap_model(tiny_model("llama"), CharTokenizer(), spec="tiny")
    linears = lm.adapter.linears(lm.model)
    grid = _grid(linears, ranks=(8, 16, 24), bits=(2, 3, 4, 8))
    grid.meta["fingerprint"], grid.meta["dtype"] = lm.fingerprint, "float32"
    grid.save(tmp_path / "sens")
    other = wrap_model(tiny_model("llama", seed=1), CharTokenizer(), spec="other")
    models = {"tiny": lm, "other": other}
    monkeypatch.setattr("analysis.loading.load_model", lambda spec, *a, **k: models[spec])
    from compression.allocate import cli_allocate

    args = Namespace(model="tiny", sensitivity=str(tmp_path / "sens"), target_bytes=None, target_ratio=0.6,
                     target_bits=None, only=None, out=str(tmp_path / "plan.json"), device="cpu", dtype="float32",
                     trust_remote_code=False)
    grid.meta.update(data="t.txt, 4 x 32 tokens", n_tokens=32, windows=1, seqlen=32, device="cpu")
    grid.save(tmp_path / "sens")
    said = []
    out = cli_allocate(args, say=said.append)
    # the perplexity printed carries its protocol: the grid's probe text, not the evaluation text
    assert out["ppl_protocol"] == "on the grid's probe text: t.txt, 4 x 32 tokens, 32 tokens (1 x 32), dloss " \
                                  "estimator, probed on cpu"
    assert any("predicted perplexity" in m and out["ppl_protocol"] in m for m in said)
    plan = Plan.load(tmp_path / "plan.json")
    validate(plan, linears)
    assert out["bytes"] <= 0.6 * model_bytes(lm.model).weight_bytes
    assert sum(out["modules"].values()) == len(linears)
    assert plan.meta["sensitivity_fingerprint"] == lm.fingerprint and "predicted_ppl" in plan.meta
    assert plan.meta["estimator"] == "dloss"  # auto, and this grid has no KL
    assert not any("rank and bits together" in m for m in said)
    # below 2 bits per weight only ranks with quantised factors fit: the note says what such a prediction is worth
    said = []
    tight_args = {**vars(args), "target_ratio": None, "target_bits": 1.5, "out": str(tmp_path / "p1.json")}
    cli_allocate(Namespace(**tight_args), say=said.append)
    tight = Plan.load(tmp_path / "p1.json")
    together = [n for n, s in tight.modules.items() if s.rank is not None and s.bits is not None]
    assert together and any(f"note: {len(together)} linear(s) have a rank and bits together" in m
                            and m.endswith("(--only bits, or --measure-picks)") for m in said)
    with pytest.raises(ValueError, match="another model"):
        cli_allocate(Namespace(**{**vars(args), "model": "other"}), say=lambda m: None)
    models["half"] = wrap_model(tiny_model("llama", dtype=torch.bfloat16), CharTokenizer(), spec="half")
    with pytest.raises(ValueError, match="measured on weights in float32 and this model is loaded in bfloat16.*"
                                         "load it with --dtype float32"):
        cli_allocate(Namespace(**{**vars(args), "model": "half"}), say=lambda m: None)
    said: list[str] = []
    whole = cli_allocate(Namespace(**{**vars(args), "target_ratio": 1.5, "out": str(tmp_path / "p2.json")}),
                         say=said.append)
    assert whole["modules"]["dense"] == len(linears) and any("keeps every module dense" in m for m in said)
    with pytest.raises(ValueError, match="is a folder; the plan is one JSON file"):
        cli_allocate(Namespace(**{**vars(args), "out": str(tmp_path)}), say=lambda m: None)
    # the plan applies with `python -m compression apply --plan` semantics
    from compression.apply import apply_plan

    stats = None
    needs_stats = any(s.rank is not None for s in plan.modules.values())
    if needs_stats:
        from analysis.profile import collect_input_stats
        from analysis.stats import LinearStats

        ids = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(0))
        inputs = collect_input_stats(lm.model, lm.adapter, ids)
        stats = {li.name: LinearStats(inputs[li.input_key]) for li in linears}
    comp, _ = apply_plan(lm.model, lm.adapter, plan, stats)
    assert model_bytes(comp).weight_bytes == out["bytes"]
