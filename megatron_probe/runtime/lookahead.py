"""Lookahead predictors running inside a Megatron-Core model.

:class:`LookaheadRuntime` attaches one :class:`~megatron_probe.policy.predictor.LookaheadPredictor`
per predicted MoE layer to a GPTModel (stock or PROBE layers) with hooks, and per forward:

* at MoE layer L-1's input (for layer 0: the pre-attention input of its transformer layer) it
  forecasts layer L's experts for this rank's tokens and counts them; the counts travel in layer
  L-1's own count all-gather (the PROBE dispatcher's ``extra_counts``: one ``[ep, E + E]``
  exchange, no extra collective), so the ``[ep, E]`` matrix the planner consumes is there right
  after layer L-1's exchange. Layer 0's forecast, made before any dispatch of the step, and any
  layer after a stock dispatcher, use their own asynchronous all-gather
  (:func:`gather_counts_async`);
* when layer L's true router has produced its logits (``ProbeRouter.logits_observer``) it scores
  the forecast and keeps a bounded sample of ``(predictor input, true logits)`` for distillation;
* :meth:`end_step` (once per engine step, after the forward) swaps in the weights of a finished
  online update and hands the step's samples to the next one, which trains a shadow copy of the
  predictors in a background thread (its kernels on a side stream on GPU). Updates run only while
  the running top-K accuracy of the forecast on the kept samples is below
  ``predictor_drift_threshold`` (the drift trigger). Costly quality metrics (top-2K recall, the
  metrics all-gather) are taken on one step in ``predictor_metrics_period``.

The model's output never depends on the predictors: dispatch follows the true router.
"""

from __future__ import annotations

import copy
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Dict, List, Optional

import torch

from megatron_probe.config import ProbeConfig
from megatron_probe.runtime.model_walk import layer_holding, moe_layers
from megatron_probe.mechanism.comm import all_reduce_sum, group_size
from megatron_probe.mechanism.count_exchange import PendingCounts, gather_counts_async
from megatron_probe.mechanism.profiling import nvtx_range
from megatron_probe.policy.distill import OnlineDistiller
from megatron_probe.policy.prediction_metrics import PredictionStats, topk_overlap
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


def build_predictors(model, probe_config: ProbeConfig, first_layer: int = 0,
                     model_layers: Optional[int] = None) -> PredictorSet:
    """A predictor set for ``model`` (frozen copies of its routers, residual from the config,
    warm-started from ``probe_config.predictor_state`` when given). A pipeline stage passes where
    its MoE layers sit in the whole model (``first_layer``, ``model_layers``): the warm start's
    layers are mapped onto it (``PredictorSet.load``)."""
    layers = moe_layers(model)
    if not layers:
        raise ValueError("model has no MoE layer to predict")
    config = layers[0].config
    logits_dtype = {"fp32": torch.float32, "fp64": torch.float64}.get(config.moe_router_dtype, config.params_dtype)
    preds = PredictorSet.from_routers([_router_parts(m.router) for m in layers], router_spec(config),
                                      probe_config.predictor_hidden, layer0=probe_config.predictor_layer0,
                                      logits_dtype=logits_dtype)
    if probe_config.predictor_state:
        preds.load(probe_config.predictor_state, first_layer, model_layers)
    return preds


def default_predictor_path(checkpoint_dir: str) -> str:
    """Where predictor state lives beside a checkpoint (never inside the model's state dict)."""
    return os.path.join(checkpoint_dir, PREDICTOR_FILE)


# weight of the newest step in the running top-K accuracy estimate (the drift trigger): a few
# steps of memory, so one odd batch neither starts nor stops the updates on its own
DRIFT_EMA = 0.3


