"""Box-major weights: an ``[N, K]`` FP8 weight stored one ``[box_n, box_k]`` box after another, so that each box a
GEMM program reads is one contiguous run of memory and a program's K slab is consecutive boxes.

Row-major, a ``[64, 128]`` box of an FP8 weight is 64 runs of 128 bytes, ``K`` bytes apart. The few-row GEMMs read
their weight in exactly such boxes (the split-K kernel's MXFP8 and weight-only tiles, the mid-M kernel's), and
reading the same boxes stored whole measured faster on the H100 for the MXFP8 decode, by TMA and by pointers
alike, warm in L2 and cold from DRAM (``benchmarks/box_major_weight.py``, ``results/small-m-weight-boxes-h100.log``:
split-K at M = 1 and 16, x0.95 the time over the seven Llama shapes, faster in 14 of 14 each way, 70B ``down``
93.1 -> 87.0 us; FP8 E4M3 codes in 64x256 boxes x0.99; the mid-M kernel at 64 rows x0.92-0.98 on MXFP8 warm,
within 4% at 128-256, ``results/mid-m-weight-boxes-h100.log``). Padding the row-major rows instead (a row stride
that is not a power of two) did not help: 16 bytes took x1.02-1.12 the time (geometric means per operand kind
and load), 128 bytes x1.00-1.03.

Layout: box ``(j, i)`` (column block ``j``, K block ``i``) holds ``weight[j*box_n : (j+1)*box_n, i*box_k :
(i+1)*box_k]`` in rows ``(j * cdiv(K, box_k) + i) * box_n`` on of a ``[cdiv(N, box_n) * cdiv(K, box_k) * box_n,
box_k]`` tensor, zeros past ``N`` and ``K``; as a 2-D tensor a TMA descriptor reads a box at row coordinate
``(j * cdiv(K, box_k) + i) * box_n``, column 0.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from mxrun.kernels.backend import tl, triton
from mxrun.kernels.scaled_gemm import GemmInputError

MX_BOX_N = 64
MX_BOX_K = 128
"""The boxes an MXFP8 weight is stored in when stored box-major: the split-K kernel's MXFP8 tile and the mid-M
kernel's tile (both 64 columns x 128 K)."""


class BoxMajorWeight(NamedTuple):
    """An ``[n, k]`` FP8 weight held box-major: what the few-row GEMM launchers and
    :func:`~mxrun.kernels.mxfp8_gemm.mxfp8_linear` take in place of the row-major tensor."""

    boxes: torch.Tensor  # [box_major_rows(n, k, box_n, box_k), box_k], contiguous
    n: int
    k: int
    box_n: int = MX_BOX_N
    box_k: int = MX_BOX_K

    @classmethod
    def of(cls, weight: torch.Tensor, box_n: int = MX_BOX_N, box_k: int = MX_BOX_K) -> BoxMajorWeight:
        """The row-major ``weight`` ``[n, k]`` stored box-major (a copy)."""
        return cls(box_major(weight, box_n, box_k), weight.shape[0], weight.shape[1], box_n, box_k)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n, self.k)

    @property
    def dtype(self) -> torch.dtype:
        return self.boxes.dtype

    @property
    def device(self) -> torch.device:
        return self.boxes.device

    def row_major(self) -> torch.Tensor:
        """The ``[n, k]`` row-major weight (a copy)."""
        return row_major(self.boxes, self.n, self.k, self.box_n, self.box_k)

    @property
    def k_boxes(self) -> int:
        """Boxes along K (the stride, in boxes, from one column block to the next)."""
        return triton.cdiv(self.k, self.box_k)

    def rows(self, start: int, stop: int) -> BoxMajorWeight:
        """Weight rows ``[start, stop)`` (``start`` a multiple of ``box_n``), box-major: a view."""
        if start % self.box_n or not 0 <= start < stop <= self.n:
            raise GemmInputError(
                f"rows [{start}, {stop}) of a box-major weight of {self.n} rows in {self.box_n}s"
            )
        per_block = self.k_boxes * self.box_n  # rows of the boxes tensor per column block
        first, end = start // self.box_n * per_block, triton.cdiv(stop, self.box_n) * per_block
        return self._replace(boxes=self.boxes[first:end], n=stop - start)

    def check(self, fn: str) -> None:
        """Raise :class:`GemmInputError` naming ``fn`` unless :attr:`boxes` has the layout's shape (contiguous)."""
        rows = box_major_rows(self.n, self.k, self.box_n, self.box_k)
        if self.boxes.shape != (rows, self.box_k) or not self.boxes.is_contiguous():
            raise GemmInputError(
                f"{fn}: a box-major [{self.n}, {self.k}] weight in [{self.box_n}, {self.box_k}] boxes is a "
                f"contiguous [{rows}, {self.box_k}] tensor, got {tuple(self.boxes.shape)}"
            )


