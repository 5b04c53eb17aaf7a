"""The transfer engine (mechanism.transfer) over gloo: chunked copies that stop while paused,
arrive bit-exact once resumed, and never move a chunk inside a pause window."""

import dataclasses
import time

import pytest
import torch
import torch.distributed as dist

from distributed import run_ranks


def _transfer_plan(ws, n_ops=10, seed=0):
    """The same random copy plan on every rank: ops, shapes, and the value each copy carries."""
    from megatron_probe.mechanism.transfer import CopyOp

    gen = torch.Generator().manual_seed(seed)
    ops, shapes = [], []
    for i in range(n_ops):
        src = int(torch.randint(ws, (1,), generator=gen))
        dst = (src + 1 + int(torch.randint(ws - 1, (1,), generator=gen))) % ws
        ops.append(CopyOp(src, dst, key=("expert", i)))
        shapes.append([(int(torch.randint(1, 9, (1,), generator=gen)), 33),
                       (int(torch.randint(1, 200, (1,), generator=gen)),)])
    return ops, shapes


def _payload(i, shape, part):
    n = 1
    for d in shape:
        n *= d
    return (torch.arange(n, dtype=torch.float32) * 0.5 + 1000 * i + 100 * part).reshape(shape)


@dataclasses.dataclass
class _Round:
    """What one round of copies did on this rank."""

    round: int
    involved: bool  # this rank sends or receives at least one copy
    finished_while_paused: bool
    done: bool
    exact: bool
    bytes_moved: int
    expected_bytes: int
    all_flags: bool


def transfer_engine(rank, ws):
    """Chunked copies on a dedicated gloo group while the main thread runs collectives: paused
    nothing moves, resumed everything arrives bit-exact, in any pause pattern, without a hang.
    The engine's event log shows no chunk of this rank inside any window from ``pause()``
    returning to ``resume()`` being called. Checked once the engine is closed."""
    from megatron_probe.mechanism.event_log import CHUNK_KINDS, EventLog, now_ns, overlapping
    from megatron_probe.mechanism.transfer import CopyOp, TransferEngine

    log = EventLog(rank)
    engine = TransferEngine.create(chunk_bytes=256, event_log=log)
    rounds = []

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
        rounds.append(_Round(rnd, involved, finished_while_paused, done, exact, batch.bytes_moved, expected_bytes,
                             all(batch.completed())))
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
    for r in rounds:
        assert r.done and r.exact and r.bytes_moved == r.expected_bytes and r.all_flags, (rank, r)
        if r.involved:
            assert not r.finished_while_paused, (rank, r)  # paused: no chunk moved
    # pause() returns only once no chunk moves: none inside any pause window
    pause_windows = sum(e["kind"] == "paused" for e in events)
    chunks_in_pause = overlapping(events, CHUNK_KINDS, ("paused",))
    assert pause_windows == 6 and not chunks_in_pause, (rank, pause_windows, chunks_in_pause)
    chunks_logged = sum(e["kind"] in CHUNK_KINDS for e in events)
    assert chunks_logged == engine.chunks_moved, (rank, chunks_logged, engine.chunks_moved)
    assert "same source and destination" in (errors["same_rank"] or ""), errors
    assert "given no tensors" in (errors["no_tensors"] or ""), errors
    assert "contiguous" in (errors["non_contiguous"] or ""), errors


@pytest.mark.slow
@pytest.mark.parametrize("ws", [2, 4])
def test_transfer_engine_chunks_pause_and_arrive_exact(ws):
    run_ranks(transfer_engine, ws)
