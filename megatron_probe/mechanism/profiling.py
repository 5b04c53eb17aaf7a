"""NVTX ranges that cost nothing when nobody is profiling.

``nvtx_range(name)`` opens an NVTX range (the ``nvtx`` package; Nsight Systems shows it on the
thread's timeline) around a stage of the PROBE layer: predict, plan, prefetch.phase1,
prefetch.phase2, wait, counts, dispatch, experts, combine. Without the package only the stage
stack of :mod:`~megatron_probe.mechanism.stages` is kept (a list append and pop).
"""

from __future__ import annotations

from megatron_probe.mechanism import stages

try:
    import nvtx as _nvtx
except ImportError:  # optional: profiling only
    _nvtx = None

STAGES = ("predict", "plan", "prefetch.phase1", "prefetch.phase2", "agree", "wait", "counts", "split", "dispatch",
          "experts", "combine", "metrics")
_COLORS = {"predict": "purple", "plan": "yellow", "prefetch.phase1": "green", "prefetch.phase2": "green",
           "agree": "red", "wait": "red", "counts": "blue", "split": "yellow", "dispatch": "blue", "experts": "orange",
           "combine": "cyan", "metrics": "darkgreen"}  # nvtx's own names: no matplotlib needed


class nvtx_range:
    """``with nvtx_range(name):`` an NVTX range around a stage (also this thread's current stage
    in :mod:`~megatron_probe.mechanism.stages`, so a failure can say where it happened)."""

    __slots__ = ("name",)

    def __init__(self, name: str):
        self.name = name

    def __enter__(self):
        nvtx_push(self.name)
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc is not None:
            stages.stamp(exc)
        nvtx_pop()
        return False


def nvtx_push(name: str) -> None:
    """Open a range closed by :func:`nvtx_pop` (for module hooks, where no ``with`` fits)."""
    stages.push(name)
    if _nvtx is not None:
        _nvtx.push_range(f"probe.{name}", color=_COLORS.get(name, "white"), domain="megatron_probe")


def nvtx_pop() -> None:
    stages.pop()
    if _nvtx is not None:
        _nvtx.pop_range(domain="megatron_probe")


def time_us(fn, device=None, reps: int = 20, warmup: int = 3, stat: str = "median") -> float:
    """Wall time of ``fn()`` in microseconds, ``stat`` (``median`` or ``min``) of ``reps`` runs after
    ``warmup`` untimed ones: CUDA events on a CUDA ``device`` (the GPU's own clock, no host
    overhead between them), the host clock otherwise. The one timer of the project's tools."""
    import time

    import torch

    if stat not in ("median", "min"):
        raise ValueError(f"stat={stat!r}; valid: 'median', 'min'")
    if reps < 1:
        raise ValueError(f"reps={reps} must be at least 1")
    cuda = device is not None and torch.device(device).type == "cuda"
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(reps):
        if cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            ts.append(a.elapsed_time(b) * 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - t0) * 1e6)
    ts.sort()
    return ts[0] if stat == "min" else ts[len(ts) // 2]
