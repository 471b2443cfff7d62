"""The MoE grouped GEMM for FP8 activations in 1x128 groups and E4M3 weights in 128x128 blocks (FP8 block W8A8,
and MXFP8 W8A8 on its aligned path), in Gluon for Hopper with warp specialization.

Why: at many pairs per expert the block-scaled Triton grouped GEMM (:mod:`mxrun.kernels.moe_gemm`) adds each
128-K step's product into its fp32 accumulator right after the step's wgmmas, so the tensor cores idle through
every add: on an H100 it took 47% more time than the per-channel FP8 GEMM on Mixtral-8x7B at 8192 tokens
(fp8-block 10894 against fp8-channel 7409 us, ``benchmarks/results/moe-h100.md``). The Linear's Gluon kernel
(:mod:`mxrun.kernels.fp8_wgmma_gemm`) overlaps the adds with the MMAs of a second consumer warp group. This is
that design over the expert-sorted token layout:

* a loader warp group gathers each 128-K step of the block's 128 layout rows (E4M3, one expert) with
  ``cp.async`` (Hopper's TMA cannot gather rows) and loads the weight tile with TMA (gate and up rows, 64 each,
  for the gated GEMM; 128 rows for the down GEMM), both signalling one mbarrier per ring slot;
* two consumer warp groups own 64 layout rows each: they issue two steps' MMAs, add each step's product times
  its scales (the rows' 1x128 activation scales, the columns' weight-block scales) while the other step's
  MMAs run, release the slot, and run the epilogue (SiLU(gate) * up, or the routing weight; rows stored by
  pair id);
* programs walk :data:`BLOCK_GROUP_M` layout blocks per sweep over the column tiles, so that the down GEMM's
  activations (235 MB on Mixtral at 8192 tokens) are read from HBM once rather than once per column tile.

Measured on an H100, whole MoE layers, same run each: against the Triton kernel (``bench_moe.py --columns
fp8-block fp8-block:gluon-block ...``, then still walking every block per column,
``benchmarks/results/moe-gluon-block-h100.md``) Mixtral-8x7B at 1024 tokens 1695 -> 1288 us, at 8192 10765
-> 9713, DeepSeek-V3-like at 8192 13951 -> 12829, at 1024 even; the program order then took Mixtral at 8192
to 8233 us (1.29x of bf16 ``torch._grouped_mm``) and DeepSeek to 10882 (1.72x) (``BLOCK_GROUP_M`` 0 -> 8,
``results/moe-gluon-order-h100.json``).
"""

from __future__ import annotations

import torch

from mxrun.kernels.backend import cuda_major
from mxrun.kernels.fp8_tma_gemm import tma_usable  # row alignment, sm_90+, no interpreter
from mxrun.kernels.moe_wgmma_decoded import HAS_GLUON
from mxrun.kernels.scaled_gemm import GemmInputError

if HAS_GLUON:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import async_copy
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared,
        mbarrier,
        tma,
        warpgroup_mma,
        warpgroup_mma_wait,
    )
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    from mxrun.kernels.moe_wgmma_decoded import layout_rows, tile_order  # defined only where Gluon is

BLOCK_ROWS = 128
"""Layout rows per program (two consumer warp groups of 64) and the layout's BLOCK_M."""
BLOCK_STAGES = 4
BLOCK_GROUP_M = 8
"""Program order (:func:`~mxrun.kernels.moe_wgmma_decoded.tile_order`): 8 layout blocks per sweep over the
column tiles. H100, same run (``results/moe-gluon-order-h100.json``, a one-off driver of ``bench_moe.run`` as
``benchmarks/sweep_moe_gluon.py`` now is), against 0 (blocks fastest over the whole layout): fp8-block at 8192
tokens Mixtral-8x7B 9516 -> 8233 us, DeepSeek-V3-like 12828 -> 10882, Qwen3-30B-A3B 1724 -> 1572; at 1024
tokens within 2%; 16 measured the same as 8."""
CONSUMER_REGS = 232

