"""The continuous-batching engine and the inference script (tools/run_probe_inference.py)."""

import json
import os
import platform
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CKPT = os.path.join(ROOT, "checkpoints", "tiny-moe-v1")
SHIFT = os.path.join(ROOT, "workloads", "shift.json")
needs_ckpt = pytest.mark.skipif(not os.path.exists(os.path.join(CKPT, "model.pt")), reason="no shipped checkpoint")


def _script(*args, timeout=900):
    return subprocess.run([sys.executable, os.path.join(ROOT, "tools", "run_probe_inference.py"), *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def _reference(ids_and_budgets):
    """Plain per-request greedy generation (full recompute) with the stock Megatron MoE spec."""
    from megatron_probe.mcore.launch import init_single_process
    from megatron_probe.experiments.tiny_moe import greedy_generate, load_model

    init_single_process()
    model, tok, cfg = load_model(CKPT, spec="stock")
    eos = tok.token_to_id("<|endoftext|>")
    return {rid: greedy_generate(model, ids, n, cfg.seq_length, eos) for rid, (ids, n) in ids_and_budgets.items()}


@needs_ckpt
def test_engine_equals_plain_greedy_with_chunked_prefill_and_a_full_kv_cache():
    from megatron_probe.data.workloads import Workload
    from megatron_probe.serving.engine import ContinuousBatchingEngine, requests_from_workload
    from megatron_probe.mcore.launch import init_single_process
    from megatron_probe.experiments.tiny_moe import load_model

    torch.set_num_threads(2)
    init_single_process()
    model, tok, cfg = load_model(CKPT, spec="stock")
    reqs = requests_from_workload(Workload.load(SHIFT), max_requests=9, max_new_tokens=7)
    # 3 KV slots for 9 requests arriving at steps 0..: later ones queue; 16-token prefill chunks
    # split every prompt (24-128 tokens) over several steps
    engine = ContinuousBatchingEngine(model, reqs, cfg.seq_length, kv_capacity=3, prefill_chunk=16,
                                      eos_id=tok.token_to_id("<|endoftext|>"))
    records = engine.run()
    assert all(r.finished for r in reqs), "a queued request was dropped"
    assert max(r.active for r in records) == 3 and max(r.queued for r in records) > 0
    assert any(r.prefill_tokens and r.decode_tokens for r in records), "no step mixed prefill and decode"
    ref = _reference({r.id: (r.prompt_ids, r.max_new_tokens) for r in reqs})
    assert engine.outputs() == ref
    for r in reqs:
        assert r.ttft_s is not None and r.ttft_s > 0 and r.t_finish >= r.t_first
    # the model is unchanged outside the engine's steps (attention swapped back)
    from megatron_probe.serving.engine import PackedSelfAttention

    assert not any(isinstance(layer.self_attention, PackedSelfAttention) for layer in model.decoder.layers)


@needs_ckpt
def test_engine_rejects_a_request_longer_than_the_model():
    from megatron_probe.serving.engine import ContinuousBatchingEngine, ServeRequest
    from megatron_probe.mcore.launch import init_single_process
    from megatron_probe.experiments.tiny_moe import load_model

    init_single_process()
    model, _, cfg = load_model(CKPT, spec="stock")
    with pytest.raises(ValueError, match=r"request 5 needs 300 positions .* maximum sequence length is 256"):
        ContinuousBatchingEngine(model, [ServeRequest(5, [1] * 250, 51)], cfg.seq_length)
    with pytest.raises(ValueError, match="kv_capacity=0"):
        ContinuousBatchingEngine(model, [], cfg.seq_length, kv_capacity=0)


@pytest.mark.slow
@needs_ckpt
def test_inference_script_compare_at_ep2(tmp_path):
    out = tmp_path / "res.json"
    # the hardware profile's cost model and no gate: replicas are copied (the CPU's measured copy
    # charge would rule every copy out)
    r = _script("--compare", "--expert-model-parallel-size", "2", "--workload", "shift", "--max-requests", "6",
                "--cost-model", "profile", "--probe-cost-gate", "false",
                "--max-new-tokens", "6", "--micro-batch-size", "2", "--json", str(out), "--plots-dir",
                str(tmp_path / "plots"), "--metrics-jsonl", str(tmp_path / "steps.jsonl"), "--quiet",
                "--wandb-project", "probe-test", "--wandb-dir", str(tmp_path / "wb"))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["regime"] == "model" and res["ep"] == 2 and res["workload"] == "shift"
    assert res["tokens_identical"] is True
    for key in ("throughput_ratio", "ttft_ratio", "tpot_ratio"):
        assert isinstance(res[key], float) and res[key] > 0, key
    stock, probe = res["modes"]["stock"], res["modes"]["probe"]
    assert stock["requests_finished"] == probe["requests_finished"] == 6
    assert stock["generated_tokens"] == probe["generated_tokens"] == sum(len(t) for t in res["tokens"]["probe"].values())
    for key in ("ir_before", "ir_after", "copies", "dropped", "exposed_wait_fraction", "prediction_topk_acc",
                "ttft_mean_s", "tpot_mean_s"):
        assert probe.get(key) is not None, key
    assert probe["ir_after"] <= probe["ir_before"] + 1e-9
    # the same tokens as plain per-request greedy generation with the stock layer, on one process
    from megatron_probe.data.workloads import Workload

    wl = Workload.load(SHIFT)
    want = {q.id: (q.prompt_ids, min(6, q.output_tokens)) for q in wl.requests if q.id < 6}
    ref = _reference(want)
    assert {int(k): v for k, v in res["tokens"]["stock"].items()} == ref
    assert len(res["plots"]) == 4 and all(os.path.getsize(p) > 1000 for p in res["plots"])
    assert any(p.endswith("_gate_per_layer.png") for p in res["plots"]), res["plots"]
    gates = [r["gate_on"] for r in res["per_step"]["probe"] if "gate_on" in r]
    assert gates and all(len(g) == 6 and set(g) <= {0, 1} for g in gates), gates  # per MoE layer
    rows = [json.loads(x) for x in (tmp_path / "steps.jsonl").read_text().splitlines()]
    assert {x["rank"] for x in rows} == {0, 1} and {x["mode"] for x in rows} == {"stock", "probe"}
    assert max(x["active"] for x in rows) <= 2  # 2 KV slots per rank: the rest queued
    for r_ in (0, 1):  # the pipeline's own per-layer rows, one file per rank
        layer_rows = [json.loads(x) for x in (tmp_path / f"steps.layers.rank{r_}.jsonl").read_text().splitlines()]
        assert len(layer_rows) == probe["steps"] * 6 and all("ir_before" in x for x in layer_rows)
        # each rank records its EP group's copies; the summary counts them once, not once per rank
        assert sum(x["copies"] for x in layer_rows) == probe["copies"] > 0
        assert sum(x["bytes"] for x in layer_rows) == probe["bytes"] > 0
    assert "tokens identical" in r.stdout and "PROBE/stock" in r.stdout
    # the offline wandb run holds every step of both modes and the summary
    from megatron_probe.serving.wandb_logger import read_offline_run

    run = read_offline_run(res["wandb_dir"])
    assert run["complete"] and run["config"]["workload"] == "shift"
    steps = [h for h in run["history"] if "probe/tokens" in h]
    assert len(steps) == probe["steps"] and all("stock/seconds" in h for h in steps)
    assert run["summary"]["throughput_ratio"] == res["throughput_ratio"]
    assert run["summary"]["probe/copies"] == probe["copies"]


def _serve_layouts(tmp_path, common, runs):
    """Serve 16 requests with ``common`` plus each run's flags; check every run (PROBE's tokens
    equal the stock layer's, every request served, every MoE layer reported, the layout
    recorded); returns ``({run: PROBE's tokens}, the last run's stdout)``."""
    tokens = {}
    for name, extra in runs.items():
        out = tmp_path / f"{name}.json"
        r = _script(*common, *extra, "--json", str(out))
        assert r.returncode == 0, (name, r.stdout[-2000:], r.stderr[-3000:])
        res = json.loads(out.read_text())
        assert res["tokens_identical"] is True, (name, res.get("requests_differing"))
        assert sorted(int(i) for i in res["tokens"]["probe"]) == list(range(16)), name  # every rank's share
        assert len(res["modes"]["probe"]["ir_before_per_layer"]) == 6, name  # every MoE layer, whatever its stage
        assert res["sp"] is ("--sequence-parallel" in extra), name
        tokens[name] = res["tokens"]["probe"]
    return tokens, r.stdout


@pytest.mark.slow
@needs_ckpt
def test_inference_script_serves_data_tensor_and_pipeline_parallel_layouts(tmp_path):
    """Megatron's parallel layouts beside EP 2, each against the layout with the same requests per
    rank without it: DP 2 (4 processes, expert groups [0, 1] and [2, 3], each rank its own
    requests) then TP 2 on top (the checkpoint's attention and embedding weights split over the
    TP ranks, which serve the same requests), then expert TP 2, without and with sequence
    parallel (every expert's weights split over the TP ranks; EP groups [0, 2] and [1, 3]); and
    PP 2 (stages of 3 layers, hidden states sent stage to stage, each stage balancing its own MoE
    layers) against EP 2 alone. In every run the PROBE model's tokens equal the stock layer's, and
    each layout gives the tokens its counterpart gave."""
    common = ["--compare", "--workload", "shift", "--max-steps", "10", "--max-requests", "16", "--quiet",
              "--expert-model-parallel-size", "2"]
    dp2_tp2 = ["--data-parallel-size", "2", "--tensor-model-parallel-size", "2"]
    etp2 = ["--expert-tensor-parallel-size", "2"]
    runs = {"ep2": [], "ep2_pp2": ["--pipeline-model-parallel-size", "2"], "ep2_dp2": ["--data-parallel-size", "2"],
            "ep2_dp2_tp2": dp2_tp2, "ep2_dp2_tp2_etp2": dp2_tp2 + etp2,
            "ep2_dp2_tp2_etp2_sp": dp2_tp2 + etp2 + ["--sequence-parallel"]}
    tokens, stdout = _serve_layouts(tmp_path, common, runs)
    assert "EP 2 x DP 2, TP 2 with SP, expert TP 2" in stdout, stdout[-1500:]
    assert tokens["ep2_pp2"] == tokens["ep2"]
    assert tokens["ep2_dp2_tp2"] == tokens["ep2_dp2"]
    assert tokens["ep2_dp2_tp2_etp2"] == tokens["ep2_dp2"] and tokens["ep2_dp2_tp2_etp2_sp"] == tokens["ep2_dp2"]


@pytest.mark.slow
@needs_ckpt
def test_inference_script_serves_sequence_parallel(tmp_path):
    """Megatron's sequence parallel over TP 2 beside EP 2 (the TP peers serve the same requests,
    each MoE layer dispatches each rank's half of the packed tokens), alone and with PP 2 (shards
    of the hidden states sent stage to stage): the PROBE model's tokens equal the stock layer's,
    and both give the tokens TP 2 without sequence parallel gives."""
    common = ["--compare", "--workload", "shift", "--max-steps", "10", "--max-requests", "16", "--quiet",
              "--expert-model-parallel-size", "2", "--tensor-model-parallel-size", "2"]
    runs = {"tp2": [], "tp2_sp": ["--sequence-parallel"],
            "tp2_sp_pp2": ["--sequence-parallel", "--pipeline-model-parallel-size", "2"]}
    tokens, stdout = _serve_layouts(tmp_path, common, runs)
    assert "EP 2, TP 2, PP 2 with SP" in stdout, stdout[-1500:]
    assert tokens["tp2_sp"] == tokens["tp2"] and tokens["tp2_sp_pp2"] == tokens["tp2"]


@pytest.mark.slow
@needs_ckpt
def test_inference_script_scaled_regime(tmp_path):
    trace = tmp_path / "shift.pt"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "record_traces.py"), "--workload", SHIFT,
                        "--out", str(trace), "--max-steps", "24", "--hidden-fraction", "1.0", "--ep", "2"],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    out = tmp_path / "scaled.json"
    r = _script("--regime", "scaled", "--trace", str(trace), "--workload", "shift", "--max-steps", "12",
                "--scaled-hidden-size", "64", "--scaled-ffn-hidden-size", "128", "--scaled-layers", "3",
                "--scaled-max-tokens", "48", "--json", str(out), "--quiet")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["regime"] == "scaled" and "64x128" in res["regime_detail"]
    assert set(res["modes"]) == {"static", "probe", "oracle"}
    for m in res["modes"].values():
        assert m["steps"] == 12 and m["throughput_tok_s"] > 0
    for key in ("throughput_ratio", "speedup", "oracle_speedup"):
        assert isinstance(res[key], float) and res[key] > 0, key
    assert res["tokens_identical"] is None  # random experts: no tokens; equivalence is on the outputs
    assert max(res["outputs_max_abs_diff"].values()) <= 1e-5 * max(1.0, res["outputs_scale"])
    assert res["modes"]["probe"]["copies"] >= res["modes"]["probe"]["dropped"] >= 0
    # the workers' malloc setting is what the result records (not the launcher's), and the flag reaches them
    if platform.libc_ver()[0] == "glibc":
        assert res["host"]["host_malloc"].startswith("set: glibc"), res["host"]
    r = _script("--regime", "scaled", "--trace", str(trace), "--workload", "shift", "--max-steps", "2",
                "--scaled-hidden-size", "64", "--scaled-ffn-hidden-size", "128", "--scaled-layers", "3",
                "--scaled-max-tokens", "48", "--probe-host-malloc-reuse", "false", "--json", str(out), "--quiet")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert json.loads(out.read_text())["host"]["host_malloc"] == "not applied"
    # a trace of another workload is refused
    r = _script("--regime", "scaled", "--trace", str(trace), "--workload", "steady", "--max-steps", "2", "--quiet")
    assert r.returncode != 0 and "recorded on the 'shift' workload, not 'steady'" in r.stderr


