#!/usr/bin/env python3
"""Serve a workload with Megatron-Core MoE layers, stock and PROBE side by side.

Continuous batching (requests join at their arrival step and leave when done; each step is one
forward over every active request's decode token and prefill chunk), greedy decoding, expert
parallelism over gloo (CPU: the script starts its own processes) or NCCL (GPU: run it under
``torchrun``). ``--compare`` serves the workload with the stock layer and with PROBE
alternately, step by step, in the same process group, checks that both emit the same tokens and
prints the ratios. Flags are named like Megatron-LM's; every ``ProbeConfig`` field has a
``--probe-<field>`` flag.

Regimes (label every figure with it):
* ``model`` (default): the shipped trained model end to end (real routing, real prediction,
  exact tokens);
* ``scaled``: the same routing and forecasts replayed from a recorded trace through a stack of
  MoE layers whose experts are enlarged (random weights) so that expert compute dominates as on
  GPUs at scale; for speed on CPU. Needs a trace with hidden states
  (``tools/record_traces.py --hidden-fraction 1.0``).

  python tools/run_probe_inference.py --workload shift --compare                   # CPU, EP 2
  torchrun --nproc-per-node 8 tools/run_probe_inference.py --workload shift --compare \\
      --expert-model-parallel-size 8                                                # 8 GPUs
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import typing
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
warnings.filterwarnings("ignore")

WORKLOAD_DIR = os.path.join(ROOT, "workloads")


def _bool(text: str) -> bool:
    t = text.strip().lower()
    if t in ("1", "true", "yes", "on"):
        return True
    if t in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"{text!r} is not a boolean; valid: true, false")


def _optional(kind):
    def parse(text: str):
        return None if text.strip().lower() in ("none", "") else kind(text)
    parse.__name__ = kind.__name__
    return parse


# ProbeConfig fields the script sets itself: wandb logging is the script's --wandb-project /
# --wandb-mode (one run holding both modes), not the pipeline's own per-layer export
SCRIPT_OWNED = ("wandb_project", "wandb_mode")


def add_probe_flags(p: argparse.ArgumentParser) -> None:
    """``--probe-<field>`` for every ProbeConfig field (defaults: ProbeConfig's own)."""
    from megatron_probe.config import ProbeConfig

    g = p.add_argument_group("PROBE (ProbeConfig fields)")
    hints = typing.get_type_hints(ProbeConfig)
    for f in dataclasses.fields(ProbeConfig):
        if f.name in SCRIPT_OWNED:
            continue
        t = hints[f.name]
        args = typing.get_args(t)
        optional = type(None) in args
        base = next((a for a in args if a is not type(None)), t) if optional else t
        conv = {bool: _bool, int: int, float: float, str: str}.get(base)
        if conv is None:
            continue
        if optional:
            conv = _optional(conv)
        g.add_argument("--probe-" + f.name.replace("_", "-"), dest="probe_" + f.name, type=conv, default=None,
                       metavar=base.__name__.upper(), help=f"default {f.default!r}")


def build_parser() -> argparse.ArgumentParser:
    from megatron_probe.experiments.tiny_moe import DEFAULT_CHECKPOINT

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog="\n".join(__doc__.splitlines()[1:]),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    m = p.add_argument_group("model (checked against the checkpoint when given)")
    m.add_argument("--load", default=DEFAULT_CHECKPOINT, help="checkpoint folder (default: the shipped tiny MoE)")
    m.add_argument("--num-layers", type=int)
    m.add_argument("--hidden-size", type=int)
    m.add_argument("--num-attention-heads", type=int)
    m.add_argument("--num-experts", type=int)
    m.add_argument("--moe-router-topk", type=int)
    m.add_argument("--moe-ffn-hidden-size", type=int)
    m.add_argument("--seq-length", type=int)
    m.add_argument("--vocab-size", type=int)
    m.add_argument("--bf16", action="store_true", help="bf16 weights and activations (default fp32)")
    d = p.add_argument_group("parallelism and serving")
    d.add_argument("--expert-model-parallel-size", type=int, default=2, help="EP size: ranks per expert group")
    d.add_argument("--data-parallel-size", type=int, default=1,
                   help="replicas of the expert group, each serving its own requests (processes = EP x DP; under "
                        "torchrun, WORLD_SIZE must equal it)")
    d.add_argument("--tensor-model-parallel-size", type=int, default=1,
                   help="Megatron's tensor-parallel attention and embeddings (expert TP 1; the TP ranks of a group "
                        "serve the same requests); must divide EP x DP")
    d.add_argument("--pipeline-model-parallel-size", type=int, default=1,
                   help="Megatron's pipeline stages (processes = EP x DP x PP; the stages of a pipeline serve the "
                        "same requests; each stage balances its own MoE layers)")
    d.add_argument("--expert-tensor-parallel-size", type=int, default=1,
                   help="Megatron's expert TP: 1, or the TP size (the TP ranks hold shares of every expert's weights; "
                        "DP must be a multiple of it)")
    d.add_argument("--sequence-parallel", action="store_true",
                   help="Megatron's SP over the TP ranks (needs TP > 1): outside attention each TP rank holds its "
                        "share of the packed tokens, so the MoE layers dispatch each token once, not TP times")
    d.add_argument("--moe-token-dispatcher-type", choices=("alltoall", "probe"), default="probe",
                   help="what to serve without --compare: the stock layer (alltoall) or PROBE")
    d.add_argument("--compare", action="store_true", help="serve with stock and PROBE alternately, print ratios")
    d.add_argument("--micro-batch-size", type=int, default=32,
                   help="KV slots per rank: the most requests a rank serves at once (the rest queue)")
    d.add_argument("--prefill-chunk-size", type=int, default=64, help="prompt tokens per request per step")
    d.add_argument("--workload", default="shift",
                   help="a workload name in workloads/ (steady, shift, repeat, bursty, prefill) or a workload JSON path")
    d.add_argument("--max-steps", type=int, default=None, help="stop after this many engine steps")
    d.add_argument("--max-requests", type=int, default=None, help="serve only requests with id < N")
    d.add_argument("--max-new-tokens", type=int, default=None, help="cap each request's generation length")
    d.add_argument("--regime", choices=("model", "scaled"), default="model")
    d.add_argument("--cost-model", choices=("measured", "profile"), default="measured",
                   help="the planner's costs: measured at start-up on this machine and model (expert compute, one "
                        "expert copy, charged per copy), or --probe-hardware-profile's figures")
    d.add_argument("--threads", type=int, default=1, help="torch threads per process (CPU)")
    d.add_argument("--seed", type=int, default=1234)
    s = p.add_argument_group("scaled regime")
    s.add_argument("--trace", default=None, help="recorded trace (default traces/<workload>.pt)")
    s.add_argument("--scaled-hidden-size", type=int, default=1024)
    s.add_argument("--scaled-ffn-hidden-size", type=int, default=2816)
    s.add_argument("--scaled-layers", type=int, default=4)
    s.add_argument("--scaled-max-tokens", type=int, default=192, help="tokens per rank per step (cap)")
    s.add_argument("--scaled-copy-charge", choices=("measured", "none"), default="measured",
                   help="charge each replica copy its measured time in the plan, or plan as if copies were free")
    o = p.add_argument_group("output")
    o.add_argument("--json", default=None, help="write the result JSON here")
    o.add_argument("--metrics-jsonl", default=None, help="write per-step, per-rank rows here (JSON lines)")
    o.add_argument("--plots-dir", default=None, help="write PNG plots here")
    o.add_argument("--wandb-project", default=None, help="log to wandb (offline unless --wandb-mode online)")
    o.add_argument("--wandb-mode", choices=("offline", "online", "disabled"), default="offline")
    o.add_argument("--wandb-dir", default=None, help="wandb run folder (default: next to --json, else ./wandb)")
    o.add_argument("--quiet", action="store_true", help="no progress bar")
    add_probe_flags(p)
    return p


def resolve_workload(name: str) -> str:
    if os.path.exists(name):
        return name
    path = os.path.join(WORKLOAD_DIR, name + ".json")
    if os.path.exists(path):
        return path
    known = sorted(f[:-5] for f in os.listdir(WORKLOAD_DIR) if f.endswith(".json")) if os.path.isdir(WORKLOAD_DIR) else []
    raise ValueError(f"--workload {name!r} is neither a file nor a workload name; valid names: {known}")


def probe_fields(a) -> dict:
    return {k[len("probe_"):]: v for k, v in vars(a).items() if k.startswith("probe_") and v is not None}


def validate(a, p):
    """Check every flag against the checkpoint and each other; returns ``ServeOptions`` with the
    one ``ProbeConfig`` every later step uses."""
    from megatron_probe.config import ProbeConfig
    from megatron_probe.data.workloads import Workload, check_workload_fits
    from megatron_probe.experiments.tiny_moe import check_pipeline_parallel, check_predictor_state, check_tensor_parallel, \
        read_checkpoint
    from megatron_probe.policy.cost_model import get_profile
    from megatron_probe.runtime.lookahead import default_predictor_path
    from megatron_probe.serving.worker import ServeOptions, check_model_flags

    try:
        check_parallelism(a)
        wl_path = resolve_workload(a.workload)
        wl = Workload.load(wl_path)
        cfg_path = os.path.join(a.load, "config.json")
        if not os.path.exists(cfg_path):
            raise ValueError(f"--load {a.load!r} is not a checkpoint folder (no config.json)")
        # every file of the checkpoint, read and checked here, before any process starts
        cfg, _, state = read_checkpoint(a.load)
        check_workload_fits(wl, wl_path, cfg.vocab_size, need_ids=a.regime == "model")
        expect = {"num_layers": a.num_layers, "hidden_size": a.hidden_size, "num_attention_heads":
                  a.num_attention_heads, "num_experts": a.num_experts, "topk": a.moe_router_topk,
                  "expert_ffn_hidden": a.moe_ffn_hidden_size, "seq_length": a.seq_length, "vocab_size": a.vocab_size}
        check_model_flags(cfg, expect, a.load)
        fields = probe_fields(a)
        fields.setdefault("replica_slots_per_rank", 3)
        if "predictor_state" not in fields and os.path.exists(default_predictor_path(a.load)):
            fields["predictor_state"] = default_predictor_path(a.load)  # the warm start beside the checkpoint
            # (under pipeline parallelism each stage takes its layers' share: build_predictors)
        pc = ProbeConfig(**fields)
        pc.validate_for_model(cfg.num_experts, a.expert_model_parallel_size, cfg.topk)
        check_tensor_parallel(cfg, a.tensor_model_parallel_size)
        check_pipeline_parallel(cfg, a.pipeline_model_parallel_size)
        get_profile(pc.hardware_profile)  # a JSON profile is read and checked now, not in the workers
        if pc.predictor_state:
            check_predictor_state(pc.predictor_state, cfg, state, pc.predictor_hidden,
                                  layer0=pc.predictor_layer0 or a.regime == "scaled")
        elif a.regime == "scaled" and os.path.exists(default_predictor_path(a.load)):
            check_predictor_state(default_predictor_path(a.load), cfg, state, pc.predictor_hidden)
        if a.regime == "scaled":
            if a.expert_model_parallel_size < 2:
                raise ValueError(f"--regime scaled needs --expert-model-parallel-size >= 2 (got "
                                 f"{a.expert_model_parallel_size}): replication needs another rank")
            check_scaled_trace(a.trace or os.path.join(ROOT, "traces", f"{wl.scenario}.pt"), a.trace is not None, wl,
                               cfg, a.expert_model_parallel_size)
        for flag, v, lo in (("--expert-model-parallel-size", a.expert_model_parallel_size, 1),
                            ("--data-parallel-size", a.data_parallel_size, 1),
                            ("--micro-batch-size", a.micro_batch_size, 1), ("--prefill-chunk-size",
                                                                            a.prefill_chunk_size, 1),
                            ("--threads", a.threads, 1)):
            if v < lo:
                raise ValueError(f"{flag} {v} must be >= {lo}")
        for flag, v in (("--max-steps", a.max_steps), ("--max-requests", a.max_requests),
                        ("--max-new-tokens", a.max_new_tokens)):
            if v is not None and v < 1:
                raise ValueError(f"{flag} {v} must be >= 1")
    except (ValueError, TypeError, FileNotFoundError) as e:
        p.error(str(e))
    modes = ("stock", "probe") if a.compare else (("probe",) if a.moe_token_dispatcher_type == "probe"
                                                  else ("stock",))
    opts = ServeOptions(checkpoint=a.load, workload=wl_path, ep=a.expert_model_parallel_size, modes=modes,
                        probe=pc, kv_capacity=a.micro_batch_size, prefill_chunk=a.prefill_chunk_size,
                        max_steps=a.max_steps, max_requests=a.max_requests, max_new_tokens=a.max_new_tokens,
                        bf16=a.bf16, threads=a.threads, seed=a.seed, progress=not a.quiet, cost_model=a.cost_model,
                        metrics_path=a.metrics_jsonl, expect=expect, dp=a.data_parallel_size,
                        tp=a.tensor_model_parallel_size, pp=a.pipeline_model_parallel_size, sp=a.sequence_parallel,
                        etp=a.expert_tensor_parallel_size)
    return opts


def check_parallelism(a) -> None:
    """Refuse, by name, the parallel layouts this script cannot serve."""
    etp, tp = a.expert_tensor_parallel_size, a.tensor_model_parallel_size
    if etp not in (1, tp):
        raise ValueError(f"--expert-tensor-parallel-size {etp}: the PROBE dispatcher takes expert TP over the TP ranks "
                         f"only; valid: 1 or --tensor-model-parallel-size ({tp})")
    if etp > 1 and a.data_parallel_size % etp:
        raise ValueError(f"--expert-tensor-parallel-size {etp} with --data-parallel-size {a.data_parallel_size}: "
                         f"Megatron's expert layout needs the {a.expert_model_parallel_size * a.data_parallel_size} "
                         f"processes of a stage to be a multiple of expert TP x EP "
                         f"({etp * a.expert_model_parallel_size}); valid: DP a multiple of {etp}")
    if a.sequence_parallel and a.tensor_model_parallel_size < 2:
        raise ValueError(f"--sequence-parallel with --tensor-model-parallel-size {a.tensor_model_parallel_size}: "
                         "sequence parallelism shards the sequence over the TP ranks; valid: TP >= 2")
    stage = a.expert_model_parallel_size * a.data_parallel_size
    if a.tensor_model_parallel_size < 1 or stage % a.tensor_model_parallel_size:
        raise ValueError(f"--tensor-model-parallel-size {a.tensor_model_parallel_size}: must be >= 1 and divide the "
                         f"{stage} processes of a stage (EP {a.expert_model_parallel_size} x DP {a.data_parallel_size})")
    if a.pipeline_model_parallel_size < 1:
        raise ValueError(f"--pipeline-model-parallel-size {a.pipeline_model_parallel_size} must be >= 1")
    if a.regime == "scaled" and a.pipeline_model_parallel_size != 1:
        raise ValueError(f"--pipeline-model-parallel-size {a.pipeline_model_parallel_size} with --regime scaled: the "
                         "scaled regime replays MoE layers only; valid: 1")
    if a.regime == "scaled" and a.tensor_model_parallel_size != 1:
        raise ValueError(f"--tensor-model-parallel-size {a.tensor_model_parallel_size} with --regime scaled: the scaled "
                         "regime replays MoE layers only; valid: 1")
    if a.regime == "scaled" and a.data_parallel_size != 1:
        raise ValueError(f"--data-parallel-size {a.data_parallel_size} with --regime scaled: the scaled regime replays "
                         "one expert group's trace; valid: 1")


def check_scaled_trace(trace: str, given: bool, wl, cfg, ep: int) -> None:
    """The scaled regime's trace, read and checked before any process starts: a trace of this
    checkpoint's model, recorded on this workload, with hidden states. A missing default trace
    is recorded later (``run_scaled``); a missing ``--trace`` is an error."""
    from megatron_probe.data.traces import load_trace
    from megatron_probe.experiments.tiny_moe import check_trace_for_checkpoint

    if not given and not os.path.exists(trace):
        return
    tr = load_trace(trace)
    check_trace_for_checkpoint(tr, trace, cfg, hidden_layer=0, min_tokens=ep)
    if tr.extra.get("scenario") not in (None, wl.scenario):
        raise ValueError(f"trace {trace} was recorded on the {tr.extra['scenario']!r} workload, not {wl.scenario!r}")


def _fmt(x):
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.4g}"
    return f"{x}"


