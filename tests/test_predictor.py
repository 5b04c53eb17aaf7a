"""Lookahead predictor: router-exact selection, zero-init equivalence, persistence, distillation,
metrics, and that attaching it never changes the model's output."""

import os

import pytest
import torch

from megatron_probe.config import ProbeConfig
from megatron_probe.policy.distill import OnlineDistiller
from megatron_probe.policy.placement import static_rank_loads
from megatron_probe.policy.prediction_metrics import PredictionStats, topk_overlap
from megatron_probe.policy.predictor import (LookaheadPredictor, PredictorSet, RouterSpec, distill_loss,
                                             expert_counts, select_topk, selection_scores)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CKPT = os.path.join(ROOT, "checkpoints", "tiny-moe-v1")
HAVE_CKPT = os.path.exists(os.path.join(CKPT, "model.pt"))


def _megatron_ids(logits, spec, expert_bias):
    from megatron.core.transformer.moe.moe_utils import topk_routing_with_score_function

    _, rmap = topk_routing_with_score_function(
        logits, spec.topk, use_pre_softmax=spec.pre_softmax, num_groups=spec.num_groups,
        group_topk=spec.group_topk, score_function=spec.score_function, expert_bias=expert_bias)
    return rmap


@pytest.mark.parametrize("spec, bias", [
    (RouterSpec(16, 4), False),
    (RouterSpec(16, 1, pre_softmax=True), False),
    (RouterSpec(16, 4, pre_softmax=True), False),
    (RouterSpec(16, 4, score_function="sigmoid"), False),
    (RouterSpec(16, 4, score_function="sigmoid"), True),
    (RouterSpec(16, 4, num_groups=4, group_topk=2), False),
    (RouterSpec(32, 8, score_function="sigmoid", num_groups=8, group_topk=4), True),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_select_topk_matches_megatron_routing(spec, bias, dtype):
    gen = torch.Generator().manual_seed(0)
    for trial in range(5):
        logits = (torch.randn(257, spec.num_experts, generator=gen) * (3 if trial % 2 else 0.3)).to(dtype)
        if trial == 4:  # adversarial: many exact ties
            logits = logits.round()
        eb = torch.randn(spec.num_experts, generator=gen) * 0.1 if bias else None
        ids = select_topk(logits, spec, eb)
        mask = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, ids, True)
        ref = _megatron_ids(logits, spec, eb)
        assert torch.equal(mask, ref), f"trial {trial}"
        # a longer ranking (top-2K recall) starts with equally good experts (the same ones up to
        # ties) and never repeats one
        long = select_topk(logits, spec, eb, k=2 * spec.topk)
        sc = selection_scores(logits, spec, eb)
        assert torch.equal(sc.gather(1, long[:, : spec.topk]).sort(1)[0], sc.gather(1, ids).sort(1)[0])
        assert long.shape[1] == min(2 * spec.topk, spec.num_experts)
        assert all(len(set(r)) == len(r) for r in long.tolist())


def test_top2k_is_capped_at_the_expert_count():
    ids = select_topk(torch.randn(5, 4), RouterSpec(4, 3), k=6)
    assert ids.shape == (5, 4)

def test_zero_init_predictor_is_the_frozen_router_and_rejects_wrong_hidden():
    gen = torch.Generator().manual_seed(1)
    W = torch.randn(8, 24, generator=gen)
    spec = RouterSpec(8, 2)
    p = LookaheadPredictor(W, spec, residual_hidden=16, target_layer=1)
    h = torch.randn(5, 3, 24, generator=gen)
    assert torch.equal(p(h), torch.nn.functional.linear(h.reshape(-1, 24), W))
    assert p.fc2.weight.abs().sum() == 0 and p.fc1.weight.abs().sum() > 0
    with pytest.raises(ValueError, match="expects hidden size 24"):
        p(torch.randn(4, 32))
    with pytest.raises(ValueError, match="residual_hidden=-1"):
        LookaheadPredictor(W, spec, residual_hidden=-1)
    with pytest.raises(ValueError, match="num_experts=9"):
        LookaheadPredictor(W, RouterSpec(9, 2), residual_hidden=4)


def _set(seed=0, E=8, H=24, layers=3, D=16, wseed=0):
    gen = torch.Generator().manual_seed(wseed)
    routers = [(torch.randn(E, H, generator=gen), None, None) for _ in range(layers)]
    return PredictorSet.from_routers(routers, RouterSpec(E, 2), D, layer0=True, seed=seed)


def test_predictor_state_mapped_onto_pipeline_stages(tmp_path):
    """A whole model's state (4 MoE layers) loads into the sets of two pipeline stages (2 layers
    each, numbered from 0): every layer takes its whole-model weights, except stage 1's first
    layer, which is forecast from the stage's input and keeps its own start; a stage that does not
    fit the model, or a file for another layer count, is refused."""
    gen = torch.Generator().manual_seed(3)
    routers = [(torch.randn(8, 24, generator=gen), None, None) for _ in range(4)]
    whole = PredictorSet.from_routers(routers, RouterSpec(8, 2), 16, layer0=True)
    with torch.no_grad():
        for p in whole.parameters():
            p.add_(torch.randn_like(p))
    path = str(tmp_path / "pred.pt")
    whole.save(path)
    h = torch.randn(10, 24)
    for stage in (0, 1):
        part = PredictorSet.from_routers(routers[2 * stage:2 * stage + 2], RouterSpec(8, 2), 16, layer0=True, seed=9)
        start = {L: part[L](h).clone() for L in part.layers}
        part.load(path, first_layer=2 * stage, model_layers=4)
        for L in part.layers:
            if stage == 1 and L == 0:
                assert torch.equal(part[L](h), start[L])  # its own start: another input than the file's layer 2
            else:
                assert torch.equal(part[L](h), whole[2 * stage + L](h)), (stage, L)
    part = PredictorSet.from_routers(routers[2:], RouterSpec(8, 2), 16, layer0=True)
    with pytest.raises(ValueError, match="a stage of 2 MoE layers from layer 3 does not fit a model of 4"):
        part.load(path, first_layer=3, model_layers=4)
    with pytest.raises(ValueError, match="num_layers is 4 there, 6 here"):
        part.load(path, first_layer=2, model_layers=6)
    with pytest.raises(ValueError, match="residual_hidden is 16 there, 8 here"):
        PredictorSet.from_routers(routers[2:], RouterSpec(8, 2), 8, layer0=True).load(path, first_layer=2,
                                                                                     model_layers=4)


def test_predictor_state_round_trip_and_refusals(tmp_path):
    a = _set(seed=0)
    with torch.no_grad():
        for p in a.parameters():
            p.add_(torch.randn_like(p))
    path = str(tmp_path / "pred.pt")
    a.save(path, extra={"note": "x"})
    b = _set(seed=5)  # other residual init, same routers
    assert not torch.equal(b[1].fc1.weight, a[1].fc1.weight)
    assert b.load(path) == {"note": "x"}
    h = torch.randn(10, 24)
    for L in a.layers:
        assert torch.equal(a[L](h), b[L](h))
    with pytest.raises(ValueError, match="distilled for another model: router fingerprint"):
        _set(wseed=1).load(path)
    with pytest.raises(ValueError, match="hidden_size is 24 there, 32 here"):
        _set(H=32).load(path)
    with pytest.raises(ValueError, match="residual_hidden is 16 there, 8 here"):
        _set(D=8).load(path)
    torch.save({"format": "something else"}, str(tmp_path / "bad.pt"))
    with pytest.raises(ValueError, match="not a megatron_probe.predictor v1 predictor state file"):
        a.load(str(tmp_path / "bad.pt"))
    # the frozen router copies are buffers outside the saved state: never trained, never saved
    assert not any("gate_weight" in k for k in a.state_dict())
    assert all("fc" in n for n, _ in a.named_parameters())


def test_layer0_predictor_must_read_the_pre_attention_input():
    W = torch.randn(8, 24)
    with pytest.raises(ValueError, match="layer 0 has no previous MoE layer"):
        PredictorSet([LookaheadPredictor(W, RouterSpec(8, 2), 4, target_layer=0)], 2, "x")


def test_online_distiller_reduces_the_loss_and_is_bounded():
    torch.manual_seed(0)
    E, H = 8, 24
    teacher = torch.nn.Sequential(torch.nn.Linear(H, 32), torch.nn.SiLU(), torch.nn.Linear(32, E))
    preds = _set(E=E, H=H, layers=2)
    x = torch.randn(600, H)
    with torch.no_grad():
        y = teacher(x) * 3
    d = OnlineDistiller(preds, lr=1e-2, sample_tokens=128)
    spec = preds[1].spec
    before = float(distill_loss(preds[1](x), y, spec))
    for _ in range(60):
        idx = d.sample_index(x.shape[0])
        assert idx.shape == (128,)
        d.observe(1, x[idx], y[idx])
        d.observe(1, x[idx], y[idx])  # over the bound: the older sample is dropped
        assert sum(a.shape[0] for a, _ in d._pending[1]) == 128
        assert d.step() is not None
    after = float(distill_loss(preds[1](x), y, spec))
    assert after < 0.9 * before, (before, after)
    assert d.updates == 60
    frozen = OnlineDistiller(preds, frozen=True)
    w = preds[1].fc2.weight.clone()
    frozen.observe(1, x, y)
    assert frozen.step() is None and torch.equal(w, preds[1].fc2.weight)
    with pytest.raises(ValueError, match="period=0"):
        OnlineDistiller(preds, period=0)


def test_inference_mode_samples_can_be_distilled():
    preds = _set()
    d = OnlineDistiller(preds, lr=1e-2)
    with torch.inference_mode():
        x = torch.randn(50, 24)
        y = torch.randn(50, 8)
        d.observe(2, x, y)
    assert 2 in d.step()


def test_metrics_on_hand_computed_cases():
    true = torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7]])
    pred = torch.tensor([[0, 1, 9, 8], [7, 6, 5, 4]])
    pred2k = torch.tensor([[0, 1, 9, 8, 2, 3, 10, 11], [7, 6, 5, 4, 0, 1, 2, 3]])
    assert topk_overlap(pred, true).tolist() == [2, 4]
    s = PredictionStats(ep=2, topk=4)
    s.add_tokens(0, true, pred, pred2k)
    tc = torch.tensor([4, 0, 0, 0, 0, 0, 0, 0])
    pc = torch.tensor([2, 0, 0, 0, 2, 0, 0, 0])
    s.add_counts(0, tc, pc)
    row = s.summary()["layers"][0]
    assert row["topk_acc"] == 0.75  # (2/4 + 4/4) / 2
    assert row["half_hit"] == 1.0  # {0,1} and {4,5} are both inside the predicted top-4
    assert row["recall_2k"] == 1.0
    assert row["count_err"] == 1.0  # |2-4| + |2-0| over 4
    assert row["rank_load_err"] == 1.0  # ranks (4, 0) vs (2, 2)
    assert row["ir_true"] == 2.0 and row["ir_pred"] == 1.0
    # half hit needs *both* of the true top-2 inside the predicted top-4
    s2 = PredictionStats(ep=1, topk=4)
    s2.add_tokens(0, torch.tensor([[0, 1, 2, 3]]), torch.tensor([[0, 5, 2, 3]]), None)
    assert s2.summary()["layers"][0]["half_hit"] == 0.0 and s2.summary()["layers"][0]["topk_acc"] == 0.75
    assert static_rank_loads(torch.arange(8), 4).tolist() == [1, 5, 9, 13]
    with pytest.raises(ValueError, match="not divisible by EP 3"):
        static_rank_loads(torch.arange(8), 3)
    assert expert_counts(true, 10).tolist() == [1] * 8 + [0, 0]
    assert expert_counts(torch.zeros(0, 2, dtype=torch.long), 3).tolist() == [0, 0, 0]
    with pytest.raises(IndexError, match="expert id 5 out of range for 4 experts"):
        expert_counts(torch.tensor([[0, 5]]), 4)


