#!/usr/bin/env python3
"""SIMULATION of expert-parallel MoE inference at cluster scale: static EP, EPLB, PROBE as
published, ours (streamed and resident), oracle; the paper-style table, the switch plot and the ablations.

Nothing here is measured on a cluster: times come from the project's cost model
(megatron_probe/policy/cost_model.py) on a hardware preset, plans from the project's planner and
EPLB code, routing from public traces (../shared/traces) through the documented generator
(megatron_probe/data/generator.py), the forecast from an error model fitted to the measured
predictor evaluation (results/predictor). See docs/simulator.md.

  python tools/simulate.py --preset paper-gpt-oss --out-dir results/sim/paper-gpt-oss
  python tools/simulate.py --preset paper-qwen3 --nodes 2 --json /tmp/q.json
"""

import argparse
import datetime
import json
import os
import platform
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import torch

from megatron_probe.data.generator import fit_alpha, observed_request_skew
from megatron_probe.data.traces import load_any
from megatron_probe.policy.cost_model import get_profile
from megatron_probe.policy.evaluation import Phases, eplb_rebalance_steps
from megatron_probe.sim import error_model as em
from megatron_probe.sim.control import check_measurements
from megatron_probe.sim.layer import Topology
from megatron_probe.sim.models import get_model
from megatron_probe.sim.policies import SimConfig
from megatron_probe.sim.simulator import simulate
from megatron_probe.sim.workload import calibrate_alpha, layer_map, make_counts, static_ir, trace_heat

TRACES = os.path.normpath(os.path.join(ROOT, "..", "shared", "traces"))
PRESETS = {
    # the paper's evaluation: 1 node of 8 H200-class GPUs, ep 8, BF16
    "paper-gpt-oss": dict(model="gpt-oss-120b", hw="h200-sxm", heat="mbolt/coactivation_qwen3-30b-a3b.json"),
    "paper-qwen3": dict(model="qwen3-235b-a22b", hw="h200-sxm", heat="mbolt/coactivation_qwen3-30b-a3b.json"),
    "deepseek-v3": dict(model="deepseek-v3", hw="h200-sxm", heat="mbolt/coactivation_qwen3-next-80b-a3b.json"),
}
PAPER_IR = 2.13  # GPT-OSS, per-rank batch 768, ep 8 (the paper's IR before balancing)
LABEL = "SIMULATION (cost model + planner code on generated routing; not a measurement)"


def log(lines, msg=""):
    print(msg, flush=True)
    lines.append(msg)


def ratio(a, b):
    return round(a / b, 4) if b > 0 else None



def build_parser():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="paper-gpt-oss")
    p.add_argument("--hardware", default=None, help="hardware preset or JSON (default: the preset's)")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--skew", choices=("paper", "trace"), default="paper",
                   help="paper: alpha chosen so that static IR at the first decode batch matches the paper's 2.13; "
                        "trace: alpha fitted to the per-token public trace (generator.fit_alpha)")
    p.add_argument("--requests-per-rank", type=int, default=2, help="generator request groups per rank per step")
    p.add_argument("--sim-layers", type=int, default=8, help="model layers simulated (spread evenly; time scaled)")
    p.add_argument("--decode-batches", default="512,768,1024,1536")
    p.add_argument("--decode-steps", type=int, default=500)
    p.add_argument("--switch-step", type=int, default=200)
    p.add_argument("--decode-context", type=int, default=512)
    p.add_argument("--prefill-chunks", default="8192,16384")
    p.add_argument("--prefill-steps", type=int, default=6)
    p.add_argument("--ablation-steps", type=int, default=150)
    p.add_argument("--multinode", default="", help="comma list of node counts for the multi-node sweep, e.g. 1,2,4,8")
    p.add_argument("--multinode-steps", type=int, default=60)
    p.add_argument("--skip", default="", help="comma list of sections to skip: prefill,decode,repeat,ablations")
    p.add_argument("--predictor-eval", default=None, help="measured predictor evaluation JSON (default: "
                   "results/predictor/eval_shift_ep8.json)")
    p.add_argument("--eplb-window", type=int, default=100,
                   help="EPLB's statistics window (vLLM's 1000 scaled by 1/10); its first rebalance comes after it")
    p.add_argument("--eplb-period", type=int, default=300, help="steps between EPLB rebalances (vLLM's 3000 / 10)")
    p.add_argument("--eplb-split", choices=("even", "local_first"), default="even",
                   help="EPLB's runtime split: even (vLLM) or local_first (SGLang static dispatch)")
    p.add_argument("--control", choices=("none", "host", "gpu", "both"), default="none",
                   help="charge the control path (planner + split + count exchange + forecast, sim/control.py) in "
                        "the decode table: host / gpu planner prices; both: host-charged beside uncharged")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    p.add_argument("--out-dir", default=None, help="write simulate.json, simulate.txt and switch.png here")
    return p


def int_list(text):
    """A comma list of integers ("" gives [])."""
    return [int(x) for x in text.split(",") if x]


def utc_date():
    return datetime.datetime.utcnow().strftime("%Y-%m-%d %H:%M UTC")


