"""Soak: many engine steps of the live pipeline with replicas changing, watched for leaks and for
any output that differs from the plain model.

A small GPT whose routing is forced onto one hot expert per MoE layer (an expert bias), the hot
expert moving to another rank every ``shift_every`` steps, so the pipeline keeps planning and
copying replicas (streamed: every step; resident: after each shift). Every rank runs two copies
of the model with the same weights: one with the pipeline attached, one plain. Each step both
forward the same tokens, and the logits must agree within fp32 tolerance. Every ``sample_every``
steps each rank records its resident memory (``VmRSS``), its thread count, its open file
descriptors, the process groups it holds and the replica memory. Growth is measured from the
first sample after ``warmup`` steps, once the allocator and caches have settled.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
import torch.distributed as dist


@dataclass
class SoakOptions:
    steps: int = 2000
    replica_mode: str = "streamed"  # streamed | resident
    sample_every: int = 100
    warmup: int = 100  # growth is measured from the first sample at or after this step
    shift_every: int = 250  # the hot expert of every layer moves this often
    rss_growth_bound: float = 0.05  # resident memory may grow at most this share after the warm-up
    tolerance: float = 1e-5  # relative to the logits' largest magnitude
    seed: int = 0

    def __post_init__(self):
        if self.replica_mode not in ("streamed", "resident"):
            raise ValueError(f"replica_mode={self.replica_mode!r}; valid: 'streamed', 'resident'")
        for name in ("steps", "sample_every", "shift_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}; valid: >= 1")
        if not 0 <= self.warmup < self.steps:
            raise ValueError(f"warmup={self.warmup}; valid: 0 <= warmup < steps ({self.steps})")


def _rss_bytes() -> int:
    """This process's resident set (Linux ``/proc``; 0 where there is none)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _open_fds() -> int:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return -1


def _process_groups() -> int:
    return len(dist.distributed_c10d._world.pg_map)


def _set_hot(model, hot: List[int], num_experts: int) -> None:
    from megatron_probe.runtime.model_walk import moe_layers

    for layer, e in zip(moe_layers(model), hot):
        bias = torch.zeros(num_experts)
        bias[e] = 5.0
        layer.router._cpu_buffer("expert_bias", bias, persistent=True)


def _build(ep: int, cfg, probe_cfg):
    from megatron_probe.experiments.tiny_moe import build_model
    from megatron_probe.runtime.model_walk import moe_layers

    torch.manual_seed(0)
    model = build_model(cfg, spec="probe", probe_config=probe_cfg, ep=ep)
    model.eval()
    for layer in moe_layers(model):
        r = layer.router
        r.enable_expert_bias = True
        r._cpu_buffer("local_tokens_per_expert", torch.zeros(cfg.num_experts), persistent=False)
    return model


