"""The command-line tools, run as a user runs them."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tool(*args, timeout=600):
    return subprocess.run([sys.executable, os.path.join(ROOT, "tools", "check_equivalence.py"), *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_check_equivalence_cli_writes_json(tmp_path):
    out = tmp_path / "eq.json"
    r = _tool("--ep", "2", "--experts", "8", "--topk", "2", "--replica-slots", "2", "--trials", "8",
              "--json", str(out))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads(out.read_text())
    for key, typ in (("max_abs_diff", float), ("trials", int), ("ep", int), ("passed", bool)):
        assert isinstance(res[key], typ), key
    assert res["trials"] == 8 and res["ep"] == 2 and res["passed"] is True
    assert res["max_abs_diff"] < 1e-4
    assert "PASSED" in r.stdout and "one_expert" in r.stdout


@pytest.mark.slow
def test_check_equivalence_cli_reruns_one_trial_alone(tmp_path):
    """``--first-trial K --trials 1`` draws exactly trial K of a longer run (what a failing
    trial's reproduce line runs)."""
    runs = {}
    for name, extra in (("all", ["--trials", "6"]), ("one", ["--first-trial", "4", "--trials", "1"])):
        out = tmp_path / f"{name}.json"
        r = _tool("--ep", "2", "--experts", "8", "--topk", "2", "--replica-slots", "2", "--seed", "5", *extra,
                  "--json", str(out))
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        runs[name] = json.loads(out.read_text())["cases"]
    assert [c["trial"] for c in runs["all"]] == list(range(6)) and runs["one"][0]["trial"] == 4
    assert runs["one"][0] == runs["all"][4]


@pytest.mark.parametrize("args, msg", [
    (["--ep", "3", "--experts", "8"], "not divisible by expert-parallel size 3"),
    (["--ep", "2", "--trials", "0"], "at least one trial"),
    (["--ep", "2", "--experts", "8", "--replica-slots", "5"], "exceeds the 4 experts"),
    (["--ep", "2", "--experts", "8", "--topk", "9"], "moe_router_topk=9"),
    (["--ep", "2", "--replica-slots", "-1"], "is negative"),
])
def test_check_equivalence_cli_rejects_bad_shapes(args, msg):
    r = _tool(*args, timeout=120)
    assert r.returncode == 2
    assert msg in r.stderr


@pytest.mark.slow
def test_eval_planner_cli(tmp_path):
    shared = os.path.join(ROOT, "..", "shared", "traces", "mbolt", "coactivation_qwen3-30b-a3b.json")
    if not os.path.exists(shared):
        pytest.skip("../shared/traces not present")
    out = tmp_path / "ev.json"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "eval_planner.py"), "--trace", shared, "--steps", "12",
                        "--layers", "2", "--eplb-window", "4", "--eplb-period", "6", "--shift", "--json", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    res = json.loads(out.read_text())
    assert res["ep"] == 8 and res["replica_slots"] == 3 and res["shift_step"] == 7  # half way between 4 and 10
    assert set(res["phases"]) == {"warmup", "stationary", "after_shift"}
    assert res["policies"] == res["phases"]["stationary"]["policies"]  # old readers get the stationary phase
    for phase in ("stationary", "after_shift"):
        pol = res["phases"][phase]["policies"]
        for name in ("static", "eplb", "eplb_local", "eplb_home", "probe", "probe+reassign", "exact_split", "oracle"):
            m = pol[name]
            assert m["ir_mean"] >= 1.0 and m["ir_time_mean"] >= 1.0 and "ir_p95" in m
            assert "copies_per_step" in m and "replica_memory_experts" in m
        assert pol["exact_split"]["ir_mean"] <= pol["probe+reassign"]["ir_mean"] + 1e-9
        assert pol["eplb"]["replica_memory_experts"] == 3 * 2 and pol["probe"]["replica_memory_experts"] == 6
    trace = res["policies_by_trace"]["coactivation_qwen3-30b-a3b.json"]
    assert trace["extra"]["probe_plan_us_median"] > 0
    assert "GENERATED" in trace["data"]
    assert "skipped" in trace["extra"]["optimal"]


