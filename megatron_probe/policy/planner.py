"""PROBE's hardware-aware balance planner (paper Algorithm 1) and re-assignment on true counts.

Both take per-source-rank expert counts ``[ep, E]`` and return the foundation's structures:
a placement ``[ep, R]`` and an assignment ``[ep_src, E, ep_dst]``.

:func:`plan_probe` is written with tensor operations only: a fixed number of iterations
(``k_max``), each a masked update, no ``.item()`` and no data-dependent Python branch, so on a
GPU it runs on a side stream without host synchronisation and can be captured in a CUDA graph.
It is deterministic (ties break towards the lower index), so every rank computes the same plan
from the same all-gathered counts.

One iteration:
1. rank times from the cost model (``per_token * tokens + per_active_expert * active slots``);
   ``src`` = slowest rank, ``dst`` = fastest rank not yet marked invalid for ``src``;
2. ``e*`` = the heaviest native expert of ``src`` with tokens from other ranks on ``src``, that
   ``dst`` already holds a copy of, or that may be copied: ``dst`` has a free slot and incoming
   budget, ``src`` has outgoing budget (the dual transfer-budget check);
3. water-filling, locality first: move ``x = min(movable, (t_src - t_dst - o_new) / 2c,
   (t_src - mean) / c)`` tokens of ``e*`` from ``src`` to ``dst``, taking first the tokens that
   originate on ``dst`` (they then never leave their rank), then the other ranks' in rank order;
4. no admissible move for the pair (no expert, or no gain): the pair is marked invalid and the
   next iteration tries the next fastest rank; when no destination is left, the loop idles.
:func:`assign_on_truth` re-splits tokens on the true counts at dispatch time: the same loop
with the placement fixed (tokens move only to copies that exist; locality first as above).
The plan never raises the slowest rank's time (every move lowers ``t_src`` and leaves
``t_dst`` below the old ``t_src``), and with a zero transfer budget and no existing replica it
returns the static placement.
:func:`plan_probe_host` is the host twin (a compiled loop on integers, the same plans); given a copy
charge it prices copies inside the same single pass (:func:`plan_with_copy_charge`; the former
retry over budgets stays as :func:`plan_with_copy_charge_retry`).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from megatron_probe.policy.cost_model import ExpertCost
from megatron_probe.policy.placement import EMPTY_SLOT, ExpertLayout, holder_slots, validate_placement
from megatron_probe.policy.planner_kernels import probe_greedy


def _check_counts(counts: torch.Tensor, layout: ExpertLayout) -> None:
    if counts.shape != (layout.ep_size, layout.num_experts):
        raise ValueError(f"counts has shape {tuple(counts.shape)}, expected ({layout.ep_size}, {layout.num_experts}) "
                         "([ep, experts])")
    if counts.dtype.is_floating_point or counts.dtype == torch.bool:
        raise TypeError(f"counts must be integer token counts, got {counts.dtype}")
    if bool((counts < 0).any()):
        s, e = (counts < 0).nonzero()[0].tolist()
        raise ValueError(f"counts[{s}, {e}] = {int(counts[s, e])} is negative")


def static_assignment(counts: torch.Tensor, layout: ExpertLayout) -> torch.Tensor:
    ep, E, L = layout.ep_size, layout.num_experts, layout.num_local_experts
    a = torch.zeros(ep, E, ep, dtype=torch.long, device=counts.device)
    e = torch.arange(E, device=counts.device)
    a[:, e, e // L] = counts.long()
    return a


def rank_times(assign: torch.Tensor, cost: ExpertCost) -> torch.Tensor:
    """``[ep_dst]`` compute time (us) of an assignment under the affine cost model."""
    on = assign.sum(0).to(torch.float64)  # [E, ep_dst]
    return cost.per_token_us * on.sum(0) + cost.per_active_expert_us * (on > 0).sum(0).to(torch.float64)


def plan_probe(counts: torch.Tensor, layout: ExpertLayout, cost: ExpertCost, budget_in: Optional[int] = None,
               budget_out: Optional[int] = None, k_max: int = 16,
               placement: Optional[torch.Tensor] = None, validate: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
    """Greedy replica placement and token split for one layer (see the module docstring).

    Args:
        counts: ``[ep, E]`` (predicted) tokens each rank routes to each expert.
        budget_in: new replicas a rank may receive (default: its replica slots ``R``).
        budget_out: copies a home rank may send (default: unlimited).
        placement: keep this placement and only re-split tokens over the copies it has (the
            re-assignment on true counts); no new copy is made.
        validate: check ``counts`` for negative entries (a host synchronisation on GPU; pass
            False inside a CUDA graph once the producer is trusted).
    Returns:
        ``(placement [ep, R], assignment [ep, E, ep])`` on ``counts.device``.
    """
    if validate:
        _check_counts(counts, layout)
    ep, E, L, R = layout.ep_size, layout.num_experts, layout.num_local_experts, layout.replica_slots
    for name, b in (("budget_in", budget_in), ("budget_out", budget_out)):
        if b is not None and b < 0:
            raise ValueError(f"{name}={b} is negative")
    if k_max < 0:
        raise ValueError(f"k_max={k_max} is negative")
    dev = counts.device
    cap_in = min(R, R if budget_in is None else budget_in)
    cap_out = E * ep if budget_out is None else budget_out
    # integer arithmetic in "token units" (an active expert costs o_u tokens): the same plan on
    # every rank and every device, with no floating-point rounding at decision boundaries
    o_u = int(round(cost.per_active_expert_us / cost.per_token_us)) if cost.per_token_us > 0 else 0
    A = static_assignment(counts, layout)
    slots = torch.full((ep, R), EMPTY_SLOT, dtype=torch.long, device=dev)
    held = torch.zeros(ep, E, dtype=torch.bool, device=dev)  # replica copies only
    n_in = torch.zeros(ep, dtype=torch.long, device=dev)
    if placement is not None:
        slots = placement.to(dev).long().clone()
        rows = torch.arange(ep, device=dev).unsqueeze(1).expand_as(slots)
        held[rows[slots >= 0], slots[slots >= 0]] = True
        cap_in = 0
    n_out = torch.zeros(ep, dtype=torch.long, device=dev)
    invalid = torch.eye(ep, dtype=torch.bool, device=dev)
    ranks = torch.arange(ep, device=dev)
    experts = torch.arange(E, device=dev)
    home = experts // L
    big = torch.iinfo(torch.long).max
    # every index below is a 1-element tensor: indexing with a 0-dim tensor would call .item()
    for _ in range(k_max if R > 0 else 0):
        on_all = A.sum(0)
        t = on_all.sum(0) + o_u * (on_all > 0).sum(0)  # [ep] int64 rank time in token units
        src = torch.argmax(t).view(1)
        dst_ok = ~invalid.index_select(0, src)[0]
        dst = torch.argmin(torch.where(dst_ok, t, torch.full_like(t, big))).view(1)
        any_dst = dst_ok.any()
        on_src = A.index_select(2, src)[:, :, 0]  # [ep_src, E] tokens computed on src
        movable = on_src.sum(0) - on_src.index_select(0, src)[0]  # tokens from other ranks
        native = home == src
        dst_has = held.index_select(0, dst)[0]
        can_copy = (n_in.index_select(0, dst) < cap_in) & (n_out.index_select(0, src) < cap_out)
        eligible = native & (movable > 0) & (dst_has | can_copy)
        score = torch.where(eligible, movable, torch.full_like(movable, -1))
        e_star = torch.argmax(score).view(1)
        has_e = score.index_select(0, e_star) > 0
        new_copy = ~dst_has.index_select(0, e_star)
        o_new = torch.where(new_copy | (A[:, e_star, dst].sum() == 0), o_u, 0)
        t_src, t_dst = t.index_select(0, src), t.index_select(0, dst)
        x_gain = torch.div(t_src - t_dst - o_new, 2, rounding_mode="floor")
        x_mean = torch.div(t_src * ep - t.sum(), ep, rounding_mode="floor")
        x = torch.minimum(torch.minimum(x_gain, x_mean), movable.index_select(0, e_star)).clamp_min(0)
        ok = any_dst & has_e & (x > 0)
        # locality first: dst's own tokens, then the other ranks' in rank order (never src's)
        order = torch.argsort(torch.where(ranks == dst, -1, ranks))  # fixed shape: no host sync
        avail = A[order, e_star, src] * (order != src)
        before = torch.cumsum(avail, 0) - avail
        take_o = torch.minimum(avail, (x - before).clamp_min(0)) * ok
        take = torch.zeros(ep, dtype=torch.long, device=dev).index_put((order,), take_o)
        A.index_put_((ranks, e_star.expand(ep), src.expand(ep)), -take, accumulate=True)
        A.index_put_((ranks, e_star.expand(ep), dst.expand(ep)), take, accumulate=True)
        add_slot = ok & new_copy
        free = slots.index_select(0, dst)[0] == EMPTY_SLOT
        slot_idx = torch.argmax(free.long()).view(1)
        slots.index_put_((dst, slot_idx), torch.where(add_slot, e_star, slots[dst, slot_idx]))
        held.index_put_((dst, e_star), held[dst, e_star] | add_slot)
        n_in.index_put_((dst,), add_slot.long(), accumulate=True)
        n_out.index_put_((src,), add_slot.long(), accumulate=True)
        # a pair that cannot help is not tried again
        invalid.index_put_((src, dst), invalid[src, dst] | (any_dst & ~ok))
    return slots, A


def assign_on_truth(counts: torch.Tensor, placement: torch.Tensor, layout: ExpertLayout, cost: ExpertCost,
                    k_max: int = 32) -> torch.Tensor:
    """Re-assignment at dispatch time: the planner's water-filling on the true counts with the
    placement fixed (tokens move only to copies that exist). Returns the assignment."""
    validate_placement(placement, layout)
    return plan_probe_host(counts, layout, cost, k_max=k_max, placement=placement)[1]


def _host_counts(counts: torch.Tensor, layout: ExpertLayout):
    """``counts`` as an int64 NumPy array, with :func:`_check_counts`'s checks (and messages) but
    its negativity test in one NumPy call instead of several tensor ops."""
    import numpy as np

    if counts.shape != (layout.ep_size, layout.num_experts) or counts.dtype.is_floating_point \
            or counts.dtype == torch.bool:
        _check_counts(counts, layout)
    cnt = np.asarray(counts.detach().cpu().numpy(), dtype=np.int64)
    if cnt.size and cnt.min() < 0:
        _check_counts(counts, layout)
    return cnt


def planner_scalars(layout: ExpertLayout, cost: ExpertCost, budget_in: Optional[int], budget_out: Optional[int],
                    k_max: int, copy_charge_us: float) -> Tuple[int, int, int, int]:
    """The greedy's integer parameters, checked: ``(cap_in, cap_out, o_u, ch)``: new copies a
    rank may receive / send, the per-active-expert cost and the copy charge in token units."""
    for name, b in (("budget_in", budget_in), ("budget_out", budget_out)):
        if b is not None and b < 0:
            raise ValueError(f"{name}={b} is negative")
    if k_max < 0:
        raise ValueError(f"k_max={k_max} is negative")
    if not copy_charge_us >= 0:
        raise ValueError(f"copy_charge_us={copy_charge_us} is negative")
    R = layout.replica_slots
    cap_in = min(R, R if budget_in is None else budget_in)
    cap_out = layout.num_experts * layout.ep_size if budget_out is None else budget_out
    c = cost.per_token_us
    o_u = int(round(cost.per_active_expert_us / c)) if c > 0 else 0
    ch = int(round(copy_charge_us / c)) if c > 0 else 0
    return cap_in, cap_out, o_u, ch


def plan_probe_host(counts: torch.Tensor, layout: ExpertLayout, cost: ExpertCost, budget_in: Optional[int] = None,
                    budget_out: Optional[int] = None, k_max: int = 16,
                    placement: Optional[torch.Tensor] = None,
                    copy_charge_us: float = 0.0, early_exit: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
    """The same algorithm as :func:`plan_probe`, for the host; with ``copy_charge_us = 0`` it
    produces exactly the same plan (tested). Tensor-op dispatch dominates the tensor version on a
    CPU, so the loop here is compiled (``planner_kernels.probe_greedy``, numba) on exact integers
    with incremental rank times and an early exit.

    State, all exact integers in token units: ``t[r]`` rank times; ``at_home[e]`` tokens of expert
    ``e`` on its home rank, ``rem[e]`` those from other ranks (``movable`` of the tensor version),
    the assignment itself (what each source still sends home, and to each copy); ``away[e, r]``
    tokens of ``e`` on replica holder ``r``. Only a home rank's native experts move, and only to
    replica holders, so this is the whole assignment.

    ``copy_charge_us`` (> 0) prices copies inside the same single pass (the one-pass
    :func:`plan_with_copy_charge`): with ``ch = round(copy_charge_us / per_token_us)`` token
    units, a rank's time is ``T[r] = t[r] + ch * (copies it sends + copies it receives)`` and the
    greedy runs on ``T`` (slowest ``src``, fastest valid ``dst``, ``x`` as above). A move that
    makes a new copy raises both ``T[src]`` and ``T[dst]`` by ``ch``; it is accepted only if the
    slowest rank's charged time goes down (``x > ch``: ``T[src] - x + ch < T[src]``; ``dst`` ends
    below the old ``T[src]`` by the choice of ``x``); otherwise the pair is invalid, as a move
    without gain. Moves onto an existing copy carry no charge. The pass stops when no pair of the
    slowest rank can help (or after ``k_max`` iterations). ``ch = 0`` (a charge under half a
    token's time) is the plain algorithm. Integers only, so the same plan on every rank.

    ``early_exit``: skip the loop when the slowest rank's excess over the mean cannot pay one
    copy (:func:`no_copy_can_pay`; the loop would rule out every pair); ``False`` runs it anyway
    (the shortcut's yardstick in the tests)."""
    import numpy as np

    cnt = _host_counts(counts, layout)
    cap_in, cap_out, o_u, ch = planner_scalars(layout, cost, budget_in, budget_out, k_max, copy_charge_us)
    ep, L, R = layout.ep_size, layout.num_local_experts, layout.replica_slots
    if placement is not None:
        slots = np.array(placement.detach().cpu().long().numpy(), dtype=np.int64).reshape(ep, R)
        cap_in = 0
    else:
        slots = np.full((ep, R), EMPTY_SLOT, dtype=np.int64)
    A = probe_greedy(np.ascontiguousarray(cnt), L, slots, cap_in, cap_out, o_u, ch, k_max,
                     early_exit and placement is None)
    return torch.from_numpy(slots), torch.from_numpy(A)


def load_kernels() -> None:
    """Load the host planner's compiled loop (``planner_kernels``; compiled once per install,
    then read from numba's on-disk cache) with one tiny plan, so the first served layer does not
    pay for it."""
    layout = ExpertLayout(4, 2, 1)
    plan_probe_host(torch.tensor([[5, 0, 1, 1], [4, 2, 0, 3]]), layout, ExpertCost(0.1, 6.4), copy_charge_us=1.0)


def split_as_predicted(true: torch.Tensor, pred: torch.Tensor, pred_assign: torch.Tensor, placement: torch.Tensor,
                       layout: ExpertLayout) -> torch.Tensor:
    """PROBE as published: the split planned on the forecast ``pred`` (``pred_assign``) applied to
    the true counts as proportions. A (source, expert) pair the forecast had no token for stays on
    the expert's home rank; rounding remainders go to the copy with the largest share."""
    holds = (holder_slots(placement, layout) >= 0).T  # [E, ep]
    frac = pred_assign.double() / pred.double().clamp_min(1).unsqueeze(-1)
    A = torch.floor(frac * true.double().unsqueeze(-1)).long()
    no_pred = pred == 0
    home = torch.arange(layout.num_experts) // layout.num_local_experts
    A[no_pred] = 0
    s_idx, e_idx = no_pred.nonzero(as_tuple=True)
    A[s_idx, e_idx, home[e_idx]] = true[s_idx, e_idx]
    rest = true - A.sum(-1)
    best = torch.where(holds.unsqueeze(0).expand_as(frac), frac, torch.full_like(frac, -1)).argmax(-1)
    A.scatter_add_(2, best.unsqueeze(-1), rest.unsqueeze(-1))
    return A


def no_copy_can_pay(counts: torch.Tensor, layout: ExpertLayout, cost: ExpertCost, copy_charge_us: float) -> bool:
    """Whether :func:`plan_probe_host` with ``copy_charge_us`` and no existing replica surely
    returns the static plan, from the static rank times alone: its first move must make a new
    copy, which it accepts only when ``x > ch`` token units, and ``x`` is at most the slowest
    rank's excess over the mean, ``(t_max * ep - sum(t)) // ep``. When that excess is ``<= ch``
    every pair of the slowest rank is ruled out, nothing moves, and the loop ends with no copy
    (the exact test the greedy makes, so the shortcut changes no plan: property-tested).

    Plain Python on one ``tolist``: it runs once per layer between large kernels, with cold
    caches, where every tensor or NumPy call costs tens of microseconds."""
    ep, E, L = layout.ep_size, layout.num_experts, layout.num_local_experts
    if counts.shape != (ep, E) or counts.dtype.is_floating_point or counts.dtype == torch.bool:
        _check_counts(counts, layout)  # raises with the planner's message
    rows = counts.tolist()
    col = [sum(c) for c in zip(*rows)]
    if min(min(r) for r in rows) < 0:
        _check_counts(counts, layout)
    if layout.replica_slots == 0:
        return True
    c = cost.per_token_us
    ch = int(round(copy_charge_us / c)) if c > 0 else 0
    if ch <= 0:
        return False
    o_u = int(round(cost.per_active_expert_us / c))
    # static rank times in token units (tokens plus o_u per expert with tokens), then the slowest
    # rank's excess over the mean: what the greedy's first move can move at most
    t = [sum(b) + o_u * (L - b.count(0)) for b in (col[i:i + L] for i in range(0, E, L))]
    return (max(t) * ep - sum(t)) // ep <= ch


def plan_with_copy_charge(counts: torch.Tensor, layout: ExpertLayout, cost: ExpertCost, budget_in: Optional[int],
                          copy_charge_us: float) -> torch.Tensor:
    """Placement of the PROBE plan when every new copy costs its sender and its receiver
    ``copy_charge_us`` (the part of a transfer that overlap does not hide): one planner pass with
    the charge priced inside the greedy (:func:`plan_probe_host` with ``copy_charge_us``; a copy
    is made only when it lowers the slowest rank's charged time). ``copy_charge_us = 0`` is the
    plain PROBE plan."""
    if copy_charge_us < 0:
        raise ValueError(f"copy_charge_us={copy_charge_us} is negative")
    budget = layout.replica_slots if budget_in is None else budget_in
    if budget < 0:
        raise ValueError(f"budget_in={budget} is negative")
    return plan_probe_host(counts, layout, cost, budget_in=budget, copy_charge_us=copy_charge_us)[0]


def charged_times(assign: torch.Tensor, placement: torch.Tensor, layout: ExpertLayout, cost: ExpertCost,
                  copy_charge_us: float) -> torch.Tensor:
    """``[ep]`` rank times (us) of a plan with every copy charged to its sender and its receiver:
    the score :func:`plan_with_copy_charge_retry` minimises (its slowest rank)."""
    busy = rank_times(assign, cost).double()
    r, s = torch.nonzero(placement >= 0, as_tuple=True)
    ones = torch.full((len(r),), float(copy_charge_us), dtype=torch.float64)
    busy.index_add_(0, r, ones)
    busy.index_add_(0, placement[r, s] // layout.num_local_experts, ones)
    return busy


def plan_with_copy_charge_retry(counts: torch.Tensor, layout: ExpertLayout, cost: ExpertCost,
                                budget_in: Optional[int], copy_charge_us: float) -> torch.Tensor:
    """The former :func:`plan_with_copy_charge`, kept for comparison and benchmarks: among the
    plain plans with copy budgets ``budget_in`` down to 0 (one planner call each), the one whose
    slowest rank (expert time plus copies sent and received) finishes first; ties go to fewer
    copies."""
    if copy_charge_us < 0:
        raise ValueError(f"copy_charge_us={copy_charge_us} is negative")
    budget = layout.replica_slots if budget_in is None else budget_in
    placement, assign = plan_probe_host(counts, layout, cost, budget_in=budget)
    if copy_charge_us == 0 or not bool((placement >= 0).any()):
        return placement
    best, best_t = None, None
    for b in range(budget, -1, -1):
        pl, A = (placement, assign) if b == budget else plan_probe_host(counts, layout, cost, budget_in=b)
        if b < budget and int((pl >= 0).sum()) == int((best >= 0).sum()) and torch.equal(pl, best):
            continue  # the same plan as a larger budget: already scored
        t = float(charged_times(A, pl, layout, cost, copy_charge_us).max())
        if best_t is None or t <= best_t:
            best, best_t = pl, t
    return best
