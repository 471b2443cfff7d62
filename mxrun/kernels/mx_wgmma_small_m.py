"""MXFP8 W8A8 for one to sixteen rows on Hopper (routed at one to four): E4M3 codes on both sides of an FP8
``wgmma``, each 32-wide MX group's product in its own accumulator column, so no weight element passes through the
SMs' ALUs.

The split-K kernel (:mod:`mxrun.kernels.small_m_gemm`) widens every weight element to bf16 with its power of two
folded in, and at these rows it is bound by the instructions that takes, not by memory (on an H200, 8B
``gate_up`` at M = 1: 42.3 us for the Linear, against 31.4 for the FP8 W8A8 split-K GEMM on E4M3 codes and
56.5 for bf16; ``benchmarks/small_m_mx_wgmma.py``, ``results/small-m-mx-wgmma-groups-h200.log``). Here the
product is computed transposed, ``C^T = W X^T``: a 64-row weight tile, brought by TMA into a ring of
shared-memory slots, is the MMA's A operand, and the activation side is block-diagonal. Row ``4 m + j`` of the
spread activations holds row ``m``'s E4M3 codes of the groups ``g`` with ``g % 4 == j`` and zeros elsewhere
(:func:`spread_activation_codes`; written so by :func:`_mx_spread_quantize_kernel`), so one ``m64nRk128`` MMA
per 128-wide K step gives, in accumulator column ``4 m + j``, row ``m``'s product over that step's group ``j``
alone. Each column is scaled by its two powers of two (the weight row's and the activation row's, of its group)
and added into an fp32 accumulator of the same shape: one multiply and one multiply-add per accumulator element
and step, 4 to 32 per thread, against 64 weight elements per thread and step. The accumulator is viewed as
``[64, M, 4]`` (weight row, activation row, group), so each step's scale codes are loaded once per weight row and
group and once per activation row and group, and broadcast (one load per column made four rows up to 1.4x
slower than the split-K decode). The rows' sums over their four columns come once, at the end.

Measured first and dropped (commit e9c929e, the same benchmark): one ``m64n8k32`` MMA per group into its own
registers, the four of a step issued together and waited for one by one, each scaled and added while the later
ones run. The MMAs and waits cost nothing (products added unscaled: 30.4 us on 8B ``gate_up``, the codes
GEMM's speed), but scaling four groups x the padded MMA width per step did: 41.1 us, no faster than today's
path. The block-diagonal layout does a quarter of that work at M = 1 (33.1 us before the scale codes were
loaded a step ahead). Tried again for 5-16 rows on compact activations (commit 962fa09, codes a step ahead,
activation scales as fp32 factors): at 16 rows no faster than the split-K decode (8B ``gate_up`` 41.6 against 42.6
us, 70B ``down`` 89.3 against 73.2; ``results/mx-rows-groups-h200.log``), so five rows and more stay there. Also
dropped (commit 1958a05): each program MX-quantizing its own K steps into shared memory at one and two rows, in
place of the quantize launch. The same bits, but slower on all 14 cases (8B ``gate_up`` 38.8 against 33.1 us,
``results/mx-rows-in-loop-h200.log``): the loads, the quantize and the barrier before each MMA sit on every step's
path.

Measured, the whole MXFP8 Linear at M = 1 (the quantize and the GEMM, box-major weight, CUDA-graph replays; H200,
``sweep_linear_setting.py --setting mxrows.MX_ROWS_GEMM --values 0 1 --ms 1``, ``results/mx-rows-settings-h200.log``),
us, split-K decode path -> this kernel (bf16): 8B ``qkv`` 11.9 -> 10.3 (14.2), ``o`` 9.1 -> 8.9 (10.2), ``gate_up``
42.4 -> 32.6 (54.9), ``down`` 22.7 -> 21.1 (31.5); 70B ``qkv`` 30.5 -> 27.5 (46.2), ``gate_up`` 133.2 -> 117.1
(211.6), ``down`` 71.6 -> 65.2 (110.4). The FP8 W8A8 GEMM on E4M3 codes with per-channel scales, the bound for any
FP8-MMA path, took 31.5 on 8B ``gate_up`` (``small_m_mx_wgmma.py``, ``results/small-m-mx-wgmma-rows-h200.log``, with
four stages). The Linear routes here where it won: :func:`mx_rows_fits`.

Every product of codes is exact in fp32, and so is each power of two; the FP8 ``wgmma`` accumulator rounds each
step's sum to ~14 mantissa bits (see ``tests/kernels/test_scaled_gemm.py``), once per 32-wide group here, as in
mxrun's other FP8 GEMMs with their promotion every 128 K.

K is split across programs where the column blocks alone would leave SMs idle; each writes its rows' fp32
partial sums and counts itself in on its column block's counter, and the last to arrive adds the splits in
split order (deterministic), adds the bias and casts: one launch after the quantize, launched as its programmatic
dependent (:data:`PDL`), with two steps' MMAs in flight at one and two rows (:data:`PAIRS`).

Needs CUDA sm_90 and Triton's Gluon; there is no interpreter path (Gluon has none), so the quantize kernel is
tested on CPU and the GEMM on the GPU.
"""

