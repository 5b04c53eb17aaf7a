"""Finding the MoE layers of a Megatron model and the transformer layers that hold them."""

from __future__ import annotations

from typing import List

from megatron.core.transformer.moe.moe_layer import MoELayer


def moe_layers(model) -> List[MoELayer]:
    """The model's MoE layers (stock or PROBE), in forward order."""
    return [m for m in model.modules() if isinstance(m, MoELayer)]


def layer_holding(model, moe_layer: MoELayer):
    """The transformer layer whose ``mlp`` is ``moe_layer``."""
    for m in model.modules():
        if getattr(m, "mlp", None) is moe_layer:
            return m
    raise ValueError("the MoE layer is not the mlp of any transformer layer of this model")
