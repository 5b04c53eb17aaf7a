"""Replica copies other than the host-thread send/recv of :mod:`~megatron_probe.mechanism.transfer`.

``ProbeConfig.copy_transport`` picks how the live pipeline moves its replica weights; every
engine has :class:`~megatron_probe.mechanism.transfer.TransferEngine`'s interface (``submit`` a
global op list, ``pause`` before an All-to-All and ``resume`` after it, batches whose copies the
agreement waits for), so the pipeline's planning, agreement and phase locking are the same:

``p2p``          :class:`TransferEngine`: chunked send/recv on a dedicated group from a worker
                 thread, paused between chunks (gloo on CPU, NCCL on GPU). Works across hosts.
``peer_memory``  pull copies: the receiving rank reads the expert out of its home rank's native
                 rows (:mod:`~megatron_probe.mechanism.peer_memory`) and writes its own slot; the
                 home rank takes no part. GPU: :class:`StreamCopyEngine` (``copy_`` on a side
                 stream, a memcpy the driver gives a copy engine, no thread; not yet run on a
                 GPU). CPU:
                 :class:`PullCopyEngine` (a worker thread copies chunk by chunk out of shared
                 memory, paused like the p2p engine, with no partner to commit with). One host.
``stream``       :class:`StreamCopyEngine` with NCCL send/recv batched on a side stream: no host
                 thread; works across hosts.

Phase locking on the device (:class:`StreamCopyEngine`): a batch's copies are issued on the side
stream behind an event recorded on the main stream at submit, so they start only after
everything the main stream issued before them (an All-to-All included, and any read of the slot
they overwrite); :meth:`StreamCopyEngine.pause`, called before an All-to-All, makes the main
stream wait for every copy issued so far. So no copy overlaps an All-to-All and nothing waits on
the host. The difference from the host engine: a copy that outgrows its window delays the
All-to-All instead of being deferred past it (the planner's slot budget sizes copies to the
window), and a copy is never late at the agreement: the layer's stream waits for its event.
Pull copies also need the home rank's writes of its natives ordered before them: the pipeline's
barrier at each step's first plan (:meth:`StreamCopyEngine.barrier`, :meth:`PullCopyEngine.barrier`).
A failed NCCL copy is not seen per copy (NCCL reports errors asynchronously, and its watchdog
tears the job down); the agreement's failure path is the host engines'.

On CPU the :class:`StreamCopyEngine` runs each batch at submit on the calling thread (no
streams; the NCCL variant uses gloo), so its op matching and the pipeline around it are tested
here; it overlaps nothing there.
"""

from __future__ import annotations

import time
from typing import List, Optional, Sequence

import torch
import torch.distributed as dist

from megatron_probe.mechanism.comm import global_rank, group_rank, needs_host_staging
from megatron_probe.mechanism.event_log import EventLog, now_ns
from megatron_probe.mechanism.transfer import (CopyOp, TransferEngine, _layer_of, checked_ops, exchanged_ops,
                                               pulled_ops)


class PullCopyEngine(TransferEngine):
    """``peer_memory`` on CPU: the worker thread copies this rank's incoming replicas chunk by
    chunk out of the home ranks' shared-memory rows; ``pause`` parks it between two chunks as the
    p2p engine's does. The home rank does nothing, so there is no commit (a chunk needs no
    partner) and a rank with nothing to receive has no work at all."""

    pulls = True

    def __init__(self, group, chunk_bytes: int = 1 << 20, device: Optional[torch.device] = None,
                 timeout_s: float = 300.0, event_log: Optional[EventLog] = None):
        # store=False: no commit store is made (a pull chunk has no partner to commit with)
        super().__init__(group, chunk_bytes=chunk_bytes, device=device, timeout_s=timeout_s,
                         store=False, event_log=event_log)
        self._store = None

    def _work_items(self, ops: List[CopyOp], src_tensors, dst_tensors) -> list:
        return pulled_ops(ops, src_tensors, dst_tensors, self.rank)

    def barrier(self) -> None:
        """Every rank's writes of its natives are done (host memory: they were done in program
        order) before any rank's next pull: a barrier on the engine's group, which pulls leave idle."""
        if self.group is not None:
            dist.barrier(group=self.group)

    def _move(self, op: CopyOp, src: torch.Tensor, dst: torch.Tensor) -> str:
        dst.copy_(src)  # the gate parks between chunks while paused; no partner to commit with
        return "recv"


class StreamBatch:
    """A :class:`StreamCopyEngine` batch: its copies are ordered on the device, so each is
    "done" for the host as soon as it is issued; :meth:`wait_ops` makes the caller's stream wait
    for them (the layer that reads the slots then runs after the copies)."""

    def __init__(self, ops: List[CopyOp], seq: int, done_event=None):
        self.ops = ops
        self.seq = seq
        self.error: Optional[BaseException] = None
        self.bytes_moved = 0
        self.chunks_moved = 0
        self.started_at = self.finished_at = time.monotonic()
        self._done = done_event  # CUDA event after this batch's copies (None on CPU: done at submit)

    def _order_after(self) -> None:
        if self._done is not None:
            torch.cuda.current_stream().wait_event(self._done)

    def op_done(self, i: int) -> bool:
        return True

    def op_failed(self, i: int) -> bool:
        return False

    def wait_ops(self, indices: Sequence[int], timeout: Optional[float] = None) -> List[bool]:
        self._order_after()
        return [True for _ in indices]

    def completed(self) -> List[bool]:
        return [True] * len(self.ops)

    def wait(self, timeout: Optional[float] = None, raise_error: bool = True) -> bool:
        if self._done is not None:
            self._done.synchronize()
        return True


