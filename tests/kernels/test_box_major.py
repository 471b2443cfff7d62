"""Box-major weights (:mod:`mxrun.kernels.box_major`): where each box lands, the round trip, the checks."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mxrun.kernels.box_major import BoxMajorWeight, box_major, box_major_rows, row_major
from mxrun.kernels.scaled_gemm import GemmInputError


def test_boxes_lie_one_after_another() -> None:
    """Box (column block j, K block i) is rows ``(j * cdiv(K, box_k) + i) * box_n`` on, whole, zeros past N, K."""
    w = torch.randn(70, 300).to(torch.float8_e4m3fn)
    boxes = box_major(w, 32, 128)
    assert boxes.shape == (box_major_rows(70, 300, 32, 128), 128) == (3 * 3 * 32, 128)
    assert boxes.dtype == w.dtype and boxes.is_contiguous()
    raw, stored = w.view(torch.uint8), boxes.view(torch.uint8)
    for j in range(3):
        for i in range(3):
            box = stored[(j * 3 + i) * 32 : (j * 3 + i + 1) * 32]
            part = raw[j * 32 : (j + 1) * 32, i * 128 : (i + 1) * 128]
            assert torch.equal(box[: part.shape[0], : part.shape[1]], part)
            assert not box[part.shape[0] :].any() and not box[:, part.shape[1] :].any()


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 150),
    k=st.integers(1, 300),
    box_n=st.sampled_from([16, 32, 64]),
    box_k=st.sampled_from([32, 64, 128, 256]),
)
def test_row_major_undoes_box_major(n, k, box_n, box_k) -> None:
    w = torch.randint(0, 256, (n, k), dtype=torch.uint8).view(torch.float8_e4m3fn)
    back = row_major(box_major(w, box_n, box_k), n, k, box_n, box_k)
    assert back.shape == (n, k) and back.dtype == w.dtype
    assert torch.equal(back.view(torch.uint8), w.view(torch.uint8))


def test_strided_weight_boxes_its_values() -> None:
    """A weight with padded rows (a view) is boxed by its values, not its storage."""
    base = torch.randint(0, 256, (64, 160), dtype=torch.uint8)
    w = base[:, :128].view(torch.float8_e4m3fn)
    assert torch.equal(box_major(w, 64, 128).view(torch.uint8), base[:, :128])


def test_box_major_weight_holds_its_shape_and_checks_its_layout() -> None:
    w = torch.randint(0, 256, (70, 300), dtype=torch.uint8).view(torch.float8_e4m3fn)
    held = BoxMajorWeight.of(w, 32, 128)
    assert held.shape == (70, 300) and held.dtype == w.dtype and held.device == w.device
    assert torch.equal(held.row_major().view(torch.uint8), w.view(torch.uint8))
    held.check("f")
    with pytest.raises(GemmInputError, match=r"f: a box-major \[70, 300\] weight in \[32, 64\] boxes"):
        held._replace(box_k=64).check("f")
    strided = torch.zeros(288, 256, dtype=torch.float8_e4m3fn)[:, :128]  # the right shape, not contiguous
    with pytest.raises(GemmInputError, match=r"contiguous \[288, 128\] tensor, got \(288, 128\)"):
        held._replace(boxes=strided).check("f")


def test_rows_of_a_box_major_weight_are_a_view_of_whole_boxes() -> None:
    w = torch.randint(0, 256, (200, 300), dtype=torch.uint8).view(torch.float8_e4m3fn)
    held = BoxMajorWeight.of(w, 64, 128)
    part = held.rows(128, 200)
    assert part.shape == (72, 300) and part.boxes.data_ptr() == held.boxes[2 * 3 * 64 :].data_ptr()
    assert torch.equal(part.row_major().view(torch.uint8), w[128:200].view(torch.uint8))
    with pytest.raises(GemmInputError, match=r"rows \[100, 200\) of a box-major weight of 200 rows in 64s"):
        held.rows(100, 200)
