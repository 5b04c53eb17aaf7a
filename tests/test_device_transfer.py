"""Copy transports other than the host-thread send/recv (mechanism.peer_memory,
mechanism.device_transfer) on gloo ranks: memory every rank reads, pull copies that stop while
paused and arrive bit-exact with the home rank taking no part, the side-stream engine's op
matching (run at submit on CPU), and the live pipeline's output unchanged with each transport."""

import glob
import os
import time

import pytest
import torch
import torch.distributed as dist

from distributed import run_ranks
from test_pipeline import pipeline_resident, pipeline_streamed_reload
from test_transfer_engine import _payload, _transfer_plan


def peer_memory_worker(rank, ws):
    """Every rank writes its own tensor, reads every peer's, and sees a peer's later in-place
    write; the shared files' names are gone once allocated; mismatched shapes are refused by
    name on every rank."""
    from megatron_probe.mechanism.peer_memory import _shm_dir, peer_tensors

    local, peers = peer_tensors((3, 5), torch.bfloat16, torch.device("cpu"), dist.group.WORLD)
    assert len(peers) == ws and peers[rank] is local, (rank, len(peers))
    local.copy_(torch.arange(15, dtype=torch.bfloat16).view(3, 5) + 100 * rank)
    dist.barrier()
    for r, t in enumerate(peers):
        want = torch.arange(15, dtype=torch.bfloat16).view(3, 5) + 100 * r
        assert torch.equal(t, want), (rank, r, t)
    dist.barrier()
    if rank == 0:
        local.mul_(2)  # in place: every peer reads the new values
    dist.barrier()
    assert torch.equal(peers[0], 2 * torch.arange(15, dtype=torch.bfloat16).view(3, 5)), (rank, peers[0])
    if _shm_dir() == "/dev/shm":  # tmpfs refuses at once a reservation larger than it is
        err = None
        try:
            peer_tensors((1 << 40,), torch.float32, torch.device("cpu"), dist.group.WORLD)  # 4 TiB
        except ValueError as e:
            err = str(e)
        assert err is not None and "cannot reserve 4194304.0 MiB" in err and all(
            f"rank {r}:" in err for r in range(ws)), (rank, err)
    left = glob.glob(os.path.join(_shm_dir(), f"megatron_probe_peer_{os.getpid()}_*"))
    assert not left, (rank, left)
    try:
        peer_tensors((4 + rank,), torch.float32, torch.device("cpu"), dist.group.WORLD)
        err = None
    except ValueError as e:
        err = str(e)
    assert err is not None and "same shape" in err and "(4,)" in err and "(5,)" in err, (rank, err)


def test_peer_memory_is_read_by_every_rank():
    run_ranks(peer_memory_worker, 2)


def _pull_sources(ops, shapes, rank):
    """Every copy's source in peer memory on its home rank (collective: every rank allocates every
    op's rows, in the same order; only the home writes them): the sources this rank pulls (the
    home's rows as read from here) and zeroed destinations."""
    from megatron_probe.mechanism.peer_memory import peer_tensors

    src, dst = [], []
    for i, op in enumerate(ops):
        srcs = []
        for p, s in enumerate(shapes[i]):
            local, peers = peer_tensors(s, torch.float32, torch.device("cpu"), dist.group.WORLD)
            if op.src == rank:
                local.copy_(_payload(i, s, p))
            srcs.append(peers[op.src])
        src.append(srcs if op.dst == rank else None)
        dst.append([torch.zeros(s) for s in shapes[i]] if op.dst == rank else None)
    dist.barrier()  # the sources are written
    return src, dst


