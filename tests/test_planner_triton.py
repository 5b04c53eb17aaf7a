"""The planner's Triton kernels (``policy/planner_triton.py``) run under Triton's interpreter on
CPU (``TRITON_INTERPRET=1``, set by conftest.py) and must give the host planner's plan exactly: the same replica slots and the same
``[ep, E, ep]`` assignment, on random and adversarial cases up to E 256 and EP 64."""

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed (pip install '.[dev]' brings it)")

from megatron_probe.experiments.equivalence import random_placement  # noqa: E402
from megatron_probe.policy.cost_model import ExpertCost  # noqa: E402
from megatron_probe.policy.placement import ExpertLayout  # noqa: E402
from megatron_probe.policy.planner import plan_probe_host  # noqa: E402
from megatron_probe.policy.planner_triton import plan_probe_triton  # noqa: E402

CASES = 320


def _counts(gen, kind, ep, E):
    scale = int(torch.randint(1, 2000, (), generator=gen))
    if kind == "uniform":
        return torch.randint(0, scale + 1, (ep, E), generator=gen)
    if kind == "skewed":
        return ((torch.rand(ep, E, generator=gen) ** 4) * scale).long()
    if kind == "hot":  # one expert takes most tokens of every rank
        c = torch.randint(0, 4, (ep, E), generator=gen)
        c[:, int(torch.randint(E, (), generator=gen))] += scale
        return c
    if kind == "one_rank":  # every token on one rank's experts
        c = torch.zeros(ep, E, dtype=torch.long)
        L = E // ep
        r = int(torch.randint(ep, (), generator=gen))
        c[:, r * L:(r + 1) * L] = torch.randint(0, scale + 1, (ep, L), generator=gen)
        return c
    if kind == "ties":  # equal loads everywhere: every tie-break decides
        return torch.full((ep, E), int(torch.randint(0, 5, (), generator=gen)), dtype=torch.long)
    return torch.zeros(ep, E, dtype=torch.long)  # "empty"


KINDS = ("uniform", "skewed", "hot", "one_rank", "ties", "empty")


def _case(i):
    gen = torch.Generator().manual_seed(1000 + i)
    ep = (2, 4, 8, 16, 32, 64)[i % 6]
    L = int(torch.randint(1, max(2, 256 // ep) + 1, (), generator=gen)) if ep < 64 else int(
        torch.randint(1, 5, (), generator=gen))
    L = min(L, 256 // ep)
    E = ep * L
    R = min(int(torch.randint(0, 5, (), generator=gen)), E - L)
    layout = ExpertLayout(E, ep, R)
    counts = _counts(gen, KINDS[(i // 6) % len(KINDS)], ep, E)
    cost = ExpertCost(0.1, float(torch.randint(0, 40, (), generator=gen)) * 0.1)
    kw = dict(k_max=int(torch.randint(0, 13, (), generator=gen)),
              copy_charge_us=float(torch.randint(0, 4, (), generator=gen)) * 0.5,
              early_exit=bool(torch.randint(0, 4, (), generator=gen)))
    if torch.randint(0, 3, (), generator=gen) == 0:
        kw["budget_in"] = int(torch.randint(0, 3, (), generator=gen))
        kw["budget_out"] = int(torch.randint(0, 3, (), generator=gen))
    if R and torch.randint(0, 5, (), generator=gen) == 0:  # re-split over an existing placement
        kw["placement"] = random_placement(gen, ep, E, R)
    return counts, layout, cost, kw


@pytest.mark.slow
def test_triton_planner_equals_the_host_planner():
    """CASES property cases (EP 2..64, E up to 256, 0..4 replica slots, six kinds of counts,
    charges, budgets, fixed placements, with and without the early exit)."""
    moved = 0
    for i in range(CASES):
        counts, layout, cost, kw = _case(i)
        want_slots, want = plan_probe_host(counts, layout, cost, **kw)
        got_slots, got = plan_probe_triton(counts, layout, cost, **kw)
        ctx = (i, tuple(counts.shape), layout, cost, kw)
        assert torch.equal(got_slots, want_slots), (ctx, got_slots, want_slots)
        assert torch.equal(got, want), (ctx, (got - want).abs().sum())
        experts = torch.arange(layout.num_experts)
        moved += int(want.sum() > want[:, experts, experts // layout.num_local_experts].sum())
    assert moved >= CASES // 4, moved  # most cases move tokens off their home rank, not only static plans


def test_triton_planner_small_cases_and_bad_input():
    """A handful of cases that run quickly (the property test above is marked slow), and counts
    of the wrong shape refused."""
    for i in (0, 1, 6, 7, 13):
        counts, layout, cost, kw = _case(i)
        want = plan_probe_host(counts, layout, cost, **kw)
        got = plan_probe_triton(counts, layout, cost, **kw)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), (i, kw)
    with pytest.raises(ValueError, match=r"split='time' is not one of \('greedy', 'tokens'\)"):
        plan_probe_triton(torch.zeros(2, 4, dtype=torch.long), ExpertLayout(4, 2, 1), ExpertCost(0.1, 0.0), split="time")
    with pytest.raises(ValueError, match=r"counts \(2, 3\) != \[ep, E\] = \[2, 4\]"):
        plan_probe_triton(torch.zeros(2, 3, dtype=torch.long), ExpertLayout(4, 2, 1), ExpertCost(0.1, 0.0))
    with pytest.raises(ValueError, match="counts must be integer token counts, not torch.float32"):
        plan_probe_triton(torch.zeros(2, 4), ExpertLayout(4, 2, 1), ExpertCost(0.1, 0.0))


def test_triton_planner_with_the_exact_token_split():
    """``split="tokens"``: the host plan's slots, and the exact token split over them (the host
    split's optimum, every token once) as the assignment; never more tokens on the busiest rank
    than the greedy's own moves."""
    from megatron_probe.policy.split import placement_split

    for i in range(0, 60, 5):
        counts, layout, cost, kw = _case(i)
        want_slots, greedy = plan_probe_host(counts, layout, cost, **kw)
        slots, got = plan_probe_triton(counts, layout, cost, split="tokens", **kw)
        assert torch.equal(slots, want_slots), (i, kw)
        assert torch.equal(got.sum(2), counts)
        best = int(placement_split(counts, slots, layout, "tokens").sum((0, 1)).max())
        assert int(got.sum((0, 1)).max()) == best <= int(greedy.sum((0, 1)).max()), (i, kw)
