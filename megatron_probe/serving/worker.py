"""Serve a workload with the stock MoE layer and/or the PROBE layer, side by side.

:func:`serve_worker` runs on every rank (gloo on CPU, NCCL on GPU). In ``--compare`` mode two
copies of the model are built from the same checkpoint, one per mode, each with its own
:class:`~megatron_probe.serving.engine.ContinuousBatchingEngine`; the two engines step
alternately (the order rotates every step), so both see the same machine noise. The stock
model is Megatron's own MoE layer where it runs (CUDA, or one process); on CPU with EP > 1 it is
the PROBE layer with replication off, i.e. Megatron's placement and routing over this project's
gloo All-to-All (Megatron's alltoall dispatcher needs CUDA). The PROBE model runs the live
lookahead pipeline. Both must emit exactly the same tokens.

Everything measured goes into one result dict (see :func:`summarise`) on rank 0.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
import torch.distributed as dist

from megatron_probe.config import ProbeConfig
from megatron_probe.fileio import write_whole
from megatron_probe.runtime.host_malloc import apply_host_malloc_setting, host_malloc_state

MODES = ("stock", "probe")


@dataclass
class ServeOptions:
    checkpoint: str
    workload: str
    ep: int = 2
    dp: int = 1  # data-parallel replicas of the expert group: world = dp x ep, each rank its own requests
    tp: int = 1  # tensor-parallel attention (expert TP 1): TP peers serve the same requests
    sp: bool = False  # sequence parallel over the TP peers: each holds its share of the tokens outside attention
    etp: int = 1  # expert tensor parallel: 1, or tp (the TP peers hold shares of every expert's weights)
    pp: int = 1  # pipeline stages: world = pp x dp x ep; the stages of a pipeline serve the same requests
    modes: tuple = ("stock", "probe")
    probe: Optional[ProbeConfig] = None  # validated once by the caller (default: ProbeConfig())
    kv_capacity: int = 32
    prefill_chunk: int = 64
    max_steps: Optional[int] = None
    max_requests: Optional[int] = None
    max_new_tokens: Optional[int] = None
    bf16: bool = False
    threads: int = 1
    seed: int = 1234
    progress: bool = True
    metrics_path: Optional[str] = None  # per-step JSON lines
    cost_model: str = "measured"  # planner's expert/copy cost: measured here, or the hardware profile
    expect: Dict = field(default_factory=dict)  # model-shape flags to check against the checkpoint


def check_model_flags(cfg, expect: Dict, checkpoint: str) -> None:
    """Raise when a model-shape flag given on the command line disagrees with the checkpoint."""
    names = {"num_layers": "--num-layers", "hidden_size": "--hidden-size", "num_attention_heads":
             "--num-attention-heads", "num_experts": "--num-experts", "topk": "--moe-router-topk",
             "expert_ffn_hidden": "--moe-ffn-hidden-size", "seq_length": "--seq-length", "vocab_size": "--vocab-size"}
    bad = [f"{names[k]} {v} (checkpoint: {getattr(cfg, k)})" for k, v in expect.items()
           if v is not None and getattr(cfg, k) != v]
    if bad:
        raise ValueError(f"checkpoint {checkpoint!r} does not match the flags: " + "; ".join(bad) +
                         ". Drop these flags or pass the checkpoint of that model.")


def _build(mode: str, opts: ServeOptions, probe_cfg):
    from megatron.core import parallel_state as ps

    from megatron_probe.experiments.tiny_moe import load_model

    dtype = torch.bfloat16 if opts.bf16 else torch.float32
    ep = opts.ep
    where = dict(ep=ep, rank=ps.get_expert_model_parallel_rank(), dtype=dtype, tp=opts.tp, sp=opts.sp, etp=opts.etp,
                 tp_rank=ps.get_tensor_model_parallel_rank(), pp=opts.pp, stage=ps.get_pipeline_model_parallel_rank())
    if mode == "stock":
        if torch.cuda.is_available() or ep == 1:
            return load_model(opts.checkpoint, spec="stock", **where)
        return load_model(opts.checkpoint, spec="probe", probe_config=probe_cfg.replace(replica_slots_per_rank=0),
                          **where)
    return load_model(opts.checkpoint, spec="probe", probe_config=probe_cfg, **where)


def stock_label(ep: int) -> str:
    if torch.cuda.is_available() or ep == 1:
        return "Megatron-Core MoELayer (stock spec)"
    return ("Megatron placement on the PROBE layer with replication off (Megatron's alltoall dispatcher "
            "needs CUDA for EP > 1)")


@dataclass
class ServingMode:
    """One mode's model, engine and (PROBE) live pipeline on this rank."""

    model: object
    engine: object
    pipe: object = None


