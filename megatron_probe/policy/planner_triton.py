"""The host planner's greedy (``planner_kernels.probe_greedy``) as Triton kernels, for planning on
the GPU in one launch per layer without host synchronisation.

Two kernels, the same algorithm, integers and tie-breaks as the host loop, so the same plan:

1. ``_greedy`` (one program): the loop, with state per rank and per expert only, held in
   registers (rank times ``t``, the copies made ``n_in``/``n_out``, the ruled-out pairs, the
   replica slots with the tokens on each copy; per expert the tokens at home and the movable
   ones). Every step is branch-free (``tl.where``): a step that cannot move ends the loop through
   a ``done`` flag, since Triton loops have no ``break``. It writes the slots and the moves it
   made, ``(expert, destination, tokens)`` in order.
2. ``_expand`` (one program per move; the first move of each expert does that expert): the
   ``[ep, E, ep]`` assignment from the counts and the moves, over the static plan (every token
   home, set by one tensor op). A move of ``x`` tokens of expert ``e`` to rank ``d`` takes them from what the sources
   still send home, ``d``'s own first, then the other ranks in rank order, never the home
   rank's (the host loop's locality rule), so it is a prefix sum in that order.

Written for triton 3.6's API with no inline assembly: CI runs both on CPU under
``TRITON_INTERPRET=1`` against the host planner. Integer division only ever divides non-negative
numbers (Triton truncates, Python floors). ``TRITON_INTERPRET=1`` must be set before triton is
first imported (triton's own library functions are made then); the kernels here are made on first
use.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from megatron_probe.policy.cost_model import ExpertCost
from megatron_probe.policy.placement import EMPTY_SLOT, ExpertLayout

_KERNELS = {}
_BIG = 2 ** 62


def _pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def _kernels():
    """``(greedy, expand)``, made on first use (``triton.jit`` reads the interpreter switch then)."""
    import os

    key = os.environ.get("TRITON_INTERPRET", "0")
    if key in _KERNELS:
        return _KERNELS[key]
    import triton
    import triton.language as tl

    @triton.jit
    def greedy(cnt_ptr, slots_ptr, moves_ptr, ep, E, L, R, cap_in, cap_out, o_u, ch, early_exit,
               EP_B: tl.constexpr, E_B: tl.constexpr, R_B: tl.constexpr, K_MAX: tl.constexpr):
        BIG: tl.constexpr = 2 ** 62
        offs_r = tl.arange(0, EP_B)
        offs_e = tl.arange(0, E_B)
        offs_j = tl.arange(0, R_B)
        rmask = offs_r < ep
        emask = offs_e < E
        home = offs_e // L
        # per expert: tokens at home (all of them, before any move) and the movable ones
        at_home = tl.zeros((E_B,), tl.int64)
        home_own = tl.zeros((E_B,), tl.int64)
        for s in range(EP_B):
            row = tl.load(cnt_ptr + s * E + offs_e, mask=emask & (s < ep), other=0).to(tl.int64)
            at_home += row
            home_own += tl.where(home == s, row, 0)
        rem = at_home - home_own
        # per rank: the time of its natives (tokens, plus o_u per active expert)
        busy = at_home + tl.where(at_home > 0, o_u, 0)
        t = tl.sum(tl.where(home[None, :] == offs_r[:, None], busy[None, :], 0), axis=1)
        t = tl.where(rmask, t, 0)
        # the replica slots [ep, R] and the tokens on each copy
        smask = rmask[:, None] & (offs_j[None, :] < R)
        slots = tl.load(slots_ptr + offs_r[:, None] * R + offs_j[None, :], mask=smask, other=-1).to(tl.int64)
        away = tl.zeros((EP_B, R_B), tl.int64)
        n_in = tl.zeros((EP_B,), tl.int64)
        n_out = tl.zeros((EP_B,), tl.int64)
        invalid = (offs_r[:, None] == offs_r[None, :]) | (offs_r[None, :] >= ep)
        done = R == 0
        total0 = tl.sum(t)
        done = done | ((early_exit != 0) & (ch > 0) & ((tl.max(t) * ep - total0) // ep <= ch))
        for it in range(K_MAX):
            total = tl.sum(t)
            t_in = tl.where(rmask, t, -BIG)
            t_src = tl.max(t_in)
            src = tl.min(tl.where(t_in == t_src, offs_r, EP_B))
            # the fastest rank not ruled out for src, ties to the lower index
            bad = tl.sum(tl.where(offs_r[:, None] == src, invalid.to(tl.int32), 0), axis=0) > 0
            t_ok = tl.where(bad, BIG, t)
            t_dst = tl.min(t_ok)
            no_dst = t_dst == BIG
            dst = tl.min(tl.where(t_ok == t_dst, offs_r, EP_B))
            # src's natives dst may take: any, if both still may make a copy; else those dst holds
            slot_row = tl.sum(tl.where(offs_r[:, None] == dst, slots, 0), axis=0)
            slot_row = tl.where(offs_j < R, slot_row, -1)
            held = tl.sum((slot_row[None, :] == offs_e[:, None]).to(tl.int32), axis=1) > 0
            can_new = (tl.sum(tl.where(offs_r == dst, n_in, 0)) < cap_in) & (tl.sum(tl.where(offs_r == src, n_out, 0)) < cap_out)
            lo = src * L
            elig = emask & (offs_e >= lo) & (offs_e < lo + L) & (can_new | held) & (rem > 0)
            best = tl.max(tl.where(elig, rem, 0))
            e_star = tl.min(tl.where(elig & (rem == best), offs_e, E_B))
            found = best > 0
            new_copy = tl.sum(tl.where(offs_e == e_star, held.to(tl.int32), 0)) == 0
            on_slot = (offs_r[:, None] == dst) & (slots == e_star)
            on_dst = tl.sum(tl.where(on_slot, away, 0))
            o_new = tl.where(new_copy | (on_dst == 0), o_u, 0)
            diff = t_src - t_dst - o_new
            half = tl.where(diff > 0, tl.maximum(diff, 0) // 2, -1)
            x = tl.minimum(tl.minimum(half, (t_src * ep - total) // ep), best)
            pays = x > tl.where(new_copy, ch, 0)
            active = (done == 0) & (no_dst == 0)
            move = active & found & pays
            # a pair that cannot help is ruled out; no valid pair at all ends the loop
            rule_out = active & ((found == 0) | (pays == 0))
            invalid = invalid | (rule_out & (offs_r[:, None] == src) & (offs_r[None, :] == dst))
            done = done | (no_dst & (done == 0))
            # the move
            x_m = tl.where(move, x, 0)
            rem = tl.where(offs_e == e_star, rem - x_m, rem)
            left = tl.sum(tl.where(offs_e == e_star, at_home, 0)) - x_m
            at_home = tl.where(move & (offs_e == e_star), left, at_home)
            free_j = tl.min(tl.where(slot_row < 0, offs_j, R_B))  # dst's first empty slot
            fill = move & new_copy
            into = (offs_r[:, None] == dst) & tl.where(fill, offs_j[None, :] == free_j, slots == e_star)
            slots = tl.where(fill & into, e_star, slots)
            away = tl.where(move & into, away + x_m, away)
            dt_src = -x_m - tl.where(move & (left == 0), o_u, 0) + tl.where(fill, ch, 0)
            dt_dst = x_m + tl.where(move & (on_dst == 0) & (x_m > 0), o_u, 0) + tl.where(fill, ch, 0)
            t = t + tl.where(offs_r == src, dt_src, 0) + tl.where(offs_r == dst, dt_dst, 0)
            n_in = n_in + tl.where(fill & (offs_r == dst), 1, 0)
            n_out = n_out + tl.where(fill & (offs_r == src), 1, 0)
            # the move, in order: (expert, destination, tokens); -1 where none
            tl.store(moves_ptr + it * 3 + 0, tl.where(move, e_star, -1))
            tl.store(moves_ptr + it * 3 + 1, tl.where(move, dst, -1))
            tl.store(moves_ptr + it * 3 + 2, x_m)
        tl.store(slots_ptr + offs_r[:, None] * R + offs_j[None, :], slots, mask=smask)

    @triton.jit
    def expand(cnt_ptr, moves_ptr, out_ptr, ep, E, L, EP_B: tl.constexpr, K_MAX: tl.constexpr):
        # program i: the expert of move i, unless an earlier move has it (that program does it)
        i = tl.program_id(0)
        e = tl.load(moves_ptr + i * 3 + 0)
        first = e >= 0
        for j in range(K_MAX):
            first = first & ((j >= i) | (tl.load(moves_ptr + j * 3 + 0) != e))
        e = tl.where(first, e, 0)
        h = e // L
        offs_r = tl.arange(0, EP_B)
        rmask = offs_r < ep
        # what each source still sends home, and the [src, dst] block of this expert
        avail = tl.load(cnt_ptr + offs_r * E + e, mask=rmask & first, other=0).to(tl.int64)
        acc = tl.zeros((EP_B, EP_B), tl.int64)
        for k in range(K_MAX):
            mine = tl.load(moves_ptr + k * 3 + 0) == e
            d = tl.load(moves_ptr + k * 3 + 1)
            x = tl.load(moves_ptr + k * 3 + 2)
            # take order: d first, then the ranks in order, never the home rank
            pos = tl.where(offs_r == d, 0, offs_r + 1)
            movable = tl.where(offs_r == h, 0, avail)
            before = tl.sum(tl.where(pos[None, :] < pos[:, None], movable[None, :], 0), axis=1)
            take = tl.where(mine, tl.minimum(tl.maximum(x - before, 0), movable), 0)
            avail -= take
            acc += tl.where(offs_r[None, :] == d, take[:, None], 0)
        acc += tl.where(offs_r[None, :] == h, avail[:, None], 0)
        base = out_ptr + offs_r[:, None] * (E * ep) + e * ep + offs_r[None, :]
        tl.store(base, acc, mask=first & rmask[:, None] & rmask[None, :])

    _KERNELS[key] = (greedy, expand)
    return _KERNELS[key]


def plan_probe_triton(counts: torch.Tensor, layout: ExpertLayout, cost: ExpertCost, budget_in: Optional[int] = None,
                      budget_out: Optional[int] = None, k_max: int = 16, placement: Optional[torch.Tensor] = None,
                      copy_charge_us: float = 0.0, early_exit: bool = True,
                      split: str = "greedy", assignment: bool = True) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """:func:`~megatron_probe.policy.planner.plan_probe_host` in two Triton launches on the
    counts' device (the same arguments, the same ``(slots [ep, R], assignment [ep, E, ep])``),
    with no host synchronisation on the way. ``counts``: ``[ep, E]`` integer tokens, non-negative
    (the caller's promise: :func:`plan_probe_host` checks it, here it would cost a sync).
    ``split="tokens"``: the same slots, and as the assignment the exact min-max token split over
    them (``policy.split_triton``, one more launch instead of the greedy's expansion) rather than
    the greedy's own moves. ``assignment=False``: the slots only (one launch; ``None`` for the
    assignment), for a caller that splits the true counts later."""
    if split not in ("greedy", "tokens"):
        raise ValueError(f"split={split!r} is not one of ('greedy', 'tokens')")
    from megatron_probe.policy.planner import planner_scalars

    ep, E, L, R = layout.ep_size, layout.num_experts, layout.num_local_experts, layout.replica_slots
    if tuple(counts.shape) != (ep, E):
        raise ValueError(f"counts {tuple(counts.shape)} != [ep, E] = [{ep}, {E}]")
    if counts.is_floating_point() or counts.is_complex() or counts.dtype == torch.bool:
        raise ValueError(f"counts must be integer token counts, not {counts.dtype}")
    # the values are not checked (non-negative): that would synchronise with the device
    cap_in, cap_out, o_u, ch = planner_scalars(layout, cost, budget_in, budget_out, k_max, copy_charge_us)
    device = counts.device
    cnt = counts.to(torch.int64).contiguous()
    if placement is not None:
        slots = placement.to(device=device, dtype=torch.int64).reshape(ep, R).contiguous().clone()
        cap_in, early_exit = 0, False
    else:
        slots = torch.full((ep, R), EMPTY_SLOT, dtype=torch.int64, device=device)
    k = max(1, int(k_max))
    moves = torch.full((k, 3), -1, dtype=torch.int64, device=device)
    moves[:, 2] = 0
    greedy, expand = _kernels()
    planned = k_max > 0 and R > 0  # else the static plan (the host loop runs no iteration either)
    if planned:
        greedy[(1,)](cnt, slots, moves, ep, E, L, R, cap_in, cap_out, o_u, ch, int(bool(early_exit)),
                     EP_B=_pow2(ep), E_B=_pow2(E), R_B=_pow2(R), K_MAX=k)
        if not assignment:
            return slots, None
        if split == "tokens":
            from megatron_probe.policy.split_triton import placement_token_split_device

            return slots, placement_token_split_device(cnt, slots, layout)[0]
    if not assignment:
        return slots, None
    # the static plan (every token home), then the moved experts' blocks rewritten in parallel
    out = torch.zeros((ep, E, ep), dtype=torch.int64, device=device)
    experts = torch.arange(E, device=device)
    out[:, experts, experts // L] = cnt
    if planned:
        expand[(k,)](cnt, moves, out, ep, E, L, EP_B=_pow2(ep), K_MAX=k)
    return slots, out
