"""FP8 E4M3 quantize / dequantize with fp32 scales: torch reference, Triton kernels, dispatcher.

Granularities (``Fp8Granularity``) and the scale layout each returns, for ``x`` of shape ``[M, K]``
(``[E, N, K]`` stacks get the same with a leading ``E``; "rows" are M or N):

* ``PER_TENSOR``: one scale, a 0-dim fp32 tensor, over the whole tensor (a stack shares one scale).
* ``PER_ROW``: ``[M, 1]`` -- per output channel for a weight ``[N, K]``, per token for activations ``[M, K]``
  (the dynamic per-token scheme). Aliases: :func:`quantize_fp8_per_channel`, :func:`quantize_fp8_per_token`.
* ``BLOCK_128X128`` (weights): ``[ceil(N/128), ceil(K/128)]``, one scale per 128x128 tile.
* ``GROUP_1X128`` (activations): ``[M, ceil(K/128)]``, one scale per 128 consecutive elements of a row.
Edge tiles and groups cover only the elements that exist. ``data`` is ``torch.float8_e4m3fn``, the input's
shape, contiguous.

Scale rule, the same for every granularity: ``scale = amax / 448`` in fp32 (correctly rounded division), so the
largest element maps onto E4M3's largest finite value; elements are ``E4M3(x / scale)`` with a correctly
rounded fp32 division, saturating, RNE, and ``x ~= data * scale``. The kernels divide with multiplies and an
FMA correction that gives the same quotient (:mod:`mxrun.kernels.scale_division`; Triton's approximate ``/``
would not, and its ``div_rn`` costs too many instructions per element).
Guards and special values:

* ``scale == 0`` (an all-zero block) -> ``scale = 1``: the block quantizes and dequantizes to exact (signed)
  zeros.
* A subnormal ``amax / 448`` (amax below 448 * 2^-126) has few significant bits, so rounding it to nearest
  can leave ``amax / scale`` well above 448 (the block's largest elements would clip by up to ~1/k at
  ``scale = k * 2^-149``): where the rounded quotient is below ``amax / 448``, the scale is the next fp32 up,
  so nothing clips. That includes an amax so small that ``amax / 448`` rounds to zero: its scale is
  ``2^-149`` rather than 1, and the block keeps its values. Normal scales are the rounded quotient as is.
* NaN in a block -> ``scale`` NaN and every element of the block NaN (0x7F).
* +-Inf in a block (and no NaN) -> ``scale`` = Inf; Inf / Inf makes those elements NaN and the finite ones
  become (signed) zero. Such a block carries no information; the behaviour is defined so it can be tested.
* fp32 subnormal amaxes give subnormal scales (the rule above), never flushed to zero.
"""

from __future__ import annotations

import enum
import functools
from typing import NamedTuple

import torch
import torch.nn.functional as F

from mxrun.kernels.backend import Backend, gdc_launch_dependents, resolve_backend, tl, triton
from mxrun.kernels.e4m3 import (
    E4M3_MAX,
    e4m3_code,
    encode_e4m3_reference,
    magnitude_bits,
    widen_to_fp32,
)
from mxrun.kernels.mxfp8_quantize import E4m3Cast, k_major_scale_buffer, resolve_cast
from mxrun.kernels.row_layout import (
    QuantizeInputError,
    TileConfig,
    ceil_div,
    check_quantize_input,
    check_quantize_shape,
    next_power_of_2,
    row_batches_of,
    streaming_tile,
)
from mxrun.kernels.scale_division import divide_by_scale, scale_division_setup

FP8_BLOCK = 128  # side of the weight tiles and length of the activation groups
# Launcher defaults, measured with benchmarks/sweep_fp8_quantize.py (H200 run in
# benchmarks/results/sweep-fp8-quantize-h200.json): whole rows in registers as power-of-two pieces beat two
# passes by 10-20% at M=16384, K in {7168, 14336}; 16 warps per 128x128 block is what the one-block-at-a-time
# strip needs to match the earlier single-tile kernel (8 warps lost 12%).
# At 2048 rows a fixed grid of programs that each walk rows and load the next row while quantizing this one
# measured no better than one row per program (H100: 0.71-0.81 of copy against 0.78-0.84,
# benchmarks/results/sweep-fp8-quantize-row-loop-h100.json), nor did 1-2 warps per row (0.66-0.80 of copy,
# sweep-fp8-quantize-2048-warps-h100.json, --rows 2048); the copy itself moves only 2.0-2.7 TB/s there.
_MAX_ROW_IN_REGISTERS = 16384  # longest per-row row (padded to a power of two) held whole in registers
_ROW_MAX_WARPS = 8
# Decode: up to ROW_CHUNKS_MAX_ROWS rows longer than ROW_CHUNKS_MIN_COLS take _fp8_row_chunks_kernel, each row's
# conversions shared by programs of a chunk of columns (row_chunk_for), instead of one program's whole-row
# kernel or two passes. H100, CUDA-graph replays (benchmarks/sweep_fp8_row_chunks.py): first with the amax read
# in 4096-column steps (results/fp8-quantize-row-chunks-h100.log: 1 x 28672 6.49 -> 4.04 us, 16 x 28672 6.83 ->
# 4.81; the per-token W8A8 Linear on 70B down 91.7 -> 89.3 us at M = 1, 93.6 -> 91.4 at 16,
# results/fp8-row-chunks-linear-h100.log; rows of 14336 columns were faster alone, 3.38 -> 2.85 us, but not in
# the Linear, and kept the whole-row kernel); then with the whole row read at once (ROW_CHUNKS_AMAX_STEP) and
# the chunk by the row count (row_chunk_for), against the whole-row / two-pass kernels, same run
# (results/fp8-quantize-row-chunks-whole-h100.log): 1 x 8192 2.31 -> 1.68 us, 16 x 8192 2.41 -> 2.15, 1 x 14336
# 3.40 -> 1.90, 16 x 14336 3.46 -> 2.48, 1 x 28672 6.46 -> 2.32, 4 x 28672 6.61 -> 2.45, 16 x 28672 6.70 ->
# 3.34. In the per-token Linear, the rule's variants interleaved in one process (--linear,
# results/fp8-row-chunks-linear-whole-h100.log): 8B down 27.5 -> 26.1 us at M = 1 and 28.7 -> 27.6 at 16 (its
# rows held whole before), 70B down 87.9 -> 85.0 and 91.7 -> 88.7 (its amax read in 4096-column steps before),
# 70B qkv 35.3 -> 34.8 at M = 1 and 37.1 at 16 either way (row chunks from 4096 columns against 8192). Rows of
# 4096 columns, 1.59 against the whole-row kernel's 1.66 us alone, were not timed in the Linear and keep it.
ROW_CHUNKS_MAX_ROWS = 16
ROW_CHUNKS_MIN_COLS = 4096
ROW_CHUNKS_AMAX_STEP = 32768
"""Columns of a row each row-chunk program reads at once for the row's amax (at most the row's length rounded
up to a power of two): the whole row up to 32768 columns, one round trip to L2 instead of one per 4096."""


