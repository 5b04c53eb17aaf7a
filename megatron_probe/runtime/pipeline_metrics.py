"""What the live pipeline records: one row per layer and step, where it goes, and the summary.

A row (``LookaheadPipeline`` fills it): ``step``, ``layer``, ``copies``, ``dropped`` (planned
copies not there at the deadline), ``failed``, ``invalid`` (plan entries naming no valid replica),
``fallbacks`` (dropped + invalid: planned replicas not used, tokens stayed home), ``bytes``,
``wait_ms`` (exposed wait before the dispatch), ``ir_before`` / ``ir_after`` (token IR, static vs
used placement), ``time_vs_static`` (the slowest rank's expert time under the cost model, used
split over static: the split never makes it exceed 1), ``gate_on`` (the cost gate let the layer
balance), ``control_us`` and ``<stage>_us`` for the stages of ``CONTROL_STAGES`` (its control path's
time at this step), ``layer_ms``, and ``engine_disabled`` where copying was switched off. Every row
goes to ``metrics_path`` as JSON lines and to a metrics sink (``log(dict, step=)``, ``finish()``:
the wandb logger) as :func:`step_metrics`, and into the summary's running totals; ``history``
keeps the last ``HISTORY_ROWS`` in memory (a server runs for millions of steps: with every row
kept, a 4-layer soak's memory grew about 4 KB per step). The event log is flushed beside them.
"""

from __future__ import annotations

import collections
from typing import Deque, Dict, List, Optional

from megatron_probe.fileio import append_jsonl
from megatron_probe.mechanism.event_log import EventLog, write_jsonl

COUNTED = ("copies", "dropped", "failed", "invalid", "fallbacks", "bytes")
# the control path's stages timed per layer and step (``<stage>_us`` in a row; ``control_us`` their sum
# plus anything the forecaster reports): forecast (the forecaster's work for the layer: the forecast,
# and its sample and drift estimate against the true router), plan (and queueing the copies), agree (waiting
# for copies and the agreement), split (at dispatch), metrics (bookkeeping after the combine)
CONTROL_STAGES = ("forecast", "plan", "agree", "split", "metrics")
HISTORY_ROWS = 1_000  # rows kept in memory (``PipelineMetrics.history``)
# the summary's running totals: each row's field (default when absent)
_TOTALS = (*((k, 0) for k in COUNTED), ("wait_ms", 0.0), ("ir_before", 1), ("ir_after", 1), ("time_vs_static", 1),
           ("gate_on", 1), *((stage + "_us", 0.0) for stage in CONTROL_STAGES + ("control",)))


def step_metrics(rows: List[Dict]) -> Dict[str, float]:
    """One step's rows as a flat dict for a metrics sink: ``layer<L>/<field>`` for every numeric
    field of every layer, and ``step/<field>`` totals."""
    out: Dict[str, float] = {}
    for r in rows:
        for k, v in r.items():
            if k not in ("step", "layer") and isinstance(v, (int, float)):
                out[f"layer{r['layer']}/{k}"] = v
    for k in COUNTED + ("wait_ms", "layer_ms"):
        out[f"step/{k}"] = sum(r.get(k, 0) for r in rows)
    return out


class PipelineMetrics:
    def __init__(self, metrics_path: Optional[str] = None, sink=None, events: Optional[EventLog] = None,
                 events_path: Optional[str] = None):
        self.metrics_path = metrics_path
        self.sink = sink
        self.events = events
        self.events_path = events_path
        self.history: Deque[Dict] = collections.deque(maxlen=HISTORY_ROWS)
        self._rows: List[Dict] = []
        self._n = 0  # rows recorded
        self._totals = {k: 0 for k, _ in _TOTALS}  # summed in row order: the same floats as a sum over all rows

    def new_row(self, step: int, layer: int, invalid: int) -> Dict:
        row = {"step": step, "layer": layer, "copies": 0, "dropped": 0, "failed": 0, "invalid": invalid,
               "bytes": 0, "wait_ms": 0.0}
        self._rows.append(row)
        return row

    def current_rows(self) -> List[Dict]:
        """This step's rows so far."""
        return list(self._rows)

    def row(self, layer: int) -> Dict:
        """This step's row of ``layer`` (the latest one)."""
        return next(r for r in reversed(self._rows) if r["layer"] == layer)

    def end_step(self, step: int) -> List[Dict]:
        rows, self._rows = self._rows, []
        rows.sort(key=lambda r: r["layer"])  # gated-off layers' rows are added at the step's end
        self.history.extend(rows)
        self._n += len(rows)
        for r in rows:
            for k, default in _TOTALS:
                self._totals[k] += r.get(k, default)
        if self.metrics_path and rows:
            append_jsonl(self.metrics_path, rows)  # whole lines: a kill never leaves half of one
        if self.sink is not None and rows:
            self.sink.log(step_metrics(rows), step=step)
        self.flush_events()
        return rows

    def flush_events(self) -> None:
        if self.events is not None and self.events_path:
            write_jsonl(self.events_path, self.events.drain())

    def summary(self) -> Dict:
        """Totals and means over every recorded row (empty before the first)."""
        n, t = self._n, self._totals
        if not n:
            return {}
        return {"layer_steps": n, **{k: t[k] for k in COUNTED},
                "wait_ms_total": round(t["wait_ms"], 3),
                "ir_before": round(t["ir_before"] / n, 4),
                "ir_after": round(t["ir_after"] / n, 4),
                "time_vs_static": round(t["time_vs_static"] / n, 4),
                "gate_on_fraction": round(t["gate_on"] / n, 4),
                "control_us": {stage: round(t[stage + "_us"] / n, 1) for stage in CONTROL_STAGES + ("control",)}}

    def close(self, step: int, summary: Dict) -> None:
        """Flush the events; the sink gets the summary's numbers and is finished."""
        self.flush_events()
        if self.sink is not None:
            numeric = {f"summary/{k}": v for k, v in summary.items()
                       if isinstance(v, (int, float)) and not isinstance(v, bool)}
            if numeric:
                self.sink.log(numeric, step=step)
            self.sink.finish()
            self.sink = None
