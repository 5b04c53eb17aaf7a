"""Routing recorder: what every MoE layer of a Megatron GPTModel saw and chose.

Forward hooks on each MoE layer (its input: the MoE-input hidden states) and on its router (the
probabilities and routing map it returned). Works with the stock and the PROBE layer, at any
EP size (each rank records its own tokens).
"""

from __future__ import annotations

from typing import List, Optional

import torch

from megatron.core.transformer.moe.moe_layer import MoELayer


def moe_layers(model) -> List[MoELayer]:
    return [m for m in model.modules() if isinstance(m, MoELayer)]


def topk_from_routing(probs: torch.Tensor, routing_map: torch.Tensor, k: int):
    """``[N, K]`` expert ids (highest probability first) and their probabilities."""
    masked = probs.float().masked_fill(~routing_map, float("-inf"))
    vals, ids = masked.topk(k, dim=-1)
    return ids, vals


class RoutingRecorder:
    def __init__(self, model, record_hidden: bool = True):
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
def record_sequences(model, sequences: List[List[int]], record_hidden: bool = True):
    """Run each token sequence once (causal: each position routes exactly as it would when the
    sequence is served token by token) and return per sequence, per layer, (hidden, ids, probs)
    in position order."""
    from megatron_probe.integration.tiny_moe import forward_logits

    out = []
    with RoutingRecorder(model, record_hidden) as rec:
        for seq in sequences:
            forward_logits(model, torch.tensor([seq]))
            out.append(rec.pop())  # [s, b=1] order == position order
    return out
