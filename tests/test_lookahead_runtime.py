"""The lookahead runtime (runtime.lookahead) over gloo at EP 2 and 4: every rank's forecast in
its row of the all-gathered counts, the model's output unchanged with the predictors attached;
the background update (never racing a forward), its drift trigger and the sampled metrics."""

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
    rt = LookaheadRuntime(model, ProbeConfig(replica_slots_per_rank=1, predictor_hidden=8, predictor_lr=1e-2,
                                             predictor_drift_threshold=1.01,  # always update
                                             layer0_counts="predict"))  # layer 0 forecast too, not last step's
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
        rt.sync()  # this step's background update lands before the next forward
    assert checked == 3 * 3 and rt.distiller.updates == 3, (checked, rt.distiller.updates)
    topk_acc = rt.metrics()["local"]["mean_topk_acc"]
    assert 0 < topk_acc <= 1, topk_acc
    rt.close()

    # the default for layer 0: the previous step's true counts, the same matrix on every rank, no
    # forecast and no exchange of its own
    from megatron_probe.runtime.model_walk import moe_layers

    rt = LookaheadRuntime(model, ProbeConfig(replica_slots_per_rank=1, predictor_hidden=8))
    previous = moe_layers(model)[0].token_dispatcher.last_counts.clone()  # of the forwards above
    for step, b in enumerate(batches):
        assert torch.equal(rt.predicted_counts(0), previous), f"step {step}: not last step's counts of layer 0"
        with torch.inference_mode(), RoutingRecorder(model) as rec:
            forward_logits(model, b)
            true_local = torch.bincount(rec.pop()[0][1].flatten(), minlength=cfg.num_experts)
        parts = [None] * ws
        dist.all_gather_object(parts, true_local.tolist())
        previous = moe_layers(model)[0].token_dispatcher.last_counts.clone()
        assert previous.tolist() == parts, (f"step {step}: layer 0's true counts", previous.tolist(), parts)
        assert 0 not in rt._pending, "layer 0 must not be forecast or exchanged"
        rt.end_step()
    rt.close()


@pytest.mark.slow
@pytest.mark.parametrize("ws", [2, 4])
def test_lookahead_counts_all_gathered_and_output_unchanged(ws):
    run_ranks(lookahead_counts, ws)


def _tiny(rank, ws):
    from megatron_probe import ProbeConfig
    from megatron_probe.experiments.tiny_moe import TinyMoEConfig, build_model

    torch.manual_seed(0)
    cfg = TinyMoEConfig(num_layers=3, hidden_size=32, num_attention_heads=4, num_experts=8, topk=2,
                        expert_ffn_hidden=16, seq_length=64, vocab_size=128)
    model = build_model(cfg, spec="probe", probe_config=ProbeConfig(replica_slots_per_rank=min(1, ws - 1)), ep=ws)
    model.eval()
    gen = torch.Generator().manual_seed(100 + rank)
    batches = [torch.randint(0, cfg.vocab_size, (1, 20 + 5 * rank + (step % 3)), generator=gen) for step in range(8)]
    return model, cfg, batches