def row_chunk_for(rows: int, cols: int) -> tuple[int, int]:
    """(columns per program, warps) of the row-chunk kernel: every program reads its whole row for the amax, so
    more rows call for wider chunks (fewer programs re-reading each row); one row takes narrow ones."""
    if rows == 1:
        return 1024, 4
    if cols <= 16384:
        return 2048, 4
    return (2048, 8) if rows <= 4 else (4096, 8)


TENSOR_ONE_ROW_AS_ROW = 1
"""A per-tensor quantize of a single row (decode at batch 1) runs the per-row kernel: the same amax, scale and
codes by definition, in one launch instead of the amax and quantize launches. H100, the per-tensor W8A8 Linear
at M = 1 on the seven Llama shapes, interleaved (``benchmarks/sweep_linear_setting.py --setting
quantize.TENSOR_ONE_ROW_AS_ROW --values 0 1 --ms 1 --columns scaled_mm fp8-tensor --repeats 2``,
``results/tensor-one-row-h100.log``, before the row chunks took 14336-column rows): x0.947 the time, faster in
13 of 14."""
_BLOCK_STRIP_K = 128  # columns of 128x128 blocks one program does in turn
_BLOCK_WARPS = 8  # 16 measured 0.81-0.85 of copy on H100, 8 0.89-0.97 (sweep_fp8_quantize.py --only block)


class Fp8Granularity(enum.Enum):
    """Which elements share one fp32 scale (see the module docstring for the layouts)."""

    PER_TENSOR = "per_tensor"
    PER_ROW = "per_row"
    BLOCK_128X128 = "block_128x128"
    GROUP_1X128 = "group_1x128"


class Fp8Quantized(NamedTuple):
    """``data`` (E4M3, input's shape) and ``scale`` (fp32, layout set by the granularity)."""

    data: torch.Tensor
    scale: torch.Tensor


# ----------------------------------------------------------------------------------------------------------
# torch reference
# ----------------------------------------------------------------------------------------------------------


FP32_MIN_NORMAL = 2.0**-126


def fp8_scale_from_amax(amax: torch.Tensor) -> torch.Tensor:
    """fp32 ``amax / 448``, with 1 where that is zero; NaN amax gives NaN, Inf gives Inf. A subnormal quotient
    that rounded below ``amax / 448`` is taken one fp32 step up (see the module docstring)."""
    # Divide by a tensor, not a Python number: CUDA torch turns division by a scalar into a multiply by its
    # reciprocal, which is not correctly rounded.
    amax = amax.float()
    scale = amax / torch.full_like(amax, E4M3_MAX)
    clips = (scale < FP32_MIN_NORMAL) & (scale.double() * E4M3_MAX < amax.double())  # exact in fp64
    scale = torch.where(clips, torch.nextafter(scale, torch.full_like(scale, float("inf"))), scale)
    return torch.where(scale == 0, torch.ones_like(scale), scale)


def _pad_to_multiple(x: torch.Tensor, dim: int, multiple: int) -> torch.Tensor:
    """Zero-pad ``x`` along ``dim`` to a multiple of ``multiple`` (zeros never change an amax)."""
    missing = -x.shape[dim] % multiple
    if missing == 0:
        return x
    pad = [0, 0] * (x.dim() - 1 - (dim % x.dim())) + [0, missing]
    return F.pad(x, pad)


def quantize_fp8_reference(x: torch.Tensor, granularity: Fp8Granularity | str) -> Fp8Quantized:
    """Plain-torch FP8 quantize (CPU or CUDA); the definition the Triton kernels are tested against."""
    granularity = Fp8Granularity(granularity)
    check_quantize_input(x, "quantize_fp8_reference")
    values = x.float()
    if granularity is Fp8Granularity.PER_TENSOR:
        scale = fp8_scale_from_amax(values.abs().amax())
        scaled = values / scale
    elif granularity is Fp8Granularity.PER_ROW:
        scale = fp8_scale_from_amax(values.abs().amax(dim=-1, keepdim=True))
        scaled = values / scale
    elif granularity is Fp8Granularity.GROUP_1X128:
        k = x.shape[-1]
        padded = _pad_to_multiple(values, -1, FP8_BLOCK)
        groups = padded.reshape(*padded.shape[:-1], -1, FP8_BLOCK)
        scale = fp8_scale_from_amax(groups.abs().amax(dim=-1))
        scaled = (groups / scale.unsqueeze(-1)).reshape(padded.shape)[..., :k]
    else:
        n, k = x.shape[-2:]
        padded = _pad_to_multiple(_pad_to_multiple(values, -1, FP8_BLOCK), -2, FP8_BLOCK)
        n_blocks, k_blocks = padded.shape[-2] // FP8_BLOCK, padded.shape[-1] // FP8_BLOCK
        tiles = padded.reshape(*padded.shape[:-2], n_blocks, FP8_BLOCK, k_blocks, FP8_BLOCK)
        scale = fp8_scale_from_amax(tiles.abs().amax(dim=(-3, -1)))
        scaled = (tiles / scale[..., :, None, :, None]).reshape(padded.shape)[..., :n, :k]
    return Fp8Quantized(encode_e4m3_reference(scaled).contiguous(), scale)