def print_table(res: dict) -> None:
    modes = res["modes"]
    names = list(modes)
    base = names[0]
    ratio = "probe" in names and len(names) > 1
    rows = [("throughput (generated tok/s)", "throughput_tok_s"), ("processed tok/s", "processed_tok_s"),
            ("TTFT mean (s)", "ttft_mean_s"), ("TTFT p90 (s)", "ttft_p90_s"), ("TPOT mean (s)", "tpot_mean_s"),
            ("engine time (s)", "seconds"), ("steps", "steps"), ("requests finished", "requests_finished"),
            ("IR before balancing", "ir_before"), ("IR served", "ir_after"), ("replica copies", "copies"),
            ("copies dropped", "dropped"), ("exposed wait (share of time)", "exposed_wait_fraction"),
            ("prediction top-k accuracy", "prediction_topk_acc")]
    if res["regime"] == "scaled":
        rows[0] = ("throughput (processed tok/s)", "throughput_tok_s")
        rows.pop(1)
    dp = "".join(f"{sep}{k.upper()} {res[k]}" for sep, k in ((" x ", "dp"), (", ", "tp"), (", ", "pp"))
                 if res.get(k, 1) > 1) + (" with SP" if res.get("sp") else "") + \
        (f", expert TP {res['etp']}" if res.get("etp", 1) > 1 else "")
    print(f"\nregime: {res['regime']}  workload: {res['workload']}  EP {res['ep']}{dp}  ({res['host'].get('machine')}, "
          f"{res['host'].get('cpus')} cpus, torch {res['host'].get('torch')})")
    if res.get("regime_detail"):
        print(f"scaled regime: {res['regime_detail']}")
    if base in ("stock", "static"):
        print(f"{base} = {res['stock_is']}")
    w = 30
    print(f"{'':<{w}}" + "".join(f"{n:>14}" for n in names) + (f"{'PROBE/' + base:>18}" if ratio else ""))
    for label, key in rows:
        vals = [modes[n].get(key) for n in names]
        if all(v is None for v in vals):
            continue
        line = f"{label:<{w}}" + "".join(f"{_fmt(v):>14}" for v in vals)
        a, b = modes[base].get(key), modes.get("probe", {}).get(key)
        if ratio and isinstance(a, (int, float)) and isinstance(b, (int, float)) and a and key in (
                "throughput_tok_s", "processed_tok_s", "ttft_mean_s", "tpot_mean_s", "seconds"):
            line += f"{b / a:>18.3f}"
        print(line)
    for n in names:
        ctl = modes[n].get("control_us")
        if ctl:
            stages = "  ".join(f"{k} {v:g}" for k, v in ctl.items() if k != "control")
            end = modes[n].get("step_end_us")
            print(f"{'control path, us per layer':<{w}}{ctl.get('control', 0):>14g}   ({n}: {stages}; "
                  f"gate on {modes[n].get('gate_on_fraction')} of layer steps"
                  + (f"; step end {end:g} us per step)" if end is not None else ")"))
    if res.get("speedup") is not None:
        print(f"{'static/PROBE time':<{w}}{res['speedup']:>14}   static/oracle {res.get('oracle_speedup')}   "
              f"PROBE's share of the oracle's gain: {res.get('gain_fraction')}")
    if res.get("tokens_identical") is not None:
        print(f"{'tokens identical':<{w}}{str(res['tokens_identical']):>14}"
              + (f"   differing requests: {res['requests_differing'][:10]}" if res.get("requests_differing") else ""))
    elif "outputs_max_abs_diff" in res:
        print(f"{'outputs vs static, max |diff|':<{w}}{_fmt(max(res['outputs_max_abs_diff'].values())):>14}"
              f"   (output scale {_fmt(res['outputs_scale'])})")


