"""Quantized Linear methods on CPU (the torch reference path): error against the exact Linear for every preset,
on random and on heavy-tailed data, with bounds derived below; a broken scale must break them.

Error bounds (derivation). Let ``u = 2^-4``, half an E4M3 ulp relative to the value (3 mantissa bits: the
spacing of values in [2^e, 2^(e+1)) is 2^(e-3), half of it is 2^(e-4) <= 2^-4 |v|). An element ``v`` of a
group with scale ``s`` (fp32 ``amax / 448`` for FP8; a power of two with ``amax / s <= 448`` for MXFP8
round-up) is stored as ``s * RNE(v / s)`` with ``|v / s| <= 448`` (no clipping), so

    |v_hat - v| <= d(v) := u |v| + 2^-10 s        (the second term covers E4M3 subnormals, spaced 2^-9 s).

For ``y = sum_k w_k x_k`` and its quantized ``y_hat = sum_k w_hat_k x_hat_k`` (weight-only: ``x_hat = x``),

    |y_hat - y| <= sum_k d(w_k) |x_k| + |w_k| d(x_k) + d(w_k) d(x_k)                                 (B)

exactly, plus the fp32 summation error (<= K 2^-24 sum |w_hat x_hat|, bounded with 2^-16 sum|w||x| here
since K <= 256 and the hats are within 13% of the originals) and the final rounding to bf16 / fp16
(<= 2^-8 |y_hat| and 2^-11 |y_hat|). The bias is added in fp32 to both sides, so it cancels. ``B`` is
a worst case: it must hold for every output element, on any data. The scales in ``B`` are recomputed here
from the data with the scale rules (not read back from the layer), so a method that stores a wrong scale fails.

``B`` is loose for random data (it adds |w||x| over K while y grows like sqrt(K)), so a second, statistical
bound checks the typical error: rounding errors are zero-mean with ``E[e^2] <= u^2 / 3`` relative to each
element (uniform within +-half an ulp, at most u relative), independent across elements, so for W8A8
``E||y_hat - y||^2 <= (2 u^2 / 3) sum_{m,n} sum_k w^2 x^2`` (weight-only: ``u^2 / 3``); we assert the
relative Frobenius error is at most 1.3x that (finite-sample slack) plus the output rounding 2^-8. With a scale
off by 1.5x (a wrong rule, a transposed scale), the error is about 0.5 ||y||, far above both bounds.
"""

from __future__ import annotations

import math
import weakref

import pytest
import torch
from torch import nn

from mxrun.engine.methods import (
    METHODS,
    QuantizedLinear,
    UnsupportedSchemeError,
    method_for,
)
from mxrun.engine.schemes import (
    PRESETS,
    ActivationGranularity,
    SchemeFamily,
    WeightGranularity,
    build_scheme,
    preset_scheme,
)
from mxrun.kernels.mx_regroup import regroup_mxfp8_reference
from mxrun.kernels.mxfp8_gemm import mxfp8_linear_reference
from mxrun.kernels.mxfp8_quantize import dequantize_mxfp8
from mxrun.kernels.scaled_gemm import fp8_linear_reference

U = 2.0**-4
PRESET_NAMES = sorted(PRESETS)
K, N = 256, 160  # N = 160: a partial 128-row weight block; K a multiple of 128 (1x128 groups need it)


