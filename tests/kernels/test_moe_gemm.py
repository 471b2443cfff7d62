"""MoE token grouping and the Triton grouped GEMM against the plain-torch reference.

On CPU the kernel runs under ``TRITON_INTERPRET=1`` on tiny shapes (the interpreter's dots run in fp32, see
``DOT_FP32``); the larger cases, the recompile check and the no-host-sync check need CUDA.

Error bounds, derived:

* **One grouped GEMM** with the same inputs as the reference. Every operand value the MMA sees is exact
  (E4M3 -> bf16 widening is exact; MXFP8 weights ``E4M3 * 2^e`` are exact in bf16; FP8 activations come from
  the same quantizer as the reference's, bit for bit), so kernel and reference add the same exact products in
  fp32 and differ only by summation order and by where the fp32 scales are applied (a few fp32 ulps of
  ``sum |a_k w_k|``, relative ~1e-6 at these K). The kernel rounds the result once to bf16 (the reference
  stays fp32): on a GPU that is round-to-nearest, within half an ulp; the interpreter's fp32 -> bf16 cast
  truncates, within one ulp. One bf16 ulp is at most ``2^-7 |ref|`` (8 significant bits). We allow
  ``2^-7 |ref| + 1e-5 max|ref|`` per element (the absolute term covers fp32 order effects on elements that
  cancel to near zero); the SiLU in the gated epilogue (``x / (1 + exp(-x))`` against torch's ``silu``) adds
  an fp32 ulp or two, far below that. A wrong expert, scale, tail mask or routing weight is off by 10% or
  more.
* **The whole experts forward, bf16 activations** (both sides round ``h``, ``y`` and the output to bf16).
  ``h`` may differ by 1 bf16 ulp per element (above); that moves each pair's down output by at most
  ``2^-7 sum_i |w_i h_i|`` ~ 1 ulp of ``|y|``, plus its own rounding ulp; ``k`` pairs are summed in fp32 and
  rounded once more. Per element: ``(2k + 1) 2^-7 max|ref|``.
* **The whole forward with quantized activations** (FP8 / MX): a 1-ulp flip of an ``h`` element can move its
  E4M3 code by one step (``2^-3`` relative, for that element only); such flips are rare (one per few hundred
  elements) and independent, so the relative Frobenius error stays well below ``2^-5``, which we assert.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mxrun.kernels.fp8_quantize import quantize_fp8_reference
from mxrun.kernels.moe_gemm import (
    FP8_ACTIVATION_GRANULARITY,
    ExpertActivation,
    ExpertWeightFormat,
    ExpertWeights,
    dequantize_experts,
    moe_aligned,
    moe_block_m,
    moe_experts_reference,
    moe_experts_triton,
    moe_gemm_config,
    moe_grouped_gemm_triton,
    moe_swap_ab,
    moe_zero_padding,
    quantize_dequantize_activation,
    quantize_expert,
)
from mxrun.kernels.moe_routing import group_tokens, padded_capacity, route_topk
from mxrun.kernels.scaled_gemm import GemmConfig, GemmInputError

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
ULP = 2.0**-7
"""One bf16 ulp, relative to the value, at most."""
F = ExpertWeightFormat
A = ExpertActivation
COMBOS = [
    (F.FP8_CHANNEL, A.NONE),
    (F.FP8_TENSOR, A.NONE),
    (F.FP8_BLOCK, A.NONE),
    (F.MXFP8, A.NONE),
    (F.FP8_CHANNEL, A.FP8_TOKEN),
    (F.FP8_TENSOR, A.FP8_TENSOR),
    (F.FP8_BLOCK, A.FP8_GROUP),
    (F.MXFP8, A.MX_ROUND_UP),
    (F.MXFP8, A.MX_FLOOR),
]


def _stack(fmt: ExpertWeightFormat, experts: int, n: int, k: int, seed: int) -> ExpertWeights:
    generator = torch.Generator().manual_seed(seed)
    weight = (torch.randn(experts, n, k, generator=generator) * 0.1).to(torch.bfloat16).to(DEVICE)
    parts = [quantize_expert(weight[e], fmt) for e in range(experts)]
    return ExpertWeights(torch.stack([p[0] for p in parts]), torch.stack([p[1] for p in parts]), fmt)


def _routing(tokens: int, experts: int, top_k: int, seed: int, only: list[int] | None = None):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(tokens, experts, generator=generator)
    if only is not None:  # route every token to these experts only: the others receive nothing
        mask = torch.full((experts,), float("-inf"))
        mask[only] = 0.0
        logits = logits + mask
    weights, index = route_topk(logits, top_k)
    return weights.to(DEVICE), index.to(DEVICE)


def _x(tokens: int, hidden: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(tokens, hidden, generator=generator).to(torch.bfloat16).to(DEVICE)


# ---------------------------------------------------------------------------------------------- grouping


@settings(max_examples=60, deadline=None)
@given(
    tokens=st.integers(0, 40),
    experts=st.integers(1, 9),
    top_k=st.integers(1, 3),
    block_m=st.sampled_from([1, 2, 4, 16]),
    seed=st.integers(0, 2**16),
)
def test_group_tokens_layout(tokens: int, experts: int, top_k: int, block_m: int, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    index = torch.randint(-1, experts + 1, (tokens, top_k), generator=generator)  # -1 and E: dropped
    groups = group_tokens(index, experts, block_m)
    flat = index.reshape(-1)
    num_pairs = flat.numel()
    capacity = padded_capacity(num_pairs, experts, block_m)
    assert groups.sorted_pair_ids.shape == (capacity,) and groups.block_expert.shape == (capacity // block_m,)
    valid = ((flat >= 0) & (flat < experts)).nonzero().squeeze(1)
    laid_out = groups.sorted_pair_ids[groups.sorted_pair_ids < num_pairs].long()
    assert sorted(laid_out.tolist()) == valid.tolist()  # every routed pair exactly once, dropped ones never
    for block, expert in enumerate(groups.block_expert.tolist()):
        rows = groups.sorted_pair_ids[block * block_m : (block + 1) * block_m].long()
        rows = rows[rows < num_pairs]
        if expert < 0:
            assert rows.numel() == 0
        else:
            assert rows.numel() > 0 and (flat[rows] == expert).all()
            assert (rows.diff() > 0).all()  # stable: pair order kept within an expert
    expected_counts = (
        torch.bincount(flat[valid], minlength=experts) if valid.numel() else torch.zeros(experts)
    )
    assert groups.expert_counts.tolist() == expected_counts.tolist()


# ------------------------------------------------------------------------------------------ one GEMM


def _gemm_reference(a_values, weights, index, gated, gather, routing):
    """fp32 per pair: ``a_values`` already holds the activation values the kernel sees."""
    flat = index.reshape(-1).long()
    rows = torch.arange(flat.numel(), device=flat.device)
    a = a_values[rows // index.shape[1]] if gather else a_values
    w = dequantize_experts(weights)[flat.clamp(0, weights.data.shape[0] - 1)]
    out = torch.einsum("pk,pnk->pn", a.float(), w)
    if gated:
        inter = out.shape[1] // 2
        out = torch.nn.functional.silu(out[:, :inter]) * out[:, inter:]
    if routing is not None:
        out = out * routing.reshape(-1, 1).float()
    return out


def _assert_one_ulp(actual: torch.Tensor, reference: torch.Tensor) -> None:
    bound = ULP * reference.abs() + 1e-5 * reference.abs().max()
    excess = (actual.float() - reference).abs() - bound
    assert excess.max() <= 0, f"max excess {excess.max().item():.3e} over the 1-ulp bound"


@pytest.mark.parametrize(("fmt", "activation"), COMBOS)
@pytest.mark.parametrize("gated", [True, False])
def test_grouped_gemm_matches_reference(fmt, activation, gated) -> None:
    # K = 160: one full 128-wide K step and a 32-wide tail (EVEN_K False). N = 80 (gated: 2 x 80 rows) with
    # BLOCK_N = 32: a ragged N tail. 6 experts, expert 4 and 5 receive nothing.
    experts, n, k, tokens, top_k = 6, 80, 160, 7, 2
    weights = _stack(fmt, experts, 2 * n if gated else n, k, seed=1)
    routing, index = _routing(tokens, experts, top_k, seed=2, only=[0, 1, 2, 3])
    x = _x(tokens if gated else tokens * top_k, k, seed=3)
    a, a_scale = x, None
    if activation.is_fp8:
        quantized = quantize_fp8_reference(x, FP8_ACTIVATION_GRANULARITY[activation])
        a, a_scale = quantized.data, quantized.scale
    groups = group_tokens(index, experts, 16)
    out = torch.zeros(tokens * top_k, n, dtype=torch.bfloat16, device=DEVICE)
    config = GemmConfig(16, 32, 128, 1, 4, 2)
    moe_grouped_gemm_triton(
        a, a_scale, weights, groups, out, gated=gated, gather_top_k=top_k if gated else None,
        routing_weights=None if gated else routing.reshape(-1), activation=activation, config=config,
    )  # fmt: skip
    reference = _gemm_reference(
        quantize_dequantize_activation(x, activation),
        weights,
        index,
        gated,
        gated,
        None if gated else routing,
    )
    _assert_one_ulp(out, reference)


def _gated_variants_agree(fmt, activation, n, k, tokens, top_k, seed, variants: list[dict]) -> None:
    """The gated grouped GEMM over three experts (the middle one gets nothing), once per variant of its launch
    keywords: every variant writes the same bits, within the reference's 1-ulp bound."""
    experts = 3
    weights = _stack(fmt, experts, 2 * n, k, seed=seed)
    _, index = _routing(tokens, experts, top_k, seed=seed + 1, only=[0, 2])
    x = _x(tokens, k, seed=seed + 2)
    a, a_scale = x, None
    if activation.is_fp8:
        quantized = quantize_fp8_reference(x, FP8_ACTIVATION_GRANULARITY[activation])
        a, a_scale = quantized.data, quantized.scale
    groups = group_tokens(index, experts, 16)
    outs = []
    for variant in variants:
        out = torch.zeros(tokens * top_k, n, dtype=torch.bfloat16, device=DEVICE)
        moe_grouped_gemm_triton(
            a, a_scale, weights, groups, out, gated=True, gather_top_k=top_k, activation=activation, **variant
        )  # fmt: skip
        outs.append(out)
    for out in outs[1:]:
        assert torch.equal(outs[0], out)
    reference = _gemm_reference(
        quantize_dequantize_activation(x, activation), weights, index, True, True, None
    )
    _assert_one_ulp(outs[0], reference)


