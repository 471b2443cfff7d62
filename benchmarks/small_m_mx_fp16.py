"""MXFP8 weights meeting fp16 activations at M <= 16: the small-M split-K GEMM with the fp16 fold (E4M3 -> fp16,
times the fp16 power of two) against the fp32 decode it replaces, beside the bf16 fold, FP8 weight-only with fp16
activations, and fp16 / bf16 cuBLAS. GEMM alone, CUDA-graph replays (warm), the seven Llama shapes of
``bench_linear.py`` at M = 1 and 16; also checks that the fold gives the fp32 decode's bits. ``mx16_fold_in_step``
is the fp16 fold with each step's E8M0 codes loaded in that step (``small_m_gemm.MX_CODES_AHEAD`` off).

    PYTHONPATH=. python3 benchmarks/small_m_mx_fp16.py
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
import triton.testing
from bench_linear import SHAPES

from mxrun.kernels import small_m_gemm
from mxrun.kernels.e4m3 import mx_scales_foldable, mx_scales_foldable_f16
from mxrun.kernels.fp8_quantize import Fp8Granularity, quantize_fp8
from mxrun.kernels.mxfp8_gemm import mxfp8_linear_reference
from mxrun.kernels.mxfp8_quantize import quantize_mxfp8
from mxrun.kernels.small_m_gemm import small_m_gemm_triton


def _time(fn: Callable[[], torch.Tensor]) -> float:
    fn()
    return triton.testing.do_bench_cudagraph(fn, rep=20, return_mode="median") * 1e3


def _codes_in_step(call: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
    """``call`` launched with the E8M0 codes loaded in their own K step (the setting read at launch, so a CUDA
    graph captures that variant)."""

    def run() -> torch.Tensor:
        saved = small_m_gemm.MX_CODES_AHEAD
        small_m_gemm.MX_CODES_AHEAD = False
        try:
            return call()
        finally:
            small_m_gemm.MX_CODES_AHEAD = saved

    return run


def main() -> None:
    for shape, (k, n) in SHAPES.items():
        w = (torch.randn(n, k, device="cuda") * 0.02).to(torch.bfloat16)
        mx, channel = quantize_mxfp8(w), quantize_fp8(w, Fp8Granularity.PER_ROW)
        f16_ok, bf16_ok = mx_scales_foldable_f16(mx.scale_e8m0), mx_scales_foldable(mx.scale_e8m0, mx.data)
        w16 = w.half()
        for m in (1, 16):
            xb = torch.randn(m, k, device="cuda").to(torch.bfloat16)
            xh = xb.half()
            mx_h = partial(small_m_gemm_triton, xh, mx.data, weight_scale_e8m0=mx.scale_e8m0)
            calls = {
                "bf16": partial(torch.matmul, xb, w.t()),
                "fp16": partial(torch.matmul, xh, w16.t()),
                "mx16_unfold": mx_h,
                "mx16_fold": partial(mx_h, mx_scale_fold16=f16_ok),
                "mxbf16_fold": partial(
                    small_m_gemm_triton, xb, mx.data, weight_scale_e8m0=mx.scale_e8m0, mx_scale_fold=bf16_ok
                ),
                "fp8wo_f16": partial(small_m_gemm_triton, xh, channel.data, weight_scale=channel.scale),
            }
            calls["mx16_fold_in_step"] = _codes_in_step(calls["mx16_fold"])
            r = {name: _time(call) for name, call in calls.items()}
            folded = calls["mx16_fold"]()
            ref = mxfp8_linear_reference(xh, mx.data, mx.scale_e8m0, None, None)
            err = ((folded.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
            same = torch.equal(folded, calls["mx16_unfold"]())
            print(
                f"{shape:24s} M={m:3d} f16ok={f16_ok} " + " ".join(f"{a}={b:.1f}" for a, b in r.items())
                + f" | fold16 x fp16 {r['fp16'] / r['mx16_fold']:.2f} (unfold {r['fp16'] / r['mx16_unfold']:.2f},"
                f" codes in step {r['fp16'] / r['mx16_fold_in_step']:.2f})"
                f" err {err:.1e} same_as_unfold={same}",
                flush=True,
            )  # fmt: skip


if __name__ == "__main__":
    main()
