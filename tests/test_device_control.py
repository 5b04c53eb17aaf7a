"""``ProbeConfig.control_path="device"`` (``runtime.device_control``, the dispatcher's device path)
over gloo at EP 2 and 4, the Triton kernels under ``TRITON_INTERPRET=1`` (conftest.py): the same
plans and the same balance as the host control path, the output equal to the plain model's, one
read-back per dispatch (the All-to-All's sizes) and one per step end; random and adversarial
single-layer cases against the stock layer; bad settings refused by name."""

import importlib

import pytest
import torch

from distributed import run_ranks
from test_pipeline import _skewed_gpt


def _counting_reads():
    """Count the dispatcher's read-backs (``comm.device_to_host``, the real function inside)."""
    from megatron_probe.mechanism import dispatcher as dispatcher_module

    real = dispatcher_module.device_to_host
    calls = []

    def counted(t):
        calls.append(tuple(t.shape))
        return real(t)
    dispatcher_module.device_to_host = counted
    return calls


def pipeline_device_control(rank, ws, predict, transport="p2p"):
    """The same model and steps under the host and the device control path (previous-step
    forecasts, or the lookahead predictors with ``predict``): the output equals the plain model's
    at every step under both; without the predictors (deterministic forecasts) every layer's
    placement is the same under both and the dispatch splits reach the same slowest rank; the
    device path reads back once per dispatch that re-assigned (the split sizes) and its per-layer
    figures once per step end."""
    from megatron_probe import ProbeConfig
    from megatron_probe.experiments.tiny_moe import forward_logits
    from megatron_probe.runtime.model_walk import moe_layers
    from megatron_probe.runtime.pipeline import LookaheadPipeline

    model, batches, refs, unit_cost = _skewed_gpt(rank, ws)
    scale = max(float(r.abs().max()) for r in refs)
    calls = _counting_reads()
    runs = {}
    for path in ("host", "device"):
        # auto: streamed on the device path (resident on the host's)
        pcfg = ProbeConfig(replica_slots_per_rank=2, replica_mode="auto" if path == "device" else "streamed",
                           pipeline_predict=predict, cost_gate=False,
                           transfer_chunk_mib=0.001, prefetch_deadline_ms=10_000.0, dispatch_split="tokens",
                           control_path=path, copy_transport=transport)
        pipe = LookaheadPipeline(model, pcfg, cost=unit_cost)
        placements, slowest, reads, reassigned = [], [], [], 0
        with torch.inference_mode():
            for step, (b, ref) in enumerate(zip(batches, refs)):
                calls.clear()
                got = forward_logits(model, b)
                diff = float((got - ref).abs().max())
                assert diff <= 1e-5 * scale, (f"rank {rank} {path} step {step}", diff, scale)
                ds = [m.token_dispatcher for m in moe_layers(model)]
                placements.append([d.placement.tolist() for d in ds])
                slowest.append([int(d.last_assignment.sum((0, 1)).max()) for d in ds])
                reassigned += sum(d.assignment_fn is not None for d in ds)
                reads.append(len(calls))
                before = pipe.control.read_backs if pipe.control is not None else 0
                rows = pipe.end_step()
                if pipe.control is not None:
                    assert pipe.control.read_backs == before + 1, (rank, step, before, pipe.control.read_backs)
                assert all("ir_after" in r and "ir_before" in r for r in rows), (rank, path, rows)
        s = pipe.summary()
        pipe.close()
        runs[path] = dict(placements=placements, slowest=slowest, reads=reads, summary=s, reassigned=reassigned)
        assert s["control_path"] == path and s["replica_mode"] == "streamed", (rank, s)
    host, dev = runs["host"], runs["device"]
    ctx = (f"rank {rank}", host["summary"], dev["summary"])
    assert dev["summary"]["copies"] > 0 and dev["reassigned"] > 0, ctx  # replicas were planned, copied and used
    assert host["reads"] == [0] * len(batches), ("the host path has no device read-back", host["reads"])
    # device path: one read per re-assigning dispatch (a layer without replicas reads its sizes too)
    assert dev["reads"] == [len(moe_layers(model))] * len(batches), ("one read-back per dispatch", dev["reads"])
    if not predict:
        assert dev["placements"] == host["placements"], ("the device plan differs from the host plan", ctx)
        assert dev["slowest"] == host["slowest"], ("the device split is not the exact token split", ctx)