@pytest.mark.parametrize(("fmt", "activation"), [(F.MXFP8, A.NONE), (F.FP8_CHANNEL, A.FP8_TOKEN)])
@pytest.mark.parametrize("group_m", [1, 2, 16])
def test_program_order_does_not_change_the_result(fmt, activation, group_m) -> None:
    """Every token goes to both of two experts (20 pairs each): each expert fills one 16-row block and spills
    into a second, the case the launcher walks 16 row blocks per column for. Any program order writes the same
    bits, within the reference's 1-ulp bound."""
    variants = [{"config": GemmConfig(16, 32, 128, order, 4, 2)} for order in (1, group_m)]
    _gated_variants_agree(fmt, activation, 80, 160, 20, 2, 31, variants)


@pytest.mark.parametrize(("fmt", "activation", "swap_ab"), [
    (F.MXFP8, A.NONE, False), (F.FP8_CHANNEL, A.FP8_TOKEN, False), (F.FP8_BLOCK, A.FP8_GROUP, False),
    (F.MXFP8, A.NONE, True),
])  # fmt: skip
@pytest.mark.parametrize("k", [128, 160])
def test_padding_rows_read_as_zeros_change_no_bits(fmt, activation, swap_ab, k) -> None:
    """Padding rows of a layout block read as zeros (masked loads) or as pair 0's row: the real rows' outputs
    are the same bits and the reference's, with EVEN_K (K = 128) and a K tail (160); 13 pairs over two
    experts leave padding in every 16-row block."""
    config = GemmConfig(16, 32, 128, 1, 4, 2)
    variants = [{"config": config, "swap_ab": swap_ab, "zero_padding": zero} for zero in (False, True)]
    _gated_variants_agree(fmt, activation, 48, k, 13, 1, 41, variants)


