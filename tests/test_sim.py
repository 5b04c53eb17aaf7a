"""The cluster simulator: hand-computed small cases, estimates against exact paths, policies,
error model, workloads and the tool (megatron_probe/sim, tools/simulate.py)."""

import json
import os
import subprocess
import sys

import pytest
import torch

from megatron_probe.policy.cost_model import ExpertCost, HardwareProfile, ModelShape, attention_time_us
from megatron_probe.policy.placement import EMPTY_SLOT, ExpertLayout, holder_slots, validate_split
from megatron_probe.policy.planner import assign_on_truth, plan_probe_host, rank_times, static_assignment
from megatron_probe.policy.split import balanced_split
from megatron_probe.sim.error_model import fit_sigma, forecast_errors, measured_predictor_error, noisy_forecast
from megatron_probe.sim.layer import (
    Topology,
    a2a_us,
    exact_unique_tokens,
    layer_time,
    slot_moves,
    transfer_us,
    unique_tokens,
)
from megatron_probe.sim.models import MODELS, ModelPreset
from megatron_probe.sim.policies import Policies, SimConfig, drop_late, replica_memory, resident_copy_cost
from megatron_probe.sim.simulator import simulate
from megatron_probe.sim.workload import layer_map, make_counts, static_ir, trace_heat

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.normpath(os.path.join(ROOT, "..", "shared", "traces"))

# Hand case: 2 ranks, 4 experts (0,1 on rank 0; 2,3 on rank 1), top-2, 3 tokens per rank.
# rank 0 tokens: (0,1) (0,2) (0,1); rank 1 tokens: (0,3) (1,2) (0,1)
ROUTES = torch.tensor([[0, 1], [0, 2], [0, 1], [0, 3], [1, 2], [0, 1]])
SRC = torch.tensor([0, 0, 0, 1, 1, 1])
COUNTS = torch.tensor([[3, 2, 1, 0], [2, 2, 1, 1]])
HW = HardwareProfile("hand", peak_tflops=1.0, hbm_gbps=1000.0, nvlink_gbps=1.0, ib_gbps=0.5, gpus_per_node=2,
                     gemm_eta_max=1.0, gemm_n_half=10.0, a2a_latency_us=1.0)
SHAPE = ModelShape(hidden=500, expert_hidden=100, num_experts=4, topk=2)
COST = ExpertCost(per_token_us=1.0, per_active_expert_us=10.0)


def test_hand_case_counts_match_routes():
    c = torch.zeros(2, 4, dtype=torch.long)
    for (a, b), s in zip(ROUTES.tolist(), SRC.tolist()):
        c[s, a] += 1
        c[s, b] += 1
    assert torch.equal(c, COUNTS)


