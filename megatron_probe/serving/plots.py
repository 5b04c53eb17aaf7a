"""Plots (matplotlib, PNG) and wandb logging of a serving result (see ``serving.summarise``).

Every figure's title names its regime (``model``: the shipped model end to end; ``scaled``:
enlarged experts replaying recorded routing) and workload.
"""

from __future__ import annotations

import os
from typing import Dict, List

COLORS = {"stock": "tab:gray", "static": "tab:gray", "probe": "tab:blue", "oracle": "tab:green"}


def _rolling(xs: List[float], n: int) -> List[float]:
    out, acc = [], []
    for x in xs:
        acc.append(x)
        if len(acc) > n:
            acc.pop(0)
        out.append(sum(acc) / len(acc))
    return out


def write_plots(res: Dict, out_dir: str) -> List[str]:
    """IR per step (stock vs PROBE), throughput per step (around the shift, if any), IR per
    layer, and the cost gate's state per layer and step (when the rows carry it). Returns the PNG
    paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    tag = f"{res['regime']} regime, {res['workload']}, EP {res['ep']}"
    stem = f"{res['regime']}_{res['workload']}_ep{res['ep']}"
    paths = []
    per_step = res["per_step"]
    ref = "probe" if "probe" in per_step else next(iter(per_step))
    ir_rows = [r for r in per_step.get(ref, []) if r.get("ir_before") is not None]
    if ir_rows:
        fig, ax = plt.subplots(figsize=(8, 3.5))
        ax.plot([r["step"] for r in ir_rows], [r["ir_before"] for r in ir_rows], color=COLORS["stock"],
                label="stock (Megatron placement)", lw=1)
        ax.plot([r["step"] for r in ir_rows], [r["ir_after"] for r in ir_rows], color=COLORS["probe"],
                label="PROBE", lw=1)
        paths.append(_per_step_figure(fig, ax, res, "imbalance ratio (max/mean rank load)",
                                      f"IR per step, mean over MoE layers ({tag})", out_dir, f"{stem}_ir_per_step.png"))
    fig, ax = plt.subplots(figsize=(8, 3.5))
    for mode, rows in per_step.items():
        rows = [r for r in rows if r.get("seconds")]
        if not rows:
            continue
        tput = [r["tokens"] / r["seconds"] for r in rows]
        ax.plot([r["step"] for r in rows], _rolling(tput, 10), color=COLORS.get(mode), label=mode, lw=1)
    paths.append(_per_step_figure(fig, ax, res, "processed tokens/s (rolling mean of 10 steps)",
                                  f"throughput per step ({tag})", out_dir, f"{stem}_throughput_per_step.png"))
    probe = res["modes"].get("probe", {})
    if probe.get("ir_before_per_layer"):
        b, a = probe["ir_before_per_layer"], probe["ir_after_per_layer"]
        xs = list(range(len(b)))
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.bar([x - 0.2 for x in xs], b, 0.4, color=COLORS["stock"], label="stock")
        ax.bar([x + 0.2 for x in xs], a, 0.4, color=COLORS["probe"], label="PROBE")
        ax.set_ylim(1.0, max(b + a) * 1.05)
        ax.set_xlabel("MoE layer")
        ax.set_ylabel("mean IR")
        ax.set_title(f"IR per layer ({tag})", fontsize=9)
        ax.legend(fontsize=8)
        paths.append(_save(fig, out_dir, f"{stem}_ir_per_layer.png"))
    gate_rows = [r for r in per_step.get("probe", []) if r.get("gate_on")]
    if gate_rows:
        import numpy as np

        layers = max(len(r["gate_on"]) for r in gate_rows)
        grid = np.full((layers, len(gate_rows)), np.nan)
        for j, r in enumerate(gate_rows):
            grid[: len(r["gate_on"]), j] = r["gate_on"]
        steps = [r["step"] for r in gate_rows]
        fig, ax = plt.subplots(figsize=(8, 0.4 * layers + 1.6))
        ax.imshow(grid, aspect="auto", interpolation="nearest", cmap="Greens", vmin=0, vmax=1,
                  extent=(steps[0] - 0.5, steps[-1] + 0.5, layers - 0.5, -0.5))
        if res.get("shift_step") is not None:
            ax.axvline(res["shift_step"], color="tab:red", ls="--", lw=0.8)
        ax.set_xlabel("engine step")
        ax.set_ylabel("MoE layer")
        ax.set_yticks(range(layers))
        ax.set_title(f"cost gate per layer (green: balancing, white: stock path) ({tag})", fontsize=9)
        paths.append(_save(fig, out_dir, f"{stem}_gate_per_layer.png"))
    return paths


def _per_step_figure(fig, ax, res, ylabel, title, out_dir, name):
    if res.get("shift_step") is not None:
        ax.axvline(res["shift_step"], color="tab:red", ls="--", lw=0.8, label="workload switch")
    ax.set_xlabel("engine step")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    return _save(fig, out_dir, name)


def _save(fig, out_dir, name):
    path = os.path.join(out_dir, name)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def log_to_wandb(res: Dict, project: str, run_dir: str, mode: str = "offline") -> str:
    """Per-step rows (``<mode>/<metric>``), the summary and the plots to one wandb run; returns
    the run folder."""
    from megatron_probe.serving.wandb_logger import WandbLogger

    config = {k: v for k, v in res.items() if k in ("regime", "workload", "ep", "options", "host", "stock_is")}
    logger = WandbLogger(project, run_dir, config, mode=mode, name=f"{res['regime']}-{res['workload']}-ep{res['ep']}")
    steps = sorted({r["step"] for rows in res["per_step"].values() for r in rows})
    by_mode = {m: {r["step"]: r for r in rows} for m, rows in res["per_step"].items()}
    for s in steps:
        row = {}
        for m, rows in by_mode.items():
            r = rows.get(s)
            if r is None:
                continue
            for k, v in r.items():
                if k != "step" and isinstance(v, (int, float)):
                    row[f"{m}/{k}"] = v
            if r.get("seconds"):
                row[f"{m}/tokens_per_s"] = r["tokens"] / r["seconds"]
        logger.log(row, step=s)
    summary = {f"{m}/{k}": v for m, d in res["modes"].items() for k, v in d.items() if isinstance(v, (int, float))}
    for k in ("throughput_ratio", "ttft_ratio", "tpot_ratio", "tokens_identical", "speedup", "gain_fraction"):
        if res.get(k) is not None:
            summary[k] = res[k]
    if logger.run is not None:
        import wandb

        logger.run.summary.update(summary)
        images = {os.path.splitext(os.path.basename(p))[0]: wandb.Image(p) for p in res.get("plots", [])}
        if images:
            logger.log(images)
    path = logger.run_path
    logger.finish()
    return path