def _show(path: str) -> str:
    rel = os.path.relpath(os.path.abspath(path), ROOT)
    return path if rel.startswith("..") else rel


def run_scaled(a, opts) -> dict:
    """The scaled regime on EP gloo processes: every trace step in order, static / PROBE / oracle."""
    from megatron_probe.data.traces import load_trace
    from megatron_probe.data.workloads import Workload
    from megatron_probe.mcore.launch import run_distributed
    from megatron_probe.runtime.lookahead import default_predictor_path
    from megatron_probe.experiments.scaled_replay import serve_scaled_worker
    from megatron_probe.serving.worker import summarise_scaled

    wl = Workload.load(opts.workload)
    if opts.ep < 2:
        raise SystemExit(f"--regime scaled needs --expert-model-parallel-size >= 2 (got {opts.ep}): replication "
                         "needs another rank")
    trace = a.trace or os.path.join(ROOT, "traces", f"{wl.scenario}.pt")
    if a.trace is None and not os.path.exists(trace):
        import subprocess

        print(f"recording {trace} (the model on {opts.workload}, every token's hidden states) ...", flush=True)
        subprocess.run([sys.executable, os.path.join(ROOT, "tools", "record_traces.py"), "--workload", opts.workload,
                        "--out", trace, "--checkpoint", opts.checkpoint, "--hidden-fraction", "1.0",
                        "--prefill-chunk", str(opts.prefill_chunk), "--max-active", str(opts.kv_capacity)]
                       + (["--max-steps", str(opts.max_steps)] if opts.max_steps else []), check=True)
    tr = load_trace(trace)
    if tr.extra.get("scenario") not in (None, wl.scenario):
        raise SystemExit(f"trace {trace} was recorded on the {tr.extra['scenario']!r} workload, not {wl.scenario!r}")
    pc = opts.probe
    pred = pc.predictor_state or default_predictor_path(opts.checkpoint)
    sopts = dict(trace=trace, checkpoint=opts.checkpoint, predictor=pred if os.path.exists(pred) else None,
                 predictor_hidden=pc.predictor_hidden, layers=a.scaled_layers, hidden=a.scaled_hidden_size,
                 ffn=a.scaled_ffn_hidden_size, replica_slots=pc.replica_slots_per_rank,
                 replica_mode=pc.replica_mode, cost_gate=pc.cost_gate, layer0_counts=pc.layer0_counts, deadline_ms=pc.prefetch_deadline_ms,
                 chunk_mib=pc.transfer_chunk_mib, copy_transport=pc.copy_transport, threads=opts.threads,
                 copy_charge="none" if a.scaled_copy_charge == "none" else "measured", seed=opts.seed,
                 max_steps=opts.max_steps, max_tokens=a.scaled_max_tokens, progress=opts.progress,
                 collective_timeout_s=pc.collective_timeout_s, host_malloc_reuse=pc.host_malloc_reuse)
    out = os.path.join(tempfile.mkdtemp(prefix="probe_scaled_"), "rows.json")
    run_distributed(serve_scaled_worker, opts.ep, sopts, out, backend="gloo", timeout_s=pc.peer_wait_s)
    with open(out) as f:
        raw = json.load(f)
    label = (f"experts {a.scaled_hidden_size}x{a.scaled_ffn_hidden_size} (random weights), {a.scaled_layers} MoE "
             f"layers, routing and forecasts replayed from {_show(trace)}, at most "
             f"{a.scaled_max_tokens} tokens per rank per step; step time = the MoE stack's")
    res = summarise_scaled(raw, wl, opts.ep, int(tr.extra.get("prefill_chunk", opts.prefill_chunk)),
                           int(tr.extra.get("max_active", opts.kv_capacity)), label)
    res["workload_path"] = opts.workload
    return res