from __future__ import annotations

import functools

import torch

from mxrun.kernels.backend import (
    cuda_major,
    gdc_launch_dependents,
    gdc_wait,
    pdl_usable,
    tl,
    triton,
    triton_interpreting,
)
from mxrun.kernels.box_major import BoxMajorWeight
from mxrun.kernels.fp8_wgmma_gemm import HAS_GLUON
from mxrun.kernels.mxfp8_gemm import e8m0_to_fp32
from mxrun.kernels.mxfp8_quantize import E4m3Cast, MxScaleRule, mx_group_codes, resolve_cast
from mxrun.kernels.scaled_gemm import GemmInputError
from mxrun.kernels.workspace import zeroed_int32

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

MX_ROWS_MAX_M = 16
"""Rows this kernel takes: 4 M accumulator columns, rounded up to 8, 16, 32 or 64 (the MMA's N side)."""
BLOCK_N = 64
"""Weight rows per program: one warp group's ``wgmma`` M side (and the box-major weight's box)."""
BLOCK_K = 128
"""K per pipeline step: four MX groups, one MMA."""
STAGES = 3
"""TMA slots in flight per program: three measured x0.943 the time of four at M = 1, faster on all 7 Llama shapes
(H200, ``sweep_linear_setting.py --setting mxrows.STAGES``, ``results/mx-rows-settings-h200.log``); 70B
``gate_up``'s 896 column blocks then fit one wave."""
TARGET_PROGRAMS = 528
"""Programs per launch the split of K aims at (four per SM on a 132-SM H100/H200; 1056 measured the same)."""
QUANTIZE_BLOCK_K = 512
"""Columns per program of the spread quantize."""
PAIRS = True
"""Two K steps' MMAs in flight before the first is waited for, on :data:`PAIR_STAGES` slots, at one and two rows
(8 MMA columns) where the launch's programs fit one wave (at most :data:`TARGET_PROGRAMS`) and K's steps are even
(each split's then are too). H200, the Linear (``sweep_linear_setting.py --setting mxrows.PAIRS --values 0 1 --ms
1 2 4``, ``results/mx-rows-pairs-h200.log``): at one and two rows 8B ``qkv`` and ``down`` and 70B ``qkv`` and
``down`` 5-13% faster, 8B ``o`` and both ``gate_up`` level (70B ``gate_up``'s 896 programs do not fit one wave
at four slots, and were 18% slower with them in ``results/mx-rows-variants-h200.log``); at four rows (16 columns)
slower on 5 of 7, so not there."""
PAIR_STAGES = 4
"""TMA slots per program with :data:`PAIRS`: the loads run two steps (one pair) ahead."""
PDL = True
"""The GEMM as a programmatic dependent launch of the spread quantize (sm_90): its programs start, and fetch their
first weight tiles, while the quantize runs, and wait for its results before they read the activations. H200, the
Linear at one and four rows (``sweep_linear_setting.py --setting mxrows.PDL --values 0 1 --ms 1 4``,
``results/mx-rows-pdl-h200.log``): x0.988 the time, faster in 23 of 28."""

