#!/usr/bin/env python3
"""Every GPU check of the foundation in one run (about 5 minutes on one H200).

1. environment (GPU, torch, CUDA, NCCL, Transformer Engine);
2. equivalence with NCCL at EP = number of GPUs, fp32 and bf16, every GEMM backend that runs
   (loop, torch._grouped_mm, TE GroupedLinear) and, with TE, FP8 (DelayedScaling,
   Float8CurrentScaling, MXFP8BlockScaling);
3. equivalence at EP = 2 with two ranks sharing the GPU over gloo (CUDA tensors staged through
   host memory): the replica path (bank fill, slot mapping, S = L + R grouped GEMM) on CUDA; and
   the same with ``control_path='device'`` (counts, the Triton token split and the dispatch's one
   read-back of its split sizes on the GPU);
4. timings with CUDA events: expert compute per backend, and one PROBE MoE layer forward
   against the stock Megatron MoELayer (alltoall dispatcher) in the same process, as a ratio;
5. the EP 1 PROBE layer at decode sizes with no host synchronisation (sync debug mode "error"),
   captured in a CUDA graph, replayed against eager output, eager and replay times beside the
   stock layer's eager time and its host synchronisations;
6. copies on one GPU: the pull engine (``copy_transport='peer_memory'``) on symmetric memory,
   ordered against the main stream, one expert's copy bandwidth on the side stream, and how much
   copy-engine copies and an SM copy kernel slow a concurrent grouped GEMM (NCCL copies need two
   GPUs);
7. the live pipeline with ``control_path='device'`` on two ranks sharing the GPU (gloo): the output
   against the plain model's with the cost gate off and on, copies, balance and read-backs.

  python tools/gpu_check.py --out results/gpu_check          (tools/gpu_check.sh wraps it)
  python tools/gpu_check.py --device cpu --quick             (dry run of the same code on CPU)
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
warnings.filterwarnings("ignore")

import torch

from megatron_probe.mechanism.profiling import time_us


def env_report():
    from megatron_probe.mechanism import te_backend

    info = {"python": platform.python_version(), "torch": torch.__version__,
            "cuda_available": torch.cuda.is_available(), "te_available": te_backend.HAVE_TE,
            "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())}
    try:
        import megatron.core

        info["megatron_core"] = getattr(megatron.core, "__version__", "?")
    except Exception as e:  # pragma: no cover
        info["megatron_core"] = f"import failed: {e}"
    if torch.cuda.is_available():
        info.update(gpu=torch.cuda.get_device_name(0), gpus=torch.cuda.device_count(),
                    capability=list(torch.cuda.get_device_capability(0)), cuda=torch.version.cuda,
                    nccl=".".join(map(str, torch.cuda.nccl.version())))
    if te_backend.HAVE_TE:
        import transformer_engine

        info["transformer_engine"] = transformer_engine.__version__
    return info


def run_equivalence(name, args, out_dir, timeout=300, env=None):
    path = os.path.join(out_dir, f"eq_{name}.json")
    cmd = [sys.executable, os.path.join(ROOT, "tools", "check_equivalence.py"), *args, "--json", path]
    t0 = time.time()
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                           env=None if env is None else {**os.environ, **env})
        rc, tail = r.returncode, (r.stdout + r.stderr).strip().splitlines()[-3:]
    except subprocess.TimeoutExpired:
        rc, tail = 124, ["timed out"]
    res = {"name": name, "cmd": " ".join(cmd[1:]), "rc": rc, "seconds": round(time.time() - t0, 1), "tail": tail}
    if os.path.exists(path):
        j = json.load(open(path))
        res.update({k: j[k] for k in ("max_abs_diff", "max_rel_diff_vs_dense", "bit_exact_vs_stock",
                                      "compared_with_stock", "trials", "ep", "passed")})
        res["backends"] = sorted({c["backend"] for c in j["cases"]})
    print(f"[equivalence] {name}: rc={rc} {res.get('passed')} {tail[-1] if tail else ''}", flush=True)
    return res


class Timer:
    """Median milliseconds of CUDA-event timings (host clock on CPU): ``profiling.time_us``."""

    def __init__(self, device):
        self.device = device

    def __call__(self, fn, reps=20, warmup=5):
        return time_us(fn, self.device, reps=reps, warmup=warmup) / 1e3


def skewed_counts(total, groups, gen):
    w = 1.0 / torch.arange(1, groups + 1, dtype=torch.float64) ** 1.1
    w = w[torch.randperm(groups, generator=gen)]
    c = torch.floor(w / w.sum() * total).long()
    c[0] += total - int(c.sum())
    return c


def time_expert_backends(device, quick):
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_probe.mechanism.expert_compute import SlotExpertCompute
    from megatron_probe.experiments.equivalence import available_backends

    H, Fh, S, T = (256, 256, 6, 2048) if quick else (2048, 1024, 19, 16384)
    dtype = torch.bfloat16
    cfg = TransformerConfig(num_layers=1, hidden_size=H, num_attention_heads=8, ffn_hidden_size=Fh,
                            num_moe_experts=16, moe_router_topk=4, add_bias_linear=False,
                            gated_linear_unit=True, activation_func=torch.nn.functional.silu,
                            bias_activation_fusion=False, params_dtype=dtype, bf16=True)
    gen = torch.Generator().manual_seed(0)
    counts = skewed_counts(T, S, gen)
    x = torch.randn(T, H, generator=gen).to(device, dtype)
    probs = torch.rand(T, generator=gen).to(device, torch.float32)
    fc1 = (torch.randn(S, 2 * Fh, H, generator=gen) / H ** 0.5).to(device, dtype)
    fc2 = (torch.randn(S, H, Fh, generator=gen) / Fh ** 0.5).to(device, dtype)
    flops = 2 * T * H * 2 * Fh + 2 * T * Fh * H
    timer = Timer(device)
    rows, ref = [], None
    for backend in available_backends(device, dtype):
        comp = SlotExpertCompute(cfg, backend)
        with torch.no_grad():
            y = comp(x, counts, probs, fc1, fc2)
            ms = timer(lambda: comp(x, counts, probs, fc1, fc2))
        ref = y.float() if ref is None else ref
        rel = ((y.float() - ref).norm() / ref.norm()).item()
        rows.append({"backend": backend, "ms": round(ms, 4), "tflops": round(flops / ms / 1e9, 1),
                     "rel_vs_first": rel, "shape": f"T={T} H={H} F={Fh} slots={S} bf16 skewed"})
        print(f"[experts] {backend:10s} {ms:8.3f} ms  {flops / ms / 1e9:7.1f} TFLOP/s  rel={rel:.2e}", flush=True)
    return rows


# expert shapes (hidden, expert FFN, experts, top-k) of two public MoE models, for the FP8 timing
FP8_SHAPES = {"gpt-oss-120b": (2880, 2880, 128, 4), "qwen3-235b-a22b": (4096, 1536, 128, 8)}


def time_fp8_gemm(device, quick):
    """FP8 (``torch._scaled_grouped_mm``, row-wise scales, activations quantised in the timed
    call) against bf16 ``torch._grouped_mm`` on one projection (fc1, gated: 2F rows) of EP 8's
    16 local experts plus 3 replica slots, skewed counts, at a prefill and a decode size per
    rank; the relative error of FP8 against bf16. Skipped, with the reason, where FP8 does not run."""
    from megatron_probe.mechanism import fp8
    from megatron_probe.mechanism.grouped_gemm import grouped_linear

    why = fp8.fp8_unsupported_reason(device)
    if why is not None:
        return [{"skipped": why}]
    rows, timer, gen = [], Timer(device), torch.Generator().manual_seed(1)
    for model, (H, Fh, E, K) in FP8_SHAPES.items():
        G = E // 8 + 3
        for phase, pairs in (("prefill", 2048 if quick else 32768), ("decode", 64 * K)):
            counts = skewed_counts(pairs, G, gen).tolist()
            x = torch.randn(pairs, H, generator=gen).to(device, torch.bfloat16)
            w = (torch.randn(G, 2 * Fh, H, generator=gen) / H ** 0.5).to(device, torch.bfloat16)
            w_q, w_s = fp8.quantize_rows(w)
            with torch.no_grad():
                ref = grouped_linear(x, w, counts, "grouped_mm")
                y = fp8.fp8_grouped_linear(x, w_q, w_s, counts, torch.bfloat16)
                ms_bf16 = timer(lambda: grouped_linear(x, w, counts, "grouped_mm"))
                ms_fp8 = timer(lambda: fp8.fp8_grouped_linear(x, w_q, w_s, counts, torch.bfloat16))
            rel = float((y.float() - ref.float()).norm() / ref.float().norm())
            row = {"model": model, "phase": phase, "pairs": pairs, "groups": G, "H": H, "N": 2 * Fh,
                   "bf16_ms": round(ms_bf16, 4), "fp8_ms": round(ms_fp8, 4),
                   "fp8_speedup": round(ms_bf16 / ms_fp8, 3), "fp8_rel_err_vs_bf16": round(rel, 4)}
            rows.append(row)
            print(f"[fp8] {row}", flush=True)
    return rows


def _layer_timing_worker(rank, ws, device_type, quick, out_path):
    import dataclasses

    import torch.nn.functional as F
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.spec_utils import build_module
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_probe import ProbeConfig, probe_layer_spec
    from megatron_probe.mcore.cpu import initialize_megatron_parallel
    from megatron_probe.mcore.router import ProbeRouter

    warnings.filterwarnings("ignore")
    initialize_megatron_parallel(ws, device=device_type)
    device = torch.device("cuda", torch.cuda.current_device()) if device_type == "cuda" else torch.device("cpu")
    E, K, H, Fh, T = (8, 2, 128, 128, 512) if quick else (16, 4, 1024, 1024, 4096)
    dtype = torch.bfloat16
    cfg = TransformerConfig(num_layers=1, hidden_size=H, num_attention_heads=8, ffn_hidden_size=Fh,
                            num_moe_experts=E, moe_router_topk=K, add_bias_linear=False, gated_linear_unit=True,
                            activation_func=F.silu, bias_activation_fusion=False, params_dtype=dtype, bf16=True,
                            moe_aux_loss_coeff=0.0, moe_router_dtype="fp32", expert_model_parallel_size=ws,
                            use_cpu_initialization=True,
                            moe_token_dispatcher_type="alltoall" if device_type == "cuda" else "allgather")
    spec = get_gpt_layer_local_spec(num_experts=E, moe_grouped_gemm=False)
    spec.submodules.mlp.submodules.router = ProbeRouter  # stock gating needs TE's GEMM
    stock = build_module(spec.submodules.mlp, config=cfg).to(device).eval()
    rows = []
    for backend in ("loop", "grouped_mm"):
        from megatron_probe.experiments.equivalence import available_backends

        if backend not in available_backends(device, dtype):
            continue
        probe = build_module(probe_layer_spec(spec, ProbeConfig(expert_backend=backend)).submodules.mlp,
                             config=dataclasses.replace(cfg, moe_token_dispatcher_type="alltoall")).to(device).eval()
        probe.load_state_dict(stock.state_dict())
        x = torch.randn(T, 1, H, generator=torch.Generator().manual_seed(1)).to(device, dtype)
        timer = Timer(device)
        with torch.no_grad():
            diff = (stock(x)[0].float() - probe(x)[0].float()).abs().max().item()
            t_stock = timer(lambda: stock(x))
            t_probe = timer(lambda: probe(x))
            t_stock2 = timer(lambda: stock(x))  # measured twice: the spread is the noise
        rows.append({"probe_backend": backend, "stock_ms": round(t_stock, 4), "stock_ms_again": round(t_stock2, 4),
                     "probe_ms": round(t_probe, 4), "probe_over_stock": round(t_probe / t_stock, 3),
                     "max_abs_diff": diff, "shape": f"E={E} topk={K} H={H} F={Fh} T={T} bf16 EP={ws}",
                     "stock_dispatcher": cfg.moe_token_dispatcher_type})
        print(f"[layer] probe({backend}) {t_probe:.3f} ms vs stock {t_stock:.3f}/{t_stock2:.3f} ms "
              f"ratio {t_probe / t_stock:.3f} diff {diff:.2e}", flush=True)
    if rank == 0:
        json.dump(rows, open(out_path, "w"))


def time_layer(device, quick, out_dir):
    from megatron_probe.mcore.launch import run_distributed

    path = os.path.join(out_dir, "layer_timing.json")
    run_distributed(_layer_timing_worker, 1, device.type, quick, path,
                    backend="nccl" if device.type == "cuda" else "gloo")
    return json.load(open(path)) if os.path.exists(path) else []


def _host_syncs(fn) -> str:
    """``"none"`` when ``fn()`` runs without a host synchronisation (CUDA's sync debug mode set to
    error raises at the first one), else the start of that error."""
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn()
        return "none"
    except RuntimeError as e:
        return str(e)[:300]
    finally:
        torch.cuda.set_sync_debug_mode("default")


def _graph_worker(rank, ws, device_type, quick, out_path):
    """The EP 1 PROBE layer (grouped_mm, bf16) at decode sizes: an eager forward with CUDA's sync
    debug mode set to error (any host synchronisation raises), then captured in a CUDA graph and
    replayed on new inputs against eager forwards of the same inputs; eager and replay times. On
    CPU (dry run) the same forward on meta tensors, which raises on any host read."""
    import torch.nn.functional as F
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.spec_utils import build_module
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_probe import ProbeConfig, probe_layer_spec
    from megatron_probe.mcore.cpu import initialize_megatron_parallel
    from megatron_probe.mcore.router import ProbeRouter

    warnings.filterwarnings("ignore")
    initialize_megatron_parallel(1, device=device_type)
    cuda = device_type == "cuda"
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    dtype = torch.bfloat16
    # (experts, top-k, hidden, expert FFN): top-2 sums two outputs per token, which no order of
    # the scatter-add can round differently, so replay must equal eager bit for bit; top-8 at
    # Qwen3-30B-A3B's expert shape may differ in the last bit (atomic adds), reported against
    # eager run twice
    shapes = [(16, 2, 256, 256)] if quick else [(16, 2, 1024, 1024), (128, 8, 2048, 768)]
    rows = []
    for E, K, H, Fh in shapes:
        cfg = TransformerConfig(num_layers=1, hidden_size=H, num_attention_heads=8, ffn_hidden_size=Fh,
                                num_moe_experts=E, moe_router_topk=K, add_bias_linear=False, gated_linear_unit=True,
                                activation_func=F.silu, bias_activation_fusion=False, params_dtype=dtype, bf16=True,
                                moe_aux_loss_coeff=0.0, moe_router_dtype="fp32", expert_model_parallel_size=1,
                                use_cpu_initialization=True, moe_token_dispatcher_type="alltoall")
        spec = get_gpt_layer_local_spec(num_experts=E, moe_grouped_gemm=False)
        spec.submodules.mlp.submodules.router = ProbeRouter
        probe_spec = probe_layer_spec(spec, ProbeConfig(expert_backend="grouped_mm")).submodules.mlp
        layer = build_module(probe_spec, config=cfg).to(device).eval()
        # the stock layer (Megatron's alltoall dispatcher) beside it, same weights: what a user
        # runs today, eager (its permute reads the pair count on the host, so it is not captured)
        stock = build_module(spec.submodules.mlp, config=cfg).to(device).eval() if cuda else None
        if stock is not None:
            stock.load_state_dict(layer.state_dict())
        gen = torch.Generator().manual_seed(E)
        for T in ((1, 8) if quick else (1, 8, 64, 256)):
            row = {"experts": E, "topk": K, "hidden": H, "ffn": Fh, "tokens": T, "dtype": "bf16", "ep": 1}
            x = torch.randn(T, 1, H, generator=gen).to(device, dtype)
            with torch.no_grad():
                first, again = layer(x)[0], layer(x)[0]
                row["eager_twice_max_abs"] = (first.float() - again.float()).abs().max().item()
                if not cuda:
                    on_meta = build_module(probe_spec, config=cfg).eval()
                    on_meta(x)  # resolves the expert backend on the CPU
                    try:
                        on_meta.to("meta")(x.to("meta"))
                        row["host_reads"] = "none (meta tensors)"
                    except (NotImplementedError, RuntimeError) as e:
                        row["host_reads"] = f"{type(e).__name__}: {str(e)[:200]}"
                    rows.append(row)
                    print(f"[graph] {row}", flush=True)
                    continue
                row["host_syncs"] = _host_syncs(lambda: layer(x))
                static_x = x.clone()
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):  # warm-up off the default stream, as capture wants
                    for _ in range(3):
                        layer(static_x)
                torch.cuda.current_stream().wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                try:
                    with torch.cuda.graph(graph):
                        static_out = layer(static_x)[0]
                except RuntimeError as e:
                    row["captured"] = False
                    row["capture_error"] = str(e)[:300]
                    rows.append(row)
                    print(f"[graph] {row}", flush=True)
                    continue
                row["captured"] = True
                exact, worst = True, 0.0
                for seed in range(5):
                    xi = torch.randn(T, 1, H, generator=gen).to(device, dtype)
                    static_x.copy_(xi)
                    graph.replay()
                    ref = layer(xi)[0]
                    exact = exact and torch.equal(static_out, ref)
                    worst = max(worst, (static_out.float() - ref.float()).abs().max().item())
                row["replay_equals_eager"] = exact
                row["replay_max_abs"] = worst
                timer = Timer(device)
                row["eager_ms"] = round(timer(lambda: layer(static_x)), 4)
                row["replay_ms"] = round(timer(graph.replay), 4)
                row["stock_eager_ms"] = round(timer(lambda: stock(static_x)), 4)
                row["stock_max_abs_vs_probe"] = (stock(static_x)[0].float() - layer(static_x)[0].float()).abs().max().item()
                row["stock_host_syncs"] = _host_syncs(lambda: stock(static_x))
            rows.append(row)
            print(f"[graph] {row}", flush=True)
    if rank == 0:
        json.dump(rows, open(out_path, "w"))


def remove_stale(*paths):
    """Remove a worker's result files before it runs: a rerun into the same folder must not report
    the last run's results as its own."""
    for path in paths:
        if os.path.exists(path):
            os.remove(path)


