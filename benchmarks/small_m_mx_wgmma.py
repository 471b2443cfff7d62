"""MXFP8 W8A8 at one to four rows: the Gluon FP8-``wgmma`` Linear with block-diagonal activations
(:mod:`mxrun.kernels.mx_wgmma_small_m`) beside the split-K decode kernel it replaces there and bf16 cuBLAS.
CUDA-graph replays, warm L2, the seven Llama shapes of ``bench_linear.py``. Columns (us): ``bf16``;
``fp8_codes_gemm`` (the FP8 W8A8 split-K GEMM alone on E4M3 codes, per-token and per-channel scales: the speed an
FP8 MMA path can reach); ``round+mx`` (the split-K path: the rounding pass, or the one row rounded inside its
loop, then the MX decode GEMM); ``mx_rows`` (the whole new Linear: the spread quantize, the GEMM and its split
sum); ``q_spread`` (that quantize alone). Also checks ``mx_rows`` against the reference Linear.

``--variants`` times ``mx_rows`` under each of several settings of :mod:`mxrun.kernels.mx_wgmma_small_m`, each
given as ``NAME=VALUE[,NAME=VALUE...]`` (integers; e.g. ``PDL=0 PAIRS=0,STAGES=4``), one after the other
per case.

    PYTHONPATH=. python3 benchmarks/small_m_mx_wgmma.py [--ms 1 2 4] [--box-major] [--variants PDL=0 PAIRS=0,STAGES=4]
        [--shapes "8B gate_up 4096->28672"] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
from functools import partial

import torch
import triton.testing
from bench_linear import SHAPES

from mxrun.kernels import mx_wgmma_small_m
from mxrun.kernels.box_major import BoxMajorWeight
from mxrun.kernels.e4m3 import mx_scales_foldable
from mxrun.kernels.fp8_quantize import Fp8Granularity, quantize_fp8
from mxrun.kernels.mx_wgmma_small_m import mx_rows_linear, quantize_spread
from mxrun.kernels.mxfp8_gemm import mxfp8_linear_reference
from mxrun.kernels.mxfp8_quantize import MxScaleRule, quantize_mxfp8
from mxrun.kernels.small_m_gemm import small_m_gemm_triton

RULE = MxScaleRule.ROUND_UP


def _time(fn) -> float:
    fn()
    return triton.testing.do_bench_cudagraph(fn, rep=20, return_mode="median") * 1e3


def _parse_variant(parser: argparse.ArgumentParser, variant: str) -> dict[str, int]:
    """``NAME=VALUE[,NAME=VALUE...]`` as settings of :mod:`mxrun.kernels.mx_wgmma_small_m` (exits through
    ``parser`` on a malformed item or a name the module lacks)."""
    settings = {}
    for item in variant.split(","):
        name, _, value = item.partition("=")
        if not hasattr(mx_wgmma_small_m, name) or not value.lstrip("-").isdigit():
            parser.error(
                f"--variants {variant!r}: expected NAME=INTEGER with NAME a setting of mx_wgmma_small_m"
            )
        settings[name] = int(value)
    return settings


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ms", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument(
        "--box-major", action="store_true", help="the MX weight in [64, 128] boxes, as the Linear holds it"
    )
    parser.add_argument("--variants", nargs="+", default=[], help="NAME=VALUE[,NAME=VALUE] settings")
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES))
    parser.add_argument("--json")
    args = parser.parse_args()
    variants = {variant: _parse_variant(parser, variant) for variant in args.variants}
    rows = []
    for shape in args.shapes:
        k, n = SHAPES[shape]
        w = (torch.randn(n, k, device="cuda") * 0.02).to(torch.bfloat16)
        mx = quantize_mxfp8(w)
        weight = BoxMajorWeight.of(mx.data) if args.box_major else mx.data
        per_channel = quantize_fp8(w, Fp8Granularity.PER_ROW)
        fold = mx_scales_foldable(mx.scale_e8m0, mx.data)
        for m in args.ms:
            x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
            xq = quantize_fp8(x, Fp8Granularity.PER_ROW)
            codes = {"a_scale": xq.scale, "weight_scale": per_channel.scale, "out_dtype": torch.bfloat16}
            mx_args = {"weight_scale_e8m0": mx.scale_e8m0, "mx_scale_fold": fold, "activation_mx_rule": RULE}
            new = partial(mx_rows_linear, x, weight, mx.scale_e8m0, None, RULE)
            times = {
                "bf16": _time(partial(torch.matmul, x, w.t())),
                "fp8_codes_gemm": _time(partial(small_m_gemm_triton, xq.data, per_channel.data, **codes)),
                "round+mx": _time(partial(small_m_gemm_triton, x, weight, **mx_args)),
                "mx_rows": _time(new),
                "q_spread": _time(partial(quantize_spread, x, RULE)),
            }
            for variant, settings in variants.items():
                saved = {name: getattr(mx_wgmma_small_m, name) for name in settings}
                for name, value in settings.items():
                    setattr(mx_wgmma_small_m, name, value)
                try:
                    ref = mxfp8_linear_reference(x.float(), mx.data, mx.scale_e8m0, None, RULE)
                    got = new().float()
                    err = ((got - ref).abs().max() / ref.abs().max()).item()
                    times[f"mx_rows[{variant}]"] = _time(new) if err < 1e-2 else float("nan")
                finally:
                    for name, value in saved.items():
                        setattr(mx_wgmma_small_m, name, value)
            ref = mxfp8_linear_reference(x.float(), mx.data, mx.scale_e8m0, None, RULE)
            error = ((new().float() - ref).abs().max() / ref.abs().max()).item()
            row = {"shape": shape, "m": m, "times_us": times, "rel_err": error}
            row["x_bf16"] = {name: times["bf16"] / t for name, t in times.items() if name != "q_spread"}
            rows.append(row)
            print(
                f"{shape:24s} M={m:2d} " + " ".join(f"{a}={b:.1f}" for a, b in times.items())
                + " | x bf16: " + " ".join(f"{a} {b:.2f}" for a, b in row["x_bf16"].items() if a != "bf16")
                + f" | err {error:.1e}",
                flush=True,
            )  # fmt: skip
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=1)


if __name__ == "__main__":
    main()