MX_ROWS_GEMM = True
"""Whether MXFP8 W8A8 Linears take this kernel where :func:`mx_rows_preferred` (else the split-K kernel's MX
decode)."""
MX_ROWS_ROUTED_M = 4
"""Rows up to which the Linear takes this kernel. On the H200 (``benchmarks/sweep_linear_setting.py --setting
mxrows.MX_ROWS_GEMM`` and ``mxrows.MX_ROWS_ROUTED_M``) it was faster than the split-K decode at one row on all 7
Llama shapes (x0.889 the time warm, x0.923 with the weights from DRAM; ``results/mx-rows-settings-h200.log``) and,
since the scale codes are loaded once per row and group, at three and four rows too (x0.913, faster in 27 of 28,
``results/mx-rows-routed-m4-h200.log``). From five rows (32 and 64 MMA columns) it lost on 6 of 7 shapes at 8 rows
and 7 of 7 at 16 (``benchmarks/small_m_mx_wgmma.py --ms 1 4 8 16``, ``results/mx-rows-variants-h200.log``): the
spread activation tile, read from L2 by every column block's programs, grows to the weight tile's size."""
MX_ROWS_MIN_WEIGHT = 24 << 20
"""Weight elements (N x K) from which the Linear takes this kernel: the one layer smaller than this among the
Llama shapes, 8B ``o`` (16 Mi), lost to the split-K path's single launch with its weights from DRAM (x1.09 the
time; with the changes since, x1.036 at one to four rows, though x0.946 warm: ``results/mx-rows-minw-*-h200.log``)."""


