"""FP8 expert GEMMs without Transformer Engine: ``torch._scaled_grouped_mm`` on E4M3 operands with
row-wise fp32 scales (one per token row of the input, one per output row of each expert weight).

* Weights are quantised once per bank version (``SlotExpertCompute`` keeps them), the inputs of
  each projection at every call.
* ``torch._scaled_grouped_mm`` runs on CUDA compute capability 9.0 and 10.0. Its 2-D x 3-D form
  wants the weight column-major (the transpose of Megatron's ``[G, N, K]`` is) and each group's
  rows aligned: every group is padded to ``GROUP_ALIGN`` rows with zero rows, computed, and the
  real rows taken back.
* Quantising a row: ``scale = amax / 448`` (E4M3's largest finite value), ``q = x / scale``
  rounded to E4M3. An all-zero row gets scale 1. Relative rounding error per element at most
  ``2^-4`` in E4M3's normal range.

The math is device-independent and tested on CPU against a float reference (``reference_mm``
stands in for the GPU kernel there); the kernel itself runs only where it exists.
"""

from __future__ import annotations

from typing import Callable, List, Optional, Tuple

import torch

from megatron_probe.mechanism.comm import host_to_device

FP8_DTYPE = getattr(torch, "float8_e4m3fn", None)
FP8_MAX = 448.0
GROUP_ALIGN = 16
_SCALED_GROUPED_MM = getattr(torch, "_scaled_grouped_mm", None)


def fp8_unsupported_reason(device: torch.device) -> Optional[str]:
    """None where the FP8 backend runs on ``device``, else what is missing, by name."""
    if FP8_DTYPE is None or _SCALED_GROUPED_MM is None:
        return f"this torch ({torch.__version__}) has no float8_e4m3fn / torch._scaled_grouped_mm"
    if device.type != "cuda":
        return f"torch._scaled_grouped_mm needs a CUDA device of compute capability 9.0 or 10.0, not {device}"
    cap = torch.cuda.get_device_capability(device)
    if cap not in ((9, 0), (10, 0)):
        return (f"torch._scaled_grouped_mm needs compute capability 9.0 or 10.0; "
                f"{torch.cuda.get_device_name(device)} has {cap[0]}.{cap[1]}")
    return None


def quantize_rows(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``x [..., K]`` -> ``(q [..., K] float8_e4m3fn, scale [...] float32)`` with ``x ~ q * scale``
    row by row (the last dimension is a row)."""
    xf = x.float()
    amax = xf.abs().amax(dim=-1)
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    q = (xf / scale.unsqueeze(-1)).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale.contiguous()


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    return (q.float() * scale.unsqueeze(-1)).to(dtype)


def padded_rows(counts: List[int], align: int = GROUP_ALIGN,
                device: Optional[torch.device] = None) -> Tuple[List[int], torch.Tensor]:
    """Each group's row count rounded up to ``align``, and where each real row lands in the padded
    layout (``index [sum(counts)]``, built on ``device`` from two per-group vectors: the host
    never makes a per-row array)."""
    padded = [-(-c // align) * align for c in counts]
    device = device or torch.device("cpu")
    total = sum(counts)
    if not counts or total == 0:
        return padded, torch.zeros(0, dtype=torch.long, device=device)
    # a row's padded index: its own index plus the padding of the groups before it
    gap = torch.tensor(padded, dtype=torch.long) - torch.tensor(counts, dtype=torch.long)
    shift = gap.cumsum(0) - gap
    per_group = host_to_device(torch.stack([shift, torch.tensor(counts, dtype=torch.long)]), device)
    shifts = torch.repeat_interleave(per_group[0], per_group[1], output_size=total)
    return padded, torch.arange(total, device=device) + shifts


def reference_mm(a_q, b_q_t, scale_a, scale_b, offs, out_dtype):
    """What ``torch._scaled_grouped_mm(a_q, b_q_t, scale_a, scale_b, offs=offs, out_dtype=)``
    computes, in float32 from the dequantised operands (``b_q_t [G, K, N]``, ``scale_b [G, N]``):
    the CPU stand-in the tests use."""
    a = dequantize_rows(a_q, scale_a)
    outs, start = [], 0
    for g, end in enumerate(offs.tolist()):
        b = b_q_t[g].float() * scale_b[g].unsqueeze(0)  # [K, N], column n scaled
        outs.append(a[start:end] @ b)
        start = end
    return torch.cat(outs).to(out_dtype) if outs else a.new_zeros((0, b_q_t.shape[-1]), dtype=out_dtype)


def fp8_grouped_linear(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, counts: List[int],
                       out_dtype: torch.dtype, mm: Optional[Callable] = None) -> torch.Tensor:
    """``y_g = x_g @ W_g^T`` for every group g, in FP8: ``x [T, K]`` rows grouped by ``counts``,
    ``w_q [G, N, K]`` E4M3 and ``w_scale [G, N]`` from :func:`quantize_rows`. ``mm``: the scaled
    grouped GEMM (default ``torch._scaled_grouped_mm``)."""
    if len(counts) != w_q.shape[0]:
        raise ValueError(f"{len(counts)} token counts for {w_q.shape[0]} weight groups")
    if x.shape[0] == 0:
        return x.new_empty((0, w_q.shape[1]), dtype=out_dtype)
    mm = mm or _SCALED_GROUPED_MM
    padded, rows = padded_rows(counts, device=x.device)
    xp = x.new_zeros((sum(padded), x.shape[1])).index_copy_(0, rows, x)
    x_q, x_scale = quantize_rows(xp)
    offs = host_to_device(torch.tensor(padded, dtype=torch.int64).cumsum(0).to(torch.int32), x.device)
    y = mm(x_q, w_q.transpose(-2, -1), x_scale, w_scale, offs=offs, out_dtype=out_dtype)
    return y[rows]
