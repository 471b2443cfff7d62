"""MXFP8 quantize / dequantize (OCP Microscaling Formats v1.0): torch reference, Triton kernel, dispatcher.

Layout. A block is 32 consecutive elements along the last dimension K (the GEMM reduction dimension):

* ``data``: ``torch.float8_e4m3fn``, the shape of the input, contiguous; element ``x[..., k]`` is encoded as
  ``E4M3(x[..., k] / 2^e)`` where ``e`` belongs to block ``k // 32`` (see :mod:`mxrun.kernels.e4m3`).
* ``scale_e8m0``: ``uint8`` (or ``torch.float8_e8m0fnu``, same bytes), ``[M, K/32]`` for ``[M, K]`` input and
  ``[E, N, K/32]`` for ``[E, N, K]``, contiguous. Code ``c`` means 2^(c - 127); ``0xFF`` is NaN.

Scale rules (``MxScaleRule``), both computed from the fp32 bits of the block's amax with integer arithmetic,
never ``log2``, so the result is exact. With ``be`` = amax's biased fp32 exponent and ``m`` its 23 mantissa bits:

* ``ROUND_UP`` (default; what serving engines use): the smallest ``e`` with amax / 2^e <= 448, so no element is
  clipped. Since 448 = 1.75 * 2^8: ``e = be - 127 - 8``, plus 1 if the mantissa exceeds 0.75 (``m > 0x600000``).
* ``FLOOR`` (the spec's rule): ``e = floor(log2(amax)) - 8`` = ``be - 135``; elements above 448 * 2^e (the
  block's top binade above 1.75) saturate to 448.

``e`` is clamped to the E8M0 range: below -127 it becomes -127 (code 0). That covers all-zero blocks
(code 0, elements keep the sign of their zeros) and blocks whose amax is tiny or fp32-subnormal, which still
fit under 448 * 2^-127 and quantize exactly as the rule says. The top end is never reached: the largest finite
fp32 gives e = 120 (code 247).

Special values: a NaN anywhere in a block makes its scale 0xFF and every element of the block NaN (0x7F), as
the spec says a NaN scale means. +-Inf is not NaN: its fp32 exponent field (255) gives e = 120 under both
rules, the Inf elements saturate to +-448 and the block's finite elements, divided by 2^120, mostly become
(signed) zero. Inputs may be fp32, bf16 or fp16; they are widened to fp32 exactly before any arithmetic.
Dividing by 2^e is done as a multiply by the exact power of two 2^-e, which rounds the same as the division.
"""

from __future__ import annotations

import enum
import functools
from typing import NamedTuple

import torch

from mxrun.kernels.backend import (
    Backend,
    gdc_launch_dependents,
    resolve_backend,
    tl,
    triton,
    triton_interpreting,
)
from mxrun.kernels.e4m3 import (
    E4M3_NAN_CODE,
    e4m3_code,
    encode_e4m3_reference,
    magnitude_bits,
    widen_to_fp32,
)
from mxrun.kernels.row_layout import (
    QuantizeInputError,
    TileConfig,
    ceil_div,
    check_quantize_input,
    check_quantize_shape,
    row_batches_of,
    streaming_tile,
)

MX_BLOCK_SIZE = 32
MX_GROUP128 = 128  # group length of quantize_mx_group128 (the K step of the block-scaled FP8 GEMMs)
E8M0_NAN_CODE = 0xFF
E8M0_BIAS = 127


class MxScaleRule(enum.Enum):
    """How a block's shared exponent is chosen from its amax (see the module docstring)."""

    ROUND_UP = "round_up"
    FLOOR = "floor"


class E4m3Cast(enum.Enum):
    """How the Triton kernel encodes elements: the GPU's conversion instruction or integer arithmetic.

    ``AUTO`` is ``HARDWARE`` on a GPU and ``SOFTWARE`` under ``TRITON_INTERPRET=1`` (whose emulated fp8
    conversion does not round to nearest-even). Both give the reference's bytes; tests check both on GPU.
    """

    AUTO = "auto"
    HARDWARE = "hardware"
    SOFTWARE = "software"


