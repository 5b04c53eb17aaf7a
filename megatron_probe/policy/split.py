"""The split at dispatch: how the true tokens of each expert are divided among the copies that
exist, so that the slowest rank finishes first. Host code (NumPy and small Python lists),
deterministic: every rank computes the same split from the same all-gathered counts.

:func:`balanced_split` with ``objective="tokens"`` is **exact**: it minimises the most (token,
expert) pairs on any rank. Only the total each rank computes of each expert matters for the
loads (``y [E, ep]``); the per-source split is derived afterwards, keeping tokens on their own
rank first (:func:`locality_first`). An expert with one copy has no choice, so the search runs
on the replicated experts only (at most ``ep x R``), on top of each rank's fixed load.

Algorithm (augmenting paths on the ranks, with a rising lower bound ``M``). Start from a valid
``y`` (locality first, the rest on the least-loaded holder) and ``M`` = the larger of
``ceil(total / ep)`` and the largest fixed load, both lower bounds of the optimum. Repeat: take a
most-loaded rank ``u`` with load ``> M``; search (breadth first) the ranks reachable from ``u``,
where ``a -> b`` exists when ``a`` computes tokens of an expert ``b`` also holds; if one of them,
``t``, has load ``< M``, push ``min(bottleneck, load(u) - M, M - load(t))`` tokens along the path
(the ranks inside keep their load). If none, the set ``T`` of ranks reached is closed: every
token on ``T`` belongs to an expert whose copies are all in ``T``, so every split puts
``load(T)`` on ``T`` and ``ceil(load(T) / |T|)`` (``> M``, since ``u`` is above ``M`` and no rank
of ``T`` below it) is a lower bound: ``M`` rises to it. It stops when no rank is above ``M``:
then the maximum is ``M``, a lower bound, hence optimal. Each push lowers an excess, a deficit or
saturates a path edge, and ``M`` only rises up to the optimum, so it terminates: at E = 128,
EP = 8 after 7-10 pushes or raises (median; at most 17 seen), where pushing from the top rank by
half the difference took about 230.

``objective="time"`` adds the per-active-expert cost of the cost model (a copy that computes at
least one token costs ``o`` token units): single moves between two holders (a whole fragment or
part of it) are applied while they lower the slower of the two ranks below the current maximum
time, from up to three starts (the exact token split, the unsplit start, and the static split,
so the result is never slower than no replication), and the best result is kept; a start that already meets a lower bound on time (the largest fixed rank time, or the
tokens plus one ``o`` per expert with tokens spread over the ranks) is optimal and ends the
search. A local search, not exact: ``optimal.exact_split`` with ``objective="time"`` is its
yardstick (docs/balancer.md has the measured gaps).
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import numpy as np
import torch

from megatron_probe.policy.cost_model import ExpertCost
from megatron_probe.policy.placement import validate_placement


def _north_west(c: np.ndarray, y: np.ndarray) -> np.ndarray:
    """``[ep, m, ep]``: sources ``c [ep, m]`` keep what their own rank computes of ``y [m, ep]``,
    the rest fills the remaining room in rank order, sources in rank order (north-west corner
    rule: source s gives destination r the overlap of their cumulative intervals)."""
    ep = c.shape[0]
    own = np.minimum(c, y.T)  # [ep, m]
    left = c - own  # per source, what leaves it
    room = y - own.T  # [m, ep] per destination, what it still takes
    l_hi = np.cumsum(left, 0)
    r_hi = np.cumsum(room, 1)
    lo = np.maximum((l_hi - left)[:, :, None], (r_hi - room)[None, :, :])
    part = np.minimum(l_hi[:, :, None], r_hi[None, :, :]) - lo
    np.maximum(part, 0, out=part)
    # a source's leftover never lands on its own rank (left > 0 only where own = y, i.e. no room
    # there), so the diagonal is 0 and own is written, not added
    diag = _arange(ep)
    part[diag, :, diag] = own
    return part


_ARANGE: "dict[int, np.ndarray]" = {}


def _arange(n: int) -> np.ndarray:
    a = _ARANGE.get(n)
    if a is None:
        a = _ARANGE[n] = np.arange(n)
    return a


def locality_first(cnt: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Per-destination totals ``y [E, ep]`` split over the sources ``cnt [ep, E]``: each source
    first keeps what its own rank computes, then the rest fills the remaining room in rank
    order (sources in rank order). Returns ``[ep_src, E, ep_dst]``."""
    ep, E = cnt.shape
    out = np.zeros((ep, E, ep), dtype=np.int64)
    pos = y > 0
    n_dst = pos.sum(1)
    one = np.flatnonzero(n_dst == 1)  # computed on one rank (most experts): all of it goes there
    out[:, one, pos[one].argmax(1)] = cnt[:, one]
    many = np.flatnonzero(n_dst > 1)
    if many.size:
        out[:, many, :] = _north_west(cnt[:, many], y[many])
    return out


