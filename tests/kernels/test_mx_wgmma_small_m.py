"""MXFP8 W8A8 at one to sixteen rows on FP8 ``wgmma`` (:mod:`mxrun.kernels.mx_wgmma_small_m`): the spread quantize
bit for bit against the reference quantize (on CPU under the interpreter too), the Gluon Linear against the
reference Linear on an sm_90 GPU (Gluon has no interpreter).

Tolerance of the Linear: kernel and reference add the same exact products (E4M3 x E4M3 codes times two powers of
two, exact in fp32); the kernel's FP8 ``wgmma`` accumulator keeps ~14 mantissa bits (see
``test_scaled_gemm.py``) and rounds each 32-wide group's sum once, by < 2^-13 of that group's sum |a b|, so the
result is off by < 2^-13 (|A| @ |W|^T) of the decoded operands plus fp32 reordering (~K 2^-24 of the same),
before the output's one-ulp rounding. We allow 2^-12 (|A| @ |W|^T) on top of one output ulp. Scales spread over
2^+-12 per group make a scale taken from the wrong group, row or column far off; ragged N, K tails of the
quantize and uneven splits check the masks.
"""

from __future__ import annotations

import pytest
import torch

from mxrun.kernels.box_major import BoxMajorWeight
from mxrun.kernels.mx_wgmma_small_m import (
    MX_ROWS_MAX_M,
    MX_ROWS_MIN_WEIGHT,
    mx_rows_fits,
    mx_rows_usable,
    quantize_spread,
    spread_activation_codes,
)
from mxrun.kernels.mxfp8_gemm import mxfp8_linear_reference
from mxrun.kernels.mxfp8_quantize import MxScaleRule, dequantize_mxfp8, quantize_mxfp8_reference
from mxrun.kernels.scaled_gemm import GemmInputError

from .device_cases import HAS_CUDA, KERNEL_CASTS, KERNEL_DEVICE, bits
from .test_scaled_gemm import assert_one_ulp

needs_sm90 = pytest.mark.skipif(
    not HAS_CUDA or torch.cuda.get_device_capability()[0] != 9, reason="the Gluon wgmma kernel is for sm_90"
)


def _spread_groups(rows: int, k: int, seed: int, scale: float) -> torch.Tensor:
    """Random values with every 32-wide group scaled by its own power of two in 2^+-12."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, k, generator=gen) * scale
    powers = torch.randint(-12, 13, (rows, k // 32), generator=gen).float().exp2()
    return (x.view(rows, k // 32, 32) * powers[..., None]).view(rows, k)


@pytest.mark.parametrize("cast", KERNEL_CASTS)
@pytest.mark.parametrize("rule", list(MxScaleRule))
@pytest.mark.parametrize(
    ("m", "k", "dtype"),
    [
        (1, 1152, torch.bfloat16),
        (3, 640, torch.float16),
        (4, 256, torch.bfloat16),
        (7, 384, torch.bfloat16),
        (16, 640, torch.float16),
    ],
)
def test_quantize_spread_is_the_reference_quantize_spread(m, k, dtype, rule, cast) -> None:
    """Codes and scale codes are the reference quantize's bytes (a NaN group, an all-zero group, a group of
    E4M3's largest values among them), the codes placed block-diagonally with zeros elsewhere; K not a multiple
    of the launch's 512 columns leaves a partial last program."""
    x = _spread_groups(m, k, seed=m + k, scale=1.0)
    x[0, 64:96] = 0.0
    x[m - 1, 128:160] = 448.0 * 2.0**5
    if dtype == torch.bfloat16:
        x[0, 200] = float("nan")
    x = x.to(dtype)
    ref = quantize_mxfp8_reference(x, rule)
    spread, scales = quantize_spread(x.to(KERNEL_DEVICE), rule, cast)
    assert torch.equal(bits(spread), bits(spread_activation_codes(ref.data)))
    assert torch.equal(bits(scales), bits(ref.scale_e8m0))


def test_spread_layout_holds_each_group_once() -> None:
    """The torch layout itself: row 4 m + j has row m's groups g with g % 4 == j, zeros elsewhere."""
    codes = torch.randint(1, 127, (2, 512), dtype=torch.uint8)
    spread = spread_activation_codes(codes.view(torch.float8_e4m3fn)).view(torch.uint8).view(2, 4, 16, 32)
    for m in range(2):
        for j in range(4):
            for g in range(16):
                expected = (
                    codes[m, 32 * g : 32 * g + 32] if g % 4 == j else torch.zeros(32, dtype=torch.uint8)
                )
                assert torch.equal(spread[m, j, g], expected)


