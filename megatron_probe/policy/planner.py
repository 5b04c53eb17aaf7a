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
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from megatron_probe.policy.cost_model import ExpertCost
from megatron_probe.policy.placement import EMPTY_SLOT, ExpertLayout, holder_slots, validate_placement


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


def plan_probe_host(counts: torch.Tensor, layout: ExpertLayout, cost: ExpertCost, budget_in: Optional[int] = None,
                    budget_out: Optional[int] = None, k_max: int = 16,
                    placement: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """The same algorithm as :func:`plan_probe`, for the host: NumPy with incremental rank
    times and early exit (tensor-op dispatch dominates the tensor version on a CPU). Produces
    exactly the same plan (tested)."""
    import numpy as np

    _check_counts(counts, layout)
    for name, b in (("budget_in", budget_in), ("budget_out", budget_out)):
        if b is not None and b < 0:
            raise ValueError(f"{name}={b} is negative")
    if k_max < 0:
        raise ValueError(f"k_max={k_max} is negative")
    ep, E, L, R = layout.ep_size, layout.num_experts, layout.num_local_experts, layout.replica_slots
    cap_in = min(R, R if budget_in is None else budget_in)
    cap_out = E * ep if budget_out is None else budget_out
    o_u = int(round(cost.per_active_expert_us / cost.per_token_us)) if cost.per_token_us > 0 else 0
    cnt = counts.detach().cpu().numpy().astype(np.int64)
    A = np.zeros((ep, E, ep), dtype=np.int64)
    e_ids = np.arange(E)
    A[:, e_ids, e_ids // L] = cnt
    on = A.sum(0)  # [E, ep]
    t = on.sum(0) + o_u * (on > 0).sum(0)  # int64 token units
    slots = np.full((ep, R), EMPTY_SLOT, dtype=np.int64)
    held = np.zeros((ep, E), dtype=bool)
    n_in = np.zeros(ep, dtype=np.int64)
    if placement is not None:
        slots = placement.detach().cpu().numpy().astype(np.int64).copy()
        for r, e in zip(*np.nonzero(slots >= 0)):
            held[r, slots[r, e]] = True
        cap_in = 0
    n_out = np.zeros(ep, dtype=np.int64)
    invalid = np.eye(ep, dtype=bool)
    for _ in range(k_max if R > 0 else 0):
        src = int(np.argmax(t))
        dst_ok = ~invalid[src]
        if not dst_ok.any():
            break  # nothing can change any more: the tensor version idles from here on
        dst = int(np.argmin(np.where(dst_ok, t, np.iinfo(np.int64).max)))
        lo, hi = src * L, (src + 1) * L
        movable = on[lo:hi, src] - A[src, lo:hi, src]
        can_copy = n_in[dst] < cap_in and n_out[src] < cap_out
        eligible = (movable > 0) & (held[dst, lo:hi] | can_copy)
        score = np.where(eligible, movable, -1)
        j = int(np.argmax(score))
        e_star = lo + j
        ok = score[j] > 0
        if ok:
            new_copy = not held[dst, e_star]
            o_new = o_u if (new_copy or A[:, e_star, dst].sum() == 0) else 0
            x = int(min((t[src] - t[dst] - o_new) // 2, (t[src] * ep - t.sum()) // ep, movable[j]))
            ok = x > 0
        if not ok:
            invalid[src, dst] = True
            continue
        order = np.concatenate([[dst], [r for r in range(ep) if r != dst]])
        avail = A[order, e_star, src] * (order != src)
        before = np.cumsum(avail) - avail
        take_o = np.minimum(avail, np.maximum(x - before, 0))
        take = np.zeros(ep, dtype=np.int64)
        take[order] = take_o
        moved = int(take.sum())
        A[:, e_star, src] -= take
        A[:, e_star, dst] += take
        on[e_star, src] -= moved
        on[e_star, dst] += moved
        t[src] = on[:, src].sum() + o_u * (on[:, src] > 0).sum()
        t[dst] = on[:, dst].sum() + o_u * (on[:, dst] > 0).sum()
        if new_copy:
            free = np.nonzero(slots[dst] == EMPTY_SLOT)[0][0]
            slots[dst, free] = e_star
            held[dst, e_star] = True
            n_in[dst] += 1
            n_out[src] += 1
    return torch.from_numpy(slots), torch.from_numpy(A)


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


def plan_with_copy_charge(counts: torch.Tensor, layout: ExpertLayout, cost: ExpertCost, budget_in: Optional[int],
                          copy_charge_us: float) -> torch.Tensor:
    """Placement of the PROBE plan when every new copy costs its sender and its receiver
    ``copy_charge_us`` (the part of a transfer that overlap does not hide): among the plans with
    copy budgets ``budget_in`` down to 0, the one whose slowest rank (expert time plus copies
    sent and received) finishes first; ties go to fewer copies. ``copy_charge_us = 0`` is the
    plain PROBE plan."""
    if copy_charge_us < 0:
        raise ValueError(f"copy_charge_us={copy_charge_us} is negative")
    budget = layout.replica_slots if budget_in is None else budget_in
    placement, assign = plan_probe_host(counts, layout, cost, budget_in=budget)
    if copy_charge_us == 0 or not bool((placement >= 0).any()):
        return placement
    L = layout.num_local_experts
    best, best_t = None, None
    for b in range(budget, -1, -1):
        pl, A = (placement, assign) if b == budget else plan_probe_host(counts, layout, cost, budget_in=b)
        if b < budget and int((pl >= 0).sum()) == int((best >= 0).sum()) and torch.equal(pl, best):
            continue  # the same plan as a larger budget: already scored
        busy = rank_times(A, cost).double()
        for r, s in zip(*torch.nonzero(pl >= 0, as_tuple=True)):
            busy[int(r)] += copy_charge_us
            busy[int(pl[r, s]) // L] += copy_charge_us
        t = float(busy.max())
        if best_t is None or t <= best_t:
            best, best_t = pl, t
    return best
