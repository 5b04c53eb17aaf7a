"""FP8 expert GEMMs without Transformer Engine (``mechanism/fp8.py``): the quantisation math, the
group padding and the two FP8 projections against a float reference, on CPU. The kernel
(``torch._scaled_grouped_mm``) runs only on CUDA 9.0/10.0: ``reference_mm`` stands in for it here,
and elsewhere the backend is refused by name."""

import pytest
import torch
import torch.nn.functional as F

from distributed import moe_config
from megatron_probe import ProbeConfig
from megatron_probe.mechanism import fp8
from megatron_probe.mechanism.expert_compute import SlotExpertCompute, resolve_backend

pytestmark = pytest.mark.skipif(fp8.FP8_DTYPE is None, reason="this torch has no float8_e4m3fn")


def test_quantize_rows_scales_each_row_to_the_e4m3_range():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 64, generator=gen) * torch.logspace(-3, 3, 6).unsqueeze(1)
    x[2] = 0.0
    q, scale = fp8.quantize_rows(x)
    assert q.dtype == fp8.FP8_DTYPE and scale.dtype == torch.float32 and scale.shape == (6,)
    assert scale[2] == 1.0 and torch.equal(q[2].float(), torch.zeros(64))
    rows = [0, 1, 3, 4, 5]
    assert torch.equal(q[rows].float().abs().amax(dim=1), torch.full((5,), fp8.FP8_MAX))  # the row max maps to 448
    back = fp8.dequantize_rows(q, scale)
    normal = x.abs() >= scale.unsqueeze(1) * 2.0 ** -6  # E4M3's normal range, relative to the row's scale
    rel = ((back - x).abs() / x.abs().clamp_min(1e-30))[normal]
    assert float(rel.max()) <= 2.0 ** -4 + 1e-6, float(rel.max())  # 3 mantissa bits: half an ulp
    # below it, E4M3's subnormals are 2^-9 apart: half a step of absolute error at most
    excess = ((back - x).abs() - scale.unsqueeze(1) * 2.0 ** -10)[~normal]
    assert excess.numel() > 0 and float(excess.max()) <= 1e-12, excess


def test_padded_rows_align_each_group():
    padded, idx = fp8.padded_rows([0, 5, 16, 17], 16)
    assert padded == [0, 16, 16, 32]
    assert idx.tolist() == list(range(0, 5)) + list(range(16, 32)) + list(range(32, 49))
    assert fp8.padded_rows([], 16)[0] == [] and fp8.padded_rows([], 16)[1].numel() == 0


@pytest.mark.parametrize("counts", [[7, 0, 33, 16, 1], [0, 0, 0], [64]])
def test_fp8_grouped_linear_matches_the_float_gemm(counts):
    gen = torch.Generator().manual_seed(sum(counts) + len(counts))
    G, K, N = len(counts), 64, 48
    x = torch.randn(sum(counts), K, generator=gen)
    w = torch.randn(G, N, K, generator=gen) / K ** 0.5
    w_q, w_scale = fp8.quantize_rows(w)
    assert w_q.transpose(-2, -1).stride()[-2] == 1  # column-major, as the kernel wants it
    y = fp8.fp8_grouped_linear(x, w_q, w_scale, counts, torch.float32, mm=fp8.reference_mm)
    ref = torch.cat([xg @ w[g].T for g, xg in enumerate(torch.split(x, counts))]) if sum(counts) else \
        torch.zeros(0, N)
    assert y.shape == ref.shape
    if sum(counts):
        # exactly the GEMM of the dequantised operands: the padding and the row gather lose nothing
        w_deq = fp8.dequantize_rows(w_q, w_scale)
        x_deq = fp8.dequantize_rows(*fp8.quantize_rows(x))
        exact = torch.cat([xg @ w_deq[g].T for g, xg in enumerate(torch.split(x_deq, counts))])
        assert torch.allclose(y, exact, rtol=1e-5, atol=1e-6)
        # two E4M3 operands, each with about 2.5% rms rounding error: about 3.5% on Gaussian data
        rel = float((y - ref).norm() / ref.norm())
        assert rel <= 0.05, rel
    with pytest.raises(ValueError, match="2 token counts for 3 weight groups"):
        fp8.fp8_grouped_linear(x[:2], fp8.quantize_rows(torch.randn(3, 4, K))[0], torch.ones(3, 4), [1, 1],
                               torch.float32, mm=fp8.reference_mm)