def check_args(p, a, shape, topo):
    """The checks argparse cannot make (p.error exits 2 with the message); returns EPLB's rebalance steps."""
    if shape.num_experts % topo.ep:
        p.error(f"{shape.num_experts} experts are not divisible by ep={topo.ep}")
    if a.control == "gpu" and "decode" not in a.skip.split(","):
        p.error("--control gpu: the decode table has ours-resident, whose planner was not measured on GPU "
                "(results/gpu_planner_2026-11-28_h200 has only the PROBE planner); use --control host or both")
    rebalances = eplb_rebalance_steps(a.decode_steps, a.eplb_window, a.eplb_period)
    if a.switch_step in rebalances:
        p.error(f"--switch-step {a.switch_step} falls on an EPLB rebalance step {rebalances}; place it between them")
    if not 0 < a.eplb_window < min(a.switch_step, a.decode_steps):
        p.error(f"--eplb-window {a.eplb_window} must end before the switch (step {a.switch_step}) and the run")
    return rebalances


class Run:
    """What every section needs: the arguments, model, hardware, topology, trace heat and simulated layers, the
    workload's skew (alpha) and the forecast error model (sigma); the log lines and the result they add to."""

    def __init__(self, a, model, hw, topo, rebalances, batches, chunks):
        self.a, self.model, self.hw, self.topo, self.ep = a, model, hw, topo, topo.ep
        self.shape = model.shape
        self.rebalances, self.batches, self.chunks = rebalances, batches, chunks
        self.lines = []
        self.res = {}
        self.heat_path = os.path.join(TRACES, PRESETS[a.preset]["heat"])
        self.heat, self.heat_label = trace_heat(self.heat_path, self.shape.num_experts)
        self.lmap = layer_map(model.moe_layers, a.sim_layers, self.heat.shape[0])
        self.hl = [h for _, h in self.lmap]
        self.model_layers = [m for m, _ in self.lmap]
        self.alpha = self.sigma = self.meas = self.forecast_errors = None

    def log(self, msg=""):
        log(self.lines, msg)

    def counts_for(self, tokens, steps, request_steps, shift=None, rpr=None, seed_off=0, topo=None):
        """Generated routing counts [steps, layers, ranks, experts] for this run's heat, layers and skew."""
        topo = self.topo if topo is None else topo
        return make_counts(self.heat, self.hl, self.shape.topk, steps, tokens, topo.ep, self.alpha,
                           rpr or self.a.requests_per_rank, request_steps=request_steps, shift_step=shift,
                           seed=self.a.seed + seed_off, source=self.heat_path).counts

    def cfg_for(self, **kw):
        """The simulator's configuration for this run, with the given fields replaced."""
        a = self.a
        base = dict(hw=self.hw, model=self.model, topo=self.topo, sigma=self.sigma, seed=a.seed,
                    eplb_window=a.eplb_window, eplb_period=a.eplb_period, eplb_split=a.eplb_split)
        base.update(kw)
        return SimConfig(**base)


def policy_summary(r, names):
    """The simulator's per-policy summary without the per-step times, floats rounded."""
    return {n: {k: (round(v, 4) if isinstance(v, float) else v) for k, v in r["policies"][n].items()
                if k not in ("step_us", "step_us_nocontrol")} for n in names}


def speedups(base_us, r, names):
    """Each policy's speedup over a step time of base_us."""
    return {n: ratio(base_us, r["policies"][n]["mean_step_us"]) for n in names}


def tok_per_s(tokens, step_us):
    return tokens / (step_us * 1e-6)


def mean_throughput(r, names, steps, tokens):
    """Each policy's tokens/s over the given steps: tokens per step over the mean step time."""
    return {n: tok_per_s(tokens, sum(r["policies"][n]["step_us"][i] for i in steps) / len(steps)) for n in names}


# ---- the run context

def build_run(p, a):
    """Load the model and hardware, check the arguments, read the heat; log the header, choose the workload's
    skew and fit the forecast error model."""
    pre = PRESETS[a.preset]
    model = get_model(pre["model"])
    try:  # the input files (hardware profile, predictor evaluation, measurements), checked before any work
        hw = get_profile(a.hardware or pre["hw"])
        meas_path = a.predictor_eval or em.DEFAULT_EVAL
        em.measured_predictor_error(meas_path)
        if "ablations" not in a.skip.split(","):
            em.measured_predictor_error(meas_path, "prev_step")
        check_measurements(a.control)
    except ValueError as e:
        p.error(str(e))
    topo = Topology(a.nodes, a.gpus_per_node)
    rebalances = check_args(p, a, model.shape, topo)
    try:
        batches, chunks = int_list(a.decode_batches), int_list(a.prefill_chunks)
    except ValueError as e:
        p.error(f"--decode-batches / --prefill-chunks must be comma lists of integers: {e}")
    if not batches:
        p.error(f"--decode-batches {a.decode_batches!r} names no batch size; valid: e.g. 512,768")
    try:  # the public trace's heat (and, with --skew trace, the per-token trace)
        run = Run(a, model, hw, topo, rebalances, batches, chunks)
        if a.skew == "trace":
            load_any(os.path.join(TRACES, "bigmoeonedge", "qwen3-30b-a3b.route.csv"))
    except ValueError as e:
        p.error(str(e))
    if a.out_dir:
        os.makedirs(a.out_dir, exist_ok=True)
    cmd = "python " + " ".join([os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:])
    log_header(run, cmd)
    run.alpha, skew_note = choose_skew(run)
    data_note = (f"GENERATED by megatron_probe.data.generator from the {run.heat_label}; {a.requests_per_rank} "
                 f"request groups per rank; {skew_note}")
    run.log(f"data: {data_note}")
    run.res = start_result(run, cmd, data_note)
    fit_forecast(run)
    return run


