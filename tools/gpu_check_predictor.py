#!/usr/bin/env python3
"""GPU check of the lookahead predictor: cost against the router, and no host synchronisation.

At public model shapes (router of GPT-OSS-120B: hidden 2880, 128 experts, top-4; Qwen3-235B:
hidden 4096, 128 experts, top-8) and a few token counts, times with CUDA events (median of
repeats): the router's gating + top-k, and the predictor's forecast (frozen gate + residual MLP,
top-k, per-expert counts), and one online distillation update on a side stream. Runs the
forecast path under ``torch.cuda.set_sync_debug_mode("error")`` to prove it never waits on the
host. Writes ``predictor_check.json``.

  python tools/gpu_check_predictor.py --out results/gpu_check       (tools/gpu_check.sh predictor)
  python tools/gpu_check_predictor.py --device cpu --quick          (dry run on CPU)
"""

import argparse
import json
import os
import sys
import time
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
warnings.filterwarnings("ignore")

import torch

from megatron_probe.mechanism.profiling import time_us

SHAPES = {"gpt-oss-120b": (2880, 128, 4), "qwen3-235b-a22b": (4096, 128, 8)}


def timer(device):
    """``run(fn, reps)``: median microseconds (CUDA events on a GPU; 5 warm-ups there, 1 on a CPU)."""
    warmup = 5 if device.type == "cuda" else 1
    return lambda fn, reps: time_us(fn, device, reps=reps, warmup=warmup)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.path.join(ROOT, "results", "gpu_check"))
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--residual-hidden", type=int, default=256)
    a = p.parse_args()
    from megatron_probe.policy.distill import OnlineDistiller
    from megatron_probe.policy.predictor import PredictorSet, RouterSpec, expert_counts, select_topk

    device = torch.device(a.device)
    run = timer(device)
    reps = 5 if a.quick else 50
    tokens_list = [256] if a.quick else [1024, 8192]
    shapes = {"small": (256, 32, 4)} if a.quick else SHAPES
    rows, sync_free = [], True
    for name, (H, E, K) in shapes.items():
        gen = torch.Generator().manual_seed(0)
        spec = RouterSpec(E, K)
        w = (torch.randn(E, H, generator=gen) * H ** -0.5)
        preds = PredictorSet.from_routers([(w, None, None), (w, None, None)], spec, a.residual_hidden).to(device)
        pred = preds[1]
        wd = w.to(device)
        dist_ = OnlineDistiller(preds, lr=1e-3, sample_tokens=256)
        side = torch.cuda.Stream() if device.type == "cuda" else None
        for T in tokens_list:
            h = torch.randn(T, H, device=device, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
            with torch.no_grad():
                router_us = run(lambda: select_topk(torch.nn.functional.linear(h.float(), wd), spec), reps)
                forecast_us = run(lambda: expert_counts(pred.predict_topk(h), E), reps)
                if device.type == "cuda":
                    torch.cuda.set_sync_debug_mode("error")
                    try:
                        expert_counts(pred.predict_topk(h), E)
                        idx = dist_.sample_index(T, device)
                        dist_.observe(1, h if idx is None else h[idx], torch.randn(min(T, 256), E, device=device))
                    except RuntimeError as e:
                        sync_free = False
                        print("host sync in the forecast path:", e)
                    finally:
                        torch.cuda.set_sync_debug_mode(0)
            y = torch.randn(256, E, device=device)

            def update():
                dist_.observe(1, h[:256], y)
                if side is not None:
                    side.wait_stream(torch.cuda.current_stream())
                    with torch.cuda.stream(side):
                        dist_.step()
                    torch.cuda.current_stream().wait_stream(side)
                else:
                    dist_.step()
            update_us = run(update, max(3, reps // 5))
            c = pred.cost()
            row = {"model_router": name, "hidden": H, "experts": E, "topk": K, "residual_hidden": a.residual_hidden,
                   "tokens": T, "router_topk_us": round(router_us, 1), "forecast_us": round(forecast_us, 1),
                   "forecast_over_router": round(forecast_us / router_us, 2), "online_update_us": round(update_us, 1),
                   "predictor_params": c["predictor_params"], "router_params": c["router_params"]}
            rows.append(row)
            print(json.dumps(row), flush=True)
    report = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__,
              "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()), "rows": rows,
              "forecast_sync_free": sync_free if device.type == "cuda" else None}
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "predictor_check.json"), "w") as f:
        json.dump(report, f, indent=1)
    print(f"wrote {os.path.join(a.out, 'predictor_check.json')}; forecast sync-free: {report['forecast_sync_free']}")
    return 0 if sync_free else 1


if __name__ == "__main__":
    sys.exit(main())
