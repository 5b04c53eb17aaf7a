"""Compute all expert slots of a rank (native experts and replicas) with one grouped GEMM per
projection, applying the activation and routing probabilities exactly as Megatron's expert MLP
does (``fc2(act(fc1(x)) * p)``)."""

from __future__ import annotations

from typing import Optional

import torch

from megatron_probe.mechanism import fp8, te_backend
from megatron_probe.mechanism.grouped_gemm import grouped_linear, grouped_mm_supported


def resolve_backend(requested: str, device: torch.device, dtype: torch.dtype) -> str:
    """The backend ``auto`` stands for on this device and dtype, or the requested one if it runs."""
    if requested == "auto":
        if device.type == "cuda" and te_backend.HAVE_TE:
            return "te"
        if grouped_mm_supported(device, dtype):
            return "grouped_mm"
        return "loop"
    if requested == "te" and not (te_backend.HAVE_TE and device.type == "cuda"):
        raise RuntimeError(
            "expert_backend='te' needs Transformer Engine and a CUDA device "
            f"(TE importable: {te_backend.HAVE_TE}, device: {device}); use 'auto', 'grouped_mm' or 'loop'"
        )
    if requested == "fp8":
        why = fp8.fp8_unsupported_reason(device)
        if why is None and dtype != torch.bfloat16:
            why = f"torch._scaled_grouped_mm gives bf16 outputs only; the model is {dtype} (use bf16)"
        if why is not None:
            raise RuntimeError(f"expert_backend='fp8': {why}; use 'te' (Transformer Engine's FP8) where installed, "
                               "or 'auto', 'grouped_mm' or 'loop'")
    if requested == "grouped_mm" and not grouped_mm_supported(device, dtype):
        raise RuntimeError(
            f"expert_backend='grouped_mm': torch._grouped_mm does not run for {dtype} on {device} "
            "(CPU: fp32/bf16; CUDA: bf16 on compute capability >= 9.0); use 'auto' or 'loop'"
        )
    return requested


def check_expert_config(config) -> None:
    """Reject Megatron expert options this compute path does not reproduce (never compute wrong)."""
    if config.add_bias_linear:
        raise NotImplementedError("PROBE experts do not support add_bias_linear=True (expert biases)")
    if getattr(config, "use_te_activation_func", False):
        raise NotImplementedError("PROBE experts do not support use_te_activation_func=True")
    if getattr(config, "moe_latent_size", None):
        raise NotImplementedError("PROBE experts do not support moe_latent_size")
    if getattr(config, "moe_apply_probs_on_input", False) and config.moe_router_topk != 1:
        raise ValueError("moe_apply_probs_on_input only works with moe_router_topk=1 (as in Megatron)")


def expert_activation(h: torch.Tensor, probs: torch.Tensor, config) -> torch.Tensor:
    """Megatron MLP's activation (gated or plain, clamp and offset) times the per-token prob."""
    if config.gated_linear_unit:
        x_glu, x_linear = torch.chunk(h, 2, dim=-1)
        val = getattr(config, "activation_func_clamp_value", None)
        if val is not None:
            x_glu = x_glu.clamp(min=None, max=val)
            x_linear = x_linear.clamp(min=-val, max=val)
        h = config.activation_func(x_glu) * (x_linear + getattr(config, "glu_linear_offset", 0.0))
    else:
        h = config.activation_func(h)
    dtype = h.dtype
    return (h * probs.unsqueeze(-1)).to(dtype)


