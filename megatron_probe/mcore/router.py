"""``ProbeRouter``: Megatron's ``TopKRouter`` with a gating that runs on CPU and GPU alike.

Routing semantics are TopKRouter's own (its ``routing`` method is inherited unchanged: softmax
and sigmoid score functions, top-k, pre-softmax, group-limited top-k, scaling, expert bias,
router replay). Only two CUDA assumptions of Megatron-Core 0.16 are removed:
* ``gating`` moves the weight to ``torch.cuda.current_device()`` and, without TE, its linear
  kernel is unbound; here it is a plain ``F.linear`` in the configured router dtype.
* the expert-bias / global-aux-loss buffers are created on the CUDA device; here on the
  device the router's weight lives on (same names, same persistence, so checkpoints match).

``logits_observer`` (a callable or ``None``) sees the router's logits right after gating: the
lookahead runtime uses it to score and distil its predictors against the true router.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from megatron.core.transformer.moe.router import TopKRouter


class ProbeRouter(TopKRouter):
    def __init__(self, config, pg_collection=None):
        if pg_collection is None:
            from megatron.core.transformer.moe.moe_utils import get_default_pg_collection

            pg_collection = get_default_pg_collection()
        if not torch.cuda.is_available():
            # build with the CUDA-buffer features off, then add the buffers on CPU
            cpu_config = copy.copy(config)
            cpu_config.moe_router_enable_expert_bias = False
            cpu_config.moe_aux_loss_coeff = _without_global_aux(config)
            super().__init__(config=cpu_config, pg_collection=pg_collection)
            self.config = config
            self.enable_expert_bias = config.moe_router_enable_expert_bias
            E = config.num_moe_experts
            if self.enable_expert_bias:
                self._cpu_buffer("local_tokens_per_expert", torch.zeros(E), persistent=False)
                self._cpu_buffer("expert_bias", torch.zeros(E), persistent=True)
            if self.get_aux_loss_coeff("global_aux_loss") > 0:
                self._cpu_buffer("global_tokens_per_expert", torch.zeros(E), persistent=False)
                self._cpu_buffer("ga_steps", torch.tensor(0.0), persistent=False)
        else:
            super().__init__(config=config, pg_collection=pg_collection)
        self.logits_observer = None

    def _cpu_buffer(self, name: str, value: torch.Tensor, persistent: bool) -> None:
        if name in self.__dict__:  # TopKRouter set it to None as a plain attribute
            delattr(self, name)
        self.register_buffer(name, value.float(), persistent=persistent)

    def gating(self, input: torch.Tensor) -> torch.Tensor:
        router_dtype = {"fp32": torch.float32, "fp64": torch.float64}.get(
            self.config.moe_router_dtype, input.dtype
        )
        weight = self.weight.to(device=input.device, dtype=router_dtype)
        bias = None if self.bias is None else self.bias.to(device=input.device, dtype=router_dtype)
        logits = F.linear(input.to(router_dtype), weight, bias)
        if self.logits_observer is not None:
            self.logits_observer(logits)
        return logits


def _without_global_aux(config):
    """``moe_aux_loss_coeff`` with any 'global_aux_loss' term zeroed (list or scalar form)."""
    types = config.moe_router_load_balancing_type
    coeff = config.moe_aux_loss_coeff
    if isinstance(types, list):
        if not isinstance(coeff, list):
            coeff = [coeff] * len(types)
        return [0.0 if t == "global_aux_loss" else c for t, c in zip(types, coeff)]
    return 0.0 if types == "global_aux_loss" else coeff
