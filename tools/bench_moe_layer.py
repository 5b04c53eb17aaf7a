#!/usr/bin/env python3
"""A stack of PROBE MoE layers across EP gloo processes, driven by real routing: static vs PROBE
vs oracle, measured alternately in one run.

Routing and forecasts come from a recorded trace of the shipped model (``tools/record_traces.py``):
each step's tokens are the trace step's tokens (spread over EP ranks by request), every MoE layer
is forced to the trace's experts (Megatron router replay), and the lookahead predictors (the
shipped warm start, distilled online as the run goes) forecast from the trace's hidden states,
so the forecast is real, not an oracle. Expert compute is enlarged (``--hidden``/``--ffn``,
random weights) so that it dominates as on GPUs at scale. Three modes alternate step by step:

* ``static``: Megatron's placement (each rank its E/ep experts, no replicas);
* ``probe``: the live pipeline (forecast, plan, phase-locked prefetch into the shared double
  banks, deadline, re-assignment on true counts);
* ``oracle``: planned on the true counts, copies waited for before the layer and not counted.

Reports the median time per layer (the slowest rank's), static/PROBE, PROBE's share of the
oracle's gain, PROBE's exposed wait, and the imbalance ratio of each mode.

  python tools/bench_moe_layer.py --ep 2 --json results/pipeline/bench_ep2.json
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
sys.path.insert(0, ROOT)
warnings.filterwarnings("ignore")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

MODES = ("static", "probe", "oracle")


class TraceForecaster:
    """The pipeline's forecast source for a replayed trace: the real predictors on the trace's
    hidden states of this rank's tokens, counts all-gathered; distilled online on the true logits."""

    def __init__(self, predictors, routers, distiller, group):
        self.predictors, self.routers, self.distiller, self.group = predictors, routers, distiller, group
        self.collect_metrics = False
        self._pending = {}
        self.hits = self.total = 0

    def start_step(self, hidden, true_ids):
        from megatron_probe.mechanism.count_exchange import gather_counts_async
        from megatron_probe.policy.predictor import expert_counts

        self._pending.clear()
        with torch.no_grad():
            for L in sorted(self.predictors.layers):
                src = hidden.get(L - 1 if L else -1)
                if src is None:
                    continue
                p = self.predictors[L]
                ids = p.predict_topk(src)
                self._pending[L] = gather_counts_async(expert_counts(ids, p.spec.num_experts), self.group)
                true = true_ids[L]
                self.hits += int((ids.unsqueeze(2) == true.unsqueeze(1)).any(1).sum())
                self.total += true.numel()
                idx = self.distiller.sample_index(src.shape[0])
                y = self.routers[L](hidden[L].float())
                self.distiller.observe(L, src if idx is None else src[idx], y if idx is None else y[idx])

    def predicted_counts(self, layer):
        p = self._pending.get(layer)
        return None if p is None else p.wait()

    def end_step(self):
        for p in self._pending.values():
            p.wait()
        self.distiller.step()

    def close(self):
        self.end_step()


def _steps(trace, ep, n_steps, max_tokens, seed):
    """Pick ``n_steps`` trace steps spread over the trace (each with hidden states); per step and
    rank the row indices of its tokens (requests spread over ranks), capped at ``max_tokens``."""
    gen = torch.Generator().manual_seed(seed)
    usable = [i for i, s in enumerate(trace.steps) if s.hidden and s.num_tokens >= ep]
    if not usable:
        raise ValueError("the trace has no step with hidden states (record it with --hidden-fraction > 0)")
    picks = [usable[round(j * (len(usable) - 1) / max(1, n_steps - 1))] for j in range(min(n_steps, len(usable)))]
    out = []
    for i in picks:
        st = trace.steps[i]
        keep = st.hidden[0][0]  # token rows with hidden states (same sample for every layer)
        src = st.request_id[keep] % ep
        rows = []
        for r in range(ep):
            mine = (src == r).nonzero().flatten()
            if mine.numel() > max_tokens:
                mine = mine[torch.randperm(mine.numel(), generator=gen)[:max_tokens]].sort().values
            rows.append(mine)
        out.append((i, rows))
    return out


