#!/usr/bin/env python3
"""Megatron-Core's own inference engine serving the PROBE spec object (EP 1, one GPU).

Two GPT models with the same random weights: one from Megatron's local GPT MoE layer spec, one
from the spec object Megatron's scripts take with ``--spec megatron_probe.mcore.spec
probe_gpt_layer_local_spec`` (found the way Megatron's ``import_module`` finds it; the stock
model's state dict loaded into it). Each is served by Megatron-Core's ``StaticInferenceEngine``
(its legacy static-batch path: ``GPTInferenceWrapper``, ``TextGenerationController``, greedy
``SamplingParams(top_k=1)``) on the same prompts; the check is that the PROBE model generates
the same tokens as the stock model (and their log-probabilities within fp32 rounding), and as
greedy decoding by full recompute of the PROBE model.

Megatron-Core 0.16.1's engine and controller are CUDA-only (they place every tensor on
``torch.cuda.current_device()`` and time with CUDA events). ``--device cpu`` is a dry run for CI:
the same code with those few CUDA calls redirected to the CPU (``_cpu_shims``: the current device,
``Tensor.cuda``, events and synchronisation); it proves the wiring, not the GPU run. The stock
model's router is ``ProbeRouter`` on CPU (``TopKRouter``'s gating needs CUDA in 0.16) and
``TopKRouter`` on a GPU.

  python tools/megatron_engine_check.py --out results/gpu_check          (GPU; tools/gpu_check.sh runs it)
  python tools/megatron_engine_check.py --device cpu --out /tmp/engine  (dry run)

Writes ``engine_ep1.json``: per model the generated tokens and engine time, and ``passed``.
"""

import argparse
import contextlib
import json
import os
import sys
import time
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
warnings.filterwarnings("ignore")

import torch


LOG_PROB_TOLERANCE = 1e-4  # fp32: the two layers sum the same products in different orders


def _megatron_import(module: str, name: str):
    """What ``megatron.training``'s ``import_module`` does with ``--spec module name``."""
    return vars(__import__(module, globals(), locals(), [name], 0))[name]


class IdTokenizer:
    """Prompts written as token ids ("3 17 5"): the controller's tokenizer interface, no vocabulary."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size
        self.eod = vocab_size - 1
        self.bos = None

    def tokenize(self, text: str):
        return [int(t) for t in text.split()]

    def detokenize(self, ids, **_):
        return " ".join(str(int(i)) for i in ids)

    def offsets(self, ids, text):
        out, at = [], 0
        for i in ids:
            out.append(at)
            at += len(str(int(i))) + 1
        return out


class _HostEvent:
    """``torch.cuda.Event`` on the host clock (dry run only)."""

    def __init__(self, *_, **__):
        self.t = None

    def record(self, *_):
        self.t = time.perf_counter()

    def synchronize(self):
        pass

    def query(self):
        return True

    def elapsed_time(self, end):
        return (end.t - self.t) * 1e3


@contextlib.contextmanager
def _cpu_shims():
    """The dry run: Megatron's engine code with its CUDA placements sent to the CPU."""
    from megatron.core.fusions import fused_softmax

    saved = (torch.cuda.current_device, torch.Tensor.cuda, torch.cuda.Event, torch.cuda.synchronize,
             fused_softmax.get_default_causal_mask)
    torch.cuda.current_device = lambda: "cpu"
    torch.Tensor.cuda = lambda self, *a, **k: self
    torch.cuda.Event = _HostEvent
    torch.cuda.synchronize = lambda *a, **k: None
    # the attention's default causal mask (no mask passed at prefill) is made on "cuda"
    fused_softmax.get_default_causal_mask = lambda sq: torch.triu(torch.ones(sq, sq), diagonal=1).bool()
    try:
        yield
    finally:
        (torch.cuda.current_device, torch.Tensor.cuda, torch.cuda.Event, torch.cuda.synchronize,
         fused_softmax.get_default_causal_mask) = saved


