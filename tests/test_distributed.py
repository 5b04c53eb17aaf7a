"""Multi-process tests over gloo: EP = 1, 2 and 4."""

import dataclasses
import json
import re

import pytest

import dist_workers
from megatron_probe.integration.equivalence import EquivalenceOptions
from megatron_probe.integration.launch import run_distributed


def _run(fn, ws, tmp_path, *args):
    run_distributed(fn, ws, *args, str(tmp_path), backend="gloo")
    out = {}
    for r in range(ws):
        p = tmp_path / f"rank{r}.json"
        if p.exists():
            out[r] = json.loads(p.read_text())
    return out


@pytest.mark.slow
@pytest.mark.parametrize(
    "ep, experts, topk, slots, trials, dtype",
    [
        (1, 8, 2, 0, 14, "fp32"),
        (2, 8, 2, 2, 28, "fp32"),
        (2, 8, 2, 3, 14, "bf16"),
        (4, 16, 4, 3, 14, "fp32"),
        (4, 8, 1, 6, 7, "fp32"),  # every foreign expert replicated on every rank
    ],
)
def test_equivalence_random_and_adversarial(tmp_path, ep, experts, topk, slots, trials, dtype):
    opts = EquivalenceOptions(ep=ep, experts=experts, topk=topk, replica_slots=slots, trials=trials,
                              dtype=dtype, seed=11 + ep + slots)
    res = _run(dist_workers.equivalence, ep, tmp_path, dataclasses.asdict(opts))[0]
    assert res["trials"] == trials
    bad = [c for c in res["cases"] if not c["passed"]]
    assert not bad, bad
    assert res["passed"]
    cases = {c["case"] for c in res["cases"]}
    assert {"one_expert", "hot_rank", "rank_silent", "empty", "uniform"} <= cases
    if slots:
        assert any(c["replicas"] > 0 and c["assignment"] == "random" for c in res["cases"])
    assert res["compared_with_stock"] == trials
    if ep == 1:  # same grouping of tokens as the stock layer: bit-exact
        assert res["bit_exact_vs_stock"] == trials


@pytest.mark.slow
@pytest.mark.parametrize("ws", [1, 2])
def test_checkpoint_roundtrip(tmp_path, ws):
    res = _run(dist_workers.checkpoint_roundtrip, ws, tmp_path)
    for r in range(ws):
        d = res[r]
        assert d["same_keys"] and d["same_shapes"] and d["no_bank_keys"], d
        assert d["stock_to_probe_equal"] and d["bank_is_loaded_weights"], d
        assert d["probe_to_stock_equal"], d
        assert d["shape_error"] and "size mismatch" in d["shape_error"], d
        assert d["model_error"] and "checkpoint is from another model" in d["model_error"], d


@pytest.mark.slow
@pytest.mark.parametrize("ws", [1, 2])
def test_gpt_model(tmp_path, ws):
    res = _run(dist_workers.gpt_model_equivalence, ws, tmp_path)
    for r in range(ws):
        d = res[r]
        if ws == 1:
            assert d["same_keys"] and d["bit_exact"], d
        else:
            assert d["layer_types"] == ["ProbeMoELayer"]
            assert d["max_abs"] <= 1e-5 * d["scale"], d


@pytest.mark.slow
@pytest.mark.parametrize("ws", [2, 4])
def test_replica_bank(tmp_path, ws):
    res = _run(dist_workers.bank_fill, ws, tmp_path)
    for r in range(ws):
        d = res[r]
        assert all(m["correct"] for m in d["moves"]), d
        assert d["moves"][-1]["moved"] == 0, d  # unchanged placement moves nothing
        assert d["replica_bytes"] == 3 * d["expert_bytes"] > 0
        assert d["native_is_view"] and d["after_to_bf16_view"] and d["replica_kept"], d
        assert d["after_to_bf16_dtype"] == "torch.bfloat16"
        assert d["swap_noticed"], d


