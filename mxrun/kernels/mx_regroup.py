"""MXFP8 weights re-expressed at one power-of-two scale per 128x128 tile, for Hopper's FP8 tensor cores.

Why. Hopper has no MX MMA. An FP8 MMA chain can only run over a stretch of K where both operands' scales are
constant; MXFP8 changes them every 32 elements, so a kernel that keeps the MXFP8 scales must leave the tensor
cores and rescale its accumulator every 32 K (``mxfp8_fp8_gemm_triton``, measured at a fraction of bf16 cuBLAS).
The block-scaled FP8 GEMMs (:mod:`mxrun.kernels.fp8_tma_gemm`, :mod:`mxrun.kernels.scaled_gemm`) rescale every
128 K, on 128x128 weight tiles and 1x128 activation groups. So the MXFP8 W8A8 Linear on Hopper feeds them:

* the weight, kept in MXFP8 (the recipe's format, what is exported), re-expressed per call by
  :func:`regroup_mxfp8`: each 128x128 tile takes the largest E8M0 code ``T`` of its 128 rows x 4 blocks, and
  each element ``v`` (an E4M3 value of a block with code ``c``) becomes ``E4M3(v * 2^(c - T))``, RNE;
* the activations quantized with the MX scale rule over 1x128 groups
  (:func:`~mxrun.kernels.mxfp8_quantize.quantize_mx_group128`).

Numerics. Multiplying an E4M3 value by ``2^-(T - c)`` only moves its exponent, so it stays exact while the
result is an E4M3 normal (``>= 2^-6``); only elements below ``2^-6 * 2^(T-127)`` at the tile's scale fall
onto the subnormal grid and round (RNE). The change to any element is at most half a subnormal step,
``2^-10 * 2^(T-127)``: with the round-up rule the tile's largest block has its amax above ``224 * 2^(T-127)``,
so that is below ``2^-17.8`` of the tile's largest magnitude, far under the E4M3 rounding of the elements that
carry the sum (``2^-4`` relative). The activation side obeys the same bound per 1x128 group. NaN blocks (code
0xFF) do not take part in ``T`` and their elements become NaN, so a NaN spreads exactly as in MXFP8.

Cost: one read and one write of the weight's bytes per call (a bandwidth-bound kernel), which the 2x rate of
FP8 over bf16 MMAs pays for at large M (``ALIGNED_MIN_M`` in :mod:`mxrun.kernels.mxfp8_gemm`, measured there).
A recipe that sets ``tile_aligned: true`` stores the weight in this form once (:func:`align_mxfp8`: still
MXFP8, every block of a tile carrying the tile's code) and the GEMMs take it as stored, with its tile scales
from :func:`aligned_tile_scales`. On sm_100 the native MX MMA reads MXFP8 as it is and this step goes away.

Launch: one program per 128x128 tile, 4 warps, each element re-encoded four to a 32-bit word with integer ops,
an fp16x2 multiply and an fp16x2 -> E4M3x2 conversion (``_REENCODE_WORD``). H100, L2 flushed, against a device
copy of the same bytes in the same run (``results/regroup-words-h100.json``, the previous kernel kept aside for
it): 0.93-0.96 of the copy's speed on the Llama 8B/70B weights and two MoE stacks (the fp32 round trip before,
with two conversions per element: 0.82-0.84), 0.81 on 4096x4096 (0.65; 8 warps 0.59). Same bits, checked in that
run and by the tests (every code at every shift). Measured and left out earlier (commit ee882d6, its
``benchmarks/sweep_mx_regroup.py``, ``benchmarks/results/sweep-mx-regroup-h100.json``): persistent programs
that walk the tiles with the next ones' loads in flight (1-4 programs per SM, 2-3 stages, 4-8 warps), slower
everywhere (0.37-0.82 of the copy).

The aligned Linear runs this pass and its activations' 1x128 quantization in one launch when the weight goes in
one piece (:func:`quantize_and_regroup_triton`): H100, ``benchmarks/sweep_linear_setting.py --setting
mxfp8.SHARED_LAUNCH --values 0 1 --ms 1024 4096 --columns bf16 mxfp8 --repeats 2``
(``results/linear-mx-shared-launch-h100.json``): 0.988x the time of two launches at M = 1024 (9 of 14 faster;
8B ``o`` 56.9 / 53.5 -> 52.8 / 50.5 us), 1.003x at 4096.

Measured and left out: regrouping inside the Gluon GEMM instead, by its loader warp group in shared memory
between the TMA load and the wgmmas (same bits, 58 GPU tests), which would spare the pass's HBM round trip. It
ran at 0.35-0.62x of bf16 (the pass + GEMM: 0.91-1.38x); even with the regrouping taken out, handing each slot
through the loader cost a third against the direct TMA -> wgmma path (``results/mx-regroup-in-gemm-h100.log``).
"""

