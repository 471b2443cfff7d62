"""FP8 scaled GEMMs (W8A8 per-tensor/per-channel, block-scaled, W8A16 weight-only): Triton kernels against
their plain-torch references, with ragged M/N/K tails, M = 1, fused and separate activation quantization.

Tolerance. Kernel and reference add the same exact fp32 products (E4M3 x E4M3 and E4M3 x bf16 products are
exact in fp32) in a different order, then apply the same fp32 scales and round to bf16/fp16. The sums differ by
at most ~K 2^-24 sum|a b| (fp32 reordering, < 2^-14 relative here), which can move the final rounding by one
output ulp: 2^-7 relative for bf16 (7 stored mantissa bits), 2^-10 for fp16. So we assert
|out - ref| <= 2^-7 max(|out|, |ref|) (2^-10 for fp16; one ulp of the larger) + 2^-12 * rms(ref). A wrong scale, a wrong K tail or a missed
activation quantization is off by far more than one ulp (tested: weight-only vs W8A8 outputs differ).

On the GPU, W8A8 kernels run wgmma, whose FP8 accumulator keeps only ~14 mantissa bits (DeepSeek-V3 technical
report, section 3.3.2) until Triton promotes it to fp32 every 128 K elements (as cuBLASLt's _scaled_mm does).
Within one 128-wide step a product passes through at most 4 accumulator roundings (one per k=32 wgmma), each
off by < 2^-13 (truncation) of a running sum bounded by sum|a b| over the step, so the whole sum is off by at
most 2^-11 sum_k |a_k b_k|; we allow 2^-10 (|x| @ |W|^T), computed from the unquantized operands (E4M3
rounding moves each product by < 2^-3 relative). `test_scaled_mm_meets_the_same_bound` shows cuBLAS needs it
too. A wrong scale or K tail still fails: those are off by a fixed share of the output itself.
On CPU the kernels run under TRITON_INTERPRET=1 with small shapes (< 60 s); on a GPU, larger ones too.
"""

from __future__ import annotations

import pytest
import torch

from mxrun.kernels import scaled_gemm
from mxrun.kernels.fp8_quantize import Fp8Granularity, dequantize_fp8, quantize_fp8_reference
from mxrun.kernels.scaled_gemm import (
    GemmConfig,
    GemmInputError,
    fp8_block_gemm_reference,
    fp8_block_gemm_triton,
    fp8_block_linear,
    fp8_gemm_reference,
    fp8_gemm_triton,
    fp8_linear,
    fp8_linear_reference,
    fp8_weight_only_linear,
    fp8_weight_only_reference,
    fp8_weight_only_triton,
    m_bucket,
)

from .device_cases import HAS_CUDA, KERNEL_DEVICE, gpu_only

G = Fp8Granularity
SMALL_SHAPES = [(1, 40, 96), (19, 72, 160), (33, 96, 256)]  # ragged N, K not a multiple of the tile, M = 1
SHAPES = SMALL_SHAPES + ([(300, 1000, 4224), (4, 4096, 4096)] if HAS_CUDA else [])
SMALL_CONFIG = GemmConfig(16, 32, 64, 2, 4, 1)  # several K steps and tiles on tiny shapes
SMALL_BLOCK_CONFIG = GemmConfig(16, 32, 128, 2, 4, 1)


