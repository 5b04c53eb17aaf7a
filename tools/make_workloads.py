#!/usr/bin/env python3
"""Write the serving workloads (steady, shift, repeat, bursty, prefill, onset) from the held-out corpus split.

  python tools/make_workloads.py --out workloads
  python tools/make_workloads.py --scenarios prefill          # only workloads/prefill.json
  python tools/make_workloads.py --split train --scenarios steady --out /tmp/train   # predictor warm start
"""

import argparse
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_REQUESTS, DEFAULT_STEPS = 160, 400
# prefill: ~13 long prompts arriving a step keep > 2 x 1024 tokens a step in the EP 2 scaled regime
PREFILL_REQUESTS, PREFILL_STEPS = 640, 64
# onset: 32 light requests over the first 24 steps, then ~14 long prompts a step until step 48
ONSET_REQUESTS, ONSET_STEPS = 384, 64


def main(argv=None):
    from megatron_probe.data.corpus import build_corpus
    from megatron_probe.data.workloads import SCENARIOS, build_workload, length_ranges, schedule_steps
    from megatron_probe.experiments.tiny_moe import DEFAULT_CHECKPOINT, read_checkpoint

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT, help="its tokenizer and sequence length are used")
    p.add_argument("--out", default=os.path.join(ROOT, "workloads"))
    p.add_argument("--scenarios", nargs="*", default=list(SCENARIOS))
    p.add_argument("--requests", type=int, default=None,
                   help=f"default {DEFAULT_REQUESTS}, prefill {PREFILL_REQUESTS}")
    p.add_argument("--steps", type=int, default=None,
                   help=f"arrivals spread over the first 3/4 of this; default {DEFAULT_STEPS}, prefill {PREFILL_STEPS}")
    p.add_argument("--shift-step", type=int, default=200, help="shift only (prefill switches at its middle request)")
    p.add_argument("--onset-step", type=int, default=None,
                   help="onset only: first step of the burst (default: half the arrival window, 3/8 of --steps)")
    p.add_argument("--prefill-from", default="english", help="prefill: dominant domain of the first half")
    p.add_argument("--prefill-to", default="de_fr", help="prefill: dominant domain of the second half; onset: of the burst")
    p.add_argument("--max-bytes-per-domain", type=int, default=3_000_000, help="as in training (same split)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split", choices=("heldout", "train"), default="heldout",
                   help="documents to cut requests from (train: only for distilling predictors)")
    a = p.parse_args(argv)
    for sc in a.scenarios:
        if sc not in SCENARIOS:
            p.error(f"unknown scenario {sc!r}; valid: {', '.join(SCENARIOS)}")
    try:  # the checkpoint's config and tokenizer, checked before any workload is written
        cfg, tok, _ = read_checkpoint(a.checkpoint, state=False)
    except ValueError as e:
        p.error(str(e))
    corpus = build_corpus(a.max_bytes_per_domain)
    docs = {d: (dc.heldout if a.split == "heldout" else dc.train) for d, dc in corpus.items()}
    for sc in a.scenarios:
        prompt_range, output_range = length_ranges(sc, cfg.seq_length)
        requests = a.requests or {"prefill": PREFILL_REQUESTS, "onset": ONSET_REQUESTS}.get(sc, DEFAULT_REQUESTS)
        steps = a.steps or {"prefill": PREFILL_STEPS, "onset": ONSET_STEPS}.get(sc, DEFAULT_STEPS)
        shift = dict(shift_from=a.prefill_from, shift_to=a.prefill_to) if sc in ("prefill", "onset") else {}
        shift_step = ((steps * 3 // 8 if a.onset_step is None else a.onset_step) if sc == "onset"
                      else a.shift_step)
        # seed by the scenario's place in SCENARIOS: one scenario alone gets the seed of a full run
        wl = build_workload(sc, docs, tok, seed=a.seed + SCENARIOS.index(sc), num_requests=requests, steps=steps,
                            max_len=cfg.seq_length, prompt_range=prompt_range, output_range=output_range,
                            shift_step=shift_step, split=a.split, **shift,
                            tokenizer_name=os.path.relpath(os.path.join(a.checkpoint, "tokenizer.json"), ROOT))
        path = os.path.join(a.out, f"{sc}.json")
        wl.save(path)
        sched = schedule_steps(wl)
        doms = sorted({r.domain for r in wl.requests})
        print(f"{path}: {len(wl.requests)} requests, domains {doms}, {len(sched)} engine steps, "
              f"{sum(s.num_tokens for s in sched)} tokens")


if __name__ == "__main__":
    main()