def _models(device, cfg_kw, seed):
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from megatron_probe.experiments.tiny_moe import TinyMoEConfig, transformer_config
    from megatron_probe.mcore.router import ProbeRouter

    cfg = TinyMoEConfig(**cfg_kw)
    stock_spec = get_gpt_layer_local_spec(num_experts=cfg.num_experts, moe_grouped_gemm=False)
    if device.type != "cuda":
        stock_spec.submodules.mlp.submodules.router = ProbeRouter  # TopKRouter's gating needs CUDA in 0.16
    kw = dict(vocab_size=cfg.vocab_size, max_sequence_length=cfg.seq_length, position_embedding_type="learned_absolute")
    torch.manual_seed(seed)
    # the stock layer: Megatron's alltoall dispatcher on a GPU, allgather where alltoall cannot run (CPU)
    stock = GPTModel(config=transformer_config(cfg, dispatcher="alltoall" if device.type == "cuda" else "allgather"),
                     transformer_layer_spec=stock_spec, **kw)
    probe = GPTModel(config=transformer_config(cfg), transformer_layer_spec=_megatron_import(
        "megatron_probe.mcore.spec", "probe_gpt_layer_local_spec"), **kw)
    probe.load_state_dict(stock.state_dict(), strict=True)  # the stock names: a stock model loads as it is
    return cfg, stock.to(device).eval(), probe.to(device).eval()


def _serve(model, cfg, prompts, new_tokens, legacy=True):
    """Greedy generations of ``prompts`` (lists of ids) by Megatron's static inference engine:
    ``(tokens, log-probabilities, seconds, engine used)``; ``legacy=False`` asks for its dynamic
    engine underneath (CUDA graphs, paged KV cache), which falls back to the legacy path, with a
    warning, when it cannot start."""
    from megatron.core.inference.contexts import StaticInferenceContext
    from megatron.core.inference.engines import StaticInferenceEngine
    from megatron.core.inference.model_inference_wrappers.gpt.gpt_inference_wrapper import GPTInferenceWrapper
    from megatron.core.inference.model_inference_wrappers.inference_wrapper_config import InferenceWrapperConfig
    from megatron.core.inference.sampling_params import SamplingParams
    from megatron.core.inference.text_generation_controllers.text_generation_controller import (
        TextGenerationController,
    )

    wcfg = InferenceWrapperConfig(hidden_size=cfg.hidden_size, params_dtype=torch.float32,
                                  inference_batch_times_seqlen_threshold=-1, padded_vocab_size=cfg.vocab_size,
                                  inference_max_requests=len(prompts), inference_max_seq_length=cfg.seq_length)
    context = StaticInferenceContext.from_config(wcfg)
    wrapper = GPTInferenceWrapper(model, wcfg, context)
    controller = TextGenerationController(inference_wrapped_model=wrapper, tokenizer=IdTokenizer(cfg.vocab_size))
    engine = StaticInferenceEngine(controller, max_batch_size=len(prompts), legacy=legacy)
    params = SamplingParams(top_k=1, num_tokens_to_generate=new_tokens, termination_id=-1, return_log_probs=True)
    t0 = time.perf_counter()
    done = engine.generate(prompts=[" ".join(map(str, p)) for p in prompts], sampling_params=params)
    seconds = time.perf_counter() - t0
    tokens = [[int(t) for t in r.generated_tokens] for r in done]
    log_probs = [[float(v) for v in r.generated_log_probs] for r in done]
    return tokens, log_probs, seconds, "legacy static" if engine.legacy else "dynamic"


def _recompute(model, prompt, new_tokens, device):
    """Greedy by full recompute, the plain model's own answer."""
    from megatron_probe.experiments.tiny_moe import causal_mask

    ids = list(prompt)
    with torch.no_grad():
        for _ in range(new_tokens):
            t = torch.tensor([ids], device=device)
            pos = torch.arange(len(ids), device=device).unsqueeze(0)
            logits = model(t, pos, causal_mask(len(ids)).to(device))
            ids.append(int(logits[0, -1].argmax()))
    return ids[len(prompt):]


