"""Chunked, pausable expert-weight transfers between EP ranks, off the main thread.

The PROBE scheduler copies replica weights while the main stream computes, in two phases that
must never overlap an All-to-All. :class:`TransferEngine` gives it the knobs: copies are cut into
chunks of ``chunk_bytes``; a background worker moves one chunk at a time with point-to-point
send/recv on a **dedicated process group** (so they never queue behind, or in front of, the
main group's collectives); :meth:`TransferEngine.pause` returns once the worker is parked
between two chunks (a chunk in flight finishes first), and :meth:`TransferEngine.resume` lets it
go on. So between ``pause()`` and ``resume()`` this rank moves no byte of any copy.

Every rank submits the *same* ordered list of copies (all ranks plan identically) and the worker
walks its own copies in that global order. That makes progress certain: the earliest unfinished
copy always has both of its ranks at it, so a pause only delays, never deadlocks. A copy that
misses the scheduler's deadline is simply not used by the layer; it still completes in the
background, and the slot it writes is not reused before :meth:`TransferBatch.wait` returns.

Why a pause can wait for the chunk in flight without a deadlock: the two ranks of a chunk first
**commit** to it together through the job's key-value store (each adds 1 to the chunk's key;
the chunk starts when the key reaches 2). A rank waiting for its partner's commit withdraws its
own (compare-and-set 1 -> 0) when a pause comes, and parks; a committed chunk has both ranks past
their pause checks, so both post their send/recv and it completes whatever the main threads do.
Without the commit, a rank could be inside a send whose partner is parked in an All-to-All that
waits for this rank: the pause would never return.

Failures: an exception while moving a chunk (or the test hook :attr:`TransferEngine.fault`)
fails the copies of this rank that had not finished, **breaks** the engine (a gloo pair that
timed out is closed, so the group is not reused) and publishes the reason in the store, where
partners waiting to commit see it and fail too. Every wait is bounded: the process group is
created with ``timeout_s`` (a partner that never posts raises), and so is the wait for a commit.

CPU: gloo send/recv from the worker thread. GPU: NCCL send/recv on the dedicated group, issued
from the worker on its own CUDA stream (a device tensor on a gloo group is staged through host
memory); there the host-side pause orders the issue of chunks, not their execution.
"""

from __future__ import annotations

import datetime
import queue
import threading
import time
from dataclasses import dataclass
from typing import Callable, Dict, Hashable, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from megatron_probe.mechanism.comm import global_rank, group_rank, group_size, needs_host_staging
from megatron_probe.mechanism.event_log import EventLog, now_ns
from megatron_probe.policy.placement import EMPTY_SLOT, ExpertLayout

BROKEN_KEY = "broken"
_ENGINES_ON_GROUP: dict = {}


@dataclass(frozen=True)
class CopyOp:
    """Copy ``key`` (e.g. ``(layer, expert, slot)``) from group rank ``src`` to group rank ``dst``."""

    src: int
    dst: int
    key: Hashable = None


@dataclass
class ReplicaCopies:
    """The weight copies that make every rank's replica slots hold a placement: ``ops`` is the
    same ordered list on every rank (rank-major, then slot); ``src[i]`` / ``dst[i]`` are the
    tensors this rank sends / fills for op ``i`` (``None`` where it takes no part); ``recv`` and
    ``send`` map ``(rank, slot)`` to the op index for the copies this rank receives / sends."""

    ops: List[CopyOp]
    src: List[Optional[List[torch.Tensor]]]
    dst: List[Optional[List[torch.Tensor]]]
    recv: Dict[Tuple[int, int], int]
    send: Dict[Tuple[int, int], int]

    @property
    def received(self) -> int:
        return len(self.recv)


