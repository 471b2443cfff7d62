"""Prototype measurement (kept at the commit that added mxrun/kernels/small_m_fp8_mma.py): the small-M split-K
GEMM computed transposed, the weight on wgmma's 64-row side, against the kept kernels, GEMM alone, H100
CUDA-graph replays (warm), seven Llama shapes at M = 1 and 16. Results: results/swap-ab-small-m-h100.log.

    PYTHONPATH=. python3 benchmarks/probe_swap_ab.py --round 1   # FP8 / MXFP8 codes on native FP8 wgmma
    PYTHONPATH=. python3 benchmarks/probe_swap_ab.py --round 2   # MX weight decoded into a bf16 wgmma
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from functools import partial

import torch
import triton.testing
from bench_linear import SHAPES

from mxrun.kernels.e4m3 import mx_scales_foldable
from mxrun.kernels.fp8_quantize import Fp8Granularity, quantize_fp8
from mxrun.kernels.mxfp8_gemm import mxfp8_gemm_reference, mxfp8_linear_reference
from mxrun.kernels.mxfp8_quantize import mx_round_triton, quantize_mxfp8
from mxrun.kernels.scaled_gemm import fp8_gemm_reference
from mxrun.kernels.small_m_fp8_mma import small_m_codes_gemm
from mxrun.kernels.small_m_gemm import SplitKConfig, small_m_gemm_triton


def _time(fn: Callable[[], torch.Tensor]) -> float:
    fn()
    return triton.testing.do_bench_cudagraph(fn, rep=15, return_mode="median") * 1e3


def _err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.float() - ref.float()).norm() / ref.float().norm()).item()


def _cfg(block_k: int, stages: int, **kw: int) -> SplitKConfig:
    return SplitKConfig(block_k=block_k, num_stages=stages, **kw)


def _cases(second: bool, w: torch.Tensor, x: torch.Tensor) -> dict[str, tuple[Callable, torch.Tensor | None]]:
    """Name -> (call, fp32-reference output or None) for one shape and M."""
    qc, qm = quantize_fp8(w, Fp8Granularity.PER_ROW), quantize_mxfp8(w)
    fold = mx_scales_foldable(qm.scale_e8m0, qm.data)
    xq, xm = quantize_fp8(x, Fp8Granularity.PER_ROW), quantize_mxfp8(x)
    xr = mx_round_triton(x, "round_up")
    ref8 = fp8_gemm_reference(xq.data, xq.scale, qc.data, qc.scale, None, torch.bfloat16)
    fp8 = {"a_scale": xq.scale, "weight_scale": qc.scale}
    mx_old = partial(small_m_gemm_triton, xr, qm.data, weight_scale_e8m0=qm.scale_e8m0, mx_scale_fold=fold)
    codes_old = partial(small_m_gemm_triton, xq.data, qc.data, out_dtype=torch.bfloat16, **fp8)
    cases: dict[str, tuple[Callable, torch.Tensor | None]] = {"bf16": (partial(torch.matmul, x, w.t()), None)}
    if not second:
        refm = mxfp8_gemm_reference(xm.data, xm.scale_e8m0, qm.data, qm.scale_e8m0, None, torch.bfloat16)
        cases["codes_old"] = (codes_old, ref8)
        for bk, st in ((256, 3), (128, 4), (256, 4), (128, 6)):
            cases[f"s{bk}x{st}"] = (
                partial(small_m_codes_gemm, xq.data, qc.data, config=_cfg(bk, st), **fp8),
                ref8,
            )
        cases["mx_old"] = (mx_old, refm)
        mx = {"a_scale_e8m0": xm.scale_e8m0, "weight_scale_e8m0": qm.scale_e8m0}
        for bk, st in ((128, 4), (64, 6), (256, 3), (128, 3)):
            cases[f"m{bk}x{st}"] = (
                partial(small_m_codes_gemm, xm.data, qm.data, config=_cfg(bk, st), **mx),
                refm,
            )
        cases["q_mx"] = (partial(quantize_mxfp8, x), None)
        cases["round_mx"] = (partial(mx_round_triton, x, "round_up"), None)
        return cases
    refm = mxfp8_linear_reference(xr, qm.data, qm.scale_e8m0, None, None)
    cases["mx_old"] = (mx_old, refm)
    decoded = {"weight_scale_e8m0": qm.scale_e8m0, "decode": 1 if fold else 2}
    for name, config in (("d128x3", _cfg(128, 3)), ("d256x3", _cfg(256, 3)), ("d128x4", _cfg(128, 4)),
                         ("d128x3n32", _cfg(128, 3, target_programs=8 * 132))):  # fmt: skip
        cases[name] = (partial(small_m_codes_gemm, xr, qm.data, config=config, **decoded), refm)
    cases["codes_old"] = (codes_old, ref8)
    for bk, st in ((256, 3), (128, 4)):
        call = partial(small_m_codes_gemm, xq.data, qc.data, config=_cfg(bk, st), promote=True, **fp8)
        cases[f"p{bk}x{st}"] = (call, ref8)
    return cases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--round", type=int, choices=(1, 2), default=1)
    second = parser.parse_args().round == 2
    for shape, (k, n) in SHAPES.items():
        w = (torch.randn(n, k, device="cuda") * 0.02).to(torch.bfloat16)
        for m in (1, 16):
            x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
            cases = _cases(second, w, x)
            times = {name: _time(fn) for name, (fn, _) in cases.items()}
            errors = {name: _err(fn(), ref) for name, (fn, ref) in cases.items() if ref is not None}
            print(f"{shape:24s} M={m:3d} " + " ".join(f"{a}={b:.1f}" for a, b in times.items()), flush=True)
            print("   err " + " ".join(f"{a}={b:.1e}" for a, b in errors.items()), flush=True)


if __name__ == "__main__":
    main()
