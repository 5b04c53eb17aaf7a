"""One MoE layer on a simulated cluster: attention, dispatch, expert compute, combine, transfers.

Pure functions on tensors (no process groups, no Megatron), deterministic. Every time comes
from :mod:`megatron_probe.policy.cost_model` (the same functions the planner and the live layer
use): ``attention_time_us``, ``a2a_time_us``, ``ExpertCost`` (through ``planner.rank_times``) and
``transfer_time_us``. What this module adds is the cluster: which pairs of ranks share a node
(NVLink) and which talk over InfiniBand, the per-rank token volumes of an assignment, and the
timeline of a layer.

Timeline of layer L (main track; every All-to-All is a barrier, so each phase lasts as long as its
slowest rank)::

    attention  ->  dispatch A2A  ->  expert GEMMs  ->  combine A2A

    t_layer = max_r attn_r + t_dispatch + max_r comp_r + t_combine + exposed transfer

De-duplication from counts. An assignment ``[ep_src, E, ep_dst]`` says how many (token, expert)
pairs go from ``src`` to ``dst`` but not how many distinct tokens: a token with two experts on
``dst`` travels once. With ``T_s`` tokens on ``src`` (``counts[s].sum() / k``) and ``p_sd`` pairs
to ``dst``, a token's ``k`` choices land on ``dst`` with probability ``q = p_sd / (k T_s)`` each;
treating them as independent, ``T_s (1 - (1 - q)^k)`` distinct tokens travel. The exact
per-token path (:func:`exact_unique_tokens`) uses ``cost_model.dispatch_volume``; the tests check
that the estimate stays close to it on random routing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

import torch

from megatron_probe.policy.cost_model import (
    ExpertCost,
    HardwareProfile,
    ModelShape,
    a2a_time_us,
    attention_time_us,
    dispatch_volume,
    transfer_time_us,
)
from megatron_probe.policy.placement import ExpertLayout, imbalance_ratio, rank_loads
from megatron_probe.policy.planner import rank_times


@dataclass(frozen=True)
class Topology:
    """``nodes`` x ``gpus_per_node`` GPUs, one EP rank each; ranks ``r`` and ``r'`` share a node
    when ``r // gpus_per_node == r' // gpus_per_node``."""

    nodes: int = 1
    gpus_per_node: int = 8

    def __post_init__(self):
        if self.nodes <= 0 or self.gpus_per_node <= 0:
            raise ValueError(f"nodes={self.nodes} and gpus_per_node={self.gpus_per_node} must be positive")

    @property
    def ep(self) -> int:
        return self.nodes * self.gpus_per_node

    def same_node(self) -> torch.Tensor:
        node = torch.arange(self.ep) // self.gpus_per_node
        return node.unsqueeze(1) == node.unsqueeze(0)


def tokens_per_rank(counts: torch.Tensor, topk: int) -> torch.Tensor:
    """``[ep]`` tokens on each source rank: its (token, expert) pairs over ``k``."""
    return counts.double().sum(1) / topk


def unique_tokens(assign: torch.Tensor, tokens: torch.Tensor, topk: int) -> torch.Tensor:
    """``[ep_src, ep_dst]`` distinct tokens each rank sends each other rank (diagonal 0), estimated
    from pair counts (module docstring)."""
    pairs = assign.double().sum(1)  # [src, dst]
    T = tokens.double().clamp_min(1e-12).unsqueeze(1)
    q = (pairs / (topk * T)).clamp(0.0, 1.0)
    u = torch.minimum(T * (1.0 - (1.0 - q) ** topk), pairs)
    u.fill_diagonal_(0.0)  # staying local costs no link
    return u


def exact_unique_tokens(token_ranks: torch.Tensor, src_rank: torch.Tensor, ep: int) -> torch.Tensor:
    """``[ep]`` send and receive token counts of a per-token routing (``token_ranks [T, K]``
    destination rank of each choice), through ``cost_model.dispatch_volume`` (1 byte per token)."""
    return dispatch_volume(token_ranks, src_rank, ep, 1.0)


def a2a_us(hw: HardwareProfile, topo: Topology, unique: torch.Tensor, token_bytes: float) -> float:
    """One All-to-All moving ``unique [src, dst]`` tokens of ``token_bytes`` each: NVLink inside a
    node and InfiniBand across nodes run side by side, so the slower class sets the time (each
    through ``cost_model.a2a_time_us``, which takes the worst rank's max(bytes in, bytes out))."""
    same = topo.same_node()
    intra = unique * same
    t = a2a_time_us(hw, intra.sum(1) * token_bytes, intra.sum(0) * token_bytes, inter_node=False)
    if topo.nodes > 1:
        inter = unique * ~same
        t = max(t, a2a_time_us(hw, inter.sum(1) * token_bytes, inter.sum(0) * token_bytes, inter_node=True))
    return t


