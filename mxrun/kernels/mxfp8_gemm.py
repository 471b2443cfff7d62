"""MXFP8 GEMMs on Hopper (sm_90, which has no MX tensor-core instructions): references, Triton kernels, launchers.

The weight ``W`` ``[N, K]`` is MXFP8 (:mod:`mxrun.kernels.mxfp8_quantize`): E4M3 codes plus one E8M0 scale
(uint8, ``[N, K/32]``) per 32 consecutive elements along K. ``y = x @ W^T (+ bias)``, ``y`` in x's dtype.

Numerics. Every MXFP8 element times its power-of-two scale is exact in fp32, in bf16, and (within fp16's
range, i.e. ``2^-14 <= |v| <= 65504`` for normal values) in fp16: E4M3 has 3 mantissa bits, the scale only
moves the exponent. So "dequantize, then multiply in bf16 with fp32 accumulation" computes the same sums as
"FP8 MMA per 32-wide block, scaled": both add exact products in fp32, only the summation order differs. That
gives three paths with identical numerics:

* **decode + cuBLAS** (:func:`mxfp8_decode_matmul`): the weight is decoded to the activation's dtype by a
  bandwidth-bound Triton kernel (and the activations, for W8A8, MX-rounded the same way) and cuBLAS multiplies:
  one decode per call instead of one per row-tile program.
* **dequant-MMA** (:func:`mxfp8_dequant_gemm_triton`, W8A16): weights are decoded in registers (E4M3 ->
  fp32 -> times ``2^(code-127)`` -> bf16/fp16) and fed to a bf16/fp16 MMA. Activations are either left as
  they are (weight-only scheme), or quantized to MXFP8 and decoded again in registers (``A_MODE = 1``, the W8A8
  scheme's numerics in one launch, what small M wants: the weight bytes dominate), or read as pre-quantized
  MXFP8 (``A_MODE = 2``).
* **FP8-MMA** (:func:`mxfp8_fp8_gemm_triton`, W8A8): both operands stay E4M3 and run on the FP8 tensor cores,
  one ``tl.dot`` per 32-wide K block whose fp32 result is scaled by ``2^(ea_m + ew_n)`` before it is added to
  the accumulator (the scales change every 32 elements of K, so they cannot be pulled out of the sum).

A fourth, **aligned** (:func:`mxfp8_aligned_matmul`, W8A8 at large M), trades exactness for the FP8 rate: both
operands re-expressed at one power-of-two scale per 128 K (:mod:`mxrun.kernels.mx_regroup` bounds the change),
then the block-scaled FP8 GEMM.

:func:`mxfp8_linear` picks by M: up to 32 rows the split-K kernel of :mod:`mxrun.kernels.small_m_gemm`, up to
256 the mid-M kernel of :mod:`mxrun.kernels.mid_m_gemm` (W8A8 on activations MX-rounded first; where TMA can read
the operands, else the split-K kernel up to 64), above :func:`large_m_kernel_for` (see :data:`LARGE_M_KERNELS`).
Kernels share the launch rules of :mod:`mxrun.kernels.scaled_gemm` (M buckets, no host sync, ragged tails).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from mxrun.kernels.backend import Backend, resolve_backend, tl, triton, triton_interpreting
from mxrun.kernels.box_major import BoxMajorWeight, box_major_offsets
from mxrun.kernels.e4m3 import (
    e4m3_to_bf16_times,
    e4m3_to_f16_times,
    e8m0_fold_multiplier,
    widen_to_fp32,
)
from mxrun.kernels.mx_regroup import (
    quantize_and_regroup_triton,
    regroup_mxfp8_reference,
    regroup_mxfp8_triton,
)
from mxrun.kernels.mxfp8_quantize import (
    MX_BLOCK_SIZE,
    Mx128Quantized,
    MxScaleRule,
    dequantize_mxfp8,
    mx_round_rows,
    mx_round_triton,
    quantize_mx_group128_reference,
    quantize_mx_group128_triton,
    quantize_mxfp8,
    quantize_mxfp8_reference,
    resolve_cast,
)
from mxrun.kernels.scaled_gemm import (
    GemmConfig,
    GemmInputError,
    fp8_block_gemm,
    fp8_block_gemm_reference,
    m_bucket,
    pick_config,
    small_m_block,
    store_tile,
    tile_ids,
)

MX_W8A8_MIN_M = 128
"""For ``large_m_kernel="dequant"``: above this M the W8A8 Linear quantizes activations once; at or below it, the
dequant-MMA kernel quantizes them in registers."""
LARGE_M_KERNELS = ("aligned", "cublas", "dequant", "fp8")
"""Kernels above the split-K range (M > 64), chosen by :func:`large_m_kernel_for` (``large_m_kernel`` of
:func:`mxfp8_linear` forces one, for the benchmark):

* ``"aligned"`` (W8A8 from :data:`ALIGNED_MIN_M` rows): FP8 MMAs at 128-K steps on MXFP8 values re-expressed at
  one power-of-two scale per 128x128 weight tile and 1x128 activation group (:mod:`mxrun.kernels.mx_regroup`:
  the weight is regrouped per call; elements below E4M3's normal range at the common scale round, by at most
  2^-17.8 of the tile's largest magnitude);
* ``"cublas"``: the MXFP8 weight decoded to the activation's dtype by a bandwidth-bound Triton kernel (exact: an
  E4M3 value times a power of two is a bf16 value), the activations MX-quantize-dequantized for W8A8 (also
  exact), cuBLAS bf16 (the W8A16 path, and W8A8 below :data:`ALIGNED_MIN_M`);