def soak_rank(rank: int, ws: int, opts: SoakOptions) -> Optional[Dict]:
    """Run the soak on this rank; rank 0 returns the report (every rank's samples)."""
    import warnings

    warnings.filterwarnings("ignore")
    from megatron_probe import ProbeConfig
    from megatron_probe.experiments.tiny_moe import TinyMoEConfig, forward_logits
    from megatron_probe.mcore.cpu import initialize_megatron_parallel
    from megatron_probe.policy.cost_model import ExpertCost
    from megatron_probe.runtime.pipeline import LookaheadPipeline

    initialize_megatron_parallel(ws)
    cfg = TinyMoEConfig(num_layers=4, hidden_size=32, num_attention_heads=4, num_experts=8, topk=2,
                        expert_ffn_hidden=16, seq_length=64, vocab_size=128, score_function="sigmoid")
    probe_cfg = ProbeConfig(replica_slots_per_rank=2, replica_mode=opts.replica_mode)
    plain, model = _build(ws, cfg, probe_cfg), _build(ws, cfg, probe_cfg)
    model.load_state_dict(plain.state_dict())
    # unit cost, no gate: even these tiny batches are worth balancing, so replicas keep changing
    pipe = LookaheadPipeline(model, ProbeConfig(replica_slots_per_rank=2, replica_mode=opts.replica_mode,
                                                predictor_hidden=8, cost_gate=False), cost=ExpertCost(1.0, 0.0))
    gen = torch.Generator().manual_seed(opts.seed * 1000 + rank)
    E, L = cfg.num_experts, cfg.num_experts // ws
    samples: List[Dict] = []
    worst = 0.0
    t0 = time.perf_counter()
    try:
        with torch.inference_mode():
            for step in range(opts.steps):
                if step % opts.shift_every == 0:  # the hot expert moves to the next rank
                    epoch = step // opts.shift_every
                    hot = [((i + epoch) % ws) * L + (i + epoch) % L for i in range(cfg.num_layers)]
                    _set_hot(plain, hot, E)
                    _set_hot(model, hot, E)
                tokens = torch.randint(0, 6 if step % 2 else cfg.vocab_size,
                                       (1, 12 + int(torch.randint(0, 24, (), generator=gen))), generator=gen)
                want = forward_logits(plain, tokens)
                got = forward_logits(model, tokens)
                pipe.end_step()
                worst = max(worst, float((got - want).abs().max() / want.abs().max().clamp_min(1e-30)))
                if step % opts.sample_every == 0 or step == opts.steps - 1:
                    s = pipe.summary()
                    samples.append({"step": step, "rss_bytes": _rss_bytes(), "threads": threading.active_count(),
                                    "open_fds": _open_fds(), "process_groups": _process_groups(),
                                    "replica_bytes": pipe.replica_memory_bytes(), "copies": s.get("copies", 0),
                                    "seconds": round(time.perf_counter() - t0, 2)})
        summary = pipe.summary()
    finally:
        pipe.close()
    rows = [None] * ws
    dist.all_gather_object(rows, {"rank": rank, "samples": samples, "max_rel_diff": worst, "summary": summary})
    if rank != 0:
        return None
    return report(opts, ws, rows)


def report(opts: SoakOptions, ws: int, rows: List[Dict]) -> Dict:
    """Per rank: growth of each watched quantity from the first sample after the warm-up to the
    last, and whether the run passed (outputs equal, memory within the bound, no thread, file
    descriptor, process group or replica memory added)."""
    per_rank = []
    for row in rows:
        base = next(s for s in row["samples"] if s["step"] >= opts.warmup)
        last = row["samples"][-1]
        per_rank.append({
            "rank": row["rank"], "max_rel_diff": row["max_rel_diff"],
            "rss_growth": (last["rss_bytes"] - base["rss_bytes"]) / max(1, base["rss_bytes"]),
            "threads_added": last["threads"] - base["threads"], "fds_added": last["open_fds"] - base["open_fds"],
            "groups_added": last["process_groups"] - base["process_groups"],
            "replica_bytes_added": last["replica_bytes"] - base["replica_bytes"],
            "copies": row["summary"].get("copies", 0), "engine_disabled": row["summary"].get("engine_disabled"),
        })
    failures = []
    for r in per_rank:
        if not r["max_rel_diff"] <= opts.tolerance:
            failures.append(f"rank {r['rank']}: output differs from the plain model by {r['max_rel_diff']:.3e} "
                            f"(relative; tolerance {opts.tolerance})")
        if r["rss_growth"] > opts.rss_growth_bound:
            failures.append(f"rank {r['rank']}: resident memory grew {100 * r['rss_growth']:.1f}% after step "
                            f"{opts.warmup} (bound {100 * opts.rss_growth_bound:.0f}%)")
        for key in ("threads_added", "fds_added", "groups_added", "replica_bytes_added"):
            if r[key] > 0:
                failures.append(f"rank {r['rank']}: {key.replace('_', ' ')} {r[key]} after step {opts.warmup}")
        if r["copies"] == 0:
            failures.append(f"rank {r['rank']}: no replica was ever copied: the soak did not exercise copying")
    return {"options": dataclasses.asdict(opts), "ep": ws, "per_rank": per_rank, "failures": failures,
            "passed": not failures, "samples": {row["rank"]: row["samples"] for row in rows}}
