"""EPLB as users deploy it, and the project's earlier home-fixed variant.

Reference algorithm (deepseek-ai/EPLB README and the DeepSeek-V3 report; written here from
that description). From a per-expert load estimate (vLLM and SGLang: the mean over a window of
past steps):

1. *replicate*: each redundant physical expert goes, one at a time, to the logical expert with
   the highest load per copy (ties: the lower expert id);
2. *balanced packing* of **all** physical experts (natives move too): heaviest per-copy load
   first (a stable order), each onto the least-loaded GPU that still has room (every GPU gets
   exactly ``num_physical / num_gpus``; ties: the lower GPU);
3. *hierarchical* variant, when the expert groups divide evenly over the nodes: pack groups to
   nodes first (balanced packing of group loads), then replicate inside each node and pack each
   node's physical experts to its GPUs. Otherwise the *global* variant: one node, one group.

Outputs as vLLM and SGLang keep them: ``phy2log`` (the logical expert in each physical slot;
slot ``p`` lives on GPU ``p // slots_per_gpu``), ``log2phy`` (the physical slots of each expert,
``-1`` padded, ordered by replica rank) and ``logcnt`` (copies per expert).

Runtime splits of a replicated expert's tokens, named after where users meet them:

* ``even`` (vLLM): physical copy ``position % copies`` for a token's flattened (token, choice)
  position. From per-rank counts this is each copy getting ``n // c`` tokens and the ``n % c``
  left over going to the copies that follow the source rank in replica order (positions are not
  in the counts; the remainder is at most one token per copy).
* ``local_first`` (SGLang's default ``static`` dispatch): a rank that holds a copy sends all its
  tokens of that expert to its own (first) copy; every other rank sends all of them to one fixed
  copy, drawn once per rebalance so that the copies get the ranks in equal shares (a seeded
  fair draw).

:class:`EPLBPolicy` runs it the way vLLM does: the placement starts as vLLM's initial map
(``phy2log = [0..E-1, 0, 1, ..]``), per-step logical loads are recorded, the first rebalance
happens once a full window is recorded and then every ``period`` steps. Every rank that gains a
logical expert it did not hold receives one weight copy.

The home-fixed variant (:func:`home_fixed_eplb_placement`, :class:`HomeFixedEPLBPolicy`) is what
this project used before: native experts never move and only ``R`` replica slots per rank are
packed, with ``placement.locality_even_assignment``. It is *not* the published EPLB and is
kept, under this name, as an ablation and for the live layer's slot format.
"""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass
from typing import Deque, List, Optional, Sequence, Tuple

import torch

from megatron_probe.policy.placement import EMPTY_SLOT, ExpertLayout, locality_even_assignment

SPLITS = ("even", "local_first")


# ----------------------------------------------------------------------------------------------
# The published algorithm
# ----------------------------------------------------------------------------------------------

def balanced_packing(weight: Sequence[float], num_packs: int) -> Tuple[List[int], List[int]]:
    """Pack ``n`` weighted items into ``num_packs`` packs of exactly ``n / num_packs`` items each:
    heaviest first (stable: equal weights keep index order) onto the lightest pack with room
    (ties: the lower pack). Returns ``(pack of each item, position of the item in its pack)``."""
    n = len(weight)
    if num_packs <= 0 or n % num_packs:
        raise ValueError(f"{n} items cannot be packed into num_packs={num_packs} equal packs")
    per_pack = n // num_packs
    pack_of, pos_in_pack = [0] * n, [0] * n
    if per_pack == 1:
        return list(range(n)), [0] * n
    load = [0.0] * num_packs
    size = [0] * num_packs
    for item in sorted(range(n), key=lambda i: -float(weight[i])):
        pack = min((p for p in range(num_packs) if size[p] < per_pack), key=lambda p: load[p])
        pack_of[item], pos_in_pack[item] = pack, size[pack]
        load[pack] += float(weight[item])
        size[pack] += 1
    return pack_of, pos_in_pack


def replicate_experts(weight: Sequence[float], num_physical: int) -> Tuple[List[int], List[int], List[int]]:
    """Spread ``num_physical`` physical experts over ``len(weight)`` logical ones: every logical
    expert keeps its first copy in physical slot ``e``; each further slot goes to the expert with
    the highest load per copy (ties: the lower id). Returns ``(phy2log, replica rank of each
    physical expert, copies per logical expert)``."""
    n = len(weight)
    if num_physical < n:
        raise ValueError(f"num_physical={num_physical} is below the {n} logical experts")
    phy2log, rank = list(range(n)), [0] * n
    cnt = [1] * n
    for _ in range(n, num_physical):
        e = max(range(n), key=lambda i: (float(weight[i]) / cnt[i], -i))
        phy2log.append(e)
        rank.append(cnt[e])
        cnt[e] += 1
    return phy2log, rank, cnt