def engine_worker(rank, ws, device_type, quick, out_path):
    from megatron_probe.mcore.cpu import initialize_megatron_parallel
    from megatron_probe.mcore.layer import ProbeMoELayer

    initialize_megatron_parallel(1, device=device_type)
    device = torch.device(device_type if device_type == "cpu" else f"cuda:{torch.cuda.current_device()}")
    cfg_kw = dict(num_layers=2, hidden_size=64 if quick else 256, num_attention_heads=4, num_experts=8, topk=2,
                  expert_ffn_hidden=32 if quick else 512, seq_length=64, vocab_size=128 if quick else 1024)
    cfg, stock, probe = _models(device, cfg_kw, seed=3)
    assert isinstance(probe.decoder.layers[0].mlp, ProbeMoELayer), type(probe.decoder.layers[0].mlp)
    gen = torch.Generator().manual_seed(5)
    lengths = [5, 9, 9, 14] if quick else [8, 17, 17, 30]
    prompts = [torch.randint(0, cfg.vocab_size - 1, (n,), generator=gen).tolist() for n in lengths]
    new_tokens = 6 if quick else 16
    # the reference first, on the model as built (before any engine has held it)
    recomputed = [_recompute(probe, p, new_tokens, device) for p in prompts]
    shims = _cpu_shims() if device.type == "cpu" else contextlib.nullcontext()
    with shims, torch.inference_mode():
        stock_out, stock_lp, stock_s, _ = _serve(stock, cfg, prompts, new_tokens)
        probe_out, probe_lp, probe_s, _ = _serve(probe, cfg, prompts, new_tokens)
        dynamic = None
        if device.type == "cuda":  # also through the dynamic engine, when it starts (reported, not required)
            try:
                dyn_out, _, dyn_s, used = _serve(probe, cfg, prompts, new_tokens, legacy=False)
                dynamic = {"engine_used": used, "seconds": round(dyn_s, 4), "tokens_equal_stock": dyn_out == stock_out}
            except Exception as e:  # noqa: BLE001  (what stopped it is the finding)
                dynamic = {"error": f"{type(e).__name__}: {e}"[:500]}
    # the log-probabilities of the generated tokens: a difference argmax would not show
    lp_diff = max(abs(a - b) for x, y in zip(stock_lp, probe_lp) for a, b in zip(x, y))
    out = {"device": str(device), "dry_run_with_cpu_shims": device.type == "cpu",
           "spec": "megatron_probe.mcore.spec probe_gpt_layer_local_spec", "engine": "StaticInferenceEngine(legacy=True)",
           "model": cfg_kw, "prompt_lengths": lengths, "new_tokens": new_tokens,
           "stock_tokens": stock_out, "probe_tokens": probe_out, "recompute_tokens": recomputed,
           "stock_engine_s": round(stock_s, 4), "probe_engine_s": round(probe_s, 4),
           "probe_equals_stock": probe_out == stock_out, "probe_equals_recompute": probe_out == recomputed,
           "max_log_prob_diff_vs_stock": lp_diff, "log_prob_tolerance": LOG_PROB_TOLERANCE,
           "dynamic_engine": dynamic}
    out["passed"] = (out["probe_equals_stock"] and out["probe_equals_recompute"]
                     and lp_diff <= LOG_PROB_TOLERANCE)
    with open(out_path, "w") as f:
        json.dump(out, f, indent=1)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.path.join(ROOT, "results", "gpu_check"))
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="a smaller model (the dry run's)")
    a = p.parse_args()
    from megatron_probe.mcore.launch import run_distributed

    os.makedirs(a.out, exist_ok=True)
    path = os.path.join(a.out, "engine_ep1.json")
    run_distributed(engine_worker, 1, a.device, a.quick, path, backend="nccl" if a.device == "cuda" else "gloo")
    with open(path) as f:
        out = json.load(f)
    print(json.dumps({k: v for k, v in out.items() if not k.endswith("_tokens")}, indent=1))
    return 0 if out["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
