"""MXFP8 weights in the small-M split-K GEMM with their E8M0 codes read by TMA, one box per (column block, K
step) of a regrouped copy (:func:`~mxrun.kernels.small_m_gemm.mx_scale_tiles`), against the byte loads from
the ``[N, K/32]`` codes (a load each step waits for, then a layout change through shared memory). GEMM alone,
CUDA-graph replays, the seven Llama shapes of ``bench_linear.py`` at M = 1 and 16, bf16 activations on the
folded decode (MXFP8 weight-only, and the W8A8 path after its rounding pass), warm (one weight, replayed) and
cold (copies in turn, read from DRAM); two rounds interleaved; checks that both give the same bits.

    PYTHONPATH=. python3 benchmarks/small_m_mx_codes_tma.py
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
import triton.testing
from bench_linear import SHAPES

from mxrun.kernels.e4m3 import mx_scales_foldable
from mxrun.kernels.mxfp8_quantize import quantize_mxfp8
from mxrun.kernels.small_m_gemm import default_config, mx_scale_tiles, small_m_gemm_triton

L2_BYTES = 50 * 2**20


def _time(fn: Callable[[], object], calls: int) -> float:
    fn()
    return triton.testing.do_bench_cudagraph(fn, rep=20, return_mode="median") * 1e3 / calls


def _in_turn(x: torch.Tensor, fold: bool, weights: list, tiles: bool) -> None:
    for data, scale, regrouped in weights:
        small_m_gemm_triton(x, data, weight_scale_e8m0=scale, mx_scale_fold=fold,
                            weight_scale_tiles=regrouped if tiles else None)  # fmt: skip


def main() -> None:
    print(
        f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}; us per call"
    )
    totals = {False: [], True: []}
    for shape, (k, n) in SHAPES.items():
        w = (torch.randn(n, k, device="cuda") * 0.02).to(torch.bfloat16)
        mx = quantize_mxfp8(w)
        fold = mx_scales_foldable(mx.scale_e8m0, mx.data)
        config = default_config(torch.bfloat16, True, 1)
        copies = max(2, -(-2 * L2_BYTES // (n * k)))
        weights = [(mx.data.clone(), mx.scale_e8m0.clone()) for _ in range(copies)]
        weights = [(d, s, mx_scale_tiles(s, config)) for d, s in weights]
        del w
        for m in (1, 16):
            x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
            d, s, t = weights[0]
            ref = small_m_gemm_triton(x, d, weight_scale_e8m0=s, mx_scale_fold=fold)
            got = small_m_gemm_triton(x, d, weight_scale_e8m0=s, mx_scale_fold=fold, weight_scale_tiles=t)
            same = torch.equal(ref, got)
            row = []
            for rnd in range(2):
                for tiles in (False, True):
                    warm = _time(partial(_in_turn, x, fold, weights[:1], tiles), 1)
                    cold = _time(partial(_in_turn, x, fold, weights, tiles), len(weights))
                    row.append(f"{'tma' if tiles else 'bytes'}={warm:.1f}/{cold:.1f}")
                    if rnd == 1:
                        totals[tiles].append((warm, cold))
            print(
                f"{shape:24s} M={m:3d} warm/cold " + " ".join(row) + ("" if same else " DIFFERENT"),
                flush=True,
            )
    for i, what in enumerate(("warm", "cold")):
        ratios = [t[i] / b[i] for b, t in zip(totals[False], totals[True], strict=True)]
        geo = torch.tensor(ratios).log().mean().exp().item()
        print(f"{what}: codes by TMA x{geo:.3f} the time of byte loads (round 2), faster in "
              f"{sum(r < 1 for r in ratios)} of {len(ratios)}")  # fmt: skip


if __name__ == "__main__":
    main()