class Mx128Quantized(NamedTuple):
    """``data`` (E4M3, input's shape) and ``scale`` (fp32 powers of two, ``[..., ceil(K/128)]``): the layout
    of FP8 1x128 activation groups (:mod:`mxrun.kernels.fp8_quantize`), so the block-scaled GEMMs read it."""

    data: torch.Tensor
    scale: torch.Tensor


class Mxfp8Quantized(NamedTuple):
    """``data`` (E4M3, input's shape) and ``scale_e8m0`` (uint8 or float8_e8m0fnu, ``[..., K/32]``)."""

    data: torch.Tensor
    scale_e8m0: torch.Tensor


def _check_mx_input(x: torch.Tensor, fn_name: str) -> None:
    check_quantize_input(x, fn_name)
    if x.shape[-1] % MX_BLOCK_SIZE != 0:
        raise QuantizeInputError(
            f"{fn_name}: MXFP8 needs the last dimension K to be a multiple of {MX_BLOCK_SIZE}, got "
            f"K={x.shape[-1]} (shape {tuple(x.shape)}); pad K or quantize with an FP8 format instead"
        )


def _check_scale_dtype(scale_dtype: torch.dtype) -> None:
    allowed = (torch.uint8, getattr(torch, "float8_e8m0fnu", torch.uint8))
    if scale_dtype not in allowed:
        raise QuantizeInputError(
            f"scale_dtype must be torch.uint8 or torch.float8_e8m0fnu, got {scale_dtype}"
        )


def resolve_cast(cast: E4m3Cast | str) -> bool:
    """True when the kernel must encode E4M3 in software (integer arithmetic)."""
    chosen = E4m3Cast(cast)
    if chosen is E4m3Cast.AUTO:
        return triton_interpreting()
    if chosen is E4m3Cast.HARDWARE and triton_interpreting():
        raise ValueError("cast='hardware' cannot run under TRITON_INTERPRET=1: its fp8 emulation is not RNE")
    return chosen is E4m3Cast.SOFTWARE


# ----------------------------------------------------------------------------------------------------------
# torch reference
# ----------------------------------------------------------------------------------------------------------


def mx_scale_codes_reference(amax_bits: torch.Tensor, rule: MxScaleRule | str) -> torch.Tensor:
    """E8M0 codes (int32) from the fp32 bit patterns of non-negative block amaxes (int32), exactly."""
    rule = MxScaleRule(rule)
    biased_exponent = amax_bits >> 23
    codes = biased_exponent - 8  # e + 127 with e = (be - 127) - 8
    if rule is MxScaleRule.ROUND_UP:
        codes = codes + ((amax_bits & 0x7FFFFF) > 0x600000).to(torch.int32)
    codes = codes.clamp(min=0)
    return torch.where(amax_bits > 0x7F800000, torch.full_like(codes, E8M0_NAN_CODE), codes)


def e8m0_to_float32(scale_e8m0: torch.Tensor) -> torch.Tensor:
    """Decode E8M0 codes (uint8 or float8_e8m0fnu) to fp32 powers of two, built from bits (exact; 0xFF -> NaN).

    Code 0 is 2^-127, an fp32 subnormal (bit pattern 0x00400000).
    """
    codes = scale_e8m0.view(torch.uint8).to(torch.int32)
    bits = torch.where(codes == 0, torch.full_like(codes, 0x00400000), codes << 23)
    values = bits.view(torch.float32)
    return torch.where(codes == E8M0_NAN_CODE, torch.full_like(values, float("nan")), values)


