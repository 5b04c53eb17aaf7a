"""The live lookahead pipeline (runtime.pipeline) over gloo at EP 2 and 4: output never changed,
phase locking proven from the event log, faults and dead peers ending in a static fallback or a
timeout instead of a hang."""

import os
import tempfile
import time

import pytest
import torch
import torch.distributed as dist

from distributed import init_ep, run_ranks


def _skewed_gpt(rank, ws, num_layers=4, ep=None, tp=1, sp=False, etp=1):
    """A small 4-layer GPT at EP ``ep`` (default ws; ws / ep data-parallel replicas of the expert
    group) whose routing forces replicas (an expert bias makes one expert every token's first
    choice; skewed token ids), four batches per rank, the plain model's logits for them, and a
    cost model under which even tiny batches are worth balancing. ``tp``: Megatron's tensor
    parallel attention (TP peers get the same batches); ``sp``: sequence parallel over them, the
    model returned is sequence parallel and the reference logits are its twin's without sequence
    parallel (the same weights); ``etp``: expert TP (1 or ``tp``)."""
    from megatron_probe import ProbeConfig
    from megatron_probe.experiments.tiny_moe import TinyMoEConfig, build_model, forward_logits
    from megatron_probe.policy.cost_model import ExpertCost
    from megatron_probe.runtime.model_walk import moe_layers

    ep = ep or ws
    init_ep(ep, tp, etp=etp)
    torch.manual_seed(0)
    cfg = TinyMoEConfig(num_layers=num_layers, hidden_size=32, num_attention_heads=4, num_experts=8, topk=2,
                        expert_ffn_hidden=16, seq_length=64, vocab_size=128, score_function="sigmoid")
    model = build_model(cfg, spec="probe", probe_config=ProbeConfig(replica_slots_per_rank=2), ep=ep, tp=tp, sp=sp,
                        etp=etp)
    model.eval()
    plain = model
    if sp:
        plain = build_model(cfg, spec="probe", probe_config=ProbeConfig(replica_slots_per_rank=2), ep=ep, tp=tp,
                            etp=etp)
        plain.load_state_dict(model.state_dict())
        plain.eval()
    # adversarial skew: an expert bias makes expert 0 (rank 0's) every token's first choice
    for i, layers in enumerate(zip(moe_layers(model), moe_layers(plain))):
        bias = torch.zeros(cfg.num_experts)
        bias[(3 * i) % cfg.num_experts if i % 2 else 0] = 5.0
        for layer in set(layers):
            r = layer.router
            r.enable_expert_bias = True
            r._cpu_buffer("expert_bias", bias.clone(), persistent=True)
            r._cpu_buffer("local_tokens_per_expert", torch.zeros(cfg.num_experts), persistent=False)
    gen = torch.Generator().manual_seed(7 + rank // tp)
    # skewed tokens: a few token ids dominate, so some experts are hot
    batches = [torch.randint(0, 6 if step % 2 else cfg.vocab_size, (1, 20 + (6 if sp else 5) * (rank // tp) + 2 * step),
                             generator=gen) for step in range(4)]  # under SP: lengths TP divides
    with torch.no_grad():
        refs = [forward_logits(plain, b) for b in batches]
    return model, batches, refs, ExpertCost(1.0, 0.0)


def _run_steps(model, pipe, batches, refs):
    """Every batch through the model with the pipeline attached; the largest |logit difference|."""
    from megatron_probe.experiments.tiny_moe import forward_logits

    max_abs = 0.0
    with torch.inference_mode():
        for b, ref in zip(batches, refs):
            got = forward_logits(model, b)
            max_abs = max(max_abs, float((got - ref).abs().max()))
            pipe.end_step()
    return max_abs


# --------------------------------------------------------------------------- equivalence
SLOW_DEADLINE_MS, SLOW_STALL_S = 40.0, 0.2


def pipeline_equivalence(rank, ws):
    """The full pipeline (forecast, plan, phase-locked prefetch into shared double banks,
    deadline, agreement, re-assignment) on a small GPT at EP ws: output equal to the plain PROBE
    model's for several steps, with copies arriving, with every copy dropped (engine held), and
    with each stage switched off. Each variant is checked once its pipeline is closed."""
    from megatron_probe import ProbeConfig
    from megatron_probe.experiments.tiny_moe import forward_logits
    from megatron_probe.runtime.model_walk import moe_layers
    from megatron_probe.runtime.pipeline import LookaheadPipeline

    model, batches, refs, unit_cost = _skewed_gpt(rank, ws)
    R = 2
    scale = max(float(r.abs().max()) for r in refs)
    variants = {
        "full": dict(prefetch_deadline_ms=10_000.0),
        "all_dropped": dict(prefetch_deadline_ms=1.0, pipeline_phase_lock=False),
        "no_predict": dict(pipeline_predict=False, prefetch_deadline_ms=10_000.0),
        "no_reassign": dict(pipeline_reassign=False, prefetch_deadline_ms=10_000.0),
        "no_phase_lock": dict(pipeline_phase_lock=False, prefetch_deadline_ms=10_000.0),
        "no_plan": dict(pipeline_plan=False),
        "slow_rank": dict(prefetch_deadline_ms=SLOW_DEADLINE_MS, pipeline_phase_lock=False),
    }
    for name, kw in variants.items():
        # the mechanism at every step: the cost gate (tested below) would switch it off here
        pcfg = ProbeConfig(replica_slots_per_rank=R, predictor_hidden=8, transfer_chunk_mib=0.001, cost_gate=False,
                           **kw)
        t_variant = time.perf_counter()
        pipe = LookaheadPipeline(model, pcfg, cost=unit_cost)
        slow = []
        if name == "slow_rank" and rank == ws - 1:
            # the last rank stalls its transfers from layer 2i's input to layer 2i+1's, and is
            # SLOW_STALL_S late to layer 2i+1: the others give up on copies involving it while it
            # still receives its own in time; the ranks disagree locally and the agreement must
            # settle it (the stall is several deadlines, the deadline several copy times)
            def late(i):
                def hook(module, args):
                    if i % 2 == 0:
                        pipe.engine.pause()
                    else:
                        time.sleep(SLOW_STALL_S)
                        pipe.engine.resume()
                return hook
            slow = [m.register_forward_pre_hook(late(i)) for i, m in enumerate(moe_layers(model))]
        if name == "all_dropped":
            pipe.engine.pause()  # no copy can arrive: every planned copy misses its deadline
        max_abs = _run_steps(model, pipe, batches, refs)
        if name == "all_dropped":
            pipe.engine.resume()
        for h in slow:
            h.remove()
        s = pipe.summary()
        pipe.close()
        rows, expert_bytes = len(pipe.history), pipe.pool.expert_bytes
        ctx = (name, f"rank {rank}", f"max_abs={max_abs}", f"scale={scale}", f"rows={rows}",
               f"expert_bytes={expert_bytes}", f"secs={time.perf_counter() - t_variant:.2f}", s)
        assert max_abs <= 1e-5 * scale, ctx
        assert rows == 4 * 4, ctx  # 4 steps x 4 layers
        assert s["replica_memory_bytes"] == 2 * 2 * expert_bytes, ctx  # 2 banks x R=2, whatever the layers
        if name == "full":
            assert s["copies"] > 0 and s["dropped"] == 0, ctx
            assert s["ir_after"] <= s["ir_before"], ctx
        elif name == "all_dropped":
            assert s["copies"] > 0 and s["dropped"] == s["copies"], ctx
        elif name == "no_plan":
            assert s["copies"] == 0, ctx
        elif name == "slow_rank":
            # the stalled rank's copies miss the deadline everywhere; how many of the others make
            # it depends on the machine's load, so only "some dropped, never more than planned"
            assert 0 < s["dropped"] <= s["copies"], ctx
        elif name == "no_predict":
            assert s["copies"] > 0, ctx  # from the second step on, last step's counts
    with torch.no_grad():  # hooks gone: the plain model again
        assert torch.equal(forward_logits(model, batches[0]), refs[0]), "output changed after close()"


def pipeline_data_parallel(rank, ws):
    """World 4 = DP 2 x EP 2 (Megatron's expert groups [0, 1] and [2, 3]), each rank with its own
    tokens: every EP group runs its own pipeline on groups of its own ranks (created by every
    rank of the world, in one order); outputs equal the plain model's with replicas copied;
    nothing crosses the EP groups. Then the transfer engine is renewed on each spare group (a
    real copy through each) until the spares run out."""
    from megatron.core import parallel_state

    from megatron_probe import ProbeConfig
    from megatron_probe.mechanism.transfer import CopyOp
    from megatron_probe.runtime import pipeline as pl

    model, batches, refs, unit_cost = _skewed_gpt(rank, ws, ep=2)
    ep_ranks = dist.get_process_group_ranks(parallel_state.get_expert_model_parallel_group())
    assert ep_ranks == [rank - rank % 2, rank - rank % 2 + 1], ep_ranks
    scale = max(float(r.abs().max()) for r in refs)
    pcfg = ProbeConfig(replica_slots_per_rank=2, predictor_hidden=8, transfer_chunk_mib=0.001, cost_gate=False,
                       prefetch_deadline_ms=10_000.0)
    pipe = pl.LookaheadPipeline(model, pcfg, cost=unit_cost)
    comms = pipe.comms
    for g in [comms.ctl_group, comms.data_group, comms.engine.group] + comms.spare_groups:
        assert dist.get_process_group_ranks(g) == ep_ranks, (rank, dist.get_process_group_ranks(g))
    mine = torch.tensor([float(rank)])
    dist.all_reduce(mine, group=comms.data_group)
    assert mine.item() == sum(ep_ranks), (rank, mine.item())
    max_abs = _run_steps(model, pipe, batches, refs)
    s = pipe.summary()
    assert max_abs <= 1e-5 * scale and s["copies"] > 0 and s["dropped"] == 0, (rank, max_abs, scale, s)
    me = dist.get_rank(comms.data_group)
    for k in range(pl.SPARE_TRANSFER_GROUPS + 1):
        engine = comms.renew_engine(pcfg, torch.device("cpu"), None)
        if k == pl.SPARE_TRANSFER_GROUPS:
            assert engine is None, f"rank {rank}: a renewal beyond the {k} spare groups"
            break
        src, dst = torch.full((5,), float(rank + k)), torch.zeros(5)
        batch = engine.submit([CopyOp(0, 1, ("probe", k))], [[src] if me == 0 else None], [[dst] if me == 1 else None])
        assert batch.wait(timeout=30), (rank, k, batch.error)
        if me == 1:  # from its own EP group's rank 0, not the other group's
            assert torch.equal(dst, torch.full((5,), float(ep_ranks[0] + k))), (rank, k, dst)
    pipe.engine = comms.engine
    made = [comms.ctl_group, comms.data_group]  # the engines' groups were destroyed at each renewal
    pipe.close()
    assert comms.ctl_group is None and comms.data_group is None and comms.spare_groups == []
    for g in made:  # destroyed at close (gloo groups hold sockets): no longer registered
        try:
            dist.get_rank(g)
        except ValueError:
            continue
        raise AssertionError(f"rank {rank}: a group of the closed pipeline is still registered")
    return s["copies"]


def pipeline_tensor_parallel(rank, ws, ep, sp, etp=1):
    """World 4 with Megatron's tensor-parallel attention (TP 2, expert TP 1) and EP ``ep``: the
    live pipeline, plans agreed on the EP group; outputs equal the plain model's with replicas
    copied at every step. Without sequence parallel the TP peers hold the same tokens and
    forecast from the replicated residual stream. With it (``sp``: the embeddings scatter the
    sequence, attention gathers it and reduce-scatters its output, the output layer gathers it)
    each MoE layer gets this rank's half of the tokens only, the TP peers' halves are forecast,
    planned and dispatched as distinct tokens, and the logits equal the same weights' without
    sequence parallel. With expert TP ``etp`` = 2 (Megatron's expert groups: the TP ranks hold
    shares of every expert, the EP groups [0, 2] and [1, 3] each dispatch the TP group's tokens
    and copy their own shares) the same holds."""
    from megatron.core import parallel_state

    from megatron_probe import ProbeConfig
    from megatron_probe.mechanism.event_log import A2A_KINDS, CHUNK_KINDS, overlapping, read_jsonl
    from megatron_probe.runtime.model_walk import moe_layers
    from megatron_probe.runtime.pipeline import LookaheadPipeline

    model, batches, refs, unit_cost = _skewed_gpt(rank, ws, ep=ep, tp=2, sp=sp, etp=etp)
    assert parallel_state.get_tensor_model_parallel_world_size() == 2 and model.config.sequence_parallel == sp
    assert parallel_state.get_expert_tensor_parallel_world_size() == etp
    seen = []
    hook = moe_layers(model)[0].register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[0]))
    scale = max(float(r.abs().max()) for r in refs)
    # under expert TP, with the event log: the peers' gather and sum are phase-locked like the All-to-All
    pcfg = ProbeConfig(replica_slots_per_rank=2, predictor_hidden=8, transfer_chunk_mib=0.001, cost_gate=False,
                       prefetch_deadline_ms=10_000.0, event_log=etp > 1)
    with tempfile.TemporaryDirectory() as out_dir:
        metrics = os.path.join(out_dir, f"rank{rank}.jsonl") if etp > 1 else None
        pipe = LookaheadPipeline(model, pcfg, cost=unit_cost, metrics_path=metrics)
        max_abs = _run_steps(model, pipe, batches, refs)
        events = None if metrics is None else read_jsonl(pipe.metrics.events_path)
    hook.remove()
    s = pipe.summary()
    if etp > 1:
        kinds = [e["kind"] for e in events]
        assert kinds.count("a2a_etp_reduce") == 16 and kinds.count("a2a_etp_gather") == (16 if sp else 0), kinds
        assert not overlapping(events, CHUNK_KINDS, A2A_KINDS), (rank, "a copy overlapped a collective")
    # the last step's forecasts (carried by layers 0-2's dispatches) and placements: the
    # expert-TP peers (TP groups [0, 1], [2, 3]) forecast and plan alike
    layers = moe_layers(model)
    placements = torch.stack([layer.token_dispatcher.placement for layer in layers])
    forecasts = torch.stack([layer.token_dispatcher.last_extra for layer in layers[:-1]])
    everyone = [None] * ws
    torch.distributed.all_gather_object(everyone, (placements, forecasts))
    pipe.close()
    if etp > 1:
        peer = everyone[rank ^ 1]
        assert torch.equal(placements, peer[0]) and torch.equal(forecasts, peer[1]), (rank, everyone)
        assert bool((placements >= 0).any()), placements
    assert seen == [b.shape[1] // (2 if sp else 1) for b in batches], (rank, seen)
    assert max_abs <= 1e-5 * scale and s["copies"] > 0 and s["dropped"] == 0, (rank, ep, max_abs, scale, s)
    return s["copies"]


@pytest.mark.slow
@pytest.mark.parametrize("ep", [2, 4])
def test_pipeline_under_tensor_parallel_attention(ep):
    copies = run_ranks(pipeline_tensor_parallel, 4, ep, False)
    assert all(c > 0 for c in copies), copies


@pytest.mark.slow
@pytest.mark.parametrize("ep", [2, 4])
def test_pipeline_under_sequence_parallel(ep):
    copies = run_ranks(pipeline_tensor_parallel, 4, ep, True)
    assert all(c > 0 for c in copies), copies


@pytest.mark.slow
@pytest.mark.parametrize("sp", [False, True])
def test_pipeline_under_expert_tensor_parallel(sp):
    copies = run_ranks(pipeline_tensor_parallel, 4, 2, sp, 2)
    assert all(c > 0 for c in copies), copies


def pipeline_stages(rank, ws):
    """World 4 = PP 2 x EP 2 (stage 0: ranks 0, 1 with layers 1-2; stage 1: ranks 2, 3 with layers
    3-4; Megatron's expert groups [0, 1] and [2, 3]): each stage runs the lookahead for its own
    MoE layers, its first forecast like layer 0's; hidden states go stage to stage by send/recv.
    Outputs (stage 0's hidden states, stage 1's logits) equal the plain model's with replicas
    copied on both stages, and a stage's plans never wait for the other stage."""
    from megatron.core import parallel_state as ps

    from megatron_probe import ProbeConfig
    from megatron_probe.experiments.tiny_moe import TinyMoEConfig, build_model, causal_mask
    from megatron_probe.policy.cost_model import ExpertCost
    from megatron_probe.runtime.model_walk import moe_layers
    from megatron_probe.runtime.pipeline import LookaheadPipeline

    init_ep(2, pp=2)
    stage = ps.get_pipeline_model_parallel_rank()
    torch.manual_seed(0)
    cfg = TinyMoEConfig(num_layers=4, hidden_size=32, num_attention_heads=4, num_experts=8, topk=2,
                        expert_ffn_hidden=16, seq_length=64, vocab_size=128, score_function="sigmoid")
    model = build_model(cfg, spec="probe", probe_config=ProbeConfig(replica_slots_per_rank=2), ep=2, pp=2)
    model.eval()
    assert [layer.layer_number for layer in model.decoder.layers] == [2 * stage + 1, 2 * stage + 2]
    for i, layer in enumerate(moe_layers(model)):  # skew: one expert every token's first choice
        layer.router.enable_expert_bias = True
        bias = torch.zeros(cfg.num_experts)
        bias[(3 * i + stage) % cfg.num_experts] = 5.0
        layer.router._cpu_buffer("expert_bias", bias, persistent=True)
        layer.router._cpu_buffer("local_tokens_per_expert", torch.zeros(cfg.num_experts), persistent=False)
    ep_rank = ps.get_expert_model_parallel_rank()
    gen = torch.Generator().manual_seed(7 + ep_rank)  # the two stages of a pipeline see the same tokens
    batches = [torch.randint(0, 6 if step % 2 else cfg.vocab_size, (1, 20 + 5 * ep_rank + 2 * step), generator=gen)
               for step in range(4)]

    def forward(tokens):
        s = tokens.shape[1]
        pos = torch.arange(s).unsqueeze(0)
        if stage == 0:
            h = model(tokens, pos, causal_mask(s))
            dist.send(h.contiguous(), ps.get_pipeline_model_parallel_next_rank())
            return h
        h = torch.empty(s, 1, cfg.hidden_size)
        dist.recv(h, ps.get_pipeline_model_parallel_prev_rank())
        model.set_input_tensor(h)
        return model(tokens, pos, causal_mask(s))

    with torch.no_grad():
        refs = [forward(b) for b in batches]
    scale = max(float(r.abs().max()) for r in refs)
    # a whole model's predictor warm start (4 MoE layers), mapped onto each stage's 2 layers
    from megatron_probe.policy.predictor import PredictorSet
    from megatron_probe.runtime.lookahead import router_spec

    g = torch.Generator().manual_seed(42)  # the same file on every rank
    routers = [(torch.randn(cfg.num_experts, cfg.hidden_size, generator=g), None, None) for _ in range(4)]
    whole = PredictorSet.from_routers(routers, router_spec(moe_layers(model)[0].config), 8)
    with torch.no_grad():
        for p in whole.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.01)
    warm = os.path.join(tempfile.gettempdir(), f"probe_pp_warm_{os.getpid()}.pt")
    whole.save(warm)
    pcfg = ProbeConfig(replica_slots_per_rank=2, predictor_hidden=8, transfer_chunk_mib=0.001, cost_gate=False,
                       prefetch_deadline_ms=10_000.0, predictor_state=warm)
    pipe = LookaheadPipeline(model, pcfg, cost=ExpertCost(1.0, 0.0), stage_layers=(2 * stage, 4))
    os.remove(warm)
    loaded = pipe.runtime.predictors
    assert torch.equal(loaded[1].fc2.weight, whole[2 * stage + 1].fc2.weight)  # the stage's share of the file
    assert torch.equal(loaded[0].fc2.weight, whole[0].fc2.weight) == (stage == 0)  # stage 1's first: its own start
    assert dist.get_process_group_ranks(pipe.comms.data_group) == [2 * stage, 2 * stage + 1]
    max_abs = 0.0
    with torch.inference_mode():
        for b, ref in zip(batches, refs):
            max_abs = max(max_abs, float((forward(b) - ref).abs().max()))
            pipe.end_step()
    s = pipe.summary()
    pipe.close()
    assert max_abs <= 1e-5 * scale and s["copies"] > 0 and s["dropped"] == 0, (rank, stage, max_abs, scale, s)
    return s["copies"]


@pytest.mark.slow
def test_pipeline_under_pipeline_parallel_stages():
    copies = run_ranks(pipeline_stages, 4)
    assert all(c > 0 for c in copies), copies


@pytest.mark.slow
def test_pipeline_under_data_parallel_replicas_of_the_expert_group():
    copies = run_ranks(pipeline_data_parallel, 4)
    assert all(c > 0 for c in copies), copies


@pytest.mark.slow
@pytest.mark.parametrize("ws", [2, 4])
def test_live_pipeline_never_changes_the_output(ws):
    run_ranks(pipeline_equivalence, ws)


# --------------------------------------------------------------------------- resident replicas
def _set_hot_experts(model, shift: int, num_experts: int):
    """Move every layer's forced hot expert by ``shift`` (the router's expert bias)."""
    from megatron_probe.runtime.model_walk import moe_layers

    for i, layer in enumerate(moe_layers(model)):
        bias = torch.zeros(num_experts)
        bias[(3 * i + shift) % num_experts] = 5.0
        layer.router.expert_bias.copy_(bias)


def _check_transport(pipe, model, transport):
    """The pipeline copies with ``transport``'s engine; pull copies read natives in peer memory."""
    from megatron_probe.runtime.model_walk import moe_layers

    kind = {"p2p": "TransferEngine", "peer_memory": "PullCopyEngine", "stream": "StreamCopyEngine"}[transport]
    assert type(pipe.engine).__name__ == kind, (transport, type(pipe.engine))
    peer = [m.expert_bank._peer_fc1 is not None for m in moe_layers(model)]
    assert all(peer) if transport == "peer_memory" else not any(peer), (transport, peer)


def pipeline_resident(rank, ws, transport="p2p"):
    """Resident mode on a load that moves (the hot expert of every layer changes every 4 steps):
    output equal to the plain model's at every step while resident replicas change; copies only
    when a slot changes; replica memory layers x R experts; after every rank's native weights
    change in place (as a checkpoint load does), no slot serves the old weights: the replicas are
    forgotten and copied again, and the output equals the plain model's with the new weights."""
    from megatron_probe import ProbeConfig
    from megatron_probe.experiments.tiny_moe import forward_logits
    from megatron_probe.runtime.model_walk import moe_layers
    from megatron_probe.runtime.pipeline import LookaheadPipeline

    model, batches, _, unit_cost = _skewed_gpt(rank, ws)
    E, R, steps = 8, 2, 12
    gen = torch.Generator().manual_seed(11 + rank)
    batches = [torch.randint(0, 128, (1, 24 + 3 * rank), generator=gen) for _ in range(steps)]
    refs = []
    with torch.no_grad():
        for step, b in enumerate(batches):
            _set_hot_experts(model, step // 4, E)
            refs.append(forward_logits(model, b))
    scale = max(float(r.abs().max()) for r in refs)
    # forecast: last step's counts (the predictors copy the expert bias once, so they would not
    # follow the test's bias moves)
    pcfg = ProbeConfig(replica_slots_per_rank=R, replica_mode="resident", pipeline_predict=False, cost_gate=False,
                       transfer_chunk_mib=0.001, prefetch_deadline_ms=10_000.0, copy_transport=transport)
    pipe = LookaheadPipeline(model, pcfg, cost=unit_cost)
    _check_transport(pipe, model, transport)
    held = []
    with torch.inference_mode():
        for step, b in enumerate(batches):
            _set_hot_experts(model, step // 4, E)
            got = forward_logits(model, b)
            diff = float((got - refs[step]).abs().max())
            assert diff <= 1e-5 * scale, (f"rank {rank} step {step}", diff, scale)
            held.append([m.expert_bank.placement.clone() for m in moe_layers(model)])
            pipe.end_step()
        # every rank's native expert weights change in place; the reference is the plain model
        pipe.activate(False)
        for m in moe_layers(model):
            m.expert_bank.fc1.mul_(1.05)
            m.expert_bank.fc2.mul_(0.97)
        _set_hot_experts(model, 0, E)
        new_refs = [forward_logits(model, b) for b in batches[:3]]
        pipe.activate(True)
        copies_before = sum(r["copies"] for r in pipe.history)
        for b, ref in zip(batches[:3], new_refs):
            got = forward_logits(model, b)
            diff = float((got - ref).abs().max())
            assert diff <= 1e-5 * scale, (f"rank {rank} after the weights changed", diff, scale)
            pipe.end_step()
    rows = pipe.history
    s = pipe.summary()
    expert_bytes = moe_layers(model)[0].expert_bank.expert_bytes()
    comms = pipe.comms
    made = [comms.ctl_group, comms.data_group, comms.engine.group, *comms.spare_groups]
    pipe.close()
    for g in made:  # a close without failures: the live engine's group and every spare destroyed too
        with pytest.raises(ValueError):
            dist.get_rank(g)
    changes = sum(1 for a, b in zip(held, held[1:]) for x, y in zip(a, b) if not torch.equal(x, y))
    copy_steps = sorted({r["step"] for r in rows if r["copies"]})
    ctx = (f"rank {rank}", s, f"changes={changes}", f"copy_steps={copy_steps}")
    assert s["replica_mode"] == "resident", ctx
    assert s["replica_memory_bytes"] == 4 * R * expert_bytes, ctx  # 4 layers x R, resident
    assert s["copies"] > 0 and s["dropped"] == 0, ctx
    assert changes > 0 and any(st > 0 for st in copy_steps), ctx  # slots changed after the warm start
    assert len(copy_steps) < steps + 3, ctx  # not re-copied at every step like streamed replicas
    assert sum(r["copies"] for r in rows) > copies_before, ("no copy after the weights changed", ctx)
    return [[p.tolist() for p in step] for step in held]


def pipeline_streamed_reload(rank, ws, transport="p2p"):
    """Streamed replicas in a 2-MoE-layer model (each layer alone in its bank, so the bank's record
    of what it holds lasts from step to step and unchanged slots are not re-sent): after every
    rank's native weights change in place, the slots are copied again and the output equals the
    plain model's with the new weights (a copy of the old weights is never reused)."""
    from megatron_probe import ProbeConfig
    from megatron_probe.experiments.tiny_moe import forward_logits
    from megatron_probe.runtime.model_walk import moe_layers
    from megatron_probe.runtime.pipeline import LookaheadPipeline

    model, _, _, unit_cost = _skewed_gpt(rank, ws, num_layers=2)
    b = torch.randint(0, 6, (1, 30 + 2 * rank), generator=torch.Generator().manual_seed(5 + rank))
    with torch.no_grad():
        ref = forward_logits(model, b)
    scale = float(ref.abs().max())
    pcfg = ProbeConfig(replica_slots_per_rank=2, replica_mode="streamed", pipeline_predict=False, cost_gate=False,
                       transfer_chunk_mib=0.001, prefetch_deadline_ms=10_000.0, copy_transport=transport)
    pipe = LookaheadPipeline(model, pcfg, cost=unit_cost)
    _check_transport(pipe, model, transport)
    with torch.inference_mode():
        for step in range(4):  # the same batch: the same plan every step once counts are known
            got = forward_logits(model, b)
            assert float((got - ref).abs().max()) <= 1e-5 * scale, (f"rank {rank} step {step}", scale)
            pipe.end_step()
        steady_copies = [r["copies"] for r in pipe.history if r["step"] == 3]
        pipe.activate(False)
        for m in moe_layers(model):
            m.expert_bank.fc1.mul_(1.05)
            m.expert_bank.fc2.mul_(0.97)
        new_ref = forward_logits(model, b)
        pipe.activate(True)
        n_before = len(pipe.history)
        got = forward_logits(model, b)
        pipe.end_step()
        after = [r["copies"] for r in pipe.history[n_before:]]
        diff = float((got - new_ref).abs().max())
    s = pipe.summary()
    pipe.close()
    ctx = (f"rank {rank}", s, steady_copies, after)
    assert s["replica_mode"] == "streamed", ctx
    assert sum(steady_copies) == 0, ("unchanged slots were sent again", ctx)
    assert sum(after) > 0, ("the slots were not copied again after the weights changed", ctx)
    assert diff <= 1e-5 * scale, ("a copy of the old weights was used", diff, ctx)


def pipeline_token_split(rank, ws):
    """``ProbeConfig.dispatch_split="tokens"``: the output equals the plain model's, and every
    layer that re-assigned used an exact token split (its slowest rank equals the optimum), under
    a cost model whose default time split would trade tokens for fewer active copies. The control
    path's stages open their NVTX ranges (recorded through a stand-in for the nvtx module)."""
    from megatron_probe import ProbeConfig
    from megatron_probe.experiments.tiny_moe import forward_logits
    from megatron_probe.mechanism import profiling
    from megatron_probe.policy.cost_model import ExpertCost
    from megatron_probe.policy.split import placement_split
    from megatron_probe.runtime.model_walk import moe_layers
    from megatron_probe.runtime.pipeline import LookaheadPipeline

    ranges = set()

    class RecordingNvtx:
        @staticmethod
        def push_range(message, color=None, domain=None):
            ranges.add(message)

        @staticmethod
        def pop_range(domain=None):
            pass

    profiling._nvtx = RecordingNvtx
    model, batches, refs, _ = _skewed_gpt(rank, ws, num_layers=2)
    scale = max(float(r.abs().max()) for r in refs)
    pcfg = ProbeConfig(replica_slots_per_rank=2, replica_mode="streamed", pipeline_predict=False, cost_gate=False,
                       transfer_chunk_mib=0.001, prefetch_deadline_ms=10_000.0, dispatch_split="tokens")
    pipe = LookaheadPipeline(model, pcfg, cost=ExpertCost(1.0, 6.0))
    checked = 0
    with torch.inference_mode():
        for step, (b, ref) in enumerate(zip(batches, refs)):
            got = forward_logits(model, b)
            assert float((got - ref).abs().max()) <= 1e-5 * scale, f"rank {rank} step {step}"
            for m in moe_layers(model):
                d = m.token_dispatcher
                if d.assignment_fn is None or not bool((d.placement >= 0).any()):
                    continue
                want = placement_split(d.last_counts, d.placement, d.layout, "tokens")
                assert int(d.last_assignment.sum((0, 1)).max()) == int(want.sum((0, 1)).max()), (rank, step)
                checked += 1
            pipe.end_step()
    pipe.close()
    assert checked > 0, rank  # replicas existed and the configured split placed tokens
    want = {"probe.plan", "probe.prefetch.phase1", "probe.agree", "probe.wait", "probe.split", "probe.dispatch",
            "probe.experts", "probe.combine", "probe.metrics", "probe.end_step"}
    assert want <= ranges, (rank, sorted(want - ranges))


def test_token_split_at_dispatch_keeps_the_output():
    run_ranks(pipeline_token_split, 2)


@pytest.mark.parametrize("ws", [2, 4])
def test_streamed_replicas_are_copied_again_after_the_weights_change(ws):
    run_ranks(pipeline_streamed_reload, ws)


@pytest.mark.slow
@pytest.mark.parametrize("ws", [2, 4])
def test_resident_replicas_never_change_the_output(ws):
    held = run_ranks(pipeline_resident, ws)
    assert all(h == held[0] for h in held), "EP ranks hold different resident placements"


def test_replica_mode_choice_and_memory_cap():
    from megatron_probe.runtime.pipeline import choose_replica_mode

    mib = 2 ** 20
    assert choose_replica_mode("auto", 4, 3, mib, None) == "resident"
    assert choose_replica_mode("auto", 4, 3, mib, 12 * mib) == "resident"
    assert choose_replica_mode("auto", 4, 3, mib, 11 * mib) == "streamed"
    assert choose_replica_mode("streamed", 4, 3, mib, 11 * mib) == "streamed"
    with pytest.raises(ValueError, match=r"resident replicas need 12 MiB.*replica_memory_cap_mib=11"):
        choose_replica_mode("resident", 4, 3, mib, 11 * mib)
    with pytest.raises(ValueError, match="replica_mode='x'"):
        choose_replica_mode("x", 4, 3, mib, None)


# --------------------------------------------------------------------------- cost gate
def pipeline_cost_gate(rank, ws):
    """The cost gate on a live pipeline: with a margin no saving can beat, every layer switches to
    the stock path after the warm-up (no control work: no plan, agreement, split or metrics);
    with a margin any saving beats, they come back. Output equal to the plain model's at every
    step (gated, ungated and while switching). Returns each step's gate states, for the test to
    compare ranks."""
    import dataclasses

    from megatron_probe import ProbeConfig
    from megatron_probe.experiments.tiny_moe import forward_logits
    from megatron_probe.runtime.pipeline import LookaheadPipeline

    model, _, _, _ = _skewed_gpt(rank, ws)
    from megatron_probe.policy.cost_model import ExpertCost

    gen = torch.Generator().manual_seed(5 + rank)
    batches = [torch.randint(0, 128, (1, 20 + 3 * rank), generator=gen) for _ in range(14)]
    with torch.no_grad():
        refs = [forward_logits(model, b) for b in batches]
    scale = max(float(r.abs().max()) for r in refs)
    pcfg = ProbeConfig(replica_slots_per_rank=2, pipeline_predict=False, transfer_chunk_mib=0.001,
                       prefetch_deadline_ms=10_000.0, cost_gate=True, cost_gate_margin=1e12, cost_gate_max_interval=2)
    # a cost model under which balancing these skewed batches saves time (us per token)
    pipe = LookaheadPipeline(model, pcfg, cost=ExpertCost(1000.0, 0.0))
    states = []
    with torch.inference_mode():
        for step, (b, ref) in enumerate(zip(batches, refs)):
            if step == 7:  # from now on any saving beats the cost
                for g in pipe.gates:
                    g.settings = dataclasses.replace(g.settings, margin=1e-9)
            diff = float((forward_logits(model, b) - ref).abs().max())
            assert diff <= 1e-5 * scale, (f"rank {rank} step {step}", diff, scale)
            rows = pipe.end_step()
            states.append([r["gate_on"] for r in rows])
            for r in rows:
                if not r["gate_on"]:
                    assert r["control_us"] == 0 and r["copies"] == 0, (f"rank {rank} step {step}", r)
    pipe.close()
    ctx = (f"rank {rank}", states)
    assert all(s == [1, 1, 1, 1] for s in states[:3]), ctx  # warm-up: measured while on
    assert any(s == [0, 0, 0, 0] for s in states[3:7]), ctx  # nothing beats a margin of 1e12
    assert states[-1] == [1, 1, 1, 1], ctx  # back on once the margin is tiny
    assert all(g.switches >= 2 for g in pipe.gates), (ctx, [g.switches for g in pipe.gates])
    return states


@pytest.mark.slow
@pytest.mark.parametrize("ws", [2, 4])
def test_cost_gate_switches_layers_alike_on_every_rank(ws):
    states = run_ranks(pipeline_cost_gate, ws)
    assert all(s == states[0] for s in states), states


def pipeline_gate_skew_onset(rank, ws):
    """Skew that appears mid-run switches a gated-off layer back on at once: balanced routing (no
    expert bias) while nothing can beat the margin, then the normal margin and an expert bias that
    makes one expert every token's first choice. The skew trigger (the static imbalance jumped)
    must bring every layer back on the step after the onset, long before the doubling interval's
    next scheduled check; outputs equal the plain model's throughout. Returns the gate states."""
    import dataclasses

    from megatron_probe import ProbeConfig
    from megatron_probe.experiments.tiny_moe import forward_logits
    from megatron_probe.policy.cost_model import ExpertCost
    from megatron_probe.runtime.model_walk import moe_layers
    from megatron_probe.runtime.pipeline import LookaheadPipeline

    model, _, _, _ = _skewed_gpt(rank, ws)
    routers = [m.router for m in moe_layers(model)]
    skew_bias = [r.expert_bias.clone() for r in routers]

    def set_skew(on):
        for r, b in zip(routers, skew_bias):
            r.expert_bias.copy_(b if on else torch.zeros_like(b))

    onset, steps = 10, 13
    gen = torch.Generator().manual_seed(11 + rank)
    batches = [torch.randint(0, 128, (1, 48), generator=gen) for _ in range(steps)]
    refs = []
    with torch.no_grad():
        for step, b in enumerate(batches):
            set_skew(step >= onset)
            refs.append(forward_logits(model, b))
    set_skew(False)
    scale = max(float(r.abs().max()) for r in refs)
    pcfg = ProbeConfig(replica_slots_per_rank=2, pipeline_predict=False, transfer_chunk_mib=0.001,
                       prefetch_deadline_ms=10_000.0, cost_gate=True, cost_gate_margin=1e12, cost_gate_max_interval=16)
    pipe = LookaheadPipeline(model, pcfg, cost=ExpertCost(1000.0, 0.0))
    states, checks_before = [], None
    with torch.inference_mode():
        for step, (b, ref) in enumerate(zip(batches, refs)):
            if step == onset:  # the skew appears; the margin is the default again
                set_skew(True)
                checks_before = [g.next_check for g in pipe.gates]
                for g in pipe.gates:
                    g.settings = dataclasses.replace(g.settings, margin=1.2)
            diff = float((forward_logits(model, b) - ref).abs().max())
            assert diff <= 1e-5 * scale, (f"rank {rank} step {step}", diff, scale)
            states.append([r["gate_on"] for r in pipe.end_step()])
    pipe.close()
    ctx = (f"rank {rank}", states, checks_before)
    assert all(s == [0, 0, 0, 0] for s in states[3:onset + 1]), ctx  # off before the onset and at it
    assert all(c > onset + 1 for c in checks_before), ctx  # no scheduled check would have come in time
    assert states[onset + 1] == [1, 1, 1, 1], ctx  # on at the step after the onset: the skew trigger
    return states


@pytest.mark.slow
@pytest.mark.parametrize("ws", [2, 4])
def test_cost_gate_comes_back_on_when_skew_appears(ws):
    states = run_ranks(pipeline_gate_skew_onset, ws)
    assert all(s == states[0] for s in states), states


# --------------------------------------------------------------------------- event log
def pipeline_event_log(rank, ws, wandb_project, out_dir):
    """The pipeline with the event log on, phase locking on and off: every chunk's and every
    All-to-All's interval on every rank, exported as JSON lines beside the metrics (and, with a
    wandb project, the metrics as an offline wandb run of rank 0, read back)."""
    from megatron_probe import ProbeConfig
    from megatron_probe.mechanism.event_log import A2A_KINDS, CHUNK_KINDS, overlapping, read_jsonl
    from megatron_probe.runtime.pipeline import LookaheadPipeline

    model, batches, refs, unit_cost = _skewed_gpt(rank, ws)
    scale = max(float(r.abs().max()) for r in refs)
    for name, lock in (("locked", True), ("unlocked", False)):
        pcfg = ProbeConfig(replica_slots_per_rank=2, predictor_hidden=8, transfer_chunk_mib=0.001, cost_gate=False,
                           prefetch_deadline_ms=10_000.0, pipeline_phase_lock=lock, event_log=True,
                           wandb_project=wandb_project if lock else None)
        metrics = os.path.join(out_dir, f"metrics_{name}_rank{rank}.jsonl")
        pipe = LookaheadPipeline(model, pcfg, cost=unit_cost, metrics_path=metrics)
        max_abs = _run_steps(model, pipe, batches, refs)
        s = pipe.summary()
        pipe.close()
        events = read_jsonl(pipe.metrics.events_path)
        chunks = [e for e in events if e["kind"] in CHUNK_KINDS]
        a2as = [e for e in events if e["kind"] in A2A_KINDS]
        a2a_layers = sorted({(e["kind"], e["layer"]) for e in a2as})
        metrics_rows = len(read_jsonl(metrics))
        ctx = (name, f"rank {rank}", f"max_abs={max_abs}", f"scale={scale}", f"chunks_logged={len(chunks)}",
               f"a2a_logged={len(a2as)}", f"a2a_layers={a2a_layers}", f"metrics_rows={metrics_rows}", s)
        assert max_abs <= 1e-5 * scale, ctx
        assert s["copies"] > 0 and len(chunks) == s["chunks"] > 0, ctx
        assert len(a2as) == 4 * 4 * 2, ctx  # 4 steps x 4 layers x (dispatch, combine)
        assert len(a2a_layers) == 4 * 2, ctx
        assert all(e["rank"] == rank for e in events), ("events of another rank", ctx)
        malformed = [e for e in chunks + a2as if not (e["t_end"] >= e["t_start"] and e["layer"] is not None)]
        assert not malformed, ("malformed events", malformed)
        assert metrics_rows == 16, ctx
        if lock:
            overlaps = overlapping(events, CHUNK_KINDS, A2A_KINDS)
            assert not overlaps, ("chunks overlapping an All-to-All while phase-locked", overlaps, ctx)
        if wandb_project and lock and rank == 0:  # only EP rank 0 logs
            from megatron_probe.serving.wandb_logger import read_offline_run

            run = read_offline_run(out_dir)
            keys = sorted({k for row in run["history"] for k in row})
            assert run["complete"] and len(run["history"]) >= 4, (run["complete"], len(run["history"]))
            for key in ("layer0/copies", "layer3/wait_ms", "layer1/ir_after", "step/copies", "step/fallbacks",
                        "summary/copies"):
                assert key in keys, (key, keys)
            step_copies = sum(row.get("step/copies", 0) for row in run["history"])
            summary_copies = run["summary"].get("summary/copies")
            assert step_copies == summary_copies == s["copies"], (step_copies, summary_copies, s["copies"])
            project_in_config = run["config"].get("wandb_project")
            assert project_in_config == wandb_project, (project_in_config, wandb_project)


@pytest.mark.slow
@pytest.mark.parametrize("ws", [2, 4])
def test_phase_locking_event_log(tmp_path, ws, monkeypatch):
    """Phase locking, proven from the event log: with it on, no transfer chunk of a rank overlaps
    any All-to-All of that rank (while copies do move); with it off the log is still complete and
    well formed (whether chunks then overlap is timing, not asserted). At EP 2 the metrics also
    go to an offline wandb run, read back."""
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    project = "probe-test" if ws == 2 else None
    run_ranks(pipeline_event_log, ws, project, str(tmp_path))
    assert len(list(tmp_path.glob("wandb/offline-run-*"))) == (1 if project else 0)


# --------------------------------------------------------------------------- faults
def pipeline_faults(rank, ws):
    """Fault injection on the live pipeline: a transfer that fails mid-copy (the engine's fault
    hook raises on rank 0 at its first chunk of a layer-2 copy in step 1; its partners are left
    in a send/recv or a commit that the short timeouts end), and a plan naming replicas that
    cannot exist. Output equal to the plain model; fallbacks counted; no hang. Each case is
    checked once its pipeline is closed."""
    from megatron_probe import ProbeConfig
    from megatron_probe.runtime.pipeline import LookaheadPipeline

    model, batches, refs, unit_cost = _skewed_gpt(rank, ws)
    scale = max(float(r.abs().max()) for r in refs)
    E = 8
    for name in ("transfer_fails", "transfer_fails_no_retry", "bad_plan"):
        pcfg = ProbeConfig(replica_slots_per_rank=2, predictor_hidden=8, transfer_chunk_mib=0.001, cost_gate=False,
                           prefetch_deadline_ms=10_000.0, collective_timeout_s=2.0,
                           transfer_retry_steps=0 if name == "transfer_fails_no_retry" else 1)
        t0 = time.perf_counter()
        pipe = LookaheadPipeline(model, pcfg, cost=unit_cost)
        fired = []
        if name.startswith("transfer_fails") and rank == 0:
            def fault(i, op, chunk):
                if not fired and op.key[0] == 2 and pipe.step >= 1:
                    fired.append((pipe.step, op.src, op.dst))
                    raise ConnectionError("injected: link down")
            pipe.engine.fault = fault
        if name == "bad_plan":
            real = pipe._plan

            def corrupt(counts):
                p = real(counts)
                p = torch.cat([p, torch.full((ws, 1), 1)], dim=1)  # a slot beyond R on every rank
                p[0, 0] = 0  # rank 0 owns expert 0
                p[ws - 1, 1] = E + 3  # no such expert
                return p
            pipe._plan = corrupt
        max_abs = _run_steps(model, pipe, batches, refs)
        s = pipe.summary()
        t_close = time.perf_counter()
        pipe.close()
        close_s = round(time.perf_counter() - t_close, 2)
        secs = round(time.perf_counter() - t0, 2)
        history = pipe.history
        broken = pipe.engine.broken
        ctx = (name, f"rank {rank}", f"max_abs={max_abs}", f"scale={scale}", f"rows={len(history)}",
               f"secs={secs}", f"close_s={close_s}", f"fired={fired}", f"broken={broken!r}", s)
        assert max_abs <= 1e-5 * scale and len(history) == 16, ctx
        if name.startswith("transfer_fails"):
            assert s["failed"] >= 1 and s["dropped"] >= s["failed"] and s["fallbacks"] >= s["failed"], ctx
            assert s["disabled_at"] == (1, 2), ctx  # the same layer on every rank
            assert secs < 60 and close_s < 5, ctx  # bounded by the 2 s timeouts, no hang
            assert bool(fired) == (rank == 0), ctx
            if name == "transfer_fails_no_retry":  # copying stays off for the pipeline's life
                copies_after = sum(r["copies"] for r in history if (r["step"], r["layer"]) > s["disabled_at"])
                assert copies_after == 0 and broken and s["engine_recoveries"] == 0, (copies_after, ctx)
                # rank 0's own fault; its partner learns of it in its recv (ended by the timeout)
                # or, when it had not started the chunk yet, from rank 0's broken notice
                assert ("injected: link down" in s["engine_disabled"] if rank == 0 else
                        "Timed out" in broken or "injected: link down" in broken), ctx
            else:  # off until step 1 + 1, then on a new engine and group, on every rank together
                off = sum(r["copies"] for r in history if s["disabled_at"] < (r["step"], r["layer"]) and r["step"] < 2)
                on = sum(r["copies"] for r in history if r["step"] >= 2)
                assert off == 0 and on > 0 and s["engine_recoveries"] == 1 and s["recovered_at"] == [2], (off, on, ctx)
                assert not s["engine_disabled"] and not broken, ctx
        else:
            invalid_rows = sorted({r["invalid"] for r in history})
            # per planned layer: the extra slot on 2 ranks, own, missing
            assert invalid_rows == [2 + 2], (invalid_rows, ctx)
            assert s["fallbacks"] == s["invalid"] > 0 and s["copies"] > 0 and s["dropped"] == 0, ctx
            assert not s["engine_disabled"], ctx
    # a replica memory cap too small for 2 banks x R slots is refused by name
    with pytest.raises(ValueError) as cap:
        LookaheadPipeline(model, ProbeConfig(replica_slots_per_rank=2, replica_memory_cap_mib=0.01), cost=unit_cost)
    msg = str(cap.value)
    assert "replica_memory_cap_mib=0.01" in msg and "replica_slots_per_rank <= 0" in msg, msg
    assert "replica_memory_cap_mib >= 0.0235" in msg, msg
    _dead_peer_timeouts(rank, model, unit_cost)


def _dead_peer_timeouts(rank, model, unit_cost):
    """Every group the pipeline talks on gives up on a dead peer after ``collective_timeout_s``:
    the control group (forecast all-gather, agreement), the transfer group, and the commit to a
    chunk. Rank 0 calls each alone; the others never answer (last: it leaves those groups
    broken). Checked once the pipeline is closed."""
    from megatron_probe import ProbeConfig
    from megatron_probe.mechanism.comm import all_to_all, global_rank
    from megatron_probe.mechanism.transfer import CopyOp
    from megatron_probe.runtime.pipeline import LookaheadPipeline

    pipe = LookaheadPipeline(model, ProbeConfig(replica_slots_per_rank=2, predictor_hidden=8, cost_gate=False,
                                                collective_timeout_s=1.5), cost=unit_cost)
    runtime_on_ctl_group = pipe.runtime.ep_group is pipe.ctl_group
    outcomes = {}  # rank 0: name -> (error or None, seconds)

    def alone(name, fn):
        if rank == 0:
            t0 = time.perf_counter()
            try:
                fn()
                error = None
            except Exception as e:  # what a dead peer looks like
                error = f"{type(e).__name__}: {e}"
            outcomes[name] = (error, round(time.perf_counter() - t0, 2))
        dist.barrier()

    alone("agreement", lambda: dist.all_reduce(torch.zeros(3), group=pipe.ctl_group))
    dispatcher = pipe.layers[0].token_dispatcher
    megatron_group = pipe._stock_groups[0]
    on_data_group = dispatcher.ep_group is pipe.comms.data_group and dispatcher.ep_group is not megatron_group
    alone("dispatch", lambda: all_to_all(torch.zeros(4, 2), [2, 2], [2, 2], dispatcher.ep_group))
    alone("transfer_recv", lambda: dist.recv(torch.zeros(4), global_rank(pipe.engine.group, 1), group=pipe.engine.group))

    def commit():
        batch = pipe.engine.submit([CopyOp(1, 0, (0, 1, 0))], [None], [[torch.zeros(4)]])
        if not batch.wait(timeout=30, raise_error=False):
            raise batch.error or RuntimeError("copy neither arrived nor failed")
    alone("commit", commit)
    t0 = time.perf_counter()
    pipe.close()
    close_s = round(time.perf_counter() - t0, 2)
    assert close_s < 5, (f"rank {rank}", close_s)
    assert dispatcher.ep_group is megatron_group, "close() did not give the dispatcher Megatron's EP group back"
    if rank == 0:
        assert runtime_on_ctl_group, "the forecast all-gather does not run on the timed control group"
        assert on_data_group, "the dispatcher's count exchange and All-to-All do not run on the timed data group"
        assert "Timed out" in outcomes["dispatch"][0], outcomes
        for name, (error, secs) in outcomes.items():
            assert error and 1.4 <= secs < 10, (name, error, secs)
        assert "Timed out" in outcomes["agreement"][0], outcomes
        assert "Timed out" in outcomes["transfer_recv"][0], outcomes
        assert "no partner committed" in outcomes["commit"][0], outcomes


@pytest.mark.slow
def test_pipeline_faults_fall_back_to_static_and_time_out():
    """A transfer failing mid-copy (rank 0's engine raises at a chunk of layer 2 in step 1; its
    partner is left in a recv that the 2 s group timeout ends): the copy is dropped and counted
    as failed on every rank, copying is switched off everywhere at the same layer, the steps
    after it run static, and a step later (``transfer_retry_steps=1``) every rank starts a new
    engine on a new group and copies again (counted); with ``transfer_retry_steps=0`` copying stays
    off. The output stays equal, nothing hangs. A plan naming impossible replicas (an
    expert the rank owns, an expert that does not exist, a slot beyond R): those entries are
    removed before copying and counted, the valid ones are used. A replica memory cap too small
    is refused with the value and what would fit. A dead peer (rank 1 silent): rank 0's
    agreement all-reduce (control group, 2 x 1.5 s + deadline), its dispatcher's All-to-All (data
    group, the same), a recv on the transfer group and the commit to a chunk each raise after
    collective_timeout_s (1.5 s) instead of hanging; close() returns at once and gives the
    dispatchers Megatron's group back."""
    run_ranks(pipeline_faults, 2)


def test_metrics_keep_a_bounded_history_and_exact_totals(monkeypatch, tmp_path):
    """A long run keeps only the last rows in memory; the summary still counts every row (the same
    figures as summed over all of them) and the metrics file still gets every row."""
    from megatron_probe.runtime import pipeline_metrics as pm

    monkeypatch.setattr(pm, "HISTORY_ROWS", 5)
    path = tmp_path / "m.jsonl"
    m = pm.PipelineMetrics(str(path))
    every = []
    for step in range(6):
        for layer in range(2):
            row = m.new_row(step, layer, invalid=step % 2)
            row.update(copies=layer + step, wait_ms=0.1 * step, ir_before=1.0 + 0.01 * step, ir_after=1.0,
                       time_vs_static=0.9, gate_on=layer, control_us=3.0 * layer, plan_us=1.5)
            every.append(dict(row))
        m.end_step(step)
    assert len(m.history) == 5 and [r["step"] for r in m.history] == [3, 4, 4, 5, 5]
    s = m.summary()
    assert s["layer_steps"] == 12 and s["copies"] == sum(r["copies"] for r in every) and s["invalid"] == 6
    assert s["wait_ms_total"] == round(sum(r["wait_ms"] for r in every), 3)
    assert s["ir_before"] == round(sum(r["ir_before"] for r in every) / 12, 4) and s["gate_on_fraction"] == 0.5
    assert s["control_us"]["control"] == 1.5 and s["control_us"]["plan"] == 1.5 and s["control_us"]["split"] == 0.0
    assert len(path.read_text().splitlines()) == 12
