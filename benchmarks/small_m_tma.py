"""The small-M split-K GEMM with its weight read by TMA (a tensor descriptor, one bulk copy per tile) against the
per-thread ``cp.async`` pointer loads, GEMM alone, CUDA-graph replays, the seven Llama shapes of
``bench_linear.py`` at M = 1 and 16, for the three operand kinds of the Linear presets: E4M3 activation codes
(FP8 W8A8), bf16 activations on an FP8 per-channel weight (weight-only) and on an MXFP8 weight (folded decode).
Warm: one weight, replayed (it stays in L2 where it fits); cold: enough copies of the weight, called in turn,
that each call reads it from DRAM. Also checks that both loads give the same bits.

    PYTHONPATH=. python3 benchmarks/small_m_tma.py [--stages 3 4]
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from functools import partial

import torch
import triton.testing
from bench_linear import SHAPES

from mxrun.kernels.e4m3 import mx_scales_foldable
from mxrun.kernels.fp8_quantize import Fp8Granularity, quantize_fp8
from mxrun.kernels.mxfp8_quantize import quantize_mxfp8
from mxrun.kernels.small_m_gemm import default_config, small_m_gemm_triton

L2_BYTES = 50 * 2**20


def _time(fn: Callable[[], object], calls: int) -> float:
    fn()
    return triton.testing.do_bench_cudagraph(fn, rep=20, return_mode="median") * 1e3 / calls


def _codes_gemm(xq: torch.Tensor, xs: torch.Tensor, wd: torch.Tensor, ws: torch.Tensor, **kw) -> torch.Tensor:
    """FP8 W8A8: E4M3 activation codes with per-token scales, per-channel weight."""
    return small_m_gemm_triton(xq, wd, a_scale=xs, weight_scale=ws, out_dtype=torch.bfloat16, **kw)


def _wo_gemm(x: torch.Tensor, wd: torch.Tensor, ws: torch.Tensor, **kw) -> torch.Tensor:
    """FP8 per-channel weight-only: bf16 activations."""
    return small_m_gemm_triton(x, wd, weight_scale=ws, **kw)


def _mx_gemm(x: torch.Tensor, fold: bool, wd: torch.Tensor, ws: torch.Tensor, **kw) -> torch.Tensor:
    """MXFP8 weight-only: bf16 activations, the folded decode where the weight allows it."""
    return small_m_gemm_triton(x, wd, weight_scale_e8m0=ws, mx_scale_fold=fold, **kw)


def _in_turn(call: Callable[..., torch.Tensor], weights: list, kw: dict) -> list[torch.Tensor]:
    """One call per copy of the weight (cold: each reads its weight from DRAM)."""
    return [call(*wt, **kw) for wt in weights]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stages", type=int, nargs="+", default=[3, 4], help="pipeline depths for TMA")
    parser.add_argument("--ms", type=int, nargs="+", default=[1, 16])
    args = parser.parse_args()
    print(
        f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}; us per call"
    )
    for shape, (k, n) in SHAPES.items():
        w = (torch.randn(n, k, device="cuda") * 0.02).to(torch.bfloat16)
        mx, channel = quantize_mxfp8(w), quantize_fp8(w, Fp8Granularity.PER_ROW)
        fold = mx_scales_foldable(mx.scale_e8m0, mx.data)
        copies = max(2, -(-2 * L2_BYTES // (n * k)))
        cold_mx = [(mx.data.clone(), mx.scale_e8m0.clone()) for _ in range(copies)]
        cold_ch = [(channel.data.clone(), channel.scale.clone()) for _ in range(copies)]
        del w
        for m in args.ms:
            xb = torch.randn(m, k, device="cuda").to(torch.bfloat16)
            xq = quantize_fp8(xb, Fp8Granularity.PER_ROW)
            kinds = {
                "codes": (partial(_codes_gemm, xq.data, xq.scale), cold_ch, torch.float8_e4m3fn, False),
                "wo": (partial(_wo_gemm, xb), cold_ch, torch.bfloat16, False),
                "mx": (partial(_mx_gemm, xb, fold), cold_mx, torch.bfloat16, True),
            }
            for kind, (call, weights, a_dtype, is_mx) in kinds.items():
                base = default_config(a_dtype, is_mx, m)
                variants: dict[str, dict] = {"ptr": {"weight_tma": False}}
                for s in args.stages:
                    variants[f"tma{s}"] = {"weight_tma": True, "config": base._replace(num_stages=s)}
                ref = call(*weights[0])
                row = []
                for name, kw in variants.items():
                    same = torch.equal(call(*weights[0], **kw), ref)
                    warm = _time(partial(call, *weights[0], **kw), 1)
                    cold = _time(partial(_in_turn, call, weights, kw), len(weights))
                    row.append(f"{name}={warm:.1f}/{cold:.1f}{'' if same else ' DIFFERENT'}")
                print(f"{shape:24s} M={m:3d} {kind:5s} warm/cold " + " ".join(row), flush=True)


if __name__ == "__main__":
    main()