class BackgroundUpdater:
    """Online distillation off the critical path: one worker thread trains ``shadow``, a copy of
    the live predictors, on the batches :meth:`submit` hands it; :meth:`swap`, called only at a
    step boundary, copies the shadow's weights into the live predictors. A forecast therefore
    uses the old or the new weights, never a mix, and the worker never touches what a forward
    reads. On GPU the worker's kernels go to ``stream``: it waits for an event recorded on the
    main stream at submit (the samples, the last swap's reads of the shadow), and the swap makes
    the main stream wait for the update's end event (not exercised by the CPU tests)."""

    def __init__(self, live: PredictorSet, stream=None, **distiller_kw):
        if any(p.is_inference() for p in live.parameters()):
            raise ValueError("the predictors were created under torch.inference_mode() and cannot be trained; build "
                             "them outside it (PredictorSet.from_routers does) or turn predictor_online off")
        self.live = live
        with torch.inference_mode(False):
            self.shadow = copy.deepcopy(live)
        self.distiller = OnlineDistiller(self.shadow, **distiller_kw)
        self.stream = stream
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="probe-distill")
        self._job: Optional[Future] = None
        self.update_ms: List[float] = []  # per finished update, measured by the worker

    @property
    def busy(self) -> bool:
        return self._job is not None

    def submit(self, batch) -> None:
        if self._job is not None:
            raise RuntimeError("an update is already in flight: swap() it first")
        ready = None
        if self.stream is not None:
            ready = torch.cuda.Event()
            ready.record()
            for x, y in batch.values():  # made on the main stream's allocator
                x.record_stream(self.stream)
                y.record_stream(self.stream)
        self._job = self._pool.submit(self._run, batch, ready)

    def _run(self, batch, ready):
        if self.stream is None:
            t0 = time.perf_counter()
            self.distiller.update(batch)
            return (time.perf_counter() - t0) * 1e3, None
        with torch.cuda.stream(self.stream):
            self.stream.wait_event(ready)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(self.stream)
            self.distiller.update(batch)
            end.record(self.stream)
        return start, end

    def swap(self, wait: bool = False) -> bool:
        """Copy the shadow's weights into the live predictors if the update in flight has
        finished (``wait``: wait for it first). Call only between forwards. Returns whether the
        live weights changed."""
        if self._job is None or not (wait or self._job.done()):
            return False
        first, end = self._job.result()  # re-raises what failed in the worker
        if end is not None:
            if wait:
                end.synchronize()
            elif not end.query():
                return False  # kernels still running: next step boundary
            ms = first.elapsed_time(end)
            torch.cuda.current_stream().wait_event(end)
        else:
            ms = first
        self._job = None
        with torch.inference_mode(False), torch.no_grad():
            for dst, src in zip(self.live.parameters(), self.shadow.parameters()):
                dst.copy_(src)
        self.update_ms.append(ms)
        return True

    def close(self) -> None:
        self._pool.shutdown(wait=True)


