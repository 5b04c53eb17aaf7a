"""The host planner's loop, compiled with numba (``policy.planner.plan_probe_host`` holds the API,
the checks and the algorithm's description). It runs once per MoE layer between large kernels; as
a Python loop over lists it took about 100 us at E 128, EP 8, k_max 16, compiled a few us.
``cache=True`` keeps the machine code on disk (compiled once per install).

All state is exact int64 in token units, so every rank computes the same plan. The assignment
``out [ep_src, E, ep_dst]`` is the state itself: ``out[s, e, home(e)]`` holds what source ``s``
still sends to expert ``e``'s home rank (what the Python loop called ``left``), ``out[s, e, d]``
what it sends to the copy on ``d``.
"""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True)
def probe_greedy(cnt, L, slots, cap_in, cap_out, o_u, ch, k_max, early_exit):
    """PROBE's greedy on ``cnt [ep, E]`` (contiguous natives, ``L`` per rank) from the replica
    slots ``slots [ep, R]`` (in place: new copies fill the first empty slot). Returns
    ``out [ep, E, ep]``. ``cap_in``/``cap_out``: new copies a rank may receive/send; ``o_u``,
    ``ch``: the per-active-expert cost and the copy charge in token units; ``early_exit``: skip
    the loop when the static plan's slowest rank cannot pay one copy (``no_copy_can_pay``; only
    valid from empty slots)."""
    ep, E = cnt.shape
    R = slots.shape[1]
    out = np.zeros((ep, E, ep), np.int64)
    at_home = np.zeros(E, np.int64)  # tokens of e on its home rank
    rem = np.zeros(E, np.int64)  # of those, the ones from other ranks (the movable ones)
    t = np.zeros(ep, np.int64)
    for e in range(E):
        h = e // L
        for s in range(ep):
            out[s, e, h] = cnt[s, e]
            at_home[e] += cnt[s, e]
        rem[e] = at_home[e] - cnt[h, e]
        t[h] += at_home[e] + (o_u if at_home[e] > 0 else 0)
    held = np.zeros((ep, E), np.bool_)  # replica copies only
    for r in range(ep):
        for j in range(R):
            if slots[r, j] >= 0:
                held[r, slots[r, j]] = True
    n_in = np.zeros(ep, np.int64)
    n_out = np.zeros(ep, np.int64)
    away = np.zeros((E, ep), np.int64)  # tokens of e on the copy on rank d
    invalid = np.zeros((ep, ep), np.bool_)  # (src, dst) cannot help
    for r in range(ep):
        invalid[r, r] = True
    iters = k_max if R > 0 else 0
    # the first move would make a copy that cannot pay: the static plan (the same test as
    # planner.no_copy_can_pay: the slowest rank's excess over the mean within one charge)
    if early_exit and ch > 0 and (t.max() * ep - t.sum()) // ep <= ch:
        iters = 0
    for _ in range(iters):
        src = np.argmax(t)  # first slowest
        t_src = t[src]
        dst = np.argmin(t)
        t_dst = t[dst]
        if invalid[src, dst]:  # the fastest rank is ruled out: the fastest valid one, ties to the lower
            dst = -1
            for r in range(ep):
                if not invalid[src, r] and (dst < 0 or t[r] < t_dst):
                    dst = r
                    t_dst = t[r]
            if dst < 0:
                break  # nothing can change any more
        lo = src * L
        e_star = -1
        best = 0
        if n_in[dst] < cap_in and n_out[src] < cap_out:  # any native may be copied
            for e in range(lo, lo + L):
                if rem[e] > best:
                    e_star = e
                    best = rem[e]
        else:  # only the natives dst already holds
            for e in range(lo, lo + L):
                if held[dst, e] and rem[e] > best:
                    e_star = e
                    best = rem[e]
        if e_star < 0:
            invalid[src, dst] = True
            continue
        new_copy = not held[dst, e_star]
        on_dst = away[e_star, dst]
        o_new = o_u if (new_copy or on_dst == 0) else 0
        x = min((t_src - t_dst - o_new) // 2, (t_src * ep - t.sum()) // ep, best)
        if x <= (ch if new_copy else 0):
            invalid[src, dst] = True
            continue
        # locality first: dst's own tokens, then the other ranks' in rank order (never src's)
        need = x
        for k in range(ep + 1):
            r = dst if k == 0 else k - 1  # dst again in the range: emptied, or the loop has ended
            a = out[r, e_star, src]
            if a <= 0 or r == src:
                continue
            m = a if a < need else need
            out[r, e_star, src] = a - m
            out[r, e_star, dst] += m
            need -= m
            if need == 0:
                break
        moved = x - need
        rem[e_star] -= moved
        away[e_star, dst] = on_dst + moved
        at_home[e_star] -= moved
        t[src] -= moved + (o_u if at_home[e_star] == 0 else 0)
        t[dst] += moved + (o_u if on_dst == 0 and moved > 0 else 0)
        if new_copy:
            for j in range(R):
                if slots[dst, j] < 0:
                    slots[dst, j] = e_star
                    break
            held[dst, e_star] = True
            n_in[dst] += 1
            n_out[src] += 1
            t[src] += ch
            t[dst] += ch
    return out
