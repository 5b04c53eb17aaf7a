"""The live lookahead pipeline: forecast, plan, prefetch in two phases, wait, dispatch.

:class:`LookaheadPipeline` drives every :class:`~megatron_probe.integration.layer.ProbeMoELayer`
of a model, at every step, through PROBE's continuous lookahead with phase-locked transfers:

====================  =====================================================================
layer L-1 MoE input   the lookahead runtime forecasts layer L for this rank's tokens and starts
                      the all-gather of the counts (overlaps L-1's router and dispatch)
L-1 after dispatch    ``plan``: the PROBE planner on the gathered ``[ep, E]`` forecast, the same
                      on every rank; ``prefetch.phase1``: the copies for layer L are queued on
                      the transfer engine (dedicated group, worker thread / side stream) into the
                      replica bank ``L % 2`` and move during L-1's expert compute
every All-to-All      the engine is paused while it runs, resumed after (phase locking), so
                      phase 2 of layer L's copies overlaps layer L's attention
L before dispatch     ``wait``: up to ``prefetch_deadline_ms`` for this rank's incoming copies;
                      the ranks agree (one small all-reduce) which copies arrived; the rest are
                      dropped from layer L's placement (their tokens stay home, counted)
L dispatch            with the agreed placement and the assignment re-computed on the true
                      counts (or the default split when re-assignment is off)
====================  =====================================================================

MoE layer 0 is forecast and planned at its transformer layer's input (phase 2 only). Dispatch
always follows the true router; the placement only decides where each (token, expert) pair is
computed, so no forecast, plan or dropped copy can change the output.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
import torch.distributed as dist

from megatron_probe.config import ProbeConfig
from megatron_probe.integration.lookahead import LookaheadRuntime
from megatron_probe.integration.recorder import layer_holding, moe_layers
from megatron_probe.mechanism.comm import group_rank, group_size
from megatron_probe.mechanism.profiling import nvtx_range
from megatron_probe.mechanism.replica_pool import ReplicaBankPool
from megatron_probe.mechanism.transfer import CopyOp, TransferEngine
from megatron_probe.policy.cost_model import ExpertCost, ModelShape, get_profile
from megatron_probe.policy.placement import EMPTY_SLOT, empty_placement
from megatron_probe.policy.prediction_metrics import imbalance
from megatron_probe.policy.planner import assign_on_truth, plan_with_copy_charge


@dataclass
class LayerPlan:
    placement: torch.Tensor  # [ep, R] planned
    batch: object = None  # TransferBatch of the copies for this layer
    recv_ops: Dict[tuple, int] = field(default_factory=dict)  # (rank, slot) -> op index, for my slots
    copies: int = 0
    bytes: int = 0


class LookaheadPipeline:
    def __init__(self, model, probe_config: Optional[ProbeConfig] = None, ep_group=None,
                 runtime: Optional[LookaheadRuntime] = None, cost: Optional[ExpertCost] = None,
                 metrics_path: Optional[str] = None, budget_in: Optional[int] = None):
        from megatron_probe.integration.layer import ProbeMoELayer

        self.cfg = cfg = probe_config or ProbeConfig()
        self.layers = moe_layers(model)
        if not self.layers or not all(isinstance(m, ProbeMoELayer) for m in self.layers):
            raise TypeError("the lookahead pipeline drives ProbeMoELayer layers (build the model with probe_layer_spec)")
        self.layout = self.layers[0].layout
        if self.layout.replica_slots < 1:
            raise ValueError("the lookahead pipeline needs replica_slots_per_rank >= 1 in the layers' ProbeConfig")
        for m in self.layers:
            if m.layout != self.layout:
                raise ValueError("all MoE layers must share one expert layout (experts, EP size, replica slots)")
        self.ep_group = ep_group if ep_group is not None else self.layers[0].token_dispatcher.ep_group
        self.ep, self.me = group_size(self.ep_group), group_rank(self.ep_group)
        bank0 = self.layers[0].expert_bank
        cap = None if cfg.replica_memory_cap_mib is None else int(cfg.replica_memory_cap_mib * 2 ** 20)
        self.pool = ReplicaBankPool(self.layout, tuple(bank0.fc1.shape[1:]), tuple(bank0.fc2.shape[1:]),
                                    bank0.fc1.dtype, bank0.fc1.device, cap)
        for i, m in enumerate(self.layers):
            m.expert_bank.use_pool()
            m.token_dispatcher.stage_hooks = self
            m.token_dispatcher.layer_index = i
        config = self.layers[0].config
        if cost is None:
            shape = ModelShape(hidden=config.hidden_size, expert_hidden=config.moe_ffn_hidden_size,
                               num_experts=config.num_moe_experts, topk=config.moe_router_topk)
            cost = ExpertCost.from_profile(get_profile(cfg.hardware_profile), shape)
        self.cost = cost
        if self.ep > 1:  # every rank must plan with the same cost model, or plans diverge
            c = torch.tensor([cost.per_token_us, cost.per_active_expert_us, -cost.per_token_us,
                              -cost.per_active_expert_us], dtype=torch.float64)
            dist.all_reduce(c, op=dist.ReduceOp.MAX, group=self.ep_group)
            if c[0] != -c[2] or c[1] != -c[3]:
                raise ValueError(f"EP ranks use different expert cost models ({cost} here); the planner must see "
                                 "identical inputs on every rank: average or broadcast a measured cost first")
        self.budget_in = budget_in  # replicas a rank may receive per layer (default: R)
        self.active = True
        self.oracle_truth = None  # set by activate(oracle_truth=...): plan on true counts, copies free
        self.free_ms: Dict[int, float] = {}
        self.runtime = runtime
        if self.runtime is None and cfg.pipeline_predict and cfg.pipeline_plan:
            self.runtime = LookaheadRuntime(model, cfg, self.ep_group)
        ranks = None if self.ep_group is None else dist.get_process_group_ranks(self.ep_group)
        self.engine = TransferEngine.create(ranks=ranks, chunk_bytes=int(cfg.transfer_chunk_mib * 2 ** 20),
                                            device=bank0.fc1.device)
        self._plans: Dict[int, LayerPlan] = {}
        self._prev_true: Dict[int, torch.Tensor] = {}
        self._step_rows: List[Dict] = []
        self._layer_t0: Dict[int, float] = {}
        self.step = 0
        self.metrics_path = metrics_path
        self.history: List[Dict] = []
        self._handles = []
        if 0 in getattr(self.runtime, "predictors", {}) or not cfg.pipeline_predict:
            holder = layer_holding(model, self.layers[0])
            # registered after the runtime's own hook: the forecast for layer 0 already exists
            self._handles.append(holder.register_forward_pre_hook(self._layer0_hook, with_kwargs=True))

    def _layer0_hook(self, module, args, kwargs):
        if self.active and self.oracle_truth is None:
            self._prefetch(0, "phase2")

    def activate(self, on: bool = True, oracle_truth=None) -> None:
        """Switch the pipeline on or off for the following forwards (off: static placement,
        exactly the plain PROBE layer). ``oracle_truth(layer) -> [ep, E]`` turns it into the
        oracle: each layer is planned on its true counts right before its dispatch and its copies
        are waited for in full, their time reported in ``free_ms`` (to be excluded)."""
        self.active = on
        self.oracle_truth = oracle_truth if on else None
        for m in self.layers:
            m.token_dispatcher.stage_hooks = self if on else None
            if not on:
                m.token_dispatcher.assignment_fn = None
                m.token_dispatcher.set_placement(empty_placement(self.layout))

    # ------------------------------------------------------------------ planning and copies
    def _forecast(self, layer: int) -> Optional[torch.Tensor]:
        if not self.cfg.pipeline_plan:
            return None
        if self.oracle_truth is not None:
            return self.oracle_truth(layer).detach().cpu().long()
        if self.cfg.pipeline_predict:
            counts = self.runtime.predicted_counts(layer) if self.runtime is not None else None
            return None if counts is None else counts.detach().cpu().long()
        return self._prev_true.get(layer)  # ablation: last step's true counts of this layer

    def _prefetch(self, layer: int, phase: str) -> None:
        """Plan ``layer`` and queue its copies into bank ``layer % 2``."""
        if layer >= len(self.layers) or layer in self._plans:
            return
        counts = self._forecast(layer)
        if counts is None:
            return
        with nvtx_range("plan"):
            # the host twin plans identically (tested) and is ~20x faster on host-resident counts;
            # the copies are issued from the host, so the placement is needed there anyway
            placement = self._plan(counts)
        b = self.pool.bank_of(layer)
        L = self.layout.num_local_experts
        ops, src, dst = [], [], []
        plan = LayerPlan(placement=placement)
        home_bank = self.layers[layer].expert_bank
        for r in range(self.ep):
            for s in range(self.layout.replica_slots):
                e = int(placement[r, s])
                if e == EMPTY_SLOT or self.pool.holds(b, layer, r, s, e):
                    continue
                home = e // L
                if r == self.me:
                    plan.recv_ops[(r, s)] = len(ops)
                ops.append(CopyOp(home, r, key=(layer, e, s)))
                src.append([home_bank.fc1[e - home * L], home_bank.fc2[e - home * L]] if home == self.me else None)
                dst.append(self.pool.slot_tensors(b, s) if r == self.me else None)
        plan.copies = len(ops)
        plan.bytes = len(ops) * self.pool.expert_bytes
        with nvtx_range(f"prefetch.{phase}"):
            plan.batch = self.engine.submit(ops, src, dst) if ops else None
        self.pool.mark(b, layer, placement)
        self._plans[layer] = plan

    def _plan(self, counts: torch.Tensor) -> torch.Tensor:
        budget = self.layout.replica_slots if self.budget_in is None else self.budget_in
        charge = 0.0 if self.oracle_truth is not None else self.cfg.copy_charge_us  # the oracle's copies are free
        return plan_with_copy_charge(counts, self.layout, self.cost, budget, charge)

    # ------------------------------------------------------------------ dispatcher hooks
    def before_dispatch(self, dispatcher) -> None:
        layer = dispatcher.layer_index
        self._layer_t0[layer] = time.perf_counter()
        if self.oracle_truth is not None:
            t0 = time.perf_counter()
            self._prefetch(layer, "oracle")
            plan = self._plans.get(layer)
            if plan is not None and plan.batch is not None:
                plan.batch.wait()
            self.free_ms[layer] = (time.perf_counter() - t0) * 1e3
        plan = self._plans.pop(layer, None)
        if plan is not None and not bool((plan.placement >= 0).any()):
            plan = None  # nothing planned (the same on every rank): no wait, no agreement needed
        bank = self.layers[layer].expert_bank
        row = {"step": self.step, "layer": layer, "copies": 0, "dropped": 0, "bytes": 0, "wait_ms": 0.0}
        if plan is None:
            placement = empty_placement(self.layout)
        else:
            t0 = time.perf_counter()
            with nvtx_range("wait"):
                mine = list(plan.recv_ops.items())
                done = (plan.batch.wait_ops([i for _, i in mine], self.cfg.prefetch_deadline_ms / 1e3)
                        if plan.batch is not None and mine else [])
                n = self.ep * self.layout.replica_slots
                flat = plan.placement.reshape(-1).long()
                # one all-reduce (MAX) carries: which copies arrived everywhere (as MIN of the
                # flags), and the planned placement's max and min (equal iff all ranks agree)
                sync = torch.cat([torch.zeros(n, dtype=torch.long), flat, -flat])
                for ((r, s), _), ok in zip(mine, done):
                    sync[r * self.layout.replica_slots + s] = 0 if ok else 1
                if self.ep > 1:
                    dist.all_reduce(sync, op=dist.ReduceOp.MAX, group=self.ep_group)
                if not torch.equal(sync[n:2 * n], -sync[2 * n:]):
                    raise RuntimeError(f"layer {layer}: EP ranks planned different placements (rank {self.me}: "
                                       f"{plan.placement.tolist()}): the forecast counts or the cost model differ")
                arrived = 1 - sync[:n]
            row["wait_ms"] = (time.perf_counter() - t0) * 1e3
            placement = plan.placement.clone()
            missing = (arrived.view(self.ep, -1) == 0) & (placement >= 0)
            placement[missing] = EMPTY_SLOT
            if bool(missing.any()):
                # a late copy still lands later: forget what the bank holds so it is re-sent
                self.pool.held_layer[self.pool.bank_of(layer)] = None
            row.update(copies=plan.copies, dropped=int(missing.sum()), bytes=plan.bytes)
        b = self.pool.bank_of(layer)
        bank.attach_replicas(*self.pool.block(b), placement)
        dispatcher.set_placement(placement)
        if self.cfg.pipeline_reassign and bool((placement >= 0).any()):
            dispatcher.assignment_fn = lambda counts, pl, layout: assign_on_truth(counts, pl, layout, self.cost)
        else:
            dispatcher.assignment_fn = None
        self._step_rows.append(row)

    def a2a(self, starting: bool) -> None:
        if not self.cfg.pipeline_phase_lock:
            return
        if starting:
            self.engine.pause()
        else:
            self.engine.resume()

    def before_experts(self, dispatcher) -> None:
        if self.oracle_truth is None:
            self._prefetch(dispatcher.layer_index + 1, "phase1")

    def after_combine(self, dispatcher) -> None:
        layer = dispatcher.layer_index
        row = next(r for r in reversed(self._step_rows) if r["layer"] == layer)
        counts = dispatcher.last_counts  # [ep, E] true counts, all-gathered by the dispatch
        assign = dispatcher.last_assignment  # [ep_src, E, ep_dst]
        E = counts.shape[1]
        static = counts.sum(0).view(self.ep, E // self.ep).sum(1)
        row["ir_before"] = round(imbalance(static), 4)
        row["ir_after"] = round(imbalance(assign.sum((0, 1))), 4)
        row["layer_ms"] = round((time.perf_counter() - self._layer_t0.pop(layer)) * 1e3, 3)
        self._prev_true[layer] = counts.clone()

    # ------------------------------------------------------------------ steps
    def end_step(self) -> List[Dict]:
        """After each engine step: deferred predictor update, metrics of the step."""
        if self.runtime is not None:
            self.runtime.end_step()
        for layer in list(self._plans):  # planned but never dispatched (e.g. a shorter forward)
            self._plans.pop(layer)
        rows, self._step_rows = self._step_rows, []
        self.history.extend(rows)
        if self.metrics_path and rows:
            with open(self.metrics_path, "a") as f:
                for r in rows:
                    f.write(json.dumps(r) + "\n")
        self.step += 1
        return rows

    def summary(self) -> Dict:
        h = self.history
        if not h:
            return {}
        n = len(h)
        out = {"layer_steps": n, "copies": sum(r["copies"] for r in h), "dropped": sum(r["dropped"] for r in h),
               "bytes": sum(r["bytes"] for r in h), "wait_ms_total": round(sum(r["wait_ms"] for r in h), 3),
               "ir_before": round(sum(r.get("ir_before", 1) for r in h) / n, 4),
               "ir_after": round(sum(r.get("ir_after", 1) for r in h) / n, 4),
               "replica_memory_bytes": self.pool.memory_bytes(), "paused_s": round(self.engine.paused_seconds, 3)}
        if self.runtime is not None and self.runtime.collect_metrics:
            out["prediction_topk_acc"] = self.runtime.metrics().get("local", {}).get("mean_topk_acc")
        return out

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.engine.drain()
        self.engine.close()
        if self.runtime is not None:
            self.runtime.close()
        self.activate(False)  # the plain layer again: static placement, no hooks
