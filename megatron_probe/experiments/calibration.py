"""Measure, on the machine and model at hand, what the planner's cost model needs: the expert
compute cost (affine in tokens) and the time of one expert copy over the transfer engine.

Every rank must plan with identical inputs, so both figures are reduced over the EP group (the
mean of the expert cost, the max of the copy time) before use.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

from megatron_probe.mechanism.profiling import time_us
from megatron_probe.policy.cost_model import ExpertCost


def measure_expert_cost(config, bank, group, ws: int, small: int = 32, large: int = 256) -> ExpertCost:
    """Time one expert of ``bank`` (an ExpertBank) at ``small`` and ``large`` tokens (best of 3)
    and fit ``per_token * n + per_active_expert``; averaged over the group's ranks."""
    from megatron_probe.mechanism.expert_compute import SlotExpertCompute

    comp = SlotExpertCompute(config, "auto")
    w1, w2 = bank.fc1[:1], bank.fc2[:1]
    hidden = config.hidden_size

    def best_us(n):
        x = torch.randn(n, hidden, dtype=w1.dtype, device=w1.device)
        ones = torch.ones(n, dtype=w1.dtype, device=w1.device)
        return time_us(lambda: comp(x, torch.tensor([n]), ones, w1, w2), w1.device, reps=3, warmup=0, stat="min")
    a, b = best_us(small), best_us(large)
    per_tok = max(1e-3, (b - a) / (large - small))
    c = torch.tensor([per_tok, max(0.0, a - small * per_tok)], dtype=torch.float64)
    if ws > 1:
        dist.all_reduce(c, group=group)
    return ExpertCost(float(c[0]) / ws, float(c[1]) / ws)


def measure_copy_us(pipe, bank, rank: int, group) -> float:
    """The time of one expert copy rank 0 -> rank 1 over the pipeline's transfer engine (best of
    2, max over ranks): what a planned copy costs on the cores that also compute."""
    from megatron_probe.mechanism.transfer import CopyOp

    ts = []
    scratch = [torch.empty_like(bank.fc1[0]), torch.empty_like(bank.fc2[0])] if rank == 1 else None
    if pipe.engine.pulls:  # a pull copy reads rank 0's rows from rank 1 (rank 0 takes no part)
        source = bank.remote_rows(0) if rank == 1 else None
    else:
        source = [bank.fc1[0], bank.fc2[0]] if rank == 0 else None
    for _ in range(2):
        if bank.fc1.device.type == "cuda":
            torch.cuda.synchronize()  # a device-ordered copy would otherwise wait for queued work too
        dist.barrier(group=group)
        t0 = time.perf_counter()
        batch = pipe.engine.submit([CopyOp(0, 1, "probe-copy-cost")], [source], [scratch])
        batch.wait()
        ts.append((time.perf_counter() - t0) * 1e6)
    c = torch.tensor([min(ts)], dtype=torch.float64)
    dist.all_reduce(c, op=dist.ReduceOp.MAX, group=group)
    return float(c[0])