def test_launch_choices_for_few_rows_per_expert() -> None:
    """The launcher's measured rules (``moe_block_m`` / ``moe_gemm_config`` docstrings): FP8 MMAs take
    64-row blocks where the mean is 17-32 pairs per expert, decoded weights 32-row ones; 16 row blocks per
    column sweep only where the busier experts spill into a second block."""
    assert moe_block_m(256, 8) == 32  # Mixtral at 128 tokens, decoded weights
    assert moe_block_m(256, 8, A.FP8_TOKEN) == 64
    assert moe_block_m(32, 8, A.FP8_TOKEN) == 16  # 16 tokens: 4 per expert
    assert moe_block_m(8192 * 8, 128, A.FP8_GROUP) == 128
    spilling = moe_gemm_config(32, 14336, 4096, F.MXFP8, A.NONE, True, 32.0)
    assert spilling.group_m == 16
    assert moe_gemm_config(16, 768, 2048, F.MXFP8, A.NONE, True, 8.0).group_m == 1  # Qwen3, 128 tokens
    assert moe_gemm_config(16, 14336, 4096, F.FP8_BLOCK, A.NONE, False, 4.0).group_m == 1
    # the order changes nothing else about the tile
    assert moe_gemm_config(32, 14336, 4096, F.MXFP8, A.NONE, True, 20.0) == replace(spilling, group_m=1)
    # padding rows read as zeros unless they are a few percent of the rows, or the weight-rows kernel runs
    assert moe_zero_padding(64, 64.0, swap_ab=False, fp8_activations=False)  # Qwen3 at 1024 tokens
    assert moe_zero_padding(128, 512.0, swap_ab=False, fp8_activations=True)  # Qwen3 at 8192 tokens
    assert not moe_zero_padding(128, 512.0, swap_ab=False, fp8_activations=False)  # decoded weights
    assert not moe_zero_padding(128, 2048.0, swap_ab=False, fp8_activations=True)  # Mixtral at 8192 tokens
    assert not moe_zero_padding(32, 32.0, swap_ab=True, fp8_activations=False)