def _group_scale(t: torch.Tensor, rows: int | None, cols: int | None, mx: bool) -> torch.Tensor:
    """Per-element scale of ``t`` [R, C] for groups of rows x cols (None = all), recomputed from the rules."""
    r, c = t.shape
    rows, cols = rows or r, cols or c
    pad = torch.zeros(math.ceil(r / rows) * rows, math.ceil(c / cols) * cols)
    pad[:r, :c] = t.float().abs()
    tiles = pad.reshape(pad.shape[0] // rows, rows, pad.shape[1] // cols, cols)
    amax = tiles.amax(dim=(1, 3))
    if mx:  # smallest power of two with amax / s <= 448 (round_up); 2^-127 for all-zero blocks
        scale = torch.exp2(torch.ceil(torch.log2(amax / 448.0))).clamp(min=2.0**-127)
    else:
        scale = torch.where(amax == 0, torch.ones_like(amax), amax / 448.0)
    return scale.repeat_interleave(rows, 0).repeat_interleave(cols, 1)[:r, :c]


def _error_allowance(t: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return U * t.float().abs() + 2.0**-10 * scale


def _weight_scale(scheme, w: torch.Tensor) -> torch.Tensor:
    g = scheme.weights.granularity
    if g is WeightGranularity.TENSOR:
        return _group_scale(w, None, None, False)
    if g is WeightGranularity.CHANNEL:
        return _group_scale(w, 1, None, False)
    if g is WeightGranularity.BLOCK:
        return _group_scale(w, 128, 128, False)
    return _group_scale(w, 1, 32, True)


def _activation_scale(scheme, x: torch.Tensor) -> torch.Tensor | None:
    acts = scheme.activations
    if acts is None:
        return None
    g = acts.granularity
    if g is ActivationGranularity.TENSOR:
        return _group_scale(x, None, None, False)
    if g is ActivationGranularity.TOKEN:
        return _group_scale(x, 1, None, False)
    if g is ActivationGranularity.GROUP:
        return _group_scale(x, 1, acts.group_size, False)
    return _group_scale(x, 1, 32, True)


def _bounds(scheme, x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, float]:
    """(elementwise worst-case bound B + summation slack, statistical relative Frobenius bound)."""
    xa, wa = x.float().abs(), w.float().abs()
    dw = _error_allowance(w, _weight_scale(scheme, w))
    x_scale = _activation_scale(scheme, x)
    dx = torch.zeros_like(xa) if x_scale is None else _error_allowance(x, x_scale)
    worst = xa @ dw.T + dx @ wa.T + dx @ dw.T
    worst = worst + 2.0**-16 * (xa @ wa.T)
    operands = 1 if scheme.weight_only else 2
    statistical = 1.3 * math.sqrt(operands * U**2 / 3)
    return worst, statistical


def _data(kind: str, m: int, dtype: torch.dtype, seed: int, n: int = N) -> tuple[torch.Tensor, nn.Linear]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, K, generator=g)
    if kind == "outliers":  # a few input channels 100x larger, as LLM activations have
        channels = torch.randperm(K, generator=g)[:4]
        x[:, channels] *= 100.0
    linear = nn.Linear(K, n, bias=True)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(n, K, generator=g) * 0.05)
        linear.bias.copy_(torch.randn(n, generator=g))
    return x.to(dtype), linear.to(dtype)


def _quantized(scheme_name: str, linear: nn.Linear) -> QuantizedLinear:
    layer = QuantizedLinear.from_linear(
        linear, method_for(preset_scheme(scheme_name)), layer_name="test.proj"
    )
    layer.load_weight(linear.weight.data)
    return layer


def _check_bounds(scheme, x, linear, out) -> tuple[bool, bool]:
    exact = x.float() @ linear.weight.float().T
    worst, statistical = _bounds(scheme, x, linear.weight)
    err = (out.float() - linear.bias.float() - exact).abs()
    out_rounding = (2.0**-8 if out.dtype == torch.bfloat16 else 2.0**-11) * out.float().abs()
    within_worst = bool((err <= worst * (1 + 2.0**-8) + out_rounding + 1e-6).all())
    relative = (err.norm() / exact.norm()).item()
    within_statistical = relative <= statistical + 2.0**-8
    return within_worst, within_statistical


@pytest.mark.parametrize("kind", ["random", "outliers"])
@pytest.mark.parametrize("scheme_name", PRESET_NAMES)
def test_error_within_derived_bounds(scheme_name: str, kind: str) -> None:
    x, linear = _data(kind, 24, torch.bfloat16, seed=PRESET_NAMES.index(scheme_name))
    layer = _quantized(scheme_name, linear)
    out = layer(x)
    assert out.dtype == torch.bfloat16 and out.shape == (24, N)
    within_worst, within_statistical = _check_bounds(preset_scheme(scheme_name), x, linear, out)
    assert within_worst, "an output element exceeds the worst-case bound B"
    assert within_statistical, "the relative error exceeds the statistical bound"


