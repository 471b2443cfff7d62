"""Split-K counters in CUDA graphs: a call captured with its arrival counters taken from the workspace arena (no
node in the graph) against the same call with them allocated in the graph's pool (a memset node per call, what
every capture did before the arena), interleaved, beside bf16 cuBLAS: ``bench_linear.py`` columns on the seven
Llama shapes at M = 1 and 16, timed as ``triton.testing.do_bench_cudagraph`` does (the way ``bench_linear.py
--graph`` times them).

    PYTHONPATH=. python3 benchmarks/graph_counters_arena.py [--columns fp8-channel ...] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics

import torch
import triton.testing

from benchmarks.bench_linear import SHAPES, _columns
from mxrun.kernels import workspace

COLUMNS = ["fp8-channel", "fp8-block", "mxfp8", "fp8-channel-wo"]


def _capture_stream() -> int:
    """The handle of ``torch.cuda.graph``'s own capture stream (made at the first capture)."""
    with torch.cuda.graph(torch.cuda.CUDAGraph()):
        pass
    return torch.cuda.graph.default_capture_stream.cuda_stream


def _timed(fn, arena: bool, device: torch.device, capture_stream: int) -> float:
    """us per call; the capture stream starts without a kept buffer, and finds the whole arena free (``arena``)
    or none of it (the graph's pool, a memset node). Reaches into the workspace's state on purpose."""
    state = workspace._ARENAS[device]
    state[1] = 0 if arena else state[0].numel()  # the arena's words are zero again after every replay
    for key in [key for key in workspace._BUFFERS if key[0] == device and key[1] == capture_stream]:
        del workspace._BUFFERS[key]
    return triton.testing.do_bench_cudagraph(fn, rep=20, return_mode="median") * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--columns", nargs="+", default=COLUMNS)
    parser.add_argument("--ms", nargs="+", type=int, default=[1, 16])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json")
    args = parser.parse_args()
    device = torch.device("cuda", torch.cuda.current_device())
    workspace.zeroed_int32(device, "benchmark", 1)  # a call outside any capture makes the arena
    capture_stream = _capture_stream()
    rows = []
    for shape, (k, n) in SHAPES.items():
        w = (torch.randn(n, k, device=device) * 0.02).to(torch.bfloat16)
        for m in args.ms:
            x = torch.randn(m, k, device=device).to(torch.bfloat16)
            fns = _columns(x, w)
            bf16 = triton.testing.do_bench_cudagraph(fns["bf16"], rep=20, return_mode="median") * 1e3
            for column in args.columns:
                _timed(fns[column], False, device, capture_stream)  # warm-up
                times: dict[bool, list[float]] = {False: [], True: []}
                for _ in range(args.repeats):
                    for arena in (False, True):
                        times[arena].append(_timed(fns[column], arena, device, capture_stream))
                old, new = statistics.median(times[False]), statistics.median(times[True])
                rows.append(
                    {"shape": shape, "m": m, "column": column, "bf16": bf16, "memset": old, "arena": new}
                )
                print(
                    f"{shape:24s} M={m:2d} {column:15s} bf16 {bf16:6.1f}  memset node {old:6.1f} ({bf16 / old:.2f}x)"
                    f"  arena {new:6.1f} ({bf16 / new:.2f}x)  x{new / old:.3f}",
                    flush=True,
                )
    ratios = [row["arena"] / row["memset"] for row in rows]
    geomean = math.exp(sum(map(math.log, ratios)) / len(ratios))
    print(
        f"arena: x{geomean:.3f} the time (geometric mean), faster in {sum(r < 1 for r in ratios)} of {len(ratios)}"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
