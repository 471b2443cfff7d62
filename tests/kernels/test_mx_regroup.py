"""The MXFP8 W8A8 "aligned" path: MX-rule quantization over 1x128 groups, MXFP8 weights regrouped to 128x128
power-of-two tiles, and the Linear that multiplies them with the block-scaled FP8 GEMM.

Kernels against their references bit for bit (bytes and fp32 scale bits). The references against exact MXFP8:
every element that is an E4M3 normal at the common scale ``S`` keeps its MXFP8 value exactly, the others move
by at most half a subnormal step, ``2^-10 S`` (mx_regroup's module docstring). The Linear against exact MXFP8
(``mxfp8_linear_reference``) then obeys, per output, the first-order bound
``sum_k |da_k| |w_k| + |a_k| |dw_k| + |da_k| |dw_k|`` with ``|da| <= 2^-10 S_a`` and ``|dw| <= 2^-10 S_w``,
plus the two results' own rounding (one bf16 ulp each, and the fp32 sums).
"""

from __future__ import annotations

import pytest
import torch

from mxrun.kernels import mxfp8_gemm
from mxrun.kernels.fp8_quantize import dequantize_fp8, expand_fp8_scale
from mxrun.kernels.mx_regroup import (
    align_mxfp8,
    aligned_tile_scales,
    quantize_and_regroup_triton,
    regroup_mxfp8,
    regroup_mxfp8_reference,
    regroup_mxfp8_triton,
)
from mxrun.kernels.mxfp8_gemm import (
    ALIGNED_MIN_M,
    large_m_kernel_for,
    mxfp8_aligned_linear_reference,
    mxfp8_linear,
    mxfp8_linear_reference,
)
from mxrun.kernels.mxfp8_quantize import (
    MxScaleRule,
    dequantize_mxfp8,
    quantize_mx_group128,
    quantize_mx_group128_reference,
    quantize_mx_group128_triton,
    quantize_mxfp8_reference,
)
from mxrun.kernels.row_layout import QuantizeInputError
from mxrun.kernels.scaled_gemm import GemmInputError

from .device_cases import HAS_CUDA, KERNEL_DEVICE, assert_same_fp32, bits
from .test_scaled_gemm import _dev, _inputs, assert_one_ulp, fp8_mma_slack

SUBNORMAL_HALF_STEP = 2.0**-10  # half of E4M3's smallest subnormal, 2^-9, in units of the common scale
NORMAL_MIN = 2.0**-6  # E4M3's smallest normal


