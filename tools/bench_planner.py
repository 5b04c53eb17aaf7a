#!/usr/bin/env python3
"""Host cost of PROBE's planner per layer, each version, and the one-pass copy charge against the
retried budgets.

Timed per call (``time.perf_counter`` and this thread's CPU time, 1 torch thread), on the same
counts, versions interleaved per case:

* ``plan_probe``: the tensor planner (no host synchronisation; a GPU side stream's version);
* ``plan_probe_host``: its host twin (a compiled integer loop);
* ``copy_charge_retry``: ``plan_with_copy_charge_retry`` (one plain plan per budget R..0, the
  plan with the least charged slowest rank), charge ``--charge-us``;
* ``copy_charge_one_pass``: ``plan_with_copy_charge`` (the charge priced inside one pass);
* ``split_time``: ``split.placement_split`` (time objective) of the counts over the one-pass
  placement, the dispatch's entry (the placement in; its tables cached for the last 64
  placements, so with more cases than that every call builds them: the streamed case);
* ``split_time_holds``: the same split by ``split.balanced_split`` from a prebuilt ``[ep, E]``
  holder table (the entry for any holder sets);
* with ``--baseline-rev REV``: ``plan_probe_host``, ``plan_with_copy_charge`` and
  ``placement_split`` of ``megatron_probe/policy/planner.py`` and ``split.py`` at git revision
  REV (``..._at_REV``), for before/after in the same run.

Configurations: E in {32, 128, 256} x EP in {2, 8, 32} (skipped where E % EP or E < EP), R
``--replica-slots``, ``k_max`` ``--k-max``. Counts: SKEWED synthetic steps (expert weights
``u**4``, ``u`` uniform, times a per-rank factor in [0.5, 1.5); ``--tokens-per-step`` tokens x
top-8 spread over the ranks), and for E 128 also steps GENERATED from the public Qwen3-30B-A3B
routing heat (``../shared/traces/mbolt``) by ``data.generator.generate_counts``, as
``tools/eval_planner.py`` makes them. Cost model: GPT-OSS-120B expert shape on ``--hardware``.
Every case also checks that the versions agree where they must (host = tensor; one pass at
charge 0 = host); the counts of disagreements are in the JSON (``mismatches``).

``--compare N``: the one-pass plan's slowest charged time against the retry's, on N random
cases (E 4..64, EP 2/4/8, R 0..4, charges 1-50% of the mean rank time) and on the generated
E 128 steps (EP 8, R 3, charges 5/30/100 us). Scored two ways: each plan's own split (the
retry's criterion) and the balanced time split of the counts over its placement (what the
pipeline dispatches; it does not see the charges); both plus ``charge`` per copy on its sender and
its receiver. ``slower_than_static``: cases where that is above the static placement's slowest rank.

  python tools/bench_planner.py --baseline-rev HEAD --compare 400 --json results/planner/bench_planner.json
"""

import argparse
import datetime
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from megatron_probe.policy.cost_model import ExpertCost, ModelShape, get_profile  # noqa: E402
from megatron_probe.policy.placement import ExpertLayout, holder_slots  # noqa: E402
from megatron_probe.policy.planner import (  # noqa: E402
    charged_times,
    plan_probe,
    plan_probe_host,
    plan_with_copy_charge,
    plan_with_copy_charge_retry,
    rank_times,
    static_assignment,
)
from megatron_probe.policy.split import balanced_split, balanced_split_times, placement_split  # noqa: E402
from megatron_probe.runtime.host_malloc import apply_host_malloc_setting  # noqa: E402

TOPK = 8
GPT_OSS = dict(hidden=2880, expert_hidden=2880, kv_dim=512)  # eval_planner.py's priced shape