if HAS_GLUON:

    @gluon.jit
    def _loader(
        a_ptr,
        w_desc,
        a_s,
        b_s,
        ready,
        empty,
        sorted_pairs_ptr,
        w_row0,
        w_row1,
        pid_m,
        num_pairs,
        K,
        top_k,
        stride_ar,
        A_GATHER: gl.constexpr,
        STAGES: gl.constexpr,
    ):
        """Per K step: wait for the slot, TMA the weight tile's two 64-row halves (rows ``w_row0`` and
        ``w_row1`` of the stack viewed as [E * N_W, K]), ``cp.async`` the 128 gathered activation rows; both
        arrive on the slot's ``ready`` barrier (each loader thread once, for its own copies)."""
        copy_layout: gl.constexpr = gl.BlockedLayout([1, 16], [8, 4], [gl.num_warps(), 1], [1, 0])
        _, row_ok, a_rows = layout_rows(
            sorted_pairs_ptr, pid_m * 128, num_pairs, top_k, 128, gl.SliceLayout(1, copy_layout), A_GATHER
        )
        cols = gl.arange(0, 128, layout=gl.SliceLayout(0, copy_layout))
        ptrs = a_ptr + a_rows.to(gl.int64)[:, None] * (stride_ar // 16 * 16) + cols[None, :]
        mask = row_ok[:, None] & (cols < 128)[None, :]  # padding rows read as zeros
        for kb in range(K // 128):
            slot = kb % STAGES
            mbarrier.wait(empty.index(slot), ((kb // STAGES) & 1) ^ 1)  # a fresh barrier passes parity 1
            bar = ready.index(slot)
            mbarrier.expect(bar, 2 * w_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(w_desc, [w_row0, kb * 128], bar, b_s.index(slot).slice(0, 64))
            tma.async_copy_global_to_shared(w_desc, [w_row1, kb * 128], bar, b_s.index(slot).slice(64, 64))
            async_copy.async_copy_global_to_shared(a_s.index(slot), ptrs + kb * 128, mask=mask)
            async_copy.mbarrier_arrive(bar, increment_count=False)

    @gluon.jit
    def _step_product(a_s, b_s, ready, kb, regs, HALF: gl.constexpr, STAGES: gl.constexpr):
        """Start this consumer's MMAs of step ``kb`` once the slot's copies have landed."""
        slot = kb % STAGES
        mbarrier.wait(ready.index(slot), (kb // STAGES) & 1)
        fence_async_shared()  # the activation rows came through the generic proxy (cp.async)
        return warpgroup_mma(
            a_s.index(slot).slice(HALF * 64, 64), b_s.index(slot).permute((1, 0)), regs, use_acc=False,
            is_async=True,
        )  # fmt: skip

    @gluon.jit
    def _step_scales(a_scale_rows, row_ok, w_scale_cols, kb):
        """The step's 1x128 activation scales of the rows and weight-block scales of the columns."""
        return gl.load(a_scale_rows + kb, mask=row_ok, other=0.0), gl.load(w_scale_cols + kb)

    @gluon.jit
    def _consumer(
        a_s,
        b_s,
        ready,
        empty,
        a_scale_ptr,
        w_scale_ptr,
        routing_ptr,
        c_ptr,
        sorted_pairs_ptr,
        expert,
        pid_m,
        n0,
        N,
        K,
        num_pairs,
        top_k,
        stride_asr,
        stride_wse,
        stride_wsn,
        stride_cm,
        HALF: gl.constexpr,
        A_GATHER: gl.constexpr,
        GATED: gl.constexpr,
        MUL_ROUTING: gl.constexpr,
        STAGES: gl.constexpr,
    ):
        """64 layout rows x 128 columns (gated: 64 gate then 64 up columns): two steps per iteration, each
        added with its scales while the other's MMAs run; then the epilogue."""
        layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[gl.num_warps(), 1], instr_shape=[16, 128, 32]
        )
        rows_layout: gl.constexpr = gl.SliceLayout(1, layout)
        cols_layout: gl.constexpr = gl.SliceLayout(0, layout)
        pairs, row_ok, a_rows = layout_rows(
            sorted_pairs_ptr, pid_m * 128 + HALF * 64, num_pairs, top_k, 64, rows_layout, A_GATHER
        )
        a_scale_rows = a_scale_ptr + a_rows.to(gl.int64) * stride_asr
        cols = gl.arange(0, 128, layout=cols_layout)
        if GATED:  # noqa: SIM108 - gate columns in the gate rows' block, up columns in the up rows' block
            col_blocks = gl.where(cols < 64, n0 // 128, (N + n0) // 128)
        else:
            col_blocks = (n0 + cols * 0) // 128
        w_scale_cols = w_scale_ptr + expert * stride_wse + col_blocks * stride_wsn
        regs_a = gl.zeros([64, 128], gl.float32, layout)
        regs_b = gl.zeros([64, 128], gl.float32, layout)
        acc = gl.zeros([64, 128], gl.float32, layout)
        k_steps = K // 128
        for kb in range(0, k_steps - 1, 2):
            pending_a = _step_product(a_s, b_s, ready, kb, regs_a, HALF, STAGES)
            sa_a, sw_a = _step_scales(a_scale_rows, row_ok, w_scale_cols, kb)
            pending_b = _step_product(a_s, b_s, ready, kb + 1, regs_b, HALF, STAGES)
            sa_b, sw_b = _step_scales(a_scale_rows, row_ok, w_scale_cols, kb + 1)
            regs_a = warpgroup_mma_wait(1, deps=(pending_a,))
            mbarrier.arrive(empty.index(kb % STAGES), count=1)
            acc = acc + regs_a * sa_a[:, None] * sw_a[None, :]
            regs_b = warpgroup_mma_wait(0, deps=(pending_b,))
            mbarrier.arrive(empty.index((kb + 1) % STAGES), count=1)
            acc = acc + regs_b * sa_b[:, None] * sw_b[None, :]
        if k_steps % 2 == 1:
            pending_a = _step_product(a_s, b_s, ready, k_steps - 1, regs_a, HALF, STAGES)
            sa_a, sw_a = _step_scales(a_scale_rows, row_ok, w_scale_cols, k_steps - 1)
            regs_a = warpgroup_mma_wait(0, deps=(pending_a,))
            mbarrier.arrive(empty.index((k_steps - 1) % STAGES), count=1)
            acc = acc + regs_a * sa_a[:, None] * sw_a[None, :]

        if GATED:
            # columns c and c + 64 sit in the same thread (the MMA layout's column bases), so the split into
            # gate and up moves no data; the product is then laid out for a plain row-major store
            linear: gl.constexpr = gl.to_linear_layout(layout, [64, 128])
            both = gl.convert_layout(acc, linear, assert_trivial=True)
            gate, up = gl.split(gl.permute(gl.reshape(both, [64, 2, 64]), (0, 2, 1)))
            store_layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [gl.num_warps(), 1], [1, 0])
            h = gl.convert_layout(gate / (1.0 + gl.exp(-gate)) * up, store_layout)  # SiLU(gate) * up, fp32
            out_pairs = gl.load(
                sorted_pairs_ptr
                + pid_m * 128
                + HALF * 64
                + gl.arange(0, 64, layout=gl.SliceLayout(1, store_layout))
            )
            offs_n = n0 + gl.arange(0, 64, layout=gl.SliceLayout(0, store_layout))
            mask = (out_pairs < num_pairs)[:, None] & (offs_n < N)[None, :]
            ptrs = c_ptr + out_pairs.to(gl.int64)[:, None] * stride_cm + offs_n[None, :]
            gl.store(ptrs, h.to(c_ptr.dtype.element_ty), mask=mask)
        else:
            if MUL_ROUTING:
                acc = acc * gl.load(routing_ptr + pairs, mask=row_ok, other=0.0).to(gl.float32)[:, None]
            offs_n = n0 + cols
            mask = row_ok[:, None] & (offs_n < N)[None, :]
            ptrs = c_ptr + pairs.to(gl.int64)[:, None] * stride_cm + offs_n[None, :]
            gl.store(ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask)

    @gluon.jit(do_not_specialize=["num_pairs", "n_rows_layout"])
    def moe_wgmma_block_kernel(
        a_ptr,  # A_GATHER: [T, K] float8e4nv (row of pair p is p // top_k), else [S, K]; K contiguous
        a_scale_ptr,  # fp32 [rows, K/128] at r*stride_asr + g: 1x128 activation scales
        w_desc,  # the [E, N_W, K] E4M3 stack viewed as [E * N_W, K], tiles [64, 128]
        w_scale_ptr,  # fp32 [E, N_W/128, K/128] at e*stride_wse + i*stride_wsn + g
        routing_ptr,  # MUL_ROUTING: [S] routing weight of each pair; else unused
        c_ptr,  # [S, N] bf16/fp16 output, row = pair id; (p, n) at p*stride_cm + n
        sorted_pairs_ptr,  # int32 [n_blocks * 128]: pair id at each layout row, >= S on padding
        block_expert_ptr,  # int32 [n_blocks]: expert of each 128 rows, -1 for unused blocks
        num_pairs,
        n_rows_layout,
        N,  # output columns (I for the gated GEMM, whose stack has N_W = 2I rows); a multiple of 64
        N_W,
        K,  # a multiple of 128
        top_k,
        stride_ar,
        stride_asr,
        stride_wse,
        stride_wsn,
        stride_cm,
        A_GATHER: gl.constexpr,
        GATED: gl.constexpr,
        MUL_ROUTING: gl.constexpr,
        STAGES: gl.constexpr,
        CONSUMER_REGS: gl.constexpr,
        GROUP_M: gl.constexpr,
    ):
        """One program per (layout block, column tile): the loader and two consumers meet at the slots'
        ``ready`` (weights by TMA, activations by cp.async) and ``empty`` (both consumers' MMAs retired)."""
        pid_m, pid_n = tile_order(n_rows_layout // 128, gl.cdiv(N, 64 if GATED else 128), GROUP_M)
        block_expert = gl.load(block_expert_ptr + pid_m)
        if block_expert >= 0:
            expert = block_expert.to(gl.int64)
            a_shared: gl.constexpr = gl.NVMMASharedLayout.get_default_for([128, 128], gl.float8e4nv)
            a_s = gl.allocate_shared_memory(gl.float8e4nv, [STAGES, 128, 128], a_shared)
            b_s = gl.allocate_shared_memory(gl.float8e4nv, [STAGES, 128, 128], w_desc.layout)
            ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
            empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
            for i in gl.static_range(STAGES):
                mbarrier.init(
                    ready.index(i), count=1 + 32 * gl.num_warps()
                )  # the expect + each loader thread
                mbarrier.init(empty.index(i), count=2)  # both consumers release each slot
            if GATED:  # 64 gate rows and their 64 up rows
                n0 = pid_n * 64
                w_row0 = (expert * N_W + n0).to(gl.int32)
                w_row1 = (expert * N_W + N + n0).to(gl.int32)
            else:
                n0 = pid_n * 128
                w_row0 = (expert * N_W + n0).to(gl.int32)
                w_row1 = w_row0 + 64
            # fmt: off
            gl.warp_specialize(
                [
                    (_loader, (a_ptr, w_desc, a_s, b_s, ready, empty, sorted_pairs_ptr, w_row0, w_row1, pid_m,
                               num_pairs, K, top_k, stride_ar, A_GATHER, STAGES)),
                    (_consumer, (a_s, b_s, ready, empty, a_scale_ptr, w_scale_ptr, routing_ptr, c_ptr,
                                 sorted_pairs_ptr, expert, pid_m, n0, N, K, num_pairs, top_k, stride_asr,
                                 stride_wse, stride_wsn, stride_cm, 0, A_GATHER, GATED, MUL_ROUTING, STAGES)),
                    (_consumer, (a_s, b_s, ready, empty, a_scale_ptr, w_scale_ptr, routing_ptr, c_ptr,
                                 sorted_pairs_ptr, expert, pid_m, n0, N, K, num_pairs, top_k, stride_asr,
                                 stride_wse, stride_wsn, stride_cm, 1, A_GATHER, GATED, MUL_ROUTING, STAGES)),
                ],
                [4, 4],
                [CONSUMER_REGS, CONSUMER_REGS],
            )
            # fmt: on
            for i in gl.static_range(STAGES):
                mbarrier.invalidate(ready.index(i))
                mbarrier.invalidate(empty.index(i))


def block_wgmma_usable(a: torch.Tensor, n: int, k: int, block_m: int) -> bool:
    """Gluon importable, an sm_90 GPU, E4M3 activations with 16-byte aligned rows, N % 64 == 0, K % 128 == 0
    and 128-row layout blocks (what the kernel takes; the caller checks the scale layouts)."""
    if not (HAS_GLUON and block_m == BLOCK_ROWS and n % 64 == 0 and k % 128 == 0):
        return False
    return tma_usable(a) and cuda_major(a.device) == 9


def moe_wgmma_block_gemm(
    a: torch.Tensor,
    a_scale: torch.Tensor | None,
    w_data: torch.Tensor,
    w_scale: torch.Tensor,
    sorted_pair_ids: torch.Tensor,
    block_expert: torch.Tensor,
    num_pairs: int,
    out: torch.Tensor,
    *,
    gated: bool,
    gather_top_k: int | None,
    routing_weights: torch.Tensor | None = None,
    stages: int | None = None,
    group_m: int | None = None,
) -> torch.Tensor:
    """One grouped GEMM over a 128-row layout: ``a`` E4M3 with fp32 1x128 scales ``a_scale`` ``[rows, K/128]``,
    ``w_data`` E4M3 ``[E, N_W, K]`` with fp32 128x128 block scales ``w_scale`` ``[E, N_W/128, K/128]``, N a
    multiple of 64 and K of 128; writes ``out`` ``[S, N]`` (SiLU(gate) * up when ``gated``)."""
    experts, n_w, k = w_data.shape
    n = n_w // 2 if gated else n_w
    if k % 128 or n % 64 or sorted_pair_ids.numel() % BLOCK_ROWS:
        raise GemmInputError(
            f"moe_wgmma_block_gemm: needs K % 128 == 0 (K={k}), N % 64 == 0 (N={n}) and a layout of 128-row "
            f"blocks ({sorted_pair_ids.numel()} rows)"
        )
    w_blocks = (experts, -(-n_w // 128), k // 128)
    if a_scale is None or tuple(a_scale.shape) != (a.shape[0], k // 128) or tuple(w_scale.shape) != w_blocks:
        raise GemmInputError(
            f"moe_wgmma_block_gemm: needs 1x128 activation scales [{a.shape[0]}, {k // 128}] and weight-block "
            f"scales {list(w_blocks)}, got {None if a_scale is None else list(a_scale.shape)} and "
            f"{list(w_scale.shape)}"
        )
    w_2d = w_data.reshape(experts * n_w, k)
    tile = gl.NVMMASharedLayout.get_default_for([64, 128], gl.float8e4nv)
    w_desc = TensorDescriptor.from_tensor(w_2d, [64, 128], tile)
    n_rows_layout = sorted_pair_ids.numel()
    grid = (n_rows_layout // BLOCK_ROWS * -(-n // (64 if gated else 128)),)
    moe_wgmma_block_kernel[grid](
        a, a_scale, w_desc, w_scale, routing_weights if routing_weights is not None else w_scale, out,
        sorted_pair_ids, block_expert, num_pairs, n_rows_layout, n, n_w, k, gather_top_k or 1,
        a.stride(0), a_scale.stride(0), w_scale.stride(0), w_scale.stride(1), out.stride(0),
        A_GATHER=gather_top_k is not None, GATED=gated, MUL_ROUTING=routing_weights is not None,
        STAGES=BLOCK_STAGES if stages is None else stages, CONSUMER_REGS=CONSUMER_REGS,
        GROUP_M=BLOCK_GROUP_M if group_m is None else group_m, num_warps=4,
    )  # fmt: skip
    return out


__all__ = ["block_wgmma_usable", "moe_wgmma_block_gemm"]