@pytest.mark.parametrize("fmt", [F.FP8_CHANNEL, F.FP8_TENSOR, F.FP8_BLOCK, F.MXFP8])
@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("block_n", [32, 64])
def test_weight_rows_kernel_matches_reference(fmt, gated, block_n) -> None:
    """The swapped-operand kernel (weights as the MMA's left operand) under the same bound: ragged N tail
    (80 rows, tiles of 32 or 64), a K tail (160 = 128 + 32), padding rows, experts with nothing."""
    experts, n, k, tokens, top_k = 6, 80, 160, 7, 2
    weights = _stack(fmt, experts, 2 * n if gated else n, k, seed=21)
    routing, index = _routing(tokens, experts, top_k, seed=22, only=[0, 2, 3, 5])
    x = _x(tokens if gated else tokens * top_k, k, seed=23)
    groups = group_tokens(index, experts, 16)
    out = torch.zeros(tokens * top_k, n, dtype=torch.bfloat16, device=DEVICE)
    moe_grouped_gemm_triton(
        x, None, weights, groups, out, gated=gated, gather_top_k=top_k if gated else None,
        routing_weights=None if gated else routing.reshape(-1), config=GemmConfig(16, block_n, 128, 1, 4, 2),
        swap_ab=True,
    )  # fmt: skip
    reference = _gemm_reference(x, weights, index, gated, gated, None if gated else routing)
    _assert_one_ulp(out, reference)


def test_weight_rows_kernel_refuses_fp8_activations() -> None:
    weights = _stack(F.FP8_CHANNEL, 2, 64, 128, seed=0)
    _, index = _routing(3, 2, 1, seed=0)
    quantized = quantize_fp8_reference(_x(3, 128, seed=0), FP8_ACTIVATION_GRANULARITY[A.FP8_TOKEN])
    out = torch.zeros(3, 64, dtype=torch.bfloat16, device=DEVICE)
    with pytest.raises(GemmInputError, match="weight-rows kernel takes bf16/fp16"):
        moe_grouped_gemm_triton(
            quantized.data, quantized.scale, weights, group_tokens(index, 2, 16), out, gated=False,
            gather_top_k=None, activation=A.FP8_TOKEN, swap_ab=True,
        )  # fmt: skip


