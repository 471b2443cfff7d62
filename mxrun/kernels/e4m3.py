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

from mxrun.kernels.backend import tl, triton

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
