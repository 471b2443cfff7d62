"""The MoE top-k sum: the one-launch Triton kernel beside what it replaced (its anchor), same run.

Anchor ``torch``: what the experts forward did before, the zero fill of ``y`` (the down GEMM leaves dropped
pairs' rows unwritten) plus ``y.view(T, k, H).sum(dim=1, dtype=float32).to(dtype)``; ``compile``:
``torch.compile`` of the kernel's torch reference (which masks dropped pairs itself, so no fill). Each output is
checked against the reference (bit for bit for ours), each path timed as a CUDA-graph replay. GB/s counts the
bytes the kernel must move: ``y`` read once (bf16) and the output written once.

    PYTHONPATH=. python benchmarks/bench_moe_topk_sum.py --json topk-sum.json
"""

from __future__ import annotations

import argparse
import json

import torch
import triton.testing

from mxrun.kernels.moe_topk_sum import topk_sum_reference, topk_sum_triton

CASES = [  # name, tokens, experts, top_k, hidden
    ("Mixtral-8x7B", 128, 8, 2, 4096),
    ("Mixtral-8x7B", 8192, 8, 2, 4096),
    ("Qwen3-30B-A3B", 128, 128, 8, 2048),
    ("Qwen3-30B-A3B", 8192, 128, 8, 2048),
    ("DeepSeek-V3-like", 128, 256, 8, 7168),
    ("DeepSeek-V3-like", 8192, 256, 8, 7168),
]


def _torch_anchor(y: torch.Tensor, tokens: int, top_k: int) -> torch.Tensor:
    y.zero_()  # the fill the down GEMM's output needed; the GEMM itself is not timed here
    return y.view(tokens, top_k, -1).sum(dim=1, dtype=torch.float32).to(y.dtype)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json")
    args = parser.parse_args()
    compiled = torch.compile(topk_sum_reference)
    rows = []
    print(f"{'layer':>17} {'tokens':>6} {'torch us':>9} {'compile us':>11} {'triton us':>10} {'GB/s':>6} "
          f"{'x torch':>8} {'x compile':>10}")  # fmt: skip
    for name, tokens, experts, top_k, hidden in CASES:
        y = torch.randn(tokens * top_k, hidden, device="cuda").to(torch.bfloat16)
        index = torch.rand(tokens, experts, device="cuda").topk(top_k, dim=-1).indices
        reference = topk_sum_reference(y, index, experts)
        same = torch.equal(topk_sum_triton(y, index, experts), reference)
        close = (compiled(y, index, experts).float() - reference.float()).abs().max().item()
        scratch = y.clone()
        torch_us = 1000 * triton.testing.do_bench_cudagraph(
            lambda s=scratch, t=tokens, k=top_k: _torch_anchor(s, t, k)
        )
        compile_us = 1000 * triton.testing.do_bench_cudagraph(
            lambda y=y, i=index, e=experts: compiled(y, i, e)
        )
        triton_us = 1000 * triton.testing.do_bench_cudagraph(
            lambda y=y, i=index, e=experts: topk_sum_triton(y, i, e)
        )
        gbps = (y.numel() + tokens * hidden) * 2 / triton_us / 1e3
        rows.append({"layer": name, "tokens": tokens, "top_k": top_k, "hidden": hidden, "bit_exact": same,
                     "compile_max_abs_diff": close, "torch_us": torch_us, "compile_us": compile_us,
                     "triton_us": triton_us, "triton_gbps": gbps})  # fmt: skip
        print(f"{name:>17} {tokens:>6} {torch_us:>9.1f} {compile_us:>11.1f} {triton_us:>10.1f} {gbps:>6.0f} "
              f"{torch_us / triton_us:>8.2f} {compile_us / triton_us:>10.2f}  exact={same}", flush=True)  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