def graph_layer(device, quick, out_dir):
    from megatron_probe.mcore.launch import run_distributed

    path = os.path.join(out_dir, "graph_ep1.json")
    remove_stale(path)
    run_distributed(_graph_worker, 1, device.type, quick, path, backend="nccl" if device.type == "cuda" else "gloo")
    return json.load(open(path)) if os.path.exists(path) else []


# one expert's weights (fc1 gated [2F, H], fc2 [H, F], bf16) of the FP8 step's two models
COPY_SHAPES = {name: ((2 * Fh, H), (H, Fh)) for name, (H, Fh, _, _) in FP8_SHAPES.items()}


def _copy_worker(rank, ws, device_type, quick, out_path):
    """Copies on one device: the pull engine (``copy_transport='peer_memory'``) on symmetric
    memory of a world of one, its ordering against the main stream (a copy issued after a write
    on the main stream reads the write; a read after ``wait_ops`` / ``pause`` sees the copy), the
    bandwidth of one expert's copy on the side stream, and how much such copies (a memcpy: the
    copy engine) and an SM copy kernel of the same bytes (what NCCL's send/recv uses) slow a
    grouped GEMM running at the same time. NCCL copies need two GPUs: not measured here."""
    import torch.distributed as dist

    from megatron_probe.mcore.cpu import initialize_megatron_parallel
    from megatron_probe.mechanism.device_transfer import StreamCopyEngine
    from megatron_probe.mechanism.grouped_gemm import grouped_linear
    from megatron_probe.mechanism.peer_memory import peer_tensors
    from megatron_probe.mechanism.transfer import CopyOp

    warnings.filterwarnings("ignore")
    initialize_megatron_parallel(1, device=device_type)
    cuda = device_type == "cuda"
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    group, dtype = dist.group.WORLD, torch.bfloat16
    out = {"device": str(device), "rows": []}
    gen = torch.Generator().manual_seed(3)
    shapes = {"small": ((256, 128), (128, 128))} if quick else COPY_SHAPES
    for model, (s1, s2) in shapes.items():
        # the "home rank" is this one (rank 1 in the op is never contacted by a pull copy)
        srcs = [peer_tensors(s, dtype, device, group) for s in (s1, s2)]
        local = [t for t, _ in srcs]
        remote = [peers[0] for _, peers in srcs]
        dst = [torch.zeros(s, dtype=dtype, device=device) for s in (s1, s2)]
        engine = StreamCopyEngine(group, pull=True, device=device)
        nbytes = sum(t.numel() * t.element_size() for t in dst)
        row = {"model": model, "expert_mib": round(nbytes / 2 ** 20, 2), "symmetric_memory": cuda}
        # ordering: the source written on the main stream behind a long kernel, then the copy
        exact = True
        for k in range(3):
            vals = [torch.randn(s, generator=gen).to(device, dtype) for s in (s1, s2)]
            if cuda:
                a = torch.randn(4096, 4096, device=device, dtype=dtype)
                for _ in range(8):
                    a = a @ a.T / 64  # the main stream is busy when the copy is issued
            for t, v in zip(local, vals):
                t.copy_(v)
            batch = engine.submit([CopyOp(1, 0, ("check", k))], [remote], [dst])
            if k % 2 == 0:
                batch.wait_ops([0])
            else:
                engine.pause()  # an All-to-All would come next: it waits for the copy
            exact = exact and all(torch.equal(d, v) for d, v in zip(dst, vals))
        row["ordered_copy_exact"] = exact
        reps = 3 if quick else 20
        engine.drain()
        t0 = time.perf_counter()
        for k in range(reps):
            engine.submit([CopyOp(1, 0, ("bw", k))], [remote], [dst])
        engine.drain()
        sec = (time.perf_counter() - t0) / reps
        row["copy_ms"] = round(sec * 1e3, 4)
        row["copy_gb_s"] = round(nbytes / sec / 1e9, 1)
        if cuda:
            H, Fh = s2
            G, pairs = 19, 32768
            counts = [pairs // G] * (G - 1) + [pairs - (pairs // G) * (G - 1)]
            x = torch.randn(pairs, H, device=device, dtype=dtype)
            w = torch.randn(G, 2 * Fh, H, device=device, dtype=dtype) / H ** 0.5
            gemm = lambda: grouped_linear(x, w, counts, "grouped_mm")

            def gemm_ms(side_work=None, n=10):
                for _ in range(3):
                    gemm()
                torch.cuda.synchronize()
                if side_work is not None:
                    side_work()  # queued on the side stream: runs while the GEMMs below run
                t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                t0.record()
                for _ in range(n):
                    gemm()
                t1.record()
                torch.cuda.synchronize()
                return t0.elapsed_time(t1) / n

            alone = gemm_ms()
            side = torch.cuda.Stream(device)
            busy = max(1, int(12 * alone / max(row["copy_ms"], 1e-3)))  # copies for longer than the GEMMs

            def ce_copies():
                for k in range(busy):
                    engine.submit([CopyOp(1, 0, ("ce", k))], [remote], [dst])

            def sm_copies():
                with torch.cuda.stream(side):
                    for _ in range(busy):
                        for d, r in zip(dst, remote):
                            torch.mul(r, 1, out=d)  # an elementwise kernel: the copy on SMs

            ce = gemm_ms(ce_copies)
            engine.drain()
            sm = gemm_ms(sm_copies)
            torch.cuda.synchronize()
            row.update(gemm_shape=f"grouped_mm bf16 pairs={pairs} groups={G} N={2 * Fh} K={H}",
                       gemm_alone_ms=round(alone, 4), gemm_with_ce_copies_ms=round(ce, 4),
                       gemm_with_sm_copies_ms=round(sm, 4),
                       ce_copy_slowdown_pct=round(100 * (ce / alone - 1), 2),
                       sm_copy_slowdown_pct=round(100 * (sm / alone - 1), 2))
        engine.close()
        out["rows"].append(row)
        print(f"[copies] {row}", flush=True)
    out["not_measured"] = ("NCCL send/recv copies (copy_transport='stream') and copies between GPUs: one GPU "
                           "has no peer; the pull copy here reads this GPU's own symmetric memory")
    out["copy_engine_note"] = ("on one GPU the pull copy is a same-device cudaMemcpyAsync: whether the driver runs it "
                               "on a copy engine or on SMs is the driver's choice, so ce_copy_slowdown_pct is that "
                               "memcpy's cost to the GEMM; the copy-engine case proper is a peer copy between GPUs")
    json.dump(out, open(out_path, "w"))
    if cuda:  # symmetric-memory handles released before the process exits (a crash there would hide the result)
        from megatron_probe.mechanism import peer_memory

        torch.cuda.synchronize()
        del srcs, local, remote
        peer_memory.release_cuda_handles()


def copy_paths(device, quick, out_dir):
    from megatron_probe.mcore.launch import run_distributed

    path = os.path.join(out_dir, "copies_1gpu.json")
    remove_stale(path)
    error = None
    try:  # a failure here (e.g. symmetric memory refused) is reported; the other steps' results stay
        run_distributed(_copy_worker, 1, device.type, quick, path, backend="nccl" if device.type == "cuda" else "gloo")
    except Exception as e:
        error = f"{type(e).__name__}: {str(e)[:500]} (the worker's traceback is in the log)"
    if not os.path.exists(path):
        return {"rows": [], "error": error or "the worker wrote no result"}
    result = json.load(open(path))  # written before a failure at the worker's exit: kept, the error beside it
    if error is not None:
        result["error_after_result"] = error
    return result


def _device_control_worker(rank, ws, device_type, quick, out_dir):
    """The live pipeline with ``control_path='device'`` on two ranks sharing the device (gloo,
    whose collectives stage CUDA tensors through the host): a 4-layer GPT with a hot expert per
    layer, six steps, the output against the plain model's at every step, with the cost gate off
    and on; the side stream, its events, the device split and the step-end read-back run on CUDA."""
    from megatron_probe import ProbeConfig
    from megatron_probe.experiments.tiny_moe import TinyMoEConfig, build_model, causal_mask
    from megatron_probe.mcore.cpu import initialize_megatron_parallel
    from megatron_probe.policy.cost_model import ExpertCost
    from megatron_probe.runtime.model_walk import moe_layers
    from megatron_probe.runtime.pipeline import LookaheadPipeline

    initialize_megatron_parallel(ws, device=device_type)
    device = torch.device(device_type if device_type == "cpu" else f"cuda:{torch.cuda.current_device()}")
    torch.manual_seed(0)
    cfg = TinyMoEConfig(num_layers=4, hidden_size=64, num_attention_heads=4, num_experts=8, topk=2,
                        expert_ffn_hidden=64, seq_length=128, vocab_size=256, score_function="sigmoid")
    model = build_model(cfg, spec="probe", probe_config=ProbeConfig(replica_slots_per_rank=2), ep=ws)
    for i, layer in enumerate(moe_layers(model)):  # a hot expert in every layer: replicas pay
        bias = torch.zeros(cfg.num_experts)
        bias[(3 * i) % cfg.num_experts] = 5.0
        layer.router.enable_expert_bias = True
        layer.router._cpu_buffer("expert_bias", bias, persistent=True)
        layer.router._cpu_buffer("local_tokens_per_expert", torch.zeros(cfg.num_experts), persistent=False)
    model = model.to(device).eval()
    gen = torch.Generator().manual_seed(7 + rank)
    batches = [torch.randint(0, 8 if s % 2 else cfg.vocab_size, (1, 24 + 4 * rank + 2 * s), generator=gen).to(device)
               for s in range(4 if quick else 6)]

    def forward(tokens):
        n = tokens.shape[1]
        return model(tokens, torch.arange(n, device=device).unsqueeze(0), causal_mask(n).to(device))

    with torch.inference_mode():
        refs = [forward(b) for b in batches]
    scale = max(float(r.abs().max()) for r in refs)
    runs = []
    for gate in (False, True):
        pcfg = ProbeConfig(replica_slots_per_rank=2, control_path="device", dispatch_split="tokens",
                           pipeline_predict=False, cost_gate=gate, transfer_chunk_mib=0.25,
                           prefetch_deadline_ms=10_000.0)
        pipe = LookaheadPipeline(model, pcfg, cost=ExpertCost(1.0, 0.0))
        diffs = []
        with torch.inference_mode():
            for b, ref in zip(batches, refs):
                diffs.append(float((forward(b) - ref).abs().max()))
                pipe.end_step()
        summary, read_backs = pipe.summary(), pipe.control.read_backs
        pipe.close()
        runs.append({"cost_gate": gate, "max_abs_diff": max(diffs), "scale": scale, "copies": summary["copies"],
                     "ir_before": summary["ir_before"], "ir_after": summary["ir_after"],
                     "read_backs": read_backs, "steps": len(batches), "control_us": summary["control_us"]})
    with open(os.path.join(out_dir, f"device_control_rank{rank}.json"), "w") as f:
        json.dump({"rank": rank, "device": str(device), "runs": runs}, f)


def device_control_pipeline(device, quick, out_dir):
    """``_device_control_worker`` on two ranks; ``passed``: every run's output equal to the plain
    model's (fp32, 1e-5 of the logits' scale) on both ranks and copies made with the gate off."""
    from megatron_probe.mcore.launch import run_distributed

    remove_stale(*(os.path.join(out_dir, f"device_control_rank{r}.json") for r in range(2)))
    saved = os.environ.get("TRITON_INTERPRET")
    if device.type == "cpu":  # the dry run: the Triton kernels under the interpreter in the workers
        os.environ["TRITON_INTERPRET"] = "1"
    try:
        run_distributed(_device_control_worker, 2, device.type, quick, out_dir, backend="gloo")
    except Exception as e:
        return {"passed": False, "error": f"{type(e).__name__}: {str(e)[:500]} (the worker's traceback is in the log)"}
    finally:
        if saved is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = saved
    ranks = []
    for r in range(2):
        path = os.path.join(out_dir, f"device_control_rank{r}.json")
        if not os.path.exists(path):
            return {"passed": False, "error": f"rank {r} wrote no result"}
        ranks.append(json.load(open(path)))
    ok = all(run["max_abs_diff"] <= 1e-5 * run["scale"] for rank in ranks for run in rank["runs"])
    ok = ok and all(run["copies"] > 0 for rank in ranks for run in rank["runs"] if not run["cost_gate"])
    return {"passed": ok, "ranks": ranks,
            "not_measured": "host synchronisations per layer: gloo stages every collective through the host; the "
                            "NCCL path needs two GPUs"}


def save(report, path):
    """Write the report so far (``complete`` False until the last section): a step stopped by its time
    limit or an error in a later section keeps what was measured."""
    with open(path + ".tmp", "w") as f:
        json.dump(report, f, indent=2)
    os.replace(path + ".tmp", path)


def guarded(name, report, fn, *args):
    """``fn(*args)``, or ``[]`` with the error recorded in ``report["errors"][name]`` and its traceback
    printed: one section's failure (none of these has run on a GPU yet) leaves the others' results."""
    try:
        return fn(*args)
    except Exception as e:
        import traceback

        traceback.print_exc()
        report["errors"][name] = f"{type(e).__name__}: {str(e)[:500]}"
        print(f"[{name}] FAILED: {report['errors'][name]}", flush=True)
        return []


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.path.join(ROOT, "results", "gpu_check"))
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="small shapes and few trials (dry run)")
    a = p.parse_args()
    os.makedirs(a.out, exist_ok=True)
    device = torch.device(a.device)
    t0 = time.time()
    report = {"env": env_report(), "equivalence": [], "experts": [], "layer": [], "skipped": [], "errors": {},
              "complete": False}
    print(json.dumps(report["env"]), flush=True)
    ngpu = max(1, torch.cuda.device_count()) if device.type == "cuda" else 1
    tr = "4" if a.quick else "14"
    dev = ["--device", a.device]
    big = ["--hidden", "256", "--ffn", "512", "--max-tokens", "256"]
    json_path = os.path.join(a.out, "gpu_check.json")
    save(report, json_path)  # after every section: a later failure or the step's time limit keeps these
    # the measured targets first (FP8 GEMM, the EP 1 CUDA graph, the copies), then the timings,
    # then the equivalence runs (about 20 s each, mostly process start): under the step's time limit the
    # sections that did not run are the ones missing from the JSON
    report["fp8_gemm"] = guarded("fp8_gemm", report, time_fp8_gemm, device, a.quick)
    save(report, json_path)
    from megatron_probe.experiments.equivalence import available_backends

    if "grouped_mm" in available_backends(device, torch.bfloat16):
        report["graph_ep1"] = guarded("graph_ep1", report, graph_layer, device, a.quick, a.out)
    else:  # the capturable path needs torch._grouped_mm in bf16 (compute capability >= 9.0 on a GPU)
        report["graph_ep1"] = []
        report["skipped"].append(f"EP 1 CUDA graph step not run: torch._grouped_mm does not run in bf16 on {device}")
    save(report, json_path)
    report["copies"] = copy_paths(device, a.quick, a.out)
    save(report, json_path)
    report["experts"] = guarded("experts", report, time_expert_backends, device, a.quick)
    save(report, json_path)
    report["layer"] = guarded("layer", report, time_layer, device, a.quick, a.out)
    save(report, json_path)
    eq = report["equivalence"]

    def add_eq(result):  # each equivalence run kept as soon as it ends
        eq.append(result)
        save(report, json_path)

    add_eq(run_equivalence("nccl_fp32", ["--ep", str(ngpu), "--experts", "8", "--topk", "2",
                                         "--replica-slots", "0" if ngpu == 1 else "2", "--trials", tr] + dev, a.out))
    add_eq(run_equivalence("nccl_bf16", ["--ep", str(ngpu), "--experts", "16", "--topk", "4",
                                         "--replica-slots", "0" if ngpu == 1 else "3", "--trials", tr,
                                         "--dtype", "bf16"] + big + dev, a.out))
    add_eq(run_equivalence("shared_gpu_ep2_bf16", ["--ep", "2", "--experts", "16", "--topk", "4",
                                                   "--replica-slots", "3", "--trials", tr, "--dtype", "bf16",
                                                   "--dist-backend", "gloo"] + big + dev, a.out))
    add_eq(run_equivalence("shared_gpu_ep2_fp32", ["--ep", "2", "--experts", "8", "--topk", "2",
                                                   "--replica-slots", "2", "--trials", tr,
                                                   "--dist-backend", "gloo"] + dev, a.out))
    # ProbeConfig.control_path="device": counts, the Triton token split and the sizes' one
    # read-back on the GPU (on CPU, the dry run, under the Triton interpreter)
    interp = None if device.type == "cuda" else {"TRITON_INTERPRET": "1"}
    add_eq(run_equivalence("shared_gpu_ep2_device_control_fp32", [
        "--ep", "2", "--experts", "8", "--topk", "2", "--replica-slots", "2", "--trials", tr, "--dist-backend", "gloo",
        "--control-path", "device"] + dev, a.out, env=interp))
    add_eq(run_equivalence("shared_gpu_ep2_device_control_bf16", [
        "--ep", "2", "--experts", "16", "--topk", "4", "--replica-slots", "3", "--trials", tr, "--dtype", "bf16",
        "--dist-backend", "gloo", "--control-path", "device"] + big + dev, a.out, env=interp))
    if report["env"]["te_available"] and device.type == "cuda":
        for recipe in ("delayed", "current", "mxfp8"):
            add_eq(run_equivalence(f"te_fp8_{recipe}", ["--ep", str(ngpu), "--experts", "16", "--topk", "4",
                                                          "--replica-slots", "0", "--trials", "7", "--dtype",
                                                          "bf16", "--backend", "te", "--fp8", recipe] + big + dev,
                                   a.out))
    else:
        report["skipped"].append("Transformer Engine not importable here: TE GroupedLinear and FP8 recipes not run")
    from megatron_probe.mechanism.fp8 import fp8_unsupported_reason

    why_not_fp8 = fp8_unsupported_reason(device)
    if why_not_fp8 is None:  # FP8 without TE: the layer against the dense reference at the FP8 tolerance
        add_eq(run_equivalence("fp8_rowwise", ["--ep", str(ngpu), "--experts", "16", "--topk", "4",
                                               "--replica-slots", "0" if ngpu == 1 else "3", "--trials", "7",
                                               "--dtype", "bf16", "--backend", "fp8"] + big + dev, a.out))
    else:
        report["skipped"].append(f"expert_backend='fp8' not run: {why_not_fp8}")
    save(report, json_path)
    report["device_control"] = device_control_pipeline(device, a.quick, a.out)
    report["seconds"] = round(time.time() - t0, 1)
    # every row: no host synchronisation (or read, on CPU) and captured; bit-exact replay only
    # where top-2 makes it so (top-8's atomic adds may round differently: its difference is reported)
    graph_ok = all(r.get("host_syncs", "none") == "none" and r.get("captured", True)
                   and r.get("host_reads", "none").startswith("none")
                   and (r["topk"] != 2 or r.get("replay_equals_eager", True))
                   for r in report["graph_ep1"])
    if not report["graph_ep1"] and not any(s.startswith("EP 1 CUDA graph") for s in report["skipped"]):
        graph_ok = False
    copies_ok = bool(report["copies"]["rows"]) and all(r["ordered_copy_exact"] for r in report["copies"]["rows"])
    report["passed"] = (all(e.get("passed") for e in eq) and graph_ok and copies_ok
                        and report["device_control"]["passed"] and not report["errors"])
    report["complete"] = True
    save(report, json_path)
    print("\n== summary ==")
    for e in eq:
        print(f"{e['name']:22s} passed={e.get('passed')} trials={e.get('trials')} max_abs={e.get('max_abs_diff')} "
              f"backends={e.get('backends')} exact_vs_stock={e.get('bit_exact_vs_stock')}/{e.get('compared_with_stock')}")
    for r in report["experts"]:
        print(f"experts {r['backend']:10s} {r['ms']:.3f} ms {r['tflops']} TFLOP/s ({r['shape']})")
    for r in report["fp8_gemm"]:
        print("fp8 gemm", r)
    for r in report["layer"]:
        print(f"layer probe[{r['probe_backend']}]/stock = {r['probe_over_stock']} ({r['probe_ms']} vs {r['stock_ms']}"
              f"/{r['stock_ms_again']} ms, {r['shape']})")
    for r in report["graph_ep1"]:
        print("graph ep1", r)
    for r in report["copies"]["rows"]:
        print("copies", r)
    dc = report["device_control"]
    print("device control", "passed" if dc["passed"] else "FAILED", dc.get("error", ""),
          [{k: run[k] for k in ("cost_gate", "max_abs_diff", "copies", "ir_after", "read_backs")}
           for run in dc.get("ranks", [{}])[0].get("runs", [])])
    for s in report["skipped"]:
        print("skipped:", s)
    print(f"total {report['seconds']} s; all equivalence passed: {report['passed']}")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
