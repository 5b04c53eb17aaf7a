"""Run policies over a workload of per-step, per-layer counts and time every layer.

``counts [steps, L_sim, ep, E]``: the simulated layers stand for the model's ``moe_layers`` (each
a sample of them: step time = sum of the simulated layers' times x ``moe_layers / L_sim``).

Per layer and policy (see :mod:`megatron_probe.sim.policies` for the policies):

* split-phase transfers (``probe``, ``ours``, ``ours-resident``, ``ours-noplan``): the window is the previous
  layer's expert phase (same policy, same step; the last layer of the previous step for layer 0;
  the estimate ``transfer_window_us`` at the very first layer) plus this layer's attention;
  ``exposed = max(0, max_r T_trans_r - window)``; ``probe``'s SM-based copy slows the expert
  GEMMs of a rank by ``copy_sm_fraction x min(T_trans_r, window)``.
* naive overlap (``ours-naive``): copies start with the previous layer's dispatch and share the
  links with both All-to-Alls; while they collide, the All-to-All is delayed by as long as the
  copy runs beside it (the link is shared), and the rest of the copy that does not fit before
  this layer's dispatch is exposed.
* EPLB (``eplb``, ``eplb-same``): the copies of a rebalance, per rank summed over every layer of
  the model, charged to the next ``eplb_spread_steps`` steps in equal parts.

Control path (``cfg.control`` ``host`` | ``gpu``, :mod:`megatron_probe.sim.control`): each
layer of a policy that plans every step adds its planner + split + count exchange + forecast
time on the critical path, after the transfer window (the copies start once the plan exists, so
the window does not grow). ``step_us`` then includes it and ``step_us_nocontrol`` does not.

Results: per policy the step times (us), means over steps x layers of IR (max/mean tokens
per rank), compute max/mean, exposed transfer time and copies per layer, and the replica memory
per rank (``policies.replica_memory``).
"""

from __future__ import annotations

from typing import Dict, Iterable, Optional

import torch

from megatron_probe.policy.cost_model import transfer_window_us
from megatron_probe.sim.control import control_pieces, control_prices
from megatron_probe.sim.error_model import noisy_forecast
from megatron_probe.sim.layer import attention_us, layer_time, tokens_per_rank
from megatron_probe.sim.policies import Policies, SimConfig, budgets, replica_memory


