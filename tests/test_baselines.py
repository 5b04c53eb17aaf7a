"""The yardsticks: the published EPLB and its runtime splits, the exact split, and the evaluation
protocol's phases (policy layer)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_probe.policy.cost_model import ExpertCost
from megatron_probe.policy.eplb import (
    EPLBPolicy,
    HomeFixedEPLBPolicy,
    PhysicalMap,
    balanced_packing,
    even_split,
    home_fixed_eplb_placement,
    local_first_table,
    rebalance_experts,
    replicate_experts,
    table_split,
)
from megatron_probe.policy.evaluation import EvalSetup, Phases, default_shift_step, eplb_rebalance_steps, replay
from megatron_probe.policy.optimal import exact_split
from megatron_probe.policy.placement import (
    ExpertLayout,
    holder_slots,
    locality_even_assignment,
    rank_loads,
    validate_assignment,
    validate_placement,
    validate_split,
)
from megatron_probe.policy.planner import assign_on_truth, plan_probe_host, rank_times

COST = ExpertCost(per_token_us=0.1, per_active_expert_us=5.0)


def test_readme_worked_example_reproduces_exactly():
    # deepseek-ai/EPLB README: 2 layers, 12 experts, 16 physical experts, 4 groups, 2 nodes, 8 GPUs
    weight = torch.tensor([[90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
                           [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27]])
    phy2log, log2phy, logcnt = rebalance_experts(weight, num_physical=16, num_gpus=8, num_groups=4, num_nodes=2)
    assert phy2log.tolist() == [[5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1],
                                [7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1]]
    assert logcnt.tolist() == [[1, 2, 1, 1, 2, 2, 1, 1, 1, 1, 2, 1], [1, 2, 1, 1, 1, 2, 2, 1, 2, 1, 1, 1]]
    # log2phy is phy2log's inverse, ordered by replica rank, -1 padded
    for l in range(2):
        for e in range(12):
            phys = [p for p in log2phy[l, e].tolist() if p >= 0]
            assert len(phys) == logcnt[l, e] and all(phy2log[l, p] == e for p in phys)
            assert all(p == -1 for p in log2phy[l, e, len(phys):].tolist())


def test_packing_and_replication_rules():
    pack, pos = balanced_packing([5.0, 1.0, 4.0, 2.0], 2)
    assert pack == [0, 0, 1, 1] and pos == [0, 1, 0, 1]  # 5 -> 0, 4 -> 1, 2 -> 1 (lighter), 1 -> 0 (room)
    phy2log, rank, cnt = replicate_experts([10.0, 1.0, 6.0], 6)
    assert phy2log == [0, 1, 2, 0, 2, 0] and rank == [0, 0, 0, 1, 1, 2] and cnt == [3, 1, 2]
    with pytest.raises(ValueError, match="num_packs=3"):
        balanced_packing([1.0] * 4, 3)


@st.composite
def eplb_cases(draw):
    gpus = draw(st.sampled_from([2, 4, 8]))
    nodes = draw(st.sampled_from([n for n in (1, 2) if gpus % n == 0]))
    groups = draw(st.sampled_from([1, 2, 4]))
    E = gpus * groups * draw(st.integers(1, 3))
    redundant = gpus * draw(st.integers(0, 3))
    layers = draw(st.integers(1, 3))
    seed = draw(st.integers(0, 2 ** 16))
    w = torch.randint(0, draw(st.sampled_from([3, 100, 10000])), (layers, E), generator=torch.Generator().manual_seed(seed))
    return w, E + redundant, gpus, groups, nodes


@settings(max_examples=60, deadline=None)
@given(eplb_cases())
def test_physical_maps_are_consistent(case):
    w, num_phy, gpus, groups, nodes = case
    layers, E = w.shape
    phy2log, log2phy, logcnt = rebalance_experts(w, num_phy, gpus, groups, nodes)
    assert phy2log.shape == (layers, num_phy)
    assert int(logcnt.min()) >= 1 and logcnt.sum(1).tolist() == [num_phy] * layers
    for l in range(layers):
        assert torch.equal(torch.bincount(phy2log[l], minlength=E), logcnt[l])
        pm = PhysicalMap(phy2log[l], gpus, E)
        assert pm.copies().sum(1).tolist() == [num_phy // gpus] * gpus
        if groups % nodes == 0 and nodes > 1:  # hierarchical: a group's experts stay on one node
            node_of = torch.arange(num_phy) // (num_phy // nodes)
            gsize = E // groups
            for g in range(groups):
                nodes_g = node_of[(phy2log[l] // gsize) == g].unique()
                assert nodes_g.numel() == 1


def test_eplb_rejects_bad_input_by_name():
    w = torch.ones(1, 8)
    with pytest.raises(ValueError, match="num_physical=10"):
        rebalance_experts(w, 10, 4)
    with pytest.raises(ValueError, match="num_groups=3"):
        rebalance_experts(w, 8, 4, num_groups=3)
    with pytest.raises(ValueError, match="num_nodes=3"):
        rebalance_experts(w, 12, 4, num_nodes=3)
    with pytest.raises(ValueError, match="non-negative"):
        rebalance_experts(-w, 8, 4)
    with pytest.raises(ValueError, match="expert 3 has no physical copy"):
        PhysicalMap(torch.tensor([0, 1, 2, 2]), 2, 4)
    with pytest.raises(ValueError, match="unknown split 'lp'"):
        EPLBPolicy(8, 4, 4, 10, 10, split="lp")
    with pytest.raises(ValueError, match="num_redundant=3"):
        EPLBPolicy(8, 4, 3, 10, 10)


@st.composite
def split_cases(draw):
    ep = draw(st.sampled_from([2, 4, 8]))
    E = ep * draw(st.integers(1, 4))
    redundant = ep * draw(st.integers(0, 3))
    seed = draw(st.integers(0, 2 ** 16))
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(1, E, generator=g) ** 3
    pm = PhysicalMap(rebalance_experts(w, E + redundant, ep)[0][0], ep, E)
    hi = draw(st.sampled_from([1, 5, 60]))
    counts = torch.randint(0, hi, (ep, E), generator=g) * (torch.rand(ep, E, generator=g) < 0.7)
    return pm, counts, seed


@settings(max_examples=80, deadline=None)
@given(split_cases())
def test_both_splits_conserve_tokens_and_respect_the_map(case):
    pm, counts, seed = case
    holds = pm.holds()
    even = even_split(counts, pm)
    validate_split(even, counts, holds)
    # even: every copy gets n // c or n // c + 1 of a source's tokens
    l2p = pm.log2phy()
    for e in range(pm.num_experts):
        c = len(l2p[e])
        per_rank = torch.zeros(pm.ep_size, dtype=torch.long)
        for p in l2p[e]:
            per_rank[pm.rank_of(p)] += 1
        for s in range(pm.ep_size):
            n = int(counts[s, e])
            got = even[s, e]
            assert torch.all(got >= per_rank * (n // c)) and torch.all(got <= per_rank * (n // c + 1))
    table = local_first_table(pm, seed)
    local = table_split(counts, table, pm)
    validate_split(local, counts, holds)
    for s in range(pm.ep_size):
        for e in range(pm.num_experts):
            if holds[s, e]:
                assert int(table[s, e]) // pm.slots_per_rank == s  # a holder keeps its tokens
    # fair draw: every copy of an expert serves ranks in equal shares (+-1)
    for e in range(pm.num_experts):
        non_holders = (~holds[:, e]).nonzero().flatten()
        if non_holders.numel():
            got = torch.bincount(table[non_holders, e], minlength=pm.num_physical)[l2p[e]]
            assert int(got.max() - got.min()) <= 1


@st.composite
def exact_cases(draw):
    ep = draw(st.sampled_from([2, 4, 8]))
    E = ep * draw(st.integers(1, 4))
    R = draw(st.integers(0, min(3, E - E // ep)))
    seed = draw(st.integers(0, 2 ** 16))
    g = torch.Generator().manual_seed(seed)
    hot = torch.rand(E, generator=g) ** draw(st.sampled_from([1, 4]))
    counts = (hot.unsqueeze(0) * torch.rand(ep, E, generator=g) * draw(st.sampled_from([3, 40, 500]))).round().long()
    return ExpertLayout(E, ep, R), counts, seed


@settings(max_examples=80, deadline=None)
@given(exact_cases())
def test_exact_split_beats_every_greedy_split(case):
    lay, counts, seed = case
    pl, _ = plan_probe_host(counts, lay, COST)  # PROBE's placement on the true counts
    holds = holder_slots(pl, lay) >= 0
    ex = exact_split(counts, holds)
    validate_assignment(ex.assign, counts, pl, lay)
    best = int(rank_loads(ex.assign).max())
    assert ex.value == best and ex.method == "lp"
    assert best >= -(-int(counts.sum()) // lay.ep_size)  # no rank below the mean
    for greedy in (assign_on_truth(counts, pl, lay, COST), locality_even_assignment(counts, pl, lay)):
        assert best <= int(rank_loads(greedy).max())
    # the same on a published-EPLB layout (natives moved)
    w = counts.sum(0, keepdim=True).double() + 1
    pm = PhysicalMap(rebalance_experts(w, lay.num_experts + lay.ep_size * lay.replica_slots, lay.ep_size)[0][0],
                     lay.ep_size, lay.num_experts)
    ex2 = exact_split(counts, pm.holds())
    validate_split(ex2.assign, counts, pm.holds())
    for greedy in (even_split(counts, pm), table_split(counts, local_first_table(pm, seed), pm)):
        assert ex2.value <= int(rank_loads(greedy).max())


def test_exact_split_time_objective_and_its_labels():
    lay = ExpertLayout(8, 4, 2)
    counts = torch.tensor([[30, 0, 5, 0, 0, 2, 0, 0], [25, 1, 0, 0, 0, 0, 3, 0],
                           [40, 0, 0, 2, 0, 0, 0, 1], [20, 0, 0, 0, 4, 0, 0, 0]])
    pl = torch.tensor([[-1, -1], [0, -1], [0, -1], [0, -1]])
    holds = holder_slots(pl, lay) >= 0
    cost = ExpertCost(1.0, 10.0)
    best = exact_split(counts, holds, "time", cost)
    assert best.method == "milp"
    validate_assignment(best.assign, counts, pl, lay)
    assert float(rank_times(best.assign, cost).max()) == pytest.approx(best.value)
    tok = exact_split(counts, holds)
    assert best.value <= float(rank_times(tok.assign, cost).max()) + 1e-9
    # hand check: 115 tokens of expert 0 over 4 ranks plus each rank's own small experts
    assert best.value >= (int(counts.sum()) + 10 * 8) / 4 - 1e-9
    with pytest.raises(ValueError, match="no copy"):
        exact_split(counts, torch.zeros(4, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match="needs an ExpertCost"):
        exact_split(counts, holds, "time")


def test_eplb_policy_warms_up_then_rebalances_on_its_window():
    ep, E = 4, 8
    pol = EPLBPolicy(E, ep, num_redundant=4, window=3, period=5)
    assert pol.pmap.phy2log.tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3]  # vLLM's initial map
    counts = torch.zeros(ep, E, dtype=torch.long)
    counts[:, 5] = 30
    counts[:, 1] = 2
    moved = []
    for _ in range(9):
        A, m = pol.plan(counts)
        validate_split(A, counts, pol.pmap.holds())
        moved.append(m)
    assert moved[:3] == [0, 0, 0] and moved[3] > 0 and moved[4:8] == [0] * 4 and moved[8] == 0
    assert eplb_rebalance_steps(9, 3, 5) == [3, 8]
    assert int(pol.pmap.logcnt()[5]) == 5  # the hot expert got every redundant slot
    A, _ = pol.plan(counts)
    # 5 copies of 24 tokens, heaviest first onto the lightest GPU (ties: the lower one), then
    # expert 1 (8): the published packing puts two copies of expert 5 on GPU 0
    assert rank_loads(A).tolist() == [48, 32, 24, 24]
    assert int(pol.pmap.copies()[0, 5]) == 2


def test_home_fixed_variant_keeps_natives_home():
    lay = ExpertLayout(8, 4, 1)
    load = torch.tensor([100.0, 1, 1, 1, 1, 1, 1, 50])
    pl = home_fixed_eplb_placement(load, lay)
    validate_placement(pl, lay)
    held = pl[pl >= 0].tolist()
    assert held.count(0) == 3 and 7 in held
    pol = HomeFixedEPLBPolicy(lay, window=2, period=3)  # rebalances at steps 2 and 5
    counts = torch.zeros(4, 8, dtype=torch.long)
    counts[:, 0] = 40
    moved = [pol.plan(counts)[2] for _ in range(5)]
    assert moved[0] == 0 and moved[2] > 0 and moved[4] == 0
    with pytest.raises(ValueError, match="must be positive"):
        HomeFixedEPLBPolicy(lay, window=0)


def test_phases_exclude_warmup_from_the_headline():
    # hand case: 4 steps, EPLB window 2 -> steps 0-1 warm-up, 2-3 stationary; static IR differs per phase
    ep, E = 2, 2
    counts = torch.zeros(4, 1, ep, E, dtype=torch.long)
    counts[:2, 0, :, 0] = 10  # warm-up: everything on expert 0 (rank 0) -> static IR 2.0
    counts[2:, 0, :, :] = 5  # stationary: even -> static IR 1.0
    setup = EvalSetup(ep=ep, replica_slots=1, cost=COST, budget_in=1, eplb_window=2, eplb_period=10)
    res = replay(counts, setup, policies=("static", "eplb"))
    assert res["phase_steps"] == {"warmup": [0, 1], "stationary": [2, 3]}
    assert res["phases"]["warmup"]["policies"]["static"]["ir_mean"] == 2.0
    assert res["phases"]["stationary"]["policies"]["static"]["ir_mean"] == 1.0
    assert res["phases"]["stationary"]["policies"]["static"]["samples"] == 2
    assert res["phases"]["stationary"]["policies"]["eplb"]["replica_memory_experts"] == 1
    ph = Phases(10, 3, shift_step=6)
    assert [ph.of(s) for s in range(10)] == ["warmup"] * 3 + ["stationary"] * 3 + ["after_shift"] * 4
    assert default_shift_step(200, 50, 150) == 125
    with pytest.raises(ValueError, match="falls on an EPLB rebalance step"):
        replay(torch.zeros(20, 1, ep, E, dtype=torch.long), EvalSetup(ep, 1, COST, 1, 4, 5), shift_step=9)
    with pytest.raises(ValueError, match="warm-up end 4"):
        Phases(4, 4)
