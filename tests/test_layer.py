"""The PROBE MoE layer (mcore.layer) over gloo: checkpoints shared with the stock layer, a GPT
model built from the PROBE spec, bad inputs refused by name, expert gradients."""

import dataclasses
import os

import pytest
import torch
import torch.nn.functional as F

from distributed import init_ep, moe_config, probe_layer, run_ranks

BAD_INPUT = (ValueError, NotImplementedError, TypeError)


def _stock_layer(cfg):
    """Stock MoELayer (SequentialMLP experts); built with the CPU-constructible 'allgather'
    dispatcher, which does not change its parameters."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.spec_utils import build_module

    from megatron_probe.mcore.router import ProbeRouter

    spec = get_gpt_layer_local_spec(num_experts=cfg.num_moe_experts, moe_grouped_gemm=False).submodules.mlp
    spec = dataclasses.replace(spec, submodules=dataclasses.replace(spec.submodules, router=ProbeRouter))
    return build_module(spec, config=dataclasses.replace(cfg, moe_token_dispatcher_type="allgather"))


def _tensor_keys(sd):
    return [k for k in sd if isinstance(sd[k], torch.Tensor)]


# --------------------------------------------------------------------------- checkpoints
def checkpoint_roundtrip(rank, ws, out_dir):
    init_ep(ws)
    torch.manual_seed(100 + rank)
    cfg = moe_config(ws)
    R = 2 if ws > 1 else 0
    stock = _stock_layer(cfg)
    probe = probe_layer(cfg, R)
    if R:
        pl = torch.full((ws, R), -1, dtype=torch.long)
        pl[0, 0] = cfg.num_moe_experts - 1
        pl[1, 0] = 0
        probe.set_replica_placement(pl)
    s_sd, p_sd = stock.state_dict(), probe.state_dict()
    assert sorted(s_sd) == sorted(p_sd), sorted(set(s_sd) ^ set(p_sd))
    shapes = [(k, tuple(s_sd[k].shape), tuple(p_sd[k].shape)) for k in _tensor_keys(s_sd) if k in p_sd]
    assert all(s == p for _, s, p in shapes), [x for x in shapes if x[1] != x[2]]
    assert not any("expert_bank" in k for k in p_sd), [k for k in p_sd if "expert_bank" in k]
    path = os.path.join(out_dir, f"stock_rank{rank}.pt")
    torch.save(s_sd, path)
    probe.load_state_dict(torch.load(path, weights_only=False))
    p_sd2 = probe.state_dict()
    differ = [k for k in _tensor_keys(s_sd) if not torch.equal(s_sd[k], p_sd2[k])]
    assert not differ, ("stock -> PROBE differs", differ)
    # the bank follows the loaded weights (views), replicas refreshed by a new fill
    (fc1, _), _ = probe.expert_bank.weights(differentiable=False)  # [natives, replicas] per projection
    differ = [j for j in range(probe.num_local_experts)
              if not torch.equal(fc1[j], s_sd[f"experts.local_experts.{j}.linear_fc1.weight"])]
    assert not differ, ("bank rows are not the loaded weights", differ)
    # and back: PROBE -> stock
    with torch.no_grad():
        for p in probe.parameters():
            p.add_(1.0)
    path2 = os.path.join(out_dir, f"probe_rank{rank}.pt")
    torch.save(probe.state_dict(), path2)
    stock.load_state_dict(torch.load(path2, weights_only=False))
    s_sd3, p_sd3 = stock.state_dict(), probe.state_dict()
    differ = [k for k in _tensor_keys(s_sd) if not torch.equal(s_sd3[k], p_sd3[k])]
    assert not differ, ("PROBE -> stock differs", differ)
    # a checkpoint whose expert shapes differ
    other = _stock_layer(moe_config(ws, Fh=48))
    with pytest.raises(RuntimeError, match="size mismatch"):
        probe.load_state_dict(other.state_dict())
    # a checkpoint from a model with another expert count / hidden size
    other2 = _stock_layer(moe_config(ws, E=16, H=32))
    with pytest.raises(ValueError, match="checkpoint is from another model"):
        probe.load_state_dict(other2.state_dict())


@pytest.mark.slow
@pytest.mark.parametrize("ws", [1, 2])
def test_checkpoint_roundtrip(tmp_path, ws):
    run_ranks(checkpoint_roundtrip, ws, str(tmp_path))


# --------------------------------------------------------------------------- GPT model
def gpt_model_equivalence(rank, ws):
    """Two-layer GPTModel from a stock spec and from probe_layer_spec(stock spec): same state
    dict; same logits (EP=1: against the stock model; EP>1: with and without replicas)."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from megatron_probe import ProbeConfig, probe_layer_spec
    from megatron_probe.mcore.router import ProbeRouter

    init_ep(ws)
    torch.manual_seed(7)
    E = 8
    cfg = moe_config(ws, E=E)
    stock_spec = get_gpt_layer_local_spec(num_experts=E, moe_grouped_gemm=False)
    stock_spec.submodules.mlp.submodules.router = ProbeRouter  # stock gating needs CUDA
    R = 2 if ws > 1 else 0
    pspec = probe_layer_spec(stock_spec, ProbeConfig(replica_slots_per_rank=R))
    kw = dict(vocab_size=128, max_sequence_length=32, position_embedding_type="learned_absolute")
    probe = GPTModel(config=cfg, transformer_layer_spec=pspec, **kw).eval()
    tokens = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(rank))
    pos = torch.arange(16).unsqueeze(0).expand(2, -1)
    mask = torch.triu(torch.ones(16, 16, dtype=torch.bool), 1).view(1, 1, 16, 16)
    if ws == 1:
        stock = GPTModel(config=dataclasses.replace(cfg, moe_token_dispatcher_type="allgather"),
                         transformer_layer_spec=stock_spec, **kw).eval()
        assert sorted(stock.state_dict()) == sorted(probe.state_dict()), \
            sorted(set(stock.state_dict()) ^ set(probe.state_dict()))
        probe.load_state_dict(stock.state_dict())
        with torch.no_grad():
            a, b = stock(tokens, pos, mask), probe(tokens, pos, mask)
        assert torch.equal(a, b), ("not bit-exact", (a - b).abs().max().item())
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
        layer_types = sorted({type(m).__name__ for m in layers})
        assert layer_types == ["ProbeMoELayer"], layer_types
        max_abs, scale = (a - b).abs().max().item(), a.abs().max().item()
        assert max_abs <= 1e-5 * scale, (max_abs, scale, loads)


