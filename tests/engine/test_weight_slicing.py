"""The CPU weight quantizers of the online methods work slice by slice (bounded scratch) and must give the
unsliced torch reference's bytes exactly: E4M3 codes and scales are defined bit for bit, so the comparison is
``torch.equal`` on the raw bytes, never a tolerance."""

from __future__ import annotations

import pytest
import torch

from mxrun.engine import methods
from mxrun.engine.methods import quantize_fp8_into, quantize_mxfp8_into
from mxrun.kernels.fp8_quantize import Fp8Granularity, quantize_fp8_reference
from mxrun.kernels.mxfp8_quantize import MxScaleRule, quantize_mxfp8_reference

WEIGHT_GRANULARITIES = (Fp8Granularity.PER_TENSOR, Fp8Granularity.PER_ROW, Fp8Granularity.BLOCK_128X128)
SHAPES = (
    (300, 160),  # odd row count, partial 128x128 blocks along both axes, 48,000 elements: several slices
    (129, 4096),  # rows wider than a slice: one row per slice, one partial block row
    (7, 64),  # smaller than one slice
    (3, 257, 96),  # a 3-D expert stack, odd rows per expert
)


def _weight(shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(shape, generator=generator) * torch.logspace(-3, 3, shape[-1])  # wide range per row
    weight.view(-1)[::97] = 0.0
    weight.view(-1)[5::101] = -0.0
    return weight.to(dtype)


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).contiguous().view(torch.uint8)


@pytest.fixture(params=[None, 1], ids=["default-slices", "one-row-slices"])
def slice_elements(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> int:
    """The default slice size, and the smallest (every row, every 128x128 block on its own)."""
    if request.param is not None:
        monkeypatch.setattr(methods, "SLICE_ELEMENTS", request.param)
    return methods.SLICE_ELEMENTS


@pytest.mark.parametrize("granularity", WEIGHT_GRANULARITIES, ids=lambda g: g.value)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_fp8_sliced_equals_reference(
    granularity: Fp8Granularity, shape: tuple[int, ...], dtype: torch.dtype, slice_elements: int
) -> None:
    weight = _weight(shape, dtype)
    expected = quantize_fp8_reference(weight, granularity)
    data = torch.empty(shape, dtype=torch.float8_e4m3fn)
    scale = torch.empty_like(expected.scale)
    quantize_fp8_into(weight, granularity, data, scale)
    assert torch.equal(_bytes(data), _bytes(expected.data))
    assert torch.equal(_bytes(scale), _bytes(expected.scale))


@pytest.mark.parametrize("rule", list(MxScaleRule), ids=lambda r: r.value)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_mxfp8_sliced_equals_reference(
    rule: MxScaleRule, shape: tuple[int, ...], dtype: torch.dtype, slice_elements: int
) -> None:
    weight = _weight(shape, dtype)
    expected = quantize_mxfp8_reference(weight, rule)
    data = torch.empty(shape, dtype=torch.float8_e4m3fn)
    scale = torch.empty(expected.scale_e8m0.shape, dtype=torch.uint8)
    quantize_mxfp8_into(weight, rule, data, scale)
    assert torch.equal(_bytes(data), _bytes(expected.data))
    assert torch.equal(scale, expected.scale_e8m0.view(torch.uint8))


def test_per_tensor_scale_is_global_across_slices(slice_elements: int) -> None:
    """One huge element in the last slice sets the scale of every slice (the amax is taken first)."""
    weight = _weight((300, 160), torch.bfloat16)
    weight[-1, -1] = 3.0e4
    expected = quantize_fp8_reference(weight, Fp8Granularity.PER_TENSOR)
    data, scale = torch.empty(300, 160, dtype=torch.float8_e4m3fn), torch.empty(())
    quantize_fp8_into(weight, Fp8Granularity.PER_TENSOR, data, scale)
    assert torch.equal(scale, expected.scale) and torch.equal(_bytes(data), _bytes(expected.data))


def test_nan_propagates_as_in_the_reference() -> None:
    weight = _weight((300, 160), torch.float32)
    weight[200, 3] = float("nan")
    for granularity in WEIGHT_GRANULARITIES:
        expected = quantize_fp8_reference(weight, granularity)
        data, scale = torch.empty(300, 160, dtype=torch.float8_e4m3fn), torch.empty_like(expected.scale)
        quantize_fp8_into(weight, granularity, data, scale)
        assert torch.equal(_bytes(data), _bytes(expected.data)), granularity
        assert torch.equal(_bytes(scale), _bytes(expected.scale)), granularity


def test_scratch_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """The reference quantizer is only ever called on slices of at most SLICE_ELEMENTS elements (one row or
    one 128x128 block when those are larger)."""
    seen: list[int] = []
    real_fp8, real_mx = methods.quantize_fp8_reference, methods.quantize_mxfp8_reference
    monkeypatch.setattr(
        methods, "quantize_fp8_reference", lambda x, g: seen.append(x.numel()) or real_fp8(x, g)
    )
    monkeypatch.setattr(
        methods, "quantize_mxfp8_reference", lambda x, r: seen.append(x.numel()) or real_mx(x, r)
    )
    weight = _weight((1024, 512), torch.bfloat16)
    for granularity in (Fp8Granularity.PER_ROW, Fp8Granularity.BLOCK_128X128):
        expected = quantize_fp8_reference(weight, granularity)
        quantize_fp8_into(
            weight, granularity, torch.empty_like(expected.data), torch.empty_like(expected.scale)
        )
    quantize_mxfp8_into(
        weight, MxScaleRule.ROUND_UP, torch.empty(1024, 512, dtype=torch.float8_e4m3fn),
        torch.empty(1024, 16, dtype=torch.uint8),
    )  # fmt: skip
    assert seen and max(seen) <= max(methods.SLICE_ELEMENTS, 128 * 128)
