#!/usr/bin/env python3
"""How well do the lookahead predictors forecast each MoE layer's experts, next to the baselines?

Replays a workload (held-out text) through the model with its continuous-batching schedule and,
step by step and layer by layer, scores side by side:

* ``distilled``: predictors warm-started offline (``tools/distill_predictor.py``), then distilled
  online on the stream exactly as the live layer does (predict step t, then learn from it);
* ``frozen``: the frozen router copy alone (no residual);
* ``warm_only`` / ``online_only``: the two halves of ``distilled`` on their own (ablation);
* ``prev_step``: the same layer's expert counts of the previous step (what EPLB-style statistics
  know), rescaled to this step's token count: counts only, no per-token forecast;
* ``prev_token``: each token reuses the experts of its request's latest token routed in an
  earlier step (decode: the previous token); a request's first chunk falls back to the previous
  step's most-used experts;
* ``prev_layer``: layer L-1's own true routing reused for layer L (none for layer 0).

``prev_step`` has nothing to say at step 0 and ``prev_layer`` at layer 0: those are left out of
their scores (so their "IR true" averages over slightly different steps and layers).

Metrics (see megatron_probe/policy/prediction_metrics.py): top-K accuracy, top-K/2 hit rate,
recall of the true top-K within the predicted top-2K, relative error of per-expert counts and of
per-rank load under the static placement at ``--ep``, and true vs predicted imbalance ratio. The
``shift`` workload is also reported before and after its domain switch.

  python tools/eval_predictor.py                  # shipped checkpoint + predictor, workloads/shift.json, EP 8
  python tools/eval_predictor.py --workload workloads/repeat.json --ep 4 --json /tmp/pred.json
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

from megatron_probe.mechanism.profiling import time_us

PREDICTOR_METHODS = ("distilled", "frozen", "warm_only", "online_only")
BASELINES = ("prev_step", "prev_token", "prev_layer")


def build_methods(model, pcfg, warm_path):
    """name -> (PredictorSet, OnlineDistiller | None)."""
    from megatron_probe.runtime.lookahead import build_predictors
    from megatron_probe.policy.distill import OnlineDistiller

    def distiller(preds, online):
        return OnlineDistiller(preds, lr=pcfg.predictor_lr, period=pcfg.predictor_period,
                               sample_tokens=pcfg.predictor_sample_tokens, frozen=not online)

    out = {}
    warm = pcfg.replace(predictor_state=warm_path)
    cold = pcfg.replace(predictor_state=None)
    p = build_predictors(model, warm)
    out["distilled"] = (p, distiller(p, True))
    out["frozen"] = (build_predictors(model, cold.replace(predictor_hidden=0)), None)
    out["warm_only"] = (build_predictors(model, warm), None)
    p = build_predictors(model, cold)
    out["online_only"] = (p, distiller(p, True))
    return out


def evaluate(model, workload, pcfg, warm_path, ep, prefill_chunk=64, max_active=32, max_steps=None, log=print):
    from megatron_probe.data.workloads import schedule_steps
    from megatron_probe.runtime.lookahead import router_spec
    from megatron_probe.runtime.model_walk import moe_layers
    from megatron_probe.experiments.replay import replay_requests, workload_sequences
    from megatron_probe.policy.prediction_metrics import PredictionStats
    from megatron_probe.policy.predictor import expert_counts, select_topk

    spec = router_spec(moe_layers(model)[0].config)
    E, K = spec.num_experts, spec.topk
    if E % ep:
        raise ValueError(f"--ep {ep} does not divide the model's {E} experts")
    sched = schedule_steps(workload, prefill_chunk=prefill_chunk, max_active=max_active, max_steps=max_steps)
    seqs = workload_sequences(workload)
    used = sorted({rid for st in sched for rid, _, _ in st.chunks})
    t0 = time.time()
    routing = replay_requests(model, {r: seqs[r] for r in used})
    methods = build_methods(model, pcfg, warm_path)
    n_layers = len(moe_layers(model))
    eb = methods["frozen"][0][0].expert_bias
    K2 = min(2 * K, E)
    true2k = {r: [select_topk(rt.logits[L], spec, eb, k=K2) for L in range(n_layers)] for r, rt in routing.items()}
    log(f"replayed {len(used)} requests through the model in {time.time() - t0:.1f}s; {len(sched)} engine steps")

    shift = workload.extra.get("shift_step") if workload.scenario == "shift" else None
    segments = ["all"] + (["before_switch", "after_switch"] if shift is not None else [])
    names = list(methods) + list(BASELINES)
    stats = {seg: {m: PredictionStats(ep=ep, topk=K) for m in names} for seg in segments}
    prev_counts = [None] * n_layers
    last_known = {}  # request id -> latest position routed in an earlier step
    t0 = time.time()
    with torch.no_grad():
        for t, st in enumerate(sched):
            if not st.chunks:
                continue
            segs = ["all"] + ([] if shift is None else ["before_switch" if st.step < shift else "after_switch"])
            T = st.num_tokens
            for L in range(n_layers):
                x = torch.cat([routing[r].inputs[L][s:e] for r, s, e in st.chunks])
                y = torch.cat([routing[r].logits[L][s:e] for r, s, e in st.chunks])
                tk = torch.cat([true2k[r][L][s:e] for r, s, e in st.chunks])
                true = tk[:, :K]
                true_counts = expert_counts(true, E)
                preds = {}
                for m, (ps, dist_) in methods.items():
                    if L in ps:
                        pk = ps[L].predict_topk(x, k=K2)
                        preds[m] = (pk[:, :K], pk, expert_counts(pk[:, :K], E))
                        if dist_ is not None:
                            idx = dist_.sample_index(T)
                            dist_.observe(L, x if idx is None else x[idx], y if idx is None else y[idx])
                if prev_counts[L] is not None:
                    pc = prev_counts[L].double()
                    preds["prev_step"] = (None, None, pc * (T * K) / pc.sum())
                fallback = (prev_counts[L].argsort(descending=True, stable=True)[:K2] if prev_counts[L] is not None
                            else torch.arange(K2))
                rows = []
                for r, s, e in st.chunks:
                    last = last_known.get(r)
                    src = fallback if last is None else true2k[r][L][last]
                    rows.append(src.unsqueeze(0).expand(e - s, -1))
                pt = torch.cat(rows)
                preds["prev_token"] = (pt[:, :K], pt, expert_counts(pt[:, :K], E))
                if L >= 1:
                    pl = torch.cat([true2k[r][L - 1][s:e] for r, s, e in st.chunks])
                    preds["prev_layer"] = (pl[:, :K], pl, expert_counts(pl[:, :K], E))
                for m, (pk, p2k, counts) in preds.items():
                    for seg in segs:
                        stats[seg][m].add_tokens(L, true, pk, p2k)
                        stats[seg][m].add_counts(L, true_counts, counts)
                prev_counts[L] = true_counts
            for _, dist_ in methods.values():
                if dist_ is not None:
                    dist_.step()
            for r, s, e in st.chunks:
                last_known[r] = e - 1
    log(f"scored {len(names)} methods over {len(sched)} steps in {time.time() - t0:.1f}s")
    result = {seg: {"methods": {m: stats[seg][m].summary() for m in names}} for seg in segments}
    result["distill_updates"] = methods["distilled"][1].updates
    return result, methods


def cost_report(methods, hidden, tokens=2048, reps=30):
    """Parameters and MACs per layer against the router's, and measured CPU time per layer."""
    ps = methods["distilled"][0]
    p = ps[max(ps.layers)]
    out = dict(p.cost())
    x = torch.randn(tokens, hidden)

    def median_us(fn):
        return time_us(fn, reps=reps, warmup=3)

    from megatron_probe.policy.predictor import expert_counts, select_topk

    with torch.no_grad():
        router_us = median_us(lambda: select_topk(torch.nn.functional.linear(x, p.gate_weight), p.spec))
        pred_us = median_us(lambda: expert_counts(p.predict_topk(x), p.spec.num_experts))
    out.update({"tokens": tokens, "router_topk_us": round(router_us, 1), "predictor_counts_us": round(pred_us, 1),
                "time_ratio": round(pred_us / router_us, 2), "threads": torch.get_num_threads()})
    return out


