#!/usr/bin/env python3
"""Validate the simulator against the measured EP 2 benchmark (tools/bench_moe_layer.py).

For each ``results/pipeline/bench_<workload>_ep2_*.json``: rebuild the routing the benchmark
replayed (the same trace steps, ``results[...]["steps"]``, the same per-rank token sampling with
the benchmark's seed, through ``experiments.scaled_replay.spread_steps`` / ``step_rows``), then
SIMULATE each layer with the benchmark's own measured expert cost (``expert_cost_us``), its model
shape (experts hidden x ffn, fp32 activations, 32 experts top-4) and a CPU hardware profile for
the link (``tools/calibrate_hardware.py`` output: gloo loopback), and compare the median
simulated layer time (slowest rank; dispatch + experts + combine, no attention: the benchmark's
blocks are MoE only) with the measured median, for static and for the oracle (planned on the
true counts, copies free, as the benchmark's oracle). Needs the recorded traces
(``traces/<workload>.pt``, gitignored; ``tools/record_traces.py`` makes them).

  python tools/validate_sim.py --profile results/sim/cpu_profile.json --out results/sim/validation
"""

import argparse
import dataclasses
import datetime
import glob
import json
import os
import platform
import statistics
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import torch

from megatron_probe import fileformat as ff
from megatron_probe.data.traces import load_trace
from megatron_probe.experiments.scaled_replay import spread_steps, step_rows
from megatron_probe.policy.cost_model import ExpertCost, ModelShape, get_profile
from megatron_probe.policy.placement import ExpertLayout
from megatron_probe.policy.planner import assign_on_truth, plan_with_copy_charge, static_assignment
from megatron_probe.sim.layer import Topology, layer_time


def bench_counts(bench, trace, max_tokens=192, seed=0):
    """Per step, per layer, the true ``[ep, E]`` counts the benchmark replayed."""
    ep, layers = bench["ep"], bench["layers"]
    picks = spread_steps(trace, ep, len(bench["steps"]))
    if picks != bench["steps"]:
        raise ValueError(f"trace steps {picks} differ from the benchmark's {bench['steps']}")
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in picks:
        rows = step_rows(trace, i, ep, max_tokens, gen)
        st = trace.steps[i]
        ids = st.topk_ids[:, st.hidden[0][0]]
        out.append([torch.stack([torch.bincount(ids[L][rows[r]].flatten(), minlength=trace.num_experts)
                                 for r in range(ep)]) for L in range(min(layers, trace.num_layers))])
    return out


def simulate_bench(bench, counts, hw, shape):
    ep = bench["ep"]
    cost = ExpertCost(bench["expert_cost_us"]["per_token"], bench["expert_cost_us"]["per_active_expert"])
    topo = Topology(1, ep)
    lay0, lay = ExpertLayout(shape.num_experts, ep, 0), ExpertLayout(shape.num_experts, ep, bench["replica_slots"])
    t = {"static": [], "oracle": [], "probe_plan_copies": 0}
    for step in counts:
        for C in step:
            r = layer_time(hw, shape, topo, cost, C, static_assignment(C, lay0), context=0)
            t["static"].append((r["total_us"] - r["attn_us"]) / 1e3)
            pl = plan_with_copy_charge(C, lay, cost, bench["replica_slots"], 0.0)
            r = layer_time(hw, shape, topo, cost, C, assign_on_truth(C, pl, lay, cost), context=0)
            t["oracle"].append((r["total_us"] - r["attn_us"]) / 1e3)
            # the plan with the benchmark's copy charge (its PROBE): copies it would make on the truth
            pl_c = plan_with_copy_charge(C, lay, cost, bench["replica_slots"], bench.get("copy_charge_us", 0.0))
            t["probe_plan_copies"] += int((pl_c >= 0).sum())
    return t


BENCH_WHAT = "a tools/bench_moe_layer.py result JSON"