def log_header(run, cmd):
    model, topo = run.model, run.topo
    run.log(f"=== {LABEL} ===")
    run.log(f"command: {cmd}")
    run.log(f"date: {utc_date()}; machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}")
    run.log(f"model: {model.source}; {model.moe_layers} MoE layers, {len(run.lmap)} simulated "
            f"(model layers {run.model_layers})")
    run.log(f"hardware: {run.hw.name} ({run.hw.source}); {topo.nodes} node(s) x {topo.gpus_per_node} GPUs, "
            f"ep {run.ep}")


def choose_skew(run):
    """The generator's alpha (--skew) and a note on how it was chosen."""
    a = run.a
    if a.skew == "trace":
        ref = load_any(os.path.join(TRACES, "bigmoeonedge", "qwen3-30b-a3b.route.csv"))
        alpha = fit_alpha(run.heat[run.hl], ref.topk, max(1, ref.n_tokens), observed_request_skew(ref), seed=a.seed)
        return alpha, (f"alpha={alpha} fitted by generator.fit_alpha to the per-token trace "
                       f"bigmoeonedge/qwen3-30b-a3b.route.csv (Apache-2.0)")
    batch = run.batches[0] if 768 not in run.batches else 768
    alpha, ir0 = calibrate_alpha(run.heat, run.hl, run.shape.topk, batch, run.ep, PAPER_IR, a.requests_per_rank,
                                 seed=a.seed, grid=(0.001, 0.002, 0.003, 0.005, 0.007, 0.01, 0.02, 0.05, 0.1, 0.5))
    return alpha, (f"alpha={alpha} chosen from a grid so that the static IR of a decode batch is nearest the "
                   f"paper's {PAPER_IR} (got {ir0:.3f})")


def start_result(run, cmd, data_note):
    model, hw, topo = run.model, run.hw, run.topo
    return {"label": LABEL, "command": cmd, "date": utc_date(),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
            "preset": run.a.preset, "model": model.name, "model_source": model.source, "hardware": hw.name,
            "hardware_source": hw.source, "nodes": topo.nodes, "gpus_per_node": topo.gpus_per_node, "ep": run.ep,
            "data": data_note, "alpha": run.alpha, "sim_layers": run.model_layers}


def fit_forecast(run):
    """Fit the forecast error model's sigma on a decode sample to the measured predictor evaluation."""
    a = run.a
    meas = em.measured_predictor_error(a.predictor_eval) if a.predictor_eval else em.measured_predictor_error()
    sample = run.counts_for(768, 12, 64.0, seed_off=99).flatten(0, 1)
    sigma = em.fit_sigma(sample, meas["rank_load_err"], ep=meas["ep"], seed=a.seed)
    got = em.forecast_errors(sample, sigma, meas["ep"], seed=a.seed)
    pred_note = em.describe(sigma, meas, got)
    run.log(f"forecast: {pred_note}")
    run.res.update(sigma=sigma, predictor_error_model=pred_note, predictor_measured=meas, predictor_model_errors=got)
    run.sigma, run.meas, run.forecast_errors = sigma, meas, got


# ---- prefill

PREFILL_NAMES = ("static", "probe", "ours", "oracle")


def run_prefill(run):
    """Chunked prefill: latency of each policy per chunk size and its speedup over static placement."""
    run.log()
    run.log(f"--- Prefill (chunked, tokens per rank per chunk; requests change every chunk; context = "
            f"chunk/2; {run.a.prefill_steps} chunks; EPLB left out as in the paper) [{LABEL}]")
    run.log(f"{'chunk':>7} {'static ms':>10} {'probe ms':>9} {'ours ms':>8} {'oracle ms':>10} "
            f"{'probe x':>8} {'ours x':>7} {'oracle x':>9} {'IR st->probe->ours':>20}")
    res = run.res
    res["prefill"] = {}
    for ch in run.chunks:
        res["prefill"][str(ch)] = prefill_chunk(run, ch)
    res["prefill_speedup_vs_static"] = max(v["speedup_vs_static"]["probe"] for v in res["prefill"].values())
    res["ours_prefill_speedup_vs_static"] = max(v["speedup_vs_static"]["ours"] for v in res["prefill"].values())


