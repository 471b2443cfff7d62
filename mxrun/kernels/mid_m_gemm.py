"""W8A16 (and FP8 W8A8) GEMM for the rows between decode and large batches (33-512), where the weight's bytes still
set the time but one program can no longer hold every row.

Above the split-K kernel's range (:mod:`mxrun.kernels.small_m_gemm`) the weight-only Linear used to widen its
FP8 / MXFP8 weight to a bf16 copy per call and hand that to cuBLAS: five bytes of traffic per weight where bf16
moves two, so at M = 128 it ran at 0.37-0.43x of bf16 (H100, ``results/linear-h100-mid-m.md``). The tile
kernels that widen in registers were no better, because Hopper's ``wgmma`` reads its B operand from shared
memory only: the widened weight went back there before every MMA.

Here the product is computed transposed, ``C^T = W A^T``: the weight tile is the MMA's A operand, which
``wgmma`` takes from registers. Both operands arrive by TMA into a pipelined ring of shared-memory slots; each
program loads its E4M3 weight tile from its slot straight into the MMA's register layout, widens it there
(:func:`~mxrun.kernels.e4m3.e4m3_to_bf16`, or the MX decode with its powers of two), and multiplies it with the
activation tile, which stays in shared memory. Each weight byte is read from memory once per 128-row tile of
activations, and nothing goes back to shared memory. MX weights that allow it take the split-K kernel's folded
decodes (the power of two on the bf16 widening's multiply; for fp16 one conversion and one fp16 multiply per
pair): H100, GEMM alone, M = 64-256 on the seven Llama shapes, x0.95 (bf16, faster in 19 of 21) and x0.90 (fp16,
21 of 21) the fp32 decode's time (``benchmarks/sweep_mid_m.py --dtype bf16|fp16``,
``results/sweep-mid-m-fold-{bf16,fp16}-h100.log``).

One rule the kernel has to keep by hand: an asynchronous ``wgmma`` reads its register operand while it runs, and
PTX leaves it undefined to overwrite those registers before the MMA has been waited for. Triton 3.6 pipelines the
MMAs of one K step into the next, so with ``tl.dot(w, a, acc)`` the next step's widening overwrote registers
that MMAs still in flight were reading: wrong outputs, Inf among them, depending on timing (H100, a prototype
with 3 and 4 pipeline slots, TMA or pointer loads; 2 slots passed but compile to the same register reuse;
``results/mid-m-register-race-h100.log``). The loop therefore adds each
step's product into the accumulator through a multiply by a run-time 1.0 (:func:`_mid_m_kernel`), which Triton
cannot fold into the MMA's accumulator: the step's MMAs are waited for before the next widening starts (in the
SASS: one ``WARPGROUP.DEPBAR.LE gsb0, 0x0`` per step). Tested on the GPU against the reference, and without one:
``tests/kernels/test_mid_m_gemm.py`` compiles the kernel for sm_90 and checks that every ``wgmma.wait_group`` in
its PTX waits for all groups (with ``tl.dot(w, a, acc)`` Triton 3.9 leaves one in flight, Triton 3.6 seven).

128x128 block-scaled weights fit the same loop: with 128-wide K steps and 64-row weight tiles each step lies in
one block, and its product is added into the accumulator times that block's scale instead of the 1.0.

FP8 W8A8 fits it too: E4M3 activation codes (quantized once beforehand; per-token / per-tensor scales, or 1x128
groups beside 128x128 weight blocks) and the E4M3 weight tile both go from shared memory into an FP8 ``wgmma``
(no widening and no register operand), each 128-wide K step's product is added into the fp32 accumulator (the
promotion every 128 K of mxrun's other FP8 GEMMs; block-scaled, times the step's weight-block scale and each
row's group scale), and per-token / per-tensor scales come after the K sum. What it has over the W8A8 tile
kernels at these rows is the split of K: their 64x128 tiles, one program each, leave most SMs idle on layers
with few output columns (:data:`W8A8_TILE_FILL`).

K is split across programs where the tiles alone would leave SMs idle (as in the split-K kernel); the fp32
partials are then added in split order by :func:`~mxrun.kernels.small_m_gemm.sum_splits`, so results do not
change between runs.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from mxrun.kernels.backend import tl, triton, triton_interpreting
from mxrun.kernels.box_major import BoxMajorWeight, box_first_row
from mxrun.kernels.e4m3 import e4m3_to_bf16, fast_widen_usable
from mxrun.kernels.fp8_tma_gemm import tma_usable
from mxrun.kernels.mxfp8_gemm import mx_decode_weight
from mxrun.kernels.mxfp8_quantize import MX_BLOCK_SIZE, MxScaleRule, mx_round_triton
from mxrun.kernels.scaled_gemm import GemmInputError, m_bucket

MID_M_MIN = 33
"""From this many rows the weight-only Linears (and MXFP8 W8A8, after rounding its activations) take this kernel
instead of the split-K one, where :func:`mid_m_usable`. H100, interleaved in one run, the seven Llama shapes at
M = 17, 24 and 32 (``benchmarks/sweep_linear_setting.py --setting mid.MID_M_MIN --values 65 17 --ms 17 24 32
--columns fp8-channel-wo mxfp8-wo mxfp8 --repeats 1``, ``results/mid-m-min-h100.log``): this kernel there took
x1.23 the split-K kernel's time (faster in 10 of 63 cases), so the split-K kernel keeps up to 32 rows."""