@pytest.mark.parametrize(("fmt", "activation"), [(F.FP8_CHANNEL, A.NONE), (F.MXFP8, A.MX_ROUND_UP)])
def test_experts_forward_through_the_weight_rows_kernel(fmt, activation) -> None:
    """The whole forward where the launcher picks the swapped kernel (it does for 128-row blocks), under the
    whole-forward bounds."""
    # MX activations are rounded before the GEMMs, which then see bf16 values (activation NONE)
    assert moe_swap_ab(128, A.NONE, fmt, gated=True)
    experts, hidden, inter, top_k, tokens = 8, 64, 96, 2, 9
    gate_up = _stack(fmt, experts, 2 * inter, hidden, seed=24)
    down = _stack(fmt, experts, hidden, inter, seed=25)
    routing, index = _routing(tokens, experts, top_k, seed=26)
    x = _x(tokens, hidden, seed=27)
    reference = moe_experts_reference(x, index, routing, gate_up, down, activation).float()
    out = moe_experts_triton(x, index, routing, gate_up, down, activation, block_m=128).float()
    if activation is A.NONE:
        assert (out - reference).abs().max() <= (2 * top_k + 1) * ULP * reference.abs().max()
    else:
        assert (out - reference).norm() <= 2.0**-5 * reference.norm()


# --------------------------------------------------------------------------------------- whole forward


@pytest.mark.parametrize(("fmt", "activation"), COMBOS)
@pytest.mark.parametrize(("tokens", "only"), [(1, None), (9, [1, 5])])
def test_experts_forward_matches_reference(fmt, activation, tokens, only) -> None:
    experts, hidden, inter, top_k = 8, 64, 96, 2
    gate_up = _stack(fmt, experts, 2 * inter, hidden, seed=4)
    down = _stack(fmt, experts, hidden, inter, seed=5)
    routing, index = _routing(tokens, experts, top_k, seed=6, only=only)
    x = _x(tokens, hidden, seed=7)
    reference = moe_experts_reference(x, index, routing, gate_up, down, activation).float()
    out = moe_experts_triton(x, index, routing, gate_up, down, activation).float()
    assert out.shape == (tokens, hidden) and out.dtype == torch.float32
    if activation is A.NONE:
        assert (out - reference).abs().max() <= (2 * top_k + 1) * ULP * reference.abs().max()
    else:
        assert (out - reference).norm() <= 2.0**-5 * reference.norm()


@pytest.mark.parametrize("activation", [A.MX_ROUND_UP, A.MX_FLOOR])
@pytest.mark.parametrize("tokens", [1, 9])
def test_aligned_forward_matches_its_reference(activation, tokens) -> None:
    """The aligned MXFP8 W8A8 path (stacks regrouped to 128x128 power-of-two tiles, activations over 1x128
    groups, the block-scaled FP8 grouped GEMM) against its own reference under the quantized-activation
    bound; with the round-up rule that reference against exact MXFP8 under the same bound (mx_regroup moves
    only elements below E4M3's normal range at the common scale). The floor rule makes MXFP8 clip the top
    binade of 32-blocks that the 1x128 groups round: the two differ by more there (test_mx_regroup bounds it
    per output of a Linear from the measured operand differences). Inter = 192 gives the down GEMM a ragged
    last 128-group."""
    experts, hidden, inter, top_k = 4, 256, 192, 2
    gate_up = _stack(F.MXFP8, experts, 2 * inter, hidden, seed=31)
    down = _stack(F.MXFP8, experts, hidden, inter, seed=32)
    routing, index = _routing(tokens, experts, top_k, seed=33)
    x = _x(tokens, hidden, seed=34)
    reference = moe_experts_reference(x, index, routing, gate_up, down, activation, aligned=True).float()
    out = moe_experts_triton(x, index, routing, gate_up, down, activation, aligned=True).float()
    assert (out - reference).norm() <= 2.0**-5 * reference.norm()
    exact = moe_experts_reference(x, index, routing, gate_up, down, activation).float()
    if activation is A.MX_ROUND_UP:
        assert (reference - exact).norm() <= 2.0**-5 * exact.norm()


