"""Asynchronous all-gather of per-rank predicted expert counts.

Each EP rank forecasts its own tokens' experts for layer L; the planner needs the ``[ep, E]``
matrix of every rank's counts. The gather is issued as soon as the forecast exists and waited
only when the planner needs it, so it overlaps layer L-1's dispatch. NCCL gathers into one
tensor on the device; gloo gathers host tensors (a device tensor on a gloo group is staged
through host memory, as in :mod:`megatron_probe.mechanism.comm`).
"""

from __future__ import annotations

from typing import List, Optional

import torch
import torch.distributed as dist

from megatron_probe.mechanism.comm import group_size, needs_host_staging, nccl_moves


class PendingCounts:
    """A counts all-gather in flight; :meth:`wait` returns the ``[ep, E]`` matrix (idempotent)."""

    def __init__(self, work, parts: Optional[List[torch.Tensor]], out: Optional[torch.Tensor], device):
        self._work, self._parts, self._out, self._device = work, parts, out, device

    @property
    def done(self) -> bool:
        return self._work is None

    def wait(self) -> torch.Tensor:
        if self._work is not None:
            self._work.wait()
            self._work = None
            if self._parts is not None:
                self._out = torch.stack(self._parts).to(self._device, non_blocking=True)
                self._parts = None
        return self._out


def gather_counts_async(local_counts: torch.Tensor, group) -> PendingCounts:
    """Start gathering ``local_counts`` ``[E]`` from every rank of ``group`` (group-rank order)."""
    if local_counts.dim() != 1:
        raise ValueError(f"local counts must be a [num_experts] vector, got shape {tuple(local_counts.shape)}")
    n = group_size(group)
    if n == 1:
        return PendingCounts(None, None, local_counts.unsqueeze(0), local_counts.device)
    x = local_counts.contiguous()
    if needs_host_staging(group, x):
        x = x.cpu()
    if nccl_moves(group, x):
        out = x.new_empty((n,) + tuple(x.shape))
        work = dist.all_gather_into_tensor(out, x, group=group, async_op=True)
        return PendingCounts(work, None, out, local_counts.device)
    parts = [torch.empty_like(x) for _ in range(n)]
    work = dist.all_gather(parts, x, group=group, async_op=True)
    return PendingCounts(work, parts, None, local_counts.device)
