"""Balancing policies on the simulated cluster, step by step and layer by layer.

Each policy turns one layer's true counts ``C [ep, E]`` (and, for the forecasting ones, a forecast
``P``) into a placement and an assignment, and says what its replica transfers cost. The planning
code is the project's own: ``planner.plan_probe_host`` (PROBE's Algorithm 1, the host twin of the
tensor planner), ``planner.assign_on_truth``, ``eplb.EPLBPolicy`` / ``eplb_placement``,
``placement.locality_even_assignment``, and ``tools/eval_planner.split_like`` (PROBE as
published applies the predicted split's proportions to the true tokens).

Policies:

* ``static``: Megatron's contiguous placement, no replicas.
* ``eplb``: DeepSeek-style EPLB (``EPLBPolicy``): ``eplb_slots`` replica slots per layer per rank,
  statistics of the past ``eplb_window`` steps, rebalance every ``eplb_period`` steps, starting
  from no replica (warm-up); the copies of a rebalance (all layers at once) are charged in full,
  spread over ``eplb_spread_steps`` steps, not hidden.
* ``probe``: PROBE as the paper describes it: plan on the forecast with the transfer budget of
  the estimated window (``cost_model.transfer_window_us`` / ``transfer_budget``, over
  InfiniBand when the cluster spans nodes), split from the forecast, every replica fetched anew
  each step (shared double banks) in two phases that avoid the All-to-Alls; a copy that does not
  fit the actual window is waited for (exposed); the copy kernel uses a fraction of the SMs
  (``copy_sm_fraction``), slowing the expert GEMMs of the ranks it runs on while it copies.
* ``ours``: the same placement (budget of the NVLink window), copies by the copy engine (no SM),
  copies that would finish after the window dropped (tokens stay home: never a stall), and the
  split recomputed on the true counts (``assign_on_truth``).
* ``oracle``: planned on the true counts with every replica slot, transfers free.

Ablations (of ``ours``): ``ours-prev`` forecasts with last step's counts of the layer;
``ours-naive`` starts copies at once and lets them share the links with the All-to-Alls (no
split phase, no drop); ``ours-noplan`` replaces the planner by EPLB's replicate-and-pack rule on
the forecast with an even split. ``ours-link`` (multi-node) plans with both budgets, the
InfiniBand-priced one and the NVLink one, drops the late copies of each, and keeps the placement
whose dispatch + expert + combine time *on the forecast* (``layer.layer_time``: the
All-to-All over InfiniBand counts, since a copy on another node keeps that node's tokens local)
is lower (ties: the smaller budget).
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch

from megatron_probe.policy.cost_model import ExpertCost, HardwareProfile, transfer_budget, transfer_time_us
from megatron_probe.policy.eplb import EPLBPolicy, eplb_placement
from megatron_probe.policy.placement import EMPTY_SLOT, ExpertLayout, locality_even_assignment
from megatron_probe.policy.planner import assign_on_truth, plan_probe_host, static_assignment
from megatron_probe.sim.layer import Topology, copy_list, layer_time, transfer_us
from megatron_probe.sim.models import ModelPreset

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
POLICIES = ("static", "eplb", "probe", "ours", "oracle")
ABLATIONS = ("ours-prev", "ours-naive", "ours-noplan", "ours-link")
_SPLIT_LIKE = None


def split_like(true, pred, pred_assign, layout, placement):
    """``tools/eval_planner.split_like`` (loaded from the tool: one implementation)."""
    global _SPLIT_LIKE
    if _SPLIT_LIKE is None:
        spec = importlib.util.spec_from_file_location("_probe_eval_planner", os.path.join(ROOT, "tools", "eval_planner.py"))
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        _SPLIT_LIKE = mod.split_like
    return _SPLIT_LIKE(true, pred, pred_assign, layout, placement)


@dataclass
class SimConfig:
    hw: HardwareProfile
    model: ModelPreset
    topo: Topology
    context: int = 2048  # tokens of KV each token attends to (decode) or chunk/2 (prefill)
    replica_slots: int = 3  # PROBE: 3 redundant experts per rank (double-buffered: 6 slots)
    eplb_slots: int = 2
    eplb_window: int = 100
    eplb_period: int = 100
    eplb_spread_steps: int = 2
    sigma: float = 0.0  # forecast noise (error_model)
    k_max: int = 16
    copy_sm_fraction: float = 0.06  # PROBE's remote-put kernel: share of SMs it takes while copying
    transfer_link: str = "auto"  # auto | nvlink | ib
    seed: int = 0


def drop_late(placement: torch.Tensor, layout: ExpertLayout, cfg: SimConfig, window_us: float) -> torch.Tensor:
    """Keep the copies (in the planner's order) that finish inside the window on both their ranks."""
    same = cfg.topo.same_node()
    busy_in = torch.zeros(cfg.topo.ep, dtype=torch.float64)
    busy_out = torch.zeros(cfg.topo.ep, dtype=torch.float64)
    out = placement.clone()
    for dst, slot, _, src in copy_list(placement, layout):
        inter = {"auto": not bool(same[dst, src]), "nvlink": False, "ib": True}[cfg.transfer_link]
        t = transfer_time_us(cfg.hw, cfg.model.shape, 1, inter_node=inter)
        if busy_in[dst] + t <= window_us and busy_out[src] + t <= window_us:
            busy_in[dst] += t
            busy_out[src] += t
        else:
            out[dst, slot] = EMPTY_SLOT
    return out


@dataclass
class LayerPlan:
    assign: torch.Tensor
    placement: Optional[torch.Tensor] = None  # replicas fetched this step (PROBE-style), or None
    mode: str = "none"  # none | split | naive | eplb
    sm_copy: bool = False
    copies: int = 0


@dataclass
class PolicyState:
    eplb: List[EPLBPolicy] = field(default_factory=list)
    eplb_prev: List[torch.Tensor] = field(default_factory=list)
    last_counts: Dict[int, torch.Tensor] = field(default_factory=dict)


class Policies:
    """All policies of one run; ``plan(name, l, C, P)`` per layer in step order."""

    def __init__(self, cfg: SimConfig, n_layers: int, names, budget_probe: int, budget_ours: int):
        E, ep = cfg.model.shape.num_experts, cfg.topo.ep
        self.cfg = cfg
        self.names = tuple(names)
        self.cost = ExpertCost.from_profile(cfg.hw, cfg.model.shape)
        self.lay0 = ExpertLayout(E, ep, 0)
        self.lay = ExpertLayout(E, ep, cfg.replica_slots)
        self.lay_eplb = ExpertLayout(E, ep, cfg.eplb_slots)
        self.budget_probe, self.budget_ours = budget_probe, budget_ours
        self.state = PolicyState()
        if "eplb" in self.names:
            self.state.eplb = [EPLBPolicy(self.lay_eplb, cfg.eplb_window, cfg.eplb_period) for _ in range(n_layers)]
            self.state.eplb_prev = [torch.full((ep, cfg.eplb_slots), EMPTY_SLOT, dtype=torch.long)
                                    for _ in range(n_layers)]
        self._plans: Dict = {}

    def _plan(self, key, counts, budget):
        if key not in self._plans:
            self._plans[key] = plan_probe_host(counts, self.lay, self.cost, budget_in=budget, k_max=self.cfg.k_max)
        return self._plans[key]

    def new_layer(self):
        self._plans.clear()

    def plan(self, name: str, l: int, C: torch.Tensor, P: torch.Tensor, window_us: float):
        if name == "static":
            return LayerPlan(static_assignment(C, self.lay0))
        if name == "eplb":
            pl, A, _ = self.state.eplb[l].plan(C)
            prev = self.state.eplb_prev[l]
            new = torch.where((pl != prev) & (pl >= 0), pl, torch.full_like(pl, EMPTY_SLOT))
            self.state.eplb_prev[l] = pl
            return LayerPlan(A, new, "eplb", copies=int((new >= 0).sum()))
        if name == "oracle":
            pl, A = self._plan("oracle", C, self.lay.replica_slots)
            return LayerPlan(A)
        if name == "probe":
            pl, Ap = self._plan(("fc", self.budget_probe), P, self.budget_probe)
            A = split_like(C, P, Ap, self.lay, pl)
            return LayerPlan(A, pl, "split", sm_copy=True, copies=int((pl >= 0).sum()))
        if name in ("ours", "ours-naive", "ours-prev"):
            if name == "ours-prev":
                prev = self.state.last_counts.get(l)
                self.state.last_counts[l] = C
                if prev is None:
                    return LayerPlan(static_assignment(C, self.lay0))
                pl, _ = plan_probe_host(prev, self.lay, self.cost, budget_in=self.budget_ours, k_max=self.cfg.k_max)
            else:
                pl, _ = self._plan(("fc", self.budget_ours), P, self.budget_ours)
            if name == "ours-naive":
                return LayerPlan(assign_on_truth(C, pl, self.lay, self.cost), pl, "naive", copies=int((pl >= 0).sum()))
            pl = drop_late(pl, self.lay, self.cfg, window_us)
            return LayerPlan(assign_on_truth(C, pl, self.lay, self.cost), pl, "split", copies=int((pl >= 0).sum()))
        if name == "ours-link":
            cands = []
            for b in sorted({self.budget_probe, self.budget_ours}):
                pl, _ = self._plan(("fc", b), P, b)
                pl = drop_late(pl, self.lay, self.cfg, window_us)
                r = layer_time(self.cfg.hw, self.cfg.model.shape, self.cfg.topo, self.cost, P,
                               assign_on_truth(P, pl, self.lay, self.cost), self.cfg.context)
                cands.append((r["dispatch_us"] + r["comp_us"] + r["combine_us"], b, pl))
            pl = min(cands, key=lambda x: (x[0], x[1]))[2]
            return LayerPlan(assign_on_truth(C, pl, self.lay, self.cost), pl, "split", copies=int((pl >= 0).sum()))
        if name == "ours-noplan":
            lay_b = ExpertLayout(self.lay.num_experts, self.lay.ep_size, min(self.lay.replica_slots, self.budget_ours))
            pl = eplb_placement(P.sum(0).double(), lay_b)
            pl = drop_late(pl, lay_b, self.cfg, window_us)
            return LayerPlan(locality_even_assignment(C, pl, lay_b), pl, "split", copies=int((pl >= 0).sum()))
        raise ValueError(f"unknown policy {name!r}; valid: {POLICIES + ABLATIONS}")

    def transfer(self, plan: LayerPlan) -> torch.Tensor:
        """``[ep]`` per-rank transfer time of the copies a plan fetches (zeros for none)."""
        if plan.placement is None or plan.copies == 0:
            return torch.zeros(self.cfg.topo.ep, dtype=torch.float64)
        lay = ExpertLayout(self.lay.num_experts, self.lay.ep_size, plan.placement.shape[1])
        return transfer_us(self.cfg.hw, self.cfg.model.shape, self.cfg.topo, plan.placement, lay,
                           self.cfg.transfer_link)


def budgets(cfg: SimConfig, window_us: float):
    """(PROBE as published, ours) copies per rank the estimated window allows: PROBE prices every
    copy at the slowest link it may cross (InfiniBand on more than one node), ours at NVLink
    (late cross-node copies are dropped at run time instead)."""
    shape = cfg.model.shape
    force_ib = cfg.transfer_link == "ib"
    b_probe = transfer_budget(cfg.hw, shape, window_us, inter_node=force_ib or (cfg.topo.nodes > 1 and
                                                                                 cfg.transfer_link == "auto"))
    b_ours = transfer_budget(cfg.hw, shape, window_us, inter_node=force_ib)
    return min(b_probe, cfg.replica_slots), min(b_ours, cfg.replica_slots)