* ``"dequant"``: both operands decoded in the registers of a Triton bf16 MMA; ``"fp8"``: FP8 MMAs per 32-wide
  K block with the scales applied after each. Measured on H200 (benchmarks/bench_linear.py) at 0.28-0.38x of
  bf16 cuBLAS at M >= 1024 (every row-tile program decodes the weight tile again; the FP8 MMA chain breaks
  every 32 K); kept selectable. On sm_100 the native MX MMA replaces all of them."""
ALIGNED_MIN_M = 65
"""From this many rows (every M above the split-K range) the W8A8 Linear takes ``"aligned"``. Measured on an
H100 (``benchmarks/bench_linear.py --columns mxfp8:aligned mxfp8:cublas``, results in
``benchmarks/results/mx-aligned-h100.md`` and ``mx-aligned-h100-m128.log``): not slower than ``"cublas"`` at any
shape and M tried, 1.0-1.35x at M = 128, 1.02-1.34x at M = 256-16384; its per-call weight pass moves 2 bytes
per weight against the decode's 3, and its FP8 GEMM runs at up to twice the bf16 rate."""
SHARED_LAUNCH = True
"""The aligned path quantizes the activations and regroups a weight that goes in one piece in one launch
(:func:`~mxrun.kernels.mx_regroup.quantize_and_regroup_triton`) instead of two; a setting for
``benchmarks/sweep_linear_setting.py``."""
FEW_ROWS_TILES_AS_BLOCKS = True
"""A weight stored tile-aligned (one E8M0 scale per 128x128 tile) meets the split-K and mid-M kernels as an FP8
weight with 128x128 power-of-two block scales (its fp32 tile scales): the E4M3 codes widen as FP8 weights do and
each K step's product is multiplied by its tile's power of two, instead of every element being decoded with its
own scale; the same exact products. False decodes it as any MXFP8 weight (a setting for
``benchmarks/sweep_linear_setting.py``)."""
TILES_W8A8_ALIGNED_AT_EVERY_M = True
"""W8A8 on a weight stored tile-aligned takes the aligned path at every M, as above 64 rows: activations
quantized over 1x128 groups with the MX scale rule, E4M3 codes meeting the weight's in the block-scaled product
(the split-K kernel up to :data:`~mxrun.kernels.scaled_gemm.BLOCK_SPLIT_K_MAX_M` rows); False rounds them to
their MXFP8 values below 65 rows and multiplies those in bf16 (a setting for
``benchmarks/sweep_linear_setting.py``)."""
MAX_DECODED_CHUNK_BYTES = 256 << 20
"""The ``"cublas"`` path decodes the weight in slices of output rows of at most this many bytes."""


# ----------------------------------------------------------------------------------------------------------
# torch reference
# ----------------------------------------------------------------------------------------------------------


def mxfp8_linear_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale_e8m0: torch.Tensor,
    bias: torch.Tensor | None,
    activation_rule: MxScaleRule | str | None,
) -> torch.Tensor:
    """Decode the weight in fp32; with ``activation_rule`` (W8A8) quantize-dequantize ``x`` to MXFP8 with that
    scale rule, else keep it (W8A16); fp32 matmul, bias, cast to x's dtype."""
    w = dequantize_mxfp8(weight, weight_scale_e8m0)
    if activation_rule is None:
        a = x.float()
    else:
        quantized = quantize_mxfp8_reference(x, activation_rule)
        a = dequantize_mxfp8(quantized.data, quantized.scale_e8m0)
    acc = a @ w.T
    if bias is not None:
        acc = acc + bias.float()
    return acc.to(x.dtype)


def mxfp8_aligned_linear_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale_e8m0: torch.Tensor,
    bias: torch.Tensor | None,
    activation_rule: MxScaleRule | str,
) -> torch.Tensor:
    """What the ``"aligned"`` W8A8 path computes (see :mod:`mxrun.kernels.mx_regroup`): activations with the
    MX rule over 1x128 groups, the weight regrouped to 128x128 power-of-two tiles, the block-scaled product."""
    a = quantize_mx_group128_reference(x, activation_rule)
    w = regroup_mxfp8_reference(weight, weight_scale_e8m0)
    return fp8_block_gemm_reference(a.data, a.scale, w.data, w.scale, bias, x.dtype)


