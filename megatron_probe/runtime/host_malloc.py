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
``mallopt``; glibc only): blocks below 32 MiB (the cap of glibc's own dynamic rule,
``DEFAULT_MMAP_THRESHOLD_MAX`` on 64-bit) come from the heap, and the heap is trimmed only when
more than 128 MiB is free at its top, so a plan reuses pages that are already mapped.

**What it costs, and who gets it.** The change is process-wide and stays for the process's life:
every later allocation under 32 MiB (PyTorch's CPU tensors included) comes from the heap, and
freed memory is returned to the system less eagerly: a block under 32 MiB no longer goes back on
free, up to 128 MiB of free memory at the top of each arena is kept, and free chunks inside the
heap stay resident as before. A serving process's resident memory can therefore sit higher after
a peak. Any program that builds a ``LookaheadPipeline`` gets it (``ProbeConfig.host_malloc_reuse``,
on by default; False leaves malloc as it is). It is left alone where the environment already
tunes glibc's malloc (``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``, a ``glibc.malloc.``
tunable in ``GLIBC_TUNABLES``), where another allocator is preloaded (``LD_PRELOAD`` naming
jemalloc, tcmalloc or mimalloc, which do not read glibc's settings), and on another C library.
"""

from __future__ import annotations

import ctypes
import os
from typing import Optional

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 32 << 20  # the cap of glibc's dynamic rule on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX)
TRIM_THRESHOLD_BYTES = 128 << 20
ENV_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")
OTHER_ALLOCATORS = ("jemalloc", "tcmalloc", "mimalloc")

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
    if "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        preset.append("GLIBC_TUNABLES")
    if preset:
        _outcome = f"left alone: set in the environment ({', '.join(preset)})"
        return _outcome
    preload = os.environ.get("LD_PRELOAD", "")
    other = [a for a in OTHER_ALLOCATORS if a in preload]
    if other:
        _outcome = f"left alone: another allocator is preloaded ({other[0]})"
        return _outcome
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version.restype = ctypes.c_char_p
        version = libc.gnu_get_libc_version().decode()
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):  # TypeError: Windows has no CDLL(None)
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