MID_M_MAX = 512
"""Up to this many rows for FP8 weight-only (per tensor / per channel, and 128x128 blocks); above it
:func:`fp8_decode_matmul` (decode + cuBLAS; blocks: the in-register tile kernel). Same kind of sweep at M = 48-512 (``--setting mid.MID_M_MAX --values 0 512 --ms 48 64 128 256
512``, ``results/mid-m-on-off-h100.log``): FP8 weight-only faster in all 35 cases, x0.35 the time at M = 128
(0.37-0.43x -> 0.98-1.37x of bf16), x0.81 at 512."""

MX_MID_M_MAX = 256
"""Up to this many rows for MXFP8 (W8A16, and W8A8 on MX-rounded activations); above it the decode + cuBLAS path
(W8A16) and the aligned FP8 GEMM (W8A8). Same sweep: MXFP8 weight-only faster in all 28 cases at M = 48-256
(x0.41 the time at 128), no better at 512 (x1.00, faster in 4 of 7); W8A8 faster in all 28 at M = 48-256 (x0.60 at
128, x0.86 at 256) but x1.40 the aligned path's time at 512 (slower in all 7)."""


W8A8_MID_M_MAX = 128
"""FP8 W8A8 (E4M3 activation codes with per-token / per-tensor scales) may take this kernel from
:data:`MID_M_MIN` up to this many rows, after quantizing its activations once: where :func:`w8a8_takes_mid_m`.
From one more the Gluon kernel takes the rows on sm_90 (:data:`~mxrun.kernels.fp8_wgmma_gemm.WGMMA_MIN_M`), which
this rule was not measured against."""

BLOCK_W8A8_MID_M_MAX = 128
"""The same for FP8 W8A8 with 128x128 weight blocks and 1x128 activation groups."""

W8A8_TILE_FILL = 0.7
"""The W8A8 tile kernels (64x128 tiles, one program per tile, K not split; up to 128 rows on sm_90) leave the
rows to this kernel where their tiles would occupy fewer than this fraction of the SMs (8B ``o`` and ``down`` up to
128 rows, 8B and 70B ``qkv`` and 70B ``down`` up to 64). H100, interleaved in one run, the seven Llama shapes at M = 48-512,
this kernel at every M against the tile kernels (``benchmarks/sweep_linear_setting.py --setting
mid.W8A8_MID_M_MAX --values 0 512 --ms 48 64 128 256 512 --columns scaled_mm fp8-channel fp8-tensor --repeats 1``,
``results/w8a8-mid-m-h100.log``): where the tile kernel had up to 80 tiles this kernel was faster in all 20
cases (x0.66-0.98 the time); from 96 tiles it was mixed (x0.76-1.12; slower on 8B and 70B ``qkv`` at 128 rows,
8B ``o`` and 70B ``down`` at 256, 8B ``gate_up`` at 48-128), and at 512 rows the Gluon kernel was faster in 12
of 14. With this rule (``--values 0 256 --ms 48 64 128 256``,
``results/w8a8-mid-m-rule-h100.log``) the 12 cases it picks took x0.81 the time per-token (all faster; 8B
``down`` at 48-128 rows 0.97-1.06x -> 1.39-1.48x of bf16, 8B ``o`` 0.58-0.97x -> 0.77-1.13x) and x0.84
per-tensor; the others ran the same code (x0.998-1.003). Block-scaled, this kernel at every M against the block
tile kernel (``--setting mid.W8A8_TILE_FILL --values 0 100 --columns scaled_mm fp8-block``,
``results/block-w8a8-mid-m-h100.log``): x0.75 the time on the same 12 cases (all faster; 0.48-1.36x ->
0.69-1.75x of bf16), slower on 8B ``gate_up`` at 48-128 rows (up to x1.27) and 70B ``gate_up`` at 48-64."""


