#!/usr/bin/env python3
"""Replay a workload through the model and save its routing trace (megatron_probe.trace v1).

Each request's tokens (prompt + reference output) run through the model once; the engine
schedule (continuous batching, chunked prefill) then decides which tokens form each step. Routing
is per token and the model causal, so this equals what serving the workload step by step routes.
Per step and MoE layer the trace has the tokens' request, position, phase and source rank
(requests are spread over EP ranks round-robin), top-k expert ids and probabilities, and the
MoE-input hidden states of a sampled share of tokens.

  python tools/record_traces.py --workload workloads/shift.json --out traces/shift.pt
"""

import argparse
import os
import sys
import time
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
warnings.filterwarnings("ignore")

import torch  # noqa: E402


def build_trace(model, cfg, workload, ep, hidden_fraction, prefill_chunk, max_active, seed, max_steps=None,
                model_name="tiny-moe"):
    from megatron_probe.data.traces import RoutingTrace, TraceStep
    from megatron_probe.data.workloads import schedule_steps
    from megatron_probe.integration.recorder import record_sequences

    reqs = {r.id: r for r in workload.requests}
    seqs = {rid: (r.prompt_ids + r.output_ids)[: r.prompt_tokens + r.output_tokens - 1] for rid, r in reqs.items()}
    schedule = schedule_steps(workload, prefill_chunk=prefill_chunk, max_active=max_active, max_steps=max_steps)
    used = sorted({rid for st in schedule for rid, _, _ in st.chunks})
    per_req = dict(zip(used, record_sequences(model, [seqs[r] for r in used], record_hidden=hidden_fraction > 0)))
    gen = torch.Generator().manual_seed(seed)
    L = cfg.num_layers
    steps = []
    for st in schedule:
        ids, prs, rid_l, pos_l, phase_l = [], [], [], [], []
        for rid, s, e in st.chunks:
            rec = per_req[rid]
            ids.append(torch.stack([rec[l][1][s:e] for l in range(L)]))
            prs.append(torch.stack([rec[l][2][s:e] for l in range(L)]))
            rid_l += [rid] * (e - s)
            pos_l += list(range(s, e))
            phase_l += [0 if p < reqs[rid].prompt_tokens else 1 for p in range(s, e)]
        T = len(rid_l)
        hidden = None
        if hidden_fraction > 0 and T:
            keep = (torch.rand(T, generator=gen) < hidden_fraction).nonzero().flatten()
            hidden = {}
            for l in range(L):
                rows = torch.cat([per_req[rid][l][0][s:e] for rid, s, e in st.chunks])
                hidden[l] = (keep, rows[keep].to(torch.bfloat16))
        rid_t = torch.tensor(rid_l, dtype=torch.long)
        steps.append(TraceStep(
            topk_ids=torch.cat(ids, 1) if ids else torch.zeros(L, 0, cfg.topk, dtype=torch.long),
            topk_probs=torch.cat(prs, 1) if prs else torch.zeros(L, 0, cfg.topk),
            request_id=rid_t, position=torch.tensor(pos_l, dtype=torch.long),
            phase=torch.tensor(phase_l, dtype=torch.long), source_rank=rid_t % ep, hidden=hidden))
    return RoutingTrace(model=model_name, num_layers=L, num_experts=cfg.num_experts, topk=cfg.topk,
                        source=f"recorded:{workload.scenario}", steps=steps,
                        notes=f"recorded by tools/record_traces.py; ep={ep} (source_rank = request id % ep); "
                              f"hidden states for ~{hidden_fraction:.0%} of tokens",
                        extra={"ep": ep, "prefill_chunk": prefill_chunk, "max_active": max_active,
                               "scenario": workload.scenario, "hidden_fraction": hidden_fraction})


def main():
    from megatron_probe.integration.tiny_moe import DEFAULT_CHECKPOINT

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT)
    p.add_argument("--workload", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--ep", type=int, default=8, help="EP size that source ranks refer to")
    p.add_argument("--hidden-fraction", type=float, default=0.25, help="share of tokens whose hidden states are kept")
    p.add_argument("--prefill-chunk", type=int, default=64)
    p.add_argument("--max-active", type=int, default=32)
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    if not 0 <= a.hidden_fraction <= 1:
        p.error(f"--hidden-fraction {a.hidden_fraction} must be in [0, 1]")
    torch.set_num_threads(a.threads)
    import torch.distributed as dist

    from megatron_probe.data.traces import load_trace, save_trace
    from megatron_probe.data.workloads import Workload
    from megatron_probe.integration.launch import init_single_process
    from megatron_probe.integration.tiny_moe import load_model

    init_single_process()
    t0 = time.time()
    model, tok, cfg = load_model(a.checkpoint, spec="probe")
    wl = Workload.load(a.workload)
    if cfg.num_experts % a.ep:
        p.error(f"--ep {a.ep} does not divide the model's {cfg.num_experts} experts")
    trace = build_trace(model, cfg, wl, a.ep, a.hidden_fraction, a.prefill_chunk, a.max_active, a.seed,
                        a.max_steps, model_name=os.path.basename(os.path.normpath(a.checkpoint)))
    save_trace(trace, a.out)
    back = load_trace(a.out)  # read back: the file is what the loader expects
    print(f"{a.out}: {len(back.steps)} steps, {back.n_tokens} tokens, {back.num_layers} layers, "
          f"{os.path.getsize(a.out) / 1e6:.1f} MB, {time.time() - t0:.1f}s")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
