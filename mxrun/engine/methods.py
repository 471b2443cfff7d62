"""Online quantization methods: one class per scheme family, and the quantized Linear they drive.

Every method has the same small life cycle, so that a model can be quantized in place (``apply_plan``) or
while a checkpoint streams in (a shard loader), with the same code:

1. :meth:`QuantMethod.create_weights` registers the layer's quantized buffers, empty, on its device (E4M3
   weight, fp32 scales; for MXFP8 one uint8 E8M0 code per 32 elements of K);
2. :meth:`QuantMethod.process_weight` quantizes the high-precision weight when it arrives and keeps nothing
   of it: the caller drops its reference at once, so at most one bf16 weight is alive at a time;
3. :meth:`QuantMethod.apply` runs the forward: Triton kernels on CUDA, the plain-torch references of
   :mod:`mxrun.kernels.scaled_gemm` / :mod:`mxrun.kernels.mxfp8_gemm` elsewhere (CPU users get the same
   numerics up to fp32 summation order, slower, never a crash).

Methods are keyed by :class:`~mxrun.engine.schemes.SchemeFamily` and whether the scheme is weight-only
(``scheme.activations is None``). This module imports only the scheme values and the kernels, never the recipe
parser, so serving code can use it without jsonschema or RE2.
"""

from __future__ import annotations

import dataclasses
import math
from abc import ABC, abstractmethod
from typing import ClassVar

import torch
from torch import nn

from mxrun.engine.schemes import (
    MX_BLOCK,
    ActivationGranularity,
    Scheme,
    SchemeFamily,
    WeightGranularity,
)
from mxrun.kernels.backend import Backend, resolve_backend
from mxrun.kernels.box_major import (
    MX_BOX_K,
    MX_BOX_N,
    BoxMajorWeight,
    box_major,
    box_major_fits,
    box_major_rows,
)
from mxrun.kernels.e4m3 import encode_e4m3_reference, mx_scales_foldable, mx_scales_foldable_f16
from mxrun.kernels.fp8_quantize import (
    FP8_BLOCK,
    Fp8Granularity,
    fp8_scale_from_amax,
    quantize_fp8,
    quantize_fp8_reference,
)
from mxrun.kernels.mid_m_gemm import MX_MID_M_MAX
from mxrun.kernels.mx_regroup import (
    align_mxfp8,
    aligned_tile_scales,
    per_block_codes,
    reencode_reference,
    tile_codes_reference,
)
from mxrun.kernels.mxfp8_gemm import mxfp8_linear
from mxrun.kernels.mxfp8_quantize import MxScaleRule, quantize_mxfp8, quantize_mxfp8_reference
from mxrun.kernels.scaled_gemm import fp8_block_linear, fp8_linear, fp8_weight_only_linear

ORIGINAL_DTYPES = (torch.bfloat16, torch.float16)


class UnsupportedSchemeError(ValueError):
    """A scheme (or a layer shape under it) that no method here implements; the message names the layer."""


