"""The MoE grouped GEMM for weights decoded in registers, in Gluon for Hopper: decoded E4M3 / MXFP8 weight tiles
are wgmma's register operand, and the decode of one tile overlaps the MMAs of the previous one.

Why: with about 32 pairs per expert (Mixtral-8x7B at 128 tokens) the Triton kernels of
:mod:`mxrun.kernels.moe_gemm` pick between two losses. 32-row blocks decode each weight tile once per block, so
every expert past 32 pairs decodes its weights a second time (~65 us a block on an H100); 64-row blocks
compile to wgmma with the decoded tile stored to shared memory and every K step serialized (decode, store,
barrier, MMA, wait), and run slower still. Triton's swapped-operand kernel
(:mod:`mxrun.kernels.moe_weight_rows_gemm`) already makes the decoded weight the MMA's left operand, which
wgmma reads from registers, but Triton waits for each MMA before the next decode. Written in Gluon, a program
(one warp group, or two sharing the activation tile)

* streams its weight tiles (64 gate and 64 up rows per warp group, 128 K per step, E4M3), their E8M0 codes
  and the gathered activation rows into a ring of ``STAGES`` shared-memory slots with ``cp.async``, the next
  step's copies in flight while this one computes;
* decodes each 64 x 64 weight quarter straight into wgmma's register-operand layout (the MX powers of two on
  the widening's bf16x2 multiply, as :func:`~mxrun.kernels.e4m3.e4m3_to_bf16_times` does) and issues its MMA
  asynchronously, so the next quarter's decode runs while the tensor cores work; it waits once per K step;
* takes an expert's ``BLOCK_M`` pairs (16 to 128) as the MMA's N: 64-row blocks at ~32 pairs per expert,
  where no expert spills; a block that is mostly padding (an expert's last) takes a narrower N
  (:data:`DECODED_WGMMA_TAIL_M`);
* in the ungated (down) GEMM, gives each warp group two sets of 64 weight rows, as the gate and up rows are in
  the gated one (:data:`DECODED_WGMMA_ROW_SETS`), so that each activation tile read serves 128 rows.

Offline (Triton 3.6, sm_90, the gated MX kernel at 64-row blocks, ``benchmarks/moe_gemm_sass.py --gluon
--block-m 64 --stages 2``): 181 registers, no stack, 66 KB of shared memory, 572 SASS instructions per 128-K
step of a warp (16 HGMMAs, the decode ~5 per element pair, 4 barriers; 185 and 568 before the row sets and
narrow blocks, when the measurements below were made). Measured and left out on an H100: three or four slots (66 -> 100 / 133 KB of shared memory;
Mixtral-8x7B at 128 tokens, one run, mxfp8-wo 663 -> 672 / 753 us, ``results/moe-gluon-stages-h100.json``),
and waiting for each gate/up quarter's MMA as soon as the next one is issued, which frees its operand
registers (147 instead of 185, three programs per SM) but moved the layer by at most 3% either way
(``results/moe-gluon-sweep-h100.json``). Also left out (commit d9488fa has it): for MXFP8 W8A8, re-encoding
each weight quarter in registers as E4M3 at its 128x128 tile's code (``regroup_mxfp8``'s bits) for FP8 MMAs
against 1x128 E4M3 activations, the aligned arithmetic without its pass over the stacks. Its GPU tests
passed, but the whole layer took more time than this kernel's bf16 path in every cell (DeepSeek-V3-like at
1024 / 8192 tokens 7736 / 24761 against 5420 / 18353 us, Mixtral-8x7B at 1024 2728 against 2091, Qwen3-30B-A3B
at 1024 664 against 584; ``bench_moe.py`` column ``mxfp8:inreg``, ``results/moe-inreg-regroup-h100.json``):
the re-encoding costs as many instructions per step as the widening (two conversions per pair instead of
one), every step's product needs its own scaled add, and with 128-row blocks the gate, up and product
accumulators spill.

The arithmetic is that of the other MoE kernels (the same exact operand values, fp32 accumulation,
per-channel scales in the epilogue, 128x128 block scales on each 128-K step's product, SiLU-and-mul and
routing weights in the epilogue); only the fp32 summation order differs.

Takes bf16 activations (weight-only, or MX values rounded beforehand), E4M3 weights per tensor, per channel
or in 128x128 blocks, or MXFP8 weights whose codes allow the folded decode
(:func:`~mxrun.kernels.e4m3.mx_scales_foldable`), K a multiple of 128. Needs CUDA sm_90 and Triton's Gluon;
:func:`decoded_wgmma_usable` says whether it can run and the launcher of :mod:`mxrun.kernels.moe_gemm` chooses
it where it measured faster (:func:`~mxrun.kernels.moe_gemm.moe_decoded_wgmma`), the Triton kernels
otherwise. Blackwell would get its own kernel (tcgen05 reads MX scales natively).
"""

from __future__ import annotations

import torch

from mxrun.kernels.backend import HAS_TRITON, cuda_major
from mxrun.kernels.e4m3 import _WIDEN_PAIR, _WIDEN_PAIR_TIMES
from mxrun.kernels.fp8_tma_gemm import tma_usable  # row alignment, sm_90+, no interpreter
from mxrun.kernels.scaled_gemm import GemmInputError

