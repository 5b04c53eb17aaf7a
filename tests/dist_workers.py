"""Functions run on every rank of a spawned gloo group by the distributed tests.

Each writes what it observed to ``out_dir/rank{r}.json``; the test process asserts on it, so a
failure inside a worker shows as a clear assertion and a crash as a failed spawn.
"""

from __future__ import annotations

import json
import os
import time
import warnings

import torch
import torch.distributed as dist
import torch.nn.functional as F

warnings.filterwarnings("ignore")


def _dump(out_dir, rank, obj):
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(obj, f)


def _config(ep, E=8, K=2, H=32, Fh=64, dtype=torch.float32, **kw):
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


def _probe_layer(cfg, R, backend="auto"):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.spec_utils import build_module

    from megatron_probe import ProbeConfig, probe_layer_spec

    spec = probe_layer_spec(get_gpt_layer_local_spec(num_experts=cfg.num_moe_experts, moe_grouped_gemm=False),
                            ProbeConfig(replica_slots_per_rank=R, expert_backend=backend))
    return build_module(spec.submodules.mlp, config=cfg)


def _stock_layer(cfg):
    """Stock MoELayer (SequentialMLP experts); built with the CPU-constructible 'allgather'
    dispatcher, which does not change its parameters."""
    import dataclasses

    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.spec_utils import build_module

    from megatron_probe.mcore.router import ProbeRouter

    spec = get_gpt_layer_local_spec(num_experts=cfg.num_moe_experts, moe_grouped_gemm=False).submodules.mlp
    spec = dataclasses.replace(spec, submodules=dataclasses.replace(spec.submodules, router=ProbeRouter))
    return build_module(spec, config=dataclasses.replace(cfg, moe_token_dispatcher_type="allgather"))


def _init(ep):
    from megatron_probe.mcore.cpu import initialize_megatron_parallel

    initialize_megatron_parallel(ep)


# --------------------------------------------------------------------------- equivalence
def equivalence(rank, ws, opts_dict, out_dir):
    from megatron_probe.experiments.equivalence import EquivalenceOptions, run_rank

    report = run_rank(rank, ws, EquivalenceOptions(**opts_dict))
    if report is not None:
        _dump(out_dir, rank, report.to_json())


# --------------------------------------------------------------------------- checkpoints
def checkpoint_roundtrip(rank, ws, out_dir):
    _init(ws)
    torch.manual_seed(100 + rank)
    cfg = _config(ws)
    R = 2 if ws > 1 else 0
    stock = _stock_layer(cfg)
    probe = _probe_layer(cfg, R)
    if R:
        pl = torch.full((ws, R), -1, dtype=torch.long)
        pl[0, 0] = cfg.num_moe_experts - 1
        pl[1, 0] = 0
        probe.set_replica_placement(pl)
    s_sd, p_sd = stock.state_dict(), probe.state_dict()
    res = {
        "same_keys": sorted(s_sd) == sorted(p_sd),
        "same_shapes": all(tuple(s_sd[k].shape) == tuple(p_sd[k].shape) for k in s_sd if k in p_sd
                           and isinstance(s_sd[k], torch.Tensor)),
        "no_bank_keys": not any("expert_bank" in k for k in p_sd),
    }
    path = os.path.join(out_dir, f"stock_rank{rank}.pt")
    torch.save(s_sd, path)
    probe.load_state_dict(torch.load(path, weights_only=False))
    p_sd2 = probe.state_dict()
    res["stock_to_probe_equal"] = all(torch.equal(s_sd[k], p_sd2[k]) for k in s_sd if isinstance(s_sd[k], torch.Tensor))
    # the bank follows the loaded weights (views), replicas refreshed by a new fill
    (fc1, _), _ = probe.expert_bank.weights(differentiable=False)  # [natives, replicas] per projection
    res["bank_is_loaded_weights"] = all(
        torch.equal(fc1[j], s_sd[f"experts.local_experts.{j}.linear_fc1.weight"]) for j in range(probe.num_local_experts))
    # and back: PROBE -> stock
    with torch.no_grad():
        for p in probe.parameters():
            p.add_(1.0)
    path2 = os.path.join(out_dir, f"probe_rank{rank}.pt")
    torch.save(probe.state_dict(), path2)
    stock.load_state_dict(torch.load(path2, weights_only=False))
    res["probe_to_stock_equal"] = all(
        torch.equal(stock.state_dict()[k], probe.state_dict()[k]) for k in s_sd if isinstance(s_sd[k], torch.Tensor))
    # a checkpoint whose expert shapes differ
    other = _stock_layer(_config(ws, Fh=48))
    try:
        probe.load_state_dict(other.state_dict())
        res["shape_error"] = None
    except RuntimeError as e:
        res["shape_error"] = str(e)
    # a checkpoint from a model with another expert count / hidden size
    other2 = _stock_layer(_config(ws, E=16, H=32))
    try:
        probe.load_state_dict(other2.state_dict())
        res["model_error"] = None
    except ValueError as e:
        res["model_error"] = str(e)
    _dump(out_dir, rank, res)