def test_exact_volumes_by_hand():
    # rank 0 sends one token ((0,2) to rank 1); rank 1 sends three, (0,1) once though two experts
    send, recv = exact_unique_tokens(ROUTES // 2, SRC, 2)
    assert send.tolist() == [1.0, 3.0] and recv.tolist() == [3.0, 1.0]


def test_unique_token_estimate_by_hand():
    u = unique_tokens(static_assignment(COUNTS, ExpertLayout(4, 2, 0)), COUNTS.sum(1) / 2, 2)
    # 0 -> 1: 1 pair of 6 choices, 3 (1 - (5/6)^2) = 0.9167; 1 -> 0: 4 pairs, 3 (1 - (1/3)^2) = 2.6667
    assert u[0, 1].item() == pytest.approx(3 * (1 - (5 / 6) ** 2))
    assert u[1, 0].item() == pytest.approx(3 * (1 - (1 / 3) ** 2))
    assert u[0, 0] == 0 and u[1, 1] == 0


def test_unique_token_estimate_close_to_exact_on_random_routing():
    gen = torch.Generator().manual_seed(0)
    ep, E, K, T = 4, 32, 4, 2000
    ids = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(ep * T)])
    src = torch.arange(ep).repeat_interleave(T)
    counts = torch.zeros(ep, E, dtype=torch.long)
    counts.index_put_((src.unsqueeze(1).expand_as(ids), ids), torch.ones_like(ids), accumulate=True)
    send, recv = exact_unique_tokens(ids // (E // ep), src, ep)
    u = unique_tokens(static_assignment(counts, ExpertLayout(E, ep, 0)), counts.sum(1) / K, K)
    pairs = static_assignment(counts, ExpertLayout(E, ep, 0)).sum(1).double()
    pairs.fill_diagonal_(0)
    assert float(pairs.sum()) > float(send.sum()) * 1.1  # de-duplication matters here
    assert torch.allclose(u.sum(1), send, rtol=0.05) and torch.allclose(u.sum(0), recv, rtol=0.05)


def test_a2a_link_classes_by_hand():
    u = torch.tensor([[0.0, 1.0], [3.0, 0.0]])
    # one node: NVLink 1 GB/s, worst rank moves 3 tokens x 1000 bytes: 1 us latency + 3 us
    assert a2a_us(HW, Topology(1, 2), u, 1000.0) == pytest.approx(4.0)
    # two nodes of one GPU: InfiniBand 0.5 GB/s: 1 + 6 us
    assert a2a_us(HW, Topology(2, 1), u, 1000.0) == pytest.approx(7.0)


def test_layer_time_by_hand():
    assign = static_assignment(COUNTS, ExpertLayout(4, 2, 0))
    r = layer_time(HW, SHAPE, Topology(1, 2), COST, COUNTS, assign, context=4)
    # attention of 3 tokens: 3 (8 * 500^2 + 4 * 500 * 4) FLOPs at 1 TFLOP/s = 6.024 us (> 2.024 us of reads)
    assert r["attn_us"] == pytest.approx(6.024)
    assert r["attn_us"] == pytest.approx(attention_time_us(HW, SHAPE, 3, 4))
    # rank 0 computes experts 0,1: 5 + 4 = 9 tokens, 2 active -> 29 us; rank 1: 3 tokens, 2 active -> 23 us
    assert r["comp_us"] == pytest.approx(29.0) and r["comp_mean_us"] == pytest.approx(26.0)
    a2a = 1.0 + 3 * (1 - (1 / 3) ** 2) * 1000 / 1e9 * 1e6
    assert r["dispatch_us"] == pytest.approx(a2a) and r["combine_us"] == pytest.approx(a2a)
    assert r["total_us"] == pytest.approx(6.024 + 2 * a2a + 29.0)
    assert r["ir"] == pytest.approx(9 / 6)


def test_transfer_time_and_late_copies_by_hand():
    lay = ExpertLayout(4, 2, 1)
    pl = torch.tensor([[EMPTY_SLOT], [0]])  # rank 1 holds a copy of expert 0 (home rank 0)
    # expert bytes 3 * 500 * 100 * 2 = 300 kB: 300 us over NVLink at 1 GB/s, 600 us over IB at 0.5
    assert transfer_us(HW, SHAPE, Topology(1, 2), slot_moves(pl, lay)).tolist() == pytest.approx([300.0, 300.0])
    assert transfer_us(HW, SHAPE, Topology(2, 1), slot_moves(pl, lay)).tolist() == pytest.approx([600.0, 600.0])
    assert transfer_us(HW, SHAPE, Topology(1, 2), slot_moves(pl, lay), link="ib").tolist() == pytest.approx([600.0, 600.0])
    model = ModelPreset("hand", 1, SHAPE, "test")
    for topo, kept in ((Topology(1, 2), True), (Topology(2, 1), False)):
        out = drop_late(pl, lay, SimConfig(HW, model, topo), window_us=400.0)
        assert (int(out[1, 0]) == 0) == kept


def _skewed_counts(steps=4, layers=2, ep=4, E=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    p = torch.tensor([8.0, 6.0] + [1.0] * (E - 2))
    return torch.stack([torch.stack([torch.stack([torch.multinomial(p, 400, replacement=True, generator=gen)
                                                  .bincount(minlength=E) for _ in range(ep)])
                                     for _ in range(layers)]) for _ in range(steps)])


def _cfg(ep=4, E=16, **kw):
    hw = HardwareProfile("t", 100.0, 2000.0, 200.0, 20.0, gpus_per_node=ep, a2a_latency_us=5.0)
    model = ModelPreset("t", 4, ModelShape(hidden=1024, expert_hidden=512, num_experts=E, topk=2), "test")
    return SimConfig(hw, model, Topology(1, ep), context=256, **kw)


def test_policies_balance_and_never_lose_tokens():
    counts = _skewed_counts()
    cfg = _cfg()
    pol = Policies(cfg, 2, ("static", "probe", "ours", "ours-resident", "oracle"), 3, 3)
    for name in ("static", "probe", "ours", "ours-resident", "oracle", "ours-noplan"):
        plan = pol.plan(name, 0, counts[0, 0], noisy_forecast(counts[0, 0], 0.2, torch.Generator()), 1e9)
        if name == "oracle":
            continue  # its placement is internal; its assignment is checked through the IR below
        holds = torch.zeros(4, 16, dtype=torch.bool)
        holds[torch.arange(16) // 4, torch.arange(16)] = True
        for dst, src, e in plan.moves:
            assert src == e // 4 and not holds[dst, e]  # a copy comes from the home rank, once
            holds[dst, e] = True
        validate_split(plan.assign, counts[0, 0], holds)
    r = simulate(counts, cfg, ("static", "probe", "ours", "oracle"))
    p = r["policies"]
    assert p["static"]["ir"] > 1.5
    assert p["ours"]["ir"] < p["static"]["ir"] - 0.3 and p["oracle"]["ir"] <= p["ours"]["ir"] + 1e-9
    assert p["ours"]["mean_step_us"] < p["static"]["mean_step_us"]
    assert p["oracle"]["mean_step_us"] <= p["ours"]["mean_step_us"] + 1e-6


def test_probe_exposes_a_transfer_that_misses_the_window_and_ours_drops_it(monkeypatch):
    counts = _skewed_counts(steps=2, layers=2)
    cfg = _cfg()
    cfg = SimConfig(cfg.hw, cfg.model, cfg.topo, context=cfg.context, transfer_link="ib", sigma=0.0)
    # force a budget of 3 copies although IB copies (3 x 1 MiB x 3 / 20 GB/s = 157 us each) miss a ~60 us window
    from megatron_probe.sim import simulator

    monkeypatch.setattr(simulator, "budgets", lambda c, w: (3, 3))
    r = simulate(counts, cfg, ("static", "probe", "ours", "ours-naive"))
    p = r["policies"]
    assert p["probe"]["exposed_us"] > 0 and p["probe"]["copies"] > 0
    assert p["ours"]["exposed_us"] == 0 and p["ours"]["copies"] < p["probe"]["copies"]
    assert p["ours-naive"]["a2a_extra_us"] > 0 and p["ours"]["a2a_extra_us"] == 0


def test_eplb_warms_up_then_charges_its_rebalance_over_two_steps():
    counts = _skewed_counts(steps=6, layers=2)
    cfg = SimConfig(**{**_cfg().__dict__, "eplb_period": 2, "eplb_window": 2})
    r = simulate(counts, cfg, ("eplb", "eplb-same"), keep_layers=True)
    assert r["layers"]["eplb-same"][4]["copies"] >= r["layers"]["eplb"][4]["copies"] > 0  # more slots, more copies
    scale = r["layer_scale"]
    layer_sum = [0.0] * 6
    for row in r["layers"]["eplb"]:
        layer_sum[row["step"]] += row["total_us"] * scale
    extra = [s - t for s, t in zip(r["policies"]["eplb"]["step_us"], layer_sum)]
    copies = [0] * 6
    for row in r["layers"]["eplb"]:
        copies[row["step"]] += row["copies"]
    assert copies[0] == copies[1] == 0 and copies[2] > 0  # warm-up: no replica before the first period
    assert extra[0] == extra[1] == extra[2] == pytest.approx(0.0)
    assert extra[3] > 0 and extra[3] == pytest.approx(extra[4])  # spread over the next 2 steps


def test_error_model_fits_the_target_and_reads_the_measured_file():
    meas = measured_predictor_error()
    assert meas["file"] == os.path.join("results", "predictor", "eval_shift_ep8.json")
    assert 0 < meas["rank_load_err"] < 1 and meas["ep"] == 8
    counts = _skewed_counts(steps=6, layers=1, ep=8).flatten(0, 1)
    assert torch.equal(noisy_forecast(counts[0], 0.0, torch.Generator()), counts[0])
    sigma = fit_sigma(counts, 0.05, ep=8)
    assert forecast_errors(counts, sigma, 8)["rank_load_err"] == pytest.approx(0.05, rel=0.05)
    assert forecast_errors(counts, 2 * sigma, 8)["rank_load_err"] > 0.05


def test_model_presets_match_the_published_shapes():
    # expert sizes as in notes/peers.md: GPT-OSS BF16 49.8 MB, Qwen3-235B BF16 37.7 MB, DeepSeek-V3 FP8 44 MB
    mb = {k: m.shape.expert_bytes / 1e6 for k, m in MODELS.items()}
    assert mb["gpt-oss-120b"] == pytest.approx(49.8, abs=0.05)
    assert mb["qwen3-235b-a22b"] == pytest.approx(37.7, abs=0.05)
    assert mb["deepseek-v3"] == pytest.approx(44.0, abs=0.1)
    assert [(m.moe_layers, m.shape.num_experts, m.shape.topk) for m in MODELS.values()] == [
        (36, 128, 4), (94, 128, 8), (58, 256, 8)]


def test_workload_generator_shapes_and_layer_map():
    assert layer_map(36, 4, 48) == [(0, 0), (12, 16), (23, 30), (35, 46)]
    heat = torch.rand(6, 16) * 100
    c = make_counts(heat.long(), [0, 3], topk=2, steps=3, tokens_per_rank=64, ep=4, alpha=0.5,
                    requests_per_rank=2).counts
    assert c.shape == (3, 2, 4, 16)
    assert (c.sum(-1) == 64 * 2).all()  # every rank routes tokens x k pairs
    assert static_ir(c) >= 1.0


@pytest.mark.skipif(not os.path.isdir(SHARED), reason="../shared/traces not present")
def test_trace_heat_folds_experts():
    path = os.path.join(SHARED, "mbolt", "coactivation_qwen3-next-80b-a3b.json")
    full, _ = trace_heat(path, 512)
    folded, label = trace_heat(path, 256)
    assert folded.shape == (full.shape[0], 256) and torch.equal(folded.sum(1), full.sum(1))
    assert "512 -> 256" in label and "MIT" in label
    with pytest.raises(ValueError):
        trace_heat(path, 384)


@pytest.mark.skipif(not os.path.isdir(SHARED), reason="../shared/traces not present")
def test_simulate_cli_small(tmp_path):
    out = tmp_path / "s.json"
    cmd = [sys.executable, os.path.join(ROOT, "tools", "simulate.py"), "--preset", "paper-gpt-oss", "--sim-layers", "2",
           "--decode-batches", "64", "--decode-steps", "8", "--switch-step", "5", "--eplb-window", "3",
           "--eplb-period", "3", "--prefill-chunks", "256",
           "--prefill-steps", "1", "--ablation-steps", "3", "--skip", "repeat", "--multinode", "2",
           "--multinode-steps", "2", "--json", str(out)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "SIMULATION" in p.stdout
    res = json.loads(out.read_text())
    for k in ("prefill_speedup_vs_static", "decode_speedup_vs_eplb", "decode_speedup_vs_eplb_same", "ir_static",
              "ir_probe"):
        assert isinstance(res[k], float), k
    by_phase = res["decode"]["64"]["throughput_by_phase"]
    assert set(by_phase) == {"warmup", "stationary", "after_shift", "all", "headline"}
    assert "eplb-same" in by_phase["headline"] and "ours-resident" in by_phase["headline"]
    dec = res["decode"]["64"]
    assert isinstance(dec["ours_resident_vs_eplb_same"], float) and isinstance(dec["ours_vs_probe"], float)
    mem = dec["replica_memory_experts_per_rank"]
    assert mem["ours-resident"] == mem["eplb-same"] == 3 * 36 and mem["ours"] == mem["probe"] == 6
    assert set(dec["copies_per_layer_step"]) >= {"probe", "ours", "eplb-same", "ours-resident"}
    assert res["budgets"]["resident"]["reference"] == "eplb-same" and res["budgets"]["streamed"]["ours"] == "ours"
    assert "streamed budget" in p.stdout and "resident budget" in p.stdout
    bad = subprocess.run(cmd[:-2] + ["--switch-step", "6"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "falls on an EPLB rebalance step [3, 6]" in bad.stderr
    assert res["label"].startswith("SIMULATION") and "GENERATED" in res["data"]
    assert res["ir_static"] > res["ir_probe"]
    assert set(res["multinode"]["2"]) == {"decode", "prefill"}


def test_validate_sim_times_a_bench_layer_like_the_hand_case():
    import importlib.util

    spec = importlib.util.spec_from_file_location("validate_sim", os.path.join(ROOT, "tools", "validate_sim.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    bench = {"ep": 2, "replica_slots": 1, "expert_cost_us": {"per_token": 1.0, "per_active_expert": 10.0},
             "copy_charge_us": 1e6}
    t = mod.simulate_bench(bench, [[COUNTS]], HW, SHAPE)
    a2a = 1.0 + 3 * (1 - (1 / 3) ** 2) * 1000 / 1e9 * 1e6
    assert t["static"] == [pytest.approx((2 * a2a + 29.0) / 1e3)]  # no attention: the bench blocks are MoE only
    assert t["oracle"][0] <= t["static"][0]
    assert t["probe_plan_copies"] == 0  # a copy charged 1 s never pays


def test_ours_link_keeps_the_better_of_the_two_budgets_on_a_perfect_forecast(monkeypatch):
    from megatron_probe.sim import simulator

    counts = _skewed_counts(steps=2, layers=2)
    base = _cfg()
    cfg = SimConfig(base.hw, base.model, Topology(2, 2), context=base.context, sigma=0.0)
    monkeypatch.setattr(simulator, "budgets", lambda c, w: (1, 3))
    r = simulate(counts, cfg, ("ours", "ours-link"), keep_layers=True)
    rows = r["layers"]
    for a, b in zip(rows["ours"], rows["ours-link"]):
        # the budget-3 plan (ours) is one of the two candidates, judged on dispatch + experts + combine
        assert b["dispatch_us"] + b["comp_us"] + b["combine_us"] <= a["dispatch_us"] + a["comp_us"] + \
            a["combine_us"] + 1e-9
    assert r["policies"]["ours-link"]["mean_step_us"] <= r["policies"]["ours"]["mean_step_us"] * 1.05


def test_ours_resident_copies_only_when_its_placement_changes():
    cfg = _cfg()
    const = _skewed_counts(steps=1, layers=1)[0, 0]
    pol = Policies(cfg, 1, ("ours-resident",), 3, 3)
    planner = pol.state.resident[0]
    copies = []
    for s in range(8):
        P = noisy_forecast(const, 0.1, torch.Generator().manual_seed(s))
        before = holder_slots(planner.placement, pol.lay) >= 0
        plan = pol.plan("ours-resident", 0, const, P, 1e9)
        after = holder_slots(planner.placement, pol.lay) >= 0
        gained = {(d, e) for d, e in (after & ~before).nonzero().tolist()}
        assert {(d, e) for d, _, e in plan.moves} == gained  # exactly the new (rank, expert) pairs
        assert all(src == e // 4 for _, src, e in plan.moves)  # sent by the home rank
        validate_split(plan.assign, const, after)
        copies.append(plan.copies)
    assert copies[0] > 0 and copies[1:] == [0] * 7  # warm start, then a constant load never moves it
    r = simulate(const.expand(10, 2, -1, -1).clone(), cfg, ("eplb-same", "ours-resident"), keep_layers=True)
    rows = r["layers"]["ours-resident"]
    assert sum(x["copies"] for x in rows if x["step"] == 0) > 0 and all(x["copies"] == 0 for x in rows if x["step"])
    assert r["policies"]["ours-resident"]["replica_memory_experts_per_rank"] == cfg.replica_slots * 4
    assert r["policies"]["eplb-same"]["replica_memory_experts_per_rank"] == replica_memory(cfg, "ours-resident")


def test_ours_resident_waits_for_a_late_copy_and_its_planner_prices_it():
    base = _cfg()
    cfg = SimConfig(base.hw, base.model, base.topo, context=base.context, transfer_link="ib", sigma=0.0)
    assert resident_copy_cost(base, 1e9) == 0.0  # fits the window: nothing to pay
    counts = _skewed_counts(steps=3, layers=2)
    r = simulate(counts, cfg, ("ours-resident",), keep_layers=True)
    first = [x for x in r["layers"]["ours-resident"] if x["step"] == 0]
    # the warm start's IB copies (~157 us each) miss the ~60 us window: waited for, not dropped
    assert all(x["copies"] > 0 and x["exposed_us"] > 0 for x in first)
    pol = Policies(cfg, 1, ("ours-resident",), 0, 0, window_est_us=60.0)
    assert pol.state.resident[0].settings.copy_cost_us == pytest.approx(resident_copy_cost(cfg, 60.0))
    assert resident_copy_cost(cfg, 60.0) > 0


def test_balanced_split_against_the_greedy_resplit_on_ours_placement():
    # not "never slower": on the GPT-OSS decode workload the balanced split was slower than
    # assign_on_truth in 10 of 320 layers, by at most 0.6% (mean 2.5% faster); here: bounded
    pol = Policies(_cfg(), 1, ("ours",), 3, 3)
    cost, lay = pol.cost, pol.lay  # the policy's own ExpertCost and layout
    gains = []
    for seed in range(6):
        counts = _skewed_counts(steps=2, layers=2, seed=seed)
        for C in counts.flatten(0, 1):
            P = noisy_forecast(C, 0.2, torch.Generator().manual_seed(seed))
            pl, _ = plan_probe_host(P, lay, cost, budget_in=3)
            greedy = float(rank_times(assign_on_truth(C, pl, lay, cost), cost).max())
            ours = float(rank_times(balanced_split(C, holder_slots(pl, lay) >= 0, "time", cost), cost).max())
            assert ours <= greedy * 1.01
            gains.append(ours / greedy)
    assert sum(gains) / len(gains) < 1.0


def test_bad_policy_names_raise():
    with pytest.raises(ValueError, match="unknown policy 'ours_resident'"):
        simulate(_skewed_counts(steps=1, layers=1), _cfg(), ("ours", "ours_resident"))
    with pytest.raises(ValueError, match="unknown policy"):
        Policies(_cfg(), 1, ("nope",), 3, 3)


def test_control_path_charge_slows_planners_only():
    counts = _skewed_counts(steps=3, layers=2)
    names = ("static", "eplb", "probe", "ours", "ours-resident", "oracle")
    free = simulate(counts, _cfg(), names)["policies"]
    host = simulate(counts, _cfg(control="host"), names)["policies"]
    for n in ("static", "oracle", "eplb"):
        assert host[n]["mean_step_us"] <= free[n]["mean_step_us"] + 1e-9
    for n in ("probe", "ours", "ours-resident"):
        assert host[n]["mean_step_us"] > free[n]["mean_step_us"]
        assert host[n]["step_us_nocontrol"] == pytest.approx(free[n]["step_us"])  # additive: same run beneath
    assert host["ours"]["control_us_per_layer"] > host["probe"]["control_us_per_layer"]  # ours also splits


def test_control_bad_values_and_unmeasured_gpu_pieces_raise():
    with pytest.raises(ValueError, match=r"unknown control 'cpu'; valid: \('none', 'host', 'gpu'\)"):
        _cfg(control="cpu")
    counts = _skewed_counts(steps=1, layers=1)
    with pytest.raises(ValueError, match="ours-resident"):
        simulate(counts, _cfg(control="gpu"), ("ours", "ours-resident"))
    gpu = simulate(counts, _cfg(control="gpu"), ("probe",))["policies"]["probe"]
    host = simulate(counts, _cfg(control="host"), ("probe",))["policies"]["probe"]
    assert gpu["control_us_per_layer"] > host["control_us_per_layer"]  # the measured graph replay is slower
