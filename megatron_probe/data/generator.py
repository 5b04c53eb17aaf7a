"""Workload generator: per-step expert-count batches of any size from aggregate routing data.

Every output says that it is GENERATED (``CountTrace.generated = True`` and ``method``).

Method
------
1. Per-layer heat ``p_l`` (expert popularity) from an aggregate file (e.g. mbolt's 75,773-token
   Qwen3-30B decode aggregate) or any :class:`RoutingTrace`.
2. Requests differ: each request draws its own expert distribution per layer,
   ``q_{r,l} ~ Dirichlet(alpha * E * p_l)``. Small ``alpha`` = requests concentrated on few
   experts, large ``alpha`` = every request routes like the aggregate. ``alpha`` is fitted to
   the per-token traces (one real request each): the value whose simulated per-request
   max/mean expert load matches the observed one (:func:`fit_alpha`).
3. Steps: ``requests_per_step`` requests are active; each stays a geometric number of steps
   (mean ``request_steps``), then a new request replaces it; request ``i`` lives on EP rank
   ``i % ep``. Each step gives every request ``tokens_per_step / requests_per_step`` tokens, and
   a rank's expert counts for a request are ``Multinomial(tokens * k, q_{r,l})`` (an
   approximation: a token's k picks are drawn with replacement).
4. Optional shift: from ``shift_step`` on, the popularity is the same heat with experts
   permuted by a fixed random permutation (a synthetic domain switch).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional

import torch


@dataclass
class CountTrace:
    counts: torch.Tensor  # [steps, L, ep, E] int64: tokens each source rank routes to each expert
    topk: int
    source: str
    method: str
    generated: bool = True
    params: Dict = field(default_factory=dict)

    @property
    def num_steps(self) -> int:
        return self.counts.shape[0]


def _max_over_mean(counts: torch.Tensor) -> torch.Tensor:
    c = counts.double()
    return c.max(-1).values / c.mean(-1).clamp_min(1e-12)


def observed_request_skew(trace) -> float:
    """Mean over layers of max/mean expert load of the single request of a per-token trace."""
    heat = trace.compute_heat() if trace.steps else trace.heat
    return float(_max_over_mean(heat).mean())


def simulated_request_skew(heat: torch.Tensor, topk: int, tokens: int, alpha: float, samples: int, gen) -> float:
    p = heat.double() / heat.sum(-1, keepdim=True).double()
    E = heat.shape[-1]
    vals = []
    for _ in range(samples):
        conc = (alpha * E * p).clamp_min(1e-6)
        q = torch._sample_dirichlet(conc, generator=gen)
        c = torch.stack([torch.multinomial(q[l], tokens * topk, replacement=True, generator=gen).bincount(minlength=E)
                         for l in range(q.shape[0])])
        vals.append(float(_max_over_mean(c).mean()))
    return sum(vals) / len(vals)


def fit_alpha(heat: torch.Tensor, topk: int, tokens: int, target: float, seed: int = 0,
              grid=(0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 20.0, 100.0)) -> float:
    """The ``alpha`` in ``grid`` whose simulated per-request skew is closest to ``target``."""
    gen = torch.Generator().manual_seed(seed)
    best = min(grid, key=lambda a: abs(simulated_request_skew(heat, topk, tokens, a, 3, gen) - target))
    return float(best)


def generate_counts(heat: torch.Tensor, topk: int, steps: int, tokens_per_step: int, ep: int,
                    requests_per_step: int = 64, request_steps: float = 64.0, alpha: float = 0.5,
                    shift_step: Optional[int] = None, seed: int = 0, source: str = "") -> CountTrace:
    """Per-step ``[ep, E]`` counts for every layer (see the module docstring)."""
    L, E = heat.shape
    if heat.min() < 0:
        raise ValueError("heat must be non-negative")
    if tokens_per_step < requests_per_step:
        raise ValueError(f"tokens_per_step={tokens_per_step} < requests_per_step={requests_per_step}")
    if requests_per_step % ep:
        raise ValueError(f"requests_per_step={requests_per_step} must be a multiple of ep={ep}")
    gen = torch.Generator().manual_seed(seed)
    p = (heat.double() + 1e-3) / (heat.double() + 1e-3).sum(-1, keepdim=True)
    perm = torch.randperm(E, generator=gen)
    per_req = tokens_per_step // requests_per_step

    def draw(base):
        return torch._sample_dirichlet((alpha * E * base).clamp_min(1e-6), generator=gen)  # [L, E]

    base = p
    reqs = [draw(base) for _ in range(requests_per_step)]
    out = torch.zeros(steps, L, ep, E, dtype=torch.long)
    leave_p = 1.0 / max(1.0, request_steps)
    for s in range(steps):
        if shift_step is not None and s == shift_step:
            base = p[:, perm]
        for i in range(requests_per_step):
            if s > 0 and torch.rand((), generator=gen).item() < leave_p:
                reqs[i] = draw(base)
            c = torch.stack([torch.multinomial(reqs[i][l], per_req * topk, replacement=True, generator=gen)
                             .bincount(minlength=E) for l in range(L)])
            out[s, :, i % ep] += c
    return CountTrace(out, topk, source=source,
                      method="GENERATED: Dirichlet-per-request mixture over aggregate heat (megatron_probe.data.generator)",
                      params=dict(steps=steps, tokens_per_step=tokens_per_step, ep=ep,
                                  requests_per_step=requests_per_step, request_steps=request_steps, alpha=alpha,
                                  shift_step=shift_step, seed=seed))
