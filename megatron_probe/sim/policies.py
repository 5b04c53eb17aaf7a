"""Balancing policies on the simulated cluster, step by step and layer by layer.

Each policy turns one layer's true counts ``C [ep, E]`` (and, for the forecasting ones, a forecast
``P``) into a placement and an assignment, and says what its replica transfers cost. The planning
code is the project's own: ``planner.plan_probe_host`` (PROBE's Algorithm 1, the host twin of the
tensor planner), ``split.balanced_split`` (the balancer's dispatch split),
``resident.ResidentPlanner`` (the balancer's resident replicas), ``eplb.EPLBPolicy`` (the
published EPLB), ``eplb.home_fixed_eplb_placement``, and ``planner.split_as_predicted`` (PROBE
as published applies the predicted split's proportions to the true tokens).

Policies:

* ``static``: Megatron's contiguous placement, no replicas.
* ``eplb``: the published EPLB as vLLM runs it (``eplb.EPLBPolicy``) with the paper's setting,
  ``eplb_slots`` = 2 redundant experts per layer per rank (natives move too), statistics of the
  past ``eplb_window`` steps, the first rebalance once a window is recorded, then every
  ``eplb_period`` steps (vLLM's 1000 / 3000 defaults scaled to the run); before it, vLLM's
  initial map (warm-up). Tokens split by ``eplb_split`` (``even``: vLLM; ``local_first``:
  SGLang). The copies of a rebalance (all layers at once; every expert a rank gains) are charged
  in full, spread over ``eplb_spread_steps`` steps, not hidden.
* ``eplb-same``: the same at PROBE's slots (``replica_slots`` redundant experts per layer per
  rank: resident, ``replica_slots x layers`` experts of memory per rank where PROBE streams
  ``2 x replica_slots``).
* ``probe``: PROBE as the paper describes it: plan on the forecast with the transfer budget of
  the estimated window (``cost_model.transfer_window_us`` / ``transfer_budget``, over
  InfiniBand when the cluster spans nodes), split from the forecast, every replica fetched anew
  each step (shared double banks) in two phases that avoid the All-to-Alls; a copy that does not
  fit the actual window is waited for (exposed); the copy kernel uses a fraction of the SMs
  (``copy_sm_fraction``), slowing the expert GEMMs of the ranks it runs on while it copies.
* ``ours`` (streamed budget: PROBE's ``2 x replica_slots`` streamed slots per rank for all
  layers): the same placement (budget of the NVLink window), copies by the copy engine (no SM),
  copies that would finish after the window dropped (tokens stay home: never a stall), and the
  dispatch split computed on the true counts by ``split.balanced_split`` (time objective, the
  policy's ``ExpertCost``).
* ``ours-resident`` (resident budget: ``replica_slots`` slots per layer per rank, the memory of
  ``eplb-same``): one ``ResidentPlanner`` per layer, fed the forecast each step and the true
  counts after (``observe``); it copies only when its placement changes (each new (rank, expert)
  pair, sent by the expert's home rank), by the copy engine in the same window as ``ours`` (the
  forecast of a layer arrives one layer ahead). A copy that would finish after the window is
  **waited for** (exposed, as PROBE's): the planner has already committed the slot, and the
  old expert in it is overwritten by the copy, so it cannot serve the step either. The planner's
  ``copy_cost_us`` is what one copy leaves exposed at the estimated window (0 when it fits),
  so its "a change pays for its copies" test prices exactly that stall. Split: ``balanced_split``
  on the true counts (time objective).
* ``oracle``: planned on the true counts with every replica slot, transfers free, split by
  ``balanced_split`` (time objective) like ``ours``.

Ablations (of ``ours``; each changes one piece, all split with ``balanced_split`` on the true
counts, time objective): ``ours-prev`` forecasts with last step's counts of the layer;
``ours-naive`` starts copies at once and lets them share the links with the All-to-Alls (no
split phase, no drop); ``ours-noplan`` replaces the planner by the home-fixed EPLB rule
(``home_fixed_eplb_placement``: replicate and pack the replica slots) on the forecast.
``ours-link`` (multi-node) plans with both budgets, the
InfiniBand-priced one and the NVLink one, drops the late copies of each, and keeps the placement
whose dispatch + expert + combine time *on the forecast* (``layer.layer_time``, the forecast
split by ``balanced_split``: the All-to-All over InfiniBand counts, since a copy on another node
keeps that node's tokens local) is lower (ties: the smaller budget).

Replica memory per rank (extra experts, :func:`replica_memory`): ``eplb`` ``eplb_slots x
layers``, ``eplb-same`` and ``ours-resident`` ``replica_slots x layers``, ``probe`` and ``ours``
(and their ablations) ``2 x replica_slots``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Tuple

import torch

from megatron_probe.policy.cost_model import ExpertCost, HardwareProfile, transfer_budget, transfer_time_us
from megatron_probe.policy.eplb import EPLBPolicy, home_fixed_eplb_placement
from megatron_probe.policy.placement import EMPTY_SLOT, ExpertLayout, holder_slots
from megatron_probe.policy.planner import plan_probe_host, split_as_predicted, static_assignment
from megatron_probe.policy.resident import ResidentPlanner, ResidentSettings
from megatron_probe.policy.split import balanced_split
from megatron_probe.sim.layer import Topology, copy_list, eplb_moves, layer_time, slot_moves, transfer_us
from megatron_probe.sim.models import ModelPreset

POLICIES = ("static", "eplb", "eplb-same", "probe", "ours", "ours-resident", "oracle")
ABLATIONS = ("ours-prev", "ours-naive", "ours-noplan", "ours-link")
EPLB_POLICIES = ("eplb", "eplb-same")


@dataclass
class SimConfig:
    hw: HardwareProfile
    model: ModelPreset
    topo: Topology
    context: int = 2048  # tokens of KV each token attends to (decode) or chunk/2 (prefill)
    replica_slots: int = 3  # PROBE: 3 redundant experts per rank (double-buffered: 6 slots)
    eplb_slots: int = 2  # the paper's EPLB: 2 redundant experts per layer per rank
    eplb_window: int = 100  # vLLM's window 1000 / interval 3000, scaled by 1/10 to a 500-step run
    eplb_period: int = 300
    eplb_split: str = "even"  # even (vLLM) | local_first (SGLang static dispatch)
    eplb_spread_steps: int = 2
    sigma: float = 0.0  # forecast noise (error_model)
    k_max: int = 16
    copy_sm_fraction: float = 0.06  # PROBE's remote-put kernel: share of SMs it takes while copying
    transfer_link: str = "auto"  # auto | nvlink | ib
    seed: int = 0
    control: str = "none"  # none | host | gpu: charge the control path (sim.control)

    def __post_init__(self):
        from megatron_probe.sim.control import check_control  # control imports nothing of ours: no cycle
        check_control(self.control)


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
    moves: List[Tuple[int, int, int]] = field(default_factory=list)  # weight copies (dst, src, expert)
    mode: str = "none"  # none | split | naive | eplb
    sm_copy: bool = False

    @property
    def copies(self) -> int:
        return len(self.moves)


@dataclass
class PolicyState:
    eplb: Dict[str, List[EPLBPolicy]] = field(default_factory=dict)
    last_counts: Dict[int, torch.Tensor] = field(default_factory=dict)
    resident: List[ResidentPlanner] = field(default_factory=list)  # ours-resident, one per layer


def resident_moves(new: torch.Tensor, old: torch.Tensor, layout: ExpertLayout) -> List[Tuple[int, int, int]]:
    """``[(dst, src, expert)]`` copies that turn resident placement ``old`` into ``new``: every
    (rank, expert) pair held now and not before, sent by the expert's home rank (the replica slot
    it lands in was overwritten, so an unchanged placement copies nothing)."""
    gained = (holder_slots(new, layout) >= 0) & ~(holder_slots(old, layout) >= 0)
    L = layout.num_local_experts
    return [(dst, e // L, e) for dst, e in gained.nonzero().tolist()]


def resident_copy_cost(cfg: SimConfig, window_us: float) -> float:
    """What one resident copy leaves exposed at the estimated window (``ResidentSettings.copy_cost_us``):
    its transfer time beyond the window, priced at the slowest link it may cross (as PROBE's budget),
    0 when it fits."""
    inter = cfg.transfer_link == "ib" or (cfg.topo.nodes > 1 and cfg.transfer_link == "auto")
    return max(0.0, transfer_time_us(cfg.hw, cfg.model.shape, 1, inter_node=inter) - window_us)


def replica_memory(cfg: SimConfig, name: str):
    """Extra experts of weight memory per rank a policy holds (all MoE layers together); None for
    the ``oracle`` (transfers free: its memory is not modelled)."""
    if name == "static":
        return 0
    if name == "oracle":
        return None
    if name == "eplb":
        return cfg.eplb_slots * cfg.model.moe_layers
    if name in ("eplb-same", "ours-resident"):
        return cfg.replica_slots * cfg.model.moe_layers  # resident: R per layer
    return 2 * cfg.replica_slots  # streamed: two banks of R shared by every layer


class Policies:
    """All policies of one run; ``plan(name, l, C, P)`` per layer in step order."""

    def __init__(self, cfg: SimConfig, n_layers: int, names, budget_probe: int, budget_ours: int,
                 window_est_us: float = float("inf")):
        E, ep = cfg.model.shape.num_experts, cfg.topo.ep
        self.cfg = cfg
        self.names = tuple(names)
        bad = [n for n in self.names if n not in POLICIES + ABLATIONS]
        if bad:  # before any state is built: a typo must not surface only when its layer is planned
            raise ValueError(f"unknown policy {bad[0]!r}; valid: {POLICIES + ABLATIONS}")
        self.cost = ExpertCost.from_profile(cfg.hw, cfg.model.shape)
        self.lay0 = ExpertLayout(E, ep, 0)
        self.lay = ExpertLayout(E, ep, cfg.replica_slots)
        self.budget_probe, self.budget_ours = budget_probe, budget_ours
        self.state = PolicyState()
        slots = {"eplb": cfg.eplb_slots, "eplb-same": cfg.replica_slots}
        for name in EPLB_POLICIES:
            if name in self.names:
                self.state.eplb[name] = [EPLBPolicy(E, ep, ep * slots[name], cfg.eplb_window, cfg.eplb_period,
                                                    split=cfg.eplb_split) for _ in range(n_layers)]
        if "ours-resident" in self.names:
            rs = ResidentSettings(copy_cost_us=resident_copy_cost(cfg, window_est_us), k_max=cfg.k_max)
            self.state.resident = [ResidentPlanner(self.lay, self.cost, rs) for _ in range(n_layers)]
        self._plans: Dict = {}

    def _plan(self, key, counts, budget):
        if key not in self._plans:
            self._plans[key] = plan_probe_host(counts, self.lay, self.cost, budget_in=budget, k_max=self.cfg.k_max)
        return self._plans[key]

    def new_layer(self):
        self._plans.clear()

    def _split(self, counts, placement, layout=None):
        """The balancer's dispatch split of ``counts`` over ``placement``'s copies (time objective)."""
        holds = holder_slots(placement, layout or self.lay) >= 0
        return balanced_split(counts, holds, "time", self.cost)

    def plan(self, name: str, l: int, C: torch.Tensor, P: torch.Tensor, window_us: float):
        if name == "static":
            return LayerPlan(static_assignment(C, self.lay0))
        if name in EPLB_POLICIES:
            pol = self.state.eplb[name][l]
            old = pol.pmap
            A, copies = pol.plan(C)
            return LayerPlan(A, eplb_moves(pol.pmap, old, self.cfg.topo) if copies else [], "eplb")
        if name == "oracle":
            pl, _ = self._plan("oracle", C, self.lay.replica_slots)
            return LayerPlan(self._split(C, pl))  # ours' split: an upper bound for ours, not the greedy's
        if name == "probe":
            pl, Ap = self._plan(("fc", self.budget_probe), P, self.budget_probe)
            A = split_as_predicted(C, P, Ap, pl, self.lay)
            return LayerPlan(A, slot_moves(pl, self.lay), "split", sm_copy=True)
        if name == "ours-resident":
            planner = self.state.resident[l]
            old = planner.placement.clone()
            pl, _ = planner.plan(P)
            A = self._split(C, pl)
            planner.observe(C)
            return LayerPlan(A, resident_moves(pl, old, self.lay), "split")
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
                return LayerPlan(self._split(C, pl), slot_moves(pl, self.lay), "naive")
            pl = drop_late(pl, self.lay, self.cfg, window_us)
            return LayerPlan(self._split(C, pl), slot_moves(pl, self.lay), "split")
        if name == "ours-link":
            cands = []
            for b in sorted({self.budget_probe, self.budget_ours}):
                pl, _ = self._plan(("fc", b), P, b)
                pl = drop_late(pl, self.lay, self.cfg, window_us)
                r = layer_time(self.cfg.hw, self.cfg.model.shape, self.cfg.topo, self.cost, P,
                               self._split(P, pl), self.cfg.context)
                cands.append((r["dispatch_us"] + r["comp_us"] + r["combine_us"], b, pl))
            pl = min(cands, key=lambda x: (x[0], x[1]))[2]
            return LayerPlan(self._split(C, pl), slot_moves(pl, self.lay), "split")
        if name == "ours-noplan":
            lay_b = ExpertLayout(self.lay.num_experts, self.lay.ep_size, min(self.lay.replica_slots, self.budget_ours))
            pl = home_fixed_eplb_placement(P.sum(0).double(), lay_b)
            pl = drop_late(pl, lay_b, self.cfg, window_us)
            return LayerPlan(self._split(C, pl, lay_b), slot_moves(pl, lay_b), "split")
        raise ValueError(f"unknown policy {name!r}; valid: {POLICIES + ABLATIONS}")

    def transfer(self, plan: LayerPlan) -> torch.Tensor:
        """``[ep]`` per-rank transfer time of the copies a plan makes (zeros for none)."""
        return transfer_us(self.cfg.hw, self.cfg.model.shape, self.cfg.topo, plan.moves, self.cfg.transfer_link)


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
