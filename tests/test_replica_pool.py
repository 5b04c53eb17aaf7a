"""The replica bank pool's memory cap (ProbeConfig.replica_memory_cap_mib): what is allocated
stays within it, and a cap too small is refused with its value and what would fit."""

import pytest
import torch

from megatron_probe import ProbeConfig
from megatron_probe.mechanism.replica_pool import NUM_BANKS, ReplicaBankPool
from megatron_probe.policy.placement import ExpertLayout

H, F = 64, 128  # fc1 [2F, H] (gated), fc2 [H, F]


def _pool(slots, cap_mib, dtype=torch.float32):
    cfg = ProbeConfig(replica_slots_per_rank=slots, replica_memory_cap_mib=cap_mib)
    cap = None if cfg.replica_memory_cap_mib is None else int(cfg.replica_memory_cap_mib * 2 ** 20)
    return ReplicaBankPool(ExpertLayout(16, 4, slots), (2 * F, H), (H, F), dtype, torch.device("cpu"), cap)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("slots", [1, 3, 12])
def test_memory_within_cap(slots, dtype):
    elem = torch.empty((), dtype=dtype).element_size()
    expert = (2 * F * H + H * F) * elem
    need = NUM_BANKS * slots * expert
    pool = _pool(slots, need / 2 ** 20, dtype)  # a cap exactly at the need is enough
    assert pool.expert_bytes == expert
    assert pool.memory_bytes() == need <= int(need / 2 ** 20 * 2 ** 20)
    # with a generous cap the same memory: the cap limits, never inflates
    assert _pool(slots, 1024.0, dtype).memory_bytes() == need
    assert _pool(slots, None, dtype).memory_bytes() == need


def test_cap_too_small_names_value_and_what_fits():
    expert_mib = (2 * F * H + H * F) * 4 / 2 ** 20  # 0.09375 MiB
    cap = 3.5 * NUM_BANKS * expert_mib  # room for 3 slots per bank, not 4
    with pytest.raises(ValueError) as e:
        _pool(4, cap)
    msg = str(e.value)
    assert "replica banks need 0.75 MiB per rank (2 banks x 4 slots x 0.0938 MiB per expert)" in msg
    assert "over replica_memory_cap_mib=0.656" in msg
    assert "valid: replica_slots_per_rank <= 3 at this cap, or replica_memory_cap_mib >= 0.75" in msg
    _pool(3, cap)  # what the message says fits does


def test_zero_cap_refuses_any_replica():
    with pytest.raises(ValueError, match=r"replica_slots_per_rank <= 0 at this cap"):
        _pool(1, 0.0)
    with pytest.raises(ValueError, match="replica_memory_cap_mib=-1"):
        ProbeConfig(replica_memory_cap_mib=-1)


def test_pool_built_under_inference_mode_is_writable_by_the_copy_thread():
    """A pipeline built inside ``torch.inference_mode()`` still gets banks the copy thread (which
    runs outside inference mode) can write into."""
    import threading

    with torch.inference_mode():
        pool = _pool(2, None)
    assert not pool.fc1.is_inference() and not pool.fc2.is_inference()
    errors = []

    def copy_in():
        try:
            pool.slot_tensors(0, 1)[0].copy_(torch.ones(2 * F, H))
        except Exception as e:  # an inference tensor refuses in-place writes here
            errors.append(e)

    t = threading.Thread(target=copy_in)
    t.start()
    t.join()
    assert not errors, errors
    assert bool((pool.fc1[0, 1] == 1).all())
    with torch.inference_mode():  # a bank's record taken during a served step ...
        pool.mark(0, 3, torch.tensor([[1, 5], [0, -1], [2, 3], [-1, -1]]))
    pool.mark(0, 4, torch.full((4, 2), -1))  # ... emptied in place for another layer outside it
    assert pool.held_layer[0] == 4 and bool((pool.held[0] == -1).all())