try:  # Gluon is experimental: the package works without it
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import async_copy
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared,
        warpgroup_mma,
        warpgroup_mma_wait,
    )
    from triton.runtime.jit import constexpr_function

    from mxrun.kernels.fp8_wgmma_gemm import HAS_GLUON as _WGMMA_GLUON  # its grouped_tile is shared

    HAS_GLUON = HAS_TRITON and _WGMMA_GLUON
except ImportError:  # pragma: no cover - depends on the installed Triton
    HAS_GLUON = False

DECODED_WGMMA_STAGES = 2
"""Shared-memory slots: ~33 KB each at 64 token rows with one warp group (two programs share an SM)."""
DECODED_WGMMA_GROUP_M = 8
"""Program order (:func:`tile_order`): 8 layout blocks per sweep over the column tiles. H100, whole layers, same
run each (``benchmarks/results/moe-gluon-order-h100.json`` and ``...-order-small-h100.json``, one-off drivers
of ``bench_moe.run`` as ``benchmarks/sweep_moe_gluon.py`` now is), against 0 (every block of the layout per
column tile): DeepSeek-V3-like at 1024 tokens mxfp8-wo 6177 -> 5487 us, fp8-channel-wo 5563 -> 4928; at 8192
mxfp8-wo 20945 -> 18622, fp8-channel-wo 19373 -> 17274 (the down GEMM's 268 MB of activations were read once
per column tile); Mixtral-8x7B at 16-1024 tokens and Qwen3-30B-A3B at 512-1024 within 3% either way. 16 measured
the same as 8; 3 slots instead of 2 gained nothing there (DeepSeek at 8192 with two warp groups, mxfp8 18361
against 18497 us)."""

DECODED_WGMMA_ROW_SETS = 2
"""Weight row sets per warp group in the ungated (down) GEMM: 2 gives each program 128 weight rows per warp
group, as the gated GEMM's gate and up rows are, so each gathered activation tile read from L2 meets twice the
weight rows (with one set the down GEMM read 32 KB of activations and 8 KB of weights per 1 M MACs). H100,
DeepSeek-V3-like at 8192 tokens, MXFP8: the down GEMM 6543 -> 5399 us (``benchmarks/profile_moe.py``,
``results/moe-profile-row-sets-h100.json``); whole layers, same run each (``benchmarks/sweep_moe_gluon.py
--setting decoded.DECODED_WGMMA_ROW_SETS --values 1 2 --shapes DeepSeek-V3-like Mixtral-8x7B Qwen3-30B-A3B
--tokens 128 1024 8192 --columns mxfp8 mxfp8-wo fp8-channel-wo``, ``results/moe-row-sets-h100.json``):
DeepSeek at 8192 mxfp8 18022 -> 16929 us, mxfp8-wo 18264 -> 17507; Qwen3-30B-A3B at 1024 5-6% faster;
Mixtral-8x7B at 1024 4% faster, at 8192 fp8-channel-wo 4% slower (13301 -> 13837); 128 tokens within 1%.
Not for 128x128 weight blocks by default: their step's product and two scaled accumulators spill (256 bytes
of stack, Triton 3.6, ``benchmarks/moe_gemm_sass.py --gluon --block-m 128 --down --weights fp8-block``)."""

DECODED_WGMMA_TAIL_M = 32
"""A layout block whose rows past this one (else past twice this one, where that is less than the block) are all
padding, as an expert's last block often is, runs MMAs of that N instead of the block's. With about 256 pairs
per expert and 128-row blocks (DeepSeek-V3-like at 8192 tokens) a fifth of the MMA work was padding, most of it
in third blocks of a few rows; the narrow program still decodes its whole weight tile (557 / 572 instructions
per step at 32 / 64 rows against 619, ``benchmarks/moe_gemm_sass.py --gluon --block-m 128 --tail-m 32``), so it
saves MMAs and activation reads, not the decode. 0 turns it off. H100, whole layers, 0 against 32 in the same run (``benchmarks/sweep_moe_gluon.py
--setting decoded.DECODED_WGMMA_TAIL_M --values 0 32 --shapes DeepSeek-V3-like Qwen3-30B-A3B Mixtral-8x7B
--tokens 128 1024 8192 --columns mxfp8 mxfp8-wo fp8-channel-wo``, ``results/moe-tail-cascade-h100.json``):
DeepSeek at 8192 mxfp8 16312 -> 15532 us, mxfp8-wo 16978 -> 16464 (fp8-channel-wo 15424 -> 15756), at 1024
mxfp8 5160 -> 4991; Qwen3-30B-A3B at 1024 (~64 pairs per expert: the 64-row MMA) 4-5% faster; Mixtral-8x7B at
128 mxfp8 675 -> 654; the rest within 2% (Mixtral's mxfp8 at 8192 runs the aligned path, which this does not
touch: 8903 -> 9406 there is the run's noise). One narrow size alone (16, 32 or 64, ``...-tail-h100.json``):
16 and 32 alike on DeepSeek at 8192, 64 best on Qwen3 at 1024, hence the two."""

