#!/usr/bin/env python3
"""Write the serving workloads (steady, shift, repeat, bursty) from the held-out corpus split.

  python tools/make_workloads.py --out workloads
  python tools/make_workloads.py --split train --scenarios steady --out /tmp/train   # predictor warm start
"""

import argparse
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
    from megatron_probe.data.corpus import build_corpus
    from megatron_probe.data.workloads import SCENARIOS, build_workload, schedule_steps
    from megatron_probe.experiments.tiny_moe import DEFAULT_CHECKPOINT, TinyMoEConfig

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT, help="its tokenizer and sequence length are used")
    p.add_argument("--out", default=os.path.join(ROOT, "workloads"))
    p.add_argument("--scenarios", nargs="*", default=list(SCENARIOS))
    p.add_argument("--requests", type=int, default=160)
    p.add_argument("--steps", type=int, default=400, help="arrivals spread over the first 3/4 of this")
    p.add_argument("--shift-step", type=int, default=200)
    p.add_argument("--max-bytes-per-domain", type=int, default=3_000_000, help="as in training (same split)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split", choices=("heldout", "train"), default="heldout",
                   help="documents to cut requests from (train: only for distilling predictors)")
    a = p.parse_args()
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(os.path.join(a.checkpoint, "tokenizer.json"))
    cfg = TinyMoEConfig.from_json(os.path.join(a.checkpoint, "config.json"))
    corpus = build_corpus(a.max_bytes_per_domain)
    docs = {d: (dc.heldout if a.split == "heldout" else dc.train) for d, dc in corpus.items()}
    prompt_range = (max(4, cfg.seq_length // 10), cfg.seq_length // 2)
    output_range = (max(2, cfg.seq_length // 16), cfg.seq_length * 3 // 8)
    for i, sc in enumerate(a.scenarios):
        wl = build_workload(sc, docs, tok, seed=a.seed + i, num_requests=a.requests, steps=a.steps,
                            max_len=cfg.seq_length, prompt_range=prompt_range, output_range=output_range,
                            shift_step=a.shift_step, split=a.split,
                            tokenizer_name=os.path.relpath(os.path.join(a.checkpoint, "tokenizer.json"), ROOT))
        path = os.path.join(a.out, f"{sc}.json")
        wl.save(path)
        sched = schedule_steps(wl)
        doms = sorted({r.domain for r in wl.requests})
        print(f"{path}: {len(wl.requests)} requests, domains {doms}, {len(sched)} engine steps, "
              f"{sum(s.num_tokens for s in sched)} tokens")


if __name__ == "__main__":
    main()
