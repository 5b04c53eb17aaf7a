"""The lookahead runtime (runtime.lookahead) over gloo at EP 2 and 4: every rank's forecast in
its row of the all-gathered counts, the model's output unchanged with the predictors attached."""

import pytest
import torch
import torch.distributed as dist

from distributed import init_ep, run_ranks


def lookahead_counts(rank, ws):
    """Every rank forecasts its own tokens (different lengths per rank); the all-gathered
    ``[ep, E]`` counts must hold each rank's local forecast in its row, and the model's output
    must be the same with the predictors attached (also after online updates)."""
    from megatron_probe import ProbeConfig
    from megatron_probe.experiments.recorder import RoutingRecorder
    from megatron_probe.experiments.tiny_moe import TinyMoEConfig, build_model, forward_logits
    from megatron_probe.runtime.lookahead import LookaheadRuntime

    init_ep(ws)
    torch.manual_seed(0)
    cfg = TinyMoEConfig(num_layers=3, hidden_size=32, num_attention_heads=4, num_experts=8, topk=2,
                        expert_ffn_hidden=16, seq_length=64, vocab_size=128)
    model = build_model(cfg, spec="probe", probe_config=ProbeConfig(replica_slots_per_rank=1), ep=ws)
    model.eval()
    gen = torch.Generator().manual_seed(100 + rank)
    batches = [torch.randint(0, cfg.vocab_size, (1, 17 + 7 * rank + 3 * step), generator=gen) for step in range(3)]
    with torch.no_grad():
        refs = [forward_logits(model, b) for b in batches]
    rt = LookaheadRuntime(model, ProbeConfig(replica_slots_per_rank=1, predictor_hidden=8, predictor_lr=1e-2))
    checked = 0
    for step, (b, ref) in enumerate(zip(batches, refs)):
        tokens_all_ranks = sum(17 + 7 * r + 3 * step for r in range(ws))
        with torch.inference_mode(), RoutingRecorder(model, record_layer_input=True) as rec:
            out = forward_logits(model, b)
            assert torch.equal(out, ref), (f"step {step}: output changed", float((out - ref).abs().max()))
            recs, inp = rec.pop(), rec.pop_layer_input()
            for L in sorted(rt.predictors.layers):
                src = inp if L == 0 else recs[L - 1][0]
                local = rt.predictors[L].predict_counts(src)
                gathered = rt.predicted_counts(L)
                parts = [None] * ws
                dist.all_gather_object(parts, local.tolist())
                assert gathered.shape == (ws, cfg.num_experts) and gathered.tolist() == parts, (
                    f"step {step} layer {L}: gathered rows are not the ranks' forecasts", gathered.tolist(), parts)
                # every token of every rank
                assert int(gathered.sum()) == cfg.topk * tokens_all_ranks, (
                    f"step {step} layer {L}", int(gathered.sum()), cfg.topk * tokens_all_ranks)
                checked += 1
        rt.end_step()
    assert checked == 3 * 3 and rt.distiller.updates == 3, (checked, rt.distiller.updates)
    topk_acc = rt.metrics()["local"]["mean_topk_acc"]
    assert 0 < topk_acc <= 1, topk_acc
    rt.close()


@pytest.mark.slow
@pytest.mark.parametrize("ws", [2, 4])
def test_lookahead_counts_all_gathered_and_output_unchanged(ws):
    run_ranks(lookahead_counts, ws)
