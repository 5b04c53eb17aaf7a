"""The split at dispatch: how the true tokens of each expert are divided among the copies that
exist, so that the slowest rank finishes first. Host code: the checks and tables here, the
loops compiled (``split_kernels``, numba); deterministic: every rank computes the same split from
the same all-gathered counts.

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
least one token costs ``o`` token units). First a local search: single moves between two holders
(a whole fragment or part of it) are applied while they lower the slower of the two ranks below
the current maximum time, from up to three starts (the exact token split, the unsplit start, and
the static split, so the result is never slower than no replication), the best kept; a start that
already meets a lower bound on time (the largest fixed rank time, or the tokens plus one ``o`` per
expert with tokens spread over the ranks) is optimal and ends there. Then a local search over
the active sets (``split_kernels.active_set_search``, below; at most ``ACTIVE_SET_FIRST_EVALS``
splits), and from the better split a branch and bound over which copies of each replicated
expert are active
(``split_kernels.time_search``): a node fixes the active holder set of some experts; its bound is
the exact token split in which a decided expert's copies each pay ``o`` and an undecided one
carries its tokens plus ``o`` per piece it needs, spread over its holders, at the target of the
best split found less one: a holder without room under that target for a piece of at least one
token and its ``o`` is out, and an expert whose tokens fit on no one usable holder needs as many
pieces as the fewest usable holders that hold them, largest room first (with the target
unbounded: the LP relaxation of the time MILP; the target makes it tighter as the incumbent
falls); a node whose relaxed split leaves every undecided expert on one copy is a split, the best
below it. It branches on the most constrained undecided expert (the fewest usable holders; ties:
the farthest from unsplit), one child per set of usable holders with at least its fewest pieces,
and prunes at the best split found; at every second branching node it rounds the relaxed split
(each undecided expert active on the copies its relaxed amount uses, the exact split of those
sets) for a better incumbent. A search
that ends is exact (in token units); it is stopped after :func:`search_node_budget` node bounds (29-43
at E = 128, EP = 8; 64 at E = 512, EP = 32), keeping the best split found, improved by
the local search over the active sets again (add a copy of an expert that a slowest rank's group
computes, or drop that group's copy of it, each such set priced by its exact split, the best
kept while it lowers the slowest time or the number of ranks at it; at most
``2 max(ACTIVE_SET_EVALS, ep)`` splits). Each active-set search's split is polished by the
local search's moves. The search is never slower than its local search in token units; in us
it can be, by less than ``|o - c o_u|`` per active copy, when ``o / c`` is not a whole number.
Last, the dispatch split (with the search) moves tokens off its busiest rank where the slowest time
in us allows (``split_kernels.token_polish``, greedy: among splits of the same slowest time, fewer
tokens on the busiest rank err less when the cost model's per-expert cost is off); its slowest time
never rises.
``optimal.exact_split`` with ``objective="time"`` is its yardstick (docs/balancer.md has the
measured gaps).
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from megatron_probe.policy.cost_model import ExpertCost
from megatron_probe.policy import split_kernels as kernels
from megatron_probe.policy.placement import validate_placement


def locality_first(cnt: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Per-destination totals ``y [E, ep]`` split over the sources ``cnt [ep, E]``: each source
    first keeps what its own rank computes, then the rest fills the remaining room in rank
    order (sources in rank order). Returns ``[ep_src, E, ep_dst]``."""
    ep, E = cnt.shape
    cnt = np.ascontiguousarray(cnt, dtype=np.int64)
    y = np.asarray(y, dtype=np.int64)
    pos = y > 0
    n_dst = pos.sum(1)
    owner = np.where(n_dst == 1, pos.argmax(1), np.where(n_dst > 1, -1, -2))
    multi = np.flatnonzero(n_dst > 1)
    out = np.zeros((ep, E, ep), dtype=np.int64)
    kernels.assign(cnt, owner, multi, np.ascontiguousarray(y[multi]), out)
    return out


