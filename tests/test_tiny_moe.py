"""The trained model: training loop smoke run, shipped checkpoint, recorder pipeline."""

import json
import os
import subprocess
import sys

import pytest

from distributed import init_ep, run_ranks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CKPT = os.path.join(ROOT, "checkpoints", "tiny-moe-v1")
HAVE_CKPT = os.path.exists(os.path.join(CKPT, "model.pt"))


def _run(*args, timeout=600):
    r = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout


@pytest.mark.slow
def test_training_smoke_then_workloads_and_recorded_trace(tmp_path):
    ck, wl, tr = tmp_path / "ckpt", tmp_path / "wl", tmp_path / "shift.pt"
    out = _run("tools/train_tiny_moe.py", "--smoke", "--out", str(ck))
    assert "saved" in out
    rec = json.loads((ck / "training_record.json").read_text())
    # deterministic: a second run with the same seed gives the same losses and weights
    _run("tools/train_tiny_moe.py", "--smoke", "--out", str(tmp_path / "again"))
    rec2 = json.loads((tmp_path / "again" / "training_record.json").read_text())
    assert rec2["loss_curve"] == rec["loss_curve"] and rec2["corpus_fingerprint"] == rec["corpus_fingerprint"]
    import torch

    a = torch.load(ck / "model.pt", weights_only=True)
    b = torch.load(tmp_path / "again" / "model.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert rec["steps"] == 3 and len(rec["loss_curve"]) == 3 and set(rec["heldout_loss_bf16_checkpoint"]) == {
        "python", "c", "english", "shell", "de_fr", "ja_ru"}
    _run("tools/make_workloads.py", "--checkpoint", str(ck), "--out", str(wl), "--requests", "10", "--steps", "30",
         "--shift-step", "12", "--max-bytes-per-domain", "60000")
    for sc in ("steady", "shift", "repeat", "bursty"):
        assert (wl / f"{sc}.json").exists()
    _run("tools/record_traces.py", "--checkpoint", str(ck), "--workload", str(wl / "shift.json"), "--out", str(tr),
         "--ep", "2", "--hidden-fraction", "0.5")
    from megatron_probe.data.traces import load_trace
    from megatron_probe.data.workloads import Workload, schedule_steps

    t = load_trace(str(tr))
    w = Workload.load(str(wl / "shift.json"))
    sched = schedule_steps(w)
    assert len(t.steps) == len(sched)
    assert t.n_tokens == sum(s.num_tokens for s in sched)
    assert int(t.heat.sum(1)[0]) == t.n_tokens * t.topk
    assert any(s.hidden for s in t.steps)
    assert all(s.source_rank.numel() == 0 or int(s.source_rank.max()) < 2 for s in t.steps)
    domains = [w.requests[int(r)].domain for r in t.steps[0].request_id]
    assert set(domains) <= {"python", "ja_ru"}


@pytest.mark.skipif(not HAVE_CKPT, reason="no shipped checkpoint")
def test_shipped_checkpoint_record_and_size():
    rec = json.loads(open(os.path.join(CKPT, "training_record.json")).read())
    assert os.path.getsize(os.path.join(CKPT, "model.pt")) < 26_000_000
    for d, loss in rec["heldout_loss_bf16_checkpoint"].items():
        assert loss < rec["heldout_unigram_loss"][d] - 0.5, d  # it learned more than word frequencies
    assert rec["command"].startswith("python tools/train_tiny_moe.py")


def tiny_moe_generate(rank, ws, ckpt, replicas):
    """Greedy tokens of the checkpoint at EP=ws (PROBE spec, optionally with replicas on every
    layer) for a prompt that depends on the rank: ``{prompt: new token ids}``."""
    import torch

    from megatron_probe import ProbeConfig
    from megatron_probe.experiments.tiny_moe import greedy_generate, load_model
    from megatron_probe.runtime.model_walk import moe_layers

    init_ep(ws)
    R = 2 if (replicas and ws > 1) else 0
    model, tok, cfg = load_model(ckpt, spec="probe", probe_config=ProbeConfig(replica_slots_per_rank=R),
                                 ep=ws, rank=rank)
    if R:
        L = cfg.num_experts // ws
        pl = torch.full((ws, R), -1, dtype=torch.long)
        for r in range(ws):
            foreign = [e for e in range(cfg.num_experts) if e // L != r]
            pl[r] = torch.tensor(foreign[r::max(1, len(foreign) // R)][:R])
        for m in moe_layers(model):
            m.set_replica_placement(pl)
    prompts = ["def main(argv):\n    parser = argparse.", "Diese Option bewirkt, dass"]
    out = {}
    for i in range(len(prompts)):
        # each rank serves a different prompt in the same forward passes (EP shares experts, not tokens)
        mine = prompts[(i + rank) % len(prompts)]
        ids = tok.encode(mine).ids
        out[mine] = greedy_generate(model, ids, 12, cfg.seq_length, eos_id=None)
    return out


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_CKPT, reason="no shipped checkpoint")
def test_shipped_checkpoint_same_tokens_stock_probe_and_ep2_with_replicas():
    (ref,) = run_ranks(tiny_moe_generate, 1, CKPT, False)
    for r, got in enumerate(run_ranks(tiny_moe_generate, 2, CKPT, True)):
        for prompt, toks in got.items():
            assert toks == ref[prompt], (r, prompt, toks, ref[prompt])
    out = _run("tools/sample_tiny_moe.py", "--prompt-tokens", "16", "--new-tokens", "8", "--per-domain", "1")
    assert "All samples identical between the stock and the PROBE spec: yes." in out
