"""Benchmark the FP8 / MXFP8 quantize kernels against their anchors, measured in the same run.

For each shape and format: the Triton kernel, the eager torch reference, ``torch.compile`` of the reference,
and a device-to-device copy of the input's bytes (``dst.copy_(src)``: reads and writes ``x.nbytes``). GB/s
counts the bytes a kernel must move: input read + E4M3 data written + scales written. Timings are medians from
``triton.testing.do_bench``, which flushes L2 before every call, so they are DRAM numbers; for small shapes
they are bounded by launch overhead, which the ``host_us`` column (wall time per call of back-to-back calls,
no sync between them) shows.

    PYTHONPATH=. python benchmarks/bench_quantize.py --json out.json --markdown out.md
    PYTHONPATH=. python benchmarks/bench_quantize.py --quick   # tiny shapes, also on CPU (interpreter)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

if not torch.cuda.is_available():  # Triton reads this when the kernels are decorated, i.e. on import
    os.environ.setdefault("TRITON_INTERPRET", "1")

from mxrun.kernels.fp8_quantize import (
    Fp8Granularity,
    quantize_fp8_reference,
    quantize_fp8_triton,
)
from mxrun.kernels.mx_regroup import regroup_mxfp8_reference, regroup_mxfp8_triton
from mxrun.kernels.mxfp8_gemm import mxfp8_decode_triton
from mxrun.kernels.mxfp8_quantize import (
    dequantize_mxfp8,
    mx_round_triton,
    quantize_mx_group128_reference,
    quantize_mx_group128_triton,
    quantize_mxfp8_reference,
    quantize_mxfp8_triton,
)
from mxrun.kernels.row_layout import TileConfig
from mxrun.kernels.scaled_gemm import widen_e4m3

ACTIVATION_FORMATS = ["mxfp8", "fp8_per_token", "fp8_group_1x128", "mx_group128", "mx_round"]
"""``mx_group128``: the MX scale rule over 1x128 groups (the aligned MXFP8 Linear's activations); ``mx_round``:
MXFP8 quantize-dequantize in one pass, bf16 out (its small-M activations)."""
WEIGHT_FORMATS = ["mxfp8", "fp8_block_128x128", "fp8_per_channel", "fp8_per_tensor"]
MOE_FORMATS = ["mxfp8", "fp8_block_128x128"]
DECODE_FORMATS = ["mxfp8_decode", "fp8_widen", "mx_regroup"]
"""The large-M Linear paths' per-call weight passes (``decode`` rows): E4M3 codes (+ E8M0 scales) in, bf16
out; ``mx_regroup``: MXFP8 in, E4M3 at one power-of-two scale per 128x128 tile out (the aligned MXFP8 path)."""
_FP8_GRANULARITY = {
    "fp8_per_token": Fp8Granularity.PER_ROW,
    "fp8_per_channel": Fp8Granularity.PER_ROW,
    "fp8_group_1x128": Fp8Granularity.GROUP_1X128,
    "fp8_block_128x128": Fp8Granularity.BLOCK_128X128,
    "fp8_per_tensor": Fp8Granularity.PER_TENSOR,
}


@dataclass(frozen=True)
class Case:
    kind: str  # activation | weight | moe
    shape: tuple[int, ...]
    fmt: str
    compile: bool  # also time torch.compile of the reference (each shape is a fresh compile: costly)


@dataclass
class Row:
    kind: str
    shape: str
    fmt: str
    bytes_moved: int
    ours_us: float
    ours_gbps: float
    eager_us: float
    compile_us: float | None
    copy_gbps: float
    ratio_to_copy: float
    speedup_vs_compile: float | None
    speedup_vs_eager: float
    host_us: float


def full_cases() -> list[Case]:
    """The issue's shapes, largest first (the ones the bandwidth goal is about)."""
    cases = []
    for shape in ((8192, 8192), (28672, 8192)):
        for fmt in WEIGHT_FORMATS:
            cases.append(Case("weight", shape, fmt, True))
    for shape in ((128, 1536, 2048), (8, 28672, 4096)):
        for fmt in MOE_FORMATS:
            cases.append(Case("moe", shape, fmt, True))
    for m in (16384, 2048, 128, 16, 1):
        for k in (4096, 7168, 14336):
            for fmt in ACTIVATION_FORMATS:
                cases.append(Case("activation", (m, k), fmt, m >= 2048))
    for shape in ((6144, 4096), (28672, 4096), (8192, 28672)):
        for fmt in DECODE_FORMATS:
            cases.append(Case("decode", shape, fmt, True))
    return cases


def quick_cases() -> list[Case]:
    return [Case("activation", (16, 256), fmt, False) for fmt in ACTIVATION_FORMATS] + [
        Case("weight", (256, 256), fmt, False) for fmt in WEIGHT_FORMATS
    ]


def quantize_fns(fmt: str, config: TileConfig | None = None) -> tuple[Callable, Callable]:
    """(Triton launcher, torch reference) for a format, each taking the input tensor."""
    if fmt == "mxfp8":
        return (lambda x: quantize_mxfp8_triton(x, "round_up", config=config)), (
            lambda x: quantize_mxfp8_reference(x, "round_up")
        )
    if fmt == "mx_group128":
        return (lambda x: quantize_mx_group128_triton(x, "round_up", config=config)), (
            lambda x: quantize_mx_group128_reference(x, "round_up")
        )
    if fmt == "mx_round":

        def rounded(x: torch.Tensor) -> torch.Tensor:
            q = quantize_mxfp8_reference(x, "round_up")
            return dequantize_mxfp8(q.data, q.scale_e8m0, x.dtype)

        return (lambda x: (mx_round_triton(x, "round_up"),)), (lambda x: (rounded(x),))
    granularity = _FP8_GRANULARITY[fmt]
    return (lambda x: quantize_fp8_triton(x, granularity, config=config)), (
        lambda x: quantize_fp8_reference(x, granularity)
    )


def bytes_moved(x: torch.Tensor, out: tuple[torch.Tensor, torch.Tensor]) -> int:
    """Input read once, data and scales written once."""
    return x.numel() * x.element_size() + sum(t.numel() * t.element_size() for t in out)


def time_us(fn: Callable[[], object]) -> float:
    """Median microseconds per call: CUDA events with L2 flushed between calls, or wall time on CPU."""
    if torch.cuda.is_available():
        import triton.testing

        return 1000.0 * triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    samples = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return 1e6 * statistics.median(samples)


def host_us_per_call(fn: Callable[[], object], calls: int = 50) -> float:
    """Wall time per call of back-to-back calls: the launch-overhead floor for small shapes."""
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return 1e6 * (time.perf_counter() - start) / calls


def decode_fns(fmt: str, weight: torch.Tensor) -> tuple[Callable, Callable, int]:
    """(Triton decoder, torch reference, bytes moved) for a quantized copy of ``weight``; the two must agree
    bit for bit before anything is timed. Each takes a dummy argument, like the quantize functions."""
    if fmt == "mxfp8_decode":
        q = quantize_mxfp8_triton(weight, "round_up")
        ours = lambda _: mxfp8_decode_triton(q.data, q.scale_e8m0, torch.bfloat16)  # noqa: E731
        reference = lambda _: dequantize_mxfp8(q.data, q.scale_e8m0, torch.bfloat16)  # noqa: E731
        read = q.data.numel() + q.scale_e8m0.numel()
    elif fmt == "mx_regroup":
        q = quantize_mxfp8_triton(weight, "round_up")
        ours = lambda _: regroup_mxfp8_triton(q.data, q.scale_e8m0)  # noqa: E731
        reference = lambda _: regroup_mxfp8_reference(q.data, q.scale_e8m0)  # noqa: E731
        a, b = ours(None), reference(None)
        if not (
            torch.equal(a.data.view(torch.uint8), b.data.view(torch.uint8)) and torch.equal(a.scale, b.scale)
        ):
            raise AssertionError(f"{fmt}: the kernel disagrees with its reference")
        return ours, reference, 2 * q.data.numel() + q.scale_e8m0.numel() + 4 * a.scale.numel()
    else:
        q = quantize_fp8_triton(weight, Fp8Granularity.PER_ROW)
        ours = lambda _: widen_e4m3(q.data, torch.bfloat16)  # noqa: E731
        reference = lambda _: q.data.to(torch.bfloat16)  # noqa: E731
        read = q.data.numel()
    if not torch.equal(ours(None).view(torch.int16), reference(None).view(torch.int16)):
        raise AssertionError(f"{fmt}: the decoder disagrees with its reference")
    return ours, reference, read + 2 * weight.numel()


def run_case(case: Case, device: str, with_compile: bool) -> Row:
    x = torch.randn(case.shape, device=device, dtype=torch.bfloat16)
    if case.kind == "decode":
        ours, reference, moved = decode_fns(case.fmt, x)
        x = torch.empty_like(x)  # the copy anchor moves the bf16 output's bytes
    else:
        ours, reference = quantize_fns(case.fmt)
        moved = bytes_moved(x, ours(x))
    ours_us = time_us(lambda: ours(x))
    eager_us = time_us(lambda: reference(x))
    compile_us = None
    if with_compile and case.compile:
        try:
            torch._dynamo.reset()  # a fresh compile per shape, never the recompile-limit fallback to eager
            compiled = torch.compile(reference, dynamic=False)
            compiled(x)
            compile_us = time_us(lambda: compiled(x))
        except Exception as error:  # report, keep benchmarking
            print(f"  torch.compile failed for {case}: {type(error).__name__}: {error}", file=sys.stderr)
    source = x.view(torch.uint8).reshape(-1)
    destination = torch.empty_like(source)
    copy_us = time_us(lambda: destination.copy_(source))
    copy_gbps = 2 * source.numel() / copy_us / 1e3
    ours_gbps = moved / ours_us / 1e3
    return Row(
        kind=case.kind,
        shape="x".join(map(str, case.shape)),
        fmt=case.fmt,
        bytes_moved=moved,
        ours_us=ours_us,
        ours_gbps=ours_gbps,
        eager_us=eager_us,
        compile_us=compile_us,
        copy_gbps=copy_gbps,
        ratio_to_copy=ours_gbps / copy_gbps,
        speedup_vs_compile=None if compile_us is None else compile_us / ours_us,
        speedup_vs_eager=eager_us / ours_us,
        host_us=host_us_per_call(lambda: ours(x)),
    )


def _sweep_plan() -> list[tuple[str, tuple[int, int], list[TileConfig]]]:
    """(format, shape, candidate tiles): the choices behind the launchers' defaults."""
    streaming = [
        TileConfig(8, 512, 4),
        TileConfig(16, 256, 4),
        TileConfig(4, 1024, 4),
        TileConfig(8, 1024, 8),
    ]
    blocks = [TileConfig(128, k, w) for k in (128, 256, 512) for w in (8, 16, 32)]
    plan: list[tuple[str, tuple[int, int], list[TileConfig]]] = []
    for shape in ((16384, 7168), (28672, 8192)):
        plan += [("mxfp8", shape, streaming), ("fp8_block_128x128", shape, blocks)]
    for shape in ((16384, 7168), (16384, 14336)):
        looped = [
            TileConfig(r, k, w)
            for r, k, w in (
                (1, 512, 4),
                (1, 1024, 4),
                (1, 1024, 8),
                (1, 2048, 4),
                (1, 2048, 8),
                (1, 4096, 8),
                (2, 1024, 4),
                (2, 2048, 8),
            )
        ]
        plan.append(("fp8_per_token", shape, looped))
    return plan


def sweep(device: str) -> list[dict]:
    """Time candidate tiles on large shapes (to choose the launchers' defaults)."""
    results = []
    for fmt, shape, tiles in _sweep_plan():
        x = torch.randn(shape, device=device, dtype=torch.bfloat16)
        for tile in tiles:
            ours, _ = quantize_fns(fmt, tile)
            moved = bytes_moved(x, ours(x))
            us = time_us(lambda ours=ours, x=x: ours(x))
            results.append(
                {
                    "shape": "x".join(map(str, shape)),
                    "fmt": fmt,
                    **asdict(tile),
                    "us": us,
                    "gbps": moved / us / 1e3,
                }
            )
            print(f"sweep {fmt:18s} {shape} {tile}: {us:8.1f} us {moved / us / 1e3:7.0f} GB/s", flush=True)
    return results


def launch_overhead(device: str) -> dict:
    """Host microseconds per call, back to back, on a 1 x 4096 input: the whole launcher, the raw kernel
    launch with outputs allocated beforehand, one output allocation, and an empty-kernel torch op."""
    from mxrun.kernels.mxfp8_quantize import _mxfp8_quantize_kernel, mxfp8_tile_config

    x = torch.randn(1, 4096, device=device, dtype=torch.bfloat16)
    data = torch.empty(1, 4096, dtype=torch.uint8, device=device)
    scale = torch.empty(1, 128, dtype=torch.uint8, device=device)
    tile = mxfp8_tile_config(1, 4096)

    def raw_launch() -> None:
        _mxfp8_quantize_kernel[(1, 4096 // tile.block_k, 1)](
            x, data, scale, 1, 4096, 0, 4096, 1, ROUND_UP=True, SOFT_CAST=False,
            BLOCK_R=tile.block_r, BLOCK_K=tile.block_k, num_warps=tile.num_warps,
        )  # fmt: skip

    result = {
        "quantize_mxfp8_triton": host_us_per_call(lambda: quantize_mxfp8_triton(x), 2000),
        "raw_triton_launch": host_us_per_call(raw_launch, 2000),
        "torch_empty": host_us_per_call(lambda: torch.empty(1, 4096, dtype=torch.uint8, device=device), 2000),
        "torch_add_": host_us_per_call(lambda: data.add_(1), 2000),
    }
    print("launch overhead (host us/call):", result, flush=True)
    return result


def _fmt(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def markdown_table(rows: list[Row], device_name: str) -> str:
    lines = [
        f"Device: {device_name}; input bf16; GB/s = (input read + data and scales written) / time; "
        "copy = dst.copy_(src) of the input's bytes in the same run. `decode` rows run the other way (E4M3 "
        "codes and scales in, bf16 out; copy of the bf16 output's bytes).",
        "",
        "| kind | shape | format | MB moved | ours us | ours GB/s | eager us | compile us | copy GB/s | "
        "ours/copy | x vs compile | x vs eager | host us/call |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.kind} | {r.shape} | {r.fmt} | {r.bytes_moved / 1e6:.2f} | {r.ours_us:.1f} | {r.ours_gbps:.0f} | "
            f"{r.eager_us:.1f} | {_fmt(r.compile_us)} | {r.copy_gbps:.0f} | {r.ratio_to_copy:.2f} | "
            f"{_fmt(r.speedup_vs_compile, 2)} | {r.speedup_vs_eager:.1f} | {r.host_us:.1f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", help="write all rows (and any sweep) as JSON here")
    parser.add_argument("--markdown", help="write the table as markdown here")
    parser.add_argument("--quick", action="store_true", help="a few tiny shapes (runs on CPU too)")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile of the references")
    parser.add_argument("--sweep", action="store_true", help="also time candidate tiles on large shapes")
    parser.add_argument(
        "--kinds", default="activation,weight,moe,decode", help="comma-separated case kinds to run"
    )
    parser.add_argument("--formats", help="comma-separated formats to run (default: all), e.g. fp8_per_token")
    args = parser.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    device_name = torch.cuda.get_device_name() if device == "cuda" else "cpu (Triton interpreter)"
    kinds = set(args.kinds.split(","))
    cases = quick_cases() if args.quick else [c for c in full_cases() if c.kind in kinds]
    if args.formats:
        cases = [c for c in cases if c.fmt in set(args.formats.split(","))]
    report: dict = {"device": device_name, "torch": torch.__version__, "rows": [], "sweep": [], "launch": {}}

    def save(rows: list[Row]) -> None:
        report["rows"] = [asdict(r) for r in rows]
        if args.json:
            with open(args.json, "w") as f:
                json.dump(report, f, indent=1)
        if args.markdown:
            with open(args.markdown, "w") as f:
                f.write(markdown_table(rows, device_name))

    if device == "cuda":
        report["launch"] = launch_overhead(device)
    if args.sweep and device == "cuda":
        report["sweep"] = sweep(device)
        save([])
    rows: list[Row] = []
    for case in cases:
        row = run_case(case, device, with_compile=not args.no_compile)
        rows.append(row)
        print(
            f"{row.kind:10s} {row.shape:16s} {row.fmt:18s} ours {row.ours_us:9.1f} us {row.ours_gbps:6.0f} GB/s"
            f"  copy {row.copy_gbps:6.0f} GB/s  ratio {row.ratio_to_copy:4.2f}  eager {row.eager_us:9.1f} us"
            f"  compile {_fmt(row.compile_us):>8s} us  host {row.host_us:6.1f} us",
            flush=True,
        )
        save(rows)
        if device == "cuda":
            torch.cuda.empty_cache()
    print()
    print(markdown_table(rows, device_name))


if __name__ == "__main__":
    main()
