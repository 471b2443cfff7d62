"""The FP8 E4M3 element format shared by every quantize kernel: rounding, saturation and NaN.

E4M3 (``torch.float8_e4m3fn``, Triton ``tl.float8e4nv``) has 1 sign, 4 exponent (bias 7) and 3 mantissa bits,
no infinities, and one NaN pattern per sign (``S.1111.111``). Finite range: +-448; the smallest normal is
2^-6 and the smallest subnormal 2^-9.

Every encoder here computes the same function of an fp32 value ``y``:

* NaN -> ``0x7F`` (one canonical NaN, whatever the input's sign: torch's cast keeps the sign, the GPU's does not);
* otherwise clamp to [-448, 448] first (so +-Inf and anything that would round past 448 give +-448, and the
  result never depends on how a cast treats overflow), then round to nearest, ties to even;
* the sign of zero is kept (``-0.0`` -> ``0x80``).

Three implementations, all tested against an exact oracle over every code, midpoint and neighbour:
:func:`encode_e4m3_reference` (torch, CPU and CUDA), and the Triton helper :func:`e4m3_code` with either the
hardware conversion (``cvt.rn.satfinite.e4m3x2.f32`` on sm_89+) or integer arithmetic (``SOFT_CAST``), which
is what runs under ``TRITON_INTERPRET=1``: the interpreter's own float-to-fp8 conversion does not round to
nearest-even, so it cannot be used where the bits matter.
"""

from __future__ import annotations

import torch

from mxrun.kernels.backend import cuda_major, tl, triton, triton_interpreting

E4M3_MAX = 448.0
E4M3_NAN_CODE = 0x7F
# fp32 bit patterns used by the integer encoder (constexpr: Triton only reads constexpr globals).
_FP32_MIN_E4M3_NORMAL_BITS = tl.constexpr(0x3C800000)  # 2^-6: below it E4M3 is subnormal, in steps of 2^-9
_FP32_TWO_POW_14 = tl.constexpr(
    16384.0
)  # adding it rounds a value below 2^-6 to a multiple of 2^-9 (its ulp)
_FP32_TWO_POW_14_BITS = tl.constexpr(0x46800000)
_E4M3_REBIAS = tl.constexpr(
    (127 - 7) << 3
)  # fp32 (exponent, top 3 mantissa bits) -> E4M3 (exponent, mantissa)
_E4M3_NAN = tl.constexpr(0x7F)


def encode_e4m3_reference(y: torch.Tensor) -> torch.Tensor:
    """Encode fp32 values as E4M3 (saturating, RNE, canonical NaN); returns ``torch.float8_e4m3fn``.

    Clamping before the cast makes torch's cast (which would give NaN past 464) saturate, and the explicit NaN
    select removes the sign torch keeps on NaN, so CPU, CUDA and the Triton kernels give the same bytes.
    """
    y = y.float()
    clamped = torch.clamp(y, -E4M3_MAX, E4M3_MAX)
    clamped = torch.where(torch.isnan(clamped), torch.full_like(clamped, float("nan")), clamped)
    codes = clamped.to(torch.float8_e4m3fn).view(torch.uint8)
    codes = torch.where(torch.isnan(y), torch.full_like(codes, E4M3_NAN_CODE), codes)
    return codes.view(torch.float8_e4m3fn)


def e4m3_code_values() -> torch.Tensor:
    """The fp32 value of each of the 256 codes (index = code), decoded from the bit fields, not by a cast."""
    values = []
    for code in range(256):
        sign = -1.0 if code & 0x80 else 1.0
        exponent = (code >> 3) & 0xF
        mantissa = code & 0x7
        if exponent == 0xF and mantissa == 0x7:
            values.append(float("nan"))
        elif exponent == 0:
            values.append(sign * mantissa * 2.0**-9)
        else:
            values.append(sign * (1.0 + mantissa / 8.0) * 2.0 ** (exponent - 7))
    return torch.tensor(values, dtype=torch.float32)