@pytest.mark.slow
def test_calibrate_hardware_writes_a_loadable_profile(tmp_path):
    out = tmp_path / "cpu.json"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "calibrate_hardware.py"), "--quick", "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    from megatron_probe.policy.cost_model import get_profile

    prof = get_profile(str(out))
    assert prof.name == "measured-cpu" and prof.peak_tflops > 0 and prof.hbm_gbps > 0 and prof.nvlink_gbps > 0
    assert 0 < prof.gemm_eta_max <= 1 and prof.gemm_n_half >= 0 and "calibrate_hardware.py" in prof.source
    detail = json.loads((tmp_path / "cpu_detail.json").read_text())
    assert len(detail["tokens_per_expert"]) == len(detail["seconds_per_expert"]) >= 5


def _run_tool(name, *args, timeout=900):
    return subprocess.run([sys.executable, os.path.join(ROOT, "tools", name), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists(os.path.join(ROOT, "checkpoints", "tiny-moe-v1", "model.pt")),
                    reason="no shipped checkpoint")
def test_distill_then_eval_predictor_cli(tmp_path):
    pred = tmp_path / "pred.pt"
    r = _run_tool("distill_predictor.py", "--train-requests", "10", "--epochs", "2", "--residual-hidden", "16",
                  "--out", str(pred), "--json", str(tmp_path / "fit.json"))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    fit = json.loads((tmp_path / "fit.json").read_text())
    assert fit["source"].startswith("training-split") and fit["tokens"] > 100
    assert all(fit["after"][L]["loss"] < fit["before"][L]["loss"] for L in fit["after"])
    out = tmp_path / "ev.json"
    r = _run_tool("eval_predictor.py", "--predictor", str(pred), "--predictor-hidden", "16", "--max-steps", "8",
                  "--ep", "4", "--json", str(out))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert set(res["methods"]) >= {"distilled", "frozen", "prev_step", "prev_token", "prev_layer"}
    for name, m in res["methods"].items():
        assert {"layers", "mean_topk_acc", "mean_recall_2k", "mean_rank_load_err"} <= set(m)
        for row in m["layers"]:
            assert {"layer", "topk_acc", "half_hit", "recall_2k", "rank_load_err"} <= set(row)
            for k in ("topk_acc", "half_hit", "recall_2k"):
                assert row[k] is None or 0 <= row[k] <= 1, (name, row)
    assert res["methods"]["prev_step"]["mean_topk_acc"] is None  # counts only
    assert [row["layer"] for row in res["methods"]["prev_layer"]["layers"]] == [1, 2, 3, 4, 5]
    assert res["ep"] == 4 and res["cost"]["predictor_params"] > res["cost"]["router_params"]
    assert "before_switch" in res["segments"]
    assert "distilled" in r.stdout and "prev_token" in r.stdout


def test_predictor_tools_reject_bad_input(tmp_path):
    r = _run_tool("eval_predictor.py", "--predictor", str(tmp_path / "missing.pt"), timeout=300)
    assert r.returncode == 2 and "no predictor state at" in r.stderr
    r = _run_tool("eval_predictor.py", "--ep", "3", timeout=300)
    assert r.returncode == 2 and "--ep 3 does not divide the model's 32 experts" in r.stderr
    r = _run_tool("distill_predictor.py", "--epochs", "0", timeout=300)
    assert r.returncode == 2 and "--epochs 0 must be >= 1" in r.stderr


@pytest.mark.skipif(not os.path.exists(os.path.join(ROOT, "checkpoints", "tiny-moe-v1", "model.pt")),
                    reason="no shipped checkpoint")
def test_distill_predictor_rejects_a_trace_without_hidden_states(tmp_path):
    import torch

    from megatron_probe.data.traces import RoutingTrace, TraceStep, save_trace

    step = TraceStep(topk_ids=torch.randint(0, 32, (6, 5, 4)))
    save_trace(RoutingTrace("tiny-moe-v1", 6, 32, 4, "test", steps=[step]), str(tmp_path / "t.pt"))
    r = _run_tool("distill_predictor.py", "--trace", str(tmp_path / "t.pt"), "--out", str(tmp_path / "p.pt"),
                  timeout=300)
    assert r.returncode != 0 and "has no hidden states" in r.stderr


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists(os.path.join(ROOT, "checkpoints", "tiny-moe-v1", "model.pt")),
                    reason="no shipped checkpoint")