def worker(rank, ws, opts, out_path):
    torch.set_num_threads(opts["threads"])
    if os.environ.get("PROBE_BENCH_WATCHDOG_S"):  # debugging a stall: dump every thread's stack
        import faulthandler

        faulthandler.dump_traceback_later(float(os.environ["PROBE_BENCH_WATCHDOG_S"]), exit=True)
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.moe.router_replay import RouterReplay, RouterReplayAction
    from megatron.core.transformer.spec_utils import build_module
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_probe.config import ProbeConfig
    from megatron_probe.data.traces import load_trace
    from megatron_probe.integration.cpu import initialize_megatron_parallel
    from megatron_probe.integration.pipeline import LookaheadPipeline
    from megatron_probe.integration.spec import probe_layer_spec
    from megatron_probe.policy.cost_model import ExpertCost
    from megatron_probe.policy.distill import OnlineDistiller
    from megatron_probe.policy.predictor import PredictorSet, RouterSpec

    initialize_megatron_parallel(ws, seed=1)
    import torch.nn.functional as F
    from megatron.core import parallel_state

    ep_group = parallel_state.get_expert_model_parallel_group()
    trace = load_trace(opts["trace"])
    E, K = trace.num_experts, trace.topk
    n_layers = min(opts["layers"], trace.num_layers)
    # the real predictors of the traced model (frozen router copies + shipped warm start)
    full = torch.load(os.path.join(opts["checkpoint"], "model.pt"), map_location="cpu", weights_only=True)
    rw = [full[f"decoder.layers.{i}.mlp.router.weight"].float() for i in range(trace.num_layers)]
    cfg_json = json.load(open(os.path.join(opts["checkpoint"], "config.json")))
    spec = RouterSpec(E, K, score_function=cfg_json.get("score_function", "softmax"), pre_softmax=K == 1)
    preds = PredictorSet.from_routers([(w, None, None) for w in rw[:n_layers]], spec, opts["predictor_hidden"])
    pred_path = opts["predictor"]
    if pred_path:
        # the saved state covers every layer of the traced model: load it into a full set, keep ours
        whole = PredictorSet.from_routers([(w, None, None) for w in rw], spec, opts["predictor_hidden"])
        whole.load(pred_path)
        for L in preds.layers:
            preds[L].load_state_dict(whole[L].state_dict())
    routers = [lambda h, w=w: F.linear(h, w) for w in rw]
    forecaster = TraceForecaster(preds, routers, OnlineDistiller(preds, lr=3e-4), ep_group)

    H, Fh = opts["hidden"], opts["ffn"]
    R = opts["replica_slots"]
    tc = TransformerConfig(
        num_layers=n_layers, hidden_size=H, num_attention_heads=8, ffn_hidden_size=Fh, moe_ffn_hidden_size=Fh,
        num_moe_experts=E, moe_router_topk=K, expert_model_parallel_size=ws, moe_token_dispatcher_type="alltoall",
        use_cpu_initialization=True, add_bias_linear=False, params_dtype=torch.float32, moe_aux_loss_coeff=0.0,
        moe_router_dtype="fp32", gated_linear_unit=True, activation_func=F.silu, moe_enable_routing_replay=True,
        bias_activation_fusion=False, hidden_dropout=0.0, attention_dropout=0.0, init_method_std=0.02)
    RouterReplay.clear_global_router_replay_instances()
    pcfg = ProbeConfig(replica_slots_per_rank=R, prefetch_deadline_ms=opts["deadline_ms"],
                       transfer_chunk_mib=opts["chunk_mib"], pipeline_predict=True)
    spec_mlp = probe_layer_spec(get_gpt_layer_local_spec(num_experts=E, moe_grouped_gemm=False), pcfg).submodules.mlp

    class Block(torch.nn.Module):  # a transformer layer reduced to its MoE block (residual kept)
        def __init__(self):
            super().__init__()
            self.mlp = build_module(spec_mlp, config=tc)

        def forward(self, x):
            return x + self.mlp(x)[0]

    torch.manual_seed(1234 + rank)  # experts differ per rank (each owns its own), routers unused
    blocks = torch.nn.ModuleList([Block() for _ in range(n_layers)]).eval()
    stack = torch.nn.Sequential(*blocks)

    # expert cost of this machine, measured (affine in tokens), for the planner
    from megatron_probe.mechanism.expert_compute import SlotExpertCompute

    comp = SlotExpertCompute(tc, "auto")
    w1 = blocks[0].mlp.expert_bank.fc1[:1]
    w2 = blocks[0].mlp.expert_bank.fc2[:1]

    def t_expert(n):
        x = torch.randn(n, H)
        ts = []
        for _ in range(3):
            t0 = time.perf_counter()
            comp(x, torch.tensor([n]), torch.ones(n), w1, w2)
            ts.append(time.perf_counter() - t0)
        return min(ts) * 1e6
    a, b = t_expert(32), t_expert(256)
    per_tok = max(1e-3, (b - a) / 224)
    c = torch.tensor([per_tok, max(0.0, a - 32 * per_tok)], dtype=torch.float64)
    dist.all_reduce(c, group=ep_group)  # one cost model for all ranks: plans must be identical
    cost = ExpertCost(float(c[0]) / ws, float(c[1]) / ws)
    pipe = LookaheadPipeline(stack, pcfg, ep_group=ep_group, runtime=forecaster, cost=cost)
    copy_us = 0.0
    if opts["copy_charge"] == "measured":
        # what one expert copy costs here (it runs on the cores that compute): charge it per copy
        from megatron_probe.mechanism.transfer import CopyOp

        bank = blocks[0].mlp.expert_bank
        ts = []
        for _ in range(2):
            dist.barrier(group=ep_group)
            t0 = time.perf_counter()
            batch = pipe.engine.submit([CopyOp(0, 1, "probe-copy-cost")],
                                       [[bank.fc1[0], bank.fc2[0]] if rank == 0 else None],
                                       [pipe.pool.slot_tensors(0, 0) if rank == 1 else None])
            batch.wait()
            ts.append((time.perf_counter() - t0) * 1e6)
        c = torch.tensor([min(ts)], dtype=torch.float64)
        dist.all_reduce(c, op=dist.ReduceOp.MAX, group=ep_group)
        copy_us = float(c[0])
        pipe.cfg = pipe.cfg.replace(copy_charge_us=copy_us)

    steps = _steps(trace, ws, opts["steps"], opts["max_tokens"], opts["seed"])
    times = {m: [] for m in MODES}
    waits, ir = {m: [] for m in MODES}, {m: [] for m in MODES}
    copies = dropped = 0
    for j, (si, rows) in enumerate(steps):
        st = trace.steps[si]
        mine = rows[rank]
        keep = st.hidden[0][0]
        hidden = {L: h[mine].float() for L, (_, h) in st.hidden.items()}
        ids_all = st.topk_ids[:, keep]  # [L, Ts, K]
        true_ids = {L: ids_all[L][mine] for L in range(n_layers)}
        x0 = torch.randn(len(mine), 1, H, generator=torch.Generator().manual_seed(j * 100 + rank))
        # global true counts of each layer (every rank computes them from the trace)
        truth = {L: torch.stack([torch.bincount(ids_all[L][rows[r]].flatten(), minlength=E) for r in range(ws)])
                 for L in range(n_layers)}
        order = MODES[j % 3:] + MODES[: j % 3]  # rotate so no mode always runs first
        for mode in order:
            pipe.activate(mode != "static", oracle_truth=(lambda L: truth[L]) if mode == "oracle" else None)
            if mode == "probe":
                forecaster.start_step(hidden, true_ids)
            pipe.free_ms.clear()
            x = x0
            dist.barrier(group=ep_group)
            with torch.inference_mode():
                for L, blk in enumerate(blocks):
                    replay = blk.mlp.router.router_replay
                    replay.set_target_indices(true_ids[L])
                    replay.set_router_replay_action(RouterReplayAction.REPLAY_FORWARD)
                    t0 = time.perf_counter()
                    x = blk(x)
                    dt = (time.perf_counter() - t0) * 1e3 - pipe.free_ms.get(L, 0.0)
                    times[mode].append(dt)
            if mode != "static":
                rows_ = pipe.end_step()
                if mode == "probe":
                    forecaster.end_step()
                    waits[mode] += [r["wait_ms"] for r in rows_]
                    copies += sum(r["copies"] for r in rows_)
                    dropped += sum(r["dropped"] for r in rows_)
                ir[mode] += [r.get("ir_after", 1.0) for r in rows_]
                if mode == "probe":
                    ir["static"] += [r.get("ir_before", 1.0) for r in rows_]
    pipe.activate(False)
    # a layer ends when its slowest rank does: take the max over ranks of each measurement
    t = {m: torch.tensor(times[m], dtype=torch.float64) for m in MODES}
    for m in MODES:
        dist.all_reduce(t[m], op=dist.ReduceOp.MAX, group=ep_group)
    pipe.close()
    if rank == 0:
        med = {m: float(t[m].median()) for m in MODES}
        res = {"static_ms": round(med["static"], 3), "probe_ms": round(med["probe"], 3),
               "oracle_ms": round(med["oracle"], 3), "speedup": round(med["static"] / med["probe"], 4),
               "oracle_speedup": round(med["static"] / med["oracle"], 4),
               "gain_fraction": round((med["static"] - med["probe"]) / (med["static"] - med["oracle"]), 4)
               if med["static"] > med["oracle"] else None,
               "ir_static": round(sum(ir["static"]) / max(1, len(ir["static"])), 4),
               "ir_probe": round(sum(ir["probe"]) / max(1, len(ir["probe"])), 4),
               "ir_oracle": round(sum(ir["oracle"]) / max(1, len(ir["oracle"])), 4),
               "exposed_wait_ms_median": round(float(torch.tensor(waits["probe"]).median()), 3) if waits["probe"] else 0.0,
               "exposed_wait_ms_mean": round(sum(waits["probe"]) / max(1, len(waits["probe"])), 3),
               "copies": copies, "dropped": dropped, "layer_measurements": len(times["probe"]),
               "forecast_topk_acc": round(forecaster.hits / max(1, forecaster.total), 4),
               "copy_charge_us": round(copy_us, 1),
               "expert_cost_us": {"per_token": round(cost.per_token_us, 2), "per_active_expert": round(cost.per_active_expert_us, 1)},
               "replica_memory_mib": round(pipe.pool.memory_bytes() / 2 ** 20, 1),
               "steps": [si for si, _ in steps]}
        with open(out_path, "w") as f:
            json.dump(res, f)