def copy_list(placement: torch.Tensor, layout: ExpertLayout):
    """``[(dst, slot, expert, src)]`` of a placement's replicas, in slot order (the planner fills
    slots in the order it decides, so earlier slots are the more useful copies)."""
    L = layout.num_local_experts
    out = []
    for s in range(placement.shape[1]):
        for r in range(placement.shape[0]):
            e = int(placement[r, s])
            if e >= 0:
                out.append((r, s, e, e // L))
    return out


def slot_moves(placement: torch.Tensor, layout: ExpertLayout):
    """``[(dst, src, expert)]`` copies of a placement's replicas, each from its expert's home rank."""
    return [(dst, src, e) for dst, _, e, src in copy_list(placement, layout)]


def eplb_moves(new, old, topo: Topology):
    """``[(dst, src, expert)]`` weight copies that turn EPLB map ``old`` into ``new``
    (``eplb.PhysicalMap``): every expert a rank holds now and did not hold before, sent by a rank
    that held it, preferring one on the same node and then the one that has sent the fewest."""
    gained = new.holds() & ~old.holds()  # [ep, E]
    had = old.holds()
    same = topo.same_node()
    sent = [0] * topo.ep
    out = []
    for dst, e in gained.nonzero().tolist():
        srcs = had[:, e].nonzero().flatten().tolist()
        src = min(srcs, key=lambda r: (not bool(same[dst, r]), sent[r], r))
        sent[src] += 1
        out.append((dst, src, e))
    return out


def transfer_us(hw: HardwareProfile, shape: ModelShape, topo: Topology, moves, link: str = "auto") -> torch.Tensor:
    """``[ep]`` time each rank spends on the weight copies ``moves`` (``[(dst, src, expert)]``; for a
    PROBE-style placement :func:`slot_moves`: all fetched anew, as with
    shared double-buffered banks): per link class the larger of bytes in and bytes out, the
    classes side by side (``T_trans = max(|in|, |out|) W / BW``). ``link``: ``auto`` (NVLink
    inside a node, InfiniBand across), ``nvlink`` or ``ib`` for every copy."""
    ep = topo.ep
    same = topo.same_node()
    n = {c: (torch.zeros(ep), torch.zeros(ep)) for c in (False, True)}  # inter_node -> (in, out)
    for dst, src, _ in moves:
        inter = {"auto": not bool(same[dst, src]), "nvlink": False, "ib": True}[link]
        n[inter][0][dst] += 1
        n[inter][1][src] += 1
    t = torch.zeros(ep, dtype=torch.float64)
    for inter, (i, o) in n.items():
        per = transfer_time_us(hw, shape, 1, inter_node=inter)
        t = torch.maximum(t, torch.maximum(i, o).double() * per)
    return t


def attention_us(hw: HardwareProfile, shape: ModelShape, tokens: torch.Tensor, context: int) -> float:
    """Slowest rank's attention block (``cost_model.attention_time_us``)."""
    return max(attention_time_us(hw, shape, int(round(float(t))), context) for t in tokens)


def layer_time(hw: HardwareProfile, shape: ModelShape, topo: Topology, cost: ExpertCost, counts: torch.Tensor,
               assign: torch.Tensor, context: int, exposed_us: float = 0.0, a2a_extra_us: float = 0.0,
               comp_extra_us: Optional[torch.Tensor] = None) -> Dict[str, float]:
    """Times (us) of one layer under an assignment ``[ep_src, E, ep_dst]`` of ``counts [ep, E]``.

    ``exposed_us``: transfer time not hidden; ``a2a_extra_us``: delay of the All-to-Alls by a
    transfer sharing their links; ``comp_extra_us [ep]``: compute slowed by copies that use SMs.
    Combine moves the same tokens back (send and receive swapped: same critical volume)."""
    tok = tokens_per_rank(counts, shape.topk)
    attn = attention_us(hw, shape, tok, context)
    u = unique_tokens(assign, tok, shape.topk)
    token_bytes = shape.hidden * shape.bytes_per_activation
    disp = a2a_us(hw, topo, u, token_bytes)
    comb = a2a_us(hw, topo, u.T, token_bytes)
    comp_r = rank_times(assign, cost)
    if comp_extra_us is not None:
        comp_r = comp_r + comp_extra_us.double()
    comp = float(comp_r.max())
    total = attn + disp + comp + comb + exposed_us + a2a_extra_us
    return {"attn_us": attn, "dispatch_us": disp, "comp_us": comp, "comp_mean_us": float(comp_r.mean()),
            "combine_us": comb, "exposed_us": exposed_us, "a2a_extra_us": a2a_extra_us, "total_us": total,
            "ir": imbalance_ratio(rank_loads(assign)),
            "ir_comp": imbalance_ratio(comp_r)}
