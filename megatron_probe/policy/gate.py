"""The per-layer cost gate: balance a layer only while balancing saves more than its control path
costs.

Forecasting, planning, agreeing and splitting cost time on every layer and step; replicas only
save time when the load is skewed enough. Each MoE layer keeps a :class:`LayerGate`:

* **saving** (us per step, :func:`balancing_saving_us`): on the true counts the dispatcher
  all-gathers anyway (the same on every rank), the slowest rank's expert time with the static
  placement minus that with the plan the layer would make (PROBE's planner on those counts, the
  balanced split, every new copy charged ``copy_charge_us`` to its two ranks, as the pipeline
  prices copies);
* **cost** (us per step): what the layer's control path measured while it ran, agreed over the
  ranks (the slowest rank's; the caller gathers it, so every rank decides the same).

The saving is priced with the planner only when its cheap upper bound
(:func:`saving_upper_bound_us`) could beat the cost; otherwise the bound is the recorded saving
(the decision is the same: off).

The gate is on while ``saving > margin x cost``. It re-checks at an interval that doubles while
the decision stays the same (from ``min_interval`` up to ``max_interval`` steps) and drops back
to ``min_interval`` when it switches; while off, a rise of the layer's static imbalance by
``skew_jump`` since the last check triggers a check at once, so balancing comes back as soon as
skew appears. The first ``warmup_steps`` steps run on, to measure the cost.

Pure and deterministic: the same counts, costs and steps give the same decisions everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from megatron_probe.policy.cost_model import ExpertCost
from megatron_probe.policy.placement import ExpertLayout, holder_slots
from megatron_probe.policy.planner import charged_times, plan_with_copy_charge, rank_times, static_assignment
from megatron_probe.policy.split import balanced_split


@dataclass(frozen=True)
class GateSettings:
    margin: float = 1.2  # the saving must beat the control cost by this factor to switch on
    warmup_steps: int = 2  # steps balanced (and measured) before the first decision
    min_interval: int = 1  # steps between two checks right after a switch
    max_interval: int = 16  # cap of the doubling interval
    skew_jump: float = 0.05  # static IR rise since the last check that forces a check while off

    def __post_init__(self):
        if not self.margin > 0:
            raise ValueError(f"margin={self.margin}; valid: > 0")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps={self.warmup_steps}; valid: >= 0")
        if not 1 <= self.min_interval <= self.max_interval:
            raise ValueError(f"min_interval={self.min_interval}, max_interval={self.max_interval}; valid: "
                             "1 <= min_interval <= max_interval")
        if not self.skew_jump > 0:
            raise ValueError(f"skew_jump={self.skew_jump}; valid: > 0")


def saving_upper_bound_us(counts: torch.Tensor, layout: ExpertLayout, cost: ExpertCost) -> float:
    """An upper bound of :func:`balancing_saving_us` in a few tensor operations: the static
    slowest rank's time minus the static mean. Any plan computes every token once and keeps every
    expert active somewhere (replicas only add active experts and charges), so its slowest rank
    needs at least the static mean."""
    loads = counts.sum(0).view(layout.ep_size, -1)
    times = (cost.per_token_us * loads.sum(1).double() + cost.per_active_expert_us * (loads > 0).sum(1).double())
    return max(0.0, float(times.max() - times.mean()))


def balancing_saving_us(counts: torch.Tensor, layout: ExpertLayout, cost: ExpertCost,
                        copy_charge_us: float = 0.0, budget_in: Optional[int] = None) -> float:
    """What balancing ``counts [ep, E]`` would save on the slowest rank (us, >= 0): static time
    minus the planned time, copies charged (module docstring)."""
    static = float(rank_times(static_assignment(counts, ExpertLayout(layout.num_experts, layout.ep_size, 0)),
                              cost).max())
    placement = plan_with_copy_charge(counts, layout, cost, budget_in, copy_charge_us)
    if not bool((placement >= 0).any()):
        return 0.0
    split = balanced_split(counts, holder_slots(placement, layout) >= 0, "time", cost)
    return max(0.0, static - float(charged_times(split, placement, layout, cost, copy_charge_us).max()))


class LayerGate:
    """One layer's gate (module docstring). ``on``: balance this layer now."""

    def __init__(self, settings: GateSettings = GateSettings()):
        self.settings = settings
        self.on = True
        self.interval = settings.min_interval
        self.next_check = settings.warmup_steps
        self.saving_us: Optional[float] = None
        self.cost_us: Optional[float] = None
        self.ir_at_check: Optional[float] = None
        self.switches = 0
        self.checks = 0

    def due(self, step: int, static_ir: float) -> bool:
        """Whether ``step``'s counts should be checked (a check at the interval, or, while off, a
        rise of the static imbalance)."""
        if step >= self.next_check:
            return True
        return (not self.on and self.ir_at_check is not None
                and static_ir > self.ir_at_check + self.settings.skew_jump)

    def decide(self, step: int, saving_us: float, cost_us: float, static_ir: float) -> bool:
        """Record a check at ``step``; returns whether the gate switched."""
        s = self.settings
        self.saving_us, self.cost_us, self.ir_at_check = saving_us, cost_us, static_ir
        self.checks += 1
        want = saving_us > s.margin * cost_us
        switched = want != self.on
        if switched:
            self.on = want
            self.switches += 1
            self.interval = s.min_interval
        else:
            self.interval = min(2 * self.interval, s.max_interval)
        self.next_check = step + self.interval
        return switched