def prefill_chunk(run, ch):
    names = PREFILL_NAMES
    c = run.counts_for(ch, run.a.prefill_steps, 1.0, seed_off=ch)
    r = simulate(c, run.cfg_for(context=ch // 2), names)
    ms = {n: r["policies"][n]["mean_step_us"] / 1e3 for n in names}
    sp = {n: ratio(ms["static"], ms[n]) for n in names}
    irs = {n: r["policies"][n]["ir"] for n in names}
    run.log(f"{ch:>7} {ms['static']:>10.2f} {ms['probe']:>9.2f} {ms['ours']:>8.2f} {ms['oracle']:>10.2f} "
            f"{sp['probe']:>8.3f} {sp['ours']:>7.3f} {sp['oracle']:>9.3f} "
            f"{irs['static']:>6.2f}->{irs['probe']:.2f}->{irs['ours']:.2f}")
    return {"latency_ms": ms, "speedup_vs_static": sp, "budget": r["budget_probe"],
            "window_est_us": r["window_est_us"], "policies": policy_summary(r, names)}


# ---- decode

DECODE_NAMES = ("static", "eplb", "eplb-same", "probe", "ours", "ours-resident", "oracle")
# the two memory budgets, each policy against its reference at the same replica memory
BUDGET_GROUPS = (("streamed", "probe", "ours"), ("resident", "eplb-same", "ours-resident"))


def budget_titles(run):
    """Each budget group's title with its replica memory per rank."""
    R, layers = run.cfg_for().replica_slots, run.model.moe_layers
    return {"streamed": f"streamed budget (2R = {2 * R} experts per rank, all layers): probe vs ours",
            "resident": f"resident budget (R = {R} per layer, {R * layers} experts per rank): eplb-same vs "
                        f"ours-resident"}


def describe_eplb(run):
    a, slots = run.a, run.cfg_for().replica_slots
    return (f"EPLB: the published algorithm as vLLM runs it, {a.eplb_split} split, window {a.eplb_window}, "
            f"rebalance at steps {run.rebalances} (vLLM's 1000/3000 scaled); 'eplb' with the paper's 2 redundant "
            f"experts per layer per rank, 'eplb-same' with PROBE's {slots} (resident: "
            f"x{run.model.moe_layers} layers of memory where PROBE streams {2 * slots} slots; 'ours-resident' "
            f"holds the same {slots} per layer)")


def run_decode(run, eplb_note):
    """Decode with a domain switch: throughput per batch and phase, IR at the reference batch, the switch plot."""
    a = run.a
    phases = Phases(a.decode_steps, a.eplb_window, a.switch_step if a.switch_step < a.decode_steps else None)
    run.log()
    run.log(f"--- Decode ({a.decode_steps} steps, domain switch at step {a.switch_step}, context "
            f"{a.decode_context}; throughput = tokens/s of the cluster from attention + MoE of every layer; "
            f"embedding, LM head and sampling not modelled) [{LABEL}]")
    run.log(f"{eplb_note}. Headline: steps {a.eplb_window}-{a.decode_steps - 1} (EPLB's warm-up, steps "
            f"0-{a.eplb_window - 1}, excluded; per phase below; 'all' = the paper's protocol, warm-up counted)")
    titles = budget_titles(run)
    run.log("tok/s by memory budget; 'ratio' = ours / its reference at the same memory; 'copies' = weight copies "
            "per layer per step, reference / ours (mean over the headline steps); "
            + "; ".join(f"{titles[g]}" for g, _, _ in BUDGET_GROUPS))
    run.log(f"{'':>34}|" + "|".join(f" {g + ' budget':<48}" for g, _, _ in BUDGET_GROUPS) + "|")
    run.log(f"{'batch':>6} {'static':>8} {'eplb':>8} {'oracle':>8} |"
            + "|".join(f" {ref:>13} {ours:>13} {'ratio':>6} {'copies':>12} " for _, ref, ours in BUDGET_GROUPS)
            + f"| {'probe/eplb':>10}")
    run.res["decode"] = {}
    for B in run.batches:
        run.res["decode"][str(B)] = decode_batch(run, B, phases)
    summarise_decode(run)
    Bref = log_decode_ir(run)
    st = run.res["decode"][Bref]["step_throughput"]
    if a.switch_step < a.decode_steps:
        log_switch(run, st)
    if a.out_dir:
        plot_switch(run, Bref, st)


def phase_steps(phases, steps, ph):
    """The steps of a phase; 'all' is every step, 'headline' every step after EPLB's warm-up."""
    return [i for i in range(steps) if ph == "all" or phases.of(i) == ph
            or (ph == "headline" and phases.of(i) != "warmup")]


def decode_batch(run, B, phases):
    a, names, ep = run.a, DECODE_NAMES, run.ep
    c = run.counts_for(B, a.decode_steps, 64.0, shift=a.switch_step, seed_off=B)
    ctl = {"both": "host"}.get(a.control, a.control)
    r = simulate(c, run.cfg_for(context=a.decode_context, control=ctl), names, summary_from=a.eplb_window)
    charged = None
    if a.control == "both":  # the charge is additive: the uncharged run is the same run without it
        charged = mean_throughput(r, names, phase_steps(phases, a.decode_steps, "headline"), ep * B)
        for n in names:
            r["policies"][n]["step_us"] = r["policies"][n]["step_us_nocontrol"]
            r["policies"][n]["mean_step_us"] = sum(r["policies"][n]["step_us"]) / a.decode_steps
    per_phase = {ph: mean_throughput(r, names, phase_steps(phases, a.decode_steps, ph), ep * B)
                 for ph in phases.names() + ["all", "headline"]}
    thr = per_phase["headline"]
    log_decode_batch(run, B, per_phase, phases.names() + ["all"], r)
    extra = {}
    if charged is not None:
        extra = log_control(run, r, thr, charged)
    return {**extra, "throughput_tok_s": {n: round(v, 1) for n, v in thr.items()},
            "throughput_by_phase": {ph: {n: round(v, 1) for n, v in t.items()} for ph, t in per_phase.items()},
            "tpot_ms": {n: round(r["policies"][n]["mean_step_us"] / 1e3, 4) for n in names},
            "probe_vs_eplb": ratio(thr["probe"], thr["eplb"]), "ours_vs_eplb": ratio(thr["ours"], thr["eplb"]),
            "ours_vs_eplb_same": ratio(thr["ours"], thr["eplb-same"]),
            "probe_vs_eplb_same": ratio(thr["probe"], thr["eplb-same"]),
            "probe_vs_eplb_all_steps": ratio(per_phase["all"]["probe"], per_phase["all"]["eplb"]),
            "ours_vs_probe": ratio(thr["ours"], thr["probe"]),
            "ours_resident_vs_eplb_same": ratio(thr["ours-resident"], thr["eplb-same"]),
            "ours_resident_vs_eplb": ratio(thr["ours-resident"], thr["eplb"]),
            "ours_resident_vs_probe": ratio(thr["ours-resident"], thr["probe"]),
            "copies_per_layer_step": {n: round(r["policies"][n]["copies"], 4) for n in names},
            "replica_memory_experts_per_rank": {n: r["policies"][n]["replica_memory_experts_per_rank"]
                                                for n in names},
            "static_ir_generated": round(static_ir(c), 4),
            "budget_probe": r["budget_probe"], "budget_ours": r["budget_ours"],
            "window_est_us": r["window_est_us"], "policies": policy_summary(r, names),
            "step_throughput": {n: [round(tok_per_s(ep * B, u), 1) for u in r["policies"][n]["step_us"]]
                                for n in names}}


def log_decode_batch(run, B, per_phase, phase_names, r):
    """A batch's row of headline throughputs by memory budget, then its ratios per phase."""
    thr, pol = per_phase["headline"], r["policies"]
    run.log(f"{B:>6} {thr['static']:>8.0f} {thr['eplb']:>8.0f} {thr['oracle']:>8.0f} |"
            + "|".join(f" {thr[ref]:>13.0f} {thr[ours]:>13.0f} {ratio(thr[ours], thr[ref]):>6.3f} "
                       f"{pol[ref]['copies']:>6.2f}/{pol[ours]['copies']:<5.2f} " for _, ref, ours in BUDGET_GROUPS)
            + f"| {ratio(thr['probe'], thr['eplb']):>10.3f}")
    for ph in phase_names:
        t = per_phase[ph]
        run.log(f"{'':>6}   {ph:<11} ours/probe {ratio(t['ours'], t['probe']):.3f}, ours-resident/eplb-same "
                f"{ratio(t['ours-resident'], t['eplb-same']):.3f}; probe/eplb {ratio(t['probe'], t['eplb']):.3f}, "
                f"ours/eplb {ratio(t['ours'], t['eplb']):.3f}, ours-resident/probe "
                f"{ratio(t['ours-resident'], t['probe']):.3f}, eplb/static {ratio(t['eplb'], t['static']):.3f}")


def log_control(run, r, thr, charged):
    """The headline row again with the host control path charged (``--control both``)."""
    run.log(f"{'':>6} +control (host) {charged['static']:>8.0f} {charged['eplb']:>8.0f} {charged['oracle']:>8.0f} | "
            f"probe {charged['probe']:.0f} ours {charged['ours']:.0f} ratio {ratio(charged['ours'], charged['probe']):.3f}"
            f" | eplb-same {charged['eplb-same']:.0f} ours-resident {charged['ours-resident']:.0f} ratio "
            f"{ratio(charged['ours-resident'], charged['eplb-same']):.3f} | probe/eplb "
            f"{ratio(charged['probe'], charged['eplb']):.3f}, ours/static {ratio(charged['ours'], charged['static']):.3f}"
            f"; per layer (us): " + ", ".join(f"{n} {r['policies'][n]['control_us_per_layer']:.0f}"
                                               for n in ("probe", "ours", "ours-resident")))
    return {"control": "host", "control_pieces_us": r["control_pieces_us"],
            "control_us_per_layer": {n: round(r["policies"][n]["control_us_per_layer"], 2) for n in thr},
            "throughput_tok_s_control_host": {n: round(v, 1) for n, v in charged.items()},
            "probe_vs_eplb_control_host": ratio(charged["probe"], charged["eplb"]),
            "ours_vs_probe_control_host": ratio(charged["ours"], charged["probe"]),
            "ours_resident_vs_eplb_same_control_host": ratio(charged["ours-resident"], charged["eplb-same"]),
            "ours_vs_static_control_host": ratio(charged["ours"], charged["static"])}


def summarise_decode(run):
    """The best decode speedups over all batches."""
    res, rows = run.res, run.res["decode"].values()
    res["decode_speedup_vs_eplb"] = max(v["probe_vs_eplb"] for v in rows)
    res["ours_decode_speedup_vs_eplb"] = max(v["ours_vs_eplb"] for v in rows)
    res["decode_speedup_vs_eplb_same"] = max(v["probe_vs_eplb_same"] for v in rows)
    res["ours_decode_speedup_vs_eplb_same"] = max(v["ours_vs_eplb_same"] for v in rows)
    # per memory budget: ours against its reference at the same replica memory, worst and best batch
    res["budgets"] = {
        "streamed": {"title": budget_titles(run)["streamed"], "reference": "probe", "ours": "ours",
                     "ratio_min": min(v["ours_vs_probe"] for v in rows),
                     "ratio_max": max(v["ours_vs_probe"] for v in rows)},
        "resident": {"title": budget_titles(run)["resident"], "reference": "eplb-same", "ours": "ours-resident",
                     "ratio_min": min(v["ours_resident_vs_eplb_same"] for v in rows),
                     "ratio_max": max(v["ours_resident_vs_eplb_same"] for v in rows)}}
    res["decode_headline"] = (f"steps {run.a.eplb_window}-{run.a.decode_steps - 1}: EPLB's warm-up excluded; "
                              "'_all_steps' keys count it as the paper did")


def log_decode_ir(run):
    """IR, exposed transfer and copies at the reference batch (768, else the first); returns that batch."""
    res = run.res
    Bref = "768" if "768" in res["decode"] else str(run.batches[0])
    pol = res["decode"][Bref]["policies"]
    res["ir_static"], res["ir_probe"], res["ir_ours"] = pol["static"]["ir"], pol["probe"]["ir"], pol["ours"]["ir"]
    res["comp_max_over_mean_static"] = pol["static"]["ir_comp"]
    res["comp_max_over_mean_probe"] = pol["probe"]["ir_comp"]
    run.log(f"IR (max/mean tokens per rank, mean over steps x layers after EPLB's warm-up) at batch {Bref}: static "
            f"{res['ir_static']:.3f} -> PROBE {res['ir_probe']:.3f} (ours {res['ir_ours']:.3f}, EPLB "
            f"{pol['eplb']['ir']:.3f}, oracle {pol['oracle']['ir']:.3f}); compute max/mean "
            f"{res['comp_max_over_mean_static']:.3f} -> {res['comp_max_over_mean_probe']:.3f}")
    run.log("exposed transfer per layer (us, mean): " + ", ".join(
        f"{n} {pol[n]['exposed_us']:.1f}" for n in DECODE_NAMES) + "; copies per layer: " + ", ".join(
        f"{n} {pol[n]['copies']:.2f}" for n in ("eplb", "eplb-same", "probe", "ours", "ours-resident")))
    return Bref


def segment_mean(xs, lo, hi):
    xs = xs[lo:hi]
    return sum(xs) / max(1, len(xs))


def log_switch(run, st):
    """Throughput in the 50 steps before and after the switch, and during EPLB's warm-up."""
    sw, win = run.a.switch_step, run.a.eplb_window
    lo = max(0, sw - 50)  # a switch before step 50: the window starts at step 0
    run.log("throughput around the switch (tok/s, mean of steps): "
            + "; ".join(f"{n}: [{lo},{sw}) {segment_mean(st[n], lo, sw):.0f}, [{sw},{sw + 50}) "
                        f"{segment_mean(st[n], sw, sw + 50):.0f}" for n in DECODE_NAMES))
    if sw > win:
        run.log(f"EPLB warm-up (steps 0-{win - 1} vs {win}-{sw - 1}): eplb "
                f"{segment_mean(st['eplb'], 0, win):.0f} vs {segment_mean(st['eplb'], win, sw):.0f} tok/s; static "
                f"{segment_mean(st['static'], 0, win):.0f} vs {segment_mean(st['static'], win, sw):.0f}")


def plot_switch(run, Bref, st):
    """switch.png: each policy's throughput per step (5-step mean) at the reference batch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    a = run.a
    fig, ax = plt.subplots(figsize=(8, 4))
    for n in DECODE_NAMES:
        xs = st[n]
        k = 5  # moving average of 5 steps
        sm = [sum(xs[max(0, i - k + 1):i + 1]) / len(xs[max(0, i - k + 1):i + 1]) for i in range(len(xs))]
        ax.plot(range(len(xs)), sm, label=n, lw=1)
    ax.axvline(a.switch_step, color="k", ls=":", lw=0.8)
    for rb in run.rebalances:
        ax.axvline(rb, color="tab:orange", ls="--", lw=0.6)
    ax.axvspan(0, a.eplb_window, color="0.9", lw=0)  # EPLB's warm-up
    ax.set_xlabel("decode step")
    ax.set_ylabel("tokens/s (5-step mean)")
    ax.set_title(f"SIMULATION: {run.model.name}, ep {run.ep}, batch {Bref}/rank, switch at {a.switch_step} (dotted), "
                 f"EPLB rebalances (dashed), warm-up shaded", fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(a.out_dir, "switch.png"), dpi=110)
    plt.close(fig)


# ---- repeat scenario

def run_repeat(run):
    """One request group per rank, never replaced: throughput after EPLB's warm-up."""
    a, names, B = run.a, DECODE_NAMES, 768
    run.log()
    c = run.counts_for(B, min(a.decode_steps, 300), 1e9, rpr=1, seed_off=7)
    idx = range(min(a.eplb_window, c.shape[0] - 1), c.shape[0])  # EPLB's warm-up excluded
    r = simulate(c, run.cfg_for(context=a.decode_context), names, summary_from=idx.start)
    thr = mean_throughput(r, names, idx, run.ep * B)
    run.log(f"--- Repeat (one request group per rank, never replaced; batch {B}, {c.shape[0]} steps; "
            f"throughput over steps {idx.start}-{idx.stop - 1}) [{LABEL}]")
    run.log("  " + ", ".join(f"{n} {thr[n]:.0f} tok/s (IR {r['policies'][n]['ir']:.2f})" for n in names)
            + f"; ours/probe {ratio(thr['ours'], thr['probe'])}, ours-resident/eplb-same "
              f"{ratio(thr['ours-resident'], thr['eplb-same'])}; probe/eplb {ratio(thr['probe'], thr['eplb'])}, "
              f"ours/eplb {ratio(thr['ours'], thr['eplb'])}, ours/eplb-same {ratio(thr['ours'], thr['eplb-same'])}")
    run.res["repeat"] = {"throughput_tok_s": thr, "steps": [idx.start, idx.stop - 1],
                         "policies": policy_summary(r, names), "static_ir_generated": static_ir(c)}


# ---- ablations (decode, batch 768, shorter run with the switch in the middle)

ABLATIONS = {"static": "planner off (static placement)", "probe": "PROBE as published",
             "ours": "ours (forecast + planner + split phase + balanced split)",
             "ours-prev": "forecast replaced by last step's counts", "ours-naive": "split-phase off (naive overlap)",
             "ours-noplan": "planner replaced by EPLB's rule on the forecast"}


def run_ablations(run):
    B, S = 768, run.a.ablation_steps
    run.log()
    run.log(f"--- Ablations (decode, batch {B}, {S} steps, switch at {S // 2}) [{LABEL}]")
    c = run.counts_for(B, S, 64.0, shift=S // 2, seed_off=1000)
    abl, base = ablation_table(run, c)
    abl["ours-prev"]["forecast_rank_load_err"] = log_prev_step_forecast(run, c)
    r0 = simulate(c, run.cfg_for(context=run.a.decode_context, sigma=0.0), ("ours",))
    abl["perfect-forecast"] = {"what": "ours with a perfect forecast", "speedup_vs_static":
                               ratio(base, r0["policies"]["ours"]["mean_step_us"])}
    run.log(f"  {'ours with a perfect forecast':<52} x{abl['perfect-forecast']['speedup_vs_static']:.3f}")
    run.res["ablations"] = abl
    replica_budget_sweep(run, c, base)
    transfer_link_sweep(run, c, base)


def ablation_table(run, c):
    """Each ablation's speedup over static placement; returns the rows and static's mean step time."""
    r = simulate(c, run.cfg_for(context=run.a.decode_context), tuple(ABLATIONS))
    base = r["policies"]["static"]["mean_step_us"]
    abl = {}
    for n, what in ABLATIONS.items():
        pr = r["policies"][n]
        abl[n] = {"what": what, "speedup_vs_static": ratio(base, pr["mean_step_us"]), "ir": pr["ir"],
                  "exposed_us": pr["exposed_us"], "a2a_extra_us": pr["a2a_extra_us"]}
        run.log(f"  {what:<52} x{abl[n]['speedup_vs_static']:.3f} vs static, IR {pr['ir']:.3f}, "
                f"exposed {pr['exposed_us']:.1f} us, A2A delay {pr['a2a_extra_us']:.1f} us per layer")
    return abl, base


def log_prev_step_forecast(run, c):
    """The rank-load error of last step's counts as a forecast on this workload; returns it."""
    from megatron_probe.policy.prediction_metrics import PredictionStats

    meas = run.meas
    meas_prev = em.measured_predictor_error(os.path.join(ROOT, meas["file"]), "prev_step")
    st_prev = PredictionStats(ep=meas["ep"], topk=1)
    for s_ in range(1, c.shape[0]):
        for l_ in range(c.shape[1]):
            st_prev.add_counts(l_, c[s_, l_].sum(0), c[s_ - 1, l_].sum(0))
    prev_err = st_prev.summary()["mean_rank_load_err"]
    run.log(f"  (last step's counts as a forecast: rank-load error {prev_err:.4f} at EP {meas['ep']} on this "
            f"workload; the error model's forecast {run.forecast_errors['rank_load_err']:.4f}; measured on the "
            f"small model ({meas['file']}): {meas_prev['rank_load_err']} for last step's counts vs "
            f"{meas['rank_load_err']} distilled)")
    return prev_err


def replica_budget_sweep(run, c, base):
    run.log("  replica budget R (slots per rank; copies also capped by the window):")
    rows = run.res["replica_budget"] = {}
    for R in range(0, 7):
        r = simulate(c, run.cfg_for(context=run.a.decode_context, replica_slots=R), ("probe", "ours"))
        row = rows[str(R)] = speedups(base, r, ("probe", "ours"))
        row["copies_ours"] = r["policies"]["ours"]["copies"]
        run.log(f"    R={R}: probe x{row['probe']:.3f}, ours x{row['ours']:.3f} vs static "
                f"(budget {r['budget_ours']}, copies/layer {r['policies']['ours']['copies']:.2f})")


def transfer_link_sweep(run, c, base):
    rows = run.res["transfer_link"] = {}
    for link in ("nvlink", "ib"):
        r = simulate(c, run.cfg_for(context=run.a.decode_context, transfer_link=link), ("probe", "ours"))
        row = rows[link] = speedups(base, r, ("probe", "ours"))
        row["budget"] = r["budget_probe"]
        run.log(f"  transfers over {link}: probe x{row['probe']:.3f}, ours x{row['ours']:.3f} vs static "
                f"(budget {r['budget_probe']})")


# ---- multi-node

MULTINODE_NAMES = ("static", "probe", "ours", "ours-link", "oracle")


def run_multinode(run):
    """Decode and prefill speedups over static placement for each node count of --multinode."""
    a = run.a
    run.log()
    run.log(f"--- Multi-node (GPUs per node {a.gpus_per_node}; transfers NVLink inside a node, InfiniBand "
            f"across; decode batch 768, {a.multinode_steps} steps; prefill chunk 8192, 3 chunks) [{LABEL}]")
    run.res["multinode"] = {}
    for nn in int_list(a.multinode):
        tp = Topology(nn, a.gpus_per_node)
        if run.shape.num_experts % tp.ep:
            run.log(f"  {nn} nodes: ep {tp.ep} does not divide {run.shape.num_experts} experts: skipped")
            continue
        row = {}
        for spec in (("decode", 768, a.multinode_steps, a.decode_context, 64.0), ("prefill", 8192, 3, 4096, 1.0)):
            row[spec[0]] = multinode_phase(run, nn, tp, *spec)
        run.res["multinode"][str(nn)] = row


def multinode_phase(run, nn, tp, phase, tokens, steps, ctx, request_steps):
    c = run.counts_for(tokens, steps, request_steps, seed_off=nn * 10 + (phase == "prefill"), topo=tp)
    r = simulate(c, run.cfg_for(topo=tp, context=ctx), MULTINODE_NAMES)
    pol = r["policies"]
    row = speedups(pol["static"]["mean_step_us"], r, MULTINODE_NAMES)
    row.update(budget_probe_ib=r["budget_probe"], budget_ours_nvlink=r["budget_ours"],
               copies_ours=round(pol["ours"]["copies"], 2), copies_probe=round(pol["probe"]["copies"], 2),
               ir_static=round(pol["static"]["ir"], 3), exposed_probe_us=round(pol["probe"]["exposed_us"], 1),
               window_est_us=r["window_est_us"])
    row["copies_ours_link"] = round(pol["ours-link"]["copies"], 2)
    run.log(f"  {nn} node(s), ep {tp.ep}, {phase}: vs static probe x{row['probe']:.3f}, ours "
            f"x{row['ours']:.3f}, ours-link x{row['ours-link']:.3f}, oracle x{row['oracle']:.3f}; budget probe (IB) "
            f"{r['budget_probe']}, ours (NVLink) {r['budget_ours']}; copies/layer probe "
            f"{row['copies_probe']}, ours {row['copies_ours']} (late ones dropped); "
            f"IR static {row['ir_static']}")
    return row


# ---- outputs

def write_outputs(run, t_start):
    """The closing line; the JSON (--json, else --out-dir/simulate.json) and --out-dir/simulate.txt."""
    a, res = run.a, run.res
    res["seconds"] = round(time.time() - t_start, 1)
    run.log()
    run.log(f"({res['seconds']} s) {LABEL}")
    out_json = a.json or (os.path.join(a.out_dir, "simulate.json") if a.out_dir else None)
    if out_json:
        with open(out_json, "w") as f:
            json.dump(res, f, indent=1)
        print(f"wrote {out_json}")
    if a.out_dir:
        with open(os.path.join(a.out_dir, "simulate.txt"), "w") as f:
            f.write("\n".join(run.lines) + "\n")


def main(argv=None):
    p = build_parser()
    a = p.parse_args(argv)
    t_start = time.time()
    run = build_run(p, a)
    skip = set(filter(None, a.skip.split(",")))
    if "prefill" not in skip:
        run_prefill(run)
    eplb_note = run.res["eplb"] = describe_eplb(run)
    if "decode" not in skip:
        run_decode(run, eplb_note)
    if "repeat" not in skip:
        run_repeat(run)
    if "ablations" not in skip:
        run_ablations(run)
    if a.multinode:
        run_multinode(run)
    write_outputs(run, t_start)


if __name__ == "__main__":
    main()
