"""The equivalence experiment over gloo at EP 1, 2 and 4: the PROBE layer against a dense
recompute and the stock MoELayer, on random and adversarial routings."""

import pytest

from distributed import run_ranks
from megatron_probe.experiments.equivalence import EquivalenceOptions


def equivalence(rank, ws, opts):
    from megatron_probe.experiments.equivalence import run_rank

    report = run_rank(rank, ws, opts)
    if rank != 0:
        return
    assert report is not None, "rank 0 returned no report"
    trials = report.trials
    assert len(trials) == opts.trials, (len(trials), opts.trials)
    bad = [t for t in trials if not t.passed]
    assert not bad, bad
    assert report.passed, trials
    cases = {t.case for t in trials}
    missing = {"one_expert", "hot_rank", "rank_silent", "empty", "uniform"} - cases
    assert not missing, (missing, cases)
    if opts.replica_slots:
        assert any(t.replicas > 0 and t.assignment == "random" for t in trials), [
            (t.case, t.replicas, t.assignment) for t in trials]
    stock = [t for t in trials if t.bit_exact_vs_stock is not None]
    assert len(stock) == opts.trials, ("compared with stock", len(stock), opts.trials)
    if opts.ep == 1:  # same grouping of tokens as the stock layer: bit-exact
        bit_exact = sum(t.bit_exact_vs_stock for t in stock)
        assert bit_exact == opts.trials, ("bit-exact vs stock", bit_exact, opts.trials,
                                          [t.max_abs_vs_stock for t in stock])


@pytest.mark.slow
@pytest.mark.parametrize(
    "ep, experts, topk, slots, trials, dtype",
    [
        (1, 8, 2, 0, 14, "fp32"),
        (2, 8, 2, 2, 28, "fp32"),
        (2, 8, 2, 3, 14, "bf16"),
        (4, 16, 4, 3, 14, "fp32"),
        (4, 8, 1, 6, 7, "fp32"),  # every foreign expert replicated on every rank
    ],
)
def test_equivalence_random_and_adversarial(ep, experts, topk, slots, trials, dtype):
    opts = EquivalenceOptions(ep=ep, experts=experts, topk=topk, replica_slots=slots, trials=trials,
                              dtype=dtype, seed=11 + ep + slots)
    run_ranks(equivalence, ep, opts)
