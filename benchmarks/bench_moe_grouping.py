"""MoE token grouping: the one-launch Triton kernel beside the torch version (its anchor), same run.

For router-like indices (distinct top-k experts per token) at decode and prefill sizes, both must give the
same layout (checked), and each is timed as a CUDA-graph replay (how a serving engine runs a layer; at these
sizes launch latency is most of the time). Sizes above :data:`~mxrun.kernels.moe_grouping.MAX_PAIRS` are
timed too (the limit is lifted for the run) to show where the limit comes from.

    PYTHONPATH=. python benchmarks/bench_moe_grouping.py --json grouping.json
"""

from __future__ import annotations

import argparse
import json

import torch
import triton.testing

import mxrun.kernels.moe_grouping as grouping
from mxrun.kernels.moe_routing import group_tokens

CASES = [  # tokens, experts, top_k
    (1, 128, 8),
    (16, 128, 8),
    (128, 128, 8),
    (512, 128, 8),
    (1024, 128, 8),
    (2048, 128, 8),
    (16, 8, 2),
    (1024, 8, 2),
    (128, 256, 8),
]
BLOCK_M = 16


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json")
    args = parser.parse_args()
    grouping.MAX_PAIRS = 1 << 20  # time past the launcher's limit as well
    rows = []
    print(
        f"{'tokens':>6} {'E':>4} {'k':>2} {'pairs':>6} {'same':>5} {'torch us':>9} {'triton us':>10} {'x':>6}"
    )
    for tokens, experts, top_k in CASES:
        index = torch.rand(tokens, experts, device="cuda").topk(top_k, dim=-1).indices
        expected = group_tokens(index, experts, BLOCK_M)
        actual = grouping.group_tokens_triton(index, experts, BLOCK_M)
        same = all(
            torch.equal(a, b)
            for a, b in zip(expected[:3], actual[:3], strict=True)  # pair ids, block experts, counts
        )
        torch_us = 1000 * triton.testing.do_bench_cudagraph(
            lambda index=index, experts=experts: group_tokens(index, experts, BLOCK_M)
        )
        triton_us = 1000 * triton.testing.do_bench_cudagraph(
            lambda index=index, experts=experts: grouping.group_tokens_triton(index, experts, BLOCK_M)
        )
        rows.append({"tokens": tokens, "experts": experts, "top_k": top_k, "pairs": tokens * top_k,
                     "same": same, "torch_us": torch_us, "triton_us": triton_us})  # fmt: skip
        print(f"{tokens:>6} {experts:>4} {top_k:>2} {tokens * top_k:>6} {same!s:>5} {torch_us:>9.1f} "
              f"{triton_us:>10.1f} {torch_us / triton_us:>6.2f}", flush=True)  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "block_m": BLOCK_M, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