def print_table(result, segments, K, ep):
    cols = ("mean_topk_acc", "mean_half_hit", "mean_recall_2k", "mean_count_err", "mean_rank_load_err",
            "mean_ir_true", "mean_ir_pred")
    head = ("top-K acc", "K/2 hit", "rec@2K", "count err", f"EP{ep} load err", "IR true", "IR pred")
    for seg in segments:
        print(f"\n[{seg}] means over layers (K={K}; - = not defined for the method)")
        print(f"{'method':<12}" + "".join(f"{h:>13}" for h in head))
        for m, s in result[seg]["methods"].items():
            print(f"{m:<12}" + "".join(f"{'-' if s[c] is None else format(s[c], '.3f'):>13}" for c in cols))
    print("\n[all] per layer: top-K acc / rec@2K / load err")
    ms = result["all"]["methods"]
    print(f"{'layer':<6}" + "".join(f"{m:>26}" for m in ms))
    for row in ms["distilled"]["layers"]:
        L = row["layer"]
        cells = []
        for m in ms:
            r = next((x for x in ms[m]["layers"] if x["layer"] == L), None)
            if r is None:
                cells.append("-")
            else:
                f = [("-" if r[c] is None else f"{r[c]:.3f}") for c in ("topk_acc", "recall_2k", "rank_load_err")]
                cells.append(" / ".join(f))
        print(f"{L:<6}" + "".join(f"{c:>26}" for c in cells))


