"""A cheap, thread-safe log of timed intervals: evidence for phase locking.

The transfer engine's worker records every chunk it moves (``send`` / ``recv``) and the
pipeline's main thread records every All-to-All (``a2a_dispatch`` / ``a2a_combine``), each as
``(rank, kind, layer, t_start, t_end)`` in nanoseconds of ``time.perf_counter_ns`` (one
monotonic clock for every thread of a process, and on Linux for every process of a machine).
:func:`overlapping` then checks that no chunk interval meets an All-to-All interval of the same
rank. Recording is one list append under a lock; a disabled log is ``None`` at the call sites.
"""

from __future__ import annotations

import bisect
import json
import threading
import time
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from megatron_probe.fileio import append_jsonl

CHUNK_KINDS = ("send", "recv")
A2A_KINDS = ("a2a_dispatch", "a2a_combine", "a2a_etp_gather", "a2a_etp_reduce")  # the last two: expert TP


def now_ns() -> int:
    return time.perf_counter_ns()


class EventLog:
    def __init__(self, rank: int = 0):
        self.rank = rank
        self._lock = threading.Lock()
        self._events: List[Dict] = []

    def record(self, kind: str, layer: Optional[int], t_start: int, t_end: int, **extra) -> None:
        ev = {"rank": self.rank, "kind": kind, "layer": layer, "t_start": t_start, "t_end": t_end}
        ev.update(extra)
        with self._lock:
            self._events.append(ev)

    def events(self) -> List[Dict]:
        with self._lock:
            return list(self._events)

    def drain(self) -> List[Dict]:
        """The events recorded so far, removed from the log."""
        with self._lock:
            out, self._events = self._events, []
        return out

    def __len__(self) -> int:
        with self._lock:
            return len(self._events)


def write_jsonl(path: str, events: Iterable[Dict]) -> None:
    """Append ``events`` as whole JSON lines (a kill never leaves half a line)."""
    append_jsonl(path, events)


def read_jsonl(path: str) -> List[Dict]:
    """Every row of a JSON-lines file (one JSON object a line; blank lines skipped). A missing or
    binary file, a line that is not a JSON object, or a last line cut off mid-write raises
    :class:`~megatron_probe.fileformat.InputFileError` (a ValueError) naming the file and the line."""
    import os

    from megatron_probe.fileformat import InputFileError, check_file, kind_of, read_text

    what = "a JSON-lines file (one JSON object per line)"
    if not os.path.isfile(path):
        check_file(path, what)
    lines = (read_text(path, what) if os.path.getsize(path) else "").split("\n")
    rows = []
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            if n == len(lines):  # no newline after it: the writer stopped mid-line
                raise InputFileError(f"{path}: line {n} (the last, with no newline at its end) is cut off: the file "
                                     f"is truncated ({e.msg} at column {e.colno}); expected {what}") from None
            raise InputFileError(f"{path}: line {n} is not JSON ({e.msg} at column {e.colno}); expected {what}") from None
        if not isinstance(row, dict):
            raise InputFileError(f"{path}: line {n} is {kind_of(row)}, expected a JSON object")
        rows.append(row)
    return rows


def overlapping(events: Sequence[Dict], kinds_a: Sequence[str] = CHUNK_KINDS,
                kinds_b: Sequence[str] = A2A_KINDS) -> List[Tuple[Dict, Dict]]:
    """Pairs ``(a, b)`` of events of the same rank, ``a`` of ``kinds_a`` and ``b`` of ``kinds_b``,
    whose intervals share any time (closed intervals: touching counts as overlap)."""
    out = []
    by_rank: Dict[int, List[Dict]] = {}
    for ev in events:
        if ev["kind"] in kinds_b:
            by_rank.setdefault(ev["rank"], []).append(ev)
    for evs in by_rank.values():
        evs.sort(key=lambda e: e["t_start"])
    starts = {r: [e["t_start"] for e in evs] for r, evs in by_rank.items()}
    longest = {r: max((e["t_end"] - e["t_start"] for e in evs), default=0) for r, evs in by_rank.items()}
    for a in events:
        if a["kind"] not in kinds_a or a["rank"] not in by_rank:
            continue
        evs, st = by_rank[a["rank"]], starts[a["rank"]]
        # candidates start no later than a ends and no earlier than a's start minus the longest b
        lo = bisect.bisect_left(st, a["t_start"] - longest[a["rank"]])
        hi = bisect.bisect_right(st, a["t_end"])
        out += [(a, b) for b in evs[lo:hi] if b["t_end"] >= a["t_start"]]
    return out
