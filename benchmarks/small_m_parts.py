"""Where the time of the FP8 W8A8 Linear goes at M <= 16: the whole Linear (per-token and per-tensor) beside its
activation quantize alone and the split-K GEMM alone (codes from the quantize, fp16 MMA) and the FP8
weight-only GEMM (bf16 activations as they are), with bf16 cuBLAS as the anchor. CUDA-graph replays, warm L2,
the seven Llama shapes of ``bench_linear.py`` at M = 1 and 16. If the GEMM alone misses 1.7x of bf16, no fusion
of the quantize into it can reach the goal. The same for MXFP8 W8A8 (the rounding pass, the MX decode GEMM alone,
both), and what any launch before the GEMM costs: ``empty+codes`` runs a one-program kernel that writes one word,
then the codes GEMM, so ``empty+codes - gemm_codes`` is the floor a quantize launch (``q_token+codes``) could
reach by being faster.

    PYTHONPATH=. python3 benchmarks/small_m_parts.py
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
import triton.testing
from bench_linear import SHAPES

from mxrun.kernels.backend import tl, triton
from mxrun.kernels.e4m3 import mx_scales_foldable
from mxrun.kernels.fp8_quantize import Fp8Granularity, quantize_fp8
from mxrun.kernels.mxfp8_quantize import MxScaleRule, mx_round_triton, quantize_mxfp8
from mxrun.kernels.scaled_gemm import fp8_linear
from mxrun.kernels.small_m_gemm import small_m_gemm_triton


@triton.jit
def _one_word_kernel(out_ptr):
    tl.store(out_ptr, 1)


def _then(*calls: Callable[[], object]) -> Callable[[], object]:
    """One callable running ``calls`` in order (the last one's result)."""

    def run() -> object:
        for call in calls:
            result = call()
        return result

    return run


def _time(fn: Callable[[], object]) -> float:
    fn()
    return triton.testing.do_bench_cudagraph(fn, rep=20, return_mode="median") * 1e3


def main() -> None:
    for shape, (k, n) in SHAPES.items():
        w = (torch.randn(n, k, device="cuda") * 0.02).to(torch.bfloat16)
        per_channel = quantize_fp8(w, Fp8Granularity.PER_ROW)
        per_tensor = quantize_fp8(w, Fp8Granularity.PER_TENSOR)
        mx = quantize_mxfp8(w)
        fold = mx_scales_foldable(mx.scale_e8m0, mx.data)
        word = torch.zeros(1, dtype=torch.int32, device="cuda")
        for m in (1, 16):
            x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
            xq = quantize_fp8(x, Fp8Granularity.PER_ROW)
            codes = {"a_scale": xq.scale, "weight_scale": per_channel.scale, "out_dtype": torch.bfloat16}
            gemm_codes = partial(small_m_gemm_triton, xq.data, per_channel.data, **codes)
            quantize = partial(quantize_fp8, x, Fp8Granularity.PER_ROW)
            empty = partial(_one_word_kernel[(1,)], word)
            rounded = mx_round_triton(x, MxScaleRule.ROUND_UP)
            mx_args = {"weight_scale_e8m0": mx.scale_e8m0, "mx_scale_fold": fold}
            gemm_mx = partial(small_m_gemm_triton, rounded, mx.data, **mx_args)
            mx_round = partial(mx_round_triton, x, MxScaleRule.ROUND_UP)
            calls = {
                "bf16": partial(torch.matmul, x, w.t()),
                "lin_chan": partial(fp8_linear, x, per_channel.data, per_channel.scale, None, "token"),
                "lin_tensor": partial(fp8_linear, x, per_tensor.data, per_tensor.scale, None, "tensor"),
                "q_token": partial(quantize_fp8, x, Fp8Granularity.PER_ROW),
                "q_tensor": partial(quantize_fp8, x, Fp8Granularity.PER_TENSOR),
                "gemm_codes": partial(small_m_gemm_triton, xq.data, per_channel.data, **codes),
                "gemm_wo": partial(small_m_gemm_triton, x, per_channel.data, weight_scale=per_channel.scale),
                "empty": empty,
                "empty+codes": _then(empty, gemm_codes),
                "q_token+codes": _then(quantize, gemm_codes),
                "mx_round": mx_round,
                "gemm_mx": gemm_mx,
                "empty+mx": _then(empty, gemm_mx),
                "round+mx": partial(
                    small_m_gemm_triton, x, mx.data, activation_mx_rule=MxScaleRule.ROUND_UP, **mx_args
                ),
            }
            times = {name: _time(call) for name, call in calls.items()}
            print(f"{shape:24s} M={m:3d} " + " ".join(f"{a}={b:.1f}" for a, b in times.items()), flush=True)


if __name__ == "__main__":
    main()
