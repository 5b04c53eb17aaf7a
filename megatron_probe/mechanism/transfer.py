"""Chunked, pausable expert-weight transfers between EP ranks, off the main thread.

The PROBE scheduler copies replica weights while the main stream computes, in two phases that
must never overlap an All-to-All. :class:`TransferEngine` gives it the knobs: copies are cut into
chunks of ``chunk_bytes``; a background worker moves one chunk at a time with point-to-point
send/recv on a **dedicated process group** (so they never queue behind, or in front of, the
main group's collectives); :meth:`TransferEngine.pause` stops it between two chunks and
:meth:`TransferEngine.resume` lets it go on.

Every rank submits the *same* ordered list of copies (all ranks plan identically) and the worker
walks its own copies in that global order. That makes progress certain: the earliest unfinished
copy always has both of its ranks at it, so a pause only delays, never deadlocks. A copy that
misses the scheduler's deadline is simply not used by the layer; it still completes in the
background, and the slot it writes is not reused before :meth:`TransferBatch.wait` returns.

CPU: gloo send/recv from the worker thread. GPU: NCCL send/recv on the dedicated group, issued
from the worker on its own CUDA stream (a device tensor on a gloo group is staged through host
memory).
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass
from typing import Hashable, List, Optional, Sequence

import torch
import torch.distributed as dist

from megatron_probe.mechanism.comm import global_rank, group_rank, needs_host_staging


@dataclass(frozen=True)
class CopyOp:
    """Copy ``key`` (e.g. ``(layer, expert, slot)``) from group rank ``src`` to group rank ``dst``."""

    src: int
    dst: int
    key: Hashable = None


def _chunks(tensors: Sequence[torch.Tensor], chunk_bytes: int):
    """``(tensor index, flat start, flat end)`` element ranges of at most ``chunk_bytes`` each."""
    out = []
    for i, t in enumerate(tensors):
        step = max(1, chunk_bytes // t.element_size())
        n = t.numel()
        out += [(i, s, min(n, s + step)) for s in range(0, n, step)]
    return out


class TransferBatch:
    """The copies of one :meth:`TransferEngine.submit` call, as seen by this rank."""

    def __init__(self, ops: List[CopyOp], mine: List[int]):
        self.ops = ops
        self._events = {i: threading.Event() for i in mine}
        self.bytes_moved = 0
        self.chunks_moved = 0
        self.error: Optional[BaseException] = None
        self.started_at: Optional[float] = None
        self.finished_at: Optional[float] = None

    def op_done(self, i: int) -> bool:
        """Has this rank finished its side of copy ``i`` (always True for copies not involving it)?"""
        ev = self._events.get(i)
        return ev is None or ev.is_set()

    def wait_ops(self, indices: Sequence[int], timeout: Optional[float] = None) -> List[bool]:
        """Wait up to ``timeout`` seconds in total for these copies; which are done."""
        end = None if timeout is None else time.monotonic() + timeout
        for i in indices:
            ev = self._events.get(i)
            if ev is not None:
                ev.wait(None if end is None else max(0.0, end - time.monotonic()))
        if self.error is not None:
            raise RuntimeError(f"expert transfer failed: {self.error}") from self.error
        return [self.op_done(i) for i in indices]

    def completed(self) -> List[bool]:
        return [self.op_done(i) for i in range(len(self.ops))]

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Wait for every copy involving this rank; False if ``timeout`` seconds pass first."""
        end = None if timeout is None else time.monotonic() + timeout
        for ev in self._events.values():
            left = None if end is None else max(0.0, end - time.monotonic())
            if not ev.wait(left):
                return False
        if self.error is not None:
            raise RuntimeError(f"expert transfer failed: {self.error}") from self.error
        return True