def test_refusals() -> None:
    with pytest.raises(GemmInputError, match="M <= 16"):
        quantize_spread(torch.zeros(MX_ROWS_MAX_M + 1, 256, dtype=torch.bfloat16), MxScaleRule.ROUND_UP)
    with pytest.raises(GemmInputError, match="multiple of 128"):
        quantize_spread(torch.zeros(1, 96, dtype=torch.bfloat16), MxScaleRule.ROUND_UP)
    assert not mx_rows_usable(torch.zeros(1, 256, dtype=torch.bfloat16), torch.zeros(64, 256))  # not on a GPU


def test_the_linear_routes_only_shapes_measured_faster() -> None:
    """One to four rows of a weight of at least 24 Mi elements (8B ``qkv`` and up); 8B ``o``, five rows and more
    and shapes without rows stay on the split-K decode."""
    assert MX_ROWS_MIN_WEIGHT == 6144 * 4096
    assert mx_rows_fits(1, 6144, 4096) and mx_rows_fits(2, 57344, 8192) and mx_rows_fits(4, 4096, 14336)
    assert mx_rows_fits(3, 6144, 4096)
    assert not mx_rows_fits(1, 4096, 4096)
    assert not mx_rows_fits(5, 6144, 4096)
    assert not mx_rows_fits(0, 6144, 4096)


def _bound(x: torch.Tensor, qw, rule) -> torch.Tensor:
    qx = quantize_mxfp8_reference(x, rule)
    a = dequantize_mxfp8(qx.data, qx.scale_e8m0).abs()
    b = dequantize_mxfp8(qw.data, qw.scale_e8m0).abs()
    return 2.0**-12 * (a @ b.T)


@needs_sm90
@pytest.mark.parametrize(
    ("m", "n", "k", "splits", "box_major", "with_bias"),
    [
        (1, 4096, 4096, None, False, True),  # a decode row, the default split: 4 of 8 MMA columns
        (1, 6144, 4096, 1, True, False),  # one program walks all 32 steps, box-major weight
        (2, 100, 256, None, False, True),  # ragged N, all 8 columns
        (1, 200, 4224, 5, False, False),  # odd steps: one MMA at a time at one row
        (3, 200, 4224, 5, False, False),  # 12 of 16 columns, uneven splits of 7 steps (off the ring's slot 0)
        (4, 1024, 1024, 3, True, True),  # 16 columns, a last split shorter than the others, boxes
        (5, 300, 2048, None, False, True),  # 20 of 32 columns, ragged N
        (8, 4096, 2048, 1, True, False),  # all 32 columns, one program per column block, boxes
        (11, 200, 4224, 4, False, False),  # 44 of 64 columns, 33 steps in splits of 9
        (16, 640, 4096, 3, False, True),  # 64 columns, splits of 11, 11 and 10 steps, bias
    ],
)
@pytest.mark.parametrize("rule", list(MxScaleRule))
def test_linear_matches_the_reference(m, n, k, splits, box_major, with_bias, rule) -> None:
    from mxrun.kernels.mx_wgmma_small_m import mx_rows_linear

    x = _spread_groups(m, k, seed=m * 7 + n, scale=1.0).to(torch.bfloat16)
    qw = quantize_mxfp8_reference(
        _spread_groups(n, k, seed=n, scale=0.02).to(torch.bfloat16), MxScaleRule.FLOOR
    )
    bias = torch.randn(n).to(torch.bfloat16) if with_bias else None
    ref = mxfp8_linear_reference(x, qw.data, qw.scale_e8m0, bias, rule)
    weight = BoxMajorWeight.of(qw.data.cuda()) if box_major else qw.data.cuda()
    assert mx_rows_usable(x.cuda(), weight)
    run = lambda: mx_rows_linear(  # noqa: E731
        x.cuda(), weight, qw.scale_e8m0.cuda(), bias.cuda() if bias is not None else None, rule, splits=splits
    )
    out = run()
    assert_one_ulp(out, ref, _bound(x, qw, rule))
    assert torch.equal(out, run())  # deterministic, and the split counters were left at zero


