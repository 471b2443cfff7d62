"""MXFP8 GEMMs on Hopper: the dequant-MMA kernel (W8A16, W8A8 with the activation quantization fused, W8A8 with
pre-quantized activations) and the FP8-MMA kernel (one scaled FP8 dot per 32-wide K block), against the torch
references, with ragged M/N/K tails and M = 1.

Tolerance (same argument as test_scaled_gemm): decoded MXFP8 values and their products are exact in fp32, so
kernel and reference add the same products in a different order and may differ by one output ulp after the
final rounding: |out - ref| <= 2^-7 |ref| (bf16; 2^-10 fp16) + 2^-12 rms(ref). The in-register activation
quantization is bit-identical to quantize_mxfp8, which this checks indirectly: a single flipped E4M3 code or a
scale off by one binade moves an output by far more than an ulp.
"""

from __future__ import annotations

import pytest
import torch

from mxrun.kernels import mxfp8_gemm
from mxrun.kernels.mxfp8_gemm import (
    mxfp8_decode_triton,
    mxfp8_dequant_gemm_triton,
    mxfp8_fp8_gemm_triton,
    mxfp8_gemm_reference,
    mxfp8_linear,
    mxfp8_linear_reference,
)
from mxrun.kernels.mxfp8_quantize import MxScaleRule, dequantize_mxfp8, quantize_mxfp8_reference
from mxrun.kernels.scaled_gemm import GemmConfig, GemmInputError

from .device_cases import HAS_CUDA, KERNEL_DEVICE
from .test_scaled_gemm import _dev, _inputs, assert_one_ulp

