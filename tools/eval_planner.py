#!/usr/bin/env python3
"""Replay routing step by step and compare balancing policies side by side.

Policies: static (Megatron's contiguous placement), eplb (DeepSeek-style, statistics of past
steps), probe (PROBE as the paper describes it: placement and token split planned from the
predicted counts), probe+reassign (placement from the prediction, split re-computed on the true
counts at dispatch), oracle (planned on the true counts), optimal (exact MILP yardstick, small
cases only).

Data: every file in ../shared/traces (through the loaders; per-step batches of
--tokens-per-step tokens come from the documented generator, and every such result is labelled
GENERATED) and the project's recorded traces (real per-step counts). These traces have no
predictor output yet, so "predicted" counts are the true counts under a stated noise model:
each count multiplied by exp(sigma * N(0, 1)), sigma = --noise, rounded.

  python tools/eval_planner.py --ep 8 --replica-slots 3 --json results/planner/eval.json
  python tools/eval_planner.py --sweep --plot results/planner/ir_vs_slots.png
"""

import argparse
import glob
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from megatron_probe.data.generator import fit_alpha, generate_counts, observed_request_skew  # noqa: E402
from megatron_probe.data.traces import load_any, shared_trace_files  # noqa: E402
from megatron_probe.policy.cost_model import (  # noqa: E402
    ExpertCost,
    ModelShape,
    get_profile,
    transfer_budget,
    transfer_time_us,
    transfer_window_us,
)
from megatron_probe.policy.eplb import EPLBPolicy  # noqa: E402
from megatron_probe.policy.placement import ExpertLayout, holder_slots, validate_assignment  # noqa: E402
from megatron_probe.policy.planner import assign_on_truth, plan_probe_host, rank_times, static_assignment  # noqa: E402

# Public shapes (model cards / configs): GPT-OSS-120B 36 layers, 128 experts, top-4, hidden 2880,
# expert hidden 2880, 8 KV heads x 64; Qwen3-30B-A3B hidden 2048, expert hidden 768, 4 KV heads x 128.
SHAPES = {"gpt-oss-120b": dict(hidden=2880, expert_hidden=2880, kv_dim=512),
          "qwen3-30b-a3b": dict(hidden=2048, expert_hidden=768, kv_dim=512),
          "tiny-moe-v1": dict(hidden=256, expert_hidden=64, kv_dim=256)}  # checkpoints/tiny-moe-v1
POLICIES = ("static", "eplb", "probe", "probe+reassign", "oracle", "optimal")


def noisy(counts, sigma, gen):
    if sigma <= 0:
        return counts.clone()
    f = torch.exp(sigma * torch.randn(counts.shape, generator=gen, dtype=torch.float64))
    return torch.round(counts.double() * f).long()


def split_like(true, pred, pred_assign, layout, placement):
    """Apply the predicted split's proportions to the true counts (PROBE as published)."""
    holds = (holder_slots(placement, layout) >= 0).T  # [E, ep]
    frac = pred_assign.double() / pred.double().clamp_min(1).unsqueeze(-1)
    A = torch.floor(frac * true.double().unsqueeze(-1)).long()
    no_pred = pred == 0
    home = torch.arange(layout.num_experts) // layout.num_local_experts
    A[no_pred] = 0
    s_idx, e_idx = no_pred.nonzero(as_tuple=True)
    A[s_idx, e_idx, home[e_idx]] = true[s_idx, e_idx]
    rest = true - A.sum(-1)  # rounding remainder -> the copy with the largest fraction
    best = torch.where(holds.unsqueeze(0).expand_as(frac), frac, torch.full_like(frac, -1)).argmax(-1)
    A.scatter_add_(2, best.unsqueeze(-1), rest.unsqueeze(-1))
    return A


def ir(assign):
    loads = assign.sum(dim=(0, 1)).double()
    return float(loads.max() / loads.mean()) if loads.sum() > 0 else 1.0


def ir_time(assign, cost):
    t = rank_times(assign, cost)
    return float(t.max() / t.mean()) if t.sum() > 0 else 1.0


