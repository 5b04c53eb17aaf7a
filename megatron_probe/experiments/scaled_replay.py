"""The scaled regime: recorded routing replayed through a stack of enlarged PROBE MoE layers.

On 2 CPU cores the shipped model's experts (256 x 64) are far too small for expert compute to
dominate a step, as it does on GPUs at scale. Here each step of a recorded trace
(``tools/record_traces.py``, with hidden states) runs through ``layers`` MoE blocks whose
experts are ``hidden x ffn`` (random weights, one set per rank): every MoE layer is forced to
the trace's experts (Megatron's router replay), and the lookahead predictors forecast from the
trace's hidden states (the shipped warm start, distilled online as the run goes), so routing and
forecasts are the real model's while the expert compute is large. Modes run alternately, step by
step (the order rotates):

* ``static`` (the stock placement): each rank its E/ep experts, no replicas;
* ``probe``: the live pipeline (forecast, plan, phase-locked prefetch, deadline, re-assignment);
* ``oracle``: planned on the true counts, its copies waited for and not counted.

:class:`ScaledReplay` is used by ``tools/bench_moe_layer.py`` (median time per layer over picked
steps) and by ``tools/run_probe_inference.py --regime scaled`` (every step in order: throughput,
TTFT and TPOT of the MoE stack's time).
"""

from __future__ import annotations

import json
import os
import time
from typing import Dict, List, Optional

import torch
import torch.distributed as dist

from megatron_probe.mechanism.profiling import nvtx_range
from megatron_probe.runtime.forecasters import OracleForecaster, WaitPolicy

MODES = ("static", "probe", "oracle")


class TraceForecaster:
    """The pipeline's forecast source for a replayed trace (a ``runtime.forecasters.Forecaster``):
    the real predictors on the trace's hidden states of this rank's tokens, counts all-gathered;
    distilled online on the true logits."""

    lookahead = True

    def __init__(self, predictors, routers, distiller, group, layer0_previous: bool = False):
        self.predictors, self.routers, self.distiller, self.group = predictors, routers, distiller, group
        # layer 0 from the previous step's true counts (ProbeConfig.layer0_counts="previous")
        self.layer0_previous = layer0_previous and 0 in predictors.layers
        self.previous0: Optional[torch.Tensor] = None  # layer 0's true counts at the previous step
        self._pending = {}
        self.hits = self.total = 0
        self.inactive = set()  # layers the cost gate switched off: not forecast

    def set_layer_active(self, layer: int, active: bool) -> None:
        (self.inactive.discard if active else self.inactive.add)(layer)

    def take_control_us(self):
        return {}  # the forecasts run at the step's start, timed as a whole (step_control_ms)

    def forecasts(self, layer: int) -> bool:
        return layer in self.predictors

    def observe_true(self, layer: int, counts) -> None:
        pass

    def topk_accuracy(self):
        return None  # the replay reports hits / total itself

    def start_step(self, hidden, true_ids, previous0: Optional[torch.Tensor] = None):
        """Forecast this step from the trace's hidden states; ``previous0``: layer 0's global true
        counts at the previous step (used with ``layer0_previous``)."""
        from megatron_probe.mechanism.count_exchange import gather_counts_async
        from megatron_probe.policy.predictor import expert_counts

        self._pending.clear()
        self.previous0 = previous0
        with torch.no_grad():
            for L in sorted(self.predictors.layers):
                src = hidden.get(L - 1 if L else -1)
                if src is None or L in self.inactive or (L == 0 and self.layer0_previous):
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
        if layer == 0 and self.layer0_previous:
            return None if 0 in self.inactive else self.previous0
        p = self._pending.get(layer)
        return None if p is None else p.wait()

    def end_step(self):
        for p in self._pending.values():
            p.wait()
        self.distiller.step()

    def close(self):
        self.end_step()


