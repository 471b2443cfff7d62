"""Time the FP8 per-row quantize of decode-sized activations (few, long rows) as CUDA-graph replays: the launcher
beside the kernels it used before (whole rows in registers, or two passes: ``before``) and
:func:`~mxrun.kernels.fp8_quantize._fp8_row_chunks_kernel` with other chunk widths, amax steps and warps,
each launch checked byte for byte against the launcher first. The launcher's row-chunk defaults
(``ROW_CHUNKS_*`` in ``mxrun/kernels/fp8_quantize.py``) come from this sweep:

    PYTHONPATH=. python benchmarks/sweep_fp8_row_chunks.py

``--linear`` times the per-token W8A8 Linear (``fp8_linear``, quantize + split-K GEMM) on the two Llama ``down``
shapes and 70B ``qkv`` (8192 columns) at M = 1 and 16 with the row-chunk rule off, at 16384 columns with the
amax read in 4096-column steps (as before), at 8192 (the launcher's: whole rows) and at 4096, three rounds each
in one process, so the effect on the layer is compared within one run.
"""

from __future__ import annotations

import torch
import triton
import triton.testing

from mxrun.kernels import fp8_quantize as fq

SHAPES = [(1, 4096), (16, 4096), (1, 8192), (16, 8192), (1, 14336), (4, 14336), (16, 14336), (1, 28672),
          (4, 28672), (16, 28672), (64, 14336)]  # fmt: skip
SETTINGS = [
    (chunk, step, warps)
    for chunk in (1024, 2048, 4096)
    for step, warps in ((4096, 4), (32768, 4), (32768, 8))
]  # steps beyond the row: the row rounded up to a power of two, read at once


def chunks_launch(x: torch.Tensor, chunk: int, step: int, warps: int):
    m, k = x.shape
    step = min(step, triton.next_power_of_2(k))

    def launch():
        data = torch.empty(x.shape, dtype=torch.uint8, device=x.device)
        scale = torch.empty((m, 1), dtype=torch.float32, device=x.device)
        fq._fp8_row_chunks_kernel[(m, triton.cdiv(k, chunk), 1)](
            x, data, scale, m, k, 0, x.stride(0), x.stride(1),
            SOFT_CAST=False, BLOCK_R=1, BLOCK_K=step, CHUNK=chunk, num_warps=warps,
        )  # fmt: skip
        return data, scale

    return launch


def graph_us(fn) -> float:
    return 1e3 * triton.testing.do_bench_cudagraph(fn, rep=20, return_mode="median")


def linear_ab() -> None:
    """The Linear with the rule at 16384 columns (amax read in steps of 4096 columns, or the whole row at
    once), at 8192 (whole rows) and off: min and each round, us."""
    from mxrun.kernels.scaled_gemm import fp8_linear

    rules = {
        "off": (1 << 62, 32768),
        "chunks>16384 step 4096": (16384, 4096),
        "chunks>8192": (8192, 32768),
        "chunks>4096": (4096, 32768),
    }
    default = fq.ROW_CHUNKS_MIN_COLS, fq.ROW_CHUNKS_AMAX_STEP
    for k, n in [(14336, 4096), (28672, 8192), (8192, 10240)]:
        w = (torch.randn(n, k, device="cuda") * 0.02).to(torch.bfloat16)
        q = fq.quantize_fp8(w, fq.Fp8Granularity.PER_ROW)
        for m in (1, 16):
            x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
            times: dict[str, list[float]] = {}
            for _ in range(3):
                for label, (min_cols, step) in rules.items():
                    fq.ROW_CHUNKS_MIN_COLS, fq.ROW_CHUNKS_AMAX_STEP = min_cols, step
                    fq._fp8_launch_plan.cache_clear()
                    us = graph_us(lambda x=x, q=q: fp8_linear(x, q.data, q.scale, None, "token"))
                    times.setdefault(label, []).append(us)
            fq.ROW_CHUNKS_MIN_COLS, fq.ROW_CHUNKS_AMAX_STEP = default
            fq._fp8_launch_plan.cache_clear()
            rounds = " ".join(
                f"{label}: {min(v):.1f} ({', '.join(f'{u:.1f}' for u in v)})" for label, v in times.items()
            )
            print(f"{k}->{n} M={m} {rounds}", flush=True)


def main() -> None:
    import sys

    print(torch.cuda.get_device_name())
    if "--linear" in sys.argv[1:]:
        linear_ab()
        return
    for m, k in SHAPES:
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        x[:, 7] = 40.0
        ref = fq.quantize_fp8_triton(x, "per_row")
        kernel = fq._fp8_launch_plan(tuple(x.shape), tuple(x.stride()), x.dtype, "per_row", "auto", None)[0]
        before = fq.fp8_tile_config("per_row", m, k)  # a tile given: whole rows or two passes, as before
        times = {
            f"launcher ({kernel})": graph_us(lambda x=x: fq.quantize_fp8_triton(x, "per_row")),
            "before": graph_us(lambda x=x, t=before: fq.quantize_fp8_triton(x, "per_row", config=t)),
        }
        for chunk, step, warps in SETTINGS:
            fn = chunks_launch(x, chunk, step, warps)
            data, scale = fn()
            if not (torch.equal(data, ref.data.view(torch.uint8)) and torch.equal(scale, ref.scale)):
                raise AssertionError(f"{m}x{k} chunk {chunk}: bytes differ from the launcher's")
            times[f"chunk {chunk} step {step} w{warps}"] = graph_us(fn)
        ranked = sorted(times.items(), key=lambda kv: kv[1])
        line = " | ".join(f"{name} {us:.2f}" for name, us in ranked[:4])
        line += f" || launcher {times[f'launcher ({kernel})']:.2f}, before {times['before']:.2f}"
        print(f"{m} x {k}: {line}", flush=True)


if __name__ == "__main__":
    main()
