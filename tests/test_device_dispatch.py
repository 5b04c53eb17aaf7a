"""The EP 1 dispatch that never reads a tensor back to the host (what a CUDA graph needs): the
same pairs as Megatron's ``permute``, the same layer output as the host path and the stock layer,
and, run on meta tensors (which hold no data, so any host read raises), no host read at all."""

import pytest
import torch

from distributed import init_ep, moe_config, probe_layer, run_ranks


def _routing(kind: str, gen: torch.Generator, tokens: int, E: int, K: int) -> torch.Tensor:
    """``[tokens, E]`` bool with exactly K experts per row."""
    if kind == "random":
        idx = torch.rand(tokens, E, generator=gen).topk(K, dim=1).indices
    elif kind == "one_set":  # every token picks the same K experts: the others get nothing
        idx = torch.arange(E - K, E).expand(tokens, K)
    else:  # "last_first": the top-k listed from the highest expert down (order must not matter)
        idx = torch.stack([torch.randperm(E, generator=gen)[:K].sort(descending=True).values for _ in range(tokens)]) \
            if tokens else torch.zeros(0, K, dtype=torch.long)
    rm = torch.zeros(tokens, E, dtype=torch.bool)
    rm.scatter_(1, idx, True)
    return rm


def dispatcher_matches_permute(rank, ws):
    from megatron.core.transformer.moe.moe_utils import permute, unpermute

    init_ep(1)
    gen = torch.Generator().manual_seed(5)
    for K in (1, 2, 3):
        cfg = moe_config(1, E=8, K=K, moe_router_pre_softmax=K == 1)
        d = probe_layer(cfg, 0).token_dispatcher
        for kind in ("random", "one_set", "last_first"):
            for tokens in (0, 1, 2, 7, 33):
                rm = _routing(kind, gen, tokens, 8, K)
                hidden = torch.randn(tokens, cfg.hidden_size, generator=gen)
                probs = torch.rand(tokens, 8, generator=gen) * rm
                assert d._stays_on_device(), "a plain EP 1 dispatcher takes the device path"
                rows, prow = d.dispatch_preprocess(hidden, rm, probs)
                ref_rows, ref_probs, ref_index = permute(hidden, rm, probs=probs, num_out_tokens=tokens * K,
                                                         fused=False)
                case = (K, kind, tokens)
                assert torch.equal(rows, ref_rows) and torch.equal(prow, ref_probs), case
                assert torch.equal(d.reversed_mapping, ref_index), (case, d.reversed_mapping, ref_index)
                assert d.send_order is None, case
                assert torch.equal(d.last_counts, rm.sum(0).long().unsqueeze(0)), (case, d.last_counts)
                assert torch.equal(d.last_assignment, d.last_counts.unsqueeze(-1)), case
                # the way back: experts that return their input give each token K times itself
                out, out_probs = d.token_dispatch(rows, prow)
                x, tokens_per_slot, _ = d.dispatch_postprocess(out, out_probs)
                assert torch.equal(tokens_per_slot, rm.sum(0).long()), (case, tokens_per_slot)
                back = d.combine_postprocess(d.token_combine(d.combine_preprocess(x)))
                want = unpermute(ref_rows, ref_index, restore_shape=hidden.shape, routing_map=rm, fused=False)
                assert torch.equal(back, want), (case, (back - want).abs().max())
        # a routing map the dropless count does not fit is refused by name, not mis-sized
        bad = _routing("random", gen, 5, 8, K)
        bad[3] = False
        bad[3, : K + 1] = True
        with pytest.raises(ValueError, match=f"row 3 selects {K + 1} experts"):
            d.dispatch_preprocess(torch.randn(5, cfg.hidden_size), bad, torch.rand(5, 8))


def test_device_dispatch_gives_megatrons_permutation():
    run_ranks(dispatcher_matches_permute, 1)


def _host_path(layer):
    """Install an assignment source, which sends the dispatch through the host path."""
    from megatron_probe.policy.placement import assignment_from_placement

    layer.token_dispatcher.assignment_fn = lambda c, p, lay: assignment_from_placement(c, p, lay, "locality_even")


def layer_output_and_host_reads(rank, ws):
    from test_layer import _stock_layer

    init_ep(1)
    gen = torch.Generator().manual_seed(11)
    for dtype in (torch.float32, torch.bfloat16):
        for backend in ("loop", "grouped_mm"):
            for K in (2, 4):
                cfg = moe_config(1, E=8, K=K, dtype=dtype, bf16=dtype == torch.bfloat16)
                torch.manual_seed(K)
                device_layer = probe_layer(cfg, 0, backend).to(dtype).eval()
                host_layer = probe_layer(cfg, 0, backend).to(dtype).eval()
                host_layer.load_state_dict(device_layer.state_dict())
                _host_path(host_layer)
                stock = _stock_layer(cfg).to(dtype).eval()
                stock.load_state_dict(device_layer.state_dict())
                for tokens in (1, 3, 64):
                    x = torch.randn(tokens, 1, cfg.hidden_size, generator=gen).to(dtype)
                    with torch.no_grad():
                        out = device_layer(x)[0]
                        host = host_layer(x)[0]
                        ref = stock(x)[0]
                    case = (str(dtype), backend, K, tokens)
                    assert device_layer.token_dispatcher._stays_on_device(), case
                    assert not host_layer.token_dispatcher._stays_on_device(), case
                    assert torch.equal(out, host), (case, (out - host).abs().max())
                    assert torch.equal(out, ref), (case, (out - ref).abs().max())

    # meta tensors hold no data: reading one on the host raises, so a forward that completes on
    # them reads nothing back (torch._grouped_mm's meta check wants bf16, as on a GPU)
    cfg = moe_config(1, E=8, K=2, dtype=torch.bfloat16, bf16=True)
    x = torch.randn(4, 2, cfg.hidden_size, dtype=torch.bfloat16, device="meta")

    def on_meta(backend):
        layer = probe_layer(cfg, 0, backend).to(torch.bfloat16).eval()
        layer(torch.randn(4, 2, cfg.hidden_size, dtype=torch.bfloat16))  # resolves the backend on the CPU
        return layer.to("meta")

    with torch.no_grad():
        out = on_meta("grouped_mm")(x)[0]
        assert out.shape == x.shape and out.device.type == "meta", (out.shape, out.device)
        # the probe catches a host read: the host path and the loop backend both read sizes
        host = on_meta("grouped_mm")
        _host_path(host)
        with pytest.raises(NotImplementedError, match="meta"):
            host(x)
        with pytest.raises((NotImplementedError, RuntimeError), match="meta"):
            on_meta("loop")(x)


def test_device_dispatch_layer_output_and_no_host_read():
    run_ranks(layer_output_and_host_reads, 1)


def test_gpu_check_graph_step_dry_run(tmp_path):
    """The GPU check's capture step runs its CPU part (the meta-tensor forward) as written."""
    import json
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = ("import sys, torch, gpu_check; "
            f"gpu_check.graph_layer(torch.device('cpu'), True, {str(tmp_path)!r})")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.join(root, "tools"), root]))
    done = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.load(open(tmp_path / "graph_ep1.json"))
    assert [r["tokens"] for r in rows] == [1, 8], rows
    assert all(r["host_reads"] == "none (meta tensors)" and r["eager_twice_max_abs"] == 0.0 for r in rows), rows