def pull_engine_worker(rank, ws):
    """``peer_memory`` on CPU: copies pulled out of the home ranks' shared rows by the receiver's
    worker, chunk by chunk; paused, nothing moves; resumed, everything arrives bit-exact; no chunk
    inside a pause window (event log); a rank that only sends has nothing to do; a pull without
    its source is refused by name."""
    from megatron_probe.mechanism.device_transfer import PullCopyEngine
    from megatron_probe.mechanism.event_log import CHUNK_KINDS, EventLog, now_ns, overlapping
    from megatron_probe.mechanism.transfer import CopyOp

    log = EventLog(rank)
    engine = PullCopyEngine(dist.group.WORLD, chunk_bytes=64, event_log=log)
    assert engine.pulls
    for rnd in range(3):
        ops, shapes = _transfer_plan(ws, seed=rnd)
        src, dst = _pull_sources(ops, shapes, rank)
        receives = any(op.dst == rank for op in ops)
        engine.pause()
        t_paused = now_ns()
        batch = engine.submit(ops, src, dst)
        finished_while_paused = batch.wait(timeout=0.2)
        log.record("paused", None, t_paused, now_ns())
        engine.resume()
        if rnd == 2:  # pauses in the middle of the copies
            for _ in range(3):
                engine.pause()
                t_paused = now_ns()
                time.sleep(0.01)
                log.record("paused", None, t_paused, now_ns())
                engine.resume()
        assert batch.wait(timeout=60), (rank, rnd)
        assert not (receives and finished_while_paused), (rank, rnd, "copies moved while paused")
        for i, op in enumerate(ops):
            if op.dst == rank:
                for p, s in enumerate(shapes[i]):
                    assert torch.equal(dst[i][p], _payload(i, s, p)), (rank, rnd, i, p)
        want = sum(4 * torch.Size(s).numel() for i, op in enumerate(ops) if op.dst == rank for s in shapes[i])
        assert batch.bytes_moved == want, (rank, rnd, batch.bytes_moved, want)
        dist.barrier()
    err = None
    try:
        engine.submit([CopyOp((rank + 1) % ws, rank)], [None], [[torch.zeros(3)]])
    except ValueError as e:
        err = str(e)
    assert err is not None and "no source" in err, err
    engine.close()
    events = log.events()
    inside = overlapping(events, CHUNK_KINDS, ("paused",))
    assert not inside, (rank, inside)
    assert sum(e["kind"] in CHUNK_KINDS for e in events) == engine.chunks_moved > 0, (rank, engine.chunks_moved)


@pytest.mark.parametrize("ws", [2, 4])
def test_pull_copies_pause_and_arrive_exact(ws):
    run_ranks(pull_engine_worker, ws)


def stream_engine_worker(rank, ws, pull):
    """The side-stream engine's copies on CPU (run at submit; gloo send/recv for ``pull=False``):
    bit-exact, every rank walking the same op list, ranks with no part untouched; on CPU nothing
    is left outstanding for a pause to wait for."""
    from megatron_probe.mechanism.device_transfer import StreamCopyEngine

    engine = StreamCopyEngine(dist.group.WORLD, pull=pull)
    for rnd in range(2):
        ops, shapes = _transfer_plan(ws, n_ops=12, seed=10 + rnd)
        if pull:
            src, dst = _pull_sources(ops, shapes, rank)
        else:
            src = [[_payload(i, s, p) for p, s in enumerate(shapes[i])] if op.src == rank else None
                   for i, op in enumerate(ops)]
            dst = [[torch.zeros(s) for s in shapes[i]] if op.dst == rank else None for i, op in enumerate(ops)]
        batch = engine.submit(ops, src, dst)
        mine = [i for i, op in enumerate(ops) if op.dst == rank]
        assert batch.wait_ops(mine, timeout=0) == [True] * len(mine), (rank, rnd)
        assert engine.outstanding == 0, (rank, engine.outstanding)
        engine.pause()
        engine.resume()
        for i in mine:
            for p, s in enumerate(shapes[i]):
                assert torch.equal(dst[i][p], _payload(i, s, p)), (rank, rnd, i, p, pull)
        dist.barrier()
    engine.close()
    err = None
    try:
        engine.submit([], [], [])
    except RuntimeError as e:
        err = str(e)
    assert err is not None and "closed" in err, err


@pytest.mark.parametrize("pull", [False, True], ids=["nccl_variant_on_gloo", "pull"])
def test_stream_engine_copies_are_exact_on_cpu(pull):
    run_ranks(stream_engine_worker, 2, pull)


def test_copy_transport_is_validated():
    from megatron_probe import ProbeConfig

    for t in ("p2p", "peer_memory", "stream"):
        assert ProbeConfig(copy_transport=t).copy_transport == t
    with pytest.raises(ValueError, match="copy_transport='nvlink'; valid: p2p, peer_memory, stream"):
        ProbeConfig(copy_transport="nvlink")


@pytest.mark.slow
@pytest.mark.parametrize("transport", ["peer_memory", "stream"])
@pytest.mark.parametrize("ws", [2, 4])
def test_resident_replicas_keep_the_output_with_each_copy_transport(ws, transport):
    """The resident pipeline's checks (output equal to the plain model at every step while
    slots change, no stale slot after the weights change in place) with the other transports."""
    run_ranks(pipeline_resident, ws, transport)


@pytest.mark.parametrize("transport", ["peer_memory", "stream"])
def test_streamed_replicas_keep_the_output_with_each_copy_transport(transport):
    run_ranks(pipeline_streamed_reload, 2, transport)


def test_gpu_check_copy_step_dry_run(tmp_path):
    """The GPU check's copy step runs its CPU part (the pull engine's ordering check and copy
    timing on shared memory) as written."""
    import json
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = ("import sys, json, torch, gpu_check; "
            f"r = gpu_check.copy_paths(torch.device('cpu'), True, {str(tmp_path)!r}); "
            "sys.exit(0 if 'error' not in r else r['error'])")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.join(root, "tools"), root]))
    done = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.load(open(tmp_path / "copies_1gpu.json"))
    rows = out["rows"]
    assert len(rows) == 1 and rows[0]["ordered_copy_exact"] is True and rows[0]["copy_gb_s"] > 0, out
    assert "NCCL" in out["not_measured"], out  # the report says what one device cannot measure