class _Holds:
    """What the split needs of ``holds [ep, E]`` alone (cached: a resident placement is split
    step after step): the experts with one copy and their rank, the replicated ones, their
    holders and, per rank, the replicated experts it holds."""

    native_home = False  # set when built from a placement: expert e's only copy is on e // L

    def __init__(self, hold: np.ndarray):
        ep, E = hold.shape
        self.ep, self.E = ep, E
        n_hold = hold.sum(0)
        self.single = np.flatnonzero(n_hold == 1)
        self.owner = hold[:, self.single].argmax(0)
        self.one = np.zeros((ep, E), dtype=np.int64)  # 1 where a rank holds an expert's only copy
        self.one[self.owner, self.single] = 1
        self.multi = np.flatnonzero(n_hold > 1)
        er, rr = np.nonzero(hold[:, self.multi].T)  # by expert, then rank: holders ascend
        self.holders: List[List[int]] = [[] for _ in range(len(self.multi))]
        self.on_rank: List[List[int]] = [[] for _ in range(ep)]
        for i, r in zip(er.tolist(), rr.tolist()):
            self.holders[i].append(r)
            self.on_rank[r].append(i)


    @classmethod
    def from_placement(cls, rows: List[List[int]], E: int) -> "_Holds":
        """The same tables from a checked placement (``[ep][R]`` expert ids, -1 empty) over the
        contiguous natives (expert ``e`` on rank ``e // L``), without the ``[ep, E]`` table:
        plain Python over the few filled slots."""
        h = cls.__new__(cls)
        ep = len(rows)
        L = E // ep
        h.ep, h.E, h.native_home = ep, E, True
        copies: dict = {}
        for r, row in enumerate(rows):
            for e in row:
                if e >= 0:
                    copies.setdefault(e, {e // L}).add(r)
        multi = sorted(copies)
        h.multi = np.array(multi, dtype=np.int64)
        h.holders = [sorted(copies[e]) for e in multi]
        h.on_rank = [[] for _ in range(ep)]
        for i, hs in enumerate(h.holders):
            for r in hs:
                h.on_rank[r].append(i)
        h.multi_home = [e // L for e in multi]
        h.flat_home = _flat_home(E, ep)
        return h


_FLAT_HOME: "dict[tuple, np.ndarray]" = {}


def _flat_home(E: int, ep: int) -> np.ndarray:
    """Column ``e * ep + e // L`` of a ``[src, E * ep]`` assignment: expert ``e`` on its home."""
    key = (E, ep)
    if key not in _FLAT_HOME:
        _FLAT_HOME[key] = np.arange(E) * ep + np.arange(E) // (E // ep)
    return _FLAT_HOME[key]


_HOLDS_CACHE: "dict[tuple, _Holds]" = {}


def _cached(key, build) -> _Holds:
    h = _HOLDS_CACHE.pop(key, None)
    if h is None:
        if len(_HOLDS_CACHE) >= 64:  # least recently used out: placements in use stay
            _HOLDS_CACHE.pop(next(iter(_HOLDS_CACHE)))
        h = build()
    _HOLDS_CACHE[key] = h  # (re)inserted last: dicts keep insertion order
    return h


def _holds(hold: np.ndarray) -> _Holds:
    return _cached((hold.shape, hold.tobytes()), lambda: _Holds(hold))


class _Core:
    """The split reduced to what can move: every rank's fixed load and active count (experts with
    one copy), and the replicated experts' per-rank totals as plain Python lists (small, hot
    loops: faster than NumPy scalar indexing)."""

    def __init__(self, cnt: np.ndarray, h: _Holds, total: np.ndarray):
        ep = h.ep
        self.h, self.ep, self.total_e = h, ep, total
        self.holders, self.on_rank, self.multi = h.holders, h.on_rank, h.multi
        # the replicated experts' counts per source, as one slice (kept for the assignment) and lists
        self.sub = cnt[:, self.multi]
        sub = self.sub.tolist()
        rest = [sum(col) for col in zip(*sub)]  # their totals
        if h.native_home:  # each rank's natives, less its replicated ones (no [ep, E] table)
            blocks = total.reshape(ep, -1).tolist()
            self.fixed = [sum(b) for b in blocks]
            self.fixed_active = [len(b) - b.count(0) for b in blocks]
            for n, home in zip(rest, h.multi_home):
                self.fixed[home] -= n
                self.fixed_active[home] -= n > 0
        else:
            self.fixed = (h.one @ total).tolist()
            self.fixed_active = (h.one @ (total > 0)).tolist()
        self.total = sum(self.fixed) + sum(rest)
        # every expert with tokens is active somewhere
        self.n_active_min = sum(self.fixed_active) + sum(1 for n in rest if n > 0)
        # the start: local tokens stay, the rest on the least-loaded holder, experts with the most
        # such tokens first
        m = len(self.multi)
        y = [[0] * ep for _ in range(m)]
        load = self.fixed[:]
        for i, hs in enumerate(self.holders):
            row = y[i]
            for r in hs:
                v = sub[r][i]
                row[r] = v
                load[r] += v
                rest[i] -= v
        for i in sorted(range(m), key=lambda j: -rest[j]):  # stable
            if rest[i] <= 0:
                break
            hs = self.holders[i]
            r = min(hs, key=load.__getitem__)  # ties: the lower rank (holders ascend)
            y[i][r] += rest[i]
            load[r] += rest[i]
        self.start = y
        self.start_load = load

    def home(self):
        """``(y, load)`` of the static split (every replicated expert on its home rank of the
        contiguous layout), or ``None`` when the holders do not include the homes (any holder
        sets, not a placement over natives)."""
        E, ep = self.h.E, self.ep
        if E % ep:
            return None
        per_rank = E // ep
        y = [[0] * ep for _ in self.multi]
        load = self.fixed[:]
        for row, e, hs in zip(y, self.multi, self.holders):
            home, n = int(e) // per_rank, int(self.total_e[e])
            if home not in hs:
                return None
            row[home] = n
            load[home] += n
        return y, load

    def times(self, y, load, o_u: int) -> List[int]:
        """Rank times in token units: tokens plus ``o_u`` per active copy."""
        act = self.fixed_active[:]
        for row, hs in zip(y, self.holders):
            for r in hs:
                if row[r] > 0:
                    act[r] += 1
        return [load[r] + o_u * act[r] for r in range(self.ep)]

    def assignment(self, cnt: np.ndarray, y) -> np.ndarray:
        """:func:`locality_first` of ``y``: the fixed experts all to their copy, the replicated
        ones by the north-west corner rule."""
        h, ep = self.h, self.ep
        out = np.zeros((ep, h.E, ep), dtype=np.int64)
        if h.native_home:  # every expert on its home (one scatter); the replicated rewritten below
            out.reshape(ep, -1)[:, h.flat_home] = cnt
        else:
            out[:, h.single, h.owner] = cnt[:, h.single]  # an expert with one copy: all of it there
        if len(self.multi):
            out[:, self.multi, :] = _north_west(self.sub, np.asarray(y, dtype=np.int64))
        return out


def _exact_tokens(core: _Core) -> Tuple[list, list]:
    """Augmenting paths under a rising lower bound until no rank exceeds it (module docstring).
    Returns ``(y, load)``: the replicated experts' per-rank totals and every rank's load."""
    ep = core.ep
    y = [row[:] for row in core.start]
    load = core.start_load[:]
    holders, on_rank = core.holders, core.on_rank
    M = max(-(-core.total // ep), max(core.fixed))
    while True:
        top = max(load)
        if top <= M:
            return y, load
        u = load.index(top)
        # breadth-first over ranks; parent[b] = (a, i): reached b from a through expert i
        parent = [None] * ep
        seen = [False] * ep
        seen[u] = True
        frontier = [u]
        target = -1
        while frontier and target < 0:
            nxt = []
            for a in frontier:
                for i in on_rank[a]:
                    if y[i][a] <= 0:
                        continue
                    for b in holders[i]:
                        if seen[b]:
                            continue
                        seen[b] = True
                        parent[b] = (a, i)
                        if load[b] < M:
                            target = b
                            break
                        nxt.append(b)
                    if target >= 0:
                        break
                if target >= 0:
                    break
            frontier = nxt
        if target < 0:
            # closed set: its tokens cannot leave it, a lower bound above M
            reached = [r for r in range(ep) if seen[r]]
            M = -(-sum(load[r] for r in reached) // len(reached))
            continue
        delta = min(top - M, M - load[target])
        b = target
        while b != u:
            a, i = parent[b]
            delta = min(delta, y[i][a])
            b = a
        b = target
        while b != u:
            a, i = parent[b]
            y[i][a] -= delta
            y[i][b] += delta
            b = a
        load[u] -= delta
        load[target] += delta


def _time_local_search(core: _Core, y0, load0, o_u: int, bound: int, max_moves: int = 64):
    """Moves between two holders that lower the slower of the two below the current maximum
    time (token units: tokens + ``o_u`` per active copy), the best such move first; stops at
    ``bound``. Returns ``(y, max time)``."""
    y = [row[:] for row in y0]
    t = core.times(y, load0, o_u)
    holders, on_rank, ranks = core.holders, core.on_rank, range(core.ep)
    for _ in range(max_moves):
        top = max(t)
        if top <= bound:
            break
        best_top, best = top, None
        for u in ranks:
            if t[u] != top:
                continue
            for i in on_rank[u]:
                row = y[i]
                frag = row[u]
                if frag <= 0:
                    continue
                shed = top - frag - o_u  # u without this fragment and its copy's fixed cost
                for b in holders[i]:
                    if b == u:
                        continue
                    tb = t[b] + (0 if row[b] > 0 else o_u)
                    # move everything (u sheds the copy's fixed cost), then the balancing part
                    nt = shed if shed > tb + frag else tb + frag
                    if nt < best_top:
                        best_top, best = nt, (i, u, b, frag)
                    part = (top - tb) // 2
                    if 0 < part < frag:
                        nt = top - part if top - part > tb + part else tb + part
                        if nt < best_top:
                            best_top, best = nt, (i, u, b, part)
            if best is not None:
                break
        if best is None:
            break
        i, u, b, mv = best
        row = y[i]
        t[u] -= mv + (o_u if mv == row[u] else 0)
        t[b] += mv + (0 if row[b] > 0 else o_u)
        row[u] -= mv
        row[b] += mv
    return y, max(t)


def _plain(t: torch.Tensor, dtype) -> bool:
    return t.dtype == dtype and t.device.type == "cpu" and not t.requires_grad


def _check_objective(objective: str, cost: Optional[ExpertCost]) -> None:
    if objective not in ("tokens", "time"):
        raise ValueError(f"unknown objective {objective!r}; valid: ('tokens', 'time')")
    if objective == "time" and cost is None:
        raise ValueError("objective='time' needs an ExpertCost")


def _count_array(counts: torch.Tensor) -> np.ndarray:
    """``counts`` as int64 NumPy, refused when negative (a plain CPU tensor of the right type,
    the usual case, converts without a copy or extra calls)."""
    cnt = counts.numpy() if _plain(counts, torch.long) else counts.detach().cpu().long().numpy()
    if cnt.min(initial=0) < 0:
        s, e = np.argwhere(cnt < 0)[0]
        raise ValueError(f"counts[{s}, {e}] = {int(cnt[s, e])} is negative")
    return cnt


def split_inputs(counts: torch.Tensor, holds: torch.Tensor, objective: str, cost: Optional[ExpertCost]):
    """The checks every split makes (this module's and the exact yardsticks'): a known objective,
    a cost for the time objective, matching shapes, no negative count, a copy for every expert
    with tokens. Returns ``(counts, holds, per-expert totals)`` as NumPy arrays."""
    _check_objective(objective, cost)
    ep, E = holds.shape
    if tuple(counts.shape) != (ep, E):
        raise ValueError(f"counts has shape {tuple(counts.shape)}, holds {tuple(holds.shape)}: both must be [ep, E]")
    cnt = _count_array(counts)
    hold = holds.numpy() if _plain(holds, torch.bool) else holds.detach().cpu().bool().numpy()
    total = cnt.sum(0)
    held = hold.any(0)
    if not held.all():  # rare: an expert without a copy must have no token
        orphan = np.nonzero((total > 0) & ~held)[0]
        if orphan.size:
            raise ValueError(f"expert {int(orphan[0])} has {int(total[orphan[0]])} tokens but no copy on any rank")
    return cnt, hold, total


def _o_units(cost: Optional[ExpertCost]) -> int:
    """The per-active-expert cost in token units (integers: the same split on every rank)."""
    return int(round(cost.per_active_expert_us / cost.per_token_us)) if cost.per_token_us > 0 else 0


def _time_refine(core: _Core, y, load, o_u: int, cost: Optional[ExpertCost] = None):
    """The time objective's local search from the exact token split ``(y, load)``."""
    # no split beats the largest fixed rank time, nor the tokens plus one active copy per expert
    # with tokens spread evenly: a start that reaches it needs no other
    bound = max(max(f + o_u * a for f, a in zip(core.fixed, core.fixed_active)),
                -(-(core.total + o_u * core.n_active_min) // core.ep))
    # two starts, the better kept (the first on ties): the exact token split (balanced, many
    # fragments) and the unsplit one (few active copies)
    best_y, best_t = _time_local_search(core, y, load, o_u, bound)
    if best_t > bound:
        y2, t2 = _time_local_search(core, core.start, core.start_load, o_u, bound)
        if t2 < best_t:
            best_y, best_t = y2, t2
    home = core.home()
    if home is None:
        return best_y
    t_home = max(core.times(home[0], home[1], o_u))
    if best_t > bound and t_home < best_t:
        # the static split (every replicated expert on its home rank) is a third start
        y3, t3 = _time_local_search(core, home[0], home[1], o_u, bound)
        if t3 < best_t:
            best_y, best_t = y3, t3
    if cost is not None:
        # decided in token units (o rounded); in us the static split must still not be faster,
        # so the split is never slower than no replication at all. A rank's time in us is within
        # |o - c o_u| per active copy of c times its time in token units, so when static is
        # slower by more than twice that in units it is slower in us too: no float check needed
        c = cost.per_token_us
        most_active = max(a + len(on) for a, on in zip(core.fixed_active, core.on_rank))
        slack = abs(cost.per_active_expert_us - c * o_u) * most_active / c if c > 0 else float("inf")
        if not t_home - best_t > 2 * slack + 1 and _max_time_us(core, home[0], cost) < _max_time_us(core, best_y, cost):
            best_y = home[0]
    return best_y


def _split_y(cnt: np.ndarray, h: _Holds, total: np.ndarray, objective: str,
             cost: Optional[ExpertCost]):
    """``(core, y)``: the replicated experts' per-rank totals of :func:`balanced_split`."""
    core = _Core(cnt, h, total)
    if not len(core.multi):
        return core, []
    y, load = _exact_tokens(core)
    if objective == "time":
        o_u = _o_units(cost)
        if o_u > 0:
            y = _time_refine(core, y, load, o_u, cost)
    return core, y


def _time_list_us(core: _Core, y, cost: ExpertCost) -> List[float]:
    """Rank times (us) of ``y``: the float operations of ``planner.rank_times`` on the same
    integers, so the same values bit for bit."""
    load, act = core.fixed[:], core.fixed_active[:]
    for row, hs in zip(y, core.holders):
        for r in hs:
            if row[r] > 0:
                load[r] += row[r]
                act[r] += 1
    c, o = cost.per_token_us, cost.per_active_expert_us
    return [c * float(load[r]) + o * float(act[r]) for r in range(core.ep)]


def _max_time_us(core: _Core, y, cost: ExpertCost) -> float:
    return max(_time_list_us(core, y, cost))


def _times_us(core: _Core, y, cost: ExpertCost) -> np.ndarray:
    return np.array(_time_list_us(core, y, cost))


def time_split_bounded(counts: torch.Tensor, holds: torch.Tensor, cost: ExpertCost):
    """``(upper, times)``: an upper bound (us) on the slowest rank of :func:`balanced_split`'s
    time split, known before its local search (the exact token split's time, the search only
    lowers it in token units; plus what rounding the per-active-expert cost to token units can
    add), and ``times()``, which finishes the split and returns its ``[ep]`` rank times (equal to
    :func:`balanced_split_times`). For callers that only need the split when the bound is not
    good enough."""
    cnt, hold, total = split_inputs(counts, holds, "time", cost)
    return _bounded(cnt, _holds(hold), total, cost)


def _bounded(cnt: np.ndarray, h: _Holds, total: np.ndarray, cost: ExpertCost):
    core = _Core(cnt, h, total)
    o_u = _o_units(cost)
    if not len(core.multi) or o_u <= 0:  # the time split is the token split
        t = _times_us(core, _exact_tokens(core)[0] if len(core.multi) else [], cost)
        return float(t.max()), lambda: t
    y, load = _exact_tokens(core)
    units = max(core.times(y, load, o_u))
    most_active = max(a + len(on) for a, on in zip(core.fixed_active, core.on_rank))
    slack = max(0.0, cost.per_active_expert_us - cost.per_token_us * o_u) * most_active
    upper = (cost.per_token_us * units + slack) * (1 + 1e-12)
    return upper, lambda: _times_us(core, _time_refine(core, y, load, o_u, cost), cost)


def balanced_split(counts: torch.Tensor, holds: torch.Tensor, objective: str = "tokens",
                   cost: Optional[ExpertCost] = None) -> torch.Tensor:
    """The split ``[ep_src, E, ep_dst]`` of the true ``counts [ep, E]`` over the copies in
    ``holds [ep, E]`` (bool; natives included) that minimises the slowest rank: exactly in tokens,
    or by local search in time (``cost`` needed; module docstring)."""
    cnt, hold, total = split_inputs(counts, holds, objective, cost)
    core, y = _split_y(cnt, _holds(hold), total, objective, cost)
    return torch.from_numpy(core.assignment(cnt, y))


def balanced_split_times(counts: torch.Tensor, holds: torch.Tensor, cost: ExpertCost,
                         objective: str = "time") -> np.ndarray:
    """``[ep]`` rank times (us) of :func:`balanced_split`'s split, without building the
    ``[ep, E, ep]`` assignment: equal to ``planner.rank_times(balanced_split(...), cost)``, bit
    for bit."""
    cnt, hold, total = split_inputs(counts, holds, objective, cost)
    core, y = _split_y(cnt, _holds(hold), total, objective, cost)
    return _times_us(core, y, cost)


def _placement_inputs(counts: torch.Tensor, placement: torch.Tensor, layout, objective: str,
                      cost: Optional[ExpertCost]):
    """``(counts, tables, per-expert totals)`` for a split over ``placement``'s copies: the checks
    of :func:`split_inputs` and ``validate_placement`` (the placement's only when its tables are
    built: a cached placement was checked then)."""
    _check_objective(objective, cost)
    ep, E, R = layout.ep_size, layout.num_experts, layout.replica_slots
    if tuple(counts.shape) != (ep, E):
        raise ValueError(f"counts has shape {tuple(counts.shape)}, expected ({ep}, {E}) ([ep, experts])")
    if not _plain(placement, torch.long) or tuple(placement.shape) != (ep, R):
        validate_placement(placement, layout)  # raises on a wrong type or shape, naming it
        placement = placement.detach().cpu().long()
    cnt = _count_array(counts)
    h = _cached(("placement", ep, E, placement.numpy().tobytes()),
                lambda: _Holds.from_placement(_checked_rows(placement, layout), E))
    return cnt, h, cnt.sum(0)


def _checked_rows(placement: torch.Tensor, layout) -> List[List[int]]:
    """``placement`` as host rows, with ``validate_placement``'s checks on plain integers (it is
    called to raise, naming the bad entry)."""
    rows = placement.tolist()
    E, L = layout.num_experts, layout.num_local_experts
    for r, row in enumerate(rows):
        seen = set()
        for e in row:
            if e != -1 and (not 0 <= e < E or r * L <= e < r * L + L or e in seen):
                validate_placement(placement, layout)
            seen.add(e)
    return rows


def placement_split(counts: torch.Tensor, placement: torch.Tensor, layout, objective: str = "time",
                    cost: Optional[ExpertCost] = None) -> torch.Tensor:
    """:func:`balanced_split` over the copies of ``placement [ep, R]`` (the natives of the
    contiguous ``layout`` plus the replicas): the same split, equal to ``balanced_split(counts,
    holder_slots(placement, layout) >= 0, objective, cost)`` (tested), without building the
    ``[ep, E]`` holder table. The dispatch's path: it runs every layer."""
    cnt, h, total = _placement_inputs(counts, placement, layout, objective, cost)
    core, y = _split_y(cnt, h, total, objective, cost)
    return torch.from_numpy(core.assignment(cnt, y))


def placement_split_times(counts: torch.Tensor, placement: torch.Tensor, layout, cost: ExpertCost,
                          objective: str = "time") -> np.ndarray:
    """:func:`balanced_split_times` over ``placement``'s copies (as :func:`placement_split`)."""
    cnt, h, total = _placement_inputs(counts, placement, layout, objective, cost)
    core, y = _split_y(cnt, h, total, objective, cost)
    return _times_us(core, y, cost)


def placement_time_split_bounded(counts: torch.Tensor, placement: torch.Tensor, layout, cost: ExpertCost):
    """:func:`time_split_bounded` over ``placement``'s copies (as :func:`placement_split`)."""
    return _bounded(*_placement_inputs(counts, placement, layout, "time", cost), cost)
