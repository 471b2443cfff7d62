"""MXFP8 W8A8 at decode sizes on Hopper: E4M3 codes on both sides of FP8 ``wgmma``, one MMA per 32-wide MX
group, the group's two powers of two applied to its product (a Gluon prototype, measured against the split-K
kernel of :mod:`mxrun.kernels.small_m_gemm`).

The split-K kernel widens every weight element in registers (E4M3 to bf16 with its power of two folded in) and
is bound by the instructions that issues, not by memory. Here the weight is never touched by the SMs' ALUs: the
product is computed transposed, ``C^T = W X^T``, with a 64-row weight tile as the MMA's A operand and the few
activation rows (padded to 8 or 16 by TMA's zero fill) as its N side, both straight from shared memory. Each
32-wide K group is one ``m64nXk32`` FP8 MMA into its own registers; the four groups of a 128-wide step are
issued asynchronously, then waited for one by one (``warpgroup_mma_wait`` with 3, 2, 1, 0 still in flight) and
added into the fp32 accumulator times ``2^(w_scale[n, g]) * 2^(x_scale[m, g])`` while the later ones run: a
multiply and a fused multiply-add per accumulator element and group (4 or 8 per thread), against one or more
instructions per weight element in the widening loop. Every product is exact (E4M3 x E4M3 products are exact
in fp32 and a 32-wide group's sum of them stays within fp32's 24 bits... up to rounding of the sum; the powers
of two are exact unless their product leaves fp32's range), so the result differs from
:func:`~mxrun.kernels.mxfp8_gemm.mxfp8_gemm_reference` by the order of the fp32 sums only.

K is split across programs as in the split-K kernel (about :data:`TARGET_PROGRAMS` programs); each writes fp32
partials ``[splits, M, N]`` that :func:`~mxrun.kernels.small_m_gemm.sum_splits` adds in split order with the
bias and the cast.

Needs CUDA sm_90 and Triton's Gluon (``triton.experimental.gluon``); no interpreter path (Gluon has none).
"""

from __future__ import annotations

import functools

import torch

from mxrun.kernels.backend import HAS_TRITON, triton
from mxrun.kernels.fp8_wgmma_gemm import HAS_GLUON

if HAS_GLUON:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        mbarrier,
        tma,
        warpgroup_mma,
        warpgroup_mma_wait,
    )
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

BLOCK_N = 64
"""Weight rows per program: one warp group's ``wgmma`` M side."""
BLOCK_K = 128
"""K per pipeline step: four MX groups, four MMAs."""
STAGES = 4
"""TMA slots in flight per program."""
TARGET_PROGRAMS = 528
"""Programs per launch the split of K aims at (four per SM on a 132-SM H100/H200)."""
MAX_M = 16
"""Rows this kernel takes (its MMA N side is 8 or 16)."""

