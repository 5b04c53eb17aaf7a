#!/usr/bin/env python3
"""A stack of PROBE MoE layers across EP gloo processes, driven by real routing: static vs PROBE
vs oracle, measured alternately in one run.

Routing and forecasts come from a recorded trace of the shipped model (``tools/record_traces.py``):
each step's tokens are the trace step's tokens (spread over EP ranks by request), every MoE layer
is forced to the trace's experts (Megatron router replay), and the lookahead predictors (the
shipped warm start, distilled online as the run goes) forecast from the trace's hidden states,
so the forecast is real, not an oracle. Expert compute is enlarged (``--hidden``/``--ffn``,
random weights) so that it dominates as on GPUs at scale. Three modes alternate step by step:

* ``static``: Megatron's placement (each rank its E/ep experts, no replicas);
* ``probe``: the live pipeline (forecast, plan, phase-locked prefetch into the shared double
  banks, deadline, re-assignment on true counts);
* ``oracle``: planned on the true counts, copies waited for before the layer and not counted.

Reports the median time per layer (the slowest rank's), static/PROBE, PROBE's share of the
oracle's gain, PROBE's exposed wait, and the imbalance ratio of each mode.

  python tools/bench_moe_layer.py --ep 2 --json results/pipeline/bench_ep2.json
"""

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
warnings.filterwarnings("ignore")

import torch
import torch.distributed as dist

from megatron_probe.experiments.scaled_replay import MODES


def worker(rank, ws, opts, out_path):
    if os.environ.get("PROBE_BENCH_WATCHDOG_S"):  # debugging a stall: dump every thread's stack
        import faulthandler

        faulthandler.dump_traceback_later(float(os.environ["PROBE_BENCH_WATCHDOG_S"]), exit=True)
    from megatron_probe.experiments.scaled_replay import ScaledReplay, spread_steps, step_rows

    rep = ScaledReplay(rank, ws, opts)
    gen = torch.Generator().manual_seed(opts["seed"])
    picks = spread_steps(rep.trace, ws, opts["steps"])
    steps = [(i, step_rows(rep.trace, i, ws, opts["max_tokens"], gen)) for i in picks]
    times = {m: [] for m in MODES}
    waits, ir = [], {m: [] for m in MODES}
    modelled = {"probe": [], "oracle": []}  # slowest rank's modelled expert time over static's, per layer
    for j, (si, rows) in enumerate(steps):
        res = rep.run_step(j, si, rows)
        for m in MODES:
            times[m] += res[m]["layer_ms"]
        waits += res["probe"]["wait_ms"]
        ir["probe"] += res["probe"]["ir_after"]
        ir["oracle"] += res["oracle"]["ir_after"]
        ir["static"] += res["probe"]["ir_before"]
        for m in ("probe", "oracle"):
            modelled[m] += res[m]["time_vs_static"]
    # a layer ends when its slowest rank does: take the max over ranks of each measurement
    t = {m: torch.tensor(times[m], dtype=torch.float64) for m in MODES}
    for m in MODES:
        dist.all_reduce(t[m], op=dist.ReduceOp.MAX, group=rep.group)
    pool_mib = rep.replica_memory_mib()
    rep.close()
    if rank == 0:
        med = {m: float(t[m].median()) for m in MODES}
        res = {"static_ms": round(med["static"], 3), "probe_ms": round(med["probe"], 3),
               "oracle_ms": round(med["oracle"], 3), "speedup": round(med["static"] / med["probe"], 4),
               "oracle_speedup": round(med["static"] / med["oracle"], 4),
               "gain_fraction": round((med["static"] - med["probe"]) / (med["static"] - med["oracle"]), 4)
               if med["static"] > med["oracle"] else None,
               "ir_static": round(sum(ir["static"]) / max(1, len(ir["static"])), 4),
               "ir_probe": round(sum(ir["probe"]) / max(1, len(ir["probe"])), 4),
               "ir_oracle": round(sum(ir["oracle"]) / max(1, len(ir["oracle"])), 4),
               "time_vs_static_probe": round(sum(modelled["probe"]) / max(1, len(modelled["probe"])), 4),
               "time_vs_static_oracle": round(sum(modelled["oracle"]) / max(1, len(modelled["oracle"])), 4),
               "exposed_wait_ms_median": round(float(torch.tensor(waits).median()), 3) if waits else 0.0,
               "exposed_wait_ms_mean": round(sum(waits) / max(1, len(waits)), 3),
               "copies": rep.copies, "dropped": rep.dropped, "layer_measurements": len(times["probe"]),
               "forecast_topk_acc": round(rep.forecaster.hits / max(1, rep.forecaster.total), 4),
               "copy_charge_us": round(rep.copy_us, 1),
               "expert_cost_us": {"per_token": round(rep.cost.per_token_us, 2),
                                  "per_active_expert": round(rep.cost.per_active_expert_us, 1)},
               "replica_mode": rep.pipe.mode, "replica_memory_mib": round(pool_mib, 1),
               "steps": [si for si, _ in steps]}
        with open(out_path, "w") as f:
            json.dump(res, f)


