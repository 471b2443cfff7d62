"""FP8 W8A8 GEMMs for large M on Hopper, written in Gluon so that the accumulator's promotion overlaps the MMAs.

Hopper's FP8 wgmma accumulates in reduced precision; like cuBLASLt with fast accumulation off, mxrun adds each
128-wide K step's product into an fp32 accumulator (see ``GemmConfig.max_imprecise_acc``), scaled by the step's
1x128 / 128x128 scales when block-scaled. In Triton the add comes right after the step's wgmmas, so ptxas makes
the warp group wait for them and the tensor cores idle through every add (:mod:`mxrun.kernels.fp8_tma_gemm`:
0.74-0.81x of ``torch._scaled_mm``). Gluon exposes the asynchronous wgmma, its wait and warp specialization,
so this kernel splits each program into three partitions that meet only at mbarriers:

* a loader warp group walks the program's tiles (persistent: one program per SM, tiles in grouped order) and
  TMA-loads each 128-wide K step's two 64-row halves of A and its B tile into one of ``STAGES`` slots, once
  both consumers have released the slot;
* two consumer warp groups each own 64 rows of the 128x128 tile: they issue two steps' MMAs into two register
  sets, wait for the first, add it into the fp32 accumulator while the second runs, then the second, and
  release each slot as its MMAs retire; then the epilogue (scales, bias, cast) of their half tile (128x256
  tiles: see below), written into the consumer's shared-memory buffer and stored from there by an
  asynchronous TMA store, so that the next tile's MMAs start while it drains.
  The consumers are not synchronized with each other, so one's adds and epilogue overlap the other's MMAs.

The same arithmetic as the Triton kernels (products promoted every 128 K, added in K order; equal error
statistics measured). Two compiler pitfalls shaped the code: CTA-wide ``bar.sync`` barriers that Gluon inserts
around single-thread TMA and mbarrier operations (four per K step when eight warps both load and compute; the
loader partition keeps them out of the MMA warps), and an MMA result that is still in flight when the loop's
registers change hands: the compiler copies it, and ptxas then serializes every wgmma of the kernel (its C7514
note). Hence each loop iteration waits for both of its steps.

Measured on an H100, GEMM alone against ``_scaled_mm`` in the same run (``benchmarks/sweep_fp8_tma.py --shapes
2,3,4,5,6,7,8,9,10,11,12,13 --persistent-only --no-pointer --tiles 128,128,128,8,8,4``,
``results/sweep-fp8-wgmma-ws-h100.json``; the ~50 us 1024x4096x6144 shape is left out of the ranges: every
kernel there, the Triton ones included, moves between 0.3x and 0.8x from run to run): per-channel 0.82-0.99x
(the Triton TMA kernel 0.74-0.87x), block-scaled 0.72-0.86x (TMA 0.67-0.82x); five or six stages and one
program per tile instead of persistence were no better, nor was starting consumer 1 two to six K steps behind
consumer 0 so that their epilogues fall apart (per-channel 0.74-0.96x, one 0.26 outlier aside, against
0.83-1.01x without, same run, ``results/sweep-fp8-wgmma-lag-h100.json``; the variant was removed). In an
earlier run (``sweep-fp8-wgmma-ws-vs-8warp-h100.json``, column ``ws4``) this kernel measured 0.84-0.93x
per-channel and 0.75-0.87x block-scaled beside the previous eight-warp Gluon kernel without a loader partition
(0.78-0.94x and 0.72-0.80x). What is left to ``_scaled_mm`` is mostly the tile size: a 128x128 tile reads a
third more operand bytes from L2 per FLOP than 256x128 (the Triton kernel's 256x128 tiles without promotion
reach about 1.0x). Per-tensor / per-channel GEMMs therefore take 128x256 tiles where those fill their waves as
well (:func:`wide_tiles_pay`): each consumer then keeps two 64x128 accumulators and one step-product set,
waits for each product at once, and relies on the other consumer's MMAs to cover its adds. Block scaling keeps
128x128: its wide variant spilled registers and ran at 0.3x (again 120 bytes of stack offline with the TMA-store
epilogue). Rebuilt on the per-channel wide consumer (each half's product times its rows' scales and its own
weight block's, one activation-scale load per step, no row mask), it still kept 112-160 bytes of stack in each
order of the scale loads tried (ptxas gives the second half's product registers of their own; the consumers
have 232 registers, the most that leave the loader its 40) and took x1.46 the time of 128x128 tiles over the
42 large-M Linear cases, faster in 2 (``sweep_linear_setting.py`` over a switch for it, since removed;
``results/block-wide-tiles-spill-h100.log``). 2-CTA clusters with TMA multicast of the shared operand would be
the next step; Triton 3.6's Gluon has no multicast TMA load for Hopper.

The epilogue was the largest part of what was left. With masked stores from the registers, both consumers of a
tile store at once while the tensor cores idle, once per tile: a fixed cost per tile that the K = 4096 shapes
(32 K steps per tile) felt most. Through shared memory and a TMA store (a throwaway copy of the kernel with the
epilogue as a switch, GEMM alone, ``results/wgmma-epilogue-variants-h100.json``) per-channel went from
0.81-0.92x of ``_scaled_mm`` to 0.93-1.06x over nine Llama shapes (4096x4096x4096 0.92 -> 1.06,
4096x4096x6144 0.86 -> 0.99), within 4% of not storing at all; block-scaled 0.74-0.85x -> 0.79-0.95x. In the
Linear benchmark right after it (``results/linear-h100-tma-store-first.md``) fp8-channel reached 0.95x on 19 of 21
large-M cases (11 before), fp8-tensor 19 (6), fp8-block 0.85x on 16 (5). Outputs TMA cannot write (fp32, rows
not 16-byte aligned) keep the masked stores (:func:`output_descriptor`).

Block scaling costs 7-17% over per-channel scales on the same 128x128 tiles (GEMM alone with the TMA-store
epilogue, ``results/wgmma-stages-gemm-h100.json``; 12-20% before it), and the cost is the per-step scales: the same
kernel taking one scale per tile (wrong arithmetic, timing only) runs at per-channel speed. Measured and left
out (``results/block-scale-loads-h100.log``): loading the scales an iteration ahead (slower on 10 of 12 shapes),
K-major scale copies so that a step's rows are one contiguous read (+0-8% at 4096 rows between runs, but the
per-call copy costs 9% at 1024), issuing the loads after both steps' MMAs, four steps' scales every other
iteration, an L1 prefetch of the scale lines, and bringing the scales into each slot from the loader warp group
by ``cp.async`` (slower, 0.73-0.82x), or into a ring per consumer two iterations ahead (0.70-0.81x); TMA boxes
of one step's fp32 scales stopped the kernel with an illegal instruction (Triton 3.6) and were not pursued.
With the TMA-store epilogue, Nsight Compute's stall sampling (4096x8192x10240) puts a fifth of the consumers'
samples on the multiply of the two scales, waiting for their global loads (long scoreboard) after the first
MMA's wait. Having the loader warp group read each row's scales four steps at a time (one 16-byte load per row),
multiply them and write the step's 128 combined scales into the slot before publishing it (same bits) was
slower again: 0.71-0.86x against 0.82-0.86x on the five cases of 4096 rows and more that ran undisturbed,
interleaved in one run (``results/block-loader-scales-h100.json``, ``block_new`` against ``block_head``; that
run's first shapes were slow for every kernel): the loader then waits on those loads and a bar.sync each step,
and falls behind.
Register loads "ahead" do not stay ahead: ptxas copies loop-carried registers at the loop's end and moves
uniform loads into uniform registers right away, each waiting for the load there. What worked: the activation
quantizer writes the 1x128 scales K-major (``quantize_fp8_triton(..., scale_k_major=True)``, a ``[M, groups]``
view of a ``[groups, M rounded up to 4]`` buffer, at no cost), so that one step's 128 row scales are one
contiguous 512-byte run; the loader brings them into the slot by TMA with the step's operands, under the same
mbarrier, and each consumer reads its 64 from shared memory (``A_SCALE_TMA``; the weight-block scale stays one
uniform load). H100, the block-scaled W8A8 Linear interleaved with and without it (``sweep_linear_setting.py
--setting wgmma.BLOCK_SCALES_BY_TMA --values 0 1 --ms 256 1024 4096 16384 --columns scaled_mm fp8-block
--repeats 2``, ``results/block-scales-tma-h100.log``): x0.921 the time, faster in 52 of 56; at M >= 1024 the
second repeat's 0.82-0.96x of ``_scaled_mm`` became 0.90-1.11x. The MXFP8 aligned path (its activations'
1x128 MX groups quantized K-major the same way, alone or in the launch it shares with the weight's
regrouping) likewise: x0.920 the time at M = 1024-16384, faster in 84 of 84, MXFP8 W8A8 0.95-1.39x ->
1.04-1.50x of bf16, stored tile-aligned 1.24-1.52x -> 1.32-1.60x (``--columns mxfp8 mxfp8-tiles``,
``results/mx-scales-tma-h100.log``, second repeat).

Needs CUDA sm_90, Triton's Gluon (``triton.experimental.gluon``, Triton >= 3.5) and what TMA needs (K-contiguous
operands, 16-byte aligned rows); :func:`wgmma_gemm_usable` says whether it can run, and the dispatchers fall
back to the Triton TMA kernel otherwise. Blackwell (sm_100) has its own MMA (tcgen05, native MX scales) and
would get its own kernel behind the same function.
"""