def step_rows(trace, step_index: int, ep: int, max_tokens: Optional[int], gen) -> List[torch.Tensor]:
    """Per rank, the row indices of this trace step's tokens that rank serves (requests spread
    over ranks by id), capped at ``max_tokens`` (a random subset, kept in order)."""
    st = trace.steps[step_index]
    keep = st.hidden[0][0]  # token rows with hidden states (same sample for every layer)
    src = st.request_id[keep] % ep
    rows = []
    for r in range(ep):
        mine = (src == r).nonzero().flatten()
        if max_tokens is not None and mine.numel() > max_tokens:
            mine = mine[torch.randperm(mine.numel(), generator=gen)[:max_tokens]].sort().values
        rows.append(mine)
    return rows


def spread_steps(trace, ep: int, n_steps: int) -> List[int]:
    """``n_steps`` trace steps with hidden states, spread evenly over the trace."""
    usable = [i for i, s in enumerate(trace.steps) if s.hidden and s.num_tokens >= ep]
    if not usable:
        raise ValueError("the trace has no step with hidden states (record it with --hidden-fraction > 0)")
    return [usable[round(j * (len(usable) - 1) / max(1, n_steps - 1))] for j in range(min(n_steps, len(usable)))]


class ScaledReplay:
    """Everything one rank needs to replay trace steps through the enlarged stack in each mode.

    ``opts``: trace, checkpoint, predictor (path or None), predictor_hidden, layers, hidden, ffn,
    replica_slots, deadline_ms, chunk_mib, threads, copy_charge ('measured' or 'none')."""

    def __init__(self, rank: int, ws: int, opts: Dict):
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
        from megatron.core.transformer.moe.router_replay import RouterReplay
        from megatron.core.transformer.spec_utils import build_module
        from megatron.core.transformer.transformer_config import TransformerConfig

        from megatron_probe.config import ProbeConfig
        from megatron_probe.data.traces import load_trace
        from megatron_probe.mcore.cpu import initialize_megatron_parallel
        from megatron_probe.mcore.spec import probe_layer_spec
        from megatron_probe.runtime.host_malloc import apply_host_malloc_setting
        from megatron_probe.runtime.pipeline import LookaheadPipeline
        from megatron_probe.policy.distill import OnlineDistiller
        from megatron_probe.policy.predictor import PredictorSet, RouterSpec

        import logging

        # Megatron warns that it hands process groups only to its exact MoELayer class; the PROBE
        # layer takes its groups from the parallel state
        logging.getLogger("megatron.core.transformer.transformer_layer").setLevel(logging.ERROR)
        torch.set_num_threads(opts["threads"])
        self.rank, self.ws = rank, ws
        pcfg = ProbeConfig(replica_slots_per_rank=opts["replica_slots"], prefetch_deadline_ms=opts["deadline_ms"],
                           transfer_chunk_mib=opts["chunk_mib"], copy_transport=opts.get("copy_transport", "p2p"),
                           pipeline_predict=True,
                           replica_mode=opts.get("replica_mode", "streamed"), cost_gate=opts.get("cost_gate", True),
                           layer0_counts=opts.get("layer0_counts", "previous"),
                           collective_timeout_s=opts.get("collective_timeout_s", 300.0),
                           host_malloc_reuse=opts.get("host_malloc_reuse", True))
        apply_host_malloc_setting(pcfg.host_malloc_reuse)  # before any mode runs: every mode shares it
        initialize_megatron_parallel(ws, seed=1, timeout_s=pcfg.peer_wait_s)
        import torch.nn.functional as F
        from megatron.core import parallel_state

        self.group = parallel_state.get_expert_model_parallel_group()
        self.trace = trace = load_trace(opts["trace"])
        E, K = trace.num_experts, trace.topk
        self.E = E
        self.n_layers = n_layers = min(opts["layers"], trace.num_layers)
        # the real predictors of the traced model (frozen router copies + shipped warm start)
        full = torch.load(os.path.join(opts["checkpoint"], "model.pt"), map_location="cpu", weights_only=True)
        rw = [full[f"decoder.layers.{i}.mlp.router.weight"].float() for i in range(trace.num_layers)]
        with open(os.path.join(opts["checkpoint"], "config.json")) as f:
            cfg_json = json.load(f)
        spec = RouterSpec(E, K, score_function=cfg_json.get("score_function", "softmax"), pre_softmax=K == 1)
        preds = PredictorSet.from_routers([(w, None, None) for w in rw[:n_layers]], spec, opts["predictor_hidden"])
        if opts.get("predictor"):
            # the saved state covers every layer of the traced model: load it into a full set, keep ours
            whole = PredictorSet.from_routers([(w, None, None) for w in rw], spec, opts["predictor_hidden"])
            whole.load(opts["predictor"])
            for L in preds.layers:
                preds[L].load_state_dict(whole[L].state_dict())
        routers = [lambda h, w=w: F.linear(h, w) for w in rw]
        self.forecaster = TraceForecaster(preds, routers, OnlineDistiller(preds, lr=3e-4), self.group,
                                          layer0_previous=opts.get("layer0_counts", "previous") == "previous")

        H, Fh = opts["hidden"], opts["ffn"]
        self.H = H
        tc = TransformerConfig(
            num_layers=n_layers, hidden_size=H, num_attention_heads=8, ffn_hidden_size=Fh, moe_ffn_hidden_size=Fh,
            num_moe_experts=E, moe_router_topk=K, expert_model_parallel_size=ws,
            moe_token_dispatcher_type="alltoall", use_cpu_initialization=True, add_bias_linear=False,
            params_dtype=torch.float32, moe_aux_loss_coeff=0.0, moe_router_dtype="fp32", gated_linear_unit=True,
            activation_func=F.silu, moe_enable_routing_replay=True, bias_activation_fusion=False,
            hidden_dropout=0.0, attention_dropout=0.0, init_method_std=0.02)
        RouterReplay.clear_global_router_replay_instances()
        spec_mlp = probe_layer_spec(get_gpt_layer_local_spec(num_experts=E, moe_grouped_gemm=False),
                                    pcfg).submodules.mlp

        class Block(torch.nn.Module):  # a transformer layer reduced to its MoE block (residual kept)
            def __init__(self):
                super().__init__()
                self.mlp = build_module(spec_mlp, config=tc)

            def forward(self, x):
                return x + self.mlp(x)[0]

        def stack():
            torch.manual_seed(1234 + rank)  # experts differ per rank (each owns its own), routers unused
            return torch.nn.ModuleList([Block() for _ in range(n_layers)]).eval()

        self.blocks = stack()
        from megatron_probe.experiments.calibration import measure_copy_us, measure_expert_cost

        bank = self.blocks[0].mlp.expert_bank
        self.cost = measure_expert_cost(tc, bank, self.group, ws)
        self.pipe = LookaheadPipeline(torch.nn.Sequential(*self.blocks), pcfg, ep_group=self.group,
                                      runtime=self.forecaster, cost=self.cost)
        # the oracle plans every layer from scratch on its true counts with free copies, whatever
        # the probe mode keeps: its own copy of the stack (same weights), so it never disturbs
        # resident replicas of the probe mode
        self._truth: Dict[int, torch.Tensor] = {}
        self._previous0: Optional[torch.Tensor] = None  # layer 0's true counts at the previous step
        self.oracle_blocks = stack()
        self.oracle_pipe = LookaheadPipeline(torch.nn.Sequential(*self.oracle_blocks),
                                             pcfg.replace(replica_mode="streamed", cost_gate=False),
                                             ep_group=self.group,
                                             runtime=OracleForecaster(lambda L: self._truth[L]), cost=self.cost)
        self.oracle_pipe.activate(False)
        self.copy_us = measure_copy_us(self.pipe, bank, rank, self.group) if opts["copy_charge"] == "measured" else 0.0
        if self.copy_us:
            self.pipe.set_copy_charge(self.copy_us)
        self.copies = self.dropped = 0

    def run_step(self, j: int, step_index: int, rows: List[torch.Tensor], modes=MODES) -> Dict[str, Dict]:
        """One trace step in every mode (order rotated by ``j``). Per mode: ``layer_ms`` (this
        rank's time per layer, the oracle's copy time excluded), ``step_control_ms`` (the probe
        mode's forecasts at the step's start and its step end: distillation, metrics, the gate), ``wait_ms``, ``ir_before``,
        ``ir_after``, ``time_vs_static`` (per layer), ``copies``, ``dropped``, ``tokens`` (this rank's)."""
        from megatron.core.transformer.moe.router_replay import RouterReplayAction

        st = self.trace.steps[step_index]
        mine = rows[self.rank]
        keep = st.hidden[0][0]
        hidden = {L: h[mine].float() for L, (_, h) in st.hidden.items()}
        ids_all = st.topk_ids[:, keep]  # [L, Ts, K]
        true_ids = {L: ids_all[L][mine] for L in range(self.n_layers)}
        x0 = torch.randn(len(mine), 1, self.H, generator=torch.Generator().manual_seed(j * 100 + self.rank))
        # global true counts of each layer (every rank computes them from the trace)
        truth = {L: torch.stack([torch.bincount(ids_all[L][rows[r]].flatten(), minlength=self.E)
                                 for r in range(self.ws)]) for L in range(self.n_layers)}
        self._truth = truth
        previous0 = self._previous0
        self._previous0 = truth[0]
        k = j % len(modes)
        out = {}
        for mode in tuple(modes[k:]) + tuple(modes[:k]):
            pipe = self.oracle_pipe if mode == "oracle" else self.pipe
            blocks = self.oracle_blocks if mode == "oracle" else self.blocks
            if mode == "oracle":
                pipe.activate(True, wait=WaitPolicy.oracle())
            else:
                pipe.activate(mode != "static")
            control_ms = 0.0  # the probe mode's forecasts at the step's start and its step end
            if mode == "probe":
                t0 = time.perf_counter()
                self.forecaster.start_step(hidden, true_ids, previous0)
                control_ms = (time.perf_counter() - t0) * 1e3
            pipe.free_ms.clear()
            x = x0
            times = []
            dist.barrier(group=self.group)
            with torch.inference_mode(), nvtx_range(f"replay.{mode}.step{j}"):
                for L, blk in enumerate(blocks):
                    replay = blk.mlp.router.router_replay
                    replay.set_target_indices(true_ids[L])
                    replay.set_router_replay_action(RouterReplayAction.REPLAY_FORWARD)
                    with nvtx_range(f"layer{L}"):
                        t0 = time.perf_counter()
                        x = blk(x)
                        times.append((time.perf_counter() - t0) * 1e3 - pipe.free_ms.get(L, 0.0))
            rec = {"layer_ms": times, "tokens": len(mine), "wait_ms": [], "copies": 0, "dropped": 0, "output": x,
                   "step_control_ms": control_ms}
            if mode != "static":
                t0 = time.perf_counter()
                layers = pipe.end_step()  # the probe mode's forecaster ends its step (distillation) here
                if mode == "probe":  # part of the step's cost (the oracle's bookkeeping is not)
                    rec["step_control_ms"] += (time.perf_counter() - t0) * 1e3
                if mode == "probe":
                    rec.update(wait_ms=[r["wait_ms"] for r in layers], copies=sum(r["copies"] for r in layers),
                               dropped=sum(r["dropped"] for r in layers), gate_on=[r.get("gate_on", 1) for r in layers])
                    self.copies += rec["copies"]
                    self.dropped += rec["dropped"]
                rec["ir_before"] = [r.get("ir_before", 1.0) for r in layers]
                rec["ir_after"] = [r.get("ir_after", 1.0) for r in layers]
                rec["time_vs_static"] = [r.get("time_vs_static", 1.0) for r in layers]
            out[mode] = rec
            pipe.activate(False)
        return out

    def replica_memory_mib(self) -> float:
        """Replica memory per rank of the probe mode (streamed: the two banks; resident: every
        layer's own slots)."""
        return self.pipe.replica_memory_bytes() / 2 ** 20

    def close(self):
        self.pipe.close()
        self.oracle_pipe.close()