if HAS_GLUON:

    @gluon.jit
    def _e8m0_to_fp32(codes):
        """2^(code - 127) as fp32 from bits (code 0: the subnormal 2^-127; 255: NaN)."""
        codes = codes.to(gl.int32)
        bits = gl.where(codes == 0, 0x00400000, codes << 23)
        return gl.where(codes == 255, float("nan"), bits.to(gl.float32, bitcast=True))

    @gluon.jit
    def _group_product(w_tile, x_tile, zero, g: gl.constexpr):
        """Start group ``g``'s MMA (32 K) of the step's tiles into fresh registers."""
        return warpgroup_mma(
            w_tile.slice(32 * g, 32, dim=1),
            x_tile.slice(32 * g, 32, dim=1).permute((1, 0)),
            zero,
            use_acc=False,
            is_async=True,
        )

    @gluon.jit
    def _group_factor(ws_rows, xs_cols, row_ok, col_ok, group, groups_total):
        """``2^w[n, g] * 2^x[m, g]`` for the tile's rows and columns, [BLOCK_N, BLOCK_M] in the accumulator's
        layout (groups past K: 1.0, their codes are TMA's zeros)."""
        in_k = group < groups_total
        sw = _e8m0_to_fp32(gl.load(ws_rows + group, mask=row_ok & in_k, other=127))
        sx = _e8m0_to_fp32(gl.load(xs_cols + group, mask=col_ok & in_k, other=127))
        return gl.expand_dims(sw, 1) * gl.expand_dims(sx, 0)

    @gluon.jit
    def _codes(ws_rows, xs_cols, row_ok, col_ok, group, groups_total):
        """Group ``group``'s E8M0 codes for the tile's rows and columns (1.0's code past K)."""
        in_k = group < groups_total
        cw = gl.load(ws_rows + group, mask=row_ok & in_k, other=127)
        cx = gl.load(xs_cols + group, mask=col_ok & in_k, other=127)
        return cw, cx

    @gluon.jit
    def _factor(cw, cx):
        return gl.expand_dims(_e8m0_to_fp32(cw), 1) * gl.expand_dims(_e8m0_to_fp32(cx), 0)

    @gluon.jit(do_not_specialize=["M"])
    def _mx_small_m_kernel(
        w_desc,  # [N, K] E4M3 weight codes, boxes [BLOCK_N, BLOCK_K]
        x_desc,  # [M, K] E4M3 activation codes, boxes [BLOCK_M, BLOCK_K] (rows past M: zeros)
        ws_ptr,  # [N, K/32] uint8 E8M0 weight scales
        xs_ptr,  # [M, K/32] uint8 E8M0 activation scales
        part_ptr,  # [splits, M, N] fp32 partial sums
        M,
        N,
        K,
        stride_wsn,
        stride_xsm,
        steps_per_split,
        STAGES: gl.constexpr,
        MODE: gl.constexpr = 0,
    ):
        BLOCK_N: gl.constexpr = w_desc.block_type.shape[0]
        BLOCK_K: gl.constexpr = w_desc.block_type.shape[1]
        BLOCK_M: gl.constexpr = x_desc.block_type.shape[0]
        GROUPS: gl.constexpr = BLOCK_K // 32
        layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[gl.num_warps(), 1], instr_shape=[16, BLOCK_M, 32]
        )
        pid_n = gl.program_id(0)
        split = gl.program_id(1)
        off_n = pid_n * BLOCK_N
        step0 = split * steps_per_split
        n_steps = gl.minimum(steps_per_split, gl.cdiv(K, BLOCK_K) - step0)
        groups_total = K // 32

        w_s = gl.allocate_shared_memory(w_desc.dtype, [STAGES, BLOCK_N, BLOCK_K], w_desc.layout)
        x_s = gl.allocate_shared_memory(x_desc.dtype, [STAGES, BLOCK_M, BLOCK_K], x_desc.layout)
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(ready.index(i), count=1)
        step_bytes: gl.constexpr = w_desc.block_type.nbytes + x_desc.block_type.nbytes
        for i in gl.static_range(STAGES - 1):
            if i < n_steps:
                kk = (step0 + i) * BLOCK_K
                mbarrier.expect(ready.index(i), step_bytes)
                tma.async_copy_global_to_shared(w_desc, [off_n, kk], ready.index(i), w_s.index(i))
                tma.async_copy_global_to_shared(x_desc, [0, kk], ready.index(i), x_s.index(i))

        rows = off_n + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, layout))
        cols = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, layout))
        row_ok = rows < N
        col_ok = cols < M
        ws_rows = ws_ptr + rows.to(gl.int64) * stride_wsn
        xs_cols = xs_ptr + cols.to(gl.int64) * stride_xsm
        zero = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, layout)
        acc = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, layout)
        if MODE == 1:  # the first step's scale codes, loaded ahead
            g0 = step0 * GROUPS
            cw0, cx0 = _codes(ws_rows, xs_cols, row_ok, col_ok, g0, groups_total)
            cw1, cx1 = _codes(ws_rows, xs_cols, row_ok, col_ok, g0 + 1, groups_total)
            cw2, cx2 = _codes(ws_rows, xs_cols, row_ok, col_ok, g0 + 2, groups_total)
            cw3, cx3 = _codes(ws_rows, xs_cols, row_ok, col_ok, g0 + 3, groups_total)
        for s in range(n_steps):
            # The slot of step s - 1 is free: that step's MMAs were all waited for.
            ahead = s + STAGES - 1
            if ahead < n_steps:
                slot_ahead = ahead % STAGES
                kk = (step0 + ahead) * BLOCK_K
                mbarrier.expect(ready.index(slot_ahead), step_bytes)
                tma.async_copy_global_to_shared(
                    w_desc, [off_n, kk], ready.index(slot_ahead), w_s.index(slot_ahead)
                )
                tma.async_copy_global_to_shared(
                    x_desc, [0, kk], ready.index(slot_ahead), x_s.index(slot_ahead)
                )
            slot = s % STAGES
            mbarrier.wait(ready.index(slot), (s // STAGES) & 1)
            w_tile = w_s.index(slot)
            x_tile = x_s.index(slot)
            group = (step0 + s) * GROUPS
            if MODE == 3:  # timing bound only: the step's four MMAs chained, no scales
                p = warpgroup_mma(w_tile, x_tile.permute((1, 0)), acc, is_async=True)
                acc = warpgroup_mma_wait(0, deps=(p,))
            else:
                p0 = _group_product(w_tile, x_tile, zero, 0)
                p1 = _group_product(w_tile, x_tile, zero, 1)
                p2 = _group_product(w_tile, x_tile, zero, 2)
                p3 = _group_product(w_tile, x_tile, zero, 3)
                if MODE == 0:
                    f0 = _group_factor(ws_rows, xs_cols, row_ok, col_ok, group, groups_total)
                    f1 = _group_factor(ws_rows, xs_cols, row_ok, col_ok, group + 1, groups_total)
                    f2 = _group_factor(ws_rows, xs_cols, row_ok, col_ok, group + 2, groups_total)
                    f3 = _group_factor(ws_rows, xs_cols, row_ok, col_ok, group + 3, groups_total)
                elif MODE == 1:
                    f0 = _factor(cw0, cx0)
                    f1 = _factor(cw1, cx1)
                    f2 = _factor(cw2, cx2)
                    f3 = _factor(cw3, cx3)
                    cw0, cx0 = _codes(ws_rows, xs_cols, row_ok, col_ok, group + GROUPS, groups_total)
                    cw1, cx1 = _codes(ws_rows, xs_cols, row_ok, col_ok, group + GROUPS + 1, groups_total)
                    cw2, cx2 = _codes(ws_rows, xs_cols, row_ok, col_ok, group + GROUPS + 2, groups_total)
                    cw3, cx3 = _codes(ws_rows, xs_cols, row_ok, col_ok, group + GROUPS + 3, groups_total)
                if MODE == 2:  # timing bound only: products added unscaled
                    r0 = warpgroup_mma_wait(3, deps=(p0,))
                    acc = r0 + acc
                    r1 = warpgroup_mma_wait(2, deps=(p1,))
                    acc = r1 + acc
                    r2 = warpgroup_mma_wait(1, deps=(p2,))
                    acc = r2 + acc
                    r3 = warpgroup_mma_wait(0, deps=(p3,))
                    acc = r3 + acc
                else:
                    r0 = warpgroup_mma_wait(3, deps=(p0,))
                    acc = r0 * f0 + acc
                    r1 = warpgroup_mma_wait(2, deps=(p1,))
                    acc = r1 * f1 + acc
                    r2 = warpgroup_mma_wait(1, deps=(p2,))
                    acc = r2 * f2 + acc
                    r3 = warpgroup_mma_wait(0, deps=(p3,))
                    acc = r3 * f3 + acc
        for i in gl.static_range(STAGES):
            mbarrier.invalidate(ready.index(i))
        # acc[n, m] -> partials[split, m, n]
        out = part_ptr + split.to(gl.int64) * M * N
        offs = gl.expand_dims(cols.to(gl.int64) * N, 0) + gl.expand_dims(rows, 1)
        gl.store(out + offs, acc, mask=gl.expand_dims(row_ok, 1) & gl.expand_dims(col_ok, 0))

    @gluon.jit(do_not_specialize=["M"])
    def _mx_spread_kernel(
        w_desc,  # [N, K] E4M3 weight codes, boxes [BLOCK_N, 128]
        x_desc,  # [4 M, K] spread activation codes (row 4 m + j: row m's groups g with g % 4 == j), boxes [R, 128]
        ws_ptr,  # [N, K/32] uint8 E8M0 weight scales
        xs_ptr,  # [M, K/32] uint8 E8M0 activation scales
        part_ptr,  # [splits, M, N] fp32 partial sums
        M,
        N,
        K,
        stride_wsn,
        stride_xsm,
        steps_per_split,
        STAGES: gl.constexpr,
        MAX_ROWS: gl.constexpr,
    ):
        """One MMA per 128-wide step gives every group's product in its own column (the activation side is
        block-diagonal: column 4 m + j holds row m's group j of the step, zeros elsewhere), so each column is
        scaled once per step by its row's and its group's powers of two: 4 M useful accumulator elements per
        64 weight rows, instead of 4 groups x the padded MMA width."""
        BLOCK_N: gl.constexpr = w_desc.block_type.shape[0]
        BLOCK_K: gl.constexpr = w_desc.block_type.shape[1]
        R: gl.constexpr = x_desc.block_type.shape[0]
        layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[gl.num_warps(), 1], instr_shape=[16, R, 32]
        )
        pid_n = gl.program_id(0)
        split = gl.program_id(1)
        off_n = pid_n * BLOCK_N
        step0 = split * steps_per_split
        n_steps = gl.minimum(steps_per_split, gl.cdiv(K, BLOCK_K) - step0)
        groups_total = K // 32

        w_s = gl.allocate_shared_memory(w_desc.dtype, [STAGES, BLOCK_N, BLOCK_K], w_desc.layout)
        x_s = gl.allocate_shared_memory(x_desc.dtype, [STAGES, R, BLOCK_K], x_desc.layout)
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(ready.index(i), count=1)
        step_bytes: gl.constexpr = w_desc.block_type.nbytes + x_desc.block_type.nbytes
        for i in gl.static_range(STAGES - 1):
            if i < n_steps:
                kk = (step0 + i) * BLOCK_K
                mbarrier.expect(ready.index(i), step_bytes)
                tma.async_copy_global_to_shared(w_desc, [off_n, kk], ready.index(i), w_s.index(i))
                tma.async_copy_global_to_shared(x_desc, [0, kk], ready.index(i), x_s.index(i))

        rows = off_n + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, layout))
        cols = gl.arange(0, R, layout=gl.SliceLayout(0, layout))
        row_ok = rows < N
        col_m = cols // 4  # the activation row of each column
        col_g = cols % 4  # its group within the step
        col_ok = col_m < M
        ws_tile = gl.expand_dims(ws_ptr + rows.to(gl.int64) * stride_wsn, 1) + gl.expand_dims(col_g, 0)
        ws_ok = gl.expand_dims(row_ok, 1) & gl.expand_dims(col_ok, 0)
        xs_cols = xs_ptr + col_m.to(gl.int64) * stride_xsm + col_g
        zero = gl.zeros([BLOCK_N, R], gl.float32, layout)
        acc = gl.zeros([BLOCK_N, R], gl.float32, layout)
        for s in range(n_steps):
            ahead = s + STAGES - 1
            if ahead < n_steps:
                slot_ahead = ahead % STAGES
                kk = (step0 + ahead) * BLOCK_K
                mbarrier.expect(ready.index(slot_ahead), step_bytes)
                tma.async_copy_global_to_shared(
                    w_desc, [off_n, kk], ready.index(slot_ahead), w_s.index(slot_ahead)
                )
                tma.async_copy_global_to_shared(
                    x_desc, [0, kk], ready.index(slot_ahead), x_s.index(slot_ahead)
                )
            slot = s % STAGES
            mbarrier.wait(ready.index(slot), (s // STAGES) & 1)
            p = warpgroup_mma(
                w_s.index(slot), x_s.index(slot).permute((1, 0)), zero, use_acc=False, is_async=True
            )
            group = (step0 + s) * 4
            in_k = group + col_g < groups_total
            cw = gl.load(ws_tile + group, mask=ws_ok & gl.expand_dims(in_k, 0), other=127)
            cx = gl.load(xs_cols + group, mask=col_ok & in_k, other=127)
            factor = _e8m0_to_fp32(cw) * gl.expand_dims(_e8m0_to_fp32(cx), 0)
            product = warpgroup_mma_wait(0, deps=(p,))
            acc = product * factor + acc
        for i in gl.static_range(STAGES):
            mbarrier.invalidate(ready.index(i))
        out = part_ptr + split.to(gl.int64) * M * N + rows
        for m in gl.static_range(MAX_ROWS):
            if m < M:
                row_sum = gl.sum(gl.where(gl.expand_dims(col_m == m, 0), acc, 0.0), axis=1)
                gl.store(out + m * N, row_sum, mask=row_ok)


@functools.cache
def _layout(rows: int, cols: int):
    return gl.NVMMASharedLayout.get_default_for([rows, cols], gl.float8e4nv)


def splits_for(n: int, k: int, target: int = TARGET_PROGRAMS, block_n: int = BLOCK_N) -> int:
    """Splits of K so that ``cdiv(N, BLOCK_N) x splits`` is about ``target`` programs, each at least two steps
    long, at most 32 (the split sum's unrolled loop)."""
    blocks = triton.cdiv(n, block_n)
    steps = triton.cdiv(k, BLOCK_K)
    return max(1, min(target // blocks, steps // 2, 32))


def mx_wgmma_small_m_partials(
    x_codes: torch.Tensor,
    x_scale_e8m0: torch.Tensor,
    weight: torch.Tensor,
    weight_scale_e8m0: torch.Tensor,
    splits: int | None = None,
    stages: int = STAGES,
    mode: int = 0,
    block_n: int = BLOCK_N,
) -> torch.Tensor:
    """fp32 partial sums ``[splits, M, N]`` of the MXFP8 product of E4M3 ``x_codes`` ``[M, K]`` (M <= 16) with
    E8M0 ``x_scale_e8m0`` ``[M, K/32]`` and the E4M3 ``weight`` ``[N, K]`` with ``weight_scale_e8m0``."""
    if not (HAS_TRITON and HAS_GLUON):
        raise RuntimeError("mx_wgmma_small_m: needs Triton's Gluon")
    m, k = x_codes.shape
    n = weight.shape[0]
    if m > MAX_M or k % 32:
        raise ValueError(f"mx_wgmma_small_m: needs M <= {MAX_M} and K a multiple of 32, got M={m}, K={k}")
    if splits is None:
        splits = splits_for(n, k)
    steps = triton.cdiv(k, BLOCK_K)
    per_split = triton.cdiv(steps, splits)
    splits = triton.cdiv(steps, per_split)
    block_m = 8 if m <= 8 else 16
    w_desc = TensorDescriptor.from_tensor(weight, [block_n, BLOCK_K], _layout(block_n, BLOCK_K))
    x_desc = TensorDescriptor.from_tensor(x_codes, [block_m, BLOCK_K], _layout(block_m, BLOCK_K))
    ws = weight_scale_e8m0.view(torch.uint8)
    xs = x_scale_e8m0.view(torch.uint8)
    partials = torch.empty(splits, m, n, dtype=torch.float32, device=weight.device)
    _mx_small_m_kernel[(triton.cdiv(n, block_n), splits)](
        w_desc, x_desc, ws, xs, partials, m, n, k, ws.stride(0), xs.stride(0), per_split,
        STAGES=stages, MODE=mode, num_warps=block_n // 16,
    )  # fmt: skip
    return partials


SPREAD_MAX_M = 4
"""Rows the block-diagonal variant takes (4 M columns of at most 16)."""


def spread_activation_codes(codes: torch.Tensor) -> torch.Tensor:
    """``[4 M, K]`` E4M3: row ``4 m + j`` holds row ``m``'s groups ``g`` with ``g % 4 == j`` and zeros
    elsewhere (the block-diagonal activation side of :func:`mx_wgmma_spread_partials`)."""
    m, k = codes.shape
    grouped = codes.view(torch.uint8).view(m, k // 128, 4, 32)
    spread = torch.zeros(m, 4, k // 128, 4, 32, dtype=torch.uint8, device=codes.device)
    for j in range(4):
        spread[:, j, :, j] = grouped[:, :, j]
    return spread.view(4 * m, k).view(torch.float8_e4m3fn)


def mx_wgmma_spread_partials(
    spread: torch.Tensor,
    x_scale_e8m0: torch.Tensor,
    weight: torch.Tensor,
    weight_scale_e8m0: torch.Tensor,
    splits: int | None = None,
    stages: int = STAGES,
    block_n: int = BLOCK_N,
) -> torch.Tensor:
    """fp32 partial sums ``[splits, M, N]`` from the block-diagonal activation codes ``spread`` ``[4 M, K]``
    (:func:`spread_activation_codes`, M <= :data:`SPREAD_MAX_M`, K a multiple of 128) and their E8M0 scales
    ``[M, K/32]``, against the E4M3 ``weight`` ``[N, K]`` with ``weight_scale_e8m0``."""
    rows4, k = spread.shape
    m = rows4 // 4
    n = weight.shape[0]
    if m > SPREAD_MAX_M or k % 128:
        raise ValueError(f"mx_wgmma_spread: needs M <= {SPREAD_MAX_M} and K % 128 == 0, got M={m}, K={k}")
    if splits is None:
        splits = splits_for(n, k, block_n=block_n)
    steps = triton.cdiv(k, BLOCK_K)
    per_split = triton.cdiv(steps, splits)
    splits = triton.cdiv(steps, per_split)
    r = 8 if rows4 <= 8 else 16
    w_desc = TensorDescriptor.from_tensor(weight, [block_n, BLOCK_K], _layout(block_n, BLOCK_K))
    x_desc = TensorDescriptor.from_tensor(spread, [r, BLOCK_K], _layout(r, BLOCK_K))
    ws = weight_scale_e8m0.view(torch.uint8)
    xs = x_scale_e8m0.view(torch.uint8)
    partials = torch.empty(splits, m, n, dtype=torch.float32, device=weight.device)
    _mx_spread_kernel[(triton.cdiv(n, block_n), splits)](
        w_desc, x_desc, ws, xs, partials, m, n, k, ws.stride(0), xs.stride(0), per_split,
        STAGES=stages, MAX_ROWS=SPREAD_MAX_M, num_warps=block_n // 16,
    )  # fmt: skip
    return partials
