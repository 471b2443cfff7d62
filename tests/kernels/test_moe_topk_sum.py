"""The top-k sum kernel against its torch reference, bit for bit on a GPU (both add in fp32 slot by slot from zero
and round once to nearest, so the bits are defined; under ``TRITON_INTERPRET`` the final cast truncates, so there
it may sit one ulp below), with dropped pairs whose rows hold NaN to show that they are never read."""

from __future__ import annotations

import pytest
import torch

from mxrun.kernels.moe_topk_sum import topk_sum_reference, topk_sum_triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("tokens", "top_k", "hidden"), [(1, 1, 8), (5, 2, 100), (7, 8, 1100)])
def test_topk_sum_matches_reference(dtype, tokens, top_k, hidden) -> None:
    experts = 6
    generator = torch.Generator().manual_seed(tokens * 100 + top_k)
    y = torch.randn(tokens * top_k, hidden, generator=generator).to(dtype)
    index = torch.randint(0, experts, (tokens, top_k), generator=generator)
    index[0, 0] = experts  # expert-parallel sentinel: dropped
    if tokens > 1:
        index[1, -1] = -1
    dropped = ((index < 0) | (index >= experts)).reshape(-1)
    y[dropped] = float("nan")  # the torch sum of a zero-filled buffer would read these; the kernel must not
    y, index = y.to(DEVICE), index.to(DEVICE)
    out = topk_sum_triton(y, index, experts)
    reference = topk_sum_reference(y, index, experts)
    assert not out.isnan().any()
    if DEVICE == "cuda":
        assert torch.equal(out, reference)
    else:  # the interpreter's fp32 -> bf16/fp16 cast truncates: within one ulp (2^-7 / 2^-10 relative)
        ulp = 2.0**-7 if dtype == torch.bfloat16 else 2.0**-10
        assert ((out.float() - reference.float()).abs() <= ulp * reference.float().abs() + 1e-6).all()
    # and with nothing dropped it is the fp32 sum of a layer's rows, rounded once
    kept = index.clamp(0, experts - 1)
    y_clean = torch.where(y.isnan(), 0.0, y.float()).to(dtype)
    expected = y_clean.view(tokens, top_k, hidden).float().sum(dim=1)
    assert (topk_sum_triton(y_clean, kept, experts).float() - expected).abs().max() <= (
        2.0**-7 * expected.abs().max() + 1e-6
    )


def test_topk_sum_shapes() -> None:
    index = torch.zeros((3, 2), dtype=torch.int64, device=DEVICE)
    assert topk_sum_triton(torch.zeros(6, 0, device=DEVICE), index, 4).shape == (3, 0)
    assert topk_sum_triton(torch.zeros(0, 5, device=DEVICE), index[:0], 4).shape == (0, 5)
    with pytest.raises(ValueError, match="T \\* k"):
        topk_sum_triton(torch.zeros(5, 4, device=DEVICE), index, 4)
