"""NVTX ranges that cost nothing when nobody is profiling.

``nvtx_range(name)`` opens an NVTX range (the ``nvtx`` package; Nsight Systems shows it on the
thread's timeline) around a stage of the PROBE layer: predict, plan, prefetch.phase1,
prefetch.phase2, wait, dispatch, experts, combine. Without the package it is a no-op.
"""

from __future__ import annotations

import contextlib

try:
    import nvtx as _nvtx
except ImportError:  # optional: profiling only
    _nvtx = None

STAGES = ("predict", "plan", "prefetch.phase1", "prefetch.phase2", "wait", "dispatch", "experts", "combine")
_COLORS = {"predict": "purple", "plan": "yellow", "prefetch.phase1": "green", "prefetch.phase2": "green",
           "wait": "red", "dispatch": "blue", "experts": "orange", "combine": "cyan"}


def nvtx_range(name: str):
    if _nvtx is None:
        return contextlib.nullcontext()
    return _nvtx.annotate(f"probe.{name}", color=_COLORS.get(name, "white"), domain="megatron_probe")


def nvtx_push(name: str) -> None:
    """Open a range closed by :func:`nvtx_pop` (for module hooks, where no ``with`` fits)."""
    if _nvtx is not None:
        _nvtx.push_range(f"probe.{name}", color=_COLORS.get(name, "white"), domain="megatron_probe")


def nvtx_pop() -> None:
    if _nvtx is not None:
        _nvtx.pop_range(domain="megatron_probe")