def expand_fp8_scale(
    scale: torch.Tensor, shape: torch.Size, granularity: Fp8Granularity | str
) -> torch.Tensor:
    """Broadcast a scale of ``granularity`` to one fp32 value per element of a tensor of ``shape``."""
    granularity = Fp8Granularity(granularity)
    if granularity in (Fp8Granularity.PER_TENSOR, Fp8Granularity.PER_ROW):
        return scale.expand(shape)
    k = shape[-1]
    per_column = scale.repeat_interleave(FP8_BLOCK, dim=-1)[..., :k]
    if granularity is Fp8Granularity.GROUP_1X128:
        return per_column
    return per_column.repeat_interleave(FP8_BLOCK, dim=-2)[..., : shape[-2], :]


def dequantize_fp8(
    data: torch.Tensor,
    scale: torch.Tensor,
    granularity: Fp8Granularity | str,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``data * scale`` in fp32 with the scale broadcast per ``granularity``, then cast to ``out_dtype``."""
    return (data.float() * expand_fp8_scale(scale, data.shape, granularity)).to(out_dtype)


# ----------------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def fp8_scale_of(amax):
    """fp32 scale of a non-negative fp32 amax, exactly as :func:`fp8_scale_from_amax` (the FMA gives the sign
    of ``scale * 448 - amax`` exactly)."""
    scale = tl.div_rn(amax, 448.0)
    clips = (scale < 1.1754943508222875e-38) & (tl.fma(scale, 448.0, -amax) < 0.0)
    scale = tl.where(clips, (scale.to(tl.int32, bitcast=True) + 1).to(tl.float32, bitcast=True), scale)
    return tl.where(scale == 0.0, 1.0, scale)


@triton.jit
def scale_from_amax_bits(amax_bits):
    """fp32 scale from the int32 bits of a non-negative amax, exactly as :func:`fp8_scale_from_amax`."""
    return fp8_scale_of(amax_bits.to(tl.float32, bitcast=True))


@triton.jit
def _fp8_row_group_kernel(
    x_ptr,  # [B, R, K] fp32 | bf16 | fp16; element (b, r, k) at b*stride_xb + r*stride_xr + k*stride_xk
    q_ptr,  # [B, R, K] uint8 E4M3 codes, contiguous (K fastest)
    scale_ptr,  # [B, R, cdiv(K, GROUP_K)] fp32, contiguous
    R,
    K,
    stride_xb,
    stride_xr,
    stride_xk,
    GROUP_K: tl.constexpr,
    SOFT_CAST: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SCALE_K_MAJOR: tl.constexpr = False,
):
    """Groups of GROUP_K consecutive elements of a row share a scale (the launcher's 1x128 groups: GROUP_K =
    128). A BLOCK_R x BLOCK_K tile holds BLOCK_K // GROUP_K groups per row. SCALE_K_MAJOR (one batch): the
    scales go to ``[cdiv(K, GROUP_K), R rounded up to a multiple of 4]``, each K step's rows contiguous (what
    the Gluon GEMM reads by TMA)."""
    GROUPS: tl.constexpr = BLOCK_K // GROUP_K
    pid_r = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_b = tl.program_id(2).to(tl.int64)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (rows < R)[:, None] & (cols < K)[None, :]

    x_offsets = rows.to(tl.int64)[:, None] * stride_xr + cols.to(tl.int64)[None, :] * stride_xk
    x_raw = tl.load(x_ptr + pid_b * stride_xb + x_offsets, mask=mask, other=0.0)
    x_raw = tl.reshape(x_raw, [BLOCK_R, GROUPS, GROUP_K])
    amax_bits = tl.max(magnitude_bits(x_raw), axis=2)
    scale = scale_from_amax_bits(amax_bits)
    pre, divisor, reciprocal = scale_division_setup(scale)
    scaled = divide_by_scale(
        widen_to_fp32(x_raw), pre[:, :, None], divisor[:, :, None], reciprocal[:, :, None]
    )
    q = tl.reshape(e4m3_code(scaled, SOFT_CAST), [BLOCK_R, BLOCK_K])

    q_offsets = rows.to(tl.int64)[:, None] * K + cols[None, :]
    tl.store(q_ptr + pid_b * R * K + q_offsets, q, mask=mask)

    n_groups = tl.cdiv(K, GROUP_K)
    group_cols = pid_k * GROUPS + tl.arange(0, GROUPS)
    scale_mask = (rows < R)[:, None] & (group_cols < n_groups)[None, :]
    if SCALE_K_MAJOR:
        scale_offsets = group_cols.to(tl.int64)[None, :] * (tl.cdiv(R, 4) * 4) + rows[:, None]
        tl.store(scale_ptr + scale_offsets, scale, mask=scale_mask)
    else:
        scale_offsets = rows.to(tl.int64)[:, None] * n_groups + group_cols[None, :]
        tl.store(scale_ptr + pid_b * R * n_groups + scale_offsets, scale, mask=scale_mask)


@triton.jit
def _fp8_row_pieces_kernel(
    x_ptr,  # [B, R, K] fp32 | bf16 | fp16; element (b, r, k) at b*stride_xb + r*stride_xr + k*stride_xk
    q_ptr,  # [B, R, K] uint8 E4M3 codes, contiguous (K fastest)
    scale_ptr,  # [B, R] fp32, contiguous
    R,
    K,
    stride_xb,
    stride_xr,
    stride_xk,
    SOFT_CAST: tl.constexpr,
    BLOCK_R: tl.constexpr,
    PIECE_0: tl.constexpr,
    PIECE_1: tl.constexpr,
    PIECE_2: tl.constexpr,
    LOAD_POLICY: tl.constexpr = "",
    LAUNCH_DEPENDENTS: tl.constexpr = False,  # let a programmatic dependent launch start (sm_90+)
):
    """Per-row scales with whole rows in registers, each row held as up to three power-of-two pieces side by
    side (PIECE_1, PIECE_2 = 0: absent), e.g. 7168 = 4096 + 2048 + 1024: one read of the input, and no idle
    lanes where K is a sum of three powers of two (see :func:`fp8_row_pieces`). Every piece's load is issued
    before the first reduction, so a program has its whole row in flight at once."""
    if LAUNCH_DEPENDENTS:
        gdc_launch_dependents()
    pid_r = tl.program_id(0)
    pid_b = tl.program_id(2).to(tl.int64)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < R
    x_rows = x_ptr + pid_b * stride_xb + rows.to(tl.int64)[:, None] * stride_xr
    q_rows = q_ptr + pid_b * R * K + rows.to(tl.int64)[:, None] * K

    cols_0 = tl.arange(0, PIECE_0)
    mask_0 = row_mask[:, None] & (cols_0 < K)[None, :]
    x_0 = tl.load(
        x_rows + cols_0.to(tl.int64)[None, :] * stride_xk, mask=mask_0, other=0.0, eviction_policy=LOAD_POLICY
    )
    if PIECE_1 > 0:
        cols_1 = PIECE_0 + tl.arange(0, PIECE_1)
        mask_1 = row_mask[:, None] & (cols_1 < K)[None, :]
        x_1 = tl.load(
            x_rows + cols_1.to(tl.int64)[None, :] * stride_xk,
            mask=mask_1,
            other=0.0,
            eviction_policy=LOAD_POLICY,
        )
    if PIECE_2 > 0:
        cols_2 = PIECE_0 + PIECE_1 + tl.arange(0, PIECE_2)
        mask_2 = row_mask[:, None] & (cols_2 < K)[None, :]
        x_2 = tl.load(
            x_rows + cols_2.to(tl.int64)[None, :] * stride_xk,
            mask=mask_2,
            other=0.0,
            eviction_policy=LOAD_POLICY,
        )

    amax_bits = tl.max(magnitude_bits(x_0), axis=1)
    if PIECE_1 > 0:
        amax_bits = tl.maximum(amax_bits, tl.max(magnitude_bits(x_1), axis=1))
    if PIECE_2 > 0:
        amax_bits = tl.maximum(amax_bits, tl.max(magnitude_bits(x_2), axis=1))
    scale = scale_from_amax_bits(amax_bits)
    tl.store(scale_ptr + pid_b * R + rows, scale, mask=row_mask)
    pre, divisor, reciprocal = scale_division_setup(scale)
    pre, divisor, reciprocal = pre[:, None], divisor[:, None], reciprocal[:, None]

    q_0 = e4m3_code(divide_by_scale(widen_to_fp32(x_0), pre, divisor, reciprocal), SOFT_CAST)
    tl.store(q_rows + cols_0[None, :], q_0, mask=mask_0)
    if PIECE_1 > 0:
        q_1 = e4m3_code(divide_by_scale(widen_to_fp32(x_1), pre, divisor, reciprocal), SOFT_CAST)
        tl.store(q_rows + cols_1[None, :], q_1, mask=mask_1)
    if PIECE_2 > 0:
        q_2 = e4m3_code(divide_by_scale(widen_to_fp32(x_2), pre, divisor, reciprocal), SOFT_CAST)
        tl.store(q_rows + cols_2[None, :], q_2, mask=mask_2)


@triton.jit
def row_amax_bits(x_rows, row_mask, K, stride_xk, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """The magnitude bits of each row's amax (BLOCK_R rows at ``x_rows``), read BLOCK_K columns at a time."""
    amax_bits = tl.zeros([BLOCK_R], dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        mask = row_mask[:, None] & (cols < K)[None, :]
        x_raw = tl.load(x_rows + cols.to(tl.int64)[None, :] * stride_xk, mask=mask, other=0.0)
        amax_bits = tl.maximum(amax_bits, tl.max(magnitude_bits(x_raw), axis=1))
    return amax_bits


@triton.jit
def _fp8_long_row_kernel(
    x_ptr,  # [B, R, K] fp32 | bf16 | fp16; element (b, r, k) at b*stride_xb + r*stride_xr + k*stride_xk
    q_ptr,  # [B, R, K] uint8 E4M3 codes, contiguous (K fastest)
    scale_ptr,  # [B, R] fp32, contiguous
    R,
    K,
    stride_xb,
    stride_xr,
    stride_xk,
    SOFT_CAST: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    LAUNCH_DEPENDENTS: tl.constexpr = False,  # let a programmatic dependent launch start (sm_90+)
):
    """Per-row scales for rows too long to hold in registers: a pass for the amax, then a quantize pass (the
    second read of a BLOCK_R-row strip mostly hits L2)."""
    if LAUNCH_DEPENDENTS:
        gdc_launch_dependents()
    pid_r = tl.program_id(0)
    pid_b = tl.program_id(2).to(tl.int64)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < R
    x_rows = x_ptr + pid_b * stride_xb + rows.to(tl.int64)[:, None] * stride_xr

    scale = scale_from_amax_bits(row_amax_bits(x_rows, row_mask, K, stride_xk, BLOCK_R, BLOCK_K))
    tl.store(scale_ptr + pid_b * R + rows, scale, mask=row_mask)
    pre, divisor, reciprocal = scale_division_setup(scale)
    pre, divisor, reciprocal = pre[:, None], divisor[:, None], reciprocal[:, None]

    q_rows = q_ptr + pid_b * R * K + rows.to(tl.int64)[:, None] * K
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        mask = row_mask[:, None] & (cols < K)[None, :]
        x = widen_to_fp32(tl.load(x_rows + cols.to(tl.int64)[None, :] * stride_xk, mask=mask, other=0.0))
        q = e4m3_code(divide_by_scale(x, pre, divisor, reciprocal), SOFT_CAST)
        tl.store(q_rows + cols[None, :], q, mask=mask)


@triton.jit
def _fp8_row_chunks_kernel(
    x_ptr,  # [B, R, K] fp32 | bf16 | fp16; element (b, r, k) at b*stride_xb + r*stride_xr + k*stride_xk
    q_ptr,  # [B, R, K] uint8 E4M3 codes, contiguous (K fastest)
    scale_ptr,  # [B, R] fp32, contiguous
    R,
    K,
    stride_xb,
    stride_xr,
    stride_xk,
    SOFT_CAST: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,  # columns per step of the amax loop
    CHUNK: tl.constexpr,  # columns this program quantizes
    LAUNCH_DEPENDENTS: tl.constexpr = False,  # let a programmatic dependent launch start (sm_90+)
):
    """Per-row scales for a few long rows (decode): every program of a row finds the whole row's amax itself
    (a max over the row, which each of them reads, mostly from L2), then quantizes only its CHUNK of the columns.
    One program per row would do all of a long row's conversions alone; here cdiv(K, CHUNK) programs share
    them, with nothing passed between programs (each computes the same scale from the same bytes)."""
    if LAUNCH_DEPENDENTS:
        gdc_launch_dependents()
    pid_r = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_b = tl.program_id(2).to(tl.int64)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < R
    x_rows = x_ptr + pid_b * stride_xb + rows.to(tl.int64)[:, None] * stride_xr

    scale = scale_from_amax_bits(row_amax_bits(x_rows, row_mask, K, stride_xk, BLOCK_R, BLOCK_K))
    if pid_k == 0:
        tl.store(scale_ptr + pid_b * R + rows, scale, mask=row_mask)
    pre, divisor, reciprocal = scale_division_setup(scale)

    cols = pid_k * CHUNK + tl.arange(0, CHUNK)
    mask = row_mask[:, None] & (cols < K)[None, :]
    x = widen_to_fp32(tl.load(x_rows + cols.to(tl.int64)[None, :] * stride_xk, mask=mask, other=0.0))
    q = e4m3_code(divide_by_scale(x, pre[:, None], divisor[:, None], reciprocal[:, None]), SOFT_CAST)
    tl.store(q_ptr + pid_b * R * K + rows.to(tl.int64)[:, None] * K + cols[None, :], q, mask=mask)


@triton.jit
def _fp8_block_kernel(
    x_ptr,  # [B, R, K] fp32 | bf16 | fp16; element (b, r, k) at b*stride_xb + r*stride_xr + k*stride_xk
    q_ptr,  # [B, R, K] uint8 E4M3 codes, contiguous (K fastest)
    scale_ptr,  # [B, cdiv(R, 128), cdiv(K, 128)] fp32, contiguous
    R,
    K,
    stride_xb,
    stride_xr,
    stride_xk,
    SOFT_CAST: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    LOAD_POLICY: tl.constexpr = "",
):
    """One program per strip of 128 rows by BLOCK_K columns: BLOCK_K // 128 weight blocks of 128 x 128, each
    with its own scale, done one after the other, the next block's load issued before the current block is
    reduced and stored (more bytes in flight per program). The grid's first axis runs along K, so the programs
    that run at the same time read long contiguous runs of the same rows (DRAM pages opened once)."""
    BLOCKS_K: tl.constexpr = BLOCK_K // 128
    pid_k = tl.program_id(0)
    pid_r = tl.program_id(1)
    pid_b = tl.program_id(2).to(tl.int64)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < R
    x_rows = x_ptr + pid_b * stride_xb + rows.to(tl.int64)[:, None] * stride_xr
    q_rows = q_ptr + pid_b * R * K + rows.to(tl.int64)[:, None] * K
    n_col_blocks = tl.cdiv(K, 128)
    scale_row = scale_ptr + (pid_b * tl.num_programs(1) + pid_r) * n_col_blocks

    cols = pid_k * BLOCK_K + tl.arange(0, 128)
    mask = row_mask[:, None] & (cols < K)[None, :]
    x_next = tl.load(
        x_rows + cols.to(tl.int64)[None, :] * stride_xk, mask=mask, other=0.0, eviction_policy=LOAD_POLICY
    )
    for i in tl.static_range(BLOCKS_K):
        x_raw = x_next
        block_cols = cols
        block_mask = mask
        if i + 1 < BLOCKS_K:
            cols = block_cols + 128
            mask = row_mask[:, None] & (cols < K)[None, :]
            x_next = tl.load(
                x_rows + cols.to(tl.int64)[None, :] * stride_xk,
                mask=mask,
                other=0.0,
                eviction_policy=LOAD_POLICY,
            )
        block_amax = tl.max(tl.max(magnitude_bits(x_raw), axis=1), axis=0)
        scale = scale_from_amax_bits(block_amax)
        pre, divisor, reciprocal = scale_division_setup(scale)
        q = e4m3_code(divide_by_scale(widen_to_fp32(x_raw), pre, divisor, reciprocal), SOFT_CAST)
        tl.store(q_rows + block_cols[None, :], q, mask=block_mask)
        block_col = pid_k * BLOCKS_K + i
        tl.store(scale_row + block_col, scale, mask=block_col < n_col_blocks)


@triton.jit
def _amax_bits_kernel(
    x_ptr,  # [B, R, K] fp32 | bf16 | fp16; element (b, r, k) at b*stride_xb + r*stride_xr + k*stride_xk
    amax_bits_ptr,  # PARTIALS: [programs] int32, one per program; else [1] int32, zero-initialised
    R,
    K,
    stride_xb,
    stride_xr,
    stride_xk,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PARTIALS: tl.constexpr,
):
    """Whole-tensor amax on the fp32 bits of |x| (an integer max is order-independent, so deterministic):
    each program's tile maximum stored in its own slot (``PARTIALS``, reduced by the quantize kernel), or an
    atomic max into one zeroed word."""
    pid_r = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_b = tl.program_id(2).to(tl.int64)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (rows < R)[:, None] & (cols < K)[None, :]
    x_offsets = rows.to(tl.int64)[:, None] * stride_xr + cols.to(tl.int64)[None, :] * stride_xk
    x_raw = tl.load(x_ptr + pid_b * stride_xb + x_offsets, mask=mask, other=0.0)
    tile_amax_bits = tl.max(tl.max(magnitude_bits(x_raw), axis=1), axis=0)
    if PARTIALS:
        slot = (pid_b * tl.num_programs(1) + pid_k) * tl.num_programs(0) + pid_r
        tl.store(amax_bits_ptr + slot, tile_amax_bits)
    else:
        tl.atomic_max(amax_bits_ptr, tile_amax_bits)


@triton.jit
def _fp8_tensor_quantize_kernel(
    x_ptr,  # [B, R, K] fp32 | bf16 | fp16; element (b, r, k) at b*stride_xb + r*stride_xr + k*stride_xk
    amax_bits_ptr,  # from _amax_bits_kernel: PARTIALS int32 per program of its grid (the same as this one's)
    q_ptr,  # [B, R, K] uint8 E4M3 codes, contiguous (K fastest)
    scale_ptr,  # [1] fp32, written by program (0, 0, 0)
    R,
    K,
    stride_xb,
    stride_xr,
    stride_xk,
    SOFT_CAST: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PARTIALS: tl.constexpr,  # 0, or a power of two >= the number of programs (the same for every M)
):
    """Quantize one tile with the per-tensor scale, derived from the amax on the device (no host sync)."""
    pid_r = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_b = tl.program_id(2).to(tl.int64)
    if PARTIALS:
        programs = tl.num_programs(0) * tl.num_programs(1) * tl.num_programs(2)
        slots = tl.arange(0, PARTIALS)
        amax_bits = tl.max(tl.load(amax_bits_ptr + slots, mask=slots < programs, other=0), axis=0)
    else:
        amax_bits = tl.load(amax_bits_ptr)
    scale = scale_from_amax_bits(amax_bits)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (rows < R)[:, None] & (cols < K)[None, :]
    x_offsets = rows.to(tl.int64)[:, None] * stride_xr + cols.to(tl.int64)[None, :] * stride_xk
    x = widen_to_fp32(tl.load(x_ptr + pid_b * stride_xb + x_offsets, mask=mask, other=0.0))
    pre, divisor, reciprocal = scale_division_setup(scale)
    q = e4m3_code(divide_by_scale(x, pre, divisor, reciprocal), SOFT_CAST)
    q_offsets = rows.to(tl.int64)[:, None] * K + cols[None, :]
    tl.store(q_ptr + pid_b * R * K + q_offsets, q, mask=mask)
    if (pid_r == 0) & (pid_k == 0) & (pid_b == 0):
        tl.store(scale_ptr, scale)


def fp8_row_pieces(cols: int, max_pieces: int = 3, min_piece: int = 512) -> tuple[int, int, int]:
    """Power-of-two lengths, largest first, that together cover a row of ``cols`` (0: no piece): the binary
    digits of ``cols`` from the top, the last piece (the ``max_pieces``-th, or one of at most ``min_piece``)
    rounded up to cover the rest. 7168 -> (4096, 2048, 1024), 14336 -> (8192, 4096, 2048), 4096 -> (4096, 0,
    0), 7200 -> (4096, 2048, 2048), 200 -> (256, 0, 0)."""
    if not 1 <= max_pieces <= 3:
        raise ValueError(f"fp8_row_pieces: the row kernel holds 1 to 3 pieces, got max_pieces={max_pieces}")
    pieces = []
    remaining = cols
    while remaining > 0:
        if len(pieces) == max_pieces - 1 or remaining <= min_piece:
            piece = next_power_of_2(remaining)
        else:
            piece = 1 << (remaining.bit_length() - 1)
        pieces.append(piece)
        remaining -= piece
    pieces += [0] * (3 - len(pieces))
    return pieces[0], pieces[1], pieces[2]


@functools.lru_cache(maxsize=1024)
def fp8_tile_config(granularity: Fp8Granularity, rows: int, cols: int) -> TileConfig:
    """The launcher's tile for a ``rows`` x ``cols`` problem of ``granularity``.

    Per-row: ``block_k >= cols`` means whole rows in registers (as up to three power-of-two pieces, see
    :func:`fp8_row_pieces`), else two passes over ``block_k``-wide chunks. 128x128 blocks: ``block_k`` is the
    strip of blocks one program does in turn."""
    granularity = Fp8Granularity(granularity)
    if granularity is Fp8Granularity.BLOCK_128X128:
        return TileConfig(FP8_BLOCK, _BLOCK_STRIP_K, _BLOCK_WARPS)
    if granularity is Fp8Granularity.PER_ROW:
        whole_row = next_power_of_2(cols)
        if whole_row <= _MAX_ROW_IN_REGISTERS:
            block_r = max(1, min(next_power_of_2(rows), 4096 // whole_row))
            # Rows held as several pieces (K not a power of two) ran best with half the warps (sweep).
            elements_per_warp = 1024 if whole_row == cols else 2048
            num_warps = max(1, min(_ROW_MAX_WARPS, block_r * whole_row // elements_per_warp))
            return TileConfig(block_r, whole_row, num_warps)
        return TileConfig(1, 4096, 8)
    return streaming_tile(
        rows,
        cols,
        min_block_k=FP8_BLOCK if granularity is Fp8Granularity.GROUP_1X128 else 1,
        max_block_k=1024,
    )


_MAX_GRID_Y = 65535  # CUDA's limit on a launch grid's second (and third) axis


class _LaunchPlan(NamedTuple):
    """Everything about a launch that depends only on shape, strides, dtype and options (cached: host time
    per call is what bounds small shapes)."""

    kernel_name: str  # "tensor" (two launches) or a key of _KERNELS
    scale_shape: tuple[int, ...]
    grid: tuple[int, int, int] | None  # None: empty input, nothing to launch
    int_args: tuple[int, ...]
    constexprs: dict


TENSOR_AMAX_PARTIALS_MAX = 1024
"""Per-tensor quantize: up to this many programs, each amax program stores its tile's maximum in its own slot
and every quantize program reduces them all (at most this many int32 reads, from L2); beyond, the amax is one
atomic max into a word that must be zeroed first, a third launch. 0 turns the slots off.

Measured and left out: the quantize kernel as a programmatic dependent launch of the amax kernel, loading its
tile before it waits for the amax (H100, per-tensor W8A8 Linear, ``results/tensor-quantize-pdl-h100.log``):
0.1-0.7 us faster at M = 1 and 16 (14 of 14 cases, no goal case crossed), mixed at 1024, slower at 4096 on 5
of 7 shapes (8B qkv 192.8 -> 206.4 us: the waiting quantize programs hold SM slots the amax still needs). Nor
did the quantize programs visiting the tiles in the amax kernel's reverse order, so that an activation larger
than the L2 is read again first where the amax left it (H100, four Llama shapes at M = 1024-16384, two
interleaved repeats: time x1.008, faster in 8 of 24, ``results/tensor-quantize-reversed-h100.log``)."""


def row_chunks_apply(rows: int, cols: int) -> bool:
    """Whether a per-row quantize of ``rows`` rows (batches included) of ``cols`` columns takes
    :func:`_fp8_row_chunks_kernel` (few, long rows: the decode case)."""
    return rows <= ROW_CHUNKS_MAX_ROWS and cols > ROW_CHUNKS_MIN_COLS


@functools.lru_cache(maxsize=4096)
def _fp8_launch_plan(
    shape: tuple[int, ...],
    strides: tuple[int, ...],
    dtype: torch.dtype,
    granularity: Fp8Granularity | str,
    cast: E4m3Cast | str,
    config: TileConfig | None,
) -> _LaunchPlan:
    granularity = Fp8Granularity(granularity)
    check_quantize_shape(shape, dtype, "quantize_fp8_triton")
    rows_per_scale = FP8_BLOCK if granularity is Fp8Granularity.BLOCK_128X128 else 1
    view = row_batches_of(shape, strides, rows_per_scale)
    tile = config or fp8_tile_config(granularity, view.rows, view.cols)
    grid = (ceil_div(view.rows, tile.block_r), ceil_div(view.cols, tile.block_k), view.batches)
    constexprs = {"SOFT_CAST": resolve_cast(cast), "BLOCK_R": tile.block_r, "BLOCK_K": tile.block_k}
    constexprs["num_warps"] = tile.num_warps
    if granularity is Fp8Granularity.PER_TENSOR:
        kernel_name, scale_shape = "tensor", ()
    elif granularity is Fp8Granularity.BLOCK_128X128:
        if tile.block_r != FP8_BLOCK or tile.block_k % FP8_BLOCK != 0:
            raise ValueError(
                f"128x128 blocks need a tile of {FP8_BLOCK} rows by a multiple of 128, got {tile}"
            )
        kernel_name, grid = "block", (grid[1], grid[0], grid[2])  # K first: see _fp8_block_kernel
        if grid[1] > _MAX_GRID_Y:
            raise ValueError(
                f"quantize_fp8_triton: {view.rows} rows make {grid[1]} strips of {FP8_BLOCK}, more than the "
                f"{_MAX_GRID_Y} a launch grid's second axis holds; quantize the weight in slices of rows"
            )
        scale_shape = (*shape[:-2], ceil_div(shape[-2], FP8_BLOCK), ceil_div(shape[-1], FP8_BLOCK))
    elif granularity is Fp8Granularity.GROUP_1X128:
        if tile.block_k % FP8_BLOCK != 0:
            raise ValueError(f"1x128 groups need block_k to be a multiple of {FP8_BLOCK}, got {tile}")
        kernel_name, scale_shape = "row_group", (*shape[:-1], ceil_div(shape[-1], FP8_BLOCK))
        constexprs["GROUP_K"] = FP8_BLOCK
    else:
        scale_shape = (*shape[:-1], 1)
        if config is None and row_chunks_apply(view.rows * view.batches, view.cols):
            chunk, warps = row_chunk_for(view.rows * view.batches, view.cols)
            kernel_name, grid = "row_chunks", (view.rows, ceil_div(view.cols, chunk), view.batches)
            step = min(ROW_CHUNKS_AMAX_STEP, triton.next_power_of_2(view.cols))
            constexprs.update(BLOCK_R=1, BLOCK_K=step, CHUNK=chunk)
            constexprs["num_warps"] = warps
        elif tile.block_k >= view.cols:
            kernel_name = "row_pieces"
            del constexprs["BLOCK_K"]
            pieces = fp8_row_pieces(view.cols)
            constexprs.update(PIECE_0=pieces[0], PIECE_1=pieces[1], PIECE_2=pieces[2])
        else:
            kernel_name, grid = "long_row", (grid[0], 1, grid[2])
    empty = view.rows == 0 or view.cols == 0 or view.batches == 0
    int_args = (view.rows, view.cols, view.stride_b, view.stride_r, view.stride_k)
    return _LaunchPlan(kernel_name, scale_shape, None if empty else grid, int_args, constexprs)


def quantize_fp8_triton(
    x: torch.Tensor,
    granularity: Fp8Granularity | str,
    *,
    cast: E4m3Cast | str = E4m3Cast.AUTO,
    config: TileConfig | None = None,
    scale_k_major: bool = False,
    launch_dependents: bool = False,
) -> Fp8Quantized:
    """Triton FP8 quantize with the reference's bytes and scales; no host synchronisation.

    Per-tensor takes two launches (the amax, then quantize; see :data:`TENSOR_AMAX_PARTIALS_MAX`); the other
    granularities one pass. ``scale_k_major`` (1x128 groups of a 2-D input): the same scales ``[M, cdiv(K,
    128)]`` as a view of a K-major buffer ``[cdiv(K, 128), M rounded up to 4]`` (strides ``(1, ld)``), each K
    step's scales one contiguous, 16-byte aligned run for a TMA box. ``launch_dependents`` (sm_90+; the one-pass
    per-row kernels): the next launch, if it is a programmatic dependent one, may start as soon as every program
    of this one has (it waits for this one's results itself).
    """
    granularity = Fp8Granularity(granularity)
    if scale_k_major and (granularity is not Fp8Granularity.GROUP_1X128 or x.dim() != 2):
        raise QuantizeInputError("quantize_fp8_triton: scale_k_major is for 1x128 groups of a 2-D input")
    single_row = x.dim() > 0 and 0 < x.numel() == x.shape[-1]
    if granularity is Fp8Granularity.PER_TENSOR and TENSOR_ONE_ROW_AS_ROW and single_row and config is None:
        row = quantize_fp8_triton(x, Fp8Granularity.PER_ROW, cast=cast)
        return Fp8Quantized(row.data, row.scale.reshape(()))
    plan = _fp8_launch_plan(tuple(x.shape), tuple(x.stride()), x.dtype, granularity, cast, config)
    data = torch.empty(x.shape, dtype=torch.uint8, device=x.device)
    if plan.kernel_name == "tensor":
        if plan.grid is None:
            return Fp8Quantized(data.view(torch.float8_e4m3fn), torch.ones((), device=x.device))
        scale = torch.empty((), dtype=torch.float32, device=x.device)  # written by the quantize kernel
        programs = plan.grid[0] * plan.grid[1] * plan.grid[2]
        slots = triton.next_power_of_2(TENSOR_AMAX_PARTIALS_MAX) if TENSOR_AMAX_PARTIALS_MAX else 0
        partials = slots if programs <= TENSOR_AMAX_PARTIALS_MAX else 0  # one compiled variant either way
        if partials:  # no zeroed word: one launch fewer
            amax_bits = torch.empty(programs, dtype=torch.int32, device=x.device)
        else:
            amax_bits = torch.zeros(1, dtype=torch.int32, device=x.device)
        tile_args = {k: v for k, v in plan.constexprs.items() if k != "SOFT_CAST"}
        _amax_bits_kernel[plan.grid](x, amax_bits, *plan.int_args, **tile_args, PARTIALS=partials > 0)
        _fp8_tensor_quantize_kernel[plan.grid](
            x, amax_bits, data, scale, *plan.int_args, **plan.constexprs, PARTIALS=partials
        )
        return Fp8Quantized(data.view(torch.float8_e4m3fn), scale)
    if scale_k_major:
        buffer, scale = k_major_scale_buffer(*plan.scale_shape, x.device)
        if plan.grid is not None:
            _KERNELS["row_group"][plan.grid](
                x, data, buffer, *plan.int_args, **plan.constexprs, SCALE_K_MAJOR=True
            )
        return Fp8Quantized(data.view(torch.float8_e4m3fn), scale)
    scale = torch.empty(plan.scale_shape, dtype=torch.float32, device=x.device)
    if plan.grid is not None:
        kernel = _KERNELS[plan.kernel_name]
        extra = {"LAUNCH_DEPENDENTS": True} if launch_dependents and plan.kernel_name != "row_group" else {}
        kernel[plan.grid](x, data, scale, *plan.int_args, **plan.constexprs, **extra)
    return Fp8Quantized(data.view(torch.float8_e4m3fn), scale)


_KERNELS = {
    "block": _fp8_block_kernel,
    "row_group": _fp8_row_group_kernel,
    "row_pieces": _fp8_row_pieces_kernel,
    "row_chunks": _fp8_row_chunks_kernel,
    "long_row": _fp8_long_row_kernel,
}


# ----------------------------------------------------------------------------------------------------------
# dispatchers
# ----------------------------------------------------------------------------------------------------------


def quantize_fp8(
    x: torch.Tensor, granularity: Fp8Granularity | str, backend: Backend | str = Backend.AUTO
) -> Fp8Quantized:
    """Quantize ``x`` to FP8 E4M3 with fp32 scales of ``granularity``: Triton on CUDA, torch elsewhere
    (``backend='auto'``); both give the same bytes and scales."""
    if resolve_backend(backend, x) is Backend.TRITON:
        return quantize_fp8_triton(x, granularity)
    return quantize_fp8_reference(x, granularity)


def quantize_fp8_per_tensor(x: torch.Tensor, backend: Backend | str = Backend.AUTO) -> Fp8Quantized:
    """One dynamic scale for the whole tensor (0-dim fp32)."""
    return quantize_fp8(x, Fp8Granularity.PER_TENSOR, backend)


def quantize_fp8_per_channel(weight: torch.Tensor, backend: Backend | str = Backend.AUTO) -> Fp8Quantized:
    """One scale per weight row (output channel): scale ``[N, 1]`` for ``[N, K]``."""
    return quantize_fp8(weight, Fp8Granularity.PER_ROW, backend)


def quantize_fp8_per_token(x: torch.Tensor, backend: Backend | str = Backend.AUTO) -> Fp8Quantized:
    """Dynamic per-token activation quantization: scale ``[M, 1]`` for ``[M, K]``."""
    return quantize_fp8(x, Fp8Granularity.PER_ROW, backend)


def quantize_fp8_block128(weight: torch.Tensor, backend: Backend | str = Backend.AUTO) -> Fp8Quantized:
    """128x128 weight blocks: scale ``[ceil(N/128), ceil(K/128)]``."""
    return quantize_fp8(weight, Fp8Granularity.BLOCK_128X128, backend)


def quantize_fp8_group128(x: torch.Tensor, backend: Backend | str = Backend.AUTO) -> Fp8Quantized:
    """1x128 activation groups: scale ``[M, ceil(K/128)]``."""
    return quantize_fp8(x, Fp8Granularity.GROUP_1X128, backend)
