#!/usr/bin/env python3
"""Warm-start the lookahead predictors offline and save their state beside the checkpoint.

Trains each predictor's residual MLP (the frozen router copy stays fixed) to match the true
router's distribution, on (a) recorded traces with hidden states (``--trace``), or (b) by default
a workload cut from the corpus's *training* split, replayed through the model here, so every
evaluation workload (held-out split) stays unseen. Reports the fit on a held-back 10% of tokens.

  python tools/distill_predictor.py                      # -> checkpoints/tiny-moe-v1/predictor.pt
  python tools/distill_predictor.py --trace traces/train.pt --out /tmp/predictor.pt
"""

import argparse
import datetime
import json
import os
import platform
import sys
import time
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
warnings.filterwarnings("ignore")

import torch


def fit_report(preds, data, spec):
    """Loss, top-K accuracy and top-2K recall of ``preds`` on ``data``, per layer."""
    from megatron_probe.policy.prediction_metrics import topk_overlap
    from megatron_probe.policy.predictor import distill_loss, select_topk

    out = {}
    with torch.no_grad():
        for L, (x, y) in data.items():
            p = preds[L]
            logits = p(x)
            true = select_topk(y, spec, p.expert_bias)
            pk = select_topk(logits, spec, p.expert_bias, k=2 * spec.topk)
            out[L] = {"loss": round(float(distill_loss(logits, y, spec, p.expert_bias)), 4),
                      "topk_acc": round(float(topk_overlap(pk[:, : spec.topk], true).float().mean()) / spec.topk, 4),
                      "recall_2k": round(float(topk_overlap(pk, true).float().mean()) / spec.topk, 4)}
    return out


def training_split_workload(checkpoint, requests, seed):
    from tokenizers import Tokenizer

    from megatron_probe.data.corpus import build_corpus
    from megatron_probe.data.workloads import build_workload
    from megatron_probe.experiments.tiny_moe import TinyMoEConfig

    tok = Tokenizer.from_file(os.path.join(checkpoint, "tokenizer.json"))
    cfg = TinyMoEConfig.from_json(os.path.join(checkpoint, "config.json"))
    corpus = build_corpus()
    return build_workload("steady", {d: dc.train for d, dc in corpus.items()}, tok, seed=seed, num_requests=requests,
                          max_len=cfg.seq_length, prompt_range=(max(4, cfg.seq_length // 10), cfg.seq_length // 2),
                          output_range=(max(2, cfg.seq_length // 16), cfg.seq_length * 3 // 8), split="train")


def main(argv=None):
    from megatron_probe.experiments.tiny_moe import DEFAULT_CHECKPOINT

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT)
    p.add_argument("--trace", nargs="*", default=None, help="recorded traces with hidden states (default: replay "
                   "a training-split workload)")
    p.add_argument("--train-requests", type=int, default=480, help="requests of the training-split workload")
    p.add_argument("--residual-hidden", type=int, default=256, help="predictor residual width (ProbeConfig."
                   "predictor_hidden)")
    p.add_argument("--no-layer0", action="store_true", help="no same-layer predictor for MoE layer 0")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None, help="default: <checkpoint>/predictor.pt")
    p.add_argument("--json", default=None, help="write the fit report here")
    a = p.parse_args(argv)
    for name in ("train_requests", "epochs", "batch"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} {getattr(a, name)} must be >= 1")
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    import torch.distributed as dist

    from megatron_probe.config import ProbeConfig
    from megatron_probe.data.traces import load_trace
    from megatron_probe.mcore.launch import init_single_process
    from megatron_probe.runtime.lookahead import build_predictors, default_predictor_path, router_spec
    from megatron_probe.experiments.replay import (distillation_data, replay_requests, router_logits_fn,
                                                   trace_distillation_data, workload_sequences)
    from megatron_probe.experiments.tiny_moe import check_trace_for_checkpoint, load_model, read_checkpoint
    from megatron_probe.policy.distill import OnlineDistiller

    t0 = time.time()
    try:  # every input read and checked before the model is built; --out and --json are written at the end
        cfg, _, _ = read_checkpoint(a.checkpoint)
        traces = [(t, load_trace(t)) for t in a.trace or []]
        for t, tr in traces:
            check_trace_for_checkpoint(tr, t, cfg, hidden_layer=0)
    except ValueError as e:
        p.error(str(e))
    init_single_process(a.seed)
    model, _, cfg = load_model(a.checkpoint, spec="probe")
    pcfg = ProbeConfig(predictor_hidden=a.residual_hidden, predictor_layer0=not a.no_layer0)
    preds = build_predictors(model, pcfg)
    spec = router_spec(model.decoder.layers[0].mlp.config)
    layers = sorted(preds.layers)
    if a.trace:
        parts = []
        for t, tr in traces:
            try:
                parts.append(trace_distillation_data(tr, router_logits_fn(model), layers))
            except ValueError as e:
                p.error(f"{t}: {e}")
        data = {L: tuple(torch.cat([d[L][i] for d in parts]) for i in range(2)) for L in layers}
        source = "traces: " + ", ".join(a.trace)
    else:
        wl = training_split_workload(a.checkpoint, a.train_requests, a.seed)
        data = distillation_data(replay_requests(model, workload_sequences(wl)), layers)
        source = f"training-split 'steady' workload, {a.train_requests} requests, seed {a.seed}, replayed here"
    n = next(iter(data.values()))[0].shape[0]
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(a.seed))
    n_val = max(1, n // 10)
    val = {L: (x[perm[:n_val]], y[perm[:n_val]]) for L, (x, y) in data.items()}
    train = {L: (x[perm[n_val:]], y[perm[n_val:]]) for L, (x, y) in data.items()}
    print(f"{n} tokens ({n - n_val} train, {n_val} held back) from {source}; layers {layers}; "
          f"{time.time() - t0:.1f}s")
    before = fit_report(preds, val, spec)
    distiller = OnlineDistiller(preds, lr=a.lr)
    distiller.fit(train, epochs=a.epochs, batch_size=a.batch, seed=a.seed,
                  log=lambda ep, loss: print(f"  epoch {ep + 1}/{a.epochs}: mean loss "
                                             f"{sum(loss.values()) / len(loss):.4f}", flush=True))
    after = fit_report(preds, val, spec)
    print(f"{'layer':>5} {'loss':>15} {'top-K acc':>15} {'recall@2K':>15}   (held-back tokens: frozen -> distilled)")
    for L in layers:
        b, f = before[L], after[L]
        print(f"{L:>5} {b['loss']:>6.3f} -> {f['loss']:<6.3f} {b['topk_acc']:>6.3f} -> {f['topk_acc']:<6.3f} "
              f"{b['recall_2k']:>6.3f} -> {f['recall_2k']:<6.3f}")
    out = a.out or default_predictor_path(a.checkpoint)
    report = {"command": "python " + " ".join([os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:]),
              "date": datetime.date.today().isoformat(), "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
              f"torch {torch.__version__}", "source": source, "tokens": n, "held_back": n_val, "epochs": a.epochs,
              "lr": a.lr, "batch": a.batch, "residual_hidden": a.residual_hidden, "before": before, "after": after,
              "seconds": round(time.time() - t0, 1)}
    preds.save(out, extra=report)
    print(f"saved {out} ({os.path.getsize(out) / 1e3:.0f} kB) in {time.time() - t0:.1f}s")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(report, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
