"""Megatron-Core glue: the PROBE router, MoE layer and layer spec, CPU support, process launch."""