def test_fp8_expert_compute_close_to_the_loop_backend_and_quantises_weights_once():
    """Megatron's expert MLP (gated SiLU, probs before fc2) in FP8: the two FP8 projections with
    Megatron's activation between them, within 8% of the same in float;
    the weights are quantised once per bank version."""
    cfg = moe_config(1, H=64, Fh=32)
    gen = torch.Generator().manual_seed(3)
    counts = [9, 0, 40, 17]
    S, H, Fh = len(counts), 64, 32
    x = torch.randn(sum(counts), H, generator=gen)
    probs = torch.rand(sum(counts), generator=gen)
    fc1 = torch.randn(S, 2 * Fh, H, generator=gen) / H ** 0.5
    fc2 = torch.randn(S, H, Fh, generator=gen) / Fh ** 0.5
    ref = SlotExpertCompute(cfg, "loop")(x, torch.tensor(counts), probs, fc1, fc2)
    comp = SlotExpertCompute(cfg, "fp8")
    y = comp._fp8_compute(x, counts, probs, fc1, fc2, mm=fp8.reference_mm)
    # the two projections in FP8, the activation between them as Megatron's
    from megatron_probe.mechanism.expert_compute import expert_activation

    h = fp8.fp8_grouped_linear(x, *fp8.quantize_rows(fc1), counts, x.dtype, mm=fp8.reference_mm)
    want = fp8.fp8_grouped_linear(expert_activation(h, probs, cfg), *fp8.quantize_rows(fc2), counts, x.dtype,
                                  mm=fp8.reference_mm)
    assert torch.equal(y, want)
    # against float: four quantised operands in two chained GEMMs (about 3.5% each on Gaussian data)
    rel = float((y - ref).norm() / ref.norm())
    assert 0 < rel <= 0.08, rel
    first = comp._fp8
    comp._fp8_compute(x, counts, probs, fc1, fc2, mm=fp8.reference_mm)
    assert comp._fp8 is first  # the same weights: not quantised again
    fc1.mul_(2.0)  # written in place (a load, a copy into the bank): quantised again
    y2 = comp._fp8_compute(x, counts, probs, fc1, fc2, mm=fp8.reference_mm)
    assert comp._fp8 is not first and not torch.equal(y2, y)
    second = comp._fp8
    comp._fp8_compute(x, counts, probs, fc1.clone(), fc2, mm=fp8.reference_mm)  # another tensor
    assert comp._fp8 is not second
    with pytest.raises(ValueError, match="fc1's inner dimension 60 is not a multiple of 16"):
        SlotExpertCompute(cfg, "fp8")._fp8_compute(x[:, :60], counts, probs, fc1[..., :60], fc2,
                                                   mm=fp8.reference_mm)
    assert F.silu is cfg.activation_func


def test_fp8_backend_refused_where_the_kernel_does_not_run():
    assert ProbeConfig(expert_backend="fp8").expert_backend == "fp8"
    with pytest.raises(RuntimeError, match=r"expert_backend='fp8': .*(compute capability 9.0 or 10.0|no float8)"):
        resolve_backend("fp8", torch.device("cpu"), torch.bfloat16)
    if torch.cuda.is_available() and fp8.fp8_unsupported_reason(torch.device("cuda")) is None:
        with pytest.raises(RuntimeError, match="gives bf16 outputs only; the model is torch.float32"):
            resolve_backend("fp8", torch.device("cuda"), torch.float32)
    assert resolve_backend("auto", torch.device("cpu"), torch.float32) != "fp8"