@triton.jit
def _mx_spread_quantize_kernel(
    x_ptr,  # [M, K] bf16/fp16/fp32 activations
    spread_ptr,  # [4 M, K] uint8: E4M3 codes, block-diagonal (see spread_activation_codes)
    scale_ptr,  # [M, K/32] uint8 E8M0 codes
    M,
    K,
    stride_xm,
    ROUND_UP: tl.constexpr,
    SOFT_CAST: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_K: tl.constexpr,
    LAUNCH_DEPENDENTS: tl.constexpr = False,  # let the GEMM, a programmatic dependent launch, start (sm_90)
):
    """MX-quantize ``BLOCK_K`` columns of every row (the quantize kernel's rule and cast, so the same bits) and
    write each group's codes into its row of the spread layout, zeros into the other three."""
    if LAUNCH_DEPENDENTS:
        gdc_launch_dependents()
    GROUPS: tl.constexpr = BLOCK_K // 32
    rows = tl.arange(0, ROWS)
    cols = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    row_ok = rows < M
    x = tl.load(
        x_ptr + rows.to(tl.int64)[:, None] * stride_xm + cols[None, :],
        mask=row_ok[:, None] & (cols < K)[None, :],
        other=0.0,
    )
    codes, _, q = mx_group_codes(tl.reshape(x, [ROWS, GROUPS, 32]), ROUND_UP, SOFT_CAST)
    groups = tl.program_id(0) * GROUPS + tl.arange(0, GROUPS)
    group_ok = groups * 32 < K
    tl.store(
        scale_ptr + rows.to(tl.int64)[:, None] * (K // 32) + groups[None, :],
        codes.to(tl.uint8),
        mask=row_ok[:, None] & group_ok[None, :],
    )
    q = q.to(tl.uint8)
    offs = groups[None, :, None] * 32 + tl.arange(0, 32)[None, None, :]
    ok = row_ok[:, None, None] & group_ok[None, :, None]
    for j in tl.static_range(4):
        values = tl.where((groups % 4 == j)[None, :, None], q, 0).to(tl.uint8)
        spread_rows = (rows.to(tl.int64) * 4 + j) * K
        tl.store(spread_ptr + spread_rows[:, None, None] + offs, values, mask=ok)


if HAS_GLUON:

    @gluon.jit
    def _step_codes(ws_tile, w_ok, j_w, xs_tile, x_ok, j_x, step, groups_total):
        """The E8M0 codes of K step ``step``'s four groups: the weight's ``[BLOCK_N, 4]`` and the activations'
        ``[ROWS, 4]``, each in the slice of the accumulator's 3-D layout it broadcasts along (1.0's code past K
        or past the rows). One load per weight row and group, not one per accumulator column."""
        group = step * 4
        cw = gl.load(ws_tile + group, mask=w_ok & gl.expand_dims(group + j_w < groups_total, 0), other=127)
        cx = gl.load(xs_tile + group, mask=x_ok & gl.expand_dims(group + j_x < groups_total, 0), other=127)
        return cw, cx

    @gluon.jit
    def _load_weight(w_desc, w_s, ready, off_n, step, slot, k_steps, x_bytes, BOX_MAJOR: gl.constexpr):
        """TMA the weight tile of K step ``step`` into ``slot`` (the program's own step count modulo the stages,
        not ``step``'s: a split need not start at a multiple of them); the slot's barrier expects the activation
        tile too (:func:`_load_x`)."""
        BLOCK_N: gl.constexpr = w_s.shape[1]
        BLOCK_K: gl.constexpr = w_s.shape[2]
        bar = ready.index(slot)
        mbarrier.expect(bar, w_desc.block_type.nbytes + x_bytes)
        if BOX_MAJOR:  # box (column block, K step) is one [BLOCK_N, BLOCK_K] run of rows
            tma.async_copy_global_to_shared(
                w_desc, [(off_n // BLOCK_N * k_steps + step) * BLOCK_N, 0], bar, w_s.index(slot)
            )
        else:
            tma.async_copy_global_to_shared(w_desc, [off_n, step * BLOCK_K], bar, w_s.index(slot))

    @gluon.jit
    def _load_x(x_desc, x_s, ready, step, slot):
        """TMA the spread activation tile of K step ``step`` into ``slot``."""
        BLOCK_K: gl.constexpr = x_s.shape[2]
        tma.async_copy_global_to_shared(x_desc, [0, step * BLOCK_K], ready.index(slot), x_s.index(slot))

    @gluon.jit
    def _load_step(w_desc, x_desc, w_s, x_s, ready, off_n, step0, s, k_steps, BOX_MAJOR: gl.constexpr):
        """Both tiles of the program's step ``s`` (K step ``step0 + s``) into its slot."""
        slot = s % w_s.shape[0]
        _load_weight(w_desc, w_s, ready, off_n, step0 + s, slot, k_steps, x_desc.block_type.nbytes, BOX_MAJOR)
        _load_x(x_desc, x_s, ready, step0 + s, slot)

    @gluon.jit
    def _mma_step(w_s, x_s, ready, zero, s, STAGES: gl.constexpr):
        """Wait for step ``s``'s tiles and start its MMA into fresh registers."""
        slot = s % STAGES
        mbarrier.wait(ready.index(slot), (s // STAGES) & 1)
        x_t = x_s.index(slot).permute((1, 0))
        return warpgroup_mma(w_s.index(slot), x_t, zero, use_acc=False, is_async=True)

    @gluon.jit
    def _scaled_add(acc, product, cw, cx):
        """``acc`` plus the step's product, each (weight row, activation row, group) element times its two
        powers of two: one multiply for the factor, one multiply-add."""
        factor = gl.expand_dims(e8m0_to_fp32(cw), 1) * gl.expand_dims(e8m0_to_fp32(cx), 0)
        return gl.reshape(product, acc.shape) * factor + acc

    @gluon.jit
    def _store_rows(total, rows, ms, ok, N, bias_ptr, c_ptr, stride_cm, HAS_BIAS: gl.constexpr):
        """The output rows: ``total`` ``[BLOCK_N, ROWS]`` (weight row, activation row) plus the bias, cast."""
        if HAS_BIAS:
            total += gl.expand_dims(gl.load(bias_ptr + rows, mask=rows < N, other=0.0).to(gl.float32), 1)
        at = gl.expand_dims(ms.to(gl.int64) * stride_cm, 0) + gl.expand_dims(rows, 1)
        gl.store(c_ptr + at, total.to(c_ptr.dtype.element_ty), mask=ok)

    @gluon.jit(do_not_specialize=["M", "N", "K"])
    def _mx_rows_kernel(
        w_desc,  # [N, K] E4M3 weight codes, boxes [BLOCK_N, BLOCK_K]; BOX_MAJOR: the box-major tensor
        x_desc,  # [4 M, K] spread activation codes, boxes [R, BLOCK_K] (rows past 4 M: zeros)
        ws_ptr,  # [N, K/32] uint8 E8M0 weight scales
        xs_ptr,  # [M, K/32] uint8 E8M0 activation scales
        bias_ptr,
        c_ptr,  # [M, N] output (row stride stride_cm)
        part_ptr,  # SPLIT: [splits, M, N] fp32 partial sums
        count_ptr,  # SPLIT: int32 [cdiv(N, BLOCK_N)] arrival counters, zero before and after each launch
        M,
        N,
        K,
        stride_wsn,
        stride_cm,
        steps_per_split,
        splits,
        STAGES: gl.constexpr,
        PAIRS: gl.constexpr,
        BOX_MAJOR: gl.constexpr,
        SPLIT: gl.constexpr,
        HAS_BIAS: gl.constexpr,
        WAIT_PRIOR: gl.constexpr,
    ):
        BLOCK_N: gl.constexpr = w_desc.block_type.shape[0]
        BLOCK_K: gl.constexpr = w_desc.block_type.shape[1]
        R: gl.constexpr = x_desc.block_type.shape[0]
        ROWS: gl.constexpr = R // 4
        # PAIRS: two steps' MMAs in flight before the first is waited for; loads run STAGES - 2 steps ahead
        AHEAD: gl.constexpr = STAGES - 2 if PAIRS else STAGES - 1
        layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[gl.num_warps(), 1], instr_shape=[16, R, 32]
        )
        pid_n = gl.program_id(0)
        split = gl.program_id(1)
        off_n = pid_n * BLOCK_N
        k_steps = gl.cdiv(K, BLOCK_K)
        step0 = split * steps_per_split
        n_steps = gl.minimum(steps_per_split, k_steps - step0)
        groups_total = K // 32

        w_s = gl.allocate_shared_memory(w_desc.dtype, [STAGES, BLOCK_N, BLOCK_K], w_desc.layout)
        x_s = gl.allocate_shared_memory(x_desc.dtype, [STAGES, R, BLOCK_K], x_desc.layout)
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(ready.index(i), count=1)
        # the weight does not depend on the quantize before this launch: with WAIT_PRIOR (a programmatic dependent
        # launch) its first tiles are on their way before the wait for the activations
        x_bytes: gl.constexpr = x_desc.block_type.nbytes
        for i in gl.static_range(AHEAD):
            if i < n_steps:
                _load_weight(w_desc, w_s, ready, off_n, step0 + i, i, k_steps, x_bytes, BOX_MAJOR)
        if WAIT_PRIOR:
            gdc_wait()
        for i in gl.static_range(AHEAD):
            if i < n_steps:
                _load_x(x_desc, x_s, ready, step0 + i, i)

        # Accumulator column 4 m + j is (activation row m, group j of the step): viewed as [BLOCK_N, ROWS, 4],
        # the weight's codes broadcast along rows m and the activations' along weight rows (the reshape is free)
        zero = gl.zeros([BLOCK_N, R], gl.float32, layout)
        acc = gl.reshape(zero, [BLOCK_N, ROWS, 4])
        l3: gl.constexpr = acc.type.layout
        w_l: gl.constexpr = gl.SliceLayout(1, l3)
        x_l: gl.constexpr = gl.SliceLayout(0, l3)
        rows_w = off_n + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, w_l))
        j_w = gl.arange(0, 4, layout=gl.SliceLayout(0, w_l))
        w_ok = gl.expand_dims(rows_w < N, 1)
        ws_tile = gl.expand_dims(ws_ptr + rows_w.to(gl.int64) * stride_wsn, 1) + gl.expand_dims(j_w, 0)
        m_x = gl.arange(0, ROWS, layout=gl.SliceLayout(1, x_l))
        j_x = gl.arange(0, 4, layout=gl.SliceLayout(0, x_l))
        x_ok = gl.expand_dims(m_x < M, 1)
        xs_tile = gl.expand_dims(xs_ptr + m_x.to(gl.int64) * groups_total, 1) + gl.expand_dims(j_x, 0)
        # scale codes a step ahead: their loads' latency stays off each step's MMA-to-add path
        cw, cx = _step_codes(ws_tile, w_ok, j_w, xs_tile, x_ok, j_x, step0, groups_total)
        if PAIRS:  # n_steps is even (the launcher's split)
            for s in range(0, n_steps, 2):
                ahead = s + AHEAD
                if ahead < n_steps:  # into the slots of steps s - 2 and s - 1, whose MMAs were waited for
                    _load_step(w_desc, x_desc, w_s, x_s, ready, off_n, step0, ahead, k_steps, BOX_MAJOR)
                if ahead + 1 < n_steps:
                    _load_step(w_desc, x_desc, w_s, x_s, ready, off_n, step0, ahead + 1, k_steps, BOX_MAJOR)
                first = _mma_step(w_s, x_s, ready, zero, s, STAGES)
                second = _mma_step(w_s, x_s, ready, zero, s + 1, STAGES)
                cw1, cx1 = _step_codes(ws_tile, w_ok, j_w, xs_tile, x_ok, j_x, step0 + s + 1, groups_total)
                product = warpgroup_mma_wait(1, deps=(first,))
                acc = _scaled_add(acc, product, cw, cx)
                cw, cx = _step_codes(ws_tile, w_ok, j_w, xs_tile, x_ok, j_x, step0 + s + 2, groups_total)
                product = warpgroup_mma_wait(0, deps=(second,))
                acc = _scaled_add(acc, product, cw1, cx1)
        else:
            for s in range(n_steps):
                ahead = s + AHEAD
                if ahead < n_steps:  # into the slot of step s - 1, whose MMA was waited for
                    _load_step(w_desc, x_desc, w_s, x_s, ready, off_n, step0, ahead, k_steps, BOX_MAJOR)
                pending = _mma_step(w_s, x_s, ready, zero, s, STAGES)
                cw_now, cx_now = cw, cx
                cw, cx = _step_codes(ws_tile, w_ok, j_w, xs_tile, x_ok, j_x, step0 + s + 1, groups_total)
                product = warpgroup_mma_wait(0, deps=(pending,))
                acc = _scaled_add(acc, product, cw_now, cx_now)
        for i in gl.static_range(STAGES):
            mbarrier.invalidate(ready.index(i))

        total = gl.sum(acc, axis=2)  # [BLOCK_N, ROWS]: each row's four groups
        out_l: gl.constexpr = total.type.layout
        rows = off_n + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, out_l))
        ms = gl.arange(0, ROWS, layout=gl.SliceLayout(0, out_l))
        ok = gl.expand_dims(rows < N, 1) & gl.expand_dims(ms < M, 0)
        at = gl.expand_dims(ms.to(gl.int64) * N, 0) + gl.expand_dims(rows, 1)  # [m, n] in an [M, N] array
        if SPLIT:
            gl.store(part_ptr + split.to(gl.int64) * M * N + at, total, mask=ok)
            gl.thread_barrier()  # every thread's partials are written before the release below
            arrived = gl.atomic_add(count_ptr + pid_n, 1, sem="acq_rel", scope="gpu")
            if arrived == splits - 1:
                gl.atomic_xchg(count_ptr + pid_n, 0, sem="relaxed", scope="gpu")  # ready for the next launch
                total = gl.zeros([BLOCK_N, ROWS], gl.float32, out_l)
                for s in range(splits):  # in split order; L2, not L1: other SMs wrote these
                    total += gl.load(part_ptr + s * M * N + at, mask=ok, other=0.0, cache_modifier=".cg")
                _store_rows(total, rows, ms, ok, N, bias_ptr, c_ptr, stride_cm, HAS_BIAS)
        else:
            _store_rows(total, rows, ms, ok, N, bias_ptr, c_ptr, stride_cm, HAS_BIAS)