def _rebalance_layer(weight: List[float], num_physical: int, num_groups: int, num_nodes: int,
                     num_gpus: int) -> Tuple[List[int], List[int], List[int]]:
    """Hierarchical EPLB for one layer (the global variant is one group on one node)."""
    E = len(weight)
    group_size = E // num_groups
    groups_per_node = num_groups // num_nodes
    gpus_per_node = num_gpus // num_nodes
    phy_per_node = num_physical // num_nodes
    phy_per_gpu = num_physical // num_gpus
    # 1. groups to nodes
    group_load = [sum(weight[g * group_size:(g + 1) * group_size]) for g in range(num_groups)]
    node_of, pos_of = balanced_packing(group_load, num_nodes)
    # each node's logical experts, in the order of its groups, then by id within a group
    node_experts: List[List[int]] = [[0] * (groups_per_node * group_size) for _ in range(num_nodes)]
    for g in range(num_groups):
        for j in range(group_size):
            node_experts[node_of[g]][pos_of[g] * group_size + j] = g * group_size + j
    phy2log = [0] * num_physical
    phy_rank = [0] * num_physical
    logcnt = [0] * E
    for node, experts in enumerate(node_experts):
        # 2. replicate inside the node
        w = [weight[e] for e in experts]
        p2m, rank, cnt = replicate_experts(w, phy_per_node)
        # 3. pack the node's physical experts onto its GPUs by load per copy
        per_copy = [w[m] / cnt[m] for m in p2m]
        gpu_of, slot_of = balanced_packing(per_copy, gpus_per_node)
        for i, m in enumerate(p2m):
            p = node * phy_per_node + gpu_of[i] * phy_per_gpu + slot_of[i]
            phy2log[p] = experts[m]
            phy_rank[p] = rank[i]
        for m, e in enumerate(experts):
            logcnt[e] = cnt[m]
    return phy2log, phy_rank, logcnt


def rebalance_experts(weight: torch.Tensor, num_physical: int, num_gpus: int, num_groups: int = 1,
                      num_nodes: int = 1) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """EPLB's rebalance for every layer of ``weight [layers, E]`` (the load estimate).

    Hierarchical when ``num_groups % num_nodes == 0`` (groups to nodes, then GPUs), else global.
    Returns ``(phy2log [layers, num_physical], log2phy [layers, E, max_copies] (-1 padded, by
    replica rank), logcnt [layers, E])``, int64."""
    if weight.dim() != 2:
        raise ValueError(f"weight has shape {tuple(weight.shape)}, expected [layers, experts]")
    layers, E = weight.shape
    for name, v in (("num_gpus", num_gpus), ("num_groups", num_groups), ("num_nodes", num_nodes)):
        if v <= 0:
            raise ValueError(f"{name}={v} must be positive")
    if num_physical < E or num_physical % num_gpus:
        raise ValueError(f"num_physical={num_physical} must be at least the {E} experts and a multiple of "
                         f"num_gpus={num_gpus}")
    if E % num_groups:
        raise ValueError(f"num_groups={num_groups} does not divide the {E} experts")
    if num_gpus % num_nodes:
        raise ValueError(f"num_nodes={num_nodes} does not divide num_gpus={num_gpus}")
    if bool((weight < 0).any()) or not bool(torch.isfinite(weight.double()).all()):
        raise ValueError("weight must be finite and non-negative")
    if num_groups % num_nodes:
        num_groups, num_nodes = 1, 1  # the global policy
    w = weight.float().tolist()  # the published code computes in float32
    rows = [_rebalance_layer(w[l], num_physical, num_groups, num_nodes, num_gpus) for l in range(layers)]
    phy2log = torch.tensor([r[0] for r in rows], dtype=torch.long)
    rank = torch.tensor([r[1] for r in rows], dtype=torch.long)
    logcnt = torch.tensor([r[2] for r in rows], dtype=torch.long)
    log2phy = torch.full((layers, E, int(logcnt.max())), -1, dtype=torch.long)
    lay = torch.arange(layers).unsqueeze(1).expand_as(phy2log)
    log2phy[lay, phy2log, rank] = torch.arange(num_physical).expand_as(phy2log)
    return phy2log, log2phy, logcnt


