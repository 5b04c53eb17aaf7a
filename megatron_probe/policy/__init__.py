"""Policy layer: pure functions on tensors (no process groups, no Megatron imports)."""

from megatron_probe.policy.placement import (  # noqa: F401
    EMPTY_SLOT,
    ExpertLayout,
    assignment_from_placement,
    empty_placement,
    holder_slots,
    imbalance_ratio,
    locality_even_assignment,
    rank_loads,
    slot_experts,
    validate_assignment,
    validate_placement,
    validate_split,
)

__all__ = [
    "EMPTY_SLOT", "ExpertLayout", "assignment_from_placement", "empty_placement", "holder_slots",
    "imbalance_ratio", "locality_even_assignment", "rank_loads", "slot_experts", "validate_assignment",
    "validate_placement", "validate_split",
]