def replica_copies(placement: torch.Tensor, layout: ExpertLayout, me: int,
                   unchanged: Callable[[int, int, int], bool],
                   native_rows: Callable[[int], List[torch.Tensor]],
                   slot_rows: Callable[[int], List[torch.Tensor]],
                   key: Callable[[int, int, int], Hashable] = lambda r, s, e: (r, s, e),
                   remote_rows: Optional[Callable[[int], List[torch.Tensor]]] = None) -> ReplicaCopies:
    """The one way a replica is planned to be filled (the live layer's synchronous fill and the
    pipeline's prefetch alike): for every slot ``(r, s)`` of ``placement [ep, R]`` that names an
    expert ``e`` and is not ``unchanged(r, s, e)``, a copy from ``e``'s home rank into slot ``s`` of
    rank ``r``. ``native_rows(e)``: this rank's weights of its native expert ``e``;
    ``slot_rows(s)``: this rank's tensors of replica slot ``s``. ``remote_rows(e)`` (pull copies,
    ``device_transfer``): expert ``e``'s rows on its home rank as this rank reads them; given, they
    are the source of every copy this rank receives."""
    L = layout.num_local_experts
    out = ReplicaCopies([], [], [], {}, {})
    for r in range(placement.shape[0]):
        for s in range(placement.shape[1]):
            e = int(placement[r, s])
            if e == EMPTY_SLOT or unchanged(r, s, e):
                continue
            home = e // L
            i = len(out.ops)
            if r == me:
                out.recv[(r, s)] = i
            if home == me:
                out.send[(r, s)] = i
            out.ops.append(CopyOp(home, r, key=key(r, s, e)))
            if remote_rows is not None and r == me:
                out.src.append(remote_rows(e))
            else:
                out.src.append(native_rows(e) if home == me else None)
            out.dst.append(slot_rows(s) if r == me else None)
    return out


def copy_now(copies: ReplicaCopies, group) -> None:
    """Move ``copies`` synchronously on ``group`` (every rank calls it with the same op list):
    this rank's sends and receives posted at once, returns when all are complete. The live
    layer's own fill; the pipeline moves the same copies through :class:`TransferEngine`."""
    me = group_rank(group)
    pending = []
    for i, op in enumerate(copies.ops):
        if me not in (op.src, op.dst):
            continue
        tensors = copies.src[i] if op.src == me else copies.dst[i]
        for j, t in enumerate(tensors):
            tag = 2 * i + j
            staged = needs_host_staging(group, t)
            if op.src == me:
                buf = t.detach().cpu() if staged else t.detach().contiguous()
                pending.append((dist.isend(buf, global_rank(group, op.dst), group=group, tag=tag), None, None))
            else:
                buf = torch.empty(t.shape, dtype=t.dtype) if staged else t
                pending.append((dist.irecv(buf, global_rank(group, op.src), group=group, tag=tag),
                                t if staged else None, buf))
    for work, target, buf in pending:
        work.wait()
        if target is not None:
            target.copy_(buf)


def checked_ops(closed: bool, ops: Sequence[CopyOp], src_tensors, dst_tensors) -> List[CopyOp]:
    """The op list of a ``submit``, after the checks every engine makes."""
    if closed:
        raise RuntimeError("transfer engine is closed")
    ops = list(ops)
    if len(src_tensors) != len(ops) or len(dst_tensors) != len(ops):
        raise ValueError(f"{len(ops)} ops but {len(src_tensors)} source and {len(dst_tensors)} destination entries")
    for i, op in enumerate(ops):
        if op.src == op.dst:
            raise ValueError(f"copy {i} ({op}) has the same source and destination rank")
    return ops


def _check_contiguous(i: int, op: CopyOp, tensors) -> None:
    for t in tensors:
        if not t.is_contiguous():
            raise ValueError(f"copy {i} ({op}): tensors must be contiguous")


