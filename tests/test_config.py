import pytest

from megatron_probe import ProbeConfig


def test_defaults_are_valid():
    cfg = ProbeConfig()
    assert cfg.replica_slots_per_rank == 0
    cfg.validate_for_model(num_experts=8, ep_size=2, topk=2)


@pytest.mark.parametrize("value", [-1, -5])
def test_negative_replica_slots(value):
    with pytest.raises(ValueError, match=f"replica_slots_per_rank={value} is negative"):
        ProbeConfig(replica_slots_per_rank=value)


@pytest.mark.parametrize("value", [1.5, "2", True, None])
def test_replica_slots_must_be_int(value):
    with pytest.raises(TypeError, match="replica_slots_per_rank must be an int"):
        ProbeConfig(replica_slots_per_rank=value)


def test_too_many_replica_slots_names_the_limit():
    cfg = ProbeConfig(replica_slots_per_rank=7)
    with pytest.raises(ValueError, match=r"exceeds the 6 experts that other ranks own.*valid range: 0\.\.6"):
        cfg.validate_for_model(num_experts=8, ep_size=4)
    ProbeConfig(replica_slots_per_rank=6).validate_for_model(num_experts=8, ep_size=4)


def test_experts_not_divisible_by_ep_lists_valid_sizes():
    with pytest.raises(ValueError, match=r"num_experts=10 is not divisible by expert-parallel size 4.*\[1, 2, 5, 10\]"):
        ProbeConfig().validate_for_model(num_experts=10, ep_size=4)


@pytest.mark.parametrize("topk", [0, 9])
def test_topk_out_of_range(topk):
    with pytest.raises(ValueError, match=f"moe_router_topk={topk} must be between 1 and num_experts=8"):
        ProbeConfig().validate_for_model(num_experts=8, ep_size=2, topk=topk)


def test_unknown_backend_and_policy():
    with pytest.raises(ValueError, match="expert_backend='cublas' is not one of"):
        ProbeConfig(expert_backend="cublas")
    with pytest.raises(ValueError, match="assignment_policy='greedy' is not one of"):
        ProbeConfig(assignment_policy="greedy")


def test_dispatch_split_choices():
    assert ProbeConfig().dispatch_split == "time"
    for v in ("time", "tokens"):
        ProbeConfig(dispatch_split=v)
    with pytest.raises(ValueError, match=r"dispatch_split='exact' is not one of \('time', 'tokens'\)"):
        ProbeConfig(dispatch_split="exact")


def test_pipeline_fault_and_export_options():
    cfg = ProbeConfig()
    assert not cfg.event_log and cfg.collective_timeout_s > 0 and cfg.wandb_project is None
    assert cfg.wandb_mode == "offline"
    for bad in (0, -1.0, float("inf"), "5"):
        with pytest.raises(ValueError, match="collective_timeout_s="):
            ProbeConfig(collective_timeout_s=bad)
    assert cfg.transfer_retry_steps == 8 and ProbeConfig(transfer_retry_steps=0).transfer_retry_steps == 0
    for bad in (-1, 2.5, True, "8"):
        with pytest.raises(ValueError, match="transfer_retry_steps=.*valid: an int >= 0"):
            ProbeConfig(transfer_retry_steps=bad)
    with pytest.raises(ValueError, match="wandb_mode='cloud' is not one of"):
        ProbeConfig(wandb_mode="cloud")
    with pytest.raises(ValueError, match="wandb_project=''"):
        ProbeConfig(wandb_project="")
    assert ProbeConfig(wandb_project="probe", wandb_mode="disabled", event_log=True).to_dict()["wandb_project"] == "probe"


def test_replace_revalidates():
    cfg = ProbeConfig(replica_slots_per_rank=2)
    assert cfg.replace(replica_slots_per_rank=3).replica_slots_per_rank == 3
    with pytest.raises(ValueError):
        cfg.replace(replica_slots_per_rank=-1)
    assert cfg.to_dict()["replica_slots_per_rank"] == 2


def test_import_needs_no_megatron_or_te():
    import subprocess
    import sys

    code = (
        "import sys, megatron_probe, megatron_probe.policy;"
        "bad=[m for m in ('megatron','transformer_engine','apex') if m in sys.modules];"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    root = __import__("os").path.dirname(__import__("os").path.dirname(__file__))
    r = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
