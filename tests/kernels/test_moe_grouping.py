"""The one-launch token grouping (``moe_grouping``) gives the torch version's layout bit for bit: the same
sorted pair ids (stable within an expert, padding rows marked), block experts and counts, with dropped pairs
(ids outside [0, E)), experts that receive nothing, every block size and pair counts up to the limit."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mxrun.kernels.moe_grouping import MAX_PAIRS, group_tokens_triton
from mxrun.kernels.moe_routing import group_tokens

from .device_cases import HAS_CUDA, KERNEL_DEVICE


def _assert_same_layout(index: torch.Tensor, experts: int, block_m: int) -> None:
    expected = group_tokens(index, experts, block_m)
    actual = group_tokens_triton(index.to(KERNEL_DEVICE), experts, block_m)
    assert actual.num_pairs == expected.num_pairs and actual.block_m == block_m
    assert torch.equal(actual.sorted_pair_ids.cpu(), expected.sorted_pair_ids)
    assert torch.equal(actual.block_expert.cpu(), expected.block_expert)
    assert torch.equal(actual.expert_counts.cpu(), expected.expert_counts)


@settings(max_examples=40 if HAS_CUDA else 25, deadline=None)
@given(
    tokens=st.integers(0, 70),
    experts=st.integers(1, 20),
    top_k=st.integers(1, 4),
    block_m=st.sampled_from([1, 2, 4, 16, 64]),
    seed=st.integers(0, 2**16),
)
def test_same_layout_as_torch(tokens: int, experts: int, top_k: int, block_m: int, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    index = torch.randint(-1, experts + 1, (tokens, min(top_k, experts)), generator=generator)
    _assert_same_layout(index, experts, block_m)


@pytest.mark.parametrize(
    ("tokens", "experts", "top_k", "block_m"),
    [(1, 128, 8, 16), (16, 256, 8, 16), (128, 8, 2, 32), (MAX_PAIRS // 8, 128, 8, 64), (333, 60, 4, 16)],
)
def test_model_shapes(tokens: int, experts: int, top_k: int, block_m: int) -> None:
    """Router-like indices (distinct experts per token) at the benchmark's shapes, up to the limit."""
    generator = torch.Generator().manual_seed(tokens + experts)
    index = torch.rand(tokens, experts, generator=generator).topk(top_k, dim=-1).indices
    _assert_same_layout(index, experts, block_m)


def test_out_of_range_ids_are_dropped_whatever_their_width() -> None:
    """Ids past int32 (2^32 + 1 would wrap to expert 1) and negative ones are dropped, as the torch version does."""
    index = torch.tensor([[0, 2**32 + 1], [1, -(2**33)], [2**31, 1]], dtype=torch.int64)
    _assert_same_layout(index, 3, 2)
    groups = group_tokens_triton(index.to(KERNEL_DEVICE), 3, 2)
    assert groups.expert_counts.tolist() == [1, 2, 0]


def test_too_many_pairs_is_a_clear_error() -> None:
    index = torch.zeros(MAX_PAIRS + 1, 1, dtype=torch.int64)
    with pytest.raises(ValueError, match="at most"):
        group_tokens_triton(index.to(KERNEL_DEVICE), 4, 16)