def _spread_weight(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Rows whose magnitudes span many binades (so 128x128 tiles mix block exponents), a row of zeros, a block
    of values far below the rest of its tile, and heavy tails."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(*shape, generator=g) * torch.logspace(-3, 2, shape[-2])[:, None]
    w = w * torch.where(torch.rand(*shape, generator=g) < 0.01, 40.0, 1.0)
    if shape[-2] > 2:
        w[..., 1, :] = 0.0
        w[..., 2, 32:64] *= 1e-12
    return w


@pytest.mark.parametrize("shape", [(300, 4128), (3, 130, 96), (128, 128), (1, 32)])
def test_regroup_kernel_matches_reference(shape) -> None:
    """Bytes and scales equal the reference's, with ragged N and K (K % 128 = 32), stacks, NaN blocks."""
    q = quantize_mxfp8_reference(_spread_weight(shape, seed=1))
    q.scale_e8m0.view(-1)[-1] = 255  # a NaN block whose codes are not NaN: regrouping must make them NaN
    ref = regroup_mxfp8_reference(q.data, q.scale_e8m0)
    out = regroup_mxfp8_triton(*_dev(q.data, q.scale_e8m0))
    assert torch.equal(bits(out.data), bits(ref.data))
    assert_same_fp32(out.scale, ref.scale)
    assert ref.scale.shape == (*shape[:-2], -(-shape[-2] // 128), -(-shape[-1] // 128))


def _every_code_at_every_shift(tile_code: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One 128x128 tile whose 512 blocks hold all 256 E4M3 codes (NaN codes 0x7F / 0xFF included) eight blocks
    at a time, at block codes ``tile_code - d`` for every shift ``d`` from 0 to 63 (clamped at code 0); a second
    tile repeats it with its last block NaN (code 255)."""
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    data = codes.repeat(2 * 128 * 128 // 256).reshape(256, 128)
    shifts = torch.arange(512) // 8  # block i holds codes 32 (i % 8) ... and shift i // 8
    block_codes = (tile_code - shifts).clamp(min=0).to(torch.uint8).reshape(128, 4)
    scales = torch.cat([block_codes, block_codes])
    scales[-1, -1] = 255
    return data.view(torch.float8_e4m3fn), scales


@pytest.mark.parametrize("tile_code", [200, 40, 3])
def test_regroup_kernel_every_code_and_shift(tile_code: int) -> None:
    """Bit-exact against the reference for every E4M3 code (zeros, subnormals, NaN) at every shift down to
    nothing left, and in a NaN block: the word-wise re-encoding (fp16 product, NaN bytes) has no blind spot."""
    data, scales = _every_code_at_every_shift(tile_code)
    ref = regroup_mxfp8_reference(data, scales)
    out = regroup_mxfp8_triton(*_dev(data, scales))
    assert torch.equal(bits(out.data), bits(ref.data))
    assert_same_fp32(out.scale, ref.scale)
    assert (bits(ref.data)[:128][data.view(torch.uint8)[:128] & 0x7F == 0x7F] == 0x7F).all()


def test_regroup_kernel_reads_a_misaligned_weight() -> None:
    """A weight view whose bytes do not start on a 4-byte boundary is read through a copy, not misread, and the
    source is left as it was."""
    q = quantize_mxfp8_reference(_spread_weight((130, 96), seed=3))
    buffer = torch.zeros(130 * 96 + 1, dtype=torch.uint8)
    buffer[1:] = q.data.view(torch.uint8).reshape(-1)
    data, scales = _dev(buffer, q.scale_e8m0)
    before = data.clone()
    shifted = data[1:].view(130, 96).view(torch.float8_e4m3fn)
    out = regroup_mxfp8_triton(shifted, scales)
    ref = regroup_mxfp8_reference(q.data, q.scale_e8m0)
    assert torch.equal(bits(out.data), bits(ref.data))
    assert torch.equal(data, before)


@pytest.mark.parametrize(("m", "n", "k"), [(70, 300, 4128), (1, 130, 96), (300, 128, 256)])
@pytest.mark.parametrize("rule", ["round_up", "floor"])
@pytest.mark.parametrize("k_major", [False, True])
def test_quantize_and_regroup_in_one_launch(m, n, k, rule, k_major) -> None:
    """The shared launch gives the bytes and scales of the two kernels it replaces (and so of their references):
    ragged M, N and K, a strided activation view, NaN activations and a NaN weight block; with ``scale_k_major``
    the activation scales are the same values as a view of a K-major buffer (unit stride along M, 16-byte
    aligned steps)."""
    x = torch.randn(m, 2 * k, dtype=torch.bfloat16)[:, ::2] * 3
    x[0, 5] = float("nan")
    q = quantize_mxfp8_reference(_spread_weight((n, k), seed=8))
    q.scale_e8m0.view(-1)[-1] = 255
    xd, data, codes = _dev(x, q.data, q.scale_e8m0)
    a, regrouped = quantize_and_regroup_triton(xd, rule, data, codes, scale_k_major=k_major)
    if k_major:
        assert a.scale.stride(0) == 1 and a.scale.stride(1) % 4 == 0
        alone = quantize_mx_group128_triton(xd, rule, scale_k_major=True)
        assert alone.scale.stride(0) == 1 and torch.equal(bits(alone.data), bits(a.data))
        assert_same_fp32(alone.scale, a.scale)
    a_ref = quantize_mx_group128_reference(x, rule)
    w_ref = regroup_mxfp8_reference(q.data, q.scale_e8m0)
    assert torch.equal(bits(a.data), bits(a_ref.data))
    assert_same_fp32(a.scale, a_ref.scale)
    assert torch.equal(bits(regrouped.data), bits(w_ref.data))
    assert_same_fp32(regrouped.scale, w_ref.scale)


def test_quantize_and_regroup_empty_sides_and_bad_inputs() -> None:
    """No rows: the weight is still regrouped (and nothing is launched for the activations); a K mismatch or a
    stack is named."""
    q = quantize_mxfp8_reference(_spread_weight((130, 96), seed=9))
    data, codes = _dev(q.data, q.scale_e8m0)
    a, regrouped = quantize_and_regroup_triton(
        torch.zeros(0, 96, device=data.device), "round_up", data, codes
    )
    assert a.data.shape == (0, 96) and a.scale.shape == (0, 1)
    assert torch.equal(bits(regrouped.data), bits(regroup_mxfp8_reference(q.data, q.scale_e8m0).data))
    with pytest.raises(QuantizeInputError, match="same K"):
        quantize_and_regroup_triton(torch.zeros(4, 64, device=data.device), "round_up", data, codes)
    with pytest.raises(QuantizeInputError, match="same K"):
        quantize_and_regroup_triton(
            torch.zeros(4, 96, device=data.device), "round_up", data[None], codes[None]
        )


@pytest.mark.parametrize("shape", [(300, 4128), (3, 130, 96)])
def test_regrouped_values_keep_mxfp8_within_the_bound(shape) -> None:
    """Against exact MXFP8 values: equal wherever the MXFP8 value is an E4M3 normal at the tile's scale, within
    half a subnormal step of it elsewhere; NaN blocks stay NaN; scales are the tile's largest block scale."""
    q = quantize_mxfp8_reference(_spread_weight(shape, seed=2))
    q.scale_e8m0.view(-1)[5] = 255
    r = regroup_mxfp8_reference(q.data, q.scale_e8m0)
    exact = dequantize_mxfp8(q.data, q.scale_e8m0)
    regrouped = dequantize_fp8(r.data, r.scale, "block_128x128")
    assert torch.equal(exact.isnan(), regrouped.isnan())
    tile_scale = expand_fp8_scale(r.scale, exact.shape, "block_128x128")
    finite = ~exact.isnan()
    normal = finite & (exact.abs() >= NORMAL_MIN * tile_scale)
    assert torch.equal(regrouped[normal], exact[normal])
    assert ((regrouped - exact).abs()[finite] <= SUBNORMAL_HALF_STEP * tile_scale[finite]).all()
    moved = finite & (regrouped != exact)
    assert moved.any(), "the data must exercise the rounding, or this test proves nothing"
    # the tile scale is the largest block scale of the tile (never smaller: nothing may overflow 448)
    assert (r.data.float().abs()[finite] <= 448).all()
    block_scale = exact.new_tensor(2.0) ** (q.scale_e8m0.float() - 127)
    block_scale = block_scale.repeat_interleave(32, dim=-1)
    assert (tile_scale[finite] >= block_scale[finite]).all()


def test_regroup_zero_tile_and_bad_inputs() -> None:
    q = quantize_mxfp8_reference(torch.zeros(130, 64))
    r = regroup_mxfp8(*_dev(q.data, q.scale_e8m0))
    assert torch.equal(bits(r.data), torch.zeros(130, 64, dtype=torch.uint8))
    assert (r.scale.cpu() == 2.0**-127).all()
    with pytest.raises(QuantizeInputError, match="E8M0 scales"):
        regroup_mxfp8_reference(q.data, q.scale_e8m0[:, :1])
    with pytest.raises(QuantizeInputError, match="float8_e4m3fn"):
        regroup_mxfp8_reference(q.data.float(), q.scale_e8m0)
    with pytest.raises(QuantizeInputError, match="contiguous along K"):
        wide = quantize_mxfp8_reference(torch.randn(64, 128))
        column_major = wide.data.t().contiguous().t()  # [64, 128] with K strided
        regroup_mxfp8_triton(*_dev(column_major, wide.scale_e8m0))


@pytest.mark.parametrize("rule", list(MxScaleRule))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_group128_kernel_matches_reference(rule, dtype) -> None:
    """Bytes and fp32 scales equal the reference's: ragged K, all-zero, NaN, Inf and tiny groups, strided
    input."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(37, 4128, generator=g) * 3
    x[3, :128] = 0.0
    x[5, 7] = float("nan")
    x[6, 200] = float("inf")
    x[7, :100] *= 2.0**-20
    x = x.to(dtype)
    ref = quantize_mx_group128_reference(x, rule)
    out = quantize_mx_group128_triton(*_dev(x), rule)
    assert torch.equal(bits(out.data), bits(ref.data))
    assert_same_fp32(out.scale, ref.scale)
    strided = x[:, ::2][:, :2048]
    ref = quantize_mx_group128_reference(strided, rule)
    out = quantize_mx_group128(*_dev(strided), rule)
    assert torch.equal(bits(out.data), bits(ref.data))


def test_group128_against_mxfp8() -> None:
    """Round-up rule: the E4M3 value of every element that is normal at its 128-group's scale is the MXFP8 one;
    the others are within half a subnormal step of the input; the scale is the largest of the four MXFP8
    scales."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(64, 1024, generator=g) * torch.logspace(-4, 4, 1024)[torch.randperm(1024, generator=g)]
    q = quantize_mx_group128_reference(x)
    values = dequantize_fp8(q.data, q.scale, "group_1x128")
    mx = quantize_mxfp8_reference(x)
    exact = dequantize_mxfp8(mx.data, mx.scale_e8m0)
    scale = expand_fp8_scale(q.scale, x.shape, "group_1x128")
    normal = x.abs() >= NORMAL_MIN * scale
    assert torch.equal(values[normal], exact[normal])
    assert ((values - x).abs()[~normal] <= SUBNORMAL_HALF_STEP * scale[~normal]).all()
    assert (values[~normal] != exact[~normal]).any()
    mx_scales = 2.0 ** (mx.scale_e8m0.float() - 127)
    assert torch.equal(q.scale, mx_scales.reshape(64, -1, 4).amax(dim=-1))


def _aligned_bound(x, q, bias_ref, rule) -> tuple[torch.Tensor, torch.Tensor]:
    """(exact MXFP8 Linear in fp32, the allowed |aligned - exact| per output before rounding; module
    docstring). The operand differences are measured, and checked against their a-priori bounds: the weight's
    ``2^-10 S_w`` always, the activations' ``2 * 2^-10 S_a`` (each within a half step of x) under the round-up
    rule; the floor rule's MXFP8 also saturates the top binade of 32-blocks below their group's exponent, which
    the 128-group rounds instead, so there the measured difference is all there is."""
    qa = quantize_mxfp8_reference(x, rule)
    a = dequantize_mxfp8(qa.data, qa.scale_e8m0)
    g = quantize_mx_group128_reference(x, rule)
    da = (dequantize_fp8(g.data, g.scale, "group_1x128") - a).abs()
    w = dequantize_mxfp8(q.data, q.scale_e8m0)
    r = regroup_mxfp8_reference(q.data, q.scale_e8m0)
    dw = (dequantize_fp8(r.data, r.scale, "block_128x128") - w).abs()
    assert (dw <= SUBNORMAL_HALF_STEP * expand_fp8_scale(r.scale, w.shape, "block_128x128")).all()
    if MxScaleRule(rule) is MxScaleRule.ROUND_UP:
        assert (da <= 2 * SUBNORMAL_HALF_STEP * expand_fp8_scale(g.scale, x.shape, "group_1x128")).all()
    exact = a @ w.T + bias_ref
    return exact, da @ w.abs().T + a.abs() @ dw.T + da @ dw.T


@pytest.mark.parametrize("rule", ["round_up", "floor"])
@pytest.mark.parametrize(
    ("m", "n", "k"), [(70, 300, 256), (65, 130, 4128)] + ([(1500, 1000, 4096)] if HAS_CUDA else [])
)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_aligned_linear(m, n, k, rule, dtype) -> None:
    """The Triton aligned Linear within one ulp (plus the FP8 MMA allowance on GPU) of its reference, bf16 and
    fp16; that reference, and exact MXFP8's own, within the derived bound of the exact product."""
    x, w, bias = _inputs(m, n, k, dtype=dtype, seed=23)
    w = w * torch.logspace(-2, 1, n)[:, None].to(w.dtype)  # rows of different magnitudes share tiles
    q = quantize_mxfp8_reference(w)
    ref = mxfp8_aligned_linear_reference(x, q.data, q.scale_e8m0, bias, rule)
    out = mxfp8_linear(*_dev(x, q.data, q.scale_e8m0, bias), rule, backend="triton", large_m_kernel="aligned")
    assert_one_ulp(out, ref, fp8_mma_slack(x, w))
    exact, first_order = _aligned_bound(x, q, bias.float(), rule)
    ulp = 2.0**-7
    allowed = first_order + ulp * (exact.abs() + ref.float().abs()) + 2.0**-20 * exact.abs().amax()
    assert ((ref.float() - exact).abs() <= allowed).all()
    assert (
        (mxfp8_linear_reference(x, q.data, q.scale_e8m0, bias, rule).float() - exact).abs() <= allowed
    ).all()


@pytest.mark.parametrize(
    ("m", "n"),
    [
        (40, 300),
        # 600 rows take the Gluon kernel on Hopper, which writes each slice into the output's columns in place:
        # by TMA (320 bf16 columns: 16-byte aligned rows) or by masked stores (300 columns)
        pytest.param(600, 300, marks=pytest.mark.skipif(not HAS_CUDA, reason="slow in the interpreter")),
        pytest.param(600, 320, marks=pytest.mark.skipif(not HAS_CUDA, reason="slow in the interpreter")),
    ],
)
def test_aligned_linear_in_slices(monkeypatch, m: int, n: int) -> None:
    """A weight larger than MAX_DECODED_CHUNK_BYTES is regrouped and multiplied in slices of 128-row tiles:
    the same output as in one piece."""
    x, w, bias = _inputs(m, n, 256, seed=24)
    q = quantize_mxfp8_reference(w)
    args = _dev(x, q.data, q.scale_e8m0, bias)
    whole = mxfp8_linear(*args, "round_up", backend="triton", large_m_kernel="aligned")
    monkeypatch.setattr(mxfp8_gemm, "MAX_DECODED_CHUNK_BYTES", 128 * 256)
    sliced = mxfp8_linear(*args, "round_up", backend="triton", large_m_kernel="aligned")
    assert torch.equal(whole.cpu(), sliced.cpu())


@pytest.mark.parametrize("shape", [(300, 4128), (2, 130, 96)])
def test_align_mxfp8_is_regrouping_in_the_mxfp8_layout(shape) -> None:
    """Tile-aligned MXFP8 holds the regrouped values as ordinary MXFP8 (every block of a tile carries the tile's
    code), is a fixed point of itself, and gives back the regrouped scales; others are refused."""
    q = quantize_mxfp8_reference(_spread_weight(shape, seed=5))
    aligned = align_mxfp8(*_dev(q.data, q.scale_e8m0))
    regrouped = regroup_mxfp8_reference(q.data, q.scale_e8m0)
    values = dequantize_mxfp8(aligned.data.cpu(), aligned.scale_e8m0.cpu())
    assert_same_fp32(values, dequantize_fp8(regrouped.data, regrouped.scale, "block_128x128"))
    again = align_mxfp8(aligned.data, aligned.scale_e8m0)
    assert torch.equal(bits(again.data), bits(aligned.data))
    assert torch.equal(again.scale_e8m0.cpu(), aligned.scale_e8m0.cpu())
    n, k = shape[-2:]
    assert_same_fp32(aligned_tile_scales(aligned.scale_e8m0, n, k), regrouped.scale)
    with pytest.raises(QuantizeInputError, match="not tile-aligned"):
        aligned_tile_scales(q.scale_e8m0, n, k)


def test_aligned_linear_with_stored_tile_scales() -> None:
    """A tile-aligned weight with its tile scales skips the regrouping and gives the very output of the per-call
    path (regrouping an aligned weight changes nothing)."""
    x, w, bias = _inputs(96, 300, 256, seed=27)
    w = w * torch.logspace(-2, 1, 300)[:, None].to(w.dtype)
    q = quantize_mxfp8_reference(w)
    aligned = align_mxfp8(q.data, q.scale_e8m0)
    tile_scale = aligned_tile_scales(aligned.scale_e8m0, 300, 256)
    args = _dev(x, aligned.data, aligned.scale_e8m0, bias)
    stored = mxfp8_linear(
        *args,
        "round_up",
        backend="triton",
        large_m_kernel="aligned",
        weight_tile_scale=tile_scale.to(args[0].device),
    )
    per_call = mxfp8_linear(*args, "round_up", backend="triton", large_m_kernel="aligned")
    assert torch.equal(stored.cpu(), per_call.cpu())
    reference = mxfp8_aligned_linear_reference(x, q.data, q.scale_e8m0, bias, "round_up")
    assert_one_ulp(stored, reference, fp8_mma_slack(x, w))


def test_dispatcher_choice_and_errors() -> None:
    assert large_m_kernel_for(ALIGNED_MIN_M, "round_up") == "aligned"
    assert large_m_kernel_for(ALIGNED_MIN_M - 1, "round_up") == "cublas"
    assert large_m_kernel_for(1 << 20, None) == "cublas"  # W8A16 keeps bf16 activations
    x, w, bias = _inputs(70, 64, 128, seed=25)
    q = quantize_mxfp8_reference(w)
    args = _dev(x, q.data, q.scale_e8m0, bias)
    with pytest.raises(GemmInputError, match="W8A8 only"):
        mxfp8_linear(*args, None, backend="triton", large_m_kernel="aligned")
    with pytest.raises(GemmInputError, match="large_m_kernel must be one of"):
        mxfp8_linear(*args, "round_up", backend="triton", large_m_kernel="cutlass")


@pytest.mark.skipif(
    KERNEL_DEVICE == "cpu", reason="the default large-M choice needs CUDA rows >= ALIGNED_MIN_M"
)
def test_dispatcher_default_is_aligned_at_large_m() -> None:
    """Above the mid-M kernel's MXFP8 rows the default W8A8 kernel is the aligned one (from ALIGNED_MIN_M rows
    where the mid-M kernel cannot run)."""
    from mxrun.kernels.mid_m_gemm import MX_MID_M_MAX

    x, w, bias = _inputs(MX_MID_M_MAX + 1, 256, 512, seed=26)
    q = quantize_mxfp8_reference(w)
    args = _dev(x, q.data, q.scale_e8m0, bias)
    default = mxfp8_linear(*args, "round_up")
    assert torch.equal(default, mxfp8_linear(*args, "round_up", large_m_kernel="aligned"))


@pytest.mark.skipif(not HAS_CUDA, reason="the method's CUDA forward")
def test_gpu_tile_aligned_method_forward() -> None:
    """A recipe's ``tile_aligned: true`` through the quantized Linear on CUDA: the stored tile scales are read
    once (cached) and the output is the aligned path's."""
    from torch import nn

    from mxrun.engine.methods import QuantizedLinear, method_for
    from mxrun.engine.schemes import build_scheme

    scheme, _ = build_scheme("tiles", {"preset": "mxfp8", "weights": {"tile_aligned": True}})
    x, w, bias = _inputs(200, 384, 512, seed=28)
    linear = nn.Linear(512, 384).to(device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        linear.weight.copy_(w)
        linear.bias.copy_(bias)
    layer = QuantizedLinear.from_linear(linear, method_for(scheme), "gpu.tiles")
    layer.load_weight(linear.weight.data)
    out = layer(x.cuda())
    cached = layer.__dict__["_mx_tile_scales"]["gpu.tiles"]
    assert torch.equal(layer(x.cuda()), out) and layer.__dict__["_mx_tile_scales"]["gpu.tiles"] is cached
    q = layer.weight.cpu(), layer.weight_scale_e8m0.cpu()
    reference = mxfp8_aligned_linear_reference(x, *q, bias, "round_up")
    assert_one_ulp(out, reference, fp8_mma_slack(x, w))


@pytest.mark.skipif(not HAS_CUDA, reason="the experts module's CUDA forward")
def test_gpu_tile_aligned_experts_forward() -> None:
    """A recipe's ``tile_aligned: true`` through the quantized experts module on CUDA: tile scales read once
    per stack, the block-scaled path as stored, the aligned reference's result."""
    from mxrun.engine.moe import QuantizedExperts
    from mxrun.engine.schemes import build_scheme
    from mxrun.kernels.moe_gemm import ExpertActivation, moe_experts_reference
    from mxrun.kernels.moe_routing import route_topk

    scheme, _ = build_scheme("tiles", {"preset": "mxfp8", "weights": {"tile_aligned": True}})
    experts, hidden, inter, tokens = 8, 512, 384, 40
    g = torch.Generator().manual_seed(29)
    module = QuantizedExperts(
        experts, hidden, inter, scheme, dtype=torch.bfloat16, device="cuda", layer_name="m"
    )
    module.load_fused(
        "gate_up_proj", (torch.randn(experts, 2 * inter, hidden, generator=g) * 0.05).bfloat16()
    )
    module.load_fused("down_proj", (torch.randn(experts, hidden, inter, generator=g) * 0.05).bfloat16())
    x = torch.randn(tokens, hidden, generator=g).bfloat16()
    weights, index = route_topk(torch.randn(tokens, experts, generator=g), 2)
    out = module(x.cuda(), index.cuda(), weights.cuda()).float().cpu()
    assert set(module.__dict__["_mx_tile_scales"]) == {"m.gate_up_proj", "m.down_proj"}
    stacks = [module.weights(p) for p in ("gate_up_proj", "down_proj")]
    cpu = [type(w)(w.data.cpu(), w.scale.cpu(), w.format) for w in stacks]
    reference = moe_experts_reference(
        x, index, weights, *cpu, ExpertActivation.MX_ROUND_UP, aligned=True
    ).float()
    assert (out - reference).norm() <= 2.0**-5 * reference.norm()


@pytest.mark.parametrize("shape", [(300, 4128), (130, 96), (64, 128)])
def test_regroup_reads_a_box_major_weight(shape) -> None:
    """A weight held box-major (:class:`~mxrun.kernels.box_major.BoxMajorWeight`) regroups to the row-major
    weight's bytes and scales, alone and in the launch shared with the activations (ragged N and K, a NaN
    block)."""
    from mxrun.kernels.box_major import BoxMajorWeight

    q = quantize_mxfp8_reference(_spread_weight(shape, seed=9))
    q.scale_e8m0.view(-1)[-1] = 255
    data, codes = _dev(q.data, q.scale_e8m0)
    boxes = BoxMajorWeight.of(data)
    ref = regroup_mxfp8_reference(q.data, q.scale_e8m0)
    out = regroup_mxfp8_triton(boxes, codes)
    assert torch.equal(bits(out.data), bits(ref.data))
    assert_same_fp32(out.scale, ref.scale)
    x = _dev(torch.randn(5, shape[1], dtype=torch.bfloat16))[0]
    _, shared = quantize_and_regroup_triton(x, "round_up", boxes, codes)
    assert torch.equal(bits(shared.data), bits(ref.data))
    assert_same_fp32(shared.scale, ref.scale)


@pytest.mark.parametrize("kernel", ["aligned", "cublas", "dequant"])
@pytest.mark.parametrize("sliced", [False, True])
def test_large_m_paths_take_a_box_major_weight(monkeypatch, kernel: str, sliced: bool) -> None:
    """Above the few-row kernels a box-major weight gives the row-major weight's output bit for bit: regrouped
    (aligned) or decoded (cuBLAS path) from its boxes, whole or in slices of 128 rows (the last one partial),
    or, for the other kernels, through a row-major copy."""
    from mxrun.kernels.box_major import BoxMajorWeight

    x, w, bias = _inputs(70, 300, 256, seed=25)
    q = quantize_mxfp8_reference(w)
    xd, data, codes, bias_d = _dev(x, q.data, q.scale_e8m0, bias)
    rule = None if kernel == "cublas" else "round_up"
    rows = mxfp8_linear(xd, data, codes, bias_d, rule, backend="triton", large_m_kernel=kernel)
    if sliced:
        monkeypatch.setattr(mxfp8_gemm, "MAX_DECODED_CHUNK_BYTES", 128 * 256 * 2)
    boxes = mxfp8_linear(
        xd, BoxMajorWeight.of(data), codes, bias_d, rule, backend="triton", large_m_kernel=kernel
    )
    assert torch.equal(bits(boxes), bits(rows))


def test_decode_reads_a_box_major_weight() -> None:
    from mxrun.kernels.box_major import BoxMajorWeight
    from mxrun.kernels.mxfp8_gemm import mxfp8_decode_triton

    q = quantize_mxfp8_reference(_spread_weight((130, 416), seed=10))
    data, codes = _dev(q.data, q.scale_e8m0)
    for dtype in (torch.bfloat16, torch.float32):
        expected = mxfp8_decode_triton(data, codes, dtype)
        assert torch.equal(bits(mxfp8_decode_triton(BoxMajorWeight.of(data), codes, dtype)), bits(expected))


def test_box_major_regroup_and_decode_name_bad_inputs() -> None:
    from mxrun.kernels.box_major import BoxMajorWeight
    from mxrun.kernels.mxfp8_gemm import mxfp8_decode_triton

    q = quantize_mxfp8_reference(_spread_weight((130, 256), seed=11))
    data, codes = _dev(q.data, q.scale_e8m0)
    boxes = BoxMajorWeight.of(data)
    with pytest.raises(
        QuantizeInputError, match=r"regroup_mxfp8_triton: data \(130, 256\) needs .* \(130, 8\)"
    ):
        regroup_mxfp8_triton(boxes, codes[:, :4])
    with pytest.raises(GemmInputError, match=r"mxfp8_decode_triton: a box-major \[130, 256\] weight"):
        mxfp8_decode_triton(boxes._replace(boxes=boxes.boxes[:64]), codes, torch.bfloat16)
