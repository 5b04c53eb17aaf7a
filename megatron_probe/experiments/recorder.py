"""Routing recorder: what every MoE layer of a Megatron GPTModel saw and chose.

Forward hooks on each MoE layer (its input: the MoE-input hidden states) and on its router (the
probabilities and routing map it returned), and optionally on the transformer layer holding the
first MoE block (its pre-attention input, what the same-layer predictor of MoE layer 0 sees).
Works with the stock and the PROBE layer, at any EP size (each rank records its own tokens).
"""

from __future__ import annotations

from typing import List, Optional

import torch

from megatron_probe.runtime.model_walk import layer_holding, moe_layers


def topk_from_routing(probs: torch.Tensor, routing_map: torch.Tensor, k: int):
    """``[N, K]`` expert ids (highest probability first) and their probabilities."""
    masked = probs.float().masked_fill(~routing_map, float("-inf"))
    vals, ids = masked.topk(k, dim=-1)
    return ids, vals


class RoutingRecorder:
    def __init__(self, model, record_hidden: bool = True, record_layer_input: bool = False):
        self.layers = moe_layers(model)
        if not self.layers:
            raise ValueError("model has no MoE layer to record")
        self.topk = self.layers[0].config.moe_router_topk
        self.record_hidden = record_hidden
        self._handles = []
        self._hidden: List[Optional[torch.Tensor]] = [None] * len(self.layers)
        self._routing: List[Optional[tuple]] = [None] * len(self.layers)
        for i, layer in enumerate(self.layers):
            self._handles.append(layer.register_forward_pre_hook(self._pre_hook(i), with_kwargs=True))
            self._handles.append(layer.router.register_forward_hook(self._router_hook(i)))
        self._layer_input: Optional[torch.Tensor] = None
        if record_layer_input:
            holder = layer_holding(model, self.layers[0])
            self._handles.append(holder.register_forward_pre_hook(self._input_hook, with_kwargs=True))

    def _input_hook(self, module, args, kwargs):
        h = args[0] if args else kwargs["hidden_states"]
        self._layer_input = h.detach().reshape(-1, h.shape[-1]).clone()

    def pop_layer_input(self) -> Optional[torch.Tensor]:
        """``[N, H]`` pre-attention input of the transformer layer holding MoE layer 0 (last forward)."""
        h, self._layer_input = self._layer_input, None
        return h

    def _pre_hook(self, i):
        def hook(module, args, kwargs):
            h = args[0] if args else kwargs["hidden_states"]
            if self.record_hidden:
                self._hidden[i] = h.detach().reshape(-1, h.shape[-1]).clone()
        return hook

    def _router_hook(self, i):
        def hook(module, inputs, output):
            probs, rmap = output
            self._routing[i] = topk_from_routing(probs.detach(), rmap.detach(), self.topk)
        return hook

    def pop(self):
        """Per layer ``(hidden [N, H] | None, topk_ids [N, K], topk_probs [N, K])`` of the last
        forward; tokens in Megatron's ``[s, b]`` order flattened."""
        out = []
        for i in range(len(self.layers)):
            if self._routing[i] is None:
                raise RuntimeError(f"MoE layer {i} did not run in the last forward")
            ids, pr = self._routing[i]
            out.append((self._hidden[i], ids, pr))
        self._hidden = [None] * len(self.layers)
        self._routing = [None] * len(self.layers)
        return out

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


@torch.no_grad()
def record_sequences(model, sequences: List[List[int]], record_hidden: bool = True,
                     record_layer_input: bool = False):
    """Run each token sequence once (causal: each position routes exactly as it would when the
    sequence is served token by token) and return per sequence, per layer, (hidden, ids, probs)
    in position order. With ``record_layer_input`` returns ``(that, inputs)`` where ``inputs`` has
    per sequence the pre-attention input of the layer holding MoE layer 0."""
    from megatron_probe.experiments.tiny_moe import forward_logits

    out, inputs = [], []
    with RoutingRecorder(model, record_hidden, record_layer_input) as rec:
        for seq in sequences:
            forward_logits(model, torch.tensor([seq]))
            out.append(rec.pop())  # [s, b=1] order == position order
            inputs.append(rec.pop_layer_input())
    return (out, inputs) if record_layer_input else out