class _Holds:
    """The tables of one set of holders that the kernels read (``split_kernels``' docstring),
    built once per set (cached: a resident placement is split step after step)."""

    @classmethod
    def from_hold(cls, hold: np.ndarray) -> "_Holds":
        """From a ``[ep, E]`` holder table (any holder sets)."""
        ep, E = hold.shape
        n_hold = hold.sum(0)
        owner = np.where(n_hold == 1, hold.argmax(0), np.where(n_hold > 1, -1, -2))
        multi = np.flatnonzero(n_hold > 1)
        sub = hold[:, multi]
        _, hold_rank = np.nonzero(sub.T)  # by expert, then rank: holders ascend
        on_rank, on_idx = np.nonzero(sub)  # by rank, then expert
        home_ok = E % ep == 0 and E > 0 and bool(sub[multi // max(1, E // ep), np.arange(len(multi))].all())
        return cls._tables(ep, E, owner, multi, hold_rank, n_hold[multi], on_idx,
                           np.bincount(on_rank, minlength=ep), home_ok)

    @classmethod
    def from_placement(cls, placement: torch.Tensor, layout) -> "_Holds":
        """From a placement ``[ep, R]`` (int64 on the host) over the contiguous natives of
        ``layout``, without the ``[ep, E]`` table (one compiled call), its entries checked
        (``validate_placement`` raises, naming the first bad one)."""
        ok, owner, multi, hold_ptr, hold_rank, on_ptr, on_idx = kernels.placement_tables(
            np.ascontiguousarray(placement.numpy()), layout.num_experts)
        if not ok:
            validate_placement(placement, layout)
            raise AssertionError("placement_tables refused a placement validate_placement accepts")
        h = cls()
        h.ep, h.E, h.home_ok = layout.ep_size, layout.num_experts, True
        h.owner, h.multi, h.hold_ptr, h.hold_rank, h.on_ptr, h.on_idx = owner, multi, hold_ptr, hold_rank, on_ptr, on_idx
        return h

    @classmethod
    def _tables(cls, ep, E, owner, multi, hold_rank, n_holders, on_idx, n_on, home_ok) -> "_Holds":
        h = cls()
        as_i64 = lambda v: np.ascontiguousarray(v, dtype=np.int64)  # noqa: E731
        h.ep, h.E, h.home_ok = ep, E, bool(home_ok)
        h.owner, h.multi, h.hold_rank, h.on_idx = as_i64(owner), as_i64(multi), as_i64(hold_rank), as_i64(on_idx)
        h.hold_ptr = as_i64(np.concatenate(([0], np.cumsum(n_holders, dtype=np.int64))))
        h.on_ptr = as_i64(np.concatenate(([0], np.cumsum(n_on, dtype=np.int64))))
        return h


_HOLDS_CACHE: "dict[tuple, _Holds]" = {}

# the time split's branch and bound stops after search_node_budget(copies, ranks) node bounds: SEARCH_WORK
# // (copies + ranks) (a node costs about that much work) gives 29-43 nodes at E 128, EP 8 on saved
# generated resident steps (the whole time split 66-67 us per layer at the median on 2 x 240 of
# them, this project's 2-core x86 CPU, with the search's rounding every second node; 1,200 without
# it: 35-52 nodes, 65-68 us; 1,600: 47-69 nodes, 74-78 us, the same worst step), but 10-16 at E 512,
# EP 32: too few for one dive to a leaf, which can branch on up to ranks - 1 split experts (an
# optimal split whose experts and ranks form a forest exists), so at least two nodes per rank (64
# there, where the greedy split it replaces takes 550 us); the best split found is kept
# (docs/balancer.md: how far that is from the optimum where the search stops)
SEARCH_WORK = 1000
SEARCH_NODES_PER_RANK = 2


def search_node_budget(copies: int, ranks: int) -> int:
    """The branch and bound's node budget: ``max(8, SEARCH_NODES_PER_RANK x ranks, SEARCH_WORK //
    (copies + ranks))``."""
    return max(8, SEARCH_NODES_PER_RANK * ranks, SEARCH_WORK // (copies + ranks))


def _cached(key, build) -> _Holds:
    h = _HOLDS_CACHE.pop(key, None)
    if h is None:
        if len(_HOLDS_CACHE) >= 64:  # least recently used out: placements in use stay
            _HOLDS_CACHE.pop(next(iter(_HOLDS_CACHE)))
        h = build()
    _HOLDS_CACHE[key] = h  # (re)inserted last: dicts keep insertion order
    return h


def _holds(hold: np.ndarray) -> _Holds:
    return _cached((hold.shape, hold.tobytes()), lambda: _Holds.from_hold(hold))


class _Split:
    """One split of ``cnt [ep, E]`` over the holders ``h``: the start and the exact token split on
    construction (``y [m, ep]``: the replicated experts' per-rank totals, ``load [ep]``), the time
    objective's search on request."""

    def __init__(self, cnt: np.ndarray, h: _Holds, total: np.ndarray):
        self.cnt, self.h, self.total = cnt, h, total
        self.search_nodes, self.search_complete = 0, True  # the time split's branch and bound, when run
        (self.y, self.load, self.fixed, self.fixed_active, self.start_y, self.start_load, self.total_tokens,
         self.n_active_min) = kernels.start_split(cnt, total, h.owner, h.multi, h.hold_ptr, h.hold_rank)
        if len(h.multi):
            kernels.exact_tokens(self.y, self.load, self.fixed, self.total_tokens, h.hold_ptr, h.hold_rank,
                                 h.on_ptr, h.on_idx)

    def time_split(self, cost: ExpertCost, search: bool = True) -> np.ndarray:
        """``y`` of the time objective (the token split when nothing is replicated or the
        per-active-expert cost rounds to 0 tokens); ``search=False``: the local search only (no
        branch and bound)."""
        o_u = _o_units(cost)
        h = self.h
        if not len(h.multi) or o_u <= 0:
            return self.y
        y, self.search_nodes, self.search_complete = kernels.time_refine(
            self.y, self.load, self.cnt, self.total, h.multi, self.fixed, self.fixed_active, self.start_y,
            self.start_load, self.total_tokens, self.n_active_min, h.hold_ptr, h.hold_rank, h.on_ptr, h.on_idx,
            h.home_ok, o_u, float(cost.per_token_us), float(cost.per_active_expert_us),
            search_node_budget(len(h.hold_rank), h.ep) if search else 0)
        return y

    def split(self, objective: str, cost: Optional[ExpertCost], search: bool = True) -> np.ndarray:
        return self.time_split(cost, search) if objective == "time" else self.y

    def times_us(self, y: np.ndarray, cost: ExpertCost) -> np.ndarray:
        """Rank times (us) of ``y``: the float operations of ``planner.rank_times`` on the same
        integers, so the same values bit for bit."""
        h = self.h
        return kernels.times_us(y, self.fixed, self.fixed_active, h.hold_ptr, h.hold_rank,
                                float(cost.per_token_us), float(cost.per_active_expert_us))

    def assignment(self, y: np.ndarray) -> np.ndarray:
        """``[ep_src, E, ep_dst]``: :func:`locality_first` of ``y``."""
        h = self.h
        out = np.zeros((h.ep, h.E, h.ep), dtype=np.int64)
        kernels.assign(self.cnt, h.owner, h.multi, y, out)
        return out


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
    cnt = np.ascontiguousarray(cnt)  # the kernels' layout (a no-op for the usual dense tensor)
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


def time_split_bounded(counts: torch.Tensor, holds: torch.Tensor, cost: ExpertCost):
    """``(upper, times)``: an upper bound (us) on the slowest rank of :func:`balanced_split`'s
    time split, known before its local search (the exact token split's time, the search only
    lowers it in token units; plus what rounding the per-active-expert cost to token units can
    add), and ``times()``, which finishes the split and returns its ``[ep]`` rank times (equal to
    :func:`balanced_split_times`). For callers that only need the split when the bound is not
    good enough."""
    cnt, hold, total = split_inputs(counts, holds, "time", cost)
    return _bounded(cnt, _holds(hold), total, cost)


def _bounded(cnt: np.ndarray, h: _Holds, total: np.ndarray, cost: ExpertCost, search: bool = True):
    s = _Split(cnt, h, total)
    o_u = _o_units(cost)
    if not len(h.multi) or o_u <= 0:  # the time split is the token split
        t = s.times_us(s.y, cost)
        return float(t.max()), lambda: t
    units = int(kernels.unit_times(s.y, s.load, s.fixed_active, h.hold_ptr, h.hold_rank, o_u).max())
    most_active = int((s.fixed_active + np.diff(h.on_ptr)).max())
    slack = max(0.0, cost.per_active_expert_us - cost.per_token_us * o_u) * most_active
    upper = (cost.per_token_us * units + slack) * (1 + 1e-12)
    return upper, lambda: s.times_us(s.time_split(cost, search), cost)


def balanced_split(counts: torch.Tensor, holds: torch.Tensor, objective: str = "tokens",
                   cost: Optional[ExpertCost] = None) -> torch.Tensor:
    """The split ``[ep_src, E, ep_dst]`` of the true ``counts [ep, E]`` over the copies in
    ``holds [ep, E]`` (bool; natives included) that minimises the slowest rank: exactly in tokens,
    or in time by local search and a bounded branch and bound (``cost`` needed; module
    docstring)."""
    cnt, hold, total = split_inputs(counts, holds, objective, cost)
    s = _Split(cnt, _holds(hold), total)
    return torch.from_numpy(s.assignment(s.split(objective, cost)))


def balanced_split_times(counts: torch.Tensor, holds: torch.Tensor, cost: ExpertCost,
                         objective: str = "time") -> np.ndarray:
    """``[ep]`` rank times (us) of :func:`balanced_split`'s split, without building the
    ``[ep, E, ep]`` assignment: equal to ``planner.rank_times(balanced_split(...), cost)``, bit
    for bit."""
    cnt, hold, total = split_inputs(counts, holds, objective, cost)
    s = _Split(cnt, _holds(hold), total)
    return s.times_us(s.split(objective, cost), cost)


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
    h = _cached(("placement", ep, E, placement.numpy().tobytes()), lambda: _Holds.from_placement(placement, layout))
    return cnt, h, cnt.sum(0)


def placement_split(counts: torch.Tensor, placement: torch.Tensor, layout, objective: str = "time",
                    cost: Optional[ExpertCost] = None) -> torch.Tensor:
    """:func:`balanced_split` over the copies of ``placement [ep, R]`` (the natives of the
    contiguous ``layout`` plus the replicas): the same split, equal to ``balanced_split(counts,
    holder_slots(placement, layout) >= 0, objective, cost)`` (tested), without building the
    ``[ep, E]`` holder table. The dispatch's path: it runs every layer."""
    cnt, h, total = _placement_inputs(counts, placement, layout, objective, cost)
    s = _Split(cnt, h, total)
    return torch.from_numpy(s.assignment(s.split(objective, cost)))


def placement_split_times(counts: torch.Tensor, placement: torch.Tensor, layout, cost: ExpertCost,
                          objective: str = "time", search: bool = True) -> np.ndarray:
    """:func:`balanced_split_times` over ``placement``'s copies (as :func:`placement_split`);
    ``search=False``: the time split's local search without the branch and bound (what a planner
    pricing many placements uses: a fraction of a percent slower at most, most often equal)."""
    cnt, h, total = _placement_inputs(counts, placement, layout, objective, cost)
    s = _Split(cnt, h, total)
    return s.times_us(s.split(objective, cost, search), cost)


def placement_time_split_bounded(counts: torch.Tensor, placement: torch.Tensor, layout, cost: ExpertCost,
                                 search: bool = True):
    """:func:`time_split_bounded` over ``placement``'s copies (as :func:`placement_split`;
    ``search`` as :func:`placement_split_times`)."""
    return _bounded(*_placement_inputs(counts, placement, layout, "time", cost), cost, search)


def load_kernels() -> None:
    """Load every compiled loop of ``split_kernels`` (compiled once per install, then read from
    numba's on-disk cache, about 0.4 s; a kernel's first call in a process pays that) through the
    public entries, with the argument types they always pass, so the first served layer does not
    pay for it (tested: afterwards no entry compiles anything)."""
    from megatron_probe.policy.placement import ExpertLayout

    counts = torch.tensor([[5, 0, 1, 1], [4, 2, 0, 3]])
    holds = torch.tensor([[True, True, True, False], [False, False, True, True]])  # expert 2 on both
    cost = ExpertCost(per_token_us=0.1, per_active_expert_us=6.4)
    balanced_split(counts, holds, "time", cost)
    time_split_bounded(counts, holds, cost)[1]()
    placement_split(counts, torch.tensor([[2], [-1]]), ExpertLayout(4, 2, 1), "time", cost)
    locality_first(counts.numpy(), np.array([[5, 4], [0, 2], [1, 0], [1, 3]]))
