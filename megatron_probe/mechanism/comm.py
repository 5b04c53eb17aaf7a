"""Collectives the PROBE data path needs, written to run on gloo (CPU) and NCCL (GPU) alike.

Megatron's own all-to-all helper allocates its buffers with ``device="cuda"``; these allocate
on the input's device and accept uneven splits, which both gloo and NCCL support.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch
import torch.distributed as dist


def host_to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small host table onto ``device`` without stalling the host: a copy from pageable memory
    waits for the stream, one from pinned memory does not (the caching host allocator keeps the
    pinned buffer until the copy has run)."""
    if t.device == device or device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def device_to_host(t: torch.Tensor) -> torch.Tensor:
    """A small device tensor on the host, through pinned memory: the copy is queued on the
    current stream behind the work that produces ``t`` and the host waits for that copy alone
    (an event), the one read-back a device-resident dispatch makes per layer. A host tensor is
    returned as it is."""
    if t.device.type != "cuda":
        return t
    out = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    out.copy_(t, non_blocking=True)
    done = torch.cuda.Event()
    done.record()
    done.synchronize()
    return out


def group_size(group: Optional[dist.ProcessGroup]) -> int:
    if group is None or not dist.is_available() or not dist.is_initialized():
        return 1
    return dist.get_world_size(group)


def group_rank(group: Optional[dist.ProcessGroup]) -> int:
    if group is None or not dist.is_available() or not dist.is_initialized():
        return 0
    return dist.get_rank(group)


class _AllToAll(torch.autograd.Function):
    """Uneven all-to-all along dim 0; its gradient is the reverse all-to-all."""

    @staticmethod
    def forward(ctx, x, output_splits, input_splits, group):
        ctx.group = group
        ctx.output_splits = output_splits
        ctx.input_splits = input_splits
        return _all_to_all_raw(x, output_splits, input_splits, group)

    @staticmethod
    def backward(ctx, grad):
        return (
            _AllToAll.apply(grad.contiguous(), ctx.input_splits, ctx.output_splits, ctx.group),
            None,
            None,
            None,
        )


def needs_host_staging(group, t: torch.Tensor) -> bool:
    """gloo moves host memory: a device tensor on a gloo group goes through a CPU copy (used when
    several ranks share one GPU, where NCCL refuses to run)."""
    return t.device.type != "cpu" and dist.get_backend(group) == "gloo"


def nccl_moves(group, t: torch.Tensor) -> bool:
    """Does NCCL move ``t`` on ``group``: a CUDA tensor on a group with NCCL, alone (``nccl``) or
    beside gloo for host tensors (``cpu:gloo,cuda:nccl``, what the launcher sets up)."""
    return t.device.type == "cuda" and "nccl" in str(dist.get_backend(group))


def _all_to_all_raw(x, output_splits: List[int], input_splits: List[int], group):
    if group_size(group) == 1:
        return x
    x = x.contiguous()
    if needs_host_staging(group, x):
        return _all_to_all_raw(x.cpu(), output_splits, input_splits, group).to(x.device)
    out = x.new_empty((int(sum(output_splits)),) + tuple(x.shape[1:]))
    dist.all_to_all_single(out, x, list(output_splits), list(input_splits), group=group)
    return out


def all_to_all(x: torch.Tensor, output_splits: Sequence[int], input_splits: Sequence[int], group):
    """All-to-all of rows of ``x``: ``input_splits[r]`` rows go to rank r, ``output_splits[r]``
    rows arrive from rank r (autograd-safe)."""
    return _AllToAll.apply(x, list(output_splits), list(input_splits), group)


def all_gather_rows(x: torch.Tensor, group) -> torch.Tensor:
    """``[ep, *x.shape]``: every rank's ``x`` stacked in group-rank order (no autograd)."""
    n = group_size(group)
    if n == 1:
        return x.unsqueeze(0)
    if needs_host_staging(group, x):
        return all_gather_rows(x.cpu(), group).to(x.device)
    parts = [torch.empty_like(x) for _ in range(n)]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.stack(parts)


def all_gather_varying_rows(x: torch.Tensor, group, sizes: Optional[List[int]] = None):
    """Every rank's ``x`` concatenated along dim 0 in group-rank order, where the number of rows
    may differ by rank (the trailing shape may not), and the row count of each rank (no
    autograd). Two gathers: the counts, then the rows padded to the largest count; one when the
    caller passes ``sizes`` (every rank's row count, as this returned for another tensor with the
    same rows: every rank must pass the same list). A ``sizes`` that does not fit this rank's
    rows raises here, before the gather; the other ranks then wait in theirs until the group's
    timeout, as for any rank that fails before a collective."""
    n = group_size(group)
    if n == 1:
        return x, [x.shape[0]]
    if sizes is None:
        sizes = all_gather_rows(torch.tensor([x.shape[0]], dtype=torch.long, device=x.device), group).view(-1).tolist()
    elif len(sizes) != n or sizes[group_rank(group)] != x.shape[0]:
        raise ValueError(f"sizes={sizes} do not match a group of {n} ranks with {x.shape[0]} rows on rank "
                         f"{group_rank(group)}")
    padded = x.new_zeros((max(sizes),) + tuple(x.shape[1:]))
    padded[:x.shape[0]] = x
    parts = all_gather_rows(padded, group)
    return torch.cat([parts[i, :sizes[i]] for i in range(n)]), sizes


def all_reduce_sum(x: torch.Tensor, group) -> torch.Tensor:
    """The sum of every rank's ``x`` (a new tensor; no autograd)."""
    if group_size(group) == 1:
        return x
    if needs_host_staging(group, x):
        return all_reduce_sum(x.cpu(), group).to(x.device)
    out = x.contiguous().clone()
    dist.all_reduce(out, group=group)
    return out


def global_rank(group, rank_in_group: int) -> int:
    if group is None:
        return rank_in_group
    return dist.get_global_rank(group, rank_in_group)
