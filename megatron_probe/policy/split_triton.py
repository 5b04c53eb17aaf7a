"""The exact token split (``split.placement_split(..., objective="tokens")``) on the counts' device:
one Triton launch and a few tensor operations, no host synchronisation on the way.

The kernel (one program) is the host algorithm of ``policy.split`` (augmenting paths on the
ranks with a rising lower bound ``M``; the proof of optimality is in that module's docstring),
with its state held in registers as ``[E, ep]`` and ``[ep]`` tensors:

* holders from the placement (a rank holds its natives ``e // L`` and the experts in its slots);
* the start: each source's tokens of an expert stay where the source holds it, the rest at the
  expert's home rank (a valid split of every placement);
* ``M`` = the larger of the mean load and the largest fixed load (experts with one copy), both
  lower bounds of the optimum;
* each round takes the first most-loaded rank ``u``; if its load is at most ``M`` the split is
  optimal and the loop ends. Else a breadth-first search over ranks (``a -> b`` when ``a`` computes
  tokens of a replicated expert that ``b`` also holds; per level, every newly reached rank takes
  the lowest expert, and of it the lowest frontier rank, as its parent) looks for a rank below
  ``M``; the path to the lowest such rank of the first level that has one carries
  ``min(bottleneck, load(u) - M, M - load(t))`` tokens. Without one, the reached set is closed and
  ``M`` rises to its mean (rounded up).

Loops are ``while`` loops with their conditions (Triton has no ``break``), so a round costs as
many breadth-first levels as it needs and the kernel as many rounds as the split needs (at most
``max_rounds``; a split stopped there is valid, not known optimal: the ``converged`` flag says so).
The per-rank totals may differ from the host's (any optimum); the slowest rank is the same, the
optimum. The ``[ep_src, E, ep_dst]`` assignment follows from the totals by ``locality_first``'s
rule (each source keeps what its own rank computes, the rest fills the remaining room, sources
and destinations in rank order: the north-west corner rule, written as interval overlaps of prefix
sums), as tensor operations.

The time objective's search (``split_kernels.time_refine``) is host code; on the GPU this exact
token split is the device path (docs/balancer.md, "Not done yet").

Written for triton 3.6's API with no inline assembly: CI runs it on CPU under
``TRITON_INTERPRET=1`` against the host split (``tests/test_split_triton.py``). Integer division
only divides non-negative numbers. ``TRITON_INTERPRET=1`` must be set before triton is first
imported; the kernel is made on first use.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from megatron_probe.policy.placement import ExpertLayout

_KERNELS = {}


def _pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def _kernel():
    """The token split kernel, made on first use (``triton.jit`` reads the interpreter switch
    then)."""
    import os

    key = os.environ.get("TRITON_INTERPRET", "0")
    if key in _KERNELS:
        return _KERNELS[key]
    import triton
    import triton.language as tl

    @triton.jit
    def token_split(cnt_ptr, slots_ptr, y_ptr, state_ptr, ep, E, L, R, max_rounds,
                    EP_B: tl.constexpr, E_B: tl.constexpr, R_B: tl.constexpr):
        BIG: tl.constexpr = 2 ** 62
        offs_r = tl.arange(0, EP_B)
        offs_e = tl.arange(0, E_B)
        rmask = offs_r < ep
        emask = offs_e < E
        m2 = emask[:, None] & rmask[None, :]
        # cnt [ep, E] read as C [E, ep]; holders H [E, ep]: the natives, then each slot's expert
        C = tl.load(cnt_ptr + offs_r[None, :] * E + offs_e[:, None], mask=m2, other=0).to(tl.int64)
        home = offs_e // L
        H = m2 & (home[:, None] == offs_r[None, :])
        for j in range(R_B):
            s_j = tl.load(slots_ptr + offs_r * R + j, mask=rmask & (j < R), other=-1).to(tl.int64)
            H = H | (m2 & (offs_e[:, None] == s_j[None, :]))
        multi = tl.sum(H.to(tl.int32), axis=1) > 1
        # the start: tokens stay where their source holds the expert, the rest at home
        Y = tl.where(H, C, 0)
        rest = tl.sum(C, axis=1) - tl.sum(Y, axis=1)
        Y = Y + tl.where(home[:, None] == offs_r[None, :], rest[:, None], 0)
        load = tl.sum(Y, axis=0)
        fixed = tl.sum(tl.where(multi[:, None], 0, Y), axis=0)
        total = tl.sum(load)
        M = tl.maximum(tl.max(fixed), (total + ep - 1) // ep)
        rounds = 0
        done = 0
        while (done == 0) & (rounds < max_rounds):
            load_m = tl.where(rmask, load, -BIG)
            top = tl.max(load_m)
            u = tl.min(tl.where(load_m == top, offs_r, EP_B))
            done = (top <= M).to(tl.int32)
            # breadth first from u to a rank below M
            seen = offs_r == u
            frontier = seen
            par_r = tl.full((EP_B,), -1, tl.int32)  # int32 like the rank it walks to (a loop-carried scalar)
            par_e = tl.full((EP_B,), -1, tl.int32)
            target = -1
            live = 1 - done
            while live != 0:
                src = (Y > 0) & frontier[None, :] & multi[:, None]
                from_any = tl.max(src.to(tl.int32), axis=1) > 0
                from_rank = tl.min(tl.where(src, offs_r[None, :], EP_B), axis=1)  # the lowest frontier rank
                cand = H & from_any[:, None] & (seen == 0)[None, :]
                newly = tl.max(cand.to(tl.int32), axis=0) > 0
                via = tl.min(tl.where(cand, offs_e[:, None], E_B), axis=0)  # the lowest expert
                via_rank = tl.sum(tl.where(offs_e[:, None] == via[None, :], from_rank[:, None], 0), axis=0)
                par_e = tl.where(newly, via, par_e)
                par_r = tl.where(newly, via_rank, par_r)
                seen = seen | newly
                hit = tl.min(tl.where(newly & (load < M), offs_r, EP_B))
                target = tl.where(hit < EP_B, hit, -1)
                frontier = newly
                live = ((target < 0) & (tl.max(newly.to(tl.int32)) > 0)).to(tl.int32)
            pushed = (done == 0) & (target >= 0)
            # the amount: the excess, the deficit and the path's smallest edge
            load_t = tl.sum(tl.where(offs_r == target, load, 0))
            delta = tl.minimum(top - M, M - load_t)
            b = tl.where(pushed, target, u)
            while b != u:
                a = tl.sum(tl.where(offs_r == b, par_r, 0))
                i = tl.sum(tl.where(offs_r == b, par_e, 0))
                edge = tl.sum(tl.where((offs_e[:, None] == i) & (offs_r[None, :] == a), Y, 0))
                delta = tl.minimum(delta, edge)
                b = a
            b = tl.where(pushed, target, u)
            while b != u:
                a = tl.sum(tl.where(offs_r == b, par_r, 0))
                i = tl.sum(tl.where(offs_r == b, par_e, 0))
                row = offs_e[:, None] == i
                Y = Y - tl.where(row & (offs_r[None, :] == a), delta, 0) + tl.where(row & (offs_r[None, :] == b), delta, 0)
                b = a
            load = load + tl.where(pushed & (offs_r == target), delta, 0) - tl.where(pushed & (offs_r == u), delta, 0)
            # no path: the reached set is closed, its mean bounds the optimum from below
            closed = (done == 0) & (target < 0)
            s = tl.sum(tl.where(seen & rmask, load, 0))
            n = tl.maximum(tl.sum((seen & rmask).to(tl.int64)), 1)
            M = tl.where(closed, tl.maximum(M, (s + n - 1) // n), M)
            rounds += 1
        tl.store(y_ptr + offs_e[:, None] * ep + offs_r[None, :], Y, mask=m2)
        # optimal when no rank is above M (also when the last round allowed got there)
        tl.store(state_ptr + 0, (tl.max(tl.where(rmask, load, -BIG)) <= M).to(tl.int64))
        tl.store(state_ptr + 1, rounds.to(tl.int64))
        tl.store(state_ptr + 2, tl.max(tl.where(rmask, load, -BIG)))

    _KERNELS[key] = token_split
    return token_split


def default_max_rounds(num_experts: int, ep: int) -> int:
    """The round cap of :func:`placement_token_split_device`: generous (the host split makes 7-10
    pushes or raises at the median at E 128, EP 8, at most 17 seen; each round lowers an excess,
    fills a deficit, empties a path edge or raises ``M``)."""
    return 64 * (num_experts + ep)


def assignment_from_totals(counts: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``[ep_src, E, ep_dst]`` from the per-destination totals ``y [E, ep]`` of ``counts [ep, E]``
    by ``split.locality_first``'s rule (the same assignment), in tensor operations on their
    device: each source keeps ``min(its count, what its rank computes)``, then what the sources
    have left fills what the destinations still take, both in rank order (interval overlaps of
    prefix sums)."""
    cnt = counts.to(torch.int64)
    ep, E = cnt.shape
    ranks = torch.arange(ep, device=cnt.device)
    own = torch.minimum(cnt, y.T.to(torch.int64))  # [ep, E]: source s keeps own[s, e] on itself
    left = cnt - own  # [ep_src, E]
    room = y.T.to(torch.int64) - own  # [ep_dst, E]
    left_hi = left.cumsum(0)
    left_lo = left_hi - left
    room_hi = room.cumsum(0)
    room_lo = room_hi - room
    lo = torch.maximum(left_lo[:, :, None], room_lo.T[None, :, :])
    hi = torch.minimum(left_hi[:, :, None], room_hi.T[None, :, :])
    out = (hi - lo).clamp_min(0)  # [ep_src, E, ep_dst]
    out[ranks, :, ranks] += own
    return out