MX_CODES_AHEAD = True
"""MX weights: each step's E8M0 codes are loaded the step before, as in the split-K kernel
(:data:`~mxrun.kernels.small_m_gemm.MX_CODES_AHEAD`). H100, interleaved, the seven Llama shapes at M = 64, 128 and
256, two repeats (``benchmarks/sweep_linear_setting.py --setting mid.MX_CODES_AHEAD --values 0 1 --ms 64 128 256
--columns scaled_mm mxfp8 mxfp8-wo --repeats 2``, ``results/mid-m-codes-ahead-h100.log``): x0.946 the time, faster
in 79 of 84 (70B ``down`` at 256 rows, MXFP8 W8A8 0.41 -> 0.50x of ``_scaled_mm``)."""


class MidMConfig(NamedTuple):
    """Tile and split policy. ``block_n``: weight rows per program (the MMA's M side: 64 per warp group);
    ``block_m``: activation rows (the MMA's N side); ``target_programs``: how many (tile x K split) programs to
    aim for."""

    block_n: int = 64
    block_m: int = 128
    block_k: int = 128
    num_warps: int = 4
    num_stages: int = 3
    target_programs: int = 2 * 132


# H100, GEMM alone, the seven Llama shapes at M = 64, 128 and 256, FP8 per-channel and MXFP8 weights, five tiles x
# two program targets (benchmarks/sweep_mid_m.py, results/sweep-mid-m-h100.log): per M, these two had the lowest
# geometric mean of time over each case's best (x1.004-1.010) and were best in 4-6 of 7 cases. At M = 128-512
# (results/sweep-mid-m-stages-h100.log) two slots, which let two or three programs share an SM, took x1.26-1.27 the
# time, 128x128 tiles on two warp groups x1.70, about three programs per SM x1.08-1.10; 256-row tiles spill.
SHORT_CONFIG = MidMConfig(block_m=64, num_stages=4)
TALL_CONFIG = MidMConfig()


def config_for(m: int) -> MidMConfig:
    """The tile :func:`mid_m_gemm_triton` takes for ``m`` rows unless given one."""
    return SHORT_CONFIG if m <= 64 else TALL_CONFIG


def w8a8_takes_mid_m(codes: torch.Tensor, weight: torch.Tensor, max_rows: int) -> bool:
    """Whether an FP8 W8A8 dispatcher sends these quantized activations here: :data:`MID_M_MIN` to
    ``max_rows`` rows, TMA can read the operands, and the tile kernel's 64-row x 128-column tiles would keep
    fewer than :data:`W8A8_TILE_FILL` of the SMs busy. Counted for ``m_bucket(M)`` rows, so that every M of a
    size class takes the same kernel (no new compile for a new M)."""
    m = codes.shape[0]
    if not (MID_M_MIN <= m <= max_rows and mid_m_usable(codes, weight)):
        return False
    tiles = triton.cdiv(m_bucket(m), 64) * triton.cdiv(weight.shape[0], 128)
    return tiles < W8A8_TILE_FILL * _sms(codes.device)