def mxfp8_gemm_reference(
    a_data: torch.Tensor,
    a_scale_e8m0: torch.Tensor,
    b_data: torch.Tensor,
    b_scale_e8m0: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """Both operands MXFP8: decode each in fp32 (exact), multiply, add bias, cast."""
    acc = dequantize_mxfp8(a_data, a_scale_e8m0) @ dequantize_mxfp8(b_data, b_scale_e8m0).T
    if bias is not None:
        acc = acc + bias.float()
    return acc.to(out_dtype)


# ----------------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def e8m0_to_fp32(codes):
    """2^(code - 127) as fp32, from bits (code 0 is the subnormal 2^-127, 0x00400000; 255 is NaN)."""
    codes = codes.to(tl.int32)
    bits = tl.where(codes == 0, 0x00400000, codes << 23)
    return tl.where(codes == 255, float("nan"), bits.to(tl.float32, bitcast=True))


@triton.jit
def mx_decode_weight(w, codes, FOLD: tl.constexpr, K_LAST: tl.constexpr):
    """An E4M3 weight tile times its E8M0 powers of two, exactly: ``w`` ``[BLOCK_K, BLOCK_N]`` with ``codes``
    ``[BLOCK_K / 32, BLOCK_N]``, or with ``K_LAST`` ``[BLOCK_N, BLOCK_K]`` and ``[BLOCK_N, BLOCK_K / 32]``. FOLD
    (sm_90+, codes and elements allowed by :func:`~mxrun.kernels.e4m3.mx_scales_foldable`): bf16 from the E4M3
    widening with each power of two on its multiply; FOLD == 2 (codes allowed by
    :func:`~mxrun.kernels.e4m3.mx_scales_foldable_f16`): fp16, one conversion and one multiply per pair; else
    fp32, then whatever the MMA takes (the same values)."""
    if K_LAST:
        BLOCK_N: tl.constexpr = w.shape[0]
        BLOCK_K: tl.constexpr = w.shape[1]
        if FOLD == 2:
            codes_k = tl.broadcast_to(codes[:, :, None], [BLOCK_N, BLOCK_K // 32, 32])
            out = e4m3_to_f16_times(w, tl.reshape(codes_k, [BLOCK_N, BLOCK_K]))
        elif FOLD:
            multiplier = tl.broadcast_to(
                e8m0_fold_multiplier(codes)[:, :, None], [BLOCK_N, BLOCK_K // 32, 32]
            )
            out = e4m3_to_bf16_times(w, tl.reshape(multiplier, [BLOCK_N, BLOCK_K]))
        else:
            grouped = tl.reshape(w.to(tl.float32), [BLOCK_N, BLOCK_K // 32, 32])
            out = tl.reshape(grouped * e8m0_to_fp32(codes)[:, :, None], [BLOCK_N, BLOCK_K])
    else:
        BLOCK_K: tl.constexpr = w.shape[0]
        BLOCK_N: tl.constexpr = w.shape[1]
        if FOLD == 2:
            codes_k = tl.broadcast_to(codes[:, None, :], [BLOCK_K // 32, 32, BLOCK_N])
            out = e4m3_to_f16_times(w, tl.reshape(codes_k, [BLOCK_K, BLOCK_N]))
        elif FOLD:
            multiplier = tl.broadcast_to(
                e8m0_fold_multiplier(codes)[:, None, :], [BLOCK_K // 32, 32, BLOCK_N]
            )
            out = e4m3_to_bf16_times(w, tl.reshape(multiplier, [BLOCK_K, BLOCK_N]))
        else:
            grouped = tl.reshape(w.to(tl.float32), [BLOCK_K // 32, 32, BLOCK_N])
            out = tl.reshape(grouped * e8m0_to_fp32(codes)[:, None, :], [BLOCK_K, BLOCK_N])
    return out


@triton.jit(do_not_specialize=["M"])
def _mxfp8_dequant_gemm_kernel(
    a_ptr,  # [M, K]: bf16/fp16 (A_MODE 0, 1) or float8e4nv (A_MODE 2); (m, k) at m*stride_am + k*stride_ak
    as_ptr,  # A_MODE 2: uint8 E8M0 [M, K/32], (m, g) at m*stride_asm + g; else unused
    b_ptr,  # [N, K] float8e4nv weight, (n, k) at n*stride_bn + k*stride_bk; K contiguous
    bs_ptr,  # uint8 E8M0 [N, K/32], (n, g) at n*stride_bsn + g
    bias_ptr,
    c_ptr,  # [M, N] bf16/fp16
    M,
    N,
    K,  # multiple of 32
    stride_am,
    stride_ak,
    stride_asm,
    stride_bn,
    stride_bk,
    stride_bsn,
    stride_cm,
    stride_cn,
    A_MODE: tl.constexpr,  # 0: A as is (W8A16); 1: A quantized-dequantized to MXFP8 here; 2: A is MXFP8
    A_ROUND_UP: tl.constexpr,
    SOFT_CAST: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    DOT_FP32: tl.constexpr,  # interpreter only: its bf16/fp16 dot is wrong, so run the exact values in fp32
    EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,  # multiple of 32
    GROUP_M: tl.constexpr,
    MAX_IMPRECISE_ACC: tl.constexpr,  # FP8 dots only (see GemmConfig.max_imprecise_acc)
):
    """Decode MXFP8 weights (and, per A_MODE, activations) in registers and run a bf16/fp16 MMA."""
    G: tl.constexpr = BLOCK_K // 32
    pid_m, pid_n = tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    offs_g = tl.arange(0, G)
    offs_am = offs_m % M
    offs_bn = offs_n % N
    a_ptrs = a_ptr + offs_am.to(tl.int64)[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + offs_bn.to(tl.int64)[None, :] * stride_bn + offs_k[:, None] * stride_bk
    bs_ptrs = bs_ptr + offs_bn.to(tl.int64)[None, :] * stride_bsn + offs_g[:, None]  # [G, BLOCK_N]
    as_ptrs = as_ptr + offs_am.to(tl.int64)[:, None] * stride_asm + offs_g[None, :]  # [BLOCK_M, G]
    n_groups = K // 32
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for kb in range(0, tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
            b_codes = tl.load(bs_ptrs)
        else:
            k_ok = kb * BLOCK_K + offs_k < K
            g_ok = kb * G + offs_g < n_groups
            a = tl.load(a_ptrs, mask=k_ok[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=k_ok[:, None], other=0.0)
            b_codes = tl.load(bs_ptrs, mask=g_ok[:, None], other=0)
        w = tl.reshape(b.to(tl.float32), [G, 32, BLOCK_N]) * e8m0_to_fp32(b_codes)[:, None, :]
        w = tl.reshape(w, [BLOCK_K, BLOCK_N])
        if A_MODE == 1:
            a_values = mx_round_rows(a, A_ROUND_UP, SOFT_CAST, BLOCK_M, BLOCK_K)
        elif A_MODE == 2:
            a_codes = tl.load(as_ptrs) if EVEN_K else tl.load(as_ptrs, mask=g_ok[None, :], other=0)
            a_values = tl.reshape(
                tl.reshape(a.to(tl.float32), [BLOCK_M, G, 32]) * e8m0_to_fp32(a_codes)[:, :, None],
                [BLOCK_M, BLOCK_K],
            )
        else:
            a_values = widen_to_fp32(a)
        if DOT_FP32:
            acc = tl.dot(a_values, w, acc, input_precision="ieee")
        else:
            mma_dtype = c_ptr.dtype.element_ty
            acc = tl.dot(a_values.to(mma_dtype), w.to(mma_dtype), acc)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
        bs_ptrs += G
        as_ptrs += G
    store_tile(c_ptr, acc, bias_ptr, offs_m, offs_n, M, N, stride_cm, stride_cn, HAS_BIAS)


@triton.jit(do_not_specialize=["M"])
def _mxfp8_fp8_gemm_kernel(
    a_ptr,  # [M, K] float8e4nv, (m, k) at m*stride_am + k*stride_ak; K contiguous
    as_ptr,  # uint8 E8M0 [M, K/32], (m, g) at m*stride_asm + g
    b_ptr,  # [N, K] float8e4nv, (n, k) at n*stride_bn + k*stride_bk; K contiguous
    bs_ptr,  # uint8 E8M0 [N, K/32], (n, g) at n*stride_bsn + g
    bias_ptr,
    c_ptr,  # [M, N] bf16/fp16
    M,
    N,
    K,  # multiple of 32
    stride_am,
    stride_ak,
    stride_asm,
    stride_bn,
    stride_bk,
    stride_bsn,
    stride_cm,
    stride_cn,
    HAS_BIAS: tl.constexpr,
    EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,  # multiple of 32: K steps, each unrolled into BLOCK_K/32 scaled FP8 dots
    GROUP_M: tl.constexpr,
    MAX_IMPRECISE_ACC: tl.constexpr,  # FP8 dots only (see GemmConfig.max_imprecise_acc)
):
    """FP8 MMA per 32-wide K block, each block's fp32 product scaled by 2^(ea_m + ew_n) and accumulated."""
    pid_m, pid_n = tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, 32)
    offs_am = offs_m % M
    offs_bn = offs_n % N
    a_ptrs = a_ptr + offs_am.to(tl.int64)[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + offs_bn.to(tl.int64)[None, :] * stride_bn + offs_k[:, None] * stride_bk
    as_ptrs = as_ptr + offs_am.to(tl.int64) * stride_asm
    bs_ptrs = bs_ptr + offs_bn.to(tl.int64) * stride_bsn
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for kb in range(0, tl.cdiv(K, BLOCK_K)):
        for j in tl.static_range(BLOCK_K // 32):
            k0 = kb * BLOCK_K + j * 32
            if EVEN_K:
                a = tl.load(a_ptrs + k0 * stride_ak)
                b = tl.load(b_ptrs + k0 * stride_bk)
                a_codes = tl.load(as_ptrs + k0 // 32)
                b_codes = tl.load(bs_ptrs + k0 // 32)
            else:
                a = tl.load(a_ptrs + k0 * stride_ak, mask=(k0 + offs_k < K)[None, :], other=0.0)
                b = tl.load(b_ptrs + k0 * stride_bk, mask=(k0 + offs_k < K)[:, None], other=0.0)
                a_codes = tl.load(as_ptrs + k0 // 32, mask=offs_am * 0 + k0 < K, other=127)
                b_codes = tl.load(bs_ptrs + k0 // 32, mask=offs_bn * 0 + k0 < K, other=127)
            scale = e8m0_to_fp32(a_codes)[:, None] * e8m0_to_fp32(b_codes)[None, :]
            acc += tl.dot(a, b) * scale
    store_tile(c_ptr, acc, bias_ptr, offs_m, offs_n, M, N, stride_cm, stride_cn, HAS_BIAS)


@triton.jit
def _mxfp8_decode_kernel(
    q_ptr,  # [R, K] float8e4nv codes, K contiguous, row r at r*stride_qr; Q_BOXES: box-major (box_major.py)
    s_ptr,  # [R, K/32] uint8 E8M0, row r at r*stride_sr
    out_ptr,  # [R, K] bf16/fp16, contiguous
    R,
    K,
    stride_qr,
    stride_sr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,  # multiple of 32
    Q_BOXES: tl.constexpr = False,  # the codes held box-major in [BOX_N, BOX_K] boxes
    BOX_N: tl.constexpr = 64,
    BOX_K: tl.constexpr = 128,
):
    """out = code * 2^(scale - 127), rounded once to the output dtype (exact when representable)."""
    G: tl.constexpr = BLOCK_K // 32
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    groups = tl.program_id(1) * G + tl.arange(0, G)
    row_ok = rows < R
    mask = row_ok[:, None] & (cols < K)[None, :]
    if Q_BOXES:
        code_offsets = box_major_offsets(rows, cols, tl.cdiv(K, BOX_K), BOX_N, BOX_K)
    else:
        code_offsets = rows.to(tl.int64)[:, None] * stride_qr + cols[None, :]
    codes = tl.load(q_ptr + code_offsets, mask=mask, other=0.0)
    scales = tl.load(
        s_ptr + rows.to(tl.int64)[:, None] * stride_sr + groups[None, :],
        mask=row_ok[:, None] & (groups < K // 32)[None, :],
        other=127,
    )
    values = tl.reshape(codes.to(tl.float32), [BLOCK_R, G, 32]) * e8m0_to_fp32(scales)[:, :, None]
    values = tl.reshape(values, [BLOCK_R, BLOCK_K])
    tl.store(
        out_ptr + rows.to(tl.int64)[:, None] * K + cols[None, :],
        values.to(out_ptr.dtype.element_ty),
        mask=mask,
    )


def mxfp8_decode_triton(
    data: torch.Tensor | BoxMajorWeight, scale_e8m0: torch.Tensor, out_dtype: torch.dtype
) -> torch.Tensor:
    """Decode a 2-D MXFP8 tensor (``[R, K]`` E4M3 codes, K contiguous or held box-major, ``[R, K/32]`` E8M0) to
    ``out_dtype``; the same values as :func:`~mxrun.kernels.mxfp8_quantize.dequantize_mxfp8` cast to
    ``out_dtype``."""
    fn = "mxfp8_decode_triton"
    boxes = isinstance(data, BoxMajorWeight)
    if boxes:
        data.check(fn)
    elif data.dim() != 2 or (data.numel() and data.stride(1) != 1):
        raise GemmInputError(f"{fn}: data must be a K-contiguous float8_e4m3fn [R, K] tensor")
    if data.dtype != torch.float8_e4m3fn:
        raise GemmInputError(f"{fn}: data must be a K-contiguous float8_e4m3fn [R, K] tensor")
    rows, k = data.shape
    if k % MX_BLOCK_SIZE or scale_e8m0.shape != (rows, k // MX_BLOCK_SIZE) or scale_e8m0.stride(-1) != 1:
        raise GemmInputError(
            f"{fn}: data {tuple(data.shape)} needs K % 32 == 0 and contiguous E8M0 scales [R, K/32], got "
            f"{tuple(scale_e8m0.shape)}"
        )
    if out_dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise GemmInputError(f"{fn}: out_dtype must be bfloat16, float16 or float32, got {out_dtype}")
    out = torch.empty((rows, k), dtype=out_dtype, device=data.device)
    if rows == 0 or k == 0:
        return out
    codes = scale_e8m0.view(torch.uint8)
    block_r, block_k = 16, 256
    _mxfp8_decode_kernel[(triton.cdiv(rows, block_r), triton.cdiv(k, block_k))](
        data.boxes if boxes else data,
        codes,
        out,
        rows,
        k,
        data.box_k if boxes else data.stride(0),
        codes.stride(0),
        BLOCK_R=block_r,
        BLOCK_K=block_k,
        Q_BOXES=boxes,
        BOX_N=data.box_n if boxes else 64,
        BOX_K=data.box_k if boxes else 128,
        num_warps=4,
    )
    return out


def _k_contiguous_weight(
    x: torch.Tensor, weight: torch.Tensor | BoxMajorWeight, scale: torch.Tensor, fn: str
) -> torch.Tensor | BoxMajorWeight:
    """Checks shared by the per-call weight passes; the weight, made K-contiguous if it is not (a box-major one
    as it is)."""
    _, k = _check_mx_weight(weight, scale, fn)
    if x.dim() != 2 or x.shape[1] != k or x.dtype not in (torch.bfloat16, torch.float16):
        raise GemmInputError(f"{fn}: x must be bfloat16/float16 [M, K={k}], got {x.dtype} {tuple(x.shape)}")
    if isinstance(weight, BoxMajorWeight):
        return weight
    return weight if weight.stride(1) == 1 else weight.contiguous()


def _over_weight_slices(
    x: torch.Tensor,
    weight: torch.Tensor | BoxMajorWeight,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    bytes_per_weight: int,
    piece: Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None], torch.Tensor],
) -> torch.Tensor:
    """``y`` from ``piece(weight rows, their scales, their bias, out)``, over slices of 128-row multiples whose
    transient copy (``bytes_per_weight`` per element) stays under :data:`MAX_DECODED_CHUNK_BYTES`. With
    slices, ``out`` is the slice's columns of the output, which a piece may fill and return (no copy: for the
    70B ``gate_up`` weight at M = 1024 the copies took 150 us of 1350); what it returns otherwise is copied
    there. A box-major weight is sliced by its rows (:meth:`~mxrun.kernels.box_major.BoxMajorWeight.rows`: the
    slices start at multiples of 128 rows, whole boxes)."""
    n, k = weight.shape
    rows = max(128, MAX_DECODED_CHUNK_BYTES // (bytes_per_weight * max(k, 1)) // 128 * 128)
    if rows >= n:
        return piece(weight, scale, bias, None)
    out = torch.empty((x.shape[0], n), dtype=x.dtype, device=x.device)
    for n0 in range(0, n, rows):
        n1 = min(n, n0 + rows)
        part = out[:, n0:n1]
        w = weight.rows(n0, n1) if isinstance(weight, BoxMajorWeight) else weight[n0:n1]
        result = piece(w, scale[n0:n1], None if bias is None else bias[n0:n1], part)
        if result.data_ptr() != part.data_ptr():
            part.copy_(result)
    return out


def mxfp8_decode_matmul(
    x: torch.Tensor,
    weight: torch.Tensor | BoxMajorWeight,
    weight_scale_e8m0: torch.Tensor,
    bias: torch.Tensor | None,
    activation_rule: MxScaleRule | str | None,
) -> torch.Tensor:
    """The ``"cublas"`` large-M path (see :data:`LARGE_M_KERNELS`): decode, then ``torch.nn.functional.linear``
    (cuBLAS, fp32 accumulation), the weight in slices of :data:`MAX_DECODED_CHUNK_BYTES`."""
    weight = _k_contiguous_weight(x, weight, weight_scale_e8m0, "mxfp8_decode_matmul")
    a = x if activation_rule is None else mx_round_triton(x, activation_rule)

    def piece(
        w: torch.Tensor, s: torch.Tensor, b: torch.Tensor | None, _: torch.Tensor | None
    ) -> torch.Tensor:
        return torch.nn.functional.linear(a, mxfp8_decode_triton(w, s, x.dtype), b)

    return _over_weight_slices(x, weight, weight_scale_e8m0, bias, 2, piece)


def _aligned_gemm(
    a: Mx128Quantized,
    weight: torch.Tensor,
    tile_scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """The aligned path's block-scaled product of the whole weight, as FP8 block W8A8 takes it: the split-K
    kernel up to :data:`~mxrun.kernels.scaled_gemm.BLOCK_SPLIT_K_MAX_M` rows, the mid-M kernel where
    :func:`~mxrun.kernels.mid_m_gemm.w8a8_takes_mid_m` says the tile kernel would leave SMs idle, else
    :func:`~mxrun.kernels.scaled_gemm.fp8_block_gemm`."""
    from mxrun.kernels.mid_m_gemm import BLOCK_W8A8_MID_M_MAX, w8a8_on_mid_m
    from mxrun.kernels.scaled_gemm import BLOCK_SPLIT_K_MAX_M
    from mxrun.kernels.small_m_gemm import small_m_gemm_triton  # imports this module

    if a.data.shape[0] <= BLOCK_SPLIT_K_MAX_M:
        return small_m_gemm_triton(
            a.data, weight, a_scale=a.scale, weight_block_scale=tile_scale, bias=bias, out_dtype=out_dtype
        )
    mid = w8a8_on_mid_m(
        a.data, a.scale, weight, bias, out_dtype, BLOCK_W8A8_MID_M_MAX, weight_block_scale=tile_scale
    )
    return mid if mid is not None else fp8_block_gemm(a.data, a.scale, weight, tile_scale, bias, out_dtype)


def mxfp8_aligned_matmul(
    x: torch.Tensor,
    weight: torch.Tensor | BoxMajorWeight,
    weight_scale_e8m0: torch.Tensor,
    bias: torch.Tensor | None,
    activation_rule: MxScaleRule | str,
    weight_tile_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """The ``"aligned"`` W8A8 path (:data:`LARGE_M_KERNELS`): activations quantized with the MX rule over 1x128
    groups, the weight regrouped per call to 128x128 power-of-two tiles (:mod:`mxrun.kernels.mx_regroup`; in
    the same launch when the weight goes in one piece, else in slices of at most
    :data:`MAX_DECODED_CHUNK_BYTES`), then the block-scaled FP8 GEMM (TMA on Hopper; the mid-M kernel where FP8
    block W8A8 takes it). A weight stored tile-aligned (:func:`~mxrun.kernels.mx_regroup.align_mxfp8`) comes with
    its fp32 ``weight_tile_scale`` and is multiplied as it is. A box-major weight is regrouped from its boxes."""
    from mxrun.kernels.fp8_wgmma_gemm import block_scales_k_major

    weight = _k_contiguous_weight(x, weight, weight_scale_e8m0, "mxfp8_aligned_matmul")
    k_major = block_scales_k_major(x)  # the Gluon GEMM's loader reads them by TMA
    if weight_tile_scale is not None:
        a = quantize_mx_group128_triton(x, activation_rule, scale_k_major=k_major)
        return _aligned_gemm(a, weight, weight_tile_scale, bias, x.dtype)
    n, k = weight.shape
    if SHARED_LAUNCH and n * k <= MAX_DECODED_CHUNK_BYTES:  # one piece: both passes in one launch
        a, regrouped = quantize_and_regroup_triton(
            x, activation_rule, weight, weight_scale_e8m0.contiguous(), scale_k_major=k_major
        )
        return _aligned_gemm(a, regrouped.data, regrouped.scale, bias, x.dtype)
    a = quantize_mx_group128_triton(x, activation_rule, scale_k_major=k_major)

    def piece(
        w: torch.Tensor, s: torch.Tensor, b: torch.Tensor | None, out: torch.Tensor | None
    ) -> torch.Tensor:
        regrouped = regroup_mxfp8_triton(w, s.contiguous())
        return fp8_block_gemm(a.data, a.scale, regrouped.data, regrouped.scale, b, x.dtype, out)

    return _over_weight_slices(x, weight, weight_scale_e8m0, bias, 1, piece)


# ----------------------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------------------


def _check_mx_weight(weight: torch.Tensor | BoxMajorWeight, scale: torch.Tensor, fn: str) -> tuple[int, int]:
    if isinstance(weight, BoxMajorWeight):
        weight.check(fn)
    if weight.dtype != torch.float8_e4m3fn or len(weight.shape) != 2:
        raise GemmInputError(
            f"{fn}: the weight must be 2-D [N, K] float8_e4m3fn, got {weight.dtype} {tuple(weight.shape)}"
        )
    n, k = weight.shape
    if k % MX_BLOCK_SIZE:
        raise GemmInputError(f"{fn}: MXFP8 needs K % 32 == 0, got K={k}")
    if scale.shape != (n, k // MX_BLOCK_SIZE) or scale.element_size() != 1:
        raise GemmInputError(
            f"{fn}: weight scales must be uint8 E8M0 [{n}, {k // MX_BLOCK_SIZE}], got "
            f"{scale.dtype} {tuple(scale.shape)}"
        )
    return n, k


def _dequant_candidates(m: int, n: int) -> list[GemmConfig]:
    if m <= 64:
        bm = small_m_block(m)
        return [
            GemmConfig(bm, 32 if n <= 8192 else 64, 256, 1, 4, 4),
            GemmConfig(bm, 64, 128, 1, 4, 4),
            GemmConfig(bm, 32, 128, 1, 4, 6),
        ]
    if m <= 256:
        return [GemmConfig(64, 128, 64, 8, 4, 4), GemmConfig(128, 128, 64, 8, 8, 3)]
    return [
        GemmConfig(128, 256, 64, 8, 8, 3),
        GemmConfig(128, 128, 64, 8, 8, 4),
        GemmConfig(128, 128, 128, 8, 8, 3),
    ]


def _fp8_candidates(m: int) -> list[GemmConfig]:
    if m <= 256:
        return [GemmConfig(64, 128, 128, 8, 4, 4), GemmConfig(64, 64, 128, 8, 4, 4)]
    return [
        GemmConfig(128, 128, 128, 8, 8, 3),
        GemmConfig(128, 256, 64, 8, 8, 3),
        GemmConfig(128, 128, 64, 8, 8, 4),
    ]


def mxfp8_dequant_gemm_triton(
    a: torch.Tensor,
    weight: torch.Tensor,
    weight_scale_e8m0: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    a_scale_e8m0: torch.Tensor | None = None,
    activation_rule: MxScaleRule | str | None = None,
    out_dtype: torch.dtype | None = None,
    config: GemmConfig | None = None,
) -> torch.Tensor:
    """Dequant-MMA launcher. ``a`` is bf16/fp16 (weight-only, or ``activation_rule`` set: quantize-dequantize
    to MXFP8 in registers) or E4M3 with ``a_scale_e8m0`` (pre-quantized MXFP8; give ``out_dtype``)."""
    fn = "mxfp8_dequant_gemm_triton"
    n, k = _check_mx_weight(weight, weight_scale_e8m0, fn)
    if a.dim() != 2 or a.shape[1] != k:
        raise GemmInputError(f"{fn}: A must be [M, K={k}], got {tuple(a.shape)}")
    if bias is not None and bias.shape != (n,):
        raise GemmInputError(f"{fn}: bias must be [N={n}], got {tuple(bias.shape)}")
    m = a.shape[0]
    if a_scale_e8m0 is not None:
        if a.dtype != torch.float8_e4m3fn or a_scale_e8m0.shape != (m, k // MX_BLOCK_SIZE):
            raise GemmInputError(f"{fn}: pre-quantized A must be float8_e4m3fn with E8M0 scales [M, K/32]")
        a_mode, scale_arg, stride_asm = 2, a_scale_e8m0.view(torch.uint8), a_scale_e8m0.stride(0)
        out_dtype = out_dtype or torch.bfloat16
    else:
        if a.dtype not in (torch.bfloat16, torch.float16):
            raise GemmInputError(f"{fn}: activations must be bfloat16 or float16, got {a.dtype}")
        a_mode = 0 if activation_rule is None else 1
        scale_arg, stride_asm = weight_scale_e8m0.view(torch.uint8), 0
        out_dtype = a.dtype
    round_up = activation_rule is None or MxScaleRule(activation_rule) is MxScaleRule.ROUND_UP
    c = torch.empty((m, n), dtype=out_dtype, device=a.device)
    if m == 0 or n == 0:
        return c
    soft_cast = resolve_cast("auto")
    w_scale = weight_scale_e8m0.view(torch.uint8)

    def launch(cfg: GemmConfig) -> None:
        _mxfp8_dequant_gemm_kernel[(triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n),)](
            a,
            scale_arg,
            weight,
            w_scale,
            bias if bias is not None else w_scale,
            c,
            m,
            n,
            k,
            a.stride(0),
            a.stride(1),
            stride_asm,
            weight.stride(0),
            weight.stride(1),
            w_scale.stride(0),
            c.stride(0),
            c.stride(1),
            A_MODE=a_mode,
            A_ROUND_UP=round_up,
            SOFT_CAST=soft_cast,
            HAS_BIAS=bias is not None,
            DOT_FP32=triton_interpreting(),
            EVEN_K=k % cfg.block_k == 0,
            **cfg.launch_kwargs(),
        )

    if config is None:
        key = ("mxfp8_dequant", a_mode, m_bucket(m), n, k, a.dtype, out_dtype)
        config = pick_config(key, _dequant_candidates(m, n), launch, a.is_cuda)
    launch(config)
    return c


def mxfp8_fp8_gemm_triton(
    a_data: torch.Tensor,
    a_scale_e8m0: torch.Tensor,
    weight: torch.Tensor,
    weight_scale_e8m0: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.bfloat16,
    *,
    config: GemmConfig | None = None,
) -> torch.Tensor:
    """FP8-MMA launcher: both operands MXFP8 (E4M3 + E8M0 ``[rows, K/32]``)."""
    fn = "mxfp8_fp8_gemm_triton"
    n, k = _check_mx_weight(weight, weight_scale_e8m0, fn)
    m = a_data.shape[0]
    if a_data.dtype != torch.float8_e4m3fn or a_data.shape != (m, k) or a_scale_e8m0.shape != (m, k // 32):
        raise GemmInputError(f"{fn}: A must be float8_e4m3fn [M, {k}] with E8M0 scales [M, {k // 32}]")
    if bias is not None and bias.shape != (n,):
        raise GemmInputError(f"{fn}: bias must be [N={n}], got {tuple(bias.shape)}")
    c = torch.empty((m, n), dtype=out_dtype, device=a_data.device)
    if m == 0 or n == 0:
        return c
    a_scale = a_scale_e8m0.view(torch.uint8)
    w_scale = weight_scale_e8m0.view(torch.uint8)

    def launch(cfg: GemmConfig) -> None:
        _mxfp8_fp8_gemm_kernel[(triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n),)](
            a_data,
            a_scale,
            weight,
            w_scale,
            bias if bias is not None else w_scale,
            c,
            m,
            n,
            k,
            a_data.stride(0),
            a_data.stride(1),
            a_scale.stride(0),
            weight.stride(0),
            weight.stride(1),
            w_scale.stride(0),
            c.stride(0),
            c.stride(1),
            HAS_BIAS=bias is not None,
            EVEN_K=k % cfg.block_k == 0,
            **cfg.launch_kwargs(),
        )

    if config is None:
        key = ("mxfp8_fp8", m_bucket(m), n, k, out_dtype)
        config = pick_config(key, _fp8_candidates(m), launch, a_data.is_cuda)
    launch(config)
    return c


# ----------------------------------------------------------------------------------------------------------
# dispatcher (what a quantized Linear calls)
# ----------------------------------------------------------------------------------------------------------


def large_m_kernel_for(m: int, activation_rule: MxScaleRule | str | None) -> str:
    """The :data:`LARGE_M_KERNELS` entry the dispatcher takes for ``m`` rows (above the split-K range)."""
    return "aligned" if activation_rule is not None and m >= ALIGNED_MIN_M else "cublas"


def mxfp8_linear(
    x: torch.Tensor,
    weight: torch.Tensor | BoxMajorWeight,
    weight_scale_e8m0: torch.Tensor,
    bias: torch.Tensor | None,
    activation_rule: MxScaleRule | str | None,
    backend: Backend | str = Backend.AUTO,
    *,
    large_m_kernel: str | None = None,
    weight_tile_scale: torch.Tensor | None = None,
    weight_scales_foldable: bool = False,
    weight_scales_foldable_f16: bool = False,
) -> torch.Tensor:
    """MXFP8 Linear: W8A8 with ``activation_rule`` (the MX scale rule for the activations), W8A16 without.
    ``weight_tile_scale``: the weight is tile-aligned (:func:`~mxrun.kernels.mx_regroup.align_mxfp8`) and
    these are its fp32 tile scales; the aligned path then skips its per-call regrouping, and the split-K and
    mid-M kernels take the weight as 128x128 block-scaled FP8 (:data:`FEW_ROWS_TILES_AS_BLOCKS`).
    ``weight_scales_foldable``: :func:`~mxrun.kernels.e4m3.mx_scales_foldable` of the weight, known by
    the caller (it reads them back once per loaded weight): the small-M kernel then folds each power of two into
    the E4M3 widening (same values, fewer instructions). ``weight_scales_foldable_f16``:
    :func:`~mxrun.kernels.e4m3.mx_scales_foldable_f16`, the same for fp16 activations.

    Triton on CUDA, the torch reference elsewhere. W8A8 at one to four rows on sm_90 takes the FP8 ``wgmma`` kernel of
    :mod:`mxrun.kernels.mx_wgmma_small_m` where it measured faster
    (:func:`~mxrun.kernels.mx_wgmma_small_m.mx_rows_preferred`). Both W8A16
    and W8A8 (activations MX-rounded once first) take
    the mid-M kernel from :data:`~mxrun.kernels.mid_m_gemm.MID_M_MIN` to
    :data:`~mxrun.kernels.mid_m_gemm.MX_MID_M_MAX` rows where TMA can read the operands
    (:mod:`mxrun.kernels.mid_m_gemm`), the split-K kernel with fewer rows (and up to 64 where the mid-M kernel
    does not run; :mod:`mxrun.kernels.small_m_gemm`); above, :func:`large_m_kernel_for`. ``large_m_kernel``
    (one of :data:`LARGE_M_KERNELS`) forces the kernel above 64 rows and keeps the mid-M kernel out. A weight
    stored tile-aligned in W8A8 takes the aligned path at every M (:data:`TILES_W8A8_ALIGNED_AT_EVERY_M`: FP8
    MMAs on its codes as stored, no per-call regrouping). ``weight`` may be held box-major
    (:class:`~mxrun.kernels.box_major.BoxMajorWeight`, in the few-row kernels' ``[64, 128]`` boxes): the split-K
    and mid-M kernels, the per-call regrouping and the decode for cuBLAS read its boxes; the forced ``"fp8"`` and
    ``"dequant"`` kernels and the reference take a row-major copy per call."""
    boxes = isinstance(weight, BoxMajorWeight)
    if boxes and weight_tile_scale is not None:
        raise GemmInputError("mxfp8_linear: a tile-aligned weight (weight_tile_scale) is held row-major")
    if resolve_backend(backend, x) is not Backend.TRITON:
        rows = weight.row_major() if boxes else weight
        return mxfp8_linear_reference(x, rows, weight_scale_e8m0, bias, activation_rule)
    from mxrun.kernels import mx_wgmma_small_m as mx_rows
    from mxrun.kernels.mid_m_gemm import MID_M_MIN, MX_MID_M_MAX, mid_m_gemm_triton, mid_m_usable
    from mxrun.kernels.small_m_gemm import SMALL_M_MAX, small_m_gemm_triton  # both import this module

    m = x.shape[0]
    # a stored tile-aligned weight in W8A8: its aligned GEMM runs FP8 MMAs with no regrouping
    stored_tiles = weight_tile_scale is not None and activation_rule is not None
    stored_tiles = stored_tiles and (m > SMALL_M_MAX or TILES_W8A8_ALIGNED_AT_EVERY_M)
    if stored_tiles and large_m_kernel is None:
        return mxfp8_aligned_matmul(x, weight, weight_scale_e8m0, bias, activation_rule, weight_tile_scale)
    if (
        activation_rule is not None
        and weight_tile_scale is None
        and large_m_kernel is None
        and mx_rows.mx_rows_preferred(x, weight)
    ):
        return mx_rows.mx_rows_linear(x, weight, weight_scale_e8m0, bias, activation_rule)
    few_rows = None
    if (
        large_m_kernel is None
        and not stored_tiles
        and MID_M_MIN <= m <= MX_MID_M_MAX
        and mid_m_usable(x, weight)
    ):
        few_rows = mid_m_gemm_triton
    elif m <= SMALL_M_MAX and (boxes or weight.stride(1) == 1) and x.stride(1) == 1:
        few_rows = small_m_gemm_triton
    if few_rows is not None:
        if weight_tile_scale is not None and FEW_ROWS_TILES_AS_BLOCKS:
            weight_scales = {"weight_block_scale": weight_tile_scale}
        else:
            weight_scales = {
                "weight_scale_e8m0": weight_scale_e8m0,
                "mx_scale_fold": weight_scales_foldable,
                "mx_scale_fold16": weight_scales_foldable_f16,
            }
        return few_rows(x, weight, activation_mx_rule=activation_rule, bias=bias, **weight_scales)
    kernel = large_m_kernel or large_m_kernel_for(x.shape[0], activation_rule)
    if kernel not in LARGE_M_KERNELS:
        raise GemmInputError(f"mxfp8_linear: large_m_kernel must be one of {LARGE_M_KERNELS}, got {kernel!r}")
    if boxes and kernel not in ("aligned", "cublas"):  # the GEMMs that read the weight as they multiply
        weight = weight.row_major()
    if kernel == "aligned" and activation_rule is None:
        raise GemmInputError("mxfp8_linear: the aligned kernel quantizes activations (W8A8 only)")
    if kernel == "aligned":
        return mxfp8_aligned_matmul(x, weight, weight_scale_e8m0, bias, activation_rule, weight_tile_scale)
    if kernel == "cublas":
        return mxfp8_decode_matmul(x, weight, weight_scale_e8m0, bias, activation_rule)
    if activation_rule is None or x.shape[0] <= MX_W8A8_MIN_M:
        return mxfp8_dequant_gemm_triton(x, weight, weight_scale_e8m0, bias, activation_rule=activation_rule)
    quantized = quantize_mxfp8(x, activation_rule, Backend.TRITON)
    if kernel == "fp8":
        return mxfp8_fp8_gemm_triton(
            quantized.data, quantized.scale_e8m0, weight, weight_scale_e8m0, bias, x.dtype
        )
    return mxfp8_dequant_gemm_triton(
        quantized.data, weight, weight_scale_e8m0, bias, a_scale_e8m0=quantized.scale_e8m0, out_dtype=x.dtype
    )


__all__ = [
    "ALIGNED_MIN_M",
    "FEW_ROWS_TILES_AS_BLOCKS",
    "LARGE_M_KERNELS",
    "MAX_DECODED_CHUNK_BYTES",
    "MX_W8A8_MIN_M",
    "TILES_W8A8_ALIGNED_AT_EVERY_M",
    "large_m_kernel_for",
    "mxfp8_aligned_linear_reference",
    "mxfp8_aligned_matmul",
    "mxfp8_decode_matmul",
    "mxfp8_decode_triton",
    "mxfp8_dequant_gemm_triton",
    "mxfp8_fp8_gemm_triton",
    "mxfp8_gemm_reference",
    "mxfp8_linear",
    "mxfp8_linear_reference",
]
