"""Model presets for the simulator: public shapes, cited.

Only what the cost model needs: MoE layer count, experts, top-k, hidden and expert hidden sizes,
the KV width per token (attention reads it) and the byte widths. Sources are the models' public
``config.json`` files on their model cards (as of 2026):

* GPT-OSS-120B (openai/gpt-oss-120b): 36 layers, all MoE; 128 experts, 4 per token; hidden
  2880, expert intermediate 2880; 64 query heads, 8 KV heads of width 64 (KV width 512).
  Released with MXFP4 expert weights; the PROBE paper runs it in BF16, as here.
* Qwen3-235B-A22B (Qwen/Qwen3-235B-A22B): 94 layers, all MoE; 128 experts, 8 per token;
  hidden 4096, ``moe_intermediate_size`` 1536; 64 query heads, 4 KV heads of width 128 (512).
* DeepSeek-V3 (deepseek-ai/DeepSeek-V3): 61 layers, the first 3 dense, so 58 MoE layers; 256
  routed experts, 8 per token (plus one shared expert, not modelled: it is the same on every
  rank); hidden 7168, ``moe_intermediate_size`` 2048; MLA caches 512 + 64 = 576 values per
  token. Expert weights FP8 (1 byte per parameter, 44 MB per expert); compute is still timed
  at the profile's BF16 peak (conservative).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict

from megatron_probe.policy.cost_model import ModelShape


@dataclass(frozen=True)
class ModelPreset:
    name: str
    moe_layers: int
    shape: ModelShape
    source: str


MODELS: Dict[str, ModelPreset] = {
    "gpt-oss-120b": ModelPreset(
        "gpt-oss-120b", 36,
        ModelShape(hidden=2880, expert_hidden=2880, num_experts=128, topk=4, kv_dim=8 * 64),
        "openai/gpt-oss-120b config.json (36 layers, 128 experts, top-4, hidden 2880, expert hidden 2880, "
        "8 KV heads x 64); BF16 as in the PROBE paper"),
    "qwen3-235b-a22b": ModelPreset(
        "qwen3-235b-a22b", 94,
        ModelShape(hidden=4096, expert_hidden=1536, num_experts=128, topk=8, kv_dim=4 * 128),
        "Qwen/Qwen3-235B-A22B config.json (94 layers, 128 experts, top-8, hidden 4096, moe_intermediate 1536, "
        "4 KV heads x 128); BF16"),
    "deepseek-v3": ModelPreset(
        "deepseek-v3", 58,
        ModelShape(hidden=7168, expert_hidden=2048, num_experts=256, topk=8, bytes_per_param=1.0, kv_dim=576),
        "deepseek-ai/DeepSeek-V3 config.json (61 layers, first 3 dense: 58 MoE; 256 routed experts, top-8, "
        "hidden 7168, moe_intermediate 2048, MLA cache 512+64); FP8 expert weights, shared expert not modelled"),
}


def get_model(name: str) -> ModelPreset:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; presets: {sorted(MODELS)}")
    return MODELS[name]
