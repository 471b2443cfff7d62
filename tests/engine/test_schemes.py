"""Schemes: presets, field-by-field overrides, invalid combinations, what a scheme can serve, bytes."""

import pytest

from mxrun.engine.layers import Layer, LayerKind
from mxrun.engine.schemes import (
    PRESETS,
    ActivationGranularity,
    PartialBlocks,
    ScaleRule,
    SchemeFamily,
    WeightGranularity,
    build_scheme,
    preset_scheme,
    quantized_weight_bytes,
)


def _layer(n: int, k: int, experts: int | None = None) -> Layer:
    shape = (n, k) if experts is None else (experts, n, k)
    kind = LayerKind.LINEAR if experts is None else LayerKind.MOE_EXPERTS
    return Layer("x", kind, shape, "bfloat16")


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_resolves(name: str) -> None:
    scheme = preset_scheme(name)
    assert scheme.weight_only == name.endswith("-weight-only")


def test_preset_families_and_fields() -> None:
    assert preset_scheme("fp8-tensor").family is SchemeFamily.FP8_TENSOR
    channel = preset_scheme("fp8-channel")
    assert channel.family is SchemeFamily.FP8_CHANNEL
    assert channel.activations.granularity is ActivationGranularity.TOKEN
    block = preset_scheme("fp8-block")
    assert block.weights.block_size == (128, 128)
    assert (
        block.activations.granularity is ActivationGranularity.GROUP and block.activations.group_size == 128
    )
    mx = preset_scheme("mxfp8")
    assert mx.weights.scale_rule is ScaleRule.ROUND_UP
    assert mx.activations.group_size == 32 and mx.activations.scale_rule is ScaleRule.ROUND_UP


def test_override_one_field_keeps_the_rest() -> None:
    scheme, problems = build_scheme("x", {"preset": "mxfp8", "weights": {"scale_rule": "floor"}})
    assert problems == []
    assert scheme.weights.scale_rule is ScaleRule.FLOOR
    assert scheme.weights.granularity is WeightGranularity.MX
    assert scheme.activations.scale_rule is ScaleRule.ROUND_UP  # activations untouched


def test_tile_aligned_is_recorded_only_when_set() -> None:
    """``tile_aligned: true`` changes the stored bits, so it is part of the scheme (plans, fingerprints);
    ``false`` is the default and leaves both exactly as without the key."""
    aligned, problems = build_scheme("x", {"preset": "mxfp8", "weights": {"tile_aligned": True}})
    assert problems == [] and aligned.weights.tile_aligned is True
    assert aligned.weights.to_json()["tile_aligned"] is True
    plain, _ = build_scheme("x", {"preset": "mxfp8", "weights": {"tile_aligned": False}})
    assert plain == build_scheme("x", {"preset": "mxfp8"})[0]
    assert "tile_aligned" not in plain.weights.to_json()


def test_min_rows_is_recorded_only_above_one() -> None:
    """``activations.min_rows`` changes what a call computes below it, so a value above 1 is part of the scheme
    (plans, fingerprints, exports); 1 is the default (every call quantized) and leaves the scheme as without it."""
    decode, problems = build_scheme("x", {"preset": "mxfp8", "activations": {"min_rows": 65}})
    assert problems == [] and decode.activations.min_rows == 65
    assert decode.activations.to_json()["min_rows"] == 65
    assert decode.activations.scale_rule is ScaleRule.ROUND_UP  # the preset's other fields kept
    assert [decode.activations.quantizes(rows) for rows in (1, 64, 65, 4096)] == [False, False, True, True]
    plain, _ = build_scheme("x", {"preset": "mxfp8", "activations": {"min_rows": 1}})
    assert plain == build_scheme("x", {"preset": "mxfp8"})[0]
    assert "min_rows" not in plain.activations.to_json() and plain.activations.quantizes(1)


def test_activations_null_makes_weight_only() -> None:
    scheme, _ = build_scheme("x", {"preset": "fp8-channel", "activations": None})
    assert scheme.weight_only and scheme.family is SchemeFamily.FP8_CHANNEL


def test_spelled_out_scheme_without_preset() -> None:
    scheme, problems = build_scheme(
        "x",
        {
            "weights": {"granularity": "block", "block_size": [64, 128]},
            "activations": {"granularity": "group", "group_size": 128},
        },
    )
    assert problems == [] and scheme.weights.block_size == (64, 128)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"weights": {"format": "fp8_e4m3"}}, "no weight granularity"),
        ({"preset": "mxfp8", "weights": {"block_size": [1, 1]}}, "`block_size` applies only to `block`"),
        ({"preset": "fp8-channel", "weights": {"scale_rule": "floor"}}, "`scale_rule` applies only to `mx`"),
        ({"preset": "fp8-block", "weights": {"tile_aligned": True}}, "`tile_aligned` applies only to `mx`"),
        ({"preset": "fp8-block", "activations": {"group_size": 64}}, "must equal the weight block's K"),
        ({"preset": "mxfp8", "activations": {"granularity": "token"}}, "MX activations go with MX weights"),
        (
            {"preset": "fp8-channel", "activations": {"granularity": "mx"}},
            "MX activations go with MX weights",
        ),
        ({"preset": "mxfp8", "activations": {"group_size": 16}}, "always 32"),
        ({"preset": "fp8-channel", "activations": {"group_size": 16}}, "`group_size` applies only"),
        (
            {"preset": "fp8-channel", "activations": {"scale_rule": "floor"}},
            "`scale_rule` applies only to `mx` act",
        ),
    ],
)
def test_invalid_combinations(spec: dict, message: str) -> None:
    scheme, problems = build_scheme("x", spec)
    assert scheme is None
    assert any(message in text for _, text in problems), problems


def test_cannot_serve() -> None:
    assert "not a multiple of 32" in preset_scheme("mxfp8").cannot_serve(_layer(64, 100))
    assert preset_scheme("mxfp8").cannot_serve(_layer(100, 64)) is None  # N is free for MX
    assert preset_scheme("mxfp8-weight-only").cannot_serve(_layer(8, 96, experts=4)) is None
    # block weights allow partial tiles by default, but 1x128 activation groups need K % 128 == 0
    assert preset_scheme("fp8-block-weight-only").cannot_serve(_layer(100, 200)) is None
    assert "activation group 128" in preset_scheme("fp8-block").cannot_serve(_layer(128, 200))
    strict, _ = build_scheme(
        "s", {"preset": "fp8-block-weight-only", "weights": {"partial_blocks": "unsupported"}}
    )
    assert strict.weights.partial_blocks is PartialBlocks.UNSUPPORTED
    assert "not a multiple of the 128x128 block" in strict.cannot_serve(_layer(100, 256))
    assert preset_scheme("fp8-channel").cannot_serve(_layer(7, 9)) is None


def test_quantized_bytes() -> None:
    assert quantized_weight_bytes(preset_scheme("fp8-tensor"), (256, 512)) == 256 * 512 + 4
    assert quantized_weight_bytes(preset_scheme("fp8-channel"), (256, 512)) == 256 * 512 + 4 * 256
    assert quantized_weight_bytes(preset_scheme("fp8-block"), (200, 512)) == 200 * 512 + 4 * 2 * 4
    assert quantized_weight_bytes(preset_scheme("mxfp8"), (4, 256, 512)) == 4 * (256 * 512 + 256 * 16)