@pytest.mark.parametrize("scheme_name", PRESET_NAMES)
def test_broken_scale_breaks_the_bounds(scheme_name: str) -> None:
    x, linear = _data("random", 24, torch.bfloat16, seed=7)
    layer = _quantized(scheme_name, linear)
    with torch.no_grad():
        if hasattr(layer, "weight_scale_e8m0"):
            layer.weight_scale_e8m0 += 1  # every scale doubled
        else:
            layer.weight_scale.mul_(1.5)
    within_worst, within_statistical = _check_bounds(preset_scheme(scheme_name), x, linear, layer(x))
    assert not within_statistical
    assert not within_worst


@pytest.mark.parametrize("scheme_name", ["fp8-channel", "mxfp8", "fp8-block-weight-only", "fp8-tensor"])
def test_fp16_and_leading_dims(scheme_name: str) -> None:
    x, linear = _data("random", 10, torch.float16, seed=3)
    layer = _quantized(scheme_name, linear)
    out = layer(x.reshape(2, 5, K))
    assert out.dtype == torch.float16 and out.shape == (2, 5, N)
    within_worst, within_statistical = _check_bounds(
        preset_scheme(scheme_name), x, linear, out.reshape(10, N)
    )
    assert within_worst and within_statistical


def test_cpu_forward_is_the_kernel_reference() -> None:
    """The CPU path is exactly the references the Triton kernels are tested against."""
    x, linear = _data("outliers", 5, torch.bfloat16, seed=11)
    channel = _quantized("fp8-channel", linear)
    expected = fp8_linear_reference(x, channel.weight, channel.weight_scale, linear.bias, "token")
    assert torch.equal(channel(x), expected)
    mx = _quantized("mxfp8", linear)
    expected = mxfp8_linear_reference(x, mx.weight, mx.weight_scale_e8m0, linear.bias, "round_up")
    assert torch.equal(mx(x), expected)
    mx_w = _quantized("mxfp8-weight-only", linear)
    expected = mxfp8_linear_reference(x, mx_w.weight, mx_w.weight_scale_e8m0, linear.bias, None)
    assert torch.equal(mx_w(x), expected)


def test_tile_aligned_mxfp8_weight() -> None:
    """``tile_aligned: true``: the layer holds valid MXFP8 whose blocks carry their 128x128 tile's code, with
    exactly the values of regrouping the plain MXFP8 weight; the CPU forward is the MXFP8 reference on it;
    codes that are not tile-aligned are refused with the layer's name."""
    scheme, problems = build_scheme("mx-tiles", {"preset": "mxfp8", "weights": {"tile_aligned": True}})
    assert problems == []
    x, linear = _data("outliers", 6, torch.bfloat16, seed=12)
    with torch.no_grad():  # rows of different magnitudes share tiles, so blocks take a larger exponent
        linear.weight.mul_(torch.logspace(-2, 1, N)[:, None].to(linear.weight.dtype))
    plain = _quantized("mxfp8", linear)
    layer = QuantizedLinear.from_linear(linear, method_for(scheme), layer_name="test.tiles")
    layer.load_weight(linear.weight.data)
    codes = layer.weight_scale_e8m0
    tiles = codes[::128, ::4].repeat_interleave(128, 0)[:N].repeat_interleave(4, 1)
    assert torch.equal(codes, tiles)
    assert not torch.equal(codes, plain.weight_scale_e8m0)  # the data did mix exponents within tiles
    regrouped = regroup_mxfp8_reference(plain.weight, plain.weight_scale_e8m0)
    expected = regrouped.data.float() * regrouped.scale.repeat_interleave(128, 0)[:N].repeat_interleave(
        128, 1
    )
    assert torch.equal(dequantize_mxfp8(layer.weight, codes), expected)
    reference = mxfp8_linear_reference(x, layer.weight, codes, linear.bias, "round_up")
    assert torch.equal(layer(x), reference)
    with torch.no_grad():
        codes[0, 1] -= 1
    with pytest.raises(ValueError, match=r"test\.tiles: .*not tile-aligned"):
        layer.method._tile_scale(layer)


