#!/usr/bin/env python3
"""SIMULATION of expert-parallel MoE inference at cluster scale: static EP, EPLB, PROBE as
published, ours, oracle; the paper-style table, the switch plot and the ablations.

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


def main():
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
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    p.add_argument("--out-dir", default=None, help="write simulate.json, simulate.txt and switch.png here")
    a = p.parse_args()
    t_start = time.time()
    pre = PRESETS[a.preset]
    model = get_model(pre["model"])
    hw = get_profile(a.hardware or pre["hw"])
    shape = model.shape
    topo = Topology(a.nodes, a.gpus_per_node)
    ep = topo.ep
    if shape.num_experts % ep:
        p.error(f"{shape.num_experts} experts are not divisible by ep={ep}")
    skip = set(filter(None, a.skip.split(",")))
    rebalances = eplb_rebalance_steps(a.decode_steps, a.eplb_window, a.eplb_period)
    if a.switch_step in rebalances:
        p.error(f"--switch-step {a.switch_step} falls on an EPLB rebalance step {rebalances}; place it between them")
    if not 0 < a.eplb_window < min(a.switch_step, a.decode_steps):
        p.error(f"--eplb-window {a.eplb_window} must end before the switch (step {a.switch_step}) and the run")
    batches = [int(x) for x in a.decode_batches.split(",") if x]
    chunks = [int(x) for x in a.prefill_chunks.split(",") if x]
    out_json = a.json or (os.path.join(a.out_dir, "simulate.json") if a.out_dir else None)
    if a.out_dir:
        os.makedirs(a.out_dir, exist_ok=True)
    lines = []
    heat_path = os.path.join(TRACES, pre["heat"])
    heat, heat_label = trace_heat(heat_path, shape.num_experts)
    lmap = layer_map(model.moe_layers, a.sim_layers, heat.shape[0])
    hl = [h for _, h in lmap]
    cmd = "python " + " ".join([os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:])
    log(lines, f"=== {LABEL} ===")
    log(lines, f"command: {cmd}")
    log(lines, f"date: {datetime.datetime.utcnow().strftime('%Y-%m-%d %H:%M UTC')}; machine: {platform.machine()}, "
               f"{os.cpu_count()} cores, torch {torch.__version__}")
    log(lines, f"model: {model.source}; {model.moe_layers} MoE layers, {len(lmap)} simulated "
               f"(model layers {[m for m, _ in lmap]})")
    log(lines, f"hardware: {hw.name} ({hw.source}); {topo.nodes} node(s) x {topo.gpus_per_node} GPUs, ep {ep}")
    # ---- skew of the generated workload
    if a.skew == "trace":
        ref = load_any(os.path.join(TRACES, "bigmoeonedge", "qwen3-30b-a3b.route.csv"))
        alpha = fit_alpha(heat[hl], ref.topk, max(1, ref.n_tokens), observed_request_skew(ref), seed=a.seed)
        skew_note = (f"alpha={alpha} fitted by generator.fit_alpha to the per-token trace "
                     f"bigmoeonedge/qwen3-30b-a3b.route.csv (Apache-2.0)")
    else:
        alpha, ir0 = calibrate_alpha(heat, hl, shape.topk, batches[0] if 768 not in batches else 768, ep, PAPER_IR,
                                     a.requests_per_rank, seed=a.seed,
                                     grid=(0.001, 0.002, 0.003, 0.005, 0.007, 0.01, 0.02, 0.05, 0.1, 0.5))
        skew_note = (f"alpha={alpha} chosen from a grid so that the static IR of a decode batch is nearest the "
                     f"paper's {PAPER_IR} (got {ir0:.3f})")
    data_note = (f"GENERATED by megatron_probe.data.generator from the {heat_label}; {a.requests_per_rank} request "
                 f"groups per rank; {skew_note}")
    log(lines, f"data: {data_note}")
    res = {"label": LABEL, "command": cmd, "date": datetime.datetime.utcnow().strftime("%Y-%m-%d %H:%M UTC"),
           "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
           "preset": a.preset, "model": model.name, "model_source": model.source, "hardware": hw.name,
           "hardware_source": hw.source, "nodes": topo.nodes, "gpus_per_node": topo.gpus_per_node, "ep": ep,
           "data": data_note, "alpha": alpha, "sim_layers": [m for m, _ in lmap]}

    def counts_for(tokens, steps, request_steps, shift=None, rpr=None, seed_off=0, topo_=topo):
        return make_counts(heat, hl, shape.topk, steps, tokens, topo_.ep, alpha, rpr or a.requests_per_rank,
                           request_steps=request_steps, shift_step=shift, seed=a.seed + seed_off,
                           source=heat_path).counts

    # ---- forecast error model, fitted on a decode sample
    meas = em.measured_predictor_error(a.predictor_eval) if a.predictor_eval else em.measured_predictor_error()
    sample = counts_for(768, 12, 64.0, seed_off=99).flatten(0, 1)
    sigma = em.fit_sigma(sample, meas["rank_load_err"], ep=meas["ep"], seed=a.seed)
    got = em.forecast_errors(sample, sigma, meas["ep"], seed=a.seed)
    pred_note = em.describe(sigma, meas, got)
    log(lines, f"forecast: {pred_note}")
    res.update(sigma=sigma, predictor_error_model=pred_note, predictor_measured=meas, predictor_model_errors=got)

    def cfg_for(**kw):
        base = dict(hw=hw, model=model, topo=topo, sigma=sigma, seed=a.seed, eplb_window=a.eplb_window,
                    eplb_period=a.eplb_period, eplb_split=a.eplb_split)
        base.update(kw)
        return SimConfig(**base)

    def summary(r, names):
        return {n: {k: (round(v, 4) if isinstance(v, float) else v) for k, v in r["policies"][n].items()
                    if k != "step_us"} for n in names}

    # ---- prefill
    if "prefill" not in skip:
        log(lines)
        log(lines, f"--- Prefill (chunked, tokens per rank per chunk; requests change every chunk; context = "
                   f"chunk/2; {a.prefill_steps} chunks; EPLB left out as in the paper) [{LABEL}]")
        log(lines, f"{'chunk':>7} {'static ms':>10} {'probe ms':>9} {'ours ms':>8} {'oracle ms':>10} "
                   f"{'probe x':>8} {'ours x':>7} {'oracle x':>9} {'IR st->probe->ours':>20}")
        res["prefill"] = {}
        names = ("static", "probe", "ours", "oracle")
        for ch in chunks:
            c = counts_for(ch, a.prefill_steps, 1.0, seed_off=ch)
            r = simulate(c, cfg_for(context=ch // 2), names)
            ms = {n: r["policies"][n]["mean_step_us"] / 1e3 for n in names}
            sp = {n: ratio(ms["static"], ms[n]) for n in names}
            irs = {n: r["policies"][n]["ir"] for n in names}
            log(lines, f"{ch:>7} {ms['static']:>10.2f} {ms['probe']:>9.2f} {ms['ours']:>8.2f} {ms['oracle']:>10.2f} "
                       f"{sp['probe']:>8.3f} {sp['ours']:>7.3f} {sp['oracle']:>9.3f} "
                       f"{irs['static']:>6.2f}->{irs['probe']:.2f}->{irs['ours']:.2f}")
            res["prefill"][str(ch)] = {"latency_ms": ms, "speedup_vs_static": sp, "budget": r["budget_probe"],
                                       "window_est_us": r["window_est_us"], "policies": summary(r, names)}
        res["prefill_speedup_vs_static"] = max(v["speedup_vs_static"]["probe"] for v in res["prefill"].values())
        res["ours_prefill_speedup_vs_static"] = max(v["speedup_vs_static"]["ours"] for v in res["prefill"].values())

    # ---- decode
    names = ("static", "eplb", "eplb-same", "probe", "ours", "oracle")
    eplb_note = (f"EPLB: the published algorithm as vLLM runs it, {a.eplb_split} split, window {a.eplb_window}, "
                 f"rebalance at steps {rebalances} (vLLM's 1000/3000 scaled); 'eplb' with the paper's 2 redundant "
                 f"experts per layer per rank, 'eplb-same' with PROBE's {cfg_for().replica_slots} (resident: "
                 f"x{model.moe_layers} layers of memory where PROBE streams {2 * cfg_for().replica_slots} slots)")
    res["eplb"] = eplb_note
    if "decode" not in skip:
        phases = Phases(a.decode_steps, a.eplb_window, a.switch_step if a.switch_step < a.decode_steps else None)
        log(lines)
        log(lines, f"--- Decode ({a.decode_steps} steps, domain switch at step {a.switch_step}, context "
                   f"{a.decode_context}; throughput = tokens/s of the cluster from attention + MoE of every layer; "
                   f"embedding, LM head and sampling not modelled) [{LABEL}]")
        log(lines, f"{eplb_note}. Headline: steps {a.eplb_window}-{a.decode_steps - 1} (EPLB's warm-up, steps "
                   f"0-{a.eplb_window - 1}, excluded; per phase below; 'all' = the paper's protocol, warm-up counted)")
        log(lines, f"{'batch':>6} " + " ".join(f"{n + ' tok/s':>14}" for n in names)
            + f" {'probe/eplb':>10} {'ours/eplb':>9} {'ours/eplb-same':>14} {'ours/probe':>10}")
        res["decode"] = {}
        for B in batches:
            c = counts_for(B, a.decode_steps, 64.0, shift=a.switch_step, seed_off=B)
            r = simulate(c, cfg_for(context=a.decode_context), names, summary_from=a.eplb_window)
            per_phase = {}
            for ph in phases.names() + ["all", "headline"]:
                idx = [i for i in range(a.decode_steps) if ph == "all" or phases.of(i) == ph
                       or (ph == "headline" and phases.of(i) != "warmup")]
                per_phase[ph] = {n: ep * B / (sum(r["policies"][n]["step_us"][i] for i in idx) / len(idx) * 1e-6)
                                 for n in names}
            thr = per_phase["headline"]
            log(lines, f"{B:>6} " + " ".join(f"{thr[n]:>14.0f}" for n in names)
                + f" {ratio(thr['probe'], thr['eplb']):>10.3f} {ratio(thr['ours'], thr['eplb']):>9.3f}"
                  f" {ratio(thr['ours'], thr['eplb-same']):>14.3f} {ratio(thr['ours'], thr['probe']):>10.3f}")
            for ph in phases.names() + ["all"]:
                t = per_phase[ph]
                log(lines, f"{'':>6}   {ph:<11} probe/eplb {ratio(t['probe'], t['eplb']):.3f}, ours/eplb "
                           f"{ratio(t['ours'], t['eplb']):.3f}, ours/eplb-same {ratio(t['ours'], t['eplb-same']):.3f}, "
                           f"eplb/static {ratio(t['eplb'], t['static']):.3f}")
            res["decode"][str(B)] = {
                "throughput_tok_s": {n: round(v, 1) for n, v in thr.items()},
                "throughput_by_phase": {ph: {n: round(v, 1) for n, v in t.items()} for ph, t in per_phase.items()},
                "tpot_ms": {n: round(r["policies"][n]["mean_step_us"] / 1e3, 4) for n in names},
                "probe_vs_eplb": ratio(thr["probe"], thr["eplb"]), "ours_vs_eplb": ratio(thr["ours"], thr["eplb"]),
                "ours_vs_eplb_same": ratio(thr["ours"], thr["eplb-same"]),
                "probe_vs_eplb_same": ratio(thr["probe"], thr["eplb-same"]),
                "probe_vs_eplb_all_steps": ratio(per_phase["all"]["probe"], per_phase["all"]["eplb"]),
                "ours_vs_probe": ratio(thr["ours"], thr["probe"]), "static_ir_generated": round(static_ir(c), 4),
                "budget_probe": r["budget_probe"], "budget_ours": r["budget_ours"],
                "window_est_us": r["window_est_us"], "policies": summary(r, names),
                "step_throughput": {n: [round(ep * B / (u * 1e-6), 1) for u in r["policies"][n]["step_us"]]
                                    for n in names}}
        res["decode_speedup_vs_eplb"] = max(v["probe_vs_eplb"] for v in res["decode"].values())
        res["ours_decode_speedup_vs_eplb"] = max(v["ours_vs_eplb"] for v in res["decode"].values())
        res["decode_speedup_vs_eplb_same"] = max(v["probe_vs_eplb_same"] for v in res["decode"].values())
        res["ours_decode_speedup_vs_eplb_same"] = max(v["ours_vs_eplb_same"] for v in res["decode"].values())
        res["decode_headline"] = (f"steps {a.eplb_window}-{a.decode_steps - 1}: EPLB's warm-up excluded; "
                                  "'_all_steps' keys count it as the paper did")
        Bref = "768" if "768" in res["decode"] else str(batches[0])
        pol = res["decode"][Bref]["policies"]
        res["ir_static"], res["ir_probe"], res["ir_ours"] = pol["static"]["ir"], pol["probe"]["ir"], pol["ours"]["ir"]
        res["comp_max_over_mean_static"] = pol["static"]["ir_comp"]
        res["comp_max_over_mean_probe"] = pol["probe"]["ir_comp"]
        log(lines, f"IR (max/mean tokens per rank, mean over steps x layers after EPLB's warm-up) at batch {Bref}: static "
                   f"{res['ir_static']:.3f} -> PROBE {res['ir_probe']:.3f} (ours {res['ir_ours']:.3f}, EPLB "
                   f"{pol['eplb']['ir']:.3f}, oracle {pol['oracle']['ir']:.3f}); compute max/mean "
                   f"{res['comp_max_over_mean_static']:.3f} -> {res['comp_max_over_mean_probe']:.3f}")
        log(lines, "exposed transfer per layer (us, mean): " + ", ".join(
            f"{n} {pol[n]['exposed_us']:.1f}" for n in names) + "; copies per layer: " + ", ".join(
            f"{n} {pol[n]['copies']:.2f}" for n in ("eplb", "eplb-same", "probe", "ours")))
        st = res["decode"][Bref]["step_throughput"]
        sw = a.switch_step
        if sw < a.decode_steps:
            def seg(n, lo, hi):
                xs = st[n][lo:hi]
                return sum(xs) / max(1, len(xs))
            log(lines, "throughput around the switch (tok/s, mean of steps): "
                + "; ".join(f"{n}: [{sw - 50},{sw}) {seg(n, sw - 50, sw):.0f}, [{sw},{sw + 50}) "
                            f"{seg(n, sw, sw + 50):.0f}" for n in names))
            if sw > a.eplb_window:
                log(lines, f"EPLB warm-up (steps 0-{a.eplb_window - 1} vs {a.eplb_window}-{sw - 1}): eplb "
                           f"{seg('eplb', 0, a.eplb_window):.0f} vs {seg('eplb', a.eplb_window, sw):.0f} tok/s; static "
                           f"{seg('static', 0, a.eplb_window):.0f} vs {seg('static', a.eplb_window, sw):.0f}")
        if a.out_dir:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt

            fig, ax = plt.subplots(figsize=(8, 4))
            for n in names:
                xs = st[n]
                k = 5  # moving average of 5 steps
                sm = [sum(xs[max(0, i - k + 1):i + 1]) / len(xs[max(0, i - k + 1):i + 1]) for i in range(len(xs))]
                ax.plot(range(len(xs)), sm, label=n, lw=1)
            ax.axvline(sw, color="k", ls=":", lw=0.8)
            for rb in rebalances:
                ax.axvline(rb, color="tab:orange", ls="--", lw=0.6)
            ax.axvspan(0, a.eplb_window, color="0.9", lw=0)  # EPLB's warm-up
            ax.set_xlabel("decode step")
            ax.set_ylabel("tokens/s (5-step mean)")
            ax.set_title(f"SIMULATION: {model.name}, ep {ep}, batch {Bref}/rank, switch at {sw} (dotted), EPLB "
                         f"rebalances (dashed), warm-up shaded", fontsize=8)
            ax.legend(fontsize=7)
            fig.tight_layout()
            fig.savefig(os.path.join(a.out_dir, "switch.png"), dpi=110)
            plt.close(fig)

    # ---- repeat scenario
    if "repeat" not in skip:
        log(lines)
        B = 768
        c = counts_for(B, min(a.decode_steps, 300), 1e9, rpr=1, seed_off=7)
        idx = range(min(a.eplb_window, c.shape[0] - 1), c.shape[0])  # EPLB's warm-up excluded
        r = simulate(c, cfg_for(context=a.decode_context), names, summary_from=idx.start)
        thr = {n: ep * B / (sum(r["policies"][n]["step_us"][i] for i in idx) / len(idx) * 1e-6) for n in names}
        log(lines, f"--- Repeat (one request group per rank, never replaced; batch {B}, {c.shape[0]} steps; "
                   f"throughput over steps {idx.start}-{idx.stop - 1}) [{LABEL}]")
        log(lines, "  " + ", ".join(f"{n} {thr[n]:.0f} tok/s (IR {r['policies'][n]['ir']:.2f})" for n in names)
            + f"; probe/eplb {ratio(thr['probe'], thr['eplb'])}, ours/eplb {ratio(thr['ours'], thr['eplb'])}, "
              f"ours/eplb-same {ratio(thr['ours'], thr['eplb-same'])}")
        res["repeat"] = {"throughput_tok_s": thr, "steps": [idx.start, idx.stop - 1], "policies": summary(r, names),
                         "static_ir_generated": static_ir(c)}

    # ---- ablations (decode, batch 768, shorter run with the switch in the middle)
    if "ablations" not in skip:
        log(lines)
        B, S = 768, a.ablation_steps
        log(lines, f"--- Ablations (decode, batch {B}, {S} steps, switch at {S // 2}) [{LABEL}]")
        c = counts_for(B, S, 64.0, shift=S // 2, seed_off=1000)
        abl = {}
        ab_names = ("static", "probe", "ours", "ours-prev", "ours-naive", "ours-noplan")
        r = simulate(c, cfg_for(context=a.decode_context), ab_names)
        base = r["policies"]["static"]["mean_step_us"]
        desc = {"static": "planner off (static placement)", "probe": "PROBE as published",
                "ours": "ours (forecast + planner + split phase + re-assign)",
                "ours-prev": "forecast replaced by last step's counts", "ours-naive": "split-phase off (naive overlap)",
                "ours-noplan": "planner replaced by EPLB's rule on the forecast"}
        for n in ab_names:
            pr = r["policies"][n]
            abl[n] = {"what": desc[n], "speedup_vs_static": ratio(base, pr["mean_step_us"]), "ir": pr["ir"],
                      "exposed_us": pr["exposed_us"], "a2a_extra_us": pr["a2a_extra_us"]}
            log(lines, f"  {desc[n]:<52} x{abl[n]['speedup_vs_static']:.3f} vs static, IR {pr['ir']:.3f}, "
                       f"exposed {pr['exposed_us']:.1f} us, A2A delay {pr['a2a_extra_us']:.1f} us per layer")
        from megatron_probe.policy.prediction_metrics import PredictionStats

        meas_prev = em.measured_predictor_error(os.path.join(ROOT, meas["file"]), "prev_step")
        st_prev = PredictionStats(ep=meas["ep"], topk=1)
        for s_ in range(1, c.shape[0]):
            for l_ in range(c.shape[1]):
                st_prev.add_counts(l_, c[s_, l_].sum(0), c[s_ - 1, l_].sum(0))
        prev_err = st_prev.summary()["mean_rank_load_err"]
        abl["ours-prev"]["forecast_rank_load_err"] = prev_err
        log(lines, f"  (last step's counts as a forecast: rank-load error {prev_err:.4f} at EP {meas['ep']} on this "
                   f"workload; the error model's forecast {got['rank_load_err']:.4f}; measured on the small model "
                   f"({meas['file']}): {meas_prev['rank_load_err']} for last step's counts vs {meas['rank_load_err']} "
                   f"distilled)")
        r0 = simulate(c, cfg_for(context=a.decode_context, sigma=0.0), ("ours",))
        abl["perfect-forecast"] = {"what": "ours with a perfect forecast", "speedup_vs_static":
                                   ratio(base, r0["policies"]["ours"]["mean_step_us"])}
        log(lines, f"  {'ours with a perfect forecast':<52} x{abl['perfect-forecast']['speedup_vs_static']:.3f}")
        res["ablations"] = abl
        log(lines, "  replica budget R (slots per rank; copies also capped by the window):")
        res["replica_budget"] = {}
        for R in range(0, 7):
            r = simulate(c, cfg_for(context=a.decode_context, replica_slots=R), ("probe", "ours"))
            res["replica_budget"][str(R)] = {n: ratio(base, r["policies"][n]["mean_step_us"]) for n in ("probe", "ours")}
            res["replica_budget"][str(R)]["copies_ours"] = r["policies"]["ours"]["copies"]
            log(lines, f"    R={R}: probe x{res['replica_budget'][str(R)]['probe']:.3f}, ours "
                       f"x{res['replica_budget'][str(R)]['ours']:.3f} vs static "
                       f"(budget {r['budget_ours']}, copies/layer {r['policies']['ours']['copies']:.2f})")
        res["transfer_link"] = {}
        for link in ("nvlink", "ib"):
            r = simulate(c, cfg_for(context=a.decode_context, transfer_link=link), ("probe", "ours"))
            res["transfer_link"][link] = {n: ratio(base, r["policies"][n]["mean_step_us"]) for n in ("probe", "ours")}
            res["transfer_link"][link]["budget"] = r["budget_probe"]
            log(lines, f"  transfers over {link}: probe x{res['transfer_link'][link]['probe']:.3f}, ours "
                       f"x{res['transfer_link'][link]['ours']:.3f} vs static (budget {r['budget_probe']})")

    # ---- multi-node
    if a.multinode:
        log(lines)
        log(lines, f"--- Multi-node (GPUs per node {a.gpus_per_node}; transfers NVLink inside a node, InfiniBand "
                   f"across; decode batch 768, {a.multinode_steps} steps; prefill chunk 8192, 3 chunks) [{LABEL}]")
        res["multinode"] = {}
        for nn in [int(x) for x in a.multinode.split(",") if x]:
            tp = Topology(nn, a.gpus_per_node)
            if shape.num_experts % tp.ep:
                log(lines, f"  {nn} nodes: ep {tp.ep} does not divide {shape.num_experts} experts: skipped")
                continue
            row = {}
            for phase, tokens, steps, ctx, rs in (("decode", 768, a.multinode_steps, a.decode_context, 64.0),
                                                  ("prefill", 8192, 3, 4096, 1.0)):
                c = counts_for(tokens, steps, rs, seed_off=nn * 10 + (phase == "prefill"), topo_=tp)
                mn = ("static", "probe", "ours", "ours-link", "oracle")
                r = simulate(c, cfg_for(topo=tp, context=ctx), mn)
                base = r["policies"]["static"]["mean_step_us"]
                row[phase] = {n: ratio(base, r["policies"][n]["mean_step_us"]) for n in mn}
                row[phase].update(budget_probe_ib=r["budget_probe"], budget_ours_nvlink=r["budget_ours"],
                                  copies_ours=round(r["policies"]["ours"]["copies"], 2),
                                  copies_probe=round(r["policies"]["probe"]["copies"], 2),
                                  ir_static=round(r["policies"]["static"]["ir"], 3),
                                  exposed_probe_us=round(r["policies"]["probe"]["exposed_us"], 1),
                                  window_est_us=r["window_est_us"])
                row[phase]["copies_ours_link"] = round(r["policies"]["ours-link"]["copies"], 2)
                log(lines, f"  {nn} node(s), ep {tp.ep}, {phase}: vs static probe x{row[phase]['probe']:.3f}, ours "
                           f"x{row[phase]['ours']:.3f}, ours-link x{row[phase]['ours-link']:.3f}, oracle x{row[phase]['oracle']:.3f}; budget probe (IB) "
                           f"{r['budget_probe']}, ours (NVLink) {r['budget_ours']}; copies/layer probe "
                           f"{row[phase]['copies_probe']}, ours {row[phase]['copies_ours']} (late ones dropped); "
                           f"IR static {row[phase]['ir_static']}")
            res["multinode"][str(nn)] = row

    res["seconds"] = round(time.time() - t_start, 1)
    log(lines)
    log(lines, f"({res['seconds']} s) {LABEL}")
    if out_json:
        with open(out_json, "w") as f:
            json.dump(res, f, indent=1)
        print(f"wrote {out_json}")
    if a.out_dir:
        with open(os.path.join(a.out_dir, "simulate.txt"), "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
