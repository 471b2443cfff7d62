"""FP8 E4M3 with fp32 scales (per-tensor, per-row, 128x128 blocks, 1x128 groups): hand-worked scales, the scale
rule against numpy, the Triton kernels equal to the torch reference bit for bit over dtypes, layouts and special
values, round-trip error bounds (hypothesis), layouts and errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mxrun.kernels.fp8_quantize import (
    Fp8Granularity,
    dequantize_fp8,
    expand_fp8_scale,
    fp8_row_pieces,
    fp8_tile_config,
    quantize_fp8,
    quantize_fp8_block128,
    quantize_fp8_group128,
    quantize_fp8_per_channel,
    quantize_fp8_per_tensor,
    quantize_fp8_per_token,
    quantize_fp8_reference,
    quantize_fp8_triton,
)
from mxrun.kernels.row_layout import QuantizeInputError, TileConfig

from .device_cases import (
    KERNEL_CASTS,
    KERNEL_DEVICE,
    REFERENCE_DEVICES,
    assert_same_fp32,
    bits,
    gpu_only,
    make_input,
)
from .exact_oracles import e4m3_half_ulp

GRANULARITIES = list(Fp8Granularity)
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _expected_scale_shape(shape: tuple[int, ...], granularity: Fp8Granularity) -> tuple[int, ...]:
    blocks = -(-shape[-1] // 128)
    if granularity is Fp8Granularity.PER_TENSOR:
        return ()
    if granularity is Fp8Granularity.PER_ROW:
        return (*shape[:-1], 1)
    if granularity is Fp8Granularity.GROUP_1X128:
        return (*shape[:-1], blocks)
    return (*shape[:-2], -(-shape[-2] // 128), blocks)


def _assert_kernel_matches_reference(x: torch.Tensor, granularity, cast: str, config=None) -> None:
    expected = quantize_fp8_reference(x, granularity)
    actual = quantize_fp8_triton(x.to(KERNEL_DEVICE), granularity, cast=cast, config=config)
    assert actual.data.dtype == torch.float8_e4m3fn and actual.data.shape == x.shape
    assert actual.scale.dtype == torch.float32
    assert tuple(actual.scale.shape) == _expected_scale_shape(tuple(x.shape), Fp8Granularity(granularity))
    assert_same_fp32(actual.scale, expected.scale)
    assert torch.equal(bits(actual.data), bits(expected.data))


def _layouts(dtype: torch.dtype, seed: int, large: bool) -> dict[str, torch.Tensor]:
    """Every layout the kernels read in place; sizes are not multiples of 128 (edge blocks and groups)."""
    m, k = (2050, 7200) if large else (37, 200)
    e, n = (4, 300) if large else (2, 131)
    stacked = make_input((e, n + 3, k), dtype, seed + 2)
    return {
        "matrix": make_input((m, k), dtype, seed),
        "stack": make_input((e, n, k), dtype, seed + 1),
        "stack_of_whole_blocks": make_input((e, 256, k), dtype, seed + 5),
        "stack_sliced_rows": stacked[:, 1 : n + 1, :],
        "transposed": make_input((k, m), dtype, seed + 3).t(),
        "strided_k": make_input((m, 2 * k), dtype, seed + 4)[:, ::2],
    }


@pytest.mark.parametrize("cast", KERNEL_CASTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("granularity", GRANULARITIES, ids=lambda g: g.value)
def test_kernel_matches_reference_small(granularity, dtype: torch.dtype, cast: str) -> None:
    for name, x in _layouts(dtype, seed=30, large=False).items():
        if granularity is Fp8Granularity.PER_TENSOR:
            # one NaN poisons a whole tensor; check a clean copy too, so the scale is a real number
            x_clean = torch.nan_to_num(x, nan=0.0, posinf=3.0, neginf=-5.0)
            _assert_kernel_matches_reference(x_clean, granularity, cast)
        try:
            _assert_kernel_matches_reference(x, granularity, cast)
        except AssertionError as error:
            raise AssertionError(f"layout {name}") from error


@gpu_only
@pytest.mark.parametrize("cast", KERNEL_CASTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("granularity", GRANULARITIES, ids=lambda g: g.value)
def test_kernel_matches_reference_large(granularity, dtype: torch.dtype, cast: str) -> None:
    for name, x in _layouts(dtype, seed=40, large=True).items():
        try:
            _assert_kernel_matches_reference(x.cuda(), granularity, cast)
        except AssertionError as error:
            raise AssertionError(f"layout {name}") from error


@pytest.mark.parametrize("cols", [1000, 300])
def test_long_row_two_pass_kernel(cols: int) -> None:
    """Rows longer than the tile take the two-pass kernel; forced here with a narrow tile."""
    x = make_input((9, cols), torch.bfloat16, seed=6)
    _assert_kernel_matches_reference(x, Fp8Granularity.PER_ROW, "software", TileConfig(2, 128, 4))


@pytest.mark.parametrize(
    ("cols", "pieces"),
    [
        (7168, (4096, 2048, 1024)),
        (14336, (8192, 4096, 2048)),
        (4096, (4096, 0, 0)),
        (7200, (4096, 2048, 2048)),
        (200, (256, 0, 0)),
        (1664, (1024, 512, 128)),
        (1152, (1024, 128, 0)),
        (1, (1, 0, 0)),
    ],
)
def test_row_pieces_cover_the_row_with_at_most_three_powers_of_two(
    cols: int, pieces: tuple[int, ...]
) -> None:
    assert fp8_row_pieces(cols) == pieces
    assert sum(pieces) >= cols and all(p == 0 or p & (p - 1) == 0 for p in pieces)


@pytest.mark.parametrize("cols", [1664, 1152])
def test_whole_row_kernel_with_several_pieces(cols: int) -> None:
    """K that is not a power of two is held as up to three pieces in registers (the last one masked)."""
    tile = fp8_tile_config(Fp8Granularity.PER_ROW, 5, cols)
    assert tile.block_k >= cols, "the launcher should hold these rows whole"
    x = make_input((5, cols), torch.bfloat16, seed=8)
    x[3, cols - 1] = 1000.0  # the row's amax sits in the last, partly masked piece
    _assert_kernel_matches_reference(x, Fp8Granularity.PER_ROW, "software")


@pytest.mark.parametrize(("rows", "cols"), [(1, 9000), (1, 16400), (3, 28672), (16, 17000), (2, 40000)])
def test_few_long_rows_share_each_row_between_programs(rows: int, cols: int) -> None:
    """Decode-sized inputs (up to 16 rows of more than 8192 columns) take the kernel whose programs each find
    the whole row's amax (in one read up to 32768 columns, in two beyond) and quantize one chunk of it: the
    reference's bytes and scales, with the amax in the last, partly masked chunk of one row and in the first
    chunk of another; batches count as rows."""
    from mxrun.kernels.fp8_quantize import _fp8_launch_plan

    x = make_input((rows, cols), torch.bfloat16, seed=9)
    x[-1, cols - 1] = 900.0
    x[0, 0] = -700.0
    plan = _fp8_launch_plan(tuple(x.shape), tuple(x.stride()), x.dtype, "per_row", "software", None)
    assert plan.kernel_name == "row_chunks"
    _assert_kernel_matches_reference(x, Fp8Granularity.PER_ROW, "software")
    batched = make_input((2, 8, cols), torch.bfloat16, seed=10)  # 16 rows in two batches
    _assert_kernel_matches_reference(batched, Fp8Granularity.PER_ROW, "software")
    many = make_input((17, cols), torch.bfloat16, seed=11)  # one row too many: whole rows, or two passes
    plan = _fp8_launch_plan(tuple(many.shape), tuple(many.stride()), many.dtype, "per_row", "software", None)
    assert plan.kernel_name == ("long_row" if cols > 16384 else "row_pieces")


@pytest.mark.parametrize(("rows", "cols"), [(37, 300), (8, 128), (130, 1024)])
def test_group_scales_k_major(rows: int, cols: int) -> None:
    """1x128 group scales written K-major (``scale_k_major``): the reference's values as a ``[M, groups]``
    view with unit stride along M and 16-byte aligned steps, the codes unchanged."""
    x = make_input((rows, cols), torch.bfloat16, seed=13)
    expected = quantize_fp8_reference(x, Fp8Granularity.GROUP_1X128)
    actual = quantize_fp8_triton(x.to(KERNEL_DEVICE), Fp8Granularity.GROUP_1X128, scale_k_major=True)
    assert actual.scale.shape == expected.scale.shape and actual.scale.stride(0) == 1
    assert actual.scale.stride(1) % 4 == 0
    assert_same_fp32(actual.scale, expected.scale)
    assert torch.equal(bits(actual.data), bits(expected.data))
    with pytest.raises(QuantizeInputError, match="scale_k_major"):
        quantize_fp8_triton(x.to(KERNEL_DEVICE), Fp8Granularity.PER_ROW, scale_k_major=True)


@pytest.mark.parametrize("shape", [(1, 300), (1, 1, 4096), (1, 20000)])
def test_per_tensor_of_one_row_is_one_per_row_launch(shape: tuple[int, ...], monkeypatch) -> None:
    """A single row's per-tensor scale is its per-row scale by definition: the per-row kernel gives the
    reference's bytes and 0-dim scale in one launch (the amax kernel, which would start the two-launch path,
    must not run), the amax in the row's last element."""
    from mxrun.kernels import fp8_quantize

    class _NoLaunch:
        def __getitem__(self, grid):
            raise AssertionError("the per-tensor amax kernel ran for a single row")

    x = make_input(shape, torch.bfloat16, seed=12)
    x[..., -1] = -700.0
    monkeypatch.setattr(fp8_quantize, "_amax_bits_kernel", _NoLaunch())
    _assert_kernel_matches_reference(x, Fp8Granularity.PER_TENSOR, "software")
    monkeypatch.setattr(fp8_quantize, "TENSOR_ONE_ROW_AS_ROW", 0)  # the switch really is what kept it away
    with pytest.raises(AssertionError, match="amax kernel ran"):
        quantize_fp8_triton(x.to(KERNEL_DEVICE), Fp8Granularity.PER_TENSOR)