def main(argv=None) -> int:
    p = build_parser()
    a = p.parse_args(argv)
    opts = validate(a, p)
    from megatron_probe.fileio import write_whole
    from megatron_probe.mcore.launch import RanksFailed, under_torchrun

    # a failed run must not leave an earlier run's results looking like its own
    for path in (a.json, a.metrics_jsonl):
        if path and os.path.exists(path) and (not under_torchrun() or int(os.environ["RANK"]) == 0):
            os.remove(path)
    try:
        res = run_scaled(a, opts) if a.regime == "scaled" else run_model(a, opts)
    except RanksFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if res is None:  # a torchrun rank other than 0
        return 0
    res["command"] = " ".join(["python", os.path.relpath(os.path.abspath(sys.argv[0]), ROOT)] + (argv or sys.argv[1:]))
    if a.plots_dir:
        from megatron_probe.serving.plots import write_plots

        res["plots"] = write_plots(res, a.plots_dir)
    if a.wandb_project and a.wandb_mode != "disabled":
        from megatron_probe.serving.plots import log_to_wandb

        run_dir = a.wandb_dir or (os.path.dirname(os.path.abspath(a.json)) if a.json else os.getcwd())
        res["wandb_dir"] = log_to_wandb(res, a.wandb_project, run_dir, a.wandb_mode)
    if a.json:
        write_whole(a.json, json.dumps(res, indent=1))
    print_table(res)
    for path in res.get("plots", []):
        print(f"plot: {path}")
    if a.json:
        print(f"json: {a.json}")
    if res.get("tokens_identical") is False:
        first = res.get("first_difference", {})
        where = ", ".join(f"request {i} at token {k}" for i, k in sorted(first.items())[:8])
        print(f"ERROR: PROBE's tokens differ from the stock layer's in {len(first)} request(s): {where}",
              file=sys.stderr)
        return 1
    return 0


def run_model(a, opts):
    """The model regime on EP processes; the result dict (None on a torchrun rank other than 0)."""
    from megatron_probe.mcore.launch import run_distributed, under_torchrun
    from megatron_probe.serving.worker import serve_worker

    if a.json:
        os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
    out = os.path.join(tempfile.mkdtemp(prefix="probe_serve_"), "result.json")
    run_distributed(serve_worker, opts.ep * opts.dp * opts.pp, opts, out, timeout_s=opts.probe.peer_wait_s)
    if under_torchrun() and int(os.environ["RANK"]) != 0:
        return None
    with open(out) as f:
        return json.load(f)


if __name__ == "__main__":
    sys.exit(main())
