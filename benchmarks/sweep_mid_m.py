"""Tiles of the mid-M kernel (:mod:`mxrun.kernels.mid_m_gemm`), GEMM alone, CUDA-graph replays, on the seven
Llama shapes of ``bench_linear.py``: FP8 per-channel and MXFP8 weights (folded decode, and the fp32 decode for
comparison) with bf16 or fp16 activations, or (``--kinds fp8-codes fp8-block-codes``) the W8A8 operands, E4M3
activation codes per token or in 1x128 groups; each tile with two program targets, beside cuBLAS in the
activations' dtype. Every output is checked against the reference first (a tile that computes wrong is reported
and not timed). Prints each case's best tile; per tile, the geometric mean of its time over each case's best; and
the folded MX decode's best time over the fp32 decode's.

    PYTHONPATH=. python3 benchmarks/sweep_mid_m.py [--ms 64 128 256] [--tiles 64,128,128,4,3 ...] [--dtype fp16]
        [--kinds fp8-channel mxfp8 mxfp8-fp32-decode fp8-codes fp8-block-codes]
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
from collections.abc import Callable

import torch
import triton.testing
from bench_linear import SHAPES

from mxrun.kernels.e4m3 import mx_scales_foldable, mx_scales_foldable_f16
from mxrun.kernels.fp8_quantize import Fp8Granularity, quantize_fp8
from mxrun.kernels.mid_m_gemm import MidMConfig, mid_m_gemm_triton
from mxrun.kernels.mxfp8_gemm import mxfp8_linear_reference
from mxrun.kernels.mxfp8_quantize import quantize_mxfp8
from mxrun.kernels.scaled_gemm import fp8_block_gemm_reference, fp8_gemm_reference

TILES = [  # (block_n, block_m, block_k, num_warps, num_stages)
    (64, 64, 128, 4, 4),
    (64, 128, 128, 4, 3),
    (64, 128, 64, 4, 4),
    (128, 64, 64, 8, 4),
    (128, 128, 128, 8, 3),
]
TARGETS = [132, 264]
KINDS = ["fp8-channel", "mxfp8", "mxfp8-fp32-decode", "fp8-codes", "fp8-block-codes"]


def _time(fn: Callable[[], object]) -> float:
    fn()
    return triton.testing.do_bench_cudagraph(fn, rep=15, return_mode="median") * 1e3


def _correct(out: torch.Tensor, ref: torch.Tensor) -> bool:
    """Finite and within 1% of the reference's largest magnitude everywhere (a wrong tile is far off)."""
    out, ref = out.float(), ref.float()
    return bool(torch.isfinite(out).all()) and float((out - ref).abs().max()) <= 0.01 * float(ref.abs().max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ms", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--json", help="write every timing here")
    parser.add_argument(
        "--tiles",
        nargs="+",
        help="tiles to try instead of TILES, each 'block_n,block_m,block_k,warps,stages'",
    )
    parser.add_argument("--targets", type=int, nargs="+", default=TARGETS, help="program targets to try")
    parser.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16", help="the activations' dtype")
    parser.add_argument("--kinds", nargs="+", choices=KINDS, default=KINDS[:3], help="operand kinds to time")
    args = parser.parse_args()
    tiles = [tuple(int(v) for v in t.split(",")) for t in args.tiles] if args.tiles else TILES
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float16
    print(
        f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}; us per call"
    )
    rows = []
    torch.manual_seed(0)
    for name, (k, n) in SHAPES.items():
        w = torch.randn(n, k, device="cuda", dtype=dtype) * 0.02
        channel = quantize_fp8(w, Fp8Granularity.PER_ROW)
        blocks = quantize_fp8(w, Fp8Granularity.BLOCK_128X128)
        mx = quantize_mxfp8(w)
        fold = {"mx_scale_fold": mx_scales_foldable(mx.scale_e8m0, mx.data)}
        if dtype == torch.float16:
            fold = {"mx_scale_fold16": mx_scales_foldable_f16(mx.scale_e8m0)}
        for m in args.ms:
            x = torch.randn(m, k, device="cuda", dtype=dtype)
            mx_ref = mxfp8_linear_reference(x, mx.data, mx.scale_e8m0, None, None)
            token = quantize_fp8(x, Fp8Granularity.PER_ROW)
            groups = quantize_fp8(x, Fp8Granularity.GROUP_1X128)
            kinds = {  # activations, keywords, weight, reference
                "fp8-channel": (
                    x,
                    {"weight_scale": channel.scale},
                    channel.data,
                    x.float() @ (channel.data.float() * channel.scale).T,
                ),
                "mxfp8": (x, {"weight_scale_e8m0": mx.scale_e8m0, **fold}, mx.data, mx_ref),
                "mxfp8-fp32-decode": (x, {"weight_scale_e8m0": mx.scale_e8m0}, mx.data, mx_ref),
                "fp8-codes": (
                    token.data,
                    {"a_scale": token.scale, "weight_scale": channel.scale, "out_dtype": dtype},
                    channel.data,
                    fp8_gemm_reference(token.data, token.scale, channel.data, channel.scale, None, dtype),
                ),
                "fp8-block-codes": (
                    groups.data,
                    {"a_scale": groups.scale, "weight_block_scale": blocks.scale, "out_dtype": dtype},
                    blocks.data,
                    fp8_block_gemm_reference(
                        groups.data, groups.scale, blocks.data, blocks.scale, None, dtype
                    ),
                ),
            }
            bf16 = _time(lambda x=x, w=w: torch.matmul(x, w.T))
            for kind in args.kinds:
                a, kwargs, data, ref = kinds[kind]
                times = {}
                for tile, target in itertools.product(tiles, args.targets):
                    config = MidMConfig(*tile, target_programs=target)

                    def call(a=a, data=data, kwargs=kwargs, config=config) -> torch.Tensor:
                        return mid_m_gemm_triton(a, data, config=config, **kwargs)

                    if not _correct(call(), ref):
                        print(f"WRONG {name} M={m} {kind} {tile} target {target}")
                        continue
                    times[(tile, target)] = _time(call)
                best = min(times, key=times.get)
                rows.append({"shape": name, "M": m, "kind": kind, "bf16_us": bf16,
                             "us": {f"{t}:{g}": v for (t, g), v in times.items()}})  # fmt: skip
                print(f"{name:<24} M={m:>4} {kind:<12} cuBLAS {bf16:7.1f} us | best {times[best]:7.1f} us "
                      f"({bf16 / times[best]:.2f}x) {best[0]} target {best[1]}", flush=True)  # fmt: skip
    for kind in args.kinds:
        print(f"\n{kind}: time of each tile over each case's best, geometric mean")
        cases = [r for r in rows if r["kind"] == kind]
        for key in cases[0]["us"]:
            logs = [math.log(r["us"][key] / min(r["us"].values())) for r in cases if key in r["us"]]
            print(f"  {key:<32} x{math.exp(sum(logs) / len(logs)):.3f} ({len(logs)} cases)")
    folded = {(r["shape"], r["M"]): min(r["us"].values()) for r in rows if r["kind"] == "mxfp8"}
    fp32 = {(r["shape"], r["M"]): min(r["us"].values()) for r in rows if r["kind"] == "mxfp8-fp32-decode"}
    logs = [math.log(folded[c] / fp32[c]) for c in folded if c in fp32]
    if logs:
        print(f"\nfolded MX decode: x{math.exp(sum(logs) / len(logs)):.3f} the fp32 decode's time (best tiles, "
              f"geometric mean), faster in {sum(1 for v in logs if v < 0)} of {len(logs)}")  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