@functools.cache
def _layout(rows: int, cols: int):
    return gl.NVMMASharedLayout.get_default_for([rows, cols], gl.float8e4nv)


def spread_activation_codes(codes: torch.Tensor) -> torch.Tensor:
    """The block-diagonal layout of E4M3 codes ``[M, K]`` (K a multiple of 128) in torch: ``[4 M, K]``, row
    ``4 m + j`` holding row ``m``'s groups ``g`` with ``g % 4 == j`` and zeros elsewhere (the reference for
    :func:`quantize_spread`)."""
    m, k = codes.shape
    grouped = codes.view(torch.uint8).view(m, k // 128, 4, 32)
    spread = torch.zeros(m, 4, k // 128, 4, 32, dtype=torch.uint8, device=codes.device)
    for j in range(4):
        spread[:, j, :, j] = grouped[:, :, j]
    return spread.view(4 * m, k).view(torch.float8_e4m3fn)


def columns_for(m: int) -> int:
    """The MMA's N side for ``m`` rows: 4 m columns rounded up to a power of two, at least 8 (one compile per
    bucket: 1-2, 3-4, 5-8 and 9-16 rows)."""
    return max(8, triton.next_power_of_2(4 * m))


def quantize_spread(
    x: torch.Tensor,
    rule: MxScaleRule | str,
    cast: E4m3Cast | str = E4m3Cast.AUTO,
    *,
    launch_dependents: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """MX-quantize ``x`` ``[M, K]`` (M <= :data:`MX_ROWS_MAX_M`, K a multiple of 128): its E4M3 codes in the
    spread layout ``[4 M, K]`` and its E8M0 scale codes ``[M, K/32]`` (uint8), the bytes of
    :func:`~mxrun.kernels.mxfp8_quantize.quantize_mxfp8_reference`. One launch; ``launch_dependents``: its
    programs let a programmatic dependent launch after it start (sm_90+)."""
    m, k = x.shape
    if m > MX_ROWS_MAX_M or k % BLOCK_K or x.stride(1) != 1:
        raise GemmInputError(
            f"quantize_spread: needs M <= {MX_ROWS_MAX_M} rows, K a multiple of {BLOCK_K} and unit column "
            f"stride, got {tuple(x.shape)} with strides {x.stride()}"
        )
    spread = torch.empty(4 * m, k, dtype=torch.uint8, device=x.device)
    scales = torch.empty(m, k // 32, dtype=torch.uint8, device=x.device)
    if m:
        _mx_spread_quantize_kernel[(triton.cdiv(k, QUANTIZE_BLOCK_K),)](
            x, spread, scales, m, k, x.stride(0),
            ROUND_UP=MxScaleRule(rule) is MxScaleRule.ROUND_UP, SOFT_CAST=resolve_cast(cast),
            ROWS=columns_for(m) // 4, BLOCK_K=QUANTIZE_BLOCK_K, LAUNCH_DEPENDENTS=launch_dependents,
        )  # fmt: skip
    return spread.view(torch.float8_e4m3fn), scales


def splits_for(n: int, k: int, target: int = TARGET_PROGRAMS) -> int:
    """Splits of K so that ``cdiv(N, BLOCK_N) x splits`` is about ``target`` programs, each at least two steps
    long."""
    return max(1, min(target // triton.cdiv(n, BLOCK_N), triton.cdiv(k, BLOCK_K) // 2))


def mx_rows_usable(x: torch.Tensor, weight: torch.Tensor | BoxMajorWeight) -> bool:
    """Whether :func:`mx_rows_linear` takes these operands: Gluon on an sm_90 GPU (not the interpreter), up to
    :data:`MX_ROWS_MAX_M` rows of unit column stride, K a multiple of 128, and a weight TMA can read: row-major
    with 16-byte aligned rows, or box-major in ``[64, 128]`` boxes."""
    if not (HAS_GLUON and x.is_cuda and x.dim() == 2) or triton_interpreting():
        return False
    if cuda_major(x.device) != 9:
        return False
    m, k = x.shape
    if not 1 <= m <= MX_ROWS_MAX_M or k % BLOCK_K or x.stride(1) != 1:
        return False
    if isinstance(weight, BoxMajorWeight):
        return (weight.box_n, weight.box_k) == (BLOCK_N, BLOCK_K) and weight.k == k
    return weight.stride(1) == 1 and weight.stride(0) % 16 == 0 and weight.data_ptr() % 16 == 0


def mx_rows_fits(m: int, n: int, k: int) -> bool:
    """Whether a Linear of ``m`` rows, ``n`` outputs and ``k`` inputs is one this kernel measured faster on than
    the split-K decode: up to :data:`MX_ROWS_ROUTED_M` rows and at least :data:`MX_ROWS_MIN_WEIGHT` weight
    elements."""
    return 1 <= m <= MX_ROWS_ROUTED_M and n * k >= MX_ROWS_MIN_WEIGHT


def mx_rows_preferred(x: torch.Tensor, weight: torch.Tensor | BoxMajorWeight) -> bool:
    """Whether the MXFP8 W8A8 Linear takes :func:`mx_rows_linear`: :data:`MX_ROWS_GEMM` on, a shape
    :func:`mx_rows_fits` and operands :func:`mx_rows_usable`."""
    n = weight.n if isinstance(weight, BoxMajorWeight) else weight.shape[0]
    return (
        MX_ROWS_GEMM
        and x.dim() == 2
        and mx_rows_fits(x.shape[0], n, x.shape[1])
        and mx_rows_usable(x, weight)
    )


def mx_rows_linear(
    x: torch.Tensor,
    weight: torch.Tensor | BoxMajorWeight,
    weight_scale_e8m0: torch.Tensor,
    bias: torch.Tensor | None,
    rule: MxScaleRule | str,
    *,
    splits: int | None = None,
) -> torch.Tensor:
    """MXFP8 W8A8 Linear of ``x`` ``[M, K]`` (bf16/fp16, M <= :data:`MX_ROWS_MAX_M`): activations MX-quantized
    with ``rule``, times the E4M3 ``weight`` ``[N, K]`` (row-major or box-major) with its E8M0 scales
    ``[N, K/32]``, plus ``bias``, in x's dtype. Two launches (the spread quantize, the GEMM with its split sum)
    and no host synchronisation. Operands :func:`mx_rows_usable` refuses get a :class:`GemmInputError`."""
    if not mx_rows_usable(x, weight):
        raise GemmInputError(
            "mx_rows_linear: needs Triton's Gluon on an sm_90 GPU, 1-16 rows of unit column stride, K a multiple "
            f"of {BLOCK_K} and a TMA-ready weight; got x {tuple(x.shape)}"
        )
    m, k = x.shape
    boxes = isinstance(weight, BoxMajorWeight)
    n = weight.n if boxes else weight.shape[0]
    if tuple(weight_scale_e8m0.shape) != (n, k // 32):
        raise GemmInputError(
            f"mx_rows_linear: weight scales must be [{n}, {k // 32}], got {tuple(weight_scale_e8m0.shape)}"
        )
    c = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if n == 0:
        return c
    pdl = PDL and pdl_usable(x.device)
    spread, x_scales = quantize_spread(x, rule, launch_dependents=pdl)
    steps = triton.cdiv(k, BLOCK_K)
    blocks = triton.cdiv(n, BLOCK_N)
    r = columns_for(m)
    per_split = triton.cdiv(steps, splits or splits_for(n, k))
    pairs = PAIRS and r == 8 and steps % 2 == 0 and blocks * triton.cdiv(steps, per_split) <= TARGET_PROGRAMS
    if pairs:
        per_split += per_split % 2  # every split's steps even
    splits = triton.cdiv(steps, per_split)
    codes = weight.boxes if boxes else weight
    w_desc = TensorDescriptor.from_tensor(codes, [BLOCK_N, BLOCK_K], _layout(BLOCK_N, BLOCK_K))
    x_desc = TensorDescriptor.from_tensor(spread, [r, BLOCK_K], _layout(r, BLOCK_K))
    ws = weight_scale_e8m0.view(torch.uint8)
    if ws.stride(1) != 1:
        ws = ws.contiguous()
    if splits > 1:
        partials = torch.empty(splits, m, n, dtype=torch.float32, device=x.device)
        counters = zeroed_int32(x.device, "mx-rows arrivals", blocks)
    else:
        partials = counters = c  # not read
    extra = {"launch_pdl": True} if pdl else {}
    _mx_rows_kernel[(blocks, splits)](
        w_desc, x_desc, ws, x_scales, bias if bias is not None else c, c, partials, counters,
        m, n, k, ws.stride(0), c.stride(0), per_split, splits,
        STAGES=PAIR_STAGES if pairs else STAGES, PAIRS=pairs, BOX_MAJOR=boxes, SPLIT=splits > 1,
        HAS_BIAS=bias is not None, WAIT_PRIOR=pdl, num_warps=4, **extra,
    )  # fmt: skip
    return c


__all__ = [
    "MX_ROWS_GEMM",
    "MX_ROWS_MAX_M",
    "MX_ROWS_MIN_WEIGHT",
    "MX_ROWS_ROUTED_M",
    "columns_for",
    "mx_rows_fits",
    "mx_rows_linear",
    "mx_rows_preferred",
    "mx_rows_usable",
    "quantize_spread",
    "spread_activation_codes",
]