def _mx_groups_reference(
    x: torch.Tensor, rule: MxScaleRule | str, group: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """E4M3 data (``float8_e4m3fn``, x's shape) and int32 E8M0 codes ``[..., ceil(K/group)]`` of the MX rule
    applied to groups of ``group`` consecutive elements of the last dimension (a partial last group is padded
    with zeros, which never change an amax)."""
    k = x.shape[-1]
    values = x.float()
    missing = -k % group
    if missing:
        values = torch.nn.functional.pad(values, (0, missing))
    groups = values.reshape(*x.shape[:-1], (k + missing) // group, group)
    amax_bits = (groups.view(torch.int32) & 0x7FFFFFFF).amax(dim=-1)
    codes = mx_scale_codes_reference(amax_bits, rule)
    inverse_scale = ((254 - codes.clamp(max=254)) << 23).view(torch.float32)  # 2^-e, exact
    scaled = groups * inverse_scale.unsqueeze(-1)
    block_is_nan = (codes == E8M0_NAN_CODE).unsqueeze(-1)
    scaled = torch.where(block_is_nan, torch.full_like(scaled, float("nan")), scaled)
    data = encode_e4m3_reference(scaled).reshape(*x.shape[:-1], k + missing)[..., :k]
    return data.contiguous(), codes


def quantize_mxfp8_reference(
    x: torch.Tensor, rule: MxScaleRule | str = MxScaleRule.ROUND_UP, scale_dtype: torch.dtype = torch.uint8
) -> Mxfp8Quantized:
    """Plain-torch MXFP8 quantize (CPU or CUDA); the definition the Triton kernel is tested against."""
    _check_mx_input(x, "quantize_mxfp8_reference")
    _check_scale_dtype(scale_dtype)
    data, codes = _mx_groups_reference(x, rule, MX_BLOCK_SIZE)
    return Mxfp8Quantized(data, codes.to(torch.uint8).view(scale_dtype))


def quantize_mx_group128_reference(
    x: torch.Tensor, rule: MxScaleRule | str = MxScaleRule.ROUND_UP
) -> Mx128Quantized:
    """The MX scale rule over 1x128 groups (see :func:`quantize_mx_group128`), in plain torch."""
    _check_mx_input(x, "quantize_mx_group128_reference")
    data, codes = _mx_groups_reference(x, rule, MX_GROUP128)
    return Mx128Quantized(data, e8m0_to_float32(codes.to(torch.uint8)))


def dequantize_mxfp8(
    data: torch.Tensor, scale_e8m0: torch.Tensor, out_dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """``data * 2^(scale - 127)`` per block of 32 along K, computed in fp32, then cast to ``out_dtype``.

    Exact in fp32 except at the edges of its range: an element that rounded up to 256 * 2^120 (an input within
    half an E4M3 ulp of fp32's max) overflows to Inf, and products below 2^-126 round as subnormals. Works on
    CPU and CUDA."""
    k = data.shape[-1]
    if k % MX_BLOCK_SIZE != 0 or scale_e8m0.shape != (*data.shape[:-1], k // MX_BLOCK_SIZE):
        raise QuantizeInputError(
            f"dequantize_mxfp8: data {tuple(data.shape)} and scale {tuple(scale_e8m0.shape)} do not match the "
            f"MXFP8 layout (scale must be [..., K/{MX_BLOCK_SIZE}])"
        )
    groups = data.float().reshape(*data.shape[:-1], k // MX_BLOCK_SIZE, MX_BLOCK_SIZE)
    values = groups * e8m0_to_float32(scale_e8m0).unsqueeze(-1)
    return values.reshape(data.shape).to(out_dtype)


# ----------------------------------------------------------------------------------------------------------
# Triton kernel
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def mx_group_codes(grouped, ROUND_UP: tl.constexpr, SOFT_CAST: tl.constexpr):
    """The MX rule on ``grouped`` ``[ROWS, GROUPS, GROUP]`` (fp32/bf16/fp16): each group's E8M0 code (int32,
    255 for a group holding a NaN), that NaN mask, and the elements' E4M3 codes at their group's scale."""
    amax_bits = tl.max(magnitude_bits(grouped), axis=2)
    codes = (amax_bits >> 23) - 8
    if ROUND_UP:
        codes += ((amax_bits & 0x7FFFFF) > 0x600000).to(tl.int32)
    codes = tl.maximum(codes, 0)
    block_is_nan = amax_bits > 0x7F800000
    codes = tl.where(block_is_nan, 255, codes)
    inverse_scale = ((254 - tl.minimum(codes, 254)) << 23).to(tl.float32, bitcast=True)
    scaled = widen_to_fp32(grouped) * inverse_scale[:, :, None]
    scaled = tl.where(block_is_nan[:, :, None], float("nan"), scaled)
    return codes, block_is_nan, e4m3_code(scaled, SOFT_CAST)


@triton.jit
def mx_scale_values(codes, block_is_nan):
    """fp32 2^(code - 127) of E8M0 ``codes`` (code 0 the subnormal 2^-127), NaN where ``block_is_nan``."""
    scale = tl.where(codes == 0, 0x00400000, codes << 23).to(tl.float32, bitcast=True)
    return tl.where(block_is_nan, float("nan"), scale)


@triton.jit
def mx_round_rows(
    x_raw,
    ROUND_UP: tl.constexpr,
    SOFT_CAST: tl.constexpr,
    ROWS: tl.constexpr,
    COLS: tl.constexpr,
    GROUP: tl.constexpr = 32,
):
    """``x_raw`` ``[ROWS, COLS]`` (fp32/bf16/fp16, COLS % GROUP == 0) -> fp32 ``[ROWS, COLS]``: each value
    rounded to its MXFP8 value (E4M3 times its group's power of two, NaN groups NaN): the rounding pass's
    arithmetic (:func:`mx_round_triton` runs it too), for kernels that round activations as they load them."""
    codes, block_is_nan, q = mx_group_codes(
        tl.reshape(x_raw, [ROWS, COLS // GROUP, GROUP]), ROUND_UP, SOFT_CAST
    )
    values = (
        q.to(tl.float8e4nv, bitcast=True).to(tl.float32) * mx_scale_values(codes, block_is_nan)[:, :, None]
    )
    return tl.reshape(values, [ROWS, COLS])


@triton.jit
def mx_quantize_tile(
    x_ptr,  # [B, R, K] fp32 | bf16 | fp16; element (b, r, k) at b*stride_xb + r*stride_xr + k*stride_xk
    q_ptr,  # [B, R, K] uint8 E4M3 codes, contiguous (K fastest)
    scale_ptr,  # [B, R, cdiv(K, GROUP)] uint8 E8M0 codes, or fp32 2^(code - 127) (FP32_SCALE); contiguous
    R,
    K,
    stride_xb,
    stride_xr,
    stride_xk,
    pid_r,
    pid_k,
    pid_b,
    ROUND_UP: tl.constexpr,
    SOFT_CAST: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP: tl.constexpr,
    FP32_SCALE: tl.constexpr,
    ROUND_ONLY: tl.constexpr,
    SCALE_K_MAJOR: tl.constexpr = False,
):
    """Quantize the BLOCK_R x BLOCK_K tile (``pid_r``, ``pid_k``) of batch ``pid_b`` (int64): BLOCK_K // GROUP
    groups per row, each with the MX rule (MXFP8 blocks with GROUP = 32, the 1x128 groups of
    quantize_mx_group128 with 128). ROUND_ONLY: q_ptr is a [B, R, K] output of x's dtype (contiguous) that
    gets the quantized values (E4M3 times 2^e, NaN blocks NaN), and no scales are stored. SCALE_K_MAJOR (fp32
    scales, one batch): they go to ``[cdiv(K, GROUP), R rounded up to 4]``, each K step's rows contiguous."""
    GROUPS: tl.constexpr = BLOCK_K // GROUP
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (rows < R)[:, None] & (cols < K)[None, :]

    x_offsets = rows.to(tl.int64)[:, None] * stride_xr + cols.to(tl.int64)[None, :] * stride_xk
    x_raw = tl.load(x_ptr + pid_b * stride_xb + x_offsets, mask=mask, other=0.0)
    q_offsets = rows.to(tl.int64)[:, None] * K + cols[None, :]
    if ROUND_ONLY:
        values = mx_round_rows(x_raw, ROUND_UP, SOFT_CAST, BLOCK_R, BLOCK_K, GROUP).to(q_ptr.dtype.element_ty)
        tl.store(q_ptr + pid_b * R * K + q_offsets, values, mask=mask)
    else:
        codes, block_is_nan, q = mx_group_codes(
            tl.reshape(x_raw, [BLOCK_R, GROUPS, GROUP]), ROUND_UP, SOFT_CAST
        )
        q = tl.reshape(q, [BLOCK_R, BLOCK_K])
        tl.store(q_ptr + pid_b * R * K + q_offsets, q, mask=mask)

        n_groups = tl.cdiv(K, GROUP)
        group_cols = pid_k * GROUPS + tl.arange(0, GROUPS)
        scale_mask = (rows < R)[:, None] & (group_cols < n_groups)[None, :]
        scale_offsets = rows.to(tl.int64)[:, None] * n_groups + group_cols[None, :]
        if FP32_SCALE:
            scale = mx_scale_values(codes, block_is_nan)
            if SCALE_K_MAJOR:
                k_major = group_cols.to(tl.int64)[None, :] * (tl.cdiv(R, 4) * 4) + rows[:, None]
                tl.store(scale_ptr + k_major, scale, mask=scale_mask)
            else:
                tl.store(scale_ptr + pid_b * R * n_groups + scale_offsets, scale, mask=scale_mask)
        else:
            tl.store(scale_ptr + pid_b * R * n_groups + scale_offsets, codes.to(tl.uint8), mask=scale_mask)


@triton.jit
def _mxfp8_quantize_kernel(
    x_ptr,
    q_ptr,
    scale_ptr,
    R,
    K,
    stride_xb,
    stride_xr,
    stride_xk,
    ROUND_UP: tl.constexpr,
    SOFT_CAST: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP: tl.constexpr = 32,
    FP32_SCALE: tl.constexpr = False,
    ROUND_ONLY: tl.constexpr = False,
    SCALE_K_MAJOR: tl.constexpr = False,
    LAUNCH_DEPENDENTS: tl.constexpr = False,  # let a programmatic dependent launch start (sm_90+)
):
    """One program per BLOCK_R x BLOCK_K tile (:func:`mx_quantize_tile`), grid (row blocks, K blocks, batch)."""
    if LAUNCH_DEPENDENTS:
        gdc_launch_dependents()
    mx_quantize_tile(
        x_ptr, q_ptr, scale_ptr, R, K, stride_xb, stride_xr, stride_xk, tl.program_id(0), tl.program_id(1),
        tl.program_id(2).to(tl.int64), ROUND_UP, SOFT_CAST, BLOCK_R, BLOCK_K, GROUP, FP32_SCALE, ROUND_ONLY,
        SCALE_K_MAJOR,
    )  # fmt: skip


@functools.lru_cache(maxsize=1024)
def mxfp8_tile_config(rows: int, cols: int, group: int = MX_BLOCK_SIZE) -> TileConfig:
    """The launcher's tile for ``rows`` x ``cols`` (see :func:`~mxrun.kernels.row_layout.streaming_tile`)."""
    return streaming_tile(rows, cols, min_block_k=group, max_block_k=1024)


class _LaunchPlan(NamedTuple):
    """Everything about a launch that depends only on shape, strides, dtype and options (cached: host time
    per call is what bounds small shapes)."""

    scale_shape: tuple[int, ...]
    grid: tuple[int, int, int] | None  # None: empty input, nothing to launch
    int_args: tuple[int, ...]
    constexprs: dict


@functools.lru_cache(maxsize=4096)
def mxfp8_launch_plan(
    shape: tuple[int, ...],
    strides: tuple[int, ...],
    dtype: torch.dtype,
    rule: MxScaleRule | str,
    cast: E4m3Cast | str,
    config: TileConfig | None,
    group: int = MX_BLOCK_SIZE,
) -> _LaunchPlan:
    check_quantize_shape(shape, dtype, "quantize_mxfp8_triton")
    if shape[-1] % MX_BLOCK_SIZE != 0:
        raise QuantizeInputError(
            f"quantize_mxfp8_triton: MXFP8 needs the last dimension K to be a multiple of {MX_BLOCK_SIZE}, "
            f"got K={shape[-1]} (shape {shape}); pad K or quantize with an FP8 format instead"
        )
    view = row_batches_of(shape, strides)
    tile = config or mxfp8_tile_config(view.rows, view.cols, group)
    if tile.block_k % group != 0:
        raise ValueError(f"block_k must be a multiple of {group}, got {tile.block_k}")
    empty = view.rows == 0 or view.cols == 0 or view.batches == 0
    grid = (ceil_div(view.rows, tile.block_r), ceil_div(view.cols, tile.block_k), view.batches)
    constexprs = {
        "ROUND_UP": MxScaleRule(rule) is MxScaleRule.ROUND_UP,
        "SOFT_CAST": resolve_cast(cast),
        "BLOCK_R": tile.block_r,
        "BLOCK_K": tile.block_k,
        "num_warps": tile.num_warps,
    }
    if group != MX_BLOCK_SIZE:
        constexprs.update(GROUP=group, FP32_SCALE=True)
    int_args = (view.rows, view.cols, view.stride_b, view.stride_r, view.stride_k)
    return _LaunchPlan(
        (*shape[:-1], ceil_div(shape[-1], group)), None if empty else grid, int_args, constexprs
    )


def quantize_mxfp8_triton(
    x: torch.Tensor,
    rule: MxScaleRule | str = MxScaleRule.ROUND_UP,
    scale_dtype: torch.dtype = torch.uint8,
    *,
    cast: E4m3Cast | str = E4m3Cast.AUTO,
    config: TileConfig | None = None,
) -> Mxfp8Quantized:
    """Triton MXFP8 quantize: the reference's bytes, one pass over the input, no host synchronisation."""
    _check_scale_dtype(scale_dtype)
    plan = mxfp8_launch_plan(tuple(x.shape), tuple(x.stride()), x.dtype, rule, cast, config)
    data = torch.empty(x.shape, dtype=torch.uint8, device=x.device)
    scale = torch.empty(plan.scale_shape, dtype=torch.uint8, device=x.device)
    if plan.grid is not None:
        _mxfp8_quantize_kernel[plan.grid](x, data, scale, *plan.int_args, **plan.constexprs)
    return Mxfp8Quantized(data.view(torch.float8_e4m3fn), scale.view(scale_dtype))


def quantize_mx_group128_triton(
    x: torch.Tensor,
    rule: MxScaleRule | str = MxScaleRule.ROUND_UP,
    *,
    cast: E4m3Cast | str = E4m3Cast.AUTO,
    config: TileConfig | None = None,
    scale_k_major: bool = False,
) -> Mx128Quantized:
    """Triton :func:`quantize_mx_group128`: the reference's bytes and scales, one pass, no host sync.
    ``scale_k_major`` (a 2-D input): the scales as a view of a K-major buffer (:func:`k_major_scale_buffer`)."""
    plan = mxfp8_launch_plan(tuple(x.shape), tuple(x.stride()), x.dtype, rule, cast, config, MX_GROUP128)
    data = torch.empty(x.shape, dtype=torch.uint8, device=x.device)
    if scale_k_major:
        if x.dim() != 2:
            raise QuantizeInputError("quantize_mx_group128_triton: scale_k_major needs a 2-D input")
        buffer, scale = k_major_scale_buffer(*plan.scale_shape, x.device)
    else:
        buffer = scale = torch.empty(plan.scale_shape, dtype=torch.float32, device=x.device)
    if plan.grid is not None:
        _mxfp8_quantize_kernel[plan.grid](
            x, data, buffer, *plan.int_args, **plan.constexprs, SCALE_K_MAJOR=scale_k_major
        )
    return Mx128Quantized(data.view(torch.float8_e4m3fn), scale)


def k_major_scale_buffer(rows: int, groups: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A ``[groups, rows rounded up to 4]`` fp32 buffer and its ``[rows, groups]`` view (strides ``(1, ld)``):
    where the quantizers write per-group scales K-major, each K step's rows one contiguous, 16-byte aligned run
    (what the Gluon block-scaled GEMM's loader reads by TMA)."""
    buffer = torch.empty((groups, -(-rows // 4) * 4), dtype=torch.float32, device=device)
    return buffer, buffer[:, :rows].t()


def mx_round_triton(
    x: torch.Tensor, rule: MxScaleRule | str, *, launch_dependents: bool = False
) -> torch.Tensor:
    """``x`` rounded to its MXFP8 values with ``rule``, in ``x``'s dtype (bf16/fp16), in one pass: what
    :func:`quantize_mxfp8` then :func:`dequantize_mxfp8` give, cast to x's dtype. Exact in bf16 (an E4M3 value
    times a power of two is a bf16 value) and, in fp16's normal range, in fp16: the activations of every
    kernel that multiplies MX-rounded values in bf16/fp16. ``launch_dependents`` (sm_90+): the next launch, if
    it is a programmatic dependent one, may start as soon as every program of this one has (it waits for this
    one's results itself)."""
    if x.dtype not in (torch.bfloat16, torch.float16):
        raise QuantizeInputError(f"mx_round_triton: x must be bfloat16 or float16, got {x.dtype}")
    plan = mxfp8_launch_plan(tuple(x.shape), tuple(x.stride()), x.dtype, rule, E4m3Cast.AUTO, None)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if plan.grid is not None:
        extra = {"LAUNCH_DEPENDENTS": True} if launch_dependents else {}
        _mxfp8_quantize_kernel[plan.grid](
            x, out, out, *plan.int_args, **plan.constexprs, ROUND_ONLY=True, **extra
        )
    return out


# ----------------------------------------------------------------------------------------------------------
# dispatchers
# ----------------------------------------------------------------------------------------------------------


def quantize_mx_group128(
    x: torch.Tensor, rule: MxScaleRule | str = MxScaleRule.ROUND_UP, backend: Backend | str = Backend.AUTO
) -> Mx128Quantized:
    """The MX scale rule (power-of-two scales, ``rule``) over groups of 128 consecutive elements of K instead of
    32: what the MXFP8 W8A8 Linear feeds Hopper's FP8 MMAs (:mod:`mxrun.kernels.mx_regroup` says why).

    Same element rule as MXFP8 (RNE, saturating, NaN groups all NaN), so an element that is an E4M3 normal at
    its group's scale gets the very bits that per-32 MXFP8 with the round-up rule gives it: both round it to 3
    mantissa bits in the same binade. Only elements below ``2^-6`` times the group's scale (2^-14.8 of the
    group's amax) can differ, on E4M3's subnormal grid. (With the floor rule the top binade of a 32-block whose
    exponent is below its group's also differs: MXFP8 saturates it, this rounds it.) Scales are fp32
    ``2^(code - 127)`` ``[..., ceil(K/128)]``; K % 32 == 0 as for MXFP8. Triton on CUDA, torch elsewhere."""
    if resolve_backend(backend, x) is Backend.TRITON:
        return quantize_mx_group128_triton(x, rule)
    return quantize_mx_group128_reference(x, rule)


def quantize_mxfp8(
    x: torch.Tensor,
    rule: MxScaleRule | str = MxScaleRule.ROUND_UP,
    backend: Backend | str = Backend.AUTO,
    scale_dtype: torch.dtype = torch.uint8,
) -> Mxfp8Quantized:
    """Quantize a ``[M, K]`` matrix or ``[E, N, K]`` stack to MXFP8 with the Triton kernel on CUDA and the torch
    reference elsewhere (``backend='auto'``); both give the same bytes."""
    if resolve_backend(backend, x) is Backend.TRITON:
        return quantize_mxfp8_triton(x, rule, scale_dtype)
    return quantize_mxfp8_reference(x, rule, scale_dtype)


__all__ = [
    "E4M3_NAN_CODE",
    "E8M0_BIAS",
    "E8M0_NAN_CODE",
    "MX_BLOCK_SIZE",
    "MX_GROUP128",
    "E4m3Cast",
    "Mx128Quantized",
    "MxScaleRule",
    "Mxfp8Quantized",
    "dequantize_mxfp8",
    "e8m0_to_float32",
    "mx_round_triton",
    "mx_scale_codes_reference",
    "mxfp8_tile_config",
    "quantize_mx_group128",
    "quantize_mx_group128_reference",
    "quantize_mx_group128_triton",
    "quantize_mxfp8",
    "quantize_mxfp8_reference",
    "quantize_mxfp8_triton",
]