@pytest.mark.parametrize("tokens", [1, 9])
def test_tile_aligned_stacks_skip_the_regrouping(tokens) -> None:
    """Stacks stored tile-aligned, given with their tile scales, run the block-scaled path as stored at any
    token count: the aligned reference's result (regrouping them changes nothing)."""
    from mxrun.kernels.mx_regroup import align_mxfp8, aligned_tile_scales

    experts, hidden, inter, top_k = 4, 256, 192, 2
    stacks = []
    for n, k, seed in ((2 * inter, hidden, 44), (hidden, inter, 45)):
        plain = _stack(F.MXFP8, experts, n, k, seed=seed)
        aligned = align_mxfp8(plain.data, plain.scale)
        stacks.append(
            (
                ExpertWeights(aligned.data, aligned.scale_e8m0, F.MXFP8),
                aligned_tile_scales(aligned.scale_e8m0, n, k),
            )
        )
    (gate_up, gate_up_tiles), (down, down_tiles) = stacks
    routing, index = _routing(tokens, experts, top_k, seed=46)
    x = _x(tokens, hidden, seed=47)
    reference = moe_experts_reference(x, index, routing, gate_up, down, A.MX_ROUND_UP, aligned=True).float()
    out = moe_experts_triton(
        x, index, routing, gate_up, down, A.MX_ROUND_UP, tile_scales=(gate_up_tiles, down_tiles)
    ).float()
    assert (out - reference).norm() <= 2.0**-5 * reference.norm()
    with pytest.raises(GemmInputError, match="tile_scales go with MXFP8"):
        block = _stack(F.FP8_BLOCK, experts, 2 * inter, hidden, seed=48)
        moe_experts_triton(
            x, index, routing, block, down, A.MX_ROUND_UP, tile_scales=(gate_up_tiles, down_tiles)
        )


def test_aligned_path_choice() -> None:
    """Taken for MXFP8 W8A8 with many pairs per expert and stacks under the size cap only; the reference
    refuses it for anything else."""
    from mxrun.kernels import moe_gemm

    gate_up = _stack(F.MXFP8, 2, 64, 64, seed=35)
    down = _stack(F.MXFP8, 2, 64, 32, seed=36)
    many = moe_gemm.MOE_ALIGNED_MIN_PAIRS_PER_EXPERT * 2
    assert moe_aligned(many, gate_up, down, A.MX_ROUND_UP)
    assert not moe_aligned(many - 1, gate_up, down, A.MX_ROUND_UP)
    assert not moe_aligned(many, gate_up, down, A.NONE)
    block = _stack(F.FP8_BLOCK, 2, 64, 64, seed=37)
    assert not moe_aligned(many, block, down, A.MX_ROUND_UP)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(moe_gemm, "MOE_ALIGNED_MAX_BYTES", gate_up.data.numel())
        assert not moe_aligned(many, gate_up, down, A.MX_ROUND_UP)
    x = _x(3, 64, seed=38)
    routing, index = _routing(3, 2, 1, seed=39)
    with pytest.raises(GemmInputError, match="aligned needs MXFP8"):
        moe_experts_reference(x, index, routing, gate_up, down, A.NONE, aligned=True)


def test_dropped_pairs_and_empty_input() -> None:
    experts, hidden, inter = 4, 64, 64
    gate_up = _stack(F.FP8_CHANNEL, experts, 2 * inter, hidden, seed=8)
    down = _stack(F.FP8_CHANNEL, experts, hidden, inter, seed=9)
    routing, index = _routing(5, experts, 2, seed=10)
    index[1, 0] = experts  # an expert-parallel sentinel: this pair contributes nothing
    x = _x(5, hidden, seed=11)
    reference = moe_experts_reference(x, index, routing, gate_up, down)
    out = moe_experts_triton(x, index, routing, gate_up, down)
    assert (out.float() - reference.float()).abs().max() <= 5 * ULP * reference.float().abs().max()
    kept = index.clone()
    kept[1, 0] = index[1, 1]
    only_second = routing.clone()
    only_second[1, 0] = 0.0  # the same token with the dropped slot's weight zeroed
    assert torch.equal(out[1], moe_experts_triton(x, kept, only_second, gate_up, down)[1])
    empty = moe_experts_triton(x[:0], index[:0], routing[:0], gate_up, down)
    assert empty.shape == (0, hidden)


