"""The live lookahead pipeline: forecast, plan, prefetch in two phases, wait, dispatch.

:class:`LookaheadPipeline` drives every :class:`~megatron_probe.mcore.layer.ProbeMoELayer`
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
L dispatch            with the agreed placement and the split re-computed on the true counts
                      (or the default split when re-assignment is off)
====================  =====================================================================

Two replica modes (``ProbeConfig.replica_mode``, chosen once by :func:`choose_replica_mode`):

* ``streamed`` (PROBE as published): the table above, with the copies landing in the shared
  double banks (``ReplicaBankPool``, ``2 R`` experts per rank) and re-sent for every layer at
  every step (except slots the bank still holds for the same layer);
* ``resident``: each layer keeps ``R`` slots of its own (``layers x R`` experts per rank). At
  ``plan`` the layer's ``policy.resident.ResidentPlanner`` decides from the forecast which slots
  change (usually none; a slot changes when the saving over the expected residency pays for the
  copy); only those are copied, one layer ahead and phase-locked as above. A layer without new
  copies neither waits nor agrees; with copies, the agreement decides, and a slot whose copy is
  late or failed is left empty (its tokens stay home) and planned again later. A slot is never
  used after the natives it was copied from change (``ExpertBank.native_version``, checked when
  planning and at use): the layer's replicas are forgotten and copied again.

In both modes the dispatch split is the balanced split of the true counts over the copies that
exist (``policy.split.placement_split``, time objective; ``ProbeConfig.dispatch_split`` chooses
the exact token split instead), the same on every rank.

MoE layer 0 is forecast and planned at its transformer layer's input (phase 2 only). Dispatch
always follows the true router; the placement only decides where each (token, expert) pair is
computed, so no forecast, plan or dropped copy can change the output.

Faults fall back to the static placement, never to a wrong one: a plan entry naming no valid
replica (an expert that does not exist or that the rank owns, a repeated expert, a slot beyond
``R``) is removed before any copy (``invalid``); a copy that is late or whose transfer failed is
dropped at the agreement (``dropped``, ``failed``); a failed transfer also breaks the engine, and
the agreement then switches copying off on every rank at the same layer (``engine_disabled``):
the layers go on static until, ``transfer_retry_steps`` later (doubling after each further
failure), every rank starts a new engine on a new group at the same step end and copying
resumes (``engine_recoveries``). The pipeline's own collectives (forecast all-gather, agreement, cost
check) run on a control group and the dispatchers' count exchange and All-to-All on a data group
(both with timeout ``2 collective_timeout_s`` + the prefetch deadline: a live peer can be that
late after a failed copy), the copies on the transfer group (timeout ``collective_timeout_s``),
so a dead peer raises instead of hanging.

Who does what: the pipeline installs itself as every dispatcher's ``hooks``
(``mechanism.dispatcher.DispatchHooks``) and only schedules. Counts come from a
``runtime.forecasters.Forecaster`` (the lookahead runtime by default; last step's counts with
``pipeline_predict=False``; the oracle's true counts), the waiting follows a ``WaitPolicy``, rows
and summaries go through ``runtime.pipeline_metrics.PipelineMetrics``, the groups and the
transfer engine come from :class:`PipelineComms`, and the copies are planned by
``mechanism.transfer.replica_copies`` into the shared ``ReplicaBankPool``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import os
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from megatron_probe.config import ProbeConfig
from megatron_probe.mechanism.comm import group_rank, group_size, host_to_device
from megatron_probe.mechanism.event_log import EventLog, now_ns
from megatron_probe.mechanism.profiling import nvtx_range
from megatron_probe.mechanism.replica_pool import ReplicaBankPool
from megatron_probe.mechanism.device_transfer import PullCopyEngine, StreamCopyEngine
from megatron_probe.mechanism.transfer import TransferEngine, replica_copies
from megatron_probe.policy.cost_model import ExpertCost, ModelShape, get_profile
from megatron_probe.policy.placement import EMPTY_SLOT, empty_placement
from megatron_probe.policy.gate import GateSettings, LayerGate, balancing_saving_us, saving_upper_bound_us
from megatron_probe.policy.planner import load_kernels as load_planner_kernels, no_copy_can_pay, plan_with_copy_charge
from megatron_probe.policy.resident import ResidentPlanner, ResidentSettings
from megatron_probe.policy.split import load_kernels as load_split_kernels, placement_split
from megatron_probe.runtime.device_control import DeviceControl, check_device_control
from megatron_probe.runtime.forecasters import Forecaster, PreviousStepForecaster, WaitPolicy
from megatron_probe.runtime.host_malloc import apply_host_malloc_setting
from megatron_probe.runtime.lookahead import LookaheadRuntime, build_predictors
from megatron_probe.runtime.model_walk import layer_holding, moe_layers
from megatron_probe.runtime.pipeline_metrics import PipelineMetrics
from megatron_probe.serving.wandb_logger import WandbLogger


@dataclass
class LayerPlan:
    placement: torch.Tensor  # [ep, R] planned
    batch: object = None  # TransferBatch of the copies for this layer
    recv_ops: Dict[tuple, int] = field(default_factory=dict)  # (rank, slot) -> op index, for my slots
    send_ops: Dict[tuple, int] = field(default_factory=dict)  # (rank, slot) -> op index, for copies I send
    copies: int = 0
    bytes: int = 0
    invalid: int = 0  # plan entries removed before copying (no such replica)


SPARE_TRANSFER_GROUPS = 3  # transfer groups kept for recoveries after failed copies


@dataclass
class PipelineComms:
    """The pipeline's process groups and transfer engine over the EP ranks: ``ctl_group`` for its
    own small collectives (forecast gathers, the agreement, the cost check), ``data_group`` for
    the dispatchers' count exchange and All-to-All while the pipeline drives them, a dedicated
    group inside the engine for the copies, and :data:`SPARE_TRANSFER_GROUPS` spare ones for
    engines started after a failure, each with a timeout from ``collective_timeout_s``
    (Megatron's EP group waits ``distributed_timeout_minutes``, 30 by default).

    Collective over the default group: with several EP groups (data-parallel replicas of the
    expert group, world = DP x EP) every rank creates every EP group's groups, in the same order,
    as Megatron does for its own; each keeps those of its EP group. (``torch``'s member-only
    groups are named by their ranks alone, so a second one over the same ranks collides.)"""

    ep_group: object
    ep: int
    me: int
    ctl_group: object
    engine: TransferEngine
    ranks: Optional[List[int]] = None  # the EP group's global ranks (None: the whole world)
    data_group: object = None
    spare_groups: List = field(default_factory=list)

    @classmethod
    def create(cls, ep_group, cfg: ProbeConfig, device, events: Optional[EventLog]) -> "PipelineComms":
        ep, me = group_size(ep_group), group_rank(ep_group)
        ranks = None if ep_group is None else dist.get_process_group_ranks(ep_group)
        if ep == 1:
            return cls(ep_group, ep, me, ep_group, cls._engine(None, cfg, device, events), ranks, ep_group)
        # a peer may reach the agreement only after waiting out its prefetch deadline or a failed
        # copy's transfer timeout (collective_timeout_s), so the control group waits longer than
        # both: it must not give up on a peer that is late for a legitimate reason. The dispatch
        # waits as long: a peer reaches it only after the same prefetch wait.
        wait = datetime.timedelta(seconds=cfg.peer_wait_s)
        copy = datetime.timedelta(seconds=cfg.collective_timeout_s)
        mine = None
        for members in every_ep_group(ranks):
            made = [dist.new_group(members, timeout=t) for t in [wait, wait] + [copy] * (1 + SPARE_TRANSFER_GROUPS)]
            if members == sorted(ranks):
                mine = made
        ctl, data, transfer, *spares = mine
        for name, g in (("control", ctl), ("data", data), ("transfer", transfer)):
            if group_rank(g) != me:
                raise RuntimeError(f"the {name} group orders the EP ranks differently ({ranks}): rank {me} is "
                                   f"{group_rank(g)} there")
        return cls(ep_group, ep, me, ctl, cls._engine(transfer, cfg, device, events), ranks, data, spares)

    @staticmethod
    def _engine(group, cfg: ProbeConfig, device, events: Optional[EventLog]):
        """The copy engine ``cfg.copy_transport`` names (``mechanism.device_transfer``)."""
        chunk = int(cfg.transfer_chunk_mib * 2 ** 20)
        on_gpu = device is not None and torch.device(device).type == "cuda"
        if cfg.copy_transport == "stream" or (cfg.copy_transport == "peer_memory" and on_gpu):
            return StreamCopyEngine(group, pull=cfg.copy_transport == "peer_memory", device=device,
                                    timeout_s=cfg.collective_timeout_s, event_log=events)
        if cfg.copy_transport == "peer_memory":
            return PullCopyEngine(group, chunk_bytes=chunk, device=device, timeout_s=cfg.collective_timeout_s,
                                  event_log=events)
        return TransferEngine(group, chunk_bytes=chunk, device=device, timeout_s=cfg.collective_timeout_s,
                              event_log=events)

    def renew_engine(self, cfg: ProbeConfig, device, events: Optional[EventLog]) -> Optional[TransferEngine]:
        """Close the (broken) engine and start a new one on the next spare group (a failed transfer
        can leave a group unusable: a gloo pair that timed out). Every rank of the EP group calls
        it at the same step; None (the old engine closed) once the spares are used up."""
        old = self.engine
        old.drain(2 * cfg.collective_timeout_s)  # bounded: a broken engine fails what it still holds
        old.close()
        self._destroy(old.group)
        if not self.spare_groups:
            return None
        self.engine = self._engine(self.spare_groups.pop(0), cfg, device, events)
        return self.engine

    def _own(self, group) -> bool:
        """Whether ``group`` is one :meth:`create` made (not the caller's EP group nor the world)."""
        return group is not None and group is not dist.GroupMember.WORLD and group is not self.ep_group

    def _destroy(self, group) -> None:
        """Destroy ``group`` if this object made it and it is still registered (a renewed engine's
        was destroyed at the renewal). No reference is kept: gloo frees a group's sockets and
        threads only when its last reference goes."""
        if not self._own(group):
            return
        try:
            dist.get_rank(group)  # raises ValueError once the group is destroyed (unregistered)
        except ValueError:
            return
        dist.destroy_process_group(group)

    def destroy_groups(self) -> None:
        """Destroy every group :meth:`create` made: control, data, the engine's (closed first by
        the caller) and the spares left. Every EP rank calls it at the same point, as it made them;
        gloo groups hold sockets, so a process that starts and closes pipelines (tests, a serving
        restart) would otherwise keep them all."""
        for g in [self.data_group, self.ctl_group, self.engine.group, *self.spare_groups]:
            self._destroy(g)
        self.data_group = self.ctl_group = None
        self.spare_groups = []


def every_ep_group(ranks: List[int]) -> List[List[int]]:
    """The sorted global ranks of every EP group of the job, the same list on every rank (an
    all-gather of each rank's EP group over the default group)."""
    world = dist.get_world_size()
    if len(ranks) == world:
        return [sorted(ranks)]
    everyone: List = [None] * world
    dist.all_gather_object(everyone, sorted(ranks))
    groups = sorted({tuple(g) for g in everyone})
    covered = sorted(r for g in groups for r in g)
    if covered != list(range(world)):
        raise RuntimeError(f"the EP groups {groups} do not partition the {world} ranks of the job")
    return [list(g) for g in groups]


@dataclass
class ResidentLayer:
    """Resident mode, one MoE layer: its planner, what its own replica rows hold and may serve
    (``[ep, R]``, the same on every rank; a slot whose copy is not agreed yet is empty), and the
    native weights' version those copies were read from."""

    planner: ResidentPlanner
    held: torch.Tensor
    native_version: tuple


class GatedOffHooks:
    """The dispatcher hooks of a layer the cost gate switched off: the stock path with none of the
    control path's per-layer work. Only two duties stay: the phase lock while copies of other
    layers are queued or moving (and always when the event log is on, so it sees every
    All-to-All), and the next layer's phase-1 prefetch when that layer balances. The layer's row
    and what the gate reads (its true counts) are taken from the dispatcher at the step's end."""

    _NULL = contextlib.nullcontext()

    def __init__(self, pipe: "LookaheadPipeline"):
        self.pipe = pipe

    def before_dispatch(self, dispatcher) -> None:
        pass  # switched off with the static placement and the default split already set

    def all_to_all(self, dispatcher, kind: str):
        p = self.pipe
        if p.events is not None or p.engine.outstanding > 0:
            return p.all_to_all(dispatcher, kind)
        return self._NULL

    def before_experts(self, dispatcher) -> None:
        self.pipe.before_experts(dispatcher)

    def after_combine(self, dispatcher) -> None:
        pass


def choose_replica_mode(mode: str, layers: int, slots: int, expert_bytes: int, cap_bytes: Optional[int]) -> str:
    """``streamed`` or ``resident`` for ``ProbeConfig.replica_mode`` (``auto``: resident when its
    ``layers x slots`` experts per rank fit the cap). Refuses resident over the cap."""
    need = layers * slots * expert_bytes
    fits = cap_bytes is None or need <= cap_bytes
    if mode == "auto":
        return "resident" if fits else "streamed"
    if mode == "resident" and not fits:
        mib = 2 ** 20
        raise ValueError(
            f"resident replicas need {need / mib:.3g} MiB per rank ({layers} MoE layers x {slots} slots x "
            f"{expert_bytes / mib:.3g} MiB per expert), over replica_memory_cap_mib={cap_bytes / mib:.3g}; valid: "
            f"replica_mode='streamed' (2 x {slots} experts), replica_mode='auto', replica_slots_per_rank <= "
            f"{cap_bytes // max(1, layers * expert_bytes)} or replica_memory_cap_mib >= {need / mib:.4g}")
    if mode not in ("streamed", "resident"):
        raise ValueError(f"replica_mode={mode!r}; valid: ('streamed', 'resident', 'auto')")
    return mode


def check_same_cost(cost: ExpertCost, group) -> None:
    """Every rank must plan with the same cost model, or plans diverge: refuse if they differ."""
    if group_size(group) <= 1:
        return
    c = torch.tensor([cost.per_token_us, cost.per_active_expert_us, -cost.per_token_us, -cost.per_active_expert_us],
                     dtype=torch.float64)
    dist.all_reduce(c, op=dist.ReduceOp.MAX, group=group)
    if c[0] != -c[2] or c[1] != -c[3]:
        raise ValueError(f"EP ranks use different expert cost models ({cost} here); the planner must see "
                         "identical inputs on every rank: average or broadcast a measured cost first")


def default_forecaster(model, cfg: ProbeConfig, group, stage_layers: Optional[Tuple[int, int]] = None
                       ) -> Optional[Forecaster]:
    """The forecaster ``cfg`` asks for: none without planning, last step's counts without the
    predictors (``pipeline_predict=False``), else the lookahead runtime (``stage_layers``: a
    pipeline stage's first MoE layer and the whole model's MoE layers, for the warm start)."""
    if not cfg.pipeline_plan:
        return None
    if not cfg.pipeline_predict:
        return PreviousStepForecaster()
    return LookaheadRuntime(model, cfg, group, predictors=build_predictors(model, cfg, *(stage_layers or (0, None))))


class LookaheadPipeline:
    """Drives the PROBE layers of ``model`` (module docstring). ``probe_config``: default the
    layers' own (the one they were built with); ``runtime``: the forecaster
    (default: :func:`default_forecaster`); ``metrics_path``: per-layer, per-step rows appended as
    JSON lines; ``events_path`` (default: beside ``metrics_path``, ``<stem>.events.jsonl``): the
    event log when ``event_log`` is on; ``metrics_sink``: any object with ``log(dict, step=)`` and
    ``finish()`` that receives each step's metrics (default: a :class:`WandbLogger` when
    ``wandb_project`` is set, on EP rank 0, under ``run_dir`` or the metrics' folder);
    ``stage_layers``: under pipeline parallelism, ``(first MoE layer of this stage, MoE layers of
    the whole model)``, so the predictor warm start (``predictor_state``, a whole model's) is
    mapped onto the stage's layers."""

    def __init__(self, model, probe_config: Optional[ProbeConfig] = None, ep_group=None,
                 runtime: Optional[Forecaster] = None, cost: Optional[ExpertCost] = None,
                 metrics_path: Optional[str] = None, budget_in: Optional[int] = None,
                 events_path: Optional[str] = None, metrics_sink=None, run_dir: Optional[str] = None,
                 stage_layers: Optional[Tuple[int, int]] = None):
        from megatron_probe.mcore.layer import ProbeMoELayer

        self.layers = moe_layers(model)
        if not self.layers or not all(isinstance(m, ProbeMoELayer) for m in self.layers):
            raise TypeError("the lookahead pipeline drives ProbeMoELayer layers (build the model with probe_layer_spec)")
        self.cfg = cfg = probe_config if probe_config is not None else self.layers[0].probe_config
        self.layout = self.layers[0].layout
        if self.layout.replica_slots < 1:
            raise ValueError("the lookahead pipeline needs replica_slots_per_rank >= 1 in the layers' ProbeConfig")
        for m in self.layers:
            if m.layout != self.layout:
                raise ValueError("all MoE layers must share one expert layout (experts, EP size, replica slots)")
        ep_group = ep_group if ep_group is not None else self.layers[0].token_dispatcher.ep_group
        bank0 = self.layers[0].expert_bank
        if cfg.control_path == "device":  # refused before any group or bank is made
            check_device_control(bank0.fc1.device)
        # before the first plan (a no-op where the serving script or a benchmark set it already)
        self.host_malloc = apply_host_malloc_setting(cfg.host_malloc_reuse)
        self.events = EventLog(group_rank(ep_group)) if cfg.event_log else None
        self.comms = PipelineComms.create(ep_group, cfg, bank0.fc1.device, self.events)
        self.ep_group, self.ep, self.me = ep_group, self.comms.ep, self.comms.me
        self.ctl_group, self.engine = self.comms.ctl_group, self.comms.engine
        self._natives_synced = False  # pull copies: every rank's natives written before this step's reads
        if self.engine.pulls and self.ep > 1:
            try:  # collective, layer by layer: the natives readable by every EP rank
                for m in self.layers:
                    m.expert_bank.use_peer_memory()
            except BaseException:  # (every rank raises alike) nothing of this pipeline is left behind
                self.engine.close()
                self.comms.destroy_groups()
                raise
        cap = None if cfg.replica_memory_cap_mib is None else int(cfg.replica_memory_cap_mib * 2 ** 20)
        # the device control path plans streamed replicas only (the resident decision is host code)
        mode = "streamed" if cfg.control_path == "device" and cfg.replica_mode == "auto" else cfg.replica_mode
        self.mode = choose_replica_mode(mode, len(self.layers), self.layout.replica_slots, bank0.expert_bytes(), cap)
        self.pool: Optional[ReplicaBankPool] = None
        self.resident: List[ResidentLayer] = []
        if self.mode == "streamed":
            self.pool = ReplicaBankPool(self.layout, tuple(bank0.fc1.shape[1:]), tuple(bank0.fc2.shape[1:]),
                                        bank0.fc1.dtype, bank0.fc1.device, cap)
        for i, m in enumerate(self.layers):
            if self.mode == "streamed":
                m.expert_bank.use_shared_replicas()
            else:
                m.expert_bank.use_own_replicas()
                m.expert_bank.set_own_placement(empty_placement(self.layout))  # start empty: warm start fills
            m.token_dispatcher.hooks = self
            m.token_dispatcher.layer_index = i
            m.token_dispatcher.control_path = cfg.control_path
        # the dispatches run on the data group (its timeout) while the pipeline exists
        self._stock_groups = [m.token_dispatcher.ep_group for m in self.layers]
        for m in self.layers:
            m.token_dispatcher.ep_group = self.comms.data_group
        if cost is None:
            config = self.layers[0].config
            shape = ModelShape(hidden=config.hidden_size, expert_hidden=config.moe_ffn_hidden_size,
                               num_experts=config.num_moe_experts, topk=config.moe_router_topk)
            cost = ExpertCost.from_profile(get_profile(cfg.hardware_profile), shape)
        self.cost = cost
        check_same_cost(cost, self.ctl_group)
        # control_path="device": plan, split and the step's read-back on the tokens' device
        self.control = DeviceControl(bank0.fc1.device, self.layout, cost) if cfg.control_path == "device" else None
        self._counts_ready = None  # the count exchange the next device plan reads (its event on a GPU)
        self._step_reads: List[tuple] = []  # device control: per layer, what the step end reads back
        # the planner's and the split's compiled loops, loaded before the first step, not inside it
        load_planner_kernels()
        load_split_kernels()
        if self.mode == "resident":
            self.resident = [ResidentLayer(ResidentPlanner(self.layout, cost, ResidentSettings(
                copy_cost_us=cfg.copy_charge_us)), empty_placement(self.layout), m.expert_bank.native_version())
                for m in self.layers]
        self.budget_in = budget_in  # replicas a rank may receive per layer (default: R)
        self.copy_charge_us = cfg.copy_charge_us  # what an unhidden copy costs the planner (set_copy_charge)
        # the cost gate: a layer balances only while that saves more than its control path costs
        self.gates: Optional[List[LayerGate]] = None
        if cfg.cost_gate:
            gs = GateSettings(margin=cfg.cost_gate_margin, max_interval=cfg.cost_gate_max_interval)
            self.gates = [LayerGate(gs) for _ in self.layers]
        self._control_us: Dict[int, float] = {}  # per layer, this step: control path time measured here
        self._stage_us: Dict[int, Dict[str, float]] = {}  # the same per stage (plan, agree, split, metrics)
        self._cost_ema: List[Optional[float]] = [None] * len(self.layers)
        # per layer: the slowest rank's cost estimate, carried by the layer's own count exchange
        self._peer_cost: Dict[int, float] = {}
        self._cost_columns: Dict[int, slice] = {}
        self._empty = empty_placement(self.layout)
        self._off_hooks = GatedOffHooks(self)
        self._dispatches_seen: Dict[int, int] = {}  # per gated-off layer: its dispatcher's count at the last step end
        self._last_counts: Dict[int, torch.Tensor] = {}
        self._static_ir: Dict[int, float] = {}  # per layer, the last dispatch's static imbalance
        self._split_layer = 0
        self._end_us_total = 0.0  # time spent in end_step, all steps
        self.runtime = runtime if runtime is not None else default_forecaster(model, cfg, self.ctl_group, stage_layers)
        self.default_wait = WaitPolicy(cfg.prefetch_deadline_ms)
        self.forecaster, self.wait_policy = self.runtime, self.default_wait
        self.active = True
        self.free_ms: Dict[int, float] = {}  # per layer: copy time a free wait policy excludes
        if events_path is None and metrics_path and self.events is not None:
            events_path = os.path.splitext(metrics_path)[0] + ".events.jsonl"
        if metrics_sink is None and cfg.wandb_project is not None and self.me == 0:
            run_dir = run_dir or (os.path.dirname(os.path.abspath(metrics_path)) if metrics_path else os.getcwd())
            metrics_sink = WandbLogger(cfg.wandb_project, run_dir, config=cfg.to_dict(), mode=cfg.wandb_mode)
        self.metrics = PipelineMetrics(metrics_path, metrics_sink, self.events, events_path)
        self.disabled: Optional[str] = None  # why copying was switched off (a transfer failed)
        self.disabled_at: Optional[tuple] = None  # (step, layer) where every rank switched it off
        # after a failure, copying resumes on a new engine at a step every rank computes alike
        self.recoveries: List[int] = []  # steps at which it did
        self._retry_step: Optional[int] = None
        self._retry_wait = cfg.transfer_retry_steps
        self._engines_replaced = {"paused_s": 0.0, "pause_wait_s": 0.0, "chunks": 0}
        self._device = bank0.fc1.device
        self._plans: Dict[int, Optional[LayerPlan]] = {}  # None: planned, nothing to copy
        self._layer_t0: Dict[int, float] = {}
        self.step = 0
        self._handles = []
        if self.runtime is not None and self.runtime.forecasts(0):
            holder = layer_holding(model, self.layers[0])
            # registered after the forecaster's own hook: the forecast for layer 0 already exists
            self._handles.append(holder.register_forward_pre_hook(self._layer0_hook, with_kwargs=True))

    @property
    def history(self) -> List[Dict]:
        """The last ``pipeline_metrics.HISTORY_ROWS`` rows (all of them go to the metrics file and sink)."""
        return list(self.metrics.history)

    @property
    def metrics_path(self) -> Optional[str]:
        return self.metrics.metrics_path

    def _layer0_hook(self, module, args, kwargs):
        if self.active and self.forecaster is not None and self.forecaster.lookahead:
            self._prefetch(0, "phase2")

    def activate(self, on: bool = True, forecaster: Optional[Forecaster] = None,
                 wait: Optional[WaitPolicy] = None) -> None:
        """Switch the pipeline on or off for the following forwards (off: static placement,
        exactly the plain PROBE layer). ``forecaster`` / ``wait`` replace the pipeline's own for
        as long as it stays on (e.g. ``OracleForecaster`` with ``WaitPolicy.oracle()``: each
        layer planned on its true counts right before its dispatch, its copies waited for in
        full and reported in ``free_ms``)."""
        self.active = on
        self._natives_synced = False  # weights may have changed while off: the next plan syncs first
        self.forecaster = (forecaster or self.runtime) if on else self.runtime
        self.wait_policy = (wait or self.default_wait) if on else self.default_wait
        if self._step_reads:  # layers that ran this step: their figures, as the host path has them by now
            self._read_back_step()
        for layer, m in enumerate(self.layers):
            d = m.token_dispatcher
            d.control_path = self.cfg.control_path if on else d.probe_config.control_path
            if on:
                self._install_hooks(layer)
            else:
                d.hooks = None
                d.assignment_fn = None
                d.set_placement(self._empty)

    def _install_hooks(self, layer: int) -> None:
        """The pipeline's hooks on ``layer``'s dispatcher, or the stock path's when its gate is off
        (then with the static placement and the default split). The pipeline's own hooks are
        installed only while the layer's gate is on: they never check it."""
        d = self.layers[layer].token_dispatcher
        if self.gate_on(layer):
            d.hooks = self
            return
        d.hooks = self._off_hooks
        d.assignment_fn = None
        d.set_placement(self._empty)

    # ------------------------------------------------------------------ planning and copies
    def _prefetch(self, layer: int, phase: str) -> None:
        """Plan ``layer`` (when the cost gate lets it balance) and queue its copies, timed as the
        layer's ``plan`` stage."""
        if (layer >= len(self.layers) or layer in self._plans or self.disabled is not None
                or not self.cfg.pipeline_plan or self.forecaster is None or not self.gate_on(layer)):
            return
        t0 = time.perf_counter()
        try:
            self._prefetch_planned(layer, phase)
        finally:
            self._charge(layer, "plan_us", t0)

    def gate_on(self, layer: int) -> bool:
        """Whether ``layer`` balances at this step (always, without the cost gate)."""
        return self.gates is None or self.gates[layer].on

    def _charge(self, layer: int, stage: str, t0: float) -> None:
        """Add the time since ``t0`` to ``layer``'s control path of this step (stage ``stage``)."""
        us = (time.perf_counter() - t0) * 1e6
        self._control_us[layer] = self._control_us.get(layer, 0.0) + us
        stages = self._stage_us.setdefault(layer, {})
        stages[stage] = stages.get(stage, 0.0) + us

    def _sync_natives(self) -> None:
        """Pull copies read a home rank's natives without it taking part, so nothing else orders
        the read after the home's last write of them (a checkpoint load between two steps, or a
        re-bind that ``ensure_current`` copies in lazily). At the first plan of each step (the same
        point on every rank: plans are identical) every rank finishes such writes and meets the
        others at a barrier on the engine's group (which pull copies leave idle); on the device it
        is an all-reduce on the main stream, so copies issued after it, which wait for the main
        stream, read after every rank's writes."""
        if self.engine.pulls and self.ep > 1:
            for m in self.layers:
                m.expert_bank.ensure_current()
            self.engine.barrier()
        self._natives_synced = True

    def _prefetch_planned(self, layer: int, phase: str) -> None:
        """Streamed: the plan's copies into bank ``layer % 2``; resident: see _prefetch_resident."""
        if not self._natives_synced:
            self._sync_natives()
        counts = self.forecaster.predicted_counts(layer)
        if counts is None:
            return
        if self.mode == "resident":
            self._prefetch_resident(layer, phase, counts)
            return
        with nvtx_range("plan"):
            if self.control is None:
                # the host twin plans identically (tested) and is ~20x faster on host-resident counts;
                # the copies are issued from the host, so the placement is needed there anyway
                counts = counts.detach().cpu().long()
            if self._budget() == 0 or (self.control is None and no_copy_can_pay(
                    counts, self.layout, self.cost, self._charge_of_copy())):
                # the planner would keep the static plan (the usual case where copies cannot pay;
                # exact, see no_copy_can_pay): no plan, checks or copy list. The bank's record is
                # dropped, as an empty plan's mark did
                self._plans[layer] = None
                self.pool.held_layer[self.pool.bank_of(layer)] = None
                return
            if self.control is None:
                raw = self._plan(counts)
            else:  # the same plan on the device, on a side stream; its placement read back
                raw = self.control.plan(counts, self._budget(), self._charge_of_copy(), self._counts_ready)
            placement, invalid = self._valid_placement(raw)
        b = self.pool.bank_of(layer)
        version = self.layers[layer].expert_bank.native_version()
        self.pool.forget_if_stale(b, layer, version)  # copies of older natives are never reused
        copies = replica_copies(placement, self.layout, self.me,
                                unchanged=lambda r, s, e: self.pool.holds(b, layer, r, s, e),
                                native_rows=self.layers[layer].expert_bank.native_rows,
                                slot_rows=lambda s: self.pool.slot_tensors(b, s),
                                key=lambda r, s, e: (layer, e, s), remote_rows=self._remote_rows(layer))
        plan = LayerPlan(placement=placement, invalid=invalid, recv_ops=copies.recv, send_ops=copies.send,
                         copies=len(copies.ops), bytes=len(copies.ops) * self.pool.expert_bytes)
        with nvtx_range(f"prefetch.{phase}"):
            plan.batch = self.engine.submit(copies.ops, copies.src, copies.dst) if copies.ops else None
        self.pool.mark(b, layer, placement, version)
        self._plans[layer] = plan

    def _prefetch_resident(self, layer: int, phase: str, counts: torch.Tensor) -> None:
        """Resident mode: the layer's planner decides which slots change (usually none); only
        those are copied, into the layer's own rows."""
        res, bank = self.resident[layer], self.layers[layer].expert_bank
        # (the natives are checked once, at use: a change before this plan's copies read them
        # makes the check at the dispatch forget every slot of the layer, these copies included)
        charge = self._charge_of_copy()
        if res.planner.settings.copy_cost_us != charge:
            res.planner.settings = dataclasses.replace(res.planner.settings, copy_cost_us=charge)
        with nvtx_range("plan"):
            placement, invalid = self._valid_placement(res.planner.plan(counts.detach().cpu().long())[0])
        held = res.held
        copies = replica_copies(placement, self.layout, self.me,
                                unchanged=lambda r, s, e: int(held[r, s]) == e,
                                native_rows=bank.native_rows, slot_rows=bank.own_slot_rows,
                                key=lambda r, s, e: (layer, e, s), remote_rows=self._remote_rows(layer))
        for op in copies.ops:  # a slot being overwritten holds nothing usable until its copy is agreed
            res.held[op.dst, op.key[2]] = EMPTY_SLOT
        plan = LayerPlan(placement=placement, invalid=invalid, recv_ops=copies.recv, send_ops=copies.send,
                         copies=len(copies.ops), bytes=len(copies.ops) * bank.expert_bytes())
        if copies.ops:
            with nvtx_range(f"prefetch.{phase}"):
                plan.batch = self.engine.submit(copies.ops, copies.src, copies.dst)
        self._plans[layer] = plan

    def _remote_rows(self, layer: int):
        """Pull copies read the home rank's rows (``copy_transport='peer_memory'``)."""
        return self.layers[layer].expert_bank.remote_rows if self.engine.pulls else None

    def _check_natives(self, layer: int) -> bool:
        """A layer's native weights changed since its replicas were copied (a reload, in place or
        not): every resident replica of the layer is stale, so all are forgotten (re-copied when
        still wanted). Weights change on every EP rank at once (a checkpoint load does), so every
        rank forgets the same. Returns whether they were forgotten."""
        res, bank = self.resident[layer], self.layers[layer].expert_bank
        version = bank.native_version()
        if version == res.native_version:
            return False
        res.native_version = version
        res.held = empty_placement(self.layout)
        res.planner.placement = empty_placement(self.layout)
        res.planner.warm = False  # planned from scratch again, like the first step
        bank.set_own_placement(res.held)
        return True

    def _valid_placement(self, raw) -> tuple:
        """``(placement [ep, R], invalid)``: the plan with every entry that names no valid replica
        emptied and counted (an expert id out of range or owned by that rank, an expert twice on
        one rank, a slot beyond R, a plan of the wrong shape). The same on every rank."""
        R, E, L = self.layout.replica_slots, self.layout.num_experts, self.layout.num_local_experts
        raw = torch.as_tensor(raw).detach().cpu().long()
        if raw.dim() != 2 or raw.shape[0] != self.ep:
            return empty_placement(self.layout), int((raw != EMPTY_SLOT).sum())
        rows = raw.tolist()  # host integers: a few dozen entries, checked one by one
        out = [[EMPTY_SLOT] * R for _ in range(self.ep)]
        invalid = 0
        for r, row in enumerate(rows):
            invalid += sum(1 for e in row[R:] if e != EMPTY_SLOT)
            seen = set()
            for s, e in enumerate(row[:R]):
                if e == EMPTY_SLOT:
                    continue
                if not 0 <= e < E or e // L == r or e in seen:
                    invalid += 1
                    continue
                seen.add(e)
                out[r][s] = e
        return torch.tensor(out, dtype=torch.long).view(self.ep, R), invalid

    def set_copy_charge(self, us: float) -> None:
        """The planner's price of one copy from now on (e.g. measured over this pipeline's engine:
        ``experiments.calibration.measure_copy_us``, the same on every rank)."""
        if not us >= 0:
            raise ValueError(f"copy charge {us} us must be >= 0")
        self.copy_charge_us = float(us)

    def _budget(self) -> int:
        return self.layout.replica_slots if self.budget_in is None else self.budget_in

    def _charge_of_copy(self) -> float:
        return 0.0 if self.wait_policy.copies_free else self.copy_charge_us

    def _plan(self, counts: torch.Tensor) -> torch.Tensor:
        return plan_with_copy_charge(counts, self.layout, self.cost, self._budget(), self._charge_of_copy())

    # ------------------------------------------------------------------ dispatcher hooks
    def before_dispatch(self, dispatcher) -> None:
        layer = dispatcher.layer_index
        self._layer_t0[layer] = time.perf_counter()
        if self.engine.orders_on_device and not self.cfg.pipeline_phase_lock:
            # the layer's stream waits for every copy issued so far: a slot may have been filled by
            # a plan that was never agreed (phase locking does this at every All-to-All)
            self.engine.pause()
        if self.gates is not None:
            # this rank's control cost of the layer rides on the layer's own count exchange: the
            # gate reads every rank's without a collective of its own (only while on, i.e. while
            # these hooks are installed: off, the cost is not measured, so the last figure holds)
            ema = self._cost_ema[layer]
            cost = torch.tensor([0 if ema is None else round(ema)])
            if self.control is not None:  # made where the counts are: a pageable copy would synchronise
                cost = host_to_device(cost, self._device)
            self._cost_columns[layer] = dispatcher.carry(cost, over_expert_tp="max")
        if self.forecaster is not None and not self.forecaster.lookahead:
            t0 = time.perf_counter()
            self._prefetch(layer, "at_dispatch")
            plan = self._plans.get(layer)
            if plan is not None and plan.batch is not None and self.wait_policy.deadline_ms is None:
                plan.batch.wait(raise_error=False)  # a failed copy is dropped by the agreement
            if self.wait_policy.copies_free:
                self.free_ms[layer] = (time.perf_counter() - t0) * 1e3
        plan = self._plans.pop(layer, None)
        row = self.metrics.new_row(self.step, layer, 0 if plan is None else plan.invalid)
        t0 = time.perf_counter()
        with nvtx_range("agree"):
            if self.mode == "resident":
                placement = self._resident_placement(layer, plan, row)
            else:
                placement = self._streamed_placement(layer, plan, row)
        self._charge(layer, "agree_us", t0)
        row["fallbacks"] = row["dropped"] + row["invalid"]  # planned replicas not used: tokens stayed home
        dispatcher.set_placement(placement)
        if self.cfg.pipeline_reassign and bool((placement >= 0).any()):
            self._split_layer = layer
            dispatcher.assignment_fn = self._split
        else:
            dispatcher.assignment_fn = None

    def _split(self, counts: torch.Tensor, placement: torch.Tensor, layout) -> torch.Tensor:
        """The dispatch split on the true counts over the copies that exist, the same on every
        rank: the balanced split of ``policy.split`` on ``ProbeConfig.dispatch_split``'s objective
        (by default the cost model's time; or the exact token split)."""
        t0 = time.perf_counter()
        try:
            with nvtx_range("split"):
                if self.control is not None:  # the exact token split, where the counts are
                    return self.control.split(counts, placement)
                return placement_split(counts, placement, layout, self.cfg.dispatch_split, self.cost)
        finally:
            self._charge(self._split_layer, "split_us", t0)

    def _agreed_placement(self, layer: int, plan: LayerPlan, row: Dict) -> torch.Tensor:
        """Wait for the plan's copies (the wait policy), agree with every rank which arrived, and
        return the plan's placement with the late and failed ones emptied (their tokens stay
        home), counted in ``row``."""
        t0, t0_ns = time.perf_counter(), now_ns()
        with nvtx_range("wait"):
            state = self._agree(layer, plan)
        row["wait_ms"] = (time.perf_counter() - t0) * 1e3
        if self.events is not None:
            self.events.record("wait", layer, t0_ns, now_ns())
        placement = plan.placement.clone()
        missing = (state > 0) & (placement >= 0)
        placement[missing] = EMPTY_SLOT
        row.update(copies=plan.copies, dropped=int(missing.sum()), failed=int((missing & (state == 2)).sum()),
                   bytes=plan.bytes)
        if self.disabled_at == (self.step, layer):
            row["engine_disabled"] = 1
        return placement

    def _streamed_placement(self, layer: int, plan: Optional[LayerPlan], row: Dict) -> torch.Tensor:
        """Streamed mode: the agreed placement of this layer's plan in bank ``layer % 2``."""
        b = self.pool.bank_of(layer)
        if plan is None or not bool((plan.placement >= 0).any()):
            # nothing planned (the same on every rank): no agreement, no replica rows to attach
            self.layers[layer].expert_bank.detach_replicas()
            return self._empty
        if not plan.copies:
            placement = plan.placement.clone()  # every slot already holds its expert: nothing to agree on
        else:
            placement = self._agreed_placement(layer, plan, row)
            if bool((placement != plan.placement).any()):
                # a late copy still lands later: forget what the bank holds so it is re-sent
                self.pool.held_layer[b] = None
        self.layers[layer].expert_bank.attach_replicas(*self.pool.block(b), placement)
        return placement

    def _resident_placement(self, layer: int, plan: Optional[LayerPlan], row: Dict) -> torch.Tensor:
        """Resident mode, right before layer's dispatch: the placement its own rows can serve.
        Without new copies that is what they hold (no wait, no agreement); with copies, the
        ranks agree which arrived, and a slot whose copy is late or failed is left empty (its
        tokens stay home) and forgotten, so the planner copies it again if it still wants it."""
        res, bank = self.resident[layer], self.layers[layer].expert_bank
        if self._check_natives(layer):
            plan = None  # the natives changed after this plan's copies were read: use none of them
        if plan is not None and plan.copies:
            placement = self._agreed_placement(layer, plan, row)
        elif plan is not None:
            placement = plan.placement.clone()  # only slots already held (or emptied): nothing moved
        else:
            placement = res.held.clone()
        res.held = placement.clone()
        res.planner.placement = placement.clone()
        bank.set_own_placement(placement)
        return placement

    def _agree(self, layer: int, plan: LayerPlan) -> torch.Tensor:
        """Wait (the wait policy's deadline) for this rank's incoming copies, then agree with every
        rank on each copy's state: ``[ep, R]`` of 0 (arrived, or nothing to copy), 1 (late),
        2 (failed)."""
        R = self.layout.replica_slots
        batch = plan.batch
        mine = list(plan.recv_ops.items())
        deadline = self.wait_policy.deadline_ms
        done = (batch.wait_ops([i for _, i in mine], None if deadline is None else deadline / 1e3)
                if batch and mine else [])
        n = self.ep * R
        flat = plan.placement.reshape(-1).long()
        # one all-reduce (MAX) carries: each copy's state as its receiver sees it (a sender adds
        # what it knows: its side failed), the planned placement's max and min (equal iff all
        # ranks planned the same) and whether any rank's transfer engine broke
        sync = torch.cat([torch.zeros(n, dtype=torch.long), flat, -flat, torch.zeros(1, dtype=torch.long)])
        for ((r, s), i), ok in zip(mine, done):
            sync[r * R + s] = 0 if ok else (2 if batch.op_failed(i) else 1)
        if batch is not None:
            for (r, s), i in plan.send_ops.items():
                if batch.op_failed(i):
                    sync[r * R + s] = 2
        sync[-1] = int(self.engine.broken is not None)
        if self.ep > 1:
            dist.all_reduce(sync, op=dist.ReduceOp.MAX, group=self.ctl_group)
        if not torch.equal(sync[n:2 * n], -sync[2 * n:3 * n]):
            raise RuntimeError(f"layer {layer}: EP ranks planned different placements (rank {self.me}: "
                               f"{plan.placement.tolist()}): the forecast counts or the cost model differ")
        if bool(sync[-1]) and self.disabled is None:
            # every rank sees the same flag at the same layer: all stop copying from here on
            self.disabled = (f"transfer failed on this rank ({self.engine.broken})" if self.engine.broken
                             else "a peer rank's transfer engine failed")
            self.disabled_at = (self.step, layer)
            if self.cfg.transfer_retry_steps > 0:
                self._retry_step = self.step + self._retry_wait
                self._retry_wait = min(2 * self._retry_wait, 1024)  # the next failure waits longer
        return sync[:n].view(self.ep, R)

    @contextlib.contextmanager
    def all_to_all(self, dispatcher, kind: str):
        """Phase locking: no byte of a weight copy moves on this rank while an All-to-All runs."""
        # nothing queued or moving: nothing can start either (only this thread submits copies, and
        # it is inside the All-to-All), so the pause is skipped
        lock = self.cfg.pipeline_phase_lock and self.engine.outstanding > 0
        if lock:
            self.engine.pause()  # returns once no chunk is moving on this rank
        t0 = now_ns()
        try:
            yield
        finally:
            if self.events is not None:
                self.events.record(f"a2a_{kind}", dispatcher.layer_index, t0, now_ns())
            if lock:
                self.engine.resume()

    def before_experts(self, dispatcher) -> None:
        if self.forecaster is not None and self.forecaster.lookahead:
            self._counts_ready = dispatcher.counts_ready  # the exchange that carried the forecast
            try:
                self._prefetch(dispatcher.layer_index + 1, "phase1")
            finally:
                self._counts_ready = None

    def after_combine(self, dispatcher) -> None:
        layer = dispatcher.layer_index
        row = self.metrics.row(layer)
        counts = dispatcher.last_counts  # [ep, E] true counts, all-gathered by the dispatch
        t0 = time.perf_counter()
        if self.mode == "resident":
            self.resident[layer].planner.observe(counts)
        if self.forecaster is not None:
            self.forecaster.observe_true(layer, counts)
        self._charge(layer, "metrics_us", t0)
        columns = self._cost_columns.pop(layer, None)
        seen = [counts]
        if columns is not None:
            seen.append(dispatcher.last_extra[:, columns])
        if dispatcher.slots_in_use != self.layout.num_local_experts:  # replicas used: the split's balance
            # [E, ep] (what each rank computed of each expert) is all the metrics read; on the
            # device it is summed there, so the step end reads [E, ep], not [ep, E, ep]
            a = dispatcher.last_assignment
            seen.append(a.sum(0) if self.control is not None else a)
        if self.control is not None:  # read back at the step's end, every layer's in one copy
            self._step_reads.append((layer, row, columns is not None, seen))
        else:
            self._account_layer(layer, row, columns is not None, seen)
        row["layer_ms"] = round((time.perf_counter() - self._layer_t0.pop(layer)) * 1e3, 3)

    def _account_layer(self, layer: int, row: Dict, has_cost: bool, seen: List[torch.Tensor]) -> None:
        """A dispatched layer's host figures: its true counts, static imbalance and carried cost
        for the gate, and its metrics, from ``seen`` (host tensors: the counts, the carried cost
        column when ``has_cost``, the assignment ``[ep, E, ep]`` or its sum over sources
        ``[E, ep]`` when replicas were used)."""
        counts = seen[0]
        self._last_counts[layer] = counts
        if has_cost:
            self._peer_cost[layer] = float(seen[1].max())
        self._static_ir[layer] = self._static_imbalance(counts)
        row["ir_before"] = round(self._static_ir[layer], 4)
        t0 = time.perf_counter()
        with nvtx_range("metrics"):
            self._observe_layer(row, counts, seen[1 + has_cost] if len(seen) > 1 + has_cost else None)
        self._charge(layer, "metrics_us", t0)

    def _read_back_step(self) -> None:
        """Device control: every layer's figures of this step, read back in one copy."""
        reads, self._step_reads = self._step_reads, []
        host = self.control.read_back([t for *_, seen in reads for t in seen])
        at = 0
        for layer, row, has_cost, seen in reads:
            self._account_layer(layer, row, has_cost, host[at:at + len(seen)])
            at += len(seen)

    def _observe_layer(self, row: Dict, counts: torch.Tensor, assignment: Optional[torch.Tensor]) -> None:
        """The layer's balance after the split (``ir_after``, ``time_vs_static``) into ``row``;
        ``assignment``: the dispatch's (host; ``[ep, E, ep]`` or summed over sources), None when
        no replica was used (the static split)."""
        if assignment is None:  # no replica: the static split
            row.update(ir_after=row["ir_before"], time_vs_static=1.0)
            return
        # NumPy on the host tensors (views, no copy): a few microseconds where torch takes tens
        on = assignment.numpy()
        on = on.sum(0) if on.ndim == 3 else on  # [E, ep]: what each rank computed of each expert
        used = on.sum(0)
        row["ir_after"] = round(float(used.max() / used.mean()), 4) if used.sum() > 0 else 1.0
        total = counts.numpy().sum(0).reshape(self.ep, -1)  # static: each rank its own experts
        c, o = self.cost.per_token_us, self.cost.per_active_expert_us
        static_us = float((c * total.sum(1) + o * (total > 0).sum(1)).max())
        used_us = float((c * used + o * (on > 0).sum(0)).max())
        row["time_vs_static"] = round(used_us / static_us, 4) if static_us > 0 else 1.0

    # ------------------------------------------------------------------ steps
    def end_step(self) -> List[Dict]:
        """After each engine step: the forecaster's step end (deferred predictor update), metrics."""
        t_end = time.perf_counter()
        try:
            with nvtx_range("end_step"):
                return self._end_step()
        finally:  # the step end's own time (per step, not per layer): in the summary
            self._end_us_total += (time.perf_counter() - t_end) * 1e6

    def _end_step(self) -> List[Dict]:
        if self._step_reads:
            self._read_back_step()
        if self.forecaster is not None:
            self.forecaster.end_step()
        self._plans.clear()  # planned but never dispatched (e.g. a shorter forward)
        self._natives_synced = False
        if self.gates is not None:
            self._rows_of_gated_off_layers()
        if self.forecaster is not None:
            for layer, us in self.forecaster.take_control_us().items():
                self._control_us[layer] = self._control_us.get(layer, 0.0) + us
                stages = self._stage_us.setdefault(layer, {})
                stages["forecast_us"] = stages.get("forecast_us", 0.0) + us
        for row in self.metrics.current_rows():
            layer = row["layer"]
            row.update({k: round(v, 1) for k, v in self._stage_us.get(layer, {}).items()})
            row["control_us"] = round(self._control_us.get(layer, 0.0), 1)
            row["gate_on"] = int(self.gate_on(layer))
        if self.gates is not None:
            self._gate_step()
        self._control_us.clear()
        self._stage_us.clear()
        rows = self.metrics.end_step(self.step)
        self.step += 1
        if self.disabled is not None and self._retry_step is not None and self.step >= self._retry_step:
            self._resume_copying()
        return rows

    def _resume_copying(self) -> None:
        """A new transfer engine (on a spare group) on every EP rank, at the same step end, and
        copying on again; the old engine's counters are kept in the summary's totals. With no
        spare group left copying stays off for the pipeline's life."""
        old = self.engine
        new = self.comms.renew_engine(self.cfg, self._device, self.events)
        self._retry_step = None
        if new is None:
            self.disabled += f"; no spare transfer group left after {len(self.recoveries)} recoveries: copying stays off"
            return
        self._engines_replaced["paused_s"] += old.paused_seconds
        self._engines_replaced["pause_wait_s"] += old.pause_wait_seconds
        self._engines_replaced["chunks"] += old.chunks_moved
        self.engine = new
        self.disabled = None
        self.recoveries.append(self.step)

    def _rows_of_gated_off_layers(self) -> None:
        """Gated-off layers ran with no hook work: their rows and the gate's inputs (true counts,
        static imbalance) come from their dispatchers, for each layer that dispatched this step."""
        seen = []
        for layer, m in enumerate(self.layers):
            d = m.token_dispatcher
            if d.hooks is not self._off_hooks or d.dispatches == self._dispatches_seen.get(layer):
                continue
            self._dispatches_seen[layer] = d.dispatches
            seen.append((layer, d.last_counts))
        if self.control is not None:  # on the device: every layer's counts in one copy
            seen = list(zip([layer for layer, _ in seen], self.control.read_back([c for _, c in seen])))
        for layer, counts in seen:
            self._last_counts[layer] = counts
            self._static_ir[layer] = self._static_imbalance(counts)
            row = self.metrics.new_row(self.step, layer, 0)
            ir = round(self._static_ir[layer], 4)
            row.update(fallbacks=0, ir_before=ir, ir_after=ir, time_vs_static=1.0)

    def _static_imbalance(self, counts: torch.Tensor) -> float:
        """imbalance_ratio(static_rank_loads(...)) on host numbers: this runs at every layer and step."""
        loads = counts.view(self.ep, self.ep, -1).sum((0, 2)).tolist()
        mean = sum(loads) / self.ep
        return max(loads) / mean if mean > 0 else 1.0

    def _gate_step(self) -> None:
        """The cost gate at the end of a step: each layer's measured control cost averaged; the
        layers whose check is due decide on this step's true counts and the slowest rank's cost
        estimate as of the step's start (both from the layer's own count exchange, so the same on
        every rank, with no collective of the gate's own)."""
        for layer in range(len(self.layers)):
            if self.gate_on(layer) and layer in self._control_us:
                us, ema = self._control_us[layer], self._cost_ema[layer]
                self._cost_ema[layer] = us if ema is None else 0.7 * ema + 0.3 * us
        irs = self._static_ir
        due = [layer for layer, ir in irs.items() if self.gates[layer].due(self.step, ir)]
        if not due:
            return
        charge = self.copy_charge_us if self.mode == "streamed" else 0.0  # resident copies amortise
        for layer in due:
            counts, cost = self._last_counts[layer], self._peer_cost.get(layer, 0.0)
            # the cheap bound first: when even it cannot beat the cost, the plan cannot either
            saving = saving_upper_bound_us(counts, self.layout, self.cost)
            if saving > self.gates[layer].settings.margin * cost:
                saving = balancing_saving_us(counts, self.layout, self.cost, charge, self.budget_in)
            if self.gates[layer].decide(self.step, saving, cost, irs[layer]):
                self._plans.pop(layer, None)
                if self.forecaster is not None:
                    self.forecaster.set_layer_active(layer, self.gates[layer].on)
                if self.active:
                    self._install_hooks(layer)
                    self._dispatches_seen[layer] = self.layers[layer].token_dispatcher.dispatches

    def replica_memory_bytes(self) -> int:
        """Replica memory of this rank: the two shared banks (streamed) or every layer's own slots
        (resident)."""
        if self.pool is not None:
            return self.pool.memory_bytes()
        return sum(m.expert_bank.replica_bytes() for m in self.layers)

    def summary(self) -> Dict:
        out = self.metrics.summary()
        if not out:
            return {}
        out.update({"step_end_us": round(self._end_us_total / max(1, self.step), 1),
                    "replica_mode": self.mode, "control_path": self.cfg.control_path,
                    "replica_memory_bytes": self.replica_memory_bytes(),
                    "paused_s": round(self.engine.paused_seconds + self._engines_replaced["paused_s"], 3),
                    "pause_wait_s": round(self.engine.pause_wait_seconds + self._engines_replaced["pause_wait_s"], 6),
                    "chunks": self.engine.chunks_moved + self._engines_replaced["chunks"],
                    "engine_disabled": self.disabled, "disabled_at": self.disabled_at,
                    "engine_recoveries": len(self.recoveries), "recovered_at": list(self.recoveries),
                    "host_malloc": self.host_malloc})
        acc = self.runtime.topk_accuracy() if self.runtime is not None else None
        if acc is not None:
            out["prediction_topk_acc"] = acc
        return out

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._step_reads.clear()  # figures of a step that never ended
        self.engine.drain(2 * self.cfg.collective_timeout_s)  # bounded: a broken peer fails the copies
        self.engine.close()
        if self.runtime is not None:
            self.runtime.close()
        self.metrics.close(self.step, self.summary())
        self.activate(False)  # the plain layer again: static placement, no hooks, Megatron's group
        for m, g in zip(self.layers, self._stock_groups):
            m.token_dispatcher.ep_group = g
            m.token_dispatcher.control_path = m.token_dispatcher.probe_config.control_path
        self.comms.destroy_groups()
        self.ctl_group = None
