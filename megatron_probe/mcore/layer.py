"""``ProbeMoELayer``: Megatron's ``MoELayer`` with the PROBE dispatcher and replicated experts.

The stock expert module is built from the spec as usual (``SequentialMLP`` or
``TEGroupedMLP``), so parameter names and shapes -- and therefore checkpoints -- are exactly the
stock layer's. Its weights are re-bound into an :class:`ExpertBank` that adds ``R`` replica
slots (buffers, never saved), and expert compute runs native and replica slots together.

One token's path through Megatron-Core 0.16's ``MoELayer.forward`` (inherited unchanged) and
what this class changes:

1. ``route``: the router (``ProbeRouter`` from ``probe_layer_spec``: TopKRouter's routing).
2. ``preprocess`` -> ``token_dispatcher.dispatch_preprocess``: the PROBE dispatcher
   (``mechanism/dispatcher.py``, installed here in place of Megatron's) exchanges counts, takes
   the placement and assignment and orders the pairs by destination slot.
3. ``dispatch`` -> ``token_dispatch``: the uneven All-to-All.
4. ``shared_experts_compute``: Megatron's (overlap refused).
5. ``routed_experts_compute``: **overridden** here: ``dispatch_postprocess``, then one grouped
   GEMM per projection over the bank's native and replica blocks (``SlotExpertCompute``) instead
   of ``self.experts``, then ``combine_preprocess``.
6. ``combine`` -> ``token_combine`` and 7. ``postprocess`` -> ``combine_postprocess``: back to
   the source ranks, top-k outputs summed in the stock order.

Replicas are set from outside: :meth:`ProbeMoELayer.set_replica_placement` (fills the own
replica rows, synchronously) or the live pipeline (``runtime/pipeline.py``), which shares one
replica pool across the layers and drives the dispatcher through its hooks.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from megatron.core import utils as mcore_utils
from megatron.core.transformer.moe.experts import GroupedMLP, SequentialMLP, TEGroupedMLP
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.moe.moe_utils import get_default_pg_collection

from megatron_probe.config import ProbeConfig
from megatron_probe.mechanism.dispatcher import ProbeTokenDispatcher
from megatron_probe.mechanism.expert_bank import ExpertBank
from megatron_probe.mechanism.expert_compute import SlotExpertCompute, check_expert_config
from megatron_probe.mechanism.profiling import nvtx_range
from megatron_probe.policy.placement import EMPTY_SLOT


def native_weight_refs(experts: torch.nn.Module) -> Tuple[List, List]:
    """``(module, attribute)`` of each native expert's fc1 and fc2 weight, in local-expert order."""
    if isinstance(experts, SequentialMLP):
        fc1 = [(e.linear_fc1, "weight") for e in experts.local_experts]
        fc2 = [(e.linear_fc2, "weight") for e in experts.local_experts]
        return fc1, fc2
    if TEGroupedMLP is not None and isinstance(experts, TEGroupedMLP):
        n = experts.num_local_experts
        return ([(experts.linear_fc1, f"weight{i}") for i in range(n)],
                [(experts.linear_fc2, f"weight{i}") for i in range(n)])
    if GroupedMLP is not None and isinstance(experts, GroupedMLP):
        raise NotImplementedError(
            "the legacy GroupedMLP expert layout (moe_grouped_gemm without Transformer Engine) is not "
            "supported by the PROBE layer; use SequentialMLP (moe_grouped_gemm=False) or TEGroupedMLP"
        )
    raise NotImplementedError(f"unsupported expert module {type(experts).__name__}")


