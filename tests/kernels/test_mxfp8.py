"""MXFP8: hand-worked spec examples, exact scale exponents against a rational oracle, the Triton kernel equal
to the torch reference byte for byte (scales and elements) over dtypes, layouts and special values, round-trip
error bounds (hypothesis), layouts and errors."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mxrun.kernels.mxfp8_quantize import (
    E4m3Cast,
    MxScaleRule,
    dequantize_mxfp8,
    e8m0_to_float32,
    mx_round_triton,
    mx_scale_codes_reference,
    quantize_mxfp8,
    quantize_mxfp8_reference,
    quantize_mxfp8_triton,
)
from mxrun.kernels.row_layout import QuantizeInputError, TileConfig

from .device_cases import KERNEL_CASTS, KERNEL_DEVICE, REFERENCE_DEVICES, bits, gpu_only, make_input
from .exact_oracles import e4m3_half_ulp, mx_scale_code_exact

RULES = ["round_up", "floor"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _quantize(x: torch.Tensor, rule: str, implementation: str):
    if implementation == "torch":
        return quantize_mxfp8_reference(x, rule)
    return quantize_mxfp8_triton(x.to(KERNEL_DEVICE), rule)


IMPLEMENTATIONS = ["torch", "triton"]

# (values placed at the start of a 32-element block, rest zero; rule; expected scale code; expected codes)
# Worked by hand from the OCP MX v1.0 rules; E4M3 code = sign<<7 | (exponent + 7)<<3 | mantissa.
SPEC_EXAMPLES = [
    # amax 1.0, floor: X = 2^(0 - 8), code 127 - 8 = 119. Elements times 256:
    # 1.0 -> 256 = 2^8 -> 0x78; 0.5 -> 128 -> 0x70; -0.25 -> -64 -> 0x80|0x68; 2^-10 -> 0.25 -> 0x28;
    # 0.3 -> 76.8, between 72 (0x69) and 80 (0x6A), nearer 80 -> 0x6A.
    ([1.0, 0.5, -0.25, 2.0**-10, 0.3], "floor", 119, [0x78, 0x70, 0xE8, 0x28, 0x6A]),
    # Round-up gives the same scale for amax 1.0: 1 * 2^8 = 256 <= 448 but 1 * 2^9 > 448.
    ([1.0, 0.5, -0.25, 2.0**-10, 0.3], "round_up", 119, [0x78, 0x70, 0xE8, 0x28, 0x6A]),
    # amax 448: round-up scale 2^0 (code 127); 448 -> 0x7E, -3.5 -> 0x80|(8<<3)|6 = 0xC6.
    ([448.0, -3.5], "round_up", 127, [0x7E, 0xC6]),
    # amax 449: round-up needs 2^1 (449 > 448); 449/2 = 224.5 -> 224 = 1.75*2^7 -> 0x76; 2/2 = 1 -> 0x38.
    ([449.0, 2.0], "round_up", 128, [0x76, 0x38]),
    # amax 449, floor: floor(log2 449) = 8 -> X = 2^0; 449 saturates to 448 -> 0x7E.
    ([449.0, 2.0], "floor", 127, [0x7E, 0x40]),
    # amax 1.8: round-up 2^-7 (1.8*256 = 460.8 > 448), 1.8*128 = 230.4 -> 224 -> 0x76;
    # floor 2^-8, 1.8*256 = 460.8 saturates -> 0x7E.
    ([1.8], "round_up", 120, [0x76]),
    ([1.8], "floor", 119, [0x7E]),
    # Largest binade: 1.5 * 2^127 -> e = 127 - 8 = 119 (code 246); element 1.5 * 2^8 = 384 -> 0x7C.
    ([1.5 * 2.0**127], "round_up", 246, [0x7C]),
    ([1.5 * 2.0**127], "floor", 246, [0x7C]),
    # Smallest normal 2^-126: e would be -134, clamped to -127 (code 0); element 2^-126 * 2^127 = 2 -> 0x40.
    ([2.0**-126], "round_up", 0, [0x40]),
    ([2.0**-126], "floor", 0, [0x40]),
    # fp32 subnormals, scale 2^-127: 2^-130 -> 2^-3 -> 0x20; 3*2^-137 -> 3*2^-10 = 1.5 E4M3 subnormal steps
    # -> tie, to even 2 -> 0x02; 2^-140 -> 2^-13 -> 0.
    ([2.0**-130, 3 * 2.0**-137, 2.0**-140], "round_up", 0, [0x20, 0x02, 0x00]),
]


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize(("values", "rule", "scale_code", "element_codes"), SPEC_EXAMPLES)
def test_spec_examples(values, rule, scale_code, element_codes, implementation) -> None:
    x = torch.zeros(1, 64)
    x[0, : len(values)] = torch.tensor(values, dtype=torch.float64).float()
    x[0, 32:] = 1.0  # a second block with amax 1.0 checks the blocks stay independent
    data, scale = _quantize(x, rule, implementation)
    assert bits(scale).tolist() == [[scale_code, 119]]
    assert bits(data)[0, : len(values)].tolist() == element_codes
    assert bits(data)[0, len(values) : 32].eq(0).all()
    assert bits(data)[0, 32:].eq(0x78).all()


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("rule", RULES)
def test_special_blocks(rule: str, implementation: str) -> None:
    x = torch.ones(1, 128)
    x[0, :32] = 0.0
    x[0, 5] = -0.0  # all-zero block: smallest scale, signed zeros
    x[0, 40] = float("nan")  # NaN block: scale NaN, all elements NaN
    x[0, 64] = float("inf")  # Inf block: exponent field 255 -> e = 120, Inf saturates, finite -> 0
    x[0, 65] = float("-inf")
    data, scale = _quantize(x, rule, implementation)
    assert bits(scale).tolist() == [[0, 0xFF, 247, 119]]
    codes = bits(data)[0]
    assert codes[:32].tolist() == [0x80 if i == 5 else 0 for i in range(32)]
    assert codes[32:64].eq(0x7F).all()
    assert codes[64:68].tolist() == [0x7E, 0xFE, 0x00, 0x00]
    assert codes[96:].eq(0x78).all()


@settings(max_examples=300, deadline=None)
@given(
    amax=st.floats(min_value=0, width=32, allow_nan=False, allow_infinity=False), rule=st.sampled_from(RULES)
)
def test_scale_code_matches_exact_oracle(amax: float, rule: str) -> None:
    amax_bits = torch.tensor([amax], dtype=torch.float32).view(torch.int32)
    assert mx_scale_codes_reference(amax_bits, rule).item() == mx_scale_code_exact(amax, rule)


@pytest.mark.parametrize(
    "amax", [448.0, 449.0, 1.75, 1.7500001, 2.0**-119 * 1.75, 2.0**-119 * 1.7500002, 3.0e38, 1e-45, 0.0]
)
@pytest.mark.parametrize("rule", RULES)
def test_scale_code_boundaries(amax: float, rule: str) -> None:
    amax_bits = torch.tensor([amax], dtype=torch.float32).view(torch.int32)
    exact = mx_scale_code_exact(float(torch.tensor(amax, dtype=torch.float32)), rule)
    assert mx_scale_codes_reference(amax_bits, rule).item() == exact


def _layouts(dtype: torch.dtype, seed: int, large: bool) -> dict[str, torch.Tensor]:
    """Inputs of every layout the kernel must read in place: rows not a multiple of the tile, a stack that
    merges into rows, one that cannot (sliced N), a transpose, and a stride along K."""
    m, k = (2050, 7168) if large else (37, 96)
    e, n = (8, 520) if large else (3, 13)
    stacked = make_input((e, n + 3, k), dtype, seed + 2)
    return {
        "matrix": make_input((m, k), dtype, seed),
        "stack": make_input((e, n, k), dtype, seed + 1),
        "stack_sliced_rows": stacked[:, 1 : n + 1, :],
        "transposed": make_input((k, m), dtype, seed + 3).t(),
        "strided_k": make_input((m, 2 * k), dtype, seed + 4)[:, ::2],
    }


def _assert_kernel_matches_reference(x: torch.Tensor, rule: str, cast: str, config=None) -> None:
    expected = quantize_mxfp8_reference(x, rule)
    actual = quantize_mxfp8_triton(x.to(KERNEL_DEVICE), rule, cast=cast, config=config)
    assert actual.data.dtype == torch.float8_e4m3fn and actual.data.is_contiguous()
    assert actual.scale_e8m0.shape == (*x.shape[:-1], x.shape[-1] // 32)
    assert torch.equal(bits(actual.scale_e8m0), bits(expected.scale_e8m0))
    assert torch.equal(bits(actual.data), bits(expected.data))


@pytest.mark.parametrize("cast", KERNEL_CASTS)
@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_kernel_matches_reference_small(dtype: torch.dtype, rule: str, cast: str) -> None:
    for name, x in _layouts(dtype, seed=10, large=False).items():
        try:
            _assert_kernel_matches_reference(x, rule, cast)
        except AssertionError as error:
            raise AssertionError(f"layout {name}") from error


@pytest.mark.parametrize("config", [TileConfig(1, 32, 1), TileConfig(4, 64, 2), TileConfig(16, 512, 4)])
def test_kernel_matches_reference_other_tiles(config: TileConfig) -> None:
    x = make_input((21, 160), torch.bfloat16, seed=3)
    _assert_kernel_matches_reference(x, "round_up", "software", config)


@gpu_only
@pytest.mark.parametrize("cast", KERNEL_CASTS)
@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_kernel_matches_reference_large(dtype: torch.dtype, rule: str, cast: str) -> None:
    for name, x in _layouts(dtype, seed=20, large=True).items():
        try:
            _assert_kernel_matches_reference(x.cuda(), rule, cast)
        except AssertionError as error:
            raise AssertionError(f"layout {name}") from error


@settings(max_examples=25, deadline=None)
@given(
    rows=st.integers(1, 9),
    blocks=st.integers(1, 4),
    seed=st.integers(0, 2**16),
    dtype=st.sampled_from(DTYPES),
    rule=st.sampled_from(RULES),
)
def test_kernel_matches_reference_property(rows: int, blocks: int, seed: int, dtype, rule: str) -> None:
    _assert_kernel_matches_reference(make_input((rows, 32 * blocks), dtype, seed), rule, "software")


@pytest.mark.parametrize("device", REFERENCE_DEVICES)
def test_reference_same_bytes_on_every_device(device: str) -> None:
    x = make_input((64, 256), torch.float32, seed=5)
    on_cpu = quantize_mxfp8_reference(x)
    on_device = quantize_mxfp8_reference(x.to(device))
    assert torch.equal(bits(on_device.data), bits(on_cpu.data))
    assert torch.equal(bits(on_device.scale_e8m0), bits(on_cpu.scale_e8m0))


_finite_fp32 = st.floats(width=32, allow_nan=False, allow_infinity=False)


@settings(max_examples=200, deadline=None)
@given(values=st.lists(_finite_fp32, min_size=32, max_size=32), rule=st.sampled_from(RULES))
def test_round_trip_error_within_half_ulp_of_block_grid(values: list[float], rule: str) -> None:
    """Round-up never clips, so each element is off by at most half the E4M3 spacing at its scaled magnitude,
    times the scale; floor may clip the top binade, so there the bound is the distance to 448 * scale too."""
    x = torch.tensor(values, dtype=torch.float32).reshape(1, 32)
    data, scale = quantize_mxfp8_reference(x, rule)
    restored = dequantize_mxfp8(data, scale).double()[0]
    block_scale = float(e8m0_to_float32(scale)[0, 0])
    for original, back in zip(x[0].double().tolist(), restored.tolist(), strict=True):
        scaled = abs(original) / block_scale
        bound = e4m3_half_ulp(min(scaled, 448.0)) * block_scale
        if rule == "floor" and scaled > 448.0:
            bound = (scaled - 448.0) * block_scale + bound
        assert rule == "floor" or scaled <= 448.0
        if math.isinf(back):  # fp32 cannot hold 256 * 2^120: only inputs next to fp32's max may round there
            assert abs(original) >= 2.0**127
            continue
        # dequantization is one fp32 multiply by a power of two: exact unless it lands below fp32's normals
        assert abs(original - back) <= bound + 2.0**-149, (original, back, block_scale)


@settings(max_examples=100, deadline=None)
@given(values=st.lists(_finite_fp32, min_size=64, max_size=64), rule=st.sampled_from(RULES))
def test_requantizing_dequantized_values_is_lossless(values: list[float], rule: str) -> None:
    x = torch.tensor(values, dtype=torch.float32).reshape(2, 32)
    once = dequantize_mxfp8(*quantize_mxfp8_reference(x, rule))
    twice = dequantize_mxfp8(*quantize_mxfp8_reference(once, rule))
    if not (torch.isinf(once).any() or torch.isinf(twice).any()):
        assert torch.equal(once, twice)


def test_dequantize_layouts_and_nan() -> None:
    x = make_input((3, 5, 64), torch.bfloat16, seed=1, specials=False)
    x[1, 2, 7] = float("nan")
    data, scale = quantize_mxfp8_reference(x)
    assert data.shape == x.shape and scale.shape == (3, 5, 2) and scale.dtype == torch.uint8
    restored = dequantize_mxfp8(data, scale, out_dtype=torch.bfloat16)
    assert restored.dtype == torch.bfloat16
    assert torch.isnan(restored[1, 2, :32]).all() and not torch.isnan(restored[1, 2, 32:]).any()
    # Elements in E4M3's normal range (scaled magnitude >= 2^-6) are within half an ulp, 2^-4 relative,
    # plus the bf16 output rounding; smaller ones are covered by the absolute bound of the property test.
    block_scale = e8m0_to_float32(scale).repeat_interleave(32, dim=-1)
    normal = (x.float().abs() / block_scale >= 2.0**-6) & ~torch.isnan(restored)
    relative = (restored.float() - x.float()).abs() / x.float().abs()
    assert float(relative[normal].max()) <= 2.0**-4 + 2.0**-8


def test_e8m0_decoding_is_exact() -> None:
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    decoded = e8m0_to_float32(codes)
    assert torch.isnan(decoded[255])
    assert [math.ldexp(1.0, c - 127) for c in range(255)] == decoded[:255].double().tolist()
    from_e8m0fnu = e8m0_to_float32(codes.view(torch.float8_e8m0fnu))
    torch.testing.assert_close(from_e8m0fnu, decoded, rtol=0, atol=0, equal_nan=True)


def test_scale_dtype_e8m0fnu_has_same_bytes() -> None:
    x = make_input((4, 64), torch.float32, seed=2)
    as_uint8 = quantize_mxfp8(x, scale_dtype=torch.uint8)
    as_e8m0 = quantize_mxfp8(x, scale_dtype=torch.float8_e8m0fnu)
    assert as_e8m0.scale_e8m0.dtype == torch.float8_e8m0fnu
    assert torch.equal(bits(as_e8m0.scale_e8m0), bits(as_uint8.scale_e8m0))


@pytest.mark.parametrize("backend", ["auto", "torch", "triton"])
def test_dispatcher_gives_reference_bytes(backend: str) -> None:
    x = make_input((8, 64), torch.bfloat16, seed=4)
    device = KERNEL_DEVICE if backend == "triton" else "cpu"
    out = quantize_mxfp8(x.to(device), MxScaleRule.FLOOR, backend=backend)
    expected = quantize_mxfp8_reference(x, "floor")
    assert torch.equal(bits(out.data), bits(expected.data))
    assert torch.equal(bits(out.scale_e8m0), bits(expected.scale_e8m0))


@pytest.mark.parametrize(
    ("x", "message"),
    [
        (torch.zeros(4, 48), "multiple of 32"),
        (torch.zeros(64), "2-D"),
        (torch.zeros(2, 2, 2, 32), "2-D"),
        (torch.zeros(4, 64, dtype=torch.int32), "dtype"),
    ],
)
@pytest.mark.parametrize("implementation", ["torch", "triton"])
def test_invalid_inputs_are_clear_errors(x: torch.Tensor, message: str, implementation: str) -> None:
    fn = quantize_mxfp8_reference if implementation == "torch" else quantize_mxfp8_triton
    with pytest.raises(QuantizeInputError, match=message):
        fn(x.to(KERNEL_DEVICE if implementation == "triton" else "cpu"))


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_mx_round_is_quantize_then_dequantize(rule: str, dtype: torch.dtype) -> None:
    """The one-pass rounding kernel gives, bit for bit, the reference's quantize-dequantize cast to x's dtype:
    special blocks (zeros with their signs, NaN, Inf), values near the scale boundaries, a 3-D stack."""
    g = torch.Generator().manual_seed(8)
    x = torch.randn(3, 5, 256, generator=g) * torch.logspace(-3, 3, 256)
    x[0, 0, :32] = 0.0
    x[0, 0, 5] = -0.0
    x[0, 1, 40] = float("nan")
    x[0, 2, 64] = float("inf")
    x[1, 0, :32] = 448 * 2.0 ** torch.arange(-2, 30).float() / 2**20
    x = x.to(dtype)
    q = quantize_mxfp8_reference(x, rule)
    expected = dequantize_mxfp8(q.data, q.scale_e8m0, dtype)
    out = mx_round_triton(x.to(KERNEL_DEVICE), rule).cpu()
    assert out.dtype == dtype
    same = (out.view(torch.int16) == expected.view(torch.int16)) | (out.isnan() & expected.isnan())
    assert bool(same.all())
    with pytest.raises(QuantizeInputError, match="bfloat16 or float16"):
        mx_round_triton(x.float().to(KERNEL_DEVICE), rule)


def test_hardware_cast_refused_under_interpreter() -> None:
    if KERNEL_DEVICE == "cuda":
        pytest.skip("compiled kernels support the hardware cast")
    with pytest.raises(ValueError, match="hardware"):
        quantize_mxfp8_triton(torch.ones(1, 32), cast=E4m3Cast.HARDWARE)
