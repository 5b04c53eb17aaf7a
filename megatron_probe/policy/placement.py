"""Replica placement and token assignment: the formats every later component speaks.

Pure functions on tensors (no process groups, no Megatron), deterministic, so every EP rank
derives the same tables from the same inputs without a broadcast.

Vocabulary
----------
* ``E`` experts, ``ep`` ranks, ``L = E // ep`` native experts per rank (rank ``r`` owns the
  contiguous block ``[r*L, (r+1)*L)``, as Megatron places them), ``R`` replica slots per rank.
  Each rank therefore computes ``S = L + R`` expert *slots*: slot ``j < L`` is its native expert
  ``r*L + j``, slot ``L + s`` is replica slot ``s``.
* **placement**: ``slot_expert`` ``[ep, R]`` int64, the expert held by each replica slot of each
  rank, ``-1`` for an empty slot.
* **assignment**: ``assign`` ``[ep_src, E, ep_dst]`` int64: of the tokens that source rank
  ``src`` routes to expert ``e``, how many are computed on rank ``dst``. Valid when every row
  sums to the true count (no token lost or duplicated) and ``dst`` holds a copy of ``e``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

EMPTY_SLOT = -1


@dataclass(frozen=True)
class ExpertLayout:
    """Shape of the expert-parallel layout: experts, ranks and replica slots per rank."""

    num_experts: int
    ep_size: int
    replica_slots: int

    def __post_init__(self) -> None:
        if self.num_experts <= 0:
            raise ValueError(f"num_experts={self.num_experts} must be positive")
        if self.ep_size <= 0:
            raise ValueError(f"ep_size={self.ep_size} must be positive")
        if self.num_experts % self.ep_size != 0:
            raise ValueError(
                f"num_experts={self.num_experts} is not divisible by ep_size={self.ep_size}"
            )
        foreign = self.num_experts - self.num_experts // self.ep_size
        if not 0 <= self.replica_slots <= foreign:
            raise ValueError(
                f"replica_slots={self.replica_slots} must be in 0..{foreign} "
                f"(the experts other ranks own)"
            )

    @property
    def num_local_experts(self) -> int:
        return self.num_experts // self.ep_size

    @property
    def slots_per_rank(self) -> int:
        return self.num_local_experts + self.replica_slots

    def home_rank(self, expert: torch.Tensor | int):
        return expert // self.num_local_experts


def empty_placement(layout: ExpertLayout, device=None) -> torch.Tensor:
    """Placement with every replica slot empty (static EP)."""
    return torch.full(
        (layout.ep_size, layout.replica_slots), EMPTY_SLOT, dtype=torch.long, device=device
    )


def validate_placement(slot_expert: torch.Tensor, layout: ExpertLayout) -> None:
    """Raise ValueError naming the first bad entry of a placement."""
    if not isinstance(slot_expert, torch.Tensor):
        raise TypeError(f"placement must be a torch.Tensor, got {type(slot_expert).__name__}")
    expected = (layout.ep_size, layout.replica_slots)
    if tuple(slot_expert.shape) != expected:
        raise ValueError(
            f"placement has shape {tuple(slot_expert.shape)}, expected {expected} "
            f"([ep, replica_slots]); a slot that does not exist cannot be filled"
        )
    if slot_expert.dtype.is_floating_point or slot_expert.dtype == torch.bool:
        raise TypeError(f"placement must hold integer expert ids, got dtype {slot_expert.dtype}")
    se = slot_expert.detach().cpu().long()
    bad = (se < EMPTY_SLOT) | (se >= layout.num_experts)
    if bad.any():
        r, s = bad.nonzero()[0].tolist()
        raise ValueError(
            f"placement[rank={r}, slot={s}] = {int(se[r, s])} names no expert; valid: "
            f"{EMPTY_SLOT} (empty) or 0..{layout.num_experts - 1}"
        )
    L = layout.num_local_experts
    ranks = torch.arange(layout.ep_size).unsqueeze(1).expand_as(se)
    own = (se >= 0) & (se // L == ranks)
    if own.any():
        r, s = own.nonzero()[0].tolist()
        raise ValueError(
            f"placement[rank={r}, slot={s}] = expert {int(se[r, s])}, which rank {r} already owns "
            f"(its native experts are {r * L}..{(r + 1) * L - 1}); replica slots hold other ranks' experts"
        )
    for r in range(layout.ep_size):
        held = se[r][se[r] >= 0]
        if held.numel() != held.unique().numel():
            vals, counts = held.unique(return_counts=True)
            raise ValueError(
                f"placement gives rank {r} expert {int(vals[counts > 1][0])} in more than one "
                f"replica slot; each rank may hold at most one copy of an expert"
            )


def holder_slots(slot_expert: torch.Tensor, layout: ExpertLayout) -> torch.Tensor:
    """``[ep, E]`` int64: the slot index of expert ``e`` on rank ``r``, or -1 if ``r`` holds no copy.

    Native experts sit in slots ``0..L-1``; replica slot ``s`` is slot ``L + s``.
    """
    ep, E, L, R = layout.ep_size, layout.num_experts, layout.num_local_experts, layout.replica_slots
    device = slot_expert.device
    table = torch.full((ep, E), EMPTY_SLOT, dtype=torch.long, device=device)
    experts = torch.arange(E, device=device)
    table[experts // L, experts] = experts % L
    if R > 0:
        rows = torch.arange(ep, device=device).unsqueeze(1).expand(ep, R)
        slots = (torch.arange(R, device=device) + L).unsqueeze(0).expand(ep, R)
        filled = slot_expert >= 0
        table[rows[filled], slot_expert[filled]] = slots[filled]
    return table


def slot_experts(slot_expert: torch.Tensor, layout: ExpertLayout) -> torch.Tensor:
    """``[ep, S]`` int64: the expert computed in each slot of each rank (-1 for an empty slot)."""
    L = layout.num_local_experts
    native = torch.arange(layout.num_experts, device=slot_expert.device).view(layout.ep_size, L)
    return torch.cat([native, slot_expert.to(native.device).long()], dim=1)


def locality_even_assignment(
    counts: torch.Tensor, slot_expert: torch.Tensor, layout: ExpertLayout
) -> torch.Tensor:
    """A valid assignment for any placement, with no knowledge of rank loads.

    Step 1: a source rank that holds a copy of expert ``e`` keeps all its tokens of ``e``
    (locality first: they never cross the network).
    Step 2: any other source rank splits its tokens of ``e`` evenly over all copies of ``e``;
    the remainder goes to the copies that follow the source rank in a rotation, so different
    sources do not all favour the same copy.

    Args:
        counts: ``[ep, E]`` tokens each source rank routes to each expert.
    Returns:
        ``[ep_src, E, ep_dst]`` int64 assignment.
    """
    ep, E = layout.ep_size, layout.num_experts
    counts = counts.long()
    holds = holder_slots(slot_expert, layout) >= 0  # [ep, E]
    holds_e = holds.T  # [E, ep_dst]
    n_holders = holds_e.sum(1)  # [E] >= 1 (the home rank)
    # position of each holder among the holders of e, 0..n_holders-1
    holder_pos = torch.cumsum(holds_e.long(), dim=1) - 1  # [E, ep_dst]
    src = torch.arange(ep, device=counts.device).view(ep, 1, 1)
    share = counts // n_holders.view(1, E)  # [ep, E]
    rem = counts % n_holders.view(1, E)
    # rotated position of each destination relative to the source rank
    rot = (holder_pos.unsqueeze(0) - src) % n_holders.view(1, E, 1)  # [ep, E, ep]
    even = share.unsqueeze(-1) + (rot < rem.unsqueeze(-1)).long()
    even = even * holds_e.unsqueeze(0)
    # locality: a source that holds e keeps everything
    local = torch.zeros(ep, E, ep, dtype=torch.long, device=counts.device)
    diag = torch.arange(ep, device=counts.device)
    local[diag, :, diag] = counts
    src_holds = holds  # [ep_src, E]
    return torch.where(src_holds.unsqueeze(-1), local, even)


def assignment_from_placement(
    counts: torch.Tensor, slot_expert: torch.Tensor, layout: ExpertLayout, policy: str
) -> torch.Tensor:
    """Dispatch to the named default assignment policy."""
    if policy == "locality_even":
        return locality_even_assignment(counts, slot_expert, layout)
    raise ValueError(f"unknown assignment policy {policy!r}; valid: ('locality_even',)")


def validate_assignment(
    assign: torch.Tensor,
    counts: torch.Tensor,
    slot_expert: torch.Tensor,
    layout: ExpertLayout,
) -> None:
    """Raise ValueError when an assignment loses, duplicates or misroutes tokens.

    Args:
        assign: ``[ep_src, E, ep_dst]`` candidate assignment.
        counts: ``[ep_src, E]`` true token counts; rows of ranks whose counts are unknown can be
            checked by passing only the rows that are known (``counts`` and ``assign`` sliced
            alike) -- the shapes must agree on the source dimension.
    """
    holds = holder_slots(slot_expert.detach().cpu().long(), layout) >= 0
    validate_split(assign, counts, holds)


def check_assignment_async(assign: torch.Tensor, counts: torch.Tensor, holds: torch.Tensor) -> None:
    """:func:`validate_split`'s checks as device assertions (``torch._assert_async``), for an
    assignment that must not be read back to the host: no negative entry, every source's tokens
    of every expert sent exactly once, nothing sent to a rank without a copy (``holds [ep, E]``
    bool, on the assignment's device). On a GPU a failure surfaces at the next synchronisation
    (a device-side assertion, without the index :func:`validate_split` names); on CPU at once."""
    a = assign.long()
    torch._assert_async((a >= 0).all(), "assignment has a negative entry")
    torch._assert_async((a.sum(-1) == counts.long()).all(), "assignment loses or duplicates tokens")
    torch._assert_async(((a > 0) & ~holds.T.unsqueeze(0)).logical_not().all(),
                        "assignment sends tokens to a rank without a copy of the expert")


def validate_split(assign: torch.Tensor, counts: torch.Tensor, holds: torch.Tensor) -> None:
    """:func:`validate_assignment` for any layout: ``holds [ep, E]`` bool says which rank has a
    copy of which expert (natives included; a layout whose natives move, such as EPLB's)."""
    ep, E = holds.shape
    if not isinstance(assign, torch.Tensor):
        raise TypeError(f"assignment must be a torch.Tensor, got {type(assign).__name__}")
    if assign.dim() != 3 or tuple(assign.shape[1:]) != (E, ep) or assign.shape[0] != counts.shape[0]:
        raise ValueError(
            f"assignment has shape {tuple(assign.shape)}, expected ({counts.shape[0]}, {E}, {ep}) "
            f"([ep_src, experts, ep_dst])"
        )
    if assign.dtype.is_floating_point or assign.dtype == torch.bool:
        raise TypeError(f"assignment must hold integer token counts, got dtype {assign.dtype}")
    a = assign.detach().long().cpu()
    c = counts.detach().long().cpu()
    if (a < 0).any():
        s, e, d = (a < 0).nonzero()[0].tolist()
        raise ValueError(f"assignment[src={s}, expert={e}, dst={d}] = {int(a[s, e, d])} is negative")
    totals = a.sum(-1)
    if not torch.equal(totals, c):
        s, e = (totals != c).nonzero()[0].tolist()
        verb = "loses" if totals[s, e] < c[s, e] else "duplicates"
        raise ValueError(
            f"assignment {verb} tokens: source rank {s} routes {int(c[s, e])} tokens to expert {e} "
            f"but the assignment places {int(totals[s, e])}"
        )
    holds_e = holds.detach().cpu().bool().T  # [E, ep_dst]
    stray = (a > 0) & ~holds_e.unsqueeze(0)
    if stray.any():
        s, e, d = stray.nonzero()[0].tolist()
        holders = holds_e[e].nonzero().flatten().tolist()
        raise ValueError(
            f"assignment sends {int(a[s, e, d])} tokens of expert {e} from rank {s} to rank {d}, "
            f"which holds no copy of expert {e} (copies on ranks {holders})"
        )


def static_rank_loads(counts: torch.Tensor, ep: int) -> torch.Tensor:
    """``[ep]`` (token, expert) pairs per rank for per-expert ``counts [E]`` under Megatron's
    contiguous placement (rank ``r`` owns experts ``r*E/ep .. (r+1)*E/ep - 1``)."""
    E = counts.shape[-1]
    if E % ep:
        raise ValueError(f"{E} experts are not divisible by EP {ep}")
    return counts.reshape(ep, E // ep).sum(-1)


def rank_loads(assign: torch.Tensor) -> torch.Tensor:
    """``[ep_dst]`` token-expert pairs computed by each rank under an assignment."""
    return assign.sum(dim=(0, 1))


def imbalance_ratio(loads: torch.Tensor) -> float:
    """IR = max load / mean load over ranks (1.0 is perfect balance; 1.0 for an empty batch). The
    project's one definition: token loads (:func:`rank_loads`, :func:`static_rank_loads`) or
    times (``planner.rank_times``) alike."""
    loads = loads.double()
    mean = loads.mean()
    if mean <= 0:
        return 1.0
    return float(loads.max() / mean)