@triton.jit
def widen_to_fp32(x):
    """Exact fp32 copy of an fp32/bf16/fp16 tensor. bf16 is widened by moving its bits up 16 places (what the
    hardware does anyway) because Triton's interpreter mis-converts bf16 subnormals."""
    if x.dtype == tl.bfloat16:
        return (x.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    return x.to(tl.float32)


@triton.jit
def magnitude_bits(x):
    """int32 bits of |x| widened to fp32. Their integer max is the bits of the float max: exact, and NaN
    (bits above Inf's) wins, which a float max may not guarantee."""
    return widen_to_fp32(x).to(tl.int32, bitcast=True) & 0x7FFFFFFF


@triton.jit
def e4m3_code(y, SOFT_CAST: tl.constexpr):
    """fp32 tensor -> uint8 E4M3 codes (saturating, RNE, NaN -> 0x7F), same bits as the torch reference.

    SOFT_CAST=False uses the hardware conversion; True derives the code with integer arithmetic: for a normal
    result, add the round-to-nearest-even bias to the fp32 bits and keep (exponent, 3 mantissa bits); for a
    subnormal one, let the FPU round by adding 2^14, whose ulp is the E4M3 subnormal step 2^-9.
    """
    is_nan = y != y
    y = tl.minimum(tl.maximum(y, -448.0), 448.0)
    if SOFT_CAST:
        bits = y.to(tl.int32, bitcast=True)
        sign = (bits >> 24) & 0x80
        abs_bits = bits & 0x7FFFFFFF
        normal_code = ((abs_bits + 0x7FFFF + ((abs_bits >> 20) & 1)) >> 20) - _E4M3_REBIAS
        subnormal_code = (tl.abs(y) + _FP32_TWO_POW_14).to(tl.int32, bitcast=True) - _FP32_TWO_POW_14_BITS
        code = tl.where(abs_bits < _FP32_MIN_E4M3_NORMAL_BITS, subnormal_code, normal_code) | sign
    else:
        code = y.to(tl.float8e4nv).to(tl.uint8, bitcast=True).to(tl.int32)
    code = tl.where(is_nan, _E4M3_NAN, code)
    return code.to(tl.uint8)


# E4M3 -> bf16 without the conversion unit's second step. Triton widens E4M3 to bf16 as two conversions (E4M3
# pair -> fp16 pair, then fp16 -> bf16 per element); conversions issue at a quarter of the integer ALU's rate
# on Hopper, and in a weight-streaming GEMM they can set the pace (H100, two sweep runs before and after: the
# FP8 weight-only split-K Linear at M <= 16 went from 1.62x to 1.75x of bf16 in geometric mean with the same
# tile; the Mixtral MoE weight-only layer at 128 tokens from 721 to 671 us; the fp16 MMA, one conversion per
# pair, was faster still). Every E4M3 value is an fp16 *normal* (or zero), so its fp16 bits shifted right by 3
# are the bf16 bits of the same value times 2^-112 (the exponent biases differ by 112; the 3 mantissa bits
# fit), a bf16 normal: one bf16x2 multiply by 2^112 restores it, exactly, for both halves of a register at once.
# Zero stays zero; a NaN code does not stay NaN (it has no use here: quantizing a NaN gives a NaN scale too, per
# tensor, row or block, and that propagates).
_WIDEN_PAIR = tl.constexpr(
    "{ .reg .b32 t, m, k; shr.b32 t, $1, 3; and.b32 t, t, 0x0FFF0FFF; mov.b32 m, 0x80008000; "
    "lop3.b32 t, t, $1, m, 0xF8; mov.b32 k, 0x77807780; mul.rn.bf16x2 $0, t, k; }"
)


# The same widening with the bf16x2 multiply taking a per-element operand instead of 2^112: an MXFP8 weight's
# power of two folded in (the operand is 2^112 * 2^(e - 127) = 2^(e - 15)), so the decode costs what the plain
# widening does. Exact wherever the result is a bf16 value (the reference's E4M3 * 2^(e - 127) rounded to
# bf16 for the MMA is the same number); the operand is a bf16 normal for E8M0 codes up to MX_FOLD_MAX_CODE.
_WIDEN_PAIR_TIMES = tl.constexpr(
    "{ .reg .b32 t, m; shr.b32 t, $1, 3; and.b32 t, t, 0x0FFF0FFF; mov.b32 m, 0x80008000; "
    "lop3.b32 t, t, $1, m, 0xF8; mul.rn.bf16x2 $0, t, $2; }"
)
MX_FOLD_MAX_CODE = 142
"""Largest E8M0 code (2^15) whose folded multiplier 2^(e - 15) is a bf16 normal."""


MX_FOLD16_MIN_CODE = 113
MX_FOLD16_MAX_CODE = 134
"""E8M0 codes whose power of two times every E4M3 value is an fp16 value (2^-14 ... 2^7: 448 * 2^7 = 57344 is
below fp16's largest, and E4M3's smallest step 2^-9 times 2^-14 is above fp16's 2^-24), with a normal fp16
multiplier."""


@triton.jit
def e4m3_to_f16_times(codes, codes_e8m0):
    """float8e4nv codes times their MX power of two in fp16, exactly, for E8M0 codes in [MX_FOLD16_MIN_CODE,
    MX_FOLD16_MAX_CODE]: one conversion per pair and one fp16x2 multiply (CUDA only)."""
    multiplier = ((codes_e8m0.to(tl.int32) - 112) << 10).to(tl.int16).to(tl.float16, bitcast=True)
    return tl.inline_asm_elementwise(
        "mul.rn.f16x2 $0, $1, $2;", "=r,r,r", [codes.to(tl.float16), multiplier], dtype=tl.float16,
        is_pure=True, pack=2,
    )  # fmt: skip


def mx_scales_foldable_f16(scale_e8m0: torch.Tensor) -> bool:
    """Whether every E8M0 code lies in [MX_FOLD16_MIN_CODE, MX_FOLD16_MAX_CODE] (reads them back: once per
    loaded weight)."""
    codes = scale_e8m0.view(torch.uint8)
    return bool(((codes >= MX_FOLD16_MIN_CODE) & (codes <= MX_FOLD16_MAX_CODE)).all())


@triton.jit
def e8m0_fold_multiplier(codes):
    """bf16 2^(e - 15) for E8M0 codes e <= MX_FOLD_MAX_CODE: the multiplier of :func:`e4m3_to_bf16_times`."""
    return ((codes.to(tl.int32) + 112) << 7).to(tl.int16).to(tl.bfloat16, bitcast=True)


@triton.jit
def e4m3_to_bf16_times(codes, multiplier):
    """float8e4nv codes times their MX power of two, to bf16 in the FAST widening's instructions (CUDA sm_90+
    only): ``multiplier`` is :func:`e8m0_fold_multiplier` of each element's scale code."""
    return tl.inline_asm_elementwise(
        _WIDEN_PAIR_TIMES,
        "=r,r,r",
        [codes.to(tl.float16), multiplier],
        dtype=tl.bfloat16,
        is_pure=True,
        pack=2,
    )


def mx_scales_foldable(scale_e8m0: torch.Tensor, data: torch.Tensor | None = None) -> bool:
    """Whether every E8M0 code is at most :data:`MX_FOLD_MAX_CODE` and, given the E4M3 ``data``, no element is
    NaN (the widening does not keep a NaN code NaN; under a finite scale the fp32 decode would): then
    :func:`e4m3_to_bf16_times` gives the fp32 decode's bits. Reads the tensors back to the host: call it once
    per loaded weight, not per forward."""
    if not bool((scale_e8m0.view(torch.uint8) <= MX_FOLD_MAX_CODE).all()):
        return False
    return data is None or not bool(((data.view(torch.uint8) & 0x7F) == E4M3_NAN_CODE).any())


def fast_widen_usable(device: torch.device) -> bool:
    """Whether :func:`e4m3_to_bf16` can take its FAST path on ``device`` (sm_90+: ``mul.rn.bf16x2``; not the
    interpreter)."""
    return device.type == "cuda" and not triton_interpreting() and cuda_major(device) >= 9


@triton.jit
def e4m3_to_bf16(codes, FAST: tl.constexpr):
    """float8e4nv -> bf16, exact. FAST (CUDA sm_90+): one conversion per pair plus integer ops and a bf16x2
    multiply (see above); else Triton's conversion (the interpreter, which cannot run PTX)."""
    if FAST:
        out = tl.inline_asm_elementwise(
            _WIDEN_PAIR, "=r,r", [codes.to(tl.float16)], dtype=tl.bfloat16, is_pure=True, pack=2
        )
    else:
        out = codes.to(tl.float32).to(tl.bfloat16)
    return out