def simulate(counts: torch.Tensor, cfg: SimConfig, policies: Iterable[str], forecast: Optional[torch.Tensor] = None,
             keep_layers: bool = False, summary_from: int = 0) -> Dict:
    """Simulate ``policies`` on ``counts``. ``forecast`` (same shape) replaces the error model's
    forecast when given. The per-layer means (IR, times, copies) cover steps ``summary_from`` on
    (e.g. after EPLB's warm-up); ``step_us`` has every step."""
    if not 0 <= summary_from < counts.shape[0]:
        raise ValueError(f"summary_from={summary_from} must be in 0..{counts.shape[0] - 1}")
    steps, Ls, ep, E = counts.shape
    shape = cfg.model.shape
    if ep != cfg.topo.ep or E != shape.num_experts:
        raise ValueError(f"counts [.., {ep}, {E}] do not match ep={cfg.topo.ep}, experts={shape.num_experts}")
    names = tuple(policies)
    scale = cfg.model.moe_layers / Ls
    tok_rank = max(1, int(round(float(tokens_per_rank(counts[0, 0], shape.topk).mean()))))
    w_est = transfer_window_us(cfg.hw, shape, tok_rank, cfg.context, ep)
    b_probe, b_ours = budgets(cfg, w_est)
    pol = Policies(cfg, Ls, names, b_probe, b_ours, w_est)
    ctl = control_prices(cfg, tok_rank)
    bad = [n for n in names if ctl[n] != ctl[n]]
    if bad:
        raise ValueError(f"control={cfg.control!r}: no measurement prices {bad} (the resident planner was not "
                         f"measured on GPU); use control='host' or leave these policies out")
    ctl_step = {n: ctl[n] * Ls * scale for n in names}  # per step: every MoE layer of the model
    gen = torch.Generator().manual_seed(cfg.seed + 17)
    step_us = {n: [0.0] * steps for n in names}
    acc = {n: {"ir": 0.0, "ir_comp": 0.0, "exposed_us": 0.0, "copies": 0.0, "attn_us": 0.0, "dispatch_us": 0.0,
               "comp_us": 0.0, "combine_us": 0.0, "a2a_extra_us": 0.0} for n in names}
    prev = {n: None for n in names}  # previous layer's timing (for windows)
    per_layer = {n: [] for n in names} if keep_layers else None
    for s in range(steps):
        eplb_in = {n: torch.zeros(ep, dtype=torch.float64) for n in names}  # rebalance copies, all layers
        for l in range(Ls):
            C = counts[s, l]
            P = forecast[s, l] if forecast is not None else noisy_forecast(C, cfg.sigma, gen)
            pol.new_layer()
            attn = attention_us(cfg.hw, shape, tokens_per_rank(C, shape.topk), cfg.context)
            for n in names:
                pv = prev[n]
                prev_comp = pv["comp_us"] if pv else w_est - attn
                window = prev_comp + attn
                plan = pol.plan(n, l, C, P, window)
                trans = pol.transfer(plan)
                exposed, a2a_extra, comp_extra = 0.0, 0.0, None
                if plan.mode == "split":
                    exposed = max(0.0, float(trans.max()) - window)
                    if plan.sm_copy and cfg.copy_sm_fraction > 0:
                        comp_extra = cfg.copy_sm_fraction * torch.clamp(trans, max=window)
                elif plan.mode == "naive":
                    t = float(trans.max())
                    d_prev = pv["dispatch_us"] if pv else 0.0
                    c_prev = pv["combine_us"] if pv else 0.0
                    a2a_extra = min(t, d_prev) + min(max(0.0, t - d_prev - prev_comp), c_prev)
                    exposed = max(0.0, t - (d_prev + prev_comp + c_prev + attn))
                elif plan.mode == "eplb":
                    eplb_in[n] += trans
                r = layer_time(cfg.hw, shape, cfg.topo, pol.cost, C, plan.assign, cfg.context, exposed, a2a_extra,
                               comp_extra)
                prev[n] = r
                step_us[n][s] += r["total_us"] * scale
                a = acc[n]
                if s >= summary_from:
                    for k in ("ir", "ir_comp", "exposed_us", "attn_us", "dispatch_us", "comp_us", "combine_us",
                              "a2a_extra_us"):
                        a[k] += r[k]
                    a["copies"] += plan.copies
                if keep_layers:
                    per_layer[n].append(dict(step=s, layer=l, copies=plan.copies, **r))
        for n, t in eplb_in.items():
            if float(t.max()) > 0:
                charge = float(t.max()) * scale / cfg.eplb_spread_steps
                for j in range(s + 1, min(steps, s + 1 + cfg.eplb_spread_steps)):
                    step_us[n][j] += charge
    nocontrol = {n: list(step_us[n]) for n in names}
    for n in names:
        step_us[n] = [t + ctl_step[n] for t in step_us[n]]
    n_lay = (steps - summary_from) * Ls
    out = {"policies": {}, "budget_probe": b_probe, "budget_ours": b_ours, "window_est_us": round(w_est, 1),
           "tokens_per_rank": tok_rank, "layer_scale": scale, "control": cfg.control}
    if cfg.control != "none":
        out["control_pieces_us"] = {k: round(v, 2) for k, v in control_pieces(cfg, tok_rank).items()}
    for n in names:
        a = acc[n]
        out["policies"][n] = {
            "step_us": step_us[n], "mean_step_us": sum(step_us[n]) / steps,
            "step_us_nocontrol": nocontrol[n], "control_us_per_layer": ctl[n],
            **{k: a[k] / n_lay for k in a}, "replica_memory_experts_per_rank": replica_memory(cfg, n)}
    if keep_layers:
        out["layers"] = per_layer
    return out
