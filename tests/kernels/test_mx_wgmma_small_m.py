"""The Gluon MXFP8 small-M kernel (:mod:`mxrun.kernels.mx_wgmma_small_m`) against the MXFP8 reference, on an
sm_90 GPU only (Gluon has no interpreter).

Tolerance: kernel and reference add the same exact products (E4M3 x E4M3 times two powers of two, exact in
fp32), the kernel through one k=32 FP8 ``wgmma`` per MX group, whose accumulator keeps ~14 mantissa bits (see
``test_scaled_gemm.py``): one rounding per group of a sum bounded by the group's sum |a b|, < 2^-13 of it, so
the whole result is off by < 2^-13 (|A| @ |W|^T) of the decoded operands plus fp32 reordering (~K 2^-24 of the
same). We allow 2^-12 (|A| @ |W|^T). Scales spread over 2^+-12 per group make a scale taken from the wrong
group, row or column far off; K tails (K not a multiple of 128) and ragged N check the masks.
"""

from __future__ import annotations

import pytest
import torch

from mxrun.kernels.mxfp8_gemm import mxfp8_gemm_reference
from mxrun.kernels.mxfp8_quantize import MxScaleRule, dequantize_mxfp8, quantize_mxfp8_reference

from .device_cases import HAS_CUDA
from .test_scaled_gemm import assert_one_ulp

needs_sm90 = pytest.mark.skipif(
    not HAS_CUDA or torch.cuda.get_device_capability()[0] != 9, reason="the Gluon wgmma kernel is for sm_90"
)


def _spread(rows: int, k: int, seed: int, scale: float) -> torch.Tensor:
    """Random values with every 32-wide group scaled by its own power of two in 2^+-12."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, k, generator=gen) * scale
    powers = torch.randint(-12, 13, (rows, k // 32), generator=gen).float().exp2()
    return (x.view(rows, k // 32, 32) * powers[..., None]).view(rows, k)


def _operands(m: int, n: int, k: int, seed: int):
    x = _spread(m, k, seed, 1.0).to(torch.bfloat16)
    w = _spread(n, k, seed + 1, 0.02).to(torch.bfloat16)
    return quantize_mxfp8_reference(x, MxScaleRule.ROUND_UP), quantize_mxfp8_reference(
        w, MxScaleRule.ROUND_UP
    )


def _bound(qx, qw) -> torch.Tensor:
    a = dequantize_mxfp8(qx.data, qx.scale_e8m0).abs()
    b = dequantize_mxfp8(qw.data, qw.scale_e8m0).abs()
    return 2.0**-12 * (a @ b.T)


@needs_sm90
@pytest.mark.parametrize(
    ("m", "n", "k", "splits"),
    [
        (1, 4096, 4096, None),  # a decode row, the default split
        (1, 6144, 4096, 1),  # one program walks all 32 steps (more steps than slots)
        (16, 100, 160, None),  # ragged N, a K tail of one group after one full step
        (3, 200, 4128, 5),  # rows padded to 8, a K tail, splits of uneven length
        (9, 64, 32, None),  # rows padded to 16, one group only
        (16, 1000, 1024, 3),  # a last split shorter than the others
    ],
)
def test_partials_match_the_reference(m, n, k, splits) -> None:
    from mxrun.kernels.mx_wgmma_small_m import mx_wgmma_small_m_partials

    qx, qw = _operands(m, n, k, seed=m * 7 + n)
    ref = mxfp8_gemm_reference(qx.data, qx.scale_e8m0, qw.data, qw.scale_e8m0, None, torch.float32)
    args = [t.cuda() for t in (qx.data, qx.scale_e8m0, qw.data, qw.scale_e8m0)]
    partials = mx_wgmma_small_m_partials(*args, splits=splits)
    out = partials.sum(0).cpu()
    allowed = _bound(qx, qw) + 2.0**-20 * ref.abs()
    bad = (out - ref).abs() > allowed
    assert not bad.any(), f"{bad.sum().item()} of {bad.numel()} off; max {(out - ref).abs().max()}"
    assert torch.equal(partials, mx_wgmma_small_m_partials(*args, splits=splits))


@needs_sm90
def test_whole_linear_with_bias_and_a_nan_scale() -> None:
    """Partials, then the split sum with bias and the bf16 cast, within one output ulp plus the MMA's allowance
    of the reference Linear; a NaN weight scale (E8M0 255) makes its output column NaN in every row, as the
    reference's decode does, and no other."""
    from mxrun.kernels.mx_wgmma_small_m import mx_wgmma_small_m_partials
    from mxrun.kernels.small_m_gemm import sum_splits

    m, n, k = 5, 384, 2048
    qx, qw = _operands(m, n, k, seed=3)
    bias = torch.randn(n).to(torch.bfloat16)
    ref = mxfp8_gemm_reference(qx.data, qx.scale_e8m0, qw.data, qw.scale_e8m0, bias, torch.bfloat16)
    args = [t.cuda() for t in (qx.data, qx.scale_e8m0, qw.data, qw.scale_e8m0)]
    partials = mx_wgmma_small_m_partials(*args)
    c = torch.empty(m, n, dtype=torch.bfloat16, device="cuda")
    sum_splits(partials, None, None, bias.cuda(), c)
    assert_one_ulp(c, ref, _bound(qx, qw))

    scales = qw.scale_e8m0.clone()
    scales.view(torch.uint8)[77, 40] = 255
    args[3] = scales.cuda()
    out = mx_wgmma_small_m_partials(*args).sum(0).cpu()
    assert torch.isnan(out[:, 77]).all()
    assert not torch.isnan(out[:, torch.arange(n) != 77]).any()


@needs_sm90
@pytest.mark.parametrize(
    ("m", "n", "k", "splits"),
    [
        (1, 4096, 4096, None),  # a decode row: 4 of the MMA's 8 columns used
        (1, 6144, 4096, 1),  # one program walks all 32 steps
        (2, 100, 256, None),  # ragged N, all 8 columns
        (3, 200, 4224, 5),  # 12 of 16 columns, uneven splits
        (4, 1000, 1024, 3),  # 16 columns, a last split shorter than the others
    ],
)
def test_spread_partials_match_the_reference(m, n, k, splits) -> None:
    """The block-diagonal variant: each column its own row and group, summed per row at the end."""
    from mxrun.kernels.mx_wgmma_small_m import mx_wgmma_spread_partials, spread_activation_codes

    qx, qw = _operands(m, n, k, seed=m * 5 + n)
    ref = mxfp8_gemm_reference(qx.data, qx.scale_e8m0, qw.data, qw.scale_e8m0, None, torch.float32)
    spread = spread_activation_codes(qx.data.cuda())
    args = (spread, qx.scale_e8m0.cuda(), qw.data.cuda(), qw.scale_e8m0.cuda())
    partials = mx_wgmma_spread_partials(*args, splits=splits)
    out = partials.sum(0).cpu()
    allowed = _bound(qx, qw) + 2.0**-20 * ref.abs()
    bad = (out - ref).abs() > allowed
    assert not bad.any(), f"{bad.sum().item()} of {bad.numel()} off; max {(out - ref).abs().max()}"
    assert torch.equal(partials, mx_wgmma_spread_partials(*args, splits=splits))
