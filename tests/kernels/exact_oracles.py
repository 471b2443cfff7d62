"""Independent exact answers for the quantize tests, computed with Python rationals, not with the kernels' bit
tricks: the E4M3 value each code stands for, the nearest-even code of a value, and the MX shared exponent."""

from __future__ import annotations

import bisect
import math
from fractions import Fraction

E4M3_MAX = Fraction(448)


def e4m3_magnitudes() -> list[Fraction]:
    """Exact values of the positive finite codes 0x00..0x7E, in code order (which is also value order)."""
    values = []
    for code in range(0x7F):
        exponent, mantissa = code >> 3, code & 7
        if exponent == 0:
            values.append(Fraction(mantissa, 8) * Fraction(1, 2**6))
        else:
            values.append((1 + Fraction(mantissa, 8)) * Fraction(2) ** (exponent - 7))
    return values


_MAGNITUDES = e4m3_magnitudes()


def e4m3_encode_exact(value: float) -> int:
    """E4M3 code of ``value``: NaN -> 0x7F, saturate to 448, nearest with ties to the even code, signed zero."""
    if math.isnan(value):
        return 0x7F
    sign = 0x80 if math.copysign(1.0, value) < 0 else 0
    magnitude = E4M3_MAX if math.isinf(value) else min(abs(Fraction(value)), E4M3_MAX)
    above = bisect.bisect_left(_MAGNITUDES, magnitude)
    if above < len(_MAGNITUDES) and _MAGNITUDES[above] == magnitude:
        return sign | above
    below = above - 1
    gap_below, gap_above = magnitude - _MAGNITUDES[below], _MAGNITUDES[above] - magnitude
    if gap_below < gap_above or (gap_below == gap_above and below % 2 == 0):
        return sign | below
    return sign | above


def mx_scale_code_exact(amax: float, rule: str) -> int:
    """E8M0 code for a block whose amax is ``amax`` (finite, >= 0), by searching exponents on exact rationals.

    round_up: the smallest e in [-127, 127] with amax / 2^e <= 448. floor: floor(log2(amax)) - 8 clamped to
    [-127, 127] (an all-zero block takes the lowest, -127).
    """
    value = Fraction(amax)
    if rule == "round_up":
        exponent = next(e for e in range(-127, 128) if value / Fraction(2) ** e <= E4M3_MAX)
    elif value == 0:
        exponent = -127
    else:
        floor_log2 = max(e for e in range(-160, 130) if Fraction(2) ** e <= value)
        exponent = min(max(floor_log2 - 8, -127), 127)
    return exponent + 127


def e4m3_half_ulp(magnitude: float) -> float:
    """Half the spacing of the E4M3 grid at ``magnitude`` (<= 448): the largest RNE error there."""
    if magnitude < 2.0**-6:
        return 2.0**-10
    return 2.0 ** (math.floor(math.log2(magnitude)) - 4)
