"""Launch the split-K small-M GEMM once per case under Nsight Compute: FP8 W8A8 codes (fp16 MMA), FP8
weight-only (bf16 MMA) and MXFP8 with the folded decode (activations rounded beforehand), on 8B ``o`` and
``gate_up`` at M = 1 and 16, each in an NVTX range named after it. ncu flushes the caches before each kernel, so
the weights come from DRAM:

    ncu --clock-control none --profile-from-start off --nvtx --kernel-name regex:_split_k_kernel \\
        --section SpeedOfLight --section Occupancy --section WarpStateStats --section LaunchStats \\
        --section MemoryWorkloadAnalysis python3 benchmarks/profile_small_m.py
"""

from __future__ import annotations

import torch

from mxrun.kernels.e4m3 import mx_scales_foldable
from mxrun.kernels.fp8_quantize import Fp8Granularity, quantize_fp8
from mxrun.kernels.mxfp8_quantize import mx_round_triton, quantize_mxfp8
from mxrun.kernels.small_m_gemm import small_m_gemm_triton


def main() -> None:
    cases = []
    for k, n in [(4096, 4096), (4096, 28672)]:
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5
        channel, mx = quantize_fp8(w, Fp8Granularity.PER_ROW), quantize_mxfp8(w)
        assert mx_scales_foldable(mx.scale_e8m0, mx.data)
        for m in (1, 16):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            xq, xr = quantize_fp8(x, Fp8Granularity.PER_ROW), mx_round_triton(x, "round_up")
            cases += [
                (f"codes {k}x{n} m{m}", lambda xq=xq, q=channel: small_m_gemm_triton(
                    xq.data, q.data, a_scale=xq.scale, weight_scale=q.scale, out_dtype=torch.bfloat16)),
                (f"fp8wo {k}x{n} m{m}", lambda x=x, q=channel: small_m_gemm_triton(x, q.data, weight_scale=q.scale)),
                (f"mxfold {k}x{n} m{m}", lambda xr=xr, q=mx: small_m_gemm_triton(
                    xr, q.data, weight_scale_e8m0=q.scale_e8m0, mx_scale_fold=True)),
            ]  # fmt: skip
    for _, fn in cases:  # compile outside the profiled range
        fn()
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    for name, fn in cases:
        torch.cuda.nvtx.range_push(name)
        fn()
        torch.cuda.nvtx.range_pop()
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()


if __name__ == "__main__":
    main()
