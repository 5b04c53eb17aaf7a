"""ProbeRouter keeps TopKRouter's routing semantics; checked against an independent reference."""

import pytest
import torch
import torch.nn.functional as F
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.moe.router import TopKRouter
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_probe.mcore.router import ProbeRouter


def _pgs():
    pgs = ProcessGroupCollection()
    for name in ("tp", "cp", "tp_cp", "tp_dp_cp"):
        setattr(pgs, name, None)
    return pgs


def _cfg(**kw):
    base = dict(num_layers=1, hidden_size=16, num_attention_heads=2, num_moe_experts=8, moe_router_topk=2,
                use_cpu_initialization=True, add_bias_linear=False, moe_aux_loss_coeff=0.0,
                moe_router_dtype="fp32")
    base.update(kw)
    return TransformerConfig(**base)


def reference(logits, k, score, pre_softmax, bias, scaling):
    """Independent restatement of top-k routing (Megatron-Core 0.16 semantics)."""
    T, E = logits.shape
    if score == "softmax":
        if pre_softmax:
            vals, idx = torch.softmax(logits, -1).topk(k, -1)
            probs = vals
        else:
            vals, idx = logits.topk(k, -1)
            probs = torch.softmax(vals, -1)
    else:
        s = torch.sigmoid(logits)
        sel = s + bias if bias is not None else s
        idx = sel.topk(k, -1).indices
        probs = s.gather(1, idx)
        if k > 1:
            probs = probs / (probs.sum(-1, keepdim=True) + 1e-20)
    if scaling:
        probs = probs * scaling
    full = torch.zeros(T, E).scatter(1, idx, probs)
    rmap = torch.zeros(T, E, dtype=torch.bool).scatter(1, idx, True)
    return full, rmap


@pytest.mark.parametrize("score, pre, use_bias, k, scaling", [
    ("softmax", False, False, 2, None),
    ("softmax", True, False, 2, None),
    ("softmax", True, False, 1, None),
    ("softmax", False, False, 4, 2.5),
    ("sigmoid", False, False, 2, None),
    ("sigmoid", False, True, 2, None),
    ("sigmoid", False, True, 1, None),
])
def test_routing_matches_reference(score, pre, use_bias, k, scaling):
    torch.manual_seed(0)
    cfg = _cfg(moe_router_score_function=score, moe_router_pre_softmax=pre, moe_router_topk=k,
               moe_router_enable_expert_bias=use_bias, moe_router_topk_scaling_factor=scaling)
    r = ProbeRouter(cfg, _pgs()).eval()
    bias = None
    if use_bias:
        bias = torch.randn(8) * 0.5
        r.expert_bias.copy_(bias)
    x = torch.randn(5, 3, 16)
    with torch.no_grad():
        probs, rmap = r(x)
    logits = F.linear(x.view(-1, 16).float(), r.weight.float())
    ref_p, ref_m = reference(logits, k, score, pre, bias, scaling)
    assert torch.equal(rmap, ref_m)
    torch.testing.assert_close(probs, ref_p, rtol=1e-6, atol=1e-7)
    assert rmap.sum(1).eq(k).all()


def test_same_state_dict_as_topk_router():
    cfg = _cfg()
    a, b = TopKRouter(cfg, _pgs()), ProbeRouter(cfg, _pgs())
    assert {k: v.shape for k, v in a.state_dict().items()} == {k: v.shape for k, v in b.state_dict().items()}
    b.load_state_dict(a.state_dict())
    # TopKRouter's own routing on our logits gives our output: only the gating differs
    x = torch.randn(7, 1, 16)
    with torch.no_grad():
        p1, m1 = b(x)
        p2, m2 = a.routing(F.linear(x.float(), a.weight.float()))
    assert torch.equal(m1, m2) and torch.equal(p1, p2)


def test_expert_bias_buffers_on_cpu_and_saved():
    cfg = _cfg(moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True)
    r = ProbeRouter(cfg, _pgs())
    sd = r.state_dict()
    assert set(sd) == {"weight", "expert_bias"}  # local_tokens_per_expert is not persistent
    assert sd["expert_bias"].device.type == "cpu" and sd["expert_bias"].dtype == torch.float32
    # expert-bias bookkeeping counts tokens in training mode, as TopKRouter does
    r.train()
    x = torch.randn(6, 1, 16)
    r(x)
    assert float(r.local_tokens_per_expert.sum()) == 6 * 2


def test_router_bf16_input_fp32_router_dtype():
    cfg = _cfg(params_dtype=torch.bfloat16, bf16=True)
    r = ProbeRouter(cfg, _pgs())
    x = torch.randn(4, 1, 16, dtype=torch.bfloat16)
    logits = r.gating(x)
    assert logits.dtype == torch.float32
