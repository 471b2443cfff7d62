"""E4M3 element encoding: the torch reference and the Triton helper against an exact oracle, on every code,
every midpoint between neighbouring codes (ties to even), the fp32 values just either side of each midpoint,
saturation, signed zero, subnormals and NaN."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mxrun.kernels.backend import tl, triton
from mxrun.kernels.e4m3 import (
    e4m3_code,
    e4m3_code_values,
    e4m3_to_bf16,
    encode_e4m3_reference,
    fast_widen_usable,
)

from .device_cases import KERNEL_CASTS, KERNEL_DEVICE, REFERENCE_DEVICES, bits
from .exact_oracles import e4m3_encode_exact, e4m3_magnitudes


@triton.jit
def _encode_kernel(y_ptr, out_ptr, n, SOFT_CAST: tl.constexpr, BLOCK: tl.constexpr):
    """Test harness: out[i] = e4m3_code(y[i]); y fp32 [n], out uint8 [n], both contiguous."""
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    y = tl.load(y_ptr + offsets, mask=mask, other=0.0)
    tl.store(out_ptr + offsets, e4m3_code(y, SOFT_CAST), mask=mask)


def _fp32_neighbours(value: float) -> list[float]:
    """``value`` and the fp32 values one ulp below and above it."""
    v = np.float32(value)
    return [float(np.nextafter(v, np.float32(-np.inf))), float(v), float(np.nextafter(v, np.float32(np.inf)))]


def _probe_values() -> list[float]:
    """Every finite code's value, each midpoint and its fp32 neighbours, both signs, plus the edges."""
    magnitudes = [float(m) for m in e4m3_magnitudes()]
    probes: list[float] = []
    for low, high in zip(magnitudes, [*magnitudes[1:], 480.0], strict=True):
        probes += _fp32_neighbours(low) + _fp32_neighbours((low + high) / 2)
    probes += [448.0, 449.0, 463.99, 464.0, 464.01, 480.0, 1e4, 3.0e38, math.inf, 2.0**-10, 2.0**-11]
    probes += [1e-40, 1e-45, 2.0**-126, 0.0]
    probes += [-p for p in probes] + [math.nan, -math.nan]
    random_bits = np.random.default_rng(0).integers(0, 2**32, size=4000, dtype=np.uint64).astype(np.uint32)
    probes += [float(v) for v in random_bits.view(np.float32)]
    return probes


PROBES = _probe_values()
EXPECTED_CODES = torch.tensor([e4m3_encode_exact(v) for v in PROBES], dtype=torch.uint8)


def test_code_table_matches_torch_decoding() -> None:
    all_codes = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn)
    torch.testing.assert_close(e4m3_code_values(), all_codes.float(), rtol=0, atol=0, equal_nan=True)


def test_oracle_round_trips_every_code() -> None:
    values = e4m3_code_values()
    for code in range(256):
        value = float(values[code])
        expected = 0x7F if math.isnan(value) else code
        assert e4m3_encode_exact(value) == expected, hex(code)


@pytest.mark.parametrize("device", REFERENCE_DEVICES)
def test_reference_encoder_matches_oracle(device: str) -> None:
    y = torch.tensor(PROBES, dtype=torch.float32, device=device)
    actual = bits(encode_e4m3_reference(y))
    wrong = (actual != EXPECTED_CODES).nonzero().flatten().tolist()
    assert not wrong, [(PROBES[i], hex(actual[i]), hex(EXPECTED_CODES[i])) for i in wrong[:8]]


@pytest.mark.parametrize("cast", KERNEL_CASTS)
def test_triton_encoder_matches_oracle(cast: str) -> None:
    y = torch.tensor(PROBES, dtype=torch.float32, device=KERNEL_DEVICE)
    out = torch.empty(y.shape, dtype=torch.uint8, device=KERNEL_DEVICE)
    block = 1024
    _encode_kernel[(triton.cdiv(y.numel(), block),)](
        y, out, y.numel(), SOFT_CAST=cast == "software", BLOCK=block
    )
    actual = out.cpu()
    wrong = (actual != EXPECTED_CODES).nonzero().flatten().tolist()
    assert not wrong, [(PROBES[i], hex(actual[i]), hex(EXPECTED_CODES[i])) for i in wrong[:8]]


@triton.jit
def _widen_kernel(codes_ptr, out_ptr, n, FAST: tl.constexpr, BLOCK: tl.constexpr):
    """Test harness: out[i] = bf16(code[i])."""
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    codes = tl.load(codes_ptr + offsets, mask=mask, other=0.0)
    tl.store(out_ptr + offsets, e4m3_to_bf16(codes, FAST), mask=mask)


def test_widening_to_bf16_is_exact() -> None:
    """Every non-NaN E4M3 code widened to bf16 gives torch's bits. On the GPU this runs the fast path (fp16 bits
    shifted, a bf16x2 multiply); NaN codes are left out (the fast path does not keep them NaN: see
    mxrun.kernels.e4m3)."""
    codes = torch.tensor([c for c in range(256) if c & 0x7F != 0x7F], dtype=torch.uint8).view(
        torch.float8_e4m3fn
    )
    dev = torch.device(KERNEL_DEVICE)
    out = torch.empty(codes.shape, dtype=torch.bfloat16, device=dev)
    _widen_kernel[(1,)](codes.to(dev), out, codes.numel(), FAST=fast_widen_usable(dev), BLOCK=256)
    assert torch.equal(out.cpu().view(torch.int16), codes.float().to(torch.bfloat16).view(torch.int16))
