"""Lookahead predictors running inside a Megatron-Core model.

:class:`LookaheadRuntime` attaches one :class:`~megatron_probe.policy.predictor.LookaheadPredictor`
per predicted MoE layer to a GPTModel (stock or PROBE layers) with hooks, and per forward:

* at MoE layer L-1's input (for layer 0: the pre-attention input of its transformer layer) it
  forecasts layer L's experts for this rank's tokens, counts them, and starts the all-gather of
  the counts across the EP group (:func:`gather_counts_async`), so the ``[ep, E]`` matrix the
  planner consumes is in flight while layer L-1 dispatches;
* when layer L's true router has produced its logits (``ProbeRouter.logits_observer``) it scores
  the forecast and keeps a bounded sample of ``(predictor input, true logits)`` for distillation;
* :meth:`end_step` (once per engine step, after the forward) runs the deferred online update,
  on a side stream on GPU.

The model's output never depends on the predictors: dispatch follows the true router.
"""

from __future__ import annotations

import os
from typing import Dict, List, Optional

import torch

from megatron_probe.config import ProbeConfig
from megatron_probe.runtime.model_walk import layer_holding, moe_layers
from megatron_probe.mechanism.comm import group_size
from megatron_probe.mechanism.count_exchange import PendingCounts, gather_counts_async
from megatron_probe.mechanism.profiling import nvtx_range
from megatron_probe.policy.distill import OnlineDistiller
from megatron_probe.policy.prediction_metrics import PredictionStats
from megatron_probe.policy.predictor import PredictorSet, RouterSpec, expert_counts, select_topk

PREDICTOR_FILE = "predictor.pt"


def router_spec(config) -> RouterSpec:
    """The selection rule of Megatron's TopKRouter for this TransformerConfig. Router modes whose
    choice is not a function of the logits alone are refused (a forecast could not mirror them)."""
    types = config.moe_router_load_balancing_type
    if "sinkhorn" in (types if isinstance(types, list) else [types]):
        raise NotImplementedError("moe_router_load_balancing_type='sinkhorn' is not supported by the predictors")
    if config.moe_expert_capacity_factor is not None:
        raise NotImplementedError(f"moe_expert_capacity_factor={config.moe_expert_capacity_factor}: token dropping "
                                  "is not supported by the predictors (use a dropless router)")
    if getattr(config, "moe_router_force_load_balancing", False):
        raise NotImplementedError("moe_router_force_load_balancing=True is not supported by the predictors")
    return RouterSpec(num_experts=config.num_moe_experts, topk=config.moe_router_topk,
                      score_function=config.moe_router_score_function,
                      pre_softmax=bool(config.moe_router_pre_softmax),
                      num_groups=config.moe_router_num_groups, group_topk=config.moe_router_group_topk)


def _router_parts(router):
    eb = getattr(router, "expert_bias", None) if getattr(router, "enable_expert_bias", False) else None
    return router.weight, getattr(router, "bias", None), eb


def build_predictors(model, probe_config: ProbeConfig) -> PredictorSet:
    """A predictor set for ``model`` (frozen copies of its routers, residual from the config,
    warm-started from ``probe_config.predictor_state`` when given)."""
    layers = moe_layers(model)
    if not layers:
        raise ValueError("model has no MoE layer to predict")
    config = layers[0].config
    logits_dtype = {"fp32": torch.float32, "fp64": torch.float64}.get(config.moe_router_dtype, config.params_dtype)
    preds = PredictorSet.from_routers([_router_parts(m.router) for m in layers], router_spec(config),
                                      probe_config.predictor_hidden, layer0=probe_config.predictor_layer0,
                                      logits_dtype=logits_dtype)
    if probe_config.predictor_state:
        preds.load(probe_config.predictor_state)
    return preds


def default_predictor_path(checkpoint_dir: str) -> str:
    """Where predictor state lives beside a checkpoint (never inside the model's state dict)."""
    return os.path.join(checkpoint_dir, PREDICTOR_FILE)