if HAS_GLUON:
    from mxrun.kernels.fp8_wgmma_gemm import grouped_tile  # defined only where Gluon is

    @gluon.jit
    def tile_order(n_blocks, n_tiles, GROUP_M: gl.constexpr):
        """(layout block, column tile) of this program. ``GROUP_M`` 0: the blocks vary fastest over the whole
        layout, so a wave of programs shares each weight tile but a layout whose activations outgrow L2 is
        read again for every column tile. Else ``GROUP_M`` blocks at a time walk every column tile, so that
        their activation rows stay in L2 while the weight tiles stream (an expert's neighbouring blocks still
        share them)."""
        pid = gl.program_id(0)
        if GROUP_M == 0:
            pid_m = pid % n_blocks
            pid_n = pid // n_blocks
        else:
            pid_m, pid_n = grouped_tile(pid, n_blocks, n_tiles, GROUP_M)
        return pid_m, pid_n

    @gluon.jit
    def layout_rows(
        sorted_pairs_ptr,
        first,
        num_pairs,
        top_k,
        ROWS: gl.constexpr,
        layout: gl.constexpr,
        A_GATHER: gl.constexpr,
    ):
        """Layout rows ``first .. first + ROWS - 1``: their pair ids (padding read as pair 0), which are real,
        and the activation row each reads (``p // top_k`` when the tokens are gathered)."""
        pairs = gl.load(sorted_pairs_ptr + first + gl.arange(0, ROWS, layout=layout))
        row_ok = pairs < num_pairs
        pairs = gl.where(row_ok, pairs, 0)
        if A_GATHER:  # noqa: SIM108 - a constexpr branch
            a_rows = pairs // top_k
        else:
            a_rows = pairs
        return pairs, row_ok, a_rows

    @gluon.jit
    def _weight_rows(r, pid_n, N, ROWS: gl.constexpr, TILE_N: gl.constexpr, GATED: gl.constexpr):
        """For a program's weight rows ``r``: the output column each serves and the stack row it reads. Gated,
        the first ``ROWS`` are gate rows and the next ``ROWS`` the matching up rows (``N`` further down the
        stack); else ``TILE_N`` consecutive rows."""
        if GATED:
            n = pid_n * ROWS + (r % ROWS)
            rows = gl.where(r < ROWS, n, N + n)
        else:
            n = pid_n * TILE_N + r
            rows = n
        return n, rows

    @constexpr_function
    def _split_k_layout(linear, group):
        """A linear layout of ``[R, K]`` as one of ``[R, K / group, group]`` (``k = group * g + j``), so that
        a tensor of one value per (row, group) expands and reshapes into exactly the ``[R, K]`` layout."""

        def split(basis):
            return [basis[0], basis[1] // group, basis[1] % group]

        rows, cols = linear.shape
        return gl.DistributedLinearLayout(
            [split(b) for b in linear.reg_bases],
            [split(b) for b in linear.lane_bases],
            [split(b) for b in linear.warp_bases],
            [split(b) for b in linear.block_bases],
            [rows, cols // group, group],
        )

    @gluon.jit
    def _decode_quarter(
        w_smem,  # [16 * num_warps, 64] E4M3 in shared memory (64 rows per warp group)
        codes_smem,  # [16 * num_warps, 2] uint8 E8M0 codes (W_MODE 2), one per 32 K
        W_MODE: gl.constexpr,
        operand_layout: gl.constexpr,
    ):
        """One weight quarter (64 K) widened to bf16 in wgmma's register-operand layout (exact)."""
        ROWS: gl.constexpr = w_smem.shape[0]
        COLS: gl.constexpr = w_smem.shape[1]
        linear: gl.constexpr = gl.to_linear_layout(operand_layout, [ROWS, COLS])
        w = w_smem.load(linear).to(gl.float16)
        if W_MODE == 2:
            split: gl.constexpr = _split_k_layout(linear, 32)
            codes = codes_smem.load(gl.SliceLayout(2, split)).to(gl.int32)
            multiplier = ((codes + 112) << 7).to(gl.int16).to(gl.bfloat16, bitcast=True)  # 2^(e - 15)
            multiplier = gl.expand_dims(multiplier, 2).broadcast_to([ROWS, COLS // 32, 32])
            multiplier = gl.convert_layout(gl.reshape(multiplier, [ROWS, COLS]), linear, assert_trivial=True)
            out = gl.inline_asm_elementwise(
                _WIDEN_PAIR_TIMES, "=r,r,r", [w, multiplier], dtype=gl.bfloat16, is_pure=True, pack=2
            )
        else:
            out = gl.inline_asm_elementwise(_WIDEN_PAIR, "=r,r", [w], dtype=gl.bfloat16, is_pure=True, pack=2)
        return gl.convert_layout(out, operand_layout, assert_trivial=True)

    @gluon.jit
    def _issue_step(
        w_s,
        c_s,
        a_s,
        slot,
        kb,
        w_rows_ptrs,  # [W_ROWS, 64] pointers: gate rows, then up rows (gated), first K quarter
        w_rows_ok,
        code_ptrs,  # [C_ROWS, 4] pointers to the rows' first 4 codes
        code_rows_ok,
        a_ptrs,  # [BLOCK_M, 64] pointers to the gathered activation rows, first K quarter
        a_rows_ok,
        K,
        W_MODE: gl.constexpr,
    ):
        """Start copying K step ``kb`` (zeros where it lies past K) into ``slot``: both weight quarters of the
        gate (and up) rows, their codes, both activation quarters."""
        k0 = kb * 128
        live = k0 < K
        for q in gl.static_range(2):
            async_copy.async_copy_global_to_shared(
                w_s.index(slot * 2 + q), w_rows_ptrs + (k0 + q * 64), mask=w_rows_ok & live
            )
            async_copy.async_copy_global_to_shared(
                a_s.index(slot * 2 + q), a_ptrs + (k0 + q * 64), mask=a_rows_ok & live
            )
        if W_MODE == 2:
            async_copy.async_copy_global_to_shared(
                c_s.index(slot), code_ptrs + kb * 4, mask=code_rows_ok & live
            )

    @gluon.jit
    def _quarter(
        w_s, c_s, slot, q: gl.constexpr, up: gl.constexpr, W_MODE: gl.constexpr, operand_layout: gl.constexpr
    ):
        """Decode quarter ``q`` (K 64 q .. 64 q + 63 of the slot's step) of the gate (or ``up``) rows."""
        ROWS: gl.constexpr = 16 * gl.num_warps()
        codes = c_s.index(slot).slice(ROWS * up, ROWS).slice(2 * q, 2, dim=1)
        return _decode_quarter(w_s.index(slot * 2 + q).slice(ROWS * up, ROWS), codes, W_MODE, operand_layout)

    @gluon.jit
    def _step(
        w_s,
        c_s,
        a_s,
        slot,
        acc_g,
        acc_u,
        TWO_SETS: gl.constexpr,
        W_MODE: gl.constexpr,
        operand_layout: gl.constexpr,
    ):
        """One 128-K step accumulated in place (per-channel / per-tensor / MX weights): each quarter's decode
        overlaps the MMAs issued before it; one wait at the end (the operands stay alive until then).
        ``TWO_SETS``: the tile's second row set (the up rows, or the down GEMM's next rows) goes to ``acc_u``."""
        a0 = a_s.index(slot * 2).permute((1, 0))
        a1 = a_s.index(slot * 2 + 1).permute((1, 0))
        w_g0 = _quarter(w_s, c_s, slot, 0, 0, W_MODE, operand_layout)
        acc_g = warpgroup_mma(w_g0, a0, acc_g, is_async=True)
        if TWO_SETS:
            w_u0 = _quarter(w_s, c_s, slot, 0, 1, W_MODE, operand_layout)
            acc_u = warpgroup_mma(w_u0, a0, acc_u, is_async=True)
        w_g1 = _quarter(w_s, c_s, slot, 1, 0, W_MODE, operand_layout)
        acc_g = warpgroup_mma(w_g1, a1, acc_g, is_async=True)
        if TWO_SETS:
            w_u1 = _quarter(w_s, c_s, slot, 1, 1, W_MODE, operand_layout)
            acc_u = warpgroup_mma(w_u1, a1, acc_u, is_async=True)
            acc_g, acc_u, w_g0, w_g1, w_u0, w_u1 = warpgroup_mma_wait(
                0, deps=(acc_g, acc_u, w_g0, w_g1, w_u0, w_u1)
            )
        else:
            acc_g, w_g0, w_g1 = warpgroup_mma_wait(0, deps=(acc_g, w_g0, w_g1))
        return acc_g, acc_u

    @gluon.jit
    def _block_scaled_step(
        w_s, c_s, a_s, slot, acc_g, acc_u, partial, scale_g_ptr, scale_u_ptr, TWO_SETS: gl.constexpr,
        W_MODE: gl.constexpr, operand_layout: gl.constexpr,
    ):  # fmt: skip
        """One 128-K step with 128x128 weight blocks: the step is one K block and each row set of the program
        (64 or 128 rows) lies in one row block (the launcher checks N), so each product is multiplied by one
        scale before it is added (the other kernels' arithmetic). The second set's quarters are decoded while
        the first set's MMAs run."""
        a0 = a_s.index(slot * 2).permute((1, 0))
        a1 = a_s.index(slot * 2 + 1).permute((1, 0))
        scale_g = gl.load(scale_g_ptr)
        w_g0 = _quarter(w_s, c_s, slot, 0, 0, W_MODE, operand_layout)
        product = warpgroup_mma(w_g0, a0, partial, use_acc=False, is_async=True)
        w_g1 = _quarter(w_s, c_s, slot, 1, 0, W_MODE, operand_layout)
        product = warpgroup_mma(w_g1, a1, product, is_async=True)
        if TWO_SETS:
            scale_u = gl.load(scale_u_ptr)
            w_u0 = _quarter(w_s, c_s, slot, 0, 1, W_MODE, operand_layout)
            w_u1 = _quarter(w_s, c_s, slot, 1, 1, W_MODE, operand_layout)
        product, w_g0, w_g1 = warpgroup_mma_wait(0, deps=(product, w_g0, w_g1))
        acc_g = acc_g + product * scale_g
        if TWO_SETS:
            product = warpgroup_mma(w_u0, a0, partial, use_acc=False, is_async=True)
            product = warpgroup_mma(w_u1, a1, product, is_async=True)
            product, w_u0, w_u1 = warpgroup_mma_wait(0, deps=(product, w_u0, w_u1))
            acc_u = acc_u + product * scale_u
        return acc_g, acc_u

    @gluon.jit
    def _store_columns(
        acc, offs_n, N, out_pairs, pair_ok, routing, c_ptr, stride_cm, scale_base, stride_wsn,
        CHANNEL_SCALES: gl.constexpr, MUL_ROUTING: gl.constexpr,
    ):  # fmt: skip
        """Write one row set's accumulator (weight rows ``offs_n`` x pairs) into the output's columns
        ``offs_n``: per-channel (per-tensor) weight scales and routing weights applied first, where asked."""
        n_ok = offs_n < N
        if CHANNEL_SCALES:
            acc = acc * gl.load(scale_base + offs_n * stride_wsn, mask=n_ok, other=1.0)[:, None]
        if MUL_ROUTING:
            acc = acc * routing[None, :]
        c_ptrs = c_ptr + out_pairs.to(gl.int64)[None, :] * stride_cm + offs_n[:, None]
        gl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=n_ok[:, None] & pair_ok[None, :])

    @gluon.jit
    def _block_tile(
        a_ptr, w_ptr, w_scale_ptr, routing_ptr, c_ptr, sorted_pairs_ptr, num_pairs, N, K, top_k, stride_ar,
        stride_we, stride_wn, stride_wse, stride_wsn, stride_cm, expert, pid_m, pid_n,
        A_GATHER: gl.constexpr, W_MODE: gl.constexpr, GATED: gl.constexpr, ROW_SETS: gl.constexpr,
        MUL_ROUTING: gl.constexpr, BLOCK_M: gl.constexpr, LAYOUT_M: gl.constexpr, STAGES: gl.constexpr,
    ):  # fmt: skip
        """One program's work (the kernel's arguments as they are): the first ``BLOCK_M`` rows of layout block
        ``pid_m`` (of ``LAYOUT_M`` rows; the rest are padding when ``BLOCK_M`` is less) of ``expert``, column
        tile ``pid_n``."""
        ROWS: gl.constexpr = 16 * gl.num_warps()  # 64 per warp group
        QUARTER: gl.constexpr = 64
        TWO_SETS: gl.constexpr = GATED or ROW_SETS == 2
        TILE_N: gl.constexpr = ROWS if GATED else ROWS * ROW_SETS  # output columns per program
        W_ROWS: gl.constexpr = 2 * ROWS if TWO_SETS else ROWS  # first set (gate) rows, then second (up) rows
        C_ROWS: gl.constexpr = 2 * ROWS  # codes, 4 bytes per thread: one row set leaves the second half empty
        mma_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[gl.num_warps(), 1], instr_shape=[16, BLOCK_M, 16]
        )
        operand_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma_layout, k_width=2)
        w_copy: gl.constexpr = gl.BlockedLayout(
            [1, 16], [8, 4], [gl.num_warps(), 1], [1, 0]
        )  # 16-byte copies
        a_copy: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [gl.num_warps(), 1], [1, 0])
        c_copy: gl.constexpr = gl.BlockedLayout([1, 4], [32, 1], [gl.num_warps(), 1], [1, 0])
        w_shared: gl.constexpr = gl.NVMMASharedLayout.get_default_for([W_ROWS, QUARTER], gl.float8e4nv)
        a_shared: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M, QUARTER], gl.bfloat16)
        c_shared: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, order=[1, 0])

        w_s = gl.allocate_shared_memory(gl.float8e4nv, [2 * STAGES, W_ROWS, QUARTER], w_shared)
        a_s = gl.allocate_shared_memory(gl.bfloat16, [2 * STAGES, BLOCK_M, QUARTER], a_shared)
        c_s = gl.allocate_shared_memory(gl.uint8, [STAGES, C_ROWS, 4], c_shared)

        # Activation rows of this block (gathered), weight rows of this column tile, their codes.
        _, a_row_ok, a_rows = layout_rows(
            sorted_pairs_ptr, pid_m * LAYOUT_M, num_pairs, top_k, BLOCK_M, gl.SliceLayout(1, a_copy), A_GATHER
        )
        a_cols = gl.arange(0, QUARTER, layout=gl.SliceLayout(0, a_copy))
        # Row strides are multiples of 16 bytes (K % 128 == 0; the launcher checks A), written so that the
        # compiler sees it and copies 16 bytes (4 for the codes) at a time where it did not specialize them.
        a_ptrs = a_ptr + a_rows.to(gl.int64)[:, None] * (stride_ar // 8 * 8) + a_cols[None, :]
        a_rows_ok = a_row_ok[:, None] & (a_cols < QUARTER)[None, :]  # padding rows read as zeros

        n, w_rows = _weight_rows(
            gl.arange(0, W_ROWS, layout=gl.SliceLayout(1, w_copy)), pid_n, N, ROWS, TILE_N, GATED
        )
        w_cols = gl.arange(0, QUARTER, layout=gl.SliceLayout(0, w_copy))
        w_base = w_ptr + expert * (stride_we // 16 * 16)
        w_rows_ptrs = w_base + w_rows.to(gl.int64)[:, None] * (stride_wn // 16 * 16) + w_cols[None, :]
        w_rows_ok = (n < N)[:, None] & (w_cols < QUARTER)[None, :]
        rc = gl.arange(0, C_ROWS, layout=gl.SliceLayout(1, c_copy))
        nc, c_rows = _weight_rows(rc, pid_n, N, ROWS, TILE_N, GATED)
        c_cols = gl.arange(0, 4, layout=gl.SliceLayout(0, c_copy))
        code_base = w_scale_ptr + expert * (stride_wse // 4 * 4)
        code_ptrs = code_base + c_rows.to(gl.int64)[:, None] * (stride_wsn // 4 * 4) + c_cols[None, :]
        CODE_ROWS: gl.constexpr = C_ROWS if TWO_SETS else ROWS
        code_rows_ok = ((nc < N) & (rc < CODE_ROWS))[:, None] & (c_cols < 4)[None, :]

        k_steps = K // 128
        for i in gl.static_range(STAGES - 1):
            _issue_step(
                w_s, c_s, a_s, i, i, w_rows_ptrs, w_rows_ok, code_ptrs, code_rows_ok, a_ptrs, a_rows_ok,
                K, W_MODE,
            )  # fmt: skip
            async_copy.commit_group()

        acc_g = gl.zeros([ROWS, BLOCK_M], gl.float32, mma_layout)
        acc_u = gl.zeros([ROWS, BLOCK_M], gl.float32, mma_layout)
        partial = gl.zeros([ROWS, BLOCK_M], gl.float32, mma_layout)  # W_MODE 1: one step's product
        # W_MODE 1: the scales of the row blocks of the program's two row sets, one per K step (a second
        # set past N reads the last block's: its rows are zeros)
        first_row = pid_n * TILE_N
        second_row = N + first_row if GATED else gl.minimum(first_row + ROWS, N - 1)
        block_scale_g = w_scale_ptr + expert * stride_wse + (first_row // 128) * stride_wsn
        block_scale_u = w_scale_ptr + expert * stride_wse + (second_row // 128) * stride_wsn
        for kb in range(k_steps):
            _issue_step(
                w_s, c_s, a_s, (kb + STAGES - 1) % STAGES, kb + STAGES - 1, w_rows_ptrs, w_rows_ok,
                code_ptrs, code_rows_ok, a_ptrs, a_rows_ok, K, W_MODE,
            )  # fmt: skip
            async_copy.commit_group()
            async_copy.wait_group(STAGES - 1)  # this thread's copies of step kb have landed
            fence_async_shared()
            gl.thread_barrier()  # ... and every thread's
            slot = kb % STAGES
            if W_MODE == 1:
                acc_g, acc_u = _block_scaled_step(
                    w_s, c_s, a_s, slot, acc_g, acc_u, partial, block_scale_g + kb, block_scale_u + kb,
                    TWO_SETS, W_MODE, operand_layout,
                )  # fmt: skip
            else:
                acc_g, acc_u = _step(w_s, c_s, a_s, slot, acc_g, acc_u, TWO_SETS, W_MODE, operand_layout)
        async_copy.wait_group(0)

        rows_layout: gl.constexpr = gl.SliceLayout(1, mma_layout)
        cols_layout: gl.constexpr = gl.SliceLayout(0, mma_layout)
        offs_n = pid_n * TILE_N + gl.arange(0, ROWS, layout=rows_layout)
        n_ok = offs_n < N
        out_pairs = gl.load(sorted_pairs_ptr + pid_m * LAYOUT_M + gl.arange(0, BLOCK_M, layout=cols_layout))
        pair_ok = out_pairs < num_pairs
        if MUL_ROUTING:
            routing = gl.load(routing_ptr + out_pairs, mask=pair_ok, other=0.0).to(gl.float32)
        else:
            routing = gl.zeros([BLOCK_M], gl.float32, cols_layout)
        scale_base = w_scale_ptr + expert * stride_wse
        if GATED:
            if W_MODE == 0:
                acc_g = acc_g * gl.load(scale_base + offs_n * stride_wsn, mask=n_ok, other=1.0)[:, None]
                acc_u = acc_u * gl.load(scale_base + (N + offs_n) * stride_wsn, mask=n_ok, other=1.0)[:, None]
            acc = acc_g / (1.0 + gl.exp(-acc_g)) * acc_u  # SiLU(gate) * up, fp32
            _store_columns(acc, offs_n, N, out_pairs, pair_ok, routing, c_ptr, stride_cm, scale_base,
                           stride_wsn, False, MUL_ROUTING)  # fmt: skip
        else:
            _store_columns(acc_g, offs_n, N, out_pairs, pair_ok, routing, c_ptr, stride_cm, scale_base,
                           stride_wsn, W_MODE == 0, MUL_ROUTING)  # fmt: skip
            if ROW_SETS == 2:
                _store_columns(acc_u, offs_n + ROWS, N, out_pairs, pair_ok, routing, c_ptr, stride_cm,
                               scale_base, stride_wsn, W_MODE == 0, MUL_ROUTING)  # fmt: skip

    @gluon.jit(do_not_specialize=["num_pairs", "n_rows_layout"])
    def moe_decoded_wgmma_kernel(
        a_ptr,  # A_GATHER: [T, K] bf16 (row of pair p is p // top_k), else [S, K]; (r, k) at r*stride_ar + k
        w_ptr,  # [E, N_W, K] float8e4nv, K contiguous; (e, n, k) at e*stride_we + n*stride_wn + k
        w_scale_ptr,  # W_MODE 0: fp32 [E, N_W] at e*stride_wse + n*stride_wsn (stride_wsn 0: per expert);
        #               W_MODE 1: fp32 [E, N_W/128, K/128] at e*stride_wse + i*stride_wsn + g (128 | N_W: a
        #               program's rows lie in one row block); W_MODE 2: uint8 E8M0 [E, N_W, K/32] at
        #               e*stride_wse + n*stride_wsn + g
        routing_ptr,  # MUL_ROUTING: [S] routing weight of each pair; else unused
        c_ptr,  # [S, N] bf16 output, row = pair id; (p, n) at p*stride_cm + n
        sorted_pairs_ptr,  # int32 [n_blocks * BLOCK_M]: pair id at each row of the layout, >= S on padding
        block_expert_ptr,  # int32 [n_blocks]: expert of each BLOCK_M rows, -1 for unused blocks
        num_pairs,
        n_rows_layout,
        N,  # output columns (I for the gated variant, whose weight has N_W = 2I rows)
        K,  # a multiple of 128
        top_k,
        stride_ar,
        stride_we,
        stride_wn,
        stride_wse,
        stride_wsn,
        stride_cm,
        A_GATHER: gl.constexpr,
        W_MODE: gl.constexpr,  # 0 per-channel / per-expert (epilogue); 1 128x128 blocks (per step); 2 MXFP8
        GATED: gl.constexpr,
        ROW_SETS: gl.constexpr,  # ungated: weight row sets of ROWS per program (2: two accumulators)
        MUL_ROUTING: gl.constexpr,
        BLOCK_M: gl.constexpr,  # layout rows (pairs of one expert): the MMA's N
        STAGES: gl.constexpr,
        GROUP_M: gl.constexpr,  # program order (tile_order)
        TAIL_M: gl.constexpr,  # 0, or blocks with only padding from this row (or twice it) on run that MMA N
    ):
        """One program: 64 weight rows per warp group (and as many up rows, or with ``ROW_SETS`` 2 the next
        64 rows of an ungated GEMM) x BLOCK_M pairs of one expert, transposed; K steps of 128."""
        ROWS: gl.constexpr = 16 * gl.num_warps()  # 64 per warp group
        TILE_N: gl.constexpr = ROWS if GATED else ROWS * ROW_SETS  # output columns per program
        pid_m, pid_n = tile_order(n_rows_layout // BLOCK_M, gl.cdiv(N, TILE_N), GROUP_M)
        block_expert = gl.load(block_expert_ptr + pid_m)
        if block_expert >= 0:
            expert = block_expert.to(gl.int64)
            # Blocks with only padding past row TAIL_M (or 2 TAIL_M, where that is less than BLOCK_M) run the
            # MMAs of that N: an expert's last block is often a few rows.
            WIDER_M: gl.constexpr = 2 * TAIL_M if 2 * TAIL_M < BLOCK_M else BLOCK_M
            first_row = pid_m * BLOCK_M
            if TAIL_M == 0:
                _block_tile(
                    a_ptr, w_ptr, w_scale_ptr, routing_ptr, c_ptr, sorted_pairs_ptr, num_pairs, N, K, top_k,
                    stride_ar, stride_we, stride_wn, stride_wse, stride_wsn, stride_cm, expert, pid_m, pid_n,
                    A_GATHER, W_MODE, GATED, ROW_SETS, MUL_ROUTING, BLOCK_M, BLOCK_M, STAGES,
                )  # fmt: skip
            elif gl.load(sorted_pairs_ptr + first_row + TAIL_M) >= num_pairs:
                _block_tile(
                    a_ptr, w_ptr, w_scale_ptr, routing_ptr, c_ptr, sorted_pairs_ptr, num_pairs, N, K, top_k,
                    stride_ar, stride_we, stride_wn, stride_wse, stride_wsn, stride_cm, expert, pid_m, pid_n,
                    A_GATHER, W_MODE, GATED, ROW_SETS, MUL_ROUTING, TAIL_M, BLOCK_M, STAGES,
                )  # fmt: skip
            elif WIDER_M < BLOCK_M and gl.load(sorted_pairs_ptr + first_row + WIDER_M) >= num_pairs:
                _block_tile(
                    a_ptr, w_ptr, w_scale_ptr, routing_ptr, c_ptr, sorted_pairs_ptr, num_pairs, N, K, top_k,
                    stride_ar, stride_we, stride_wn, stride_wse, stride_wsn, stride_cm, expert, pid_m, pid_n,
                    A_GATHER, W_MODE, GATED, ROW_SETS, MUL_ROUTING, WIDER_M, BLOCK_M, STAGES,
                )  # fmt: skip
            else:
                _block_tile(
                    a_ptr, w_ptr, w_scale_ptr, routing_ptr, c_ptr, sorted_pairs_ptr, num_pairs, N, K, top_k,
                    stride_ar, stride_we, stride_wn, stride_wse, stride_wsn, stride_cm, expert, pid_m, pid_n,
                    A_GATHER, W_MODE, GATED, ROW_SETS, MUL_ROUTING, BLOCK_M, BLOCK_M, STAGES,
                )  # fmt: skip


def decoded_wgmma_usable(a: torch.Tensor, k: int, block_m: int) -> bool:
    """Gluon importable, an sm_90 GPU, bf16 activations whose rows are 16-byte aligned, K a multiple of 128
    and a layout block of 16-128 rows (the MMA's N; the gate and up accumulators of more would not fit beside
    the decoded tiles)."""
    if not (HAS_GLUON and a.dtype == torch.bfloat16 and 16 <= block_m <= 128 and k % 128 == 0):
        return False
    return tma_usable(a) and cuda_major(a.device) == 9


def moe_decoded_wgmma_gemm(
    a: torch.Tensor,
    w_data: torch.Tensor,
    w_scale: torch.Tensor,
    w_mode: int,
    sorted_pair_ids: torch.Tensor,
    block_expert: torch.Tensor,
    num_pairs: int,
    block_m: int,
    out: torch.Tensor,
    *,
    gated: bool,
    gather_top_k: int | None,
    routing_weights: torch.Tensor | None = None,
    stages: int | None = None,
    warps: int = 4,
    group_m: int | None = None,
    row_sets: int | None = None,
    tail_m: int | None = None,
) -> torch.Tensor:
    """One grouped GEMM (the contract of :func:`~mxrun.kernels.moe_gemm.moe_grouped_gemm_triton`, which
    checks the operands and calls this where :func:`decoded_wgmma_usable` holds): ``w_data`` E4M3 ``[E, N_W,
    K]`` with ``w_scale`` fp32 ``[E, N_W, 1]`` / ``[E, 1, 1]`` (``w_mode`` 0), fp32 128x128 block scales
    ``[E, N_W/128, K/128]`` with N a multiple of ``16 * warps`` (``w_mode`` 1) or E8M0 codes ``[E, N_W,
    K/32]`` whose every code allows the folded decode (``w_mode`` 2), ``a`` bf16 read at row
    ``p // gather_top_k`` (or ``p``), the layout ``sorted_pair_ids`` / ``block_expert`` of ``block_m`` rows;
    writes ``out`` ``[S, N]``. ``warps``: 4 (one warp group, 64 weight rows per program) or 8 (two, 128 rows
    sharing each activation tile). ``stages``, ``group_m``: the ring's slots and the program order;
    ``row_sets``: weight row sets per warp group of an ungated GEMM, 1 or 2; ``tail_m``: the MMA N of blocks
    with nothing but padding past that row, 0 for none (defaults: the module's :data:`DECODED_WGMMA_STAGES`,
    :data:`DECODED_WGMMA_GROUP_M`, :data:`DECODED_WGMMA_ROW_SETS` and :data:`DECODED_WGMMA_TAIL_M`, read at
    each call)."""
    _, n_w, k = w_data.shape
    n = n_w // 2 if gated else n_w
    if warps not in (4, 8) or (w_mode == 1 and n % (16 * warps)):
        raise GemmInputError(
            f"moe_decoded_wgmma_gemm: {warps} warps with N={n} (4 or 8 warps; block scales need N a multiple "
            f"of 16 x warps)"
        )
    if gated or (row_sets is None and w_mode == 1):
        row_sets = 1
    elif row_sets is None:
        row_sets = DECODED_WGMMA_ROW_SETS
    if row_sets not in (1, 2):
        raise GemmInputError(f"moe_decoded_wgmma_gemm: row_sets={row_sets} (1 or 2)")
    tail_m = DECODED_WGMMA_TAIL_M if tail_m is None else tail_m
    if tail_m not in (0, 16, 32, 64):
        raise GemmInputError(f"moe_decoded_wgmma_gemm: tail_m={tail_m} (0, 16, 32 or 64)")
    if w_mode == 0:
        stride_wse, stride_wsn = w_scale.stride(0), (w_scale.stride(1) if w_scale.shape[1] > 1 else 0)
    else:
        if w_mode == 2:
            w_scale = w_scale.view(torch.uint8)
        stride_wse, stride_wsn = w_scale.stride(0), w_scale.stride(1)
    n_rows_layout = sorted_pair_ids.numel()
    grid = (n_rows_layout // block_m * -(-n // (16 * warps * row_sets)),)
    moe_decoded_wgmma_kernel[grid](
        a, w_data, w_scale, routing_weights if routing_weights is not None else w_scale, out,
        sorted_pair_ids, block_expert, num_pairs, n_rows_layout, n, k, gather_top_k or 1,
        a.stride(0), w_data.stride(0), w_data.stride(1), stride_wse, stride_wsn, out.stride(0),
        A_GATHER=gather_top_k is not None, W_MODE=w_mode, GATED=gated, ROW_SETS=row_sets,
        MUL_ROUTING=routing_weights is not None, BLOCK_M=block_m, STAGES=DECODED_WGMMA_STAGES if stages is None else stages,
        GROUP_M=DECODED_WGMMA_GROUP_M if group_m is None else group_m,
        TAIL_M=tail_m if tail_m < block_m else 0, num_warps=warps,
    )  # fmt: skip
    return out


__all__ = [
    "DECODED_WGMMA_GROUP_M",
    "DECODED_WGMMA_ROW_SETS",
    "DECODED_WGMMA_STAGES",
    "DECODED_WGMMA_TAIL_M",
    "HAS_GLUON",
    "decoded_wgmma_usable",
    "moe_decoded_wgmma_gemm",
]