def _inputs(m: int, n: int, k: int, dtype=torch.bfloat16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    x[:, : max(1, k // 64)] *= 30.0  # outlier channels
    w = torch.randn(n, k, generator=g) * 0.05
    bias = torch.randn(n, generator=g)
    return x.to(dtype), w.to(dtype), bias.to(dtype)


def _dev(*tensors):
    return [t.to(KERNEL_DEVICE) if t is not None else None for t in tensors]


def fp8_mma_slack(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor | None:
    """The wgmma accumulator's allowance (module docstring) for ``x @ w^T`` on the GPU; None on CPU, where the
    interpreter accumulates in fp32."""
    if not HAS_CUDA:
        return None
    return 2.0**-10 * (x.float().abs() @ w.float().abs().T)


def assert_one_ulp(out: torch.Tensor, ref: torch.Tensor, slack: torch.Tensor | None = None) -> None:
    assert out.dtype == ref.dtype
    ulp = 2.0**-7 if ref.dtype == torch.bfloat16 else 2.0**-10
    out, ref = out.float().cpu(), ref.float().cpu()
    assert out.shape == ref.shape
    assert torch.isfinite(out).all()
    rms = ref.pow(2).mean().sqrt()
    allowed = ulp * torch.maximum(out.abs(), ref.abs()) + 2.0**-12 * rms
    if slack is not None:
        allowed = allowed + slack.cpu()
    bad = (out - ref).abs() > allowed
    assert not bad.any(), (
        f"{bad.sum().item()} elements off by more than one ulp; max {(out - ref).abs().max()}"
    )


@pytest.mark.parametrize("activation", ["token", "tensor"])
@pytest.mark.parametrize("weight_granularity", [G.PER_ROW, G.PER_TENSOR])
@pytest.mark.parametrize(("m", "n", "k"), SHAPES)
def test_w8a8_fused_activation_quantization(m, n, k, weight_granularity, activation) -> None:
    # The quantized A bytes equal the reference's (same scale rule and division), so the outputs differ only
    # by accumulation. The autotuner may pick a 64-row tile at M = 33..64, which runs on wgmma and its
    # reduced-precision FP8 accumulator: the wgmma allowance applies on the GPU whatever M is.
    x, w, bias = _inputs(m, n, k)
    q = quantize_fp8_reference(w, weight_granularity)
    ref = fp8_linear_reference(x, q.data, q.scale, bias, activation)
    if m <= 64:
        out = fp8_gemm_triton(*_dev(x, None, q.data, q.scale, bias), fused_activation=activation)
        assert_one_ulp(out, ref, fp8_mma_slack(x, w))
    out = fp8_linear(*_dev(x, q.data, q.scale, bias), activation, backend="triton")
    assert_one_ulp(out, ref, fp8_mma_slack(x, w))


@pytest.mark.parametrize("even_k", [True, False])
@pytest.mark.parametrize(("m", "n", "k"), SMALL_SHAPES)
def test_w8a8_prequantized_small_tiles(m, n, k, even_k) -> None:
    k = k if not even_k else 128
    x, w, bias = _inputs(m, n, k, seed=1)
    qa = quantize_fp8_reference(x, G.PER_ROW)
    qw = quantize_fp8_reference(w, G.PER_ROW)
    ref = fp8_gemm_reference(qa.data, qa.scale, qw.data, qw.scale, bias, torch.bfloat16)
    out = fp8_gemm_triton(
        *_dev(qa.data, qa.scale, qw.data, qw.scale, bias), torch.bfloat16, config=SMALL_CONFIG
    )
    assert_one_ulp(out, ref)
    out = fp8_gemm_triton(
        *_dev(qa.data, qa.scale, qw.data, qw.scale), None, torch.bfloat16, config=SMALL_CONFIG
    )
    assert_one_ulp(out, fp8_gemm_reference(qa.data, qa.scale, qw.data, qw.scale, None, torch.bfloat16))


@pytest.mark.parametrize(("m", "n", "k"), SHAPES)
def test_block_scaled(m, n, k) -> None:
    x, w, bias = _inputs(m, n, k, seed=2)
    qw = quantize_fp8_reference(w, G.BLOCK_128X128)
    qa = quantize_fp8_reference(x, G.GROUP_1X128)
    ref = fp8_block_gemm_reference(qa.data, qa.scale, qw.data, qw.scale, bias, torch.bfloat16)
    if m <= 64:
        out = fp8_block_gemm_triton(*_dev(x, None, qw.data, qw.scale, bias), fused_activation=True)
        assert_one_ulp(out, ref)
    config = None if HAS_CUDA and m > 64 else SMALL_BLOCK_CONFIG
    out = fp8_block_gemm_triton(
        *_dev(qa.data, qa.scale, qw.data, qw.scale, bias), torch.bfloat16, config=config
    )
    slack = fp8_mma_slack(x, w)  # the Linear quantizes first and runs wgmma at every M on the GPU
    assert_one_ulp(out, ref, slack if m > 64 else None)
    assert_one_ulp(fp8_block_linear(*_dev(x, qw.data, qw.scale, bias), backend="triton"), ref, slack)


@gpu_only
def test_scaled_mm_meets_the_same_bound() -> None:
    """cuBLASLt's FP8 GEMM (fast accumulation off) is within the wgmma allowance and beyond one ulp without
    it: the allowance is the hardware's, not a loosening for our kernels."""
    m, n, k = 300, 1024, 4224  # cuBLASLt wants N % 16 == 0
    x, w, _ = _inputs(m, n, k, seed=5)
    qa = quantize_fp8_reference(x, G.PER_ROW)
    qw = quantize_fp8_reference(w, G.PER_ROW)
    ref = fp8_gemm_reference(qa.data, qa.scale, qw.data, qw.scale, None, torch.bfloat16)
    a, sa, b, sb = _dev(qa.data, qa.scale, qw.data, qw.scale)
    out = torch._scaled_mm(a, b.t(), sa, sb.t(), out_dtype=torch.bfloat16)
    assert_one_ulp(out, ref, fp8_mma_slack(x, w))
    with pytest.raises(AssertionError):
        assert_one_ulp(out, ref)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("granularity", [G.PER_TENSOR, G.PER_ROW, G.BLOCK_128X128])
@pytest.mark.parametrize(("m", "n", "k"), SHAPES)
def test_weight_only(m, n, k, granularity, dtype) -> None:
    x, w, bias = _inputs(m, n, k, dtype=dtype, seed=3)
    qw = quantize_fp8_reference(w, granularity)
    ref = fp8_weight_only_reference(x, qw.data, qw.scale, granularity, bias)
    out = fp8_weight_only_triton(*_dev(x, qw.data, qw.scale), granularity, *_dev(bias))
    assert out.dtype == dtype
    assert_one_ulp(out, ref)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_widen_e4m3_every_code(dtype) -> None:
    """The decode path's widening kernel: all 256 codes, a strided row slice, exact (NaN stays NaN)."""
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).reshape(8, 32)
    padded = torch.zeros(8, 48, dtype=torch.float8_e4m3fn)
    padded[:, :32] = codes
    source = padded[:, :32]  # rows 48 bytes apart
    out = scaled_gemm.widen_e4m3(source.to(KERNEL_DEVICE), dtype).cpu()
    expected = codes.float().to(dtype)
    assert torch.equal(torch.isnan(out), torch.isnan(expected))
    assert torch.equal(torch.nan_to_num(out).view(torch.int16), torch.nan_to_num(expected).view(torch.int16))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("granularity", [G.PER_TENSOR, G.PER_ROW])
def test_weight_only_decode_matmul(granularity, dtype, monkeypatch) -> None:
    """The decode + cuBLAS path that the W8A16 Linear takes above 64 rows on CUDA: one rounding at the end.
    The bias cancels most of each product, so rounding the product to 16 bits before the scale and bias (the
    obvious shortcut; in fp16 the unscaled product may overflow too) is off by many output ulps and fails
    here; slices of 128 columns cover the loop. On CPU the kernels run in the interpreter (smaller shape) and
    the product is an fp32 matmul."""
    m, n, k = (300, 1000, 1040) if HAS_CUDA else (40, 300, 256)
    x, w, _ = _inputs(m, n, k, dtype=dtype, seed=6)
    qw = quantize_fp8_reference(w, granularity)
    exact = x.float() @ dequantize_fp8(qw.data, qw.scale, granularity).T
    bias = (-exact[0]).to(dtype)  # row 0 cancels to ~0, the other rows partly
    ref = fp8_weight_only_reference(x, qw.data, qw.scale, granularity, bias)
    monkeypatch.setattr(scaled_gemm, "MAX_DECODE_CHUNK_BYTES", 128 * 4 * k)
    x_d, w_d, s_d, bias_d = _dev(x, qw.data, qw.scale, bias)
    assert_one_ulp(scaled_gemm.fp8_decode_matmul(x_d, w_d, s_d, bias_d), ref)
    if HAS_CUDA:  # what the Linear dispatches to above 64 rows
        assert_one_ulp(fp8_weight_only_linear(x_d, w_d, s_d, granularity, bias_d, backend="triton"), ref)
    product = (x.float() @ qw.data.float().T).to(dtype).float()  # rounded to 16 bits, then scaled
    shortcut = (product * qw.scale.reshape(1, -1) + bias.float()).to(dtype)
    with pytest.raises(AssertionError):
        assert_one_ulp(shortcut, ref)


def test_decode_path_bad_and_strided_inputs() -> None:
    """Named errors for what the widening kernel cannot read; strided scales and bias (views of wider tensors)
    give the same result as dense ones in the decode path, the W8A16 kernel and the W8A8 kernel."""
    with pytest.raises(GemmInputError, match="K-contiguous 2-D float8_e4m3fn"):
        scaled_gemm.widen_e4m3(torch.zeros(4, 32, dtype=torch.bfloat16, device=KERNEL_DEVICE), torch.bfloat16)
    codes = torch.zeros(32, 4, dtype=torch.float8_e4m3fn, device=KERNEL_DEVICE)
    with pytest.raises(GemmInputError, match="K-contiguous"):
        scaled_gemm.widen_e4m3(codes.t(), torch.bfloat16)
    with pytest.raises(GemmInputError, match="bfloat16 or float16"):
        scaled_gemm.widen_e4m3(codes, torch.float32)
    x, w, bias = _inputs(5, 96, 64, seed=7)
    qw = quantize_fp8_reference(w, G.PER_ROW)
    ref = fp8_weight_only_reference(x, qw.data, qw.scale, G.PER_ROW, bias)
    strided_scale = torch.stack([qw.scale.reshape(-1), qw.scale.reshape(-1)], dim=1)[:, 0]  # stride 2
    strided_bias = torch.stack([bias, bias], dim=1)[:, 0]
    out = scaled_gemm.fp8_decode_matmul(*_dev(x, qw.data, strided_scale, strided_bias))
    assert_one_ulp(out, ref)
    out = fp8_weight_only_triton(*_dev(x, qw.data, strided_scale), G.PER_ROW, *_dev(strided_bias))
    assert_one_ulp(out, ref)
    qa = quantize_fp8_reference(x, G.PER_ROW)
    strided_a_scale = torch.stack([qa.scale.reshape(-1)] * 2, dim=1)[:, 0]
    ref = fp8_gemm_reference(qa.data, qa.scale, qw.data, qw.scale, bias, torch.bfloat16)
    out = fp8_gemm_triton(
        *_dev(qa.data, strided_a_scale, qw.data, strided_scale, strided_bias),
        torch.bfloat16,
        config=SMALL_CONFIG,
    )
    assert_one_ulp(out, ref)


def test_weight_only_differs_from_w8a8() -> None:
    """The activation quantization is really applied: W8A8 and W8A16 outputs differ by far more than an ulp."""
    x, w, bias = _inputs(8, 40, 128, seed=4)
    qw = quantize_fp8_reference(w, G.PER_ROW)
    w8a8 = fp8_gemm_triton(*_dev(x, None, qw.data, qw.scale, bias), fused_activation="token").float().cpu()
    w8a16 = fp8_weight_only_triton(*_dev(x, qw.data, qw.scale), G.PER_ROW, *_dev(bias)).float().cpu()
    assert (w8a8 - w8a16).abs().max() > 2.0**-6 * w8a16.abs().max()


def test_m_buckets_and_bad_inputs() -> None:
    assert [m_bucket(m) for m in (1, 2, 3, 16, 17, 1000, 5000, 100000)] == [1, 2, 4, 16, 32, 1024, 4096, 4096]
    x, w, _ = _inputs(4, 32, 64)
    with pytest.raises(GemmInputError, match="float8_e4m3fn"):
        fp8_gemm_triton(*_dev(x, None, w, torch.ones(())), fused_activation="token")
    qw = quantize_fp8_reference(w, G.PER_ROW)
    with pytest.raises(GemmInputError, match="K=64"):
        fp8_gemm_triton(*_dev(x[:, :32], None, qw.data, qw.scale), fused_activation="token")
    with pytest.raises(GemmInputError, match="M <= 64"):
        fp8_gemm_triton(
            *_dev(torch.zeros(65, 64, dtype=torch.bfloat16), None, qw.data, qw.scale),
            fused_activation="tensor",
        )


def compiled_variants(kernel) -> int:
    """How many compiled variants a Triton kernel holds (its per-device caches)."""
    caches = getattr(kernel, "device_caches", None)
    if not caches:
        pytest.skip("this Triton keeps no device_caches")
    return sum(len(entry[0]) for entry in caches.values())


@gpu_only
def test_no_recompile_for_new_m() -> None:
    """M is a run-time argument: new batch sizes in one bucket reuse the compiled kernel."""
    from mxrun.kernels import scaled_gemm

    x, w, bias = _inputs(200, 256, 512)
    qw = quantize_fp8_reference(w, G.PER_ROW)
    args = _dev(qw.data, qw.scale, bias)
    fp8_linear(x[:130].cuda(), *args, "token")
    fp8_linear(x[:129].cuda(), *args, "token")
    before = compiled_variants(scaled_gemm._fp8_gemm_kernel)
    for m in (131, 144, 150, 160, 177, 199):  # 144, 160: divisible by 16
        fp8_linear(x[:m].cuda(), *args, "token")
    assert compiled_variants(scaled_gemm._fp8_gemm_kernel) == before
