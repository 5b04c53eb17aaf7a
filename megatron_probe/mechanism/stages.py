"""Where this process is: the stack of stages it is in (serving step, layer, dispatch, ...).

Every NVTX range of the project (:mod:`megatron_probe.mechanism.profiling`) also pushes its name
here, so when a collective fails because a peer died the error can say where this rank was
(``serve.probe.step12 > probe.step > layer3 > dispatch``) without any extra instrumentation. One
stack per thread; a push and a pop are a list append and pop.

An exception that leaves a stage is stamped with the stage it was raised in
(:func:`stage_of`), since by the time it reaches the top of the process every stage it crossed
has been popped.

Fault injection for tests: with ``MEGATRON_PROBE_KILL_AT="<rank>:<pattern>[:<n>[:KILL|STOP]]"``
in the environment, the process whose global rank is ``<rank>`` sends itself SIGKILL (or SIGSTOP:
a rank that hangs) the ``n``-th time (default 1) it enters a stage whose path matches the
``fnmatch`` pattern (e.g. ``1:*step3 > * > dispatch``): a real kill, at a known point in the
middle of a step.
"""

from __future__ import annotations

import fnmatch
import os
import signal
import threading
from typing import List, Optional

SEPARATOR = " > "
KILL_ENV = "MEGATRON_PROBE_KILL_AT"
_STAMP = "_megatron_probe_stage"

_local = threading.local()


def _stack() -> List[str]:
    s = getattr(_local, "stack", None)
    if s is None:
        s = _local.stack = []
    return s


def push(name: str) -> None:
    s = _stack()
    s.append(name)
    if _kill_rule is not None:
        _maybe_kill(s)


def pop() -> None:
    s = _stack()
    if s:
        s.pop()


def depth() -> int:
    return len(_stack())


def truncate(n: int) -> None:
    """Drop every stage above depth ``n`` (stages pushed by hooks whose closing hook never ran
    because the forward raised)."""
    del _stack()[n:]


def current() -> str:
    """This thread's stage path, outermost first ("" outside every stage)."""
    return SEPARATOR.join(_stack())


def stamp(exc: BaseException) -> None:
    """Record on ``exc`` the stage it was raised in (the innermost one that saw it)."""
    if exc is not None and getattr(exc, _STAMP, None) is None:
        try:
            setattr(exc, _STAMP, current())
        except (AttributeError, TypeError):  # an exception type without a __dict__
            pass


def stage_of(exc: BaseException) -> Optional[str]:
    """The stage ``exc`` was raised in, if it left a stage; else None."""
    return getattr(exc, _STAMP, None)


# ------------------------------------------------------------------------ fault injection
def _parse_kill_rule(text: Optional[str]):
    if not text:
        return None
    parts = text.split(":")
    usage = f"{KILL_ENV}={text!r}: expected '<rank>:<stage pattern>[:<n>[:KILL|STOP]]', e.g. '1:*step3*dispatch'"
    if len(parts) not in (2, 3, 4) or not parts[0].strip().isdigit() or not parts[1]:
        raise ValueError(usage)
    n = 1
    if len(parts) >= 3:
        if not parts[2].strip().isdigit() or int(parts[2]) < 1:
            raise ValueError(f"{usage}; the count {parts[2]!r} must be an integer >= 1")
        n = int(parts[2])
    sig = parts[3] if len(parts) == 4 else "KILL"
    if sig not in ("KILL", "STOP"):
        raise ValueError(f"{usage}; the signal {sig!r} must be KILL or STOP")
    return {"rank": int(parts[0]), "pattern": parts[1], "left": n,
            "signal": signal.SIGKILL if sig == "KILL" else signal.SIGSTOP}


_kill_rule = _parse_kill_rule(os.environ.get(KILL_ENV))


def _own_rank() -> int:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "-1"))


def _maybe_kill(stack: List[str]) -> None:
    rule = _kill_rule
    if _own_rank() != rule["rank"] or not fnmatch.fnmatchcase(SEPARATOR.join(stack), rule["pattern"]):
        return
    rule["left"] -= 1
    if rule["left"] == 0:
        os.kill(os.getpid(), rule["signal"])