def reload_without_sync_worker(rank, ws):
    """Pull copies after a weight load that the ranks finish at different times, with no
    collective of the model's in between: rank 0 (home of layer 0's hot expert) is still loading
    when the others start the next forward and plan layer 0's copies out of its rows. The step's barrier makes them wait,
    so the output equals the plain model's with the new weights."""
    from megatron_probe import ProbeConfig
    from megatron_probe.experiments.tiny_moe import forward_logits
    from megatron_probe.runtime.model_walk import moe_layers
    from megatron_probe.runtime.pipeline import LookaheadPipeline
    from test_pipeline import _skewed_gpt

    model, _, _, unit_cost = _skewed_gpt(rank, ws, num_layers=2)
    b = torch.randint(0, 6, (1, 30 + 2 * rank), generator=torch.Generator().manual_seed(5 + rank))
    # layer 0 planned from its previous counts at the forward's start, before any collective
    pcfg = ProbeConfig(replica_slots_per_rank=2, replica_mode="streamed", predictor_hidden=8, cost_gate=False,
                       transfer_chunk_mib=0.001, prefetch_deadline_ms=10_000.0, copy_transport="peer_memory")
    pipe = LookaheadPipeline(model, pcfg, cost=unit_cost)
    assert pipe.runtime is not None and pipe.runtime.forecasts(0), rank
    with torch.inference_mode():
        for _ in range(2):
            forward_logits(model, b)
            pipe.end_step()
        if rank == 0:  # home of layer 0's hot expert: still loading while the others pull it
            time.sleep(1.0)
        for m in moe_layers(model):
            m.expert_bank.fc1.mul_(1.05)
            m.expert_bank.fc2.mul_(0.97)
        got = forward_logits(model, b)
        pipe.end_step()
        copies = sum(r["copies"] for r in pipe.history if r["step"] == 2 and r["layer"] == 0)
        pipe.activate(False)
        want = forward_logits(model, b)
    pipe.close()
    diff = float((got - want).abs().max())
    assert copies > 0, (rank, "no copy after the load", pipe.history)
    assert diff <= 1e-5 * float(want.abs().max()), (rank, "a replica of the old weights was used", diff)


def test_pull_copies_wait_for_every_rank_to_finish_loading():
    run_ranks(reload_without_sync_worker, 2)


def peer_bank_worker(rank, ws):
    """``ExpertBank.use_peer_memory``: the state dict and the output unchanged; ``remote_rows``
    reads the home rank's natives; weights loaded in place stay visible to peers; a dtype change
    afterwards is refused by name (peer rows cannot change)."""
    from megatron_probe.runtime.model_walk import moe_layers
    from megatron_probe.experiments.tiny_moe import forward_logits
    from test_pipeline import _skewed_gpt

    model, batches, refs, _ = _skewed_gpt(rank, ws, num_layers=2)
    before = {k: v.clone() for k, v in model.state_dict().items() if torch.is_tensor(v)}
    banks = [m.expert_bank for m in moe_layers(model)]
    for bank in banks:
        bank.use_peer_memory()
    after = model.state_dict()
    assert set(after) >= set(before) and all(torch.equal(after[k], v) for k, v in before.items()), rank
    with torch.no_grad():
        assert torch.equal(forward_logits(model, batches[0]), refs[0]), rank
    L = banks[0].layout.num_local_experts
    mine = [torch.stack([bank.fc1[j].flatten() for j in range(L)]) for bank in banks]
    gathered = [[torch.zeros_like(t) for _ in range(ws)] for t in mine]
    for t, out in zip(mine, gathered):
        dist.all_gather(out, t)
    for bank, out in zip(banks, gathered):
        for e in range(L * ws):
            assert torch.equal(bank.remote_rows(e)[0].flatten(), out[e // L][e % L]), (rank, e)
    dist.barrier()  # every rank done reading before anyone writes
    with torch.no_grad():
        banks[0].fc1.add_(1.0)  # in place, on every rank
    dist.barrier()
    home = (rank + 1) % ws
    want = (gathered[0][home][0] + 1.0).view_as(banks[0].fc1[0])  # its first native expert, +1
    assert torch.equal(banks[0].remote_rows(home * L)[0], want), rank
    model.half()
    err = None
    try:
        banks[0].weights(differentiable=False)
    except ValueError as e:
        err = str(e)
    assert err is not None and "peer memory" in err and "torch.float16" in err, (rank, err)


def test_bank_natives_in_peer_memory():
    run_ranks(peer_bank_worker, 2)
