"""Distilling the lookahead predictors against the true routers: online and offline.

Online (:class:`OnlineDistiller`): while serving, after layer L's true router has run, a bounded
random sample of that step's tokens is kept as ``(predictor input, true router logits)``; the
optimiser step runs once per engine step (every ``period`` steps), off the forward's critical
path: inline (:meth:`OnlineDistiller.step`) or, split into :meth:`~OnlineDistiller.take_batch` and
:meth:`~OnlineDistiller.update`, in a background worker training a shadow copy
(``runtime.lookahead``). Offline (:meth:`OnlineDistiller.fit`): the same loss and optimiser on recorded pairs, the
warm start ``tools/distill_predictor.py`` saves.

Pure tensors: no process groups. Each rank distils on its own tokens; ranks' residuals may drift
apart, which is harmless because a rank's predictor only forecasts its own tokens' experts (the
counts are all-gathered afterwards).
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Tuple

import torch

from megatron_probe.policy.predictor import PredictorSet, distill_loss


class OnlineDistiller:
    def __init__(self, predictors: PredictorSet, lr: float = 1e-3, period: int = 1, sample_tokens: int = 256,
                 frozen: bool = False, seed: int = 0):
        if lr <= 0 or not math.isfinite(lr):
            raise ValueError(f"distillation lr={lr} must be a positive finite number")
        if period < 1:
            raise ValueError(f"distillation period={period} must be >= 1 (engine steps per update)")
        if sample_tokens < 1:
            raise ValueError(f"sample_tokens={sample_tokens} must be >= 1")
        self.predictors = predictors
        self.lr, self.period, self.sample_tokens = lr, period, sample_tokens
        params = list(predictors.parameters())
        if not frozen and any(p.is_inference() for p in params):
            raise ValueError("the predictors were created under torch.inference_mode() and cannot be trained; build "
                             "them outside it (PredictorSet.from_routers does) or use frozen=True")
        self.frozen = frozen or not params  # residual width 0: nothing to train
        self.optimizer = None if self.frozen else torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        self.seed = seed
        self._gens: Dict[str, torch.Generator] = {}
        self._pending: Dict[int, List[Tuple[torch.Tensor, torch.Tensor]]] = {}
        self.calls = 0
        self.updates = 0
        self._last_loss: Dict[int, torch.Tensor] = {}

    @property
    def last_loss(self) -> Dict[int, float]:
        """Per-layer loss of the last update (read on demand: converting waits for the device)."""
        return {L: float(v) for L, v in self._last_loss.items()}

    def sample_index(self, n: int, device=None) -> Optional[torch.Tensor]:
        """Which of ``n`` rows to keep this step (``None``: all of them). Drawn on ``device`` with
        its own generator (seeded, so reproducible), from the row count alone: no host sync."""
        device = torch.device(device) if device is not None else torch.device("cpu")
        if self.frozen or n == 0:
            return torch.zeros(0, dtype=torch.long, device=device)
        if n <= self.sample_tokens:
            return None
        gen = self._gens.get(str(device))
        if gen is None:
            gen = self._gens[str(device)] = torch.Generator(device=device).manual_seed(self.seed)
        return torch.randperm(n, generator=gen, device=device)[: self.sample_tokens]

    def record_stream(self, stream) -> None:
        """Mark the pending samples as used by ``stream`` (an update about to run on a side stream)."""
        for buf in self._pending.values():
            for x, y in buf:
                x.record_stream(stream)
                y.record_stream(stream)

    def observe(self, layer: int, inputs: torch.Tensor, true_logits: torch.Tensor) -> None:
        """Keep sampled ``(inputs [n, H], true_logits [n, E])`` of ``layer`` for the next update."""
        if self.frozen or inputs.shape[0] == 0:
            return
        if layer not in self.predictors:
            raise KeyError(f"no predictor for layer {layer}; predicted layers: {sorted(self.predictors.layers)}")
        if inputs.shape[0] != true_logits.shape[0]:
            raise ValueError(f"layer {layer}: {inputs.shape[0]} input rows but {true_logits.shape[0]} logit rows")
        buf = self._pending.setdefault(layer, [])
        buf.append((inputs.detach(), true_logits.detach()))
        # bounded: never more than `period` steps' samples per layer
        while sum(x.shape[0] for x, _ in buf) > self.sample_tokens * self.period and len(buf) > 1:
            buf.pop(0)

    def take_batch(self) -> Optional[Dict[int, Tuple[torch.Tensor, torch.Tensor]]]:
        """End of an engine step: every `period` calls, the samples kept since the last batch as
        one ``(inputs, true_logits)`` pair per layer (fresh tensors: ``cat`` copies, so a background
        update never shares storage with the forward), else ``None``."""
        self.calls += 1
        if self.frozen:
            self._pending.clear()
            return None
        if self.calls % self.period or not self._pending:
            return None
        batch = {L: (torch.cat([x for x, _ in buf]), torch.cat([y for _, y in buf]))
                 for L, buf in self._pending.items()}
        self._pending.clear()
        return batch

    def discard(self) -> None:
        """Drop the kept samples (no update wanted for them)."""
        self._pending.clear()

    def step(self) -> Optional[Dict[int, torch.Tensor]]:
        """End of an engine step: update every `period` calls. Returns the per-layer loss tensors
        of the update (before it; not synchronised) or ``None`` when no update ran."""
        batch = self.take_batch()
        return None if batch is None else self.update(batch)

    def update(self, batch: Dict[int, Tuple[torch.Tensor, torch.Tensor]]) -> Dict[int, torch.Tensor]:
        """One optimiser step on ``batch`` (what :meth:`take_batch` returned); callable from a
        worker thread as long as nothing else touches these predictors meanwhile."""
        return self._update(batch)

    def _update(self, batch: Dict[int, Tuple[torch.Tensor, torch.Tensor]]) -> Dict[int, torch.Tensor]:
        # the forward may have run under inference_mode: clone out of it so autograd can use them
        with torch.inference_mode(False), torch.enable_grad():
            self.optimizer.zero_grad(set_to_none=True)
            losses = {}
            total = 0.0
            for L, (x, y) in batch.items():
                pred = self.predictors[L]
                loss = distill_loss(pred(x.clone()), y.clone(), pred.spec, pred.expert_bias)
                total = total + loss
                losses[L] = loss.detach()
            total.backward()
            self.optimizer.step()
        self.updates += 1
        self._last_loss = losses
        return losses

    def fit(self, data: Dict[int, Tuple[torch.Tensor, torch.Tensor]], epochs: int = 10, batch_size: int = 512,
            lr: Optional[float] = None, seed: int = 0, log=None) -> List[Dict[int, float]]:
        """Offline distillation on ``data[layer] = (inputs [N, H], true_logits [N, E])``: ``epochs``
        passes of shuffled minibatches, cosine-decayed learning rate. Returns the mean loss per
        layer of each epoch."""
        if self.frozen:
            raise ValueError("this distiller is frozen (or the predictor has no residual): nothing to fit")
        lr = lr or self.lr
        gen = torch.Generator().manual_seed(seed)
        n_batches = max(math.ceil(x.shape[0] / batch_size) for x, _ in data.values())
        total_steps = epochs * n_batches
        history = []
        it = 0
        for ep in range(epochs):
            perms = {L: torch.randperm(x.shape[0], generator=gen) for L, (x, _) in data.items()}
            sums: Dict[int, float] = {L: 0.0 for L in data}
            for b in range(n_batches):
                for g in self.optimizer.param_groups:
                    g["lr"] = lr * 0.5 * (1 + math.cos(math.pi * it / total_steps))
                batch = {}
                for L, (x, y) in data.items():
                    idx = perms[L][(b * batch_size) % x.shape[0]:][:batch_size]
                    batch[L] = (x[idx].float(), y[idx].float())
                for L, v in self._update(batch).items():
                    sums[L] += float(v) / n_batches
                it += 1
            history.append(sums)
            if log:
                log(ep, sums)
        for g in self.optimizer.param_groups:
            g["lr"] = self.lr
        return history
