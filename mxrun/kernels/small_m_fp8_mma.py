"""Split-K GEMM for small M with both operands as E4M3 codes, the weight on the MMA's M side ("swap AB").

:mod:`mxrun.kernels.small_m_gemm` puts the M <= 16 activation rows on the MMA's M side, which on Hopper means
``mma.sync`` tiles of 16 rows: FP8 codes are widened to fp16 in registers first, one conversion per pair of
weight elements, and MXFP8 weights are decoded element by element. Here the product is computed transposed,
``C^T = W A^T``: the weight tile ``[BLOCK_N, BLOCK_K]`` is the MMA's 64-row side and the activations its
16-wide side, which Hopper's ``wgmma`` takes as E4M3 straight from shared memory (``m64n16k32``): the weight
goes from memory to the tensor core without passing through registers.

* FP8 W8A8 (per-token / per-tensor activations, per-tensor / per-channel weights): one ``wgmma`` chain over
  the whole K slab, the scales that factor out of K applied at the end.
* MXFP8 W8A8 (both operands MXFP8 codes with E8M0 scales per 32 along K): one ``wgmma`` per 32-wide group,
  its fp32 product multiplied by the group's two powers of two and added to the accumulator.

Numerics: Hopper's FP8 ``wgmma`` adds its products in a fixed-point accumulator narrower than fp32 (the same
as the large-M kernels, whose tests allow 2^-10 sum|a b|); the MX path promotes every 32 elements, the FP8
path every slab step. The split-K structure (fp32 partials, the last split of a column block adds them in
split order, then scales, bias and cast) is :mod:`mxrun.kernels.small_m_gemm`'s.
"""

from __future__ import annotations

import torch

from mxrun.kernels.backend import tl, triton, triton_interpreting
from mxrun.kernels.mxfp8_gemm import e8m0_to_fp32, mx_decode_weight
from mxrun.kernels.scaled_gemm import GemmInputError
from mxrun.kernels.small_m_gemm import SplitKConfig, _scale_and_store, block_m_for, split_k_for
from mxrun.kernels.workspace import zeroed_int32

FP8_CODES_CONFIG = SplitKConfig(block_k=256, num_stages=3)
MX_CODES_CONFIG = SplitKConfig(block_k=128, num_stages=4)


@triton.jit
def _codes_product(w, a, EXACT: tl.constexpr):
    """``w [BN, BK] @ a[BM, BK]^T`` in fp32: native FP8 wgmma, or fp32 in the interpreter."""
    if EXACT:
        return tl.dot(w.to(tl.float32), tl.trans(a.to(tl.float32)), input_precision="ieee")
    return tl.dot(w, tl.trans(a))