# ----------------------------------------------------------------------------------------------
# One layer's physical placement and the runtime splits
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PhysicalMap:
    """One layer's physical experts: ``phy2log [ep * slots_per_rank]``, slot ``p`` on rank
    ``p // slots_per_rank``. Validated: every logical expert has at least one copy."""

    phy2log: torch.Tensor
    ep_size: int
    num_experts: int

    def __post_init__(self):
        p = self.phy2log
        if p.dim() != 1 or p.numel() % self.ep_size:
            raise ValueError(f"phy2log has shape {tuple(p.shape)}: expected one row of a multiple of "
                             f"ep_size={self.ep_size} physical experts")
        if bool(((p < 0) | (p >= self.num_experts)).any()):
            i = int(((p < 0) | (p >= self.num_experts)).nonzero()[0])
            raise ValueError(f"phy2log[{i}] = {int(p[i])} names no expert; valid: 0..{self.num_experts - 1}")
        missing = (torch.bincount(p, minlength=self.num_experts) == 0).nonzero().flatten()
        if missing.numel():
            raise ValueError(f"expert {int(missing[0])} has no physical copy; every expert needs at least one")

    @property
    def slots_per_rank(self) -> int:
        return self.phy2log.numel() // self.ep_size

    @property
    def num_physical(self) -> int:
        return self.phy2log.numel()

    def rank_of(self, phy: int) -> int:
        return phy // self.slots_per_rank

    def copies(self) -> torch.Tensor:
        """``[ep, E]`` int64: how many copies of expert ``e`` rank ``r`` holds."""
        out = torch.zeros(self.ep_size, self.num_experts, dtype=torch.long)
        ranks = torch.arange(self.num_physical) // self.slots_per_rank
        out.index_put_((ranks, self.phy2log), torch.ones(self.num_physical, dtype=torch.long), accumulate=True)
        return out

    def holds(self) -> torch.Tensor:
        """``[ep, E]`` bool: rank ``r`` holds at least one copy of expert ``e``."""
        return self.copies() > 0

    def logcnt(self) -> torch.Tensor:
        return torch.bincount(self.phy2log, minlength=self.num_experts)

    def log2phy(self) -> List[List[int]]:
        """Physical slots of each expert, in slot order (the published replica order when the map
        comes from :func:`rebalance_experts` is available there as ``log2phy``)."""
        out: List[List[int]] = [[] for _ in range(self.num_experts)]
        for p, e in enumerate(self.phy2log.tolist()):
            out[e].append(p)
        return out

    def new_copies(self, old: "PhysicalMap") -> int:
        """Weight copies needed to go from ``old`` to this map: per rank, the experts it holds now
        and did not hold before (two copies on one rank need one transfer)."""
        return int((self.holds() & ~old.holds()).sum())

    @classmethod
    def from_rebalance(cls, phy2log_row: torch.Tensor, ep_size: int, num_experts: int) -> "PhysicalMap":
        return cls(phy2log_row.long().clone(), ep_size, num_experts)

    @classmethod
    def vllm_initial(cls, num_experts: int, ep_size: int, num_redundant: int) -> "PhysicalMap":
        """vLLM's placement before its first rebalance: ``[0..E-1]`` then the redundant slots hold
        experts ``0, 1, ..`` again, contiguous per rank."""
        p = torch.cat([torch.arange(num_experts), torch.arange(num_redundant) % num_experts])
        return cls(p, ep_size, num_experts)