def main(argv=None):
    from megatron_probe.experiments.tiny_moe import DEFAULT_CHECKPOINT

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT)
    p.add_argument("--predictor", default=None, help="warm-start state (default: <checkpoint>/predictor.pt)")
    p.add_argument("--workload", default=os.path.join(ROOT, "workloads", "shift.json"))
    p.add_argument("--ep", type=int, default=8)
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--prefill-chunk", type=int, default=64)
    p.add_argument("--max-active", type=int, default=32)
    p.add_argument("--predictor-hidden", type=int, default=256)
    p.add_argument("--predictor-lr", type=float, default=3e-4)
    p.add_argument("--predictor-period", type=int, default=1)
    p.add_argument("--predictor-sample-tokens", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    if a.ep < 1:
        p.error(f"--ep {a.ep} must be >= 1")
    torch.set_num_threads(a.threads)
    import torch.distributed as dist

    from megatron_probe.config import ProbeConfig
    from megatron_probe.data.workloads import Workload, check_workload_fits
    from megatron_probe.mcore.launch import init_single_process
    from megatron_probe.runtime.lookahead import default_predictor_path
    from megatron_probe.experiments.tiny_moe import check_predictor_state, load_model, read_checkpoint

    try:  # every input read and checked before the model is built; --json is written at the end
        shape, _, state = read_checkpoint(a.checkpoint)
    except ValueError as e:
        p.error(str(e))
    if shape.num_experts % a.ep:
        p.error(f"--ep {a.ep} does not divide the model's {shape.num_experts} experts")
    warm = a.predictor or default_predictor_path(a.checkpoint)
    if not os.path.exists(warm):
        p.error(f"no predictor state at {warm}: run tools/distill_predictor.py --checkpoint {a.checkpoint} first")
    try:
        check_predictor_state(warm, shape, state, a.predictor_hidden)
        wl = Workload.load(a.workload)
        check_workload_fits(wl, a.workload, shape.vocab_size, shape.seq_length)
    except ValueError as e:
        p.error(str(e))
    del state
    pcfg = ProbeConfig(predictor_hidden=a.predictor_hidden, predictor_lr=a.predictor_lr,
                       predictor_period=a.predictor_period, predictor_sample_tokens=a.predictor_sample_tokens)
    init_single_process()
    model, _, cfg = load_model(a.checkpoint, spec="probe")
    print(f"workload {a.workload}: {wl.scenario}, {len(wl.requests)} requests ({wl.source}); EP {a.ep}")
    result, methods = evaluate(model, wl, pcfg, warm, a.ep, a.prefill_chunk, a.max_active, a.max_steps)
    segments = [k for k in result if k != "distill_updates"]
    print_table(result, segments, cfg.topk, a.ep)
    cost = cost_report(methods, cfg.hidden_size)
    print(f"\ncost per layer: predictor {cost['predictor_params']} params / MACs per token vs router "
          f"{cost['router_params']}; CPU time for {cost['tokens']} tokens: predictor+counts "
          f"{cost['predictor_counts_us']:.0f} us vs router+top-k {cost['router_topk_us']:.0f} us "
          f"({cost['time_ratio']}x, {cost['threads']} threads)")
    if a.json:
        out = {"command": "python " + " ".join([os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:]),
               "date": datetime.date.today().isoformat(),
               "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
               "checkpoint": os.path.relpath(a.checkpoint, ROOT), "predictor": os.path.relpath(warm, ROOT),
               "workload": os.path.relpath(a.workload, ROOT), "scenario": wl.scenario, "ep": a.ep,
               "predictor_config": {k: v for k, v in pcfg.to_dict().items() if k.startswith("predictor_")},
               "methods": result["all"]["methods"],
               "segments": {k: result[k] for k in segments if k != "all"},
               "distill_updates": result["distill_updates"], "cost": cost}
        os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)
        print(f"wrote {a.json}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
