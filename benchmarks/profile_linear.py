"""Where one quantized Linear's time goes, kernel by kernel: each ``bench_linear.py`` column runs under the
PyTorch profiler and every kernel it launches is listed with its GPU time per call (activation quantization,
MXFP8 regrouping, GEMM), beside the bf16 anchor in the same run.

    PYTHONPATH=. python benchmarks/profile_linear.py --ms 1024 --columns mxfp8 fp8-block --json out.json
"""

from __future__ import annotations

import argparse

import torch

from benchmarks import bench_linear
from benchmarks.profile_moe import kernel_times
from benchmarks.sweep_moe_gluon import _write


def profile(shapes: list[str], ms: list[int], columns: list[str]) -> list[dict]:
    """One row per (shape, M, column): its kernels' ``(name, us)`` in launch order and their sum."""
    rows = []
    for shape in shapes:
        k, n = bench_linear.SHAPES[shape]
        g = torch.Generator(device="cuda").manual_seed(0)
        w = (torch.randn(n, k, device="cuda", generator=g) * 0.02).to(torch.bfloat16)
        for m in ms:
            x = torch.randn(m, k, device="cuda", generator=g).to(torch.bfloat16)
            fns = bench_linear._columns(x, w)
            for column in ["bf16", *columns]:
                kernels = kernel_times(fns[column])
                total = sum(us for _, us in kernels)
                rows.append({"shape": shape, "M": m, "column": column, "kernels": kernels, "total_us": total})
                parts = ", ".join(f"{name[:48]} {us:.1f}" for name, us in kernels)
                print(f"{shape:<24} M={m:>6} {column:<12} {total:8.1f} us: {parts}", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--shapes", nargs="+", default=list(bench_linear.SHAPES), choices=list(bench_linear.SHAPES)
    )
    parser.add_argument("--ms", type=int, nargs="+", default=[1024])
    parser.add_argument("--columns", nargs="+", default=["mxfp8"])
    parser.add_argument("--json", help="write the rows here (atomically)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU")
    rows = profile(args.shapes, args.ms, args.columns)
    if args.json:
        _write({"device": torch.cuda.get_device_name(), "rows": rows}, args.json)


if __name__ == "__main__":
    main()
