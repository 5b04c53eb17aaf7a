"""A rank killed or stuck in the middle of a step: every survivor exits on its own, within the
timeout plus a margin, with one line that names the lost rank and the stage it was in; the
launcher reports every rank's end; result files are never left half-written or looking like a
success. The kills are real (``MEGATRON_PROBE_KILL_AT``: the rank sends itself SIGKILL or
SIGSTOP on entering a stage)."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist

from megatron_probe.mechanism import stages
from megatron_probe.mechanism.peer_loss import PEER_LOST_EXIT, describe_peer_loss, is_peer_failure, peer_lost_line

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CKPT = os.path.join(ROOT, "checkpoints", "tiny-moe-v1")
needs_ckpt = pytest.mark.skipif(not os.path.exists(os.path.join(CKPT, "model.pt")), reason="no shipped checkpoint")
# what gloo raised on this machine when a peer was killed, and when one hung past the timeout
GLOO_RESET = ("[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:4508: Connection "
              "reset by peer. This is typically caused by a remote worker hanging or bugs in the application.")
GLOO_TIMEOUT = "[/pytorch/third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:129] Timed out waiting 8050ms for send"


# ---------------------------------------------------------------------------- the stage stack
def test_stage_stack_follows_the_ranges_and_stamps_an_exception_where_it_was_raised():
    from megatron_probe.mechanism.profiling import nvtx_pop, nvtx_push, nvtx_range

    base = stages.depth()
    with pytest.raises(RuntimeError) as info:
        with nvtx_range("serve.probe.step3"):
            nvtx_push("layer1")  # a hook's range: never popped when the forward raises
            with nvtx_range("dispatch"):
                assert stages.current().endswith("serve.probe.step3 > layer1 > dispatch")
                raise RuntimeError("Connection reset by peer")
    assert stages.stage_of(info.value).endswith("serve.probe.step3 > layer1 > dispatch")
    assert stages.depth() == base + 1  # the hook's range is still open
    stages.truncate(base)
    assert stages.depth() == base
    nvtx_push("x")
    nvtx_pop()
    assert stages.depth() == base


def test_kill_rule_is_parsed_or_refused_with_the_valid_form():
    rule = stages._parse_kill_rule("1:*step3*dispatch:2:STOP")
    assert rule["rank"] == 1 and rule["left"] == 2 and rule["signal"] == signal.SIGSTOP
    assert stages._parse_kill_rule("0:*combine")["signal"] == signal.SIGKILL
    assert stages._parse_kill_rule(None) is None
    for bad in ("x:*dispatch", "1", "1:", "1:*d:0", "1:*d:2:TERM"):
        with pytest.raises(ValueError, match="MEGATRON_PROBE_KILL_AT"):
            stages._parse_kill_rule(bad)


# ---------------------------------------------------------------------------- peer failures
def test_peer_failures_are_told_from_other_errors():
    assert is_peer_failure(RuntimeError(GLOO_RESET))
    assert is_peer_failure(RuntimeError(GLOO_TIMEOUT))
    assert is_peer_failure(dist.DistNetworkError("Broken pipe"))
    assert is_peer_failure(TimeoutError("no partner committed to chunk (0, 1) within 2.0 s"))
    try:  # raised from a peer failure
        try:
            raise RuntimeError(GLOO_RESET)
        except RuntimeError as e:
            raise RuntimeError("expert transfer failed") from e
    except RuntimeError as chained:
        assert is_peer_failure(chained)
    # a bug on this rank is not a peer failure: its traceback must surface
    assert not is_peer_failure(ValueError("routing_map (4, 8) != (4, 16)"))
    assert not is_peer_failure(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not is_peer_failure(AssertionError("tokens differ"))


def test_roll_call_names_the_rank_that_never_answers_and_the_store_host_when_the_store_is_gone():
    from megatron_probe.mcore.launch import free_port

    port = free_port()
    server = dist.TCPStore("127.0.0.1", port, 3, True, wait_for_workers=False)
    server.set("megatron_probe/alive/1", "1")  # rank 1 failed too and answered; rank 2 is dead
    t0 = time.monotonic()
    line = describe_peer_loss(RuntimeError(GLOO_RESET), 0, 3, roll_call_s=1.0, store=server)
    assert 0.9 < time.monotonic() - t0 < 5
    assert line.startswith("megatron_probe: rank 0 lost rank 2 (") and "Connection reset by peer" in line, line
    # everyone answered: no rank is named lost
    server.set("megatron_probe/alive/2", "1")
    line = describe_peer_loss(RuntimeError(GLOO_TIMEOUT), 0, 3, roll_call_s=1.0, store=server)
    assert "every rank answered" in line, line
    # the store's host (rank 0 under this project's launcher) is gone
    client = dist.TCPStore("127.0.0.1", port, 3, False, wait_for_workers=False)
    del server
    line = describe_peer_loss(RuntimeError(GLOO_RESET), 1, 3, roll_call_s=1.0, store=client)
    assert line.startswith("megatron_probe: rank 1 lost rank 0: the rendezvous store is unreachable"), line


# ---------------------------------------------------------------------------- the launcher
def test_launcher_gives_nccl_groups_gloo_for_host_tensors_and_takes_torchruns_local_rank(monkeypatch):
    """Under NCCL the default group (and every group made from it without a backend) also gets
    gloo, so the control path's small host tensors have a backend; a process picks its GPU from
    torchrun's LOCAL_RANK, not from its global rank. (NCCL itself needs a GPU: its run is in
    tools/gpu_check.sh.)"""
    from megatron_probe.mcore import launch

    assert launch.process_group_backend("nccl") == "cpu:gloo,cuda:nccl"
    assert launch.process_group_backend("gloo") == "gloo"
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert launch.local_device_index(11) == 3  # rank 11 is the fourth process of its node
    monkeypatch.delenv("LOCAL_RANK")
    if torch.cuda.is_available():
        assert launch.local_device_index(11) == 11 % torch.cuda.device_count()


def _dies_in_a_stage(rank, ws, how):
    from megatron_probe.mechanism.profiling import nvtx_range

    for step in range(3):
        with nvtx_range(f"step{step}"), nvtx_range("counts"):
            if rank == 1 and step == 2:
                if how == "kill":
                    os.kill(os.getpid(), signal.SIGKILL)
                raise ValueError("rank 1's own bug")
            dist.all_reduce(torch.ones(2))


@pytest.mark.slow
@pytest.mark.parametrize("how", ["kill", "raise"])
def test_launcher_reports_every_rank_and_the_survivor_names_the_lost_rank_and_stage(capfd, how):
    """Rank 1 dies at step 2 (SIGKILL, or its own exception): rank 0, inside the all-reduce of
    stage ``step2 > counts``, exits on its own with the peer-loss line and code 3; the launcher
    raises RanksFailed with each rank's end (and rank 1's traceback when it raised)."""
    from megatron_probe.mcore.launch import RanksFailed, run_distributed

    t0 = time.monotonic()
    with pytest.raises(RanksFailed) as info:
        run_distributed(_dies_in_a_stage, 2, how, backend="gloo", timeout_s=20)
    took = time.monotonic() - t0
    err = capfd.readouterr().err
    exits = {e["rank"]: e for e in info.value.exits}
    assert exits[0]["exitcode"] == PEER_LOST_EXIT, info.value
    assert exits[0]["after_s"] <= 20 + 10, info.value
    line = peer_lost_line(err, 0)
    assert line and "lost rank 1" in line and "'step2 > counts'" in line, err[-3000:]
    if how == "kill":
        assert exits[1]["how"] == "killed by SIGKILL" and exits[1]["error"] is None, info.value
    else:
        # exit code 1, or SIGABRT when a library aborts in the interpreter's teardown (seen in CI)
        assert exits[1]["how"].startswith("raised an exception") and "ValueError: rank 1's own bug" in exits[1]["error"], \
            info.value
        assert "ValueError: rank 1's own bug" in str(info.value)
    assert took < 60, took


# ---------------------------------------------------------------------------- files a kill leaves
def _append_forever(path):
    from megatron_probe.fileio import append_jsonl

    i = 0
    while True:
        append_jsonl(path, [{"i": i + k, "pad": "x" * (3000 + 97 * k)} for k in range(7)])
        i += 7


def test_jsonl_rows_stay_whole_when_the_writer_is_killed_inside_its_write(tmp_path):
    """Killed between two appends, a JSON-lines file holds whole lines only (the serving tests
    kill in a stage). Killed inside the write call itself, Linux may stop a multi-page write at
    a page boundary: what lands is a prefix of the data, so every line that ended with its
    newline is whole and at most the last one is cut off (no newline), which readers name."""
    import multiprocessing as mp

    path = str(tmp_path / "rows.jsonl")
    for delay in (0.05, 0.2, 0.5):
        p = mp.get_context("spawn").Process(target=_append_forever, args=(path,))
        p.start()
        while not os.path.exists(path):
            time.sleep(0.01)
        time.sleep(delay)
        p.kill()
        p.join()
        with open(path) as f:
            text = f.read()
        whole, _, tail = text.rpartition("\n")
        rows = [json.loads(line) for line in whole.split("\n")]
        assert len(rows) >= 7 and "\n" not in tail
        if tail:  # repair before the next writer appends, as a re-run would start afresh
            with open(path, "w") as f:
                f.write(whole + "\n")


def test_write_whole_leaves_the_old_file_when_writing_fails(tmp_path):
    from megatron_probe.fileio import write_whole

    path = tmp_path / "res.json"
    write_whole(str(path), '{"ok": 1}')

    with pytest.raises(TypeError):
        write_whole(str(path), object())  # not text: nothing replaced
    assert json.loads(path.read_text()) == {"ok": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["res.json"], "a temporary file was left behind"


# ---------------------------------------------------------------------------- serving and the layer benchmark
def _tool(script, *args, env_extra=None, timeout=300):
    env = dict(os.environ, **(env_extra or {}))
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", script), *args], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=timeout)
    return r, time.monotonic() - t0


def _check_failed_job(r, lost: int, survivor: int, stage: str, timeout_s: float):
    assert r.returncode == 1, (r.returncode, r.stdout[-2000:], r.stderr[-3000:])
    line = peer_lost_line(r.stderr, survivor)
    assert line and f"lost rank {lost}" in line and stage in line, r.stderr[-3000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    m = re.search(rf"rank {survivor}: exited {PEER_LOST_EXIT}: .*\(([\d.]+) s after the first failure\)", r.stderr)
    assert m and float(m.group(1)) <= timeout_s + 10, r.stderr[-2000:]


@pytest.mark.slow
@needs_ckpt
@pytest.mark.parametrize("victim,stage", [(1, "dispatch"), (0, "combine")])
def test_serving_survives_a_rank_killed_mid_step_with_a_clear_exit(tmp_path, victim, stage):
    """Serving at EP 2 with --compare: one rank is SIGKILLed on entering the PROBE model's
    ``stage`` at step 3 (rank 0 also hosts the rendezvous store). The survivor exits within the
    timeout plus 10 s naming the lost rank and its own stage (the dispatcher's collectives
    included); the tool exits 1; the earlier result JSON and metrics are gone, not left as if
    this run wrote them; the per-layer JSON lines written so far are whole."""
    res, rows = tmp_path / "res.json", tmp_path / "m.jsonl"
    res.write_text('{"from": "an earlier run"}')
    rows.write_text('{"from": "an earlier run"}\n')
    r, took = _tool("run_probe_inference.py", "--compare", "--workload", "shift", "--max-steps", "8",
                    "--max-requests", "8", "--quiet", "--json", str(res), "--metrics-jsonl", str(rows),
                    "--probe-collective-timeout-s", "20",
                    env_extra={stages.KILL_ENV: f"{victim}:serve.probe.step3*{stage}"})
    survivor = 1 - victim
    _check_failed_job(r, victim, survivor, f"serve.probe.step3 > probe.step > layer0 > {stage}'", 2 * 20 + 0.2)
    assert not res.exists() and not rows.exists()
    layer_files = sorted(tmp_path.glob("m.layers.rank*.jsonl"))
    assert layer_files, "the pipeline wrote no per-layer rows before the kill"
    for f in layer_files:
        text = f.read_text()
        assert text.endswith("\n") and all(json.loads(line)["layer"] >= 0 for line in text.splitlines())


@pytest.mark.slow
@needs_ckpt
def test_serving_gives_up_a_stuck_rank_after_the_timeout():
    """Rank 1 stops (SIGSTOP: alive, silent) on entering its dispatch at step 3. Rank 0's
    All-to-All waits the data group's timeout (2 x 2 s + deadline, not Megatron's 30 minutes),
    then names rank 1; the launcher stops the stuck rank."""
    r, took = _tool("run_probe_inference.py", "--compare", "--workload", "shift", "--max-steps", "8",
                    "--max-requests", "8", "--quiet", "--probe-collective-timeout-s", "2",
                    env_extra={stages.KILL_ENV: "1:serve.probe.step3*dispatch:1:STOP"})
    _check_failed_job(r, 1, 0, "layer0 > dispatch'", 2 * 2 + 0.2)
    assert "Timed out" in peer_lost_line(r.stderr, 0), r.stderr[-2000:]
    assert "rank 1: did not end on its own within" in r.stderr, r.stderr[-2000:]


@pytest.mark.slow
def test_layer_benchmark_survives_a_rank_killed_mid_step(tmp_path):
    """The layer benchmark (scaled replay, EP 2): rank 1 is SIGKILLed in the probe mode's
    combine at its second step; rank 0 names it and its own stage, the tool exits 1 and writes
    no result."""
    trace = tmp_path / "t.pt"
    r, _ = _tool("record_traces.py", "--workload", os.path.join(ROOT, "workloads", "shift.json"), "--out", str(trace),
                 "--max-steps", "12", "--hidden-fraction", "1.0", "--ep", "2")
    assert r.returncode == 0, r.stderr[-2000:]
    out = tmp_path / "bench.json"
    out.write_text('{"from": "an earlier run"}')
    r, took = _tool("bench_moe_layer.py", "--ep", "2", "--trace", str(trace), "--layers", "2", "--hidden", "64",
                    "--ffn", "128", "--steps", "3", "--max-tokens", "48", "--replica-slots", "2", "--json", str(out),
                    "--collective-timeout-s", "20", env_extra={stages.KILL_ENV: "1:replay.probe.step1*combine"})
    _check_failed_job(r, 1, 0, "replay.probe.step1 > layer", 2 * 20 + 0.2)
    assert not out.exists()
