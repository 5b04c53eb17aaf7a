#!/usr/bin/env python3
"""GPU checks of the planner issues: calibrate the GPU into a hardware profile, and time the
PROBE planner on the GPU (CUDA events), eagerly and captured in a CUDA graph (possible only
because the planner makes no host synchronisation), checking the GPU plan equals the host plan:
the tensor-op planner and the fused Triton planner (``policy/planner_triton.py``), at E 128/256
and EP 8/32; and the exact token split on the device (``policy/split_triton.py``) over each
plan's placement, eagerly and as a CUDA graph, checked against the host split's optimum. On CPU
the Triton kernels run only under ``TRITON_INTERPRET=1``.

  python tools/gpu_check_planner.py --out results/gpu_planner
"""

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import torch

from megatron_probe.mechanism.profiling import time_us


def main():
    from megatron_probe.policy.cost_model import PRESETS, ExpertCost, ModelShape
    from megatron_probe.policy.placement import ExpertLayout, imbalance_ratio
    from megatron_probe.policy.planner import plan_probe, plan_probe_host, rank_times, static_assignment
    from megatron_probe.policy.planner_triton import plan_probe_triton

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.path.join(ROOT, "results", "gpu_planner"))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args()
    os.makedirs(a.out, exist_ok=True)
    dev = torch.device(a.device)
    report = {"date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()), "torch": torch.__version__,
              "device": torch.cuda.get_device_name(0) if dev.type == "cuda" else "cpu"}
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "calibrate_hardware.py"), "--device", a.device,
                        "--out", os.path.join(a.out, "profile.json")] + ([] if dev.type == "cuda" else ["--quick"]),
                       capture_output=True, text=True, timeout=300)
    report["calibration_rc"] = r.returncode
    print(r.stdout[-1500:], r.stderr[-1500:], flush=True)
    if os.path.exists(os.path.join(a.out, "profile.json")):
        report["profile"] = json.load(open(os.path.join(a.out, "profile.json")))
    cost = ExpertCost.from_profile(PRESETS["h200-sxm"], ModelShape(2880, 2880, 128, 4))
    rows = []
    for E, ep, R in ((128, 8, 3), (256, 8, 3), (128, 32, 4), (256, 32, 4)):
        lay = ExpertLayout(E, ep, R)
        g = torch.Generator().manual_seed(E + ep)
        w = torch._sample_dirichlet(torch.full((E,), 0.3, dtype=torch.float64), generator=g)
        counts = torch.stack([torch.multinomial(w, 768 * 4, replacement=True, generator=g).bincount(minlength=E)
                              for _ in range(ep)])
        host = plan_probe_host(counts, lay, cost)
        c_dev = counts.to(dev)
        plan = lambda: plan_probe(c_dev, lay, cost, validate=False)  # noqa: E731
        pl, A = plan()
        same = bool(torch.equal(pl.cpu(), host[0]) and torch.equal(A.cpu(), host[1]))
        row = {"E": E, "ep": ep, "R": R, "k_max": 16, "gpu_equals_host": same,
               "eager_us_median": round(time_us(plan, dev, reps=30, warmup=0), 1)}
        if dev.type == "cuda":
            row.update(_graph_row("", lambda x: plan_probe(x, lay, cost, validate=False), c_dev, host, dev))
        # the fused Triton planner (policy/planner_triton.py): one greedy launch and one expansion
        tri = lambda x: plan_probe_triton(x, lay, cost)  # noqa: E731
        try:
            t_pl, t_A = tri(c_dev)
            row["triton_equals_host"] = bool(torch.equal(t_pl.cpu(), host[0]) and torch.equal(t_A.cpu(), host[1]))
            row["triton_eager_us_median"] = round(time_us(lambda: tri(c_dev), dev, reps=30, warmup=3), 1)
            if dev.type == "cuda":
                row.update(_graph_row("triton_", tri, c_dev, host, dev))
        except Exception as ex:  # report, do not hide
            row["triton_error"] = f"{type(ex).__name__}: {ex}"[:300]
        row.update(_token_split_row(counts, host[0], lay, dev))
        t0 = rank_times(static_assignment(counts, lay), cost)
        t1 = rank_times(host[1], cost)
        row["ir_time_static"] = round(imbalance_ratio(t0), 3)
        row["ir_time_planned"] = round(imbalance_ratio(t1), 3)
        rows.append(row)
        print(row, flush=True)
    report["planner"] = rows
    with open(os.path.join(a.out, "gpu_planner.json"), "w") as f:
        json.dump(report, f, indent=1)
    ok = all(r["gpu_equals_host"] and r.get("graph_equals_host", True) and r.get("triton_equals_host", False)
             and r.get("triton_graph_equals_host", True) and r.get("token_split_optimal", False)
             and r.get("token_split_graph_equal", True) for r in rows)
    print("all plans equal the host plan, every device token split optimal:", ok)
    return 0 if ok else 1


def _token_split_row(counts, placement, lay, dev):
    """The exact token split on the device (``policy/split_triton.py``) over the host plan's
    placement: whether it converged to the host split's optimum, its eager time and, on a GPU, its
    CUDA-graph replay (equal to the eager split) and time; or the error."""
    from megatron_probe.policy.split import placement_split
    from megatron_probe.policy.split_triton import placement_token_split_device

    out = {}
    try:
        want = int(placement_split(counts, placement, lay, "tokens").sum((0, 1)).max())
        c_dev, pl_dev = counts.to(dev), placement.to(dev)
        split = lambda x: placement_token_split_device(x, pl_dev, lay)  # noqa: E731
        A, state = split(c_dev)
        state = state.cpu().tolist()
        out["token_split_optimal"] = bool(state[0] == 1 and state[2] == want
                                          and torch.equal(A.sum(2).cpu(), counts))
        out["token_split_rounds"] = state[1]
        out["token_split_eager_us_median"] = round(time_us(lambda: split(c_dev), dev, reps=30, warmup=3), 1)
        if dev.type == "cuda":
            graph, (g_A, g_state) = _captured(split, c_dev)
            out["token_split_graph_equal"] = bool(torch.equal(g_A, A) and g_state.cpu().tolist() == state)
            out["token_split_graph_us_median"] = round(time_us(graph.replay, dev, reps=30, warmup=0), 1)
    except Exception as ex:  # report, do not hide
        out["token_split_error"] = f"{type(ex).__name__}: {ex}"[:300]
    return out


def _captured(fn, counts):
    """``(graph, outputs)``: ``fn`` on a copy of ``counts`` captured in a CUDA graph (warmed up on
    a side stream), replayed once."""
    static_in = counts.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn(static_in)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = fn(static_in)
    graph.replay()
    torch.cuda.synchronize()
    return graph, outputs


def _graph_row(prefix, plan, counts, host, dev):
    """``plan(counts)`` captured in a CUDA graph (warmed up on a side stream): whether its replay
    equals the host plan, and its median replay time; or the error."""
    try:
        graph, (g_pl, g_A) = _captured(plan, counts)
        return {f"{prefix}graph_equals_host": bool(torch.equal(g_pl.cpu(), host[0]) and torch.equal(g_A.cpu(), host[1])),
                f"{prefix}graph_us_median": round(time_us(graph.replay, dev, reps=30, warmup=0), 1)}
    except Exception as ex:  # report, do not hide
        return {f"{prefix}graph_error": f"{type(ex).__name__}: {ex}"[:300]}


if __name__ == "__main__":
    sys.exit(main())