@gpu_only
def test_long_rows_on_gpu_default_config() -> None:
    x = make_input((33, 40000), torch.bfloat16, seed=7).cuda()
    for cast in KERNEL_CASTS:
        _assert_kernel_matches_reference(x, Fp8Granularity.PER_ROW, cast)


@settings(max_examples=20, deadline=None)
@given(
    rows=st.integers(1, 140),
    cols=st.integers(1, 300),
    seed=st.integers(0, 2**16),
    dtype=st.sampled_from(DTYPES),
    granularity=st.sampled_from(GRANULARITIES),
)
def test_kernel_matches_reference_property(rows: int, cols: int, seed: int, dtype, granularity) -> None:
    x = make_input((rows, cols), dtype, seed, specials=seed % 2 == 0)
    _assert_kernel_matches_reference(x, granularity, "software")


IMPLEMENTATIONS = ["torch", "triton"]


def _quantize(x: torch.Tensor, granularity, implementation: str):
    if implementation == "torch":
        return quantize_fp8_reference(x, granularity)
    return quantize_fp8_triton(x.to(KERNEL_DEVICE), granularity)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_hand_worked_per_row_scales(implementation: str) -> None:
    x = torch.zeros(5, 64)
    x[0, :3] = torch.tensor([448.0, -224.0, 1.0])  # amax 448 -> scale 1: elements are their own codes
    x[1, :2] = torch.tensor([896.0, -3.0])  # amax 896 -> scale 2: 448 -> 0x7E, -1.5 -> 0xBC
    x[2, 7] = -0.0  # all zero -> scale 1, zeros keep their sign
    x[3, :2] = torch.tensor([float("nan"), 1.0])  # NaN -> NaN scale, every element NaN
    x[4, :2] = torch.tensor([float("inf"), 2.0])  # Inf -> Inf scale; Inf/Inf is NaN, finite -> 0
    data, scale = _quantize(x, "per_row", implementation)
    scale = scale.cpu()
    assert scale[:3, 0].tolist() == [1.0, 2.0, 1.0]
    assert torch.isnan(scale[3, 0]) and torch.isinf(scale[4, 0])
    codes = bits(data)
    assert codes[0, :4].tolist() == [0x7E, 0xF6, 0x38, 0x00]
    assert codes[1, :2].tolist() == [0x7E, 0xBC]
    assert codes[2, 7] == 0x80 and codes[2].sum() == 0x80
    assert codes[3].eq(0x7F).all()
    assert codes[4, :3].tolist() == [0x7F, 0x00, 0x00]


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_block_and_group_scales_cover_only_their_elements(implementation: str) -> None:
    x = torch.zeros(130, 260)
    x[0, 0], x[127, 127], x[128, 0], x[0, 128], x[129, 259] = 448.0, 896.0, 44.8, 4.48, 0.448
    _, block_scale = _quantize(x, "block_128x128", implementation)
    assert block_scale.shape == (2, 3)
    assert block_scale.cpu().flatten().tolist() == pytest.approx([2.0, 0.01, 1.0, 0.1, 1.0, 0.001], rel=1e-7)
    _, group_scale = _quantize(x, "group_1x128", implementation)
    assert group_scale.shape == (130, 3)
    assert group_scale.cpu()[0].tolist() == pytest.approx([1.0, 0.01, 1.0], rel=1e-7)
    assert group_scale.cpu()[129].tolist() == pytest.approx([1.0, 1.0, 0.001], rel=1e-7)