def test_config_rejects_bad_predictor_options():
    with pytest.raises(ValueError, match="predictor_hidden=-3"):
        ProbeConfig(predictor_hidden=-3)
    with pytest.raises(ValueError, match="predictor_period=0"):
        ProbeConfig(predictor_period=0)
    with pytest.raises(ValueError, match="predictor_lr=0"):
        ProbeConfig(predictor_lr=0)
    with pytest.raises(TypeError, match="predictor_sample_tokens must be an int"):
        ProbeConfig(predictor_sample_tokens=1.5)
    for bad in (-0.1, float("nan"), float("inf"), "0.9", True):
        with pytest.raises(ValueError, match=r"predictor_drift_threshold=.*valid: a finite number >= 0"):
            ProbeConfig(predictor_drift_threshold=bad)
    for bad in (-1, 2.0, None, False):
        with pytest.raises(ValueError, match=r"predictor_metrics_period=.*valid: an int >= 0"):
            ProbeConfig(predictor_metrics_period=bad)
    with pytest.raises(TypeError, match="predictor_background must be a bool, got 1"):
        ProbeConfig(predictor_background=1)
    c = ProbeConfig(predictor_drift_threshold=1.01, predictor_metrics_period=0, predictor_background=False)
    assert (c.predictor_drift_threshold, c.predictor_metrics_period) == (1.01, 0)
    assert ProbeConfig().predictor_drift_threshold == 0.9 and ProbeConfig().predictor_metrics_period == 8


