#!/usr/bin/env python3
"""Measure the machine this runs on and save a hardware profile (JSON) for the cost model.

Measures: dense matrix-multiply peak (fp32 on CPU, bf16 on GPU), memory bandwidth (a large
copy: bytes read + written), the grouped-GEMM time per expert as a function of tokens per
expert (fitted to the cost model's affine form, giving eta_max and n_half), and, on CPU, the
loopback bandwidth of gloo between two processes as the "link" (a GPU run keeps the preset's
NVLink/InfiniBand figures: one GPU has no peer link to measure).

  python tools/calibrate_hardware.py --out results/hardware/cpu.json
  python tools/calibrate_hardware.py --device cuda --out results/hardware/h200.json
"""

import argparse
import dataclasses
import json
import os
import time


import torch

from megatron_probe.mechanism.profiling import time_us


def timed(fn, device, reps=10, warmup=3):
    """Median seconds (``profiling.time_us``)."""
    return time_us(fn, device, reps=reps, warmup=warmup) / 1e6


def _gloo_link_worker(rank, ws, nbytes, reps, out):
    import torch.distributed as dist

    buf = torch.empty(nbytes // 4, dtype=torch.float32)
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(reps):
        if rank == 0:
            dist.send(buf, 1)
        else:
            dist.recv(buf, 0)
    dist.barrier()
    if rank == 1:
        with open(out, "w") as f:
            json.dump({"gbps": nbytes * reps / (time.perf_counter() - t0) / 1e9}, f)


def main():
    from megatron_probe.mechanism.grouped_gemm import grouped_linear, grouped_mm_supported
    from megatron_probe.policy.cost_model import PRESETS, HardwareProfile

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", required=True)
    p.add_argument("--base", default="h200-sxm", choices=sorted(PRESETS),
                   help="preset whose link figures a GPU profile keeps")
    p.add_argument("--quick", action="store_true")
    a = p.parse_args()
    dev = torch.device(a.device)
    cpu = dev.type == "cpu"
    dtype = torch.float32 if cpu else torch.bfloat16
    g = torch.Generator().manual_seed(0)
    N = (256 if a.quick else 1024) if cpu else 8192
    x = torch.randn(N, N, generator=g).to(dev, dtype)
    y = torch.randn(N, N, generator=g).to(dev, dtype)
    t = timed(lambda: x @ y, dev)
    peak_tflops = 2 * N ** 3 / t / 1e12
    M = (16 if a.quick else 64) * 2 ** 20 if cpu else 2 * 2 ** 30
    src = torch.empty(M // 4, dtype=torch.float32, device=dev).normal_()
    dst = torch.empty_like(src)
    t = timed(lambda: dst.copy_(src), dev)
    hbm_gbps = 2 * M / t / 1e9
    H, F = (256, 256) if (cpu and a.quick) else ((512, 512) if cpu else (2048, 2048))
    G = 8 if cpu else 16
    backend = "grouped_mm" if grouped_mm_supported(dev, dtype) else "loop"
    W = (torch.randn(G, F, H, generator=g) / H ** 0.5).to(dev, dtype)
    ns = [1, 4, 16, 64, 256] if a.quick else [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]
    per_expert = []
    for n in ns:
        xs = torch.randn(n * G, H, generator=g).to(dev, dtype)
        t = timed(lambda: grouped_linear(xs, W, [n] * G, backend), dev)
        per_expert.append(t / G)
    # least squares: time per expert = slope * n + intercept
    nt = torch.tensor(ns, dtype=torch.float64)
    tt = torch.tensor(per_expert, dtype=torch.float64)
    Xm = torch.stack([nt, torch.ones_like(nt)], 1)
    slope, intercept = torch.linalg.lstsq(Xm, tt.unsqueeze(1)).solution.flatten().tolist()
    flops_per_token = 2.0 * H * F
    eta_max = min(1.0, flops_per_token / max(slope, 1e-15) / (peak_tflops * 1e12))
    n_half = max(0.0, intercept / max(slope, 1e-15))
    if cpu:
        import tempfile

        from megatron_probe.mcore.launch import run_distributed

        out = os.path.join(tempfile.mkdtemp(), "link.json")
        run_distributed(_gloo_link_worker, 2, (8 if a.quick else 64) * 2 ** 20, 5, out, backend="gloo")
        link = json.load(open(out))["gbps"]
        nvlink, ib, gpn = link, link, 1
        name = "measured-cpu"
    else:
        base = PRESETS[a.base]
        nvlink, ib, gpn = base.nvlink_gbps, base.ib_gbps, base.gpus_per_node
        name = f"measured-{torch.cuda.get_device_name(0).replace(' ', '-').lower()}"
    prof = HardwareProfile(
        name=name, peak_tflops=round(peak_tflops, 3), hbm_gbps=round(hbm_gbps, 2), nvlink_gbps=round(nvlink, 2),
        ib_gbps=round(ib, 2), gpus_per_node=gpn, gemm_eta_max=round(eta_max, 4), gemm_n_half=round(n_half, 2),
        source=f"tools/calibrate_hardware.py --device {a.device}{' --quick' if a.quick else ''} on "
               f"{time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC ({os.cpu_count()} CPUs, torch {torch.__version__}"
               f"{', ' + torch.cuda.get_device_name(0) if not cpu else ''}; GEMM backend {backend}, {dtype}"
               f"{'' if cpu else '; links from preset ' + a.base})")
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    prof.to_json(a.out)
    detail = dict(dataclasses.asdict(prof), tokens_per_expert=ns, seconds_per_expert=per_expert,
                  fit={"slope_s_per_token": slope, "intercept_s": intercept})
    with open(a.out.replace(".json", "_detail.json"), "w") as f:
        json.dump(detail, f, indent=1)
    print(json.dumps(dataclasses.asdict(prof), indent=1))


if __name__ == "__main__":
    main()