def first_differences(stock: Dict, probe: Dict) -> Dict:
    """``{request: index of its first generated token that differs}`` for every request whose tokens
    differ (a missing or shorter list differs where it ends). On a GPU, bf16 GEMMs whose kernels
    depend on the row count can flip a near-tie late in a request; a difference at the first tokens
    points at a bug."""
    out = {}
    for i, a in stock.items():
        b = probe.get(i)
        if b is None:
            out[i] = 0
        elif a != b:
            out[i] = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return out


def serve_worker(rank: int, ws: int, opts: ServeOptions, out_path: Optional[str]) -> None:
    """Serve ``opts.workload`` in every mode of ``opts.modes`` on this rank; rank 0 gathers every
    rank's rows and requests and writes the result (:func:`summarise`) to ``out_path``. With
    ``opts.dp`` > 1 the world holds ``dp`` replicas of the expert group (Megatron's expert groups
    of ``ep`` consecutive ranks): each rank serves its own share of the requests, each expert
    group steps and balances on its own. With ``opts.tp`` > 1 (Megatron's tensor-parallel
    attention, expert TP 1) the ``tp`` ranks of a TP group serve the same requests together;
    only TP rank 0's requests and token counts enter the result. With ``opts.sp`` (sequence
    parallel) the TP peers still serve the same requests, but each holds and dispatches its own
    share of the step's tokens outside attention (see the engine). With ``opts.etp`` = ``opts.tp``
    (expert TP) the TP peers hold shares of every expert's weights; Megatron's expert groups then
    put the TP peers together and the EP groups across them, and each EP group dispatches its TP
    group's tokens (``mechanism/dispatcher.py``). With
    ``opts.pp`` > 1 each stage holds its share of the layers (Megatron's stages: ranks
    ``stage * ws / pp ...``); hidden states go stage to stage, the last stage samples, and each
    stage's PROBE pipeline balances its own MoE layers on its own expert groups."""
    if ws != opts.ep * opts.dp * opts.pp:
        raise ValueError(f"{ws} processes for EP {opts.ep} x DP {opts.dp} x PP {opts.pp}: need "
                         f"{opts.ep * opts.dp * opts.pp}")
    device, group = _init_serving(opts)
    from megatron_probe.data.workloads import Workload

    wl = Workload.load(opts.workload)
    probe_cfg = opts.probe if opts.probe is not None else ProbeConfig()
    modes, calibration = {}, {}
    for mode in opts.modes:
        modes[mode], cal = _build_mode(mode, opts, rank, ws, wl, probe_cfg, device, group)
        calibration = cal or calibration
    rows = _serve_steps(modes, opts, wl, rank)
    local = _local_results(modes, rows, calibration)
    in_stage = rank % (ws // opts.pp)  # Megatron puts the stages outermost
    local["replica"] = in_stage // (opts.ep * opts.etp)  # Megatron's expert ranks: ETP innermost, then EP
    local["stage"] = rank // (ws // opts.pp)
    # the rank whose requests and tokens count: TP rank 0 of the last stage
    local["lead"] = in_stage % opts.tp == 0 and rank // (ws // opts.pp) == opts.pp - 1
    # every rank of an EP group reports its group's copies (the plan is the group's): they count once
    # per expert group (its first rank: expert TP shard 0, EP rank 0), their bytes once per shard
    local["copy_lead"] = in_stage % (opts.ep * opts.etp) == 0
    local["shard_lead"] = (in_stage // opts.etp) % opts.ep == 0
    for m in modes.values():
        if m.pipe is not None:
            m.pipe.close()
    _gather_and_write(local, opts, wl, rank, ws, group, out_path)


def _init_serving(opts: ServeOptions):
    """Threads, Megatron's parallel state; returns ``(device, EP group or None)``."""
    from megatron_probe.mcore.cpu import initialize_megatron_parallel

    import logging

    # Megatron warns that it hands process groups only to its exact MoELayer class; the PROBE
    # layer takes its groups from the parallel state, so the warning is noise here
    logging.getLogger("megatron.core.transformer.transformer_layer").setLevel(logging.ERROR)
    torch.set_num_threads(opts.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    probe_cfg = opts.probe if opts.probe is not None else ProbeConfig()
    # before any mode is built: the stock and PROBE modes run under the same malloc settings
    apply_host_malloc_setting(probe_cfg.host_malloc_reuse)
    # Megatron's groups (the stock layer's dispatch, the engine's step agreement) give a dead
    # peer up as the pipeline's own groups do, not after Megatron's default 30 minutes
    initialize_megatron_parallel(opts.ep, seed=opts.seed, device=device, timeout_s=probe_cfg.peer_wait_s,
                                 tp_size=opts.tp, pp_size=opts.pp, etp_size=opts.etp)
    from megatron.core import parallel_state

    return device, (parallel_state.get_expert_model_parallel_group() if opts.ep * opts.dp > 1 else None)


def _build_mode(mode: str, opts: ServeOptions, rank: int, ws: int, wl, probe_cfg, device, group):
    """The model and engine of ``mode``; for ``probe`` also its pipeline. Returns
    ``(ServingMode, calibration dict or None)``."""
    from megatron_probe.serving.engine import ContinuousBatchingEngine, StageLinks, requests_from_workload

    from megatron.core import parallel_state as ps

    ep_rank = ps.get_expert_model_parallel_rank()
    model, tok, cfg = _build(mode, opts, probe_cfg)
    if device == "cuda":
        model = model.cuda()
    # the TP ranks of a TP group, and the stages of a pipeline, hold the same tokens: they serve
    # one share of the requests together
    per_stage = ws // opts.pp
    reqs = requests_from_workload(wl, (rank % per_stage) // opts.tp, per_stage // opts.tp, opts.max_requests,
                                  opts.max_new_tokens)
    links = None
    if opts.pp > 1:
        first, last = ps.is_pipeline_first_stage(), ps.is_pipeline_last_stage()
        links = StageLinks(ps.get_pipeline_model_parallel_group(),
                           None if first else ps.get_pipeline_model_parallel_prev_rank(),
                           None if last else ps.get_pipeline_model_parallel_next_rank(),
                           ps.get_pipeline_model_parallel_last_rank())
    engine = ContinuousBatchingEngine(model, reqs, cfg.seq_length, opts.kv_capacity, opts.prefill_chunk,
                                      tok.token_to_id("<|endoftext|>"), group, name=mode,
                                      tp_group=ps.get_tensor_model_parallel_group() if opts.tp > 1 else None,
                                      stages=links)
    if mode != "probe":
        return ServingMode(model, engine), None
    pipe, calibration = _probe_pipeline(model, opts, rank, ep_rank, probe_cfg, group)
    return ServingMode(model, engine, pipe), calibration


def _probe_pipeline(model, opts: ServeOptions, rank: int, ep_rank: int, probe_cfg, group):
    """The live pipeline of the PROBE model, its cost model and copy charge measured here unless
    ``opts.cost_model`` says to take the hardware profile's; returns ``(pipeline, calibration)``."""
    from megatron_probe.runtime.model_walk import moe_layers
    from megatron_probe.runtime.pipeline import LookaheadPipeline

    bank = moe_layers(model)[0].expert_bank
    cost = None
    if opts.cost_model == "measured":
        from megatron_probe.experiments.calibration import measure_expert_cost

        cost = measure_expert_cost(moe_layers(model)[0].config, bank, group, opts.ep)
    # with --metrics-jsonl: the pipeline's per-layer rows (and its event log when event_log is
    # on) beside it, one file per rank
    layer_rows = f"{os.path.splitext(opts.metrics_path)[0]}.layers.rank{rank}.jsonl" if opts.metrics_path else None
    if layer_rows and os.path.exists(layer_rows):
        os.remove(layer_rows)
    stage_layers = None
    if opts.pp > 1:  # this stage's MoE layers in the whole model (stages hold equal shares): the warm start's
        from megatron.core import parallel_state

        n = len(moe_layers(model))
        stage_layers = (parallel_state.get_pipeline_model_parallel_rank() * n, opts.pp * n)
    pipe = LookaheadPipeline(model, probe_cfg, ep_group=group, cost=cost, metrics_path=layer_rows,
                             stage_layers=stage_layers)
    if opts.cost_model == "measured" and opts.ep > 1 and not probe_cfg.copy_charge_us:
        from megatron_probe.experiments.calibration import measure_copy_us

        pipe.set_copy_charge(measure_copy_us(pipe, bank, ep_rank, group))
    calibration = {"cost_model": opts.cost_model, "copy_charge_us": round(pipe.copy_charge_us, 1),
                   "expert_cost_us": {"per_token": round(pipe.cost.per_token_us, 3),
                                      "per_active_expert": round(pipe.cost.per_active_expert_us, 2)}}
    return pipe, calibration


def _serve_steps(modes: Dict[str, ServingMode], opts: ServeOptions, wl, rank: int) -> List[Dict]:
    """Step the engines alternately (the order rotates every step) until every request is done
    or ``opts.max_steps``; one row per mode and step."""
    from megatron_probe.mechanism.profiling import nvtx_range

    rows: List[Dict] = []
    live = list(opts.modes)
    step = 0
    t_start = time.time()
    total_steps = max((r.arrival_step for r in wl.requests), default=0) + 1
    while live and (opts.max_steps is None or step < opts.max_steps):
        order = live[step % len(live):] + live[: step % len(live)]  # no mode always runs first
        for mode in order:
            pipe, layers = modes[mode].pipe, []
            # the pipeline's step end (distillation, metrics, their collectives) is part of the
            # step: timed inside it
            end_step = None if pipe is None else (lambda p=pipe: layers.extend(p.end_step()))
            with nvtx_range(f"serve.{mode}.step{step}"):
                rec = modes[mode].engine.step(after_forward=end_step)
            if rec is None:
                live.remove(mode)
                continue
            rows.append(_step_row(rec, mode, layers))
        if opts.progress and rank == 0 and (step % 10 == 0 or not live):
            engine = modes[opts.modes[-1]].engine
            done = sum(r.finished for r in engine.requests.values())
            n = len(engine.requests)
            bar = "#" * int(30 * done / max(1, n))
            print(f"\r[{bar:<30}] step {step} ({min(step, total_steps)}/{total_steps} arrival steps), rank 0 "
                  f"requests done {done}/{n}, {time.time() - t_start:.0f}s", end="", file=sys.stderr, flush=True)
        step += 1
    if opts.progress and rank == 0:
        print(file=sys.stderr)
    return rows


def _step_row(rec, mode: str, layers: List[Dict]) -> Dict:
    """One engine step's row; with a pipeline, its per-layer figures of the step."""
    row = {"step": rec.step, "mode": mode, "tokens": rec.tokens, "prefill_tokens": rec.prefill_tokens,
           "decode_tokens": rec.decode_tokens, "active": rec.active, "queued": rec.queued,
           "seconds": rec.seconds, "emitted": rec.emitted}
    if layers:
        n = len(layers)
        row.update(ir_before=sum(r.get("ir_before", 1.0) for r in layers) / n,
                   ir_after=sum(r.get("ir_after", 1.0) for r in layers) / n,
                   ir_layers_before=[r.get("ir_before", 1.0) for r in layers],
                   ir_layers_after=[r.get("ir_after", 1.0) for r in layers],
                   copies=sum(r["copies"] for r in layers), dropped=sum(r["dropped"] for r in layers),
                   bytes=sum(r["bytes"] for r in layers), wait_ms=sum(r["wait_ms"] for r in layers),
                   gate_on=[r.get("gate_on", 1) for r in layers])
    return row


def _local_results(modes: Dict[str, ServingMode], rows: List[Dict], calibration: Dict) -> Dict:
    """This rank's per-request results, rows and pipeline summaries, for rank 0."""
    from megatron_probe.runtime.lookahead import LookaheadRuntime

    pipes = {m: s.pipe for m, s in modes.items() if s.pipe is not None}
    return {"rows": rows,
            "requests": {mode: [dataclasses.asdict(_req_result(r)) for r in s.engine.requests.values()]
                         for mode, s in modes.items()},
            "pipeline": {m: p.summary() for m, p in pipes.items()},
            "prediction": {m: (p.runtime.metrics() if isinstance(p.runtime, LookaheadRuntime) else {})
                           for m, p in pipes.items()},
            "unfinished": {m: len(s.engine.queue) + len(s.engine.active) for m, s in modes.items()},
            "calibration": calibration}


def _gather_and_write(local: Dict, opts: ServeOptions, wl, rank: int, ws: int, group, out_path: Optional[str]):
    """Every rank's results to rank 0, which writes the summary and the per-step rows."""
    gathered = [None] * ws if rank == 0 else None
    if ws > 1:
        dist.gather_object(local, gathered, dst=0)  # every rank of every expert group
    else:
        gathered = [local]
    if rank != 0:
        return
    res = summarise(gathered, opts, wl, ws)
    if out_path:
        write_whole(out_path, json.dumps(res))
    if opts.metrics_path:
        write_whole(opts.metrics_path, "".join(json.dumps({"rank": r, **row}) + "\n"
                                               for r in range(ws) for row in gathered[r]["rows"]))


@dataclass
class RequestResult:
    id: int
    prompt_tokens: int
    tokens: List[int]
    arrival_step: int
    ttft_s: Optional[float]
    tpot_s: Optional[float]
    finished: bool


def _req_result(r) -> RequestResult:
    return RequestResult(r.id, len(r.prompt_ids), list(r.generated), r.arrival_step, r.ttft_s, r.tpot_s, r.finished)


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def _pct(xs, q):
    xs = sorted(x for x in xs if x is not None)
    if not xs:
        return None
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def summarise(gathered: List[Dict], opts: ServeOptions, wl, ws: int) -> Dict:
    """One result dict from every rank's rows and requests. A step's time is its slowest
    rank's (the MoE collectives make the ranks wait for each other anyway). With several
    replicas of the expert group (DP > 1), which step on their own, each replica's time is the
    sum of its steps' and the run's time the slowest replica's. The TP peers of a rank and the
    stages of a pipeline serve the same requests: only the lead ranks' (TP rank 0 of the last
    stage) requests and tokens count."""
    lead = [g for g in gathered if g.get("lead", True)]
    per_step: Dict[str, Dict[int, Dict]] = {m: {} for m in opts.modes}
    replica_secs: Dict[str, Dict[tuple, float]] = {m: {} for m in opts.modes}  # (replica, step) -> seconds
    for g in gathered:
        for row in g["rows"]:
            s = per_step[row["mode"]].setdefault(row["step"], {"tokens": 0, "emitted": 0, "seconds": 0.0, "ir": []})
            if g.get("lead", True):
                s["tokens"] += row["tokens"]
                s["emitted"] += row["emitted"]
            s["seconds"] = max(s["seconds"], row["seconds"])
            key = (g.get("replica", 0), row["step"])
            replica_secs[row["mode"]][key] = max(replica_secs[row["mode"]].get(key, 0.0), row["seconds"])
            if "ir_before" in row:
                s["ir"].append({**row, "stage": g.get("stage", 0)})
    modes = {}
    for m in opts.modes:
        reqs = [r for g in lead for r in g["requests"][m]]
        steps = per_step[m]
        per_replica: Dict[int, float] = {}
        for (replica, _), sec in replica_secs[m].items():
            per_replica[replica] = per_replica.get(replica, 0.0) + sec
        secs = max(per_replica.values(), default=0.0)
        emitted = sum(s["emitted"] for s in steps.values())
        tokens = sum(s["tokens"] for s in steps.values())
        out = {"steps": len(steps), "seconds": round(secs, 4), "generated_tokens": emitted,
               "processed_tokens": tokens, "throughput_tok_s": round(emitted / secs, 3) if secs else None,
               "processed_tok_s": round(tokens / secs, 3) if secs else None,
               "ttft_mean_s": _round(_mean(r["ttft_s"] for r in reqs)),
               "ttft_p90_s": _round(_pct([r["ttft_s"] for r in reqs], 0.9)),
               "tpot_mean_s": _round(_mean(r["tpot_s"] for r in reqs)),
               "requests_finished": sum(r["finished"] for r in reqs), "requests": len(reqs)}
        # one IR per step and layer: the max-over-ranks load / mean (the same on every rank)
        out.update(_ir_summary([x for s in steps.values() for x in s["ir"]]))
        ranks = [(g, g["pipeline"][m]) for g in gathered if g["pipeline"].get(m)]
        pipe = [p for _, p in ranks]
        if pipe:
            # an expert copy under expert TP is one shard per TP peer: one copy, the shards' bytes
            groups = [p for g, p in ranks if g.get("copy_lead", True)]
            out["copies"] = sum(p["copies"] for p in groups)
            out["dropped"] = sum(p["dropped"] for p in groups)
            out["bytes"] = sum(p["bytes"] for g, p in ranks if g.get("shard_lead", True))
            wait_s = max(p["wait_ms_total"] for p in pipe) / 1e3
            out["exposed_wait_s"] = round(wait_s, 4)
            out["exposed_wait_fraction"] = round(wait_s / secs, 4) if secs else None
            out["replica_memory_mib"] = round(pipe[0]["replica_memory_bytes"] / 2 ** 20, 3)
            out["replica_mode"] = pipe[0].get("replica_mode")
            out["control_path"] = pipe[0].get("control_path")
            if "control_us" in pipe[0]:
                # the control path per layer and step (us), mean over ranks, per stage
                out["control_us"] = {k: round(_mean(p["control_us"][k] for p in pipe), 1) for k in pipe[0]["control_us"]}
                out["gate_on_fraction"] = round(_mean(p["gate_on_fraction"] for p in pipe), 4)
            if "step_end_us" in pipe[0]:  # the pipeline's step end (forecaster, gate, metrics), per step
                out["step_end_us"] = round(_mean(p["step_end_us"] for p in pipe), 1)
        pred = [g["prediction"].get(m) for g in gathered if g["prediction"].get(m)]
        if pred and pred[0].get("local"):
            out["prediction_topk_acc"] = _round(_mean(p.get("local", {}).get("mean_topk_acc") for p in pred))
            glob = pred[0].get("global", {})
            if glob.get("mean_rank_load_err") is not None:
                out["prediction_rank_load_err"] = glob["mean_rank_load_err"]
        modes[m] = out
    res = {"regime": "model", "calibration": gathered[0].get("calibration", {}), "workload": wl.scenario, "workload_path": opts.workload, "ep": opts.ep,
           "dp": opts.dp, "tp": opts.tp, "sp": opts.sp, "etp": opts.etp, "pp": opts.pp, "checkpoint": opts.checkpoint, "modes": modes, "stock_is": stock_label(opts.ep),
           "options": {k: v for k, v in dataclasses.asdict(opts).items() if k not in ("expect",)},
           "host": _host(), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    if wl.extra.get("shift_step") is not None:
        res["shift_step"] = wl.extra["shift_step"]
    res["per_step"] = {m: [{"step": k, **{kk: vv for kk, vv in v.items() if kk != "ir"},
                            **({"ir_before": _mean(x["ir_before"] for x in v["ir"]),
                                "ir_after": _mean(x["ir_after"] for x in v["ir"])}
                               if v["ir"] else {}),
                            # the gate's state per layer (the same on every rank)
                            **({"gate_on": v["ir"][0]["gate_on"]} if v["ir"] and "gate_on" in v["ir"][0] else {})}
                           for k, v in sorted(per_step[m].items())] for m in opts.modes}
    if len(opts.modes) == 2:
        a = {r["id"]: r["tokens"] for g in lead for r in g["requests"]["stock"]}
        b = {r["id"]: r["tokens"] for g in lead for r in g["requests"]["probe"]}
        first = first_differences(a, b)
        res["tokens_identical"] = not first and set(a) == set(b)
        res["requests_differing"] = sorted(first)
        res["first_difference"] = first
        s, p = modes["stock"], modes["probe"]
        res["throughput_ratio"] = _ratio(p["throughput_tok_s"], s["throughput_tok_s"])
        res["ttft_ratio"] = _ratio(p["ttft_mean_s"], s["ttft_mean_s"])
        res["tpot_ratio"] = _ratio(p["tpot_mean_s"], s["tpot_mean_s"])
        _baseline_ir(s, p)
    res["tokens"] = {m: {r["id"]: r["tokens"] for g in lead for r in g["requests"][m]} for m in opts.modes}
    return res


def _ir_summary(rows: List[Dict]) -> Dict:
    """Mean IR before/after balancing over step rows (each with per-layer lists), overall and per
    layer. A row of pipeline stage ``stage`` holds its stage's layers: layer ``i`` of the list is
    the model's MoE layer ``stage * len + i``."""
    if not rows:
        return {}
    per_layer: Dict[str, Dict[int, List[float]]] = {"before": {}, "after": {}}
    for r in rows:
        offset = r.get("stage", 0) * len(r["ir_layers_before"])
        for kind in per_layer:
            for i, v in enumerate(r[f"ir_layers_{kind}"]):
                per_layer[kind].setdefault(offset + i, []).append(v)
    n = len(rows)
    return {"ir_before": round(sum(r["ir_before"] for r in rows) / n, 4),
            "ir_after": round(sum(r["ir_after"] for r in rows) / n, 4),
            **{f"ir_{kind}_per_layer": [round(sum(v) / len(v), 4) for _, v in sorted(layers.items())]
               for kind, layers in per_layer.items()}}


def _baseline_ir(base: Dict, probe: Dict) -> None:
    """The baseline run sees the same batches and routing as PROBE's (tokens identical): its IR
    is PROBE's IR before balancing."""
    if "ir_before" in probe:
        base["ir_before"] = base["ir_after"] = probe["ir_before"]
        base["ir_before_per_layer"] = base["ir_after_per_layer"] = probe["ir_before_per_layer"]


def _round(x, n=5):
    return None if x is None else round(x, n)


def _ratio(a, b):
    return None if not a or not b else round(a / b, 4)


def _host() -> Dict:
    import platform

    d = {"machine": platform.machine(), "cpus": os.cpu_count(), "torch": torch.__version__,
         "python": platform.python_version(), "host_malloc": host_malloc_state()}
    if torch.cuda.is_available():
        d["gpu"] = torch.cuda.get_device_name(0)
    try:
        import megatron.core

        d["megatron_core"] = megatron.core.__version__
    except Exception:  # version attribute missing in some builds
        pass
    return d


# ---------------------------------------------------------------------------- scaled regime
SCALED_MODES = ("static", "probe", "oracle")


def summarise_scaled(raw: Dict, wl, ws: int, prefill_chunk: int, max_active: int, label: str) -> Dict:
    """Result dict of a scaled replay (rows from ``scaled_replay.serve_scaled_worker``). Step
    time is the MoE stack's (the part PROBE changes); TTFT and TPOT follow the workload's
    continuous-batching schedule (the one the trace was recorded with) on those step times."""
    from megatron_probe.data.workloads import schedule_steps

    rows = raw["rows"]
    n_steps = 1 + max((r["step"] for r in rows), default=-1)
    schedule = schedule_steps(wl, prefill_chunk, max_active)
    first, last = {}, {}
    prompt = {q.id: q.prompt_tokens for q in wl.requests}
    for sw in schedule[:n_steps]:
        for rid, _, end in sw.chunks:
            if end >= prompt[rid] and rid not in first:
                first[rid] = sw.step
            last[rid] = sw.step
    done = {q.id: q for q in wl.requests if q.id in first and last[q.id] < n_steps and
            (q.output_tokens == 1 or last[q.id] > first[q.id]) and
            sum(e - s for sw in schedule[:n_steps] for r, s, e in sw.chunks if r == q.id)
            == q.prompt_tokens + q.output_tokens - 1}
    modes = {}
    for m in SCALED_MODES:
        mine = sorted((r for r in rows if r["mode"] == m), key=lambda r: r["step"])
        secs = [r["seconds"] for r in mine]
        cum = [0.0]
        for s in secs:
            cum.append(cum[-1] + s)
        ttft = [cum[first[i] + 1] - cum[q.arrival_step] for i, q in done.items() if q.arrival_step < len(cum)]
        tpot = [(cum[last[i] + 1] - cum[first[i] + 1]) / (q.output_tokens - 1) for i, q in done.items()
                if q.output_tokens > 1]
        total = sum(secs)
        tokens = sum(r["tokens"] for r in mine)
        out = {"steps": len(mine), "seconds": round(total, 4), "processed_tokens": tokens,
               "throughput_tok_s": round(tokens / total, 3) if total else None,
               "processed_tok_s": round(tokens / total, 3) if total else None,
               "ttft_mean_s": _round(_mean(ttft)), "ttft_p90_s": _round(_pct(ttft, 0.9)),
               "tpot_mean_s": _round(_mean(tpot)), "requests_finished": len(done)}
        out.update(_ir_summary([r for r in mine if "ir_before" in r]))
        if m == "probe":
            wait = sum(r.get("wait_ms", 0.0) for r in mine) / 1e3
            out.update(copies=sum(r.get("copies", 0) for r in mine), dropped=sum(r.get("dropped", 0) for r in mine),
                       exposed_wait_s=round(wait, 4), exposed_wait_fraction=round(wait / total, 4) if total else None,
                       prediction_topk_acc=round(raw["info"]["forecast_topk_acc"], 4))
            info = raw["info"]
            if info.get("control_us"):
                out.update(control_us=info["control_us"], gate_on_fraction=info.get("gate_on_fraction"),
                           replica_mode=info.get("replica_mode"))
        modes[m] = out
    _baseline_ir(modes["static"], modes["probe"])
    st, pr, orc = (modes[m]["seconds"] for m in SCALED_MODES)
    res = {"regime": "scaled", "regime_detail": label, "workload": wl.scenario, "ep": ws, "modes": modes,
           "stock_is": "static: Megatron placement (each rank its E/ep experts), same PROBE layer with the pipeline off",
           "tokens_identical": None,
           "tokens_note": "the scaled regime generates no tokens (random expert weights); placement-equivalence "
                          "of the outputs is in outputs_max_abs_diff",
           "outputs_max_abs_diff": raw["info"]["max_abs_diff_vs_static"], "outputs_scale": raw["info"]["output_scale"],
           "throughput_ratio": _ratio(modes["probe"]["throughput_tok_s"], modes["static"]["throughput_tok_s"]),
           "ttft_ratio": _ratio(modes["probe"]["ttft_mean_s"], modes["static"]["ttft_mean_s"]),
           "tpot_ratio": _ratio(modes["probe"]["tpot_mean_s"], modes["static"]["tpot_mean_s"]),
           "speedup": _ratio(st, pr), "oracle_speedup": _ratio(st, orc),
           "gain_fraction": round((st - pr) / (st - orc), 4) if st > orc else None,
           "copy_charge_us": round(raw["info"]["copy_charge_us"], 1), "expert_cost_us": raw["info"]["expert_cost_us"],
           "replica_memory_mib": round(raw["info"]["replica_memory_mib"], 1),
           "host": {**_host(), "host_malloc": raw["info"].get("host_malloc", "not recorded")},
           "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    if wl.extra.get("shift_step") is not None:
        res["shift_step"] = wl.extra["shift_step"]
    res["per_step"] = {m: [{k: v for k, v in r.items() if k not in ("mode", "ir_layers_before", "ir_layers_after")}
                           for r in sorted((r for r in rows if r["mode"] == m), key=lambda r: r["step"])]
                       for m in SCALED_MODES}
    return res
