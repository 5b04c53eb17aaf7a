"""The event log behind the phase-locking evidence: recording from several threads, JSON lines
export, and the overlap check itself (touching, nested, other ranks, other kinds)."""

import threading

from megatron_probe.mechanism.event_log import (A2A_KINDS, CHUNK_KINDS, EventLog, now_ns, overlapping, read_jsonl,
                                                write_jsonl)


def _ev(kind, t0, t1, rank=0, layer=0):
    return {"rank": rank, "kind": kind, "layer": layer, "t_start": t0, "t_end": t1}


def test_overlap_cases():
    a2a = [_ev("a2a_dispatch", 100, 200), _ev("a2a_combine", 300, 400), _ev("a2a_dispatch", 100, 200, rank=1)]
    chunks = {
        "before": _ev("send", 10, 99),
        "between": _ev("recv", 201, 299),
        "after": _ev("send", 401, 500),
        "inside": _ev("recv", 120, 130),
        "straddles_start": _ev("send", 90, 110),
        "straddles_end": _ev("recv", 390, 410),
        "covers": _ev("send", 50, 450),
        "touches": _ev("recv", 200, 250),  # ends of closed intervals meet: counted
        "other_rank": _ev("send", 150, 160, rank=2),
    }
    hits = overlapping(a2a + list(chunks.values()))
    hit_names = {n for n, c in chunks.items() for a, _ in hits if a is c}
    assert hit_names == {"inside", "straddles_start", "straddles_end", "covers", "touches"}
    covers = [b for a, b in hits if a is chunks["covers"]]
    assert len(covers) == 2  # both All-to-Alls of rank 0, not rank 1's
    assert overlapping(list(chunks.values())) == []  # no All-to-All at all
    assert overlapping(a2a + [_ev("wait", 120, 130)]) == []  # only the asked kinds


def test_long_a2a_found_from_a_late_chunk():
    # the candidate search must reach back past shorter intervals that start later
    evs = [_ev("a2a_combine", 0, 1000), _ev("a2a_dispatch", 10, 20), _ev("a2a_dispatch", 30, 40), _ev("send", 900, 950)]
    assert [b["t_start"] for _, b in overlapping(evs)] == [0]


def test_threads_record_and_jsonl_roundtrip(tmp_path):
    log = EventLog(rank=3)

    def worker(k):
        for i in range(500):
            t = now_ns()
            log.record("send" if k % 2 else "a2a_combine", i % 4, t, now_ns(), chunk=i)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(log) == 2000
    first = log.drain()
    assert len(first) == 2000 and len(log) == 0
    assert all(e["rank"] == 3 and e["t_end"] >= e["t_start"] for e in first)
    path = tmp_path / "events.jsonl"
    write_jsonl(str(path), first[:10])
    write_jsonl(str(path), first[10:20])  # appends
    assert read_jsonl(str(path)) == first[:20]
    assert set(CHUNK_KINDS) == {"send", "recv"}
    assert set(A2A_KINDS) == {"a2a_dispatch", "a2a_combine", "a2a_etp_gather", "a2a_etp_reduce"}
