"""The live pipeline's control on the tokens' device (``ProbeConfig.control_path="device"``).

With the host path every MoE layer reads its all-gathered ``[ep, E]`` counts back, and the host
plans (the compiled greedy) and splits (the time objective). On a GPU each such read waits for
the device to reach that point, so the host stops queueing work ahead of it. Here:

* **plan**: layer L's forecast counts (carried by layer L-1's count exchange, so on the device)
  go to the Triton planner (``policy.planner_triton``, the host planner's plan exactly) on a side
  stream that waits only for that count exchange (an event the dispatcher records), beside the
  main stream's queued work (layer L-1's dispatch All-to-All and chunk sort). The host needs the
  ``[ep, R]`` placement to issue the copies (which then overlap layer L-1's experts), so it reads
  it back right there, before it queues the experts, waiting for the planner alone, not for the
  main stream. (Deferring that wait past the experts' launch would let the host queue them
  first, but the copies would then be issued behind them and miss their window.) Layer 0's plan,
  before the forward, and a plan from a forecaster that is not one layer ahead on device counts
  wait for the whole main stream instead (their counts come with no event; host counts, such as
  the oracle's, need no wait);
* **split**: the dispatch split is the exact token split on the device (``policy.split_triton``);
  the dispatcher then reads back only the All-to-All's split sizes, in one pinned copy
  (``mechanism.dispatcher``);
* **step end**: what the metrics and the cost gate need of every layer (true counts, the
  assignment, the carried cost column) is read back once per step, in one copy.

On CPU the same code runs with no streams and the Triton kernels under ``TRITON_INTERPRET=1``
(tests); without the interpreter a CPU model is refused by name.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from typing import List, Optional, Sequence

import torch

from megatron_probe.mechanism.comm import device_to_host, host_to_device
from megatron_probe.mechanism.profiling import nvtx_range
from megatron_probe.policy.cost_model import ExpertCost
from megatron_probe.policy.placement import ExpertLayout


def check_device_control(device: torch.device) -> None:
    """Refuse ``control_path="device"`` where its Triton kernels cannot run."""
    if importlib.util.find_spec("triton") is None:
        raise ValueError("control_path='device' runs Triton kernels and triton is not installed; valid: install "
                         "triton, or control_path='host'")
    if device.type == "cuda":
        return
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        return
    raise ValueError(f"control_path='device' on a {device.type} model: its Triton kernels run on a CUDA GPU, or on "
                     "CPU only under TRITON_INTERPRET=1 (set before triton is imported; for tests); valid: a CUDA "
                     "model, that variable, or control_path='host'")


class DeviceControl:
    """Plan, split and step-end read-back on ``device`` (module docstring)."""

    def __init__(self, device: torch.device, layout: ExpertLayout, cost: ExpertCost):
        check_device_control(device)
        self.device, self.layout, self.cost = device, layout, cost
        self.plan_stream = torch.cuda.Stream(device=device) if device.type == "cuda" else None
        self.read_backs = 0  # host reads this object made (plans and step ends), for tests and summaries

    def _on_plan_stream(self, ready):
        """The side stream, after ``ready``: the event of the count exchange that produced the
        counts, or the counts themselves (a host tensor needs no wait; a device tensor of unknown
        origin waits for everything queued on the main stream so far)."""
        if self.plan_stream is None:
            return contextlib.nullcontext()
        if isinstance(ready, torch.Tensor):
            if ready.device.type == "cuda":
                self.plan_stream.wait_stream(torch.cuda.current_stream(self.device))
        else:
            self.plan_stream.wait_event(ready)
        return torch.cuda.stream(self.plan_stream)

    def plan(self, counts: torch.Tensor, budget_in: int, copy_charge_us: float,
             ready: Optional[object] = None) -> torch.Tensor:
        """The PROBE plan's placement ``[ep, R]`` (host) of forecast ``counts [ep, E]``: the
        host's :func:`~megatron_probe.policy.planner.plan_with_copy_charge`, planned on the side
        stream; the host waits for the planner only."""
        from megatron_probe.policy.planner_triton import plan_probe_triton

        src = counts.detach()
        with nvtx_range("plan_device"), self._on_plan_stream(src if ready is None else ready):
            if self.plan_stream is not None and src.device.type == "cuda":
                src.record_stream(self.plan_stream)  # read on the side stream: kept until it has run
            # converted on the side stream, after the wait (a copy made on the main stream would race)
            counts = src.to(self.device).long()
            slots = plan_probe_triton(counts, self.layout, self.cost, budget_in=budget_in,
                                      copy_charge_us=copy_charge_us, assignment=False)[0]
            self.read_backs += 1
            return device_to_host(slots).clone()

    def split(self, counts: torch.Tensor, placement: torch.Tensor) -> torch.Tensor:
        """The exact token split of the true ``counts [ep, E]`` (on the device) over ``placement``
        (host ``[ep, R]``): ``[ep, E, ep]`` on the device, nothing read back."""
        from megatron_probe.policy.split_triton import placement_token_split_device

        with nvtx_range("split_device"):
            return placement_token_split_device(counts, host_to_device(placement, counts.device), self.layout)[0]

    def read_back(self, tensors: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        """``tensors`` (integer) on the host: those on the device in one copy, host ones as they
        are (a dispatch that took the host path left its figures there)."""
        on_device = [t for t in tensors if t.device == self.device]
        host = None
        if on_device:
            self.read_backs += 1
            host = device_to_host(torch.cat([t.reshape(-1).long() for t in on_device]))
        out, at = [], 0
        for t in tensors:
            if t.device != self.device:
                out.append(t.long().cpu())
                continue
            out.append(host[at:at + t.numel()].view(t.shape).clone())
            at += t.numel()
        return out
