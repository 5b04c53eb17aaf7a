"""The expert bank (mechanism.expert_bank) over gloo: replica fills bring the right weights, the
native parameters stay views of the bank rows through a dtype change, a swapped storage is
noticed."""

import pytest
import torch

from distributed import init_ep, moe_config, probe_layer, run_ranks


def bank_fill(rank, ws):
    from megatron_probe.mechanism.comm import all_gather_rows

    init_ep(ws)
    torch.manual_seed(0)
    cfg = moe_config(ws, E=8)
    layer = probe_layer(cfg, R=3)
    L = layer.num_local_experts
    # every rank knows every expert's weights: gather them for the check
    bank = layer.expert_bank
    fc1_all = all_gather_rows(bank.fc1[:L].contiguous(), layer.ep_group).reshape(-1, *bank.fc1.shape[1:])
    fc2_all = all_gather_rows(bank.fc2[:L].contiguous(), layer.ep_group).reshape(-1, *bank.fc2.shape[1:])
    moved = []
    placements = []
    g = torch.Generator().manual_seed(5)
    for step in range(4):
        pl = torch.full((ws, 3), -1, dtype=torch.long)
        for r in range(ws):
            foreign = [e for e in range(8) if e // L != r]
            perm = torch.randperm(len(foreign), generator=g).tolist()
            for s in range(3):
                if step == 2 or torch.rand((), generator=g) < 0.8:
                    pl[r, s] = foreign[perm[s]]
        if step == 3:
            pl = placements[-1].clone()  # unchanged placement: nothing moves
        placements.append(pl)
        moved.append(layer.set_replica_placement(pl))
        wrong = []
        for s in range(3):
            e = int(pl[rank, s])
            if e >= 0 and not (torch.equal(bank.replica_fc1[s], fc1_all[e])
                               and torch.equal(bank.replica_fc2[s], fc2_all[e])):
                wrong.append((s, e))
        assert not wrong, (f"step {step}: (slot, expert) not holding that expert's weights", wrong, pl.tolist())
    assert moved[-1] == 0, ("an unchanged placement moved something", moved)
    assert layer.replica_memory_bytes() == 3 * bank.expert_bytes() > 0, (
        layer.replica_memory_bytes(), bank.expert_bytes())
    # storage sharing: native parameters are the bank rows
    p0 = layer.experts.local_experts[0].linear_fc1.weight
    assert p0.data_ptr() == bank.fc1[0].data_ptr(), "native parameter is not a view of the bank"
    # dtype change re-binds the views and keeps replicas
    layer.to(torch.bfloat16)
    x = torch.randn(6, 1, 32, dtype=torch.bfloat16)
    with torch.no_grad():
        out, _ = layer(x)
    assert layer.experts.local_experts[0].linear_fc1.weight.data_ptr() == bank.fc1[0].data_ptr(), \
        "after .to(bfloat16) the native parameter is not a view of the bank"
    assert bank.fc1.dtype == torch.bfloat16, bank.fc1.dtype
    e = int(placements[-1][rank, 0])
    if e >= 0:
        assert torch.equal(bank.replica_fc1[0], fc1_all[e].to(torch.bfloat16)), f"replica of expert {e} lost"
    # replacing a parameter's storage is noticed before the next compute
    lin = layer.experts.local_experts[1].linear_fc2
    lin.weight.data = torch.zeros_like(lin.weight)
    _, (fc2, _) = bank.weights(differentiable=False)
    assert torch.equal(fc2[1], torch.zeros_like(fc2[1])), "swapped storage not noticed"


@pytest.mark.slow
@pytest.mark.parametrize("ws", [2, 4])
def test_replica_bank(ws):
    run_ranks(bank_fill, ws)


def test_native_version_sees_every_weight_change_and_own_slots_record_their_placement():
    """What resident replicas rely on: ``native_version`` changes when the native weights are
    written in place (a checkpoint load) or re-allocated, and not otherwise; the own slots'
    recorded placement bumps the replica version only when it changes."""
    from megatron_probe.mechanism.expert_bank import ExpertBank
    from megatron_probe.policy.placement import ExpertLayout

    layout = ExpertLayout(num_experts=4, ep_size=2, replica_slots=1)
    experts = [torch.nn.Linear(3, 5, bias=False) for _ in range(2)]
    outs = [torch.nn.Linear(5, 3, bias=False) for _ in range(2)]
    bank = ExpertBank(layout)
    bank.adopt([(m, "weight") for m in experts], [(m, "weight") for m in outs])
    v0 = bank.native_version()
    assert bank.native_version() == v0
    with torch.no_grad():
        experts[1].weight.mul_(2.0)  # in place, through the parameter view
    v1 = bank.native_version()
    assert v1 != v0, (v0, v1)
    outs[0].weight = torch.nn.Parameter(torch.zeros(3, 5))  # storage replaced: re-adopted
    v2 = bank.native_version()
    assert v2 != v1 and bank.version == 2, (v1, v2, bank.version)
    assert torch.equal(bank.fc2[0], torch.zeros(3, 5))
    r0 = bank.replica_version
    bank.set_own_placement(torch.tensor([[2], [-1]]))
    assert bank.replica_version == r0 + 1 and bank.own_slot_rows(0)[0].shape == (5, 3)
    bank.set_own_placement(torch.tensor([[2], [-1]]))
    assert bank.replica_version == r0 + 1
    bank.use_shared_replicas()
    with pytest.raises(RuntimeError, match="shared replica rows"):
        bank.own_slot_rows(0)
    bank.use_own_replicas()
    assert bank.replica_fc1.shape == (1, 5, 3) and bool((bank.placement == -1).all())


def test_bank_rebuilt_under_inference_mode_stays_a_normal_tensor():
    """A model moved after its bank was built (``model.cuda()`` before serving; here a dtype
    change, which also gives the parameters new storage) has its bank rebuilt at the next use,
    and serving runs under ``torch.inference_mode()``. Rows allocated there would be inference
    tensors: no version counter (``native_version`` would raise) and not writable outside
    inference mode (the copy thread, a checkpoint load). The bank is rebuilt as normal tensors."""
    from megatron_probe.mechanism.expert_bank import ExpertBank
    from megatron_probe.policy.placement import ExpertLayout

    layout = ExpertLayout(num_experts=4, ep_size=2, replica_slots=1)
    experts = [torch.nn.Linear(3, 5, bias=False) for _ in range(2)]
    outs = [torch.nn.Linear(5, 3, bias=False) for _ in range(2)]
    bank = ExpertBank(layout)
    bank.adopt([(m, "weight") for m in experts], [(m, "weight") for m in outs])
    for m in experts + outs:
        m.to(torch.float64)  # new storage: the views are broken
    with torch.inference_mode():
        v_in = bank.native_version()  # rebuilds here
        fc1, fc2 = bank.weights(differentiable=False)
    assert not bank.fc1.is_inference() and not bank.fc2.is_inference()
    assert not bank.replica_fc1.is_inference() and not bank.replica_fc2.is_inference()
    assert bank.fc1.dtype == torch.float64 and torch.equal(bank.fc1[1], experts[1].weight.detach())
    assert experts[0].weight.data_ptr() == bank.fc1[0].data_ptr(), "parameter is not a view of the rebuilt bank"
    assert bank.native_version() == v_in
    with torch.no_grad():  # outside inference mode: a checkpoint load, a replica copy
        experts[0].weight.mul_(2.0)
        bank.replica_fc1[0].copy_(bank.fc1[1])
    assert bank.native_version() != v_in
    # placements recorded during a served step are filled in place later, outside inference mode
    with torch.inference_mode():
        bank.set_own_placement(torch.tensor([[2], [-1]]))
    assert not bank.placement.is_inference()
    bank.use_shared_replicas()  # empties the record in place
    assert bool((bank.placement == -1).all())
