"""Where the live pipeline's per-layer counts come from, and how long it waits for the copies.

A :class:`Forecaster` hands the pipeline ``[ep, E]`` counts for a layer (the same matrix on every
rank). With ``lookahead`` they are ready one layer ahead (at layer L-1's MoE input; layer 0 at its
transformer layer's input), so the planned copies move behind compute; without, only at the
layer's own dispatch (the oracle). Implementations:

* ``runtime.lookahead.LookaheadRuntime``: the lookahead predictors inside the model (PROBE);
* :class:`PreviousStepForecaster`: the same layer's true counts of the previous step (ablation);
* :class:`OracleForecaster`: the true counts of this very step (a bound, not a method);
* ``experiments.scaled_replay.TraceForecaster``: predictors on a recorded trace's hidden states.

A :class:`WaitPolicy` says how the pipeline waits for a layer's copies before its dispatch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional, Protocol

import torch


class Forecaster(Protocol):
    #: counts are ready one layer ahead (prefetch behind compute) rather than at the dispatch
    lookahead: bool

    def forecasts(self, layer: int) -> bool:
        """Whether counts for ``layer`` will exist (the pipeline hooks layer 0 only if so)."""

    def predicted_counts(self, layer: int) -> Optional[torch.Tensor]:
        """``[ep, E]`` counts of ``layer`` for every rank's tokens of this forward, or None."""

    def observe_true(self, layer: int, counts: torch.Tensor) -> None:
        """The true ``[ep, E]`` counts of ``layer``, after its dispatch."""

    def topk_accuracy(self) -> Optional[float]:
        """Forecast fidelity so far, if this forecaster measures it."""

    def end_step(self) -> None:
        """After each engine step."""

    def set_layer_active(self, layer: int, active: bool) -> None:
        """Whether ``layer`` is forecast from the next step on (the cost gate switches layers off:
        no forecast work and no count exchange for them). Called on every rank alike."""

    def take_control_us(self) -> Dict[int, float]:
        """Per layer, this rank's forecast work of the step (us), then cleared: part of the
        layer's control path (``{}`` when nothing is computed per layer)."""

    def close(self) -> None:
        """Remove hooks, finish outstanding collectives."""


class PreviousStepForecaster:
    """The same layer's true counts of the previous step (what window statistics would use)."""

    lookahead = True

    def __init__(self):
        self._prev: Dict[int, torch.Tensor] = {}

    def forecasts(self, layer: int) -> bool:
        return True

    def predicted_counts(self, layer: int) -> Optional[torch.Tensor]:
        return self._prev.get(layer)

    def observe_true(self, layer: int, counts: torch.Tensor) -> None:
        self._prev[layer] = counts.detach().long().clone()  # where they are (the device control path's device)

    def topk_accuracy(self) -> Optional[float]:
        return None

    def end_step(self) -> None:
        pass

    def set_layer_active(self, layer: int, active: bool) -> None:
        if not active:
            self._prev.pop(layer, None)  # stale by the time the layer comes back

    def take_control_us(self) -> Dict[int, float]:
        return {}

    def close(self) -> None:
        self._prev.clear()


class OracleForecaster:
    """The true counts of this step, known only at the layer's own dispatch: ``truth(layer)``
    returns ``[ep, E]`` (every rank computes the same)."""

    lookahead = False

    def __init__(self, truth: Callable[[int], torch.Tensor]):
        self.truth = truth

    def forecasts(self, layer: int) -> bool:
        return True

    def predicted_counts(self, layer: int) -> Optional[torch.Tensor]:
        return self.truth(layer).detach().cpu().long()

    def observe_true(self, layer: int, counts: torch.Tensor) -> None:
        pass

    def topk_accuracy(self) -> Optional[float]:
        return None

    def end_step(self) -> None:
        pass

    def set_layer_active(self, layer: int, active: bool) -> None:
        pass  # nothing is computed ahead

    def take_control_us(self) -> Dict[int, float]:
        return {}

    def close(self) -> None:
        pass


@dataclass(frozen=True)
class WaitPolicy:
    """``deadline_ms``: how long a layer's dispatch waits for this rank's incoming copies (the
    ones still missing are dropped, their tokens stay home); ``None`` waits for every copy.
    ``copies_free``: copies cost nothing in the plan and their wait is reported apart
    (``LookaheadPipeline.free_ms``), to be excluded from timings (the oracle)."""

    deadline_ms: Optional[float]
    copies_free: bool = False

    @classmethod
    def oracle(cls) -> "WaitPolicy":
        return cls(None, copies_free=True)
