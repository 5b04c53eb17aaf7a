"""Shared by the multi-process tests: spawning a worker on N gloo ranks, and the small Megatron
objects the workers build.

A worker is a module-level function ``fn(rank, world_size, *args)`` defined in the test file
beside the test that spawns it; the spawned processes import that file by name (``tests/`` is on
``sys.path``, which spawn hands to the children). A worker asserts what its rank can check on its
own: a failing assert fails the spawn, and pytest shows the worker's traceback. Workers run
without pytest's assertion rewriting, so each assert carries the values it compared as its
message. What a worker returns (anything picklable; most return None) comes back to the test,
one entry per rank, for checks that compare ranks or runs.
"""

from __future__ import annotations

import os
import pickle
import tempfile
import warnings

import torch
import torch.nn.functional as F

from megatron_probe.mcore.launch import run_distributed

warnings.filterwarnings("ignore")


def run_ranks(fn, world_size, *args) -> list:
    """Call ``fn(rank, world_size, *args)`` on ``world_size`` spawned gloo ranks; returns what
    each rank returned, indexed by rank."""
    with tempfile.TemporaryDirectory() as out_dir:
        run_distributed(_call_and_keep, world_size, fn, out_dir, *args, backend="gloo")
        results = []
        for r in range(world_size):
            path = os.path.join(out_dir, f"rank{r}.pkl")
            assert os.path.exists(path), f"rank {r} of {world_size} never returned from {fn.__name__}"
            with open(path, "rb") as f:
                results.append(pickle.load(f))
    return results


def _call_and_keep(rank, world_size, fn, out_dir, *args):
    result = fn(rank, world_size, *args)
    with open(os.path.join(out_dir, f"rank{rank}.pkl"), "wb") as f:
        pickle.dump(result, f)


def init_ep(ep, tp=1, pp=1, etp=1):
    from megatron_probe.mcore.cpu import initialize_megatron_parallel

    initialize_megatron_parallel(ep, tp_size=tp, pp_size=pp, etp_size=etp)


def moe_config(ep, E=8, K=2, H=32, Fh=64, dtype=torch.float32, **kw):
    from megatron.core.transformer.transformer_config import TransformerConfig

    base = dict(
        num_layers=2, hidden_size=H, num_attention_heads=4, ffn_hidden_size=Fh, num_moe_experts=E,
        moe_router_topk=K, expert_model_parallel_size=ep, moe_token_dispatcher_type="alltoall",
        use_cpu_initialization=True, add_bias_linear=False, params_dtype=dtype,
        moe_aux_loss_coeff=0.0, gated_linear_unit=True, activation_func=F.silu,
        bias_activation_fusion=False, hidden_dropout=0.0, attention_dropout=0.0,
    )
    base.update(kw)
    return TransformerConfig(**base)


def probe_layer(cfg, R, backend="auto"):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.spec_utils import build_module

    from megatron_probe import ProbeConfig, probe_layer_spec

    spec = probe_layer_spec(get_gpt_layer_local_spec(num_experts=cfg.num_moe_experts, moe_grouped_gemm=False),
                            ProbeConfig(replica_slots_per_rank=R, expert_backend=backend))
    return build_module(spec.submodules.mlp, config=cfg)