def background_no_race(rank, ws):
    """Forwards run while background updates are in flight: the output stays the plain model's,
    and every forecast uses exactly one generation of predictor weights (the live set of its
    version), never the shadow's half-trained or a mix. Scored steps are every second one: top-2K
    and the metrics all-gather happen only there."""
    import threading
    import time

    from megatron_probe import ProbeConfig
    from megatron_probe.experiments.tiny_moe import forward_logits
    import megatron_probe.runtime.lookahead as la

    init_ep(ws)
    model, cfg, batches = _tiny(rank, ws)
    with torch.no_grad():
        refs = [forward_logits(model, b) for b in batches]
    gathers = []
    real_gather = la.gather_counts_async
    la.gather_counts_async = lambda counts, group: (gathers.append(counts.numel()), real_gather(counts, group))[1]
    rt = la.LookaheadRuntime(model, ProbeConfig(replica_slots_per_rank=1, predictor_hidden=8, predictor_lr=5e-2,
                                                predictor_drift_threshold=1.01, predictor_metrics_period=2))
    upd = rt.updater.distiller.update
    go = threading.Event()

    def gated_update(batch):  # held until the next forward has started, then trains during it
        assert go.wait(60), "no forward released the update"
        go.clear()
        time.sleep(0.005)
        return upd(batch)
    rt.updater.distiller.update = gated_update

    def params():
        return [p.detach().clone() for p in rt.predictors.parameters()]
    snapshots = {0: params()}
    seen, ks, released = [], [], []

    def pre(m, a):
        seen.append((rt.version, params()))
        if rt.updater.busy and rt._step not in released:  # first forecast of a forward
            released.append(rt._step)
            go.set()
    for L in rt.predictors.layers:
        pred = rt.predictors[L]
        pred.register_forward_pre_hook(pre)
        pred.register_forward_hook(lambda m, a, o: seen.append((rt.version, params())))
        real_topk = pred.predict_topk
        pred.predict_topk = lambda h, k=None, f=real_topk: (ks.append((rt._step, k)), f(h, k))[1]
    per_step_gathers = []
    for step, (b, ref) in enumerate(zip(batches, refs)):
        n0 = len(gathers)
        with torch.inference_mode():
            out = forward_logits(model, b)
        assert torch.equal(out, ref), (f"rank {rank} step {step}: output changed", float((out - ref).abs().max()))
        while rt.updater.busy and not rt.updater._job.done():
            time.sleep(0.001)  # so that end_step swaps every step (it never waits itself)
        rt.end_step()
        per_step_gathers.append(len(gathers) - n0)
        snapshots.setdefault(rt.version, params())
    busy_forwards = len(released)
    go.set()  # the last step's update: no forward follows to release it
    rt.sync()
    la.gather_counts_async = real_gather
    n = len(batches)
    assert busy_forwards == n - 1, f"rank {rank}: {busy_forwards} of {n} forwards ran with an update in flight"
    assert len(snapshots) == n, f"rank {rank}: weights changed {len(snapshots) - 1} times in {n} steps"
    for v, ps in seen:
        assert all(torch.equal(a, b) for a, b in zip(ps, snapshots[v])), (
            f"rank {rank}: a forecast at weights version {v} used other weights")
    for v in range(1, len(snapshots)):  # each version really is new weights
        assert not all(torch.equal(a, b) for a, b in zip(snapshots[v - 1], snapshots[v])), f"version {v}"
    n_pred = len(rt.predictors.layers)
    assert all(k == (4 if s % 2 == 0 else None) for s, k in ks), ("top-2K outside the scored steps", ks)
    # no separate count gather (layer 0 takes last step's counts, the others ride on the previous
    # layer's own exchange), only the metrics gather on scored steps
    separate = 0
    assert 0 in rt.predictors.layers and n_pred > 1, n_pred  # forecasts were carried
    assert per_step_gathers == [separate + (s % 2 == 0) for s in range(len(batches))], per_step_gathers
    m = rt.metrics()
    assert m["scored_steps"] == len(batches) // 2 and m["metrics_period"] == 2, m
    tokens = sum(b.shape[1] for b in batches[::2])
    assert all(row["tokens"] == tokens for row in m["local"]["layers"]), (tokens, m["local"]["layers"])
    d = m["drift"]
    assert d["background"] and d["trigger_on"] and d["updates"] == d["weights_version"] == n, d
    assert d["update_ms_mean"] > 5, d  # the worker's time, its sleep and its wait for the forward included
    rt.close()


@pytest.mark.slow
def test_background_update_never_races_a_forward():
    run_ranks(background_no_race, 2)


@pytest.fixture(scope="module")
def single():
    from megatron_probe.mcore.launch import init_single_process

    init_single_process(0)
    return _tiny(0, 1)


def _run(rt, model, batches, sync=True):
    from megatron_probe.experiments.tiny_moe import forward_logits

    for b in batches:
        with torch.inference_mode():
            forward_logits(model, b)
        rt.end_step()
        if sync:
            rt.sync()


