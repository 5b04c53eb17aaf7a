"""Resident replicas: ``R`` slots per rank per layer that keep their expert across steps, changed
only when the forecast says a change pays for its copy.

PROBE streams its replicas (two banks of ``R`` slots shared by every layer, refilled at every
step and layer); EPLB keeps them resident but re-packs rarely and blind to shifts. A
:class:`ResidentPlanner` (one per MoE layer) keeps them resident and decides at every step, from
the forecast of this step's counts:

1. **Warm start**: the first forecast is planned from scratch (``planner.plan_probe_host``) and
   every slot filled at once (a burst, counted), so there is no static warm-up phase.
2. **Candidates**: decisions use the forecast smoothed over steps (``forecast_smoothing``: the
   newest step's weight), since a resident replica is for the load that persists. The
   from-scratch plan on it names the replicas the layer would want
   now; the ones not yet held are candidates, in the planner's order (its earlier copies help
   more). A candidate takes a free slot of its rank, or replaces the held replica that the
   forecast sends the fewest tokens to.
3. **Decision**: with the split the dispatcher will use (``split.placement_split``, time objective;
   its local search, not its branch and bound, which would add tens of us per priced placement for
   the last fraction of a percent), the slowest rank's expert time of the forecast with the current
   placement and with the candidates (at most ``copy_budget`` of them, else the first alone). A
   change is kept when it saves at least ``min_gain`` of the current time (hysteresis: a stationary
   load, whose forecasts wobble around one placement, never flaps) and when the saving over the
   expected residency pays for the copies: ``saving x horizon >= copies x copy_cost_us``. When more
   candidates wait than the budget allows, the whole new plan is priced: if it saves at least
   ``burst_gain`` (the load has shifted) it is adopted at once (a burst, counted); if it saves at
   least ``min_gain``, the first ``copy_budget`` candidates are taken as a step towards it when
   that step is no slower (a gradual shift, whose single changes each save too little). Stationary
   steps stop before the from-scratch plan: when the current time is within ``min_gain`` (at a
   review ``review_gain``) of a time no placement beats (:func:`time_lower_bound`), no change can
   pass, so the decision is the one the full procedure would take, for the price of one split.
4. **Review**: every ``review_every`` steps, when the step's own decision changes nothing, a
   second decision is made on the mean forecast of the steps since the last review or change,
   with the smaller hysteresis ``review_gain``, and a change it finds is kept only if it is also
   faster on the mean of each half of that window. A saving below ``min_gain`` is within one
   step's forecast noise, but one that holds over the window and in both its halves is
   structure: a flat load after a shift (Qwen3-Next, 512 experts) otherwise stays within
   ``min_gain`` of its bound and is never followed.
5. **Horizon**: how long a hot set stays hot, estimated online from the true counts
   (:meth:`ResidentPlanner.observe`): the turnover of the layer's hottest experts from step to
   step, averaged (exponentially), gives an expected residency ``1 / turnover`` steps, capped.

Deterministic (ties to lower indices), so every rank decides the same from the same gathered
forecast. The replica copies themselves are the mechanism's business (prefetched one layer
ahead, phase-locked, like PROBE's).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np
import torch

from megatron_probe.policy.cost_model import ExpertCost
from megatron_probe.policy.placement import EMPTY_SLOT, ExpertLayout, empty_placement
from megatron_probe.policy.planner import plan_probe_host
from megatron_probe.policy.split import placement_split_times, placement_time_split_bounded


@dataclass(frozen=True)
class ResidentSettings:
    copy_budget: int = 4  # new replicas per layer per step after the warm start
    copy_cost_us: float = 0.0  # what one copy costs beyond what overlap hides
    min_gain: float = 0.02  # hysteresis: a change must save this share of the layer's slowest expert time
    burst_gain: float = 0.10  # a whole new plan saving this share (a shift) is adopted at once
    horizon_max: float = 64.0  # cap of the expected residency (steps)
    turnover_smoothing: float = 0.2  # weight of the newest step in the turnover average
    forecast_smoothing: float = 0.5  # weight of the newest forecast in the load the decisions use
    hot_experts: Optional[int] = None  # size of the hot set the turnover is measured on (default: ep x R)
    k_max: int = 16  # planner iterations
    review_every: int = 6  # every this many steps a review decides on the window's mean load (0: never)
    review_gain: float = 0.005  # a review's hysteresis (at most min_gain): the mean of many steps may move for less

    def __post_init__(self):
        if self.copy_budget < 0:
            raise ValueError(f"copy_budget={self.copy_budget} must be >= 0")
        if not self.copy_cost_us >= 0:
            raise ValueError(f"copy_cost_us={self.copy_cost_us} must be >= 0")
        if not 0 <= self.min_gain < 1:
            raise ValueError(f"min_gain={self.min_gain}; valid: 0 <= min_gain < 1")
        if self.review_every < 0:
            raise ValueError(f"review_every={self.review_every}; valid: >= 0 steps (0: no review)")
        if not 0 <= self.review_gain < 1:
            raise ValueError(f"review_gain={self.review_gain}; valid: 0 <= review_gain < 1")
        if not self.min_gain <= self.burst_gain:
            raise ValueError(f"burst_gain={self.burst_gain}; valid: >= min_gain ({self.min_gain})")
        if not self.horizon_max >= 1:
            raise ValueError(f"horizon_max={self.horizon_max}; valid: >= 1 step")
        for name in ("turnover_smoothing", "forecast_smoothing"):
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(f"{name}={getattr(self, name)}; valid: 0 < x <= 1")


def _rounded(load: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.rint(load).astype(np.int64))


def slowest_time(counts: torch.Tensor, placement: torch.Tensor, layout: ExpertLayout, cost: ExpertCost) -> float:
    """The slowest rank's expert time (us) of ``counts [ep, E]`` split over ``placement``'s copies
    the way the dispatcher splits (``split.placement_split``, time objective), without the split's
    branch and bound: a planner prices several placements per step, and the search only proves
    the last fraction of a percent."""
    return float(placement_split_times(counts, placement, layout, cost, search=False).max())


def time_lower_bound(counts: torch.Tensor, cost: ExpertCost, ep: int) -> float:
    """A slowest expert time (us) that no placement and no split of ``counts [ep, E]`` beats: every
    token is computed once and every expert with tokens is active on at least one rank, so the
    ranks' times sum to at least that, and the slowest is at least the mean."""
    plain = counts.device.type == "cpu" and counts.dtype in (torch.long, torch.int32) and counts.layout == torch.strided
    total = counts.numpy().sum(0) if plain else counts.sum(0)  # NumPy: no tensor op for a few dozen numbers
    return (cost.per_token_us * float(total.sum()) + cost.per_active_expert_us * float((total > 0).sum())) / ep


