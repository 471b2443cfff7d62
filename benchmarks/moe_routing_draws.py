"""How much one MoE layer's time depends on the routing draw: for eight routings of one shape and token count
(random logits, each from its own seed), the pairs each expert got, how many 32- and 64-row layout blocks that
makes, and the layer's time for the bf16 ``torch._grouped_mm`` anchor and each column. With ~32 pairs per
expert (Mixtral-8x7B at 128 tokens) every expert past 32 pairs spills into a second 32-row block, and the
decoded-weight grouped GEMMs decode that expert's weights again for it.

    PYTHONPATH=. python benchmarks/moe_routing_draws.py Mixtral-8x7B 128 mxfp8-wo,mxfp8,fp8-channel
"""

from __future__ import annotations

import argparse
import functools

import torch
import triton.testing

from benchmarks.bench_moe import SCHEMES, SHAPES, _bf16_grouped, _quantize_stack
from mxrun.kernels.e4m3 import mx_scales_foldable
from mxrun.kernels.moe_gemm import ExpertWeightFormat, moe_experts_triton
from mxrun.kernels.moe_routing import route_topk


def _us(fn) -> float:
    fn()
    torch.cuda.synchronize()
    return 1000 * float(triton.testing.do_bench_cudagraph(fn, rep=40, return_mode="median"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("shape", choices=list(SHAPES))
    parser.add_argument("tokens", type=int)
    parser.add_argument("columns", help="comma-separated bench_moe columns")
    parser.add_argument("--draws", type=int, default=8)
    args = parser.parse_args()
    columns = args.columns.split(",")
    experts, hidden, inter, top_k = SHAPES[args.shape]
    generator = torch.Generator(device="cuda").manual_seed(0)
    w13 = torch.randn(experts, 2 * inter, hidden, device="cuda", generator=generator, dtype=torch.bfloat16)
    w2 = torch.randn(experts, hidden, inter, device="cuda", generator=generator, dtype=torch.bfloat16)
    w13.mul_(0.02)
    w2.mul_(0.02)
    stacks = {}
    for column in columns:
        fmt, activation = SCHEMES[column]
        gate_up, down = _quantize_stack(w13, fmt), _quantize_stack(w2, fmt)
        options = {}
        if fmt is ExpertWeightFormat.MXFP8:
            options["mx_scales_foldable"] = all(mx_scales_foldable(w.scale, w.data) for w in (gate_up, down))
        stacks[column] = (gate_up, down, activation, options)
    print(f"{args.shape} T={args.tokens} ({torch.cuda.get_device_name()}); us (x over bf16 grouped)")
    print("draw | pairs per expert | 32-row blocks | 64-row blocks | bf16-grouped | " + " | ".join(columns))
    for draw in range(args.draws):
        gen = torch.Generator(device="cuda").manual_seed(1000 + draw)
        x = torch.randn(args.tokens, hidden, device="cuda", generator=gen).to(torch.bfloat16)
        weights, index = route_topk(torch.randn(args.tokens, experts, device="cuda", generator=gen), top_k)
        counts = torch.bincount(index.reshape(-1), minlength=experts)
        blocks32, blocks64 = int((-(-counts // 32)).sum()), int((-(-counts // 64)).sum())
        anchor = _us(
            functools.partial(
                _bf16_grouped, x, index, weights, w13.transpose(1, 2), w2.transpose(1, 2), inter
            )
        )
        cells = []
        for column in columns:
            gate_up, down, activation, options = stacks[column]
            us = _us(
                functools.partial(moe_experts_triton, x, index, weights, gate_up, down, activation, **options)
            )
            cells.append(f"{us:.0f} (x{anchor / us:.2f})")
        shown = counts.tolist() if experts <= 16 else f"max {int(counts.max())}"
        print(f"{draw} | {shown} | {blocks32} | {blocks64} | {anchor:.0f} | " + " | ".join(cells), flush=True)


if __name__ == "__main__":
    main()