@pytest.mark.slow
@pytest.mark.parametrize("ws", [1, 2])
def test_gpt_model(ws):
    run_ranks(gpt_model_equivalence, ws)


# --------------------------------------------------------------------------- bad input
def bad_inputs(rank, ws):
    from megatron_probe import ProbeConfig
    from megatron_probe.mechanism.comm import all_gather_rows
    from megatron_probe.policy import locality_even_assignment

    init_ep(ws)
    cfg = moe_config(ws, E=8)
    with pytest.raises(BAD_INPUT, match="exceeds the 4 experts that other ranks own"):
        probe_layer(cfg, R=7)
    with pytest.raises(BAD_INPUT, match="moe_router_topk=9"):
        ProbeConfig().validate_for_model(8, ws, 9)
    layer = probe_layer(cfg, R=2)
    with pytest.raises(BAD_INPUT, match="= 9 names no expert"):
        layer.set_replica_placement(torch.tensor([[9, -1], [0, -1]]))
    with pytest.raises(BAD_INPUT, match="slot that does not exist"):
        layer.set_replica_placement(torch.tensor([[5, -1, 6], [0, -1, 1]]))
    with pytest.raises(BAD_INPUT, match="already owns"):
        layer.set_replica_placement(torch.tensor([[0, -1], [4, -1]]))
    layer.set_replica_placement(torch.tensor([[5, -1], [0, -1]]))
    x = torch.randn(64, 1, 32, generator=torch.Generator().manual_seed(rank))

    def forward_with(assign_fn):
        with torch.no_grad():
            _, rmap = layer.router(x)
            counts = all_gather_rows(rmap.sum(0).long(), layer.ep_group)
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

    with pytest.raises(BAD_INPUT, match="assignment loses tokens"):
        forward_with(lose)
    with pytest.raises(BAD_INPUT, match="assignment duplicates tokens"):
        forward_with(dup)
    with pytest.raises(BAD_INPUT, match=r"holds no copy of expert [467] "):
        forward_with(stray)
    # after all that, a normal forward still works (no hang, no stale state)
    with torch.no_grad():
        out, _ = layer(x)
    assert list(out.shape) == [64, 1, 32], out.shape
    # grads with replicas are refused
    layer.train()
    with pytest.raises(BAD_INPUT, match="replicated experts are for inference"):
        layer(x.clone().requires_grad_())[0].sum().backward()


@pytest.mark.slow
def test_bad_inputs_distributed():
    run_ranks(bad_inputs, 2)


# --------------------------------------------------------------------------- gradients
def expert_grads(rank, ws):
    """Training path without replicas: expert weight grads equal a dense recompute."""
    from megatron_probe.mechanism.comm import all_gather_rows

    init_ep(ws)
    torch.manual_seed(3)
    cfg = moe_config(ws, E=8)
    layer = probe_layer(cfg, R=2)
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
    assert err < 1e-5, ("max expert grad error", err)
    assert x.grad is not None and bool(torch.isfinite(x.grad).all()), x.grad


@pytest.mark.slow
def test_expert_gradients():
    run_ranks(expert_grads, 2)


# --------------------------------------------------------------------------- piggybacked counts
def piggybacked_counts(rank, ws):
    """Counts carried by a dispatch's own exchange (``extra_counts``) arrive as exactly the matrix
    a separate all-gather gathers, and change nothing else: same true counts, same output."""
    from megatron_probe.mechanism.count_exchange import gather_counts_async

    init_ep(ws)
    torch.manual_seed(3)
    cfg = moe_config(ws)
    layer = probe_layer(cfg, 0).eval()
    x = torch.randn(7 + rank, 1, cfg.hidden_size, generator=torch.Generator().manual_seed(rank))
    with torch.no_grad():
        ref, _ = layer(x)
        ref_counts = layer.token_dispatcher.last_counts.clone()
        extra = torch.randint(0, 1000, (2 * cfg.num_moe_experts,), generator=torch.Generator().manual_seed(9 + rank))
        separate = gather_counts_async(extra, None if ws == 1 else layer.token_dispatcher.ep_group).wait()
        layer.token_dispatcher.extra_counts = extra
        out, _ = layer(x)
        d = layer.token_dispatcher
        assert torch.equal(out, ref), f"rank {rank}: output changed by the piggybacked counts"
        assert torch.equal(d.last_counts, ref_counts), (d.last_counts, ref_counts)
        assert torch.equal(d.last_extra, separate.cpu()), (d.last_extra, separate)
        assert d.extra_counts is None  # used once
        layer(x)
        assert d.last_extra is None


@pytest.mark.parametrize("ws", [2, 4])
def test_piggybacked_counts_equal_a_separate_all_gather(ws):
    run_ranks(piggybacked_counts, ws)