class ResidentPlanner:
    """Resident replica placement of one MoE layer (module docstring)."""

    _early_exit = True  # the stationary-step shortcut of plan (tests compare against it off)

    def __init__(self, layout: ExpertLayout, cost: ExpertCost, settings: ResidentSettings = ResidentSettings()):
        self.layout, self.cost, self.settings = layout, cost, settings
        self.placement = empty_placement(layout)
        self.warm = False
        self._load: Optional[np.ndarray] = None  # exponentially smoothed forecast [ep, E]
        self.turnover: Optional[float] = None
        self._hot_prev: Optional[set] = None
        self.copies_total = 0
        self._window: Optional[np.ndarray] = None  # sum of the forecasts since the last review or change
        self._window_steps = 0
        self._window_first: Optional[Tuple[np.ndarray, int]] = None  # the window's first half: (sum, steps)

    @property
    def horizon(self) -> float:
        """Expected residency of a replica (steps)."""
        s = self.settings
        if self.turnover is None or self.turnover <= 0:
            return s.horizon_max
        return min(s.horizon_max, 1.0 / self.turnover)

    def observe(self, counts: torch.Tensor) -> None:
        """Update the turnover estimate from a step's true counts ``[ep, E]``."""
        n = self.settings.hot_experts or self.layout.ep_size * max(1, self.layout.replica_slots)
        load = counts.sum(0).double()
        order = torch.sort(-load, stable=True).indices[:n].tolist()
        pos = load.tolist()
        hot = {e for e in order if pos[e] > 0}
        if self._hot_prev is not None and hot:
            f = 1.0 - len(hot & self._hot_prev) / len(hot)
            a = self.settings.turnover_smoothing
            self.turnover = f if self.turnover is None else (1 - a) * self.turnover + a * f
        self._hot_prev = hot

    def plan(self, forecast: torch.Tensor) -> Tuple[torch.Tensor, int]:
        """The placement ``[ep, R]`` for this step from the ``forecast [ep, E]``, and the number of
        new copies it needs (0: unchanged)."""
        lay, s = self.layout, self.settings
        if lay.replica_slots == 0:
            return self.placement.clone(), 0
        # decisions on a smoothed forecast: a replica stays for many steps, one step's noise
        # should not move it (the dispatch split uses the true counts anyway). NumPy: a few small
        # element-wise ops, a third of the time of tensor ops at this size; a copy, so a caller
        # that reuses its buffer cannot change the state kept here
        f = forecast.detach().to("cpu", torch.float64, copy=True).numpy()
        self._load = f if self._load is None else (1 - s.forecast_smoothing) * self._load + s.forecast_smoothing * f
        if not self.warm:
            self.warm = True
            ideal, _ = plan_probe_host(_rounded(self._load), lay, self.cost, k_max=s.k_max)
            return self._adopt(ideal)
        if s.copy_budget == 0:
            return self.placement.clone(), 0  # no change can be made: the plan would not be used
        review = None
        if s.review_every:
            # the window's mean load: a gain below min_gain is noise in a step's forecast, but one
            # that holds over review_every steps is structure (the steps' noise averages out)
            self._window = f if self._window is None else self._window + f
            self._window_steps += 1
            if self._window_steps == (s.review_every + 1) // 2:
                self._window_first = (self._window.copy(), self._window_steps)
            if self._window_steps >= s.review_every:
                first, n_first = self._window_first
                halves = [_rounded(first / n_first)]
                if self._window_steps > n_first:
                    halves.append(_rounded((self._window - first) / (self._window_steps - n_first)))
                review = (_rounded(self._window / self._window_steps), halves)
                self._window, self._window_steps = None, 0
        # the step's own decision first (a shift on a review step is followed at once), then the
        # review's when the step changed nothing
        placement, copies = self._decide(_rounded(self._load), s.min_gain, self._adopt)
        if copies or review is None:
            return placement, copies
        mean, halves = review
        return self._decide(mean, min(s.review_gain, s.min_gain),
                            lambda new: self._adopt_if_faster_on(halves, new))

    def _decide(self, forecast: torch.Tensor, gain: float, adopt) -> Tuple[torch.Tensor, int]:
        """One decision after the warm start (module docstring, 3.) on ``forecast`` with the
        hysteresis ``gain``; ``adopt`` takes a placement found to pay."""
        lay, s = self.layout, self.settings
        # stationary steps end here: every new placement's slowest time is at least the lower
        # bound, so when the current one is within the gain of it no change (nor a burst, as
        # burst_gain >= min_gain >= gain) can save enough: the same decision as running the
        # planner. Tested first on an upper bound of the current time (the split before its local
        # search), then on the time itself; the margin covers float rounding. (No token at all:
        # the plan is empty, so is every candidate list.)
        bound = time_lower_bound(forecast, self.cost, lay.ep_size)
        upper, finish = placement_time_split_bounded(forecast, self.placement, lay, self.cost, search=False)
        if self._early_exit and (upper <= 0 or upper - bound < (gain - 1e-9) * upper):
            return self.placement.clone(), 0
        t_now = float(finish().max())
        if self._early_exit and (t_now <= 0 or t_now - bound < (gain - 1e-9) * t_now):
            return self.placement.clone(), 0
        ideal, _ = plan_probe_host(forecast, lay, self.cost, k_max=s.k_max)
        candidates = self._candidates(ideal)
        if not candidates:
            return self.placement.clone(), 0
        # more candidates than the budget: the whole new plan, priced (it cannot save the gain
        # when the lower bound is within the gain of the current time: then it is not priced).
        # A shift (it saves burst_gain) is adopted at once; a smaller lasting change of the load
        # (it saves the gain) is followed a budget's worth per step, each step no slower
        if len(candidates) > s.copy_budget and not (
                self._early_exit and t_now - bound < (gain - 1e-9) * t_now):
            saving = t_now - self._slowest(forecast, ideal)
            pays = saving * self.horizon >= len(candidates) * s.copy_cost_us
            if saving >= s.burst_gain * t_now and pays:
                return adopt(ideal)
            if saving >= gain * t_now and pays:
                new = self._apply(candidates[: s.copy_budget], forecast)
                if self._slowest(forecast, new) < t_now:
                    return adopt(new)
        for take in (candidates[: s.copy_budget], candidates[:1]):
            new = self._apply(take, forecast)
            saving = t_now - self._slowest(forecast, new)
            copies = len(take)
            if saving >= gain * t_now and saving > 0 and saving * self.horizon >= copies * s.copy_cost_us:
                return adopt(new)
            if len(take) == 1:
                break
        return self.placement.clone(), 0

    # ------------------------------------------------------------------ helpers
    def _pairs(self, placement: torch.Tensor) -> set:
        """The ``(rank, expert)`` replicas of ``placement``."""
        return {(r, e) for r, row in enumerate(placement.tolist()) for e in row if e != EMPTY_SLOT}

    def _slowest(self, forecast: torch.Tensor, placement: torch.Tensor) -> float:
        return slowest_time(forecast, placement, self.layout, self.cost)

    def _adopt_if_faster_on(self, loads, placement: torch.Tensor) -> Tuple[torch.Tensor, int]:
        """A review's change, adopted only when it is faster than the current placement on the
        mean load of each half of the window too: a gain that the noise of a few steps made up
        rarely shows in both halves (measured: no change slower on the true load in 400 runs of
        a constant load with noisy forecasts, against 5 without this check)."""
        if all(self._slowest(load, placement) < self._slowest(load, self.placement) for load in loads):
            return self._adopt(placement)
        return self.placement.clone(), 0

    def _adopt(self, placement: torch.Tensor) -> Tuple[torch.Tensor, int]:
        copies = len(self._pairs(placement) - self._pairs(self.placement))  # natives never move
        self.placement = placement.clone()
        self.copies_total += copies
        if copies:  # the load moved: the next review averages only what came after
            self._window, self._window_steps = None, 0
        return self.placement.clone(), copies

    def _candidates(self, ideal: torch.Tensor):
        """``[(rank, expert)]`` replicas of the from-scratch plan not held yet, in the planner's
        order (slot by slot, rank by rank). (The plan never puts a rank's own expert in a replica
        slot, so "held" means in the current placement.)"""
        held = self._pairs(self.placement)
        rows = ideal.tolist()
        return [(r, row[k]) for k in range(ideal.shape[1]) for r, row in enumerate(rows)
                if row[k] != EMPTY_SLOT and (r, row[k]) not in held]

    def _apply(self, take, forecast: torch.Tensor) -> torch.Tensor:
        """The current placement with each ``(rank, expert)`` of ``take`` in a free slot of its rank,
        or in place of the held replica the forecast sends the fewest tokens to (one not just
        added)."""
        rows = self.placement.tolist()  # host lists: a few small edits, no tensor ops per edit
        demand = forecast.numpy().sum(0).tolist()
        fresh = set()
        for r, e in take:
            row = rows[r]
            if EMPTY_SLOT in row:
                slot = row.index(EMPTY_SLOT)
            else:
                choices = [(demand[row[k]], k) for k in range(len(row)) if (r, k) not in fresh]
                if not choices:
                    continue
                slot = min(choices)[1]
            row[slot] = e
            fresh.add((r, slot))
        return torch.tensor(rows, dtype=self.placement.dtype)