@pytest.mark.parametrize("ws", [2, 4])
def test_device_control_plans_like_the_host_and_keeps_the_output(ws):
    run_ranks(pipeline_device_control, ws, False)


@pytest.mark.slow
def test_device_control_with_the_lookahead_predictors_keeps_the_output():
    run_ranks(pipeline_device_control, 2, True)


@pytest.mark.slow
@pytest.mark.parametrize("transport", ["peer_memory", "stream"])
def test_device_control_with_the_other_copy_transports(transport):
    run_ranks(pipeline_device_control, 2, False, transport)


@pytest.mark.parametrize("ep,dp,tp,etp,sp,seed", [(2, 1, 1, 1, False, 5), (4, 1, 1, 1, False, 6),
                                                   (2, 2, 2, 2, True, 7)])
def test_device_control_layer_equals_stock_on_random_and_adversarial_cases(ep, dp, tp, etp, sp, seed):
    """The equivalence harness's routings (a hot rank, a silent rank, no tokens, one expert, ...),
    placements (random, hot, planned, none) and assignments (random, the device token split)
    through the device dispatch, against the dense reference and the stock layer."""
    from megatron_probe.experiments.equivalence import EquivalenceOptions, run_rank

    opts = EquivalenceOptions(ep=ep, dp=dp, tp=tp, etp=etp, sp=sp, experts=8, topk=2, replica_slots=2, trials=21,
                              seed=seed, control_path="device")
    report = run_ranks(run_rank, ep * dp, opts)[0]
    assert report.passed, [t for t in report.trials if not t.passed]
    kinds = {(t.placement, t.assignment) for t in report.trials}
    assert any(a == "random" for _, a in kinds) and any(a == "split" for _, a in kinds), kinds


def test_bad_device_control_settings_are_refused_by_name(monkeypatch):
    from megatron_probe import ProbeConfig
    from megatron_probe.runtime.device_control import check_device_control

    with pytest.raises(ValueError, match="control_path='gpu'"):
        ProbeConfig(control_path="gpu")
    with pytest.raises(ValueError, match="dispatch_split='time'.*valid: dispatch_split='tokens'"):
        ProbeConfig(control_path="device")
    with pytest.raises(ValueError, match="pipeline_reassign=False"):
        ProbeConfig(control_path="device", dispatch_split="tokens", pipeline_reassign=False)
    with pytest.raises(ValueError, match="replica_mode='resident'"):
        ProbeConfig(control_path="device", dispatch_split="tokens", replica_mode="resident")
    ProbeConfig(control_path="device", dispatch_split="tokens", replica_mode="auto")
    importlib.import_module("triton")  # imported under the interpreter first: later tests' kernels read it

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        check_device_control(torch.device("cpu"))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    check_device_control(torch.device("cpu"))


def test_placement_is_planned_without_its_assignment():
    """``plan_probe_triton(assignment=False)``: the slots alone, the same as with the assignment."""
    from megatron_probe.policy.cost_model import ExpertCost
    from megatron_probe.policy.placement import ExpertLayout
    from megatron_probe.policy.planner_triton import plan_probe_triton

    gen = torch.Generator().manual_seed(3)
    layout = ExpertLayout(16, 4, 2)
    for _ in range(5):
        counts = (torch.rand(4, 16, generator=gen) ** 4 * 200).long()
        slots, assign = plan_probe_triton(counts, layout, ExpertCost(1.0, 3.0), assignment=False)
        want, _ = plan_probe_triton(counts, layout, ExpertCost(1.0, 3.0))
        assert assign is None and torch.equal(slots, want), (slots, want)