def test_drift_trigger_starts_and_stops_updates(single):
    from megatron_probe import ProbeConfig
    from megatron_probe.runtime.lookahead import LookaheadRuntime

    model, _, batches = single
    with LookaheadRuntime(model, ProbeConfig(predictor_hidden=8, predictor_drift_threshold=0.0,
                                             predictor_sample_tokens=512)) as rt:
        _run(rt, model, batches[:1])
        m = rt.metrics()
        # every row kept: the estimate after one step is that step's top-K accuracy
        assert abs(m["drift"]["quality_estimate"] - m["local"]["mean_topk_acc"]) < 1e-4, m
        _run(rt, model, batches[1:3])
        d = rt.metrics()["drift"]
        assert not d["trigger_on"] and d["updates"] == 0 and d["triggered_steps"] == 0, d  # quality >= 0
        rt.drift_threshold = 1.01  # quality <= 1 < threshold: on
        _run(rt, model, batches[3:6])
        d = rt.metrics()["drift"]
        assert d["trigger_on"] and d["updates"] == 3 == d["weights_version"] and d["triggered_steps"] == 3, d
        assert d["update_ms_last"] > 0
        rt.drift_threshold = 0.0
        _run(rt, model, batches[6:8])
        d = rt.metrics()["drift"]
        assert not d["trigger_on"] and d["updates"] == 3, d


def test_inline_update_also_gated(single):
    from megatron_probe import ProbeConfig
    from megatron_probe.runtime.lookahead import LookaheadRuntime

    model, _, batches = single
    with LookaheadRuntime(model, ProbeConfig(predictor_hidden=8, predictor_background=False,
                                             predictor_drift_threshold=0.0)) as rt:
        assert rt.updater is None
        _run(rt, model, batches[:2], sync=False)
        assert rt.distiller.updates == 0
        rt.drift_threshold = 1.01
        _run(rt, model, batches[2:4], sync=False)
        assert rt.distiller.updates == 2 == rt.metrics()["drift"]["weights_version"]


def test_online_off_never_updates(single):
    from megatron_probe import ProbeConfig
    from megatron_probe.runtime.lookahead import LookaheadRuntime

    model, _, batches = single
    with LookaheadRuntime(model, ProbeConfig(predictor_hidden=8, predictor_online=False,
                                             predictor_drift_threshold=1.01)) as rt:
        w0 = [p.detach().clone() for p in rt.predictors.parameters()]
        _run(rt, model, batches)
        d = rt.metrics()["drift"]
        assert rt.updater is None and d["updates"] == 0 and d["weights_version"] == 0 and not d["trigger_on"], d
        assert all(torch.equal(a, b) for a, b in zip(w0, rt.predictors.parameters()))


@pytest.mark.parametrize("period,scored", [(3, 3), (0, 0), (1, 8)])
def test_metrics_sampled_at_the_period(single, period, scored):
    from megatron_probe import ProbeConfig
    from megatron_probe.runtime.lookahead import LookaheadRuntime

    model, _, batches = single
    with LookaheadRuntime(model, ProbeConfig(predictor_hidden=8, predictor_metrics_period=period,
                                             predictor_online=False)) as rt:
        _run(rt, model, batches)
        m = rt.metrics()
        assert m["scored_steps"] == scored and m["steps"] == len(batches), m
        if scored:
            tokens = sum(b.shape[1] for b in batches[::period])
            assert all(row["tokens"] == tokens for row in m["local"]["layers"]), m["local"]
            assert rt.topk_accuracy() is not None
        else:
            assert "local" not in m and rt.topk_accuracy() is None


def test_inactive_layer_is_not_forecast(single):
    from megatron_probe import ProbeConfig
    from megatron_probe.experiments.tiny_moe import forward_logits
    from megatron_probe.runtime.lookahead import LookaheadRuntime

    model, _, batches = single
    with LookaheadRuntime(model, ProbeConfig(predictor_hidden=8, predictor_online=False)) as rt:
        for active in (False, True):
            rt.set_layer_active(2, active)
            with torch.inference_mode():
                forward_logits(model, batches[0])
            assert (rt.predicted_counts(2) is not None) == active and rt.predicted_counts(1) is not None
            layers = [row["layer"] for row in (rt.end_step(), rt.metrics())[1]["local"]["layers"]]
            assert layers == [1], layers  # step 0 scored without layer 2 (layer 0: last step's counts, not a forecast)
