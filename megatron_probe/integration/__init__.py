"""Integration layer: Megatron-Core glue (router, MoE layer, layer spec, CPU support)."""
