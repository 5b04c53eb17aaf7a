"""Megatron distributed checkpoints (``dist_checkpointing``, the ``torch_dist`` format) and the
PROBE model.

The PROBE layer keeps the stock layer's parameters under the stock names and its replica slots
out of the state dict, so its ``sharded_state_dict()`` is the stock one: a checkpoint saved
from the stock Megatron model, at any EP size, loads into the PROBE model at any EP size (each
rank reads its own experts' shards), and the other way round.

Megatron-Core 0.16.1's save path calls ``torch.cuda.synchronize()`` and allocates a flag on
``torch.cuda.current_device()`` (``strategies/filesystem_async.py``, ``state_dict_saver.py``);
on a machine without CUDA both are redirected to the CPU for the call only
(:func:`_without_cuda`). Saving also needs ``psutil`` (Megatron's file writer imports it).
"""

from __future__ import annotations

import contextlib
import os

import torch


@contextlib.contextmanager
def _without_cuda():
    if torch.cuda.is_available():
        yield
        return
    sync, current = torch.cuda.synchronize, torch.cuda.current_device
    torch.cuda.synchronize = lambda *args, **kwargs: None
    torch.cuda.current_device = lambda: "cpu"
    try:
        yield
    finally:
        torch.cuda.synchronize, torch.cuda.current_device = sync, current


def save_distributed_checkpoint(model, checkpoint_dir: str) -> None:
    """Save ``model`` (stock or PROBE, this rank's shards) with Megatron's ``dist_checkpointing``
    into the empty or new folder ``checkpoint_dir``. A collective: every rank calls it."""
    from megatron.core import dist_checkpointing

    os.makedirs(checkpoint_dir, exist_ok=True)
    with _without_cuda():
        dist_checkpointing.save(model.sharded_state_dict(), checkpoint_dir)


def load_distributed_checkpoint(model, checkpoint_dir: str) -> None:
    """Load a Megatron distributed checkpoint into ``model`` (stock or PROBE, at this process's
    parallel layout). Refuses a folder that is not one, and a checkpoint that lacks any of the
    model's tensors or whose tensors have other shapes (another model), naming them. A
    collective: every rank calls it."""
    from megatron.core import dist_checkpointing

    if not os.path.isdir(checkpoint_dir) or not dist_checkpointing.check_is_distributed_checkpoint(checkpoint_dir):
        raise ValueError(f"{checkpoint_dir!r} is not a Megatron distributed checkpoint (no metadata.json there); "
                         "save one with megatron.core.dist_checkpointing.save or save_distributed_checkpoint")
    sharded = model.sharded_state_dict()
    saved = dist_checkpointing.load_tensors_metadata(checkpoint_dir)
    missing, other_shape = {}, {}  # by key: a key's shards all say the same
    for t in _sharded_tensors(sharded):
        if t.key not in saved:
            missing[t.key] = True
        elif tuple(saved[t.key].global_shape) != tuple(t.global_shape):
            other_shape[t.key] = f"{t.key}: {tuple(saved[t.key].global_shape)} there, {tuple(t.global_shape)} here"
    missing, other_shape = list(missing), list(other_shape.values())
    # every rank checks its own tensors (stages differ); all refuse together, none waits in the load
    refused_here = bool(missing or other_shape)
    if refused_here:
        raise_after = ValueError(f"{checkpoint_dir!r} is a checkpoint of another model: missing {missing[:5]}"
                                 f"{' ...' if len(missing) > 5 else ''}; other shapes {other_shape[:5]}")
    if _any_rank(refused_here):
        if refused_here:
            raise raise_after
        raise ValueError(f"{checkpoint_dir!r} does not fit the model on another rank (its message names the tensors)")
    with _without_cuda():
        state = dist_checkpointing.load(sharded, checkpoint_dir)
    result = model.load_state_dict(state, strict=False)
    left = [k for k in result.missing_keys if not k.endswith("_extra_state")]
    if left or result.unexpected_keys:
        raise ValueError(f"{checkpoint_dir!r} does not fill the model: missing {left[:5]}, unexpected "
                         f"{result.unexpected_keys[:5]}")


def _any_rank(flag: bool) -> bool:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    t = torch.tensor([int(flag)], device="cuda" if "nccl" in str(dist.get_backend()) else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def _sharded_tensors(sharded):
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    stack = [sharded]
    while stack:
        x = stack.pop()
        if isinstance(x, dict):
            stack.extend(x.values())
        elif isinstance(x, (list, tuple)):
            stack.extend(x)
        elif isinstance(x, ShardedTensor):
            yield x
