#!/usr/bin/env python3
"""Replay routing step by step and compare balancing policies side by side, per phase.

The protocol and the policies are ``megatron_probe.policy.evaluation`` (docs/planner.md): the
same steps for every policy, equal replica slots (EPLB: ``ep x R`` redundant experts per layer),
results per phase (warm-up = EPLB's first window, excluded from the headline; stationary; after
the shift), token IR, time IR, copies per step and replica memory. EPLB runs as vLLM deploys it
with its defaults (window 1000 steps, rebalance every 3000) scaled to the run: window
``--eplb-window`` (50), period ``--eplb-period`` (150), the first rebalance once the first window
is recorded. ``--shift`` permutes the hot experts half way between two rebalances.

Data: every file in ../shared/traces (through the loaders; per-step batches of
--tokens-per-step tokens come from the documented generator, and every such result is labelled
GENERATED) and the project's recorded traces (real per-step counts). These traces have no
predictor output, so PROBE's "forecast" is the true counts with mean-preserving log-normal noise
(sigma = --noise).

  python tools/eval_planner.py --ep 8 --replica-slots 3 --shift --json results/planner/eval_ep8_r3.json
  python tools/eval_planner.py --sweep --plot results/planner/ir_vs_slots.png
"""

import argparse
import glob
import json
import os
import sys
import time

import torch

from megatron_probe.data.generator import fit_alpha, generate_counts, observed_request_skew
from megatron_probe.data.traces import load_any, shared_trace_files
from megatron_probe.policy.cost_model import (
    ExpertCost,
    ModelShape,
    get_profile,
    transfer_budget,
    transfer_time_us,
    transfer_window_us,
)
from megatron_probe.policy.evaluation import POLICIES, EvalSetup, default_shift_step, replay
from megatron_probe.runtime.host_malloc import apply_host_malloc_setting

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Public shapes (model cards / configs): GPT-OSS-120B 36 layers, 128 experts, top-4, hidden 2880,
# expert hidden 2880, 8 KV heads x 64; Qwen3-30B-A3B hidden 2048, expert hidden 768, 4 KV heads x 128.
SHAPES = {"gpt-oss-120b": dict(hidden=2880, expert_hidden=2880, kv_dim=512),
          "qwen3-30b-a3b": dict(hidden=2048, expert_hidden=768, kv_dim=512),
          "tiny-moe-v1": dict(hidden=256, expert_hidden=64, kv_dim=256)}  # checkpoints/tiny-moe-v1
SWEEP_POLICIES = ("static", "eplb", "eplb_local", "probe", "probe+reassign", "exact_split", "oracle")


