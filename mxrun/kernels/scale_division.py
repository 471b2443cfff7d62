"""Division by a quantization scale done with multiplies, giving the same E4M3 codes as ``x / scale``.

Why: FP8 quantization is defined as ``E4M3(x / scale)`` with a correctly rounded fp32 division (the torch
reference). Triton's ``div_rn`` compiles to a long instruction sequence with a slow-path branch for every
element, and on an H200 that, not memory, bounded the FP8 quantize kernels (0.43-0.70 of a copy's bandwidth).
A whole row, group or block shares one scale, so the expensive part can be done once per scale:

    y  = RN(1 / b)             once per scale (div_rn)
    q  = RN(a * y)             within one ulp of a / b
    r  = fma(-q, b, a)         the residual a - q b, exactly
    q' = fma(r, y, q)          = RN(a / b)

This is Markstein's correction step (P. Markstein, IBM J. Res. Dev. 34(1), 1990; see also Muller et al.,
*Handbook of Floating-Point Arithmetic*, the chapter on division with an FMA): with ``y`` the correctly
rounded reciprocal and ``q`` within one ulp of the quotient, one FMA-based correction gives the correctly
rounded quotient, provided the residual is representable (no underflow) and nothing overflows.

Ranges. Only quotients of magnitude above 2^-10 change an E4M3 code (half the smallest subnormal, 2^-9, ties
to zero), so exactness is needed for ``|a / b| >= 2^-12`` (margin included). A scale outside [2^-64, 2^64]
is brought inside by a power of two ``pre`` applied to both operands (exact for the operands that matter);
then every relevant ``a`` is an fp32 normal, the residual is a multiple of at least 2^-143 (representable),
and ``y <= 2^85`` is finite. Smaller quotients come out below 2^-10 in magnitude with the sign of ``a``
(a zero first product keeps ``a``'s sign, which the last FMA would lose for ``-0.0``).
Non-finite scales follow the reference: an Inf scale (Inf in the block, no NaN) turns finite elements into
signed zeros and infinite ones into NaN (``pre = 0``); a NaN scale makes every element NaN (``pre = NaN``).
"""

from __future__ import annotations

from mxrun.kernels.backend import tl, triton

_TWO_POW_64 = tl.constexpr(18446744073709551616.0)  # 2^64
_TWO_POW_MINUS_64 = tl.constexpr(5.421010862427522e-20)  # 2^-64 (exact in fp32)


@triton.jit
def scale_division_setup(scale):
    """Per-scale constants ``(pre, divisor, reciprocal)`` for :func:`divide_by_scale`; ``scale`` is fp32,
    positive, Inf or NaN (never zero: the scale rule maps zero to one), any shape."""
    small = scale < _TWO_POW_MINUS_64
    large = scale > _TWO_POW_64
    pre = tl.where(small, _TWO_POW_64, tl.where(large, _TWO_POW_MINUS_64, 1.0))
    is_inf = scale == float("inf")
    is_nan = scale != scale
    pre = tl.where(is_inf, 0.0, pre)
    pre = tl.where(is_nan, float("nan"), pre)
    divisor = tl.where(is_inf | is_nan, 1.0, scale * pre)
    reciprocal = tl.div_rn(tl.full(divisor.shape, 1.0, tl.float32), divisor)
    return pre, divisor, reciprocal


@triton.jit
def divide_by_scale(x, pre, divisor, reciprocal):
    """fp32 ``x / scale`` from :func:`scale_division_setup`'s constants (broadcast against ``x``): the
    correctly rounded quotient wherever it reaches 2^-12, so ``e4m3_code`` gives the reference's bytes."""
    a = x * pre
    q = a * reciprocal
    residual = tl.fma(-q, divisor, a)
    corrected = tl.fma(residual, reciprocal, q)
    return tl.where(q == 0.0, q, corrected)