def test_w8a8_quantizes_activations_and_weight_only_does_not() -> None:
    """Weight-only and W8A8 share the weight bytes but differ exactly by the activation rounding."""
    x, linear = _data("random", 6, torch.bfloat16, seed=5)
    w8a8 = _quantized("fp8-channel", linear)
    w8a16 = _quantized("fp8-channel-weight-only", linear)
    assert torch.equal(w8a8.weight.view(torch.uint8), w8a16.weight.view(torch.uint8))
    assert not torch.equal(w8a8(x), w8a16(x))
    dequantized_w = w8a16.weight.float() * w8a16.weight_scale
    expected = (x.float() @ dequantized_w.T + linear.bias.float()).to(torch.bfloat16)
    assert torch.equal(w8a16(x), expected)


# ----------------------------------------------------------------------------------------------------------
# registry and life cycle
# ----------------------------------------------------------------------------------------------------------


def test_registry_covers_every_family_and_weight_only() -> None:
    assert set(METHODS) == {(f, wo) for f in SchemeFamily for wo in (False, True)}
    for name in PRESET_NAMES:
        scheme = preset_scheme(name)
        method = method_for(scheme)
        assert method.family is scheme.family and method.weight_only == scheme.weight_only


@pytest.mark.parametrize(
    ("scheme_name", "buffers"),
    [
        ("fp8-tensor", {"weight": ((N, K), torch.float8_e4m3fn), "weight_scale": ((), torch.float32)}),
        ("fp8-channel", {"weight": ((N, K), torch.float8_e4m3fn), "weight_scale": ((N, 1), torch.float32)}),
        ("fp8-block", {"weight": ((N, K), torch.float8_e4m3fn), "weight_scale": ((2, 2), torch.float32)}),
        (
            "mxfp8",
            {"weight": ((N, K), torch.float8_e4m3fn), "weight_scale_e8m0": ((N, K // 32), torch.uint8)},
        ),
    ],
)
def test_create_weights_layout(scheme_name: str, buffers: dict) -> None:
    layer = QuantizedLinear(K, N, method_for(preset_scheme(scheme_name)), bias=False, dtype=torch.bfloat16)
    got = {name: (tuple(b.shape), b.dtype) for name, b in layer.named_buffers()}
    assert got == buffers
    assert set(layer.state_dict()) == set(buffers)
    assert not layer.weight_loaded


def test_process_weight_keeps_no_reference_to_the_original() -> None:
    _, linear = _data("random", 1, torch.bfloat16, seed=1)
    layer = QuantizedLinear.from_linear(linear, method_for(preset_scheme("mxfp8")), "x")
    weight = linear.weight.data.clone()
    alive = weakref.ref(weight)
    layer.load_weight(weight)
    del weight
    assert alive() is None
    assert layer.weight_loaded


def test_module_casts_keep_quantized_buffers() -> None:
    _, linear = _data("random", 1, torch.bfloat16, seed=2)
    layer = _quantized("fp8-channel", linear)
    layer.half()
    assert layer.weight.dtype == torch.float8_e4m3fn and layer.weight_scale.dtype == torch.float32
    assert layer.bias.dtype == torch.float16 and layer.dtype == torch.float16
    out = layer(torch.randn(3, K, dtype=torch.float16))
    assert out.dtype == torch.float16 and torch.isfinite(out).all()


def test_unsupported_shapes_and_schemes_are_refused_with_the_layer_name() -> None:
    with pytest.raises(UnsupportedSchemeError, match=r"blk\.proj.*in_features % 32"):
        QuantizedLinear(
            48, 8, method_for(preset_scheme("mxfp8")), bias=False, dtype=torch.bfloat16, layer_name="blk.proj"
        )
    scheme, problems = build_scheme(
        "b64", {"preset": "fp8-block", "weights": {"block_size": [64, 64]}, "activations": {"group_size": 64}}
    )
    assert scheme is not None, problems
    with pytest.raises(UnsupportedSchemeError, match="64x64"):
        QuantizedLinear(128, 128, method_for(scheme), bias=False, dtype=torch.bfloat16, layer_name="l")
    with pytest.raises(UnsupportedSchemeError, match="float32"):
        QuantizedLinear(128, 128, method_for(preset_scheme("fp8-channel")), bias=False, dtype=torch.float32)


def test_weight_of_the_wrong_shape_is_refused() -> None:
    layer = QuantizedLinear(
        K, N, method_for(preset_scheme("fp8-tensor")), bias=False, dtype=torch.bfloat16, layer_name="model.x"
    )
    with pytest.raises(ValueError, match=r"model\.x.*does not fit"):
        layer.load_weight(torch.randn(K, N, dtype=torch.bfloat16))


def test_mx_foldable_flag_is_read_once_per_loaded_value(monkeypatch) -> None:
    """Whether an MXFP8 weight allows the folded small-M decode is read off its codes once per loaded value (a
    forward must not sync the host), and again after the scales or the elements change in place."""
    import mxrun.engine.methods as methods

    calls = []
    real = methods.mx_scales_foldable
    monkeypatch.setattr(methods, "mx_scales_foldable", lambda *args: calls.append(1) or real(*args))
    owner = nn.Module()
    codes = torch.full((4, 2), 120, dtype=torch.uint8)
    data = torch.zeros((4, 64), dtype=torch.float8_e4m3fn)
    assert methods.cached_mx_foldable(owner, codes, data) is True
    assert methods.cached_mx_foldable(owner, codes, data) is True
    assert len(calls) == 1
    codes[0, 0] = 200  # an in-place load of another weight: its huge scale cannot be folded
    assert methods.cached_mx_foldable(owner, codes, data) is False
    codes[0, 0] = 120
    data.view(torch.uint8)[1, 3] = 0xFF  # a NaN element: the widening would not keep it NaN
    assert methods.cached_mx_foldable(owner, codes, data) is False
    assert len(calls) == 3
    # fp16 activations ask the fp16 fold's question of the same cached read: codes 113-134, NaN elements allowed
    assert methods.cached_mx_foldable(owner, codes, data, activation_dtype=torch.float16) is True
    codes[0, 0] = 112
    assert methods.cached_mx_foldable(owner, codes, data, activation_dtype=torch.float16) is False
    assert methods.cached_mx_foldable(owner, codes, data, activation_dtype=torch.float32) is False
    assert len(calls) == 4


W8A8_PRESETS = [name for name in PRESET_NAMES if not preset_scheme(name).weight_only]


@pytest.mark.parametrize("scheme_name", W8A8_PRESETS)
def test_min_rows_runs_smaller_calls_weight_only(scheme_name: str) -> None:
    """``activations: {min_rows: 8}``: calls of fewer than 8 rows (leading dimensions flattened) give exactly the
    weight-only preset's output on the same weights (W8A16), calls of 8 or more exactly the W8A8 preset's;
    the weight is quantized once, the same for both."""
    scheme, problems = build_scheme("decode", {"preset": scheme_name, "activations": {"min_rows": 8}})
    assert problems == []
    x, linear = _data("outliers", 8, torch.bfloat16, seed=13)
    layer = QuantizedLinear.from_linear(linear, method_for(scheme), layer_name="test.proj")
    layer.load_weight(linear.weight.data)
    w8a8 = _quantized(scheme_name, linear)
    weight_only = _quantized(f"{scheme_name}-weight-only", linear)
    assert torch.equal(layer.weight, w8a8.weight)
    small = x[:6].reshape(2, 3, K)
    assert torch.equal(layer(small), weight_only(small))
    assert not torch.equal(layer(small), w8a8(small))  # the activations' rounding shows
    assert torch.equal(layer(x), w8a8(x))


@pytest.mark.parametrize("scheme_name", ["mxfp8", "mxfp8-weight-only", "mxfp8-decode"])
def test_box_major_mx_weight_gives_the_row_major_outputs(scheme_name: str, monkeypatch) -> None:
    """``MX_WEIGHT_BOX_MAJOR``: the layer holds its MXFP8 weight in [64, 128] boxes, gives back exactly the
    row-major codes (:meth:`QuantizedLinear.weight_rows`) and the row-major layer's outputs, on the CPU reference
    and, where there is one, the GPU at decode, mid and large row counts."""
    from mxrun.engine import methods
    from mxrun.kernels.box_major import box_major

    if scheme_name == "mxfp8-decode":  # weight-only up to 64 rows, W8A8 above
        scheme, problems = build_scheme("decode", {"preset": "mxfp8", "activations": {"min_rows": 65}})
        assert problems == []
    else:
        scheme = preset_scheme(scheme_name)
    x, linear = _data("outliers", 300, torch.bfloat16, seed=14, n=192)  # 3 x 2 whole boxes
    monkeypatch.setattr(methods, "MX_WEIGHT_BOX_MAJOR", False)
    rows_layer = QuantizedLinear.from_linear(linear, method_for(scheme), layer_name="test.rows")
    rows_layer.load_weight(linear.weight.data)
    monkeypatch.setattr(methods, "MX_WEIGHT_BOX_MAJOR", True)
    layer = QuantizedLinear.from_linear(linear, method_for(scheme), layer_name="test.boxes")
    layer.load_weight(linear.weight.data)
    assert layer.weight_box_major and not rows_layer.weight_box_major
    assert layer.weight.shape == (3 * 2 * 64, 128) and rows_layer.weight.shape == (192, 256)
    assert torch.equal(layer.weight_rows().view(torch.uint8), rows_layer.weight.view(torch.uint8))
    boxed = box_major(rows_layer.weight, 64, 128)
    assert torch.equal(layer.weight.view(torch.uint8), boxed.view(torch.uint8))
    assert torch.equal(layer.weight_scale_e8m0, rows_layer.weight_scale_e8m0)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        layer.to(device)
        rows_layer.to(device)
        for m in (1, 16, 40, 300):
            assert torch.equal(layer(x[:m].to(device)), rows_layer(x[:m].to(device))), (device, m)


def test_box_major_only_where_whole_boxes_cover_the_weight(monkeypatch) -> None:
    """A ragged weight (N = 160: two and a half boxes of 64 rows) stays row-major: boxes would pad it by 20%."""
    from mxrun.engine import methods

    monkeypatch.setattr(methods, "MX_WEIGHT_BOX_MAJOR", True)
    for n, boxed in ((N, False), (128, True)):
        layer = QuantizedLinear.from_linear(
            _data("gaussian", 1, torch.bfloat16, 17, n=n)[1], method_for(preset_scheme("mxfp8"))
        )
        assert layer.weight_box_major is boxed, n
        assert layer.weight.numel() == n * K, n


def test_box_major_is_not_used_for_tile_aligned_mx(monkeypatch) -> None:
    from mxrun.engine import methods

    monkeypatch.setattr(methods, "MX_WEIGHT_BOX_MAJOR", True)
    scheme, _ = build_scheme("mx-tiles", {"preset": "mxfp8", "weights": {"tile_aligned": True}})
    layer = QuantizedLinear.from_linear(_data("gaussian", 1, torch.bfloat16, 15)[1], method_for(scheme))
    assert not layer.weight_box_major and layer.weight.shape == (N, K)
    channel = QuantizedLinear.from_linear(
        _data("gaussian", 1, torch.bfloat16, 15)[1], method_for(preset_scheme("fp8-channel"))
    )
    assert not channel.weight_box_major and channel.weight_rows() is channel.weight


def test_load_weight_rows_refuses_another_shape(monkeypatch) -> None:
    from mxrun.engine import methods

    monkeypatch.setattr(methods, "MX_WEIGHT_BOX_MAJOR", True)
    layer = QuantizedLinear.from_linear(
        _data("gaussian", 1, torch.bfloat16, 16, n=128)[1],
        method_for(preset_scheme("mxfp8")),
        layer_name="test.proj",
    )
    assert layer.weight_box_major
    with pytest.raises(ValueError, match=r"test\.proj: a quantized weight of shape \(3, 4\)"):
        layer.load_weight_rows(torch.zeros(3, 4, dtype=torch.float8_e4m3fn))
