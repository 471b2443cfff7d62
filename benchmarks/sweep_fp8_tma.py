"""Sweep the TMA-fed persistent FP8 GEMMs (:mod:`mxrun.kernels.fp8_tma_gemm`) and the Gluon W8A8 kernel
(:mod:`mxrun.kernels.fp8_wgmma_gemm`) against the pointer-load tile kernels they would replace at large M,
beside ``torch._scaled_mm`` rowwise and bf16 ``torch.matmul`` in the same run, with the accuracy of every candidate against the fp32 reference of the same quantized operands
(activations with outlier channels; see ``sweep_fp8_gemm.py`` for the ulp measure).

    PYTHONPATH=. python benchmarks/sweep_fp8_tma.py --json sweep.json
    PYTHONPATH=. python benchmarks/sweep_fp8_tma.py --shapes 4,5 --persistent-only --no-pointer \
        --tiles 128,128,128,8,8,4 64,128,128,8,4,3,3    # the 7th number: programs per SM

A tile is ``block_m, block_n, block_k, group_m, warps, stages[, programs_per_sm]``; block-scaled candidates
must be 128 wide in N and K (others are skipped for them).
"""

from __future__ import annotations

import argparse
import json

import torch

from benchmarks.sweep_fp8_gemm import rowwise_operands, time_us, ulp_error
from mxrun.kernels.fp8_quantize import Fp8Granularity, quantize_fp8
from mxrun.kernels.fp8_tma_gemm import fp8_tma_gemm
from mxrun.kernels.fp8_wgmma_gemm import fp8_wgmma_gemm, wgmma_gemm_usable
from mxrun.kernels.scaled_gemm import (
    GemmConfig,
    fp8_block_gemm_reference,
    fp8_block_gemm_triton,
    fp8_gemm_triton,
)

SHAPES = [  # M, K, N: Llama-3 8B / 70B projections at the bench_linear batch sizes that bound the goals
    (256, 4096, 6144), (256, 8192, 10240), (512, 4096, 6144), (512, 8192, 10240), (1024, 4096, 6144), (4096, 4096, 6144), (1024, 4096, 28672), (4096, 4096, 28672), (1024, 14336, 4096),
    (4096, 14336, 4096), (1024, 8192, 10240), (4096, 8192, 10240), (16384, 8192, 10240), (4096, 28672, 8192),
]  # fmt: skip
CHANNEL_TILES = [  # block_m, block_n, block_k, group_m, warps, stages
    (256, 128, 128, 8, 8, 4),
    (256, 128, 128, 16, 8, 3),
    (128, 256, 128, 8, 8, 3),
    (256, 128, 128, 8, 8, 3),
    (128, 128, 128, 8, 8, 4),
    (128, 256, 128, 8, 8, 4),
    (128, 128, 128, 8, 4, 4),
]
WGMMA_VARIANTS = [  # Gluon kernel: (persistent, stages, 128x256 tiles: None = where they pay); first: default
    (True, 4, None), (True, 4, False), (True, 4, True)
]  # fmt: skip
BLOCK_TILES = [
    (128, 128, 128, 8, 8, 4),
    (256, 128, 128, 8, 8, 3),
    (128, 128, 128, 8, 4, 4),
    (64, 128, 128, 8, 4, 5),
]


def _variant_name(persistent: bool, stages: int, wide: bool) -> str:
    """The Gluon kernel's default launch is "default", like the TMA kernel's; others by stages and tile."""
    if (persistent, stages, wide) == WGMMA_VARIANTS[0]:
        return "default"
    return f"{stages} stages {'128x256' if wide else '128x128'}"  # forced (block scaling takes 128x128 only)


def tile_config(tile: tuple) -> GemmConfig:
    """A sweep tile tuple as a config (the optional 7th number is ``programs_per_sm``)."""
    return GemmConfig(*tile[:6], programs_per_sm=tile[6] if len(tile) > 6 else 1)