from __future__ import annotations

import functools

import torch

from mxrun.kernels.backend import HAS_TRITON, cuda_major, triton

try:  # Gluon is experimental and Hopper-specific: the package works without it
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared,
        mbarrier,
        tma,
        warpgroup_mma,
        warpgroup_mma_wait,
    )
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    HAS_GLUON = HAS_TRITON
except ImportError:  # pragma: no cover - depends on the installed Triton
    HAS_GLUON = False

WGMMA_BLOCK = (128, 128, 128)
"""The tile (M, N, K): each consumer warp group holds an fp32 accumulator and two step products of 64x128."""
WGMMA_STAGES = 4
"""Pipeline slots of the block-scaled kernel (128x128 tiles; six were within run noise of four, GEMM alone)."""
WGMMA_NARROW_STAGES = 6
"""Pipeline slots of the 128x128 per-tensor / per-channel kernel: its slots are half the 128x256 tiles', and
beside the output buffers six fit. On an H100 (``benchmarks/sweep_linear_setting.py --setting
wgmma.WGMMA_NARROW_STAGES --values 4 6 --ms 1024 4096``, ``results/linear-wgmma-stages-narrow-h100.json``) the
two Llama cases that take 128x128 tiles (8B and 70B qkv at M = 1024) went from 1.00-1.02x of ``_scaled_mm`` to
1.03-1.15x per-channel, 0.93-1.01x to 0.98-1.09x per-tensor; the others do not use it."""
WGMMA_WIDE_STAGES = 3
"""Pipeline slots of the 128x256 kernel: three took 0.984x the time of four (geometric mean of 56 interleaved
comparisons, 46 faster; single cases move +-5% between runs) over the Llama cases at M = 4096 and 16384
(``sweep_linear_setting.py --setting wgmma.WGMMA_STAGES --values 4 3 --ms 4096 16384``, when one constant set
both depths; ``results/linear-wgmma-stages-wide-h100.json``)."""
WGMMA_MIN_M = 129
"""From this many rows (the ``m_bucket`` of 256) the W8A8 dispatchers run this kernel on sm_90 (per-tensor,
per-channel and 128x128 blocks). It was 512, where the persistent Triton TMA kernel came in; this kernel is
faster from fewer rows. H100, interleaved in one run against the tile kernels
that had these rows, the seven Llama shapes (``benchmarks/sweep_linear_setting.py --setting tma.TMA_MIN_M
--values 512 129 --ms 160 256 384 --columns scaled_mm fp8-channel fp8-tensor fp8-block --repeats 1``, when one
constant set both thresholds; ``results/wgmma-min-m-h100.log``): x0.76 the time, faster in 55 of 63; at 384
rows x0.58-0.60 (per-channel 0.60-1.05x -> 1.03-1.72x of bf16, blocks 0.49-0.89x -> 0.92-1.49x), at 256
x0.77-0.85, at 160 x0.88-0.96 (slower on 8B ``o`` at 160 and 256 rows and 70B ``qkv`` at 160, by 3-24%)."""
WGMMA_GROUP_M = 8
CONSUMER_REGS = 232
"""Registers per thread of each consumer warp group (the loader keeps the rest of the register file)."""


