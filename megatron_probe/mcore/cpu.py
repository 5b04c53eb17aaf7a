"""What Megatron-Core 0.16 needs to run on CPU over gloo (see shared notes, megatron-cpu).

* ``GlobalMemoryBuffer`` allocates on CUDA (attention scratch): :class:`DeviceGlobalMemoryBuffer`
  allocates on a given device.
* the model-parallel RNG tracker reads the CUDA RNG: the inference tracker avoids it.
* the sequence-parallel reduce-scatter and the unbuffered all-gather along the sequence
  (``tensor_parallel/mappings.py``) allocate their outputs on CUDA: :func:`install_cpu_sequence_parallel`
  makes them allocate beside their input (gloo has both collectives).
* the local spec's torch norm (no apex, no Transformer Engine) refuses a sequence-parallel
  config: :class:`SequenceParallelTorchNorm` is the same norm, allowed to run on a shard.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron.core import parallel_state
from megatron.core.tensor_parallel import random as tp_random
from megatron.core.utils import GlobalMemoryBuffer


class DeviceGlobalMemoryBuffer(GlobalMemoryBuffer):
    def __init__(self, device="cpu"):
        super().__init__()
        self.device = torch.device(device)

    def get_tensor(self, tensor_shape, dtype, name, mem_alloc_context=None):
        n = 1
        for d in tensor_shape:
            n *= d
        buf = self.buffer.get((name, dtype))
        if buf is None or buf.numel() < n:
            buf = self.buffer[(name, dtype)] = torch.empty(n, dtype=dtype, device=self.device)
        return buf[:n].view(*tensor_shape)


class SequenceParallelTorchNorm:
    """Megatron's ``WrappedTorchNorm`` (torch ``LayerNorm`` / ``RMSNorm``) for a sequence-parallel
    config, which ``WrappedTorchNorm`` refuses: a norm is token-wise, so it gives a token the same
    result on a shard of the sequence as on all of it. Its weights are marked ``sequence_parallel``,
    as Megatron's fused norms mark theirs (training sums their gradients over the TP ranks)."""

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, **_unused):
        kinds = {"LayerNorm": torch.nn.LayerNorm, "RMSNorm": torch.nn.RMSNorm}
        if config.normalization not in kinds:
            raise ValueError(f"normalization {config.normalization!r}: the torch norm takes one of {sorted(kinds)}")
        for flag in ("layernorm_zero_centered_gamma", "persist_layer_norm", "memory_efficient_layer_norm"):
            if getattr(config, flag):
                raise ValueError(f"{flag}=True: the torch norm has no such option; set it False")
        norm = kinds[config.normalization](normalized_shape=hidden_size, eps=eps)
        for p in norm.parameters():
            p.sequence_parallel = bool(config.sequence_parallel)
        return norm


def _cpu_reduce_scatter_along_first_dim(megatron_fn):
    def reduce_scatter(input_, group, input_split_sizes=None, use_global_buffer=False):
        if input_.is_cuda or group.size() == 1 or input_split_sizes is not None or use_global_buffer:
            return megatron_fn(input_, group, input_split_sizes, use_global_buffer)
        n = group.size()
        if input_.shape[0] % n:
            raise ValueError(f"sequence-parallel reduce-scatter: {input_.shape[0]} rows do not split over the "
                             f"{n} tensor-parallel ranks")
        out = torch.empty((input_.shape[0] // n, *input_.shape[1:]), dtype=input_.dtype, device=input_.device)
        dist.reduce_scatter_tensor(out, input_.contiguous(), group=group)
        return out
    reduce_scatter.megatron_fn = megatron_fn
    return reduce_scatter


def _cpu_gather_along_first_dim(megatron_fn):
    def gather(input_, group, output_split_sizes=None, use_global_buffer=False):
        if input_.is_cuda or group.size() == 1 or output_split_sizes is not None or use_global_buffer:
            return megatron_fn(input_, group, output_split_sizes, use_global_buffer)
        out = torch.empty((input_.shape[0] * group.size(), *input_.shape[1:]), dtype=input_.dtype,
                          device=input_.device)
        dist.all_gather_into_tensor(out, input_.contiguous(), group=group)
        return out
    gather.megatron_fn = megatron_fn
    return gather


def install_cpu_sequence_parallel() -> None:
    """Megatron's sequence-parallel collectives on CPU tensors: outputs allocated on the input's
    device instead of ``torch.cuda.current_device()``; CUDA tensors, uneven splits and the global
    buffer path still go to Megatron's own functions. Idempotent."""
    from megatron.core.tensor_parallel import mappings

    if not hasattr(mappings._reduce_scatter_along_first_dim, "megatron_fn"):
        mappings._reduce_scatter_along_first_dim = _cpu_reduce_scatter_along_first_dim(
            mappings._reduce_scatter_along_first_dim)
    if not hasattr(mappings._gather_along_first_dim, "megatron_fn"):
        mappings._gather_along_first_dim = _cpu_gather_along_first_dim(mappings._gather_along_first_dim)


def initialize_megatron_parallel(ep_size: int, seed: int = 1234, device: str = "cpu",
                                 timeout_s: float | None = None, tp_size: int = 1, pp_size: int = 1,
                                 etp_size: int = 1) -> None:
    """Megatron model-parallel state for expert parallelism ``ep_size``, tensor parallelism
    ``tp_size``, expert tensor parallelism ``etp_size`` (1 or ``tp_size``: Megatron's expert
    groups then put the TP ranks together, and the EP groups across them) and ``pp_size``
    pipeline stages, on top of an
    initialised ``torch.distributed`` default group. Called again with the same sizes it only
    re-seeds (so one process can build several models). ``timeout_s``: the collective timeout of
    Megatron's groups (its ``distributed_timeout_minutes``; default 30 minutes), so a dead peer
    ends a collective on them within it."""
    want = (ep_size, tp_size, pp_size, etp_size)
    if parallel_state.model_parallel_is_initialized():
        have = (parallel_state.get_expert_model_parallel_world_size(),
                parallel_state.get_tensor_model_parallel_world_size(),
                parallel_state.get_pipeline_model_parallel_world_size(),
                parallel_state.get_expert_tensor_parallel_world_size())
        if have != want:
            raise ValueError(f"Megatron parallel state is already initialised with EP x TP x PP x ETP {have}, "
                             f"not {want}")
    else:
        kw = {} if timeout_s is None else {"distributed_timeout_minutes": timeout_s / 60.0}
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp_size, expert_model_parallel_size=ep_size,
                                                 pipeline_model_parallel_size=pp_size,
                                                 expert_tensor_parallel_size=etp_size, **kw)
    if device == "cpu":
        tp_random.model_parallel_cuda_manual_seed(seed, inference_rng_tracker=True, force_reset_rng=True)
        parallel_state._GLOBAL_MEMORY_BUFFER = DeviceGlobalMemoryBuffer("cpu")
        install_cpu_sequence_parallel()
    else:
        tp_random.model_parallel_cuda_manual_seed(seed)


def destroy_megatron_parallel() -> None:
    parallel_state.destroy_model_parallel()
