#!/usr/bin/env python3
"""Train the project's small MoE (Megatron-Core GPTModel, every layer MoE) on CPU on real text.

The corpus is built from files every machine of the project has (megatron_probe/data/corpus.py:
Python stdlib, C headers, English man pages and docs, shell scripts, German+French and
Japanese+Russian man pages), one file in ten held out. A byte-level BPE tokenizer is trained
on the training split. No auxiliary balance loss: hot experts are allowed to appear.
Deterministic for a given seed and machine image; the record next to the checkpoint has the
command, the corpus fingerprint, the loss curve and the per-domain held-out loss.

  python tools/train_tiny_moe.py --out checkpoints/tiny-moe-v1            (about 30 min, 2 cores)
  python tools/train_tiny_moe.py --smoke --out /tmp/smoke                 (seconds; for tests)
"""

import argparse
import json
import math
import os
import shlex
import sys
import time
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
warnings.filterwarnings("ignore")

import torch
import torch.distributed as dist

EOT = "<|endoftext|>"


def train_tokenizer(corpus, vocab_size):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    texts = [d.text for dc in corpus.values() for d in dc.train]
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return tok


def encode_split(tok, docs):
    eot = tok.token_to_id(EOT)
    ids = []
    for enc in tok.encode_batch([d.text for d in docs]):
        ids.extend(enc.ids)
        ids.append(eot)
    return torch.tensor(ids, dtype=torch.long)


def sample_batch(streams, domains, batch, seq, gen):
    xs = []
    for _ in range(batch):
        d = domains[int(torch.randint(len(domains), (), generator=gen))]
        s = streams[d]
        i = int(torch.randint(0, len(s) - seq - 1, (), generator=gen))
        xs.append(s[i:i + seq + 1])
    x = torch.stack(xs)
    return x[:, :-1], x[:, 1:]