@needs_sm90
@pytest.mark.parametrize("m", [1, 3, 16])
def test_pipeline_settings_give_the_same_bits(monkeypatch, m) -> None:
    """The settings that change only when things run (two MMAs in flight or one, the stages, the programmatic
    dependent launch) add the same products in the same order: the same output bits."""
    from mxrun.kernels import mx_wgmma_small_m
    from mxrun.kernels.mx_wgmma_small_m import mx_rows_linear

    n, k = 384, 3072
    x = _spread_groups(m, k, seed=5, scale=1.0).to(torch.bfloat16).cuda()
    qw = quantize_mxfp8_reference(_spread_groups(n, k, seed=6, scale=0.02).to(torch.bfloat16))
    w, ws = qw.data.cuda(), qw.scale_e8m0.cuda()
    outs = []
    for stages, pairs, pdl in ((3, False, False), (4, True, True), (6, True, False), (4, False, True)):
        monkeypatch.setattr(mx_wgmma_small_m, "STAGES", stages)
        monkeypatch.setattr(mx_wgmma_small_m, "PAIR_STAGES", max(stages, 4))
        monkeypatch.setattr(mx_wgmma_small_m, "PAIRS", pairs)
        monkeypatch.setattr(mx_wgmma_small_m, "PDL", pdl)
        outs.append(mx_rows_linear(x, w, ws, None, MxScaleRule.ROUND_UP, splits=3))
    for out in outs[1:]:
        assert torch.equal(bits(out), bits(outs[0]))


@needs_sm90
def test_a_nan_weight_scale_makes_its_column_nan() -> None:
    """E8M0 255 in one weight group: that output column NaN in every row, as the reference's decode gives."""
    from mxrun.kernels.mx_wgmma_small_m import mx_rows_linear

    m, n, k = 3, 384, 2048
    x = _spread_groups(m, k, seed=1, scale=1.0).to(torch.bfloat16).cuda()
    qw = quantize_mxfp8_reference(_spread_groups(n, k, seed=2, scale=0.02).to(torch.bfloat16))
    scales = qw.scale_e8m0.clone()
    scales.view(torch.uint8)[77, 40] = 255
    out = mx_rows_linear(x, qw.data.cuda(), scales.cuda(), None, MxScaleRule.ROUND_UP).float().cpu()
    assert torch.isnan(out[:, 77]).all()
    assert not torch.isnan(out[:, torch.arange(n) != 77]).any()


@needs_sm90
def test_weight_scales_of_the_wrong_shape_are_refused() -> None:
    from mxrun.kernels.mx_wgmma_small_m import mx_rows_linear

    x = torch.ones(1, 256, dtype=torch.bfloat16, device="cuda")
    w = torch.zeros(64, 256, device="cuda").to(torch.float8_e4m3fn)
    scales = torch.full((64, 4), 127, dtype=torch.uint8, device="cuda")
    with pytest.raises(GemmInputError, match=r"weight scales must be \[64, 8\]"):
        mx_rows_linear(x, w, scales, None, MxScaleRule.ROUND_UP)


@needs_sm90
def test_a_weight_without_rows_gives_an_empty_output() -> None:
    from mxrun.kernels.mx_wgmma_small_m import mx_rows_linear

    x = torch.ones(2, 256, dtype=torch.bfloat16, device="cuda")
    w = torch.zeros(0, 256, device="cuda").to(torch.float8_e4m3fn)
    scales = torch.zeros(0, 8, dtype=torch.uint8, device="cuda")
    out = mx_rows_linear(x, w, scales, None, MxScaleRule.ROUND_UP)
    assert out.shape == (2, 0) and out.dtype == torch.bfloat16


@needs_sm90
def test_the_mxfp8_linear_takes_it_at_one_to_four_rows(monkeypatch) -> None:
    """``mxfp8_linear`` W8A8 at one to four rows goes through this kernel (and matches the reference), at five
    rows not, nor with a weight below :data:`MX_ROWS_MIN_WEIGHT`."""
    from mxrun.kernels import mx_wgmma_small_m
    from mxrun.kernels.mxfp8_gemm import mxfp8_linear

    calls = []
    real = mx_wgmma_small_m.mx_rows_linear
    monkeypatch.setattr(
        mx_wgmma_small_m,
        "mx_rows_linear",
        lambda *args, **kw: calls.append(args[0].shape) or real(*args, **kw),
    )
    for n, k, ms in ((6144, 4096, (1, 3, 4, 5)), (4096, 4096, (1,))):
        qw = quantize_mxfp8_reference(_spread_groups(n, k, seed=3, scale=0.02).to(torch.bfloat16))
        for m in ms:
            x = _spread_groups(m, k, seed=4, scale=1.0).to(torch.bfloat16)
            ref = mxfp8_linear_reference(x, qw.data, qw.scale_e8m0, None, MxScaleRule.ROUND_UP)
            out = mxfp8_linear(x.cuda(), qw.data.cuda(), qw.scale_e8m0.cuda(), None, MxScaleRule.ROUND_UP)
            assert_one_ulp(out, ref, _bound(x, qw, MxScaleRule.ROUND_UP))
    assert calls == [torch.Size([1, 4096]), torch.Size([3, 4096]), torch.Size([4, 4096])]
