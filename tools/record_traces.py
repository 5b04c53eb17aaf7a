#!/usr/bin/env python3
"""Replay a workload through the model and save its routing trace (megatron_probe.trace v1).

Each request's tokens (prompt + reference output) run through the model once; the engine
schedule (continuous batching, chunked prefill) then decides which tokens form each step. Routing
is per token and the model causal, so this equals what serving the workload step by step routes.
Per step and MoE layer the trace has the tokens' request, position, phase and source rank
(requests are spread over EP ranks round-robin), top-k expert ids and probabilities, and the
MoE-input hidden states of a sampled share of tokens (plus, under layer key -1, the same tokens'
pre-attention input of the layer holding MoE layer 0, which its same-layer predictor reads).

  python tools/record_traces.py --workload workloads/shift.json --out traces/shift.pt
"""

import argparse
import os
import time
import warnings

warnings.filterwarnings("ignore")

import torch


def main(argv=None):
    from megatron_probe.experiments.tiny_moe import DEFAULT_CHECKPOINT

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
    a = p.parse_args(argv)
    if not 0 <= a.hidden_fraction <= 1:
        p.error(f"--hidden-fraction {a.hidden_fraction} must be in [0, 1]")
    torch.set_num_threads(a.threads)
    import torch.distributed as dist

    from megatron_probe.data.traces import load_trace, save_trace
    from megatron_probe.experiments.recorder import build_trace
    from megatron_probe.data.workloads import Workload, check_workload_fits
    from megatron_probe.mcore.launch import init_single_process
    from megatron_probe.experiments.tiny_moe import load_model, read_checkpoint

    t0 = time.time()
    try:  # the inputs, checked before anything starts; --out is written only at the end
        wl = Workload.load(a.workload)
        cfg, _, _ = read_checkpoint(a.checkpoint)
        check_workload_fits(wl, a.workload, cfg.vocab_size, cfg.seq_length)
    except ValueError as e:
        p.error(str(e))
    if cfg.num_experts % a.ep:
        p.error(f"--ep {a.ep} does not divide the model's {cfg.num_experts} experts")
    init_single_process()
    try:
        model, tok, cfg = load_model(a.checkpoint, spec="probe")
    except ValueError as e:
        p.error(str(e))
    trace = build_trace(model, cfg, wl, a.ep, a.hidden_fraction, a.prefill_chunk, a.max_active, a.seed,
                        a.max_steps, model_name=os.path.basename(os.path.normpath(a.checkpoint)))
    save_trace(trace, a.out)
    back = load_trace(a.out)  # read back: the file is what the loader expects
    print(f"{a.out}: {len(back.steps)} steps, {back.n_tokens} tokens, {back.num_layers} layers, "
          f"{os.path.getsize(a.out) / 1e6:.1f} MB, {time.time() - t0:.1f}s")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
