#!/usr/bin/env python3
"""Per-layer host cost of the balancer's pieces, on steps generated from the public traces.

For each configuration, GENERATED steps (``data.generator.generate_counts``, as
``tools/eval_planner.py`` makes them) are replayed layer by layer: a ``ResidentPlanner`` per layer
decides on a noisy forecast (log-normal, sigma 0.1, as the evaluation), and on its resident
placement the true counts are split. Timed per call (``time.perf_counter``, 1 thread):

* ``split_tokens`` / ``split_time``: ``split.placement_split`` (tokens / time objective), the dispatch's
  entry (the resident placement in: its tables cached);
* ``assign_on_truth``: the planner's greedy re-split the split replaces;
* ``plan_probe_host``: PROBE's host planner on the forecast (the streamed plan);
* ``resident_plan``: ``ResidentPlanner.plan`` on stationary steps (after its warm start);
* ``resident_plan+split_time``: the per-layer host work of the resident balancer (decision and
  split), per step;
* ``plan_probe_host+split_time``: the same for the streamed balancer (PROBE's plan, then the
  split over it).

``--gap-steps N``: on the first N timed steps (every layer), the dispatch split's slowest time
against the time MILP's optimum (``optimal.exact_split``) on the resident and on the PROBE
placement, with and without the split's branch and bound.

Medians and p99 in microseconds per layer. Configurations: ``e128_ep8`` (Qwen3-30B aggregate,
128 experts, EP 8, R 3; the target's), ``e32_ep2`` (the project's recorded tiny-model trace
``traces/shift.pt``, real per-step counts), ``e512_ep32`` (Qwen3-Next aggregate, 512 experts,
EP 32, R 3).

  python tools/bench_balancer.py --json results/planner/bench_balancer.json
"""

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from megatron_probe.data.generator import fit_alpha, generate_counts, observed_request_skew  # noqa: E402
from megatron_probe.data.traces import load_any, shared_trace_files  # noqa: E402
from megatron_probe.policy.cost_model import ExpertCost, ModelShape, get_profile  # noqa: E402
from megatron_probe.policy.evaluation import noisy_forecast  # noqa: E402
from megatron_probe.policy.placement import ExpertLayout, holder_slots  # noqa: E402
from megatron_probe.policy.planner import assign_on_truth, plan_probe_host  # noqa: E402
from megatron_probe.policy.resident import ResidentPlanner, ResidentSettings  # noqa: E402
from megatron_probe.runtime.host_malloc import apply_host_malloc_setting  # noqa: E402
from megatron_probe.policy.split import balanced_split, placement_split, placement_split_times  # noqa: E402

# eval_planner.py's shapes: generated steps priced as GPT-OSS-120B experts, the tiny model as itself
SHAPES = {"gpt-oss-120b": dict(hidden=2880, expert_hidden=2880, kv_dim=512),
          "tiny-moe-v1": dict(hidden=256, expert_hidden=64, kv_dim=256)}
CONFIGS = {"e128_ep8": ("coactivation_qwen3-30b-a3b.json", 8, "gpt-oss-120b"),
           "e32_ep2": ("shift.pt", 2, "tiny-moe-v1"),
           "e512_ep32": ("coactivation_qwen3-next-80b-a3b.json", 32, "gpt-oss-120b")}


def _find(name):
    for f in shared_trace_files() + [os.path.join(ROOT, "traces", name)]:
        if os.path.basename(f) == name and os.path.exists(f):
            return f
    raise FileNotFoundError(f"{name}: not in ../shared/traces nor traces/")