@settings(max_examples=200, deadline=None)
@given(amax=st.floats(min_value=0, width=32, allow_nan=False, allow_infinity=False))
def test_scale_is_amax_over_448_in_fp32(amax: float) -> None:
    x = torch.tensor([[amax, -amax / 2]], dtype=torch.float32)
    _, scale = quantize_fp8_reference(x, "per_tensor")
    expected = np.float32(amax) / np.float32(448.0)
    if expected < np.float32(2.0**-126) and float(expected) * 448 < float(np.float32(amax)):
        expected = np.nextafter(expected, np.float32(np.inf))  # a subnormal quotient that rounded down
    expected = np.float32(1.0) if expected == 0 else expected
    assert scale.numpy().view(np.int32) == np.array(expected, dtype=np.float32).view(np.int32)


@pytest.mark.parametrize("amax", [3.4121617606309296e-42, 1e-44, 5e-36, 2.0**-149, 3e-43])
@pytest.mark.parametrize("implementation", ["torch", "triton"])
def test_subnormal_scales_never_clip(amax: float, implementation: str) -> None:
    """Blocks whose amax / 448 is an fp32 subnormal: the scale has few significant bits, and rounding it to
    nearest could put the largest elements above 448 (3.41e-42 did: a ninth of it clipped, found by the
    round-trip property test). The scale is rounded up there, so the largest element maps to <= 448 and comes
    back within half an E4M3 step; the kernel gives the same bits."""
    x = torch.tensor([[amax, -amax / 3, amax / 7, 0.0] * 32], dtype=torch.float32)
    for granularity in GRANULARITIES:
        q = quantize_fp8_reference(x, granularity)
        scale = float(q.scale.reshape(-1)[0])
        assert scale > 0 and float(np.float32(amax)) / scale <= 448.0, (granularity, scale)
        back = dequantize_fp8(q.data, q.scale, granularity).double()
        top = float(np.float32(amax))
        assert abs(back[0, 0].item() - top) <= e4m3_half_ulp(top / scale) * scale + 2.0**-149
        if implementation == "triton":
            out = quantize_fp8_triton(x.to(KERNEL_DEVICE), granularity)
            assert torch.equal(bits(out.data), bits(q.data))
            assert torch.equal(out.scale.cpu().view(torch.int32), q.scale.view(torch.int32))