def test_bench_moe_layer_cli(tmp_path):
    trace = tmp_path / "t.pt"
    r = _run_tool("record_traces.py", "--workload", os.path.join(ROOT, "workloads", "shift.json"), "--out", str(trace),
                  "--max-steps", "40", "--hidden-fraction", "1.0", "--ep", "2")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    out = tmp_path / "bench.json"
    r = _run_tool("bench_moe_layer.py", "--ep", "2", "--trace", str(trace), "--layers", "3", "--hidden", "64",
                  "--ffn", "128", "--steps", "3", "--max-tokens", "48", "--replica-slots", "2", "--json", str(out))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads(out.read_text())
    for k in ("static_ms", "probe_ms", "oracle_ms", "speedup", "ir_static", "ir_probe"):
        assert isinstance(res[k], float) and res[k] > 0, k
    assert res["layer_measurements"] == 3 * 3
    # the split never makes a layer's slowest rank slower than static under the cost model
    assert res["time_vs_static_oracle"] <= 1 + 1e-9 and res["time_vs_static_probe"] <= 1 + 1e-9, res
    assert 0 <= res["forecast_topk_acc"] <= 1 and res["copies"] >= res["dropped"] >= 0
    assert "static/PROBE" in r.stdout


@pytest.mark.slow
def test_soak_short_run_keeps_outputs_and_resources_flat(tmp_path):
    """The CI version of ``tools/soak.py`` (150 steps; the 2,000-step run is in results/reliability):
    outputs equal the plain model at every step, replicas are copied, and after the warm-up no
    thread, file descriptor, process group or replica memory is added and memory stays within 5%."""
    out = tmp_path / "soak.json"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "soak.py"), "--steps", "150", "--sample-every", "25",
                        "--warmup", "25", "--shift-every", "50", "--json", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["passed"] and not res["failures"] and res["ep"] == 2, res["failures"]
    for rank in res["per_rank"]:
        assert rank["copies"] > 100 and rank["max_rel_diff"] <= 1e-5, rank
        assert rank["threads_added"] == rank["groups_added"] == rank["fds_added"] == 0, rank
    assert len(res["samples"]["0"]) == 7  # steps 0, 25, ..., 125 and the last


def test_soak_report_names_what_grew():
    from megatron_probe.experiments.soak import SoakOptions, report

    opts = SoakOptions(steps=300, sample_every=100, warmup=100)

    def sample(step, rss, threads=3, groups=5):
        return {"step": step, "rss_bytes": rss, "threads": threads, "open_fds": 10, "process_groups": groups,
                "replica_bytes": 1024, "copies": 7}
    good = {"rank": 0, "max_rel_diff": 1e-7, "summary": {"copies": 7},
            "samples": [sample(0, 50), sample(100, 1000), sample(200, 1010), sample(299, 1040)]}
    bad = {"rank": 1, "max_rel_diff": 3e-3, "summary": {"copies": 0},
           "samples": [sample(0, 50), sample(100, 1000), sample(200, 1100, threads=4), sample(299, 1200, 5, 6)]}
    res = report(opts, 2, [good, bad])
    assert not res["passed"] and all(f.startswith("rank 1:") for f in res["failures"]), res["failures"]
    text = " | ".join(res["failures"])
    for what in ("differs from the plain model by 3.000e-03", "resident memory grew 20.0% after step 100",
                 "threads added 2", "groups added 1", "no replica was ever copied"):
        assert what in text, text
    assert report(opts, 1, [good])["passed"]
    with pytest.raises(ValueError, match="replica_mode='mirrored'"):
        SoakOptions(replica_mode="mirrored")


