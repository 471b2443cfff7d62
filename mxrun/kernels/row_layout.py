"""How a 2-D matrix or a 3-D expert stack is seen by the row kernels: ``B`` batches of ``R`` rows of ``K``.

All quantize kernels reduce along the last dimension K (the GEMM reduction dimension). They read the input
through three strides, so any strided input (a transpose, a slice) is read in place, with no copy. A 3-D
stack whose first two dimensions can be merged (the usual contiguous ``[E, N, K]``) is folded into one batch
of ``E * N`` rows, which gives the kernels larger, better-balanced grids.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SUPPORTED_INPUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class QuantizeInputError(ValueError):
    """The tensor handed to a quantize function has a shape or dtype the format does not define."""


@dataclass(frozen=True)
class RowBatches:
    """Element ``[b, r, k]`` of the input lives at ``b * stride_b + r * stride_r + k * stride_k``."""

    batches: int
    rows: int
    cols: int
    stride_b: int
    stride_r: int
    stride_k: int


def check_quantize_input(x: torch.Tensor, fn_name: str) -> None:
    """Reject what no format defines: non-float dtypes and ranks other than 2 (matrix) or 3 (stack)."""
    check_quantize_shape(tuple(x.shape), x.dtype, fn_name)


def check_quantize_shape(shape: tuple[int, ...], dtype: torch.dtype, fn_name: str) -> None:
    """:func:`check_quantize_input` on a shape and dtype (so launchers can cache per shape)."""
    if dtype not in SUPPORTED_INPUT_DTYPES:
        raise QuantizeInputError(
            f"{fn_name}: input dtype {dtype} is not supported; pass float32, bfloat16 or float16"
        )
    if len(shape) not in (2, 3):
        raise QuantizeInputError(
            f"{fn_name}: expected a 2-D [M, K] matrix or a 3-D [E, N, K] stack, got shape {shape}"
        )


def row_batches(x: torch.Tensor, rows_per_scale: int = 1) -> RowBatches:
    """Describe ``x`` (2-D or 3-D, any strides) as batches of rows, merging the batch into the rows if it can.

    ``rows_per_scale`` is how many rows share one scale (128 for 128x128 weight blocks): batches are merged
    only when the rows of one batch fill whole scale blocks, so no block ever spans two experts.
    """
    return row_batches_of(tuple(x.shape), tuple(x.stride()), rows_per_scale)


def row_batches_of(shape: tuple[int, ...], strides: tuple[int, ...], rows_per_scale: int = 1) -> RowBatches:
    """:func:`row_batches` from a shape and strides."""
    if len(shape) == 2:
        return RowBatches(1, shape[0], shape[1], 0, strides[0], strides[1])
    batches, rows, cols = shape
    mergeable = batches == 1 or strides[0] == rows * strides[1]
    if mergeable and rows % rows_per_scale == 0:
        return RowBatches(1, batches * rows, cols, 0, strides[1], strides[2])
    return RowBatches(batches, rows, cols, strides[0], strides[1], strides[2])


@dataclass(frozen=True)
class TileConfig:
    """One program's tile: ``block_r`` rows by ``block_k`` columns, run by ``num_warps`` warps.

    Launchers pick one from the shape; benchmarks pass their own to sweep. Sizes are powers of two.
    """

    block_r: int
    block_k: int
    num_warps: int


def ceil_div(a: int, b: int) -> int:
    """Integer ceil(a / b) on the host (``triton.cdiv`` is a jit function: calling it from Python costs us)."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """Smallest power of two >= n (1 for n <= 1)."""
    return 1 << max(0, (n - 1).bit_length())


def streaming_tile(
    rows: int, cols: int, min_block_k: int, max_block_k: int = 256, elements: int = 4096
) -> TileConfig:
    """A tile of about ``elements`` elements for a memory-bound row kernel.

    Wide along K first (long contiguous runs per row, up to ``max_block_k``), then as many rows as fill it;
    small shapes get smaller tiles rather than masked lanes. 4096 elements at 4 warps (32 per thread, four
    16-byte bf16 loads), 1024 wide, measured best or within 2% of best on H100 for the streaming kernels.
    """
    block_k = max(min_block_k, min(max_block_k, next_power_of_2(cols)))
    block_r = max(1, min(next_power_of_2(rows), elements // block_k))
    num_warps = max(1, min(8, block_r * block_k // 1024))
    return TileConfig(block_r, block_k, num_warps)
