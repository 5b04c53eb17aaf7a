"""Policy-layer formats: placement and assignment validation, the default assignment (fuzzed)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_probe.policy import (
    ExpertLayout,
    empty_placement,
    holder_slots,
    imbalance_ratio,
    locality_even_assignment,
    rank_loads,
    slot_experts,
    validate_assignment,
    validate_placement,
)


def layout(E=8, ep=2, R=2):
    return ExpertLayout(E, ep, R)


def test_layout_errors():
    with pytest.raises(ValueError, match="not divisible"):
        ExpertLayout(10, 4, 0)
    with pytest.raises(ValueError, match=r"replica_slots=7 must be in 0\.\.6"):
        ExpertLayout(8, 4, 7)
    with pytest.raises(ValueError, match=r"replica_slots=-1"):
        ExpertLayout(8, 4, -1)


def test_holder_and_slot_tables():
    lay = layout()
    pl = torch.tensor([[5, -1], [0, 2]])
    validate_placement(pl, lay)
    hs = holder_slots(pl, lay)
    assert hs[0].tolist() == [0, 1, 2, 3, -1, 4, -1, -1]
    assert hs[1].tolist() == [4, -1, 5, -1, 0, 1, 2, 3]
    assert slot_experts(pl, lay).tolist() == [[0, 1, 2, 3, 5, -1], [4, 5, 6, 7, 0, 2]]


@pytest.mark.parametrize(
    "pl, msg",
    [
        (torch.tensor([[8, -1], [0, 1]]), r"placement\[rank=0, slot=0\] = 8 names no expert"),
        (torch.tensor([[-2, -1], [0, 1]]), r"placement\[rank=0, slot=0\] = -2 names no expert"),
        (torch.tensor([[1, -1], [0, 2]]), r"expert 1, which rank 0 already owns"),
        (torch.tensor([[5, 5], [0, 2]]), r"rank 0 expert 5 in more than one replica slot"),
        (torch.tensor([[5, -1, 6], [0, 2, 3]]), r"shape \(2, 3\), expected \(2, 2\).*slot that does not exist"),
        (torch.tensor([[5], [0]]), r"shape \(2, 1\), expected \(2, 2\)"),
    ],
)
def test_bad_placements(pl, msg):
    with pytest.raises(ValueError, match=msg):
        validate_placement(pl, layout())


def test_placement_type_errors():
    with pytest.raises(TypeError, match="integer expert ids"):
        validate_placement(torch.zeros(2, 2), layout())
    with pytest.raises(TypeError, match="torch.Tensor"):
        validate_placement([[5, -1], [0, 1]], layout())


def _counts():
    return torch.tensor([[3, 0, 1, 2, 4, 0, 0, 1], [0, 2, 2, 0, 1, 5, 1, 0]])


def test_bad_assignments():
    lay = layout()
    pl = torch.tensor([[5, -1], [0, -1]])
    counts = _counts()
    good = locality_even_assignment(counts, pl, lay)
    validate_assignment(good, counts, pl, lay)

    lose = good.clone()
    lose[0, 0, 0] -= 1
    with pytest.raises(ValueError, match="assignment loses tokens: source rank 0 routes 3 tokens to expert 0"):
        validate_assignment(lose, counts, pl, lay)
    dup = good.clone()
    dup[1, 5, 1] += 1
    with pytest.raises(ValueError, match="assignment duplicates tokens: source rank 1 routes 5 tokens to expert 5"):
        validate_assignment(dup, counts, pl, lay)
    stray = good.clone()
    stray[1, 6, 1] -= 1
    stray[1, 6, 0] += 1  # rank 0 holds no copy of expert 6
    with pytest.raises(ValueError, match="to rank 0, which holds no copy of expert 6"):
        validate_assignment(stray, counts, pl, lay)
    neg = good.clone()
    neg[0, 4, 1] -= 5
    neg[0, 4, 0] += 5
    with pytest.raises(ValueError, match="is negative"):
        validate_assignment(neg, counts, pl, lay)
    with pytest.raises(ValueError, match=r"assignment has shape \(2, 8\)"):
        validate_assignment(good[:, :, 0], counts, pl, lay)
    with pytest.raises(TypeError, match="integer token counts"):
        validate_assignment(good.float(), counts, pl, lay)


def test_locality_first():
    lay = layout()
    pl = torch.tensor([[5, -1], [0, -1]])  # rank 0 holds a copy of 5, rank 1 a copy of 0
    counts = _counts()
    a = locality_even_assignment(counts, pl, lay)
    # rank 0's tokens of expert 5 (0 of them) and rank 1's tokens of expert 0 stay local
    assert a[1, 0].tolist() == [0, 0]
    # rank 1's 5 tokens of expert 5: rank 1 is home, stays local
    assert a[1, 5].tolist() == [0, 5]
    # rank 0's 3 tokens of expert 0: rank 0 is home
    assert a[0, 0].tolist() == [3, 0]
    # no replica: everything goes home
    s = empty_placement(lay)
    a0 = locality_even_assignment(counts, s, lay)
    home = torch.arange(8) // 4
    for src in range(2):
        for e in range(8):
            assert a0[src, e, home[e]] == counts[src, e]


@st.composite
def layouts_and_inputs(draw):
    ep = draw(st.sampled_from([1, 2, 4, 8]))
    L = draw(st.integers(1, 4))
    E = ep * L
    R = draw(st.integers(0, E - L))
    lay = ExpertLayout(E, ep, R)
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    pl = torch.full((ep, R), -1, dtype=torch.long)
    for r in range(ep):
        foreign = [e for e in range(E) if e // L != r]
        perm = torch.randperm(len(foreign), generator=g)[:R].tolist()
        for s, i in enumerate(perm):
            if torch.rand((), generator=g) < 0.7:
                pl[r, s] = foreign[i]
    hot = draw(st.booleans())
    counts = torch.randint(0, 50, (ep, E), generator=g)
    if hot:  # adversarial: one expert takes almost everything
        counts[:, int(torch.randint(E, (), generator=g))] += 500
    if draw(st.booleans()):
        counts[int(torch.randint(ep, (), generator=g))] = 0  # a rank sends nothing
    return lay, pl, counts


@settings(max_examples=150, deadline=None)
@given(layouts_and_inputs())
def test_default_assignment_is_always_valid(args):
    lay, pl, counts = args
    validate_placement(pl, lay)
    a = locality_even_assignment(counts, pl, lay)
    validate_assignment(a, counts, pl, lay)
    assert rank_loads(a).sum() == counts.sum()
    # even split: copies of one expert differ by at most the number of non-holder sources
    assert imbalance_ratio(rank_loads(a)) >= 1.0


def test_imbalance_ratio():
    assert imbalance_ratio(torch.tensor([1, 1, 1, 1])) == 1.0
    assert imbalance_ratio(torch.tensor([4, 0, 0, 0])) == 4.0
    assert imbalance_ratio(torch.tensor([0, 0])) == 1.0