@pytest.mark.parametrize(("fmt", "activation"), [(F.FP8_BLOCK, A.NONE), (F.FP8_CHANNEL, A.FP8_GROUP)])
def test_per_128_scales_need_128_wide_k_steps(fmt, activation) -> None:
    """The kernel reads one weight-block / activation-group scale per K step: a wider step would silently use
    the wrong scales, so the launcher refuses it."""
    weights = _stack(fmt, 2, 64, 256, seed=0)
    _, index = _routing(3, 2, 1, seed=0)
    x = _x(3, 256, seed=0)
    a, a_scale = x, None
    if activation.is_fp8:
        quantized = quantize_fp8_reference(x, FP8_ACTIVATION_GRANULARITY[activation])
        a, a_scale = quantized.data, quantized.scale
    out = torch.zeros(3, 64, dtype=torch.bfloat16, device=DEVICE)
    with pytest.raises(GemmInputError, match="need block_k 128"):
        moe_grouped_gemm_triton(
            a, a_scale, weights, group_tokens(index, 2, 16), out, gated=False, gather_top_k=None,
            activation=activation, config=GemmConfig(16, 32, 256, 1, 4, 2),
        )  # fmt: skip


def test_wrong_shapes_are_refused() -> None:
    gate_up = _stack(F.FP8_CHANNEL, 2, 64, 32, seed=0)
    down = _stack(F.FP8_CHANNEL, 2, 32, 16, seed=0)
    routing, index = _routing(3, 2, 1, seed=0)
    with pytest.raises(ValueError, match=r"down must be \[E=2, H=32, I=32\]"):
        moe_experts_reference(_x(3, 32, 0), index, routing, gate_up, down)
    with pytest.raises(ValueError, match=r"gate_up must be \[E, 2I, H=48\]"):
        moe_experts_reference(_x(3, 48, 0), index, routing, gate_up, down)


# ---------------------------------------------------------------------------------------------- GPU only


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize(("fmt", "activation"), COMBOS)
@pytest.mark.parametrize("tokens", [1, 128, 300])  # 128: 32 pairs per expert, spilling 32- or 64-row blocks
def test_gpu_larger_layer(fmt, activation, tokens) -> None:
    experts, hidden, inter, top_k = 16, 1024, 768, 4
    gate_up = _stack(fmt, experts, 2 * inter, hidden, seed=12)
    down = _stack(fmt, experts, hidden, inter, seed=13)
    routing, index = _routing(tokens, experts, top_k, seed=14)
    x = _x(tokens, hidden, seed=15)
    reference = moe_experts_reference(x, index, routing, gate_up, down, activation).float()
    out = moe_experts_triton(x, index, routing, gate_up, down, activation).float()
    if activation is A.NONE:
        assert (out - reference).abs().max() <= (2 * top_k + 1) * ULP * reference.abs().max()
    else:
        assert (out - reference).norm() <= 2.0**-5 * reference.norm()


