"""Cluster-scale simulator of expert-parallel MoE inference (SIMULATION, not a measurement).

Policy layer: pure functions on tensors, no process groups, no Megatron imports, deterministic.
Times come from :mod:`megatron_probe.policy.cost_model`, plans from the project's planner and
EPLB code. See docs/simulator.md.
"""