SMALL_SHAPES = [(1, 40, 96), (19, 72, 160), (33, 96, 256)]
SHAPES = SMALL_SHAPES + ([(300, 1000, 4128), (4, 4096, 4096)] if HAS_CUDA else [])
SMALL_CONFIG = GemmConfig(16, 32, 64, 2, 4, 1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rule", [None, "round_up", "floor"])
@pytest.mark.parametrize(("m", "n", "k"), SHAPES)
def test_dequant_kernel_fused(m, n, k, rule, dtype) -> None:
    x, w, bias = _inputs(m, n, k, dtype=dtype, seed=5)
    qw = quantize_mxfp8_reference(w, "round_up")
    ref = mxfp8_linear_reference(x, qw.data, qw.scale_e8m0, bias, rule)
    out = mxfp8_dequant_gemm_triton(*_dev(x, qw.data, qw.scale_e8m0, bias), activation_rule=rule)
    assert_one_ulp(out, ref)
    assert_one_ulp(
        mxfp8_linear(*_dev(x, qw.data, qw.scale_e8m0, bias), rule, backend="triton", large_m_kernel="cublas"),
        ref,
    )


@pytest.mark.parametrize("kernel", ["dequant", "fp8"])
@pytest.mark.parametrize(("m", "n", "k"), SHAPES)
def test_prequantized_activations(m, n, k, kernel) -> None:
    x, w, bias = _inputs(m, n, k, seed=6)
    qw = quantize_mxfp8_reference(w)
    qa = quantize_mxfp8_reference(x)
    ref = mxfp8_gemm_reference(qa.data, qa.scale_e8m0, qw.data, qw.scale_e8m0, bias, torch.bfloat16)
    config = None if HAS_CUDA and m > 64 else SMALL_CONFIG
    if kernel == "fp8":
        out = mxfp8_fp8_gemm_triton(
            *_dev(qa.data, qa.scale_e8m0, qw.data, qw.scale_e8m0, bias), config=config
        )
    else:
        a, wq, ws, b, a_s = _dev(qa.data, qw.data, qw.scale_e8m0, bias, qa.scale_e8m0)
        out = mxfp8_dequant_gemm_triton(
            a, wq, ws, b, a_scale_e8m0=a_s, out_dtype=torch.bfloat16, config=config
        )
    assert_one_ulp(out, ref)
    # the W8A8 dispatcher's large-M path, whichever kernel it picks, gives the same numerics
    if HAS_CUDA and m > 64:
        for large in ("fp8", "dequant"):
            out = mxfp8_linear(*_dev(x, qw.data, qw.scale_e8m0, bias), "round_up", large_m_kernel=large)
            assert_one_ulp(out, mxfp8_linear_reference(x, qw.data, qw.scale_e8m0, bias, "round_up"))


def test_activation_quantization_is_applied() -> None:
    x, w, bias = _inputs(8, 40, 128, seed=7)
    qw = quantize_mxfp8_reference(w)
    args = _dev(x, qw.data, qw.scale_e8m0, bias)
    w8a8 = mxfp8_dequant_gemm_triton(*args, activation_rule="round_up").float().cpu()
    w8a16 = mxfp8_dequant_gemm_triton(*args).float().cpu()
    assert (w8a8 - w8a16).abs().max() > 2.0**-6 * w8a16.abs().max()


def test_bad_inputs() -> None:
    x, w, _ = _inputs(4, 32, 64)
    qw = quantize_mxfp8_reference(w)
    with pytest.raises(GemmInputError, match="uint8 E8M0"):
        mxfp8_dequant_gemm_triton(*_dev(x, qw.data, qw.scale_e8m0[:, :1]))
    with pytest.raises(GemmInputError, match="K=64"):
        mxfp8_dequant_gemm_triton(*_dev(x[:, :32], qw.data, qw.scale_e8m0))
    assert KERNEL_DEVICE in ("cpu", "cuda")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_decode_kernel_is_the_reference_dequantization(dtype) -> None:
    """Every code times every scale the layout holds: the Triton decode equals dequantize_mxfp8 bit for bit."""
    g = torch.Generator().manual_seed(21)
    codes = torch.randint(0, 256, (37, 320), generator=g, dtype=torch.uint8)
    codes[codes == 0x7F] = 0x7E  # no NaN codes (0x7F / 0xFF): their bits are not comparable
    codes[codes == 0xFF] = 0xFE
    scales = torch.randint(100, 140, (37, 10), generator=g, dtype=torch.uint8)  # within bf16/fp16 range
    data = codes.view(torch.float8_e4m3fn)
    expected = dequantize_mxfp8(data, scales, dtype)
    out = mxfp8_decode_triton(*_dev(data, scales), dtype)
    assert torch.equal(out.cpu().view(torch.int16), expected.view(torch.int16))


@pytest.mark.parametrize("rule", [None, MxScaleRule.ROUND_UP, MxScaleRule.FLOOR])
@pytest.mark.parametrize("chunk_bytes", [None, 64 * 256 * 2])  # one slice, or slices of 128 weight rows
def test_large_m_decode_then_cublas(rule, chunk_bytes, monkeypatch) -> None:
    """M above the split-K range: decode + cuBLAS (the W8A16 path, selectable for W8A8) within one ulp of the
    reference, sliced or not."""
    if chunk_bytes is not None:
        monkeypatch.setattr(mxfp8_gemm, "MAX_DECODED_CHUNK_BYTES", chunk_bytes)
    m, n, k = 70, 300, 256
    x, w, bias = _inputs(m, n, k, seed=22)
    q = quantize_mxfp8_reference(w)
    ref = mxfp8_linear_reference(x, q.data, q.scale_e8m0, bias, rule)
    out = mxfp8_linear(*_dev(x, q.data, q.scale_e8m0, bias), rule, backend="triton", large_m_kernel="cublas")
    assert_one_ulp(out, ref)


def test_decode_kernel_bad_inputs_are_clear_errors() -> None:
    data = torch.zeros(4, 64, device=KERNEL_DEVICE).to(torch.float8_e4m3fn)
    scales = torch.full((4, 2), 127, dtype=torch.uint8, device=KERNEL_DEVICE)
    with pytest.raises(GemmInputError, match="K-contiguous"):
        mxfp8_decode_triton(data.t(), scales, torch.bfloat16)
    with pytest.raises(GemmInputError, match=r"scales \[R, K/32\]"):
        mxfp8_decode_triton(data, scales[:, :1], torch.bfloat16)
    with pytest.raises(GemmInputError, match="out_dtype"):
        mxfp8_decode_triton(data, scales, torch.int8)
