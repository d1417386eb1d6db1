"""Latency: real timings on a tiny model, and the note that says what they measure."""
import math

import pytest
import torch

from analysis.loading import wrap_model
from analysis.metrics import UNSTEADY_SPREAD, decode_spread, latency, unsteady_note
from compression.apply import apply_plan
from compression.lowrank import LowRankLinear
from compression.plan import ModuleSpec, Plan
from compression.quant import QuantLinear
from tests.conftest import tiny_model

FAST = dict(seqlen=16, decode_tokens=2, runs=1, warmup=0, prompt_tokens=4)


def test_dense_latency_is_measured_with_no_note():
    lm = wrap_model(tiny_model("llama"))
    lat = latency(lm.model, **FAST)
    assert lat.prefill_tok_s > 0 and lat.decode_ms_per_token > 0
    assert (lat.seqlen, lat.decode_tokens, lat.runs, lat.device, lat.dtype) == (16, 2, 1, "cpu", "float32")
    assert lat.note == ""


def test_latency_keeps_the_range_of_its_runs_around_the_median():
    lm = wrap_model(tiny_model("llama"))
    lat = latency(lm.model, **{**FAST, "runs": 3})
    (p_lo, p_hi), (d_lo, d_hi) = lat.prefill_range, lat.decode_range
    assert 0 < p_lo <= lat.prefill_tok_s <= p_hi
    assert 0 < d_lo <= lat.decode_ms_per_token <= d_hi
    assert lat.spread == d_hi / d_lo >= 1.0


def test_latency_says_how_many_linears_are_dequantised_on_every_call():
    lm = wrap_model(tiny_model("llama"))
    names = [li.name for li in lm.adapter.linears(lm.model)]
    plan = Plan(modules={names[0]: ModuleSpec(bits=4, group_size=32), names[1]: ModuleSpec(bits=8, group_size=32),
                         names[2]: ModuleSpec(rank=8, lowrank="svd")})
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    model, _ = apply_plan(lm.model, lm.adapter, plan)
    kinds = [type(m) for m in model.modules()]
    assert kinds.count(QuantLinear) == 2 and kinds.count(LowRankLinear) == 1
    note = latency(model, **FAST).note
    assert note.startswith("2 quantised weight matrices are unpacked and dequantised on every call"), note
    # a low-rank linear with 4-bit factors holds two quantised matrices
    both, _ = apply_plan(lm.model, lm.adapter,
                         Plan(modules={names[2]: ModuleSpec(rank=8, lowrank="svd", bits=4, group_size=8)}))
    assert latency(both, **FAST).note.startswith("2 quantised weight matrices"), latency(both, **FAST).note
    # a low-rank module runs as two plain matmuls: no note on its own
    only_rank, _ = apply_plan(lm.model, lm.adapter, Plan(modules={names[2]: ModuleSpec(rank=8, lowrank="svd")}))
    assert latency(only_rank, **FAST).note == ""
    after = lm.model.state_dict()  # the dense model is left as it was
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_peak_is_the_measured_work_not_the_process():
    from analysis.metrics import model_bytes, reset_cuda_peak

    model = tiny_model("llama").cuda()
    big = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")  # 256 MiB, freed before the measurement
    del big
    reset_cuda_peak("cuda")
    model(input_ids=torch.zeros(1, 8, dtype=torch.long, device="cuda"))
    peak = model_bytes(model).peak_allocated
    assert model_bytes(model).weight_bytes <= peak < 64 * 2**20


def test_unsteady_timings_are_flagged_only_when_the_runs_disagree():
    assert UNSTEADY_SPREAD == 1.5
    assert decode_spread((10.0, 25.0)) == 2.5 and math.isnan(decode_spread(None))
    assert unsteady_note((10.0, 25.0)).startswith("the decode runs differed 2.5x: the machine was busy")
    assert unsteady_note((10.0, 14.0)) == "" and unsteady_note(None) == "" and unsteady_note((0.0, 3.0)) == ""
    assert unsteady_note((float("nan"), float("nan"))) == ""