class PiggybackedCounts:
    """Forecast counts carried by a dispatcher's own count exchange (``extra_counts``); ready once
    that dispatch has run (the pipeline asks for layer L's counts after layer L-1's dispatch)."""

    def __init__(self, dispatcher, columns: slice):
        self.dispatcher, self.columns = dispatcher, columns

    def wait(self) -> torch.Tensor:
        out = self.dispatcher.last_extra
        if out is None:
            raise RuntimeError("forecast counts asked for before the dispatch that carries them ran")
        return out[:, self.columns]


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
        # expert TP with sequence parallel: each dispatch covers the expert-TP peers' tokens, so
        # every count (forecast and true) is summed over those peers too
        dispatcher = self.layers[0].token_dispatcher
        self.etp_group = dispatcher.tp_group if getattr(dispatcher, "etp_gathers_tokens", False) else None
        self.spec = router_spec(self.layers[0].config)
        self.predictors = predictors if predictors is not None else build_predictors(model, self.cfg)
        if self.predictors.num_layers != len(self.layers):
            raise ValueError(f"predictor set covers {self.predictors.num_layers} MoE layers, model has "
                             f"{len(self.layers)}")
        device = self.layers[0].router.weight.device
        self.predictors.to(device)
        self._side = (torch.cuda.Stream(device=device) if device.type == "cuda" and self.cfg.predictor_side_stream
                      else None)
        kw = dict(lr=self.cfg.predictor_lr, period=self.cfg.predictor_period,
                  sample_tokens=self.cfg.predictor_sample_tokens)
        trainable = self.cfg.predictor_online and any(True for _ in self.predictors.parameters())
        self.updater: Optional[BackgroundUpdater] = None
        if trainable and self.cfg.predictor_background:
            self.updater = BackgroundUpdater(self.predictors, stream=self._side, **kw)
            self.distiller = self.updater.distiller  # samples in, updates of the shadow
        else:
            self.distiller = OnlineDistiller(self.predictors, frozen=not self.cfg.predictor_online, **kw)
        # forecast-quality metrics cost a host sync and one extra small all-gather per layer and
        # scored step: on by default on CPU, off by default on GPU (serving)
        self.collect_metrics = device.type != "cuda" if collect_metrics is None else collect_metrics
        self.metrics_period = self.cfg.predictor_metrics_period
        self.drift_period = self.cfg.predictor_drift_period
        self.drift_threshold = float(self.cfg.predictor_drift_threshold)
        self.drift_on = False
        self.quality: Optional[float] = None  # running top-K accuracy on the kept samples
        self.version = 0  # how many times the live predictor weights changed
        self._step = 0
        self._triggered_steps = 0
        self._scored_steps = 0
        self._inline_ms: List[float] = []
        self._end_ms_total = 0.0
        self._end_ms_last = 0.0
        self._q_hits: List[torch.Tensor] = []
        self._q_rows = 0
        self._q_inflight: List = []  # GPU: (host copy, rows, event) read once landed
        self._inactive: set = set()  # layers the cost gate switched off
        self._control_us: Dict[int, float] = {}  # per layer, this step's forecast time
        self._pending: Dict[int, object] = {}  # layer -> PendingCounts or PiggybackedCounts
        # layer L's forecast rides on layer L-1's own count exchange where that dispatcher can
        # carry it (the PROBE dispatcher): one all-gather per layer instead of two
        self._carriers: Dict[int, object] = {
            i + 1: layer.token_dispatcher for i, layer in enumerate(self.layers)
            if i + 1 in self.predictors and hasattr(layer.token_dispatcher, "carry")}
        self._sample: Dict[int, tuple] = {}  # layer -> (sample index | None, sampled inputs)
        self._pred_ids: Dict[int, tuple] = {}  # layer -> (ids, scored step)
        self._step_records: List[Dict] = []
        self._stats: Optional[Dict[str, PredictionStats]] = None
        self._observed: List = []
        # per predicted layer: the module whose forward pre-hook forecasts it (layer L-1's MoE
        # layer; for layer 0 the transformer layer holding it) and the hook's handle, removed
        # while the layer is switched off so an idle hook costs nothing
        self._hook_module: Dict[int, torch.nn.Module] = {}
        self._hook_handle: Dict[int, object] = {}
        for i, layer in enumerate(self.layers):
            if i + 1 in self.predictors:
                self._hook_module[i + 1] = layer
            if not hasattr(layer.router, "logits_observer"):
                raise TypeError(f"MoE layer {i}'s router ({type(layer.router).__name__}) cannot report its logits; "
                                "build the model with ProbeRouter (probe_layer_spec does)")
            layer.router.logits_observer = self._logits_hook(i)
            self._observed.append(layer.router)
        # layer 0 from the previous step's true counts (every rank holds them: no exchange, no
        # forecast) where its dispatcher keeps them, else from its own predictor
        self._layer0_previous = (0 in self.predictors and self.cfg.layer0_counts == "previous"
                                 and hasattr(self.layers[0].token_dispatcher, "last_counts"))
        if 0 in self.predictors and not self._layer0_previous:
            self._hook_module[0] = layer_holding(model, self.layers[0])
        for target in sorted(self._hook_module):
            self._hook(target, True)

    # ------------------------------------------------------------------ hooks
    def _hook(self, target: int, on: bool) -> None:
        """Install or remove the forecasting pre-hook of ``target``. Installed first among the
        module's pre-hooks (``prepend``): others, like the pipeline's layer-0 hook, read the
        forecast it makes."""
        handle = self._hook_handle.pop(target, None)
        if handle is not None:
            handle.remove()
        if on:
            self._hook_handle[target] = self._hook_module[target].register_forward_pre_hook(
                self._moe_input_hook(target), with_kwargs=True, prepend=True)

    def _moe_input_hook(self, target: int):
        def hook(module, args, kwargs):  # removed while the layer is inactive (set_layer_active)
            h = args[0] if args else kwargs["hidden_states"]
            self.forecast(target, h.reshape(-1, h.shape[-1]))
        return hook

    def _logits_hook(self, layer: int):
        def hook(logits):
            self.observe_router(layer, logits)
        return hook

    def scored_step(self) -> bool:
        """Whether this step's forecast quality is scored (top-2K, metrics all-gather). Every rank
        counts the same steps, so they agree without talking."""
        return self.collect_metrics and self.metrics_period > 0 and self._step % self.metrics_period == 0

    @torch.no_grad()
    def forecast(self, layer: int, h: torch.Tensor) -> None:
        """Forecast ``layer``'s experts for this rank's tokens ``h`` and start gathering the counts."""
        if layer in self._inactive:
            return  # switched off by the cost gate: no forecast, no exchange, no sample
        t0 = time.perf_counter()
        try:
            self._forecast(layer, h)
        finally:
            self._charge(layer, t0)

    def _charge(self, layer: int, t0: float) -> None:
        """Add the time since ``t0`` to ``layer``'s forecast work of this step."""
        self._control_us[layer] = self._control_us.get(layer, 0.0) + (time.perf_counter() - t0) * 1e6

    def take_control_us(self) -> Dict[int, float]:
        """Per layer, the forecast work of this step on this rank (us); cleared."""
        out, self._control_us = self._control_us, {}
        return out

    def _forecast(self, layer: int, h: torch.Tensor) -> None:
        if self._side is not None and self.updater is None:
            torch.cuda.current_stream().wait_stream(self._side)  # last inline update finished
        pred = self.predictors[layer]
        scored = self.scored_step()
        with nvtx_range("predict"):
            ids = pred.predict_topk(h, k=min(2 * self.spec.topk, self.spec.num_experts) if scored else None)
            counts = expert_counts(ids[:, : self.spec.topk], self.spec.num_experts)
        stale = self._pending.pop(layer, None)
        if isinstance(stale, PendingCounts):
            stale.wait()  # a forecast nobody consumed: finish its collective before issuing the next
        carrier = self._carriers.get(layer)
        if carrier is not None:
            # gathered by layer - 1's dispatch, about to run
            self._pending[layer] = PiggybackedCounts(carrier, carrier.carry(counts))
        else:  # layer 0 (forecast before any dispatch of the step) or a stock dispatcher
            if self.etp_group is not None:
                counts = all_reduce_sum(counts, self.etp_group)
            self._pending[layer] = gather_counts_async(counts, self.ep_group)
        self._pred_ids[layer] = (ids, scored)
        idx = self.distiller.sample_index(h.shape[0], h.device)
        self._sample[layer] = (idx, h if idx is None else h[idx])

    def forecasts(self, layer: int) -> bool:
        return layer in self.predictors

    def set_layer_active(self, layer: int, active: bool) -> None:
        """From the next forward on, forecast ``layer`` or not (every rank alike: the count
        exchange is collective)."""
        (self._inactive.discard if active else self._inactive.add)(layer)
        if layer in self._hook_module and active != (layer in self._hook_handle):
            self._hook(layer, active)
        router = self.layers[layer].router  # its logits only matter while the layer is forecast
        router.logits_observer = self._logits_hook(layer) if active else None

    def observe_true(self, layer: int, counts: torch.Tensor) -> None:
        pass  # the predictors learn from the router's logits (observe_router), not from counts

    def topk_accuracy(self) -> Optional[float]:
        if not self.collect_metrics:
            return None
        return self.metrics().get("local", {}).get("mean_topk_acc")

    def predicted_counts(self, layer: int) -> Optional[torch.Tensor]:
        """``[ep, E]`` forecast expert counts of ``layer`` for every rank's tokens of the current
        forward (waits for the gather), or ``None`` when ``layer`` is not predicted."""
        if layer == 0 and self._layer0_previous:
            return self.layers[0].token_dispatcher.last_counts  # None before the first dispatch
        p = self._pending.get(layer)
        return None if p is None else p.wait()

    @torch.no_grad()
    def observe_router(self, layer: int, logits: torch.Tensor) -> None:
        """Layer ``layer``'s true router logits: keep the distillation sample, add to the drift
        estimate, record a scored step; timed as part of the layer's forecast stage."""
        sample = self._sample.pop(layer, None)
        if sample is None:
            return  # layer not predicted (or predicted layer 0 disabled)
        t0 = time.perf_counter()
        try:
            self._observe(layer, sample, logits)
        finally:
            self._charge(layer, t0)

    def _observe(self, layer: int, sample, logits: torch.Tensor) -> None:
        idx, inputs = sample
        pred_ids, scored = self._pred_ids.pop(layer)
        logits = logits.reshape(-1, logits.shape[-1])  # gating may see [s, b, H]
        kept = logits if idx is None else logits[idx]
        self.distiller.observe(layer, inputs, kept)
        K = self.spec.topk
        eb = self.predictors[layer].expert_bias
        if inputs.shape[0] and self._step % self.drift_period == 0:
            # drift estimate on the kept rows only (a few hundred), one step in drift_period: a
            # device scalar, no sync here
            pk = pred_ids[:, :K] if idx is None else pred_ids[idx, :K]
            self._q_hits.append(topk_overlap(pk, select_topk(kept, self.spec, eb)).sum())
            self._q_rows += pk.shape[0]
        if scored:
            true_ids = select_topk(logits, self.spec, eb)
            self._step_records.append({
                "layer": layer, "true_ids": true_ids, "pred_topk": pred_ids[:, :K],
                "pred_top2k": pred_ids, "true_counts": expert_counts(true_ids, self.spec.num_experts),
                "pending": self._pending.get(layer)})  # this forward's gather, whatever comes later

    def end_step(self) -> None:
        """After each engine step's forward: finish outstanding gathers, update the drift
        estimate, swap in a finished update and start the next one (while the trigger is on),
        fold this step's metrics when it is a scored step."""
        t0 = time.perf_counter()
        for layer in list(self._pending):
            self._pending.pop(layer).wait()
        self._fold_quality()
        self.drift_on = (self.distiller.frozen is False and self.quality is not None
                         and self.quality < self.drift_threshold)
        self._triggered_steps += self.drift_on
        if self.updater is not None:
            if self.updater.swap():
                self.version += 1
            if not self.drift_on:
                self.distiller.discard()
            elif not self.updater.busy:
                batch = self.distiller.take_batch()
                if batch:
                    self.updater.submit(batch)
            # worker still busy: the samples wait for it (bounded by the distiller)
        elif self.drift_on:
            t1 = time.perf_counter()
            if self._side is not None:
                self._side.wait_stream(torch.cuda.current_stream())
                self.distiller.record_stream(self._side)  # samples live on the main stream's allocator
                with torch.cuda.stream(self._side):
                    ran = self.distiller.step()
            else:
                ran = self.distiller.step()
            if ran is not None:
                self.version += 1
                self._inline_ms.append((time.perf_counter() - t1) * 1e3)  # host time (GPU: launch only)
        else:
            self.distiller.discard()
        self._fold_metrics()
        self._step += 1
        self._end_ms_last = (time.perf_counter() - t0) * 1e3
        self._end_ms_total += self._end_ms_last

    def _fold_quality(self) -> None:
        if self._q_hits:
            hits, rows = torch.stack(self._q_hits).sum(), self._q_rows
            self._q_hits, self._q_rows = [], 0
            if hits.device.type == "cuda":  # read a step later, without a host sync
                ev = torch.cuda.Event()
                host = hits.to("cpu", non_blocking=True)
                ev.record()
                self._q_inflight.append((host, rows, ev))
            else:
                self._add_quality(float(hits), rows)
        while self._q_inflight and self._q_inflight[0][2].query():
            host, rows, _ = self._q_inflight.pop(0)
            self._add_quality(float(host), rows)

    def _add_quality(self, hits: float, rows: int) -> None:
        acc = hits / (self.spec.topk * rows)
        self.quality = acc if self.quality is None else self.quality + DRIFT_EMA * (acc - self.quality)

    def sync(self) -> None:
        """Wait for the update in flight and swap its weights in. Call between forwards only."""
        if self.updater is not None and self.updater.swap(wait=True):
            self.version += 1

    def _fold_metrics(self) -> None:
        if not self._step_records:
            return
        self._scored_steps += 1
        ep = group_size(self.ep_group)
        if self._stats is None:
            self._stats = {"local": PredictionStats(ep=1, topk=self.spec.topk),
                           "global": PredictionStats(ep=ep, topk=self.spec.topk)}
        stats = self._stats
        E = self.spec.num_experts
        # every layer's true counts in ONE all-gather (every rank has the same records in the
        # same order: each ran every layer and scores the same steps), not one per layer
        gathered = [rec for rec in self._step_records if rec["pending"] is not None]
        true_all = None
        if gathered:
            true_counts = torch.cat([rec["true_counts"] for rec in gathered])
            if self.etp_group is not None:  # the forecasts cover the expert-TP peers' tokens too
                true_counts = all_reduce_sum(true_counts, self.etp_group)
            true_all = gather_counts_async(true_counts, self.ep_group).wait()
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
        """Forecast quality on the scored steps: ``local`` (this rank's tokens, per-token
        fidelity) and ``global`` (all-gathered counts at this EP size); ``drift``: the trigger,
        the updates and their time; the control path's own time per step."""
        out = {k: v.summary() for k, v in self._stats.items()} if self._stats else {}
        out["distill_updates"] = self.distiller.updates
        out["distill_loss"] = dict(self.distiller.last_loss)
        ms = self.updater.update_ms if self.updater is not None else self._inline_ms
        out["drift"] = {
            "trigger_on": self.drift_on, "threshold": self.drift_threshold,
            "quality_estimate": None if self.quality is None else round(self.quality, 5),
            "triggered_steps": self._triggered_steps, "updates": self.distiller.updates,
            "weights_version": self.version, "background": self.updater is not None,
            "update_in_flight": self.updater is not None and self.updater.busy,
            "update_ms_mean": round(sum(ms) / len(ms), 3) if ms else None,
            "update_ms_last": round(ms[-1], 3) if ms else None, "update_ms_total": round(sum(ms), 3)}
        out["steps"] = self._step
        out["scored_steps"] = self._scored_steps
        out["metrics_period"] = self.metrics_period if self.collect_metrics else 0
        out["end_step_ms_mean"] = round(self._end_ms_total / self._step, 3) if self._step else None
        out["end_step_ms_last"] = round(self._end_ms_last, 3)
        return out

    def save(self, path: str, extra: Optional[Dict] = None) -> None:
        self.sync()
        self.predictors.save(path, extra)

    def close(self) -> None:
        for target in list(self._hook_handle):
            self._hook(target, False)
        for r in self._observed:
            r.logits_observer = None
        self._observed.clear()
        for p in self._pending.values():
            p.wait()
        self._pending.clear()
        if self.updater is not None:
            try:
                self.sync()  # the last update's weights, so save() after close() has them
            finally:
                self.updater.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
