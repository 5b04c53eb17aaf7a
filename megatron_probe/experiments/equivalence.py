"""Equivalence check: the PROBE MoE layer against (a) a dense float64 reference and (b) the stock
Megatron ``MoELayer``, under random and adversarial routings, placements and assignments.

Run on every rank of an EP group (see ``tools/check_equivalence.py``). Every random choice
that must agree across ranks (weights, placement, assignment, routing case) comes from a
generator seeded by ``(seed, trial)`` only; each rank's tokens come from ``(seed, trial, rank)``.

Placements: random, random with one hot expert copied everywhere first, PROBE's plan on a wrong
forecast of the trial's counts (``planned_placement``), or none (static EP). Assignments: the
configured policy, a random valid one, or the live pipeline's split on the true counts
(``policy.split.placement_split``). ``first_trial`` re-runs any trial alone (its inputs come from
``(seed, trial)`` only).

Reference (b) is the stock ``MoELayer`` at EP = 1 holding all experts, built on a single-rank
process group on every rank and fed that rank's tokens: routing is per token, so the stock
layer's output for those tokens is what any EP size must reproduce. Its dispatcher is
``alltoall`` on GPU and ``allgather`` on CPU (Megatron's ``alltoall`` needs CUDA streams); its
router is ``TopKRouter`` when its gating can run (GPU with Transformer Engine) and otherwise
``ProbeRouter``, whose routing is TopKRouter's inherited code.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

ROUTING_CASES = ("router", "one_expert", "hot_rank", "rank_silent", "empty", "uniform", "random_replay")

TOLERANCE = {"fp32": 1e-5, "bf16": 2e-2, "fp8": 1.5e-1}


@dataclass
class EquivalenceOptions:
    ep: int
    experts: int = 8
    topk: int = 2
    replica_slots: int = 2
    trials: int = 20
    dtype: str = "fp32"
    backend: str = "all"  # auto | grouped_mm | loop | te | all (every backend that runs here)
    fp8_recipe: str = "none"  # none | delayed | current | mxfp8 (TE only)
    hidden: int = 32
    ffn: int = 64
    max_tokens: int = 48
    seed: int = 1234
    device: str = "cpu"
    compare_stock: bool = True
    first_trial: int = 0  # trials first_trial .. first_trial + trials - 1 (each drawn from (seed, trial) alone)
    dp: int = 1  # data-parallel replicas of the expert group: world = dp x ep, each replica its own tokens
    tp: int = 1  # tensor parallel (attention; expert TP 1): TP peers hold the same tokens, unless sp
    sp: bool = False  # sequence parallel over the TP peers: each holds its own share of the tokens
    etp: int = 1  # expert tensor parallel: 1, or tp (each expert's weights split over the TP peers)
    pp: int = 1  # pipeline stages: world = pp x dp x ep, each stage's layer on its own expert groups
    # ProbeConfig.control_path: "device" keeps counts and assignment on the tokens' device (the
    # assignment given as an assignment source; "policy" and "split" trials: the device token split)
    control_path: str = "host"


@dataclass
class TrialResult:
    trial: int
    case: str
    score_function: str
    activation: str
    backend: str
    replicas: int
    placement: str
    assignment: str
    tokens: List[int]
    max_abs_vs_dense: float
    max_rel_vs_dense: float
    max_abs_vs_stock: Optional[float]
    bit_exact_vs_stock: Optional[bool]
    rank_loads: List[int]
    passed: bool


@dataclass
class EquivalenceReport:
    options: Dict
    trials: List[TrialResult] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return bool(self.trials) and all(t.passed for t in self.trials)

    def to_json(self) -> Dict:
        abs_d = [t.max_abs_vs_dense for t in self.trials] + [
            t.max_abs_vs_stock for t in self.trials if t.max_abs_vs_stock is not None
        ]
        stock = [t for t in self.trials if t.bit_exact_vs_stock is not None]
        return {
            "max_abs_diff": max(abs_d) if abs_d else 0.0,
            "max_rel_diff_vs_dense": max((t.max_rel_vs_dense for t in self.trials), default=0.0),
            "max_abs_diff_vs_stock": max((t.max_abs_vs_stock for t in stock), default=None),
            "bit_exact_vs_stock": sum(t.bit_exact_vs_stock for t in stock),
            "compared_with_stock": len(stock),
            "trials": len(self.trials),
            "ep": self.options["ep"],
            "passed": self.passed,
            "tolerance_rel": TOLERANCE[_tolerance_key(self.options)],
            "seconds": round(self.seconds, 2),
            "options": self.options,
            "cases": [dataclasses.asdict(t) for t in self.trials],
        }


# ---------------------------------------------------------------------------- helpers
def available_backends(device: torch.device, dtype: torch.dtype) -> List[str]:
    from megatron_probe.mechanism import te_backend
    from megatron_probe.mechanism.grouped_gemm import grouped_mm_supported

    out = ["loop"]
    if grouped_mm_supported(device, dtype):
        out.append("grouped_mm")
    if te_backend.HAVE_TE and device.type == "cuda":
        out.append("te")
    return out


def _tolerance_key(options: dict) -> str:
    """FP8 arithmetic (a TE recipe, or the ``fp8`` backend) has its own tolerance."""
    return "fp8" if options["fp8_recipe"] != "none" or options["backend"] == "fp8" else options["dtype"]


def _torch_dtype(name: str) -> torch.dtype:
    return {"fp32": torch.float32, "bf16": torch.bfloat16}[name]


def random_placement(gen: torch.Generator, ep: int, num_experts: int, slots: int, hot: Optional[int] = None):
    """Random valid placement; with ``hot`` set, every rank that can copies that expert first."""
    L = num_experts // ep
    placement = torch.full((ep, slots), -1, dtype=torch.long)
    for r in range(ep):
        foreign = [e for e in range(num_experts) if e // L != r]
        order = torch.randperm(len(foreign), generator=gen).tolist()
        chosen = [foreign[i] for i in order]
        if hot is not None and hot // L != r:
            chosen.remove(hot)
            chosen.insert(0, hot)
        for s in range(slots):
            if torch.rand((), generator=gen).item() < 0.8:
                placement[r, s] = chosen[s]
    return placement


def random_assignment(gen: torch.Generator, counts: torch.Tensor, placement: torch.Tensor, layout) -> torch.Tensor:
    """A random valid assignment: each (src, expert) count cut at random points over the copies."""
    from megatron_probe.policy.placement import holder_slots

    ep, E = counts.shape
    holds = (holder_slots(placement, layout) >= 0).T  # [E, ep]
    assign = torch.zeros(ep, E, ep, dtype=torch.long)
    for s in range(ep):
        for e in range(E):
            n = int(counts[s, e])
            dsts = holds[e].nonzero().flatten()
            cuts = torch.randint(0, n + 1, (len(dsts) - 1,), generator=gen).sort().values
            edges = torch.cat([torch.tensor([0]), cuts, torch.tensor([n])])
            assign[s, e, dsts] = edges[1:] - edges[:-1]
    return assign


PLACEMENTS = ("random", "hot", "planned", "none")
ASSIGNMENTS = ("policy", "random", "split")


def planned_placement(gen: torch.Generator, counts: torch.Tensor, layout):
    """PROBE's plan (``plan_probe_host``) on a wrong forecast of ``counts`` (each count times
    ``exp(0.7 z)``, ``z`` normal; a third of the (rank, expert) pairs set to 0): a placement that
    fits a load the dispatch does not see, and the cost model that planned it (per-active-expert
    cost 0, 5 or 60 tokens)."""
    from megatron_probe.policy.cost_model import ExpertCost
    from megatron_probe.policy.planner import plan_probe_host

    noise = torch.exp(0.7 * torch.randn(counts.shape, generator=gen, dtype=torch.float64))
    forecast = (counts.double() * noise).round().long()
    forecast[torch.rand(counts.shape, generator=gen) < 1 / 3] = 0
    cost = ExpertCost(per_token_us=1.0, per_active_expert_us=[0.0, 5.0, 60.0][int(torch.randint(3, (), generator=gen))])
    return plan_probe_host(forecast, layout, cost)[0], cost


def replay_indices(case: str, gen: torch.Generator, rank_gen: torch.Generator, tokens: int,
                   num_experts: int, topk: int, ep: int, rank: int, hot: int) -> Optional[torch.Tensor]:
    """Top-k expert indices ``[tokens, topk]`` forcing an adversarial routing, or None for the
    router's own choice."""
    if case in ("router", "rank_silent", "empty"):
        return None
    L = num_experts // ep
    if case == "one_expert":  # every token picks the same k experts, the hot one first
        rest = [e for e in range(num_experts) if e != hot][: topk - 1]
        row = torch.tensor([hot] + rest)
        return row.unsqueeze(0).expand(tokens, topk).contiguous()
    if case == "hot_rank":  # every token picks experts of one rank when it can
        home = hot // L
        pool = list(range(home * L, (home + 1) * L)) + [e for e in range(num_experts) if e // L != home]
        return torch.tensor(pool[:topk]).unsqueeze(0).expand(tokens, topk).contiguous()
    if case == "uniform":  # round-robin: every expert receives the same number of pairs
        base = (torch.arange(tokens) * topk + rank * tokens * topk).unsqueeze(1) + torch.arange(topk)
        return (base % num_experts).contiguous()
    if case == "random_replay":
        return torch.stack([torch.randperm(num_experts, generator=rank_gen)[:topk] for _ in range(tokens)]) \
            if tokens else torch.zeros(0, topk, dtype=torch.long)
    raise ValueError(f"unknown routing case {case!r}")


def dense_reference(x, probs, routing_map, w1, w2, gated: bool, act) -> torch.Tensor:
    """sum_k p_k * expert_k(x) in float64 from the global weights ``w1[E, F1, H]``, ``w2[E, H, F]``."""
    x = x.double()
    out = torch.zeros_like(x)
    for e in range(w1.shape[0]):
        sel = routing_map[:, e].nonzero().flatten()
        if sel.numel() == 0:
            continue
        h = x[sel] @ w1[e].double().T
        if gated:
            a, b = torch.chunk(h, 2, dim=-1)
            h = act(a) * b
        else:
            h = act(h)
        out[sel] += probs[sel, e].double().unsqueeze(-1) * (h @ w2[e].double().T)
    return out


# ---------------------------------------------------------------------------- one rank
def run_rank(rank: int, world_size: int, opts: EquivalenceOptions) -> Optional[EquivalenceReport]:
    """Run every trial on this rank; rank 0 returns the report (others return None)."""
    import warnings

    warnings.filterwarnings("ignore")
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.transformer.moe.moe_layer import MoELayer
    from megatron.core.transformer.moe.router_replay import RouterReplay, RouterReplayAction
    from megatron.core.transformer.spec_utils import build_module
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_probe.config import ProbeConfig
    from megatron_probe.mcore.cpu import destroy_megatron_parallel, initialize_megatron_parallel
    from megatron_probe.mcore.router import ProbeRouter
    from megatron_probe.mcore.spec import probe_layer_spec
    from megatron_probe.mechanism import te_backend
    from megatron_probe.mechanism.comm import all_gather_rows, all_reduce_sum
    from megatron_probe.policy.cost_model import ExpertCost
    from megatron_probe.policy.split import placement_split
    if world_size != opts.ep * opts.dp * opts.pp:
        raise ValueError(f"{world_size} processes for EP {opts.ep} x DP {opts.dp} x PP {opts.pp}: need "
                         f"{opts.ep * opts.dp * opts.pp}")
    ep, world_rank = opts.ep, rank
    device = torch.device(opts.device if opts.device != "cuda" else f"cuda:{torch.cuda.current_device()}")
    dtype = _torch_dtype(opts.dtype)
    if (world_size // opts.pp) % opts.tp:
        raise ValueError(f"TP {opts.tp} does not divide the {world_size // opts.pp} processes of a stage")
    if opts.sp and opts.tp < 2:
        raise ValueError(f"sequence parallel with TP {opts.tp}: it shards the tokens over the TP peers; valid: TP >= 2")
    if opts.etp not in (1, opts.tp):
        raise ValueError(f"expert TP {opts.etp}: valid: 1 or TP ({opts.tp})")
    initialize_megatron_parallel(ep, seed=opts.seed, device=device.type, tp_size=opts.tp, pp_size=opts.pp,
                                 etp_size=opts.etp)
    from megatron.core import parallel_state

    ep_group = parallel_state.get_expert_model_parallel_group()
    etp_group = parallel_state.get_expert_tensor_parallel_group() if opts.etp > 1 else None
    etp_rank = parallel_state.get_expert_tensor_parallel_rank() if opts.etp > 1 else 0
    # with DP > 1 (Megatron's expert groups [0..ep-1], [ep..2ep-1], ...): the trial's model and
    # routing are the same in every replica, the tokens are each rank's own
    rank = parallel_state.get_expert_model_parallel_rank() if ep > 1 else 0
    # with TP > 1 the attention-TP peers hold the same tokens (drawn from their TP group's index),
    # unless the model is sequence parallel: then each its own share, as under DP
    source = world_rank if opts.sp else world_rank // opts.tp
    singles = [dist.new_group([r]) for r in range(world_size)] if world_size > 1 else [None]
    single = singles[world_rank]
    backends = available_backends(device, dtype) if opts.backend == "all" else [opts.backend]
    fp8_ctx = _fp8_context(opts.fp8_recipe)
    report = EquivalenceReport(options=dataclasses.asdict(opts))
    t0 = time.time()
    E, K, L, H, Fh = opts.experts, opts.topk, opts.experts // ep, opts.hidden, opts.ffn

    for trial in range(opts.first_trial, opts.first_trial + opts.trials):
        gen = torch.Generator().manual_seed(opts.seed * 1000 + trial)
        rank_gen = torch.Generator().manual_seed(opts.seed * 1000 + trial * 97 + source + 1)
        case = ROUTING_CASES[trial % len(ROUTING_CASES)] if trial < 2 * len(ROUTING_CASES) else \
            ROUTING_CASES[int(torch.randint(len(ROUTING_CASES), (), generator=gen))]
        score_fn = ["softmax", "sigmoid"][int(torch.randint(2, (), generator=gen))]
        pre_softmax = score_fn == "softmax" and (bool(torch.randint(2, (), generator=gen)) or K == 1)
        use_bias = score_fn == "sigmoid" and bool(torch.randint(2, (), generator=gen))
        gated = bool(torch.randint(2, (), generator=gen)) or opts.fp8_recipe != "none"
        act = F.silu if gated else F.gelu
        backend = backends[trial % len(backends)]
        hot = int(torch.randint(E, (), generator=gen))
        # every 5th trial static EP; the others cycle through the placement kinds
        place_kind = "none" if opts.replica_slots == 0 or trial % 5 == 4 else PLACEMENTS[(trial // 5 + trial) % 3]
        if place_kind in ("random", "hot"):
            placement = random_placement(gen, ep, E, opts.replica_slots, hot=hot if place_kind == "hot" else None)
        else:  # planned: drawn once the counts are known
            placement = torch.full((ep, opts.replica_slots), -1, dtype=torch.long)
        assign_mode = ASSIGNMENTS[int(torch.randint(3, (), generator=gen))] if place_kind != "none" else "policy"
        w_router = torch.randn(E, H, generator=gen)
        w1 = torch.randn(E, Fh * (2 if gated else 1), H, generator=gen) / math.sqrt(H)
        w2 = torch.randn(E, H, Fh, generator=gen) / math.sqrt(Fh)
        bias = torch.randn(E, generator=gen) * 0.1
        if case == "empty":
            T = 0
        elif case == "rank_silent" and source % ep == int(torch.randint(ep, (), generator=gen)):
            T = 0
        else:
            T = int(torch.randint(1, opts.max_tokens + 1, (), generator=rank_gen))
        x = torch.randn(T, 1, H, generator=rank_gen).to(device=device, dtype=dtype)
        idx = replay_indices(case, gen, rank_gen, T, E, K, ep, source % ep, hot)

        cfg = TransformerConfig(
            num_layers=1, hidden_size=H, num_attention_heads=4, ffn_hidden_size=Fh, moe_ffn_hidden_size=Fh,
            num_moe_experts=E, moe_router_topk=K, expert_model_parallel_size=ep, tensor_model_parallel_size=opts.tp,
            expert_tensor_parallel_size=opts.etp, sequence_parallel=opts.sp, pipeline_model_parallel_size=opts.pp,
            pipeline_dtype=dtype if opts.pp > 1 else None,
            moe_token_dispatcher_type="alltoall", use_cpu_initialization=device.type == "cpu",
            add_bias_linear=False, params_dtype=dtype, bf16=dtype == torch.bfloat16,
            moe_aux_loss_coeff=0.0, moe_router_score_function=score_fn,
            moe_router_pre_softmax=pre_softmax, moe_router_enable_expert_bias=use_bias,
            moe_router_dtype="fp32", gated_linear_unit=gated, activation_func=act,
            moe_enable_routing_replay=True, bias_activation_fusion=False,
            hidden_dropout=0.0, attention_dropout=0.0,
        )
        RouterReplay.clear_global_router_replay_instances()
        stock_spec = get_gpt_layer_local_spec(num_experts=E, moe_grouped_gemm=False)
        on_device = opts.control_path == "device"
        pspec = probe_layer_spec(stock_spec, ProbeConfig(
            replica_slots_per_rank=opts.replica_slots, expert_backend=backend, control_path=opts.control_path,
            dispatch_split="tokens" if on_device else "time")).submodules.mlp
        layer = build_module(pspec, config=cfg).to(device)
        layer.eval()
        sd = _global_state(layer.state_dict(), w_router, w1, w2, bias if use_bias else None, rank * L, L, dtype,
                           opts.etp, etp_rank, gated)
        layer.load_state_dict(sd)
        _set_replay(layer.router, idx, RouterReplayAction)

        with torch.no_grad():
            probs, routing_map = layer.router(x)
            local_counts = routing_map.sum(0).long()
            if opts.etp > 1 and opts.sp:  # the dispatcher gathers the ETP peers' tokens first
                local_counts = all_reduce_sum(local_counts, etp_group)
            counts = all_gather_rows(local_counts, ep_group).cpu()
            split_cost = None
            if place_kind == "planned":
                placement, split_cost = planned_placement(gen, counts, layer.layout)
            layer.set_replica_placement(placement.clone())
            if on_device:  # an assignment source working where the counts are
                given = random_assignment(gen, counts, placement, layer.layout) if assign_mode == "random" else None
                layer.token_dispatcher.assignment_fn = _device_assignment(given)
            elif assign_mode == "random":
                layer.set_next_assignment(random_assignment(gen, counts, placement, layer.layout))
            elif assign_mode == "split":  # the live pipeline's dispatch split on the true counts
                layer.set_next_assignment(placement_split(counts, placement, layer.layout, "time",
                                                          split_cost or ExpertCost(1.0, 5.0)))
            with fp8_ctx():
                out, _ = layer(x)
            loads = layer.token_dispatcher.last_assignment.sum(dim=(0, 1)).tolist()

            ref = dense_reference(x.view(-1, H).cpu(), probs.cpu(), routing_map.cpu(),
                                  w1.to(dtype), w2.to(dtype), gated, act).view(T, 1, H)
            o = out.double().cpu()
            abs_dense = (o - ref).abs().max().item() if T else 0.0
            scale = ref.abs().max().item() if T else 1.0
            rel_dense = abs_dense / max(scale, 1e-30)

            abs_stock, exact = None, None
            if opts.compare_stock and opts.fp8_recipe == "none":
                stock = _build_stock_layer(cfg, stock_spec, single, device, MoELayer, build_module,
                                           ProcessGroupCollection, ProbeRouter, te_backend.HAVE_TE)
                stock.load_state_dict(_global_state(stock.state_dict(), w_router, w1, w2,
                                                    bias if use_bias else None, 0, E, dtype))
                stock.eval()
                _set_replay(stock.router, idx, RouterReplayAction)
                sout, _ = stock(x)
                abs_stock = (out.double() - sout.double()).abs().max().item() if T else 0.0
                exact = bool(torch.equal(out, sout))

        tol = TOLERANCE[_tolerance_key(dataclasses.asdict(opts))]
        ok = rel_dense <= tol and math.isfinite(abs_dense)
        if abs_stock is not None:
            ok = ok and abs_stock <= tol * max(scale, 1e-30)
        # gather per-rank outcomes
        stats = torch.tensor([abs_dense, rel_dense, -1.0 if abs_stock is None else abs_stock,
                              1.0 if ok else 0.0, float(T), 1.0 if exact in (True, None) else 0.0],
                             dtype=torch.float64)
        allstats = all_gather_rows(stats, _cpu_group(dist.group.WORLD)) if world_size > 1 else stats.unsqueeze(0)
        if world_rank == 0:
            report.trials.append(TrialResult(
                trial=trial, case=case, score_function=score_fn + ("+pre" if pre_softmax else "") +
                ("+bias" if use_bias else ""), activation="swiglu" if gated else "gelu",
                backend=layer.expert_compute.backend or backend,
                replicas=int((placement >= 0).sum()), placement=place_kind, assignment=assign_mode,
                tokens=[int(v) for v in allstats[:, 4].tolist()],
                max_abs_vs_dense=float(allstats[:, 0].max()), max_rel_vs_dense=float(allstats[:, 1].max()),
                max_abs_vs_stock=None if allstats[0, 2] < 0 else float(allstats[:, 2].max()),
                bit_exact_vs_stock=None if allstats[0, 2] < 0 else bool(allstats[:, 5].min() > 0),
                rank_loads=[int(v) for v in loads], passed=bool(allstats[:, 3].min() > 0),
            ))
        del layer
    report.seconds = time.time() - t0
    RouterReplay.clear_global_router_replay_instances()
    destroy_megatron_parallel()
    return report if world_rank == 0 else None


def _device_assignment(given: Optional[torch.Tensor]):
    """An assignment source for the device control path: ``given`` (host) moved to the counts'
    device, or (None) the exact token split there (``policy.split_triton``)."""
    from megatron_probe.policy.split_triton import placement_token_split_device

    def assign(counts, placement, layout):
        if given is not None:
            return given.to(counts.device)
        return placement_token_split_device(counts, placement.to(counts.device), layout)[0]
    return assign


_CPU_GROUPS: Dict = {}


def _cpu_group(group):
    """Result gathering runs on CPU tensors: on NCCL use a gloo twin of the group."""
    if dist.get_backend(group) == "gloo":
        return group
    if "g" not in _CPU_GROUPS:
        _CPU_GROUPS["g"] = dist.new_group(backend="gloo")
    return _CPU_GROUPS["g"]


def _set_replay(router, idx, action_enum) -> None:
    replay = router.router_replay
    if idx is None:
        replay.clear_router_replay_action()
    else:
        replay.set_target_indices(idx)
        replay.set_router_replay_action(action_enum.REPLAY_FORWARD)


def _global_state(sd, w_router, w1, w2, bias, first_expert, count, dtype, etp=1, etp_rank=0, gated=True):
    """State dict of a SequentialMLP MoE layer holding experts ``first..first+count-1`` (their
    expert-TP rank ``etp_rank``'s shares when ``etp`` > 1)."""
    from megatron_probe.mcore.expert_shards import expert_weight_shard

    out = dict(sd)
    out["router.weight"] = w_router.to(sd["router.weight"].dtype)
    if bias is not None and "router.expert_bias" in sd:
        out["router.expert_bias"] = bias.float()
    for j in range(count):
        out[f"experts.local_experts.{j}.linear_fc1.weight"] = expert_weight_shard(
            w1[first_expert + j], "fc1", etp, etp_rank, gated).to(dtype)
        out[f"experts.local_experts.{j}.linear_fc2.weight"] = expert_weight_shard(
            w2[first_expert + j], "fc2", etp, etp_rank, gated).to(dtype)
    return out


def _build_stock_layer(cfg, stock_spec, single_group, device, MoELayer, build_module,
                       ProcessGroupCollection, ProbeRouter, have_te):
    stock_cfg = dataclasses.replace(
        cfg, expert_model_parallel_size=1, tensor_model_parallel_size=1, pipeline_model_parallel_size=1,
        sequence_parallel=False, expert_tensor_parallel_size=1, moe_token_dispatcher_type="alltoall" if device.type == "cuda" else "allgather",
    )
    pgs = ProcessGroupCollection()
    from megatron.core import parallel_state

    g = single_group if single_group is not None else parallel_state.get_expert_model_parallel_group()
    for name in ("tp", "cp", "ep", "expt_tp", "expt_dp", "tp_ep", "tp_cp", "tp_dp_cp"):
        setattr(pgs, name, g)
    spec = stock_spec.submodules.mlp
    if not (device.type == "cuda" and have_te):
        spec = dataclasses.replace(spec, submodules=dataclasses.replace(spec.submodules, router=ProbeRouter))
    return build_module(spec, config=stock_cfg, pg_collection=pgs).to(device)


def _fp8_context(recipe: str):
    import contextlib

    if recipe == "none":
        return contextlib.nullcontext
    from megatron_probe.mechanism import te_backend

    if not te_backend.HAVE_TE:
        raise RuntimeError(f"--fp8 {recipe} needs Transformer Engine, which is not installed")
    import transformer_engine.common.recipe as R
    import transformer_engine.pytorch as te

    rec = {"delayed": lambda: R.DelayedScaling(), "current": lambda: R.Float8CurrentScaling(),
           "mxfp8": lambda: R.MXFP8BlockScaling()}[recipe]()
    auto = getattr(te, "autocast", None)
    if auto is not None:
        return lambda: auto(enabled=True, recipe=rec)
    return lambda: te.fp8_autocast(enabled=True, fp8_recipe=rec)


def format_table(report: EquivalenceReport) -> str:
    rows = ["trial case           score              act     backend     rep place   assign  tokens/rank      "
            "loads/rank       rel_vs_dense  abs_vs_stock  exact  ok"]
    for t in report.trials:
        rows.append(
            f"{t.trial:5d} {t.case:14s} {t.score_function:18s} {t.activation:7s} {t.backend:11s} "
            f"{t.replicas:3d} {t.placement:7s} {t.assignment:7s} {str(t.tokens):16s} {str(t.rank_loads):16s} "
            f"{t.max_rel_vs_dense:12.2e}  "
            f"{'-' if t.max_abs_vs_stock is None else format(t.max_abs_vs_stock, '.2e'):>12s}  "
            f"{'-' if t.bit_exact_vs_stock is None else ('yes' if t.bit_exact_vs_stock else 'no'):5s}  "
            f"{'PASS' if t.passed else 'FAIL'}"
        )
    return "\n".join(rows)
