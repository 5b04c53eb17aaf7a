"""Hardware profiles and the cost model the planner, the baselines and the simulator share.

Expert compute. PROBE writes ``T = n F / (eta(n) F_peak)`` with a grouped-GEMM efficiency
``eta`` that falls for small token counts ``n``. We use ``eta(n) = eta_max n / (n + n_half)``,
which makes the time *affine* in ``n``:

    T_expert(n) = (n + n_half [n > 0]) * F / (eta_max * F_peak)

so one active expert costs a fixed ``n_half`` tokens' worth of time plus a per-token rate.
``n_half`` (tokens at which the GEMM reaches half its peak efficiency) and ``eta_max`` are
device properties, measured by ``tools/calibrate_hardware.py``.

All-to-All. Rank ``r`` sends ``V_out`` and receives ``V_in`` bytes (a token sent to several
experts on one rank travels once); ``T_a2a = latency + max_r max(V_in, V_out) / BW`` per
direction, dispatch and combine each.

Transfers. An expert's weights are ``W = 3 H I`` parameters (gate, up, down); moving
``k`` experts into a rank takes ``k W / BW_link``; it is hidden when it fits the window
(the compute it overlaps). ``transfer_budget`` turns a window into a number of experts.

Presets cite public figures (vendor datasheets) and the measurements of this workplace's H200.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Dict

import torch

from megatron_probe import fileformat as ff


@dataclass(frozen=True)
class HardwareProfile:
    name: str
    peak_tflops: float  # dense bf16 matrix TFLOP/s
    hbm_gbps: float  # device memory bandwidth, GB/s
    nvlink_gbps: float  # intra-node GPU-to-GPU bandwidth per direction, GB/s
    ib_gbps: float  # inter-node bandwidth per GPU per direction, GB/s
    gpus_per_node: int = 8
    gemm_eta_max: float = 0.75  # grouped-GEMM efficiency at large token counts
    gemm_n_half: float = 64.0  # tokens per expert at which efficiency is half of eta_max
    a2a_latency_us: float = 25.0
    source: str = ""

    def to_json(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump(dataclasses.asdict(self), f, indent=2)

    @classmethod
    def from_json(cls, path: str) -> "HardwareProfile":
        """Read a profile written by :meth:`to_json` (``tools/calibrate_hardware.py``), checking every
        field; raises :class:`~megatron_probe.fileformat.InputFileError` (a ValueError) naming the
        file, the field and what was expected."""
        data = ff.load_json(path, "a hardware profile JSON (tools/calibrate_hardware.py)")
        known = [f.name for f in dataclasses.fields(cls)]
        bad = set(data) - set(known)
        if bad:
            raise ff.InputFileError(f"{path}: unknown hardware profile fields {sorted(bad)}; valid: {known}")
        ff.field(data, "name", path, "str")
        ff.field(data, "source", path, "str", default="")
        for name in ("peak_tflops", "hbm_gbps", "nvlink_gbps", "ib_gbps"):
            if ff.field(data, name, path, "number") <= 0:
                raise ff.InputFileError(f"{path}: field {name!r} is {data[name]}, expected a number > 0")
        ff.field(data, "gpus_per_node", path, "int", lo=1, default=1)
        eta = ff.field(data, "gemm_eta_max", path, "number", default=0.75)
        if not 0 < eta <= 1:
            raise ff.InputFileError(f"{path}: field 'gemm_eta_max' is {eta}, expected a number in (0, 1]")
        for name in ("gemm_n_half", "a2a_latency_us"):
            ff.field(data, name, path, "number", lo=0, default=0)
        return cls(**data)


# Public figures. Peak/HBM/NVLink: NVIDIA H100 and H200 datasheets (SXM: 989 TFLOP/s dense BF16,
# 3.35 / 4.8 TB/s HBM, NVLink 900 GB/s total = 450 GB/s per direction), H800 (NVLink cut to
# 400 GB/s total), A100 SXM datasheet (312 TFLOP/s BF16, 2.0 TB/s, NVLink 600 GB/s total);
# InfiniBand NDR 400 Gb/s per GPU = 50 GB/s (about 45 usable). H200 peak here uses the 790
# TFLOP/s measured on this workplace's lent H200 (shared/notes/peers.md). eta_max and n_half are
# leads until tools/calibrate_hardware.py measures a device.
PRESETS: Dict[str, HardwareProfile] = {
    "h100-sxm": HardwareProfile("h100-sxm", 989.0, 3350.0, 450.0, 45.0, source="NVIDIA H100 SXM datasheet; IB NDR 400G"),
    "h200-sxm": HardwareProfile("h200-sxm", 790.0, 4800.0, 450.0, 45.0,
                                source="NVIDIA H200 SXM datasheet (HBM, NVLink); 790 TFLOP/s bf16 measured here"),
    "h800": HardwareProfile("h800", 989.0, 3350.0, 200.0, 45.0, source="NVIDIA H800 SXM (NVLink 400 GB/s total)"),
    "a100-sxm": HardwareProfile("a100-sxm", 312.0, 2039.0, 300.0, 22.5, gemm_n_half=48.0,
                                source="NVIDIA A100 SXM 80GB datasheet; IB HDR 200G"),
}


def get_profile(name_or_path: str) -> HardwareProfile:
    if name_or_path in PRESETS:
        return PRESETS[name_or_path]
    if name_or_path.endswith(".json"):
        return HardwareProfile.from_json(name_or_path)
    raise ValueError(f"unknown hardware profile {name_or_path!r}; presets: {sorted(PRESETS)} or a JSON file")


@dataclass(frozen=True)
class ModelShape:
    hidden: int
    expert_hidden: int
    num_experts: int
    topk: int
    bytes_per_param: float = 2.0  # bf16
    bytes_per_activation: float = 2.0
    kv_dim: int = 0  # key (= value) width per token: heads_kv * head_dim; 0 means hidden (no GQA)

    @property
    def flops_per_token_expert(self) -> float:
        return 2.0 * 3 * self.hidden * self.expert_hidden  # gate, up, down

    @property
    def expert_bytes(self) -> float:
        return 3.0 * self.hidden * self.expert_hidden * self.bytes_per_param


@dataclass(frozen=True)
class ExpertCost:
    """Affine expert time: ``per_token * n + per_active_expert * [n > 0]`` (microseconds)."""

    per_token_us: float
    per_active_expert_us: float

    @classmethod
    def from_profile(cls, hw: HardwareProfile, shape: ModelShape) -> "ExpertCost":
        rate = hw.gemm_eta_max * hw.peak_tflops * 1e12  # FLOP/s
        per_token = shape.flops_per_token_expert / rate * 1e6
        return cls(per_token, per_token * hw.gemm_n_half)

    def rank_time(self, tokens_per_slot: torch.Tensor) -> torch.Tensor:
        """``[..., S]`` tokens per expert slot -> ``[...]`` compute time (us)."""
        t = tokens_per_slot.to(torch.float64)
        return self.per_token_us * t.sum(-1) + self.per_active_expert_us * (t > 0).sum(-1).to(torch.float64)


def a2a_time_us(hw: HardwareProfile, send_bytes: torch.Tensor, recv_bytes: torch.Tensor, inter_node: bool) -> float:
    """One All-to-All: ``send_bytes``/``recv_bytes`` ``[ep]`` bytes leaving/entering each rank
    (excluding a rank's traffic to itself)."""
    bw = (hw.ib_gbps if inter_node else hw.nvlink_gbps) * 1e9
    vol = torch.maximum(send_bytes.double(), recv_bytes.double()).max()
    return hw.a2a_latency_us + float(vol) / bw * 1e6


def dispatch_volume(token_ranks: torch.Tensor, src_rank: torch.Tensor, ep: int, token_bytes: float):
    """Bytes each rank sends and receives in a dispatch, with de-duplication: a token routed to
    several experts on one destination rank is sent there once.

    Args:
        token_ranks: ``[T, K]`` destination rank of each (token, choice).
        src_rank: ``[T]`` rank the token lives on.
    """
    T, K = token_ranks.shape
    pair = torch.zeros(T, ep, dtype=torch.bool)
    pair[torch.arange(T).unsqueeze(1).expand(T, K), token_ranks] = True
    pair[torch.arange(T), src_rank] = False  # staying local costs no link
    send = torch.zeros(ep, dtype=torch.float64).index_add_(0, src_rank, pair.sum(1).double())
    recv = pair.sum(0).double()
    return send * token_bytes, recv * token_bytes


def transfer_time_us(hw: HardwareProfile, shape: ModelShape, experts: int, inter_node: bool = False) -> float:
    bw = (hw.ib_gbps if inter_node else hw.nvlink_gbps) * 1e9
    return experts * shape.expert_bytes / bw * 1e6


def attention_time_us(hw: HardwareProfile, shape: ModelShape, tokens: int, context: int) -> float:
    """Rough attention block time for ``tokens`` tokens of ``context`` length: projections
    (8 H^2 FLOPs per token) and scores (4 H context), or the bytes it must read (weights and
    KV cache), whichever is larger."""
    flops = tokens * (8.0 * shape.hidden ** 2 + 4.0 * shape.hidden * context)
    t_flops = flops / (hw.gemm_eta_max * hw.peak_tflops * 1e12)
    kv = shape.kv_dim or shape.hidden
    read = 4.0 * shape.hidden ** 2 * shape.bytes_per_param + tokens * 2.0 * context * kv * shape.bytes_per_activation
    return max(t_flops, read / (hw.hbm_gbps * 1e9)) * 1e6


def transfer_window_us(hw: HardwareProfile, shape: ModelShape, tokens_per_rank: int, context: int, ep: int) -> float:
    """Compute a prefetch may hide behind: layer L-1's expert GEMMs on a balanced rank plus
    layer L's attention (the two phases of PROBE's split-phase transfer; the combine All-to-All
    in between is excluded because the transfer is suspended then)."""
    cost = ExpertCost.from_profile(hw, shape)
    pairs = tokens_per_rank * shape.topk  # balanced: each rank computes its share of all pairs
    active = min(shape.num_experts // ep, pairs)
    experts_t = cost.per_token_us * pairs + cost.per_active_expert_us * active
    return experts_t + attention_time_us(hw, shape, tokens_per_rank, context)


def transfer_budget(hw: HardwareProfile, shape: ModelShape, window_us: float, inter_node: bool = False) -> int:
    """Experts whose weights can move into one rank inside the window."""
    per = transfer_time_us(hw, shape, 1, inter_node)
    return int(window_us // per) if per > 0 else 0
