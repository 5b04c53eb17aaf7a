"""Transformer Engine ``GroupedLinear`` over the expert bank (GPU only, optional).

Two private ``GroupedLinear`` modules (fc1 and fc2) with ``S = L + R`` GEMMs each; their weight
parameters are re-bound to the bank rows, so native experts and replicas run in one grouped GEMM
per projection, under whatever FP8 recipe the caller's ``te.pytorch.autocast`` /
``fp8_autocast`` sets (DelayedScaling, Float8CurrentScaling, MXFP8BlockScaling). Under FP8 the
token counts are padded to the recipe's alignment (16, or 32 for MXFP8) with zero rows, which
are dropped again after fc2. These modules are not registered as sub-modules: they never
appear in a state dict.
"""

from __future__ import annotations

from typing import List

import torch

try:  # TE is an optional GPU extra; any import failure means "not available"
    import transformer_engine.pytorch as te  # type: ignore

    HAVE_TE = True
except Exception:  # pragma: no cover - TE is never installed on CPU machines
    te = None
    HAVE_TE = False


def fp8_alignment() -> int:
    """Row alignment TE needs for the active FP8 recipe (1 when FP8 is off)."""
    if not HAVE_TE:
        return 1
    fp8 = te.fp8 if hasattr(te, "fp8") else None
    state = getattr(fp8, "FP8GlobalStateManager", None) if fp8 is not None else None
    if state is None or not state.is_fp8_enabled():
        return 1
    recipe = state.get_fp8_recipe()
    return 32 if recipe.__class__.__name__.startswith("MXFP8") else 16


class TEGroupedSlots:  # pragma: no cover - exercised by tools/gpu_check.sh only
    def __init__(self, fc1: torch.Tensor, fc2: torch.Tensor, config, version: int):
        S, F1, H = fc1.shape
        _, H2, Fh = fc2.shape
        kw = dict(bias=False, params_dtype=fc1.dtype, device=fc1.device)
        self.fc1 = te.GroupedLinear(S, H, F1, **kw)
        self.fc2 = te.GroupedLinear(S, Fh, H2, **kw)
        for lin, bank in ((self.fc1, fc1), (self.fc2, fc2)):
            for g in range(S):
                setattr(lin, f"weight{g}", torch.nn.Parameter(bank[g], requires_grad=False))
        self.version = version

    def __call__(self, x, counts: List[int], probs, config):
        from megatron_probe.mechanism.expert_compute import expert_activation

        align = fp8_alignment()
        if align > 1:
            padded = [(c + align - 1) // align * align for c in counts]
            x, probs = _pad_groups(x, counts, padded), _pad_groups(probs.unsqueeze(-1), counts, padded).squeeze(-1)
        else:
            padded = counts
        h = self.fc1(x, padded)
        h = expert_activation(h, probs, config)
        y = self.fc2(h, padded)
        if align > 1:
            y = _unpad_groups(y, counts, padded)
        return y


def _pad_groups(x, counts, padded):
    parts = []
    for xg, c, p in zip(torch.split(x, counts), counts, padded):
        parts.append(xg)
        if p > c:
            parts.append(x.new_zeros((p - c,) + tuple(x.shape[1:])))
    return torch.cat(parts) if parts else x


def _unpad_groups(y, counts, padded):
    return torch.cat([yg[:c] for yg, c in zip(torch.split(y, padded), counts)]) if counts else y
