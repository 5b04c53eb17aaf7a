"""Run a function on N processes of one ``torch.distributed`` group.

Under ``torchrun`` (``RANK``/``WORLD_SIZE`` set) the current process joins the existing job;
otherwise N local processes are spawned with a fresh loopback port. Backend: NCCL when CUDA
is present (one GPU per rank), else gloo.
"""

from __future__ import annotations

import os
import socket
from typing import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def default_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def under_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ


def _entry(rank, world_size, port, backend, fn, args):
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ["MASTER_PORT"] = str(port)
    _init(rank, world_size, backend)
    fn(rank, world_size, *args)
    _shutdown()


def _shutdown():
    """Orderly teardown: wait until every rank is done before any closes its connections
    (gloo aborts a peer whose pair is torn down mid-transfer). Skipped after an error, where a
    barrier would hang; the spawner then stops the other ranks."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _init(rank, world_size, backend):
    if torch.cuda.is_available():  # gloo too: several ranks may share one GPU
        torch.cuda.set_device(rank % torch.cuda.device_count())
    dist.init_process_group(backend, rank=rank, world_size=world_size)


def run_distributed(fn: Callable, world_size: int, *args, backend: str | None = None) -> None:
    """Call ``fn(rank, world_size, *args)`` on every rank; raises if any rank fails."""
    backend = backend or default_backend()
    if under_torchrun():
        rank, ws = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        if world_size not in (ws, None):
            raise ValueError(f"asked for {world_size} processes but torchrun started {ws}")
        _init(rank, ws, backend)
        fn(rank, ws, *args)
        _shutdown()
        return
    if backend == "nccl" and world_size > torch.cuda.device_count():
        raise ValueError(f"{world_size} NCCL ranks need {world_size} GPUs, found {torch.cuda.device_count()}")
    mp.spawn(_entry, args=(world_size, free_port(), backend, fn, args), nprocs=world_size, join=True)


def init_single_process(seed: int = 1234) -> None:
    """A one-rank gloo group plus Megatron's parallel state (EP = 1), for single-process tools."""
    from megatron_probe.mcore.cpu import initialize_megatron_parallel

    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ["MASTER_PORT"] = str(free_port())
        dist.init_process_group("gloo", rank=0, world_size=1)
    initialize_megatron_parallel(1, seed=seed)