def _rec(r, assign, cost):
    r["ir"].append(ir(assign))
    r["ir_time"].append(ir_time(assign, cost))


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))] if xs else float("nan")


def datasets(args, ep):
    """(name, label, counts [steps, L, ep, E]) for every trace."""
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
                              alpha=alpha, shift_step=args.steps // 2 if args.shift else None, seed=args.seed,
                              source=f)
        out.append((os.path.basename(f), f"GENERATED from {os.path.basename(f)} (alpha={alpha}, "
                                          f"{args.tokens_per_step} tokens/step)", gen.counts, tr.topk))
    return out


def evaluate(counts, ep, R, args, hw, shape, policies):
    steps, L, _, E = counts.shape
    layout = ExpertLayout(E, ep, R)
    cost = ExpertCost.from_profile(hw, shape)
    tokens_per_rank = max(1, int(counts[:, 0].sum() / steps / shape.topk / ep))
    window = transfer_window_us(hw, shape, tokens_per_rank, args.context, ep)
    budget = transfer_budget(hw, shape, window)
    t_x = transfer_time_us(hw, shape, 1)
    gen = torch.Generator().manual_seed(args.seed + 7)
    eplb = [EPLBPolicy(layout, args.eplb_window, args.eplb_period) for _ in range(L)]
    res = {p: {"ir": [], "ir_time": [], "copies": [], "exposed_us": []} for p in policies}
    plan_us = []
    gaps = []  # oracle PROBE max-rank time over the exact optimum's, same step and layer
    for s in range(steps):
        for l in range(L):
            C = counts[s, l]
            if "static" in policies:
                _rec(res["static"], static_assignment(C, layout), cost)
                res["static"]["copies"].append(0)
                res["static"]["exposed_us"].append(0.0)
            if "eplb" in policies:
                _, A, moved = eplb[l].plan(C)
                validate_assignment(A, C, eplb[l].placement, layout)
                _rec(res["eplb"], A, cost)
                res["eplb"]["copies"].append(moved)
                per_rank = moved / ep  # rebalance spread over 2 steps, as the paper configured it
                res["eplb"]["exposed_us"].append(max(0.0, per_rank * t_x / 2 - window) * 2 if moved else 0.0)
            if {"probe", "probe+reassign"} & set(policies):
                P = noisy(C, args.noise, gen)
                t0 = time.perf_counter()
                pl, Ap = plan_probe_host(P, layout, cost, budget_in=budget, k_max=args.k_max)
                plan_us.append((time.perf_counter() - t0) * 1e6)
                n_in = (pl >= 0).sum(1)
                exposed = max(0.0, float(n_in.max()) * t_x - window) if R else 0.0
                if "probe" in policies:
                    A = split_like(C, P, Ap, layout, pl)
                    validate_assignment(A, C, pl, layout)
                    _rec(res["probe"], A, cost)
                    res["probe"]["copies"].append(int(n_in.sum()))
                    res["probe"]["exposed_us"].append(exposed)
                if "probe+reassign" in policies:
                    A = assign_on_truth(C, pl, layout, cost)
                    validate_assignment(A, C, pl, layout)
                    _rec(res["probe+reassign"], A, cost)
                    res["probe+reassign"]["copies"].append(int(n_in.sum()))
                    res["probe+reassign"]["exposed_us"].append(exposed)
            if "oracle" in policies:
                pl, A = plan_probe_host(C, layout, cost, budget_in=budget, k_max=args.k_max)
                _rec(res["oracle"], A, cost)
                res["oracle"]["copies"].append(int((pl >= 0).sum()))
                res["oracle"]["exposed_us"].append(0.0)
            if "optimal" in policies and s < args.optimal_steps:
                from megatron_probe.policy.optimal import optimal_plan

                # yardstick on the max-rank token load (the paper's L_r): both planned without the
                # per-active-expert term, so the two objectives are the same
                cost0 = ExpertCost(cost.per_token_us, 0.0)
                z, pl = optimal_plan(C, layout, cost0, budget_in=budget, time_limit=args.optimal_time_limit)
                _rec(res["optimal"], assign_on_truth(C, pl, layout, cost0), cost)
                res["optimal"]["copies"].append(int((pl >= 0).sum()))
                res["optimal"]["exposed_us"].append(0.0)
                _, A_o = plan_probe_host(C, layout, cost0, budget_in=budget, k_max=args.k_max)
                opt_tokens = z / cost0.per_token_us
                probe_tokens = float(A_o.sum(dim=(0, 1)).max())
                gaps.append(probe_tokens / opt_tokens - 1.0 if opt_tokens > 0 else 0.0)
    out = {}
    for p, r in res.items():
        if not r["ir"]:
            continue
        out[p] = {"ir_mean": round(statistics.mean(r["ir"]), 4), "ir_p95": round(pct(r["ir"], 0.95), 4),
                  "ir_max": round(max(r["ir"]), 4), "ir_time_mean": round(statistics.mean(r["ir_time"]), 4),
                  "copies_per_step": round(statistics.mean(r["copies"]) * L, 2),
                  "exposed_us_mean": round(statistics.mean(r["exposed_us"]), 2), "samples": len(r["ir"])}
    if gaps and "optimal" in out:
        out["optimal"]["oracle_probe_gap_mean"] = round(statistics.mean(gaps), 4)
        out["optimal"]["oracle_probe_gap_max"] = round(max(gaps), 4)
        out["optimal"]["note"] = "IR over the first optimal_steps steps only; gap = PROBE (true counts) max-rank tokens / exact optimum - 1, both without the per-active-expert term"
    if plan_us and "probe" in out:
        out["probe"]["plan_us_median"] = round(statistics.median(plan_us), 1)
        out["probe"]["plan_us_p99"] = round(pct(plan_us, 0.99), 1)
    meta = {"window_us": round(window, 1), "transfer_us_per_expert": round(t_x, 1), "budget_in": min(R, budget),
            "tokens_per_rank": tokens_per_rank}
    return out, meta


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trace", action="append", help="trace file (repeatable); default: all shared + traces/*.pt")
    p.add_argument("--ep", type=int, default=8)
    p.add_argument("--replica-slots", type=int, default=3)
    p.add_argument("--tokens-per-step", type=int, default=4096)
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--layers", type=int, default=8, help="first N MoE layers of each trace")
    p.add_argument("--hardware", default="h200-sxm")
    p.add_argument("--shape", default="gpt-oss-120b", choices=sorted(SHAPES))
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--noise", type=float, default=0.1)
    p.add_argument("--k-max", type=int, default=16)
    p.add_argument("--eplb-window", type=int, default=50)
    p.add_argument("--eplb-period", type=int, default=50)
    p.add_argument("--shift", action="store_true", help="generated data switches its hot experts halfway")
    p.add_argument("--optimal-steps", type=int, default=3, help="steps solved exactly (small cases only)")
    p.add_argument("--optimal-time-limit", type=float, default=20.0)
    p.add_argument("--generate", action="store_true", help="recorded traces too: generated steps from their heat")
    p.add_argument("--sweep", action="store_true", help="EP 4/8/16/32 x replica slots 0-4 on generated data")
    p.add_argument("--plot")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json")
    a = p.parse_args()
    torch.set_num_threads(1)
    hw = get_profile(a.hardware)
    t0 = time.time()
    result = {"command": "python tools/eval_planner.py " + " ".join(sys.argv[1:]), "hardware": hw.name,
              "shape": a.shape, "noise_model": f"count * exp({a.noise} * N(0,1)), rounded", "ep": a.ep,
              "replica_slots": a.replica_slots, "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime())}
    if a.sweep:
        sweep = {}
        a.trace = [f for f in shared_trace_files() if "coactivation_qwen3-30b" in f]
        for ep in (4, 8, 16, 32):
            data = datasets(a, ep)
            for R in range(0, 5):
                shape = ModelShape(num_experts=data[0][2].shape[-1], topk=data[0][3], **SHAPES[a.shape])
                out, meta = evaluate(data[0][2], ep, R, a, hw, shape, ("static", "eplb", "probe", "probe+reassign",
                                                                      "oracle"))
                sweep[f"ep{ep}_r{R}"] = {"ep": ep, "R": R, "policies": out, **meta}
                print(f"ep {ep:2d} R {R}: " + "  ".join(f"{k} {v['ir_mean']:.3f}" for k, v in out.items()), flush=True)
        result["sweep"] = sweep
        result["data"] = "GENERATED from coactivation_qwen3-30b-a3b.json"
        if a.plot:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt

            fig, axes = plt.subplots(1, 4, figsize=(16, 3.8), sharey=True)
            for ax, ep in zip(axes, (4, 8, 16, 32)):
                for pol in ("static", "eplb", "probe", "probe+reassign", "oracle"):
                    ys = [sweep[f"ep{ep}_r{R}"]["policies"][pol]["ir_mean"] for R in range(5)]
                    ax.plot(range(5), ys, marker="o", label=pol)
                ax.set_title(f"EP {ep}")
                ax.set_xlabel("replica slots per rank")
                ax.grid(alpha=0.3)
            axes[0].set_ylabel("IR (mean over steps x layers)")
            axes[-1].legend(fontsize=8)
            fig.suptitle("IR vs replica slots (GENERATED steps from the Qwen3-30B decode aggregate, "
                         f"{a.tokens_per_step} tokens/step, {hw.name})", fontsize=9)
            fig.tight_layout()
            os.makedirs(os.path.dirname(os.path.abspath(a.plot)), exist_ok=True)
            fig.savefig(a.plot, dpi=110)
    else:
        result["policies_by_trace"] = {}
        for name, label, counts, topk in datasets(a, a.ep):
            E = counts.shape[-1]
            small = E <= 32 and a.ep <= 8
            pols = POLICIES if small else POLICIES[:-1]
            shape_name = "tiny-moe-v1" if (label.startswith("recorded") or E == 32) else a.shape
            shape = ModelShape(num_experts=E, topk=topk, **SHAPES[shape_name])
            label += f"; cost model: {shape_name} on {hw.name}"
            out, meta = evaluate(counts, a.ep, a.replica_slots, a, hw, shape, pols)
            if not small:
                out["optimal"] = {"skipped": f"{E} experts at EP {a.ep}: too large for the exact MILP"}
            result["policies_by_trace"][name] = {"data": label, "policies": out, **meta}
            print(f"\n== {name}: {label}; window {meta['window_us']} us, budget {meta['budget_in']} copies/rank")
            print(f"{'policy':16s} {'IR mean':>8s} {'p95':>7s} {'max':>7s} {'IR(time)':>8s} {'copies/step':>12s} {'exposed us':>10s} "
                  f"{'plan us (med/p99)':>18s}")
            for pol, m in out.items():
                if "skipped" in m:
                    print(f"{pol:16s} skipped: {m['skipped']}")
                    continue
                pt = f"{m.get('plan_us_median', '')}/{m.get('plan_us_p99', '')}" if "plan_us_median" in m else ""
                print(f"{pol:16s} {m['ir_mean']:8.3f} {m['ir_p95']:7.3f} {m['ir_max']:7.3f} {m['ir_time_mean']:8.3f} {m['copies_per_step']:12.1f} "
                      f"{m['exposed_us_mean']:10.1f} {pt:>18s}")
        first = next(iter(result["policies_by_trace"].values()))
        result["policies"] = first["policies"]  # the first trace, in the documented top-level shape
        result["policies_trace"] = next(iter(result["policies_by_trace"]))
    result["seconds"] = round(time.time() - t0, 1)
    if a.json:
        os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
        with open(a.json, "w") as f:
            json.dump(result, f, indent=1)
    print(f"\n{result['seconds']} s")


if __name__ == "__main__":
    main()
