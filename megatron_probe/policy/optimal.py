"""Exact yardsticks for small cases (SciPy's HiGHS): the best token split for a given
placement (a linear program) and the best placement plus split under the same slot and
transfer budgets (a mixed-integer program). Same affine cost model as the planner; the
per-active-expert term counts every placed copy as active."""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
import torch

from megatron_probe.policy.cost_model import ExpertCost
from megatron_probe.policy.placement import EMPTY_SLOT, ExpertLayout, holder_slots


def _scipy():
    try:
        from scipy.optimize import Bounds, LinearConstraint, milp
    except ImportError as e:  # pragma: no cover
        raise ImportError("the exact optimum needs SciPy (pip install 'megatron-probe[dev]')") from e
    return Bounds, LinearConstraint, milp


def optimal_plan(counts: torch.Tensor, layout: ExpertLayout, cost: ExpertCost, budget_in: Optional[int] = None,
                 budget_out: Optional[int] = None, placement: Optional[torch.Tensor] = None,
                 time_limit: float = 30.0) -> Tuple[float, torch.Tensor]:
    """Minimum over placements (or for the given ``placement``) and fractional splits of the
    slowest rank's time. Returns ``(time_us, placement)``."""
    Bounds, LinearConstraint, milp = _scipy()
    ep, E, L, R = layout.ep_size, layout.num_experts, layout.num_local_experts, layout.replica_slots
    cnt = counts.double().cpu().numpy()
    c, o = cost.per_token_us, cost.per_active_expert_us
    nx = ep * E * ep  # x[s, e, r] tokens
    ny = ep * E  # y[r, e] replica of e on r
    n = nx + ny + 1  # + z

    def xi(s, e, r):
        return (s * E + e) * ep + r

    def yi(r, e):
        return nx + r * E + e

    rows, lo, hi = [], [], []

    def add(coefs, lb, ub):
        row = np.zeros(n)
        for i, v in coefs:
            row[i] += v
        rows.append(row)
        lo.append(lb)
        hi.append(ub)

    for s in range(ep):  # every token served once
        for e in range(E):
            add([(xi(s, e, r), 1.0) for r in range(ep)], cnt[s, e], cnt[s, e])
    for r in range(ep):  # x only where a copy is; y only for foreign experts
        for e in range(E):
            if e // L == r:
                continue
            for s in range(ep):
                add([(xi(s, e, r), 1.0), (yi(r, e), -cnt[s, e])], -np.inf, 0.0)
    cap = R if budget_in is None else min(R, budget_in)
    for r in range(ep):
        add([(yi(r, e), 1.0) for e in range(E) if e // L != r], 0, cap)
    if budget_out is not None:
        for h in range(ep):
            add([(yi(r, e), 1.0) for r in range(ep) for e in range(h * L, (h + 1) * L) if r != h], 0, budget_out)
    native_active = [(cnt[:, r * L:(r + 1) * L].sum(0) > 0).sum() for r in range(ep)]
    for r in range(ep):  # z >= time of r
        coefs = [(xi(s, e, r), c) for s in range(ep) for e in range(E)]
        coefs += [(yi(r, e), o) for e in range(E) if e // L != r]
        coefs.append((n - 1, -1.0))
        add(coefs, -np.inf, -o * native_active[r])
    lb, ub = np.zeros(n), np.full(n, np.inf)
    integrality = np.zeros(n)
    integrality[nx:nx + ny] = 1
    ub[nx:nx + ny] = 1
    for r in range(ep):
        for e in range(r * L, (r + 1) * L):
            ub[yi(r, e)] = 0
    if placement is not None:
        held = holder_slots(placement.cpu().long(), layout) >= 0
        for r in range(ep):
            for e in range(E):
                if e // L != r:
                    lb[yi(r, e)] = ub[yi(r, e)] = float(held[r, e])
    obj = np.zeros(n)
    obj[-1] = 1.0
    res = milp(obj, constraints=LinearConstraint(np.array(rows), lo, hi), integrality=integrality,
               bounds=Bounds(lb, ub), options={"time_limit": time_limit, "disp": False})
    if res.x is None:
        raise RuntimeError(f"the MILP found no solution: {res.message}")
    y = res.x[nx:nx + ny].reshape(ep, E) > 0.5
    pl = torch.full((ep, R), EMPTY_SLOT, dtype=torch.long)
    for r in range(ep):
        es = [e for e in range(E) if y[r, e]]
        pl[r, :len(es)] = torch.tensor(es, dtype=torch.long)
    return float(res.x[-1]), pl
