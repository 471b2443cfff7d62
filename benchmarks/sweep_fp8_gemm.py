"""Sweep the FP8 GEMM launch choices that bound issue 5's large-M goals: tile shape and how often the Hopper
FP8 MMA accumulator is promoted to fp32 (``max_num_imprecise_acc``), for the per-channel (W8A8 rowwise) and
the 128x128 block-scaled kernels, beside ``torch._scaled_mm`` rowwise and bf16 ``torch.matmul`` in the same
run.

Speed alone would pick "never promote"; so every candidate is also checked for accuracy against the fp32
reference of the same quantized operands (:func:`fp8_gemm_reference` / :func:`fp8_block_gemm_reference`) on
activations with outlier channels (a few columns x 64, what real LLM activations look like): the largest
error in units of the bf16 output's last place (ulp), and the share of outputs off by more than one ulp.
``_scaled_mm`` (cuBLASLt, fast accumulation off) is measured the same way, as the bar.

    PYTHONPATH=. python benchmarks/sweep_fp8_gemm.py --json sweep.json
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable

import torch
import triton.testing

from mxrun.kernels.fp8_quantize import Fp8Granularity, quantize_fp8
from mxrun.kernels.scaled_gemm import (
    GemmConfig,
    fp8_block_gemm_reference,
    fp8_block_gemm_triton,
    fp8_gemm_reference,
    fp8_gemm_triton,
)

SHAPES = [(4096, 4096, 14336), (16384, 8192, 10240), (1024, 14336, 4096), (4096, 8192, 57344)]  # M, K, N
TILES = [  # block_m, block_n, block_k, group_m, warps, stages
    (128, 256, 128, 8, 8, 3),
    (128, 128, 128, 8, 8, 4),
    (128, 256, 64, 8, 8, 4),
    (256, 128, 128, 8, 8, 3),
    (128, 128, 128, 8, 4, 4),
]
CHANNEL_ACC = [32, 128, None]
BLOCK_ACC = [None, 32]


def time_us(fn: Callable[[], object]) -> float:
    return 1000.0 * triton.testing.do_bench(fn, warmup=10, rep=60, return_mode="median")


def ulp_error(actual: torch.Tensor, expected: torch.Tensor) -> tuple[float, float]:
    """(max error in bf16 ulps of the expected value, share of outputs more than one ulp off)."""
    exp = expected.float()
    ulp = torch.where(exp == 0, torch.full_like(exp, 2.0**-133), (exp.abs().log2().floor() - 7).exp2())
    err = (actual.float() - exp).abs() / ulp
    return float(err.max()), float((err > 1.0).float().mean())


def activations(m: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(m, k, device="cuda", generator=g)
    cols = torch.randperm(k, device="cuda", generator=g)[:8]
    x[:, cols] *= 64.0
    return x.to(torch.bfloat16)


def emit(rows: list[dict], row: dict) -> None:
    rows.append(row)
    acc = row.get("acc", "")
    print(
        f"{row['shape']:<22} {row['kernel']:<10} {row.get('tile', ''):<26} acc={acc!s:<5} "
        f"{row['us']:9.1f} us {row['tflops']:7.1f} TFLOP/s  x bf16 {row['vs_bf16']:.2f}  "
        f"x scaled_mm {row['vs_scaled_mm']:.2f}  max_ulp {row['max_ulp']:.1f} >1ulp {row['share_over_1ulp']:.4f}",
        flush=True,
    )


def rowwise_operands(m: int, k: int, n: int) -> tuple:
    """(x, w, x per-token FP8, w per-channel FP8, fp32 reference of the FP8 product, bf16 us, _scaled_mm us)
    for one shape: the operands and anchors every FP8 GEMM sweep starts from."""
    x = activations(m, k, seed=m + k + n)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5
    bf16_us = time_us(lambda: torch.matmul(x, w.t()))
    xq = quantize_fp8(x, Fp8Granularity.PER_ROW)
    wq = quantize_fp8(w, Fp8Granularity.PER_ROW)
    ref = fp8_gemm_reference(xq.data, xq.scale, wq.data, wq.scale, None, torch.bfloat16)
    smm_us = time_us(
        lambda: torch._scaled_mm(xq.data, wq.data.t(), xq.scale, wq.scale.t(), out_dtype=torch.bfloat16)
    )
    return x, w, xq, wq, ref, bf16_us, smm_us


def sweep_shape(m: int, k: int, n: int, rows: list[dict]) -> None:
    shape = f"{m}x{k}x{n}"
    flops = 2.0 * m * n * k
    x, w, xq, wq, ref, bf16_us, smm_us = rowwise_operands(m, k, n)
    scaled = torch._scaled_mm(xq.data, wq.data.t(), xq.scale, wq.scale.t(), out_dtype=torch.bfloat16)

    def row(kernel: str, us: float, out: torch.Tensor, expected: torch.Tensor, **extra) -> dict:
        max_ulp, share = ulp_error(out, expected)
        return {
            "shape": shape, "kernel": kernel, "us": us, "tflops": flops / us / 1e6,
            "vs_bf16": bf16_us / us, "vs_scaled_mm": smm_us / us, "max_ulp": max_ulp,
            "share_over_1ulp": share, **extra,
        }  # fmt: skip

    emit(rows, row("bf16", bf16_us, torch.matmul(x, w.t()), ref))
    emit(rows, row("scaled_mm", smm_us, scaled, ref))
    for tile in TILES:
        for acc in CHANNEL_ACC:
            cfg = GemmConfig(*tile, max_imprecise_acc=acc)
            try:
                out = fp8_gemm_triton(xq.data, xq.scale, wq.data, wq.scale, None, torch.bfloat16, config=cfg)
                us = time_us(
                    lambda cfg=cfg: fp8_gemm_triton(
                        xq.data, xq.scale, wq.data, wq.scale, None, torch.bfloat16, config=cfg
                    )
                )
            except Exception as error:  # a tile that does not fit is reported, not fatal
                print(f"{shape} channel {tile} acc={acc}: {type(error).__name__}: {str(error)[:120]}")
                continue
            emit(rows, row("channel", us, out, ref, tile=str(tile), acc=acc))

    xb = quantize_fp8(x, Fp8Granularity.GROUP_1X128)
    wb = quantize_fp8(w, Fp8Granularity.BLOCK_128X128)
    ref_b = fp8_block_gemm_reference(xb.data, xb.scale, wb.data, wb.scale, None, torch.bfloat16)
    for tile in TILES:
        if tile[2] != 128:
            continue
        for acc in BLOCK_ACC:
            cfg = GemmConfig(*tile, max_imprecise_acc=acc)
            try:
                out = fp8_block_gemm_triton(
                    xb.data, xb.scale, wb.data, wb.scale, None, torch.bfloat16, config=cfg
                )
                us = time_us(
                    lambda cfg=cfg: fp8_block_gemm_triton(
                        xb.data, xb.scale, wb.data, wb.scale, None, torch.bfloat16, config=cfg
                    )
                )
            except Exception as error:
                print(f"{shape} block {tile} acc={acc}: {type(error).__name__}: {str(error)[:120]}")
                continue
            emit(rows, row("block", us, out, ref_b, tile=str(tile), acc=acc))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json")
    parser.add_argument("--shapes", type=int, default=len(SHAPES), help="first N shapes")
    args = parser.parse_args()
    rows: list[dict] = []
    for m, k, n in SHAPES[: args.shapes]:
        sweep_shape(m, k, n, rows)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"device": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
