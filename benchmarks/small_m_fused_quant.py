"""FP8 W8A8 per-token at M <= 16 with the activations quantized inside the split-K GEMM's launch
(``small_m_gemm_triton(..., quantize_tokens=True)``) against the two launches it replaces (the per-token quantize
kernel, then the split-K GEMM on its codes), beside bf16 cuBLAS: the seven Llama shapes of ``bench_linear.py``,
CUDA-graph replays, each variant timed in turn within every repeat (interleaved), warm L2 or ``--cold-weights``
(copies of the weights in turn, so each call reads its weight from DRAM as a model's forward does). Also checks
that the one launch gives the two launches' bits.

    PYTHONPATH=. python3 benchmarks/small_m_fused_quant.py [--cold-weights] [--prefetch 0 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable
from functools import partial

import torch
from bench_linear import SHAPES, _rotating, weight_copies
from sweep_small_m import graph_us

from mxrun.kernels.fp8_quantize import Fp8Granularity, quantize_fp8
from mxrun.kernels.scaled_gemm import fp8_linear
from mxrun.kernels.small_m_gemm import small_m_gemm_triton


def _variants(
    x: torch.Tensor, weights: list[torch.Tensor], channels: list, prefetch: list[int]
) -> dict[str, Callable[[], torch.Tensor]]:
    """Each timed call, going round the weight copies."""
    calls = {"bf16": _rotating([partial(torch.matmul, x, w.t()) for w in weights])}
    calls["two launches"] = _rotating(
        [partial(fp8_linear, x, q.data, q.scale, None, "token") for q in channels]
    )
    for steps in prefetch:
        calls[f"one launch p{steps}"] = _rotating(
            [
                partial(
                    small_m_gemm_triton,
                    x,
                    q.data,
                    weight_scale=q.scale,
                    quantize_tokens=True,
                    prefetch_steps=steps,
                )
                for q in channels
            ]
        )
    return calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cold-weights", action="store_true")
    parser.add_argument("--prefetch", nargs="+", type=int, default=[0, 2])
    parser.add_argument("--ms", nargs="+", type=int, default=[1, 16])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json")
    args = parser.parse_args()
    rows = []
    for shape, (k, n) in SHAPES.items():
        w = (torch.randn(n, k, device="cuda") * 0.02).to(torch.bfloat16)
        weights = [w] + [w.clone() for _ in range(weight_copies(n, k) - 1)] if args.cold_weights else [w]
        channels = [quantize_fp8(copy, Fp8Granularity.PER_ROW) for copy in weights]
        for m in args.ms:
            x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
            q = channels[0]
            two = fp8_linear(x, q.data, q.scale, None, "token")
            for steps in args.prefetch:
                one = small_m_gemm_triton(
                    x, q.data, weight_scale=q.scale, quantize_tokens=True, prefetch_steps=steps
                )
                if not torch.equal(one, two):
                    raise SystemExit(f"{shape} M={m} p{steps}: the one launch differs from the two launches")
            calls = _variants(x, weights, channels, args.prefetch)
            times: dict[str, list[float]] = {name: [] for name in calls}
            for _ in range(args.repeats):
                for name, fn in calls.items():
                    times[name].append(graph_us(fn))
            us = {name: statistics.median(t) for name, t in times.items()}
            row = {
                "shape": shape,
                "m": m,
                "us": us,
                "x_bf16": {name: us["bf16"] / t for name, t in us.items()},
            }
            rows.append(row)
            cells = "  ".join(f"{name} {t:.1f} ({us['bf16'] / t:.2f}x)" for name, t in us.items())
            print(f"{shape} M={m}: {cells}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "cold_weights": args.cold_weights, "rows": rows}, f,
                      indent=1)  # fmt: skip


if __name__ == "__main__":
    main()
