"""The MoE grouped GEMM with the operands swapped, for weights decoded in registers (weight-only and MXFP8).

Why: where the weight is E4M3 widened (or MXFP8 decoded) to bf16 in registers and the activations are bf16,
the regular kernel (:mod:`mxrun.kernels.moe_gemm`) makes the decoded weight the MMA's *right* operand. On
Hopper the wgmma instruction reads its right operand from shared memory only, so every decoded tile is
written to shared memory and fenced before the MMA can use it. Computing the transposed product instead,

    out^T [BLOCK_N, BLOCK_M] = W [BLOCK_N, BLOCK_K] @ A^T [BLOCK_K, BLOCK_M],

makes the decoded weight the *left* operand, which wgmma can take straight from registers, and the activations
(loaded, not computed) the right one. It also frees the token tile from the MMA's 64-row minimum: tokens are
the MMA's N dimension (16 and up), so an expert's rows need less padding.

Numerics are those of the regular kernel: the same exact operand values (E4M3 widened, or E4M3 x 2^e for
MXFP8), fp32 accumulation, 128x128 block scales applied to each 128-K step's partial product, per-channel
scales, SiLU-and-mul and routing weights in the epilogue; only the fp32 summation order differs.
"""

from __future__ import annotations

from mxrun.kernels.backend import tl, triton
from mxrun.kernels.e4m3 import e4m3_to_bf16
from mxrun.kernels.mxfp8_gemm import mx_decode_weight
from mxrun.kernels.scaled_gemm import tile_ids


