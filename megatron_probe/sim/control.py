"""Price of the control path per layer and step (``SimConfig.control``): what a policy that plans
every step does between the router and the dispatch, charged on the critical path.

Figures (medians, nearest measured (E, ep) in log2 distance, ties: the slower one):

* host planner (``probe``, ``ours``, ablations): ``copy_charge_one_pass`` (one-pass
  ``plan_with_copy_charge``) of ``results/planner/bench_planner.json``;
* host split (``ours`` and its ablations, ``oracle`` not charged): ``split_time``
  (``balanced_split``, time objective) of the same file;
* resident planner + split (``ours-resident``): ``resident_plan+split_time`` of
  ``results/planner/bench_balancer.json``;
* GPU planner (``control="gpu"``): ``graph_us_median`` (CUDA-graph replay of one layer's plan) of
  ``results/gpu_planner_2026-11-28_h200/gpu_planner.json``; the split and the resident planner
  were not measured on GPU: the split keeps its host price, ``ours-resident`` is refused;
* count exchange: an all-gather of every rank's ``E`` forecast counts (int32) priced as one
  All-to-All of that volume by ``cost_model.a2a_time_us`` (its ``a2a_latency_us`` + bytes / NVLink);
* forecast: the router-style GEMM ``tokens x hidden x E`` (2 FLOP per MAC) at the profile's
  GEMM rate (``gemm_eta_max x peak_tflops``).
"""

from __future__ import annotations

import math
import os
from functools import lru_cache
from typing import Dict

import torch

from megatron_probe import fileformat as ff
from megatron_probe.policy.cost_model import a2a_time_us

CONTROLS = ("none", "host", "gpu")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BENCH_PLANNER = os.path.join(ROOT, "results", "planner", "bench_planner.json")
BENCH_BALANCER = os.path.join(ROOT, "results", "planner", "bench_balancer.json")
GPU_PLANNER = os.path.join(ROOT, "results", "gpu_planner_2026-11-28_h200", "gpu_planner.json")

# per policy: (planner runs, split runs, exchange, forecast GEMM); resident priced separately
PIECES = {
    "probe": (1, 0, True, True),  # PROBE's split is the planner's own (split_as_predicted): no balanced_split
    "ours": (1, 1, True, True),
    "ours-naive": (1, 1, True, True),
    "ours-prev": (1, 1, True, False),  # last step's counts: no forecast GEMM, still exchanged
    "ours-link": (2, 3, True, True),  # two budgets planned, each split on the forecast, then on the truth
    "ours-noplan": (0, 1, True, True),  # EPLB's packing rule: not measured, charged nothing for it
}


def check_control(control: str) -> None:
    if control not in CONTROLS:
        raise ValueError(f"unknown control {control!r}; valid: {CONTROLS}")


def _nearest(rows, E: int, ep: int, key: str, src: str) -> float:
    """``rows`` [(E, ep, {timing: median_us})]: the figure at the nearest (E, ep), slower on ties."""
    rows = [(e, p, t[key]) for e, p, t in rows if key in t]
    if not rows:
        raise ValueError(f"no {key!r} measurement in {src}")
    d = lambda e, p: abs(math.log2(e / E)) + abs(math.log2(p / ep))
    best = min(d(e, p) for e, p, _ in rows)
    return max(v for e, p, v in rows if d(e, p) == best)


@lru_cache(maxsize=None)
def _load(path: str):
    return ff.load_json(path, "a control-path measurement JSON (tools/bench_planner.py, tools/bench_balancer.py or "
                              "tools/gpu_check_planner.py)")


def _bench_rows(path: str):
    """``[(E, ep, {timing: median_us})]`` of a bench_planner / bench_balancer result, every field checked."""
    rows = []
    for name, c in ff.field(_load(path), "configs", path, "dict").items():
        w = f"configs.{name}."
        timings = ff.field(c, "timings", path, "dict", w)
        rows.append((ff.field(c, "E", path, "int", w, lo=1), ff.field(c, "ep", path, "int", w, lo=1),
                     {k: ff.field(v, "median_us", path, "number", f"{w}timings.{k}.", lo=0) for k, v in timings.items()}))
    return rows


def check_measurements(control: str) -> None:
    """Read and check the measurement files ``control`` prices the control path from, up front
    (a missing or malformed one raises :class:`~megatron_probe.fileformat.InputFileError` naming
    the file and field); ``"both"``: host and GPU."""
    if control == "none":
        return
    _bench_rows(BENCH_PLANNER)
    _bench_rows(BENCH_BALANCER)
    if control in ("gpu", "both"):
        for i, r in enumerate(ff.field(_load(GPU_PLANNER), "planner", GPU_PLANNER, "list", default=[])):
            for key in ("E", "ep"):
                ff.field(r, key, GPU_PLANNER, "int", f"planner[{i}].", lo=1)


def control_pieces(cfg, tokens_per_rank: int) -> Dict[str, float]:
    """The measured / priced pieces (us, one layer) behind :func:`control_prices`."""
    check_control(cfg.control)
    shape, ep = cfg.model.shape, cfg.topo.ep
    E = shape.num_experts
    rows = _bench_rows(BENCH_PLANNER)
    pc = {"planner_us": _nearest(rows, E, ep, "copy_charge_one_pass", BENCH_PLANNER),
          "split_us": _nearest(rows, E, ep, "split_time", BENCH_PLANNER),
          "resident_us": _nearest(_bench_rows(BENCH_BALANCER), E, ep, "resident_plan+split_time", BENCH_BALANCER)}
    if cfg.control == "gpu":
        g = [(r["E"], r["ep"], {"graph_us_median": r["graph_us_median"]})
             for r in _load(GPU_PLANNER).get("planner", []) if "graph_us_median" in r]
        pc["planner_us"] = _nearest(g, E, ep, "graph_us_median", GPU_PLANNER)
        pc["resident_us"] = float("nan")  # the resident planner has no GPU measurement
    vol = torch.full((ep,), float(ep * E * 4))  # int32 counts of every rank, in and out
    pc["exchange_us"] = a2a_time_us(cfg.hw, vol, vol, inter_node=cfg.topo.nodes > 1)
    pc["forecast_us"] = (2.0 * tokens_per_rank * shape.hidden * E
                         / (cfg.hw.gemm_eta_max * cfg.hw.peak_tflops * 1e12) * 1e6)
    return pc


def control_prices(cfg, tokens_per_rank: int) -> Dict[str, float]:
    """Per-layer control-path time (us) of every policy that plans each step (0 for the others;
    NaN where a piece was not measured: ``ours-resident`` on GPU). EPLB's rare rebalance planning
    is not priced (not measured here)."""
    check_control(cfg.control)
    out = {n: 0.0 for n in ("static", "eplb", "eplb-same", "oracle", "ours-resident", *PIECES)}
    if cfg.control == "none":
        return out
    pc = control_pieces(cfg, tokens_per_rank)
    ex, fc = pc["exchange_us"], pc["forecast_us"]
    for n, (k_plan, k_split, has_ex, has_fc) in PIECES.items():
        out[n] = k_plan * pc["planner_us"] + k_split * pc["split_us"] + (ex if has_ex else 0.0) + (fc if has_fc else 0.0)
    out["ours-resident"] = pc["resident_us"] + ex + fc
    return out
