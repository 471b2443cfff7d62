"""Quantized Linear on the GPU: every mxrun scheme beside bf16 cuBLAS and FP8 ``torch._scaled_mm``, one run.

For each Llama weight shape (K -> N) and batch M, times ``y = x @ W^T`` (x ``[M, K]`` bf16, y bf16) for:

* ``bf16``: ``torch.matmul`` (cuBLAS), the anchor;
* ``scaled_mm``: FP8 ``torch._scaled_mm`` rowwise (cuBLASLt) with per-channel weight scales, *plus* the
  per-token activation quantization it needs (mxrun's Triton quantize kernel, the fastest one at hand);
* each mxrun scheme through its dispatcher, activation quantization included: ``fp8-tensor``,
  ``fp8-channel``, ``fp8-block``, ``mxfp8`` (W8A8; its M crossover decides the kernel), ``mxfp8-tiles``
  (the same with the weight stored tile-aligned, a recipe's ``tile_aligned: true``; ``mxfp8-tiles-w8a16-decode``
  that weight under ``activations: {min_rows: 65}``), the MXFP8 W8A8
  large-M kernels forced (``mxfp8:aligned``, ``mxfp8:cublas``, ``mxfp8:fp8mma``, ``mxfp8:dequant``, for the
  crossover), ``mxfp8-w8a16-decode`` (the MXFP8 scheme with ``activations: {min_rows: 65}``: weight-only up to
  64 rows, W8A8 above, the issue's two-path crossover), and the weight-only ``fp8-channel-wo``, ``fp8-block-wo``
  and ``mxfp8-wo``; for the crossovers, tile kernels at any M: ``fp8-channel:tile``, ``fp8-channel-wo:tile``,
  ``fp8-block-wo:tile``, ``mxfp8:dequant-tile``, ``mxfp8-wo:dequant-tile``.

The MXFP8 columns hold the weight as ``MxFp8Method`` does: box-major (``methods.MX_WEIGHT_BOX_MAJOR``, where
whole ``[64, 128]`` boxes cover it, as on every Llama shape here; runs before that switch was on held it
row-major); ``mxfp8:rows``, ``mxfp8-w8a16-decode:rows`` and ``mxfp8-wo:rows`` hold it row-major and the
``:boxes`` ones box-major whatever the switch says.

Times are medians of ``triton.testing.do_bench`` (which clears L2 before each call, so the weights come from
DRAM as in a real forward); for small M these eager times include Python launch overhead whenever it exceeds
the GPU time, so ``--graph`` times CUDA-graph replays instead (what a serving engine runs; L2 not flushed). TFLOP/s = 2 M N K / time. Ratios are against bf16 and against scaled_mm.

Replayed back to back, one layer's weights stay in the H100's 50 MB L2 where they fit (a bf16 4096x4096 weight
is 32 MB); in a model's forward each layer's weights come from DRAM, because the layers between evict them.
``--graph --cold-weights`` keeps every column's weights cold the way a forward does: each column gets enough
copies of its weights (same values, other memory; at least two, and twice the L2 in FP8 bytes) and the replayed
calls go round them, while the activations, written just before as in a forward, stay warm.

    PYTHONPATH=. python benchmarks/bench_linear.py --quick --json out.json --markdown out.md --plot out.png
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable

import torch

from mxrun.engine import methods
from mxrun.kernels.box_major import BoxMajorWeight, box_major_fits
from mxrun.kernels.e4m3 import mx_scales_foldable
from mxrun.kernels.fp8_quantize import Fp8Granularity, quantize_fp8
from mxrun.kernels.mx_regroup import align_mxfp8, aligned_tile_scales
from mxrun.kernels.mxfp8_gemm import mxfp8_dequant_gemm_triton, mxfp8_linear
from mxrun.kernels.mxfp8_quantize import quantize_mxfp8
from mxrun.kernels.scaled_gemm import (
    fp8_block_linear,
    fp8_gemm_triton,
    fp8_linear,
    fp8_weight_only_linear,
    fp8_weight_only_triton,
)

SHAPES = {  # name: (K, N)
    "8B qkv 4096->6144": (4096, 6144),
    "8B o 4096->4096": (4096, 4096),
    "8B gate_up 4096->28672": (4096, 28672),
    "8B down 14336->4096": (14336, 4096),
    "70B qkv 8192->10240": (8192, 10240),
    "70B gate_up 8192->57344": (8192, 57344),
    "70B down 28672->8192": (28672, 8192),
}
MS = [1, 16, 64, 256, 1024, 4096, 16384]
QUICK_SHAPES = ["8B o 4096->4096", "8B down 14336->4096", "70B qkv 8192->10240"]
QUICK_MS = [1, 16, 256, 1024, 4096]
DECODE_MIN_ROWS = 65  # `activations: {min_rows: 65}`: above the split-K kernel's 64 rows, W8A8


def _columns(x: torch.Tensor, w: torch.Tensor) -> dict[str, Callable[[], torch.Tensor]]:
    """The callables to time for one (x, W): each returns y [M, N] bf16."""
    tensor = quantize_fp8(w, Fp8Granularity.PER_TENSOR)
    channel = quantize_fp8(w, Fp8Granularity.PER_ROW)
    block = quantize_fp8(w, Fp8Granularity.BLOCK_128X128)
    mx = quantize_mxfp8(w)
    foldable = mx_scales_foldable(mx.scale_e8m0, mx.data)  # read once per weight, as MxFp8Method does at load
    mx_boxes = BoxMajorWeight.of(mx.data)
    held = mx_boxes if methods.MX_WEIGHT_BOX_MAJOR and box_major_fits(*w.shape) else mx.data  # as the method
    tiles = align_mxfp8(mx.data, mx.scale_e8m0)  # a recipe's `tile_aligned: true`
    tile_scale = aligned_tile_scales(tiles.scale_e8m0, *w.shape)
    tiles_foldable = mx_scales_foldable(tiles.scale_e8m0, tiles.data)
    w_t = w.t()
    channel_t = channel.data.t()  # [K, N] column-major, what _scaled_mm wants for its second operand
    channel_scale_row = channel.scale.reshape(1, -1)

    def scaled_mm() -> torch.Tensor:
        q = quantize_fp8(x, Fp8Granularity.PER_ROW)
        return torch._scaled_mm(
            q.data, channel_t, scale_a=q.scale, scale_b=channel_scale_row, out_dtype=torch.bfloat16
        )

    return {
        "bf16": lambda: torch.matmul(x, w_t),
        "scaled_mm": scaled_mm,
        "fp8-tensor": lambda: fp8_linear(x, tensor.data, tensor.scale, None, "tensor"),
        "fp8-channel": lambda: fp8_linear(x, channel.data, channel.scale, None, "token"),
        "fp8-block": lambda: fp8_block_linear(x, block.data, block.scale, None),
        "mxfp8": lambda: mxfp8_linear(
            x, held, mx.scale_e8m0, None, "round_up", weight_scales_foldable=foldable
        ),
        "mxfp8:unfolded": lambda: mxfp8_linear(x, held, mx.scale_e8m0, None, "round_up"),
        "mxfp8:boxes": lambda: mxfp8_linear(
            x, mx_boxes, mx.scale_e8m0, None, "round_up", weight_scales_foldable=foldable
        ),
        "mxfp8-w8a16-decode:boxes": lambda: mxfp8_linear(
            *(x, mx_boxes, mx.scale_e8m0, None, "round_up" if x.shape[0] >= DECODE_MIN_ROWS else None),
            weight_scales_foldable=foldable,
        ),
        "mxfp8-wo:boxes": lambda: mxfp8_linear(
            x, mx_boxes, mx.scale_e8m0, None, None, weight_scales_foldable=foldable
        ),
        "mxfp8:rows": lambda: mxfp8_linear(
            x, mx.data, mx.scale_e8m0, None, "round_up", weight_scales_foldable=foldable
        ),
        "mxfp8-w8a16-decode:rows": lambda: mxfp8_linear(
            *(x, mx.data, mx.scale_e8m0, None, "round_up" if x.shape[0] >= DECODE_MIN_ROWS else None),
            weight_scales_foldable=foldable,
        ),
        "mxfp8-wo:rows": lambda: mxfp8_linear(
            x, mx.data, mx.scale_e8m0, None, None, weight_scales_foldable=foldable
        ),
        "mxfp8-w8a16-decode": lambda: mxfp8_linear(
            *(x, held, mx.scale_e8m0, None, "round_up" if x.shape[0] >= DECODE_MIN_ROWS else None),
            weight_scales_foldable=foldable,
        ),
        "mxfp8-tiles": lambda: mxfp8_linear(
            *(x, tiles.data, tiles.scale_e8m0, None, "round_up"),
            weight_tile_scale=tile_scale,
            weight_scales_foldable=tiles_foldable,
        ),
        "mxfp8-tiles-w8a16-decode": lambda: mxfp8_linear(
            *(x, tiles.data, tiles.scale_e8m0, None, "round_up" if x.shape[0] >= DECODE_MIN_ROWS else None),
            weight_tile_scale=tile_scale,
            weight_scales_foldable=tiles_foldable,
        ),
        "mxfp8:aligned": lambda: mxfp8_linear(
            x, held, mx.scale_e8m0, None, "round_up", large_m_kernel="aligned"
        ),
        "mxfp8:cublas": lambda: mxfp8_linear(
            x, held, mx.scale_e8m0, None, "round_up", large_m_kernel="cublas"
        ),
        "mxfp8:fp8mma": lambda: mxfp8_linear(x, held, mx.scale_e8m0, None, "round_up", large_m_kernel="fp8"),
        "mxfp8:dequant": lambda: mxfp8_linear(
            x, held, mx.scale_e8m0, None, "round_up", large_m_kernel="dequant"
        ),
        "fp8-channel-wo": lambda: fp8_weight_only_linear(
            x, channel.data, channel.scale, Fp8Granularity.PER_ROW, None
        ),
        "fp8-block-wo": lambda: fp8_weight_only_linear(
            x, block.data, block.scale, Fp8Granularity.BLOCK_128X128, None
        ),
        "mxfp8-wo": lambda: mxfp8_linear(x, held, mx.scale_e8m0, None, None, weight_scales_foldable=foldable),
        "mxfp8-wo:unfolded": lambda: mxfp8_linear(x, held, mx.scale_e8m0, None, None),
        # tile kernels at any M (the dispatchers take split-K up to 64 rows): for the crossovers
        "fp8-channel:tile": lambda: fp8_gemm_triton(
            *quantize_fp8(x, Fp8Granularity.PER_ROW), channel.data, channel.scale, None, x.dtype
        ),
        "fp8-channel-wo:tile": lambda: fp8_weight_only_triton(
            x, channel.data, channel.scale, Fp8Granularity.PER_ROW, None
        ),
        "fp8-block-wo:tile": lambda: fp8_weight_only_triton(
            x, block.data, block.scale, Fp8Granularity.BLOCK_128X128, None
        ),
        "mxfp8:dequant-tile": lambda: mxfp8_dequant_gemm_triton(
            x, mx.data, mx.scale_e8m0, None, activation_rule="round_up"
        ),
        "mxfp8-wo:dequant-tile": lambda: mxfp8_dequant_gemm_triton(x, mx.data, mx.scale_e8m0, None),
    }


def _check(name: str, y: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative Frobenius error against bf16 (a sanity check that each column computes the product)."""
    rel = ((y.float() - ref.float()).norm() / ref.float().norm()).item()
    if not rel < 0.1:
        print(f"warning: {name} relative error {rel:.3g}", file=sys.stderr)
    return rel