from __future__ import annotations

import torch

from mxrun.kernels.backend import Backend, resolve_backend, tl, triton
from mxrun.kernels.box_major import BoxMajorWeight, box_major_offsets
from mxrun.kernels.e4m3 import e4m3_code, encode_e4m3_reference, fast_widen_usable
from mxrun.kernels.fp8_quantize import FP8_BLOCK, Fp8Quantized
from mxrun.kernels.mxfp8_quantize import (
    E8M0_NAN_CODE,
    MX_BLOCK_SIZE,
    MX_GROUP128,
    Mx128Quantized,
    Mxfp8Quantized,
    MxScaleRule,
    e8m0_to_float32,
    k_major_scale_buffer,
    mx_quantize_tile,
    mxfp8_launch_plan,
    quantize_mx_group128_triton,
)
from mxrun.kernels.row_layout import QuantizeInputError, ceil_div

_BLOCKS_PER_TILE = FP8_BLOCK // MX_BLOCK_SIZE  # E8M0 codes per tile row
_REGROUP_WARPS = 4
_ACTIVATION_GROUP = tl.constexpr(MX_GROUP128)


def _check(data: torch.Tensor | BoxMajorWeight, scale_e8m0: torch.Tensor, fn: str) -> tuple[int, int]:
    """(N, K) of an MXFP8 ``[..., N, K]`` weight (a tensor, or a 2-D one held box-major) with its
    ``[..., N, K/32]`` codes, or a named error."""
    if len(data.shape) not in (2, 3) or data.dtype != torch.float8_e4m3fn:
        raise QuantizeInputError(
            f"{fn}: MXFP8 data must be a float8_e4m3fn [N, K] matrix or [E, N, K] stack, got "
            f"{data.dtype} {tuple(data.shape)}"
        )
    n, k = data.shape[-2:]
    if k % MX_BLOCK_SIZE or scale_e8m0.shape != (*data.shape[:-1], k // MX_BLOCK_SIZE):
        raise QuantizeInputError(
            f"{fn}: data {tuple(data.shape)} needs K % 32 == 0 and E8M0 scales "
            f"{(*data.shape[:-1], k // MX_BLOCK_SIZE)}, got {tuple(scale_e8m0.shape)}"
        )
    if scale_e8m0.element_size() != 1:
        raise QuantizeInputError(f"{fn}: scales must be uint8 / float8_e8m0fnu codes, got {scale_e8m0.dtype}")
    return n, k


def _power_of_two(shift: torch.Tensor) -> torch.Tensor:
    """fp32 ``2^-shift`` for int32 ``shift >= 0``, built from bits; 0 below fp32's normal range (an E4M3
    value times such a factor rounds to zero anyway)."""
    factor = ((127 - shift.clamp(max=126)) << 23).view(torch.float32)
    return torch.where(shift > 126, torch.zeros_like(factor), factor)


def per_block_codes(tile_codes: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """Tile codes ``[..., ceil(N/128), ceil(K/128)]`` spread to one per MXFP8 block ``[..., N, K/32]``."""
    rows = tile_codes.repeat_interleave(FP8_BLOCK, dim=-2)[..., :n, :]
    return rows.repeat_interleave(_BLOCKS_PER_TILE, dim=-1)[..., : k // MX_BLOCK_SIZE].contiguous()


def tile_codes_reference(scale_e8m0: torch.Tensor) -> torch.Tensor:
    """int32 ``[..., ceil(N/128), ceil(K/128)]``: each 128x128 tile's largest E8M0 code (NaN blocks left out;
    a partial edge tile takes what it has) from MXFP8 codes ``[..., N, K/32]``."""
    codes = scale_e8m0.view(torch.uint8).to(torch.int32)
    n, groups = codes.shape[-2:]
    padded = torch.nn.functional.pad(codes, (0, -groups % _BLOCKS_PER_TILE, 0, -n % FP8_BLOCK))
    padded = torch.where(padded == E8M0_NAN_CODE, torch.zeros_like(padded), padded)
    tiles = padded.reshape(*codes.shape[:-2], padded.shape[-2] // FP8_BLOCK, FP8_BLOCK, -1, _BLOCKS_PER_TILE)
    return tiles.amax(dim=(-3, -1))


def reencode_reference(
    data: torch.Tensor, scale_e8m0: torch.Tensor, target_codes: torch.Tensor
) -> torch.Tensor:
    """E4M3 ``data`` of MXFP8 blocks with codes ``scale_e8m0`` re-encoded at the (not smaller) codes
    ``target_codes`` (same shape as the codes, any integer dtype): ``E4M3(v * 2^(code - target))``, RNE; NaN
    blocks become NaN. Any slice of whole blocks can go alone: nothing here crosses a block."""
    codes = scale_e8m0.view(torch.uint8).to(torch.int32)
    groups = data.shape[-1] // MX_BLOCK_SIZE
    factor = _power_of_two((target_codes.to(torch.int32) - codes).clamp(min=0))
    values = data.float().reshape(*data.shape[:-1], groups, MX_BLOCK_SIZE) * factor.unsqueeze(-1)
    is_nan = (codes == E8M0_NAN_CODE).unsqueeze(-1)
    values = torch.where(is_nan, torch.full_like(values, float("nan")), values)
    return encode_e4m3_reference(values).reshape(data.shape).contiguous()


def regroup_mxfp8_reference(data: torch.Tensor, scale_e8m0: torch.Tensor) -> Fp8Quantized:
    """Plain-torch :func:`regroup_mxfp8`; the definition the kernel is tested against."""
    n, k = _check(data, scale_e8m0, "regroup_mxfp8_reference")
    tile_code = tile_codes_reference(scale_e8m0)
    regrouped = reencode_reference(data, scale_e8m0, per_block_codes(tile_code, n, k))
    return Fp8Quantized(regrouped, e8m0_to_float32(tile_code.to(torch.uint8)))


# Re-encoding four E4M3 codes (one 32-bit word of a 32-element block) at a power of two 2^-d, without the
# conversion unit's E4M3 -> fp16 step (conversions issue at a quarter of the integer rate on Hopper; the fp32
# round trip this replaces spent two per byte and held the kernel below the memory's speed). Each byte ``b``
# is spread into the high byte of an fp16 half by a byte permute; ``(b << 7)`` with the sign carried from bit
# 14 to 15 (``x + (x & 0x4000)``) are the fp16 bits of the E4M3 value times 2^-8, exactly, subnormals included
# (E4M3 normals and subnormals land on fp16 normals and subnormals of the same significand). One fp16x2
# multiply by 2^(8 - d) per pair (``$2``, both halves) and one RNE, saturating fp16x2 -> E4M3x2 conversion give
# the codes. The fp16 product is exact unless it is below 2^-14, where its rounding cannot move the E4M3
# result (those values round to zero or the smallest subnormals and sit far from E4M3's rounding midpoints);
# a NaN multiplier (a NaN block) gives the canonical NaN 0x7F. The E4M3 NaN code (0x7F / 0xFF), which the
# widening would read as 1.875 * 2^-8, is forced back to 0x7F at the end: ``f`` marks such bytes with 0x80,
# ``m`` with 0x7F, and ``(r | m) & ~f`` writes them.
_REENCODE_WORD = tl.constexpr(
    "{ .reg .b32 z, lo, hi, t, f, m, r; .reg .b16 a, b; mov.b32 z, 0; "
    "prmt.b32 lo, $1, z, 0x1404; shr.b32 lo, lo, 1; and.b32 t, lo, 0x40004000; add.u32 lo, lo, t; "
    "prmt.b32 hi, $1, z, 0x3424; shr.b32 hi, hi, 1; and.b32 t, hi, 0x40004000; add.u32 hi, hi, t; "
    "mul.rn.f16x2 lo, lo, $2; mul.rn.f16x2 hi, hi, $2; "
    "cvt.rn.satfinite.e4m3x2.f16x2 a, lo; cvt.rn.satfinite.e4m3x2.f16x2 b, hi; mov.b32 r, {a, b}; "
    "and.b32 t, $1, 0x7F7F7F7F; add.u32 t, t, 0x01010101; and.b32 f, t, 0x80808080; "
    "shr.b32 m, f, 7; sub.u32 m, f, m; lop3.b32 $0, r, m, f, 0x54; }"
)


@triton.jit
def _shift_multiplier(shift, block_is_nan):
    """int32 holding fp16 2^(8 - shift) in both halves (fp16 bits: a normal up to shift 22, a subnormal up to
    32, zero beyond), or an fp16 NaN for NaN blocks."""
    bits = tl.where(shift <= 22, (23 - shift) << 10, 1 << tl.maximum(32 - shift, 0))
    bits = tl.where(shift > 32, 0, bits)
    bits = tl.where(block_is_nan, 0x7E00, bits)
    return bits | (bits << 16)


@triton.jit
def _reencode_words(words, multiplier, FAST: tl.constexpr):
    """Four E4M3 codes per int32 word re-encoded at ``multiplier``'s power of two (see ``_REENCODE_WORD``).
    FAST: the PTX above (CUDA sm_90+); else the same arithmetic per byte in Triton ops (the interpreter)."""
    if FAST:
        out = tl.inline_asm_elementwise(
            _REENCODE_WORD, "=r,r,r", [words, multiplier], dtype=tl.int32, is_pure=True, pack=1
        )
    else:
        factor = (multiplier & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True)
        out = tl.zeros_like(words)
        for j in tl.static_range(4):
            b = (words >> (8 * j)) & 0xFF
            widened = (((b & 0x80) << 8) | ((b & 0x7F) << 7)).to(tl.int16).to(tl.float16, bitcast=True)
            code = e4m3_code((widened * factor).to(tl.float32), True).to(tl.int32)
            code = tl.where((b & 0x7F) == 0x7F, 0x7F, code)
            out = out | (code << (8 * j))
    return out


@triton.jit
def _regroup_tile(
    q_ptr,  # [B, N, K/4] int32 words of E4M3 codes, (b, n, w) at b*stride_qb + n*stride_qn + w; Q_BOXES: B = 1,
    # box-major (mxrun.kernels.box_major) in [BOX_N, BOX_K] boxes, BOX_K / 4 words wide
    s_ptr,  # [B, N, K/32] uint8 E8M0, (b, n, g) at b*stride_sb + n*stride_sn + g
    out_q_ptr,  # [B, N, K/4] int32 words, contiguous
    out_s_ptr,  # [B, cdiv(N, 128), cdiv(K, 128)] fp32, contiguous
    N,
    K,
    stride_qb,
    stride_qn,
    stride_sb,
    stride_sn,
    pid_k,
    pid_n,
    pid_b,
    FAST: tl.constexpr,
    BLOCK_N: tl.constexpr,  # 128
    BLOCK_K: tl.constexpr,  # 128
    Q_BOXES: tl.constexpr = False,
    BOX_N: tl.constexpr = 64,
    BOX_K: tl.constexpr = 128,
):
    """One 128x128 tile: its largest finite E8M0 code, then every element re-encoded at that scale, four per
    32-bit word."""
    G: tl.constexpr = BLOCK_K // 32
    WORDS: tl.constexpr = BLOCK_K // 4
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    words = pid_k * WORDS + tl.arange(0, WORDS)
    groups = pid_k * G + tl.arange(0, G)
    row_ok = rows < N
    codes = tl.load(
        s_ptr + pid_b * stride_sb + rows.to(tl.int64)[:, None] * stride_sn + groups[None, :],
        mask=row_ok[:, None] & (groups < K // 32)[None, :],
        other=0,
    ).to(tl.int32)
    block_is_nan = codes == 255
    tile_code = tl.max(tl.max(tl.where(block_is_nan, 0, codes), axis=1), axis=0)
    multiplier = _shift_multiplier(tl.maximum(tile_code - codes, 0), block_is_nan)

    mask = row_ok[:, None] & (words < K // 4)[None, :]
    if Q_BOXES:
        word_offsets = box_major_offsets(rows, words, tl.cdiv(K, BOX_K), BOX_N, BOX_K // 4)
    else:
        word_offsets = pid_b * stride_qb + rows.to(tl.int64)[:, None] * stride_qn + words[None, :]
    packed = tl.load(q_ptr + word_offsets, mask=mask, other=0)
    packed = tl.reshape(packed, [BLOCK_N, G, WORDS // G])
    multiplier = tl.broadcast_to(multiplier[:, :, None], [BLOCK_N, G, WORDS // G])
    out = tl.reshape(_reencode_words(packed, multiplier, FAST), [BLOCK_N, WORDS])
    tl.store(
        out_q_ptr + pid_b * N * (K // 4) + rows.to(tl.int64)[:, None] * (K // 4) + words[None, :],
        out,
        mask=mask,
    )

    scale = tl.where(tile_code == 0, 0x00400000, tile_code << 23).to(tl.float32, bitcast=True)
    n_tiles, k_tiles = tl.cdiv(N, BLOCK_N), tl.cdiv(K, BLOCK_K)
    tl.store(out_s_ptr + (pid_b * n_tiles + pid_n) * k_tiles + pid_k, scale)


@triton.jit
def _regroup_kernel(
    q_ptr,
    s_ptr,
    out_q_ptr,
    out_s_ptr,
    N,
    K,
    stride_qb,
    stride_qn,
    stride_sb,
    stride_sn,
    FAST: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    Q_BOXES: tl.constexpr = False,
    BOX_N: tl.constexpr = 64,
    BOX_K: tl.constexpr = 128,
):
    """One program per 128x128 tile (:func:`_regroup_tile`), grid (K tiles, N tiles, stack)."""
    _regroup_tile(
        q_ptr, s_ptr, out_q_ptr, out_s_ptr, N, K, stride_qb, stride_qn, stride_sb, stride_sn,
        tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64), FAST, BLOCK_N, BLOCK_K,
        Q_BOXES, BOX_N, BOX_K,
    )  # fmt: skip


@triton.jit
def _quantize_and_regroup_kernel(
    x_ptr,  # [M, K] bf16/fp16 activations, (r, k) at r*stride_xr + k*stride_xk
    a_ptr,  # [M, K] uint8 E4M3 codes out
    a_scale_ptr,  # [M, cdiv(K, 128)] fp32 out
    q_ptr,  # the weight, as _regroup_tile
    s_ptr,
    out_q_ptr,
    out_s_ptr,
    M,
    N,
    K,
    stride_xr,
    stride_xk,
    stride_qn,
    stride_sn,
    regroup_programs,
    ROUND_UP: tl.constexpr,
    SOFT_CAST: tl.constexpr,
    FAST: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_X: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SCALE_K_MAJOR: tl.constexpr = False,
    Q_BOXES: tl.constexpr = False,
    BOX_N: tl.constexpr = 64,
    BOX_K: tl.constexpr = 128,
):
    """One launch for the aligned MXFP8 path's two independent passes: programs below ``regroup_programs``
    regroup one weight tile each (K tiles fastest), the rest quantize ``BLOCK_R x BLOCK_X`` activation tiles
    with the MX rule over 1x128 groups (row blocks fastest). Run side by side, the short activation pass fills
    the SMs the weight pass leaves and neither pays its own launch and tail."""
    pid = tl.program_id(0)
    if pid < regroup_programs:
        k_tiles = tl.cdiv(K, BLOCK_K)
        _regroup_tile(
            q_ptr, s_ptr, out_q_ptr, out_s_ptr, N, K, 0, stride_qn, 0, stride_sn, pid % k_tiles, pid // k_tiles,
            0, FAST, BLOCK_N, BLOCK_K, Q_BOXES, BOX_N, BOX_K,
        )  # fmt: skip
    else:
        row_blocks = tl.cdiv(M, BLOCK_R)
        q = pid - regroup_programs
        mx_quantize_tile(
            x_ptr, a_ptr, a_scale_ptr, M, K, 0, stride_xr, stride_xk, q % row_blocks, q // row_blocks, 0,
            ROUND_UP, SOFT_CAST, BLOCK_R, BLOCK_X, _ACTIVATION_GROUP, True, False, SCALE_K_MAJOR,
        )  # fmt: skip


def _as_words(data: torch.Tensor) -> torch.Tensor:
    """The E4M3 codes as int32 words (four per word along K): a view when the strides and offset allow it, else
    a contiguous copy (the source is never written)."""
    codes = data.view(torch.uint8)
    try:
        return codes.view(torch.int32)
    except RuntimeError:
        return codes.clone(memory_format=torch.contiguous_format).view(torch.int32)


def _boxes_or_rows(data: torch.Tensor | BoxMajorWeight, scale_e8m0: torch.Tensor, fn: str) -> tuple:
    """``(N, K, the codes' int32 words, box constexprs)`` of a row-major or box-major weight, checked."""
    if isinstance(data, BoxMajorWeight):
        data.check(fn)
        n, k = _check(data, scale_e8m0, fn)
        boxes = {"Q_BOXES": True, "BOX_N": data.box_n, "BOX_K": data.box_k}
        return n, k, data.boxes.view(torch.uint8).view(torch.int32), boxes
    n, k = _check(data, scale_e8m0, fn)
    if data.numel() and data.stride(-1) != 1:
        raise QuantizeInputError(f"{fn}: data and scales must be contiguous along K")
    return n, k, _as_words(data) if data.numel() else None, {}


def regroup_mxfp8_triton(data: torch.Tensor | BoxMajorWeight, scale_e8m0: torch.Tensor) -> Fp8Quantized:
    """Triton :func:`regroup_mxfp8`: the reference's bytes and scales, no host sync; ``data`` may be held
    box-major (:class:`~mxrun.kernels.box_major.BoxMajorWeight`, a 2-D weight), the output is row-major."""
    fn = "regroup_mxfp8_triton"
    n, k, words, boxes = _boxes_or_rows(data, scale_e8m0, fn)
    codes = scale_e8m0.view(torch.uint8)
    if n * k and codes.stride(-1) != 1:
        raise QuantizeInputError(f"{fn}: data and scales must be contiguous along K")
    batches = data.shape[0] if len(data.shape) == 3 else 1
    out = torch.empty(data.shape, dtype=torch.uint8, device=data.device)
    scale = torch.empty(
        (*data.shape[:-2], ceil_div(n, FP8_BLOCK), ceil_div(k, FP8_BLOCK)),
        dtype=torch.float32,
        device=data.device,
    )
    if out.numel():
        _regroup_kernel[(ceil_div(k, FP8_BLOCK), ceil_div(n, FP8_BLOCK), batches)](
            words,
            codes,
            out.view(torch.int32),
            scale,
            n,
            k,
            words.stride(0) if words.dim() == 3 else 0,
            words.stride(-2),
            codes.stride(0) if codes.dim() == 3 else 0,
            codes.stride(-2),
            FAST=fast_widen_usable(data.device),
            BLOCK_N=FP8_BLOCK,
            BLOCK_K=FP8_BLOCK,
            num_warps=_REGROUP_WARPS,
            **boxes,
        )
    return Fp8Quantized(out.view(torch.float8_e4m3fn), scale)


def quantize_and_regroup_triton(
    x: torch.Tensor,
    rule: MxScaleRule | str,
    data: torch.Tensor,
    scale_e8m0: torch.Tensor,
    scale_k_major: bool = False,
) -> tuple[Mx128Quantized, Fp8Quantized]:
    """:func:`~mxrun.kernels.mxfp8_quantize.quantize_mx_group128_triton` of the activations ``x`` ``[M, K]``
    and :func:`regroup_mxfp8_triton` of the weight ``[N, K]`` (row-major or box-major), the same bytes and
    scales, in one launch (:func:`_quantize_and_regroup_kernel`); ``scale_k_major`` as for the former."""
    fn = "quantize_and_regroup_triton"
    n, k, words, boxes = _boxes_or_rows(data, scale_e8m0, fn)
    codes = scale_e8m0.view(torch.uint8)
    if len(data.shape) != 2 or x.dim() != 2 or x.shape[1] != k:
        raise QuantizeInputError(
            f"{fn}: needs x [M, K] and a weight [N, K] with the same K, got {tuple(x.shape)}, {tuple(data.shape)}"
        )
    if codes.stride(-1) != 1:
        raise QuantizeInputError(f"{fn}: data and scales must be contiguous along K")
    m = x.shape[0]
    if not (m and n and k):  # an empty side: nothing to share a launch with
        activations = quantize_mx_group128_triton(x, rule, scale_k_major=scale_k_major)
        return activations, regroup_mxfp8_triton(data, scale_e8m0)
    plan = mxfp8_launch_plan(tuple(x.shape), tuple(x.stride()), x.dtype, rule, "auto", None, MX_GROUP128)
    a_data = torch.empty(x.shape, dtype=torch.uint8, device=x.device)
    if scale_k_major:
        a_scale_buffer, a_scale = k_major_scale_buffer(*plan.scale_shape, x.device)
    else:
        a_scale_buffer = a_scale = torch.empty(plan.scale_shape, dtype=torch.float32, device=x.device)
    out = torch.empty(data.shape, dtype=torch.uint8, device=data.device)
    scale = torch.empty(
        (ceil_div(n, FP8_BLOCK), ceil_div(k, FP8_BLOCK)), dtype=torch.float32, device=data.device
    )
    regroup_programs = ceil_div(k, FP8_BLOCK) * ceil_div(n, FP8_BLOCK)
    _quantize_and_regroup_kernel[(regroup_programs + plan.grid[0] * plan.grid[1],)](
        x, a_data, a_scale_buffer, words, codes, out.view(torch.int32), scale, m, n, k, x.stride(0), x.stride(1),
        words.stride(0), codes.stride(0), regroup_programs,
        ROUND_UP=plan.constexprs["ROUND_UP"], SOFT_CAST=plan.constexprs["SOFT_CAST"],
        FAST=fast_widen_usable(data.device), BLOCK_R=plan.constexprs["BLOCK_R"],
        BLOCK_X=plan.constexprs["BLOCK_K"], BLOCK_N=FP8_BLOCK, BLOCK_K=FP8_BLOCK, SCALE_K_MAJOR=scale_k_major,
        num_warps=_REGROUP_WARPS, **boxes,
    )  # fmt: skip
    activations = Mx128Quantized(a_data.view(torch.float8_e4m3fn), a_scale)
    return activations, Fp8Quantized(out.view(torch.float8_e4m3fn), scale)


def regroup_mxfp8(
    data: torch.Tensor, scale_e8m0: torch.Tensor, backend: Backend | str = Backend.AUTO
) -> Fp8Quantized:
    """An MXFP8 weight ``[N, K]`` (or stack ``[E, N, K]``) as FP8 128x128 blocks with power-of-two fp32 scales
    ``[..., ceil(N/128), ceil(K/128)]`` (the layout of
    :data:`~mxrun.kernels.fp8_quantize.Fp8Granularity.BLOCK_128X128`); see the module docstring for the
    numerics. Triton on CUDA, torch elsewhere (same bytes)."""
    if resolve_backend(backend, data) is Backend.TRITON:
        return regroup_mxfp8_triton(data, scale_e8m0)
    return regroup_mxfp8_reference(data, scale_e8m0)


def align_mxfp8(
    data: torch.Tensor, scale_e8m0: torch.Tensor, backend: Backend | str = Backend.AUTO
) -> Mxfp8Quantized:
    """The same weight as MXFP8 whose blocks all carry their 128x128 tile's largest E8M0 code: the values of
    :func:`regroup_mxfp8` (so the module docstring's bound holds), in the MXFP8 layout (uint8 codes
    ``[..., N, K/32]``). What a recipe's ``tile_aligned: true`` stores: still MXFP8 to every reader, and
    :func:`aligned_tile_scales` gives the block-scaled GEMMs its scales without a pass over the weight."""
    n, k = _check(data, scale_e8m0, "align_mxfp8")
    regrouped = regroup_mxfp8(data, scale_e8m0, backend)
    tile_codes = (regrouped.scale.view(torch.int32) >> 23).to(torch.uint8)  # 2^-127 (0x00400000) is code 0
    return Mxfp8Quantized(regrouped.data, per_block_codes(tile_codes, n, k))


def aligned_tile_scales(scale_e8m0: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """fp32 ``[..., ceil(N/128), ceil(K/128)]`` scales of a tile-aligned MXFP8 weight (:func:`align_mxfp8`),
    read off its E8M0 codes; a weight that is not tile-aligned is a clear error (this check reads the codes
    back, a host sync: call it once per loaded weight, not per forward)."""
    codes = scale_e8m0.view(torch.uint8)
    if codes.shape[-2:] != (n, k // MX_BLOCK_SIZE):
        raise QuantizeInputError(
            f"aligned_tile_scales: codes {tuple(codes.shape)} are not [.., {n}, {k // 32}]"
        )
    tile_codes = codes[..., ::FP8_BLOCK, ::_BLOCKS_PER_TILE]
    if not torch.equal(per_block_codes(tile_codes, n, k), codes):
        raise QuantizeInputError(
            "aligned_tile_scales: the MXFP8 scales are not tile-aligned (each 128x128 tile must carry one E8M0 "
            "code); was the weight quantized with `tile_aligned: true`?"
        )
    return e8m0_to_float32(tile_codes.contiguous())


__all__ = [
    "align_mxfp8",
    "aligned_tile_scales",
    "per_block_codes",
    "quantize_and_regroup_triton",
    "reencode_reference",
    "regroup_mxfp8",
    "regroup_mxfp8_reference",
    "regroup_mxfp8_triton",
    "tile_codes_reference",
]