class TransferEngine:
    def __init__(self, group, chunk_bytes: int = 1 << 20, device: Optional[torch.device] = None):
        if chunk_bytes <= 0:
            raise ValueError(f"chunk_bytes={chunk_bytes} must be positive")
        self.group = group
        self.rank = group_rank(group)
        self.chunk_bytes = int(chunk_bytes)
        self._queue: "queue.Queue" = queue.Queue()
        self._running = threading.Event()
        self._running.set()
        self._idle = threading.Event()
        self._idle.set()
        self._closed = False
        self._stream = torch.cuda.Stream(device=device) if device is not None and device.type == "cuda" else None
        self.paused_seconds = 0.0
        self._thread = threading.Thread(target=self._work, name="probe-transfer", daemon=True)
        self._thread.start()

    @classmethod
    def create(cls, ranks: Optional[List[int]] = None, backend: Optional[str] = None, **kw) -> "TransferEngine":
        """A dedicated process group over ``ranks`` (default: all) and an engine on it. Collective:
        every rank of the default group must call it, in the same order."""
        group = dist.new_group(ranks=ranks, backend=backend)
        return cls(group, **kw)

    # ------------------------------------------------------------------ control
    def pause(self) -> None:
        """Stop between two chunks (returns at once; a chunk in flight finishes)."""
        self._running.clear()

    def resume(self) -> None:
        self._running.set()

    @property
    def paused(self) -> bool:
        return not self._running.is_set()

    def drain(self, timeout: Optional[float] = None) -> bool:
        """Wait until every submitted batch is done (resumes first)."""
        self.resume()
        return self._idle.wait(timeout)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.resume()
            self._queue.put(None)
            self._thread.join()

    # ------------------------------------------------------------------ work
    def submit(self, ops: Sequence[CopyOp], src_tensors: Sequence[Optional[Sequence[torch.Tensor]]],
               dst_tensors: Sequence[Optional[Sequence[torch.Tensor]]]) -> TransferBatch:
        """Queue ``ops`` (the same list on every rank). For each op this rank sends, ``src_tensors[i]``
        holds the contiguous tensors to send; for each op it receives, ``dst_tensors[i]`` the
        contiguous tensors (same shapes and dtypes) to fill. Entries of other ranks' ops are ignored."""
        if self._closed:
            raise RuntimeError("transfer engine is closed")
        ops = list(ops)
        if len(src_tensors) != len(ops) or len(dst_tensors) != len(ops):
            raise ValueError(f"{len(ops)} ops but {len(src_tensors)} source and {len(dst_tensors)} destination entries")
        work, mine = [], []
        for i, op in enumerate(ops):
            if op.src == op.dst:
                raise ValueError(f"copy {i} ({op}) has the same source and destination rank")
            if op.src == self.rank or op.dst == self.rank:
                tensors = src_tensors[i] if op.src == self.rank else dst_tensors[i]
                if not tensors:
                    role = "sends" if op.src == self.rank else "receives"
                    raise ValueError(f"rank {self.rank} {role} copy {i} ({op}) but was given no tensors for it")
                for t in tensors:
                    if not t.is_contiguous():
                        raise ValueError(f"copy {i} ({op}): tensors must be contiguous")
                work.append((i, op, list(tensors)))
                mine.append(i)
        batch = TransferBatch(ops, mine)
        if work:
            self._idle.clear()
            self._queue.put((batch, work))
        return batch

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            batch, work = item
            batch.started_at = time.monotonic()
            try:
                if self._stream is not None:
                    with torch.cuda.stream(self._stream):
                        self._run(batch, work)
                else:
                    self._run(batch, work)
            except BaseException as e:  # surfaced by TransferBatch.wait
                batch.error = e
                for ev in batch._events.values():
                    ev.set()
            batch.finished_at = time.monotonic()
            if self._queue.empty():
                self._idle.set()

    def _run(self, batch: TransferBatch, work) -> None:
        for i, op, tensors in work:
            sending = op.src == self.rank
            peer = global_rank(self.group, op.dst if sending else op.src)
            for ti, s, e in _chunks(tensors, self.chunk_bytes):
                if not self._running.is_set():
                    t0 = time.monotonic()
                    self._running.wait()
                    self.paused_seconds += time.monotonic() - t0
                flat = tensors[ti].view(-1)[s:e]
                staged = needs_host_staging(self.group, flat)
                if sending:
                    dist.send(flat.cpu() if staged else flat, peer, group=self.group)
                else:
                    buf = torch.empty(flat.shape, dtype=flat.dtype) if staged else flat
                    dist.recv(buf, peer, group=self.group)
                    if staged:
                        flat.copy_(buf)
                batch.bytes_moved += flat.numel() * flat.element_size()
                batch.chunks_moved += 1
            if self._stream is not None:
                self._stream.synchronize()  # the copy is usable by other streams once flagged
            batch._events[i].set()
