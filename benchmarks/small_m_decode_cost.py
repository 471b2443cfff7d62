"""What the weight's decode costs the split-K small-M GEMM: the same launch over the seven Llama shapes at M = 1
and 16 with weights that need less and less work per element, beside bf16 cuBLAS, GEMM alone, CUDA-graph replays
(warm L2; the large layers' FP8 weights do not fit it anyway).

Per pair of weight bytes, from most work to least: ``mxbf16_fold_box`` (MXFP8 box-major, bf16 activations: one
conversion, three integer operations and a bf16x2 multiply with the power of two folded in, plus the E8M0
codes' loads), ``mx16_fold_box`` (the same weight with fp16 activations: one conversion and an fp16x2 multiply),
``fp8wo_bf16[_64x128]`` (per-channel FP8, bf16 activations: the integer widening, no codes), ``fp8wo_f16_64x128``
(per-channel FP8, fp16 activations: one conversion), ``fp8_codes[_64x128]`` (E4M3 activation codes: one
conversion). ``_64x128`` runs the MX kernel's tile, the others their own defaults. Where the time follows the
work per element rather than the bytes, the loop is bound by the instructions it issues, not by the memory:

    PYTHONPATH=. python3 benchmarks/small_m_decode_cost.py
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
import triton.testing
from bench_linear import SHAPES

from mxrun.kernels.box_major import BoxMajorWeight
from mxrun.kernels.e4m3 import mx_scales_foldable, mx_scales_foldable_f16
from mxrun.kernels.fp8_quantize import Fp8Granularity, quantize_fp8
from mxrun.kernels.mxfp8_quantize import quantize_mxfp8
from mxrun.kernels.small_m_gemm import SplitKConfig, small_m_gemm_triton


def _time(fn: Callable[[], torch.Tensor]) -> float:
    fn()
    return triton.testing.do_bench_cudagraph(fn, rep=20, return_mode="median") * 1e3


def main() -> None:
    print(torch.cuda.get_device_name())
    mx_tile = SplitKConfig()
    for shape, (k, n) in SHAPES.items():
        w = (torch.randn(n, k, device="cuda") * 0.02).to(torch.bfloat16)
        mx, channel = quantize_mxfp8(w), quantize_fp8(w, Fp8Granularity.PER_ROW)
        boxes = BoxMajorWeight.of(mx.data)
        f16_ok, bf16_ok = mx_scales_foldable_f16(mx.scale_e8m0), mx_scales_foldable(mx.scale_e8m0, mx.data)
        for m in (1, 16):
            xb = torch.randn(m, k, device="cuda").to(torch.bfloat16)
            xh = xb.half()
            xq = quantize_fp8(xb, Fp8Granularity.PER_ROW)
            wo = partial(small_m_gemm_triton, weight_scale=channel.scale)
            codes = partial(
                small_m_gemm_triton, xq.data, channel.data, a_scale=xq.scale, weight_scale=channel.scale,
                out_dtype=torch.bfloat16,
            )  # fmt: skip
            calls = {
                "bf16": partial(torch.matmul, xb, w.t()),
                "mxbf16_fold_box": partial(
                    small_m_gemm_triton, xb, boxes, weight_scale_e8m0=mx.scale_e8m0, mx_scale_fold=bf16_ok
                ),
                "mx16_fold_box": partial(
                    small_m_gemm_triton, xh, boxes, weight_scale_e8m0=mx.scale_e8m0, mx_scale_fold16=f16_ok
                ),
                "fp8wo_bf16": partial(wo, xb, channel.data),
                "fp8wo_bf16_64x128": partial(wo, xb, channel.data, config=mx_tile),
                "fp8wo_f16_64x128": partial(wo, xh, channel.data, config=mx_tile),
                "fp8_codes": codes,
                "fp8_codes_64x128": partial(codes, config=mx_tile),
            }
            r = {name: _time(call) for name, call in calls.items()}
            print(
                f"{shape:24s} M={m:2d} f16ok={f16_ok} " + " ".join(f"{a}={v:.1f}" for a, v in r.items()),
                flush=True,
            )


if __name__ == "__main__":
    main()
