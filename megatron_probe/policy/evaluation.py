"""Replay per-step expert counts through the balancing policies and summarise them per phase.

The protocol every balance figure of the project is measured with (``tools/eval_planner.py``,
docs/planner.md):

* **Same steps, same slots.** Every policy sees the same counts ``[steps, layers, ep, E]``.
  PROBE-style policies have ``R`` replica slots per rank (streamed: double-buffered banks shared
  by all layers, ``2R`` experts of memory per rank); EPLB gets ``ep * R`` redundant physical
  experts per layer (``R`` per rank per layer, resident: ``R x layers`` experts per rank).
* **Phases.** ``warmup``: the steps before EPLB's first rebalance (it runs on vLLM's initial map
  while it records its first window); ``stationary``: from there to the shift (or the end);
  ``after_shift``: from the shift on. The headline is ``stationary`` (and ``after_shift``);
  warm-up is reported apart and never averaged into them. A shift must not fall on an EPLB
  rebalance step (that would hand EPLB fresh statistics at exactly the right moment, or none).
* **Metrics** per policy and phase: token IR (max / mean (token, expert) pairs per rank), time
  IR (the cost model's expert time, with the per-active-expert term), weight copies per step (all
  layers) and replica memory (extra experts per rank, all evaluated layers).

Policies: ``static``; ``eplb`` (the published EPLB, vLLM's even split), ``eplb_local`` (the same
placements, SGLang's local-first split), ``eplb_home`` (the project's earlier home-fixed
variant); ``probe`` (PROBE as published: planned on the forecast, the forecast's split applied to
the true tokens); ``probe+reassign`` (PROBE's placement, the planner's greedy split on the true
counts); ``exact_split`` (PROBE's placement, the exact min-max split of the true counts:
``optimal.exact_split``); ``ours_streamed`` (PROBE's streamed placement, the dispatch split of
``split.balanced_split`` on the true counts, time objective); ``ours_resident``
(``resident.ResidentPlanner``: ``R`` resident slots per layer per rank, changed only when the
forecast pays for the copy, the same split); ``oracle`` (planned on the true counts);
``optimal`` (the exact placement-and-split MILP, small cases only).

"Forecasts" here are the true counts with log-normal noise (:func:`noisy_forecast`): these
traces carry no predictor output.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch

from megatron_probe.policy.cost_model import ExpertCost
from megatron_probe.policy.eplb import EPLBPolicy, HomeFixedEPLBPolicy
from megatron_probe.policy.placement import (
    ExpertLayout,
    holder_slots,
    imbalance_ratio,
    rank_loads,
    validate_assignment,
    validate_split,
)
from megatron_probe.policy.planner import assign_on_truth, plan_probe_host, rank_times, split_as_predicted, static_assignment
from megatron_probe.policy.resident import ResidentPlanner, ResidentSettings
from megatron_probe.policy.split import balanced_split

POLICIES = ("static", "eplb", "eplb_local", "eplb_home", "probe", "probe+reassign", "exact_split", "ours_streamed",
            "ours_resident", "oracle", "optimal")
STREAMED = ("probe", "probe+reassign", "exact_split", "ours_streamed", "oracle", "optimal")  # 2R shared slots per rank
PHASES = ("warmup", "stationary", "after_shift")


def noisy_forecast(counts: torch.Tensor, sigma: float, gen: torch.Generator) -> torch.Tensor:
    """A stand-in forecast: every count times ``exp(sigma N(0,1) - sigma^2 / 2)`` (mean-preserving
    log-normal noise), rounded."""
    if sigma <= 0:
        return counts.clone()
    z = torch.randn(counts.shape, generator=gen, dtype=torch.float64)
    return torch.round(counts.double() * torch.exp(sigma * z - sigma * sigma / 2)).long()


@dataclass(frozen=True)
class Phases:
    """Step ranges: warm-up ``[0, warmup_end)``, stationary up to ``shift_step`` (or the end),
    after_shift from it."""

    steps: int
    warmup_end: int
    shift_step: Optional[int] = None

    def __post_init__(self):
        if not 0 <= self.warmup_end < self.steps:
            raise ValueError(f"warm-up end {self.warmup_end} must be in 0..{self.steps - 1} "
                             f"(steps={self.steps}): no stationary step would be left")
        if self.shift_step is not None and not self.warmup_end < self.shift_step < self.steps:
            raise ValueError(f"shift_step={self.shift_step} must fall after the warm-up (step {self.warmup_end}) "
                             f"and before the last step ({self.steps - 1})")

    def of(self, step: int) -> str:
        if step < self.warmup_end:
            return "warmup"
        if self.shift_step is not None and step >= self.shift_step:
            return "after_shift"
        return "stationary"

    def names(self) -> List[str]:
        return [p for p in PHASES if any(self.of(s) == p for s in range(self.steps))]


def eplb_rebalance_steps(steps: int, window: int, period: int) -> List[int]:
    """Steps at which :class:`EPLBPolicy` rebalances (first once a window is recorded)."""
    return list(range(window, steps, period))


def default_shift_step(steps: int, window: int, period: int) -> int:
    """Half way between two rebalances (or between the first and the end): the expected place of
    a workload shift relative to a periodic rebalance."""
    nxt = window + period
    return (window + min(nxt, steps)) // 2


@dataclass(frozen=True)
class EvalSetup:
    ep: int
    replica_slots: int
    cost: ExpertCost
    budget_in: int  # copies per rank PROBE's window allows
    eplb_window: int
    eplb_period: int
    noise: float = 0.1
    k_max: int = 16
    seed: int = 0
    exact_time_steps: int = 2  # stationary steps per layer where the time-objective MILP runs
    exact_time_limit: float = 5.0
    optimal_steps: int = 3  # stationary steps where the placement MILP runs (small cases)
    optimal_time_limit: float = 20.0
    copy_cost_us: float = 0.0  # what a resident copy must pay for (ours_resident)
    split_objective: str = "time"  # the ours_* dispatch split: "time" (cost model) or "tokens" (exact)


class _Record:
    def __init__(self):
        self.rows: Dict[str, Dict[str, list]] = {}

    def add(self, phase: str, ir: float, ir_time: float, copies: int):
        r = self.rows.setdefault(phase, {"ir": [], "ir_time": [], "copies": []})
        r["ir"].append(ir)
        r["ir_time"].append(ir_time)
        r["copies"].append(copies)


def _pct(xs: Sequence[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def replay(counts: torch.Tensor, setup: EvalSetup, shift_step: Optional[int] = None,
           policies: Sequence[str] = POLICIES) -> Dict:
    """Run ``policies`` over ``counts [steps, layers, ep, E]`` and summarise per phase (module
    docstring); warm-up is EPLB's first window. Returns ``{"phases": {phase: {"steps": [first,
    last], "policies": {name: metrics}}}, "phase_steps": ..., "extra": {...}}``."""
    steps, L, ep, E = counts.shape
    if ep != setup.ep:
        raise ValueError(f"counts have ep={ep}, the setup says ep={setup.ep}")
    unknown = set(policies) - set(POLICIES)
    if unknown:
        raise ValueError(f"unknown policies {sorted(unknown)}; valid: {POLICIES}")
    rebalances = eplb_rebalance_steps(steps, setup.eplb_window, setup.eplb_period)
    if shift_step is not None and shift_step in rebalances:
        raise ValueError(f"shift_step={shift_step} falls on an EPLB rebalance step {rebalances}; place it between them")
    phases = Phases(steps, setup.eplb_window, shift_step)
    from megatron_probe.policy.optimal import exact_split, optimal_plan  # SciPy: imported when used

    layout = ExpertLayout(E, ep, setup.replica_slots)
    R, cost = layout.replica_slots, setup.cost
    gen = torch.Generator().manual_seed(setup.seed + 7)
    eplb = {name: [EPLBPolicy(E, ep, ep * R, setup.eplb_window, setup.eplb_period,
                              split="even" if name == "eplb" else "local_first") for _ in range(L)]
            for name in ("eplb", "eplb_local") if name in policies}
    home = [HomeFixedEPLBPolicy(layout, setup.eplb_window, setup.eplb_period) for _ in range(L)]
    resident = [ResidentPlanner(layout, cost, ResidentSettings(copy_cost_us=setup.copy_cost_us, k_max=setup.k_max))
                for _ in range(L)]
    rec = {p: _Record() for p in policies}
    plan_us: List[float] = []
    time_gap: List[float] = []
    time_methods: Dict[str, int] = {}
    opt_gap: List[float] = []
    stationary_seen = 0

    def add(name, phase, A, copies):
        rec[name].add(phase, imbalance_ratio(rank_loads(A)), imbalance_ratio(rank_times(A, cost)), copies)

    for s in range(steps):
        phase = phases.of(s)
        if phase == "stationary":
            stationary_seen += 1
        for l in range(L):
            C = counts[s, l].long()
            if "static" in policies:
                add("static", phase, static_assignment(C, layout), 0)
            for name, pols in eplb.items():
                A, moved = pols[l].plan(C)
                validate_split(A, C, pols[l].pmap.holds())
                add(name, phase, A, moved)
            if "eplb_home" in policies:
                pl, A, moved = home[l].plan(C)
                validate_assignment(A, C, pl, layout)
                add("eplb_home", phase, A, moved)
            P = noisy_forecast(C, setup.noise, gen) if {"probe", "probe+reassign", "exact_split", "ours_streamed",
                                                         "ours_resident"} & set(policies) else None
            if {"probe", "probe+reassign", "exact_split", "ours_streamed"} & set(policies):
                t0 = time.perf_counter()
                pl, Ap = plan_probe_host(P, layout, cost, budget_in=setup.budget_in, k_max=setup.k_max)
                plan_us.append((time.perf_counter() - t0) * 1e6)
                n_copies = int((pl >= 0).sum())  # streamed: every replica fetched anew each step
                if "probe" in policies:
                    A = split_as_predicted(C, P, Ap, pl, layout)
                    validate_assignment(A, C, pl, layout)
                    add("probe", phase, A, n_copies)
                if "probe+reassign" in policies:
                    A = assign_on_truth(C, pl, layout, cost)
                    validate_assignment(A, C, pl, layout)
                    add("probe+reassign", phase, A, n_copies)
                if "ours_streamed" in policies:
                    A = balanced_split(C, holder_slots(pl, layout) >= 0, setup.split_objective, cost)
                    validate_assignment(A, C, pl, layout)
                    add("ours_streamed", phase, A, n_copies)
                if "exact_split" in policies:
                    holds = holder_slots(pl, layout) >= 0
                    ex = exact_split(C, holds)
                    validate_assignment(ex.assign, C, pl, layout)
                    add("exact_split", phase, ex.assign, n_copies)
                    if phase == "stationary" and stationary_seen <= setup.exact_time_steps:
                        best = exact_split(C, holds, "time", cost, time_limit=setup.exact_time_limit)
                        time_methods[best.method] = time_methods.get(best.method, 0) + 1
                        if best.value > 0:
                            time_gap.append(float(rank_times(ex.assign, cost).max()) / best.value - 1.0)
            if "ours_resident" in policies:
                pl, copies = resident[l].plan(P)
                A = balanced_split(C, holder_slots(pl, layout) >= 0, setup.split_objective, cost)
                validate_assignment(A, C, pl, layout)
                add("ours_resident", phase, A, copies)
                resident[l].observe(C)
            if "oracle" in policies:
                pl, A = plan_probe_host(C, layout, cost, budget_in=R, k_max=setup.k_max)
                add("oracle", phase, A, int((pl >= 0).sum()))
            if "optimal" in policies and phase == "stationary" and stationary_seen <= setup.optimal_steps:
                # max-rank *tokens* (the paper's L_r): both planned without the per-active-expert term
                cost0 = ExpertCost(cost.per_token_us, 0.0)
                z, pl = optimal_plan(C, layout, cost0, budget_in=setup.budget_in, time_limit=setup.optimal_time_limit)
                add("optimal", phase, assign_on_truth(C, pl, layout, cost0), int((pl >= 0).sum()))
                _, A_o = plan_probe_host(C, layout, cost0, budget_in=setup.budget_in, k_max=setup.k_max)
                opt_tokens = z / cost0.per_token_us
                opt_gap.append(float(A_o.sum(dim=(0, 1)).max()) / opt_tokens - 1.0 if opt_tokens > 0 else 0.0)

    out: Dict = {"phases": {}, "phase_steps": {}}
    for ph in phases.names():
        idx = [s for s in range(steps) if phases.of(s) == ph]
        out["phase_steps"][ph] = [idx[0], idx[-1]]
        pols = {}
        for name in policies:
            r = rec[name].rows.get(ph)
            if not r:
                continue
            memory = 0 if name == "static" else (2 * R if name in STREAMED else R * L)
            pols[name] = {"ir_mean": round(statistics.mean(r["ir"]), 4), "ir_p95": round(_pct(r["ir"], 0.95), 4),
                          "ir_max": round(max(r["ir"]), 4), "ir_time_mean": round(statistics.mean(r["ir_time"]), 4),
                          "copies_per_step": round(sum(r["copies"]) / len(idx), 2),
                          "replica_memory_experts": memory, "samples": len(r["ir"])}
        out["phases"][ph] = {"steps": out["phase_steps"][ph], "policies": pols}
    extra: Dict = {}
    if plan_us:
        extra["probe_plan_us_median"] = round(statistics.median(plan_us), 1)
        extra["probe_plan_us_p99"] = round(_pct(plan_us, 0.99), 1)
    if time_methods:
        extra["exact_split_time_objective"] = {
            "samples": sum(time_methods.values()), "methods": time_methods,
            "token_split_over_time_best_mean": round(statistics.mean(time_gap), 4) if time_gap else None,
            "note": "max-rank time of the token-exact split over the time-objective optimum (milp) or its lower "
                    "bound (lp_bound), minus 1; first stationary steps only"}
    if opt_gap:
        extra["optimal"] = {"oracle_probe_gap_mean": round(statistics.mean(opt_gap), 4),
                            "oracle_probe_gap_max": round(max(opt_gap), 4),
                            "note": f"first {setup.optimal_steps} stationary steps only; gap = PROBE (true counts) max-rank tokens "
                                    "/ exact optimum - 1, both without the per-active-expert term"}
    out["extra"] = extra
    return out