class StreamCopyEngine:
    """``stream`` (``pull=False``: NCCL send/recv batched on a side stream, the sender takes part)
    and ``peer_memory`` on GPU (``pull=True``: ``copy_`` of the home rank's symmetric-memory rows on
    a side stream). No worker thread: see the module's docstring for how the copies are ordered
    against the All-to-All. On CPU a batch runs at submit (gloo for ``pull=False``)."""

    def __init__(self, group, pull: bool, device: Optional[torch.device] = None, timeout_s: float = 300.0,
                 event_log: Optional[EventLog] = None):
        self.group = group
        self.rank = group_rank(group)
        self.pulls = bool(pull)
        self.timeout_s = float(timeout_s)
        self.event_log = event_log
        self.device = device if device is not None else torch.device("cpu")
        self.fault = None  # the host engines' test hook; device copies have no per-chunk hook
        self.broken: Optional[str] = None
        self.paused_seconds = 0.0
        self.pause_wait_seconds = 0.0  # host time in pause(): on the device this is enqueueing a wait
        self.chunks_moved = 0
        self.bytes_moved = 0
        self._seq = 0
        self._closed = False
        self._unfenced = 0  # batches issued since the main stream last waited for the copies
        self._cuda = self.device.type == "cuda"
        self.orders_on_device = self._cuda
        self._stream = torch.cuda.Stream(device=self.device) if self._cuda else None
        self._last = None  # event after the last issued batch
        self._nccl = self._cuda and group is not None and "nccl" in str(dist.get_backend(group))
        if self._nccl and not self.pulls:
            # NCCL: the group's communicator is made by a call every rank joins (a first batch of
            # send/recv between two ranks only would leave it undefined)
            self.barrier()

    def barrier(self) -> None:
        """Every rank's work issued so far on its main stream (writes of its natives included)
        is done before any copy issued after this, on every rank: an all-reduce on the main stream
        with NCCL (copies wait for the main stream), else a host barrier after the device's work."""
        if self.group is None:
            return
        if self._nccl:
            dist.all_reduce(torch.zeros(1, device=self.device), group=self.group)
            return
        if self._cuda:
            torch.cuda.current_stream(self.device).synchronize()
        dist.barrier(group=self.group)

    # ------------------------------------------------------------------ control
    def pause(self) -> None:
        """Before an All-to-All: the main stream waits for every copy issued so far."""
        if self._unfenced and self._last is not None:
            t0 = time.monotonic()
            torch.cuda.current_stream(self.device).wait_event(self._last)
            self.pause_wait_seconds += time.monotonic() - t0
        self._unfenced = 0

    def resume(self) -> None:
        pass  # copies issued from now on wait for the main stream at their submit

    @property
    def outstanding(self) -> int:
        return self._unfenced

    @property
    def paused(self) -> bool:
        return False

    def drain(self, timeout: Optional[float] = None) -> bool:
        if self._stream is not None:
            self._stream.synchronize()
        self._unfenced = 0
        return True

    def close(self) -> None:
        if not self._closed:
            self.drain()
            self._closed = True

    # ------------------------------------------------------------------ work
    def submit(self, ops: Sequence[CopyOp], src_tensors, dst_tensors) -> StreamBatch:
        ops = checked_ops(self._closed, ops, src_tensors, dst_tensors)
        work = (pulled_ops if self.pulls else exchanged_ops)(ops, src_tensors, dst_tensors, self.rank)
        batch = StreamBatch(ops, self._seq)
        self._seq += 1
        if not work:
            return batch
        t0 = now_ns()
        if self._cuda:
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(self.device))
            self._stream.wait_event(ready)  # after the main stream's work so far (reads of the slots too)
            with torch.cuda.stream(self._stream):
                self._issue(work)
            done = torch.cuda.Event()
            done.record(self._stream)
            batch._done = self._last = done
            self._unfenced += 1
        else:
            self._issue(work)
        nbytes = sum(t.numel() * t.element_size() for w in work for t in w[-1])
        batch.bytes_moved = nbytes
        batch.chunks_moved = len(work)
        self.bytes_moved += nbytes
        self.chunks_moved += len(work)
        if self.event_log is not None:
            # on CPU the copies ran here (a chunk interval); on the device this is when they were
            # issued, not when they ran, so it is not a chunk kind (CUDA events order them)
            kind = ("copy_issue" if self._cuda else
                    "recv" if any(w[1].dst == self.rank for w in work) else "send")
            self.event_log.record(kind, _layer_of(ops[work[0][0]].key), t0, now_ns(), bytes=nbytes,
                                  op=work[0][0], chunk=0)
        return batch

    def _issue(self, work) -> None:
        if self.pulls:
            for _, _, src, dst in work:
                for s, d in zip(src, dst):
                    d.copy_(s, non_blocking=True)
            return
        # every rank walks the same global op list, so each pair posts its messages in one order
        p2p, staged = [], []
        for i, op, tensors, _ in work:
            sending = op.src == self.rank
            peer = global_rank(self.group, op.dst if sending else op.src)
            for t in tensors:
                if needs_host_staging(self.group, t):
                    buf = t.detach().cpu() if sending else torch.empty(t.shape, dtype=t.dtype)
                    if not sending:
                        staged.append((t, buf))
                else:
                    buf = t
                p2p.append(dist.P2POp(dist.isend if sending else dist.irecv, buf, peer, group=self.group))
        for w in dist.batch_isend_irecv(p2p):
            w.wait()  # on CUDA: the side stream waits for NCCL's, the host does not
        for t, buf in staged:
            t.copy_(buf)