@triton.jit(do_not_specialize=["M"])
def _split_k_codes_kernel(
    a_ptr,  # [M, K] float8e4nv activation codes, (m, k) at m*stride_am + k
    b_ptr,  # [N, K] float8e4nv weight codes, (n, k) at n*stride_bn + k
    as_ptr,  # MX: uint8 E8M0 [M, K/32], (m, g) at m*stride_asm + g
    bs_ptr,  # MX: uint8 E8M0 [N, K/32], (n, g) at n*stride_bsn + g
    p_ptr,  # SPLIT_K > 1: fp32 partials [SPLIT_K, M, N]
    count_ptr,  # SPLIT_K > 1: int32 [cdiv(N, BLOCK_N)] arrival counters, zero before and after each launch
    a_scale_ptr,
    b_scale_ptr,
    bias_ptr,
    c_ptr,
    M,
    N,
    K,
    K_PER_SPLIT,
    stride_am,
    stride_bn,
    stride_asm,
    stride_bsn,
    MX: tl.constexpr,
    DECODE: tl.constexpr,  # prototype: bf16 activations, MX weight decoded in registers (1 fold, 2 fp32)
    PROMOTE: tl.constexpr,
    A_SCALE: tl.constexpr,
    B_SCALE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SPLIT_K: tl.constexpr,
    EXACT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N
    k_begin = pid_k * K_PER_SPLIT
    k_end = tl.minimum(k_begin + K_PER_SPLIT, K)
    a_rows = a_ptr + offs_m.to(tl.int64)[:, None] * stride_am
    b_rows = b_ptr + offs_n.to(tl.int64)[:, None] * stride_bn
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    if DECODE:
        G2: tl.constexpr = BLOCK_K // 32
        offs_k = tl.arange(0, BLOCK_K)
        offs_g = tl.arange(0, G2)
        bs_cols = bs_ptr + offs_n.to(tl.int64)[:, None] * stride_bsn
        for k0 in range(k_begin, k_end, BLOCK_K):
            k_ok = k0 + offs_k < k_end
            w = tl.load(b_rows + (k0 + offs_k)[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
            a = tl.load(a_rows + (k0 + offs_k)[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            g_ok = k0 + offs_g * 32 < k_end
            codes = tl.load(
                bs_cols + (k0 // 32 + offs_g)[None, :], mask=n_ok[:, None] & g_ok[None, :], other=127
            )
            wd = mx_decode_weight(w, codes, DECODE == 1, True).to(tl.bfloat16)
            if EXACT:
                acc = tl.dot(wd.to(tl.float32), tl.trans(a.to(tl.float32)), acc, input_precision="ieee")
            else:
                acc = tl.dot(wd, tl.trans(a), acc)
    elif MX:
        G: tl.constexpr = BLOCK_K // 32
        offs_k = tl.arange(0, 32)
        as_rows = as_ptr + offs_m.to(tl.int64) * stride_asm
        bs_rows = bs_ptr + offs_n.to(tl.int64) * stride_bsn
        for k0 in range(k_begin, k_end, BLOCK_K):
            for g in tl.static_range(G):
                kg = k0 + g * 32
                k_ok = kg + offs_k < k_end
                w = tl.load(b_rows + (kg + offs_k)[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
                a = tl.load(a_rows + (kg + offs_k)[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
                w_pow = e8m0_to_fp32(
                    tl.load(bs_rows + kg // 32, mask=n_ok & (offs_n * 0 + kg < k_end), other=127)
                )
                a_pow = e8m0_to_fp32(
                    tl.load(as_rows + kg // 32, mask=m_ok & (offs_m * 0 + kg < k_end), other=127)
                )
                acc += _codes_product(w, a, EXACT) * w_pow[:, None] * a_pow[None, :]
    else:
        offs_k = tl.arange(0, BLOCK_K)
        for k0 in range(k_begin, k_end, BLOCK_K):
            k_ok = k0 + offs_k < k_end
            w = tl.load(b_rows + (k0 + offs_k)[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
            a = tl.load(a_rows + (k0 + offs_k)[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            if EXACT or PROMOTE:
                acc += _codes_product(w, a, EXACT)
            else:
                acc = tl.dot(w, tl.trans(a), acc)
    acc = tl.trans(acc)
    if SPLIT_K == 1:
        _scale_and_store(acc, a_scale_ptr, b_scale_ptr, bias_ptr, c_ptr, offs_m, offs_n, M, N,
                         A_SCALE, B_SCALE, HAS_BIAS)  # fmt: skip
    else:
        tile = (offs_m.to(tl.int64) * N)[:, None] + offs_n[None, :]
        tile_ok = m_ok[:, None] & n_ok[None, :]
        tl.store(p_ptr + pid_k * M * N + tile, acc, mask=tile_ok)
        tl.debug_barrier()  # every thread's partials are written before the release below
        arrived = tl.atomic_add(count_ptr + pid_n, 1, sem="acq_rel", scope="gpu")
        if arrived == SPLIT_K - 1:
            tl.atomic_xchg(count_ptr + pid_n, 0, sem="relaxed", scope="gpu")  # ready for the next launch
            total = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for s in tl.static_range(SPLIT_K):  # L2, not L1: other SMs wrote these
                total += tl.load(p_ptr + s * M * N + tile, mask=tile_ok, other=0.0, cache_modifier=".cg")
            _scale_and_store(total, a_scale_ptr, b_scale_ptr, bias_ptr, c_ptr, offs_m, offs_n, M, N,
                             A_SCALE, B_SCALE, HAS_BIAS)  # fmt: skip


def small_m_codes_gemm(
    a: torch.Tensor,
    weight: torch.Tensor,
    *,
    a_scale: torch.Tensor | None = None,
    weight_scale: torch.Tensor | None = None,
    a_scale_e8m0: torch.Tensor | None = None,
    weight_scale_e8m0: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.bfloat16,
    config: SplitKConfig | None = None,
    decode: int = 0,
    promote: bool = False,
) -> torch.Tensor:
    """Prototype launcher (see the module docstring)."""
    from mxrun.kernels.small_m_gemm import _scale_mode

    fn = "small_m_codes_gemm"
    n, k = weight.shape
    m = a.shape[0]
    mx = weight_scale_e8m0 is not None and not decode
    if decode:
        a_scale_e8m0 = weight_scale_e8m0
        out_dtype = a.dtype
    elif mx != (a_scale_e8m0 is not None):
        raise GemmInputError(f"{fn}: MX scales go on both operands or neither")
    a_scale_mode = _scale_mode(a_scale, m, "activation", fn)
    b_scale_mode = _scale_mode(weight_scale, n, "weight", fn)
    c = torch.empty((m, n), dtype=out_dtype, device=a.device)
    config = config or (MX_CODES_CONFIG if mx else FP8_CODES_CONFIG)
    splits = split_k_for(n, k, config)
    k_per_split = triton.cdiv(triton.cdiv(k, splits), config.block_k) * config.block_k
    splits = triton.cdiv(k, k_per_split)
    column_blocks = triton.cdiv(n, config.block_n)
    partials = torch.empty((splits, m, n), dtype=torch.float32, device=a.device) if splits > 1 else c
    counters = zeroed_int32(a.device, "split-k arrivals", column_blocks) if splits > 1 else c
    a_s = a_scale_e8m0.view(torch.uint8) if mx else a
    b_s = weight_scale_e8m0.view(torch.uint8) if mx or decode else weight
    _split_k_codes_kernel[(column_blocks, splits)](
        a, weight, a_s, b_s, partials, counters,
        a_scale.reshape(-1) if a_scale is not None else c,
        weight_scale.reshape(-1) if weight_scale is not None else c,
        bias if bias is not None else c, c,
        m, n, k, k_per_split, a.stride(0), weight.stride(0), a_s.stride(0), b_s.stride(0),
        MX=mx, DECODE=decode, PROMOTE=promote, A_SCALE=a_scale_mode, B_SCALE=b_scale_mode, HAS_BIAS=bias is not None, SPLIT_K=splits,
        EXACT=triton_interpreting(), BLOCK_M=max(16, block_m_for(m)), BLOCK_N=config.block_n,
        BLOCK_K=config.block_k, num_warps=config.num_warps, num_stages=config.num_stages,
    )  # fmt: skip
    return c
