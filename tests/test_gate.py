"""The per-layer cost gate (policy.gate): when a layer balances, how often it re-checks, and what
balancing would save."""

import pytest
import torch

from megatron_probe.policy.cost_model import ExpertCost
from megatron_probe.policy.gate import GateSettings, LayerGate, balancing_saving_us
from megatron_probe.policy.placement import ExpertLayout

COST = ExpertCost(per_token_us=1.0, per_active_expert_us=20.0)


def test_saving_is_zero_on_balanced_load_and_grows_with_skew_and_shrinks_with_the_copy_charge():
    lay = ExpertLayout(8, 2, 2)
    even = torch.full((2, 8), 50, dtype=torch.long)
    assert balancing_saving_us(even, lay, COST) == 0.0
    skewed = even.clone()
    skewed[:, 0] = 800  # rank 0's expert: rank 0 is the straggler
    s0 = balancing_saving_us(skewed, lay, COST)
    assert s0 > 300, s0
    s1 = balancing_saving_us(skewed, lay, COST, copy_charge_us=100.0)
    assert 0 <= s1 < s0, (s0, s1)
    assert balancing_saving_us(skewed, lay, COST, copy_charge_us=1e9) == 0.0  # no copy pays
    assert balancing_saving_us(torch.zeros(2, 8, dtype=torch.long), lay, COST) == 0.0


def test_gate_measures_first_then_doubles_its_interval_and_resets_on_a_switch():
    g = LayerGate(GateSettings(warmup_steps=2, max_interval=8))
    assert g.on and not g.due(0, 1.0) and not g.due(1, 1.0) and g.due(2, 1.0)
    assert g.decide(2, saving_us=10.0, cost_us=100.0, static_ir=1.1)  # switched off
    assert not g.on and g.next_check == 3
    checks = []
    step = 3
    while step < 40:
        if g.due(step, 1.1):
            g.decide(step, 10.0, 100.0, 1.1)
            checks.append(step)
        step += 1
    assert checks == [3, 5, 9, 17, 25, 33], checks  # 2, 4, 8, then capped at 8
    # while off, a rise of the static imbalance forces a check at once
    assert not g.due(34, 1.1 + 0.04) and g.due(34, 1.1 + 0.06)
    assert g.decide(34, saving_us=500.0, cost_us=100.0, static_ir=1.2)  # back on
    assert g.on and g.next_check == 35 and g.switches == 2
    assert not g.due(35 - 1, 5.0)  # on: no skew trigger, only the interval


def test_gate_margin_and_bad_settings():
    g = LayerGate(GateSettings(margin=2.0, warmup_steps=0))
    g.decide(0, saving_us=150.0, cost_us=100.0, static_ir=1.0)
    assert not g.on  # 150 does not beat 2 x 100
    g.decide(1, saving_us=201.0, cost_us=100.0, static_ir=1.0)
    assert g.on
    for kw, msg in ((dict(margin=0), "margin=0"), (dict(warmup_steps=-1), "warmup_steps=-1"),
                    (dict(min_interval=4, max_interval=2), "min_interval=4"), (dict(skew_jump=0), "skew_jump=0")):
        with pytest.raises(ValueError, match=msg):
            GateSettings(**kw)


def test_probe_config_gate_fields_are_checked():
    from megatron_probe.config import ProbeConfig

    assert ProbeConfig().cost_gate is True  # on by default
    for kw, msg in ((dict(cost_gate="yes"), "cost_gate must be a bool"),
                    (dict(cost_gate_margin=0.0), "cost_gate_margin=0.0"),
                    (dict(cost_gate_margin=float("inf")), "cost_gate_margin=inf"),
                    (dict(cost_gate_max_interval=0), "cost_gate_max_interval=0"),
                    (dict(cost_gate_max_interval=2.5), "cost_gate_max_interval=2.5")):
        with pytest.raises((TypeError, ValueError), match=msg):
            ProbeConfig(**kw)


def test_saving_upper_bound_is_never_below_the_saving():
    """The gate skips the planner when the bound cannot beat the cost: the bound must hold for any
    counts, skew, layout and copy charge, or a layer would stay off when balancing pays."""
    from megatron_probe.policy.gate import saving_upper_bound_us

    g = torch.Generator().manual_seed(7)
    for trial in range(200):
        ep = (2, 4, 8)[trial % 3]
        E = ep * (1, 2, 4)[trial // 3 % 3]
        lay = ExpertLayout(E, ep, 1 + trial % 3)
        counts = torch.randint(0, 40, (ep, E), generator=g)
        hot = torch.randint(0, E, (1 + trial % 3,), generator=g)
        counts[:, hot] *= int(torch.randint(1, 30, (1,), generator=g))  # adversarial skew
        if trial % 7 == 0:
            counts[:, torch.randint(0, E, (E // 2,), generator=g)] = 0  # idle experts
        cost = ExpertCost(per_token_us=float(torch.rand(1, generator=g)) * 3 + 0.1,
                          per_active_expert_us=float(torch.rand(1, generator=g)) * 200)
        charge = (0.0, 50.0, 500.0)[trial % 3]
        exact = balancing_saving_us(counts, lay, cost, copy_charge_us=charge)
        bound = saving_upper_bound_us(counts, lay, cost)
        assert bound >= exact - 1e-6, (trial, bound, exact)
    even = torch.full((2, 8), 50, dtype=torch.long)
    assert saving_upper_bound_us(even, ExpertLayout(8, 2, 2), COST) == 0.0
