"""Memory every rank of a group can read directly: the source side of pull copies.

A pull copy needs no sender: the receiving rank reads the expert's weights straight out of the
home rank's memory and writes them into its own slot. That takes the home rank out of the copy
(no send to post, no partner to commit with), and on GPUs the read is a ``copy_`` that the copy
engine runs over NVLink without using SMs.

:func:`peer_tensors` allocates one such tensor per rank and returns the local one (to compute
with) and a view of every rank's (to read from):

* **CUDA**: ``torch.distributed._symmetric_memory`` (``empty`` + ``rendezvous``; each peer's
  buffer through ``get_buffer``). Within one node (NVLink or PCIe peer access).
* **CPU**: a file in shared memory (``/dev/shm`` where it exists, else the temp folder) per rank,
  its space reserved up front, mapped by every rank of the group with
  ``torch.from_file(shared=True)``; the file name is removed once every rank has mapped it, so
  nothing outlives the processes. Within one host.

Both are collective over ``group`` and refuse ranks on different hosts by name. The tensors never
move once allocated: the caller writes new weights into them in place, and must order those
writes before any peer's read (the live pipeline: a barrier at each step's first plan).
"""

from __future__ import annotations

import os
import socket
import tempfile
import uuid
import warnings
from typing import List, Sequence, Tuple

import torch
import torch.distributed as dist

from megatron_probe.mechanism.comm import group_rank, group_size

_handles: list = []  # CUDA symmetric-memory handles: kept alive as long as their buffers are used


def release_cuda_handles() -> None:
    """Drop the CUDA symmetric-memory handles this process keeps, once no peer tensor of it is used
    any more (e.g. at the end of a worker: a handle torn down at interpreter exit, after the process
    group, can crash the exit and hide what the worker wrote)."""
    _handles.clear()


def _shm_dir() -> str:
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else tempfile.gettempdir()


def _gather(obj, group) -> list:
    out = [None] * group_size(group)
    if len(out) == 1:
        return [obj]
    dist.all_gather_object(out, obj, group=group)
    return out


def _raise_gathered(errors: list, hint: str) -> None:
    """Every rank's error (None: none), gathered: all ranks raise the same, or none does."""
    errors = [e for e in errors if e is not None]
    if errors:
        raise ValueError("peer memory on CPU: " + "; ".join(errors) + f" ({hint})")


def _check_same(items: list, what: str) -> None:
    if len(set(items)) > 1:
        raise ValueError(f"{what}; got {dict(enumerate(items))}")


def peer_tensors(shape: Sequence[int], dtype: torch.dtype, device: torch.device,
                 group) -> Tuple[torch.Tensor, List[torch.Tensor]]:
    """``(local, peers)``: a new uninitialised tensor of ``shape`` on this rank and, for every group
    rank ``r``, a tensor that reads rank ``r``'s (``peers[me]`` is ``local`` itself). Collective:
    every rank calls it with the same shape and dtype, in the same order. ``group=None``: this
    rank alone. Every rank raises the same error when one cannot take part."""
    shape = tuple(int(s) for s in shape)
    if device.type not in ("cuda", "cpu"):
        raise ValueError(f"peer tensors on {device}: supported are cuda (symmetric memory) and cpu "
                         "(shared-memory files)")
    info = _gather(((shape, str(dtype), device.type), socket.gethostname()), group)
    _check_same([i[1] for i in info], "peer memory needs every rank of the group on one host (use "
                "copy_transport='p2p' across hosts): ranks are on these hosts")
    _check_same([i[0] for i in info], "peer tensors must have the same shape, dtype and device type on "
                "every rank")
    me = group_rank(group)
    if device.type == "cuda":
        import torch.distributed._symmetric_memory as symm_mem

        if group is None:  # (None: one rank) symmetric memory needs a process group, even of one rank
            if not (dist.is_initialized() and dist.get_world_size() == 1):
                raise ValueError("peer tensors on CUDA need a process group: pass the EP group "
                                 "(None stands for one rank, which needs a world of one)")
            group = dist.group.WORLD
        with warnings.catch_warnings():  # required before torch 2.8; deprecated since
            warnings.simplefilter("ignore")
            symm_mem.enable_symm_mem_for_group(group.group_name)
        local = symm_mem.empty(shape, dtype=dtype, device=device)
        handle = symm_mem.rendezvous(local, group)
        _handles.append(handle)
        peers = [local if r == me else handle.get_buffer(r, shape, dtype)
                 for r in range(group_size(group))]
        return local, peers
    numel = 1
    for s in shape:
        numel *= s
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    folder = _shm_dir()
    path = os.path.join(folder, f"megatron_probe_peer_{os.getpid()}_{uuid.uuid4().hex}")
    local, error = None, None
    try:
        # the space reserved now: a shared file grown lazily would raise SIGBUS at the first write
        # past what the folder holds (a container's /dev/shm is often 64 MiB)
        fd = os.open(path, os.O_CREAT | os.O_RDWR | os.O_EXCL, 0o600)
        try:
            os.posix_fallocate(fd, 0, max(1, nbytes))
        finally:
            os.close(fd)
        local = torch.from_file(path, shared=True, size=numel, dtype=dtype).view(shape)
    except Exception as e:  # (OSError: no space; any other) gathered, so every rank raises alike
        error = f"rank {me}: cannot reserve {nbytes / 2 ** 20:.1f} MiB in {folder} ({type(e).__name__}: {e})"
    try:
        paths = _gather((path, error), group)
        _raise_gathered([err for _, err in paths], "free space there, or use copy_transport='p2p'")
        peers, error = [], None
        try:
            peers = [local if r == me else torch.from_file(p, shared=True, size=numel, dtype=dtype).view(shape)
                     for r, (p, _) in enumerate(paths)]
        except Exception as e:
            error = f"rank {me}: cannot map a peer's file ({type(e).__name__}: {e})"
        # every rank has mapped every file (or says why not) before the names go
        _raise_gathered(_gather(error, group), "use copy_transport='p2p'")
    finally:
        if os.path.exists(path):
            os.unlink(path)
    return local, peers
