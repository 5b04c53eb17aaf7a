"""One call turns a stock Megatron layer spec into a PROBE one."""

from __future__ import annotations

import copy
from typing import Optional

from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.moe.router import TopKRouter
from megatron.core.transformer.spec_utils import ModuleSpec

from megatron_probe.config import ProbeConfig
from megatron_probe.mcore.layer import ProbeMoELayer
from megatron_probe.mcore.router import ProbeRouter


def probe_layer_spec(spec, probe_config: Optional[ProbeConfig] = None):
    """Copy of ``spec`` whose MoE blocks are :class:`ProbeMoELayer` with :class:`ProbeRouter`.

    Accepts a transformer-layer ``ModuleSpec`` (e.g. from ``get_gpt_layer_local_spec`` or
    ``get_gpt_layer_with_transformer_engine_spec``) or a block spec with ``layer_specs`` (e.g.
    from ``get_gpt_decoder_block_spec``). Dense layers are left alone. Raises ValueError when
    the spec contains no MoE layer.
    """
    probe_config = probe_config if probe_config is not None else ProbeConfig()
    spec = copy.deepcopy(spec)
    layer_specs = getattr(spec, "layer_specs", None)
    if layer_specs is None and hasattr(spec, "submodules"):
        layer_specs = getattr(spec.submodules, "layer_specs", None)
    targets = list(layer_specs) if layer_specs is not None else [spec]
    converted = sum(_convert_layer(layer, probe_config) for layer in targets)
    if converted == 0:
        raise ValueError(
            "probe_layer_spec found no MoE layer in the spec (no submodules.mlp with module "
            "MoELayer); build the stock spec with num_experts set"
        )
    return spec


def _convert_layer(layer_spec, probe_config: ProbeConfig) -> int:
    mlp = getattr(getattr(layer_spec, "submodules", None), "mlp", None)
    if not isinstance(mlp, ModuleSpec):
        return 0
    if not (isinstance(mlp.module, type) and issubclass(mlp.module, MoELayer)):
        return 0
    mlp.module = ProbeMoELayer
    mlp.params = dict(mlp.params or {}, probe_config=probe_config)
    router = getattr(mlp.submodules, "router", None)
    if router is None or router is TopKRouter:
        mlp.submodules.router = ProbeRouter
    return 1
