"""What Megatron-Core 0.16 needs to run on CPU over gloo (see shared notes, megatron-cpu).

* ``GlobalMemoryBuffer`` allocates on CUDA (attention scratch): :class:`DeviceGlobalMemoryBuffer`
  allocates on a given device.
* the model-parallel RNG tracker reads the CUDA RNG: the inference tracker avoids it.
"""

from __future__ import annotations

import torch

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


def initialize_megatron_parallel(ep_size: int, seed: int = 1234, device: str = "cpu",
                                 timeout_s: float | None = None, tp_size: int = 1, pp_size: int = 1) -> None:
    """Megatron model-parallel state for expert parallelism ``ep_size``, tensor parallelism
    ``tp_size`` (expert tensor parallel 1) and ``pp_size`` pipeline stages, on top of an
    initialised ``torch.distributed`` default group. Called again with the same sizes it only
    re-seeds (so one process can build several models). ``timeout_s``: the collective timeout of
    Megatron's groups (its ``distributed_timeout_minutes``; default 30 minutes), so a dead peer
    ends a collective on them within it."""
    want = (ep_size, tp_size, pp_size)
    if parallel_state.model_parallel_is_initialized():
        have = (parallel_state.get_expert_model_parallel_world_size(),
                parallel_state.get_tensor_model_parallel_world_size(),
                parallel_state.get_pipeline_model_parallel_world_size())
        if have != want:
            raise ValueError(f"Megatron parallel state is already initialised with EP x TP x PP {have}, not {want}")
    else:
        kw = {} if timeout_s is None else {"distributed_timeout_minutes": timeout_s / 60.0}
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp_size, expert_model_parallel_size=ep_size,
                                                 pipeline_model_parallel_size=pp_size, expert_tensor_parallel_size=1,
                                                 **kw)
    if device == "cpu":
        tp_random.model_parallel_cuda_manual_seed(seed, inference_rng_tracker=True, force_reset_rng=True)
        parallel_state._GLOBAL_MEMORY_BUFFER = DeviceGlobalMemoryBuffer("cpu")
    else:
        tp_random.model_parallel_cuda_manual_seed(seed)


def destroy_megatron_parallel() -> None:
    parallel_state.destroy_model_parallel()