def datasets(args, ep):
    """(name, label, counts [steps, L, ep, E], topk) for every trace."""
    files = args.trace or (shared_trace_files() + sorted(glob.glob(os.path.join(ROOT, "traces", "*.pt"))))
    per_token = [f for f in shared_trace_files() if f.endswith(".route.csv")]
    ref_trace = load_any(per_token[0]) if per_token else None  # request skew for the generator
    out = []
    for f in files:
        tr = load_any(f)
        if tr.num_experts % ep:
            print(f"skip {f}: {tr.num_experts} experts not divisible by ep {ep}")
            continue
        L = min(tr.num_layers, args.layers)
        if tr.source.startswith("recorded") and tr.steps and not args.generate:
            c = torch.stack([torch.stack([s.rank_expert_counts(l, tr.num_experts, ep) for l in range(L)])
                             for s in tr.steps[: args.steps] if s.num_tokens > 0])
            out.append((os.path.basename(f), f"recorded ({tr.source}), {int(c[:, 0].sum() / len(c) / tr.topk)} "
                                             f"tokens/step", c, tr.topk))
            continue
        ref = ref_trace or tr
        alpha = fit_alpha(tr.heat[:L], ref.topk, max(1, ref.n_tokens), observed_request_skew(ref), seed=args.seed)
        reqs = ep * max(1, 64 // ep)
        gen = generate_counts(tr.heat[:L], tr.topk, args.steps, args.tokens_per_step, ep, requests_per_step=reqs,
                              alpha=alpha, shift_step=args.shift_step, seed=args.seed, source=f)
        out.append((os.path.basename(f), f"GENERATED from {os.path.basename(f)} (alpha={alpha}, "
                                          f"{args.tokens_per_step} tokens/step)", gen.counts, tr.topk))
    return out


def setup_for(counts, ep, R, args, hw, shape):
    steps = counts.shape[0]
    cost = ExpertCost.from_profile(hw, shape)
    tokens_per_rank = max(1, int(counts[:, 0].sum() / steps / shape.topk / ep))
    window = transfer_window_us(hw, shape, tokens_per_rank, args.context, ep)
    budget = min(R, transfer_budget(hw, shape, window))
    setup = EvalSetup(ep=ep, replica_slots=R, cost=cost, budget_in=budget, eplb_window=args.eplb_window,
                      eplb_period=args.eplb_period, noise=args.noise, k_max=args.k_max, seed=args.seed,
                      exact_time_steps=args.exact_time_steps, exact_time_limit=args.exact_time_limit,
                      optimal_steps=args.optimal_steps, optimal_time_limit=args.optimal_time_limit,
                      copy_cost_us=0.0, split_objective=args.split_objective)  # resident copies ride in the window like PROBE's (within the budget): hidden
    meta = {"window_us": round(window, 1), "transfer_us_per_expert": round(transfer_time_us(hw, shape, 1), 1),
            "budget_in": budget, "tokens_per_rank": tokens_per_rank}
    return setup, meta


def print_table(name, label, res, meta):
    print(f"\n== {name}: {label}; window {meta['window_us']} us, budget {meta['budget_in']} copies/rank")
    for ph, block in res["phases"].items():
        first, last = block["steps"]
        tag = " (excluded from the headline)" if ph == "warmup" else ""
        print(f"-- {ph}, steps {first}-{last}{tag}")
        print(f"{'policy':16s} {'IR mean':>8s} {'p95':>7s} {'max':>7s} {'IR(time)':>8s} {'copies/step':>12s} "
              f"{'replica mem':>11s}")
        for pol, m in block["policies"].items():
            print(f"{pol:16s} {m['ir_mean']:8.3f} {m['ir_p95']:7.3f} {m['ir_max']:7.3f} {m['ir_time_mean']:8.3f} "
                  f"{m['copies_per_step']:12.2f} {m['replica_memory_experts']:11d}")
    for k, v in res["extra"].items():
        print(f"{k}: {v}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trace", action="append", help="trace file (repeatable); default: all shared + traces/*.pt")
    p.add_argument("--ep", type=int, default=8)
    p.add_argument("--replica-slots", type=int, default=3)
    p.add_argument("--tokens-per-step", type=int, default=4096)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--layers", type=int, default=8, help="first N MoE layers of each trace")
    p.add_argument("--hardware", default="h200-sxm")
    p.add_argument("--shape", default="gpt-oss-120b", choices=sorted(SHAPES))
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--noise", type=float, default=0.1)
    p.add_argument("--k-max", type=int, default=16)
    p.add_argument("--eplb-window", type=int, default=50, help="vLLM's window_size 1000 scaled to the run")
    p.add_argument("--eplb-period", type=int, default=150, help="vLLM's step_interval 3000 scaled to the run")
    p.add_argument("--shift", action="store_true", help="generated data permutes its hot experts half way between "
                                                         "two EPLB rebalances")
    p.add_argument("--shift-step", type=int, default=None, help="the shift's step (default with --shift: half way)")
    p.add_argument("--policies", default=",".join(POLICIES), help=f"comma list of {POLICIES}")
    p.add_argument("--split-objective", choices=("time", "tokens"), default="time",
                   help="the dispatch split of the ours_* policies: the cost model's time or exact tokens")
    p.add_argument("--exact-time-steps", type=int, default=2,
                   help="stationary steps per layer where the time-objective MILP runs")
    p.add_argument("--exact-time-limit", type=float, default=5.0)
    p.add_argument("--optimal-steps", type=int, default=3, help="first stationary steps solved by the placement MILP (small cases)")
    p.add_argument("--optimal-time-limit", type=float, default=20.0)
    p.add_argument("--generate", action="store_true", help="recorded traces too: generated steps from their heat")
    p.add_argument("--sweep", action="store_true", help="EP 4/8/16/32 x replica slots 0-4 on generated data")
    p.add_argument("--plot")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--malloc-default", action="store_true",
                   help="leave glibc's malloc thresholds as they are (ProbeConfig.host_malloc_reuse=False; "
                        "default: set as the pipeline sets them, runtime/host_malloc.py)")
    p.add_argument("--json")
    a = p.parse_args(argv)
    if a.shift and a.shift_step is None:
        a.shift_step = default_shift_step(a.steps, a.eplb_window, a.eplb_period)
    policies = tuple(x for x in a.policies.split(",") if x)
    bad = [x for x in policies if x not in POLICIES]
    if bad:
        p.error(f"--policies: unknown {bad}; valid: {', '.join(POLICIES)}")
    if not 0 < a.eplb_window < a.steps:
        p.error(f"--eplb-window {a.eplb_window} must be in 1..{a.steps - 1} (--steps {a.steps}): the steps after it "
                "are the stationary phase")
    torch.set_num_threads(1)
    host_malloc = apply_host_malloc_setting(not a.malloc_default)
    try:
        hw = get_profile(a.hardware)
    except ValueError as e:
        p.error(str(e))
    t0 = time.time()
    result = {"command": "python tools/eval_planner.py " + " ".join(sys.argv[1:]), "hardware": hw.name,
              "shape": a.shape, "noise_model": f"count * exp({a.noise} N(0,1) - {a.noise}^2/2), rounded", "ep": a.ep,
              "replica_slots": a.replica_slots, "steps": a.steps, "eplb_window": a.eplb_window,
              "eplb_period": a.eplb_period, "shift_step": a.shift_step, "split_objective": a.split_objective,
              "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()), "host_malloc": host_malloc}
    try:
        if a.sweep:
            run_sweep(a, hw, result)
        else:
            run_traces(a, hw, result, policies)
    except ValueError as e:
        p.error(str(e))
    result["seconds"] = round(time.time() - t0, 1)
    if a.json:
        os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
        with open(a.json, "w") as f:
            json.dump(result, f, indent=1)
    print(f"\n{result['seconds']} s")


def run_traces(a, hw, result, policies):
    result["policies_by_trace"] = {}
    for name, label, counts, topk in datasets(a, a.ep):
        E = counts.shape[-1]
        pols = policies if (E <= 32 and a.ep <= 8) else tuple(x for x in policies if x != "optimal")
        shape_name = "tiny-moe-v1" if (label.startswith("recorded") or E == 32) else a.shape
        shape = ModelShape(num_experts=E, topk=topk, **SHAPES[shape_name])
        label += f"; cost model: {shape_name} on {hw.name}"
        setup, meta = setup_for(counts, a.ep, a.replica_slots, a, hw, shape)
        res = replay(counts, setup, a.shift_step, pols)
        if "optimal" in policies and "optimal" not in pols:
            res["extra"]["optimal"] = {"skipped": f"{E} experts at EP {a.ep}: too large for the exact MILP"}
        result["policies_by_trace"][name] = {"data": label, **res,
                                             "policies": res["phases"]["stationary"]["policies"], **meta}
        print_table(name, label, res, meta)
    first = next(iter(result["policies_by_trace"].values()))
    result["phases"] = first["phases"]
    result["policies"] = first["policies"]  # the first trace's stationary phase, for old readers
    result["policies_trace"] = next(iter(result["policies_by_trace"]))


def run_sweep(a, hw, result):
    sweep = {}
    a.trace = [f for f in shared_trace_files() if "coactivation_qwen3-30b" in f]
    for ep in (4, 8, 16, 32):
        data = datasets(a, ep)
        for R in range(0, 5):
            counts, topk = data[0][2], data[0][3]
            shape = ModelShape(num_experts=counts.shape[-1], topk=topk, **SHAPES[a.shape])
            setup, meta = setup_for(counts, ep, R, a, hw, shape)
            res = replay(counts, setup, a.shift_step, SWEEP_POLICIES)
            out = res["phases"]["stationary"]["policies"]
            sweep[f"ep{ep}_r{R}"] = {"ep": ep, "R": R, "policies": out, "phases": res["phases"], **meta}
            print(f"ep {ep:2d} R {R}: " + "  ".join(f"{k} {v['ir_mean']:.3f}" for k, v in out.items()), flush=True)
    result["sweep"] = sweep
    result["data"] = "GENERATED from coactivation_qwen3-30b-a3b.json; stationary phase"
    if a.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 4, figsize=(16, 3.8), sharey=True)
        for ax, ep in zip(axes, (4, 8, 16, 32)):
            for pol in SWEEP_POLICIES:
                ys = [sweep[f"ep{ep}_r{R}"]["policies"][pol]["ir_mean"] for R in range(5)]
                ax.plot(range(5), ys, marker="o", label=pol)
            ax.set_title(f"EP {ep}")
            ax.set_xlabel("replica slots per rank (EPLB: redundant experts per rank per layer)")
            ax.grid(alpha=0.3)
        axes[0].set_ylabel("token IR, stationary phase")
        axes[-1].legend(fontsize=8)
        fig.suptitle("IR vs replica slots (GENERATED steps from the Qwen3-30B decode aggregate, "
                     f"{a.tokens_per_step} tokens/step, {hw.name}; warm-up excluded)", fontsize=9)
        fig.tight_layout()
        os.makedirs(os.path.dirname(os.path.abspath(a.plot)), exist_ok=True)
        fig.savefig(a.plot, dpi=110)


if __name__ == "__main__":
    main()
