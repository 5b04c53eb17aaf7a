"""The exact token split's Triton kernel (``policy/split_triton.py``) runs under Triton's interpreter
on CPU (``TRITON_INTERPRET=1``, set by conftest.py) and must reach the host split's optimum (the
slowest rank of ``split.placement_split(..., "tokens")``), conserve every token, use only copies
that exist, and expand its totals exactly as ``split.locality_first`` does: on random and
adversarial cases up to E 256 and EP 64."""

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed (pip install '.[dev]' brings it)")

from megatron_probe.experiments.equivalence import random_placement  # noqa: E402
from megatron_probe.policy.placement import ExpertLayout, holder_slots  # noqa: E402
from megatron_probe.policy.split import locality_first, placement_split  # noqa: E402
from megatron_probe.policy.split_triton import (assignment_from_totals,  # noqa: E402
                                                placement_token_split_device)
from test_planner_triton import KINDS, _counts  # noqa: E402  (the planner kernel's kinds of counts)

CASES = 320


def _chain_placement(ep, E, R):
    """Rank r copies the first native of rank r - 1 (and of r - 2, ... in its other slots): load on
    one rank can only leave along the chain, so the augmenting paths are long."""
    L = E // ep
    pl = torch.full((ep, R), -1, dtype=torch.long)
    for r in range(ep):
        for s in range(min(R, ep - 1)):
            pl[r, s] = ((r - 1 - s) % ep) * L
    return pl


def _case(i):
    gen = torch.Generator().manual_seed(7000 + i)
    ep = (2, 3, 4, 1, 8, 5, 16, 6, 32, 12, 64, 24)[i % 12]  # also sizes that leave padded ranks (EP_B > ep)
    L = min(int(torch.randint(1, max(2, 256 // ep) + 1, (), generator=gen)), 256 // ep)
    E = ep * L
    R = min(int(torch.randint(0, 5, (), generator=gen)), E - L)
    layout = ExpertLayout(E, ep, R)
    kind = KINDS[(i // 12) % len(KINDS)]
    counts = _counts(gen, kind, ep, E)
    shape = int(torch.randint(0, 4, (), generator=gen))
    if R and shape == 0:
        placement = _chain_placement(ep, E, R)
    elif R and shape == 1:  # every rank that can copies the hottest expert first
        placement = random_placement(gen, ep, E, R, hot=int(counts.sum(0).argmax()))
    else:
        placement = random_placement(gen, ep, E, R)
    return counts, layout, placement


def _check(counts, layout, placement, got, state):
    want = placement_split(counts, placement, layout, "tokens")
    slowest = int(want.sum((0, 1)).max())
    assert int(state[0]) == 1  # converged: the split is known optimal
    assert int(got.sum((0, 1)).max()) == slowest == int(state[2])
    assert torch.equal(got.sum(2), counts)  # every token of every source, once
    assert (got >= 0).all()
    holds = (holder_slots(placement, layout) >= 0).T  # [E, ep]
    assert not ((got.sum(0) > 0) & ~holds).any()  # only copies that exist
    y = got.sum(0)
    assert torch.equal(got, torch.from_numpy(locality_first(counts.numpy(), y.numpy())))


@pytest.mark.slow
def test_triton_token_split_reaches_the_host_optimum():
    """CASES property cases (EP 1..64, powers of two and not, E up to 256, 0..4 replica slots, six
    kinds of counts, random, hot-first and chained placements)."""
    moved = 0
    for i in range(CASES):
        counts, layout, placement = _case(i)
        got, state = placement_token_split_device(counts, placement, layout)
        _check(counts, layout, placement, got, state)
        experts = torch.arange(layout.num_experts)
        static = got[:, experts, experts // layout.num_local_experts].sum()
        moved += int(got.sum() > static)
    assert moved >= CASES // 4, moved  # most cases put tokens on replicas, not only static splits


def test_triton_token_split_long_paths_and_few_rounds():
    """A chain placement (rank r copies rank r - 1's first native) with most tokens on rank 0:
    the optimum needs a path through another rank; a round cap of 1 stops it early with a valid,
    unconverged split."""
    ep, E, R = 8, 32, 1
    layout = ExpertLayout(E, ep, R)
    placement = _chain_placement(ep, E, R)
    counts = torch.zeros(ep, E, dtype=torch.long)
    counts[:, ::E // ep] = 100  # every rank computes its first native, which the next rank copies
    counts[:, 0] = 1000  # rank 0's first native, copied by rank 1 only
    got, state = placement_token_split_device(counts, placement, layout)
    _check(counts, layout, placement, got, state)
    # the optimum halves expert 0 over ranks 0 and 1, so rank 1's native (expert 4) must leave for
    # rank 2 entirely: a path 0 -> 1 -> 2
    assert int(state[2]) == 8 * 1000 // 2 and int(got[:, 4, 1].sum()) == 0
    assert int(state[1]) > 2
    short, s1 = placement_token_split_device(counts, placement, layout, max_rounds=1)
    assert int(s1[0]) == 0 and int(s1[1]) == 1
    assert torch.equal(short.sum(2), counts)
    assert int(short.sum((0, 1)).max()) > int(state[2])


def test_assignment_from_totals_equals_locality_first():
    """The tensor expansion gives ``locality_first``'s assignment for any valid totals."""
    gen = torch.Generator().manual_seed(5)
    for _ in range(50):
        ep, E = int(torch.randint(1, 9, (), generator=gen)), int(torch.randint(1, 20, (), generator=gen))
        counts = torch.randint(0, 30, (ep, E), generator=gen)
        # random totals: each expert's tokens cut at random points over the ranks
        y = torch.zeros(E, ep, dtype=torch.long)
        for e in range(E):
            w = torch.rand(ep, generator=gen) * (torch.rand(ep, generator=gen) < 0.6)
            w[int(torch.randint(ep, (), generator=gen))] += 0.1
            part = (w / w.sum() * int(counts[:, e].sum())).floor().long()
            part[int(w.argmax())] += int(counts[:, e].sum()) - int(part.sum())
            y[e] = part
        got = assignment_from_totals(counts, y)
        assert torch.equal(got, torch.from_numpy(locality_first(counts.numpy(), y.numpy())))


def test_triton_token_split_refuses_bad_input():
    layout = ExpertLayout(8, 2, 1)
    pl = torch.full((2, 1), -1, dtype=torch.long)
    with pytest.raises(ValueError, match=r"counts \(2, 4\) != \[ep, E\] = \[2, 8\]"):
        placement_token_split_device(torch.zeros(2, 4, dtype=torch.long), pl, layout)
    with pytest.raises(ValueError, match="integer token counts, not torch.float32"):
        placement_token_split_device(torch.zeros(2, 8), pl, layout)
    with pytest.raises(ValueError, match=r"placement \(2, 2\) != \[ep, R\] = \[2, 1\]"):
        placement_token_split_device(torch.zeros(2, 8, dtype=torch.long), torch.full((2, 2), -1), layout)
    with pytest.raises(ValueError, match="max_rounds must be at least 1, got 0"):
        placement_token_split_device(torch.zeros(2, 8, dtype=torch.long), pl, layout, max_rounds=0)