def w8a8_on_mid_m(
    codes: torch.Tensor,
    a_scale: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
    max_rows: int,
    **weight_scales: torch.Tensor,
) -> torch.Tensor | None:
    """An FP8 W8A8 dispatcher's product on this kernel where :func:`w8a8_takes_mid_m`, else None (the caller's
    tile kernels). ``weight_scales``: ``weight_scale`` or ``weight_block_scale``."""
    if not w8a8_takes_mid_m(codes, weight, max_rows):
        return None
    return mid_m_gemm_triton(codes, weight, a_scale=a_scale, bias=bias, out_dtype=out_dtype, **weight_scales)


def _sms(device: torch.device) -> int:
    """The SM count of a CUDA device."""
    from mxrun.kernels.fp8_tma_gemm import _sm_count

    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def mid_m_usable(x: torch.Tensor, weight: torch.Tensor | BoxMajorWeight) -> bool:
    """Whether the Linear dispatchers may send ``x @ weight^T`` here: both operands readable by TMA (sm_90+,
    a real GPU, 16-byte aligned rows)."""
    return tma_usable(x, weight.boxes if isinstance(weight, BoxMajorWeight) else weight)


@triton.jit
def _step_codes(bs_rows, k0, K, offs_g, n_ok):
    """The E8M0 codes ``[BLOCK_N, G]`` of the K step at ``k0`` (127, i.e. 2^0, past K)."""
    g = k0 // 32 + offs_g
    codes = tl.load(bs_rows + g[None, :], mask=n_ok[:, None] & (g < K // 32)[None, :], other=127)
    return codes.to(tl.int32)


@triton.jit(do_not_specialize=["M"])
def _mid_m_kernel(
    a_desc,  # tensor descriptor of the [M, K] bf16/fp16 activations, [BLOCK_M, BLOCK_K] boxes
    w_desc,  # tensor descriptor of the [N, K] float8e4nv weight, [BLOCK_N, BLOCK_K] boxes
    bs_ptr,  # B_MX: uint8 E8M0 [N, K/32], (n, g) at n*stride_bsn + g; else unused
    p_ptr,  # SPLIT_K > 1: fp32 partials [SPLIT_K, M, N], contiguous
    b_scale_ptr,  # B_SCALE 1: fp32 [1]; 2: fp32 [N]; 3: fp32 128x128 blocks [cdiv(N,128), cdiv(K,128)]
    a_scale_ptr,  # A_SCALE 1: fp32 [1]; 2: fp32 [M]; 3: fp32 1x128 groups [M, cdiv(K,128)], row stride stride_asm
    bias_ptr,
    c_ptr,  # [M, N] output, contiguous
    M,
    N,
    K,
    K_PER_SPLIT,  # multiple of BLOCK_K
    stride_bsn,  # row stride of the E8M0 codes (B_MX) or of the block scales (B_SCALE 3)
    stride_asm,  # row stride of the activations' 1x128 group scales (A_SCALE 3)
    step_one,  # 1.0 at run time: see the module docstring
    B_MX: tl.constexpr,
    B_SCALE: tl.constexpr,
    A_SCALE: tl.constexpr,  # E4M3 activation codes (W8A8): 1 per tensor, 2 per row, 3 per 1x128 group; 0 values
    HAS_BIAS: tl.constexpr,
    SPLIT_K: tl.constexpr,
    MMA: tl.constexpr,  # 0: fp32 (interpreter only: its bf16/fp16 dot is wrong), 1: bf16, 2: fp16, 3: E4M3
    FAST_WIDEN: tl.constexpr,  # FP8 weights, bf16 MMA: E4M3 -> bf16 with integer ops (sm_90+, see e4m3.py)
    MX_FOLD: tl.constexpr,  # MX weights: 1 the bf16 widening with the power of two folded in, 2 the fp16 one
    CODES_AHEAD: tl.constexpr,  # B_MX: each step's E8M0 codes loaded the step before
    W_BOXES: tl.constexpr,  # w_desc reads the weight box-major (mxrun.kernels.box_major), in its boxes
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,  # multiple of 32
):
    """One program: BLOCK_N output columns x BLOCK_M rows over one K slab, computed transposed (the weight tile
    is the MMA's register operand). Program ids run over the row tiles first, so the programs that share a
    weight tile run together and it is read from DRAM once."""
    G: tl.constexpr = BLOCK_K // 32
    pid = tl.program_id(0)
    row_tiles = tl.cdiv(M, BLOCK_M)
    off_m = (pid % row_tiles) * BLOCK_M
    off_n = (pid // row_tiles) * BLOCK_N
    pid_k = tl.program_id(1)
    k_begin = pid_k * K_PER_SPLIT
    k_end = tl.minimum(k_begin + K_PER_SPLIT, K)
    offs_n = off_n + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    offs_m = off_m + tl.arange(0, BLOCK_M)
    m_ok = offs_m < M
    offs_g = tl.arange(0, G)
    bs_rows = bs_ptr + offs_n.to(tl.int64)[:, None] * stride_bsn
    as_rows = a_scale_ptr + offs_m.to(tl.int64) * stride_asm
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    if B_MX and CODES_AHEAD:
        codes_next = _step_codes(bs_rows, k_begin, K, offs_g, n_ok)
    for k0 in range(k_begin, k_end, BLOCK_K):
        if W_BOXES:
            w = w_desc.load([box_first_row(off_n // BLOCK_N, k0, K, BLOCK_N, BLOCK_K), 0])
        else:
            w = w_desc.load([off_n, k0])
        a = a_desc.load([off_m, k0])
        if B_MX:  # E4M3 times its power of two, exact; groups past K read as code 127 (2^0) on zero weights
            if CODES_AHEAD:  # loaded the step before (byte loads are not pipelined: see MX_CODES_AHEAD)
                codes = codes_next
                codes_next = _step_codes(bs_rows, k0 + BLOCK_K, K, offs_g, n_ok)
            else:
                codes = _step_codes(bs_rows, k0, K, offs_g, n_ok)
            wv = mx_decode_weight(w, codes, MX_FOLD, True)
        elif MMA == 1:
            wv = e4m3_to_bf16(w, FAST_WIDEN)
        else:
            wv = w
        step_scale = step_one
        if B_SCALE == 3:  # this step's 128 K lie in one weight block (BLOCK_K 128, BLOCK_N divides 128)
            step_scale = tl.load(b_scale_ptr + (off_n // 128) * stride_bsn + k0 // 128)
        if MMA == 0:
            step = tl.dot(wv.to(tl.float32), a.to(tl.float32).T, input_precision="ieee")
        elif MMA == 3:  # E4M3 codes on both sides, from shared memory: each step's product promoted to fp32
            step = tl.dot(w, a.T)
        else:  # the step's MMAs waited for before the next widening: see the module docstring
            step = tl.dot(wv.to(a.dtype), a.T)
        if A_SCALE == 3:  # and B_SCALE 3: the step's weight-block scale times each row's group scale
            acc += step * (step_scale * tl.load(as_rows + k0 // 128, mask=m_ok, other=0.0))[None, :]
        else:
            acc += step * step_scale
    tile_ok = n_ok[:, None] & m_ok[None, :]
    if SPLIT_K == 1:
        if B_SCALE == 1:
            acc = acc * tl.load(b_scale_ptr)
        elif B_SCALE == 2:
            acc = acc * tl.load(b_scale_ptr + offs_n, mask=n_ok, other=1.0)[:, None]
        if A_SCALE == 1:
            acc = acc * tl.load(a_scale_ptr)
        elif A_SCALE == 2:
            acc = acc * tl.load(a_scale_ptr + offs_m, mask=m_ok, other=1.0)[None, :]
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[:, None]
        out = c_ptr + offs_m.to(tl.int64)[None, :] * N + offs_n[:, None]
        tl.store(out, acc.to(c_ptr.dtype.element_ty), mask=tile_ok)
    else:
        out = p_ptr + pid_k.to(tl.int64) * M * N + offs_m.to(tl.int64)[None, :] * N + offs_n[:, None]
        tl.store(out, acc, mask=tile_ok)


def split_k_for(m: int, n: int, k: int, config: MidMConfig) -> int:
    """Splits of K so that tiles x splits is about ``config.target_programs``, each split at least four K steps
    long; at most 16. Counted for ``m_bucket(m)`` rows, so that every M of a size class gets the same split
    (a split count is a compiled variant)."""
    tiles = triton.cdiv(m_bucket(m), config.block_m) * triton.cdiv(n, config.block_n)
    steps = triton.cdiv(k, config.block_k)
    return max(1, min(config.target_programs // tiles, steps // 4, 16))


def mid_m_gemm_triton(
    a: torch.Tensor,
    weight: torch.Tensor | BoxMajorWeight,
    *,
    weight_scale: torch.Tensor | None = None,
    weight_scale_e8m0: torch.Tensor | None = None,
    weight_block_scale: torch.Tensor | None = None,
    activation_mx_rule: MxScaleRule | str | None = None,
    a_scale: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    bias: torch.Tensor | None = None,
    split_k: int | None = None,
    config: MidMConfig | None = None,
    mx_scale_fold: bool = False,
    mx_scale_fold16: bool = False,
) -> torch.Tensor:
    """``y = a (W s_w)^T + bias`` with bf16/fp16 ``a`` ``[M, K]`` (optionally MX-rounded first with
    ``activation_mx_rule``: MXFP8 W8A8) and an E4M3 weight ``[N, K]`` with exactly one of ``weight_scale``
    (fp32, per tensor or ``[N, 1]``), ``weight_scale_e8m0`` (``[N, K/32]``) and ``weight_block_scale`` (fp32
    128x128 blocks, ``[cdiv(N, 128), cdiv(K, 128)]``, applied to each K step's product); any M, meant for 33-512
    (:data:`MID_M_MIN`, :data:`MID_M_MAX`, :data:`MX_MID_M_MAX`).
    FP8 W8A8: ``a`` E4M3 codes with ``a_scale`` (fp32, per tensor or per row ``[M, 1]`` beside ``weight_scale``;
    1x128 groups ``[M, cdiv(K, 128)]`` beside ``weight_block_scale``) and the result in ``out_dtype``; the two
    E4M3 tiles meet in an FP8 MMA straight from shared memory, each 128-wide K step's product added into the
    fp32 accumulator (:data:`W8A8_MID_M_MAX`).
    ``mx_scale_fold`` / ``mx_scale_fold16``: the caller's :func:`~mxrun.kernels.e4m3.mx_scales_foldable` /
    :func:`~mxrun.kernels.e4m3.mx_scales_foldable_f16` of the weight (bf16 / fp16 activations then decode MX
    weights with the power of two folded into the widening, as the split-K kernel does). ``weight`` may be
    held box-major (:class:`~mxrun.kernels.box_major.BoxMajorWeight`) in this call's ``[block_n, block_k]``
    boxes (the same bits). Both operands must suit TMA (:func:`mid_m_usable`), or this runs under the
    interpreter."""
    from mxrun.kernels.small_m_gemm import (  # it imports the scaled GEMMs
        check_block_scales,
        check_operands,
        mx_fold_mode,
        scale_mode,
        sum_splits,
    )

    fn = "mid_m_gemm_triton"
    n, k, out_dtype = check_operands(fn, a, weight, a_scale, out_dtype, activation_mx_rule, bias)
    codes = a.dtype == torch.float8_e4m3fn
    if codes and weight_scale_e8m0 is not None:
        raise GemmInputError(f"{fn}: E4M3 activation codes meet FP8 weights with fp32 scales only")
    if sum(t is not None for t in (weight_scale, weight_scale_e8m0, weight_block_scale)) != 1:
        raise GemmInputError(
            f"{fn}: give exactly one of weight_scale, weight_scale_e8m0 and weight_block_scale"
        )
    b_mx = weight_scale_e8m0 is not None
    if weight_block_scale is not None:
        weight_block_scale, a_scale = check_block_scales(fn, a_scale, weight_block_scale, a.shape[0], n, k)
    if (b_mx or activation_mx_rule is not None) and k % MX_BLOCK_SIZE:
        raise GemmInputError(f"{fn}: MXFP8 operands need K % 32 == 0, got K={k}")
    if b_mx and weight_scale_e8m0.shape != (n, k // MX_BLOCK_SIZE):
        raise GemmInputError(f"{fn}: MXFP8 weights need E8M0 scales [N, K/32]")
    interpreting = triton_interpreting()
    if not (interpreting or mid_m_usable(a, weight)):
        raise GemmInputError(f"{fn}: needs sm_90+ and 16-byte aligned K-contiguous operands (TMA)")
    if activation_mx_rule is not None:
        a = mx_round_triton(a, activation_mx_rule)  # the same values in bf16/fp16: then as weight-only
    b_scale_mode = 3 if weight_block_scale is not None else scale_mode(weight_scale, n, "weight", fn)
    m = a.shape[0]
    a_scale_mode, stride_asm = 0, 0
    if codes and b_scale_mode == 3:  # group scales checked with the block scales
        a_scale_mode, stride_asm = 3, a_scale.stride(0)
    elif codes:
        a_scale_mode = scale_mode(a_scale, m, "activation", fn)
    c = torch.empty((m, n), dtype=out_dtype, device=a.device)
    if m == 0 or n == 0:
        return c
    config = config or config_for(m)
    if b_scale_mode == 3 and (config.block_k != 128 or 128 % config.block_n):
        raise GemmInputError(f"{fn}: 128x128 block scales need block_k 128 and a block_n that divides 128")
    splits = split_k or split_k_for(m, n, k, config)
    k_per_split = triton.cdiv(triton.cdiv(k, splits), config.block_k) * config.block_k
    splits = triton.cdiv(k, k_per_split)  # no empty splits
    partials = torch.empty((splits, m, n), dtype=torch.float32, device=a.device) if splits > 1 else c
    from triton.tools.tensor_descriptor import TensorDescriptor

    mma = 0 if interpreting else 3 if codes else 1 if a.dtype == torch.bfloat16 else 2
    bs = weight_scale_e8m0.view(torch.uint8) if b_mx else c  # unused without MX codes
    if b_scale_mode == 3:  # the block scales, and their row stride in the E8M0 codes' place
        scales, stride_bsn = weight_block_scale, weight_block_scale.stride(0)
    else:
        scales, stride_bsn = weight_scale.reshape(-1) if weight_scale is not None else c, bs.stride(0)
    tiles = triton.cdiv(m, config.block_m) * triton.cdiv(n, config.block_n)
    w_boxes = isinstance(weight, BoxMajorWeight)
    if w_boxes and (weight.box_n, weight.box_k) != (config.block_n, config.block_k):
        raise GemmInputError(
            f"{fn}: the weight's [{weight.box_n}, {weight.box_k}] boxes must be the tile "
            f"[{config.block_n}, {config.block_k}]"
        )
    _mid_m_kernel[(tiles, splits)](
        TensorDescriptor.from_tensor(a, [config.block_m, config.block_k]),
        TensorDescriptor.from_tensor(weight.boxes if w_boxes else weight, [config.block_n, config.block_k]),
        bs,
        partials,
        scales,
        (a_scale if a_scale_mode == 3 else a_scale.reshape(-1)) if codes else c,
        bias if bias is not None else c,
        c,
        m,
        n,
        k,
        k_per_split,
        stride_bsn,
        stride_asm,
        1.0,
        B_MX=b_mx,
        B_SCALE=b_scale_mode,
        A_SCALE=a_scale_mode,
        HAS_BIAS=bias is not None,
        SPLIT_K=splits,
        MMA=mma,
        FAST_WIDEN=fast_widen_usable(a.device),
        MX_FOLD=mx_fold_mode(b_mx, mma, mx_scale_fold, mx_scale_fold16, a.device),
        CODES_AHEAD=b_mx and MX_CODES_AHEAD,
        W_BOXES=w_boxes,
        BLOCK_M=config.block_m,
        BLOCK_N=config.block_n,
        BLOCK_K=config.block_k,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    if splits > 1:
        sum_splits(partials, a_scale if a_scale_mode in (1, 2) else None, weight_scale, bias, c)
    return c


__all__ = [
    "BLOCK_W8A8_MID_M_MAX",
    "MID_M_MAX",
    "MID_M_MIN",
    "MX_MID_M_MAX",
    "W8A8_MID_M_MAX",
    "MidMConfig",
    "config_for",
    "mid_m_gemm_triton",
    "mid_m_usable",
    "split_k_for",
    "w8a8_on_mid_m",
    "w8a8_takes_mid_m",
]
