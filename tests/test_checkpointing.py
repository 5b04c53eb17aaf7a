"""Megatron distributed checkpoints (``mcore/checkpointing.py``): a stock Megatron model saved with
``dist_checkpointing`` (torch_dist) at EP 1 loads into the PROBE model at EP 1 and EP 2, every
tensor equal to the same weights loaded from the shipped checkpoint; a folder that is not one,
and a checkpoint of another model, are refused by name."""

import dataclasses
import os

import pytest
import torch

from distributed import run_ranks

pytest.importorskip("psutil", reason="Megatron's checkpoint writer needs psutil (pip install '.[dev]' brings it)")

from megatron_probe.experiments.tiny_moe import DEFAULT_CHECKPOINT  # noqa: E402

needs_ckpt = pytest.mark.skipif(not os.path.exists(os.path.join(DEFAULT_CHECKPOINT, "model.pt")),
                                reason="no shipped checkpoint")


def save_stock(rank, ws, path):
    from megatron_probe.experiments.tiny_moe import load_model
    from megatron_probe.mcore.checkpointing import save_distributed_checkpoint
    from megatron_probe.mcore.cpu import initialize_megatron_parallel

    initialize_megatron_parallel(1)
    model, _, _ = load_model(spec="stock")
    save_distributed_checkpoint(model, path)


def load_into_probe(rank, ws, path):
    """The PROBE model at EP ``ws`` built with other (random) weights, then loaded from the stock
    model's distributed checkpoint: every tensor equals this rank's shard of the shipped
    checkpoint (what ``load_model`` gives)."""
    from megatron.core import parallel_state as ps

    from megatron_probe import ProbeConfig
    from megatron_probe.experiments.tiny_moe import build_model, load_model
    from megatron_probe.mcore.checkpointing import load_distributed_checkpoint
    from megatron_probe.mcore.cpu import initialize_megatron_parallel

    initialize_megatron_parallel(ws)
    want, _, cfg = load_model(spec="probe", ep=ws, rank=ps.get_expert_model_parallel_rank(),
                              probe_config=ProbeConfig(replica_slots_per_rank=1 if ws > 1 else 0))
    torch.manual_seed(123 + rank)
    model = build_model(cfg, spec="probe", probe_config=ProbeConfig(replica_slots_per_rank=1 if ws > 1 else 0), ep=ws)
    tensors = {k: v for k, v in want.state_dict().items() if isinstance(v, torch.Tensor)}
    differ = [k for k, v in model.state_dict().items() if k in tensors and not torch.equal(v, tensors[k])]
    assert len(differ) > 10, differ  # the fresh model's weights are not the checkpoint's
    load_distributed_checkpoint(model, path)
    got = model.state_dict()
    differ = [k for k, v in tensors.items() if not torch.equal(got[k], v)]
    assert not differ, (rank, differ[:5])
    assert any(".experts.local_experts." in k for k in tensors), sorted(tensors)[:5]


def refuse_other_model(rank, ws, path, other):
    from megatron_probe import ProbeConfig
    from megatron_probe.experiments.tiny_moe import TinyMoEConfig, build_model
    from megatron_probe.mcore.checkpointing import load_distributed_checkpoint
    from megatron_probe.mcore.cpu import initialize_megatron_parallel

    initialize_megatron_parallel(1)
    cfg = TinyMoEConfig.from_json(os.path.join(DEFAULT_CHECKPOINT, "config.json"))
    other_cfg = dataclasses.replace(cfg, expert_ffn_hidden=cfg.expert_ffn_hidden * 2)
    model = build_model(other_cfg, spec="probe", probe_config=ProbeConfig(replica_slots_per_rank=0))
    L, E, H, F = cfg.num_layers, cfg.num_experts, cfg.hidden_size, cfg.expert_ffn_hidden
    want = f"linear_fc2.weight: ({L}, {E}, {H}, {F}) there, ({L}, {E}, {H}, {2 * F}) here"
    with pytest.raises(ValueError) as e:
        load_distributed_checkpoint(model, path)
    assert "is a checkpoint of another model" in str(e.value) and want in str(e.value), str(e.value)
    with pytest.raises(ValueError, match="is not a Megatron distributed checkpoint"):
        load_distributed_checkpoint(model, other)


@pytest.mark.slow
@needs_ckpt
def test_stock_distributed_checkpoint_loads_into_the_probe_model_at_another_ep_size(tmp_path):
    path = str(tmp_path / "dist")
    run_ranks(save_stock, 1, path)
    assert os.path.exists(os.path.join(path, "metadata.json"))
    run_ranks(load_into_probe, 1, path)
    run_ranks(load_into_probe, 2, path)
    run_ranks(refuse_other_model, 1, path, str(tmp_path))
