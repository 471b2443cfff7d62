"""MXFP8 W8A8 at M <= 16: the Gluon FP8-``wgmma`` kernel (E4M3 codes on both sides, one MMA per 32-wide group,
:mod:`mxrun.kernels.mx_wgmma_small_m`) beside the split-K decode kernel it would replace and bf16 cuBLAS.
CUDA-graph replays, warm L2, the seven Llama shapes of ``bench_linear.py`` at M = 1 and 16. Columns (us):
``bf16``; ``fp8_codes_gemm`` (the FP8 W8A8 split-K GEMM alone: E4M3 codes, per-token and per-channel scales,
what MX could approach); ``round+mx`` (today's MXFP8 W8A8 at these rows: the rounding pass or the one row rounded in the loop,
then the split-K kernel widening the weight); ``wg_gemm`` (the new kernel alone, partials only, for each
programs target); ``q+wg`` (MX quantize of the activations, the new kernel, the split sum: the whole Linear).
Also checks each result against :func:`~mxrun.kernels.mxfp8_gemm.mxfp8_gemm_reference`.

    PYTHONPATH=. python3 benchmarks/small_m_mx_wgmma.py [--targets 264 528 792] [--stages 4] [--modes 0 1 2 3]
    [--block-n 64 128]
"""

from __future__ import annotations

import argparse
import itertools
import json
from functools import partial

import torch
import triton.testing
from bench_linear import SHAPES

from mxrun.kernels.e4m3 import mx_scales_foldable
from mxrun.kernels.fp8_quantize import Fp8Granularity, quantize_fp8
from mxrun.kernels.mx_wgmma_small_m import (
    mx_wgmma_small_m_partials,
    mx_wgmma_spread_partials,
    splits_for,
    spread_activation_codes,
)
from mxrun.kernels.mxfp8_gemm import mxfp8_gemm_reference
from mxrun.kernels.mxfp8_quantize import MxScaleRule, quantize_mxfp8, quantize_mxfp8_triton
from mxrun.kernels.small_m_gemm import small_m_gemm_triton, sum_splits


def _time(fn) -> float:
    fn()
    return triton.testing.do_bench_cudagraph(fn, rep=20, return_mode="median") * 1e3


def _whole(x, w, splits, stages, mode, block_n):
    q = quantize_mxfp8_triton(x, MxScaleRule.ROUND_UP)
    partials = mx_wgmma_small_m_partials(
        q.data, q.scale_e8m0, w.data, w.scale_e8m0, splits, stages, mode, block_n
    )
    c = torch.empty(x.shape[0], w.data.shape[0], dtype=x.dtype, device=x.device)
    sum_splits(partials, None, None, None, c)
    return c


def _whole_spread(x, w, splits):
    """Quantize, spread (torch ops here: a few launches a kernel would fold), the kernel, the split sum."""
    q = quantize_mxfp8_triton(x, MxScaleRule.ROUND_UP)
    spread = spread_activation_codes(q.data)
    partials = mx_wgmma_spread_partials(spread, q.scale_e8m0, w.data, w.scale_e8m0, splits)
    c = torch.empty(x.shape[0], w.data.shape[0], dtype=x.dtype, device=x.device)
    sum_splits(partials, None, None, None, c)
    return c


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--targets", type=int, nargs="+", default=[264, 528, 792])
    parser.add_argument("--stages", type=int, nargs="+", default=[4])
    parser.add_argument(
        "--modes",
        type=int,
        nargs="+",
        default=[0],
        help="kernel variants: 0 as shipped, 1 scale codes loaded a step ahead, 2 (timing only) products "
        "added unscaled, 3 (timing only) the step's MMAs chained",
    )
    parser.add_argument(
        "--block-n", type=int, nargs="+", default=[64], help="weight rows per program: 64, 128"
    )
    parser.add_argument("--json")
    args = parser.parse_args()
    rows = []
    for shape, (k, n) in SHAPES.items():
        w = (torch.randn(n, k, device="cuda") * 0.02).to(torch.bfloat16)
        mx = quantize_mxfp8(w)
        per_channel = quantize_fp8(w, Fp8Granularity.PER_ROW)
        fold = mx_scales_foldable(mx.scale_e8m0, mx.data)
        for m in (1, 16):
            x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
            q = quantize_mxfp8_triton(x, MxScaleRule.ROUND_UP)
            ref = mxfp8_gemm_reference(q.data, q.scale_e8m0, mx.data, mx.scale_e8m0, None, torch.float32)
            xq = quantize_fp8(x, Fp8Granularity.PER_ROW)
            times = {
                "bf16": _time(partial(torch.matmul, x, w.t())),
                "fp8_codes_gemm": _time(
                    partial(
                        small_m_gemm_triton, xq.data, per_channel.data, a_scale=xq.scale,
                        weight_scale=per_channel.scale, out_dtype=torch.bfloat16,
                    )
                ),
                "round+mx": _time(
                    partial(
                        small_m_gemm_triton, x, mx.data, weight_scale_e8m0=mx.scale_e8m0, mx_scale_fold=fold,
                        activation_mx_rule=MxScaleRule.ROUND_UP,
                    )
                ),
            }  # fmt: skip
            errors = {}
            for target in args.targets:
                for stages in args.stages:
                    for mode, block_n in itertools.product(args.modes, args.block_n):
                        tag = f"t{target}s{stages}m{mode}n{block_n}"
                        splits = splits_for(n, k, target * 64 // block_n, block_n)
                        gemm = partial(
                            mx_wgmma_small_m_partials, q.data, q.scale_e8m0, mx.data, mx.scale_e8m0, splits,
                            stages, mode, block_n,
                        )  # fmt: skip
                        times[f"wg_gemm[{tag}]"] = _time(gemm)
                        if mode < 2:  # the variants that compute the product
                            whole = partial(_whole, x, mx, splits, stages, mode, block_n)
                            times[f"q+wg[{tag}]"] = _time(whole)
                            got = gemm().sum(0)
                            errors[tag] = ((got - ref).abs().max() / ref.abs().max()).item()
            if m == 1:  # the block-diagonal variant (M <= 4)
                spread = spread_activation_codes(q.data)
                for target in args.targets:
                    splits = splits_for(n, k, target)
                    gemm = partial(
                        mx_wgmma_spread_partials, spread, q.scale_e8m0, mx.data, mx.scale_e8m0, splits
                    )
                    times[f"spread_gemm[t{target}]"] = _time(gemm)
                    times[f"q+spread[t{target}]"] = _time(partial(_whole_spread, x, mx, splits))
                    got = gemm().sum(0)
                    errors[f"spread{target}"] = ((got - ref).abs().max() / ref.abs().max()).item()
            best = min(v for key, v in times.items() if key.startswith(("q+wg", "q+spread")))
            row = {"shape": shape, "m": m, "times_us": times, "rel_err": errors,
                   "x_bf16": {"round+mx": times["bf16"] / times["round+mx"], "q+wg best": times["bf16"] / best}}  # fmt: skip
            rows.append(row)
            print(
                f"{shape:24s} M={m:2d} "
                + " ".join(f"{a}={b:.1f}" for a, b in times.items())
                + f" | x bf16: round+mx {row['x_bf16']['round+mx']:.2f} new {row['x_bf16']['q+wg best']:.2f}"
                + f" | err {max(errors.values()):.1e}",
                flush=True,
            )
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=1)


if __name__ == "__main__":
    main()