@triton.jit
def layout_rows(sorted_pairs_ptr, pid_m, num_pairs, top_k, A_GATHER: tl.constexpr, BLOCK_M: tl.constexpr):
    """The pairs of layout block ``pid_m`` (padding rows read as pair 0), which of them are real, and the A
    row each reads (``p // top_k`` when the tokens are gathered, else ``p``): shared by both MoE kernels."""
    pairs = tl.load(sorted_pairs_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    row_ok = pairs < num_pairs
    pairs = tl.where(row_ok, pairs, 0)
    if A_GATHER:  # noqa: SIM108
        a_rows = pairs // top_k
    else:
        a_rows = pairs
    return pairs, row_ok, a_rows.to(tl.int64)


@triton.jit
def _weight_rows(
    w_ptrs,  # [BLOCK_N, BLOCK_K] pointers into the E4M3 weight
    ws_ptrs,  # W_MODE 2: [BLOCK_N, G] pointers into the E8M0 codes; else unused
    k_ok,  # [BLOCK_K] K-tail mask
    g_ok,  # [G]
    W_MODE: tl.constexpr,
    EVEN_K: tl.constexpr,
    DOT_FP32: tl.constexpr,
    MMA_DTYPE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    FAST_WIDEN: tl.constexpr,
    MX_FOLD: tl.constexpr,
):
    """The weight tile as the MMA's left operand: E4M3 widened to the MMA dtype (to bf16 with
    :func:`~mxrun.kernels.e4m3.e4m3_to_bf16`), or MXFP8 decoded with its power-of-two scales (both exact; with
    MX_FOLD on the bf16 widening's multiply); fp32 when the interpreter runs the dot."""
    if EVEN_K:  # noqa: SIM108
        w = tl.load(w_ptrs)
    else:
        w = tl.load(w_ptrs, mask=k_ok[None, :], other=0.0)
    if W_MODE == 2:
        if EVEN_K:  # noqa: SIM108
            codes = tl.load(ws_ptrs)
        else:
            codes = tl.load(ws_ptrs, mask=g_ok[None, :], other=127)
        operand = mx_decode_weight(w, codes, MX_FOLD, True)
        if not DOT_FP32:
            operand = operand.to(MMA_DTYPE)
    elif DOT_FP32:
        operand = w.to(tl.float32)
    elif MMA_DTYPE == tl.bfloat16:  # noqa: SIM300 - a constexpr parameter, not a constant
        operand = e4m3_to_bf16(w, FAST_WIDEN)
    else:
        operand = w.to(MMA_DTYPE)
    return operand


@triton.jit
def moe_weight_rows_gemm_kernel(
    a_ptr,  # A_GATHER: [T, K] bf16/fp16 (row of pair p is p // TOP_K), else [S, K]; (r, k) at r*stride_ar + k*stride_ak
    w_ptr,  # [E, N_W, K] float8e4nv; (e, n, k) at e*stride_we + n*stride_wn + k*stride_wk (K contiguous)
    w_scale_ptr,  # W_MODE 0: fp32 [E, N_W] at e*stride_wse + n*stride_wsn (stride_wsn 0: per-expert scalar);
    #               W_MODE 1: fp32 [E, cdiv(N_W, 128), cdiv(K, 128)] at e*stride_wse + i*stride_wsn + g;
    #               W_MODE 2: uint8 E8M0 [E, N_W, K/32] at e*stride_wse + n*stride_wsn + g
    routing_ptr,  # MUL_ROUTING: [S] routing weight of each pair; else unused
    c_ptr,  # [S, N] bf16/fp16 output, row = pair id; (p, n) at p*stride_cm + n*stride_cn
    sorted_pairs_ptr,  # int32 [n_blocks * BLOCK_M]: pair id at each row of the layout, >= S on padding
    block_expert_ptr,  # int32 [n_blocks]: expert of each BLOCK_M rows, -1 for unused blocks
    num_pairs,
    n_rows_layout,
    N,  # output columns (I for the gated variant, whose weight has N_W = 2I rows)
    K,
    top_k,
    stride_ar,
    stride_ak,
    stride_we,
    stride_wn,
    stride_wk,
    stride_wse,
    stride_wsn,
    stride_cm,
    stride_cn,
    A_GATHER: tl.constexpr,
    W_MODE: tl.constexpr,  # 0 per-channel / per-expert (epilogue); 1 128x128 blocks (per K step); 2 MXFP8
    GATED: tl.constexpr,
    MUL_ROUTING: tl.constexpr,
    DOT_FP32: tl.constexpr,
    EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr,  # layout rows (tokens): the MMA's N
    BLOCK_N: tl.constexpr,  # weight rows: the MMA's M
    BLOCK_K: tl.constexpr,  # 128 when W_MODE == 1; a multiple of 32 for W_MODE 2
    GROUP_M: tl.constexpr,
    FAST_WIDEN: tl.constexpr = False,  # bf16 MMA: e4m3_to_bf16's integer path (sm_90+)
    MX_FOLD: tl.constexpr = False,  # bf16 MMA with MXFP8 weights: the scales folded into that path
    ZERO_PADDING: tl.constexpr = False,  # padding rows read as zeros (else as pair 0's row)
):
    """One program: BLOCK_N weight rows x BLOCK_M layout rows (one expert), fp32 accumulation, transposed."""
    G: tl.constexpr = BLOCK_K // 32
    MMA_DTYPE: tl.constexpr = c_ptr.dtype.element_ty
    pid_m, pid_n = tile_ids(n_rows_layout, N, BLOCK_M, BLOCK_N, GROUP_M)
    expert = tl.load(block_expert_ptr + pid_m)
    if expert < 0:
        return
    expert = expert.to(tl.int64)

    pairs, row_ok, a_rows = layout_rows(sorted_pairs_ptr, pid_m, num_pairs, top_k, A_GATHER, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    gate_rows = (offs_n % N).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    offs_g = tl.arange(0, G)

    at_ptrs = a_ptr + offs_k[:, None] * stride_ak + a_rows[None, :] * stride_ar  # A^T [BLOCK_K, BLOCK_M]
    w_base = w_ptr + expert * stride_we + offs_k[None, :] * stride_wk
    wg_ptrs = w_base + gate_rows[:, None] * stride_wn
    ws_base = w_scale_ptr + expert * stride_wse
    if W_MODE == 1:
        wsg_ptrs = ws_base + (gate_rows // 128) * stride_wsn  # [BLOCK_N], + K step
    else:
        wsg_ptrs = ws_base + gate_rows[:, None] * stride_wsn + offs_g[None, :]  # [BLOCK_N, G] (W_MODE 2)
    acc_g = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    if GATED:
        up_rows = gate_rows + N
        wu_ptrs = w_base + up_rows[:, None] * stride_wn
        if W_MODE == 1:
            wsu_ptrs = ws_base + (up_rows // 128) * stride_wsn
        else:
            wsu_ptrs = ws_base + up_rows[:, None] * stride_wsn + offs_g[None, :]
        acc_u = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)

    for kb in range(0, tl.cdiv(K, BLOCK_K)):
        k_ok = kb * BLOCK_K + offs_k < K
        g_ok = kb * G + offs_g < K // 32
        if ZERO_PADDING and EVEN_K:
            at = tl.load(at_ptrs, mask=row_ok[None, :], other=0.0)
        elif ZERO_PADDING:
            at = tl.load(at_ptrs, mask=k_ok[:, None] & row_ok[None, :], other=0.0)
        elif EVEN_K:
            at = tl.load(at_ptrs)
        else:
            at = tl.load(at_ptrs, mask=k_ok[:, None], other=0.0)
        if DOT_FP32:
            at = at.to(tl.float32)
        w_g = _weight_rows(
            wg_ptrs, wsg_ptrs, k_ok, g_ok, W_MODE, EVEN_K, DOT_FP32, MMA_DTYPE, BLOCK_N, BLOCK_K, FAST_WIDEN,
            MX_FOLD,
        )  # fmt: skip
        if W_MODE == 1:
            acc_g += tl.dot(w_g, at) * tl.load(wsg_ptrs + kb)[:, None]
        else:
            acc_g = tl.dot(w_g, at, acc_g)
        if GATED:
            w_u = _weight_rows(
                wu_ptrs, wsu_ptrs, k_ok, g_ok, W_MODE, EVEN_K, DOT_FP32, MMA_DTYPE, BLOCK_N, BLOCK_K,
                FAST_WIDEN, MX_FOLD,
            )  # fmt: skip
            if W_MODE == 1:
                acc_u += tl.dot(w_u, at) * tl.load(wsu_ptrs + kb)[:, None]
            else:
                acc_u = tl.dot(w_u, at, acc_u)
            wu_ptrs += BLOCK_K * stride_wk
            if W_MODE == 2:
                wsu_ptrs += G
        at_ptrs += BLOCK_K * stride_ak
        wg_ptrs += BLOCK_K * stride_wk
        if W_MODE == 2:
            wsg_ptrs += G

    if W_MODE == 0:
        acc_g = acc_g * tl.load(ws_base + gate_rows * stride_wsn)[:, None]
        if GATED:
            acc_u = acc_u * tl.load(ws_base + up_rows * stride_wsn)[:, None]
    if GATED:  # noqa: SIM108
        acc = acc_g / (1.0 + tl.exp(-acc_g)) * acc_u  # SiLU(gate) * up, fp32
    else:
        acc = acc_g
    if MUL_ROUTING:
        acc = acc * tl.load(routing_ptr + pairs).to(tl.float32)[None, :]
    mask = (offs_n < N)[:, None] & row_ok[None, :]
    c_ptrs = c_ptr + pairs.to(tl.int64)[None, :] * stride_cm + offs_n[:, None] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask)
