"""Run a function on N processes of one ``torch.distributed`` group.

Under ``torchrun`` (``RANK``/``WORLD_SIZE`` set) the current process joins the existing job;
otherwise N local processes are spawned with a fresh loopback port. Backend: NCCL when CUDA
is present (one GPU per rank), else gloo. A rank that loses a peer (killed, crashed, stuck past
the timeout) exits on its own with one line naming the peer and the stage it was in; the
launcher then reports every rank's end (:class:`RanksFailed`).
"""

from __future__ import annotations

import datetime
import multiprocessing.connection as mp_connection
import os
import pickle
import signal
import socket
import time
from typing import Callable, Dict, List, Optional

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megatron_probe.mechanism.peer_loss import PEER_LOST_EXIT, exit_on_peer_loss


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def default_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


# with NCCL the process groups also get gloo for host tensors: the pipeline's control collectives
# (the cost agreement, the copy agreement, the expert-cost calibration) and the serving engine's
# totals are small CPU tensors, and a group made with NCCL alone refuses them ("No backend type
# associated with device type cpu"); Megatron's groups and ours made without a backend inherit both
PROCESS_GROUP_BACKENDS = {"nccl": "cpu:gloo,cuda:nccl"}


def process_group_backend(backend: str) -> str:
    """The backend string ``init_process_group`` gets for ``backend`` (``nccl``: NCCL for CUDA
    tensors and gloo for host tensors; others unchanged)."""
    return PROCESS_GROUP_BACKENDS.get(backend, backend)


def local_device_index(rank: int) -> int:
    """This process's GPU: torchrun's ``LOCAL_RANK`` (right with several nodes, or fewer processes
    than GPUs on a node), else the rank modulo the GPUs (ranks spawned on one machine)."""
    local = os.environ.get("LOCAL_RANK")
    return int(local) if local is not None else rank % torch.cuda.device_count()


def under_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ


DEFAULT_TIMEOUT_S = 1800.0  # torch's own default for gloo groups


def _entry(rank, world_size, port, backend, fn, args, timeout_s):
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ["MASTER_PORT"] = str(port)
    exit_on_peer_loss(_run_rank, rank, world_size)(rank, world_size, backend, fn, args, timeout_s)


def _run_rank(rank, world_size, backend, fn, args, timeout_s):
    _init(rank, world_size, backend, timeout_s)
    fn(rank, world_size, *args)
    _shutdown()