def main():
    from megatron_probe.experiments.tiny_moe import DEFAULT_CHECKPOINT

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ep", type=int, default=2)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--ffn", type=int, default=2816)
    p.add_argument("--replica-slots", type=int, default=3)
    p.add_argument("--cost-gate", choices=("on", "off"), default="on",
                   help="ProbeConfig.cost_gate of the probe mode (off: every layer balances at every step)")
    p.add_argument("--replica-mode", choices=("streamed", "resident", "auto"), default="streamed",
                   help="ProbeConfig.replica_mode of the probe mode (the oracle always plans from scratch)")
    p.add_argument("--trace", default=None, help="recorded trace with hidden states (default: the shipped model "
                   "on workloads/shift.json with every token's hidden states, recorded to traces/shift.pt if missing)")
    p.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT)
    p.add_argument("--predictor", default=None, help="default: <checkpoint>/predictor.pt")
    p.add_argument("--predictor-hidden", type=int, default=256)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--max-tokens", type=int, default=192, help="tokens per rank per step (cap)")
    p.add_argument("--deadline-ms", type=float, default=200.0)
    p.add_argument("--chunk-mib", type=float, default=4.0)
    p.add_argument("--collective-timeout-s", type=float, default=300.0,
                   help="ProbeConfig.collective_timeout_s: how long a collective waits for a peer")
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    p.add_argument("--copy-charge", choices=("measured", "none"), default="measured",
                   help="charge each copy its measured time in the plan (ProbeConfig.copy_charge_us), or not")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    a = p.parse_args()
    if a.ep < 2:
        p.error(f"--ep {a.ep}: replication needs at least 2 EP ranks")
    from megatron_probe.experiments.tiny_moe import check_predictor_state, check_trace_for_checkpoint, read_checkpoint

    pred = a.predictor or os.path.join(a.checkpoint, "predictor.pt")
    try:  # every input file read and checked here, before a trace is recorded or a process starts
        cfg, _, state = read_checkpoint(a.checkpoint)
        if a.predictor or os.path.exists(pred):
            check_predictor_state(pred, cfg, state, a.predictor_hidden)
    except ValueError as e:
        p.error(str(e))
    trace = a.trace or os.path.join(ROOT, "traces", "shift.pt")
    if a.trace is None and not os.path.exists(trace):
        import subprocess

        print(f"recording {trace} (the shipped model on workloads/shift.json) ...", flush=True)
        subprocess.run([sys.executable, os.path.join(ROOT, "tools", "record_traces.py"), "--workload",
                        os.path.join(ROOT, "workloads", "shift.json"), "--out", trace, "--checkpoint", a.checkpoint,
                        "--hidden-fraction", "1.0"],
                       check=True)
    from megatron_probe.data.traces import load_trace
    from megatron_probe.mcore.launch import run_distributed

    try:
        tr = load_trace(trace)
        check_trace_for_checkpoint(tr, trace, cfg, hidden_layer=0, min_tokens=a.ep)
    except ValueError as e:
        p.error(str(e))
    if tr.num_experts % a.ep:
        p.error(f"--ep {a.ep} does not divide the trace's {tr.num_experts} experts")
    if not any(s.hidden and -1 in s.hidden for s in tr.steps):
        print("note: the trace has no layer-0 input: MoE layer 0 is not forecast (static)")
    opts = dict(trace=trace, checkpoint=a.checkpoint, predictor=pred if os.path.exists(pred) else None,
                predictor_hidden=a.predictor_hidden, layers=a.layers, hidden=a.hidden, ffn=a.ffn,
                replica_slots=a.replica_slots, steps=a.steps, max_tokens=a.max_tokens, deadline_ms=a.deadline_ms,
                chunk_mib=a.chunk_mib, threads=a.threads, seed=a.seed, copy_charge=a.copy_charge,
                replica_mode=a.replica_mode, cost_gate=a.cost_gate == "on",
                collective_timeout_s=a.collective_timeout_s)
    from megatron_probe.config import ProbeConfig
    from megatron_probe.fileio import write_whole
    from megatron_probe.mcore.launch import RanksFailed

    try:
        peer_wait_s = ProbeConfig(collective_timeout_s=a.collective_timeout_s, prefetch_deadline_ms=a.deadline_ms).peer_wait_s
    except ValueError as e:
        p.error(str(e))

    if a.json and os.path.exists(a.json):
        os.remove(a.json)  # a failed run must not leave an earlier run's result looking like its own
    out = os.path.join(tempfile.mkdtemp(prefix="bench_moe_layer_"), "result.json")
    t0 = time.time()
    try:
        run_distributed(worker, a.ep, opts, out, backend="gloo", timeout_s=peer_wait_s)
    except RanksFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    with open(out) as f:
        res = json.load(f)
    res.update({"command": "python " + " ".join([os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:]),
                "date": datetime.date.today().isoformat(),
                "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
                "workload": tr.extra.get("scenario", tr.source),
                "regime": f"scaled: experts {a.hidden}x{a.ffn} (random weights), routing and forecasts from "
                          f"{os.path.relpath(trace, ROOT)}", "ep": a.ep, "layers": a.layers,
                "replica_slots": a.replica_slots, "copy_charge": a.copy_charge, "seconds": round(time.time() - t0, 1)})
    if a.json:
        write_whole(a.json, json.dumps(res, indent=1))
    print(f"EP {a.ep}, {a.layers} layers, experts {a.hidden}x{a.ffn}, R={a.replica_slots} {res['replica_mode']}, "
          f"{res['layer_measurements']} layer runs per mode ({res['seconds']} s)")
    print(f"{'mode':<8}{'median ms/layer':>17}{'IR':>8}")
    for m in MODES:
        print(f"{m:<8}{res[m + '_ms']:>17.2f}{res['ir_' + m]:>8.3f}")
    print(f"static/PROBE = {res['speedup']:.3f}   static/oracle = {res['oracle_speedup']:.3f}   "
          f"PROBE's share of the oracle's gain = {res['gain_fraction']}")
    print(f"exposed wait: median {res['exposed_wait_ms_median']} ms, mean {res['exposed_wait_ms_mean']} ms per layer; "
          f"copies {res['copies']}, dropped {res['dropped']}; forecast top-K accuracy {res['forecast_topk_acc']}; "
          f"copy charge {res['copy_charge_us'] / 1e3:.1f} ms per copy ({a.copy_charge})")
    if a.json:
        print(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
