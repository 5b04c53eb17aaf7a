"""Grouped GEMM backends: one call computes ``y_g = x_g @ W_g^T`` for every expert slot g.

Backends (``ProbeConfig.expert_backend``):
* ``grouped_mm``: ``torch._grouped_mm`` (CPU fp32/bf16; CUDA bf16 on Hopper and newer).
* ``loop``: one ``torch.matmul`` per slot, the arithmetic of Megatron's ``SequentialMLP``.
* ``te``: Transformer Engine ``GroupedLinear`` (see ``mechanism/te_backend.py``), GPU only.
"""

from __future__ import annotations

from typing import List, Union

import torch

from megatron_probe.mechanism.comm import host_to_device

_GROUPED_MM = getattr(torch, "_grouped_mm", None)


def have_grouped_mm() -> bool:
    return _GROUPED_MM is not None


def grouped_mm_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``torch._grouped_mm`` runs for this device and dtype in this torch build."""
    if _GROUPED_MM is None:
        return False
    if device.type == "cpu":
        return dtype in (torch.float32, torch.bfloat16)
    if device.type == "cuda":
        major, _ = torch.cuda.get_device_capability(device)
        return dtype == torch.bfloat16 and major >= 9
    return False


def linear_loop(x: torch.Tensor, weight: torch.Tensor, counts: List[int]) -> torch.Tensor:
    """``weight`` ``[G, N, K]`` (nn.Linear layout); ``x`` rows grouped by ``counts``."""
    if x.shape[0] == 0:
        return x.new_empty((0, weight.shape[1]))
    outs = []
    for g, xg in enumerate(torch.split(x, counts)):
        if xg.shape[0]:
            outs.append(torch.matmul(xg, weight[g].t()))
    return torch.cat(outs, dim=0)


def linear_grouped_mm(x: torch.Tensor, weight: torch.Tensor, counts: Union[List[int], torch.Tensor]) -> torch.Tensor:
    """``counts``: a list, or a tensor (on the tokens' device: the offsets never visit the host)."""
    if x.shape[0] == 0:
        return x.new_empty((0, weight.shape[1]))
    if isinstance(counts, torch.Tensor) and counts.device == x.device:
        offs = counts.cumsum(0).to(torch.int32)
    else:  # made on the host: one small copy that does not stall it
        host = counts.cpu() if isinstance(counts, torch.Tensor) else torch.tensor(counts)
        offs = host_to_device(host.cumsum(0).to(torch.int32), x.device)
    return _GROUPED_MM(x, weight.transpose(-2, -1), offs=offs)


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, counts: Union[List[int], torch.Tensor], backend: str):
    if len(counts) != weight.shape[0]:
        raise ValueError(f"{len(counts)} token counts for {weight.shape[0]} weight groups")
    if backend == "grouped_mm":
        return linear_grouped_mm(x, weight, counts)
    if backend == "loop":
        return linear_loop(x, weight, counts)
    raise ValueError(f"grouped_linear has no backend {backend!r}; valid: grouped_mm, loop")
