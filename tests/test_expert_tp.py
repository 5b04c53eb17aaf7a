"""Expert tensor parallelism: how an expert's weights split over the expert-TP ranks, and the
PROBE layer's refusal of an expert-TP group that is not the TP group. The outputs under expert
TP are proven by the equivalence fuzz, the live pipeline and the serving tests."""

import pytest
import torch
import torch.nn.functional as F

from distributed import init_ep, moe_config, run_ranks
from megatron_probe.mcore.expert_shards import expert_weight_shard


@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("etp", [1, 2, 4])
def test_expert_shards_sum_to_the_whole_expert(gated, etp):
    """Megatron's column-parallel fc1 (gate and linear halves split apart) and row-parallel fc2:
    the ranks' partial outputs sum to the whole expert's output, and each rank's fc1 holds its
    gate share above its linear share."""
    gen = torch.Generator().manual_seed(etp + 10 * gated)
    H, Fh, T = 8, 12, 5
    w1 = torch.randn(2 * Fh if gated else Fh, H, generator=gen, dtype=torch.float64)
    w2 = torch.randn(H, Fh, generator=gen, dtype=torch.float64)
    x = torch.randn(T, H, generator=gen, dtype=torch.float64)

    def expert(a, b):
        h = x @ a.T
        if gated:
            g, lin = h.chunk(2, dim=-1)
            h = F.silu(g) * lin
        return h @ b.T

    parts = [expert(expert_weight_shard(w1, "fc1", etp, t, gated), expert_weight_shard(w2, "fc2", etp, t, gated))
             for t in range(etp)]
    assert torch.allclose(sum(parts), expert(w1, w2), rtol=1e-12, atol=1e-12)
    if gated and etp > 1:
        s = expert_weight_shard(w1, "fc1", etp, 1, gated)
        assert torch.equal(s[: Fh // etp], w1[Fh // etp: 2 * Fh // etp])  # gate share of rank 1
        assert torch.equal(s[Fh // etp:], w1[Fh + Fh // etp: Fh + 2 * Fh // etp])  # its linear share


@pytest.mark.parametrize("args, msg", [
    ((torch.zeros(10, 4), "fc1", 4, 0, True), "5 rows per half do not split over expert TP 4"),
    ((torch.zeros(4, 6), "fc2", 4, 0, True), "6 columns do not split over expert TP 4"),
    ((torch.zeros(8, 4), "fc1", 2, 2, True), "expert-TP rank 2 out of range for expert TP 2"),
    ((torch.zeros(8, 4), "fc3", 2, 0, True), "which='fc3'; valid: 'fc1', 'fc2'"),
])
def test_expert_shards_refuse_what_does_not_split(args, msg):
    with pytest.raises(ValueError, match=msg.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        expert_weight_shard(*args)


def etp_without_tp(rank, ws):
    """Expert TP 2 with TP 1 (Megatron allows it: the expert-TP group [0, 1] is not a TP group):
    the PROBE layer refuses it by name."""
    from megatron.core.transformer.spec_utils import build_module

    from megatron_probe import ProbeConfig
    from megatron_probe.experiments.tiny_moe import TinyMoEConfig, layer_spec

    init_ep(1, tp=1, etp=2)
    cfg = moe_config(1, expert_tensor_parallel_size=2)
    tiny = TinyMoEConfig(num_layers=1, hidden_size=32, num_attention_heads=4, num_experts=8, topk=2,
                         expert_ffn_hidden=16, seq_length=16, vocab_size=32)
    spec = layer_spec(tiny, "probe", ProbeConfig(replica_slots_per_rank=0)).submodules.mlp
    with pytest.raises(NotImplementedError) as e:
        build_module(spec, config=cfg)
    assert "expert tensor parallel size 2 over ranks [0, 1]" in str(e.value), str(e.value)
    assert "valid: expert_tensor_parallel_size 1 or tensor_model_parallel_size" in str(e.value), str(e.value)


def test_probe_layer_refuses_expert_tp_over_other_ranks_than_tp():
    run_ranks(etp_without_tp, 2)


def varying_rows(rank, ws):
    """The expert-TP token gather: ranks with different row counts get every rank's rows in rank
    order, the same with the counts passed in (one gather instead of two), and a wrong count
    is refused by name."""
    import torch.distributed as dist

    from megatron_probe.mechanism.comm import all_gather_varying_rows

    init_ep(1)
    rows = [torch.arange(3 * (r + 1) * 2, dtype=torch.float32).view(-1, 2) + 100 * r for r in range(ws)]
    whole, sizes = all_gather_varying_rows(rows[rank], dist.group.WORLD)
    assert sizes == [3 * (r + 1) for r in range(ws)], sizes
    assert torch.equal(whole, torch.cat(rows)), whole
    flags = [(rows[r][:, :1] > 100 * r + 2).to(torch.uint8) for r in range(ws)]
    again, same = all_gather_varying_rows(flags[rank], dist.group.WORLD, sizes)
    assert same == sizes and torch.equal(again, torch.cat(flags)), again
    with pytest.raises(ValueError, match=rf"do not match a group of 2 ranks with {3 * (rank + 1)} rows on rank {rank}"):
        all_gather_varying_rows(rows[rank], dist.group.WORLD, [1, 6] if rank == 0 else [3, 1])
    return True


def test_token_gather_of_varying_rows_with_and_without_known_counts():
    assert run_ranks(varying_rows, 2) == [True, True]
