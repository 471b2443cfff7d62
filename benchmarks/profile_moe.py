"""Where one MoE layer's time goes, kernel by kernel: each column of ``bench_moe.py`` runs the layer under the
PyTorch profiler and the GPU time of every kernel it launches is summed per forward, so that a change to one
grouped GEMM can be seen apart from routing, grouping and the top-k sum (and beside the bf16 anchor's
``torch._grouped_mm`` calls in the same run).

    PYTHONPATH=. python benchmarks/profile_moe.py --shape DeepSeek-V3-like --tokens 8192 \\
        --columns mxfp8 fp8-channel --json out.json
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import tempfile

import torch

from benchmarks import bench_moe
from mxrun.kernels.e4m3 import mx_scales_foldable
from mxrun.kernels.moe_gemm import moe_experts_triton

REPEATS = 5


def kernel_times(fn, repeats: int = REPEATS) -> list[tuple[str, float]]:
    """``(kernel name, microseconds)`` of each GPU operation of one forward of ``fn``, in launch order (the two
    grouped GEMMs of a layer often share a kernel name), each the mean over ``repeats`` forwards."""
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(repeats):
            fn()
        torch.cuda.synchronize()
    events = sorted(
        (e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA),
        key=lambda e: e.time_range.start,
    )
    per_forward = len(events) // repeats
    if per_forward * repeats != len(events):
        raise RuntimeError(
            f"{len(events)} GPU events over {repeats} forwards: not the same launches each time"
        )
    return [
        (
            events[i].name,
            sum(events[i + r * per_forward].time_range.elapsed_us() for r in range(repeats)) / repeats,
        )
        for i in range(per_forward)
    ]


def profile(shape: str, tokens: int, columns: list[str]) -> dict[str, list[tuple[str, float]]]:
    experts, hidden, inter, top_k = bench_moe.SHAPES[shape]
    generator = torch.Generator(device="cuda").manual_seed(0)
    w13 = torch.randn(experts, 2 * inter, hidden, device="cuda", generator=generator, dtype=torch.bfloat16)
    w2 = torch.randn(experts, hidden, inter, device="cuda", generator=generator, dtype=torch.bfloat16)
    w13.mul_(0.02)
    w2.mul_(0.02)
    case = bench_moe._draws(tokens, experts, hidden, top_k, 1)[0]
    out = {
        bench_moe.ANCHOR: kernel_times(
            functools.partial(
                bench_moe._bf16_grouped, *case[:3], w13.transpose(1, 2), w2.transpose(1, 2), inter
            )
        )
    }
    for column in columns:
        base, setting = bench_moe._variant(column)
        fmt, activation = bench_moe.SCHEMES[base]
        gate_up, down = bench_moe._quantize_stack(w13, fmt), bench_moe._quantize_stack(w2, fmt)
        options = {}
        if base.startswith("mxfp8"):
            options["mx_scales_foldable"] = all(mx_scales_foldable(w.scale, w.data) for w in (gate_up, down))
        with bench_moe._forced(setting):
            out[column] = kernel_times(
                functools.partial(moe_experts_triton, *case[:3], gate_up, down, activation, **options)
            )
        del gate_up, down
        torch.cuda.empty_cache()
    return out


def table(column: str, rows: list[tuple[str, float]]) -> str:
    total = sum(us for _, us in rows)
    lines = [f"### {column}: {total:.0f} us of GPU work per forward", "", "| # | kernel | us | share |"]
    lines.append("| ---: | --- | ---: | ---: |")
    for i, (name, us) in enumerate(rows):
        lines.append(f"| {i} | `{name[:90]}` | {us:.0f} | {us / total:.0%} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="DeepSeek-V3-like", choices=list(bench_moe.SHAPES))
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--columns", nargs="+", default=["mxfp8"], help="bench_moe.py scheme columns")
    parser.add_argument("--json", help="write the per-kernel rows here (atomically)")
    args = parser.parse_args()
    unknown = [c for c in args.columns if bench_moe._variant(c)[0] not in bench_moe.SCHEMES]
    if unknown:
        parser.error(f"unknown columns {unknown}: one of {', '.join(bench_moe.SCHEMES)}, optionally suffixed")
    if not torch.cuda.is_available():
        print("profile_moe.py needs a CUDA GPU", file=sys.stderr)
        return 2
    result = profile(args.shape, args.tokens, args.columns)
    print(f"{torch.cuda.get_device_name()}: {args.shape}, {args.tokens} tokens\n")
    for column, rows in result.items():
        print(table(column, rows))
    if args.json:
        folder = os.path.dirname(os.path.abspath(args.json))
        with tempfile.NamedTemporaryFile("w", dir=folder, delete=False, suffix=".tmp") as f:
            json.dump({"device": torch.cuda.get_device_name(), "shape": args.shape, "tokens": args.tokens,
                       "kernels": result}, f, indent=1)  # fmt: skip
        os.replace(f.name, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
