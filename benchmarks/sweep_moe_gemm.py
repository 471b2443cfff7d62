"""Sweep the MoE grouped GEMM's tile (``GemmConfig``), ``BLOCK_M`` and FP8 accumulator promotion, one GEMM at a
time (gate/up with SiLU fused, down with the routing weights fused), beside the launcher's default choice in
the same run. Timed as CUDA-graph replays. This is how ``moe_block_m`` / ``moe_gemm_config`` are chosen.

    PYTHONPATH=. python benchmarks/sweep_moe_gemm.py --shapes Mixtral-8x7B --tokens 128 --json sweep.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import torch
import triton.testing

from benchmarks.bench_moe import SCHEMES, SHAPES, _quantize_stack
from mxrun.kernels.e4m3 import mx_scales_foldable
from mxrun.kernels.moe_gemm import (
    ExpertActivation,
    ExpertWeightFormat,
    _quantize_activation,
    moe_block_m,
    moe_gemm_config,
    moe_grouped_gemm_triton,
)
from mxrun.kernels.moe_grouping import group_tokens_fast
from mxrun.kernels.moe_routing import route_topk
from mxrun.kernels.scaled_gemm import GemmConfig

# (block_n, block_k, warps, stages) per BLOCK_M; the kernel needs block_k = 128 for FP8 blocks / 1x128 groups
TILES = {
    16: [(32, 128, 4, 4), (32, 256, 4, 4), (64, 128, 4, 4), (64, 256, 4, 3), (128, 128, 4, 3)],
    32: [(32, 128, 4, 4), (32, 256, 4, 4), (64, 128, 4, 4), (64, 256, 4, 3), (128, 128, 4, 3)],
    64: [
        (64, 64, 4, 4),
        (64, 128, 4, 4),
        (128, 64, 4, 4),
        (128, 128, 8, 3),
        (64, 128, 8, 3),
        (32, 128, 4, 4),
    ],
    128: [
        (64, 128, 8, 3),
        (64, 128, 8, 4),
        (64, 128, 4, 3),
        (64, 128, 4, 4),
        (128, 128, 8, 3),
        (128, 128, 8, 2),
        (128, 64, 8, 4),
        (64, 64, 4, 4),
        (128, 128, 4, 3),
        (256, 64, 8, 3),
    ],
}

# The weight-rows (swapped) kernel, bf16/fp16 activations only: (block_n = weight rows = the MMA's M, block_k,
# warps, stages); block_m (tokens) is the MMA's N.
SWAP_TILES = {
    "small": [(64, 128, 4, 3), (64, 256, 4, 3), (64, 128, 4, 4), (128, 128, 8, 3)],
    "large": [(64, 64, 4, 4), (64, 128, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3)],
}


def _us(fn) -> float:
    fn()
    torch.cuda.synchronize()
    return 1000.0 * float(triton.testing.do_bench_cudagraph(fn, rep=30, return_mode="median"))


def _promotions(column: str) -> list[int | None]:
    activation = SCHEMES[column][1]
    if not activation.is_fp8:
        return [None]  # bf16 MMA: the option does nothing
    if column.startswith("fp8-block") or activation is ExpertActivation.FP8_GROUP:
        return [None]  # each 128-K step's dot is added into fp32 by the kernel itself
    return [128, None]


def sweep_case(
    shape: str,
    tokens: int,
    columns: list[str],
    block_ms: list[int] | None,
    kernels: str = "both",
    group_ms: list[int] | None = None,
    paddings: list[str] | None = None,
) -> list[dict]:
    experts, hidden, inter, top_k = SHAPES[shape]
    gen = torch.Generator(device="cuda").manual_seed(0)
    w13 = torch.randn(experts, 2 * inter, hidden, device="cuda", generator=gen, dtype=torch.bfloat16) * 0.02
    w2 = torch.randn(experts, hidden, inter, device="cuda", generator=gen, dtype=torch.bfloat16) * 0.02
    x = torch.randn(tokens, hidden, device="cuda", generator=gen).to(torch.bfloat16)
    h = torch.randn(tokens * top_k, inter, device="cuda", generator=gen).to(torch.bfloat16)
    weights, index = route_topk(torch.randn(tokens, experts, device="cuda", generator=gen), top_k)
    routing = weights.reshape(-1).contiguous()
    rows = []
    for column in columns:
        fmt, activation = SCHEMES[column]
        gate_up, down = _quantize_stack(w13, fmt), _quantize_stack(w2, fmt)
        # MX scales folded into the widening where the codes allow it, as the experts module runs them
        fold = fmt is ExpertWeightFormat.MXFP8 and all(
            mx_scales_foldable(w.scale, w.data) for w in (gate_up, down)
        )
        gemm_activation = ExpertActivation.NONE if activation.is_mx else activation
        default_bm = moe_block_m(tokens * top_k, experts, gemm_activation)
        a1, s1 = _quantize_activation(x, activation)
        a2, s2 = _quantize_activation(h, activation)
        out1 = torch.empty(tokens * top_k, inter, device="cuda", dtype=torch.bfloat16)
        out2 = torch.empty(tokens * top_k, hidden, device="cuda", dtype=torch.bfloat16)
        for bm in block_ms or sorted({max(16, default_bm // 2), default_bm, min(128, default_bm * 2)}):
            groups = group_tokens_fast(index, experts, bm)
            for gemm, (a, s, w, out, n, k, gated) in {
                "gate_up": (a1, s1, gate_up, out1, inter, hidden, True),
                "down": (a2, s2, down, out2, hidden, inter, False),
            }.items():
                default = moe_gemm_config(bm, n, k, fmt, gemm_activation, gated, tokens * top_k / experts)
                candidates = [("default", default, False)]
                needs_128 = (
                    w.format is ExpertWeightFormat.FP8_BLOCK or activation is ExpertActivation.FP8_GROUP
                )
                for group_m in group_ms or [default.group_m]:
                    g = f" g{group_m}" if group_ms else ""
                    if group_ms and group_m != default.group_m:
                        candidates.append(
                            (f"default{g}", dataclasses.replace(default, group_m=group_m), False)
                        )
                    if kernels in ("regular", "both"):
                        for bn, bk, warps, stages in TILES[bm]:
                            if needs_128 and bk != 128:
                                continue  # the kernel takes one scale per 128-wide K step there
                            for promote in _promotions(column):
                                cfg = GemmConfig(bm, bn, bk, group_m, warps, stages, promote)
                                name = f"{bn}x{bk} w{warps} s{stages} p{promote}{g}"
                                candidates.append((name, cfg, False))
                    if kernels in ("swapped", "both") and not gemm_activation.is_fp8:
                        for bn, bk, warps, stages in SWAP_TILES["small" if bm <= 32 else "large"]:
                            if needs_128 and bk != 128:
                                continue
                            cfg = GemmConfig(bm, bn, bk, group_m, warps, stages, None)
                            candidates.append((f"swap {bn}x{bk} w{warps} s{stages}{g}", cfg, True))
                padding_modes = paddings or ["default"]
                candidates = [
                    (name + ("" if mode == "default" else f" pad-{mode}"), cfg, swap, mode)
                    for name, cfg, swap in candidates
                    for mode in padding_modes
                ]
                for name, cfg, swap, mode in candidates:

                    def fn(
                        cfg=cfg,
                        a=a,
                        s=s,
                        w=w,
                        out=out,
                        gated=gated,
                        groups=groups,
                        act=gemm_activation,
                        swap=swap,
                        fold=fold,
                        zero=None if mode == "default" else mode == "zero",
                    ) -> None:
                        moe_grouped_gemm_triton(
                            a, s, w, groups, out, gated=gated, gather_top_k=top_k if gated else None,
                            routing_weights=None if gated else routing, activation=act, config=cfg,
                            swap_ab=swap, mx_scale_fold=fold, zero_padding=zero,
                        )  # fmt: skip

                    try:
                        us = _us(fn)
                    except Exception as error:  # an illegal tile for this format: note it, go on
                        rows.append({"shape": shape, "tokens": tokens, "column": column, "gemm": gemm,
                                     "block_m": bm, "config": name, "error": str(error)[:200]})  # fmt: skip
                        continue
                    rows.append({"shape": shape, "tokens": tokens, "column": column, "gemm": gemm,
                                 "block_m": bm, "config": name, "us": us})  # fmt: skip
        ok = [r for r in rows if r["column"] == column and "us" in r]
        for gemm in ("gate_up", "down"):
            mine = [r for r in ok if r["gemm"] == gemm]
            base = next(
                r for r in mine if r["config"].split(" pad-")[0] == "default" and r["block_m"] == default_bm
            )
            best = min(mine, key=lambda r: r["us"])
            print(f"{shape} T={tokens} {column:15s} {gemm:7s} default bm{default_bm} {base['us']:8.1f} us | "
                  f"best bm{best['block_m']} {best['config']:24s} {best['us']:8.1f} us "
                  f"x{base['us'] / best['us']:.2f}", flush=True)  # fmt: skip
        del gate_up, down
        torch.cuda.empty_cache()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    parser.add_argument("--tokens", nargs="+", type=int, default=[128, 8192])
    parser.add_argument("--columns", nargs="+", choices=list(SCHEMES), default=list(SCHEMES))
    parser.add_argument(
        "--block-m", nargs="+", type=int, help="BLOCK_M values (default: the launcher's, /2, x2)"
    )
    parser.add_argument(
        "--kernels",
        choices=["regular", "swapped", "both", "default"],
        default="both",
        help='which candidates besides the default tile ("default": only it, with each --group-m)',
    )
    parser.add_argument(
        "--group-m",
        nargs="+",
        type=int,
        help="GROUP_M values: how many BLOCK_M row blocks a wave walks per column sweep (default: the "
        "launcher's). Row blocks of one expert next to each other share its weight tile in L2.",
    )
    parser.add_argument(
        "--padding",
        nargs="+",
        choices=["read", "zero"],
        help="how the layout blocks' padding rows are read: as pair 0's row, or as zeros (masked loads)",
    )
    parser.add_argument("--json")
    args = parser.parse_args()
    rows = []
    for shape in args.shapes:
        for tokens in args.tokens:
            rows += sweep_case(
                shape, tokens, args.columns, args.block_m, args.kernels, args.group_m, args.padding
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