def even_split(counts: torch.Tensor, pmap: PhysicalMap) -> torch.Tensor:
    """vLLM's split (module docstring) from per-rank counts ``[ep, E]``: ``[ep_src, E, ep_dst]``."""
    ep, E = pmap.ep_size, pmap.num_experts
    _check(counts, ep, E)
    c = counts.long().cpu()
    expert = pmap.phy2log  # [P]
    P = expert.numel()
    # index of each physical slot among its expert's copies, in slot order
    sorted_expert, order = torch.sort(expert, stable=True)
    first = torch.searchsorted(sorted_expert, torch.arange(E))  # first position of each expert
    idx = torch.empty(P, dtype=torch.long)
    idx[order] = torch.arange(P) - first[sorted_expert]
    n_c = pmap.logcnt()[expert]  # [P] copies of the slot's expert
    n = c[:, expert]  # [ep, P] tokens of the slot's expert on each source
    src = torch.arange(ep).unsqueeze(1)
    tokens = n // n_c + (((idx - src) % n_c) < (n % n_c)).long()  # the remainder follows the source
    out = torch.zeros(ep, E * ep, dtype=torch.long)
    out.index_add_(1, expert * ep + torch.arange(P) // pmap.slots_per_rank, tokens)
    return out.view(ep, E, ep)


def local_first_table(pmap: PhysicalMap, seed: int = 42) -> torch.Tensor:
    """SGLang's static dispatch table ``[ep, E]``: the physical copy each rank sends expert ``e``'s
    tokens to. A rank holding a copy uses its first one; the other ranks are dealt to the copies
    in equal shares (``k // c`` each, the remainder to a seeded sample of copies), shuffled."""
    rng = random.Random(seed)
    ep, E = pmap.ep_size, pmap.num_experts
    table = torch.full((ep, E), -1, dtype=torch.long)
    for e, phys in enumerate(pmap.log2phy()):
        for p in phys:
            r = pmap.rank_of(p)
            if table[r, e] < 0:
                table[r, e] = p
        rest = (table[:, e] < 0).nonzero().flatten()
        if rest.numel():
            q, rem = divmod(rest.numel(), len(phys))
            dealt = phys * q + rng.sample(phys, rem)
            rng.shuffle(dealt)
            table[rest, e] = torch.tensor(dealt, dtype=torch.long)
    return table


def table_split(counts: torch.Tensor, table: torch.Tensor, pmap: PhysicalMap) -> torch.Tensor:
    """Every token of (source ``s``, expert ``e``) goes to physical copy ``table[s, e]``."""
    ep, E = pmap.ep_size, pmap.num_experts
    _check(counts, ep, E)
    out = torch.zeros(ep, E, ep, dtype=torch.long)
    dst = table // pmap.slots_per_rank
    s_idx = torch.arange(ep).unsqueeze(1).expand(ep, E)
    e_idx = torch.arange(E).unsqueeze(0).expand(ep, E)
    out[s_idx, e_idx, dst] = counts.long().cpu()
    return out


def _check(counts: torch.Tensor, ep: int, E: int) -> None:
    if tuple(counts.shape) != (ep, E):
        raise ValueError(f"counts has shape {tuple(counts.shape)}, expected ({ep}, {E}) ([ep, experts])")
    if counts.dtype.is_floating_point or counts.dtype == torch.bool:
        raise TypeError(f"counts must be integer token counts, got {counts.dtype}")
    if bool((counts < 0).any()):
        s, e = (counts < 0).nonzero()[0].tolist()
        raise ValueError(f"counts[{s}, {e}] = {int(counts[s, e])} is negative")


class EPLBPolicy:
    """EPLB as vLLM / SGLang run it (module docstring), one layer.

    Args:
        num_redundant: redundant physical experts of the layer over all ranks (vLLM's
            ``num_redundant_experts``; ``ep * R`` matches ``R`` replica slots per rank).
        window: steps of load statistics a rebalance averages (vLLM's ``window_size``).
        period: steps between rebalances (vLLM's ``step_interval``); the first one is taken as
            soon as ``window`` steps are recorded (``first_rebalance``, default ``window``).
        split: ``even`` (vLLM) or ``local_first`` (SGLang static dispatch).
        num_groups, num_nodes: for the hierarchical variant.
    """

    def __init__(self, num_experts: int, ep_size: int, num_redundant: int, window: int, period: int,
                 split: str = "even", num_groups: int = 1, num_nodes: int = 1,
                 first_rebalance: Optional[int] = None, seed: int = 42):
        if window <= 0 or period <= 0:
            raise ValueError(f"window={window} and period={period} must be positive")
        if num_redundant < 0 or (num_experts + num_redundant) % ep_size:
            raise ValueError(f"num_redundant={num_redundant}: experts + redundant ({num_experts} + {num_redundant}) "
                             f"must be a non-negative multiple of ep_size={ep_size}")
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; valid: {SPLITS}")
        self.E, self.ep, self.N = num_experts, ep_size, num_redundant
        self.window, self.period, self.split = window, period, split
        self.num_groups, self.num_nodes, self.seed = num_groups, num_nodes, seed
        self.first_rebalance = window if first_rebalance is None else first_rebalance
        self.history: Deque[torch.Tensor] = deque(maxlen=window)
        self.pmap = PhysicalMap.vllm_initial(num_experts, ep_size, num_redundant)
        self.table = local_first_table(self.pmap, seed)
        self.steps = 0
        self.rebalances = 0

    @property
    def redundant_per_rank(self) -> int:
        return self.N // self.ep

    def rebalances_at(self, step: int) -> bool:
        return step >= self.first_rebalance and (step - self.first_rebalance) % self.period == 0

    def split_tokens(self, counts: torch.Tensor) -> torch.Tensor:
        if self.split == "even":
            return even_split(counts, self.pmap)
        return table_split(counts, self.table, self.pmap)

    def plan(self, counts: torch.Tensor) -> Tuple[torch.Tensor, int]:
        """Assignment ``[ep_src, E, ep_dst]`` for this step's ``counts [ep, E]`` and the weight
        copies the step starts with. Statistics include only past steps."""
        copies = 0
        if self.rebalances_at(self.steps) and self.history:
            load = torch.stack(list(self.history)).double().mean(0, keepdim=True)
            phy2log = rebalance_experts(load, self.E + self.N, self.ep, self.num_groups, self.num_nodes)[0][0]
            new = PhysicalMap.from_rebalance(phy2log, self.ep, self.E)
            copies = new.new_copies(self.pmap)
            self.pmap = new
            self.table = local_first_table(new, self.seed + self.rebalances + 1)
            self.rebalances += 1
        assign = self.split_tokens(counts)
        self.history.append(counts.sum(0).double())
        self.steps += 1
        return assign, copies


# ----------------------------------------------------------------------------------------------
# The project's earlier variant: natives stay home, R replica slots per rank
# ----------------------------------------------------------------------------------------------

def home_fixed_eplb_placement(load: torch.Tensor, layout: ExpertLayout) -> torch.Tensor:
    """Replica placement ``[ep, R]`` for per-expert ``load`` ``[E]``: EPLB's replicate step, then
    the extra copies (not the natives) packed heaviest first onto the least-loaded rank with a
    free slot that does not hold the expert yet."""
    ep, E, L, R = layout.ep_size, layout.num_experts, layout.num_local_experts, layout.replica_slots
    load = load.double().cpu()
    placement = torch.full((ep, R), EMPTY_SLOT, dtype=torch.long)
    if R == 0 or float(load.sum()) <= 0:
        return placement
    copies = torch.ones(E, dtype=torch.long)
    for _ in range(ep * R):  # replicate: highest load per copy, at most one copy per rank
        per_copy = torch.where(copies < ep, load / copies, torch.full_like(load, -1.0))
        e = int(torch.argmax(per_copy))
        if per_copy[e] <= 0:
            break
        copies[e] += 1
    rank_load = torch.zeros(ep, dtype=torch.float64)
    e_ids = torch.arange(E)
    rank_load.index_add_(0, e_ids // L, load / copies)
    used = torch.zeros(ep, dtype=torch.long)
    held = torch.zeros(ep, E, dtype=torch.bool)
    held[e_ids // L, e_ids] = True
    extra = [(float(load[e] / copies[e]), e) for e in range(E) for _ in range(int(copies[e]) - 1)]
    extra.sort(key=lambda x: (-x[0], x[1]))
    for w, e in extra:
        ok = (used < R) & ~held[:, e]
        if not ok.any():
            continue
        r = int(torch.argmin(torch.where(ok, rank_load, torch.full_like(rank_load, float("inf")))))
        placement[r, used[r]] = e
        used[r] += 1
        held[r, e] = True
        rank_load[r] += w
    return placement


class HomeFixedEPLBPolicy:
    """The home-fixed variant run like :class:`EPLBPolicy`: sliding-window statistics, the first
    rebalance once ``window`` steps are recorded (or at ``first_rebalance``), then every
    ``period`` steps; even split with locality first (``placement.locality_even_assignment``)."""

    def __init__(self, layout: ExpertLayout, window: int = 50, period: int = 50,
                 first_rebalance: Optional[int] = None):
        if window <= 0 or period <= 0:
            raise ValueError(f"window={window} and period={period} must be positive")
        self.layout, self.window, self.period = layout, window, period
        self.first_rebalance = window if first_rebalance is None else first_rebalance
        self.history: Deque[torch.Tensor] = deque(maxlen=window)
        self.placement = torch.full((layout.ep_size, layout.replica_slots), EMPTY_SLOT, dtype=torch.long)
        self.steps = 0

    def plan(self, counts: torch.Tensor):
        """``(placement, assignment, transfers)`` for this step's ``counts [ep, E]``."""
        transfers = 0
        s = self.steps
        if s >= self.first_rebalance and (s - self.first_rebalance) % self.period == 0 and self.history:
            new = home_fixed_eplb_placement(torch.stack(list(self.history)).double().mean(0), self.layout)
            transfers = int(((new != self.placement) & (new >= 0)).sum())
            self.placement = new
        assign = locality_even_assignment(counts.long(), self.placement, self.layout)
        self.history.append(counts.sum(0).double())
        self.steps += 1
        return self.placement.clone(), assign, transfers
