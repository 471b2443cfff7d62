"""Prototype (measurement only): an FMA GEMV for M = 1 against MXFP8 weights, split along K with the same
last-arriver sum as the split-K kernel, beside that kernel and bf16 cuBLAS, as CUDA-graph replays."""

from __future__ import annotations

import argparse

import torch

from mxrun.kernels.backend import tl, triton


@triton.jit
def _e8m0_scale(codes):
    """2^(code - 127) for E8M0 codes 1..254 (prototype: code 0 and NaN not handled)."""
    return (codes.to(tl.int32) << 23).to(tl.float32, bitcast=True)


@triton.jit
def mx_gemv_kernel(
    a_ptr, w_ptr, s_ptr, p_ptr, count_ptr, c_ptr, N, K, K_SPLIT,
    SPLIT_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, HALVES: tl.constexpr,
    SCALE_WORDS: tl.constexpr,
):  # fmt: skip
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    G: tl.constexpr = BLOCK_K // 32
    E: tl.constexpr = 32 // HALVES
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = rows < N
    rows_c = tl.minimum(rows, N - 1).to(tl.int64)
    offs_g = tl.arange(0, G)
    offs_h = tl.arange(0, HALVES)
    offs_e = tl.arange(0, E)
    kk = offs_g[:, None, None] * 32 + offs_h[None, :, None] * E + offs_e[None, None, :]
    w_rows = w_ptr + rows_c[:, None, None, None] * K
    if SCALE_WORDS:  # each group reads the 32-bit word that holds its code (K % 128 == 0)
        s_rows = (
            s_ptr.to(tl.pointer_type(tl.int32))
            + rows_c[:, None, None, None] * (K // 128)
            + (offs_g[None, :, None, None] // 4)
        )
        shift = (offs_g[None, :, None, None] % 4) * 8
    else:
        s_rows = s_ptr + rows_c[:, None, None, None] * (K // 32) + offs_g[None, :, None, None]
    acc = tl.zeros([BLOCK_N, G, HALVES], tl.float32)
    k_lo = pid_k * K_SPLIT
    k_hi = tl.minimum(k_lo + K_SPLIT, K)
    for k0 in tl.range(k_lo, k_hi, BLOCK_K, num_stages=3):
        k_ok = (k0 + kk) < k_hi
        w = tl.load(w_rows + (k0 + kk)[None], mask=k_ok[None], other=0)
        a = tl.load(a_ptr + k0 + kk, mask=k_ok, other=0.0).to(tl.float32)
        wf = w.to(tl.float8e4nv, bitcast=True).to(tl.float32)
        part = tl.sum(wf * a[None], axis=3)
        if SCALE_WORDS:
            codes = (tl.load(s_rows + k0 // 128) >> shift) & 0xFF
        else:
            codes = tl.load(s_rows + k0 // 32)
        scale = tl.sum(_e8m0_scale(codes), axis=3)
        acc += part * scale
    total = tl.sum(tl.sum(acc, axis=2), axis=1)
    if SPLIT_K == 1:
        tl.store(c_ptr + rows, total.to(c_ptr.dtype.element_ty), mask=n_ok)
    else:
        tl.store(p_ptr + pid_k * N + rows, total, mask=n_ok)
        tl.debug_barrier()
        arrived = tl.atomic_add(count_ptr + pid_n, 1, sem="acq_rel", scope="gpu")
        if arrived == SPLIT_K - 1:
            tl.atomic_xchg(count_ptr + pid_n, 0, sem="relaxed", scope="gpu")
            out = tl.zeros([BLOCK_N], tl.float32)
            for s in tl.static_range(SPLIT_K):
                out += tl.load(p_ptr + s * N + rows, mask=n_ok, other=0.0, cache_modifier=".cg")
            tl.store(c_ptr + rows, out.to(c_ptr.dtype.element_ty), mask=n_ok)


def mx_gemv(
    a, w, s, block_n=16, block_k=512, halves=2, target=1056, warps=4, counts=None, parts=None, words=0
):
    n, k = w.shape
    steps = triton.cdiv(k, block_k)
    blocks = triton.cdiv(n, block_n)
    split = max(1, min(target // blocks, steps, 32))
    per = triton.cdiv(steps, split) * block_k
    split = triton.cdiv(k, per)
    c = torch.empty(1, n, dtype=a.dtype, device=a.device)
    mx_gemv_kernel[(blocks, split)](a, w, s, parts, counts, c, n, k, per, SPLIT_K=split, BLOCK_N=block_n,
                                    BLOCK_K=block_k, HALVES=halves, SCALE_WORDS=words, num_warps=warps)  # fmt: skip
    return c


def main() -> None:
    from benchmarks.bench_linear import _rotating, weight_copies
    from benchmarks.sweep_small_m import graph_us
    from mxrun.kernels.e4m3 import mx_scales_foldable
    from mxrun.kernels.mxfp8_quantize import quantize_mxfp8
    from mxrun.kernels.small_m_gemm import small_m_gemm_triton

    parser = argparse.ArgumentParser()
    parser.add_argument("--cold-weights", action="store_true")
    parser.add_argument("--tiles", nargs="+", default=["16,512,2,1056,4,0"])
    args = parser.parse_args()
    shapes = [
        (4096, 6144),
        (4096, 4096),
        (4096, 28672),
        (14336, 4096),
        (8192, 10240),
        (8192, 57344),
        (28672, 8192),
    ]
    counts = torch.zeros(1 << 16, dtype=torch.int32, device="cuda")
    parts = torch.empty(32 << 16, dtype=torch.float32, device="cuda")
    for k, n in shapes:
        torch.manual_seed(0)
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        copies = weight_copies(n * k, 1) if args.cold_weights else 1
        mxs = [quantize_mxfp8(w) for _ in range(copies)]
        ws = [w] if copies == 1 else [w.clone() for _ in range(max(1, copies // 2))]
        fold = mx_scales_foldable(mxs[0].scale_e8m0, mxs[0].data)
        ref = small_m_gemm_triton(x, mxs[0].data, weight_scale_e8m0=mxs[0].scale_e8m0, mx_scale_fold=fold)
        line = f"{k}->{n}"
        bf16 = graph_us(_rotating([lambda w=w_: torch.matmul(x, w.t()) for w_ in ws]))
        cur = graph_us(_rotating([lambda q=q: small_m_gemm_triton(x, q.data, weight_scale_e8m0=q.scale_e8m0,
                                                                   mx_scale_fold=fold) for q in mxs]))  # fmt: skip
        line += f" | bf16 {bf16:.1f} | split-K {cur:.1f} x{bf16 / cur:.2f}"
        for tile in args.tiles:
            bn, bk, h, tgt, wp, wd = (int(v) for v in tile.split(","))
            out = mx_gemv(x, mxs[0].data.view(torch.uint8), mxs[0].scale_e8m0.view(torch.uint8), bn, bk, h, tgt, wp,
                          counts, parts, wd)  # fmt: skip
            err = ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
            t = graph_us(_rotating([lambda q=q: mx_gemv(x, q.data.view(torch.uint8), q.scale_e8m0.view(torch.uint8),
                                                        bn, bk, h, tgt, wp, counts, parts, wd) for q in mxs]))  # fmt: skip
            line += f" | gemv {tile} {t:.1f} x{bf16 / t:.2f} err {err:.1e}"
        print(line, flush=True)


if __name__ == "__main__":
    main()
