"""What the split-K GEMM's time at M = 1 is made of: streaming the weight's bytes, and a fixed part.

Fitting ``t = t0 + bytes / BW`` to the FP8 codes GEMM over the Llama shapes (H100, cold weights,
``results/small-m-weight-boxes-h100.log``) gives about 3 TB/s and ``t0`` of about 4.4 us, which is what keeps the
small 8B layers (17-25 MB of FP8 weight) from 1.7x of bf16 with their weights cold. This script splits that
fixed part, per shape, with CUDA-graph replays (cold weights by default: each call reads another copy, as
``bench_linear.py --cold-weights`` does):

* ``empty``: a one-program kernel writing one word (what a launch costs in a graph);
* ``stream P``: the weight's bytes read once by ``P`` programs, each a contiguous run, nothing else computed
  (the XOR of the words, one word out per program): the floor for streaming those bytes; ``stream as codes``
  with the GEMM's program count;
* ``codes``: the FP8 codes GEMM (:func:`~mxrun.kernels.small_m_gemm.small_m_gemm_triton`, E4M3 activations) as
  dispatched, and with ``split_k`` forced (``codes sK``): one split writes its outputs directly, more add their
  partial sums through the last program of each column block;
* ``codes no sum`` (timing only, wrong outputs): the dispatched launch with the partial sums stored and never
  added, so ``codes - codes no sum`` is what the last-arrival sum costs on the critical path; ``codes sum
  launch``: the sum left to a second kernel instead (``FUSED_SUM_MAX_BLOCK_M = 0``); ``codes nN sS``: narrower
  column blocks with fewer splits, about the same program count.

    PYTHONPATH=. python3 benchmarks/small_m_overhead.py [--warm] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable

import torch
import triton.testing
from bench_linear import SHAPES, _rotating, weight_copies

from mxrun.kernels import small_m_gemm
from mxrun.kernels.backend import tl, triton
from mxrun.kernels.fp8_quantize import Fp8Granularity, quantize_fp8
from mxrun.kernels.small_m_gemm import default_config, small_m_gemm_triton, split_k_for

STREAM_BLOCK = 2048  # int32 words per program step (8 KB)


@triton.jit
def _one_word_kernel(out_ptr):
    tl.store(out_ptr, 1)


@triton.jit
def _stream_kernel(w_ptr, out_ptr, words, WORDS_PER_PROGRAM: tl.constexpr, BLOCK: tl.constexpr):
    """Read ``WORDS_PER_PROGRAM`` consecutive int32 words of ``w_ptr`` and store their XOR (so that the loads
    cannot be dropped)."""
    start = tl.program_id(0).to(tl.int64) * WORDS_PER_PROGRAM
    acc = tl.zeros([BLOCK], dtype=tl.int32)
    for offset in range(0, WORDS_PER_PROGRAM, BLOCK):
        index = start + offset + tl.arange(0, BLOCK)
        acc ^= tl.load(w_ptr + index, mask=index < words, other=0)
    tl.store(out_ptr + tl.program_id(0), tl.xor_sum(acc, 0))


def _stream(weight: torch.Tensor, out: torch.Tensor, programs: int) -> Callable[[], None]:
    words = weight.numel() // 4
    per_program = triton.cdiv(triton.cdiv(words, programs), STREAM_BLOCK) * STREAM_BLOCK
    grid = (triton.cdiv(words, per_program),)
    flat = weight.view(torch.int32).reshape(-1)

    def run() -> None:
        _stream_kernel[grid](flat, out, words, per_program, STREAM_BLOCK, num_warps=4, num_stages=4)

    return run


def _time_us(fn: Callable[[], object], **module_settings: object) -> float:
    """Graph-replayed time of ``fn`` with ``small_m_gemm``'s module attributes set as given while it is captured."""
    saved = {name: getattr(small_m_gemm, name) for name in module_settings}
    try:
        for name, value in module_settings.items():
            setattr(small_m_gemm, name, value)
        fn()
        return triton.testing.do_bench_cudagraph(fn, rep=20, return_mode="median") * 1e3
    finally:
        for name, value in saved.items():
            setattr(small_m_gemm, name, value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--warm", action="store_true", help="one copy of each weight (L2 keeps what fits)")
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES))
    parser.add_argument("--splits", nargs="+", type=int, default=[1, 2, 4, 8])
    parser.add_argument("--json")
    args = parser.parse_args()
    out = torch.zeros(1 << 16, dtype=torch.int32, device="cuda")
    rows = []
    for shape in args.shapes:
        k, n = SHAPES[shape]
        w = (torch.randn(n, k, device="cuda") * 0.02).to(torch.bfloat16)
        copies = 1 if args.warm else weight_copies(n, k)
        weights = [quantize_fp8(w, Fp8Granularity.PER_ROW) for _ in range(copies)]
        x = quantize_fp8(torch.randn(1, k, device="cuda").to(torch.bfloat16), Fp8Granularity.PER_ROW)
        config = default_config(torch.float8_e4m3fn, False, 1, False, n)
        splits = split_k_for(n, k, config)
        programs = triton.cdiv(n, config.block_n) * splits
        timed: dict[str, float] = {"empty": _time_us(lambda: _one_word_kernel[(1,)](out))}
        for p in (132, 264, 528, 1056):
            timed[f"stream {p}"] = _time_us(_rotating([_stream(q.data, out, p) for q in weights]))
        timed["stream as codes"] = _time_us(_rotating([_stream(q.data, out, programs) for q in weights]))

        def codes(q, split_k=None, tile=None, x=x):
            return lambda: small_m_gemm_triton(
                x.data,
                q.data,
                a_scale=x.scale,
                weight_scale=q.scale,
                out_dtype=torch.bfloat16,
                split_k=split_k,
                config=tile,
            )

        timed["codes"] = _time_us(_rotating([codes(q) for q in weights]))
        for s in args.splits:
            timed[f"codes s{s}"] = _time_us(_rotating([codes(q, s) for q in weights]))
        every = _rotating([codes(q) for q in weights])
        timed["codes no sum"] = _time_us(every, FUSED_SUM_MAX_BLOCK_M=0, sum_splits=lambda *_: None)
        timed["codes sum launch"] = _time_us(every, FUSED_SUM_MAX_BLOCK_M=0)
        for narrow in (16, 32):
            s = max(1, splits * narrow // config.block_n)
            tile = config._replace(block_n=narrow)
            timed[f"codes n{narrow} s{s}"] = _time_us(_rotating([codes(q, s, tile) for q in weights]))
        mb = n * k / 1e6
        line = "  ".join(f"{name}={us:.1f}" for name, us in timed.items())
        print(f"{shape:24s} {mb:6.1f} MB, {programs} programs ({splits} splits): {line}", flush=True)
        rows.append({"shape": shape, "n": n, "k": k, "splits": splits, "programs": programs, "us": timed})
        del weights, w
        torch.cuda.empty_cache()
    if len(rows) >= 2:  # least squares t = t0 + bytes / BW per column
        for name in rows[0]["us"]:
            if name == "empty" or not all(name in r["us"] for r in rows):
                continue
            xs = torch.tensor([r["n"] * r["k"] / 1e6 for r in rows], dtype=torch.float64)
            ys = torch.tensor([r["us"][name] for r in rows], dtype=torch.float64)
            slope, t0 = torch.linalg.lstsq(torch.stack([xs, torch.ones_like(xs)], 1), ys[:, None]).solution[
                :, 0
            ]
            print(f"fit {name:12s}: t0 {t0:.2f} us, {1 / slope:.2f} TB/s")
    if args.json:
        meta = {"device": torch.cuda.get_device_name(), "warm": args.warm}
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