def weight_copies(n: int, k: int) -> int:
    """Copies of an [N, K] layer's weights for ``--cold-weights``: their FP8 bytes (the smallest form timed)
    at least twice the L2, and at least two, so no call finds the weights the call before it left in L2."""
    l2_bytes = torch.cuda.get_device_properties(torch.cuda.current_device()).L2_cache_size
    return max(2, -(-2 * l2_bytes // (n * k)))


def _rotating(fns: list[Callable[[], torch.Tensor]]) -> Callable[[], torch.Tensor]:
    """One callable that runs ``fns`` in turn, call after call (captured in a CUDA graph, the turn is fixed)."""
    turn = [0]

    def call() -> torch.Tensor:
        fn = fns[turn[0] % len(fns)]
        turn[0] += 1
        return fn()

    return call


def run(
    shapes: list[str],
    ms: list[int],
    columns: list[str] | None,
    rep_ms: int,
    graph: bool,
    cold_weights: bool = False,
) -> list[dict]:
    import triton.testing

    rows = []
    for shape in shapes:
        k, n = SHAPES[shape]
        g = torch.Generator(device="cuda").manual_seed(0)
        w = (torch.randn(n, k, device="cuda", generator=g) * 0.02).to(torch.bfloat16)
        copies = [w] + [w.clone() for _ in range(weight_copies(n, k) - 1)] if cold_weights else [w]
        for m in ms:
            x = torch.randn(m, k, device="cuda", generator=g).to(torch.bfloat16)
            sets = [_columns(x, w_copy) for w_copy in copies]
            fns = {name: _rotating([s[name] for s in sets]) for name in sets[0]} if cold_weights else sets[0]
            ref = sets[0]["bf16"]()
            row: dict = {"shape": shape, "M": m, "N": n, "K": k, "us": {}, "tflops": {}, "rel_err": {}}
            if cold_weights:
                row["weight_copies"] = len(copies)
            for name, fn in fns.items():
                if columns and name not in columns and name != "bf16":
                    continue
                try:
                    row["rel_err"][name] = _check(name, fn(), ref)
                    if graph:  # CUDA-graph replay: GPU time without Python launch overhead (L2 not flushed)
                        ms_ = triton.testing.do_bench_cudagraph(fn, rep=rep_ms, return_mode="median")
                    else:
                        ms_ = triton.testing.do_bench(fn, warmup=10, rep=rep_ms, return_mode="median")
                except Exception as error:  # keep the table going; the error goes in the JSON
                    row["us"][name] = None
                    row.setdefault("errors", {})[name] = repr(error)[:300]
                    continue
                row["us"][name] = ms_ * 1e3
                row["tflops"][name] = 2 * m * n * k / (ms_ * 1e-3) / 1e12
            rows.append(row)
            bf16, smm = row["us"].get("bf16"), row["us"].get("scaled_mm")
            line = "  ".join(f"{c}={t:.1f}" for c, t in row["us"].items() if t)
            print(
                f"{shape:24s} M={m:6d} us: {line}  (x bf16: "
                + ", ".join(f"{c} {bf16 / t:.2f}" for c, t in row["us"].items() if t and bf16 and c != "bf16")
                + ")",
                flush=True,
            )
            del x, fns, sets, ref
            _ = smm
        del w, copies
        torch.cuda.empty_cache()
    return rows


def markdown(rows: list[dict]) -> str:
    names = list(rows[0]["us"]) if rows else []
    head = (
        "| shape | M | "
        + " | ".join(f"{c} us (TFLOP/s)" for c in names)
        + " | "
        + " | ".join(f"{c} / bf16" for c in names if c != "bf16")
        + " | "
        + " | ".join(f"{c} / scaled_mm" for c in names if c not in ("bf16", "scaled_mm"))
        + " |"
    )
    lines = [head, "|" + " --- |" * (2 + len(names) * 3 - 3)]
    for r in rows:
        us = r["us"]

        def cell(c: str, r: dict = r) -> str:
            t = r["us"].get(c)
            return f"{t:.1f} ({r['tflops'][c]:.0f})" if t else "-"

        def ratio(c: str, base: str, us: dict = us) -> str:
            return f"{us[base] / us[c]:.2f}x" if us.get(c) and us.get(base) else "-"

        lines.append(
            f"| {r['shape']} | {r['M']} | "
            + " | ".join(cell(c) for c in names)
            + " | "
            + " | ".join(ratio(c, "bf16") for c in names if c != "bf16")
            + " | "
            + " | ".join(ratio(c, "scaled_mm") for c in names if c not in ("bf16", "scaled_mm"))
            + " |"
        )
    return "\n".join(lines) + "\n"


GOALS = [  # issue 5: (column, rows the goal is about, anchor column, at least this ratio)
    ("fp8-channel", "M >= 1024", "scaled_mm", 0.95),
    ("fp8-tensor", "M >= 1024", "scaled_mm", 0.95),
    ("fp8-channel", "M <= 16", "bf16", 1.7),
    ("fp8-tensor", "M <= 16", "bf16", 1.7),
    ("fp8-block", "M >= 1024", "scaled_mm", 0.85),
    ("mxfp8", "M >= 1024", "bf16", 1.0),
    ("mxfp8", "M <= 16", "bf16", 1.7),
    ("mxfp8-tiles", "M >= 1024", "bf16", 1.0),
    ("mxfp8-tiles", "M <= 16", "bf16", 1.7),
    ("mxfp8-w8a16-decode", "M >= 1024", "bf16", 1.0),
    ("mxfp8-w8a16-decode", "M <= 16", "bf16", 1.7),
    ("mxfp8-tiles-w8a16-decode", "M >= 1024", "bf16", 1.0),
    ("mxfp8-tiles-w8a16-decode", "M <= 16", "bf16", 1.7),
]
_ROWS = {"M >= 1024": lambda m: m >= 1024, "M <= 16": lambda m: m <= 16}


def goals(rows: list[dict]) -> list[str]:
    """One line per issue-5 goal: how many (shape, M) cases meet it, and the worst case."""
    lines = []
    for column, where, anchor, goal in GOALS:
        cases = [
            (r["us"][anchor] / r["us"][column], r["shape"], r["M"])
            for r in rows
            if _ROWS[where](r["M"]) and r["us"].get(column) and r["us"].get(anchor)
        ]
        if not cases:
            continue
        met = sum(ratio >= goal for ratio, _, _ in cases)
        worst = min(cases)
        verdict = "met" if met == len(cases) else "MISSED"
        lines.append(
            f"{column} {where}: >= {goal}x {anchor}: {verdict} ({met}/{len(cases)} cases meet it; "
            f"worst {worst[0]:.2f}x, {worst[1]} M={worst[2]})"
        )
    return lines


def plot(rows: list[dict], path: str) -> bool:
    """TFLOP/s against M per scheme, one panel per shape; False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    fig, axes = plt.subplots(1, len(shapes), figsize=(5 * len(shapes), 4), squeeze=False)
    for ax, shape in zip(axes[0], shapes, strict=True):
        sub = [r for r in rows if r["shape"] == shape]
        for name in sub[0]["tflops"]:
            pts = [(r["M"], r["tflops"].get(name)) for r in sub if r["tflops"].get(name)]
            if pts:
                ax.plot(
                    *zip(*pts, strict=True),
                    marker="o",
                    label=name,
                    linestyle="--" if name in ("bf16", "scaled_mm") else "-",
                )
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(shape)
        ax.set_xlabel("M")
        ax.set_ylabel("TFLOP/s")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 shapes x 5 M values")
    parser.add_argument("--shapes", nargs="*", help="subset of shape names")
    parser.add_argument("--ms", nargs="*", type=int)
    parser.add_argument("--columns", nargs="*", help="subset of columns (bf16 always runs)")
    parser.add_argument("--rep-ms", type=int, default=50)
    parser.add_argument(
        "--graph",
        action="store_true",
        help="time CUDA-graph replays (no host launch overhead; L2 is not flushed between them)",
    )
    parser.add_argument(
        "--cold-weights",
        action="store_true",
        help="with --graph: go round copies of each column's weights so they come from DRAM, as in a forward",
    )
    parser.add_argument("--json")
    parser.add_argument("--markdown")
    parser.add_argument("--plot")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_linear.py needs a CUDA GPU (the Triton GEMMs are timed on the device)", file=sys.stderr)
        return 2
    shapes = args.shapes or (QUICK_SHAPES if args.quick else list(SHAPES))
    ms = args.ms or (QUICK_MS if args.quick else MS)
    if args.cold_weights and not args.graph:
        parser.error("--cold-weights goes with --graph (without it, do_bench flushes L2 before each call)")
    rows = run(shapes, ms, args.columns, args.rep_ms, args.graph, args.cold_weights)
    meta = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": __import__("triton").__version__,
        "command": " ".join(sys.argv),
        "mx_weight_box_major": methods.MX_WEIGHT_BOX_MAJOR,
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
    table = markdown(rows)
    summary = goals(rows)
    print("\n".join(["", "Goals (issue 5):", *summary]))
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(f"{meta}\n\n{table}\n## Goals (issue 5)\n\n" + "".join(f"- {line}\n" for line in summary))
    if args.plot and not plot(rows, args.plot):
        print("matplotlib is not installed: no plot written", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
