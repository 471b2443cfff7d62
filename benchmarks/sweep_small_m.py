"""Sweep the split-K small-M GEMM's tile and split policy (:class:`SplitKConfig`, including a ptxas register
cap) on decode shapes, beside bf16 ``torch.matmul`` in the same run, for the four operand kinds it serves: FP8
W8A8 (E4M3 codes, fp16 MMA), MXFP8 W8A8 (activations rounded first), FP8 per-channel and MXFP8 weight-only
(bf16 MMA), timed as CUDA-graph replays (what a serving engine runs). The per-kind defaults of
``mxrun/kernels/small_m_gemm.py`` come from ``results/sweep-small-m-h100.json``:

    PYTHONPATH=. python benchmarks/sweep_small_m.py --json sweep.json \
        --shapes 4096,6144 4096,28672 14336,4096 8192,57344 28672,8192 --ms 1 16 \
        --tiles 64,128,4,3 64,128,4,4 32,128,4,3 64,256,4,3 128,128,8,3 --targets 528 1056 --register-caps 0 80

``--cold-weights`` goes round copies of each weight (as ``bench_linear.py --cold-weights`` does), so that the
weights come from DRAM as in a model's forward rather than from L2 (where a replayed layer's FP8 weight of up to
about 50 MB stays otherwise).
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
from collections.abc import Callable

import torch

from benchmarks.bench_linear import _rotating, weight_copies
from mxrun.kernels.box_major import BoxMajorWeight
from mxrun.kernels.fp8_quantize import Fp8Granularity, Fp8Quantized, quantize_fp8
from mxrun.kernels.mxfp8_quantize import Mxfp8Quantized, quantize_mxfp8
from mxrun.kernels.scaled_gemm import fp8_linear
from mxrun.kernels.small_m_gemm import SplitKConfig, small_m_gemm_triton

SHAPES = [(14336, 4096), (8192, 10240)]  # K, N
MS = [1, 16, 64]
TILES = [
    (32, 256, 4, 3),
    (64, 256, 4, 4),
    (32, 128, 4, 4),
    (64, 128, 4, 3),
]  # block_n, block_k, warps, stages
TARGETS = [528, 1056]
REGISTER_CAPS = [None]


def graph_us(fn: Callable[[], object], replays: int = 50) -> float:
    """Median-free mean time of one call, replayed from a CUDA graph (L2 holds what fits: small here)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(10):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return 1000.0 * start.elapsed_time(end) / (replays * 10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json")
    parser.add_argument("--shapes", nargs="+", help="K,N pairs, e.g. 4096,28672 (default: two decode shapes)")
    parser.add_argument("--ms", nargs="+", type=int, default=MS)
    parser.add_argument("--tiles", nargs="+", help="block_n,block_k,warps,stages quadruples")
    parser.add_argument("--targets", nargs="+", type=int, default=TARGETS)
    parser.add_argument("--register-caps", nargs="+", type=int, help="ptxas register caps to try (0: none)")
    parser.add_argument("--schemes", nargs="+", help="subset of the schemes timed")
    parser.add_argument(
        "--compare-widen", action="store_true", help="also time bf16-MMA schemes with fast_widen=False"
    )
    parser.add_argument(
        "--compare-fold",
        action="store_true",
        help="also time MX schemes with the scales folded into the widening",
    )
    parser.add_argument(
        "--weight-tma",
        action="store_true",
        help="also time every scheme with its weight read by TMA (name suffix ' (tma)')",
    )
    parser.add_argument(
        "--boxes",
        action="store_true",
        help="hold the MX weights box-major in each tile's [block_n, block_k] boxes, as the MXFP8 method stores them",
    )
    parser.add_argument(
        "--cold-weights",
        action="store_true",
        help="go round copies of each weight (twice the L2 in FP8 bytes) so it comes from DRAM, as in a forward",
    )
    args = parser.parse_args()
    shapes = [tuple(int(v) for v in s.split(",")) for s in args.shapes] if args.shapes else SHAPES
    tiles = [tuple(int(v) for v in t.split(",")) for t in args.tiles] if args.tiles else TILES
    caps = [c or None for c in args.register_caps] if args.register_caps else REGISTER_CAPS
    rows = []
    for k, n in shapes:
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5
        weights = [w] + [w.clone() for _ in range(weight_copies(n, k) - 1)] if args.cold_weights else [w]
        channels = [quantize_fp8(w_copy, Fp8Granularity.PER_ROW) for w_copy in weights]
        mxs = [quantize_mxfp8(w_copy) for w_copy in weights]
        for m in args.ms:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            bf16 = graph_us(_rotating([lambda x=x, w=w_copy: torch.matmul(x, w.t()) for w_copy in weights]))
            xq = quantize_fp8(x, Fp8Granularity.PER_ROW)
            quant_us = graph_us(lambda x=x: quantize_fp8(x, Fp8Granularity.PER_ROW))
            linear_us = graph_us(
                _rotating([lambda x=x, q=q: fp8_linear(x, q.data, q.scale, None, "token") for q in channels])
            )
            print(f"{k}->{n} M={m} bf16 {bf16:.1f} us; per-token quantize alone {quant_us:.1f} us; "
                  f"fp8_linear (quantize + split-K) {linear_us:.1f} us x{bf16 / linear_us:.2f}")  # fmt: skip
            best: dict[str, tuple[float, str]] = {}
            for tile, target, cap in itertools.product(tiles, args.targets, caps):
                cfg = SplitKConfig(*tile, target_programs=target, max_registers=cap)
                runs = _runs_over_copies(cfg, x, xq, channels, mxs, args)
                for name, fn in runs.items():
                    if args.schemes and name not in args.schemes:
                        continue
                    try:
                        us = graph_us(fn)
                    except Exception as error:  # a tile that does not fit is reported, not fatal
                        print(f"{k}->{n} M={m} {name} {cfg}: {type(error).__name__}: {str(error)[:100]}")
                        continue
                    rows.append({"k": k, "n": n, "m": m, "scheme": name, "config": cfg._asdict(), "us": us,
                                 "bf16_us": bf16, "x_bf16": bf16 / us})  # fmt: skip
                    if name not in best or us < best[name][0]:
                        best[name] = (us, str(cfg))
            for name, (us, cfg) in best.items():
                print(
                    f"{k}->{n} M={m} bf16 {bf16:.1f} us | best {name} {us:.1f} us x{bf16 / us:.2f} {cfg}",
                    flush=True,
                )
            default = [r for r in rows if r["k"] == k and r["n"] == n and r["m"] == m
                       and r["config"] == SplitKConfig()._asdict()]  # fmt: skip
            for r in default:
                print(f"    default {r['scheme']} {r['us']:.1f} us x{r['x_bf16']:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "cold_weights": args.cold_weights, "rows": rows},
                      f, indent=1)  # fmt: skip


def _runs_over_copies(
    cfg: SplitKConfig,
    x: torch.Tensor,
    xq: Fp8Quantized,
    channels: list[Fp8Quantized],
    mxs: list[Mxfp8Quantized],
    args: argparse.Namespace,
) -> dict[str, Callable[[], object]]:
    """Each scheme's launch with tile ``cfg``, going round the weight copies (one copy: always the same)."""
    per_copy = [
        _runs(cfg, x, xq, channel, _held(mx, cfg, args.boxes), args)
        for channel, mx in zip(channels, mxs, strict=True)
    ]
    return {name: _rotating([runs[name] for runs in per_copy]) for name in per_copy[0]}


_BOXED: dict[tuple[int, int, int], BoxMajorWeight] = {}


def _held(mx: Mxfp8Quantized, cfg: SplitKConfig, boxes: bool) -> Mxfp8Quantized:
    """``mx`` with its weight box-major in ``cfg``'s boxes (one copy per weight and box, kept), or as it is."""
    if not boxes:
        return mx
    key = (mx.data.data_ptr(), cfg.block_n, cfg.block_k)
    if key not in _BOXED:
        _BOXED[key] = BoxMajorWeight.of(mx.data, cfg.block_n, cfg.block_k)
    return mx._replace(data=_BOXED[key])


def _runs(
    cfg: SplitKConfig,
    x: torch.Tensor,
    xq: Fp8Quantized,
    channel: Fp8Quantized,
    mx: Mxfp8Quantized,
    args: argparse.Namespace,
) -> dict[str, Callable[[], object]]:
    """The launches timed for one tile and one copy of the weights."""
    runs = {
        "fp8-w8a8 (codes)": lambda cfg=cfg, q=xq, wq=channel, tma=False: small_m_gemm_triton(
            q.data,
            wq.data,
            a_scale=q.scale,
            weight_scale=wq.scale,
            out_dtype=torch.bfloat16,
            config=cfg,
            weight_tma=tma,
        ),
        "mxfp8-w8a8": lambda x=x, cfg=cfg, q=mx, fast_widen=True, fold=False, tma=False: small_m_gemm_triton(
            x,
            q.data,
            weight_scale_e8m0=q.scale_e8m0,
            activation_mx_rule="round_up",
            config=cfg,
            fast_widen=fast_widen,
            mx_scale_fold=fold,
            weight_tma=tma,
        ),
        "fp8-channel-wo": lambda x=x, cfg=cfg, q=channel, fast_widen=True, tma=False: small_m_gemm_triton(
            x, q.data, weight_scale=q.scale, config=cfg, fast_widen=fast_widen, weight_tma=tma
        ),
        "mxfp8-wo": lambda x=x, cfg=cfg, q=mx, fast_widen=True, fold=False, tma=False: small_m_gemm_triton(
            x,
            q.data,
            weight_scale_e8m0=q.scale_e8m0,
            config=cfg,
            fast_widen=fast_widen,
            mx_scale_fold=fold,
            weight_tma=tma,
        ),
    }
    if args.compare_widen:  # the same launches with Triton's own E4M3 conversions
        for name in ("mxfp8-w8a8", "fp8-channel-wo", "mxfp8-wo"):
            runs[f"{name} (triton widen)"] = functools.partial(runs[name], fast_widen=False)
    if args.compare_fold:  # every code of a quantized bf16 weight is far below MX_FOLD_MAX_CODE
        for name in ("mxfp8-w8a8", "mxfp8-wo"):
            runs[f"{name} (fold)"] = functools.partial(runs[name], fold=True)
    if args.weight_tma:
        for name in list(runs):
            runs[f"{name} (tma)"] = functools.partial(runs[name], tma=True)
    return runs


if __name__ == "__main__":
    main()
