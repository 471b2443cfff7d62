"""Division by a scale with multiplies (``scale_division``): the quotient equals torch's correctly rounded fp32
division bit for bit wherever it can change an E4M3 code, and the codes are equal everywhere, on inputs built
to be hard: quotients a hair from every E4M3 rounding midpoint, divisors with all-ones significands, scales at
the range switches (2^+-64), subnormal and huge scales, signed zeros, Inf and NaN."""

from __future__ import annotations

import pytest
import torch

from mxrun.kernels.backend import tl, triton
from mxrun.kernels.e4m3 import e4m3_code_values, encode_e4m3_reference
from mxrun.kernels.scale_division import divide_by_scale, scale_division_setup

from .device_cases import HAS_CUDA, KERNEL_DEVICE

RELEVANT = 2.0**-12  # below this a quotient's E4M3 code is a signed zero whatever its last bits


@triton.jit
def _divide_kernel(x_ptr, scale_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    scale = tl.load(scale_ptr + offs, mask=mask, other=1.0)
    pre, divisor, reciprocal = scale_division_setup(scale)
    tl.store(out_ptr + offs, divide_by_scale(x, pre, divisor, reciprocal), mask=mask)


def _divide(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    x, scale = x.to(KERNEL_DEVICE).contiguous(), scale.to(KERNEL_DEVICE).contiguous()
    out = torch.empty_like(x)
    block = 1024
    _divide_kernel[(triton.cdiv(x.numel(), block),)](x, scale, out, x.numel(), BLOCK=block)
    return out.cpu()


def _next_up(t: torch.Tensor, steps: int) -> torch.Tensor:
    """``t`` moved ``steps`` fp32 ulps away from zero (negative: toward zero); finite positive inputs."""
    return (t.view(torch.int32) + steps).view(torch.float32)


def _hard_scales(generator: torch.Generator, count: int) -> torch.Tensor:
    """Scales of every kind the quantizers produce: random significands and exponents over the whole range
    (subnormal to 2^119), all-ones and power-of-two significands, and values next to the 2^+-64 switches."""
    exponents = torch.randint(-149, 120, (count,), generator=generator).double()
    significands = 1.0 + torch.rand(count, generator=generator, dtype=torch.float64)
    random = (significands * torch.pow(2.0, exponents)).float()
    special = []
    for e in (-140, -126, -100, -65, -64, -63, -20, -1, 0, 1, 20, 63, 64, 65, 100, 119):
        power = torch.tensor(2.0**e, dtype=torch.float32)
        special += [power, _next_up(power, 1), _next_up(power, -1), _next_up(power * 2, -1)]
    return torch.cat([random, torch.stack(special)])


def _hard_pairs(count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, scale) with x / scale a few ulps from an E4M3 rounding midpoint or code, or random in range."""
    generator = torch.Generator().manual_seed(seed)
    scales = _hard_scales(generator, count)
    codes = e4m3_code_values()
    finite = codes[torch.isfinite(codes) & (codes > 0)].sort().values
    targets = torch.cat([finite, (finite[1:] + finite[:-1]) / 2, torch.tensor([2.0**-10, 2.0**-9 / 4])])
    pick_scale = torch.randint(0, scales.numel(), (count,), generator=generator)
    pick_target = torch.randint(0, targets.numel(), (count,), generator=generator)
    scale = scales[pick_scale]
    x = (scale.double() * targets[pick_target].double()).float()  # RN(scale * target): close to the target
    x = (x.view(torch.int32) + torch.randint(-3, 4, (count,), generator=generator, dtype=torch.int32)).view(
        torch.float32
    )
    uniform = (torch.rand(count, generator=generator) * 448.0 * scale.double()).float()
    x = torch.where(torch.rand(count, generator=generator) < 0.25, uniform, x)
    sign = torch.where(torch.rand(count, generator=generator) < 0.5, -1.0, 1.0)
    x = torch.where(torch.isfinite(x), x * sign, torch.zeros_like(x))
    return x, scale


def _assert_matches_division(x: torch.Tensor, scale: torch.Tensor) -> None:
    expected = x / scale  # CPU fp32 division: correctly rounded
    actual = _divide(x, scale)
    codes_expected = encode_e4m3_reference(expected).view(torch.uint8)
    codes_actual = encode_e4m3_reference(actual).view(torch.uint8)
    wrong_codes = (codes_expected != codes_actual).nonzero().flatten()
    assert wrong_codes.numel() == 0, [
        (x[i].item(), scale[i].item(), expected[i].item(), actual[i].item()) for i in wrong_codes[:5]
    ]
    relevant = expected.abs() >= RELEVANT
    differs = relevant & (expected.view(torch.int32) != actual.view(torch.int32))
    bad = differs.nonzero().flatten()
    assert bad.numel() == 0, [
        (x[i].item(), scale[i].item(), expected[i].item(), actual[i].item()) for i in bad[:5]
    ]
    small = ~relevant & ~torch.isnan(expected)
    assert bool((actual[small].abs() < 2.0**-10).all())


@pytest.mark.parametrize("seed", [0, 1])
def test_quotients_near_every_e4m3_midpoint(seed: int) -> None:
    count = 400_000 if HAS_CUDA else 60_000
    x, scale = _hard_pairs(count, seed)
    _assert_matches_division(x, scale)


def test_special_values_follow_the_reference() -> None:
    inf, nan = float("inf"), float("nan")
    cases = [
        (-0.0, 1.0),  # a negative zero keeps its sign (0x80)
        (0.0, 3.0),
        (-1e-45, 2.0**-130),  # subnormal over subnormal
        (-1e-40, 1.0),  # an fp32 subnormal quotient: a signed zero code
        (5.0, inf),  # Inf scale: finite elements become signed zeros
        (-5.0, inf),
        (inf, inf),  # ... and infinite ones NaN
        (-inf, inf),
        (nan, nan),  # NaN scale: NaN
        (3.0, nan),
        (448.0 * 2.0**100, 2.0**100),
        (447.99997, 1.0),
    ]
    x = torch.tensor([c[0] for c in cases], dtype=torch.float32)
    scale = torch.tensor([c[1] for c in cases], dtype=torch.float32)
    expected = x / scale
    actual = _divide(x, scale)
    assert torch.equal(torch.isnan(actual), torch.isnan(expected))
    keep = ~torch.isnan(expected)
    assert torch.equal(actual[keep].view(torch.int32), expected[keep].view(torch.int32)), (actual, expected)


def test_every_bf16_value_over_hard_divisors() -> None:
    """All finite bf16 values (the inputs the quantizers see most) over divisors with all-ones, random and
    power-of-two significands, around 1 and at the extremes."""
    all_bf16 = torch.arange(0, 1 << 16, dtype=torch.int32).to(torch.int16).view(torch.bfloat16).float()
    all_bf16 = all_bf16[torch.isfinite(all_bf16)]
    divisors = [1.0, 1.9999999, 1.2345678, 2.0**-70 * 1.75, 2.0**70 * 1.3333334, 1.0 / 448.0]
    if not HAS_CUDA:
        all_bf16 = all_bf16[::7]
    for divisor in divisors:
        scale = torch.full_like(all_bf16, divisor)
        # Keep |x / scale| <= 448 (what the quantizers guarantee): bigger quotients saturate anyway.
        x = torch.where((all_bf16 / scale).abs() <= 448.0, all_bf16, torch.zeros_like(all_bf16))
        _assert_matches_division(x, scale)