def fixed_eval_batches(streams, seq, per_domain, seed):
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for d, s in streams.items():
        n = min(per_domain, max(1, (len(s) - 1) // seq))
        starts = torch.randint(0, len(s) - seq - 1, (n,), generator=gen).tolist()
        x = torch.stack([s[i:i + seq + 1] for i in starts])
        out[d] = (x[:, :-1], x[:, 1:])
    return out


@torch.no_grad()
def evaluate(model, batches):
    from megatron_probe.experiments.tiny_moe import causal_mask

    model.eval()
    res = {}
    for d, (x, y) in batches.items():
        losses = []
        for i in range(0, x.shape[0], 8):
            xb, yb = x[i:i + 8], y[i:i + 8]
            pos = torch.arange(xb.shape[1]).unsqueeze(0).expand(xb.shape[0], -1)
            losses.append(model(xb, pos, causal_mask(xb.shape[1]), labels=yb).float().mean().item() * xb.shape[0])
        res[d] = sum(losses) / x.shape[0]
    model.train()
    return res


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.path.join(ROOT, "checkpoints", "tiny-moe-v1"))
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-bytes-per-domain", type=int, default=3_000_000)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--eval-seqs", type=int, default=24, help="held-out sequences per domain")
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--experts", type=int, default=32)
    p.add_argument("--topk", type=int, default=4)
    p.add_argument("--expert-ffn", type=int, default=64)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--smoke", action="store_true", help="tiny model, tiny corpus, 3 steps")
    a = p.parse_args()
    if a.smoke:
        a.steps, a.batch, a.layers, a.hidden, a.experts, a.topk, a.expert_ffn, a.seq, a.vocab = 3, 2, 2, 32, 8, 2, 16, 32, 300
        a.max_bytes_per_domain, a.eval_every, a.eval_seqs, a.warmup = 60_000, 2, 2, 1

    torch.manual_seed(a.seed)
    torch.set_num_threads(a.threads)
    from megatron_probe.data.corpus import build_corpus, corpus_fingerprint
    from megatron_probe.mcore.launch import init_single_process
    from megatron_probe.experiments.tiny_moe import TinyMoEConfig, build_model, causal_mask

    init_single_process(seed=a.seed)
    t_start = time.time()
    corpus = build_corpus(a.max_bytes_per_domain)
    tok = train_tokenizer(corpus, a.vocab)
    train_streams = {d: encode_split(tok, dc.train) for d, dc in corpus.items()}
    held_streams = {d: encode_split(tok, dc.heldout) for d, dc in corpus.items()}
    t_data = time.time() - t_start
    print(f"corpus {corpus_fingerprint(corpus)}: " + ", ".join(
        f"{d} {len(train_streams[d])}/{len(held_streams[d])} tok" for d in corpus) + f" ({t_data:.0f}s)", flush=True)

    cfg = TinyMoEConfig(num_layers=a.layers, hidden_size=a.hidden, num_attention_heads=4, num_experts=a.experts,
                        topk=a.topk, expert_ffn_hidden=a.expert_ffn, seq_length=a.seq,
                        vocab_size=tok.get_vocab_size())
    torch.manual_seed(a.seed)
    model = build_model(cfg, spec="probe")
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=a.lr, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / a.warmup) * (
        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / max(1, a.steps))))))
    gen = torch.Generator().manual_seed(a.seed + 1)
    domains = sorted(train_streams)
    eval_batches = fixed_eval_batches(held_streams, a.seq, a.eval_seqs, a.seed + 2)
    curve, evals = [], []
    t_train = time.time()
    for step in range(1, a.steps + 1):
        x, y = sample_batch(train_streams, domains, a.batch, a.seq, gen)
        pos = torch.arange(a.seq).unsqueeze(0).expand(a.batch, -1)
        loss = model(x, pos, causal_mask(a.seq), labels=y).float().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        curve.append([step, round(loss.item(), 4)])
        if step % 10 == 0 or step == 1:
            el = time.time() - t_train
            print(f"step {step}/{a.steps} loss {loss.item():.3f} lr {sched.get_last_lr()[0]:.2e} "
                  f"{el / step:.2f}s/step", flush=True)
        if step % a.eval_every == 0 or step == a.steps:
            ev = evaluate(model, eval_batches)
            evals.append({"step": step, "heldout_loss": {d: round(v, 4) for d, v in ev.items()},
                          "mean": round(sum(ev.values()) / len(ev), 4)})
            print(f"eval step {step}: " + " ".join(f"{d}={v:.3f}" for d, v in ev.items()), flush=True)
    train_seconds = time.time() - t_train

    os.makedirs(a.out, exist_ok=True)
    sd = {k: (v.to(torch.bfloat16) if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
          for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    torch.save(sd, os.path.join(a.out, "model.pt"))
    cfg.to_json(os.path.join(a.out, "config.json"))
    tok.save(os.path.join(a.out, "tokenizer.json"))
    # held-out loss of what ships (bf16 weights, loaded back)
    from megatron_probe.experiments.tiny_moe import load_model

    shipped, _, _ = load_model(a.out, spec="probe")
    final = evaluate(shipped, eval_batches)
    unigram = {}
    for d, s in held_streams.items():
        counts = torch.bincount(train_streams[d], minlength=cfg.vocab_size).double() + 1
        pr = counts / counts.sum()
        unigram[d] = round(float(-pr[s].log().mean()), 4)
    record = {
        "command": "python " + " ".join(shlex.quote(x) for x in [os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:]),
        "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
        "machine": f"{os.cpu_count()} CPUs, torch {torch.__version__}, {a.threads} threads",
        "seed": a.seed, "steps": a.steps, "batch": a.batch, "seq_length": a.seq, "lr": a.lr,
        "tokens_seen": a.steps * a.batch * a.seq, "parameters": n_params,
        "corpus_fingerprint": corpus_fingerprint(corpus),
        "corpus": {d: {"train_files": len(dc.train), "heldout_files": len(dc.heldout),
                       "train_tokens": len(train_streams[d]), "heldout_tokens": len(held_streams[d])}
                   for d, dc in corpus.items()},
        "data_seconds": round(t_data, 1), "train_seconds": round(train_seconds, 1),
        "seconds_per_step": round(train_seconds / a.steps, 3),
        "heldout_loss_bf16_checkpoint": {d: round(v, 4) for d, v in final.items()},
        "heldout_unigram_loss": unigram,
        "evals": evals, "loss_curve": curve, "aux_loss_coeff": 0.0,
        "heldout_eval": f"{a.eval_seqs} fixed sequences of {a.seq} tokens per domain",
    }
    with open(os.path.join(a.out, "training_record.json"), "w") as f:
        json.dump(record, f, indent=1)
    print(f"saved {a.out}: {n_params / 1e6:.2f}M parameters, {train_seconds:.0f}s training, held-out "
          + " ".join(f"{d}={v:.3f}" for d, v in final.items()), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
