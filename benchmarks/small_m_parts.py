"""Where the time of the FP8 W8A8 Linear goes at M <= 16: the whole Linear (per-token and per-tensor) beside its
activation quantize alone and the split-K GEMM alone (codes from the quantize, fp16 MMA) and the FP8
weight-only GEMM (bf16 activations as they are), with bf16 cuBLAS as the anchor. CUDA-graph replays, warm L2,
the seven Llama shapes of ``bench_linear.py`` at M = 1 and 16. If the GEMM alone misses 1.7x of bf16, no fusion
of the quantize into it can reach the goal.

    PYTHONPATH=. python3 benchmarks/small_m_parts.py
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
import triton.testing
from bench_linear import SHAPES

from mxrun.kernels.fp8_quantize import Fp8Granularity, quantize_fp8
from mxrun.kernels.scaled_gemm import fp8_linear
from mxrun.kernels.small_m_gemm import small_m_gemm_triton


def _time(fn: Callable[[], object]) -> float:
    fn()
    return triton.testing.do_bench_cudagraph(fn, rep=20, return_mode="median") * 1e3


def main() -> None:
    for shape, (k, n) in SHAPES.items():
        w = (torch.randn(n, k, device="cuda") * 0.02).to(torch.bfloat16)
        per_channel = quantize_fp8(w, Fp8Granularity.PER_ROW)
        per_tensor = quantize_fp8(w, Fp8Granularity.PER_TENSOR)
        for m in (1, 16):
            x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
            xq = quantize_fp8(x, Fp8Granularity.PER_ROW)
            codes = {"a_scale": xq.scale, "weight_scale": per_channel.scale, "out_dtype": torch.bfloat16}
            calls = {
                "bf16": partial(torch.matmul, x, w.t()),
                "lin_chan": partial(fp8_linear, x, per_channel.data, per_channel.scale, None, "token"),
                "lin_tensor": partial(fp8_linear, x, per_tensor.data, per_tensor.scale, None, "tensor"),
                "q_token": partial(quantize_fp8, x, Fp8Granularity.PER_ROW),
                "q_tensor": partial(quantize_fp8, x, Fp8Granularity.PER_TENSOR),
                "gemm_codes": partial(small_m_gemm_triton, xq.data, per_channel.data, **codes),
                "gemm_wo": partial(small_m_gemm_triton, x, per_channel.data, weight_scale=per_channel.scale),
            }
            times = {name: _time(call) for name, call in calls.items()}
            print(f"{shape:24s} M={m:3d} " + " ".join(f"{a}={b:.1f}" for a, b in times.items()), flush=True)


if __name__ == "__main__":
    main()