class LookaheadRuntime:
    """The lookahead predictors of a model at work (module docstring); a
    ``runtime.forecasters.Forecaster`` for the live pipeline."""

    lookahead = True  # counts are ready one layer ahead

    def __init__(self, model, probe_config: Optional[ProbeConfig] = None, ep_group=None,
                 predictors: Optional[PredictorSet] = None, collect_metrics: Optional[bool] = None):
        self.layers = moe_layers(model)
        if not self.layers:
            raise ValueError("model has no MoE layer to predict")
        # default: the PROBE layers' own config (stock layers have none: the defaults)
        self.cfg = probe_config or getattr(self.layers[0], "probe_config", None) or ProbeConfig()
        if ep_group is None:
            ep_group = getattr(self.layers[0], "ep_group", None)
            if ep_group is None and getattr(self.layers[0], "pg_collection", None) is not None:
                ep_group = self.layers[0].pg_collection.ep
        self.ep_group = ep_group
        self.spec = router_spec(self.layers[0].config)
        self.predictors = predictors if predictors is not None else build_predictors(model, self.cfg)
        if self.predictors.num_layers != len(self.layers):
            raise ValueError(f"predictor set covers {self.predictors.num_layers} MoE layers, model has "
                             f"{len(self.layers)}")
        device = self.layers[0].router.weight.device
        self.predictors.to(device)
        self.distiller = OnlineDistiller(self.predictors, lr=self.cfg.predictor_lr, period=self.cfg.predictor_period,
                                         sample_tokens=self.cfg.predictor_sample_tokens,
                                         frozen=not self.cfg.predictor_online)
        # forecast-quality metrics cost a host sync and one extra small all-gather per layer and
        # step: on by default on CPU, off by default on GPU (serving)
        self.collect_metrics = device.type != "cuda" if collect_metrics is None else collect_metrics
        self._side = (torch.cuda.Stream(device=device) if device.type == "cuda" and self.cfg.predictor_side_stream
                      else None)
        self._pending: Dict[int, PendingCounts] = {}
        self._sample: Dict[int, tuple] = {}  # layer -> (sample index | None, sampled inputs)
        self._pred_ids: Dict[int, torch.Tensor] = {}
        self._step_records: List[Dict] = []
        self._stats: Optional[Dict[str, PredictionStats]] = None
        self._handles = []
        self._observed: List = []
        for i, layer in enumerate(self.layers):
            if i + 1 in self.predictors:
                self._handles.append(layer.register_forward_pre_hook(self._moe_input_hook(i + 1), with_kwargs=True))
            if not hasattr(layer.router, "logits_observer"):
                raise TypeError(f"MoE layer {i}'s router ({type(layer.router).__name__}) cannot report its logits; "
                                "build the model with ProbeRouter (probe_layer_spec does)")
            layer.router.logits_observer = self._logits_hook(i)
            self._observed.append(layer.router)
        if 0 in self.predictors:
            holder = layer_holding(model, self.layers[0])
            self._handles.append(holder.register_forward_pre_hook(self._moe_input_hook(0), with_kwargs=True))

    # ------------------------------------------------------------------ hooks
    def _moe_input_hook(self, target: int):
        def hook(module, args, kwargs):
            h = args[0] if args else kwargs["hidden_states"]
            self.forecast(target, h.reshape(-1, h.shape[-1]))
        return hook

    def _logits_hook(self, layer: int):
        def hook(logits):
            self.observe_router(layer, logits)
        return hook

    @torch.no_grad()
    def forecast(self, layer: int, h: torch.Tensor) -> None:
        """Forecast ``layer``'s experts for this rank's tokens ``h`` and start gathering the counts."""
        if self._side is not None:
            torch.cuda.current_stream().wait_stream(self._side)  # last online update finished
        pred = self.predictors[layer]
        with nvtx_range("predict"):
            ids = pred.predict_topk(h, k=min(2 * self.spec.topk, self.spec.num_experts) if self.collect_metrics
                                    else None)
            counts = expert_counts(ids[:, : self.spec.topk], self.spec.num_experts)
        stale = self._pending.pop(layer, None)
        if stale is not None:
            stale.wait()  # a forecast nobody consumed: finish its collective before issuing the next
        self._pending[layer] = gather_counts_async(counts, self.ep_group)
        self._pred_ids[layer] = ids
        idx = self.distiller.sample_index(h.shape[0], h.device)
        self._sample[layer] = (idx, h if idx is None else h[idx])

    def forecasts(self, layer: int) -> bool:
        return layer in self.predictors

    def observe_true(self, layer: int, counts: torch.Tensor) -> None:
        pass  # the predictors learn from the router's logits (observe_router), not from counts

    def topk_accuracy(self) -> Optional[float]:
        if not self.collect_metrics:
            return None
        return self.metrics().get("local", {}).get("mean_topk_acc")

    def predicted_counts(self, layer: int) -> Optional[torch.Tensor]:
        """``[ep, E]`` forecast expert counts of ``layer`` for every rank's tokens of the current
        forward (waits for the gather), or ``None`` when ``layer`` is not predicted."""
        p = self._pending.get(layer)
        return None if p is None else p.wait()

    @torch.no_grad()
    def observe_router(self, layer: int, logits: torch.Tensor) -> None:
        sample = self._sample.pop(layer, None)
        if sample is None:
            return  # layer not predicted (or predicted layer 0 disabled)
        idx, inputs = sample
        logits = logits.reshape(-1, logits.shape[-1])  # gating may see [s, b, H]
        self.distiller.observe(layer, inputs, logits if idx is None else logits[idx])
        if self.collect_metrics:
            true_ids = select_topk(logits, self.spec, self.predictors[layer].expert_bias)
            pred_ids = self._pred_ids.pop(layer)
            self._step_records.append({
                "layer": layer, "true_ids": true_ids, "pred_topk": pred_ids[:, : self.spec.topk],
                "pred_top2k": pred_ids, "true_counts": expert_counts(true_ids, self.spec.num_experts),
                "pending": self._pending.get(layer)})  # this forward's gather, whatever comes later

    def end_step(self) -> None:
        """After each engine step's forward: finish outstanding gathers, fold this step's metrics,
        run the deferred online distillation update."""
        for layer in list(self._pending):
            self._pending.pop(layer).wait()
        if self._side is not None:
            self._side.wait_stream(torch.cuda.current_stream())
            self.distiller.record_stream(self._side)  # samples live on the main stream's allocator
            with torch.cuda.stream(self._side):
                self.distiller.step()
        else:
            self.distiller.step()
        self._fold_metrics()

    def _fold_metrics(self) -> None:
        if not self._step_records:
            return
        ep = group_size(self.ep_group)
        if self._stats is None:
            self._stats = {"local": PredictionStats(ep=1, topk=self.spec.topk),
                           "global": PredictionStats(ep=ep, topk=self.spec.topk)}
        stats = self._stats
        E = self.spec.num_experts
        # every layer's true counts in ONE all-gather (every rank has the same records in the
        # same order: each ran every layer), not one per layer
        gathered = [rec for rec in self._step_records if rec["pending"] is not None]
        true_all = (gather_counts_async(torch.cat([rec["true_counts"] for rec in gathered]), self.ep_group).wait()
                    if gathered else None)
        for rec in self._step_records:
            L = rec["layer"]
            stats["local"].add_tokens(L, rec["true_ids"].cpu(), rec["pred_topk"].cpu(), rec["pred_top2k"].cpu())
            local_pred = expert_counts(rec["pred_topk"], E)
            stats["local"].add_counts(L, rec["true_counts"].cpu(), local_pred.cpu())
        for i, rec in enumerate(gathered):
            stats["global"].add_counts(rec["layer"], true_all[:, i * E:(i + 1) * E].sum(0).cpu(),
                                       rec["pending"].wait().sum(0).cpu())
        self._step_records.clear()

    def metrics(self) -> Dict:
        """Forecast quality so far: ``local`` (this rank's tokens, per-token fidelity) and
        ``global`` (all-gathered counts at this EP size)."""
        out = {k: v.summary() for k, v in self._stats.items()} if self._stats else {}
        out["distill_updates"] = self.distiller.updates
        out["distill_loss"] = dict(self.distiller.last_loss)
        return out

    def save(self, path: str, extra: Optional[Dict] = None) -> None:
        self.predictors.save(path, extra)

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for r in self._observed:
            r.logits_observer = None
        self._observed.clear()
        for p in self._pending.values():
            p.wait()
        self._pending.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