def placement_token_split_device(counts: torch.Tensor, placement: torch.Tensor, layout: ExpertLayout,
                                 max_rounds: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """The exact token split of ``counts [ep, E]`` over ``placement [ep, R]``'s copies (natives
    included), on ``counts``' device: ``(assignment [ep_src, E, ep_dst], state [3])`` with ``state`` =
    ``(converged, rounds, slowest rank's tokens)`` as int64 on the device (read it when a host
    value is needed; ``converged`` 0 only when ``max_rounds`` stopped it: the split is then valid
    but not known optimal). The values are not checked (non-negative counts, a valid placement):
    that would synchronise; ``split.placement_split`` checks them on the host."""
    ep, E, L, R = layout.ep_size, layout.num_experts, layout.num_local_experts, layout.replica_slots
    if tuple(counts.shape) != (ep, E):
        raise ValueError(f"counts {tuple(counts.shape)} != [ep, E] = [{ep}, {E}]")
    if counts.is_floating_point() or counts.is_complex() or counts.dtype == torch.bool:
        raise ValueError(f"counts must be integer token counts, not {counts.dtype}")
    if tuple(placement.shape) != (ep, R):
        raise ValueError(f"placement {tuple(placement.shape)} != [ep, R] = [{ep}, {R}]")
    rounds = default_max_rounds(E, ep) if max_rounds is None else int(max_rounds)
    if rounds < 1:
        raise ValueError(f"max_rounds must be at least 1, got {max_rounds}")
    device = counts.device
    cnt = counts.to(torch.int64).contiguous()
    slots = placement.to(device=device, dtype=torch.int64).contiguous()
    y = torch.empty((E, ep), dtype=torch.int64, device=device)
    state = torch.empty(3, dtype=torch.int64, device=device)
    _kernel()[(1,)](cnt, slots, y, state, ep, E, L, R, rounds, EP_B=_pow2(ep), E_B=_pow2(E), R_B=_pow2(max(R, 1)))
    return assignment_from_totals(cnt, y), state