_finite_fp32 = st.floats(width=32, allow_nan=False, allow_infinity=False)


@settings(max_examples=200, deadline=None)
@given(values=st.lists(_finite_fp32, min_size=256, max_size=256), granularity=st.sampled_from(GRANULARITIES))
def test_round_trip_error_within_half_ulp_of_scaled_grid(values: list[float], granularity) -> None:
    """Each element is within half the E4M3 spacing at |x| / scale, times the scale. Slack for the two fp32
    roundings (x / scale, then q * scale): 2^-23 of |x|, and subnormal fp32 steps."""
    x = torch.tensor(values, dtype=torch.float32).reshape(2, 128)
    data, scale = quantize_fp8_reference(x, granularity)
    restored = dequantize_fp8(data, scale, granularity).double()
    per_element_scale = expand_fp8_scale(scale, x.shape, granularity).double()
    for original, back, s in zip(
        x.double().flatten().tolist(),
        restored.flatten().tolist(),
        per_element_scale.flatten().tolist(),
        strict=True,
    ):
        bound = e4m3_half_ulp(min(abs(original) / s, 448.0)) * s + abs(original) * 2.0**-23 + 2.0**-148
        assert abs(original - back) <= bound, (original, back, s)


@pytest.mark.parametrize("device", REFERENCE_DEVICES)
@pytest.mark.parametrize("granularity", GRANULARITIES, ids=lambda g: g.value)
def test_reference_same_bytes_on_every_device(device: str, granularity) -> None:
    x = make_input((130, 300), torch.bfloat16, seed=8)
    on_cpu = quantize_fp8_reference(x, granularity)
    on_device = quantize_fp8_reference(x.to(device), granularity)
    assert torch.equal(bits(on_device.data), bits(on_cpu.data))
    assert_same_fp32(on_device.scale, on_cpu.scale)


