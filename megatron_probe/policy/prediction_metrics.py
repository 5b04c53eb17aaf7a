"""How good is a routing forecast: per-token fidelity and what the planner actually needs.

Per token (methods that forecast each token's experts): top-K accuracy, the top-K/2 hit rate and
recall of the true top-K within the predicted top-2K. Per step (any method, also count-only ones
such as "last step's counts"): relative L1 error of per-expert counts and of per-rank load under
the static contiguous expert placement at a given EP, and the imbalance ratio each implies.
Aggregates are ratios of sums over steps (large steps weigh more). Pure tensors.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional

import torch

from megatron_probe.policy.placement import imbalance_ratio, static_rank_loads


def topk_overlap(pred_ids: torch.Tensor, true_ids: torch.Tensor) -> torch.Tensor:
    """``[N]`` how many of each token's true experts ``true_ids [N, K]`` appear in ``pred_ids [N, K']``."""
    return (pred_ids.unsqueeze(2) == true_ids.unsqueeze(1)).any(1).sum(-1)


@dataclass
class LayerStats:
    tokens: int = 0
    topk_hits: float = 0.0
    half_hits: float = 0.0
    recall_hits: float = 0.0
    per_token: bool = True
    count_abs_err: float = 0.0
    count_total: float = 0.0
    rank_abs_err: float = 0.0
    rank_total: float = 0.0
    ir_true_sum: float = 0.0
    ir_pred_sum: float = 0.0
    weight: float = 0.0

    def summary(self, layer: int) -> Dict:
        def r(x):
            return None if x is None else round(float(x), 5)
        pt = self.per_token and self.tokens > 0
        return {
            "layer": layer, "tokens": self.tokens,
            "topk_acc": r(self.topk_hits / self.tokens) if pt else None,
            "half_hit": r(self.half_hits / self.tokens) if pt else None,
            "recall_2k": r(self.recall_hits / self.tokens) if pt else None,
            "count_err": r(self.count_abs_err / self.count_total) if self.count_total else None,
            "rank_load_err": r(self.rank_abs_err / self.rank_total) if self.rank_total else None,
            "ir_true": r(self.ir_true_sum / self.weight) if self.weight else None,
            "ir_pred": r(self.ir_pred_sum / self.weight) if self.weight else None,
        }


@dataclass
class PredictionStats:
    """Accumulates forecast quality per layer for one method at one EP size."""

    ep: int
    topk: int
    layers: Dict[int, LayerStats] = field(default_factory=dict)

    def add_tokens(self, layer: int, true_ids: torch.Tensor, pred_topk: Optional[torch.Tensor],
                   pred_top2k: Optional[torch.Tensor]) -> None:
        """Per-token fidelity of one step (``true_ids`` ``[N, K]`` best first)."""
        st = self.layers.setdefault(layer, LayerStats())
        if pred_topk is None:
            st.per_token = False
            return
        K = self.topk
        st.tokens += true_ids.shape[0]
        st.topk_hits += float(topk_overlap(pred_topk, true_ids).sum()) / K
        half = max(1, K // 2)
        st.half_hits += float((topk_overlap(pred_topk, true_ids[:, :half]) == half).sum())
        if pred_top2k is not None:
            st.recall_hits += float(topk_overlap(pred_top2k, true_ids).sum()) / K

    def add_counts(self, layer: int, true_counts: torch.Tensor, pred_counts: torch.Tensor) -> None:
        """Balance-relevant error of one step's global per-expert counts ``[E]``."""
        st = self.layers.setdefault(layer, LayerStats())
        t, p = true_counts.double(), pred_counts.double()
        total = float(t.sum())
        if total == 0:
            return
        st.count_abs_err += float((p - t).abs().sum())
        st.count_total += total
        rt, rp = static_rank_loads(t, self.ep), static_rank_loads(p, self.ep)
        st.rank_abs_err += float((rp - rt).abs().sum())
        st.rank_total += float(rt.sum())
        st.ir_true_sum += imbalance_ratio(rt) * total
        st.ir_pred_sum += imbalance_ratio(rp) * total
        st.weight += total

    def summary(self) -> Dict:
        layers = [self.layers[L].summary(L) for L in sorted(self.layers)]

        def mean(key):
            vals = [x[key] for x in layers if x[key] is not None]
            return round(sum(vals) / len(vals), 5) if vals else None
        return {"layers": layers, "mean_topk_acc": mean("topk_acc"), "mean_half_hit": mean("half_hit"),
                "mean_recall_2k": mean("recall_2k"), "mean_count_err": mean("count_err"),
                "mean_rank_load_err": mean("rank_load_err"), "mean_ir_true": mean("ir_true"),
                "mean_ir_pred": mean("ir_pred")}
