#!/usr/bin/env python3
"""Greedy samples from the shipped checkpoint, loaded once with the stock Megatron MoE spec and
once with the PROBE spec, for in-domain prompts from held-out text; writes Markdown.

  python tools/sample_tiny_moe.py --out checkpoints/tiny-moe-v1/samples.md
"""

import argparse
import os
import sys
import time
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
warnings.filterwarnings("ignore")

import torch


def main(argv=None):
    from megatron_probe.experiments.tiny_moe import DEFAULT_CHECKPOINT

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT)
    p.add_argument("--out", default=None)
    p.add_argument("--prompt-tokens", type=int, default=48)
    p.add_argument("--new-tokens", type=int, default=48)
    p.add_argument("--per-domain", type=int, default=2)
    p.add_argument("--max-bytes-per-domain", type=int, default=3_000_000)
    a = p.parse_args(argv)
    torch.set_num_threads(2)
    import torch.distributed as dist

    from megatron_probe.data.corpus import build_corpus
    from megatron_probe.mcore.launch import init_single_process
    from megatron_probe.experiments.tiny_moe import greedy_generate, load_model, read_checkpoint

    try:  # the checkpoint's files, checked before anything starts; --out is written at the end
        read_checkpoint(a.checkpoint)
    except ValueError as e:
        p.error(str(e))
    init_single_process()
    probe, tok, cfg = load_model(a.checkpoint, spec="probe")
    stock, _, _ = load_model(a.checkpoint, spec="stock")
    eot = tok.token_to_id("<|endoftext|>")
    corpus = build_corpus(a.max_bytes_per_domain)
    lines = [f"# Greedy samples from `{os.path.relpath(a.checkpoint, ROOT)}`", "",
             f"`python tools/sample_tiny_moe.py` on {time.strftime('%Y-%m-%d')}. Prompts: the first "
             f"{a.prompt_tokens} tokens of held-out files (never seen in training); {a.new_tokens} new tokens, "
             "greedy. Each sample was generated twice, with the stock Megatron MoE layer spec and with the "
             "PROBE spec; the last column says whether the two token sequences are identical.", ""]
    same_all = True
    for d in sorted(corpus):
        for doc in corpus[d].heldout[: a.per_domain]:
            ids = tok.encode(doc.text).ids[: a.prompt_tokens]
            out_p = greedy_generate(probe, ids, a.new_tokens, cfg.seq_length, eot)
            out_s = greedy_generate(stock, ids, a.new_tokens, cfg.seq_length, eot)
            same = out_p == out_s
            same_all &= same
            lines += [f"## {d}: `{doc.path}`", "", "prompt:", "", "```", tok.decode(ids), "```", "",
                      f"continuation (stock == PROBE: {'yes' if same else 'NO'}):", "", "```",
                      tok.decode(out_p), "```", ""]
            print(d, doc.path, "same" if same else "DIFFERENT", flush=True)
    lines.append(f"All samples identical between the stock and the PROBE spec: {'yes' if same_all else 'NO'}.")
    text = "\n".join(lines) + "\n"
    if a.out:
        with open(a.out, "w") as f:
            f.write(text)
    else:
        print(text)
    dist.destroy_process_group()
    return 0 if same_all else 1


if __name__ == "__main__":
    sys.exit(main())