def _bad_workload(tmp_path):
    data = json.load(open(SHIFT))
    data["requests"] = data["requests"][:3]
    del data["requests"][1]["arrival_step"]
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    return str(path)


@needs_ckpt
@pytest.mark.parametrize("args, msg", [
    (["--moe-token-dispatcher-type", "flex"], "invalid choice: 'flex'"),
    (["--regime", "fast"], "invalid choice: 'fast'"),
    (["--num-experts", "16"], "--num-experts 16 (checkpoint: 32)"),
    (["--expert-model-parallel-size", "3"], "not divisible by expert-parallel size 3"),
    (["--workload", "nosuch"], "valid names: ['bursty', 'onset', 'prefill', 'repeat', 'shift', 'steady']"),
    (["--probe-replica-slots-per-rank", "40"], "replica_slots_per_rank=40 exceeds"),
    (["--probe-pipeline-plan", "maybe"], "'maybe' is not a boolean"),
    (["--micro-batch-size", "0"], "--micro-batch-size 0 must be >= 1"),
    (["--load", "/nonexistent"], "is not a checkpoint folder"),
    ("BAD_WORKLOAD", "request #1 lacks the fields ['arrival_step']"),
    (["--tensor-model-parallel-size", "3"], "--tensor-model-parallel-size 3: must be >= 1 and divide the 2 processes"),
    (["--regime", "scaled", "--tensor-model-parallel-size", "2"], "the scaled regime replays MoE layers only"),
    (["--pipeline-model-parallel-size", "4"], "pipeline parallel size 4 does not divide the model's num_layers 6"),
    (["--pipeline-model-parallel-size", "2", "--probe-predictor-state", "x.pt"],
     "x.pt: no such file; expected a megatron_probe predictor state file"),  # read and checked under PP too
    (["--expert-tensor-parallel-size", "2"], "--expert-tensor-parallel-size 2: the PROBE dispatcher takes expert TP"),
    (["--expert-tensor-parallel-size", "2", "--tensor-model-parallel-size", "2"],
     "--expert-tensor-parallel-size 2 with --data-parallel-size 1: Megatron's expert layout"),
    (["--sequence-parallel"], "--sequence-parallel with --tensor-model-parallel-size 1: sequence parallelism shards"),
    (["--data-parallel-size", "0"], "--data-parallel-size 0 must be >= 1"),
    (["--regime", "scaled", "--data-parallel-size", "2"], "the scaled regime replays one expert group's trace"),
])
def test_inference_script_rejects_bad_input(tmp_path, args, msg):
    if args == "BAD_WORKLOAD":
        args = ["--workload", _bad_workload(tmp_path)]
    r = _script(*args, timeout=120)
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    assert msg in r.stderr, r.stderr[-2000:]


def test_compare_names_where_each_differing_request_first_differs():
    from megatron_probe.serving.worker import first_differences

    stock = {0: [5, 6, 7], 1: [1, 2, 3, 4], 2: [9, 9], 3: [4]}
    probe = {0: [5, 6, 7], 1: [1, 2, 8, 4], 2: [9, 9, 1], 4: [3]}
    assert first_differences(stock, probe) == {1: 2, 2: 2, 3: 0}
    assert first_differences(stock, stock) == {}