def serve_scaled_worker(rank: int, ws: int, opts: Dict, out_path: str) -> None:
    """Every trace step in order (up to ``max_steps``), all three modes; rank 0 writes the rows
    (per step and mode: the slowest rank's MoE-stack time, global tokens, IR, copies, wait)."""
    rep = ScaledReplay(rank, ws, opts)
    gen = torch.Generator().manual_seed(opts["seed"])
    n = len(rep.trace.steps) if opts.get("max_steps") is None else min(opts["max_steps"], len(rep.trace.steps))
    rows = []
    max_diff, scale = {"probe": 0.0, "oracle": 0.0}, 0.0
    for j in range(n):
        st = rep.trace.steps[j]
        if not st.hidden:
            raise ValueError(f"trace step {j} has no hidden states: record the trace with --hidden-fraction 1.0")
        if len(st.hidden[0][0]) != st.num_tokens:
            raise ValueError(f"trace step {j} keeps hidden states of {len(st.hidden[0][0])} of {st.num_tokens} "
                             "tokens: the scaled regime replays every token (record with --hidden-fraction 1.0)")
        res = rep.run_step(j, j, step_rows(rep.trace, j, ws, opts.get("max_tokens"), gen))
        ref = res["static"]["output"]
        for mode in ("probe", "oracle"):  # placement never changes the layer's output
            diff = float((res[mode]["output"] - ref).abs().max()) if ref.numel() else 0.0
            max_diff[mode] = max(max_diff[mode], diff)
        scale = max(scale, float(ref.abs().max()) if ref.numel() else 0.0)
        for mode, rec in res.items():
            t = torch.tensor([sum(rec["layer_ms"]) + rec["step_control_ms"], rec["tokens"]], dtype=torch.float64)
            tmax = t.clone()
            dist.all_reduce(tmax, op=dist.ReduceOp.MAX, group=rep.group)
            dist.all_reduce(t, group=rep.group)
            row = {"step": j, "mode": mode, "seconds": float(tmax[0]) / 1e3, "tokens": int(t[1])}
            if "ir_before" in rec:
                row.update(ir_before=sum(rec["ir_before"]) / len(rec["ir_before"]),
                           ir_after=sum(rec["ir_after"]) / len(rec["ir_after"]),
                           ir_layers_before=rec["ir_before"], ir_layers_after=rec["ir_after"])
            if mode == "probe":
                w = torch.tensor([sum(rec["wait_ms"])], dtype=torch.float64)
                dist.all_reduce(w, op=dist.ReduceOp.MAX, group=rep.group)
                row.update(wait_ms=float(w[0]), copies=rec["copies"], dropped=rec["dropped"], gate_on=rec["gate_on"])
            rows.append(row)
        if opts.get("progress") and rank == 0 and j % 5 == 0:
            print(f"\rscaled replay: step {j + 1}/{n}", end="", flush=True)
    if opts.get("progress") and rank == 0:
        print(flush=True)
    d = torch.tensor([max_diff["probe"], max_diff["oracle"], scale], dtype=torch.float64)
    dist.all_reduce(d, op=dist.ReduceOp.MAX, group=rep.group)
    info = {"copy_charge_us": rep.copy_us, "forecast_topk_acc": rep.forecaster.hits / max(1, rep.forecaster.total),
            "replica_mode": rep.pipe.mode, "replica_memory_mib": rep.replica_memory_mib(),
            "control_us": rep.pipe.summary().get("control_us"),
            "gate_on_fraction": rep.pipe.summary().get("gate_on_fraction"),
            "output_scale": float(d[2]), "max_abs_diff_vs_static": {"probe": float(d[0]), "oracle": float(d[1])},
            "expert_cost_us": {"per_token": rep.cost.per_token_us, "per_active_expert": rep.cost.per_active_expert_us},
            "host_malloc": rep.pipe.host_malloc}  # this worker's (the launcher's own is not the one that ran)
    rep.close()
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump({"rows": rows, "info": info, "trace_scenario": rep.trace.extra.get("scenario")}, f)
