"""Exact yardsticks (SciPy's HiGHS).

* :func:`exact_split`: for a fixed layout (any ``holds [ep, E]``, natives may have moved) and
  the true counts, the token split that minimises the slowest rank: tokens (linear programs,
  fast at E = 128, EP = 8) or time with the per-active-expert term (a mixed-integer program,
  its bound when it does not solve in time).
* :func:`optimal_plan`: the best placement plus split under the planner's slot and transfer
  budgets (a mixed-integer program; small cases only). Same affine cost model as the planner;
  the per-active-expert term counts every placed copy as active."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np
import torch

from megatron_probe.policy.cost_model import ExpertCost
from megatron_probe.policy.placement import EMPTY_SLOT, ExpertLayout, holder_slots
from megatron_probe.policy.split import locality_first, split_inputs


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


@dataclass(frozen=True)
class ExactSplit:
    """Result of :func:`exact_split`.

    ``assign``: the optimal integer split ``[ep_src, E, ep_dst]`` (None when only a bound is
    known); ``value``: its slowest rank (tokens for ``objective="tokens"``, microseconds for
    ``"time"``), or the lower bound; ``method``: ``lp`` (tokens: exact by linear programming),
    ``milp`` (time: proven optimal) or ``lp_bound`` (time: the solver's lower bound, no proven
    optimum inside the time limit)."""

    assign: Optional[torch.Tensor]
    value: float
    method: str


def exact_split(counts: torch.Tensor, holds: torch.Tensor, objective: str = "tokens",
                cost: Optional[ExpertCost] = None, time_limit: float = 10.0) -> ExactSplit:
    """The split of the true ``counts [ep, E]`` over the copies that exist (``holds [ep, E]``
    bool, natives included) that minimises the slowest rank.

    ``objective="tokens"``: the most (token, expert) pairs on one rank (token IR). Two linear
    programs (SciPy HiGHS, dual simplex): the smallest capacity ``Z`` (rounded up: loads are
    integers), then, at that capacity, the split that keeps the most tokens on their own rank.
    Both constraint matrices are bipartite incidence matrices (totally unimodular), so the simplex
    vertex is an integer split; it is checked. ``objective="time"``: ``cost``'s affine time with
    the per-active-expert term (a copy is active when it gets a token) as a mixed-integer program;
    if HiGHS proves no optimum within ``time_limit`` seconds the result is its lower bound,
    labelled ``lp_bound``."""
    cnt, hold, total = split_inputs(counts, holds, objective, cost)
    ep, E = hold.shape
    pairs = [(e, r) for e in range(E) if total[e] > 0 for r in range(ep) if hold[r, e]]
    if not pairs:
        return ExactSplit(torch.zeros(ep, E, ep, dtype=torch.long), 0.0, "lp" if objective == "tokens" else "milp")
    if objective == "tokens":
        y = _min_max_tokens(cnt, total, pairs, ep, E)
        return ExactSplit(torch.from_numpy(y), float(y.sum(axis=(0, 1)).max()), "lp")
    return _min_max_time(cnt, total, pairs, ep, E, cost, time_limit)


def _min_max_tokens(cnt, total, pairs, ep, E):
    from scipy.optimize import linprog
    from scipy.sparse import coo_matrix

    n = len(pairs)
    pe = np.array([p[0] for p in pairs])
    pr = np.array([p[1] for p in pairs])
    # phase 1: y[e, r] per pair and z; sum_r y = total[e]; sum_e y[., r] - z <= 0
    eq = coo_matrix((np.ones(n), (pe, np.arange(n))), shape=(E, n + 1)).tocsr()
    ub = coo_matrix((np.r_[np.ones(n), -np.ones(ep)], (np.r_[pr, np.arange(ep)], np.r_[np.arange(n), np.full(ep, n)])),
                    shape=(ep, n + 1)).tocsr()
    c = np.zeros(n + 1)
    c[-1] = 1.0
    res = linprog(c, A_ub=ub, b_ub=np.zeros(ep), A_eq=eq, b_eq=total.astype(float), bounds=(0, None), method="highs-ds")
    if res.status != 0:
        raise RuntimeError(f"exact split (capacity LP) failed: {res.message}")
    cap = int(np.ceil(res.x[-1] - 1e-6))
    # phase 2: x[s, e, r] for sources with tokens; capacity cap per rank; fewest tokens leave their rank
    var = [(s, e, r) for (e, r) in pairs for s in range(ep) if cnt[s, e] > 0]
    m = len(var)
    vs = np.array([v[0] for v in var])
    ve = np.array([v[1] for v in var])
    vr = np.array([v[2] for v in var])
    eq2 = coo_matrix((np.ones(m), (vs * E + ve, np.arange(m))), shape=(ep * E, m)).tocsr()
    ub2 = coo_matrix((np.ones(m), (vr, np.arange(m))), shape=(ep, m)).tocsr()
    res2 = linprog((vs != vr).astype(float), A_ub=ub2, b_ub=np.full(ep, float(cap)), A_eq=eq2,
                   b_eq=cnt.reshape(-1).astype(float), bounds=(0, None), method="highs-ds")
    if res2.status != 0:
        raise RuntimeError(f"exact split (locality LP at capacity {cap}) failed: {res2.message}")
    x = np.rint(res2.x).astype(np.int64)
    if np.abs(res2.x - x).max() > 1e-6:
        raise RuntimeError("exact split: the simplex vertex is not integral (unexpected for this matrix)")
    out = np.zeros((ep, E, ep), dtype=np.int64)
    np.add.at(out, (vs, ve, vr), x)
    return out


def _min_max_time(cnt, total, pairs, ep, E, cost, time_limit):
    Bounds, LinearConstraint, milp = _scipy()
    from scipy.sparse import coo_matrix

    n = len(pairs)
    pe = np.array([p[0] for p in pairs])
    pr = np.array([p[1] for p in pairs])
    # variables: y[n] integer tokens, a[n] binary active, z
    N = 2 * n + 1
    rows, cols, vals = [], [], []
    lo, hi = [], []
    # conservation rows (E): sum_r y = total[e]
    rows += list(pe)
    cols += list(range(n))
    vals += [1.0] * n
    lo += list(total.astype(float))
    hi += list(total.astype(float))
    r0 = E
    # time rows (ep): c * y + o * a - z <= 0
    rows += list(r0 + pr) + list(r0 + pr) + list(r0 + np.arange(ep))
    cols += list(range(n)) + list(range(n, 2 * n)) + [2 * n] * ep
    vals += [cost.per_token_us] * n + [cost.per_active_expert_us] * n + [-1.0] * ep
    lo += [-np.inf] * ep
    hi += [0.0] * ep
    r0 += ep
    # activity rows (n): y - total[e] * a <= 0
    rows += list(r0 + np.arange(n)) + list(r0 + np.arange(n))
    cols += list(range(n)) + list(range(n, 2 * n))
    vals += [1.0] * n + list(-total[pe].astype(float))
    lo += [-np.inf] * n
    hi += [0.0] * n
    r0 += n
    A = coo_matrix((vals, (rows, cols)), shape=(r0, N)).tocsr()
    obj = np.zeros(N)
    obj[-1] = 1.0
    integrality = np.r_[np.ones(2 * n), 0]
    ub = np.r_[total[pe].astype(float), np.ones(n), np.inf]
    res = milp(obj, constraints=LinearConstraint(A, lo, hi), integrality=integrality, bounds=Bounds(np.zeros(N), ub),
               options={"time_limit": time_limit, "disp": False})
    if res.status == 0 and res.x is not None:
        y = np.zeros((E, ep), dtype=np.int64)
        y[pe, pr] = np.rint(res.x[:n]).astype(np.int64)
        assign = torch.from_numpy(locality_first(cnt, y))
        return ExactSplit(assign, float(res.x[-1]), "milp")
    bound = getattr(res, "mip_dual_bound", None)
    if bound is None or not np.isfinite(bound):
        raise RuntimeError(f"exact split (time MILP) found neither an optimum nor a bound: {res.message}")
    return ExactSplit(None, float(bound), "lp_bound")