def read_bench(path):
    """A benchmark result (``tools/bench_moe_layer.py --json``), every field this tool uses checked;
    raises :class:`~megatron_probe.fileformat.InputFileError` naming the file and field."""
    b = ff.load_json(path, BENCH_WHAT)
    wl = ff.field(b, "workload", path, "str")
    if not wl or os.sep in wl or wl.startswith("."):
        raise ff.InputFileError(f"{path}: field 'workload' is {wl!r}, expected a workload name (traces/<name>.pt)")
    ff.field(b, "ep", path, "int", lo=1)
    ff.field(b, "layers", path, "int", lo=1)
    ff.field(b, "replica_slots", path, "int", lo=0)
    ff.int_list(ff.field(b, "steps", path, "list", lo=1), path, "steps", lo=0)
    for key in ("static_ms", "oracle_ms"):
        if ff.field(b, key, path, "number") <= 0:
            raise ff.InputFileError(f"{path}: field {key!r} is {b[key]}, expected a number > 0")
    ff.field(b, "copies", path, "int", lo=0)
    ff.field(b, "copy_charge_us", path, "number", lo=0, default=0.0)
    cost = ff.field(b, "expert_cost_us", path, "dict")
    for key in ("per_token", "per_active_expert"):
        ff.field(cost, key, path, "number", "expert_cost_us.", lo=0)
    return b


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bench", nargs="*", default=None, help="default: results/pipeline/bench_*_ep2_*.json")
    p.add_argument("--profile", required=True, help="hardware profile JSON (tools/calibrate_hardware.py) or preset")
    p.add_argument("--hidden", type=int, default=1024, help="the benchmark's expert size (its --hidden/--ffn)")
    p.add_argument("--ffn", type=int, default=2816)
    p.add_argument("--out", default=None, help="write <out>.json and <out>.txt")
    a = p.parse_args(argv)
    files = a.bench or sorted(glob.glob(os.path.join(ROOT, "results", "pipeline", "bench_*_ep2_*.json")))
    try:  # every input read and checked before any work; --out is written at the end
        hw = get_profile(a.profile)
        benches = {f: read_bench(f) for f in files}
    except ValueError as e:
        p.error(str(e))
    lines = ["=== SIMULATION vs MEASUREMENT: tools/bench_moe_layer.py at EP 2 (this CPU) ===",
             "command: python " + " ".join([os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:]),
             f"date: {datetime.datetime.utcnow().strftime('%Y-%m-%d %H:%M UTC')}; machine: {platform.machine()}, "
             f"{os.cpu_count()} cores, torch {torch.__version__}",
             f"link profile: {hw.name} ({hw.source}); expert cost: each benchmark's measured expert_cost_us",
             f"{'benchmark':<40} {'static meas':>11} {'sim':>8} {'err':>7} {'oracle meas':>12} {'sim':>8} {'err':>7} "
             f"{'copies (meas / sim plan)':>25}"]
    rows = {}
    traces = {}
    for f in files:
        bench = benches[f]
        wl = bench["workload"]
        tpath = os.path.join(ROOT, "traces", f"{wl}.pt")
        if not os.path.exists(tpath):
            lines.append(f"{os.path.basename(f)}: {tpath} missing (record it with tools/record_traces.py): skipped")
            continue
        try:
            if tpath not in traces:
                traces[tpath] = load_trace(tpath)
            tr = traces[tpath]
            if tr.num_layers < bench["layers"] or not any(s.hidden and 0 in s.hidden for s in tr.steps):
                raise ValueError(f"{tpath}: a trace of {tr.num_layers} layers with hidden states is needed for {f} "
                                 f"({bench['layers']} layers)")
            counts = bench_counts(bench, tr)
        except ValueError as e:
            p.error(f"{e}" if str(e).startswith(tpath) else f"{f}: {e}")
        shape = ModelShape(hidden=a.hidden, expert_hidden=a.ffn, num_experts=tr.num_experts, topk=tr.topk,
                           bytes_per_param=4.0, bytes_per_activation=4.0)
        hw_b = dataclasses.replace(hw, gpus_per_node=bench["ep"])  # every rank on this one machine
        t = simulate_bench(bench, counts, hw_b, shape)
        sim = {m: statistics.median(t[m]) for m in ("static", "oracle")}
        meas = {"static": bench["static_ms"], "oracle": bench["oracle_ms"]}
        err = {m: sim[m] / meas[m] - 1.0 for m in sim}
        rows[os.path.basename(f)] = {"measured_ms": meas, "simulated_ms": {m: round(v, 3) for m, v in sim.items()},
                                     "rel_error": {m: round(v, 4) for m, v in err.items()},
                                     "copies_measured": bench["copies"], "copies_sim_plan": t["probe_plan_copies"],
                                     "copy_charge_us": bench.get("copy_charge_us"), "layer_runs": len(t["static"])}
        lines.append(f"{os.path.basename(f):<40} {meas['static']:>11.1f} {sim['static']:>8.1f} {err['static']:>+7.1%} "
                     f"{meas['oracle']:>12.1f} {sim['oracle']:>8.1f} {err['oracle']:>+7.1%} "
                     f"{bench['copies']:>12} / {t['probe_plan_copies']}")
    if rows:
        e = [abs(v["rel_error"][m]) for v in rows.values() for m in ("static", "oracle")]
        lines.append(f"mean |error| {statistics.mean(e):.1%}, max {max(e):.1%} (target: within 20%)")
    print("\n".join(lines))
    if a.out:
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out + ".json", "w") as fh:
            json.dump({"label": "SIMULATION vs MEASUREMENT", "command": lines[1][9:], "date": lines[2],
                       "profile": dataclasses.asdict(hw), "rows": rows}, fh, indent=1)
        with open(a.out + ".txt", "w") as fh:
            fh.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
