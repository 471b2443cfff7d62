"""Sweep launch choices of the FP8 per-row and 128x128-block kernels on the shapes of the bandwidth goal.

For each shape: a device-to-device copy of the input's bytes (the anchor), an earlier launcher to compare with
(a copy of an older ``mxrun/kernels/fp8_quantize.py`` placed, uncommitted, at
``benchmarks/_before/fp8_quantize_before.py``; skipped when absent, e.g.
``git show REV:mxrun/kernels/fp8_quantize.py > benchmarks/_before/fp8_quantize_before.py``) and candidate launches of the current
kernels, each checked byte for byte against the torch reference on the GPU before it is timed. GB/s counts the
bytes the kernel must move (input read + E4M3 data + fp32 scales written), as bench_quantize.py does.

    PYTHONPATH=. python benchmarks/sweep_fp8_quantize.py --json sweep.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import pathlib
from collections.abc import Callable

import torch
import triton.testing

from mxrun.kernels import fp8_quantize as fq
from mxrun.kernels.row_layout import ceil_div

PER_ROW_SHAPES = [(16384, 7168), (16384, 14336), (2048, 7168), (2048, 14336), (16384, 4096), (2048, 4096)]
BLOCK_SHAPES = [(8192, 8192), (28672, 8192), (128 * 1536, 2048), (8 * 28672, 4096)]  # stacks: rows folded


def time_us(fn: Callable[[], object]) -> float:
    return 1000.0 * triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def copy_gbps(x: torch.Tensor) -> float:
    source = x.view(torch.uint8).reshape(-1)
    destination = torch.empty_like(source)
    return 2 * source.numel() / time_us(lambda: destination.copy_(source)) / 1e3


def before_module():
    path = pathlib.Path(__file__).parent / "_before" / "fp8_quantize_before.py"
    if not path.exists():
        return None
    spec = importlib.util.spec_from_file_location("fp8_quantize_before", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def row_launch(x: torch.Tensor, block_r: int, warps: int, max_pieces: int, policy: str) -> Callable:
    m, k = x.shape
    p0, p1, p2 = fq.fp8_row_pieces(k, max_pieces)

    def launch():
        data = torch.empty(x.shape, dtype=torch.uint8, device=x.device)
        scale = torch.empty((m, 1), dtype=torch.float32, device=x.device)
        fq._fp8_row_pieces_kernel[(ceil_div(m, block_r), 1, 1)](
            x, data, scale, m, k, 0, x.stride(0), x.stride(1), SOFT_CAST=False, BLOCK_R=block_r,
            PIECE_0=p0, PIECE_1=p1, PIECE_2=p2, LOAD_POLICY=policy, num_warps=warps,
        )  # fmt: skip
        return data, scale

    return launch


def block_launch(x: torch.Tensor, strip_k: int, warps: int, policy: str) -> Callable:
    r, k = x.shape

    def launch():
        data = torch.empty(x.shape, dtype=torch.uint8, device=x.device)
        scale = torch.empty((ceil_div(r, 128), ceil_div(k, 128)), dtype=torch.float32, device=x.device)
        fq._fp8_block_kernel[(ceil_div(k, strip_k), ceil_div(r, 128), 1)](
            x, data, scale, r, k, 0, x.stride(0), x.stride(1), SOFT_CAST=False, BLOCK_R=128,
            BLOCK_K=strip_k, LOAD_POLICY=policy, num_warps=warps,
        )  # fmt: skip
        return data, scale

    return launch


def candidates(granularity: fq.Fp8Granularity, x: torch.Tensor, before) -> dict[str, Callable]:
    out: dict[str, Callable] = {}
    if before is not None:
        out["before"] = lambda: before.quantize_fp8_triton(x, granularity.value)
    out["launcher"] = lambda: fq.quantize_fp8_triton(x, granularity)
    if granularity is fq.Fp8Granularity.PER_ROW:
        settings = [(1, w, 3, "") for w in (2, 4, 8, 16)] + [(2, 8, 3, ""), (2, 16, 3, "")]
        settings += [(1, 8, 3, "evict_first"), (1, 16, 3, "evict_first"), (1, 8, 1, "")]
        if x.shape[1] == 4096:
            settings = [(1, w, 1, "") for w in (1, 2, 4, 8)] + [(2, 8, 1, ""), (2, 4, 1, "")]
        for block_r, warps, max_pieces, policy in settings:
            name = f"pieces r{block_r} w{warps} p{max_pieces} {policy or 'normal'}"
            out[name] = row_launch(x, block_r, warps, max_pieces, policy)
    else:
        settings = [(s, w, "") for s in (128, 256, 512) for w in (4, 8, 16)]
        settings += [(128, 8, "evict_first"), (256, 8, "evict_first")]
        for strip_k, warps, policy in settings:
            out[f"block k{strip_k} w{warps} {policy or 'normal'}"] = block_launch(x, strip_k, warps, policy)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", help="write every timing here")
    parser.add_argument("--only", choices=["per_row", "block"], help="sweep one layout only")
    parser.add_argument("--rows", type=int, help="per-row shapes with this many rows only")
    args = parser.parse_args()
    before = before_module()
    results = []
    row_shapes = [s for s in PER_ROW_SHAPES if args.rows in (None, s[0])]
    cases = [] if args.only == "block" else [(fq.Fp8Granularity.PER_ROW, s) for s in row_shapes]
    if args.only != "per_row":
        cases += [(fq.Fp8Granularity.BLOCK_128X128, s) for s in BLOCK_SHAPES]
    for granularity, shape in cases:
        x = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
        expected = fq.quantize_fp8_reference(x, granularity)
        expected_data, expected_scale = expected.data.view(torch.uint8), expected.scale.view(-1)
        del expected
        anchor = copy_gbps(x)
        for name, fn in candidates(granularity, x, before).items():
            data, scale = fn()
            same = torch.equal(data.view(torch.uint8), expected_data) and torch.equal(
                scale.view(-1).view(torch.int32), expected_scale.view(torch.int32)
            )
            moved = x.nbytes + data.numel() + scale.numel() * 4
            us = time_us(fn)
            row = {
                "granularity": granularity.value,
                "shape": "x".join(map(str, shape)),
                "candidate": name,
                "us": us,
                "gbps": moved / us / 1e3,
                "copy_gbps": anchor,
                "ratio_to_copy": moved / us / 1e3 / anchor,
                "bit_exact": same,
            }
            results.append(row)
            print(
                f"{granularity.value:14s} {row['shape']:12s} {name:34s} {us:8.1f} us {row['gbps']:6.0f} GB/s"
                f"  copy {anchor:6.0f}  ratio {row['ratio_to_copy']:.3f}  {'ok' if same else 'BYTES DIFFER'}",
                flush=True,
            )
            if args.json:
                with open(args.json, "w") as f:
                    json.dump(results, f, indent=1)
        del x, expected_data, expected_scale
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
