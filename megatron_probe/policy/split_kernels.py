"""The split's loops, compiled with numba (``policy.split`` holds the API, the checks and the
algorithm's description). They run once per MoE layer on the host, between large kernels: as
Python loops over lists they took 80-150 us at E 128, EP 8 (most of it interpreter work on a few
dozen numbers), compiled a few us. ``cache=True`` keeps the machine code on disk, so a process
compiles them once per install, not once per run.

Every kernel works on int64 arrays (token counts, rank and expert ids) and the tables of one set
of holders (:class:`policy.split._Holds`):

* ``owner [E]``: the rank of an expert's only copy, ``-1`` when it has several, ``-2`` none;
* ``multi [m]``: the replicated experts; ``hold_ptr [m + 1]``, ``hold_rank``: their holders, in
  ascending rank order (CSR); ``on_ptr [ep + 1]``, ``on_idx``: per rank, the indices into
  ``multi`` of the replicated experts it holds, ascending;
* ``home_ok``: every replicated expert's home rank of the contiguous layout (``e // (E / ep)``)
  is among its holders, so the static split is a valid start.

Tie-breaks are fixed (first rank, first expert, stable sorts) so every rank computes the same
split from the same counts. Pure integer work except the final rank times in us, which use the
float operations of ``planner.rank_times`` (no fast-math: the same values bit for bit).
"""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True)
def placement_tables(placement, E):
    """``(ok, owner, multi, hold_ptr, hold_rank, on_ptr, on_idx)`` of the copies of ``placement
    [ep, R]`` (expert ids, -1 empty) over the contiguous natives (expert ``e`` on rank
    ``e // (E / ep)``). ``ok`` is False, and the tables unusable, when an entry names no expert,
    one of the rank's own natives, or an expert already in that rank's slots (the caller raises,
    naming it)."""
    ep, R = placement.shape
    L = E // ep
    held = np.zeros((E, ep), np.bool_)
    replicated = np.zeros(E, np.bool_)
    ok = True
    for r in range(ep):
        for j in range(R):
            e = placement[r, j]
            if e == -1:
                continue
            if e < 0 or e >= E or e // L == r or held[e, r]:
                ok = False
                continue
            held[e, r] = True
            held[e, e // L] = True
            replicated[e] = True
    owner = np.arange(E) // L
    m = 0
    n_copies = 0
    for e in range(E):
        if replicated[e]:
            owner[e] = -1
            m += 1
            for r in range(ep):
                n_copies += held[e, r]
    multi = np.empty(m, np.int64)
    hold_ptr = np.zeros(m + 1, np.int64)
    hold_rank = np.empty(n_copies, np.int64)
    i = 0
    k = 0
    for e in range(E):
        if replicated[e]:
            multi[i] = e
            for r in range(ep):  # holders ascend
                if held[e, r]:
                    hold_rank[k] = r
                    k += 1
            i += 1
            hold_ptr[i] = k
    on_ptr = np.zeros(ep + 1, np.int64)
    on_idx = np.empty(n_copies, np.int64)
    k = 0
    for r in range(ep):  # per rank, the replicated experts it holds, ascending
        for i in range(m):
            if held[multi[i], r]:
                on_idx[k] = i
                k += 1
        on_ptr[r + 1] = k
    return ok, owner, multi, hold_ptr, hold_rank, on_ptr, on_idx


@njit(cache=True)
def start_split(cnt, total, owner, multi, hold_ptr, hold_rank):
    """``(y, load, fixed, fixed_active, start_y, start_load, total_tokens, n_active_min)``: every
    rank's fixed load and active count (experts with one copy), and the start: local tokens stay,
    the rest of each replicated expert on its least-loaded holder (ties: the lower rank), experts
    with the most such tokens first. ``y [m, ep]``: the replicated experts' per-rank totals
    (``y``/``load`` are copies of the start, for the token split to work on)."""
    ep, E = cnt.shape
    m = multi.shape[0]
    fixed = np.zeros(ep, np.int64)
    fixed_active = np.zeros(ep, np.int64)
    for e in range(E):
        r = owner[e]
        if r >= 0:
            fixed[r] += total[e]
            if total[e] > 0:
                fixed_active[r] += 1
    total_tokens = fixed.sum()
    n_active_min = fixed_active.sum()  # every expert with tokens is active somewhere
    y = np.zeros((m, ep), np.int64)
    load = fixed.copy()
    rest = np.empty(m, np.int64)
    for i in range(m):
        e = multi[i]
        left = total[e]
        total_tokens += left
        if left > 0:
            n_active_min += 1
        for k in range(hold_ptr[i], hold_ptr[i + 1]):
            r = hold_rank[k]
            v = cnt[r, e]
            y[i, r] = v
            load[r] += v
            left -= v
        rest[i] = left
    order = np.argsort(-rest, kind="mergesort")  # stable: equal rests keep expert order
    for j in range(m):
        i = order[j]
        if rest[i] <= 0:
            break
        best = hold_rank[hold_ptr[i]]
        for k in range(hold_ptr[i] + 1, hold_ptr[i + 1]):
            r = hold_rank[k]
            if load[r] < load[best]:
                best = r
        y[i, best] += rest[i]
        load[best] += rest[i]
    return y.copy(), load.copy(), fixed, fixed_active, y, load, total_tokens, n_active_min


@njit(cache=True)
def exact_tokens(y, load, fixed, total_tokens, hold_ptr, hold_rank, on_ptr, on_idx):
    """The exact token split, in place on ``(y, load)``: augmenting paths from the most-loaded
    rank to one below the lower bound ``M``, which rises to a closed set's average when no such
    path exists, until no rank is above ``M`` (``policy.split``'s docstring has the proof)."""
    ep = load.shape[0]
    M = max(-(-total_tokens // ep), fixed.max())
    parent_rank = np.zeros(ep, np.int64)
    parent_exp = np.zeros(ep, np.int64)
    seen = np.zeros(ep, np.bool_)
    frontier = np.zeros(ep, np.int64)
    following = np.zeros(ep, np.int64)
    while True:
        u = np.argmax(load)  # the first most-loaded rank
        top = load[u]
        if top <= M:
            return
        seen[:] = False
        seen[u] = True
        frontier[0] = u
        n_front = 1
        target = -1
        while n_front > 0 and target < 0:  # breadth first over ranks
            n_next = 0
            for f in range(n_front):
                a = frontier[f]
                for k in range(on_ptr[a], on_ptr[a + 1]):
                    i = on_idx[k]
                    if y[i, a] <= 0:
                        continue
                    for kk in range(hold_ptr[i], hold_ptr[i + 1]):
                        b = hold_rank[kk]
                        if seen[b]:
                            continue
                        seen[b] = True
                        parent_rank[b] = a
                        parent_exp[b] = i
                        if load[b] < M:
                            target = b
                            break
                        following[n_next] = b
                        n_next += 1
                    if target >= 0:
                        break
                if target >= 0:
                    break
            frontier, following = following, frontier
            n_front = n_next
        if target < 0:  # a closed set: its tokens cannot leave it, so its average bounds below
            s = 0
            n = 0
            for r in range(ep):
                if seen[r]:
                    s += load[r]
                    n += 1
            M = -(-s // n)
            continue
        delta = min(top - M, M - load[target])
        b = target
        while b != u:
            a = parent_rank[b]
            delta = min(delta, y[parent_exp[b], a])
            b = a
        b = target
        while b != u:
            a = parent_rank[b]
            i = parent_exp[b]
            y[i, a] -= delta
            y[i, b] += delta
            b = a
        load[u] -= delta
        load[target] += delta


@njit(cache=True)
def unit_times(y, load, fixed_active, hold_ptr, hold_rank, o_u):
    """Rank times in token units: tokens plus ``o_u`` per active copy."""
    act = fixed_active.copy()
    for i in range(y.shape[0]):
        for k in range(hold_ptr[i], hold_ptr[i + 1]):
            r = hold_rank[k]
            if y[i, r] > 0:
                act[r] += 1
    return load + o_u * act


@njit(cache=True)
def _local_search(y0, load0, fixed_active, hold_ptr, hold_rank, on_ptr, on_idx, o_u, bound, max_moves):
    """Moves between two holders that lower the slower of the two below the current maximum
    time (token units), the best such move first; stops at ``bound``. Returns ``(y, max time)``."""
    y = y0.copy()
    t = unit_times(y, load0, fixed_active, hold_ptr, hold_rank, o_u)
    ep = t.shape[0]
    for _ in range(max_moves):
        top = t.max()
        if top <= bound:
            break
        best_top = top
        bi = -1
        bu = -1
        bb = -1
        bmv = 0
        for u in range(ep):
            if t[u] != top:
                continue
            for k in range(on_ptr[u], on_ptr[u + 1]):
                i = on_idx[k]
                frag = y[i, u]
                if frag <= 0:
                    continue
                shed = top - frag - o_u  # u without this fragment and its copy's fixed cost
                for kk in range(hold_ptr[i], hold_ptr[i + 1]):
                    b = hold_rank[kk]
                    if b == u:
                        continue
                    tb = t[b] + (0 if y[i, b] > 0 else o_u)
                    # move everything (u sheds the copy's fixed cost), then the balancing part
                    nt = shed if shed > tb + frag else tb + frag
                    if nt < best_top:
                        best_top, bi, bu, bb, bmv = nt, i, u, b, frag
                    part = (top - tb) // 2
                    if 0 < part < frag:
                        nt = top - part if top - part > tb + part else tb + part
                        if nt < best_top:
                            best_top, bi, bu, bb, bmv = nt, i, u, b, part
            if bi >= 0:
                break
        if bi < 0:
            break
        t[bu] -= bmv + (o_u if bmv == y[bi, bu] else 0)
        t[bb] += bmv + (0 if y[bi, bb] > 0 else o_u)
        y[bi, bu] -= bmv
        y[bi, bb] += bmv
    return y, t.max()


@njit(cache=True)
def times_us(y, fixed, fixed_active, hold_ptr, hold_rank, c, o):
    """Rank times (us) of ``y``: the float operations of ``planner.rank_times`` on the same
    integers, so the same values bit for bit."""
    load = fixed.copy()
    act = fixed_active.copy()
    for i in range(y.shape[0]):
        for k in range(hold_ptr[i], hold_ptr[i + 1]):
            r = hold_rank[k]
            if y[i, r] > 0:
                load[r] += y[i, r]
                act[r] += 1
    out = np.empty(load.shape[0], np.float64)
    for r in range(load.shape[0]):
        out[r] = c * float(load[r]) + o * float(act[r])
    return out


@njit(cache=True)
def time_refine(y, load, cnt, total, multi, fixed, fixed_active, start_y, start_load, total_tokens,
                n_active_min, hold_ptr, hold_rank, on_ptr, on_idx, home_ok, o_u, c, o):
    """The time objective's local search from the exact token split ``(y, load)``: up to three
    starts (that split, the unsplit start, the static split), the best kept, and never a split
    slower in us than the static one (``policy.split``'s docstring)."""
    ep, E = cnt.shape
    m = multi.shape[0]
    # no split beats the largest fixed rank time, nor the tokens plus one active copy per expert
    # with tokens spread evenly: a start that reaches it needs no other
    bound = max((fixed + o_u * fixed_active).max(), -(-(total_tokens + o_u * n_active_min) // ep))
    best_y, best_t = _local_search(y, load, fixed_active, hold_ptr, hold_rank, on_ptr, on_idx, o_u, bound, 64)
    if best_t > bound:
        y2, t2 = _local_search(start_y, start_load, fixed_active, hold_ptr, hold_rank, on_ptr, on_idx, o_u,
                               bound, 64)
        if t2 < best_t:
            best_y, best_t = y2, t2
    if not home_ok:
        return best_y
    per_rank = E // ep
    home_y = np.zeros((m, ep), np.int64)
    home_load = fixed.copy()
    for i in range(m):
        h = multi[i] // per_rank
        home_y[i, h] = total[multi[i]]
        home_load[h] += total[multi[i]]
    t_home = unit_times(home_y, home_load, fixed_active, hold_ptr, hold_rank, o_u).max()
    if best_t > bound and t_home < best_t:  # the static split is a third start
        y3, t3 = _local_search(home_y, home_load, fixed_active, hold_ptr, hold_rank, on_ptr, on_idx, o_u,
                               bound, 64)
        if t3 < best_t:
            best_y, best_t = y3, t3
    # decided in token units (o rounded); in us the static split must still not be faster, so
    # the split is never slower than no replication at all. A rank's time in us is within
    # |o - c o_u| per active copy of c times its time in token units, so when static is slower by
    # more than twice that in units it is slower in us too: no float check needed
    most_active = 0
    for r in range(ep):
        most_active = max(most_active, fixed_active[r] + on_ptr[r + 1] - on_ptr[r])
    slack = abs(o - c * o_u) * most_active / c
    if not t_home - best_t > 2 * slack + 1:
        if (times_us(home_y, fixed, fixed_active, hold_ptr, hold_rank, c, o).max()
                < times_us(best_y, fixed, fixed_active, hold_ptr, hold_rank, c, o).max()):
            return home_y
    return best_y


@njit(cache=True)
def assign(cnt, owner, multi, y, out):
    """Fill ``out [ep_src, E, ep_dst]`` (zeros): an expert with one copy, all of it there; a
    replicated one by locality first (each source keeps what its own rank computes of ``y``, the
    rest fills the remaining room, sources and destinations in rank order: the north-west corner
    rule on what is left)."""
    ep, E = cnt.shape
    for e in range(E):
        r = owner[e]
        if r >= 0:
            for s in range(ep):
                out[s, e, r] = cnt[s, e]
    room = np.zeros(ep, np.int64)
    for i in range(multi.shape[0]):
        e = multi[i]
        for d in range(ep):
            own = min(cnt[d, e], y[i, d])
            out[d, e, d] = own
            room[d] = y[i, d] - own
        d = 0
        for s in range(ep):
            # a source with tokens left has its own rank's room used up: never sends to itself
            need = cnt[s, e] - out[s, e, s]
            while need > 0:
                while d < ep and room[d] == 0:
                    d += 1
                if d == ep:
                    raise ValueError("the per-rank totals y do not add up to the counts")
                mv = min(need, room[d])
                out[s, e, d] += mv
                room[d] -= mv
                need -= mv
