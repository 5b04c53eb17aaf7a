"""What a rank does when a peer dies: say which peer, where this rank was, and exit.

A killed peer (SIGKILL, a crashed node) shows up on the survivors as a failed collective: gloo
raises at once ("Connection reset by peer"), NCCL and a silent peer after the group's timeout.
Left alone, each survivor prints a long traceback that names neither the dead rank nor the
stage, and a launcher may not notice for minutes. :func:`exit_on_peer_loss` runs a rank's work;
when it fails on a collective, the rank

1. announces itself alive in the job's rendezvous store and waits up to ``roll_call_s`` for the
   other ranks to do the same (every survivor fails within moments of the others: the dead
   peer's connections break for all of them). A rank that never answers is named lost. When the
   store itself is unreachable, its host is what died (rank 0 under this project's launcher);
2. prints one line: ``megatron_probe: rank 0 lost rank 1 during 'serve.probe.step3 > probe.step
   > layer1 > dispatch' (RuntimeError: ... Connection reset by peer)``;
3. exits with :data:`PEER_LOST_EXIT` without running the interpreter's teardown (which may wait
   on the broken groups).

Any other exception is not a peer loss and propagates unchanged (its traceback is the
diagnosis, and the peers then report this rank as lost).
"""

from __future__ import annotations

import datetime
import os
import re
import sys
import time
import traceback
from typing import Callable, List, Optional

from megatron_probe.mechanism import stages

PEER_LOST_EXIT = 3
ROLL_CALL_PREFIX = "megatron_probe/alive/"
ALL_ANSWERED = "saw a collective fail although every rank answered the roll call"
# how gloo, NCCL, the TCP store and this project's transfer engine word a broken or silent peer
_PEER_WORDS = re.compile(r"gloo|nccl|connection (reset|closed|refused)|broken pipe|timed out|timeout|socket|"
                         r"partner engine broken|no partner committed|peer", re.IGNORECASE)


def is_peer_failure(exc: BaseException) -> bool:
    """True when ``exc`` (or an exception it was raised from) is a collective or store failure:
    a ``torch.distributed`` error, or a runtime / timeout error worded as a broken peer."""
    import torch.distributed as dist

    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, getattr(dist, "DistError", ())):
            return True
        if isinstance(exc, (RuntimeError, TimeoutError, ConnectionError)) and _PEER_WORDS.search(str(exc)):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def roll_call(rank: int, world: int, wait_s: float, store=None) -> List[int]:
    """Announce ``rank`` alive in the rendezvous store, wait up to ``wait_s`` for the other ranks,
    and return those that did not answer. Raises ``ConnectionError`` when the store is
    unreachable."""
    import torch.distributed as dist

    if store is None:
        store = dist.distributed_c10d._get_default_store()
    keys = [f"{ROLL_CALL_PREFIX}{r}" for r in range(world)]
    try:
        store.set_timeout(datetime.timedelta(seconds=max(1.0, wait_s)))
        store.set(keys[rank], "1")
        deadline = time.monotonic() + wait_s
        missing = [r for r in range(world) if r != rank]
        while missing:
            missing = [r for r in missing if not store.check([keys[r]])]
            if not missing or time.monotonic() >= deadline:
                break
            time.sleep(0.05)
        return missing
    except Exception as e:  # the store's host is gone
        raise ConnectionError(f"the rendezvous store is unreachable ({type(e).__name__}: {_first_line(e)})") from e


def describe_peer_loss(exc: BaseException, rank: int, world: int, roll_call_s: float = 5.0, store=None) -> str:
    """One line: which peers this rank lost, the stage it was in, and the error it saw."""
    where = stages.stage_of(exc) or stages.current() or "outside any stage"
    try:
        lost = roll_call(rank, world, roll_call_s, store)
        if lost:
            who = f"rank{'s' if len(lost) > 1 else ''} {', '.join(map(str, lost))}"
            lost_text = f"lost {who} (no answer within {roll_call_s:g} s: killed, crashed or stuck)"
        else:
            lost_text = ALL_ANSWERED
    except ConnectionError as e:
        host = "rank 0" if _store_hosted_by_rank0() else "the store's host"
        lost_text = f"lost {host}: {e}"
    return f"megatron_probe: rank {rank} {lost_text}, during '{where}' ({type(exc).__name__}: {_first_line(exc)})"


def exit_on_peer_loss(fn: Callable, rank: int, world: int, roll_call_s: float = 5.0) -> Callable:
    """``fn`` wrapped: a peer failure ends the process with one line on stderr and
    :data:`PEER_LOST_EXIT`; anything else propagates."""

    def run(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except BaseException as e:
            if world < 2 or not is_peer_failure(e):
                raise
            stages.stamp(e)
            try:
                msg = describe_peer_loss(e, rank, world, roll_call_s)
            except Exception as inner:  # the diagnosis must never hide the exit
                msg = f"megatron_probe: rank {rank} lost a peer ({_first_line(e)}; diagnosis failed: {inner})"
            print(msg, file=sys.stderr, flush=True)
            if ALL_ANSWERED in msg:  # no peer was lost: the traceback is the diagnosis after all
                traceback.print_exception(e, file=sys.stderr)
            sys.stderr.flush()
            sys.stdout.flush()
            os._exit(PEER_LOST_EXIT)

    return run


def _store_hosted_by_rank0() -> bool:
    """Under this project's launcher (and ``init_process_group`` with ``MASTER_ADDR``), rank 0's
    process hosts the store; under ``torchrun`` its agent does."""
    return "TORCHELASTIC_RUN_ID" not in os.environ


def _first_line(exc: BaseException, limit: int = 300) -> str:
    text = str(exc).strip().splitlines()
    line = text[0] if text else ""
    return line if len(line) <= limit else line[:limit] + "..."


def peer_lost_line(stderr: str, rank: Optional[int] = None) -> Optional[str]:
    """The peer-loss line a rank printed (``rank`` or any), from captured stderr; for callers and
    tests that read a failed job's output."""
    for line in stderr.splitlines():
        if line.startswith("megatron_probe: rank ") and (rank is None or line.startswith(f"megatron_probe: rank {rank} ")):
            return line
    return None