def skewed_cases(E, ep, n, tokens, seed):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        w = torch.rand(E, generator=g, dtype=torch.float64) ** 4 + 1e-6
        per_rank = max(1, tokens * TOPK // ep)
        out.append(torch.stack([torch.multinomial(w * (0.5 + torch.rand(E, generator=g, dtype=torch.float64)),
                                                  per_rank, replacement=True, generator=g).bincount(minlength=E)
                                for _ in range(ep)]))
    return out


def generated_cases(ep, n, tokens, layers, seed):
    """``(cases, label)``: E 128 steps generated from the Qwen3-30B aggregate heat, or ``([], why)``."""
    from megatron_probe.data.generator import fit_alpha, generate_counts, observed_request_skew
    from megatron_probe.data.traces import load_any, shared_trace_files

    files = shared_trace_files()
    agg = [f for f in files if os.path.basename(f) == "coactivation_qwen3-30b-a3b.json"]
    per_token = [f for f in files if f.endswith("qwen3-30b-a3b.route.csv")]
    if not agg:
        return [], "coactivation_qwen3-30b-a3b.json not in ../shared/traces"
    tr = load_any(agg[0])
    ref = load_any(per_token[0]) if per_token else tr
    L = min(layers, tr.num_layers)
    alpha = fit_alpha(tr.heat[:L], ref.topk, max(1, ref.n_tokens), observed_request_skew(ref), seed=seed)
    steps = max(1, -(-n // L))
    gen = generate_counts(tr.heat[:L], tr.topk, steps, tokens, ep, requests_per_step=ep * max(1, 64 // ep),
                          alpha=alpha, seed=seed, source=agg[0])
    cases = [gen.counts[s, l].long() for s in range(steps) for l in range(L)][:n]
    return cases, f"GENERATED from {os.path.basename(agg[0])} (alpha={alpha}, {tokens} tokens/step, {L} layers)"


def load_module_at(rev, name):
    """``megatron_probe/policy/<name>.py`` as it was at git revision ``rev``, as a module (its
    imports are today's package; a module whose imports changed since fails loudly here)."""
    src = subprocess.run(["git", "-C", ROOT, "show", f"{rev}:megatron_probe/policy/{name}.py"],
                         check=True, capture_output=True, text=True).stdout
    sha = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", rev], check=True, capture_output=True,
                         text=True).stdout.strip()
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(src)
    spec = importlib.util.spec_from_file_location(f"{name}_at_{sha}", f.name)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    os.unlink(f.name)
    return mod, sha


def load_baseline(rev):
    """``(planner, split, sha)`` at ``rev``."""
    planner, sha = load_module_at(rev, "planner")
    split, _ = load_module_at(rev, "split")
    return planner, split, sha


def _us(fn):
    c0, t0 = time.thread_time_ns(), time.perf_counter()
    out = fn()
    return (time.perf_counter() - t0) * 1e6, (time.thread_time_ns() - c0) / 1e3, out


def _stats(xs):
    wall, cpu = sorted(x[0] for x in xs), sorted(x[1] for x in xs)
    p99 = min(len(xs) - 1, int(0.99 * len(xs)))
    return {"median_us": round(statistics.median(wall), 1), "p99_us": round(wall[p99], 1),
            "cpu_median_us": round(statistics.median(cpu), 1), "samples": len(xs)}


def time_config(cases, lay, cost, args, old):
    """``(block, interleaved, mismatches, mean copies)``. ``block``: each version on all cases in
    its own loop after one warm-up call (steady state); ``interleaved``: the versions in turn on
    each case, so each call finds the caches as the previous version left them (a tensor
    ``plan_probe`` call before it slows the host planner about threefold on this machine)."""
    fns = {
        "plan_probe": lambda c: plan_probe(c, lay, cost, k_max=args.k_max),
        "plan_probe_host": lambda c: plan_probe_host(c, lay, cost, k_max=args.k_max),
        "copy_charge_retry": lambda c: plan_with_copy_charge_retry(c, lay, cost, None, args.charge_us),
        "copy_charge_one_pass": lambda c: plan_with_copy_charge(c, lay, cost, None, args.charge_us),
    }
    placements = [plan_with_copy_charge(c, lay, cost, None, args.charge_us) for c in cases]
    holds = [holder_slots(pl, lay) >= 0 for pl in placements]
    if old is not None:
        mod, split_mod, sha = old
        fns[f"plan_probe_host_at_{sha}"] = lambda c: mod.plan_probe_host(c, lay, cost, k_max=args.k_max)
        fns[f"plan_with_copy_charge_at_{sha}"] = lambda c: mod.plan_with_copy_charge(c, lay, cost, None,
                                                                                      args.charge_us)
        fns[f"split_time_at_{sha}"] = lambda i: split_mod.placement_split(cases[i], placements[i], lay, "time", cost)
    # the dispatch's entry (the placement in, what the pipeline calls every layer), and the same
    # split from a prebuilt [ep, E] holder table (the entry for any holder sets)
    fns["split_time"] = lambda i: placement_split(cases[i], placements[i], lay, "time", cost)
    fns["split_time_holds"] = lambda i: balanced_split(cases[i], holds[i], "time", cost)
    reps = lambda k: args.tensor_reps if k == "plan_probe" else args.reps  # noqa: E731
    arg = lambda k, i: i if k.startswith("split_time") else cases[i]  # noqa: E731
    block = {}
    for k, f in fns.items():
        f(arg(k, 0))
        block[k] = [_us(lambda: f(arg(k, i)))[:2] for _ in range(reps(k)) for i in range(len(cases))]
    inter = {k: [] for k in fns}
    for rep in range(args.reps):
        for i in range(len(cases)):
            for k, f in fns.items():
                if rep < reps(k):
                    inter[k].append(_us(lambda: f(arg(k, i)))[:2])
    bad = {"host_vs_tensor": 0, "one_pass_charge0_vs_host": 0}
    copies = {"one_pass": [], "retry": []}
    for c in cases:
        h, p = plan_probe_host(c, lay, cost, k_max=args.k_max), plan_probe(c, lay, cost, k_max=args.k_max)
        bad["host_vs_tensor"] += not (torch.equal(h[0], p[0]) and torch.equal(h[1], p[1]))
        bad["one_pass_charge0_vs_host"] += not torch.equal(plan_with_copy_charge(c, lay, cost, None, 0.0), h[0])
        copies["one_pass"].append(int((plan_with_copy_charge(c, lay, cost, None, args.charge_us) >= 0).sum()))
        copies["retry"].append(int((plan_with_copy_charge_retry(c, lay, cost, None, args.charge_us) >= 0).sum()))
    return ({k: _stats(v) for k, v in block.items()}, {k: _stats(v) for k, v in inter.items()}, bad,
            {k: round(statistics.mean(v), 2) for k, v in copies.items()})


def _retry_assign(c, lay, cost, pl):
    """The plain plan the retry picked (the largest budget with that placement) and its split."""
    for b in range(lay.replica_slots, -1, -1):
        p, A = plan_probe_host(c, lay, cost, budget_in=b)
        if torch.equal(p, pl):
            return A
    raise AssertionError("the retry's placement is none of the plain plans")


def _charged_split(c, pl, lay, cost, ch):
    t = torch.from_numpy(balanced_split_times(c, holder_slots(pl, lay) >= 0, cost))
    r, s = torch.nonzero(pl >= 0, as_tuple=True)
    for rr, e in zip(r.tolist(), pl[r, s].tolist()):
        t[rr] += ch
        t[e // lay.num_local_experts] += ch
    return float(t.max())


def compare_case(c, lay, cost, ch):
    one_pl, one_A = plan_probe_host(c, lay, cost, copy_charge_us=ch)
    ret_pl = plan_with_copy_charge_retry(c, lay, cost, None, ch)
    ret_A = _retry_assign(c, lay, cost, ret_pl)
    own = (float(charged_times(one_A, one_pl, lay, cost, ch).max()), float(charged_times(ret_A, ret_pl, lay, cost,
                                                                                         ch).max()))
    split = (_charged_split(c, one_pl, lay, cost, ch), _charged_split(c, ret_pl, lay, cost, ch))
    static = float(rank_times(static_assignment(c, lay), cost).max())
    return own, split, int((one_pl >= 0).sum()), int((ret_pl >= 0).sum()), static


def summarise(rows):
    out = {"cases": len(rows)}
    for i, name in ((0, "own_split"), (1, "balanced_split")):
        d = [(r[i][0] - r[i][1]) / r[i][1] for r in rows if r[i][1] > 0]
        out[name] = {"mean_rel_diff": round(statistics.mean(d), 5), "min_rel_diff": round(min(d), 5),
                     "max_rel_diff": round(max(d), 5),
                     "one_pass_better": sum(x < -1e-9 for x in d), "one_pass_worse": sum(x > 1e-9 for x in d),
                     "equal": sum(abs(x) <= 1e-9 for x in d),
                     "slower_than_static": {"one_pass": sum(r[i][0] > r[4] * (1 + 1e-9) for r in rows),
                                            "retry": sum(r[i][1] > r[4] * (1 + 1e-9) for r in rows)}}
    out["mean_copies"] = {"one_pass": round(statistics.mean(r[2] for r in rows), 3),
                          "retry": round(statistics.mean(r[3] for r in rows), 3)}
    return out


def compare(args, cost, gen_cases):
    g = torch.Generator().manual_seed(args.seed + 1)
    rows = []
    pick = lambda xs: xs[int(torch.randint(len(xs), (1,), generator=g))]  # noqa: E731
    c01 = ExpertCost(0.1, 5.0)
    for _ in range(args.compare):
        ep = pick([2, 4, 8])
        E = ep * int(torch.randint(1, 9, (1,), generator=g))
        R = int(torch.randint(0, min(4, E - E // ep) + 1, (1,), generator=g))
        lay = ExpertLayout(E, ep, R)
        w = torch.rand(E, generator=g, dtype=torch.float64) ** pick([1, 4]) + 1e-6
        c = torch.stack([torch.multinomial(w, pick([50, 500, 5000]), replacement=True, generator=g)
                         .bincount(minlength=E) for _ in range(ep)])
        mean_t = float(c.sum()) * c01.per_token_us / ep
        rows.append(compare_case(c, lay, c01, pick([0.01, 0.05, 0.2, 0.5]) * mean_t))
    res = {"random": summarise(rows)}
    lay = ExpertLayout(128, 8, args.replica_slots)
    for ch in (5.0, 30.0, 100.0):
        res[f"generated_e128_ep8_charge_{int(ch)}us"] = summarise([compare_case(c, lay, cost, ch) for c in gen_cases])
    return res


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--experts", default="32,128,256")
    p.add_argument("--eps", default="2,8,32")
    p.add_argument("--replica-slots", type=int, default=3)
    p.add_argument("--k-max", type=int, default=16)
    p.add_argument("--cases", type=int, default=60, help="skewed cases per configuration")
    p.add_argument("--generated", type=int, default=60, help="generated E 128 cases per EP (0: none)")
    p.add_argument("--reps", type=int, default=3, help="timed calls per case and version")
    p.add_argument("--tensor-reps", type=int, default=1, help="of which the tensor planner (slow) runs")
    p.add_argument("--tokens-per-step", type=int, default=4096)
    p.add_argument("--charge-us", type=float, default=30.0)
    p.add_argument("--hardware", default="h200-sxm")
    p.add_argument("--baseline-rev", help="also time plan_probe_host / plan_with_copy_charge at this git revision")
    p.add_argument("--compare", type=int, default=0, help="one-pass vs retry on this many random cases")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--malloc-default", action="store_true",
                   help="leave glibc's malloc thresholds as they are (ProbeConfig.host_malloc_reuse=False; "
                        "default: set as the pipeline sets them, runtime/host_malloc.py)")
    p.add_argument("--json")
    a = p.parse_args(argv)
    try:  # the flags and input files, checked before any timing (the traces are read again where used)
        for flag, text in (("--experts", a.experts), ("--eps", a.eps)):
            if not all(x.strip().isdigit() and int(x) > 0 for x in text.split(",")):
                raise ValueError(f"{flag} {text!r}: expected a comma list of positive integers")
        get_profile(a.hardware)
        if a.generated:
            from megatron_probe.data.traces import load_any, shared_trace_files

            for f in shared_trace_files():
                if os.path.basename(f) in ("coactivation_qwen3-30b-a3b.json", "qwen3-30b-a3b.route.csv"):
                    load_any(f)
    except ValueError as e:
        p.error(str(e))
    torch.set_num_threads(1)
    host_malloc = apply_host_malloc_setting(not a.malloc_default)
    old = load_baseline(a.baseline_rev) if a.baseline_rev else None
    result = {"command": "python tools/bench_planner.py " + " ".join(sys.argv[1:]),
              "machine": {"arch": platform.machine(), "cores": os.cpu_count(), "torch": torch.__version__,
                          "threads": torch.get_num_threads(), "host_malloc": host_malloc},
              "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
              "load_avg_at_start": [round(x, 2) for x in os.getloadavg()],
              "charge_us": a.charge_us, "k_max": a.k_max, "R": a.replica_slots, "hardware_cost_model": a.hardware,
              "baseline_rev": old[2] if old else None, "configs": {}}
    gen_e128_ep8 = []
    for E in [int(x) for x in a.experts.split(",")]:
        cost = ExpertCost.from_profile(get_profile(a.hardware), ModelShape(num_experts=E, topk=TOPK, **GPT_OSS))
        for ep in [int(x) for x in a.eps.split(",")]:
            if E % ep or E < ep:
                continue
            lay = ExpertLayout(E, ep, a.replica_slots)
            sets = [("skewed", skewed_cases(E, ep, a.cases, a.tokens_per_step, a.seed + E + ep),
                     f"SKEWED synthetic (u**4 weights), {a.tokens_per_step} tokens x top-{TOPK}")]
            if E == 128 and a.generated:
                gc, label = generated_cases(ep, a.generated, a.tokens_per_step, 4, a.seed)
                if gc:
                    sets.append(("generated", gc, label))
                    if ep == 8:
                        gen_e128_ep8 = gc
            for kind, cases, label in sets:
                timings, inter, bad, copies = time_config(cases, lay, cost, a, old)
                key = f"e{E}_ep{ep}_{kind}"
                result["configs"][key] = {"E": E, "ep": ep, "data": label, "cases": len(cases),
                                          "timings": timings, "timings_interleaved": inter, "mismatches": bad,
                                          "mean_copies": copies,
                                          "load_avg_after": [round(x, 2) for x in os.getloadavg()]}
                print(f"\n== {key}: {label}; {len(cases)} cases; mismatches {bad}; copies {copies}")
                print(f"{'per call (us)':34s} {'median':>9s} {'p99':>9s} {'CPU median':>11s} {'interleaved':>12s}")
                for k, v in timings.items():
                    print(f"{k:34s} {v['median_us']:9.1f} {v['p99_us']:9.1f} {v['cpu_median_us']:11.1f} "
                          f"{inter[k]['median_us']:12.1f}")
                sys.stdout.flush()
    if a.compare:
        cost = ExpertCost.from_profile(get_profile(a.hardware), ModelShape(num_experts=128, topk=TOPK, **GPT_OSS))
        if not gen_e128_ep8 and a.generated:
            gen_e128_ep8, _ = generated_cases(8, a.generated, a.tokens_per_step, 4, a.seed)
        result["one_pass_vs_retry"] = compare(a, cost, gen_e128_ep8)
        print("\n== one pass vs retry: (one_pass - retry) / retry of the slowest charged rank time")
        print(json.dumps(result["one_pass_vs_retry"], indent=1))
    result["load_avg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    if a.json:
        os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
        with open(a.json, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