def test_device_assignment_check_refuses_what_the_host_check_refuses():
    """``check_assignment_async`` (device assertions) against ``validate_split`` (host): a valid
    assignment passes both; one that loses, duplicates or misroutes tokens, or holds a negative
    entry, fails both."""
    from megatron_probe.policy.placement import (
        ExpertLayout,
        assignment_from_placement,
        check_assignment_async,
        holder_slots,
        validate_split,
    )

    layout = ExpertLayout(8, 2, 2)
    placement = torch.tensor([[5, -1], [0, 2]])
    counts = torch.tensor([[3, 0, 4, 1, 0, 7, 2, 2], [1, 5, 0, 0, 6, 2, 0, 3]])
    holds = holder_slots(placement, layout) >= 0
    good = assignment_from_placement(counts, placement, layout, "locality_even")
    validate_split(good, counts, holds)
    check_assignment_async(good, counts, holds)
    lost, dup, misrouted, negative = good.clone(), good.clone(), good.clone(), good.clone()
    lost[0, 2, 0] -= 1
    dup[1, 4, 1] += 1
    misrouted[0, 3, 0] -= 1  # one of rank 0's tokens of expert 3 (native on rank 0) ...
    misrouted[0, 3, 1] += 1  # ... sent to rank 1, which holds no copy of it
    negative[0, 5, 0] -= 8
    negative[0, 5, 1] += 8
    for bad in (lost, dup, misrouted, negative):
        with pytest.raises(ValueError):
            validate_split(bad, counts, holds)
        with pytest.raises(RuntimeError):
            check_assignment_async(bad, counts, holds)


@pytest.mark.slow
def test_serving_script_with_device_control_matches_the_host_control_path(tmp_path):
    """``tools/run_probe_inference.py --probe-control-path device`` (the Triton kernels under the
    interpreter): tokens identical to the stock model's, and the same copies and balance as the
    host control path on the same steps (its plans and split optima are the host's). The copy deadline
    is far away: under the interpreter the device path is slow enough that a copy can miss the default
    50 ms and be dropped, which changes the balance but is timing, not control."""
    import json
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    common = ["--compare", "--workload", "shift", "--expert-model-parallel-size", "2", "--max-steps", "8",
              "--probe-dispatch-split", "tokens", "--probe-cost-gate", "false", "--cost-model", "profile", "--quiet",
              "--probe-prefetch-deadline-ms", "60000"]
    got = {}
    for path in ("host", "device"):
        out = str(tmp_path / f"{path}.json")
        r = subprocess.run([sys.executable, os.path.join(root, "tools", "run_probe_inference.py"), *common,
                            "--probe-control-path", path, "--json", out], cwd=root, capture_output=True, text=True,
                           timeout=900, env=dict(os.environ, TRITON_INTERPRET="1"))
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
        d = json.load(open(out))
        assert d["tokens_identical"], d
        got[path] = d["modes"]["probe"]
        assert got[path]["control_path"] == path, got[path]
    host, dev = got["host"], got["device"]
    assert dev["copies"] > 0, dev  # replicas were planned and used
    for key in ("copies", "ir_before", "ir_after"):
        assert dev[key] == host[key], (key, host[key], dev[key])


def test_gpu_check_device_control_step_dry_run(tmp_path):
    """The GPU check's device-control step on CPU (the interpreter): the live pipeline on the
    device path with the cost gate off and on (its cost column carried on the device), the
    output equal to the plain model's on both ranks, copies made."""
    import json
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = ("import sys, json, torch, gpu_check; "
            f"r = gpu_check.device_control_pipeline(torch.device('cpu'), True, {str(tmp_path)!r}); "
            f"json.dump(r, open({str(tmp_path / 'r.json')!r}, 'w')); sys.exit(0 if r['passed'] else 1)")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.join(root, "tools"), root]))
    env.pop("TRITON_INTERPRET", None)  # the step sets it for its CPU workers itself
    done = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    out = json.load(open(tmp_path / "r.json"))
    runs = [run for rank in out["ranks"] for run in rank["runs"]]
    assert len(runs) == 4 and {run["cost_gate"] for run in runs} == {False, True}, out
    assert all(run["read_backs"] >= run["steps"] for run in runs), out  # at least one per step end