def test_gpu_preflight_names_what_is_there_and_what_is_not(tmp_path):
    """The GPU check's preflight on this machine: package versions, the compiler and Python.h
    Triton's launcher needs, and the Triton launch reported as not run without a CUDA device
    (on a GPU it must say ``ok``); a missing output path is refused with the usage."""
    out = tmp_path / "pre.json"
    tool = os.path.join(ROOT, "tools", "gpu_preflight.py")
    r = subprocess.run([sys.executable, tool, str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    res = json.loads(out.read_text())
    import torch

    assert res["packages"]["torch"] == torch.__version__, res["packages"]
    assert res["packages"]["megatron.core"] != "present" and not res["packages"]["megatron.core"].startswith("missing")
    assert res["packages"]["transformer_engine"].startswith("missing"), res["packages"]  # not installable here
    assert isinstance(res["python_h"], bool) and isinstance(res["libcuda"], list)
    if not torch.cuda.is_available():
        assert res["triton_launch"] == "not run: no CUDA device", res
    bad = subprocess.run([sys.executable, tool], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "OUT.json" in bad.stderr, bad.stderr[-500:]


def test_gpu_check_keeps_what_ran_when_a_section_fails(tmp_path):
    """A section that raises is recorded by name and the report written after each section keeps
    the others (none of them has run on a GPU: one failure must not lose the rest)."""
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    try:
        import gpu_check
    finally:
        sys.path.pop(0)
    report = {"errors": {}, "complete": False}
    path = str(tmp_path / "gpu_check.json")

    def broken(n):
        raise RuntimeError(f"no kernel for {n}")

    assert gpu_check.guarded("fp8_gemm", report, broken, 3) == []
    assert report["errors"] == {"fp8_gemm": "RuntimeError: no kernel for 3"}
    report["layer"] = gpu_check.guarded("layer", report, lambda a, b: [a + b], 1, 2)
    gpu_check.save(report, path)
    saved = json.load(open(path))
    assert saved["layer"] == [3] and saved["errors"] == report["errors"] and saved["complete"] is False
    assert not os.path.exists(path + ".tmp")


@pytest.mark.slow
def test_gpu_check_script_stops_a_step_at_its_time_limit(tmp_path):
    """``tools/gpu_check.sh`` on CPU: the preflight runs, a step past its limit is stopped (exit
    124) and named in the log and in ``summary.json``, the script still writes the summary, and
    ``PACK_TO`` gets the summary and one archive of the whole folder (a device call brings back
    at most 8 files)."""
    import tarfile

    dest, pack = tmp_path / "results", tmp_path / "out"
    env = dict(os.environ, OUT=str(dest), PACK_TO=str(pack), PYTHON=sys.executable,
               GPU_CHECK_LIMITS="300 300 1 300")
    r = subprocess.run(["bash", os.path.join(ROOT, "tools", "gpu_check.sh"), "predictor"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 1, r.stdout[-2000:] + r.stderr[-2000:]
    summary = json.load(open(dest / "summary.json"))
    step = summary["steps"]["predictor"]
    assert step["exit_status"] == 124 and step["timed_out"] is True, summary
    assert summary["preflight"]["packages"]["torch"], summary["preflight"]
    assert "stopped at its time limit of 1 s" in (dest / "logs" / "predictor.log").read_text()
    assert sorted(os.listdir(pack)) == ["gpu_check_results.tar.gz", "summary.json"], os.listdir(pack)
    with tarfile.open(pack / "gpu_check_results.tar.gz") as tar:
        names = tar.getnames()
    for name in ("summary.json", "preflight.json", "logs/predictor.log", "logs/preflight.log"):
        assert f"results/{name}" in names, names