def exchanged_ops(ops: Sequence[CopyOp], src_tensors, dst_tensors, me: int) -> list:
    """``(index, op, tensors, tensors)`` of the copies ``me`` sends (its source tensors) or receives
    (its destination tensors): both ranks of a copy take part."""
    work = []
    for i, op in enumerate(ops):
        if me not in (op.src, op.dst):
            continue
        tensors = src_tensors[i] if op.src == me else dst_tensors[i]
        if not tensors:
            role = "sends" if op.src == me else "receives"
            raise ValueError(f"rank {me} {role} copy {i} ({op}) but was given no tensors for it")
        _check_contiguous(i, op, tensors)
        work.append((i, op, list(tensors), list(tensors)))
    return work


def pulled_ops(ops: Sequence[CopyOp], src_tensors, dst_tensors, me: int) -> list:
    """``(index, op, sources, destinations)`` of the copies ``me`` receives by pulling: a pull
    copy's sources are the home rank's rows as this rank reads them
    (``replica_copies(remote_rows=...)``); the home rank has nothing to do."""
    work = []
    for i, op in enumerate(ops):
        if op.dst != me:
            continue
        src, dst = src_tensors[i], dst_tensors[i]
        if not src or not dst:
            what = "source (the home rank's rows as read from here)" if not src else "destination"
            raise ValueError(f"rank {me} pulls copy {i} ({op}) but was given no {what}")
        if len(src) != len(dst) or any(a.shape != b.shape or a.dtype != b.dtype for a, b in zip(src, dst)):
            raise ValueError(f"copy {i} ({op}): sources {[tuple(a.shape) for a in src]} do not match "
                             f"destinations {[tuple(b.shape) for b in dst]}")
        _check_contiguous(i, op, list(src) + list(dst))
        work.append((i, op, list(src), list(dst)))
    return work