def gpt_model_equivalence(rank, ws, out_dir):
    """Two-layer GPTModel from a stock spec and from probe_layer_spec(stock spec): same state
    dict; same logits (EP=1: against the stock model; EP>1: with and without replicas)."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from megatron_probe import ProbeConfig, probe_layer_spec
    from megatron_probe.mcore.router import ProbeRouter

    _init(ws)
    torch.manual_seed(7)
    E = 8
    cfg = _config(ws, E=E)
    stock_spec = get_gpt_layer_local_spec(num_experts=E, moe_grouped_gemm=False)
    stock_spec.submodules.mlp.submodules.router = ProbeRouter  # stock gating needs CUDA
    R = 2 if ws > 1 else 0
    pspec = probe_layer_spec(stock_spec, ProbeConfig(replica_slots_per_rank=R))
    kw = dict(vocab_size=128, max_sequence_length=32, position_embedding_type="learned_absolute")
    probe = GPTModel(config=cfg, transformer_layer_spec=pspec, **kw).eval()
    tokens = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(rank))
    pos = torch.arange(16).unsqueeze(0).expand(2, -1)
    mask = torch.triu(torch.ones(16, 16, dtype=torch.bool), 1).view(1, 1, 16, 16)
    res = {}
    if ws == 1:
        import dataclasses

        stock = GPTModel(config=dataclasses.replace(cfg, moe_token_dispatcher_type="allgather"),
                         transformer_layer_spec=stock_spec, **kw).eval()
        res["same_keys"] = sorted(stock.state_dict()) == sorted(probe.state_dict())
        probe.load_state_dict(stock.state_dict())
        with torch.no_grad():
            a, b = stock(tokens, pos, mask), probe(tokens, pos, mask)
        res["max_abs"] = (a - b).abs().max().item()
        res["bit_exact"] = bool(torch.equal(a, b))
    else:
        with torch.no_grad():
            a = probe(tokens, pos, mask)
            layers = [l.mlp for l in probe.decoder.layers]
            pl = torch.full((ws, R), -1, dtype=torch.long)
            for r in range(ws):
                foreign = [e for e in range(E) if e // (E // ws) != r]
                pl[r, :R] = torch.tensor(foreign[:R])
            for m in layers:
                m.set_replica_placement(pl)
            b = probe(tokens, pos, mask)
            loads = [m.token_dispatcher.last_assignment.sum(dim=(0, 1)).tolist() for m in layers]
        res["max_abs"] = (a - b).abs().max().item()
        res["scale"] = a.abs().max().item()
        res["loads"] = loads
        res["layer_types"] = sorted({type(m).__name__ for m in layers})
    _dump(out_dir, rank, res)


# --------------------------------------------------------------------------- replica bank
def bank_fill(rank, ws, out_dir):
    _init(ws)
    torch.manual_seed(0)
    cfg = _config(ws, E=8)
    layer = _probe_layer(cfg, R=3)
    L = layer.num_local_experts
    # every rank knows every expert's weights: gather them for the check
    from megatron_probe.mechanism.comm import all_gather_rows

    bank = layer.expert_bank
    fc1_all = all_gather_rows(bank.fc1[:L].contiguous(), layer.ep_group).reshape(-1, *bank.fc1.shape[1:])
    fc2_all = all_gather_rows(bank.fc2[:L].contiguous(), layer.ep_group).reshape(-1, *bank.fc2.shape[1:])
    res = {"moves": []}
    placements = []
    g = torch.Generator().manual_seed(5)
    for step in range(4):
        pl = torch.full((ws, 3), -1, dtype=torch.long)
        for r in range(ws):
            foreign = [e for e in range(8) if e // L != r]
            perm = torch.randperm(len(foreign), generator=g).tolist()
            for s in range(3):
                if step == 2 or torch.rand((), generator=g) < 0.8:
                    pl[r, s] = foreign[perm[s]]
        if step == 3:
            pl = placements[-1].clone()  # unchanged placement: nothing moves
        placements.append(pl)
        moved = layer.set_replica_placement(pl)
        ok = True
        for s in range(3):
            e = int(pl[rank, s])
            if e >= 0:
                ok &= torch.equal(bank.replica_fc1[s], fc1_all[e]) and torch.equal(bank.replica_fc2[s], fc2_all[e])
        res["moves"].append({"moved": moved, "correct": bool(ok)})
    res["replica_bytes"] = layer.replica_memory_bytes()
    res["expert_bytes"] = bank.expert_bytes()
    # storage sharing: native parameters are the bank rows
    p0 = layer.experts.local_experts[0].linear_fc1.weight
    res["native_is_view"] = p0.data_ptr() == bank.fc1[0].data_ptr()
    # dtype change re-binds the views and keeps replicas
    layer.to(torch.bfloat16)
    x = torch.randn(6, 1, 32, dtype=torch.bfloat16)
    with torch.no_grad():
        out, _ = layer(x)
    res["after_to_bf16_view"] = layer.experts.local_experts[0].linear_fc1.weight.data_ptr() == bank.fc1[0].data_ptr()
    res["after_to_bf16_dtype"] = str(bank.fc1.dtype)
    e = int(placements[-1][rank, 0])
    res["replica_kept"] = bool(torch.equal(bank.replica_fc1[0], fc1_all[e].to(torch.bfloat16))) if e >= 0 else True
    # replacing a parameter's storage is noticed before the next compute
    lin = layer.experts.local_experts[1].linear_fc2
    lin.weight.data = torch.zeros_like(lin.weight)
    _, (fc2, _) = bank.weights(differentiable=False)
    res["swap_noticed"] = bool(torch.equal(fc2[1], torch.zeros_like(fc2[1])))
    _dump(out_dir, rank, res)


# --------------------------------------------------------------------------- bad input
def bad_inputs(rank, ws, out_dir):
    from megatron_probe import ProbeConfig

    _init(ws)
    res = {}

    def catch(key, fn, exc=(ValueError, NotImplementedError, TypeError)):
        try:
            fn()
            res[key] = None
        except exc as e:
            res[key] = f"{type(e).__name__}: {e}"

    cfg = _config(ws, E=8)
    catch("too_many_slots", lambda: _probe_layer(cfg, R=7))
    catch("topk_gt_experts", lambda: ProbeConfig().validate_for_model(8, ws, 9))
    layer = _probe_layer(cfg, R=2)
    catch("placement_bad_expert", lambda: layer.set_replica_placement(torch.tensor([[9, -1], [0, -1]])))
    catch("placement_bad_slot", lambda: layer.set_replica_placement(torch.tensor([[5, -1, 6], [0, -1, 1]])))
    catch("placement_own_expert", lambda: layer.set_replica_placement(torch.tensor([[0, -1], [4, -1]])))
    layer.set_replica_placement(torch.tensor([[5, -1], [0, -1]]))
    x = torch.randn(64, 1, 32, generator=torch.Generator().manual_seed(rank))

    def forward_with(assign_fn):
        from megatron_probe.mechanism.comm import all_gather_rows

        with torch.no_grad():
            _, rmap = layer.router(x)
            counts = all_gather_rows(rmap.sum(0).long(), layer.ep_group)
            from megatron_probe.policy import locality_even_assignment

            a = locality_even_assignment(counts, layer.token_dispatcher.placement, layer.layout)
            layer.set_next_assignment(assign_fn(a, counts))
            layer(x)

    def lose(a, c):
        s, e = (c > 0).nonzero()[0].tolist()
        a[s, e] = 0
        return a

    def dup(a, c):
        a[0, 5, 1] += 1
        return a

    def stray(a, c):
        # Move one token of an expert that only rank 1 holds (4, 6 or 7: rank 0's replica slot
        # holds 5) to rank 0. Pick a (src, expert) that really has tokens for rank 1, so the
        # edit never produces a negative entry whatever the router picked.
        for e in (6, 4, 7):
            srcs = (a[:, e, 1] > 0).nonzero().flatten().tolist()
            if srcs:
                a[srcs[0], e, 0] += 1
                a[srcs[0], e, 1] -= 1
                return a
        raise AssertionError("no tokens for experts 4, 6, 7 on rank 1: enlarge the batch")

    catch("assign_lose", lambda: forward_with(lose))
    catch("assign_dup", lambda: forward_with(dup))
    catch("assign_stray", lambda: forward_with(stray))
    # after all that, a normal forward still works (no hang, no stale state)
    with torch.no_grad():
        out, _ = layer(x)
    res["forward_after_errors"] = list(out.shape)
    # grads with replicas are refused; without replicas they flow
    layer.train()
    catch("grad_with_replicas", lambda: layer(x.clone().requires_grad_())[0].sum().backward())
    _dump(out_dir, rank, res)


def expert_grads(rank, ws, out_dir):
    """Training path without replicas: expert weight grads equal a dense recompute."""
    from megatron_probe.mechanism.comm import all_gather_rows

    _init(ws)
    torch.manual_seed(3)
    cfg = _config(ws, E=8)
    layer = _probe_layer(cfg, R=2)
    layer.train()
    x = torch.randn(12, 1, 32, generator=torch.Generator().manual_seed(rank), requires_grad=True)
    out, _ = layer(x)
    out.sum().backward()
    probs, rmap = layer.router(x.detach())
    X = all_gather_rows(x.detach().view(-1, 32), layer.ep_group).view(-1, 32)
    P = all_gather_rows(probs.detach(), layer.ep_group).view(-1, 8)
    M = all_gather_rows(rmap, layer.ep_group).view(-1, 8)
    err = 0.0
    for j, e in enumerate(layer.local_expert_indices):
        mod = layer.experts.local_experts[j]
        w1 = mod.linear_fc1.weight.detach().clone().requires_grad_()
        w2 = mod.linear_fc2.weight.detach().clone().requires_grad_()
        h = X @ w1.T
        a, b = torch.chunk(h, 2, -1)
        y = (P[:, e] * M[:, e]).unsqueeze(-1) * ((F.silu(a) * b) @ w2.T)
        y.sum().backward()
        err = max(err, (w1.grad - mod.linear_fc1.weight.grad).abs().max().item(),
                  (w2.grad - mod.linear_fc2.weight.grad).abs().max().item())
    res = {"max_grad_err": err, "input_grad": x.grad is not None and bool(torch.isfinite(x.grad).all())}
    _dump(out_dir, rank, res)


# --------------------------------------------------------------------------- trained model
def tiny_moe_generate(rank, ws, ckpt, replicas, out_dir):
    """Greedy tokens of the checkpoint at EP=ws (PROBE spec, optionally with replicas on every
    layer) for a prompt that depends on the rank."""
    from megatron_probe import ProbeConfig
    from megatron_probe.runtime.model_walk import moe_layers
    from megatron_probe.experiments.tiny_moe import greedy_generate, load_model

    _init(ws)
    R = 2 if (replicas and ws > 1) else 0
    model, tok, cfg = load_model(ckpt, spec="probe", probe_config=ProbeConfig(replica_slots_per_rank=R),
                                 ep=ws, rank=rank)
    if R:
        L = cfg.num_experts // ws
        pl = torch.full((ws, R), -1, dtype=torch.long)
        for r in range(ws):
            foreign = [e for e in range(cfg.num_experts) if e // L != r]
            pl[r] = torch.tensor(foreign[r::max(1, len(foreign) // R)][:R])
        for m in moe_layers(model):
            m.set_replica_placement(pl)
    prompts = ["def main(argv):\n    parser = argparse.", "Diese Option bewirkt, dass"]
    out = {}
    for i in range(len(prompts)):
        # each rank serves a different prompt in the same forward passes (EP shares experts, not tokens)
        mine = prompts[(i + rank) % len(prompts)]
        ids = tok.encode(mine).ids
        out[mine] = greedy_generate(model, ids, 12, cfg.seq_length, eos_id=None)
    _dump(out_dir, rank, out)


# --------------------------------------------------------------------------- planner
def planner_determinism(rank, ws, out_dir):
    """Every rank plans from the same all-gathered counts; the plans must be identical."""
    from megatron_probe.mechanism.comm import all_gather_rows
    from megatron_probe.policy import ExpertLayout
    from megatron_probe.policy.cost_model import ExpertCost
    from megatron_probe.policy.planner import assign_on_truth, plan_probe

    torch.manual_seed(rank)
    lay = ExpertLayout(32, ws, 3)
    mine = torch.randint(0, 100, (32,))
    mine[rank * 3] += 1000
    counts = all_gather_rows(mine, None if ws == 1 else dist.group.WORLD)
    cost = ExpertCost(0.1, 5.0)
    pl, A = plan_probe(counts, lay, cost)
    A2 = assign_on_truth(counts, pl, lay, cost)
    flat = torch.cat([pl.flatten(), A.flatten(), A2.flatten()])
    allp = all_gather_rows(flat, dist.group.WORLD)
    _dump(out_dir, rank, {"identical": bool((allp == allp[0]).all()), "replicas": int((pl >= 0).sum())})


# --------------------------------------------------------------------------- lookahead predictor
def lookahead_counts(rank, ws, out_dir):
    """Every rank forecasts its own tokens (different lengths per rank); the all-gathered
    ``[ep, E]`` counts must hold each rank's local forecast in its row, and the model's output
    must be the same with the predictors attached (also after online updates)."""
    from megatron_probe import ProbeConfig
    from megatron_probe.runtime.lookahead import LookaheadRuntime
    from megatron_probe.experiments.recorder import RoutingRecorder
    from megatron_probe.experiments.tiny_moe import TinyMoEConfig, build_model, forward_logits

    _init(ws)
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
    same, rows_ok, sums_ok, checked = True, True, True, 0
    for step, (b, ref) in enumerate(zip(batches, refs)):
        tokens_all_ranks = sum(17 + 7 * r + 3 * step for r in range(ws))
        with torch.inference_mode(), RoutingRecorder(model, record_layer_input=True) as rec:
            out = forward_logits(model, b)
            same &= bool(torch.equal(out, ref))
            recs, inp = rec.pop(), rec.pop_layer_input()
            for L in sorted(rt.predictors.layers):
                src = inp if L == 0 else recs[L - 1][0]
                local = rt.predictors[L].predict_counts(src)
                gathered = rt.predicted_counts(L)
                parts = [None] * ws
                dist.all_gather_object(parts, local.tolist())
                rows_ok &= gathered.shape == (ws, cfg.num_experts) and gathered.tolist() == parts
                sums_ok &= int(gathered.sum()) == cfg.topk * tokens_all_ranks  # every token of every rank
                checked += 1
        rt.end_step()
    _dump(out_dir, rank, {"same_output": same, "rows_ok": rows_ok, "sums_ok": sums_ok, "checked": checked,
                          "updates": rt.distiller.updates, "topk_acc": rt.metrics()["local"]["mean_topk_acc"]})
    rt.close()


# --------------------------------------------------------------------------- transfer engine
def _transfer_plan(ws, n_ops=10, seed=0):
    """The same random copy plan on every rank: ops, shapes, and the value each copy carries."""
    from megatron_probe.mechanism.transfer import CopyOp

    gen = torch.Generator().manual_seed(seed)
    ops, shapes = [], []
    for i in range(n_ops):
        src = int(torch.randint(ws, (1,), generator=gen))
        dst = (src + 1 + int(torch.randint(ws - 1, (1,), generator=gen))) % ws
        ops.append(CopyOp(src, dst, key=("expert", i)))
        shapes.append([(int(torch.randint(1, 9, (1,), generator=gen)), 33), (int(torch.randint(1, 200, (1,), generator=gen)),)])
    return ops, shapes


def _payload(i, shape, part):
    n = 1
    for d in shape:
        n *= d
    return (torch.arange(n, dtype=torch.float32) * 0.5 + 1000 * i + 100 * part).reshape(shape)


def transfer_engine(rank, ws, out_dir):
    """Chunked copies on a dedicated gloo group while the main thread runs collectives: paused
    nothing moves, resumed everything arrives bit-exact, in any pause pattern, without a hang.
    The engine's event log shows no chunk of this rank inside any window from ``pause()``
    returning to ``resume()`` being called."""
    from megatron_probe.mechanism.event_log import CHUNK_KINDS, EventLog, now_ns, overlapping
    from megatron_probe.mechanism.transfer import CopyOp, TransferEngine

    log = EventLog(rank)
    engine = TransferEngine.create(chunk_bytes=256, event_log=log)
    res = {}

    def pause():
        engine.pause()
        return now_ns()

    def resume(t_paused):
        log.record("paused", None, t_paused, now_ns())
        engine.resume()

    for rnd in range(3):
        ops, shapes = _transfer_plan(ws, seed=rnd)
        src = [[_payload(i, s, p) for p, s in enumerate(shapes[i])] if op.src == rank else None
               for i, op in enumerate(ops)]
        dst = [[torch.zeros(s) for s in shapes[i]] if op.dst == rank else None for i, op in enumerate(ops)]
        involved = any(op.src == rank or op.dst == rank for op in ops)
        t_paused = pause()
        dist.barrier()
        batch = engine.submit(ops, src, dst)
        finished_while_paused = batch.wait(timeout=0.3)
        dist.barrier()
        if rnd == 1 and rank == 0:
            time.sleep(0.2)  # one rank resumes late: the others wait for it, nobody hangs
        resume(t_paused)
        x = torch.ones(4) * rank
        for k in range(20):  # main-group collectives while the worker moves chunks
            dist.all_reduce(x)
            if k in (2, 5, 11) and rnd == 2:
                t_paused = pause()  # in the middle of the copies: a chunk in flight finishes first
            if k in (3, 8, 12) and rnd == 2:
                resume(t_paused)
        done = batch.wait(timeout=60)
        exact = all(torch.equal(dst[i][p], _payload(i, s, p)) for i, op in enumerate(ops) if op.dst == rank
                    for p, s in enumerate(shapes[i]))
        expected_bytes = sum(sum(4 * torch.Size(s).numel() for s in shapes[i]) for i, op in enumerate(ops)
                             if rank in (op.src, op.dst))
        res[rnd] = {"involved": involved, "finished_while_paused": finished_while_paused, "done": done,
                    "exact": exact, "bytes_ok": batch.bytes_moved == expected_bytes,
                    "all_flags": all(batch.completed())}
    errors = {}
    for name, args in (("same_rank", ([CopyOp(0, 0)], [None], [None])),
                       ("no_tensors", ([CopyOp(rank, (rank + 1) % ws)], [None], [None])),
                       ("non_contiguous", ([CopyOp(rank, (rank + 1) % ws)], [[torch.zeros(4, 4).t()]], [None]))):
        try:
            engine.submit(*args)
            errors[name] = None
        except ValueError as e:
            errors[name] = str(e)
    engine.close()
    events = log.events()
    _dump(out_dir, rank, {"rounds": res, "errors": errors, "chunks_logged": sum(e["kind"] in CHUNK_KINDS for e in events),
                          "chunks_moved": engine.chunks_moved, "pause_windows": sum(e["kind"] == "paused" for e in events),
                          "chunks_in_pause": len(overlapping(events, CHUNK_KINDS, ("paused",)))})


# --------------------------------------------------------------------------- live pipeline
def _skewed_gpt(rank, ws):
    """A small 4-layer GPT at EP ws whose routing forces replicas (an expert bias makes one
    expert every token's first choice; skewed token ids), four batches per rank, the plain
    model's logits for them, and a cost model under which even tiny batches are worth balancing."""
    from megatron_probe import ProbeConfig
    from megatron_probe.runtime.model_walk import moe_layers
    from megatron_probe.experiments.tiny_moe import TinyMoEConfig, build_model, forward_logits
    from megatron_probe.policy.cost_model import ExpertCost

    _init(ws)
    torch.manual_seed(0)
    cfg = TinyMoEConfig(num_layers=4, hidden_size=32, num_attention_heads=4, num_experts=8, topk=2,
                        expert_ffn_hidden=16, seq_length=64, vocab_size=128, score_function="sigmoid")
    model = build_model(cfg, spec="probe", probe_config=ProbeConfig(replica_slots_per_rank=2), ep=ws)
    model.eval()
    # adversarial skew: an expert bias makes expert 0 (rank 0's) every token's first choice
    for i, layer in enumerate(moe_layers(model)):
        r = layer.router
        r.enable_expert_bias = True
        bias = torch.zeros(cfg.num_experts)
        bias[(3 * i) % cfg.num_experts if i % 2 else 0] = 5.0
        r._cpu_buffer("expert_bias", bias, persistent=True)
        r._cpu_buffer("local_tokens_per_expert", torch.zeros(cfg.num_experts), persistent=False)
    gen = torch.Generator().manual_seed(7 + rank)
    # skewed tokens: a few token ids dominate, so some experts are hot
    batches = [torch.randint(0, 6 if step % 2 else cfg.vocab_size, (1, 20 + 5 * rank + 2 * step), generator=gen)
               for step in range(4)]
    with torch.no_grad():
        refs = [forward_logits(model, b) for b in batches]
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


SLOW_DEADLINE_MS, SLOW_STALL_S = 40.0, 0.2


def pipeline_equivalence(rank, ws, out_dir):
    """The full pipeline (forecast, plan, phase-locked prefetch into shared double banks,
    deadline, agreement, re-assignment) on a small GPT at EP ws: output equal to the plain PROBE
    model's for several steps, with copies arriving, with every copy dropped (engine held), and
    with each stage switched off."""
    from megatron_probe import ProbeConfig
    from megatron_probe.runtime.pipeline import LookaheadPipeline
    from megatron_probe.runtime.model_walk import moe_layers
    from megatron_probe.experiments.tiny_moe import forward_logits

    model, batches, refs, unit_cost = _skewed_gpt(rank, ws)
    R = 2
    scale = max(float(r.abs().max()) for r in refs)
    out = {}
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
        pcfg = ProbeConfig(replica_slots_per_rank=R, predictor_hidden=8, transfer_chunk_mib=0.001, **kw)
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
        out[name] = {"max_abs": max_abs, "scale": scale, "copies": s["copies"], "dropped": s["dropped"],
                     "ir_before": s["ir_before"], "ir_after": s["ir_after"], "rows": len(pipe.history),
                     "memory": s["replica_memory_bytes"], "expert_bytes": pipe.pool.expert_bytes,
                     "secs": round(time.perf_counter() - t_variant, 2), "paused_s": s["paused_s"]}
    with torch.no_grad():  # hooks gone: the plain model again
        out["after_close_equal"] = bool(torch.equal(forward_logits(model, batches[0]), refs[0]))
    _dump(out_dir, rank, out)


def pipeline_event_log(rank, ws, wandb_project, out_dir):
    """The pipeline with the event log on, phase locking on and off: every chunk's and every
    All-to-All's interval on every rank, exported as JSON lines beside the metrics (and, with a
    wandb project, the metrics as an offline wandb run of rank 0, read back)."""
    from megatron_probe import ProbeConfig
    from megatron_probe.runtime.pipeline import LookaheadPipeline
    from megatron_probe.mechanism.event_log import A2A_KINDS, CHUNK_KINDS, overlapping, read_jsonl

    model, batches, refs, unit_cost = _skewed_gpt(rank, ws)
    scale = max(float(r.abs().max()) for r in refs)
    out = {}
    for name, lock in (("locked", True), ("unlocked", False)):
        pcfg = ProbeConfig(replica_slots_per_rank=2, predictor_hidden=8, transfer_chunk_mib=0.001,
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
        out[name] = {
            "max_abs": max_abs, "scale": scale, "copies": s["copies"], "dropped": s["dropped"],
            "chunks_logged": len(chunks), "chunks_moved": s["chunks"], "a2a_logged": len(a2as),
            "a2a_layers": sorted({(e["kind"], e["layer"]) for e in a2as}),
            "overlaps": len(overlapping(events, CHUNK_KINDS, A2A_KINDS)),
            "same_rank": all(e["rank"] == rank for e in events),
            "well_formed": all(e["t_end"] >= e["t_start"] and e["layer"] is not None for e in chunks + a2as),
            "chunk_ms": sorted((e["t_end"] - e["t_start"]) / 1e6 for e in chunks),
            "pause_wait_s": s["pause_wait_s"], "metrics_rows": len(read_jsonl(metrics)),
        }
        if wandb_project and lock and rank == 0:
            from megatron_probe.serving.wandb_logger import read_offline_run

            run = read_offline_run(out_dir)
            keys = sorted({k for row in run["history"] for k in row})
            out["wandb"] = {"complete": run["complete"], "keys": keys, "rows": len(run["history"]),
                            "step_copies": sum(row.get("step/copies", 0) for row in run["history"]),
                            "summary_copies": run["summary"].get("summary/copies"), "copies": s["copies"],
                            "project_in_config": run["config"].get("wandb_project")}
    _dump(out_dir, rank, out)


def pipeline_faults(rank, ws, out_dir):
    """Fault injection on the live pipeline: a transfer that fails mid-copy (the engine's fault
    hook raises on rank 0 at its first chunk of a layer-2 copy in step 1; its partners are left
    in a send/recv or a commit that the short timeouts end), and a plan naming replicas that
    cannot exist. Output equal to the plain model; fallbacks counted; no hang."""
    from megatron_probe import ProbeConfig
    from megatron_probe.runtime.pipeline import LookaheadPipeline

    model, batches, refs, unit_cost = _skewed_gpt(rank, ws)
    scale = max(float(r.abs().max()) for r in refs)
    out = {}
    E = 8
    for name in ("transfer_fails", "bad_plan"):
        pcfg = ProbeConfig(replica_slots_per_rank=2, predictor_hidden=8, transfer_chunk_mib=0.001,
                           prefetch_deadline_ms=10_000.0, collective_timeout_s=2.0)
        t0 = time.perf_counter()
        pipe = LookaheadPipeline(model, pcfg, cost=unit_cost)
        fired = []
        if name == "transfer_fails" and rank == 0:
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
        out[name] = {
            "max_abs": max_abs, "scale": scale, "rows": len(pipe.history), "secs": round(time.perf_counter() - t0, 2),
            "close_s": round(time.perf_counter() - t_close, 2), "fired": fired,
            **{k: s[k] for k in ("copies", "dropped", "failed", "invalid", "fallbacks", "engine_disabled",
                                 "disabled_at")},
            "invalid_rows": sorted({r["invalid"] for r in pipe.history}),
            "copies_after_disable": sum(r["copies"] for r in pipe.history
                                        if s["disabled_at"] and (r["step"], r["layer"]) > tuple(s["disabled_at"])),
            "broken": pipe.engine.broken,
        }
    # a replica memory cap too small for 2 banks x R slots is refused by name
    try:
        LookaheadPipeline(model, ProbeConfig(replica_slots_per_rank=2, replica_memory_cap_mib=0.01), cost=unit_cost)
        out["cap_error"] = None
    except ValueError as e:
        out["cap_error"] = str(e)
    out["timeouts"] = _dead_peer_timeouts(rank, model, unit_cost)
    _dump(out_dir, rank, out)


def _dead_peer_timeouts(rank, model, unit_cost):
    """Every group the pipeline talks on gives up on a dead peer after ``collective_timeout_s``:
    the control group (forecast all-gather, agreement), the transfer group, and the commit to a
    chunk. Rank 0 calls each alone; the others never answer (last: it leaves those groups
    broken)."""
    from megatron_probe import ProbeConfig
    from megatron_probe.runtime.pipeline import LookaheadPipeline
    from megatron_probe.mechanism.comm import global_rank
    from megatron_probe.mechanism.transfer import CopyOp

    pipe = LookaheadPipeline(model, ProbeConfig(replica_slots_per_rank=2, predictor_hidden=8,
                                                collective_timeout_s=1.5), cost=unit_cost)
    out = {"runtime_on_ctl_group": pipe.runtime.ep_group is pipe.ctl_group}

    def alone(name, fn):
        if rank == 0:
            t0 = time.perf_counter()
            try:
                fn()
                out[name] = {"error": None}
            except Exception as e:  # what a dead peer looks like
                out[name] = {"error": f"{type(e).__name__}: {e}"}
            out[name]["secs"] = round(time.perf_counter() - t0, 2)
        dist.barrier()

    alone("agreement", lambda: dist.all_reduce(torch.zeros(3), group=pipe.ctl_group))
    alone("transfer_recv", lambda: dist.recv(torch.zeros(4), global_rank(pipe.engine.group, 1), group=pipe.engine.group))

    def commit():
        batch = pipe.engine.submit([CopyOp(1, 0, (0, 1, 0))], [None], [[torch.zeros(4)]])
        if not batch.wait(timeout=30, raise_error=False):
            raise batch.error or RuntimeError("copy neither arrived nor failed")
    alone("commit", commit)
    t0 = time.perf_counter()
    pipe.close()
    out["close_s"] = round(time.perf_counter() - t0, 2)
    out["broken"] = pipe.engine.broken
    return out
