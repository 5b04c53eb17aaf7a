"""Replaying a workload through the model with everything a routing forecast needs.

One causal pass per request records, per MoE layer, every token's MoE-input hidden state and the
true router logits, plus the pre-attention input of the layer holding MoE layer 0. The
continuous-batching schedule then says which tokens share each engine step. Used to evaluate and
to warm-start the lookahead predictors (teacher-forced on the workload's reference text, which
routes exactly as greedy serving of the same tokens would).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F

from megatron_probe.experiments.recorder import record_sequences
from megatron_probe.runtime.model_walk import moe_layers


@dataclass
class RequestRouting:
    inputs: List[torch.Tensor]  # per layer L: predictor input for layer L [n, H] (L=0: pre-attention)
    logits: List[torch.Tensor]  # per layer: true router logits [n, E] (float32)


def router_logits_fn(model):
    """Per MoE layer, a function hidden [n, H] -> the router's logits [n, E] (float32)."""
    fns = []
    for layer in moe_layers(model):
        w = layer.router.weight.detach().float()
        b = None if getattr(layer.router, "bias", None) is None else layer.router.bias.detach().float()
        fns.append(lambda h, w=w, b=b: F.linear(h.float(), w, b))
    return fns


@torch.no_grad()
def replay_requests(model, sequences: Dict[int, List[int]]) -> Dict[int, RequestRouting]:
    """``{request id: RequestRouting}`` for each token sequence."""
    ids = list(sequences)
    records, layer_inputs = record_sequences(model, [sequences[r] for r in ids], record_hidden=True,
                                             record_layer_input=True)
    fns = router_logits_fn(model)
    out = {}
    for rid, rec, inp in zip(ids, records, layer_inputs):
        hidden = [h for h, _, _ in rec]
        out[rid] = RequestRouting(inputs=[inp] + hidden[:-1], logits=[fn(h) for fn, h in zip(fns, hidden)])
    return out


def workload_sequences(workload) -> Dict[int, List[int]]:
    """Token ids each request feeds the model (prompt + reference output but its last token)."""
    return {r.id: (r.prompt_ids + r.output_ids)[: r.prompt_tokens + r.output_tokens - 1] for r in workload.requests}


def distillation_data(routing: Dict[int, RequestRouting], layers: List[int],
                      max_tokens: Optional[int] = None, seed: int = 0) -> Dict[int, tuple]:
    """``{layer: (inputs [N, H], true logits [N, E])}`` over all requests (optionally subsampled)."""
    data = {}
    gen = torch.Generator().manual_seed(seed)
    for L in layers:
        x = torch.cat([r.inputs[L] for r in routing.values()]).float()
        y = torch.cat([r.logits[L] for r in routing.values()]).float()
        if max_tokens is not None and x.shape[0] > max_tokens:
            keep = torch.randperm(x.shape[0], generator=gen)[:max_tokens]
            x, y = x[keep], y[keep]
        data[L] = (x, y)
    return data


def trace_distillation_data(trace, fns, layers: List[int]) -> Dict[int, tuple]:
    """The same pairs from a recorded trace's sampled hidden states (layer -1 = pre-attention
    input of MoE layer 0's transformer layer). Raises when the trace lacks a needed layer."""
    xs: Dict[int, list] = {L: [] for L in layers}
    ys: Dict[int, list] = {L: [] for L in layers}
    for i, st in enumerate(trace.steps):
        if not st.hidden:
            continue
        for L in layers:
            src, tgt = L - 1, L
            if src not in st.hidden or tgt not in st.hidden:
                have = sorted(st.hidden)
                raise ValueError(f"trace step {i} has hidden states for layers {have}; predicting layer {L} "
                                 f"needs layers {src} and {tgt} (re-record it with tools/record_traces.py)")
            (i_src, h_src), (i_tgt, h_tgt) = st.hidden[src], st.hidden[tgt]
            if not torch.equal(i_src, i_tgt):
                raise ValueError(f"trace step {i}: layers {src} and {tgt} sampled different tokens")
            xs[L].append(h_src.float())
            ys[L].append(fns[tgt](h_tgt.float()))
    if not any(xs[L] for L in layers):
        raise ValueError(f"trace {trace.source!r} has no hidden states: record it with --hidden-fraction > 0")
    return {L: (torch.cat(xs[L]), torch.cat(ys[L])) for L in layers}
