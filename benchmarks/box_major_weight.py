"""The small-M split-K GEMM reading its FP8 weight box-major (:mod:`mxrun.kernels.box_major`: each
``[block_n, block_k]`` box one contiguous run of memory, a program's K slab consecutive boxes) against the
row-major ``[N, K]`` weight (each box ``block_n`` runs of ``block_k`` bytes, ``K`` bytes apart),
GEMM alone, CUDA-graph replays, the seven Llama shapes of ``bench_linear.py``, for the three operand kinds of the
Linear presets: E4M3 activation codes (FP8 W8A8), bf16 activations on an FP8 per-channel weight (weight-only)
and on an MXFP8 weight (folded decode), each with its default tile, by TMA and by pointers. Warm: one weight,
replayed (it stays in L2 where it fits); cold: enough copies of the weight, called in turn, that each call reads
it from DRAM. Also the row-major weight with its rows padded (``--pads``, bytes: a row stride that is not a power
of two), and with ``--mid-ms`` the mid-M kernel (:mod:`mxrun.kernels.mid_m_gemm`, TMA) on the MXFP8 and FP8
per-channel weights at those rows. Two interleaved rounds; checks that every layout gives the same bits.

    PYTHONPATH=. python3 benchmarks/box_major_weight.py [--ms 1 16] [--mid-ms 64 128 256] [--pads 16 128] \
        [--json out.json]
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from functools import partial

import torch
import triton.testing
from bench_linear import SHAPES, weight_copies

from mxrun.kernels.box_major import BoxMajorWeight
from mxrun.kernels.e4m3 import mx_scales_foldable
from mxrun.kernels.fp8_quantize import Fp8Granularity, quantize_fp8
from mxrun.kernels.mid_m_gemm import config_for, mid_m_gemm_triton
from mxrun.kernels.mxfp8_quantize import quantize_mxfp8
from mxrun.kernels.small_m_gemm import default_config, small_m_gemm_triton


def _time(fn: Callable[[], object], calls: int) -> float:
    fn()
    return triton.testing.do_bench_cudagraph(fn, rep=20, return_mode="median") * 1e3 / calls


def _codes_gemm(xq, xs, wd, ws, wt, **kw) -> torch.Tensor:
    """FP8 W8A8: E4M3 activation codes with per-token scales, per-channel weight."""
    return small_m_gemm_triton(xq, wd, a_scale=xs, weight_scale=ws, out_dtype=torch.bfloat16, **kw)


def _wo_gemm(x, wd, ws, wt, **kw) -> torch.Tensor:
    """FP8 per-channel weight-only: bf16 activations."""
    return small_m_gemm_triton(x, wd, weight_scale=ws, **kw)


def _mx_gemm(x, fold, wd, ws, wt, **kw) -> torch.Tensor:
    """MXFP8 weight-only: bf16 activations, the folded decode where the weight allows it."""
    return small_m_gemm_triton(x, wd, weight_scale_e8m0=ws, mx_scale_fold=fold, **kw)


def _padded(data: torch.Tensor, pad: int) -> torch.Tensor:
    """``data`` in a buffer whose rows are ``pad`` bytes longer (the same values, row stride K + pad)."""
    n, k = data.shape
    buffer = torch.zeros((n, k + pad), dtype=torch.uint8, device=data.device)
    buffer[:, :k] = data.view(torch.uint8)
    return buffer.view(data.dtype)[:, :k]


def _operands(wt: tuple, layout: str) -> tuple[tuple, dict]:
    """The weight tuple and extra keywords that read copy ``wt`` in ``layout``."""
    data, scale, boxed, padded = wt
    if layout == "boxes":
        return (boxed, scale, None), {}
    if layout.startswith("pad"):
        return (padded[layout], scale, None), {}
    return (data, scale, None), {}


def _in_turn(call: Callable[..., torch.Tensor], weights: list, layout: str, kw: dict) -> list[torch.Tensor]:
    """One call per copy of the weight (cold: each reads its weight from DRAM)."""
    out = []
    for wt in weights:
        args, extra = _operands(wt, layout)
        out.append(call(*args, **kw, **extra))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ms", type=int, nargs="*", default=[1, 16])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES))
    parser.add_argument(
        "--mid-ms", type=int, nargs="*", default=[64, 128, 256], help="rows for the mid-M kernel"
    )
    parser.add_argument("--pads", type=int, nargs="*", default=[16, 128], help="row paddings in bytes")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    print(
        f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}; us per call"
    )
    rows = []
    for shape in args.shapes:
        k, n = SHAPES[shape]
        w = (torch.randn(n, k, device="cuda") * 0.02).to(torch.bfloat16)
        mx, channel = quantize_mxfp8(w), quantize_fp8(w, Fp8Granularity.PER_ROW)
        fold = mx_scales_foldable(mx.scale_e8m0, mx.data)
        copies = weight_copies(n, k)
        del w
        for m in args.ms:
            xb = torch.randn(m, k, device="cuda").to(torch.bfloat16)
            xq = quantize_fp8(xb, Fp8Granularity.PER_ROW)
            kinds = {
                "codes": (partial(_codes_gemm, xq.data, xq.scale), channel, False, torch.float8_e4m3fn),
                "wo": (partial(_wo_gemm, xb), channel, False, torch.bfloat16),
                "mx": (partial(_mx_gemm, xb, fold), mx, True, torch.bfloat16),
            }
            for kind, (call, q, is_mx, a_dtype) in kinds.items():
                cfg = default_config(a_dtype, is_mx, m, False, n)
                scale = q.scale_e8m0 if is_mx else q.scale
                weights = []
                for _ in range(copies):
                    data = q.data.clone()
                    padded = {f"pad{p}": _padded(data, p) for p in args.pads}
                    weights.append(
                        (data, scale.clone(), BoxMajorWeight.of(data, cfg.block_n, cfg.block_k), padded)
                    )
                ref = call(*weights[0][:2], None)
                layouts = ["rows", "boxes"] + [f"pad{p}" for p in args.pads]
                variants = {
                    f"{loads}-{layout}": ({"weight_tma": loads == "tma"}, layout)
                    for loads in ("tma", "ptr")
                    for layout in layouts
                }
                times: dict[str, list[tuple[float, float]]] = {v: [] for v in variants}
                same = {}
                for _ in range(args.rounds):
                    for name, (kw, layout) in variants.items():
                        args0, extra = _operands(weights[0], layout)
                        same[name] = torch.equal(call(*args0, **kw, **extra), ref)
                        warm = _time(partial(call, *args0, **kw, **extra), 1)
                        cold = _time(partial(_in_turn, call, weights, layout, kw), len(weights))
                        times[name].append((warm, cold))
                best = {v: (min(t[0] for t in ts), min(t[1] for t in ts)) for v, ts in times.items()}
                text = " ".join(
                    f"{v}={w_:.1f}/{c_:.1f}{'' if same[v] else ' DIFFERENT'}" for v, (w_, c_) in best.items()
                )
                ratio = " ".join(
                    f"{loads}-{lay}/rows {best[f'{loads}-{lay}'][0] / best[f'{loads}-rows'][0]:.3f}"
                    f"/{best[f'{loads}-{lay}'][1] / best[f'{loads}-rows'][1]:.3f}"
                    for loads in ("tma", "ptr")
                    for lay in layouts[1:]
                )
                print(f"{shape:24s} M={m:3d} {kind:5s} {cfg.block_n}x{cfg.block_k} warm/cold {text} | {ratio}",
                      flush=True)  # fmt: skip
                rows.append(
                    {
                        "shape": shape,
                        "M": m,
                        "kind": kind,
                        "tile": list(cfg),
                        "times": times,
                        "same_bits": same,
                    }
                )
                del weights
    for shape in args.shapes if args.mid_ms else []:
        rows += _mid_m(shape, args.mid_ms, args.rounds)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)


def _mid_m(shape: str, ms: list[int], rounds: int) -> list[dict]:
    """The mid-M kernel (:mod:`mxrun.kernels.mid_m_gemm`, TMA) on the row-major and the box-after-box weight:
    bf16 activations on an MXFP8 and on an FP8 per-channel weight."""
    k, n = SHAPES[shape]
    w = (torch.randn(n, k, device="cuda") * 0.02).to(torch.bfloat16)
    mx, channel = quantize_mxfp8(w), quantize_fp8(w, Fp8Granularity.PER_ROW)
    fold = mx_scales_foldable(mx.scale_e8m0, mx.data)
    del w
    out = []
    for m in ms:
        cfg = config_for(m)
        x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
        for kind, q in (("mid-mx", mx), ("mid-wo", channel)):
            scales = (
                {"weight_scale_e8m0": q.scale_e8m0, "mx_scale_fold": fold}
                if kind == "mid-mx"
                else {"weight_scale": q.scale}
            )
            copies = []
            for _ in range(weight_copies(n, k)):
                data = q.data.clone()
                copies.append((data, BoxMajorWeight.of(data, cfg.block_n, cfg.block_k)))

            def call(i: int, boxed: bool, copies=copies, scales=scales, x=x) -> torch.Tensor:
                data, boxes = copies[i]
                return mid_m_gemm_triton(x, boxes if boxed else data, **scales)

            def in_turn(boxed: bool, count: int = len(copies), call=call) -> list[torch.Tensor]:
                return [call(i, boxed) for i in range(count)]

            ref = call(0, False)
            times: dict[str, list[tuple[float, float]]] = {"tma-rows": [], "tma-boxes": []}
            same = {}
            for _ in range(rounds):
                for name in times:
                    boxed = name.endswith("boxes")
                    same[name] = torch.equal(call(0, boxed), ref)
                    warm = _time(partial(call, 0, boxed), 1)
                    cold = _time(partial(in_turn, boxed), len(copies))
                    times[name].append((warm, cold))
            best = {v: (min(t[0] for t in ts), min(t[1] for t in ts)) for v, ts in times.items()}
            print(
                f"{shape:24s} M={m:3d} {kind:6s} {cfg.block_n}x{cfg.block_k} warm/cold "
                + " ".join(
                    f"{v}={a:.1f}/{b:.1f}{'' if same[v] else ' DIFFERENT'}" for v, (a, b) in best.items()
                )
                + f" | boxes/rows {best['tma-boxes'][0] / best['tma-rows'][0]:.3f}"
                f"/{best['tma-boxes'][1] / best['tma-rows'][1]:.3f}",
                flush=True,
            )
            out.append(
                {"shape": shape, "M": m, "kind": kind, "tile": list(cfg), "times": times, "same_bits": same}
            )
            del copies
    return out


if __name__ == "__main__":
    main()
