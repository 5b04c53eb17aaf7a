"""DeepSeek-style EPLB baseline, implemented here from its published description, adapted to
the foundation's layout (native experts stay home; ``R`` replica slots per rank).

Published steps (deepseek-ai/EPLB README and the DeepSeek-V3 report): from the per-expert
load averaged over past steps, (1) *replicate*: give the next redundant copy to the expert with
the highest load per copy; (2) *balanced packing*: place copies heaviest first onto the
least-loaded rank that still has room. Tokens of a replicated expert are split evenly between
its copies. It rebalances every ``period`` steps from a sliding window of the last ``window``
steps, so it reacts to load it has already seen; every changed slot is a weight transfer.
Difference from the original: EPLB may also move native experts between ranks; here the
native placement is fixed, as in the PROBE layer, and only the replica slots are chosen.
"""

from __future__ import annotations

from collections import deque
from typing import Deque

import torch

from megatron_probe.policy.placement import EMPTY_SLOT, ExpertLayout, locality_even_assignment


def eplb_placement(load: torch.Tensor, layout: ExpertLayout) -> torch.Tensor:
    """Replica placement ``[ep, R]`` for per-expert ``load`` ``[E]`` (float)."""
    ep, E, L, R = layout.ep_size, layout.num_experts, layout.num_local_experts, layout.replica_slots
    load = load.double().cpu()
    placement = torch.full((ep, R), EMPTY_SLOT, dtype=torch.long)
    if R == 0 or float(load.sum()) <= 0:
        return placement
    copies = torch.ones(E, dtype=torch.long)
    for _ in range(ep * R):  # (1) replicate: highest load per copy, at most one copy per rank
        per_copy = torch.where(copies < ep, load / copies, torch.full_like(load, -1.0))
        e = int(torch.argmax(per_copy))
        if per_copy[e] <= 0:
            break
        copies[e] += 1
    # (2) balanced packing of the extra copies, heaviest per-copy load first
    rank_load = torch.zeros(ep, dtype=torch.float64)
    e_ids = torch.arange(E)
    rank_load.index_add_(0, e_ids // L, load / copies)
    used = torch.zeros(ep, dtype=torch.long)
    held = torch.zeros(ep, E, dtype=torch.bool)
    held[e_ids // L, e_ids] = True
    extra = [(float(load[e] / copies[e]), e) for e in range(E) for _ in range(int(copies[e]) - 1)]
    extra.sort(key=lambda x: (-x[0], x[1]))
    for w, e in extra:
        ok = (used < R) & ~held[:, e]
        if not ok.any():
            continue
        r = int(torch.argmin(torch.where(ok, rank_load, torch.full_like(rank_load, float("inf")))))
        placement[r, used[r]] = e
        used[r] += 1
        held[r, e] = True
        rank_load[r] += w
    return placement


class EPLBPolicy:
    """Sliding-window statistics, periodic rebalance, even split between copies."""

    def __init__(self, layout: ExpertLayout, window: int = 50, period: int = 50):
        if window <= 0 or period <= 0:
            raise ValueError(f"window={window} and period={period} must be positive")
        self.layout, self.window, self.period = layout, window, period
        self.history: Deque[torch.Tensor] = deque(maxlen=window)
        self.placement = torch.full((layout.ep_size, layout.replica_slots), EMPTY_SLOT, dtype=torch.long)
        self.steps = 0

    def plan(self, counts: torch.Tensor):
        """Placement and assignment for this step's ``counts`` [ep, E]; returns
        ``(placement, assignment, transfers)``. Statistics include only past steps."""
        transfers = 0
        if self.steps > 0 and self.steps % self.period == 0 and self.history:
            new = eplb_placement(torch.stack(list(self.history)).double().mean(0), self.layout)
            transfers = int(((new != self.placement) & (new >= 0)).sum())
            self.placement = new
        assign = locality_even_assignment(counts.long(), self.placement, self.layout)
        self.history.append(counts.sum(0).double())
        self.steps += 1
        return self.placement.clone(), assign, transfers