def main():
    from megatron_probe.integration.tiny_moe import DEFAULT_CHECKPOINT

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ep", type=int, default=2)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--ffn", type=int, default=2816)
    p.add_argument("--replica-slots", type=int, default=3)
    p.add_argument("--trace", default=None, help="recorded trace with hidden states (default: the shipped model "
                   "on workloads/shift.json with every token's hidden states, recorded to traces/shift.pt if missing)")
    p.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT)
    p.add_argument("--predictor", default=None, help="default: <checkpoint>/predictor.pt")
    p.add_argument("--predictor-hidden", type=int, default=256)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--max-tokens", type=int, default=192, help="tokens per rank per step (cap)")
    p.add_argument("--deadline-ms", type=float, default=200.0)
    p.add_argument("--chunk-mib", type=float, default=4.0)
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    p.add_argument("--copy-charge", choices=("measured", "none"), default="measured",
                   help="charge each copy its measured time in the plan (ProbeConfig.copy_charge_us), or not")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    a = p.parse_args()
    if a.ep < 2:
        p.error(f"--ep {a.ep}: replication needs at least 2 EP ranks")
    trace = a.trace or os.path.join(ROOT, "traces", "shift.pt")
    if a.trace is None and not os.path.exists(trace):
        import subprocess

        print(f"recording {trace} (the shipped model on workloads/shift.json) ...", flush=True)
        subprocess.run([sys.executable, os.path.join(ROOT, "tools", "record_traces.py"), "--workload",
                        os.path.join(ROOT, "workloads", "shift.json"), "--out", trace, "--checkpoint", a.checkpoint,
                        "--hidden-fraction", "1.0"],
                       check=True)
    pred = a.predictor or os.path.join(a.checkpoint, "predictor.pt")
    from megatron_probe.data.traces import load_trace
    from megatron_probe.integration.launch import run_distributed

    tr = load_trace(trace)
    if tr.num_experts % a.ep:
        p.error(f"--ep {a.ep} does not divide the trace's {tr.num_experts} experts")
    if not any(s.hidden and -1 in s.hidden for s in tr.steps):
        print("note: the trace has no layer-0 input: MoE layer 0 is not forecast (static)")
    opts = dict(trace=trace, checkpoint=a.checkpoint, predictor=pred if os.path.exists(pred) else None,
                predictor_hidden=a.predictor_hidden, layers=a.layers, hidden=a.hidden, ffn=a.ffn,
                replica_slots=a.replica_slots, steps=a.steps, max_tokens=a.max_tokens, deadline_ms=a.deadline_ms,
                chunk_mib=a.chunk_mib, threads=a.threads, seed=a.seed, copy_charge=a.copy_charge)
    out = a.json or os.path.join("/tmp", f"bench_moe_layer_{os.getpid()}.json")
    t0 = time.time()
    run_distributed(worker, a.ep, opts, out, backend="gloo")
    res = json.load(open(out))
    res.update({"command": "python " + " ".join([os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:]),
                "date": datetime.date.today().isoformat(),
                "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
                "workload": tr.extra.get("scenario", tr.source),
                "regime": f"scaled: experts {a.hidden}x{a.ffn} (random weights), routing and forecasts from "
                          f"{os.path.relpath(trace, ROOT)}", "ep": a.ep, "layers": a.layers,
                "replica_slots": a.replica_slots, "copy_charge": a.copy_charge, "seconds": round(time.time() - t0, 1)})
    with open(out, "w") as f:
        json.dump(res, f, indent=1)
    print(f"EP {a.ep}, {a.layers} layers, experts {a.hidden}x{a.ffn}, R={a.replica_slots}, "
          f"{res['layer_measurements']} layer runs per mode ({res['seconds']} s)")
    print(f"{'mode':<8}{'median ms/layer':>17}{'IR':>8}")
    for m in MODES:
        print(f"{m:<8}{res[m + '_ms']:>17.2f}{res['ir_' + m]:>8.3f}")
    print(f"static/PROBE = {res['speedup']:.3f}   static/oracle = {res['oracle_speedup']:.3f}   "
          f"PROBE's share of the oracle's gain = {res['gain_fraction']}")
    print(f"exposed wait: median {res['exposed_wait_ms_median']} ms, mean {res['exposed_wait_ms_mean']} ms per layer; "
          f"copies {res['copies']}, dropped {res['dropped']}; forecast top-K accuracy {res['forecast_topk_acc']}; "
          f"copy charge {res['copy_charge_us'] / 1e3:.1f} ms per copy ({a.copy_charge})")
    if a.json:
        print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