class ProbeMoELayer(MoELayer):
    def __init__(self, config, submodules=None, layer_number: Optional[int] = None,
                 pg_collection=None, probe_config: Optional[ProbeConfig] = None):
        probe_config = probe_config if probe_config is not None else ProbeConfig()
        if pg_collection is None:
            # TransformerLayer hands process groups only to the exact MoELayer class
            pg_collection = get_default_pg_collection()
        ep = mcore_utils.get_pg_size(pg_collection.ep)
        probe_config.validate_for_model(config.num_moe_experts, ep, config.moe_router_topk)
        check_expert_config(config)
        if config.moe_shared_expert_overlap:
            raise NotImplementedError("moe_shared_expert_overlap is not supported by the PROBE dispatcher")
        if config.moe_expert_capacity_factor is not None:
            raise NotImplementedError("the PROBE dispatcher is dropless: moe_expert_capacity_factor must be None")
        # MoELayer picks its dispatcher from a fixed list; build with 'allgather' (its constructor
        # touches no CUDA) and replace it.
        wanted = config.moe_token_dispatcher_type
        config.moe_token_dispatcher_type = "allgather"
        try:
            super().__init__(config, submodules, layer_number, pg_collection)
        finally:
            config.moe_token_dispatcher_type = wanted
        self.probe_config = probe_config
        self.token_dispatcher = ProbeTokenDispatcher(
            self.num_local_experts, self.local_expert_indices, config=self.config,
            pg_collection=pg_collection, probe_config=probe_config,
        )
        self.layout = self.token_dispatcher.layout
        self.expert_bank = ExpertBank(self.layout, pg_collection.ep)
        self.expert_bank.adopt(*native_weight_refs(self.experts))
        self.expert_compute = SlotExpertCompute(self.config, probe_config.expert_backend)

    # ------------------------------------------------------------------ replicas
    def set_replica_placement(self, placement: torch.Tensor) -> int:
        """Fill the replica slots to match ``placement`` ``[ep, R]`` and route with it.

        Collective over the EP group (every rank passes the same placement). Synchronous.
        Returns the number of experts this rank received.
        """
        received = self.expert_bank.fill(placement)
        self.token_dispatcher.set_placement(placement)
        return received

    def clear_replicas(self) -> None:
        self.set_replica_placement(torch.full_like(self.token_dispatcher.placement, EMPTY_SLOT))

    def set_next_assignment(self, assignment: Optional[torch.Tensor]) -> None:
        self.token_dispatcher.set_next_assignment(assignment)

    def replica_memory_bytes(self) -> int:
        return self.expert_bank.replica_bytes()

    # ------------------------------------------------------------------ forward pieces
    def routed_experts_compute(self, hidden_states: torch.Tensor, probs: torch.Tensor):
        dispatched, tokens_per_slot, permuted_probs = self.token_dispatcher.dispatch_postprocess(
            hidden_states, probs
        )
        natives = self.expert_bank.native_params()[0]
        differentiable = torch.is_grad_enabled() and any(p.requires_grad for p in natives)
        if differentiable and self.token_dispatcher.tp_size > 1:
            raise NotImplementedError("expert tensor parallel in the PROBE layer is for inference: run under "
                                      "torch.no_grad()/inference_mode(), or use expert TP 1")
        if differentiable and bool((self.token_dispatcher.placement >= 0).any()):
            raise NotImplementedError(
                "replicated experts are for inference: clear the replica placement "
                "(clear_replicas()) or run under torch.no_grad()/inference_mode()"
            )
        bank = self.expert_bank
        # a dispatch with no replica hands the experts the native slots alone
        fc1, fc2 = bank.weights(differentiable, replicas=tokens_per_slot.numel() != self.layout.num_local_experts)
        with nvtx_range("experts"):
            output = self.expert_compute(dispatched, tokens_per_slot, permuted_probs, fc1, fc2,
                                         bank.weights_version())
        return self.token_dispatcher.combine_preprocess(output), None

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        key = prefix + "router.weight"
        if key in state_dict and tuple(state_dict[key].shape) != tuple(self.router.weight.shape):
            got = tuple(state_dict[key].shape)
            raise ValueError(
                f"checkpoint is from another model: its router at {key!r} has shape {got} "
                f"(experts, hidden), this layer expects {tuple(self.router.weight.shape)} "
                f"(num_moe_experts={self.config.num_moe_experts}, hidden_size={self.config.hidden_size})"
            )
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