@pytest.mark.slow
def test_bad_inputs_distributed(tmp_path):
    res = _run(dist_workers.bad_inputs, 2, tmp_path)
    for r in range(2):
        d = res[r]
        assert "exceeds the 4 experts that other ranks own" in d["too_many_slots"]
        assert "moe_router_topk=9" in d["topk_gt_experts"]
        assert "= 9 names no expert" in d["placement_bad_expert"]
        assert "slot that does not exist" in d["placement_bad_slot"]
        assert "already owns" in d["placement_own_expert"]
        assert "assignment loses tokens" in d["assign_lose"]
        assert "assignment duplicates tokens" in d["assign_dup"]
        assert re.search(r"holds no copy of expert [467] ", d["assign_stray"]), d["assign_stray"]
        assert d["forward_after_errors"] == [64, 1, 32]
        assert "replicated experts are for inference" in d["grad_with_replicas"]


@pytest.mark.slow
def test_expert_gradients(tmp_path):
    res = _run(dist_workers.expert_grads, 2, tmp_path)
    for r in range(2):
        assert res[r]["max_grad_err"] < 1e-5, res[r]
        assert res[r]["input_grad"]


@pytest.mark.slow
def test_planner_identical_on_every_rank(tmp_path):
    res = _run(dist_workers.planner_determinism, 2, tmp_path)
    for r in range(2):
        assert res[r]["identical"] and res[r]["replicas"] > 0, res[r]


@pytest.mark.slow
@pytest.mark.parametrize("ws", [2, 4])
def test_lookahead_counts_all_gathered_and_output_unchanged(tmp_path, ws):
    res = _run(dist_workers.lookahead_counts, ws, tmp_path)
    assert len(res) == ws
    for r in range(ws):
        d = res[r]
        assert d["same_output"] and d["rows_ok"] and d["sums_ok"], d
        assert d["checked"] == 3 * 3 and d["updates"] == 3, d
        assert 0 < d["topk_acc"] <= 1, d


@pytest.mark.slow
@pytest.mark.parametrize("ws", [2, 4])
def test_transfer_engine_chunks_pause_and_arrive_exact(tmp_path, ws):
    res = _run(dist_workers.transfer_engine, ws, tmp_path)
    assert len(res) == ws
    for r in range(ws):
        for rnd, d in res[r]["rounds"].items():
            assert d["done"] and d["exact"] and d["bytes_ok"] and d["all_flags"], (r, rnd, d)
            if d["involved"]:
                assert not d["finished_while_paused"], (r, rnd, d)  # paused: no chunk moved
        e = res[r]["errors"]
        assert "same source and destination" in e["same_rank"]
        assert "given no tensors" in e["no_tensors"]
        assert "contiguous" in e["non_contiguous"]


@pytest.mark.slow
@pytest.mark.parametrize("ws", [2, 4])
def test_live_pipeline_never_changes_the_output(tmp_path, ws):
    res = _run(dist_workers.pipeline_equivalence, ws, tmp_path)
    assert len(res) == ws
    for r in range(ws):
        d = res[r]
        assert d["after_close_equal"], d
        for name in ("full", "all_dropped", "no_predict", "no_reassign", "no_phase_lock", "no_plan", "slow_rank"):
            v = d[name]
            assert v["max_abs"] <= 1e-5 * v["scale"], (name, v)
            assert v["rows"] == 4 * 4, (name, v)  # 4 steps x 4 layers
            assert v["memory"] == 2 * 2 * v["expert_bytes"], v  # 2 banks x R=2, whatever the layers
        assert d["full"]["copies"] > 0 and d["full"]["dropped"] == 0, d["full"]
        assert d["all_dropped"]["copies"] > 0 and d["all_dropped"]["dropped"] == d["all_dropped"]["copies"]
        assert d["no_plan"]["copies"] == 0
        assert 0 < d["slow_rank"]["dropped"] < d["slow_rank"]["copies"], d["slow_rank"]  # some, not all
        assert d["no_predict"]["copies"] > 0  # from the second step on, last step's counts
        assert d["full"]["ir_after"] <= d["full"]["ir_before"], d["full"]
