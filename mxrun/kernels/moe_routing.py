"""MoE routing and token grouping in plain torch, on the device, with no host synchronisation.

Two halves:

* **Routing** (:func:`route_topk`): router logits ``[T, E]`` -> ``(top_k_weights [T, k], top_k_index [T, k])``
  by the rule a model uses. transformers 5 routers (``Qwen3MoeTopKRouter``, ``MixtralTopKRouter``,
  ``OlmoeTopKRouter``) take softmax in fp32, keep the top k, renormalise them to sum 1 (Mixtral always,
  Qwen3-MoE / OLMoE when ``norm_topk_prob``), and cast the weights back to the logits' dtype (Qwen3-MoE, OLMoE)
  or leave them fp32 (Mixtral). DeepSeek-V3-style routers score with a sigmoid instead. mxrun's MoE layer
  replaces only a model's *experts* module, so inside a model the model's own router runs; this function is
  what the benchmark routes with and what the tests check against the models' routers.
* **Grouping** (:func:`group_tokens`): the ``S = T * k`` (token, slot) pairs sorted by expert and laid out in
  per-expert runs padded to a multiple of the grouped GEMM's ``BLOCK_M``, so that every ``BLOCK_M`` rows of the
  layout belong to one expert. Everything is computed with device ops (sort, scatter_add, cumsum, searchsorted); the
  sizes of the outputs depend only on ``S``, ``E`` and ``BLOCK_M``, known on the host, never on the routing.

Pairs are numbered ``p = t * k + j`` (token ``t``, slot ``j``), the row-major order of ``top_k_index``. An
expert id outside ``[0, E)`` (the sentinel expert-parallel loaders use for experts held elsewhere) drops the
pair: it is placed in no run, the grouped GEMMs never write its row, and the top-k sum leaves it out.
"""

from __future__ import annotations

import enum
from typing import NamedTuple

import torch


class RouterScore(enum.Enum):
    """How router logits become routing probabilities."""

    SOFTMAX = "softmax"
    SIGMOID = "sigmoid"


def route_topk(
    router_logits: torch.Tensor,
    top_k: int,
    *,
    score: RouterScore | str = RouterScore.SOFTMAX,
    renormalize: bool = True,
    weights_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(top_k_weights, top_k_index)`` for ``router_logits`` ``[T, E]``.

    Scores are computed in fp32 (softmax over E, or an elementwise sigmoid), the ``top_k`` largest kept (ties
    broken as ``torch.topk`` does), divided by their sum when ``renormalize``, then cast to ``weights_dtype``
    (default: fp32; pass the logits' dtype for the Qwen3-MoE / OLMoE routers). Indices are int64, as the
    transformers routers return them.
    """
    score = RouterScore(score)
    logits = router_logits.float()
    probs = torch.softmax(logits, dim=-1) if score is RouterScore.SOFTMAX else torch.sigmoid(logits)
    top_weights, top_index = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        top_weights = top_weights / top_weights.sum(dim=-1, keepdim=True)
    return top_weights.to(weights_dtype or torch.float32), top_index


class TokenGroups(NamedTuple):
    """Where each (token, slot) pair sits in the expert-sorted, ``BLOCK_M``-padded layout.

    ``P`` is :func:`padded_capacity` (a host-side bound: ``ceil(S / BLOCK_M) + min(E, S)`` blocks), so every
    tensor here has a size known without looking at the routing.
    """

    sorted_pair_ids: torch.Tensor
    """int32 ``[P]``: the pair id ``p`` at each row of the layout, ``S`` (out of range) on padding rows."""
    block_expert: torch.Tensor
    """int32 ``[P / BLOCK_M]``: the expert of each block of ``BLOCK_M`` rows, ``-1`` for unused blocks."""
    expert_counts: torch.Tensor
    """int64 ``[E]``: pairs routed to each expert (dropped pairs not counted)."""
    block_m: int
    num_pairs: int
    """``S = T * k``."""


def padded_capacity(num_pairs: int, num_experts: int, block_m: int) -> int:
    """Rows of the padded layout: an upper bound of ``sum_e ceil(count_e / BLOCK_M) * BLOCK_M``.

    Each expert with pairs wastes fewer than ``BLOCK_M`` rows, and at most ``min(E, S)`` experts have pairs, so
    ``ceil(S / BLOCK_M) + min(E, S)`` blocks always suffice."""
    blocks = -(-num_pairs // block_m) + min(num_experts, num_pairs)
    return blocks * block_m


def group_tokens(top_k_index: torch.Tensor, num_experts: int, block_m: int) -> TokenGroups:
    """Sort the pairs of ``top_k_index`` ``[T, k]`` by expert into runs padded to ``block_m`` rows.

    Within an expert's run the pairs keep their order (a stable sort), so the layout, and with it the
    grouped GEMM's result, is deterministic. No ``.item()``, no ``.tolist()``, no data-dependent shapes.
    """
    device = top_k_index.device
    expert_ids = top_k_index.reshape(-1).to(torch.int64)
    num_pairs = expert_ids.numel()
    capacity = padded_capacity(num_pairs, num_experts, block_m)
    n_blocks = capacity // block_m
    # dropped pairs (ids outside [0, E)) go to a virtual expert E, sorted last and never laid out
    valid = (expert_ids >= 0) & (expert_ids < num_experts)
    keyed = torch.where(valid, expert_ids, torch.full_like(expert_ids, num_experts))
    order = torch.sort(keyed, stable=True).indices  # pair ids, grouped by expert
    # scatter_add, not bincount: CUDA bincount reads the maximum back to the host to size its output
    counts_all = torch.zeros(num_experts + 1, dtype=torch.int64, device=device)
    counts_all.scatter_add_(0, keyed, torch.ones_like(keyed))
    counts = counts_all[:num_experts]
    starts = torch.cumsum(counts_all, 0) - counts_all  # unpadded start of each expert's run
    blocks_per_expert = (counts + block_m - 1) // block_m
    block_ends = torch.cumsum(blocks_per_expert, 0)  # [E]
    padded_starts = (block_ends - blocks_per_expert) * block_m

    sorted_experts = keyed[order]
    rank = torch.arange(num_pairs, device=device) - starts[sorted_experts]
    kept = sorted_experts < num_experts
    destination = torch.where(
        kept,
        padded_starts[sorted_experts.clamp(max=num_experts - 1)] + rank,
        torch.full_like(rank, capacity),  # out of range: dropped below
    )
    sorted_pair_ids = torch.full((capacity + 1,), num_pairs, dtype=torch.int32, device=device)
    sorted_pair_ids.scatter_(0, destination, order.to(torch.int32))
    sorted_pair_ids = sorted_pair_ids[:capacity]

    block_ids = torch.arange(n_blocks, device=device)
    block_expert = torch.searchsorted(block_ends, block_ids, right=True)
    block_expert = torch.where(block_expert < num_experts, block_expert, torch.full_like(block_expert, -1))
    return TokenGroups(sorted_pair_ids, block_expert.to(torch.int32), counts, block_m, num_pairs)


__all__ = [
    "RouterScore",
    "TokenGroups",
    "group_tokens",
    "padded_capacity",
    "route_topk",
]