if HAS_GLUON:

    @gluon.jit
    def grouped_tile(tile, num_pid_m, num_pid_n, GROUP_M: gl.constexpr):
        """(row tile, column tile) of a linear tile id, GROUP_M row tiles per column sweep (L2 reuse; the MoE
        kernels' program order too). Ids past the last tile give unused tiles, never a division by zero."""
        group = GROUP_M * num_pid_n
        first_m = (tile // group) * GROUP_M
        size_m = max(min(num_pid_m - first_m, GROUP_M), 1)
        return first_m + (tile % group) % size_m, (tile % group) // size_m

    @gluon.jit
    def _tile_offsets(
        tile, num_pid_m, num_pid_n, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, GROUP_M: gl.constexpr
    ):
        """(row, column) offsets of a linear tile id (:func:`grouped_tile`; the loads of ids past the last tile
        are predicated off)."""
        pid_m, pid_n = grouped_tile(tile, num_pid_m, num_pid_n, GROUP_M)
        return pid_m * BLOCK_M, pid_n * BLOCK_N

    @gluon.jit
    def _step_scale(a_scale_rows, row_mask, b_scale_row, k_step, ones, BLOCK_SCALED: gl.constexpr):
        """Block scaling: the rows' 1x128 activation scales times the tile's weight-block scale for one K step
        (loaded when the step's MMAs start, used after they finish). Otherwise unused ones."""
        if BLOCK_SCALED:
            return gl.load(a_scale_rows + k_step, mask=row_mask, other=0.0) * gl.load(b_scale_row + k_step)
        else:
            return ones

    @gluon.jit
    def _step_scale_smem(a_sc_s, slot, b_scale_row, k_step, HALF: gl.constexpr, rows_layout: gl.constexpr):
        """Block scaling with the activation scales in shared memory (A_SCALE_TMA): this consumer's 64 rows of
        the step's scale box, which the loader brought beside the step's operands, times the weight-block
        scale."""
        STAGES: gl.constexpr = a_sc_s.shape[0]
        HALF_M: gl.constexpr = a_sc_s.shape[2] // 2
        # the unswizzled [1, 128] boxes are plain rows: view them as [STAGES, 128] to take this half's 64
        flat = a_sc_s._reinterpret(gl.float32, [STAGES, 2 * HALF_M], gl.SwizzledSharedLayout(1, 1, 1, [0]))
        rows = flat.index(slot).slice(HALF * HALF_M, HALF_M).load(rows_layout)
        return rows * gl.load(b_scale_row + k_step)

    @gluon.jit
    def _promote(acc, product, scale, BLOCK_SCALED: gl.constexpr):
        """Add one K step's product into the fp32 accumulator (scaled by the step's block scales)."""
        if BLOCK_SCALED:
            return acc + product * scale[:, None]
        else:
            return acc + product

    @gluon.jit
    def _loader(
        a_desc,
        b_desc,
        as_desc,
        a_s,
        b_s,
        a_sc_s,
        ready,
        empty,
        M,
        N,
        K,
        num_programs,
        GROUP_M: gl.constexpr,
        STAGES: gl.constexpr,
        B_PARTS: gl.constexpr,
        A_SCALE_TMA: gl.constexpr,
    ):
        """The loader partition: walks this program's tiles and K steps; for each step it waits until both
        consumers have released the step's slot, then TMA-loads the two 64-row halves of A and the tile's
        ``B_PARTS`` 128-row parts of B."""
        HALF_M: gl.constexpr = a_desc.block_type.shape[0]
        BLOCK_K: gl.constexpr = a_desc.block_type.shape[1]
        BLOCK_N: gl.constexpr = b_desc.block_type.shape[0]
        num_pid_m = gl.cdiv(M, 2 * HALF_M)
        num_pid_n = gl.cdiv(N, B_PARTS * BLOCK_N)
        k_steps = gl.cdiv(K, BLOCK_K)
        loads = 0
        for tile in range(gl.program_id(0), num_pid_m * num_pid_n, num_programs):
            off_m, off_n = _tile_offsets(tile, num_pid_m, num_pid_n, 2 * HALF_M, B_PARTS * BLOCK_N, GROUP_M)
            for kb in range(k_steps):
                slot = loads % STAGES
                mbarrier.wait(
                    empty.index(slot), ((loads // STAGES) & 1) ^ 1
                )  # a fresh barrier passes parity 1
                bar = ready.index(slot)
                if A_SCALE_TMA:  # the step's 128 row scales, K-major: one 512-byte box
                    mbarrier.expect(
                        bar,
                        2 * a_desc.block_type.nbytes
                        + B_PARTS * b_desc.block_type.nbytes
                        + as_desc.block_type.nbytes,
                    )
                    tma.async_copy_global_to_shared(as_desc, [kb, off_m], bar, a_sc_s.index(slot))
                else:
                    mbarrier.expect(bar, 2 * a_desc.block_type.nbytes + B_PARTS * b_desc.block_type.nbytes)
                tma.async_copy_global_to_shared(a_desc, [off_m, kb * BLOCK_K], bar, a_s.index(2 * slot))
                tma.async_copy_global_to_shared(
                    a_desc, [off_m + HALF_M, kb * BLOCK_K], bar, a_s.index(2 * slot + 1)
                )
                for p in gl.static_range(B_PARTS):
                    tma.async_copy_global_to_shared(
                        b_desc, [off_n + p * BLOCK_N, kb * BLOCK_K], bar, b_s.index(B_PARTS * slot + p)
                    )
                loads += 1

    @gluon.jit
    def _step_product(a_s, b_s, ready, step, regs, HALF: gl.constexpr, STAGES: gl.constexpr):
        """Start this consumer's MMAs of stream step ``step`` into ``regs`` once the step's tiles landed."""
        slot = step % STAGES
        mbarrier.wait(ready.index(slot), (step // STAGES) & 1)
        return warpgroup_mma(
            a_s.index(2 * slot + HALF), b_s.index(slot).permute((1, 0)), regs, use_acc=False, is_async=True
        )

    @gluon.jit
    def _consumer(
        a_s,
        b_s,
        c_s,
        a_sc_s,
        ready,
        empty,
        a_scale_ptr,
        b_scale_ptr,
        bias_ptr,
        c_ptr,
        c_desc,
        M,
        N,
        K,
        stride_asm,
        stride_bsn,
        stride_cm,
        num_programs,
        HALF: gl.constexpr,
        BLOCK_SCALED: gl.constexpr,
        A_PER_ROW: gl.constexpr,
        B_PER_ROW: gl.constexpr,
        HAS_BIAS: gl.constexpr,
        GROUP_M: gl.constexpr,
        STAGES: gl.constexpr,
        TMA_STORE: gl.constexpr,
        A_SCALE_TMA: gl.constexpr,
    ):
        """A consumer warp group: 64 rows (half ``HALF``) of each of the program's 128x128 tiles. Per
        iteration it issues two K steps' MMAs, waits for the first, releases its slot and adds it into the
        fp32 accumulator while the second runs, then the same for the second; then the epilogue of its half
        tile."""
        HALF_M: gl.constexpr = a_s.shape[1]
        BLOCK_K: gl.constexpr = a_s.shape[2]
        BLOCK_N: gl.constexpr = b_s.shape[1]
        layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[gl.num_warps(), 1], instr_shape=[16, BLOCK_N, 32]
        )
        rows_layout: gl.constexpr = gl.SliceLayout(1, layout)
        num_pid_m = gl.cdiv(M, 2 * HALF_M)
        num_pid_n = gl.cdiv(N, BLOCK_N)
        k_steps = gl.cdiv(K, BLOCK_K)
        ones = gl.full([HALF_M], 1.0, gl.float32, rows_layout)
        regs_a = gl.zeros([HALF_M, BLOCK_N], gl.float32, layout)
        regs_b = gl.zeros([HALF_M, BLOCK_N], gl.float32, layout)
        step = 0
        for tile in range(gl.program_id(0), num_pid_m * num_pid_n, num_programs):
            off_m, off_n = _tile_offsets(tile, num_pid_m, num_pid_n, 2 * HALF_M, BLOCK_N, GROUP_M)
            offs_m = off_m + HALF * HALF_M + gl.arange(0, HALF_M, layout=rows_layout)
            row_mask = offs_m < M
            a_scale_rows = a_scale_ptr + offs_m.to(gl.int64) * stride_asm
            b_scale_row = b_scale_ptr + (off_n // BLOCK_N) * stride_bsn
            acc = gl.zeros([HALF_M, BLOCK_N], gl.float32, layout)
            # Two steps per iteration, both waited for within it: an MMA still in flight when the loop's
            # registers change hands makes the compiler copy its registers, and ptxas then serializes every
            # wgmma of the kernel (its C7514 note). The other consumer's MMAs fill the gap after the second
            # wait.
            for kb in range(0, k_steps - 1, 2):
                pending_a = _step_product(a_s, b_s, ready, step + kb, regs_a, HALF, STAGES)
                if A_SCALE_TMA:
                    scale_a = _step_scale_smem(
                        a_sc_s, (step + kb) % STAGES, b_scale_row, kb, HALF, rows_layout
                    )
                else:
                    scale_a = _step_scale(a_scale_rows, row_mask, b_scale_row, kb, ones, BLOCK_SCALED)
                pending_b = _step_product(a_s, b_s, ready, step + kb + 1, regs_b, HALF, STAGES)
                if A_SCALE_TMA:
                    scale_b = _step_scale_smem(
                        a_sc_s, (step + kb + 1) % STAGES, b_scale_row, kb + 1, HALF, rows_layout
                    )
                else:
                    scale_b = _step_scale(a_scale_rows, row_mask, b_scale_row, kb + 1, ones, BLOCK_SCALED)
                regs_a = warpgroup_mma_wait(1, deps=(pending_a,))
                mbarrier.arrive(empty.index((step + kb) % STAGES), count=1)
                acc = _promote(acc, regs_a, scale_a, BLOCK_SCALED)
                regs_b = warpgroup_mma_wait(0, deps=(pending_b,))
                mbarrier.arrive(empty.index((step + kb + 1) % STAGES), count=1)
                acc = _promote(acc, regs_b, scale_b, BLOCK_SCALED)
            if k_steps % 2 == 1:
                pending_a = _step_product(a_s, b_s, ready, step + k_steps - 1, regs_a, HALF, STAGES)
                if A_SCALE_TMA:
                    scale_a = _step_scale_smem(
                        a_sc_s, (step + k_steps - 1) % STAGES, b_scale_row, k_steps - 1, HALF, rows_layout
                    )
                else:
                    scale_a = _step_scale(
                        a_scale_rows, row_mask, b_scale_row, k_steps - 1, ones, BLOCK_SCALED
                    )
                regs_a = warpgroup_mma_wait(0, deps=(pending_a,))
                mbarrier.arrive(empty.index((step + k_steps - 1) % STAGES), count=1)
                acc = _promote(acc, regs_a, scale_a, BLOCK_SCALED)
            step += k_steps
            _store_tile(
                acc,
                off_m + HALF * HALF_M,
                offs_m,
                row_mask,
                off_n,
                a_scale_ptr,
                b_scale_ptr,
                bias_ptr,
                c_ptr,
                c_desc,
                c_s.index(HALF),
                N,
                stride_cm,
                layout,
                BLOCK_SCALED,
                A_PER_ROW,
                B_PER_ROW,
                HAS_BIAS,
                TMA_STORE,
            )
        if TMA_STORE:
            tma.store_wait(0)  # the last tile's stores have read their shared memory

    @gluon.jit
    def _consumer_wide(
        a_s,
        b_s,
        c_s,
        ready,
        empty,
        a_scale_ptr,
        b_scale_ptr,
        bias_ptr,
        c_ptr,
        c_desc,
        M,
        N,
        K,
        stride_cm,
        num_programs,
        HALF: gl.constexpr,
        A_PER_ROW: gl.constexpr,
        B_PER_ROW: gl.constexpr,
        HAS_BIAS: gl.constexpr,
        GROUP_M: gl.constexpr,
        STAGES: gl.constexpr,
        TMA_STORE: gl.constexpr,
    ):
        """A consumer warp group of the 128x256 tile (per-tensor / per-channel scales): 64 rows times two
        128-wide parts, an fp32 accumulator for each and a single step-product register set (three 64x128
        sets fit the registers, four would not). Each part's MMAs are waited for at once and added; the
        other consumer's MMAs keep the tensor cores busy through the adds."""
        HALF_M: gl.constexpr = a_s.shape[1]
        BLOCK_K: gl.constexpr = a_s.shape[2]
        BLOCK_N: gl.constexpr = b_s.shape[1]
        layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[gl.num_warps(), 1], instr_shape=[16, BLOCK_N, 32]
        )
        rows_layout: gl.constexpr = gl.SliceLayout(1, layout)
        num_pid_m = gl.cdiv(M, 2 * HALF_M)
        num_pid_n = gl.cdiv(N, 2 * BLOCK_N)
        k_steps = gl.cdiv(K, BLOCK_K)
        regs = gl.zeros([HALF_M, BLOCK_N], gl.float32, layout)
        step = 0
        for tile in range(gl.program_id(0), num_pid_m * num_pid_n, num_programs):
            off_m, off_n = _tile_offsets(tile, num_pid_m, num_pid_n, 2 * HALF_M, 2 * BLOCK_N, GROUP_M)
            acc_l = gl.zeros([HALF_M, BLOCK_N], gl.float32, layout)
            acc_r = gl.zeros([HALF_M, BLOCK_N], gl.float32, layout)
            for kb in range(k_steps):
                s = step + kb
                slot = s % STAGES
                mbarrier.wait(ready.index(slot), (s // STAGES) & 1)
                a_tile = a_s.index(2 * slot + HALF)
                pending = warpgroup_mma(
                    a_tile, b_s.index(2 * slot).permute((1, 0)), regs, use_acc=False, is_async=True
                )
                regs = warpgroup_mma_wait(0, deps=(pending,))
                acc_l = acc_l + regs
                pending = warpgroup_mma(
                    a_tile, b_s.index(2 * slot + 1).permute((1, 0)), regs, use_acc=False, is_async=True
                )
                regs = warpgroup_mma_wait(0, deps=(pending,))
                mbarrier.arrive(empty.index(slot), count=1)
                acc_r = acc_r + regs
            step += k_steps
            offs_m = off_m + HALF * HALF_M + gl.arange(0, HALF_M, layout=rows_layout)
            row_mask = offs_m < M
            row0 = off_m + HALF * HALF_M
            c_buf = c_s.index(HALF)
            for part in gl.static_range(2):
                _store_tile(
                    acc_l if part == 0 else acc_r,
                    row0,
                    offs_m,
                    row_mask,
                    off_n + part * BLOCK_N,
                    a_scale_ptr,
                    b_scale_ptr,
                    bias_ptr,
                    c_ptr,
                    c_desc,
                    c_buf,
                    N,
                    stride_cm,
                    layout,
                    False,
                    A_PER_ROW,
                    B_PER_ROW,
                    HAS_BIAS,
                    TMA_STORE,
                )
        if TMA_STORE:
            tma.store_wait(0)

    @gluon.jit
    def _store_tile(
        acc,
        row0,
        offs_m,
        row_mask,
        off_n,
        a_scale_ptr,
        b_scale_ptr,
        bias_ptr,
        c_ptr,
        c_desc,
        c_buf,
        N,
        stride_cm,
        layout: gl.constexpr,
        BLOCK_SCALED: gl.constexpr,
        A_PER_ROW: gl.constexpr,
        B_PER_ROW: gl.constexpr,
        HAS_BIAS: gl.constexpr,
        TMA_STORE: gl.constexpr,
    ):
        """Per-row/per-tensor scales (block scales were applied per step), bias, cast, store of the half tile
        whose first row is ``row0``: with ``TMA_STORE`` into this consumer's shared-memory buffer and from there
        by an asynchronous TMA store (the hardware clips at the output's edges; the next tile's MMAs start while
        it drains), else masked stores from the registers."""
        BLOCK_N: gl.constexpr = acc.shape[1]
        offs_n = off_n + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, layout))
        if not BLOCK_SCALED:
            if A_PER_ROW:
                a_scale = gl.load(a_scale_ptr + offs_m, mask=row_mask, other=1.0)
            else:
                a_scale = gl.load(a_scale_ptr + offs_m * 0)
            if B_PER_ROW:
                b_scale = gl.load(b_scale_ptr + offs_n, mask=offs_n < N, other=1.0)
            else:
                b_scale = gl.load(b_scale_ptr + offs_n * 0)
            acc = acc * a_scale[:, None] * b_scale[None, :]
        if HAS_BIAS:
            acc = acc + gl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(gl.float32)[None, :]
        if TMA_STORE:
            tma.store_wait(0)  # this buffer's previous store has read it
            c_buf.store(acc.to(c_desc.dtype))
            fence_async_shared()
            tma.async_copy_shared_to_global(c_desc, [row0, off_n], c_buf)
        else:
            mask = row_mask[:, None] & (offs_n < N)[None, :]
            ptrs = c_ptr + offs_m.to(gl.int64)[:, None] * stride_cm + offs_n[None, :]
            gl.store(ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask)

    @gluon.jit(do_not_specialize=["M", "num_programs"])
    def _fp8_wgmma_gemm_kernel(
        a_desc,  # [M, K] float8e4nv, tiles [64, BLOCK_K] (each consumer's half of a 128-row tile)
        b_desc,  # [N, K] float8e4nv weight, tiles [BLOCK_N, BLOCK_K]
        c_desc,  # [M, N] output, tiles [64, BLOCK_N] (with TMA_STORE; else None)
        as_desc,  # A_SCALE_TMA: K-major 1x128 activation scales [cdiv(K, 128), M], boxes [1, 128]; else None
        a_scale_ptr,
        b_scale_ptr,
        bias_ptr,
        c_ptr,
        M,
        N,
        K,
        stride_asm,
        stride_bsn,
        stride_cm,
        num_programs,
        BLOCK_SCALED: gl.constexpr,
        A_PER_ROW: gl.constexpr,
        B_PER_ROW: gl.constexpr,
        HAS_BIAS: gl.constexpr,
        GROUP_M: gl.constexpr,
        STAGES: gl.constexpr,
        CONSUMER_REGS: gl.constexpr,
        B_PARTS: gl.constexpr,
        TMA_STORE: gl.constexpr,
        A_SCALE_TMA: gl.constexpr,
    ):
        """The loader and the two consumers (see the module docstring), meeting only at the slots' mbarriers:
        ``ready`` (the slot's TMA bytes landed) and ``empty`` (both consumers' MMAs on it retired)."""
        HALF_M: gl.constexpr = a_desc.block_type.shape[0]
        BLOCK_K: gl.constexpr = a_desc.block_type.shape[1]
        BLOCK_N: gl.constexpr = b_desc.block_type.shape[0]
        a_s = gl.allocate_shared_memory(a_desc.dtype, [2 * STAGES, HALF_M, BLOCK_K], a_desc.layout)
        b_s = gl.allocate_shared_memory(b_desc.dtype, [B_PARTS * STAGES, BLOCK_N, BLOCK_K], b_desc.layout)
        if TMA_STORE:  # one output buffer per consumer
            c_s = gl.allocate_shared_memory(c_desc.dtype, [2, HALF_M, BLOCK_N], c_desc.layout)
        else:
            c_s = a_s  # not written
        if A_SCALE_TMA:  # one 128-row scale box per slot
            a_sc_s = gl.allocate_shared_memory(gl.float32, [STAGES, 1, 2 * HALF_M], as_desc.layout)
        else:
            a_sc_s = a_s  # not used
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(ready.index(i), count=1)
            mbarrier.init(empty.index(i), count=2)  # both consumers release each slot
        # fmt: off
        if B_PARTS == 2:  # 128x256 tiles, per-tensor / per-channel scales only
            gl.warp_specialize(
                [
                    (_loader, (a_desc, b_desc, as_desc, a_s, b_s, a_sc_s, ready, empty, M, N, K, num_programs,
                               GROUP_M, STAGES, B_PARTS, A_SCALE_TMA)),
                    (_consumer_wide, (a_s, b_s, c_s, ready, empty, a_scale_ptr, b_scale_ptr, bias_ptr, c_ptr,
                                      c_desc, M, N, K, stride_cm, num_programs, 0, A_PER_ROW, B_PER_ROW, HAS_BIAS,
                                      GROUP_M, STAGES, TMA_STORE)),
                    (_consumer_wide, (a_s, b_s, c_s, ready, empty, a_scale_ptr, b_scale_ptr, bias_ptr, c_ptr,
                                      c_desc, M, N, K, stride_cm, num_programs, 1, A_PER_ROW, B_PER_ROW, HAS_BIAS,
                                      GROUP_M, STAGES, TMA_STORE)),
                ],
                [4, 4],  # the consumers' warps (the loader has the kernel's num_warps)
                [CONSUMER_REGS, CONSUMER_REGS],
            )
        else:
            gl.warp_specialize(
                [
                    (_loader, (a_desc, b_desc, as_desc, a_s, b_s, a_sc_s, ready, empty, M, N, K, num_programs,
                               GROUP_M, STAGES, B_PARTS, A_SCALE_TMA)),
                    (_consumer, (a_s, b_s, c_s, a_sc_s, ready, empty, a_scale_ptr, b_scale_ptr, bias_ptr, c_ptr,
                                 c_desc, M, N, K, stride_asm, stride_bsn, stride_cm, num_programs, 0, BLOCK_SCALED,
                                 A_PER_ROW, B_PER_ROW, HAS_BIAS, GROUP_M, STAGES, TMA_STORE, A_SCALE_TMA)),
                    (_consumer, (a_s, b_s, c_s, a_sc_s, ready, empty, a_scale_ptr, b_scale_ptr, bias_ptr, c_ptr,
                                 c_desc, M, N, K, stride_asm, stride_bsn, stride_cm, num_programs, 1, BLOCK_SCALED,
                                 A_PER_ROW, B_PER_ROW, HAS_BIAS, GROUP_M, STAGES, TMA_STORE, A_SCALE_TMA)),
                ],
                [4, 4],
                [CONSUMER_REGS, CONSUMER_REGS],
            )
        # fmt: on
        for i in gl.static_range(STAGES):
            mbarrier.invalidate(ready.index(i))
            mbarrier.invalidate(empty.index(i))


BLOCK_SCALES_BY_TMA = 1
"""Whether the block-scaled W8A8 Linear asks the quantizer for K-major activation scales at the rows this kernel
takes, so that its loader brings each step's 128 row scales into the slot by TMA beside the operands (the
consumers then read them from shared memory instead of loading them from global memory after the MMA)."""

WIDE_TILE_GAIN = 1.03
"""Speed per element of the 128x256 tile over the 128x128 one where both fill their waves alike: 0.96-1.12x,
1.03x on average, over the eight such shapes of one H100 run (GEMM alone,
``results/sweep-fp8-wgmma-wide-h100.json``, ``4 stages 128x256`` against ``default``)."""


def wide_tiles_pay(m: int, n: int, sms: int) -> bool:
    """128x256 tiles read a quarter fewer operand bytes per FLOP but come in half as many: choose them when
    full waves of them, times the tile area over its speed, cost less than of 128x128 tiles (at M = 1024,
    N = 10240 the 320 wide tiles need three waves of 132 SMs, the 640 narrow ones five: narrow wins)."""
    rows = triton.cdiv(m, WGMMA_BLOCK[0])
    narrow = triton.cdiv(rows * triton.cdiv(n, 128), sms) * 128 * 128
    wide = triton.cdiv(rows * triton.cdiv(n, 256), sms) * 128 * 256 / WIDE_TILE_GAIN
    return wide < narrow


def wgmma_gemm_usable(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Gluon importable, an sm_90 GPU (wgmma; Blackwell has other MMAs), TMA-compatible operands (the
    dispatcher also asks for K >= :data:`WGMMA_MIN_K`)."""
    from mxrun.kernels.fp8_tma_gemm import tma_usable

    if not (HAS_GLUON and tma_usable(a, b)):
        return False
    return cuda_major(a.device) == 9


def fp8_wgmma_gemm(
    a: torch.Tensor,
    a_scale: torch.Tensor,
    b: torch.Tensor,
    b_scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
    *,
    block_scaled: bool = False,
    persistent: bool = True,
    stages: int | None = None,
    wide: bool | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``(a s_a)(b s_b)^T + bias`` for E4M3 ``a`` ``[M, K]`` and ``b`` ``[N, K]``: per-row/per-tensor fp32
    scales (``[M]``/``[M, 1]``/one element; ``[N]``/``[N, 1]``/one element), or with ``block_scaled`` 1x128
    activation groups ``[M, ceil(K/128)]`` and 128x128 weight blocks ``[ceil(N/128), ceil(K/128)]`` (activation
    scales that are a K-major view, :func:`k_major_scales`, come into the pipeline slots by TMA).
    ``persistent`` launches one program per SM that walks the tiles (the next tile's loads overlap this one's
    epilogue) instead of one per tile; ``wide`` takes 128x256 tiles instead of 128x128 (per-tensor /
    per-channel only; None: where :func:`wide_tiles_pay`). ``out``: an ``[M, N]`` tensor of ``out_dtype`` with
    unit column stride to write into (e.g. a column slice of a wider output) and return, instead of a new one.
    Operands it cannot take (:func:`wgmma_gemm_usable` is False: no Gluon, not sm_90, not TMA-ready) get a
    :class:`GemmInputError`."""
    from mxrun.kernels.fp8_tma_gemm import _sm_count, check_block_scales, fp8_operand_shapes
    from mxrun.kernels.scaled_gemm import GemmInputError, output_for, unit_stride

    fn = "fp8_wgmma_gemm"
    m, n, k = fp8_operand_shapes(fn, a, b)
    if not wgmma_gemm_usable(a, b):
        raise GemmInputError(
            f"{fn}: needs Triton's Gluon, an sm_90 CUDA device and TMA-ready operands (K-contiguous, "
            "16-byte aligned rows); use fp8_tma_gemm or fp8_gemm_triton otherwise"
        )
    if wide and block_scaled:
        raise GemmInputError(f"{fn}: 128x256 tiles take per-tensor / per-channel scales only")
    k_groups = triton.cdiv(k, 128)
    scale_tma = block_scaled and k_major_scales(a_scale)
    if block_scaled:
        a_scale = a_scale if scale_tma else unit_stride(a_scale)
        b_scale = unit_stride(b_scale)
        check_block_scales(fn, a_scale, b_scale, m, n, k)
    else:
        a_scale = a_scale.reshape(-1).contiguous()
        b_scale = b_scale.reshape(-1).contiguous()
        if a_scale.numel() not in (1, m) or b_scale.numel() not in (1, n):
            raise GemmInputError(
                f"{fn}: scales must have 1 or M={m} / 1 or N={n} elements, got {a_scale.numel()}, "
                f"{b_scale.numel()}"
            )
    c = output_for(fn, out, m, n, out_dtype, a.device)
    if m == 0 or n == 0:
        return c
    block_m, block_n, block_k = WGMMA_BLOCK
    a_rows = block_m // 2  # each consumer's half
    a_desc = TensorDescriptor.from_tensor(a, [a_rows, block_k], _operand_layout(a_rows, block_k))
    b_desc = TensorDescriptor.from_tensor(b, [block_n, block_k], _operand_layout(block_n, block_k))
    index = a.device.index if a.device.index is not None else torch.cuda.current_device()
    if wide is None:
        wide = not block_scaled and wide_tiles_pay(m, n, _sm_count(index))
    b_parts = 2 if wide else 1
    if stages is None:
        stages = WGMMA_WIDE_STAGES if wide else WGMMA_STAGES if block_scaled else WGMMA_NARROW_STAGES
    tiles = triton.cdiv(m, block_m) * triton.cdiv(n, b_parts * block_n)
    programs = min(tiles, _sm_count(index)) if persistent else tiles
    c_desc = output_descriptor(c, block_n)
    as_desc = None
    if scale_tma:  # [cdiv(K, 128), M] rows of the K-major buffer, one step's 128 rows a box
        as_desc = TensorDescriptor.from_tensor(a_scale.t(), [1, block_m], _scale_layout())
    args = (
        a_desc, b_desc, c_desc, as_desc, a_scale, b_scale, unit_stride(bias) if bias is not None else b_scale,
        c, m, n, k, k_groups, k_groups, c.stride(0), programs,
    )  # fmt: skip
    flags = dict(
        BLOCK_SCALED=block_scaled,
        A_PER_ROW=(not block_scaled) and a_scale.numel() > 1,
        B_PER_ROW=(not block_scaled) and b_scale.numel() > 1,
        HAS_BIAS=bias is not None,
        GROUP_M=WGMMA_GROUP_M,
        STAGES=stages,
        TMA_STORE=c_desc is not None,
        A_SCALE_TMA=scale_tma,
    )
    # num_warps is the loader's warp group; the two consumer warp groups come on top.
    _fp8_wgmma_gemm_kernel[(programs,)](
        *args, **flags, CONSUMER_REGS=CONSUMER_REGS, B_PARTS=b_parts, num_warps=4
    )
    return c


def block_scales_k_major(x: torch.Tensor) -> bool:
    """Whether a block-scaled W8A8 Linear (FP8 blocks, the MXFP8 aligned path) of activations ``x`` ``[M, K]``
    should have them quantized with K-major 1x128 scales: :data:`BLOCK_SCALES_BY_TMA` on, and rows that only
    this kernel takes (past the split-K and mid-M kernels' ranges) on an sm_90 device."""
    from mxrun.kernels.mid_m_gemm import BLOCK_W8A8_MID_M_MAX

    return (
        bool(BLOCK_SCALES_BY_TMA)
        and HAS_GLUON
        and x.dim() == 2
        and x.is_cuda
        and x.shape[0] >= max(WGMMA_MIN_M, BLOCK_W8A8_MID_M_MAX + 1)
        and cuda_major(x.device) == 9
    )


def k_major_scales(a_scale: torch.Tensor) -> bool:
    """Whether 1x128 activation scales ``[M, groups]`` are a view of a K-major buffer that TMA can read one
    step's rows of (:func:`~mxrun.kernels.fp8_quantize.quantize_fp8_triton` with ``scale_k_major``): unit
    stride along M, 16-byte aligned steps."""
    return (
        a_scale.dim() == 2
        and a_scale.dtype == torch.float32
        and a_scale.stride(0) == 1
        and (a_scale.stride(1) * 4) % 16 == 0
        and a_scale.data_ptr() % 16 == 0
    )


@functools.cache
def _scale_layout():
    return gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=32, rank=2)


_TMA_STORE_DTYPES = {torch.bfloat16: "bfloat16", torch.float16: "float16"}


def output_descriptor(c: torch.Tensor, block_n: int):
    """The output's TMA descriptor (tiles of 64 x ``block_n``) where the epilogue can store through shared
    memory: 2-byte outputs (a 64x128 fp32 buffer per consumer would not fit beside the 128x256 tiles' slots)
    with 16-byte aligned rows; None otherwise (masked stores from the registers)."""
    dtype = _TMA_STORE_DTYPES.get(c.dtype)
    if dtype is None or (c.stride(0) * c.element_size()) % 16 or c.data_ptr() % 16:
        return None
    return TensorDescriptor.from_tensor(c, [WGMMA_BLOCK[0] // 2, block_n], _output_layout(block_n, dtype))


@functools.cache
def _output_layout(cols: int, dtype: str):
    return gl.NVMMASharedLayout.get_default_for([WGMMA_BLOCK[0] // 2, cols], getattr(gl, dtype))


@functools.cache
def _operand_layout(rows: int, cols: int):
    return gl.NVMMASharedLayout.get_default_for([rows, cols], gl.float8e4nv)


__all__ = [
    "BLOCK_SCALES_BY_TMA",
    "HAS_GLUON",
    "WGMMA_MIN_M",
    "block_scales_k_major",
    "fp8_wgmma_gemm",
    "k_major_scales",
    "output_descriptor",
    "wgmma_gemm_usable",
    "wide_tiles_pay",
]