class SlotExpertCompute:
    """Stateless apart from the resolved backend and, for TE, its GroupedLinear wrappers."""

    def __init__(self, config, backend: str = "auto"):
        check_expert_config(config)
        self.config = config
        self.requested_backend = backend
        self.backend: Optional[str] = None
        self._te: Optional[te_backend.TEGroupedSlots] = None
        self._fp8 = None  # (weights' identity and version, fc1 (E4M3, scales), fc2 (E4M3, scales))

    def __call__(self, x, tokens_per_slot, probs, fc1, fc2, bank_version: int = 0):
        """``fc1``/``fc2``: ``[S, ...]`` weights of every slot, or lists of blocks whose slot counts
        add up to ``S`` (native experts and a shared replica bank), computed one grouped GEMM per
        block and projection (tokens arrive slot-ordered, so each block's tokens are contiguous)."""
        if isinstance(fc1, (list, tuple)):
            return self._blocks(x, tokens_per_slot, probs, fc1, fc2, bank_version)
        if self.backend is None:
            self.backend = resolve_backend(self.requested_backend, fc1.device, fc1.dtype)
        if tokens_per_slot.device.type == "cpu":  # free to check here; on a device a read would synchronise
            total = int(tokens_per_slot.sum())
            if total != x.shape[0]:
                raise RuntimeError(f"tokens_per_slot sums to {total}, but {x.shape[0]} tokens arrived")
        # grouped_mm takes its group offsets as a tensor, so counts on the device never visit the
        # host (the EP 1 dispatch is capturable); the other backends need host sizes
        counts = tokens_per_slot if self.backend == "grouped_mm" else [int(c) for c in tokens_per_slot.tolist()]
        if self.config.moe_apply_probs_on_input:
            x = (probs.unsqueeze(-1) * x).to(x.dtype)
            probs = torch.ones_like(probs)
        if self.backend == "te":
            if self._te is None or self._te.version != bank_version:
                self._te = te_backend.TEGroupedSlots(fc1, fc2, self.config, bank_version)
            return self._te(x, counts, probs, self.config)
        if self.backend == "fp8":
            return self._fp8_compute(x, counts, probs, fc1, fc2)
        h = grouped_linear(x, fc1, counts, self.backend)
        h = expert_activation(h, probs, self.config)
        return grouped_linear(h, fc2, counts, self.backend)

    def _fp8_compute(self, x, counts, probs, fc1, fc2, mm=None):
        """Both projections in FP8 (``mechanism/fp8.py``); the weights quantised again only when
        they change (another tensor, or written in place: its version counter moves; a block's
        own, so a replica change leaves the natives' quantised copy alone), the activations per
        call; outputs in the input's dtype. ``mm``: the scaled grouped GEMM (default
        ``torch._scaled_grouped_mm``; the tests pass a float reference)."""
        key = tuple((w.data_ptr(), w._version, tuple(w.shape)) for w in (fc1, fc2))
        if self._fp8 is None or self._fp8[0] != key:
            for w, what in ((fc1, "fc1"), (fc2, "fc2")):
                if w.shape[-1] % 16:
                    raise ValueError(f"expert_backend='fp8': {what}'s inner dimension {w.shape[-1]} is not a multiple "
                                     "of 16, which torch._scaled_grouped_mm needs")
            self._fp8 = (key, fp8.quantize_rows(fc1), fp8.quantize_rows(fc2))
        _, (w1, s1), (w2, s2) = self._fp8
        h = fp8.fp8_grouped_linear(x, w1, s1, counts, x.dtype, mm)
        h = expert_activation(h, probs, self.config)
        return fp8.fp8_grouped_linear(h, w2, s2, counts, x.dtype, mm)

    def _blocks(self, x, tokens_per_slot, probs, fc1_blocks, fc2_blocks, bank_version):
        sizes = [b.shape[0] for b in fc1_blocks]
        if sum(sizes) != tokens_per_slot.numel():
            raise RuntimeError(f"weight blocks hold {sum(sizes)} slots, tokens_per_slot has {tokens_per_slot.numel()}")
        if not hasattr(self, "_block_computes"):
            self._block_computes = []
        while len(self._block_computes) < len(sizes):  # one per block position: natives, replicas
            self._block_computes.append(SlotExpertCompute(self.config, self.requested_backend))
        if len(sizes) == 1:  # the natives alone: nothing to split, so no host read of the block sizes
            if x.shape[0] == 0:
                return x.new_empty((0, fc2_blocks[0].shape[1]))
            version = bank_version[0] if isinstance(bank_version, (list, tuple)) else (bank_version, 0)
            return self._block_computes[0](x, tokens_per_slot, probs, fc1_blocks[0], fc2_blocks[0], version)
        per_block = [int(c) for c in torch.stack([t.sum() for t in tokens_per_slot.split(sizes)]).tolist()]
        outs = []
        for i, (xs, ps, tps, w1, w2) in enumerate(zip(x.split(per_block), probs.split(per_block),
                                                      tokens_per_slot.split(sizes), fc1_blocks, fc2_blocks)):
            if xs.shape[0] == 0:
                outs.append(xs.new_empty((0, w2.shape[1])))
                continue
            version = bank_version[i] if isinstance(bank_version, (list, tuple)) else (bank_version, i)
            outs.append(self._block_computes[i](xs, tps, ps, w1, w2, version))
        return torch.cat(outs)
