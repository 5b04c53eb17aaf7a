#!/usr/bin/env python3
"""Soak the live pipeline: many steps with replicas changing, outputs checked against the plain
model at every step, resident memory, threads, open files, process groups and replica memory
sampled per rank (``megatron_probe/experiments/soak.py``). Prints the samples and the growth
after the warm-up, writes JSON, and exits 0 only if the outputs stayed equal and nothing grew
beyond the bound.

  python tools/soak.py --steps 2000 --ep 2 --json results/reliability/soak_ep2.json
"""

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import warnings

warnings.filterwarnings("ignore")

from megatron_probe.experiments.soak import SoakOptions, soak_rank
from megatron_probe.mcore.launch import run_distributed


def _worker(rank, world_size, opts, result_path):
    result = soak_rank(rank, world_size, opts)
    if result is not None:
        with open(result_path, "w") as f:
            json.dump(result, f)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--ep", type=int, default=2, help="expert-parallel size (processes; the model has 8 experts)")
    p.add_argument("--replica-mode", choices=["streamed", "resident"], default="streamed")
    p.add_argument("--sample-every", type=int, default=100)
    p.add_argument("--warmup", type=int, default=100, help="growth is measured from the first sample after this step")
    p.add_argument("--shift-every", type=int, default=250, help="steps between moves of the hot experts")
    p.add_argument("--rss-growth-bound", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the result JSON here")
    a = p.parse_args(argv)
    if a.ep not in (1, 2, 4, 8):
        p.error(f"--ep {a.ep}: the soak model has 8 experts; valid: 1, 2, 4, 8")
    try:
        opts = SoakOptions(steps=a.steps, replica_mode=a.replica_mode, sample_every=a.sample_every, warmup=a.warmup,
                           shift_every=a.shift_every, rss_growth_bound=a.rss_growth_bound, seed=a.seed)
    except ValueError as e:
        p.error(str(e))
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "soak.json")
        run_distributed(_worker, a.ep, opts, path, backend="gloo")
        if not os.path.exists(path):  # torchrun ranks other than 0
            return 0
        with open(path) as f:
            result = json.load(f)
    result.update(command="python tools/soak.py " + " ".join(sys.argv[1:] if argv is None else argv),
                  date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                  machine=f"{platform.machine()}, {os.cpu_count()} cores")
    print(f"{'rank':>4s} {'step':>6s} {'RSS MiB':>9s} {'threads':>8s} {'fds':>5s} {'groups':>7s} "
          f"{'replica KiB':>12s} {'copies':>7s} {'s':>8s}")
    for rank, samples in sorted(result["samples"].items()):
        for s in samples:
            print(f"{rank:>4} {s['step']:6d} {s['rss_bytes'] / 2 ** 20:9.1f} {s['threads']:8d} {s['open_fds']:5d} "
                  f"{s['process_groups']:7d} {s['replica_bytes'] / 1024:12.1f} {s['copies']:7d} {s['seconds']:8.1f}")
    for r in result["per_rank"]:
        print(f"rank {r['rank']}: max relative diff {r['max_rel_diff']:.2e}, RSS growth after step {a.warmup} "
              f"{100 * r['rss_growth']:+.2f}%, threads {r['threads_added']:+d}, fds {r['fds_added']:+d}, "
              f"groups {r['groups_added']:+d}, replica bytes {r['replica_bytes_added']:+d}, copies {r['copies']}")
    for f in result["failures"]:
        print("FAILED:", f)
    print("PASSED" if result["passed"] else "FAILED")
    if a.json:
        os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
        with open(a.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