def sweep_shape(
    m: int,
    k: int,
    n: int,
    rows: list[dict],
    quick: bool,
    tiles: tuple[list[tuple], list[tuple]] = (CHANNEL_TILES, BLOCK_TILES),
    persistent_only: bool = False,
    pointer: bool = True,
) -> None:
    shape = f"{m}x{k}x{n}"
    flops = 2.0 * m * n * k
    x, w, xq, wq, ref, bf16_us, smm_us = rowwise_operands(m, k, n)

    def emit(kernel: str, fn, expected: torch.Tensor, **extra) -> None:
        try:
            out = fn()
            us = time_us(fn)
        except Exception as error:  # a tile that does not fit is reported, not fatal
            print(f"{shape} {kernel} {extra}: {type(error).__name__}: {str(error)[:160]}", flush=True)
            return
        max_ulp, share = ulp_error(out, expected)
        row = {
            "shape": shape, "kernel": kernel, "us": us, "tflops": flops / us / 1e6, "vs_bf16": bf16_us / us,
            "vs_scaled_mm": smm_us / us, "max_ulp": max_ulp, "share_over_1ulp": share, **extra,
        }  # fmt: skip
        rows.append(row)
        print(
            f"{shape:<18} {kernel:<14} {extra.get('tile', ''):<26} {extra.get('persistent', '')!s:<5} "
            f"{us:9.1f} us {row['tflops']:7.1f} TFLOP/s  x bf16 {row['vs_bf16']:.2f}  x scaled_mm "
            f"{row['vs_scaled_mm']:.2f}  max_ulp {max_ulp:.1f} >1ulp {share:.4f}",
            flush=True,
        )

    def wgmma_variants(kernel: str, a, b, expected, block_scaled: bool) -> None:
        """The Gluon kernel (the sm_90 default) in each of WGMMA_VARIANTS (128x256 tiles: not block-scaled)."""
        if not wgmma_gemm_usable(a.data, b.data):
            return
        for persistent, stages, wide in WGMMA_VARIANTS:
            if block_scaled and wide:
                continue
            emit(
                kernel,
                lambda p=persistent, st=stages, w=wide: fp8_wgmma_gemm(
                    *(a.data, a.scale, b.data, b.scale, None, torch.bfloat16),
                    block_scaled=block_scaled, persistent=p, stages=st, wide=w,
                ),
                expected, tile=_variant_name(persistent, stages, wide), persistent=persistent,
            )  # fmt: skip

    emit("bf16", lambda: torch.matmul(x, w.t()), ref)
    emit(
        "scaled_mm",
        lambda: torch._scaled_mm(xq.data, wq.data.t(), xq.scale, wq.scale.t(), out_dtype=torch.bfloat16),
        ref,
    )
    if pointer:
        emit(
            "channel",
            lambda: fp8_gemm_triton(xq.data, xq.scale, wq.data, wq.scale, None, torch.bfloat16),
            ref,
        )
    emit(
        "channel-tma",
        lambda: fp8_tma_gemm(xq.data, xq.scale, wq.data, wq.scale, None, torch.bfloat16, block_scaled=False),
        ref, tile="default",
    )  # fmt: skip
    wgmma_variants("channel-wgmma", xq, wq, ref, block_scaled=False)
    emit(  # the ceiling without fp32 promotion (not a candidate: 6-9x the error)
        "channel-tma",
        lambda: fp8_tma_gemm(xq.data, xq.scale, wq.data, wq.scale, None, torch.bfloat16, block_scaled=False,
                             config=GemmConfig(256, 128, 128, 8, 8, 3, max_imprecise_acc=None)),
        ref, tile="(256, 128, 128, 8, 8, 3)", acc=None,
    )  # fmt: skip

    def tma_tiles(kernel: str, tiles: list[tuple], a, b, expected, block_scaled: bool) -> None:
        """Each candidate tile of the TMA kernel, persistent and (not quick) one program per tile."""
        for tile in tiles[: 2 if quick else None]:
            if block_scaled and tile[1:3] != (128, 128):
                continue
            cfg = tile_config(tile)
            for persistent in (True,) if quick or persistent_only else (True, False):
                emit(
                    kernel,
                    lambda cfg=cfg, p=persistent: fp8_tma_gemm(
                        a.data, a.scale, b.data, b.scale, None, torch.bfloat16, block_scaled=block_scaled,
                        config=cfg, persistent=p,
                    ),
                    expected, tile=str(tile), persistent=persistent,
                )  # fmt: skip

    tma_tiles("channel-tma", tiles[0], xq, wq, ref, block_scaled=False)

    xb = quantize_fp8(x, Fp8Granularity.GROUP_1X128)
    wb = quantize_fp8(w, Fp8Granularity.BLOCK_128X128)
    ref_b = fp8_block_gemm_reference(xb.data, xb.scale, wb.data, wb.scale, None, torch.bfloat16)
    if pointer:
        emit(
            "block",
            lambda: fp8_block_gemm_triton(xb.data, xb.scale, wb.data, wb.scale, None, torch.bfloat16),
            ref_b,
        )
    emit(
        "block-tma",
        lambda: fp8_tma_gemm(xb.data, xb.scale, wb.data, wb.scale, None, torch.bfloat16, block_scaled=True),
        ref_b, tile="default",
    )  # fmt: skip
    wgmma_variants("block-wgmma", xb, wb, ref_b, block_scaled=True)
    tma_tiles("block-tma", tiles[1], xb, wb, ref_b, block_scaled=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json")
    parser.add_argument("--shapes", default=None, help="comma-separated indices into SHAPES")
    parser.add_argument("--quick", action="store_true", help="first two tiles, persistent only")
    parser.add_argument(
        "--tiles", nargs="+", help="candidate tiles for both kernels (see the module docstring)"
    )
    parser.add_argument("--persistent-only", action="store_true", help="skip one-program-per-tile launches")
    parser.add_argument("--no-pointer", action="store_true", help="skip the pointer-load kernels")
    parser.add_argument("--extra-shapes", nargs="*", default=[], help="more shapes as MxKxN")
    args = parser.parse_args()
    picked = [SHAPES[int(i)] for i in args.shapes.split(",")] if args.shapes else SHAPES
    picked += [tuple(int(v) for v in text.split("x")) for text in args.extra_shapes]
    tiles = (CHANNEL_TILES, BLOCK_TILES)
    if args.tiles:
        given = [tuple(int(v) for v in text.split(",")) for text in args.tiles]
        tiles = (given, given)
    rows: list[dict] = []
    for m, k, n in picked:
        sweep_shape(m, k, n, rows, args.quick, tiles, args.persistent_only, not args.no_pointer)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"device": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)
    summarize(rows)


def summarize(rows: list[dict]) -> None:
    """Per shape: each kernel's default launch and its best candidate, as a ratio to ``_scaled_mm``."""
    print(f"\n{torch.cuda.get_device_name()}: x scaled_mm (default / best candidate [tile, persistent])")
    for shape in dict.fromkeys(r["shape"] for r in rows):
        parts = []
        for kernel in ("channel", "channel-tma", "channel-wgmma", "block", "block-tma", "block-wgmma"):
            mine = [r for r in rows if r["shape"] == shape and r["kernel"] == kernel and r.get("acc", 128)]
            if not mine:
                continue
            default = next((r for r in mine if r.get("tile", "default") == "default"), None)
            best = max(mine, key=lambda r: r["vs_scaled_mm"])
            text = f"{kernel} {default['vs_scaled_mm']:.2f}" if default else kernel
            parts.append(
                f"{text}/{best['vs_scaled_mm']:.2f} [{best.get('tile', '')} {best.get('persistent', '')}]"
            )
        print(f"{shape:<18} " + "  ".join(parts))


if __name__ == "__main__":
    main()