def build_trace(model, cfg, workload, ep, hidden_fraction, prefill_chunk, max_active, seed, max_steps=None,
                model_name="tiny-moe", layer_input=True):
    """Replay ``workload`` through ``model`` (one causal pass per request) and cut the routing
    into the engine steps of its continuous-batching schedule: a :class:`RoutingTrace` with the
    MoE-input hidden states of a ``hidden_fraction`` sample of tokens (and, with
    ``layer_input``, their pre-attention input of the layer holding MoE layer 0 as layer -1)."""
    from megatron_probe.data.traces import RoutingTrace, TraceStep
    from megatron_probe.data.workloads import schedule_steps

    reqs = {r.id: r for r in workload.requests}
    seqs = {rid: (r.prompt_ids + r.output_ids)[: r.prompt_tokens + r.output_tokens - 1] for rid, r in reqs.items()}
    schedule = schedule_steps(workload, prefill_chunk=prefill_chunk, max_active=max_active, max_steps=max_steps)
    used = sorted({rid for st in schedule for rid, _, _ in st.chunks})
    want_hidden = hidden_fraction > 0
    records = record_sequences(model, [seqs[r] for r in used], record_hidden=want_hidden,
                               record_layer_input=want_hidden and layer_input)
    records, inputs = records if want_hidden and layer_input else (records, [None] * len(used))
    per_req = dict(zip(used, records))
    per_req_input = dict(zip(used, inputs))
    gen = torch.Generator().manual_seed(seed)
    L = cfg.num_layers
    steps = []
    for st in schedule:
        ids, prs, rid_l, pos_l, phase_l = [], [], [], [], []
        for rid, s, e in st.chunks:
            rec = per_req[rid]
            ids.append(torch.stack([rec[l][1][s:e] for l in range(L)]))
            prs.append(torch.stack([rec[l][2][s:e] for l in range(L)]))
            rid_l += [rid] * (e - s)
            pos_l += list(range(s, e))
            phase_l += [0 if p < reqs[rid].prompt_tokens else 1 for p in range(s, e)]
        T = len(rid_l)
        hidden = None
        if hidden_fraction > 0 and T:
            keep = (torch.rand(T, generator=gen) < hidden_fraction).nonzero().flatten()
            hidden = {}
            for l in range(L):
                rows = torch.cat([per_req[rid][l][0][s:e] for rid, s, e in st.chunks])
                hidden[l] = (keep, rows[keep].to(torch.bfloat16))
            if layer_input:  # -1: pre-attention input of the layer holding MoE layer 0
                rows = torch.cat([per_req_input[rid][s:e] for rid, s, e in st.chunks])
                hidden[-1] = (keep, rows[keep].to(torch.bfloat16))
        rid_t = torch.tensor(rid_l, dtype=torch.long)
        steps.append(TraceStep(
            topk_ids=torch.cat(ids, 1) if ids else torch.zeros(L, 0, cfg.topk, dtype=torch.long),
            topk_probs=torch.cat(prs, 1) if prs else torch.zeros(L, 0, cfg.topk),
            request_id=rid_t, position=torch.tensor(pos_l, dtype=torch.long),
            phase=torch.tensor(phase_l, dtype=torch.long), source_rank=rid_t % ep, hidden=hidden))
    return RoutingTrace(model=model_name, num_layers=L, num_experts=cfg.num_experts, topk=cfg.topk,
                        source=f"recorded:{workload.scenario}", steps=steps,
                        notes=f"recorded by tools/record_traces.py; ep={ep} (source_rank = request id % ep); "
                              f"hidden states for ~{hidden_fraction:.0%} of tokens",
                        extra={"ep": ep, "prefill_chunk": prefill_chunk, "max_active": max_active,
                               "scenario": workload.scenario, "hidden_fraction": hidden_fraction})