class QuantMethod(ABC):
    """One scheme family's life cycle (see the module docstring). Methods hold the scheme only; the tensors
    live on the :class:`QuantizedLinear` they are given, so one method serves every layer of its scheme."""

    family: ClassVar[SchemeFamily]
    weight_only: ClassVar[bool]

    def __init__(self, scheme: Scheme) -> None:
        self.scheme = scheme
        self._below_min_rows: QuantMethod | None = None

    def for_rows(self, rows: int) -> QuantMethod:
        """The method that serves a call of ``rows`` rows: this one, or below the scheme's
        ``activations.min_rows`` its weight-only twin (W8A16), which reads the same buffers: the W8A8 and
        weight-only methods of a family hold the weight alike and differ only in their forward."""
        acts = self.scheme.activations
        if acts is None or acts.quantizes(rows):
            return self
        if self._below_min_rows is None:
            weight_only = dataclasses.replace(self.scheme, activations=None)
            self._below_min_rows = METHODS[(self.family, True)](weight_only)
        return self._below_min_rows

    def check(self, layer_name: str, out_features: int, in_features: int) -> None:
        """Raise :class:`UnsupportedSchemeError` if this method cannot serve a weight of this shape."""
        return None

    @abstractmethod
    def create_weights(self, layer: QuantizedLinear) -> None:
        """Register the layer's empty quantized buffers (shape and dtype fixed, contents undefined)."""

    @abstractmethod
    def process_weight(self, layer: QuantizedLinear, weight: torch.Tensor) -> None:
        """Quantize ``weight`` ``[N, K]`` into the layer's buffers (moved to the layer's device first)."""

    @abstractmethod
    def apply(self, layer: QuantizedLinear, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """``x`` ``[M, K]`` (bf16/fp16) -> ``[M, N]`` in x's dtype."""


def _weight_on(layer: QuantizedLinear, weight: torch.Tensor) -> torch.Tensor:
    if tuple(weight.shape) != (layer.out_features, layer.in_features):
        raise ValueError(
            f"{layer.layer_name}: weight of shape {tuple(weight.shape)} does not fit a Linear "
            f"[{layer.out_features}, {layer.in_features}]"
        )
    if not weight.dtype.is_floating_point or weight.element_size() < 2:
        raise ValueError(
            f"{layer.layer_name}: the weight must be fp32/bf16/fp16 to quantize, got {weight.dtype}"
        )
    return weight.detach().to(layer.weight.device)


# ------------------------------------------------------------------------------- weight quantization, sliced

SLICE_ELEMENTS = 1 << 12
"""Elements of a weight the CPU path quantizes at a time (at least one row; at least one 128x128 block, 16,384
elements, for block scales).

The plain-torch quantizers make fp32/int32 temporaries of about 30 bytes per element of their input, so a
whole weight quantized at once held about 30x its element count in scratch next to the model being loaded
(1.3-1.6x the final model for the bundled default). In slices the scratch stays near 120 KB (0.5 MB for
block scales) whatever the weight's size, and the quantized bytes go straight into the layer's buffers, so
no full-size quantized copy is made either. Measured on the bundled default (mxfp8, 2-core CPU): the load
peaked at 1.07-1.13x the final model with 4,096, 1.06-1.29x with 16,384, 1.28-1.63x unsliced."""


def quantize_fp8_into(
    weight: torch.Tensor, granularity: Fp8Granularity, data: torch.Tensor, scale: torch.Tensor
) -> None:
    """FP8-quantize ``weight`` ``[..., N, K]`` into ``data`` (E4M3, same shape) and ``scale`` (fp32, as many
    elements as :func:`~mxrun.kernels.fp8_quantize.quantize_fp8` gives; its shape may differ, e.g. ``[N, 1]``
    or ``[E, 1, 1]``): the bytes of ``quantize_fp8(weight, granularity)`` exactly.

    On CUDA the Triton kernel quantizes the whole weight (its scratch is its output). Elsewhere the weight
    goes through the torch reference slice by slice (:data:`SLICE_ELEMENTS`), cut where the format lets the
    slices be quantized independently with the reference's own arithmetic: whole rows for per-row scales,
    whole 128x128 blocks (row and column offsets multiples of 128, per matrix of a stack) for block scales,
    and for a per-tensor scale the global amax first (max and min reductions, no temporary), then any rows.
    """
    if resolve_backend(Backend.AUTO, weight) is Backend.TRITON:
        quantized = quantize_fp8(weight, granularity)
        data.copy_(quantized.data)
        scale.copy_(quantized.scale.reshape(scale.shape))
        return
    granularity = Fp8Granularity(granularity)
    k = weight.shape[-1]
    if granularity is Fp8Granularity.BLOCK_128X128:
        n = weight.shape[-2]
        matrices = weight.reshape(-1, n, k)
        data_blocks = data.view(-1, n, k)
        scale_blocks = scale.view(matrices.shape[0], -(-n // FP8_BLOCK), -(-k // FP8_BLOCK))
        cols = min(
            _round_up(k, FP8_BLOCK), max(FP8_BLOCK, SLICE_ELEMENTS // FP8_BLOCK // FP8_BLOCK * FP8_BLOCK)
        )
        rows = max(FP8_BLOCK, SLICE_ELEMENTS // cols // FP8_BLOCK * FP8_BLOCK)
        for matrix, matrix_data, matrix_scale in zip(matrices, data_blocks, scale_blocks, strict=True):
            for r in range(0, n, rows):
                for c in range(0, k, cols):
                    piece = quantize_fp8_reference(matrix[r : r + rows, c : c + cols], granularity)
                    matrix_data[r : r + rows, c : c + cols].copy_(piece.data)
                    rb, cb = r // FP8_BLOCK, c // FP8_BLOCK
                    matrix_scale[rb : rb + piece.scale.shape[0], cb : cb + piece.scale.shape[1]].copy_(
                        piece.scale
                    )
        return
    rows_of = weight.reshape(-1, k)
    data_rows = data.view(-1, k)
    step = max(1, SLICE_ELEMENTS // max(k, 1))
    if granularity is Fp8Granularity.PER_ROW:
        scale_rows = scale.view(-1, 1)
        for r in range(0, rows_of.shape[0], step):
            piece = quantize_fp8_reference(rows_of[r : r + step], granularity)
            data_rows[r : r + step].copy_(piece.data)
            scale_rows[r : r + step].copy_(piece.scale)
        return
    if granularity is not Fp8Granularity.PER_TENSOR:
        raise ValueError(f"quantize_fp8_into: {granularity.value} is not a weight granularity")
    # The reference's amax of |x.float()|: |max| and |min| of the weight are its largest magnitudes (widening
    # to fp32 is exact), and NaN propagates through both reductions as it does through the reference's.
    amax = torch.maximum(weight.amax().float().abs(), weight.amin().float().abs())
    tensor_scale = fp8_scale_from_amax(amax)
    for r in range(0, rows_of.shape[0], step):
        data_rows[r : r + step].copy_(encode_e4m3_reference(rows_of[r : r + step].float() / tensor_scale))
    scale.copy_(tensor_scale.reshape(scale.shape))


def quantize_mxfp8_into(
    weight: torch.Tensor, rule: MxScaleRule, data: torch.Tensor, scale_e8m0: torch.Tensor
) -> None:
    """MXFP8-quantize ``weight`` ``[..., N, K]`` into ``data`` (E4M3) and ``scale_e8m0`` (uint8 ``[..., N,
    K/32]``): the bytes of :func:`~mxrun.kernels.mxfp8_quantize.quantize_mxfp8` exactly. Triton on CUDA;
    elsewhere the torch reference on slices of whole rows (each 1x32 block is its own), see
    :func:`quantize_fp8_into`."""
    if resolve_backend(Backend.AUTO, weight) is Backend.TRITON:
        quantized = quantize_mxfp8(weight, rule)
        data.copy_(quantized.data)
        scale_e8m0.copy_(quantized.scale_e8m0.view(torch.uint8).reshape(scale_e8m0.shape))
        return
    k = weight.shape[-1]
    rows_of = weight.reshape(-1, k)
    data_rows = data.view(-1, k)
    scale_rows = scale_e8m0.view(torch.uint8).view(rows_of.shape[0], -1)
    step = max(1, SLICE_ELEMENTS // max(k, 1))
    for r in range(0, rows_of.shape[0], step):
        piece = quantize_mxfp8_reference(rows_of[r : r + step], rule)
        data_rows[r : r + step].copy_(piece.data)
        scale_rows[r : r + step].copy_(piece.scale_e8m0.view(torch.uint8))


def align_mxfp8_into(data: torch.Tensor, scale_e8m0: torch.Tensor) -> None:
    """Re-express an MXFP8 weight ``[N, K]`` in place with one E8M0 code per 128x128 tile
    (:func:`~mxrun.kernels.mx_regroup.align_mxfp8`: the same bytes). Triton on CUDA; on CPU, per 128-row strip,
    the strip's tile codes first, then the elements re-encoded a few rows at a time, so that the reference's
    temporaries stay as small as :data:`SLICE_ELEMENTS` makes them in :func:`quantize_fp8_into`."""
    if resolve_backend(Backend.AUTO, data) is Backend.TRITON:
        aligned = align_mxfp8(data, scale_e8m0)
        data.copy_(aligned.data)
        scale_e8m0.copy_(aligned.scale_e8m0)
        return
    n, k = data.shape
    step = max(1, SLICE_ELEMENTS // max(k, 1))
    for r0 in range(0, n, 128):
        r1 = min(n, r0 + 128)
        strip_codes = scale_e8m0[r0:r1]
        target = per_block_codes(tile_codes_reference(strip_codes), r1 - r0, k)
        for r in range(r0, r1, step):
            rows = slice(r, min(r1, r + step))
            data[rows].copy_(
                reencode_reference(data[rows], scale_e8m0[rows], target[r - r0 : rows.stop - r0])
            )
        strip_codes.copy_(target)


def cached_tile_scales(owner: nn.Module, codes: torch.Tensor, n: int, k: int, name: str) -> torch.Tensor:
    """fp32 tile scales of tile-aligned MXFP8 codes held by ``owner``
    (:func:`~mxrun.kernels.mx_regroup.aligned_tile_scales`), read off once per loaded value of the codes (the
    key follows in-place loads and moves) so that forwards do not sync the host; ``name`` (the layer, or the
    layer and its stack) labels the error for codes that are not tile-aligned."""
    cache = owner.__dict__.setdefault("_mx_tile_scales", {})
    key = (codes._version, codes.data_ptr(), codes.device)
    hit = cache.get(name)
    if hit is None or hit[0] != key:
        try:
            hit = cache[name] = (key, aligned_tile_scales(codes, n, k))
        except ValueError as error:
            raise ValueError(f"{name}: {error}") from error
    return hit[1]


def cached_mx_foldable(
    owner: nn.Module,
    codes: torch.Tensor,
    data: torch.Tensor,
    name: str = "weight",
    activation_dtype: torch.dtype = torch.bfloat16,
) -> bool:
    """Whether ``owner``'s MXFP8 weight ``name`` (E8M0 ``codes``, E4M3 ``data``) lets the small-M kernel fold its
    powers of two for activations of ``activation_dtype``: :func:`~mxrun.kernels.e4m3.mx_scales_foldable`
    (bf16) or :func:`~mxrun.kernels.e4m3.mx_scales_foldable_f16` (fp16). Both are read off once per loaded
    value of the tensors (keyed as :func:`cached_tile_scales`), so that forwards do not sync the host."""
    cache = owner.__dict__.setdefault("_mx_foldable", {})
    key = tuple((t._version, t.data_ptr(), t.device) for t in (codes, data))
    hit = cache.get(name)
    if hit is None or hit[0] != key:
        by_dtype = {
            torch.bfloat16: mx_scales_foldable(codes, data),
            torch.float16: mx_scales_foldable_f16(codes),
        }
        hit = cache[name] = (key, by_dtype)
    return hit[1].get(activation_dtype, False)


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


class _Fp8Method(QuantMethod):
    """FP8 E4M3 weights with fp32 scales; ``weight_granularity`` picks the scale layout."""

    weight_granularity: ClassVar[Fp8Granularity]

    def _scale_shape(self, n: int, k: int) -> tuple[int, ...]:
        if self.weight_granularity is Fp8Granularity.PER_TENSOR:
            return ()
        if self.weight_granularity is Fp8Granularity.PER_ROW:
            return (n, 1)
        return (math.ceil(n / FP8_BLOCK), math.ceil(k / FP8_BLOCK))

    def create_weights(self, layer: QuantizedLinear) -> None:
        n, k = layer.out_features, layer.in_features
        layer.register_buffer("weight", torch.empty((n, k), dtype=torch.float8_e4m3fn, device=layer.device))
        layer.register_buffer(
            "weight_scale", torch.empty(self._scale_shape(n, k), dtype=torch.float32, device=layer.device)
        )

    def process_weight(self, layer: QuantizedLinear, weight: torch.Tensor) -> None:
        quantize_fp8_into(
            _weight_on(layer, weight), self.weight_granularity, layer.weight, layer.weight_scale
        )


class Fp8TensorMethod(_Fp8Method):
    """FP8 per-tensor weight, dynamic per-tensor FP8 activations (W8A8)."""

    family = SchemeFamily.FP8_TENSOR
    weight_only = False
    weight_granularity = Fp8Granularity.PER_TENSOR

    def apply(self, layer: QuantizedLinear, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        granularity = self.scheme.activations.granularity if self.scheme.activations else None
        activation = "token" if granularity is ActivationGranularity.TOKEN else "tensor"
        return fp8_linear(x, layer.weight, layer.weight_scale, bias, activation)


class Fp8ChannelMethod(_Fp8Method):
    """FP8 per-output-channel weight, dynamic per-token (or per-tensor) FP8 activations (W8A8)."""

    family = SchemeFamily.FP8_CHANNEL
    weight_only = False
    weight_granularity = Fp8Granularity.PER_ROW

    def apply(self, layer: QuantizedLinear, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        granularity = self.scheme.activations.granularity if self.scheme.activations else None
        activation = "tensor" if granularity is ActivationGranularity.TENSOR else "token"
        return fp8_linear(x, layer.weight, layer.weight_scale, bias, activation)


class Fp8BlockMethod(_Fp8Method):
    """FP8 128x128 weight blocks, dynamic 1x128 FP8 activation groups (W8A8)."""

    family = SchemeFamily.FP8_BLOCK
    weight_only = False
    weight_granularity = Fp8Granularity.BLOCK_128X128

    def check(self, layer_name: str, out_features: int, in_features: int) -> None:
        _check_block_scheme(self.scheme, layer_name)
        if in_features % FP8_BLOCK:
            raise UnsupportedSchemeError(
                f"{layer_name}: 1x128 activation groups need in_features % 128 == 0, got {in_features}"
            )

    def apply(self, layer: QuantizedLinear, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return fp8_block_linear(x, layer.weight, layer.weight_scale, bias)


def _check_block_scheme(scheme: Scheme, layer_name: str) -> None:
    block = scheme.weights.block_size or (FP8_BLOCK, FP8_BLOCK)
    if tuple(block) != (FP8_BLOCK, FP8_BLOCK):
        raise UnsupportedSchemeError(
            f"{layer_name}: scheme {scheme.name!r} asks for {block[0]}x{block[1]} weight blocks; the kernels "
            f"implement 128x128 only (hint: use the fp8-block preset's block_size)"
        )
    acts = scheme.activations
    if acts is not None and (acts.group_size or FP8_BLOCK) != FP8_BLOCK:
        raise UnsupportedSchemeError(
            f"{layer_name}: activation groups of {acts.group_size}; only 128 is implemented"
        )


class _Fp8WeightOnlyMethod(_Fp8Method):
    """FP8 weight (granularity of the subclass), activations stay bf16/fp16 (W8A16)."""

    weight_only = True

    def apply(self, layer: QuantizedLinear, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return fp8_weight_only_linear(x, layer.weight, layer.weight_scale, self.weight_granularity, bias)


class Fp8TensorWeightOnlyMethod(_Fp8WeightOnlyMethod):
    family = SchemeFamily.FP8_TENSOR
    weight_granularity = Fp8Granularity.PER_TENSOR


class Fp8ChannelWeightOnlyMethod(_Fp8WeightOnlyMethod):
    family = SchemeFamily.FP8_CHANNEL
    weight_granularity = Fp8Granularity.PER_ROW


class Fp8BlockWeightOnlyMethod(_Fp8WeightOnlyMethod):
    family = SchemeFamily.FP8_BLOCK
    weight_granularity = Fp8Granularity.BLOCK_128X128

    def check(self, layer_name: str, out_features: int, in_features: int) -> None:
        _check_block_scheme(self.scheme, layer_name)


MX_WEIGHT_BOX_MAJOR = True
"""Store MXFP8 weights box-major (:mod:`mxrun.kernels.box_major`: ``[64, 128]`` boxes, each one run of memory)
instead of row-major ``[N, K]``, where whole boxes cover the weight
(:func:`~mxrun.kernels.box_major.box_major_fits`: no padding, so no extra bytes; every Llama shape) and it is not
stored tile-aligned. The split-K and mid-M kernels read those boxes faster, and every other MXFP8 path reads them
too (the per-call regrouping and the cuBLAS decode natively, the forced ``"fp8"`` / ``"dequant"`` kernels from a
row-major copy). H100, box-major beside row-major in one run: at M = 1 and 16 (``benchmarks/bench_linear.py
--graph [--cold-weights] --rep-ms 20 --ms 1 16 --columns ... mxfp8 mxfp8:rows ...``,
``results/linear-h100-small-m-s27-boxes-{warm,cold}.md``) W8A8 x0.962 the time warm and x0.958 cold, faster in 14
of 14 each, cases at 1.7x of bf16 5 -> 9 warm and 4 -> 8 cold; at 64-16384 rows (``--graph --ms 64 256 1024 4096
16384 --columns mxfp8 mxfp8:boxes mxfp8-wo mxfp8-wo:boxes``, ``results/linear-h100-boxes-m64-16384.md``, the
layout then off) x0.964 the time at 64 rows and x0.991-1.003 at each row count from 256 (geometric means over the
seven shapes; within the run's spread), MXFP8 W8A8 at M >= 1024 1.05-1.54x of bf16 box-major (21 of 21 at 1.0x).
The layout is fixed when the layer is made (:attr:`QuantizedLinear.weight_box_major`); exports and reloads are
row-major either way."""


class MxFp8Method(QuantMethod):
    """MXFP8 weight (E4M3 + E8M0 per 32 along K) with MXFP8 activations (W8A8), or bf16/fp16 ones (W8A16)."""

    family = SchemeFamily.MXFP8
    weight_only = False

    @property
    def weight_rule(self) -> MxScaleRule:
        return MxScaleRule((self.scheme.weights.scale_rule or MxScaleRule.ROUND_UP).value)

    @property
    def activation_rule(self) -> MxScaleRule | None:
        acts = self.scheme.activations
        if acts is None:
            return None
        return MxScaleRule((acts.scale_rule or MxScaleRule.ROUND_UP).value)

    def check(self, layer_name: str, out_features: int, in_features: int) -> None:
        if in_features % MX_BLOCK:
            raise UnsupportedSchemeError(
                f"{layer_name}: MXFP8 needs in_features % 32 == 0, got {in_features}"
            )

    def create_weights(self, layer: QuantizedLinear) -> None:
        n, k = layer.out_features, layer.in_features
        layer.weight_box_major = MX_WEIGHT_BOX_MAJOR and not self.tile_aligned and box_major_fits(n, k)
        shape = (box_major_rows(n, k, MX_BOX_N, MX_BOX_K), MX_BOX_K) if layer.weight_box_major else (n, k)
        layer.register_buffer("weight", torch.empty(shape, dtype=torch.float8_e4m3fn, device=layer.device))
        layer.register_buffer(
            "weight_scale_e8m0", torch.empty((n, k // MX_BLOCK), dtype=torch.uint8, device=layer.device)
        )

    @property
    def tile_aligned(self) -> bool:
        """The recipe's ``tile_aligned: true``: each 128x128 weight tile held at one E8M0 scale."""
        return bool(self.scheme.weights.tile_aligned)

    def process_weight(self, layer: QuantizedLinear, weight: torch.Tensor) -> None:
        n, k = layer.out_features, layer.in_features
        box_major_now = layer.weight_box_major  # quantized row-major first, then stored in boxes
        rows = (
            torch.empty((n, k), dtype=layer.weight.dtype, device=layer.weight.device)
            if box_major_now
            else layer.weight
        )
        quantize_mxfp8_into(_weight_on(layer, weight), self.weight_rule, rows, layer.weight_scale_e8m0)
        if self.tile_aligned:
            align_mxfp8_into(layer.weight, layer.weight_scale_e8m0)
        if box_major_now:
            layer.load_weight_rows(rows)
        # read the codes off now, not in the first (maybe CUDA-graph-captured) forward
        if layer.weight_scale_e8m0.is_cuda:
            cached_mx_foldable(layer, layer.weight_scale_e8m0, layer.weight)

    def _tile_scale(self, layer: QuantizedLinear) -> torch.Tensor:
        return cached_tile_scales(
            layer, layer.weight_scale_e8m0, layer.out_features, layer.in_features, layer.layer_name
        )

    def apply(self, layer: QuantizedLinear, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        tile_scale = self._tile_scale(layer) if self.tile_aligned and x.is_cuda else None
        foldable = x.is_cuda and x.shape[0] <= MX_MID_M_MAX  # the split-K and mid-M kernels use it
        foldable = foldable and cached_mx_foldable(
            layer, layer.weight_scale_e8m0, layer.weight, activation_dtype=x.dtype
        )
        weight = layer.weight
        if layer.weight_box_major:
            weight = BoxMajorWeight(weight, layer.out_features, layer.in_features, MX_BOX_N, MX_BOX_K)
        return mxfp8_linear(
            x,
            weight,
            layer.weight_scale_e8m0,
            bias,
            self.activation_rule,
            weight_tile_scale=tile_scale,
            weight_scales_foldable=foldable and x.dtype == torch.bfloat16,
            weight_scales_foldable_f16=foldable and x.dtype == torch.float16,
        )


class MxFp8WeightOnlyMethod(MxFp8Method):
    weight_only = True


METHODS: dict[tuple[SchemeFamily, bool], type[QuantMethod]] = {
    (cls.family, cls.weight_only): cls
    for cls in (
        Fp8TensorMethod,
        Fp8ChannelMethod,
        Fp8BlockMethod,
        MxFp8Method,
        Fp8TensorWeightOnlyMethod,
        Fp8ChannelWeightOnlyMethod,
        Fp8BlockWeightOnlyMethod,
        MxFp8WeightOnlyMethod,
    )
}
"""The registry: ``(family, weight_only)`` -> method class. A new scheme family is a new entry here."""


def method_for(scheme: Scheme) -> QuantMethod:
    """The method that serves ``scheme`` (raises :class:`UnsupportedSchemeError` for an unknown family)."""
    if (
        scheme.weights.granularity is WeightGranularity.MX
        and scheme.activations is not None
        and scheme.activations.granularity is not ActivationGranularity.MX
    ):
        raise UnsupportedSchemeError(f"scheme {scheme.name!r}: MX weights go with MX activations or none")
    try:
        return METHODS[(scheme.family, scheme.weight_only)](scheme)
    except KeyError:
        raise UnsupportedSchemeError(
            f"scheme {scheme.name!r}: no method for family {scheme.family.value}"
        ) from None


class QuantizedLinear(nn.Module):
    """A Linear whose weight is quantized by ``method``; drop-in for ``nn.Linear`` (``[..., K] -> [..., N]``).

    Buffers (persistent, so ``state_dict`` carries the quantized checkpoint): ``weight`` (E4M3 ``[N, K]``, or
    box-major where :attr:`weight_box_major`: read it with :meth:`weight_rows`) and ``weight_scale`` (fp32) or
    ``weight_scale_e8m0`` (uint8, MXFP8); ``bias`` is a Parameter in the original
    dtype, as ``nn.Linear`` has it. ``dtype`` is the original weight dtype, which activations are expected in
    (an input of another float dtype is cast to it, and the output is returned in the input's dtype).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        method: QuantMethod,
        *,
        bias: bool,
        dtype: torch.dtype,
        device: torch.device | str | None = None,
        layer_name: str = "",
    ) -> None:
        super().__init__()
        if dtype not in ORIGINAL_DTYPES:
            raise UnsupportedSchemeError(
                f"{layer_name or 'QuantizedLinear'}: activations in {dtype} are not supported; the quantized "
                "kernels run bfloat16 or float16 models (cast the model first)"
            )
        self.in_features = in_features
        self.out_features = out_features
        self.method = method
        self.dtype = dtype
        self.layer_name = layer_name
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        method.check(layer_name, out_features, in_features)
        self.weight: torch.Tensor
        self.weight_box_major = False  # the method may store it box-major (MX_WEIGHT_BOX_MAJOR)
        method.create_weights(self)
        self.bias = (
            nn.Parameter(torch.zeros(out_features, dtype=dtype, device=self.device), requires_grad=False)
            if bias
            else None
        )
        self.weight_loaded = False

    @classmethod
    def from_linear(cls, linear: nn.Linear, method: QuantMethod, layer_name: str = "") -> QuantizedLinear:
        """Empty quantized twin of ``linear`` (same shape, bias, dtype, device); the weight is not read."""
        layer = cls(
            linear.in_features,
            linear.out_features,
            method,
            bias=linear.bias is not None,
            dtype=linear.weight.dtype,
            device=linear.weight.device,
            layer_name=layer_name,
        )
        if linear.bias is not None:
            layer.bias.data.copy_(linear.bias.data)
        return layer

    def load_weight(self, weight: torch.Tensor) -> None:
        """Quantize the arriving high-precision weight into this layer (step 2 of the life cycle)."""
        with torch.no_grad():
            self.method.process_weight(self, weight)
        self.weight_loaded = True

    def weight_rows(self) -> torch.Tensor:
        """The quantized weight ``[N, K]`` row-major: the buffer itself, or a copy of a box-major one."""
        if not self.weight_box_major:
            return self.weight
        return BoxMajorWeight(
            self.weight, self.out_features, self.in_features, MX_BOX_N, MX_BOX_K
        ).row_major()

    def load_weight_rows(self, rows: torch.Tensor) -> None:
        """Store an already quantized ``[N, K]`` weight (a reload, or the method's own output) in the buffer's
        layout."""
        if tuple(rows.shape) != (self.out_features, self.in_features):
            raise ValueError(
                f"{self.layer_name}: a quantized weight of shape {tuple(rows.shape)} for a "
                f"[{self.out_features}, {self.in_features}] layer"
            )
        stored = box_major(rows, MX_BOX_N, MX_BOX_K) if self.weight_box_major else rows
        with torch.no_grad():
            self.weight.copy_(stored.to(self.weight.device))

    def load_bias(self, bias: torch.Tensor) -> None:
        if self.bias is None:
            raise ValueError(f"{self.layer_name}: the layer has no bias but the checkpoint has one")
        with torch.no_grad():
            self.bias.copy_(bias.to(self.bias.device, self.bias.dtype))

    def _apply(self, fn, recurse: bool = True):
        """``.to()``, ``.cuda()``, ``.half()`` move the quantized buffers but never cast them (``nn.Module``
        would cast the E4M3 weight and the fp32 scales, which are floating point, to the new dtype). The bias
        follows the cast, and so does ``dtype``, the activation dtype of the layer."""
        quantized = {name: self._buffers.pop(name) for name in list(self._buffers)}
        try:
            result = super()._apply(fn, recurse)
        finally:
            probe = fn(torch.empty(0, dtype=torch.float32, device=self.device))
            for name, tensor in quantized.items():
                self._buffers[name] = tensor.to(probe.device) if tensor is not None else None
        self.device = probe.device
        if probe.dtype in ORIGINAL_DTYPES:
            self.dtype = probe.dtype
        return result

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"{self.layer_name}: input has {x.shape[-1]} features, the layer {self.in_features}"
            )
        leading = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if x2.dtype != self.dtype:
            x2 = x2.to(self.dtype)
        y = self.method.for_rows(x2.shape[0]).apply(self, x2, self.bias)
        return y.reshape(*leading, self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        kind = type(self.method).__name__
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"dtype={self.dtype}, method={kind}, scheme={self.method.scheme.name}"
        )


__all__ = [
    "METHODS",
    "Fp8BlockMethod",
    "Fp8BlockWeightOnlyMethod",
    "Fp8ChannelMethod",
    "Fp8ChannelWeightOnlyMethod",
    "Fp8TensorMethod",
    "Fp8TensorWeightOnlyMethod",
    "MxFp8Method",
    "MxFp8WeightOnlyMethod",
    "QuantMethod",
    "QuantizedLinear",
    "UnsupportedSchemeError",
    "method_for",
]
