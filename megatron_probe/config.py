"""One validated configuration object for every PROBE option.

`ProbeConfig` is built once (from Python or from ``--probe-*`` command-line flags) and checked
twice: on construction for values that are wrong in themselves, and by
:meth:`ProbeConfig.validate_for_model` against the model's expert count, top-k and EP size,
because some limits (how many replica slots make sense) depend on the model.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

EXPERT_BACKENDS = ("auto", "te", "grouped_mm", "loop", "fp8")
ASSIGNMENT_POLICIES = ("locality_even",)
REPLICA_MODES = ("streamed", "resident", "auto")
DISPATCH_SPLITS = ("time", "tokens")
COPY_TRANSPORTS = ("p2p", "peer_memory", "stream")
CONTROL_PATHS = ("host", "device")
LAYER0_COUNTS = ("previous", "predict")
WANDB_MODES = ("offline", "online", "disabled")


@dataclass
class ProbeConfig:
    """Options of the PROBE MoE layer.

    Attributes:
        replica_slots_per_rank: expert slots per EP rank that can hold a copy of an expert owned by
            another rank (the paper uses 3). 0 turns replication off: the layer then behaves
            exactly like Megatron's ``alltoall`` dispatcher.
        replica_mode: how the live pipeline keeps replicas. ``streamed`` (PROBE as published): two
            banks of ``R`` slots shared by all MoE layers (``2 R`` experts of memory per rank),
            refilled for every layer at every step. ``resident``: each MoE layer keeps its own
            ``R`` slots across steps (``layers x R`` experts per rank) and changes one only when
            the forecast saving over the expected residency pays for the copy
            (``policy.resident.ResidentPlanner``). ``auto``: resident when its memory fits
            ``replica_memory_cap_mib`` (always, without a cap), else streamed.
        expert_backend: how native experts and replica slots are computed in one grouped GEMM per
            projection: ``te`` (Transformer Engine ``GroupedLinear``, GPU, bf16/FP8),
            ``grouped_mm`` (``torch._grouped_mm``), ``loop`` (one GEMM per expert), ``fp8``
            (``torch._scaled_grouped_mm`` with row-wise scales, no TE: CUDA compute capability 9.0
            or 10.0; ``mechanism/fp8.py``), or ``auto`` (TE on GPU when installed, else grouped_mm
            where it runs, else loop; never fp8, which changes the arithmetic).
        assignment_policy: how tokens of a replicated expert are split between its copies when
            no explicit assignment is given. ``locality_even``: tokens that originate on a rank
            holding a copy stay there; the others are split evenly over all copies.
        validate_assignment: check every assignment against the true token counts before
            dispatch (cheap; turn off only when a trusted planner produces it).
        predictor_hidden: width of each lookahead predictor's residual MLP (``W2 SiLU(W1 h)``
            added to the frozen router copy); 0 keeps the frozen copy alone.
        predictor_layer0: also plan MoE layer 0 (no layer before it carries its forecast).
        layer0_counts: where layer 0's counts come from when ``predictor_layer0`` is on:
            ``previous`` (default: the true counts of layer 0 at the previous step, which every
            rank already holds: no collective, no forecast compute) or ``predict`` (its own
            predictor on its pre-attention input, gathered by a separate all-gather each step).
        predictor_online: distil the predictors online against the true routers (False: frozen).
        predictor_lr: learning rate of the online distillation (AdamW).
        predictor_period: engine steps between two online updates (their samples accumulate).
        predictor_sample_tokens: tokens per layer kept per step for the online update.
        predictor_state: predictor state file to warm-start from (``tools/distill_predictor.py``
            writes one beside the checkpoint); ``None``: start from the frozen router copies.
        predictor_side_stream: on GPU, run the online update on a side stream.
        predictor_drift_threshold: drift trigger of the online update: it runs only while the
            running top-K accuracy estimate of the forecast (on the sampled tokens) is below this.
            0.9 by default: a warm-started predictor (about 0.93 on the shift workload) stays
            frozen and free; one that drifts below 0.9 learns again. 0: never update; above 1:
            always update.
        predictor_drift_period: engine steps between two steps whose forecast is compared with
            the true router for the drift trigger's estimate (on the kept samples; >= 1). The
            estimate moves a step in ``predictor_drift_period``; the samples for an update are
            kept every step.
        predictor_background: run the online update in a background worker on a shadow copy of
            the predictors (a thread; its work on the side stream on GPU), swapped in at a step
            boundary (False: inline in ``end_step``, as before).
        predictor_metrics_period: engine steps between two steps whose forecast quality is scored
            (top-2K recall, the metrics all-gather); 0: never. The forecast itself runs every step.
        replica_memory_cap_mib: cap on one rank's replica memory (streamed: the two banks, 2 x R
            experts; resident: layers x R experts); a configuration over it is refused (``auto``
            falls back to streamed). ``None``: no cap.
        prefetch_deadline_ms: how long layer L's dispatch waits for its replica copies; a copy
            still incomplete then is dropped from the plan (its tokens stay home) and counted.
        transfer_chunk_mib: copies move in chunks of this size (the unit of pausing).
        copy_transport: how the live pipeline moves replica weights (``mechanism.device_transfer``).
            ``p2p``: send/recv on a dedicated group from a worker thread, chunked and paused
            during every All-to-All (gloo on CPU, NCCL on GPU; across hosts). ``peer_memory``:
            the receiving rank pulls the expert out of its home rank's native rows (symmetric
            memory on GPUs: ``copy_`` on a side stream, a memcpy the copy engine runs; shared-memory
            files on CPU, a worker thread); the home rank takes no part; every EP rank on one
            host; a barrier at each step's first plan (steps that plan nothing skip it)
            orders the pulls after every rank's weight writes; it waits up to
            ``collective_timeout_s`` for a late rank. ``stream``: NCCL send/recv batched on a side stream, no thread (GPU; on CPU it
            runs each batch at submit, for tests). On the device both order copies against the
            All-to-All with CUDA events instead of pausing a thread.
        pipeline_predict / pipeline_plan / pipeline_phase_lock / pipeline_reassign: stages of the
            live pipeline, each switchable for ablation: forecast layer L with the lookahead
            predictor (off: the previous step's true counts of layer L); replicate and split at
            all (off: static placement); suspend copies during every All-to-All (off: copies run
            through them); re-assign tokens on the true counts at dispatch (off: the default
            locality-first even split over the copies that arrived).
        dispatch_split: the re-assignment's split of the true counts over the copies that exist
            (``pipeline_reassign``; every rank computes the same). ``time``: the cost model's time
            objective on the host (``policy.split``: exact token split, local search and bounded
            branch and bound over the active copies). ``tokens``: the exact min-max token split on
            the host (on the device with ``control_path="device"``).
        control_path: where the live pipeline's per-layer control runs. ``host`` (default): the
            dispatcher reads the all-gathered ``[ep, E]`` counts back and plans and splits on the
            host (the compiled planner and either split objective). ``device``: the counts, the
            forecasts, the plan and the split stay on the tokens' device: layer L's placement is
            planned by the Triton planner (``policy.planner_triton``) on a side stream beside layer
            L-1's All-to-All (the host waits for the planner alone, then issues the copies that
            overlap L-1's experts), the dispatch split is the exact token split on the device
            (``policy.split_triton``), and each dispatch reads back only the All-to-All's split
            sizes, in one pinned copy; the true counts for metrics and the cost gate are read once
            per step, at its end. Needs ``dispatch_split="tokens"``, ``pipeline_reassign`` and
            streamed replicas (the time split, the default split and the resident decision are
            host code), and Triton where the tokens are
            (a CUDA GPU, or ``TRITON_INTERPRET=1`` on CPU, for tests).
        hardware_profile: cost-model profile the planner uses (a preset name or a JSON file).
        copy_charge_us: time one replica copy costs *each* of its two ranks beyond what overlap
            hides (0: copies are free inside the slot budget, as PROBE assumes for GPUs with copy
            engines; on CPU a copy uses the cores that compute, so measure and set it). The
            pipeline then keeps only as many new copies as pay for themselves.
        cost_gate: balance each MoE layer only while that pays (``policy.gate``): from the true
            counts the dispatcher gathers anyway, the saving balancing would bring (the cost model,
            copies charged) against what the layer's control path (plan, agreement, split,
            metrics, forecast) measured; while the saving does not beat the cost by
            ``cost_gate_margin``, the layer runs the stock path (no forecast, plan or agreement),
            re-checked at a doubling interval up to ``cost_gate_max_interval`` steps and at once
            when its static imbalance rises. False: every layer balances at every step.
        cost_gate_margin: the factor the saving must beat the control cost by (> 0).
        cost_gate_max_interval: cap (steps) of the gate's re-check interval (>= 1).
        event_log: record every transfer chunk's and every All-to-All's interval per rank (cheap;
            written as JSON lines beside the pipeline metrics), the evidence for phase locking.
        collective_timeout_s: how long the pipeline's own collectives (forecast all-gather,
            agreement all-reduce, transfer send/recv and the commit to a chunk) wait for a peer
            before raising, so a dead rank fails the step instead of hanging it. Transfers wait
            this long; the control group (all-gather, agreement), the dispatchers' count exchange
            and All-to-All while the pipeline drives them, and the serving script's own groups
            wait :attr:`peer_wait_s` (twice this plus the prefetch deadline), since a live peer
            can be that late after a failed copy.
        transfer_retry_steps: after a transfer fails (copying is then off on every rank), the
            steps after which every rank starts a new transfer engine on a spare group and
            copying resumes (counted: ``engine_recoveries``); the wait doubles after each further
            failure (up to 1024 steps), and after the pipeline's 3 spare groups copying stays
            off. 0: copying stays off for the pipeline's life.
        wandb_project: export the pipeline's per-layer, per-step metrics to this Weights & Biases
            project (EP rank 0 logs); ``None``: no wandb.
        wandb_mode: ``offline`` (default: files under the run directory, ``wandb sync`` later),
            ``online`` or ``disabled``.
        host_malloc_reuse: set glibc's mmap and trim thresholds once per process so the host
            planner's multi-MiB temporaries reuse mapped heap pages instead of page-faulting in
            fresh ones at every plan (``runtime.host_malloc``: 2.2-2.4 ms against 0.2-0.3 ms per
            plan at E 512, EP 32 on the project's CPU); the serving script applies it before any
            mode runs, so stock and PROBE share the setting. Process-wide and for the process's
            life: freed host memory goes back to the system less eagerly, so resident memory
            can sit higher after a peak. Left alone where the environment tunes malloc or
            preloads another allocator. False: malloc left as it is.
    """

    replica_slots_per_rank: int = 0
    replica_mode: str = "streamed"
    expert_backend: str = "auto"
    assignment_policy: str = "locality_even"
    validate_assignment: bool = True
    predictor_hidden: int = 256
    predictor_layer0: bool = True
    layer0_counts: str = "previous"
    predictor_online: bool = True
    predictor_lr: float = 3e-4
    predictor_period: int = 1
    predictor_sample_tokens: int = 256
    predictor_state: Optional[str] = None
    predictor_side_stream: bool = True
    predictor_drift_threshold: float = 0.9
    predictor_drift_period: int = 4
    predictor_background: bool = True
    predictor_metrics_period: int = 8
    replica_memory_cap_mib: Optional[float] = None
    prefetch_deadline_ms: float = 50.0
    transfer_chunk_mib: float = 4.0
    copy_transport: str = "p2p"
    pipeline_predict: bool = True
    pipeline_plan: bool = True
    pipeline_phase_lock: bool = True
    pipeline_reassign: bool = True
    dispatch_split: str = "time"
    control_path: str = "host"
    hardware_profile: str = "h200-sxm"
    copy_charge_us: float = 0.0
    cost_gate: bool = True
    cost_gate_margin: float = 1.2
    cost_gate_max_interval: int = 16
    event_log: bool = False
    collective_timeout_s: float = 300.0
    transfer_retry_steps: int = 8
    wandb_project: Optional[str] = None
    wandb_mode: str = "offline"
    host_malloc_reuse: bool = True

    def __post_init__(self) -> None:
        for name in ("prefetch_deadline_ms", "transfer_chunk_mib", "collective_timeout_s"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0 < v < float("inf"):
                raise ValueError(f"{name}={v!r}; valid: a positive finite number")
        if not isinstance(self.copy_charge_us, (int, float)) or not 0 <= self.copy_charge_us < float("inf"):
            raise ValueError(f"copy_charge_us={self.copy_charge_us!r}; valid: a finite number >= 0")
        for name in ("cost_gate", "host_malloc_reuse"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")
        v = self.cost_gate_margin
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < float("inf"):
            raise ValueError(f"cost_gate_margin={v!r}; valid: a positive finite factor")
        v = self.cost_gate_max_interval
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"cost_gate_max_interval={v!r}; valid: an int >= 1 (steps)")
        v = self.transfer_retry_steps
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"transfer_retry_steps={v!r}; valid: an int >= 0 (engine steps before copying "
                             "resumes after a failed transfer; 0: never)")
        if self.copy_transport not in COPY_TRANSPORTS:
            raise ValueError(f"copy_transport={self.copy_transport!r}; valid: {', '.join(COPY_TRANSPORTS)}")
        if self.wandb_mode not in WANDB_MODES:
            raise ValueError(f"wandb_mode={self.wandb_mode!r} is not one of {WANDB_MODES}")
        if self.wandb_project is not None and (not isinstance(self.wandb_project, str) or not self.wandb_project):
            raise ValueError(f"wandb_project={self.wandb_project!r}; valid: None or a non-empty project name")
        if self.replica_memory_cap_mib is not None and not self.replica_memory_cap_mib >= 0:
            raise ValueError(f"replica_memory_cap_mib={self.replica_memory_cap_mib!r}; valid: None or >= 0")
        for name in ("predictor_hidden", "predictor_period", "predictor_sample_tokens"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError(f"{name} must be an int, got {v!r}")
        if self.predictor_hidden < 0:
            raise ValueError(f"predictor_hidden={self.predictor_hidden} is negative; valid: 0 (frozen router "
                             "copy only) or a positive residual width")
        if self.predictor_period < 1:
            raise ValueError(f"predictor_period={self.predictor_period}; valid: >= 1 engine steps per update")
        if self.predictor_sample_tokens < 1:
            raise ValueError(f"predictor_sample_tokens={self.predictor_sample_tokens}; valid: >= 1")
        v = self.predictor_drift_threshold
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < float("inf"):
            raise ValueError(f"predictor_drift_threshold={v!r}; valid: a finite number >= 0 (top-K accuracy "
                             "below which online updates run; 0: never, above 1: always)")
        if not isinstance(self.predictor_background, bool):
            raise TypeError(f"predictor_background must be a bool, got {self.predictor_background!r}")
        v = self.predictor_drift_period
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"predictor_drift_period={v!r}; valid: an int >= 1 (engine steps between two "
                             "drift estimates)")
        v = self.predictor_metrics_period
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"predictor_metrics_period={v!r}; valid: an int >= 0 (engine steps between two "
                             "scored steps; 0: never score)")
        if not (isinstance(self.predictor_lr, (int, float)) and 0 < self.predictor_lr < float("inf")):
            raise ValueError(f"predictor_lr={self.predictor_lr!r}; valid: a positive finite learning rate")
        if isinstance(self.replica_slots_per_rank, bool) or not isinstance(
            self.replica_slots_per_rank, int
        ):
            raise TypeError(
                f"replica_slots_per_rank must be an int, got {self.replica_slots_per_rank!r}"
            )
        if self.replica_slots_per_rank < 0:
            raise ValueError(
                f"replica_slots_per_rank={self.replica_slots_per_rank} is negative; "
                "valid values are 0 (no replication) or a positive slot count"
            )
        if self.layer0_counts not in LAYER0_COUNTS:
            raise ValueError(f"layer0_counts={self.layer0_counts!r} is not one of {LAYER0_COUNTS}")
        if self.replica_mode not in REPLICA_MODES:
            raise ValueError(f"replica_mode={self.replica_mode!r} is not one of {REPLICA_MODES}")
        if self.dispatch_split not in DISPATCH_SPLITS:
            raise ValueError(f"dispatch_split={self.dispatch_split!r} is not one of {DISPATCH_SPLITS}")
        if self.control_path not in CONTROL_PATHS:
            raise ValueError(f"control_path={self.control_path!r} is not one of {CONTROL_PATHS}")
        if self.control_path == "device":
            if self.dispatch_split != "tokens":
                raise ValueError(f"control_path='device' with dispatch_split={self.dispatch_split!r}: the time "
                                 "objective's split is host code; valid: dispatch_split='tokens' (the exact token "
                                 "split, on the device), or control_path='host'")
            if not self.pipeline_reassign:
                raise ValueError("control_path='device' with pipeline_reassign=False: the default split over the "
                                 "copies is host code; valid: pipeline_reassign=True (the exact token split on the "
                                 "device), or control_path='host'")
            if self.replica_mode == "resident":
                raise ValueError("control_path='device' with replica_mode='resident': the resident decision is "
                                 "host code; valid: replica_mode 'streamed' or 'auto' (streamed on the device "
                                 "path), or control_path='host'")
        if self.expert_backend not in EXPERT_BACKENDS:
            raise ValueError(
                f"expert_backend={self.expert_backend!r} is not one of {EXPERT_BACKENDS}"
            )
        if self.assignment_policy not in ASSIGNMENT_POLICIES:
            raise ValueError(
                f"assignment_policy={self.assignment_policy!r} is not one of {ASSIGNMENT_POLICIES}"
            )

    @property
    def peer_wait_s(self) -> float:
        """The longest a live peer can be late for a collective: a failed copy's transfer timeout
        twice (send and commit) plus the prefetch deadline. Groups wait this long before they
        give a peer up as lost."""
        return 2 * self.collective_timeout_s + self.prefetch_deadline_ms / 1e3

    def validate_for_model(self, num_experts: int, ep_size: int, topk: Optional[int] = None) -> None:
        """Raise ValueError when this config cannot serve a model of this shape."""
        if num_experts is None or num_experts <= 0:
            raise ValueError(f"num_experts={num_experts} must be a positive expert count")
        if ep_size <= 0:
            raise ValueError(f"expert-parallel size {ep_size} must be positive")
        if num_experts % ep_size != 0:
            divisors = [d for d in range(1, num_experts + 1) if num_experts % d == 0]
            raise ValueError(
                f"num_experts={num_experts} is not divisible by expert-parallel size {ep_size}; "
                f"valid EP sizes for {num_experts} experts: {divisors}"
            )
        if topk is not None and not (1 <= topk <= num_experts):
            raise ValueError(f"moe_router_topk={topk} must be between 1 and num_experts={num_experts}")
        foreign = num_experts - num_experts // ep_size
        if self.replica_slots_per_rank > foreign:
            raise ValueError(
                f"replica_slots_per_rank={self.replica_slots_per_rank} exceeds the {foreign} experts "
                f"that other ranks own (num_experts={num_experts}, ep={ep_size}); "
                f"valid range: 0..{foreign}"
            )

    def replace(self, **changes) -> "ProbeConfig":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
