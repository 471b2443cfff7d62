"""Sweep the launch of the MXFP8 -> 128x128-tile regrouping (:mod:`mxrun.kernels.mx_regroup`): one program per
tile against persistent programs that walk the tiles with the next ones' loads in flight, beside a device copy of
the same bytes in the same run (the bandwidth the pass could reach).

    PYTHONPATH=. python benchmarks/sweep_mx_regroup.py --json out.json
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import tempfile

import torch

from mxrun.kernels import mx_regroup
from mxrun.kernels.mxfp8_quantize import quantize_mxfp8

SHAPES = {  # what the aligned path regroups per call: Llama-3 weights and a Mixtral-8x7B expert stack
    "8B qkv 6144x4096": (6144, 4096),
    "8B gate_up 28672x4096": (28672, 4096),
    "70B qkv 10240x8192": (10240, 8192),
    "70B gate_up 57344x8192": (57344, 8192),
    "70B down 8192x28672": (8192, 28672),
    "Mixtral gate_up 8x28672x4096": (8, 28672, 4096),
}
SETTINGS = {
    "per-tile": None,
    "p1s3w8": (1, 3, 8),
    "p2s2w8": (2, 2, 8),
    "p2s3w4": (2, 3, 4),
    "p4s2w4": (4, 2, 4),
}


def _us(fn) -> float:
    import triton.testing

    return 1000 * float(triton.testing.do_bench_cudagraph(fn, rep=50, return_mode="median"))


def sweep(shapes: list[str], settings: list[str]) -> list[dict]:
    rows = []
    for name in shapes:
        shape = SHAPES[name]
        w = (torch.randn(*shape, device="cuda") * 0.02).to(torch.bfloat16)
        q = quantize_mxfp8(w)
        del w
        moved = 2 * q.data.numel() + q.scale_e8m0.numel()  # read data and codes, write data (+ tile scales)
        src = torch.empty(q.data.numel() + q.scale_e8m0.numel() // 2, dtype=torch.uint8, device="cuda")
        dst = torch.empty_like(src)
        copy_us = _us(functools.partial(dst.copy_, src))
        ref = mx_regroup.regroup_mxfp8_triton(q.data, q.scale_e8m0)
        for setting in settings:
            saved = mx_regroup.REGROUP_PERSISTENT
            mx_regroup.REGROUP_PERSISTENT = SETTINGS[setting]
            try:
                out = mx_regroup.regroup_mxfp8_triton(q.data, q.scale_e8m0)
                same = torch.equal(out.data.view(torch.uint8), ref.data.view(torch.uint8))
                us = _us(functools.partial(mx_regroup.regroup_mxfp8_triton, q.data, q.scale_e8m0))
            finally:
                mx_regroup.REGROUP_PERSISTENT = saved
            row = {"shape": name, "setting": setting, "us": us, "GBps": moved / us / 1e3, "copy_us": copy_us,
                   "vs_copy": copy_us / us, "same_bytes": same}  # fmt: skip
            rows.append(row)
            print(f"{name:30s} {setting:9s} {us:8.1f} us {row['GBps']:6.0f} GB/s  copy {copy_us:7.1f} us  "
                  f"x copy {row['vs_copy']:.2f}  same bytes {same}", flush=True)  # fmt: skip
        del q, src, dst, ref
        torch.cuda.empty_cache()
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--json", help="write the rows here (atomically)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU")
    rows = sweep(args.shapes, args.settings)
    if args.json:
        folder = os.path.dirname(os.path.abspath(args.json))
        with tempfile.NamedTemporaryFile("w", dir=folder, delete=False, suffix=".tmp") as handle:
            json.dump({"device": torch.cuda.get_device_name(), "rows": rows}, handle, indent=1)
        os.replace(handle.name, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
