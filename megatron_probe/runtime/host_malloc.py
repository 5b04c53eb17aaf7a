"""Keep the host control path's large temporaries on the heap (glibc's malloc settings).

The host planner builds a ``[ep, E, ep]`` assignment per plan: 4 MiB at E 512, EP 32, 2 MiB at
E 256, EP 32. glibc serves a block that large with a fresh ``mmap`` (above ``M_MMAP_THRESHOLD``,
128 KiB by default, raised only by its own dynamic rule) or from the top of a heap it trims back
after each free (``M_TRIM_THRESHOLD``), so each plan touches about a thousand new pages, each a
minor page fault. Measured on this project's 2-core CPU (``tools/bench_balancer.py --configs
e512_ep32``): about 1,000 faults per plan and a median plan of 2.2-2.4 ms in processes where
that happens, 0.2-0.3 ms where the dynamic rule happened to raise the threshold first, and the
same 0.2-0.3 ms in every run with the thresholds set here. Which a serving process gets depended
on its allocation history, so the same code measured 2-8x apart between runs.

:func:`reuse_heap_for_large_temporaries` sets both thresholds once per process (through
``mallopt``; glibc only): blocks below 32 MiB (glibc's largest threshold on 64-bit) come from the
heap, and up to 128 MiB of free heap is kept rather than returned, so a plan reuses pages that
are already mapped. The price is host memory the process keeps after a peak (at most the trim
threshold above what it uses). Settings given in the environment (``MALLOC_MMAP_THRESHOLD_``,
``MALLOC_TRIM_THRESHOLD_``) or another allocator (jemalloc, tcmalloc through ``LD_PRELOAD``,
which do not read glibc's) are left alone. ``ProbeConfig.host_malloc_reuse`` switches it off.
"""

from __future__ import annotations

import ctypes
import os
from typing import Optional

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 32 << 20  # glibc's maximum on 64-bit (HEAP_MAX_SIZE / 2)
TRIM_THRESHOLD_BYTES = 128 << 20
ENV_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")

_outcome: Optional[str] = None


def host_malloc_state() -> str:
    """What :func:`reuse_heap_for_large_temporaries` did in this process ("not applied" before
    any call), for a run's record."""
    return _outcome or "not applied"


def apply_host_malloc_setting(enabled: bool) -> str:
    """:func:`reuse_heap_for_large_temporaries` when ``enabled`` (``ProbeConfig.host_malloc_reuse``);
    returns :func:`host_malloc_state`."""
    if enabled:
        reuse_heap_for_large_temporaries()
    return host_malloc_state()


def reuse_heap_for_large_temporaries() -> str:
    """Set glibc's mmap and trim thresholds once per process (module docstring). Returns what was
    done, for the run's log: ``"set: ..."``, or why nothing was (another libc, settings from the
    environment, ``mallopt`` refusing)."""
    global _outcome
    if _outcome is not None:
        return _outcome
    preset = [v for v in ENV_SETTINGS if os.environ.get(v)]
    if preset:
        _outcome = f"left alone: set in the environment ({', '.join(preset)})"
        return _outcome
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version.restype = ctypes.c_char_p
        version = libc.gnu_get_libc_version().decode()
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        _outcome = "left alone: not glibc (no mallopt thresholds to set)"
        return _outcome
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    ok_mmap = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1
    ok_trim = mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES) == 1
    if not (ok_mmap and ok_trim):
        _outcome = (f"glibc {version} refused mallopt: mmap threshold {'set' if ok_mmap else 'refused'}, "
                    f"trim threshold {'set' if ok_trim else 'refused'}")
        return _outcome
    _outcome = (f"set: glibc {version}, mmap threshold {MMAP_THRESHOLD_BYTES >> 20} MiB, "
                f"trim threshold {TRIM_THRESHOLD_BYTES >> 20} MiB")
    return _outcome