def _shutdown():
    """Orderly teardown: wait until every rank is done before any closes its connections
    (gloo aborts a peer whose pair is torn down mid-transfer). Skipped after an error, where a
    barrier would hang; the launcher then stops the other ranks."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _init(rank, world_size, backend, timeout_s=None):
    if torch.cuda.is_available():  # gloo too: several ranks may share one GPU
        torch.cuda.set_device(local_device_index(rank))
    timeout = datetime.timedelta(seconds=timeout_s or DEFAULT_TIMEOUT_S)
    dist.init_process_group(process_group_backend(backend), rank=rank, world_size=world_size, timeout=timeout)


class RanksFailed(RuntimeError):
    """Some rank of a :func:`run_distributed` job failed. ``exits``: one dict per rank (``rank``,
    ``exitcode``, ``how``, ``after_s``: seconds after the first failure it ended, ``error``: its
    traceback when it raised)."""

    def __init__(self, exits: List[Dict]):
        self.exits = exits
        lines = [f"rank {e['rank']}: {e['how']}" + (f" ({e['after_s']:.1f} s after the first failure)"
                                                   if e["after_s"] is not None else "") for e in exits]
        raised = [e for e in exits if e.get("error")]
        detail = "".join(f"\n\n-- rank {e['rank']} raised:\n{e['error']}" for e in raised)
        super().__init__("distributed job failed:\n  " + "\n  ".join(lines) + detail)


def run_distributed(fn: Callable, world_size: int, *args, backend: str | None = None,
                    timeout_s: float | None = None, grace_s: float | None = None) -> None:
    """Call ``fn(rank, world_size, *args)`` on every rank; raises :class:`RanksFailed` if any
    rank fails. ``timeout_s``: the default group's collective timeout (torch's 30 minutes when
    None). A rank that loses a peer exits on its own, naming the peer and its stage
    (:mod:`~megatron_probe.mechanism.peer_loss`); after the first rank fails the others get
    ``grace_s`` to do so before the launcher stops them (default ``timeout_s`` + 10 s: a survivor
    waits at most the timeout in its collective and 5 s in the roll call; 60 s without a
    timeout)."""
    backend = backend or default_backend()
    if under_torchrun():
        rank, ws = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        if world_size not in (ws, None):
            raise ValueError(f"asked for {world_size} processes but torchrun started {ws}")
        exit_on_peer_loss(_run_rank, rank, ws)(rank, ws, backend, fn, args, timeout_s)
        return
    if backend == "nccl" and world_size > torch.cuda.device_count():
        raise ValueError(f"{world_size} NCCL ranks need {world_size} GPUs, found {torch.cuda.device_count()}")
    if grace_s is None:
        grace_s = timeout_s + 10.0 if timeout_s else 60.0
    ctx = mp.start_processes(_entry, args=(world_size, free_port(), backend, fn, args, timeout_s),
                             nprocs=world_size, join=False, start_method="spawn")
    _join(ctx, grace_s)


def _join(ctx, grace_s: float) -> None:
    """Wait for every rank; after the first failure give the rest ``grace_s`` to end on their own,
    then stop them (SIGTERM, then SIGKILL). Raises :class:`RanksFailed` unless all exited 0."""
    procs = ctx.processes
    ended: Dict[int, float] = {}
    first_failure: Optional[float] = None
    stopped = set()
    while len(ended) < len(procs):
        mp_connection.wait([p.sentinel for i, p in enumerate(procs) if i not in ended], timeout=0.5)
        now = time.monotonic()
        for i, p in enumerate(procs):
            if i not in ended and p.exitcode is not None:
                ended[i] = now
                if p.exitcode != 0 and first_failure is None:
                    first_failure = now
        if first_failure is not None and now - first_failure > grace_s:
            for i, p in enumerate(procs):
                if i not in ended:
                    stopped.add(i)
                    p.terminate()
            for i, p in enumerate(procs):
                if i not in ended:
                    p.join(5)
                    if p.exitcode is None:
                        p.kill()
                    p.join()
                    ended[i] = time.monotonic()
    for p in procs:
        p.join()
    if all(p.exitcode == 0 for p in procs):
        return
    exits = []
    for i, p in enumerate(procs):
        e = {"rank": i, "exitcode": p.exitcode, "how": _how(p.exitcode, i in stopped, grace_s),
             "after_s": None if p.exitcode == 0 else round(max(0.0, ended[i] - first_failure), 2), "error": None}
        if os.access(ctx.error_files[i], os.R_OK):  # written by torch's wrapper when fn raised
            with open(ctx.error_files[i], "rb") as f:
                e["error"] = pickle.load(f)
            # its exit code is 1, or a signal when a library aborts in the interpreter's teardown
            e["how"] = "raised an exception (traceback below)" + ("" if p.exitcode == 1 else f", then {e['how']}")
        exits.append(e)
    raise RanksFailed(exits)


def _how(code: int, stopped: bool, grace_s: float) -> str:
    if stopped:
        return f"did not end on its own within {grace_s:g} s: stopped by the launcher"
    if code == 0:
        return "exited 0"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    if code == PEER_LOST_EXIT:
        return f"exited {code}: lost a peer (its line above names the peer and its stage)"
    return f"exited {code}"


def init_single_process(seed: int = 1234) -> None:
    """A one-rank gloo group plus Megatron's parallel state (EP = 1), for single-process tools."""
    from megatron_probe.mcore.cpu import initialize_megatron_parallel

    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ["MASTER_PORT"] = str(free_port())
        dist.init_process_group("gloo", rank=0, world_size=1)
    initialize_megatron_parallel(1, seed=seed)
