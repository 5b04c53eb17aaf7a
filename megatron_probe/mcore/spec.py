"""One call turns a stock Megatron layer spec into a PROBE one; and two ready spec objects for
Megatron's own training and inference scripts, which take a layer spec by module and name:

    --spec megatron_probe.mcore.spec probe_gpt_layer_spec        (Transformer Engine where it runs)
    --spec megatron_probe.mcore.spec probe_gpt_layer_local_spec  (Megatron's local modules)

Both are Megatron's GPT MoE layer spec with the PROBE layer and router in it and the default
``ProbeConfig`` (no replica slots: without the live pipeline, which a Megatron script does not
attach, the layer routes and computes as the stock one). Dense models are not affected: the
spec is for MoE layers (Megatron builds a dense MLP only from a spec without experts).
"""

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


def _gpt_spec(use_te: bool):
    from megatron.core.models.gpt import gpt_layer_specs

    # num_experts only selects the MoE MLP here: the expert count comes from the model's config
    if use_te:
        stock = gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(num_experts=1)
    else:
        stock = gpt_layer_specs.get_gpt_layer_local_spec(num_experts=1)
    return probe_layer_spec(stock, ProbeConfig())


def _have_te() -> bool:
    from megatron_probe.mechanism import te_backend

    return te_backend.HAVE_TE


probe_gpt_layer_local_spec = _gpt_spec(use_te=False)
probe_gpt_layer_spec = _gpt_spec(use_te=True) if _have_te() else probe_gpt_layer_local_spec
