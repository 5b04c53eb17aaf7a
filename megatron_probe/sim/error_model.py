"""The predictor's effect in the simulator: an error model fitted to the measured evaluation.

The project measured its lookahead predictor on held-out workloads
(``results/predictor/eval_<workload>_ep8.json``, ``tools/eval_predictor.py``): for the distilled
predictor on ``shift`` at EP 8 the per-rank load error under the static placement is 0.055 (mean
over layers; relative L1 of per-rank loads) and the per-expert count error 0.088. A cluster run
has no hidden states to forecast from, so the simulator forecasts each (source rank, expert)
count as the true count times an independent log-normal factor,
``pred = round(true * exp(sigma N(0,1) - sigma^2 / 2))`` (mean-preserving), and fits ``sigma`` so
that the same metric, computed with the same code (``prediction_metrics.PredictionStats``) on
the simulated workload, equals the measured per-rank load error. The count error that the
fitted model then gives is reported beside the measured one (they need not agree: the measured
steps are the small model's, with a few hundred tokens).
"""

from __future__ import annotations

import os
from typing import Dict, Optional

import torch

from megatron_probe import fileformat as ff

from megatron_probe.policy.evaluation import noisy_forecast  # noqa: F401 (the noise model; re-exported)
from megatron_probe.policy.prediction_metrics import PredictionStats

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_EVAL = os.path.join(ROOT, "results", "predictor", "eval_shift_ep8.json")


def measured_predictor_error(path: str = DEFAULT_EVAL, method: str = "distilled") -> Dict:
    """The measured figures the error model is fitted to (and where they came from): a result of
    ``tools/eval_predictor.py --json``. A file without them raises
    :class:`~megatron_probe.fileformat.InputFileError` (a ValueError) naming the file and field."""
    d = ff.load_json(path, "a predictor evaluation JSON (tools/eval_predictor.py --json)")
    ep = ff.field(d, "ep", path, "int", lo=1)
    methods = ff.field(d, "methods", path, "dict")
    m = ff.field(methods, method, path, "dict", "methods.")
    w = f"methods.{method}."
    figures = {}
    for key, name in (("rank_load_err", "mean_rank_load_err"), ("count_err", "mean_count_err"),
                      ("topk_acc", "mean_topk_acc")):
        figures[key] = m.get(name) if key == "topk_acc" and m.get(name) is None else ff.field(m, name, path, "number",
                                                                                               w, lo=0)
    scenario = d.get("scenario")
    return {"file": os.path.relpath(path, ROOT), "method": method, "ep": ep,
            "workload": scenario if isinstance(scenario, str) else None, **figures}


def forecast_errors(counts: torch.Tensor, sigma: float, ep: int, seed: int = 0) -> Dict[str, float]:
    """Rank-load and count error (the evaluation's definitions) of the noise model on
    ``counts [n, ep, E]`` samples (global counts: summed over source ranks)."""
    gen = torch.Generator().manual_seed(seed)
    st = PredictionStats(ep=ep, topk=1)
    for c in counts:
        st.add_counts(0, c.sum(0), noisy_forecast(c, sigma, gen).sum(0))
    s = st.summary()
    return {"rank_load_err": s["mean_rank_load_err"] or 0.0, "count_err": s["mean_count_err"] or 0.0}


def fit_sigma(counts: torch.Tensor, target_rank_err: float, ep: int = 8, seed: int = 0, iters: int = 30,
              hi: float = 4.0) -> float:
    """``sigma`` whose rank-load error at ``ep`` (the evaluation's EP: the metric is the static
    placement's at ``ep`` on global counts) on ``counts [n, ep_sources, E]`` equals the target
    (bisection; the error grows with sigma). Returns ``hi`` when even that is not enough."""
    if target_rank_err <= 0:
        return 0.0
    lo_s, hi_s = 0.0, hi
    if forecast_errors(counts, hi_s, ep, seed)["rank_load_err"] < target_rank_err:
        return hi_s
    for _ in range(iters):
        mid = (lo_s + hi_s) / 2
        if forecast_errors(counts, mid, ep, seed)["rank_load_err"] < target_rank_err:
            lo_s = mid
        else:
            hi_s = mid
    return (lo_s + hi_s) / 2


def describe(sigma: float, measured: Optional[Dict], achieved: Dict[str, float]) -> str:
    src = (f"fitted to {measured['file']} ({measured['method']}, {measured['workload']}, EP {measured['ep']}: "
           f"rank-load error {measured['rank_load_err']}, count error {measured['count_err']})") if measured else "given"
    return (f"forecast = true count x lognormal(sigma={sigma:.4f}), {src}; on this workload the model gives "
            f"rank-load error {achieved['rank_load_err']:.4f}, count error {achieved['count_err']:.4f}")
