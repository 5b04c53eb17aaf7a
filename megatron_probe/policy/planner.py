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
The plan never raises the slowest rank's time (every move lowers ``t_src`` and leaves
``t_dst`` below the old ``t_src``), and with a zero transfer budget and no existing replica it
returns the static placement.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from megatron_probe.policy.cost_model import ExpertCost
from megatron_probe.policy.placement import EMPTY_SLOT, ExpertLayout, holder_slots


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
               budget_out: Optional[int] = None, k_max: int = 16) -> Tuple[torch.Tensor, torch.Tensor]:
    """Greedy replica placement and token split for one layer (see the module docstring).

    Args:
        counts: ``[ep, E]`` (predicted) tokens each rank routes to each expert.
        budget_in: new replicas a rank may receive (default: its replica slots ``R``).
        budget_out: copies a home rank may send (default: unlimited).
    Returns:
        ``(placement [ep, R], assignment [ep, E, ep])`` on ``counts.device``.
    """
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
    c, o = cost.per_token_us, cost.per_active_expert_us
    A = static_assignment(counts, layout)
    slots = torch.full((ep, R), EMPTY_SLOT, dtype=torch.long, device=dev)
    held = torch.zeros(ep, E, dtype=torch.bool, device=dev)  # replica copies only
    n_in = torch.zeros(ep, dtype=torch.long, device=dev)
    n_out = torch.zeros(ep, dtype=torch.long, device=dev)
    invalid = torch.eye(ep, dtype=torch.bool, device=dev)
    ranks = torch.arange(ep, device=dev)
    experts = torch.arange(E, device=dev)
    home = experts // L
    inf = torch.tensor(float("inf"), dtype=torch.float64, device=dev)
    for _ in range(k_max if R > 0 else 0):
        t = rank_times(A, cost)
        src = torch.argmax(t)
        dst_ok = ~invalid[src]
        dst = torch.argmin(torch.where(dst_ok, t, inf))
        any_dst = dst_ok.any()
        on_src = A[:, :, src]  # [ep_src, E] tokens computed on src
        movable = on_src.sum(0) - on_src[src]  # tokens from other ranks
        native = home == src
        dst_has = held[dst]
        can_copy = (n_in[dst] < cap_in) & (n_out[src] < cap_out)
        eligible = native & (movable > 0) & (dst_has | can_copy)
        score = torch.where(eligible, movable, torch.full_like(movable, -1))
        e_star = torch.argmax(score)
        has_e = score[e_star] > 0
        new_copy = ~dst_has[e_star]
        o_new = torch.where(new_copy | (A[:, e_star, dst].sum() == 0), o, 0.0)
        x_gain = torch.floor((t[src] - t[dst] - o_new) / (2 * c))
        x_mean = torch.floor((t[src] - t.mean()) / c)
        x = torch.minimum(torch.minimum(x_gain, x_mean), movable[e_star].to(torch.float64)).clamp_min(0).long()
        ok = any_dst & has_e & (x > 0)
        # locality first: dst's own tokens, then the other ranks' in rank order (never src's)
        order = torch.cat([dst.view(1), ranks[ranks != dst]])
        avail = A[order, e_star, src] * (order != src)
        before = torch.cumsum(avail, 0) - avail
        take_o = torch.minimum(avail, (x - before).clamp_min(0)) * ok
        take = torch.zeros(ep, dtype=torch.long, device=dev).index_put((order,), take_o)
        A[:, e_star, src] -= take
        A[:, e_star, dst] += take
        add_slot = ok & new_copy
        free = slots[dst] == EMPTY_SLOT
        slot_idx = torch.argmax(free.long())
        slots[dst, slot_idx] = torch.where(add_slot, e_star, slots[dst, slot_idx])
        held[dst, e_star] = held[dst, e_star] | add_slot
        n_in[dst] += add_slot.long()
        n_out[src] += add_slot.long()
        # a pair that cannot help is not tried again
        invalid[src, dst] = invalid[src, dst] | (any_dst & ~ok)
    return slots, A


def water_fill_split(base: torch.Tensor, amount: int, per_token: float) -> torch.Tensor:
    """Split ``amount`` tokens over holders with base times ``base`` [h] to equalise
    ``base + per_token * share`` as far as possible; integer shares, lowest base first."""
    h = base.numel()
    if amount <= 0 or h == 0:
        return torch.zeros(h, dtype=torch.long)
    b = base.double() / per_token  # in tokens
    order = torch.argsort(b, stable=True)
    sb = b[order]
    csum = torch.cumsum(sb, 0)
    k = torch.arange(1, h + 1, dtype=torch.float64)
    level = (amount + csum) / k
    nxt = torch.cat([sb[1:], torch.tensor([float("inf")], dtype=torch.float64)])
    j = int(((level <= nxt) & (level >= sb)).nonzero()[0])
    lam = float(level[j])
    share = torch.zeros(h, dtype=torch.long)
    fill = torch.floor(torch.clamp(lam - sb[: j + 1], min=0)).long()
    rest = amount - int(fill.sum())
    fill[:rest] += 1  # remainder to the least loaded
    share[order[: j + 1]] = fill
    return share


def _interval_split(src_amounts: torch.Tensor, dst_amounts: torch.Tensor) -> torch.Tensor:
    """``[n_src, n_dst]`` transport plan filling destinations in order from sources in order."""
    se = torch.cumsum(src_amounts, 0)
    ss = se - src_amounts
    de = torch.cumsum(dst_amounts, 0)
    ds = de - dst_amounts
    lo = torch.maximum(ss.unsqueeze(1), ds.unsqueeze(0))
    hi = torch.minimum(se.unsqueeze(1), de.unsqueeze(0))
    return (hi - lo).clamp_min(0)


def assign_on_truth(counts: torch.Tensor, placement: torch.Tensor, layout: ExpertLayout,
                    cost: ExpertCost) -> torch.Tensor:
    """Token split for a fixed placement from the true counts (re-assignment at dispatch time).

    Each replicated expert, heaviest first, has all its tokens water-filled over its copies
    against the load of everything else; then locality first: each copy is filled with tokens
    that originate on its own rank before any other rank's tokens are sent to it.
    """
    _check_counts(counts, layout)
    counts = counts.long().cpu()
    placement = placement.long().cpu()
    holds = holder_slots(placement, layout) >= 0  # [ep, E]
    A = static_assignment(counts, layout)
    replicated = (holds.sum(0) > 1).nonzero().flatten()
    if replicated.numel() == 0:
        return A
    load = counts.sum(0)
    for e in replicated[torch.argsort(load[replicated], descending=True, stable=True)].tolist():
        hs = holds[:, e].nonzero().flatten()
        A[:, e, :] = 0
        base = rank_times(A, cost)[hs]
        share = water_fill_split(base, int(counts[:, e].sum()), cost.per_token_us)
        own = torch.minimum(share, counts[hs, e])  # locality first
        A[hs, e, hs] = own
        rest = counts[:, e].clone()
        rest[hs] -= own
        A[:, e, hs] += _interval_split(rest, share - own)
    return A