@pytest.mark.gpu
@pytest.mark.skipif(
    not CUDA or torch.cuda.get_device_capability()[0] < 9, reason="the folded MX decode is PTX for sm_90+"
)
@pytest.mark.parametrize("swap_ab", [False, True])
@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("codes", ["every", "realistic"])
def test_gpu_mx_scale_fold_gives_the_same_bits(swap_ab, gated, codes) -> None:
    """Both grouped GEMMs with the MX powers of two folded into the E4M3 widening give bit for bit the output of
    the fp32 decode, over every foldable E8M0 code and over a quantized weight's own, with a K tail and padding
    rows; and the whole experts forward with MX activations too."""
    from mxrun.kernels.e4m3 import MX_FOLD_MAX_CODE

    experts, n, k, tokens, top_k = 6, 80, 160, 9, 2
    weights = _stack(F.MXFP8, experts, 2 * n if gated else n, k, seed=31)
    if codes == "every":
        g = torch.Generator().manual_seed(32)
        scale = torch.randint(0, MX_FOLD_MAX_CODE + 1, weights.scale.shape, generator=g, dtype=torch.uint8)
        weights = ExpertWeights(weights.data, scale.to(DEVICE).view(weights.scale.dtype), weights.format)
    routing, index = _routing(tokens, experts, top_k, seed=33, only=[0, 2, 3, 5])
    x = _x(tokens if gated else tokens * top_k, k, seed=34) * (2.0**-20 if codes == "every" else 1.0)
    groups = group_tokens(index, experts, 16)

    def run(fold: bool) -> torch.Tensor:
        out = torch.zeros(tokens * top_k, n, dtype=torch.bfloat16, device=DEVICE)
        return moe_grouped_gemm_triton(
            x, None, weights, groups, out, gated=gated, gather_top_k=top_k if gated else None,
            routing_weights=None if gated else routing.reshape(-1), config=GemmConfig(16, 32, 128, 1, 4, 2),
            swap_ab=swap_ab, mx_scale_fold=fold,
        )  # fmt: skip

    assert torch.equal(run(True).view(torch.int16), run(False).view(torch.int16))
    if gated and not swap_ab and codes == "realistic":
        gate_up = _stack(F.MXFP8, experts, 2 * 96, k, seed=35)  # inter 96: K of the down GEMM, 32 | 96
        down = _stack(F.MXFP8, experts, k, 96, seed=36)
        xs = _x(tokens, k, seed=37)
        fwd = lambda fold: moe_experts_triton(  # noqa: E731
            xs, index, routing, gate_up, down, A.MX_ROUND_UP, aligned=False, mx_scales_foldable=fold
        )
        assert torch.equal(fwd(True).view(torch.int16), fwd(False).view(torch.int16))


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_gpu_aligned_path_at_many_tokens() -> None:
    """Enough tokens per expert that the launcher picks the aligned path by itself (128-row blocks, TMA-free
    grouped FP8 GEMM), against the aligned reference."""
    from mxrun.kernels.moe_gemm import MOE_ALIGNED_MIN_PAIRS_PER_EXPERT

    experts, hidden, inter, top_k = 4, 1024, 768, 2
    tokens = MOE_ALIGNED_MIN_PAIRS_PER_EXPERT * experts // top_k + 17
    gate_up = _stack(F.MXFP8, experts, 2 * inter, hidden, seed=40)
    down = _stack(F.MXFP8, experts, hidden, inter, seed=41)
    routing, index = _routing(tokens, experts, top_k, seed=42)
    x = _x(tokens, hidden, seed=43)
    assert moe_aligned(tokens * top_k, gate_up, down, A.MX_ROUND_UP)
    reference = moe_experts_reference(x, index, routing, gate_up, down, A.MX_ROUND_UP, aligned=True).float()
    out = moe_experts_triton(x, index, routing, gate_up, down, A.MX_ROUND_UP).float()
    assert (out - reference).norm() <= 2.0**-5 * reference.norm()


def assert_no_sync_and_no_recompile(kernel, fmt, token_counts: tuple[int, ...], check=None) -> None:
    """The experts forward (8 experts, top-2, weights of ``fmt``) at each of ``token_counts`` (one bucket)
    neither synchronizes with the host nor, after the first, compiles ``kernel`` again. ``check(x, tokens,
    gate_up, down)`` runs first at each count (e.g. that the expected kernel is chosen)."""
    experts, hidden, inter, top_k = 8, 256, 128, 2
    gate_up = _stack(fmt, experts, 2 * inter, hidden, seed=16)
    down = _stack(fmt, experts, hidden, inter, seed=17)

    def run(tokens: int) -> None:
        routing, index = _routing(tokens, experts, top_k, seed=tokens)
        x = _x(tokens, hidden, seed=tokens)
        if check is not None:
            check(x, tokens * top_k, gate_up, down)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            moe_experts_triton(x, index, routing, gate_up, down)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()

    run(token_counts[0])  # compiles
    caches = getattr(kernel, "device_caches", None)
    if caches is None:
        pytest.skip("this Triton keeps its kernel cache elsewhere")

    def compiled() -> int:
        return sum(len(cache[0]) for cache in caches.values())

    before = compiled()
    for tokens in token_counts[1:]:
        run(tokens)
    assert compiled() == before


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_gpu_no_host_sync_and_no_recompile_within_a_bucket() -> None:
    from mxrun.kernels.moe_gemm import _moe_grouped_gemm_kernel

    # the same bucket; pair counts not multiples of 16 (Triton's specialisation)
    assert_no_sync_and_no_recompile(_moe_grouped_gemm_kernel, F.MXFP8, (17, 23, 29, 37))