@triton.jit
def box_first_row(column_block, k0, K, BOX_N: tl.constexpr, BOX_K: tl.constexpr):
    """Row of the box-major tensor at which the box of column block ``column_block`` and the K step starting at
    ``k0`` (a multiple of ``BOX_K``) begins: a TMA coordinate (column 0), or ``* BOX_K`` an element offset."""
    return (column_block * tl.cdiv(K, BOX_K) + k0 // BOX_K) * BOX_N


@triton.jit
def box_major_offsets(rows, cols, K_BOXES, BOX_N: tl.constexpr, BOX_K: tl.constexpr):
    """int64 offsets ``[len(rows), len(cols)]``, in elements, of ``(rows[i], cols[j])`` of a box-major weight
    with ``K_BOXES`` boxes along K (what :func:`box_major` writes; elements may be bytes or 4-byte words, with
    ``BOX_K`` counted in the same unit)."""
    boxes = (rows // BOX_N).to(tl.int64)[:, None] * K_BOXES + (cols // BOX_K)[None, :]
    return boxes * (BOX_N * BOX_K) + ((rows % BOX_N) * BOX_K)[:, None] + (cols % BOX_K)[None, :]


def box_major_fits(n: int, k: int, box_n: int = MX_BOX_N, box_k: int = MX_BOX_K) -> bool:
    """Whether whole boxes cover an ``[n, k]`` weight, so that holding it box-major adds no bytes (the methods
    hold only such weights box-major: a ragged one would grow by its padding, up to 2x on small layers)."""
    return n % box_n == 0 and k % box_k == 0


def box_major_rows(n: int, k: int, box_n: int, box_k: int) -> int:
    """Rows of the box-major copy of an ``[n, k]`` weight (``box_k`` columns)."""
    return triton.cdiv(n, box_n) * triton.cdiv(k, box_k) * box_n


def box_major(weight: torch.Tensor, box_n: int, box_k: int) -> torch.Tensor:
    """``weight`` ``[N, K]`` (any 1-byte dtype, row-major or strided) in ``[box_n, box_k]`` boxes, one after
    another (see the module docstring); the same dtype."""
    n, k = weight.shape
    nb, kb = triton.cdiv(n, box_n), triton.cdiv(k, box_k)
    padded = torch.zeros((nb * box_n, kb * box_k), dtype=torch.uint8, device=weight.device)
    padded[:n, :k] = weight.view(torch.uint8)
    boxes = padded.view(nb, box_n, kb, box_k).permute(0, 2, 1, 3).contiguous()
    return boxes.view(nb * kb * box_n, box_k).view(weight.dtype)


def row_major(boxes: torch.Tensor, n: int, k: int, box_n: int, box_k: int) -> torch.Tensor:
    """The ``[n, k]`` row-major weight back from its box-major copy (the inverse of :func:`box_major`)."""
    nb, kb = triton.cdiv(n, box_n), triton.cdiv(k, box_k)
    grid = boxes.view(torch.uint8).view(nb, kb, box_n, box_k).permute(0, 2, 1, 3)
    return grid.reshape(nb * box_n, kb * box_k)[:n, :k].contiguous().view(boxes.dtype)


__all__ = [
    "MX_BOX_K",
    "MX_BOX_N",
    "BoxMajorWeight",
    "box_first_row",
    "box_major",
    "box_major_offsets",
    "box_major_rows",
    "row_major",
]
