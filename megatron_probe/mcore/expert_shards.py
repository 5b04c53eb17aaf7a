"""How Megatron-Core splits one expert's weights over the expert-tensor-parallel ranks.

``linear_fc1`` is column-parallel: rank ``t`` holds rows ``t`` of ``etp`` equal blocks, and with a
gated linear unit the gate and the linear half are split separately and stacked (Megatron's
``[gate_t; linear_t]`` layout, which its activation splits with ``chunk(2)``). ``linear_fc2`` is
row-parallel: rank ``t`` holds block ``t`` of its input columns. The partial outputs of the
ranks sum to the whole expert's output.
"""

from __future__ import annotations

import torch


def expert_weight_shard(weight: torch.Tensor, which: str, etp: int, rank: int, gated: bool) -> torch.Tensor:
    """Expert-TP rank ``rank``'s share of one expert's whole ``linear_fc1`` (``[F or 2F, H]``) or
    ``linear_fc2`` (``[H, F]``) weight, ``which`` in ``{"fc1", "fc2"}``."""
    if etp == 1:
        return weight
    if not 0 <= rank < etp:
        raise ValueError(f"expert-TP rank {rank} out of range for expert TP {etp}")
    if which == "fc1":
        halves = weight.chunk(2, dim=0) if gated else (weight,)
        for h in halves:
            if h.shape[0] % etp:
                raise ValueError(f"linear_fc1: {h.shape[0]} rows per half do not split over expert TP {etp}")
        return torch.cat([h.chunk(etp, dim=0)[rank] for h in halves]).clone()
    if which == "fc2":
        if weight.shape[1] % etp:
            raise ValueError(f"linear_fc2: {weight.shape[1]} columns do not split over expert TP {etp}")
        return weight.chunk(etp, dim=1)[rank].clone()
    raise ValueError(f"which={which!r}; valid: 'fc1', 'fc2'")