# ----------------------------------------------------------------------------- in the model
def _small_model(score="softmax", seed=0):
    from megatron_probe.mcore.launch import init_single_process
    from megatron_probe.experiments.tiny_moe import TinyMoEConfig, build_model

    init_single_process(seed)
    cfg = TinyMoEConfig(num_layers=3, hidden_size=32, num_attention_heads=4, num_experts=8, topk=2,
                        expert_ffn_hidden=16, seq_length=64, vocab_size=128, score_function=score)
    torch.manual_seed(seed)
    return build_model(cfg, spec="probe"), cfg


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_untrained_predictor_equals_next_router_on_previous_input(score):
    from megatron_probe.runtime.lookahead import LookaheadRuntime
    from megatron_probe.experiments.recorder import RoutingRecorder
    from megatron_probe.runtime.model_walk import moe_layers
    from megatron_probe.experiments.tiny_moe import forward_logits

    model, cfg = _small_model(score)
    layers = moe_layers(model)
    tokens = torch.randint(0, cfg.vocab_size, (2, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad(), RoutingRecorder(model) as rec, \
            LookaheadRuntime(model, ProbeConfig(predictor_hidden=8, predictor_online=False)) as rt:
        forward_logits(model, tokens)
        recs = rec.pop()
        for L in range(1, cfg.num_layers):
            h_prev = recs[L - 1][0]
            _, rmap = layers[L].router(h_prev.unsqueeze(1))  # layer L's own router on layer L-1's input
            pred_ids = rt.predictors[L].predict_topk(h_prev)
            pred_mask = torch.zeros_like(rmap).scatter_(1, pred_ids, True)
            assert torch.equal(pred_mask, rmap), f"layer {L}"
            assert torch.equal(rt.predicted_counts(L)[0], rmap.sum(0).long())
        rt.end_step()


@pytest.mark.skipif(not HAVE_CKPT, reason="no shipped checkpoint")
def test_runtime_never_changes_the_output_and_learns_online():
    from megatron_probe.data.workloads import Workload
    from megatron_probe.mcore.launch import init_single_process
    from megatron_probe.runtime.lookahead import LookaheadRuntime
    from megatron_probe.experiments.tiny_moe import forward_logits, load_model

    init_single_process()
    model, _, _ = load_model(CKPT, spec="probe")
    wl = Workload.load(os.path.join(ROOT, "workloads", "steady.json"))
    seqs = [torch.tensor([r.prompt_ids + r.output_ids]) for r in wl.requests[:6]]
    with torch.no_grad():
        ref = [forward_logits(model, s) for s in seqs]
    # threshold above 1: the drift trigger is always on; sync(): each step's update lands before the next
    rt = LookaheadRuntime(model, ProbeConfig(predictor_lr=5e-3, predictor_drift_threshold=1.01))
    w0 = rt.predictors[3].fc2.weight.detach().clone()
    with torch.inference_mode():
        for s, r in zip(seqs, ref):
            assert torch.equal(forward_logits(model, s), r)
            rt.end_step()
            rt.sync()
    m = rt.metrics()
    assert m["distill_updates"] == len(seqs) == m["drift"]["weights_version"]
    assert not torch.equal(w0, rt.predictors[3].fc2.weight)  # it learned
    assert 0.3 < m["local"]["mean_topk_acc"] <= 1.0
    rt.close()
    with torch.no_grad():
        assert torch.equal(forward_logits(model, seqs[0]), ref[0])
    assert all(layer.router.logits_observer is None for layer in rt.layers)


@pytest.mark.skipif(not HAVE_CKPT, reason="no shipped checkpoint")
def test_shipped_predictor_state_loads_and_beats_the_frozen_copy():
    from megatron_probe.mcore.launch import init_single_process
    from megatron_probe.runtime.lookahead import build_predictors, default_predictor_path
    from megatron_probe.experiments.tiny_moe import load_model

    path = default_predictor_path(CKPT)
    if not os.path.exists(path):
        pytest.skip("no shipped predictor state")
    from megatron_probe.data.workloads import Workload
    from megatron_probe.experiments.replay import distillation_data, replay_requests, workload_sequences
    from megatron_probe.policy.prediction_metrics import topk_overlap

    init_single_process()
    model, _, _ = load_model(CKPT, spec="probe")
    preds = build_predictors(model, ProbeConfig(predictor_state=path))
    frozen = build_predictors(model, ProbeConfig(predictor_hidden=0))
    wl = Workload.load(os.path.join(ROOT, "workloads", "bursty.json"))  # held-out text
    seqs = workload_sequences(wl)
    data = distillation_data(replay_requests(model, {r: seqs[r] for r in list(seqs)[:4]}), sorted(preds.layers))
    with torch.no_grad():
        for L, (x, y) in data.items():
            true = select_topk(y, preds[L].spec)
            acc = float(topk_overlap(preds[L].predict_topk(x), true).float().mean()) / 4
            acc0 = float(topk_overlap(frozen[L].predict_topk(x), true).float().mean()) / 4
            assert acc > acc0 and acc > 0.8, (L, acc, acc0)
    # a model with other router weights refuses it
    with torch.no_grad():
        model.decoder.layers[2].mlp.router.weight.add_(0.01)
    with pytest.raises(ValueError, match="another model"):
        build_predictors(model, ProbeConfig(predictor_state=path))
