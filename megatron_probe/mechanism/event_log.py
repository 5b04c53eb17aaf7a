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

CHUNK_KINDS = ("send", "recv")
A2A_KINDS = ("a2a_dispatch", "a2a_combine")


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
    with open(path, "a") as f:
        for ev in events:
            f.write(json.dumps(ev) + "\n")


def read_jsonl(path: str) -> List[Dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


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
