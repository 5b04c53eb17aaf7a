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
def min_max_tokens_ws(y, load, M, hold_ptr, hold_rank, on_ptr, on_idx, off, ws, cutoff):
    """The exact token split in place on ``(y, load)`` (``load`` includes each rank's fixed work),
    over the copies ``k`` not ``off[k]``, from ``M``, a lower bound of the optimum: augmenting paths
    from the most-loaded rank to one below ``M``, which rises to a closed set's average when no such
    path exists, until no rank is above ``M`` (``policy.split``'s docstring has the proof). Returns
    the optimum (the slowest rank), or, as soon as ``M`` reaches ``cutoff``, ``M``: a lower bound
    of it, the split left unfinished. ``ws``: work arrays ``[5, ep]``."""
    ep = load.shape[0]
    parent_rank, parent_exp, seen, frontier, following = ws[0], ws[1], ws[2], ws[3], ws[4]  # work arrays [5, ep]
    while True:
        u = np.argmax(load)  # the first most-loaded rank
        top = load[u]
        if top <= M:
            return top
        if M >= cutoff:  # the optimum is at least M: the caller needs no more
            return M
        seen[:] = 0
        seen[u] = 1
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
                        if seen[b] == 1 or off[kk]:
                            continue
                        seen[b] = 1
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
                if seen[r] == 1:
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
def exact_tokens(y, load, fixed, total_tokens, hold_ptr, hold_rank, on_ptr, on_idx):
    """The exact token split, in place on ``(y, load)``, over every copy, from the lower bound
    ``M`` = the larger of the mean load and the largest fixed load."""
    M = max(-(-total_tokens // load.shape[0]), fixed.max())
    min_max_tokens_ws(y, load, M, hold_ptr, hold_rank, on_ptr, on_idx, np.zeros(hold_rank.shape[0], np.bool_),
                      np.zeros((5, load.shape[0]), np.int64), np.iinfo(np.int64).max)


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
def token_polish(y0, fixed, fixed_active, hold_ptr, hold_rank, on_ptr, on_idx, c, o, max_moves):
    """Fewer tokens on the busiest rank at no higher slowest time: moves of part of a fragment
    from the rank with the most tokens to another holder of the expert whose time (us: ``c`` per
    token, ``o`` per active copy, a holder that starts computing the expert paying ``o``) stays
    within the split's slowest time, the largest move first; it stops when the busiest rank can
    shed nothing or shares the most tokens with another rank (a move could not lower the most).
    A time split leaves most ranks below its slowest one; among splits of that time, one with
    fewer tokens on its busiest rank errs less when the cost model is off. Greedy: not the fewest
    possible. Returns ``(y, tokens per rank)``; every rank's time in us (``times_us``'s float
    operations) stays at or below the slowest time of ``y0``, so the slowest never rises."""
    y = y0.copy()
    ep = fixed.shape[0]
    tokens = fixed.copy()
    act = fixed_active.copy()
    for i in range(y.shape[0]):
        for k in range(hold_ptr[i], hold_ptr[i + 1]):
            r = hold_rank[k]
            tokens[r] += y[i, r]
            if y[i, r] > 0:
                act[r] += 1
    times = np.empty(ep, np.float64)
    for r in range(ep):
        times[r] = c * float(tokens[r]) + o * float(act[r])
    cap = times.max()
    for _ in range(max_moves):
        u = np.argmax(tokens)  # the first busiest rank
        top = tokens[u]
        tied = False
        for r in range(ep):
            if r != u and tokens[r] == top:
                tied = True
        if tied:
            break
        best = 0
        bi = -1
        bb = -1
        for k in range(on_ptr[u], on_ptr[u + 1]):
            i = on_idx[k]
            frag = y[i, u]
            if frag <= 0:
                continue
            for kk in range(hold_ptr[i], hold_ptr[i + 1]):
                b = hold_rank[kk]
                if b == u:
                    continue
                new = 0 if y[i, b] > 0 else 1
                room = (cap - times[b] - o * new) / c
                if room < 1.0:
                    continue
                mv = min(frag, (top - tokens[b]) // 2)
                if room < mv:
                    mv = int(room)
                # exactly the float operations of times_us: never above cap
                while mv > 0 and c * float(tokens[b] + mv) + o * float(act[b] + new) > cap:
                    mv -= 1
                if mv > best:
                    best, bi, bb = mv, i, b
        if bi < 0:
            break
        if y[bi, bb] == 0:
            act[bb] += 1
        if best == y[bi, u]:
            act[u] -= 1
        y[bi, u] -= best
        y[bi, bb] += best
        tokens[u] -= best
        tokens[bb] += best
        times[u] = c * float(tokens[u]) + o * float(act[u])
        times[bb] = c * float(tokens[bb]) + o * float(act[bb])
    return y, tokens


BIG = np.iinfo(np.int64).max // 4  # a bound no split reaches (no split at most the target)
MAX_BRANCH_HOLDERS = 6  # the search branches on experts with at most this many copies (2^6 - 1 sets)


@njit(cache=True)
def _copies_off(mask, tot, hold_ptr, off):
    """Fill ``off`` with the copies a split may not use under the decisions ``mask`` (per
    replicated expert: 0 open, else the bit set of its active holders): those of experts without
    tokens and those outside a decided expert's set."""
    for i in range(tot.shape[0]):
        for k in range(hold_ptr[i], hold_ptr[i + 1]):
            off[k] = tot[i] <= 0 or (mask[i] != 0 and (mask[i] >> (k - hold_ptr[i])) & 1 == 0)


@njit(cache=True)
def _relaxation(mask, T, tot, fixed, fixed_active, hold_ptr, hold_rank, on_ptr, on_idx, o_u, off, y, load, ws, base,
                pieces, taken, cutoff):
    """A lower bound on every split at most ``T`` (token units) that keeps the decisions ``mask``
    (per replicated expert: 0 open, else the bit set of its holders, in ``hold_rank`` order, that
    are active), and its split in ``(y, load)``; ``T`` = the incumbent less one: only a faster
    split matters. A decided expert puts its tokens on its active copies, each paying ``o_u`` (one
    active copy: all of them there). ``base [ep]``: the work no split below the node moves (fixed
    work, the decided copies' ``o_u``, single-copy decided experts). An open expert with tokens
    can use a holder only where a piece of at least one token and its ``o_u`` fit under ``T`` on
    top of ``base`` (``off`` filled here, with the decided experts' unused copies), so it needs at
    least ``pieces[i]`` copies (the fewest whose room, largest first, holds its tokens); it carries
    its tokens plus ``pieces[i] o_u`` over its usable holders (a split over copies ``S`` puts
    ``x_r + o_u`` on each copy of ``S``, in all its tokens plus ``|S| o_u`` >= ``pieces[i] o_u``:
    those amounts, scaled down to the carried total, are a relaxed placement no heavier on any
    rank, so the relaxation bounds every such split from below; with ``T`` unbounded, one ``o_u``
    and every holder: the LP relaxation of the time MILP). The exact token split of these amounts over the
    usable copies is the bound: its slowest rank; ``BIG`` when an open expert's tokens fit on no
    set of its holders (no split at most ``T`` here). Built from scratch, every expert first on
    its least-loaded usable holder: warm-started from a parent's split, the same bound comes with
    more experts left split, and the search's leaves and branching got worse (at E 128, EP 8, 2 of
    480 steps above 0.5% of the optimum instead of none). ``taken``: work flags, one per copy."""
    ep = fixed.shape[0]
    m = tot.shape[0]
    for r in range(ep):
        base[r] = fixed[r] + o_u * fixed_active[r]
    _copies_off(mask, tot, hold_ptr, off)
    for i in range(m):
        if mask[i] == 0 or tot[i] <= 0:
            continue
        n = 0
        last = -1
        for k in range(hold_ptr[i], hold_ptr[i + 1]):
            if not off[k]:  # a decided expert's active copy pays o_u
                base[hold_rank[k]] += o_u
                n += 1
                last = hold_rank[k]
        if n == 1:
            base[last] += tot[i]
    for i in range(m):  # the usable copies of the open experts and their fewest pieces
        pieces[i] = 0
        if mask[i] != 0 or tot[i] <= 0:
            continue
        room = 0
        for k in range(hold_ptr[i], hold_ptr[i + 1]):
            cap = T - base[hold_rank[k]] - o_u  # the most tokens a piece on this copy can take
            taken[k] = False
            if cap < 1:
                off[k] = True
            elif room < tot[i]:  # (summed only up to the tokens: no overflow at a huge T)
                room += cap
        if room < tot[i]:
            return BIG
        need = tot[i]
        while need > 0:  # the largest rooms first: the fewest copies that hold the tokens
            bk = -1
            for k in range(hold_ptr[i], hold_ptr[i + 1]):
                if not off[k] and not taken[k] and (bk < 0 or base[hold_rank[k]] < base[hold_rank[bk]]):
                    bk = k
            if bk < 0:  # (cannot happen: the rooms above hold the tokens)
                return BIG
            taken[bk] = True
            need -= T - base[hold_rank[bk]] - o_u
            pieces[i] += 1
    M = 0
    for r in range(ep):
        load[r] = base[r]
        M = max(M, base[r])
    for i in range(m):
        for k in range(hold_ptr[i], hold_ptr[i + 1]):
            y[i, hold_rank[k]] = 0  # amounts only ever sit on holders
        if tot[i] <= 0:
            continue
        n = 0
        best = -1
        for k in range(hold_ptr[i], hold_ptr[i + 1]):  # all on the least-loaded allowed holder
            r = hold_rank[k]
            if not off[k]:
                n += 1
                if best < 0 or load[r] < load[best]:
                    best = r
        if mask[i] != 0 and n == 1:
            y[i, best] = tot[i]  # in base already: no split moves it
            continue
        size = tot[i] + (o_u * pieces[i] if mask[i] == 0 else 0)
        y[i, best] = size
        load[best] += size
    total = 0
    for r in range(ep):
        total += load[r]
    return min_max_tokens_ws(y, load, max(M, -(-total // ep)), hold_ptr, hold_rank, on_ptr, on_idx, off, ws, cutoff)


@njit(cache=True)
def _reseat(y, load, i, old, new, tot, hold_ptr, hold_rank, o_u):
    """Expert ``i``'s amount leaves every holder of it in ``(y, load)``, each copy in the bit set
    ``old`` stops paying ``o_u`` and each in ``new`` starts, and its tokens go to the least-loaded
    rank of ``new`` (ties to the first holder): the start from which a changed set is re-split."""
    p = hold_ptr[i]
    best = -1
    for k in range(p, hold_ptr[i + 1]):
        r = hold_rank[k]
        load[r] -= y[i, r]
        y[i, r] = 0
        load[r] += o_u * (((new >> (k - p)) & 1) - ((old >> (k - p)) & 1))
        if (new >> (k - p)) & 1 == 1 and (best < 0 or load[r] < load[best]):
            best = r
    y[i, best] = tot[i]
    load[best] += tot[i]


@njit(cache=True)
def _popcount(x):
    n = 0
    while x:
        x &= x - 1
        n += 1
    return n


ROUND_EVERY = 2  # the search rounds its relaxed split at every second branching node


@njit(cache=True)
def _rounded(y, mask, t_best, tot, fixed, fixed_active, hold_ptr, hold_rank, on_ptr, on_idx, o_u, ws, taken, mask2, off2,
             y2, load2, base2, pieces2):
    """A split near a node's relaxed split ``y``: each open expert active on the copies its relaxed
    amount uses, a decided one on its set; the exact split of those sets (:func:`_relaxation` with
    every expert decided), in ``y2``, polished by the local search's moves when it beats the
    incumbent ``t_best``. Returns its slowest time (token units). A diving heuristic: on
    stationary resident placements at E 512, EP 32 the search's leaves come too late within its
    budget, and a split this close to a good relaxation is often better than the incumbent (every
    second node: the last step above 0.5% of the optimum in 4 x 240 generated steps went, for a
    few us more per split at E 128, EP 8 with a node budget of 5/6)."""
    m, ep = y.shape
    for i in range(m):
        mask2[i] = mask[i]
        if mask[i] == 0 and tot[i] > 0:
            for k in range(hold_ptr[i], hold_ptr[i + 1]):
                if y[i, hold_rank[k]] > 0:
                    mask2[i] |= 1 << (k - hold_ptr[i])
    _relaxation(mask2, BIG, tot, fixed, fixed_active, hold_ptr, hold_rank, on_ptr, on_idx, o_u, off2, y2, load2, ws,
                base2, pieces2, taken, BIG)
    tokens = fixed.copy()
    for i in range(m):
        for k in range(hold_ptr[i], hold_ptr[i + 1]):
            tokens[hold_rank[k]] += y2[i, hold_rank[k]]
    return _polished_if_faster(y2, tokens, t_best, fixed_active, hold_ptr, hold_rank, on_ptr, on_idx, o_u)


@njit(cache=True)
def _polished_if_faster(x, tokens, t_best, fixed_active, hold_ptr, hold_rank, on_ptr, on_idx, o_u):
    """The slowest time (token units) of the split ``x`` (``tokens``: its tokens per rank), after
    the local search's moves, applied to ``x`` in place, when it beats ``t_best`` (a split exact for
    its active sets can still gain from moves between them)."""
    t = unit_times(x, tokens, fixed_active, hold_ptr, hold_rank, o_u).max()
    if t < t_best:
        x2, t2 = _local_search(x, tokens, fixed_active, hold_ptr, hold_rank, on_ptr, on_idx, o_u, 0, 64)
        if t2 < t:
            x[:, :] = x2
            return t2
    return t


@njit(cache=True)
def time_search(y_best, t_best, tot, fixed, fixed_active, hold_ptr, hold_rank, on_ptr, on_idx, o_u, max_nodes):
    """Branch and bound over which copies of each replicated expert are active (token units). A node
    decides the active holder sets of some experts and is bounded by :func:`_relaxation` at the
    incumbent less one (a holder without room for a piece is out, an expert needing several
    pieces pays for them: the bound tightens as the incumbent falls); where every open expert's
    relaxed amount sits on one copy, that relaxed split is a split (the open experts all on that
    copy) and no split below the node is faster than it. Else it branches on the open expert with
    the fewest usable holders among those split (the most constrained; ties to the one farthest
    from unsplit: the most of its amount off its largest fragment, then the lower index), one
    child per nonempty set of its usable holders with at least its fewest pieces, the relaxed
    split's own set first (depth first); at every ``ROUND_EVERY``-th node it branches at, the
    relaxed split is rounded to a split (:func:`_rounded`), taken when faster. Starts from the
    incumbent ``(y_best, t_best)`` (updated in place) and prunes a node whose bound reaches the
    incumbent, so a search that ends is exact.
    Returns ``(t_best, nodes, complete)``: ``complete`` False when the budget of ``max_nodes`` node
    bounds stopped it with nodes left or a split expert had more than ``MAX_BRANCH_HOLDERS`` copies
    (the incumbent is then the best found)."""
    m, ep = y_best.shape
    nk = hold_rank.shape[0]
    mask = np.zeros(m, np.int64)
    off = np.zeros(nk, np.bool_)
    taken = np.zeros(nk, np.bool_)
    stack_i = np.empty(m, np.int64)
    stack_first = np.empty(m, np.int64)
    stack_next = np.empty(m, np.int64)  # the next set to try (1, 2, ..., skipping the first)
    stack_usable = np.empty(m, np.int64)  # the bit set of the holders usable at the branching node
    stack_pieces = np.empty(m, np.int64)  # and the fewest copies there
    y = np.zeros((m, ep), np.int64)
    x = np.zeros((m, ep), np.int64)
    load = np.zeros(ep, np.int64)
    base = np.zeros(ep, np.int64)
    pieces = np.zeros(m, np.int64)
    ws = np.zeros((5, ep), np.int64)
    mask2 = np.zeros(m, np.int64)  # the rounded split's work arrays
    off2 = np.zeros(nk, np.bool_)
    y2 = np.zeros((m, ep), np.int64)
    load2 = np.zeros(ep, np.int64)
    base2 = np.zeros(ep, np.int64)
    pieces2 = np.zeros(m, np.int64)
    depth = 0
    nodes = 0
    complete = True
    bound = _relaxation(mask, t_best - 1, tot, fixed, fixed_active, hold_ptr, hold_rank, on_ptr, on_idx, o_u, off, y,
                        load, ws, base, pieces, taken, t_best)
    while True:
        nodes += 1
        descend = False
        if bound < t_best:
            ib = -1
            ib_usable = 0
            worst = -1
            unbranched = False
            for i in range(m):
                if mask[i] != 0 or tot[i] <= 0:
                    continue
                n_pos = 0
                n_usable = 0
                big = 0
                top = 0
                for k in range(hold_ptr[i], hold_ptr[i + 1]):
                    n_usable += not off[k]
                    v = y[i, hold_rank[k]]
                    if v > 0:
                        n_pos += 1
                        big = max(big, v)
                        top += v
                top -= big  # the amount off its largest fragment: how far from unsplit
                if n_pos > 1:
                    if hold_ptr[i + 1] - hold_ptr[i] > MAX_BRANCH_HOLDERS:  # too many sets to enumerate
                        unbranched = True
                    elif ib < 0 or n_usable < ib_usable or (n_usable == ib_usable and top > worst):
                        ib, ib_usable, worst = i, n_usable, top
            if ib < 0 and unbranched:  # split over an expert with too many holders: left unexplored
                complete = False
            elif ib < 0:  # the relaxed split is a split: the best below this node
                tokens = fixed.copy()
                for i in range(m):
                    for r in range(ep):
                        v = y[i, r]
                        if v > 0 and mask[i] == 0:
                            v = tot[i]
                        x[i, r] = v
                        tokens[r] += v
                t = _polished_if_faster(x, tokens, t_best, fixed_active, hold_ptr, hold_rank, on_ptr, on_idx, o_u)
                if t < t_best:
                    t_best = t
                    y_best[:, :] = x
            else:
                if nodes % ROUND_EVERY == 0:  # a split near the relaxation: a better incumbent prunes more
                    t = _rounded(y, mask, t_best, tot, fixed, fixed_active, hold_ptr, hold_rank, on_ptr, on_idx, o_u,
                                 ws, taken, mask2, off2, y2, load2, base2, pieces2)
                    if t < t_best:
                        t_best = t
                        y_best[:, :] = y2
                first = 0
                usable = 0
                for k in range(hold_ptr[ib], hold_ptr[ib + 1]):
                    if y[ib, hold_rank[k]] > 0:
                        first |= 1 << (k - hold_ptr[ib])
                    if not off[k]:
                        usable |= 1 << (k - hold_ptr[ib])
                stack_i[depth] = ib
                stack_first[depth] = first
                stack_next[depth] = 1
                stack_usable[depth] = usable
                stack_pieces[depth] = pieces[ib]
                mask[ib] = first
                depth += 1
                if nodes >= max_nodes:
                    return t_best, nodes, False
                bound = _relaxation(mask, t_best - 1, tot, fixed, fixed_active, hold_ptr, hold_rank, on_ptr, on_idx,
                                    o_u, off, y, load, ws, base, pieces, taken, t_best)
                descend = True
        if not descend:  # the next sibling of the deepest expert with sets left, else up
            while depth > 0:
                d = depth - 1
                i = stack_i[d]
                s = stack_next[d]
                end = 1 << (hold_ptr[i + 1] - hold_ptr[i])
                # sets with a holder unusable at the branching node, or fewer copies than the
                # tokens need there, have no split at most the incumbent less one (nor later,
                # with a lower incumbent)
                while s < end and (s == stack_first[d] or s & ~stack_usable[d] != 0
                                   or _popcount(s) < stack_pieces[d]):
                    s += 1
                if s < end:
                    if nodes >= max_nodes:  # the budget is spent with nodes left
                        return t_best, nodes, False
                    mask[i] = s
                    stack_next[d] = s + 1
                    bound = _relaxation(mask, t_best - 1, tot, fixed, fixed_active, hold_ptr, hold_rank, on_ptr,
                                        on_idx, o_u, off, y, load, ws, base, pieces, taken, t_best)
                    break
                mask[i] = 0
                depth -= 1
            if depth == 0:
                return t_best, nodes, complete


# the active-set search prices at most ACTIVE_SET_FIRST_EVALS splits (about 1 us each at E 128,
# EP 8) before the branch and bound, from the local search's split (a better incumbent: the search
# prunes more), and 2 x max(ACTIVE_SET_EVALS, ranks) after a branch and bound that did not end
# (each move relieves one group of slowest ranks, and there are more of those with more ranks).
# On generated resident steps (3 x 240 at E 512, EP 32) the first search brought the steps more
# than 0.5% above the optimum from 29 to 15 (with ranks // 2 splits after; at E 128, EP 8, 2 x 240,
# none before or after). With the branch and bound's bound at a target, 64 splits after instead of
# 16 took them from 4 to 1 at E 512 (16 instead of 8 at E 128: the worst step 0.35% instead of
# 0.49%, about 3 us more at the median)
ACTIVE_SET_FIRST_EVALS = 4
ACTIVE_SET_EVALS = 8
MAX_SET_HOLDERS = 62  # an active set is a bit set of an expert's holders (int64; shifts stay below the sign bit)


@njit(cache=True)
def _tight_ranks(y, load, mask, hold_ptr, hold_rank, on_ptr, on_idx, seen, stack):
    """Mark in ``seen`` the ranks that reach a slowest rank's work: the slowest ranks and, from
    them, every rank sharing an expert with a marked rank through that expert's active copies.
    Their copies are the only ones whose change can lower the slowest time."""
    ep = load.shape[0]
    top = load.max()
    n = 0
    for r in range(ep):
        seen[r] = load[r] == top
        if seen[r]:
            stack[n] = r
            n += 1
    while n > 0:
        n -= 1
        a = stack[n]
        for k in range(on_ptr[a], on_ptr[a + 1]):
            i = on_idx[k]
            if y[i, a] <= 0:
                continue
            p = hold_ptr[i]
            for kk in range(p, hold_ptr[i + 1]):
                b = hold_rank[kk]
                if not seen[b] and (mask[i] >> (kk - p)) & 1 == 1:
                    seen[b] = True
                    stack[n] = b
                    n += 1


@njit(cache=True)
def _with_set(y, load, i, old, new, mask, tot, fixed, fixed_active, hold_ptr, hold_rank, on_ptr, on_idx, o_u, off, ws,
              cutoff, y2, load2):
    """The exact split, in ``(y2, load2)``, of the decided sets ``mask`` with expert ``i``'s set
    changed from ``old`` to ``new`` (``mask[i]`` already ``new``), from the split ``(y, load)`` of
    the sets before: ``i``'s tokens leave its copies, each copy out of the set stops paying
    ``o_u`` and each new one starts, its tokens start on the set's least-loaded rank, and the
    token split is re-solved from a lower bound (the mean, or the largest work no split moves).
    The same value as :func:`_relaxation` of ``mask`` at an unbounded target (both exact), for a
    few pushes instead of a split from scratch. Returns the slowest rank, or a lower bound of it at
    ``cutoff``."""
    ep = load.shape[0]
    y2[:, :] = y
    load2[:] = load
    _reseat(y2, load2, i, old, new, tot, hold_ptr, hold_rank, o_u)
    _copies_off(mask, tot, hold_ptr, off)
    # work no split moves: fixed work and every active copy's o_u
    stay = ws[0]
    for r in range(ep):
        stay[r] = fixed[r] + o_u * fixed_active[r]
    for e in range(tot.shape[0]):
        for k in range(hold_ptr[e], hold_ptr[e + 1]):
            if not off[k]:
                stay[hold_rank[k]] += o_u
    total = 0
    M = 0
    for r in range(ep):
        total += load2[r]
        M = max(M, stay[r])
    return min_max_tokens_ws(y2, load2, max(M, -(-total // ep)), hold_ptr, hold_rank, on_ptr, on_idx, off, ws, cutoff)


@njit(cache=True)
def active_set_search(y_best, tot, fixed, fixed_active, hold_ptr, hold_rank, on_ptr, on_idx, o_u, max_evals):
    """Local search over the active sets, from the split ``y_best`` (token units): each replicated
    expert's set of active copies is fixed to those ``y_best`` uses, and the exact split within
    those sets (each active copy paying ``o_u``: what :func:`_relaxation` gives with every expert
    decided) is the start. For each expert active on a rank that reaches a slowest rank
    (:func:`_tight_ranks`), a move adds one of its inactive copies (priced once per round) or takes
    that rank's copy out of a set of two or more (a copy left without tokens too: it still pays
    ``o_u``); each move is priced by the exact split of its sets (:func:`_with_set`), and the best
    one is taken when it lowers the slowest time, or keeps it with fewer ranks at it (independent
    groups of slowest ranks are relieved one at a time).
    Stops when no move helps or after ``max_evals`` splits. Where the branch and bound stops
    early, its best split often has the right copies but not the right active sets: on real
    routing (generated steps, resident placements) this brought the steps more than 0.5% above the
    optimum from 21 to 12 of 240 at E 512, EP 32 and from 2 to 0 at E 128, EP 8. Returns ``(y,
    slowest time in units, splits priced)``, the time counting a copy left without tokens as
    active (so at least the split's own); ``(y_best, -1, 0)`` when an expert has more holders
    than a set can hold."""
    m, ep = y_best.shape
    nk = hold_rank.shape[0]
    mask = np.zeros(m, np.int64)
    for i in range(m):
        if tot[i] <= 0:
            continue
        if hold_ptr[i + 1] - hold_ptr[i] > MAX_SET_HOLDERS:
            return y_best, -1, 0
        for k in range(hold_ptr[i], hold_ptr[i + 1]):
            if y_best[i, hold_rank[k]] > 0:
                mask[i] |= 1 << (k - hold_ptr[i])
    off = np.zeros(nk, np.bool_)
    ws = np.zeros((5, ep), np.int64)
    y = np.zeros((m, ep), np.int64)
    load = np.zeros(ep, np.int64)
    y2 = np.zeros((m, ep), np.int64)
    load2 = np.zeros(ep, np.int64)
    yb = np.zeros((m, ep), np.int64)
    lb = np.zeros(ep, np.int64)
    seen = np.zeros(ep, np.bool_)
    stack = np.zeros(ep, np.int64)
    tried = np.zeros(m, np.int64)  # the round in which an expert's added copies were priced
    it = 0
    big = np.iinfo(np.int64).max
    # the start: y_best's split re-solved within its own sets (the same value as _relaxation of them
    # at an unbounded target, from a split already near it)
    for r in range(ep):
        load[r] = fixed[r] + o_u * fixed_active[r]
    for i in range(m):
        for k in range(hold_ptr[i], hold_ptr[i + 1]):
            r = hold_rank[k]
            y[i, r] = y_best[i, r]
            load[r] += y[i, r] + o_u * ((mask[i] >> (k - hold_ptr[i])) & 1)
    _copies_off(mask, tot, hold_ptr, off)
    M = 0
    total = 0
    for r in range(ep):
        total += load[r]
        M = max(M, load[r] - (y[:, r].sum()))  # work no split moves
    cur = min_max_tokens_ws(y, load, max(M, -(-total // ep)), hold_ptr, hold_rank, on_ptr, on_idx, off, ws, big)
    evals = 1
    while evals < max_evals:
        n_top = 0
        for r in range(ep):
            if load[r] == cur:
                n_top += 1
        _tight_ranks(y, load, mask, hold_ptr, hold_rank, on_ptr, on_idx, seen, stack)
        best_v = cur
        best_n = n_top
        best_i = -1
        best_m = 0
        it += 1
        for a in range(ep):
            if not seen[a]:
                continue
            for k in range(on_ptr[a], on_ptr[a + 1]):
                i = on_idx[k]
                p = hold_ptr[i]
                old = mask[i]
                n_act = 0
                own = -1
                for kk in range(p, hold_ptr[i + 1]):
                    n_act += (old >> (kk - p)) & 1
                    if hold_rank[kk] == a:
                        own = kk - p
                if (old >> own) & 1 == 0:
                    continue  # i is not computed on a
                for kk in range(p, hold_ptr[i + 1]):
                    bit = 1 << (kk - p)
                    if kk - p == own:
                        if n_act < 2:
                            continue
                        new = old & ~bit  # a's copy less (with or without tokens)
                    elif old & bit == 0 and tried[i] != it:
                        new = old | bit  # a copy more (once per expert and round)
                    else:
                        continue
                    if evals >= max_evals:
                        break
                    mask[i] = new
                    v = _with_set(y, load, i, old, new, mask, tot, fixed, fixed_active, hold_ptr, hold_rank, on_ptr,
                                  on_idx, o_u, off, ws, cur + 1, y2, load2)
                    evals += 1
                    mask[i] = old
                    if v <= cur:
                        n2 = 0
                        for r in range(ep):
                            if load2[r] == v:
                                n2 += 1
                        if v < best_v or (v == best_v and n2 < best_n):
                            best_v, best_n, best_i, best_m = v, n2, i, new
                            yb[:, :] = y2
                            lb[:] = load2
                tried[i] = it
        if best_i < 0:
            break
        mask[best_i] = best_m
        cur = best_v
        y[:, :] = yb
        load[:] = lb
    return y, cur, evals


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
                n_active_min, hold_ptr, hold_rank, on_ptr, on_idx, home_ok, o_u, c, o, max_nodes):
    """The time objective's split from the exact token split ``(y, load)``: the local search from
    up to three starts (that split, the unsplit start, the static split), the best kept; then,
    unless it meets the lower bound, the search from it (:func:`_search_from`: the active-set
    search, then the branch and bound, :func:`time_search`, at most ``max_nodes`` node bounds; 0:
    none); never a split slower in us than the static one (``policy.split``'s docstring); with a
    search, then fewer tokens on the busiest rank where :func:`token_polish`'s moves allow at no
    higher slowest time. Returns ``(y, nodes, complete)``: the search's node bounds and whether
    the split is known optimal in token units (the branch and bound ended, or the local search or
    the first active-set search met the lower bound)."""
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
        best_y, best_t, nodes, complete = _search_from(best_y, best_t, bound, total[multi], fixed, fixed_active,
                                                       hold_ptr, hold_rank, on_ptr, on_idx, o_u, max_nodes)
        return _polished(best_y, max_nodes, fixed, fixed_active, hold_ptr, hold_rank, on_ptr, on_idx, c, o), nodes, \
            complete
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
    best_y, best_t, nodes, complete = _search_from(best_y, best_t, bound, total[multi], fixed, fixed_active, hold_ptr,
                                                   hold_rank, on_ptr, on_idx, o_u, max_nodes)
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
            best_y = home_y
    return _polished(best_y, max_nodes, fixed, fixed_active, hold_ptr, hold_rank, on_ptr, on_idx, c, o), nodes, \
        complete


@njit(cache=True)
def _polished(y, max_nodes, fixed, fixed_active, hold_ptr, hold_rank, on_ptr, on_idx, c, o):
    """The dispatch split (``max_nodes`` > 0): ``y`` after :func:`token_polish` (its slowest time
    in us unchanged or lower); a planner pricing placements (no search) needs times only."""
    if max_nodes <= 0:
        return y
    return token_polish(y, fixed, fixed_active, hold_ptr, hold_rank, on_ptr, on_idx, c, o, 64)[0]


@njit(cache=True)
def _search_from(best_y, best_t, bound, tot, fixed, fixed_active, hold_ptr, hold_rank, on_ptr, on_idx, o_u, max_nodes):
    """``(y, time, nodes, complete)``: unless the local search's best ``(best_y, best_t)`` meets
    ``bound`` (or ``max_nodes`` is 0), :func:`active_set_search` from it (at most
    ``ACTIVE_SET_FIRST_EVALS`` splits), then the branch and bound from the better of the two; a
    search stopped early has its best split improved by the active-set search again (at most
    ``2 max(ACTIVE_SET_EVALS, ranks)`` splits). Each active-set search's split is polished by
    the local search's moves (its leaves are exact splits of their active sets, not of the moves
    between them)."""
    if best_t <= bound or max_nodes <= 0:
        return best_y, best_t, 0, best_t <= bound  # complete: optimal (without a search, only at the bound)
    best_y, best_t = _improved_sets(best_y, best_t, bound, tot, fixed, fixed_active, hold_ptr, hold_rank, on_ptr,
                                    on_idx, o_u, ACTIVE_SET_FIRST_EVALS)
    if best_t <= bound:
        return best_y, best_t, 0, True
    best_t, nodes, complete = time_search(best_y, best_t, tot, fixed, fixed_active, hold_ptr, hold_rank, on_ptr,
                                          on_idx, o_u, max_nodes)
    if not complete:
        best_y, best_t = _improved_sets(best_y, best_t, bound, tot, fixed, fixed_active, hold_ptr, hold_rank, on_ptr,
                                        on_idx, o_u, 2 * max(ACTIVE_SET_EVALS, fixed.shape[0]))
    return best_y, best_t, nodes, complete


@njit(cache=True)
def _improved_sets(best_y, best_t, bound, tot, fixed, fixed_active, hold_ptr, hold_rank, on_ptr, on_idx, o_u,
                   max_evals):
    """``(y, time)``: :func:`active_set_search` from ``best_y`` (at most ``max_evals`` splits), its
    split taken when faster, then the local search's moves (token units; never slower)."""
    y3, t3, _ = active_set_search(best_y, tot, fixed, fixed_active, hold_ptr, hold_rank, on_ptr, on_idx, o_u, max_evals)
    if 0 <= t3 < best_t:  # (t3: copies left without tokens still counted, so at most that)
        best_y, best_t = y3, t3
    tokens = fixed + best_y.sum(axis=0)
    y2, t2 = _local_search(best_y, tokens, fixed_active, hold_ptr, hold_rank, on_ptr, on_idx, o_u, bound, 64)
    if t2 < best_t:
        return y2, t2
    return best_y, best_t


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