def steps_for(name, ep, args):
    """``([steps, L, ep, E] counts, topk, label)``: recorded counts as they are, else generated."""
    tr = load_any(_find(name))
    L = min(tr.num_layers, args.layers)
    if tr.source.startswith("recorded") and tr.steps:
        c = torch.stack([torch.stack([s.rank_expert_counts(l, tr.num_experts, ep) for l in range(L)])
                         for s in tr.steps[: args.steps] if s.num_tokens > 0])
        return c, tr.topk, f"recorded ({tr.source}), {len(c)} steps x {L} layers"
    per_token = [f for f in shared_trace_files() if f.endswith(".route.csv")]
    ref = load_any(per_token[0]) if per_token else tr
    alpha = fit_alpha(tr.heat[:L], ref.topk, max(1, ref.n_tokens), observed_request_skew(ref), seed=args.seed)
    gen = generate_counts(tr.heat[:L], tr.topk, args.steps, args.tokens_per_step, ep,
                          requests_per_step=ep * max(1, 64 // ep), alpha=alpha, seed=args.seed, source=name)
    return gen.counts, tr.topk, (f"GENERATED from {name} (alpha={alpha}, {args.tokens_per_step} tokens/step), "
                                 f"{args.steps} steps x {L} layers")


def _us(fn):
    """``((wall us, this thread's CPU us), result)``: on a shared machine the CPU time leaves out
    the waits for a core."""
    c0, t0 = time.thread_time_ns(), time.perf_counter()
    out = fn()
    return ((time.perf_counter() - t0) * 1e6, (time.thread_time_ns() - c0) / 1e3), out


def _stats(xs):
    wall, cpu = sorted(x[0] for x in xs), sorted(x[1] for x in xs)
    p99 = min(len(xs) - 1, int(0.99 * len(xs)))
    return {"median_us": round(statistics.median(wall), 1), "p99_us": round(wall[p99], 1),
            "mean_us": round(statistics.mean(wall), 1), "cpu_median_us": round(statistics.median(cpu), 1),
            "cpu_p99_us": round(cpu[p99], 1), "samples": len(xs)}


def bench(name, ep, shape_name, R, args, data=None):
    counts, topk, label = data or steps_for(name, ep, args)
    steps, L, _, E = counts.shape
    lay = ExpertLayout(E, ep, R)
    cost = ExpertCost.from_profile(get_profile(args.hardware), ModelShape(num_experts=E, topk=topk,
                                                                           **SHAPES[shape_name]))
    gen = torch.Generator().manual_seed(args.seed + 7)
    planners = [ResidentPlanner(lay, cost, ResidentSettings(k_max=args.k_max)) for _ in range(L)]
    t = {k: [] for k in ("split_tokens", "split_time", "assign_on_truth", "plan_probe_host", "resident_plan",
                         "resident_plan+split_time", "plan_probe_host+split_time")}
    gaps = {k: [] for k in ("resident", "probe")}
    no_search = {k: [] for k in ("resident", "probe")}
    compare = []  # (counts, resident placement, PROBE placement) of the steps compared with the MILP
    changes = 0
    for s in range(steps):
        for l in range(L):
            C = counts[s, l].long()
            P = noisy_forecast(C, args.noise, gen)
            us_plan, (pl, copies) = _us(lambda: planners[l].plan(P))
            planners[l].observe(C)
            if s < args.warmup:
                continue
            changes += copies > 0
            us_tok, _ = _us(lambda: placement_split(C, pl, lay, "tokens"))
            us_time, _ = _us(lambda: placement_split(C, pl, lay, "time", cost))
            us_greedy, _ = _us(lambda: assign_on_truth(C, pl, lay, cost))
            us_probe, (probe_pl, _) = _us(lambda: plan_probe_host(P, lay, cost, k_max=args.k_max))
            us_probe_split, _ = _us(lambda: placement_split(C, probe_pl, lay, "time", cost))
            for k, v in (("split_tokens", us_tok), ("split_time", us_time), ("assign_on_truth", us_greedy),
                         ("plan_probe_host", us_probe), ("resident_plan", us_plan),
                         ("resident_plan+split_time", (us_plan[0] + us_time[0], us_plan[1] + us_time[1])),
                         ("plan_probe_host+split_time", (us_probe[0] + us_probe_split[0],
                                                         us_probe[1] + us_probe_split[1]))):
                t[k].append(v)
            if s - args.warmup < args.gap_steps:
                compare.append((C, pl, probe_pl))
    for C, pl, probe_pl in compare:  # after the timings (HiGHS between them would cool the caches)
        for k, placement in (("resident", pl), ("probe", probe_pl)):
            gap = _milp_gap(C, placement, lay, cost)
            if gap is not None:
                gaps[k].append(gap[0])
                no_search[k].append(gap[1])
    return {"data": label, "E": E, "ep": ep, "R": R, "layers": L, "steps": steps, "warmup_steps": args.warmup,
            "resident_changes": changes, "cost": {"per_token_us": cost.per_token_us,
                                                   "per_active_expert_us": cost.per_active_expert_us},
            "timings": {k: _stats(v) for k, v in t.items()},
            **({"gap_to_milp": {k: {"steps": len(v), **_gap_stats(v), "local_search_only": _gap_stats(no_search[k])}
                                for k, v in gaps.items()}} if args.gap_steps else {})}


def _milp_gap(counts, placement, lay, cost):
    """``(gap, gap without the branch and bound)``: the dispatch split's slowest time over the time
    MILP's optimum, minus 1, on ``placement``'s copies (None when HiGHS does not solve it in 10 s)."""
    from megatron_probe.policy.optimal import exact_split

    best = exact_split(counts, holder_slots(placement, lay) >= 0, "time", cost, time_limit=10.0)
    if best.method != "milp" or best.value <= 0:
        return None
    full = float(placement_split_times(counts, placement, lay, cost).max())
    local = float(placement_split_times(counts, placement, lay, cost, search=False).max())
    return full / best.value - 1.0, local / best.value - 1.0


def _gap_stats(v):
    return {"mean": round(statistics.mean(v), 5), "max": round(max(v), 5),
            "above_0.5pct": sum(x > 0.005 for x in v)} if v else {}


def lp_gap(n_cases, seed=0, extra=None):
    """Mean and max of (slowest time / the MILP's optimum - 1) of the time split, the token split
    and the planner's greedy re-split, on random cases: skewed counts split over a plan made on a
    noisy forecast of them (as tests/test_balancer.py's cases), E = 4..64, EP 2/4/8, R 0..3,
    cost 0.1 us per token + 6.4 us per active expert. Only cases the MILP solves to optimality
    count. ``extra``: more ``name -> split(counts, holds, cost)`` to compare (e.g. an older split)."""
    from megatron_probe.policy.optimal import exact_split
    from megatron_probe.policy.planner import rank_times

    extra = extra or {}
    cost = ExpertCost(per_token_us=0.1, per_active_expert_us=6.4)
    g = torch.Generator().manual_seed(seed)
    gaps = {k: [] for k in ["split_time", "split_tokens", "assign_on_truth", *extra]}
    skipped = 0
    for _ in range(n_cases):
        ep = [2, 4, 8][int(torch.randint(3, (1,), generator=g))]
        E = ep * int(torch.randint(1, 9, (1,), generator=g))
        R = int(torch.randint(0, min(3, E - E // ep) + 1, (1,), generator=g))
        hot = torch.rand(E, generator=g) ** [1, 4][int(torch.randint(2, (1,), generator=g))]
        scale = [2, 30, 600][int(torch.randint(3, (1,), generator=g))]
        counts = (hot.unsqueeze(0) * torch.rand(ep, E, generator=g) * scale).round().long()
        fc = (counts.double() * torch.exp(0.3 * torch.randn(ep, E, generator=g, dtype=torch.float64))).round().long()
        lay = ExpertLayout(E, ep, R)
        pl, _ = plan_probe_host(fc, lay, cost)
        holds = holder_slots(pl, lay) >= 0
        best = exact_split(counts, holds, "time", cost, time_limit=10.0)
        if best.method != "milp" or best.value <= 0:
            skipped += 1
            continue
        for k, A in (("split_time", balanced_split(counts, holds, "time", cost)),
                     ("split_tokens", balanced_split(counts, holds)),
                     ("assign_on_truth", assign_on_truth(counts, pl, lay, cost)),
                     *((k, f(counts, holds, cost)) for k, f in extra.items())):
            gaps[k].append(float(rank_times(A, cost).max()) / best.value - 1.0)
    return {"cases": len(gaps["split_time"]), "not_solved_skipped": skipped,
            **{k: {"mean": round(statistics.mean(v), 5), "max": round(max(v), 5),
                   "share_above_0.5pct": round(sum(x > 0.005 for x in v) / len(v), 4)} for k, v in gaps.items()}}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", default="e128_ep8,e32_ep2", help=f"comma list of {sorted(CONFIGS)}")
    p.add_argument("--replica-slots", type=int, default=3)
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--warmup", type=int, default=5, help="first steps not timed (the warm start among them)")
    p.add_argument("--tokens-per-step", type=int, default=4096)
    p.add_argument("--noise", type=float, default=0.1)
    p.add_argument("--k-max", type=int, default=16)
    p.add_argument("--hardware", default="h200-sxm")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lp-gap", type=int, default=0, help="also the time split's gap to the MILP on this many "
                                                          "random cases")
    p.add_argument("--gap-steps", type=int, default=0, help="also compare the dispatch split with the time MILP's "
                                                              "optimum on this many timed steps (every layer, the "
                                                              "resident and the PROBE placement)")
    p.add_argument("--malloc-default", action="store_true",
                   help="leave glibc's malloc thresholds as they are (ProbeConfig.host_malloc_reuse=False; "
                        "default: set as the pipeline sets them, runtime/host_malloc.py)")
    p.add_argument("--json")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    host_malloc = apply_host_malloc_setting(not a.malloc_default)
    result = {"command": "python tools/bench_balancer.py " + " ".join(sys.argv[1:]),
              "machine": {"arch": platform.machine(), "cores": os.cpu_count(), "torch": torch.__version__,
                          "threads": torch.get_num_threads(), "load_avg_at_start": list(os.getloadavg()),
                          "host_malloc": host_malloc},
              "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
              "hardware_cost_model": a.hardware, "configs": {}}
    configs = [x for x in a.configs.split(",") if x]
    for c in configs:
        if c not in CONFIGS:
            p.error(f"--configs: unknown {c!r}; valid: {sorted(CONFIGS)}")
    try:  # the hardware profile and every configuration's trace, read and checked before any timing
        get_profile(a.hardware)
        data = {c: steps_for(CONFIGS[c][0], CONFIGS[c][1], a) for c in configs}
    except (ValueError, FileNotFoundError) as e:
        p.error(str(e))
    for c in configs:
        name, ep, shape = CONFIGS[c]
        res = bench(name, ep, shape, a.replica_slots, a, data[c])
        result["configs"][c] = res
        print(f"\n== {c}: {res['data']}; E {res['E']}, EP {ep}, R {res['R']}; "
              f"{res['resident_changes']} resident changes in the timed steps")
        print(f"{'per layer (us)':28s} {'median':>9s} {'p99':>9s} {'mean':>9s} {'CPU median':>11s} {'CPU p99':>9s}")
        for k, v in res["timings"].items():
            print(f"{k:28s} {v['median_us']:9.1f} {v['p99_us']:9.1f} {v['mean_us']:9.1f} {v['cpu_median_us']:11.1f} "
                  f"{v['cpu_p99_us']:9.1f}")
        for k, g in res.get("gap_to_milp", {}).items():
            if g.get("steps"):
                print(f"time split / MILP - 1 on the {k} placement, {g['steps']} layer steps: mean {g['mean']:.5f} "
                      f"max {g['max']:.5f}, above 0.5%: {g['above_0.5pct']} (local search only: mean "
                      f"{g['local_search_only']['mean']:.5f} max {g['local_search_only']['max']:.5f}, above 0.5%: "
                      f"{g['local_search_only']['above_0.5pct']})")
    if a.lp_gap:
        result["lp_gap"] = gap = lp_gap(a.lp_gap, a.seed)
        print(f"\n== gap to the time MILP's optimum on {gap['cases']} random cases (slowest time / optimum - 1)")
        for k in ("split_time", "split_tokens", "assign_on_truth"):
            print(f"{k:16s} mean {gap[k]['mean']:.4f}  max {gap[k]['max']:.4f}  "
                  f"above 0.5%: {gap[k]['share_above_0.5pct']:.1%}")
    result["machine"]["load_avg_at_end"] = list(os.getloadavg())
    if a.json:
        os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
        with open(a.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