def _chunks(tensors: Sequence[torch.Tensor], chunk_bytes: int):
    """``(tensor index, flat start, flat end)`` element ranges of at most ``chunk_bytes`` each."""
    out = []
    for i, t in enumerate(tensors):
        step = max(1, chunk_bytes // t.element_size())
        n = t.numel()
        out += [(i, s, min(n, s + step)) for s in range(0, n, step)]
    return out


def _layer_of(key) -> Optional[int]:
    if isinstance(key, tuple) and key and isinstance(key[0], int):
        return key[0]
    return None


class TransferBatch:
    """The copies of one :meth:`TransferEngine.submit` call, as seen by this rank."""

    def __init__(self, ops: List[CopyOp], mine: List[int], seq: int = 0):
        self.ops = ops
        self.seq = seq
        self._events = {i: threading.Event() for i in mine}
        self._failed: set = set()
        self.bytes_moved = 0
        self.chunks_moved = 0
        self.error: Optional[BaseException] = None
        self.started_at: Optional[float] = None
        self.finished_at: Optional[float] = None

    def _fail(self, error: BaseException) -> None:
        """Fail every copy of this rank that has not finished (and wake its waiters)."""
        self.error = error
        for i, ev in self._events.items():
            if not ev.is_set():
                self._failed.add(i)
                ev.set()

    def op_done(self, i: int) -> bool:
        """Has this rank finished its side of copy ``i`` (always True for copies not involving it)?
        A failed copy is not done."""
        ev = self._events.get(i)
        return ev is None or (ev.is_set() and i not in self._failed)

    def op_failed(self, i: int) -> bool:
        return i in self._failed

    def wait_ops(self, indices: Sequence[int], timeout: Optional[float] = None) -> List[bool]:
        """Wait up to ``timeout`` seconds in total for these copies; which are done (a failed
        copy counts as not done; :meth:`op_failed` tells it from a late one)."""
        end = None if timeout is None else time.monotonic() + timeout
        for i in indices:
            ev = self._events.get(i)
            if ev is not None:
                ev.wait(None if end is None else max(0.0, end - time.monotonic()))
        return [self.op_done(i) for i in indices]

    def completed(self) -> List[bool]:
        return [self.op_done(i) for i in range(len(self.ops))]

    def wait(self, timeout: Optional[float] = None, raise_error: bool = True) -> bool:
        """Wait for every copy involving this rank; False if ``timeout`` seconds pass first.
        A failed copy raises (``raise_error``) or makes the result False."""
        end = None if timeout is None else time.monotonic() + timeout
        for ev in self._events.values():
            left = None if end is None else max(0.0, end - time.monotonic())
            if not ev.wait(left):
                return False
        if self.error is not None:
            if raise_error:
                raise RuntimeError(f"expert transfer failed: {self.error}") from self.error
            return False
        return True


class TransferEngine:
    """Moves :class:`CopyOp` lists chunk by chunk on ``group`` from a worker thread.

    ``timeout_s`` bounds the wait for a partner's commit (the group's own send/recv timeout is
    set where it is created, :meth:`create`); ``store`` is where partners commit to chunks
    (default: the job's store, under a prefix of this group's name); ``event_log`` records each
    chunk's interval. :attr:`fault` is a test hook: ``fault(op_index, op, chunk_index)`` is
    called right before this rank moves a chunk (both ranks committed) and may raise.
    """

    pulls = False  # both ranks of a copy take part (``device_transfer.PullCopyEngine``: the receiver alone)
    orders_on_device = False  # copies ordered by the host (``device_transfer.StreamCopyEngine``: by CUDA events)

    def __init__(self, group, chunk_bytes: int = 1 << 20, device: Optional[torch.device] = None,
                 timeout_s: float = 300.0, store=None, event_log: Optional[EventLog] = None):
        if chunk_bytes <= 0:
            raise ValueError(f"chunk_bytes={chunk_bytes} must be positive")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s={timeout_s} must be positive")
        self.group = group
        self.rank = group_rank(group)
        self.chunk_bytes = int(chunk_bytes)
        self.timeout_s = float(timeout_s)
        if store is None and group_size(group) > 1:
            # keys unique per group and per engine on it (every rank creates its engines in the
            # same order, as it does its groups)
            name = dist.distributed_c10d._get_process_group_name(group)
            n = _ENGINES_ON_GROUP[name] = _ENGINES_ON_GROUP.get(name, 0) + 1
            store = dist.PrefixStore(f"probe_transfer/{name}/{n}/", dist.distributed_c10d._get_default_store())
        self._store = store
        self.event_log = event_log
        self.fault: Optional[Callable[[int, CopyOp, int], None]] = None
        self.broken: Optional[str] = None  # why the engine stopped moving copies
        self._queue: "queue.Queue" = queue.Queue()
        self._cv = threading.Condition()
        self._pause_req = False
        self._busy = False  # the worker is committing to, or moving, a chunk
        self._idle = threading.Event()
        self._idle.set()
        self._outstanding = 0  # batches submitted and not yet finished (changed under _cv)
        self._closed = False
        self._seq = 0
        self._stream = torch.cuda.Stream(device=device) if device is not None and device.type == "cuda" else None
        self.paused_seconds = 0.0  # the worker parked by a pause
        self.pause_wait_seconds = 0.0  # pause() waiting for a chunk in flight
        self.chunks_moved = 0
        self._thread = threading.Thread(target=self._work, name="probe-transfer", daemon=True)
        self._thread.start()

    @classmethod
    def create(cls, ranks: Optional[List[int]] = None, backend: Optional[str] = None,
               timeout_s: float = 300.0, members_only: bool = False, **kw) -> "TransferEngine":
        """A dedicated process group over ``ranks`` (default: all) whose send/recv give up after
        ``timeout_s``, and an engine on it. Collective: every rank of the default group must call
        it, in the same order; with ``members_only`` only the ranks in ``ranks`` (a re-creation
        after a failure, which the other EP groups do not share)."""
        group = dist.new_group(ranks=ranks, backend=backend, timeout=datetime.timedelta(seconds=timeout_s),
                               use_local_synchronization=members_only and ranks is not None)
        return cls(group, timeout_s=timeout_s, **kw)

    # ------------------------------------------------------------------ control
    def pause(self) -> None:
        """Return once the worker is parked between two chunks: a chunk in flight finishes first,
        a chunk not yet committed by both ranks is not started."""
        with self._cv:
            self._pause_req = True
            if self._busy:
                t0 = time.monotonic()
                while self._busy:
                    self._cv.wait()
                self.pause_wait_seconds += time.monotonic() - t0

    def resume(self) -> None:
        with self._cv:
            self._pause_req = False
            self._cv.notify_all()

    @property
    def outstanding(self) -> int:
        """Batches submitted and not yet finished (0: the worker is parked on an empty queue)."""
        return self._outstanding

    @property
    def paused(self) -> bool:
        return self._pause_req

    def drain(self, timeout: Optional[float] = None) -> bool:
        """Wait until every submitted batch is done (resumes first)."""
        self.resume()
        return self._idle.wait(timeout)

    def close(self) -> None:
        """Stop the worker. Copies still queued fail (partners waiting to commit to them see the
        engine broken); the join is bounded by the group timeout."""
        if not self._closed:
            self._closed = True
            self.resume()
            self._queue.put(None)
            self._thread.join(self.timeout_s + 5.0)

    # ------------------------------------------------------------------ work
    def submit(self, ops: Sequence[CopyOp], src_tensors: Sequence[Optional[Sequence[torch.Tensor]]],
               dst_tensors: Sequence[Optional[Sequence[torch.Tensor]]]) -> TransferBatch:
        """Queue ``ops`` (the same list on every rank, and the same sequence of submits). For each
        op this rank sends, ``src_tensors[i]`` holds the contiguous tensors to send; for each op it
        receives, ``dst_tensors[i]`` the contiguous tensors (same shapes and dtypes) to fill.
        Entries of other ranks' ops are ignored. On a broken engine the copies fail at once."""
        ops = checked_ops(self._closed, ops, src_tensors, dst_tensors)
        work = self._work_items(ops, src_tensors, dst_tensors)
        batch = TransferBatch(ops, [w[0] for w in work], self._seq)
        self._seq += 1
        if self.broken is not None:
            batch._fail(RuntimeError(f"transfer engine is broken: {self.broken}"))
        elif work:
            ready = None
            if self._stream is not None:  # the side stream writes a slot only after the main stream's
                ready = torch.cuda.Event()  # work queued so far, reads of that slot included
                ready.record(torch.cuda.current_stream(self._stream.device))
            with self._cv:
                self._outstanding += 1
                self._idle.clear()
            self._queue.put((batch, work, ready))
        return batch

    def _work_items(self, ops: List[CopyOp], src_tensors, dst_tensors) -> list:
        """``(index, op, tensors, tensors)`` of the copies this rank sends or receives."""
        return exchanged_ops(ops, src_tensors, dst_tensors, self.rank)

    def _break(self, reason: str) -> None:
        if self.broken is None:
            self.broken = reason
            try:
                self._store.set(BROKEN_KEY, reason)
            except Exception:  # the store itself may be what failed
                pass

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            batch, work, ready = item
            batch.started_at = time.monotonic()
            if self.broken is not None or self._closed:
                batch._fail(RuntimeError(f"transfer engine is {'closed' if self._closed else 'broken'}: "
                                         f"{self.broken or 'copies were pending'}"))
                if self._closed:
                    self._break(f"rank {self.rank} closed its transfer engine with copies pending")
            else:
                try:
                    if self._stream is not None:
                        with torch.cuda.stream(self._stream):
                            self._stream.wait_event(ready)
                            self._run(batch, work)
                    else:
                        self._run(batch, work)
                except BaseException as e:  # the copies fail; waiters see it through the batch
                    self._break(f"rank {self.rank}: {type(e).__name__}: {e}")
                    batch._fail(e)
            batch.finished_at = time.monotonic()
            with self._cv:  # idle only once every submitted batch is done (a submit may race this)
                self._outstanding -= 1
                if self._outstanding == 0:
                    self._idle.set()

    def _set_busy(self, busy: bool) -> None:
        with self._cv:
            self._busy = busy
            self._cv.notify_all()

    def _gate(self, key: str) -> None:
        """Park while paused, then commit to chunk ``key`` with its partner; returns busy."""
        while True:
            with self._cv:
                if self._pause_req:
                    t0 = time.monotonic()
                    while self._pause_req:
                        self._cv.wait()
                    self.paused_seconds += time.monotonic() - t0
                self._busy = True
            try:
                if self._commit(key):
                    return
            except BaseException:
                self._set_busy(False)
                raise
            self._set_busy(False)  # withdrawn for a pause: park, then try again

    def _commit(self, key: str) -> bool:
        """True once both ranks of the chunk committed; False if this rank withdrew for a pause."""
        st = self._store
        if st is None or st.add(key, 1) >= 2:
            return True  # the partner was first (it removes the key)
        end = time.monotonic() + self.timeout_s
        delay = 2e-5  # polls back off to every 0.5 ms: the partner's commit is seen within that
        while True:
            if st.add(key, 0) >= 2:
                st.delete_key(key)
                return True
            if self._pause_req or self._closed:
                if st.compare_set(key, "1", "0") == b"0":
                    if self._closed:
                        raise RuntimeError("transfer engine closed with copies pending")
                    return False
                st.delete_key(key)  # the partner committed meanwhile: the chunk goes ahead
                return True
            if st.check([BROKEN_KEY]):
                raise RuntimeError(f"partner engine broken ({st.get(BROKEN_KEY).decode()})")
            if time.monotonic() > end:
                raise TimeoutError(f"no partner committed to chunk {key} within {self.timeout_s:.1f} s")
            time.sleep(delay)
            delay = min(2 * delay, 5e-4)

    def _run(self, batch: TransferBatch, work) -> None:
        """Move ``work`` (``(index, op, sources, destinations)``) chunk by chunk, each chunk
        behind the gate (pause, commit) and moved by :meth:`_move`."""
        log = self.event_log
        for i, op, src, dst in work:
            peer = op.dst if op.src == self.rank else op.src
            layer = _layer_of(op.key)
            for c, (ti, s, e) in enumerate(_chunks(dst, self.chunk_bytes)):
                self._gate(f"{batch.seq}/{i}/{c}")
                try:
                    t0 = now_ns()
                    if self.fault is not None:
                        self.fault(i, op, c)
                    kind = self._move(op, src[ti].view(-1)[s:e], dst[ti].view(-1)[s:e])
                    if self._stream is not None:  # on CUDA send/recv return once queued: the chunk is
                        self._stream.synchronize()  # busy until it has moved (phase locking, the log)
                    t1 = now_ns()
                finally:
                    self._set_busy(False)
                nbytes = (e - s) * dst[ti].element_size()
                if log is not None:
                    log.record(kind, layer, t0, t1, peer=peer, bytes=nbytes, op=i, chunk=c)
                batch.bytes_moved += nbytes
                batch.chunks_moved += 1
                self.chunks_moved += 1
            batch._events[i].set()  # (on CUDA every chunk was synchronised: usable by any stream now)

    def _move(self, op: CopyOp, src: torch.Tensor, dst: torch.Tensor) -> str:
        """One chunk of ``op``: sent from ``src`` or received into ``dst`` (the same chunk of this
        rank's tensors); returns the event log's kind."""
        sending = op.src == self.rank
        peer = global_rank(self.group, op.dst if sending else op.src)
        if needs_host_staging(self.group, dst):
            if sending:
                dist.send(src.cpu(), peer, group=self.group)
            else:
                buf = torch.empty(dst.shape, dtype=dst.dtype)
                dist.recv(buf, peer, group=self.group)
                dst.copy_(buf)
        elif sending:
            dist.send(src, peer, group=self.group)
        else:
            dist.recv(dst, peer, group=self.group)
        return "send" if sending else "recv"
