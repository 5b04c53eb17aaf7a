"""megatron_probe: PROBE expert-parallel MoE inference balancing for Megatron-Core.

``import megatron_probe`` needs neither a GPU, Transformer Engine nor apex; the Megatron
glue is imported lazily (``megatron_probe.probe_layer_spec`` etc.).
"""

from megatron_probe.config import ProbeConfig

__version__ = "0.1.0"

_LAZY = {
    "probe_layer_spec": "megatron_probe.mcore.spec",
    "ProbeMoELayer": "megatron_probe.mcore.layer",
    "ProbeRouter": "megatron_probe.mcore.router",
    "ProbeTokenDispatcher": "megatron_probe.mechanism.dispatcher",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'megatron_probe' has no attribute {name!r}")


__all__ = ["ProbeConfig", "__version__", *_LAZY]