@pytest.mark.parametrize("backend", ["auto", "torch", "triton"])
def test_named_dispatchers_give_reference_bytes(backend: str) -> None:
    x = make_input((3, 140, 256), torch.bfloat16, seed=9, specials=False)
    device = KERNEL_DEVICE if backend == "triton" else "cpu"
    named = {
        Fp8Granularity.PER_TENSOR: quantize_fp8_per_tensor,
        Fp8Granularity.PER_ROW: quantize_fp8_per_channel,
        Fp8Granularity.BLOCK_128X128: quantize_fp8_block128,
        Fp8Granularity.GROUP_1X128: quantize_fp8_group128,
    }
    for granularity, fn in named.items():
        expected = quantize_fp8_reference(x, granularity)
        for out in (
            fn(x.to(device), backend=backend),
            quantize_fp8(x.to(device), granularity.value, backend),
        ):
            assert torch.equal(bits(out.data), bits(expected.data))
            assert_same_fp32(out.scale, expected.scale)
    per_token = quantize_fp8_per_token(x.to(device), backend)
    assert torch.equal(bits(per_token.data), bits(quantize_fp8_reference(x, Fp8Granularity.PER_ROW).data))


def test_dequantize_shapes() -> None:
    x = make_input((2, 130, 260), torch.float16, seed=11, specials=False)
    for granularity in GRANULARITIES:
        data, scale = quantize_fp8_reference(x, granularity)
        restored = dequantize_fp8(data, scale, granularity, out_dtype=torch.bfloat16)
        assert restored.shape == x.shape and restored.dtype == torch.bfloat16


@pytest.mark.parametrize(
    ("x", "message"),
    [
        (torch.zeros(64), "2-D"),
        (torch.zeros(1, 2, 3, 4), "2-D"),
        (torch.zeros(4, 4, dtype=torch.int8), "dtype"),
    ],
)
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_invalid_inputs_are_clear_errors(x: torch.Tensor, message: str, implementation: str) -> None:
    fn = quantize_fp8_reference if implementation == "torch" else quantize_fp8_triton
    with pytest.raises(QuantizeInputError, match=message):
        fn(x.to(KERNEL_DEVICE if implementation == "triton" else "cpu"), "per_row")


@pytest.mark.parametrize(
    ("granularity", "config"),
    [
        (Fp8Granularity.BLOCK_128X128, TileConfig(128, 256, 4)),
        (Fp8Granularity.BLOCK_128X128, TileConfig(128, 512, 4)),
        (Fp8Granularity.GROUP_1X128, TileConfig(2, 1024, 4)),
        (Fp8Granularity.PER_TENSOR, TileConfig(4, 64, 2)),
    ],
    ids=str,
)
def test_kernel_matches_reference_other_tiles(granularity, config: TileConfig) -> None:
    x = make_input((2, 131, 300), torch.bfloat16, seed=12)
    _assert_kernel_matches_reference(x, granularity, "software", config)


@pytest.mark.parametrize("partials_max", [0, 1, 1024])
@pytest.mark.parametrize("peak", ["first", "last", "middle"])
def test_per_tensor_amax_slots_and_atomic(monkeypatch, partials_max: int, peak: str) -> None:
    """Per-tensor quantize finds the same amax whether each amax program stores its tile's maximum in its
    own slot (every quantize program reduces them all) or takes the atomic max into a zeroed word (0, or
    more programs than slots: 1), with the largest magnitude in the first, the last or a middle program's
    tile of a stack whose row slicing keeps its two matrices apart in the grid (a slot indexed wrongly along
    any grid axis would miss it or read garbage)."""
    from mxrun.kernels import fp8_quantize

    monkeypatch.setattr(fp8_quantize, "TENSOR_AMAX_PARTIALS_MAX", partials_max)
    g = torch.Generator().manual_seed(13)  # finite values (make_input's NaNs would hide a lost maximum)
    x = torch.randn(2, 133, 300, generator=g).to(torch.bfloat16)[:, 1:132, :]  # rows sliced: two grid batches
    index = {"first": (0, 0, 0), "last": (1, 130, 299), "middle": (1, 64, 150)}[peak]
    x[index] = -5000.0
    _assert_kernel_matches_reference(x, Fp8Granularity.PER_TENSOR, "software", TileConfig(4, 64, 2))
