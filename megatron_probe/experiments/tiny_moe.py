"""The project's small trained MoE: shape, Megatron-Core model construction, checkpoint I/O.

A checkpoint folder holds ``config.json`` (:class:`TinyMoEConfig`), ``tokenizer.json`` (a
``tokenizers`` byte-level BPE), ``model.pt`` (the GPTModel state dict at EP = 1, bf16) and the
training record. :func:`load_model` rebuilds the model with the stock Megatron MoE spec or the
PROBE spec, at any EP size (each rank takes its contiguous block of experts).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

CHECKPOINT_FORMAT = "megatron_probe.tiny_moe.v1"
DEFAULT_CHECKPOINT = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                                  "checkpoints", "tiny-moe-v1")


@dataclass
class TinyMoEConfig:
    num_layers: int = 6
    hidden_size: int = 256
    num_attention_heads: int = 4
    num_experts: int = 32
    topk: int = 4
    expert_ffn_hidden: int = 64
    seq_length: int = 256
    vocab_size: int = 4096
    score_function: str = "softmax"
    format: str = CHECKPOINT_FORMAT

    @classmethod
    def from_json(cls, path: str) -> "TinyMoEConfig":
        with open(path) as f:
            data = json.load(f)
        if data.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{path}: format {data.get('format')!r} is not {CHECKPOINT_FORMAT!r}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"{path}: unknown config fields {sorted(unknown)}")
        return cls(**data)

    def to_json(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump(dataclasses.asdict(self), f, indent=2)


def transformer_config(cfg: TinyMoEConfig, ep: int = 1, dtype=torch.float32, dispatcher: str = "alltoall"):
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(
        num_layers=cfg.num_layers, hidden_size=cfg.hidden_size, num_attention_heads=cfg.num_attention_heads,
        ffn_hidden_size=cfg.expert_ffn_hidden, moe_ffn_hidden_size=cfg.expert_ffn_hidden,
        num_moe_experts=cfg.num_experts, moe_router_topk=cfg.topk,
        moe_router_score_function=cfg.score_function, moe_router_pre_softmax=cfg.topk == 1,
        moe_router_dtype="fp32", moe_aux_loss_coeff=0.0, moe_token_dispatcher_type=dispatcher,
        expert_model_parallel_size=ep, gated_linear_unit=True, activation_func=F.silu,
        bias_activation_fusion=False, add_bias_linear=False, normalization="RMSNorm",
        params_dtype=dtype, bf16=dtype == torch.bfloat16, use_cpu_initialization=True,
        hidden_dropout=0.0, attention_dropout=0.0, init_method_std=0.02,
    )


def layer_spec(cfg: TinyMoEConfig, spec: str = "probe", probe_config=None):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from megatron_probe.mcore.router import ProbeRouter
    from megatron_probe.mcore.spec import probe_layer_spec

    stock = get_gpt_layer_local_spec(num_experts=cfg.num_experts, moe_grouped_gemm=False, normalization="RMSNorm")
    # TopKRouter's gating needs CUDA + Transformer Engine in Megatron-Core 0.16; ProbeRouter
    # inherits its routing and runs anywhere.
    stock.submodules.mlp.submodules.router = ProbeRouter
    if spec == "stock":
        return stock
    if spec == "probe":
        return probe_layer_spec(stock, probe_config)
    raise ValueError(f"spec={spec!r}; valid: 'probe', 'stock'")


def build_model(cfg: TinyMoEConfig, spec: str = "probe", probe_config=None, ep: int = 1, dtype=torch.float32):
    """GPTModel (learned absolute positions, tied embeddings). The Megatron parallel state must
    be initialised with this EP size. ``spec='stock'`` uses the stock MoELayer with the
    ``allgather`` dispatcher, the one whose stock constructor and forward run on CPU (EP = 1 only)."""
    from megatron.core.models.gpt import GPTModel

    if spec == "stock" and ep != 1 and not torch.cuda.is_available():
        raise ValueError("the stock Megatron MoE dispatchers need CUDA for EP > 1; use spec='probe' on CPU")
    dispatcher = "alltoall" if (spec == "probe" or torch.cuda.is_available()) else "allgather"
    tc = transformer_config(cfg, ep=ep, dtype=dtype, dispatcher=dispatcher)
    return GPTModel(config=tc, transformer_layer_spec=layer_spec(cfg, spec, probe_config),
                    vocab_size=cfg.vocab_size, max_sequence_length=cfg.seq_length,
                    position_embedding_type="learned_absolute", share_embeddings_and_output_weights=True)


_EXPERT_KEY = re.compile(r"^(decoder\.layers\.\d+\.mlp\.experts\.local_experts\.)(\d+)(\..*)$")


def shard_state_dict(full: dict, ep: int, rank: int, num_experts: int) -> dict:
    """EP = 1 state dict -> the state dict of EP rank ``rank`` (its contiguous expert block)."""
    L = num_experts // ep
    out = {}
    for k, v in full.items():
        m = _EXPERT_KEY.match(k)
        if m:
            e = int(m.group(2))
            if e // L == rank:
                out[f"{m.group(1)}{e - rank * L}{m.group(3)}"] = v
        else:
            out[k] = v
    return out


def load_model(path: str = DEFAULT_CHECKPOINT, spec: str = "probe", probe_config=None, ep: int = 1,
               rank: int = 0, dtype=torch.float32):
    """(model, tokenizer, config) from a checkpoint folder, in eval mode."""
    from tokenizers import Tokenizer

    for name in ("config.json", "tokenizer.json", "model.pt"):
        if not os.path.exists(os.path.join(path, name)):
            raise FileNotFoundError(f"checkpoint folder {path!r} has no {name}")
    cfg = TinyMoEConfig.from_json(os.path.join(path, "config.json"))
    if cfg.num_experts % ep:
        raise ValueError(f"checkpoint has {cfg.num_experts} experts, not divisible by EP {ep}")
    model = build_model(cfg, spec, probe_config, ep, dtype)
    full = torch.load(os.path.join(path, "model.pt"), map_location="cpu", weights_only=True)
    sd = shard_state_dict(full, ep, rank, cfg.num_experts)
    own = model.state_dict()
    sd = {k: (v.to(own[k].dtype) if isinstance(v, torch.Tensor) and k in own else v) for k, v in sd.items()}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise ValueError(f"checkpoint {path!r} does not match the model: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    model.eval()
    return model, Tokenizer.from_file(os.path.join(path, "tokenizer.json")), cfg


def causal_mask(s: int) -> torch.Tensor:
    return torch.triu(torch.ones(s, s, dtype=torch.bool), 1).view(1, 1, s, s)


def forward_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    """Full-sequence logits ``[b, s, vocab]``."""
    b, s = tokens.shape
    pos = torch.arange(s).unsqueeze(0).expand(b, -1)
    return model(tokens, pos, causal_mask(s))


@torch.no_grad()
def greedy_generate(model, prompt_ids, max_new_tokens: int, max_len: int, eos_id: Optional[int] = None):
    """Plain greedy decoding by full recompute (the reference every engine must equal)."""
    ids = list(prompt_ids)
    for _ in range(max_new_tokens):
        window = ids[-max_len:]
        logits = forward_logits(model, torch.tensor([window]))
        nxt = int(logits[0, -1].argmax())
        ids.append(nxt)
        if eos_id is not None and nxt == eos_id:
            break
    return ids[len(prompt_ids):]
