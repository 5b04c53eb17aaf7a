"""The spec objects Megatron's own scripts take with ``--spec megatron_probe.mcore.spec <name>``:
found the way Megatron's ``import_module`` finds them, PROBE layers in them, and a GPT model
built from one computes what the stock local spec computes (EP 1, CPU)."""

import torch

from distributed import run_ranks


def _megatron_import(module: str, name: str):
    # what megatron.training's import_module does with args.spec = [module, name]
    return vars(__import__(module, globals(), locals(), [name], 0))[name]


def build_both(rank, ws):
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.spec_utils import ModuleSpec

    from megatron_probe.experiments.tiny_moe import TinyMoEConfig, causal_mask, transformer_config
    from megatron_probe.mcore.cpu import initialize_megatron_parallel
    from megatron_probe.mcore.layer import ProbeMoELayer
    from megatron_probe.mcore.router import ProbeRouter

    initialize_megatron_parallel(1)
    for name in ("probe_gpt_layer_spec", "probe_gpt_layer_local_spec"):
        spec = _megatron_import("megatron_probe.mcore.spec", name)
        assert isinstance(spec, ModuleSpec), type(spec)
        assert spec.submodules.mlp.module is ProbeMoELayer, spec.submodules.mlp
        assert spec.submodules.mlp.submodules.router is ProbeRouter
    cfg = TinyMoEConfig(num_layers=2, hidden_size=32, num_attention_heads=4, num_experts=8, topk=2,
                        expert_ffn_hidden=16, seq_length=32, vocab_size=64)
    stock_spec = get_gpt_layer_local_spec(num_experts=cfg.num_experts, moe_grouped_gemm=False)
    stock_spec.submodules.mlp.submodules.router = ProbeRouter  # TopKRouter's gating needs CUDA in 0.16
    kw = dict(vocab_size=cfg.vocab_size, max_sequence_length=cfg.seq_length, position_embedding_type="learned_absolute")
    torch.manual_seed(0)
    # the stock layer with the allgather dispatcher: the one whose forward runs on CPU
    stock = GPTModel(config=transformer_config(cfg, dispatcher="allgather"), transformer_layer_spec=stock_spec,
                     **kw).eval()
    probe = GPTModel(config=transformer_config(cfg), transformer_layer_spec=_megatron_import(
        "megatron_probe.mcore.spec", "probe_gpt_layer_local_spec"), **kw).eval()
    # the stock names: the stock model's state dict loads as it is
    probe.load_state_dict(stock.state_dict(), strict=True)
    assert isinstance(probe.decoder.layers[0].mlp, ProbeMoELayer)
    tokens = torch.randint(0, cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    pos = torch.arange(12).unsqueeze(0).expand(2, -1)
    with torch.no_grad():
        a = stock(tokens, pos, causal_mask(12))
        b = probe(tokens, pos, causal_mask(12))
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), float((a - b).abs().max())


def test_spec_objects_for_megatron_scripts():
    run_ranks(build_both, 1)


def test_megatron_inference_engine_serves_the_probe_spec_dry_run(tmp_path):
    """``tools/megatron_engine_check.py`` on CPU (its dry run: Megatron's CUDA placements sent to
    the CPU): Megatron-Core's static inference engine serves a GPT model built from the spec
    object, and its greedy tokens and their log-probabilities equal the stock model's under the
    same engine, and the tokens equal greedy decoding by full recompute."""
    import json
    import os
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))
    from megatron_engine_check import engine_worker

    path = str(tmp_path / "engine_ep1.json")
    run_ranks(engine_worker, 1, "cpu", True, path)
    out = json.load(open(path))
    assert out["passed"], out
    assert out["dry_run_with_cpu_shims"] and out["max_log_prob_diff_vs_stock"] <= out["log_prob_tolerance"], out
    assert len(out["probe_tokens"]) == 4 and all(len(t) == out["new_tokens"] for t in out["probe_tokens"]), out
