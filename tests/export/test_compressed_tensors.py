"""The scheme mapping against compressed-tensors' own presets and format inference, and back."""

from __future__ import annotations

import pytest
from torch import nn

from mxrun.engine.schemes import PRESETS, build_scheme, preset_scheme
from mxrun.export.compressed_tensors import (
    CtSchemeError,
    build_quantization_config,
    ct_format,
    scheme_from_ct,
    scheme_to_ct,
)

pytest.importorskip("compressed_tensors")
from compressed_tensors.compressors.format import infer_module_format
from compressed_tensors.quantization import (
    QuantizationConfig,
    QuantizationScheme,
    preset_name_to_scheme,
)

# mxrun preset -> the compressed-tensors preset with the same numerics (None: no such preset)
CT_PRESET = {
    "fp8-channel": "FP8_DYNAMIC",
    "fp8-block": "FP8_BLOCK",
    "mxfp8": "MXFP8",
    "mxfp8-weight-only": "MXFP8A16",
}


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_parses_in_compressed_tensors_with_the_format_it_infers(preset: str) -> None:
    group = scheme_to_ct(preset_scheme(preset), ["model.layers.0.self_attn.q_proj"])
    parsed = QuantizationScheme.model_validate(group)
    assert infer_module_format(nn.Linear, parsed.model_copy(update={"format": None})).value == group["format"]
    if preset in CT_PRESET:
        theirs = preset_name_to_scheme(CT_PRESET[preset], group["targets"])
        # compared as written to config.json (a symmetric scheme's zero-point dtype is never written)
        ours_json, theirs_json = parsed.model_dump(mode="json"), theirs.model_dump(mode="json")
        for key in ("weights", "input_activations"):
            assert ours_json[key] == theirs_json[key], key


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_schemes_round_trip_with_and_without_mxrun_record(preset: str) -> None:
    scheme = preset_scheme(preset)
    qc = build_quantization_config([(scheme, ["x"])], [], {"fingerprint": "sha256:0"})
    ((name, group),) = qc["config_groups"].items()
    with_record = scheme_from_ct(name, group, qc["mxrun"]["groups"][name])
    without = scheme_from_ct(name, group)
    for back in (with_record, without):
        assert (back.weights.granularity, back.activations) == (
            scheme.weights.granularity,
            scheme.activations,
        )
        assert back.weights.block_size == scheme.weights.block_size
    assert with_record.weights == scheme.weights and with_record.name == preset


def test_floor_rule_needs_the_mxrun_record() -> None:
    scheme, _ = build_scheme(
        "spec",
        {"preset": "mxfp8", "weights": {"scale_rule": "floor"}, "activations": {"scale_rule": "floor"}},
    )
    qc = build_quantization_config([(scheme, ["x"])], [], {})
    group = qc["config_groups"]["group_0"]
    assert (
        scheme_from_ct("group_0", group, qc["mxrun"]["groups"]["group_0"]).activations == scheme.activations
    )
    assert scheme_from_ct("group_0", group).activations.scale_rule.value == "round_up"  # CT cannot say floor


def test_mixed_formats_and_extra_key_tolerated() -> None:
    qc = build_quantization_config(
        [
            (preset_scheme("fp8-channel"), ["a"]),
            (preset_scheme("mxfp8"), ["b"]),
            (preset_scheme("fp8-tensor-weight-only"), ["c"]),
        ],
        ["lm_head"],
        {"fingerprint": "sha256:0"},
    )
    assert qc["format"] == "mixed-precision"
    assert [g["format"] for g in qc["config_groups"].values()] == [
        "float-quantized",
        "mxfp8-quantized",
        "naive-quantized",
    ]
    parsed = QuantizationConfig.model_validate(qc)
    assert parsed.ignore == ["lm_head"] and len(parsed.config_groups) == 3
    assert ct_format(preset_scheme("mxfp8-weight-only")).value == "mxfp8-quantized"


def test_edited_config_that_disagrees_with_the_record_is_refused() -> None:
    qc = build_quantization_config([(preset_scheme("fp8-channel"), ["a"])], [], {})
    group = qc["config_groups"]["group_0"]
    group["weights"]["strategy"] = "tensor"
    with pytest.raises(CtSchemeError, match=r"group_0\.weights: does not match"):
        scheme_from_ct("group_0", group, qc["mxrun"]["groups"]["group_0"])
    group["input_activations"]["dynamic"] = False
    with pytest.raises(CtSchemeError, match="static activation scales"):
        scheme_from_ct("group_0", group)


def test_min_rows_needs_the_mxrun_record() -> None:
    """``activations.min_rows`` survives export and reload through mxrun's record; compressed-tensors cannot say
    it, so without the record every call is quantized."""
    scheme, _ = build_scheme("decode", {"preset": "fp8-channel", "activations": {"min_rows": 65}})
    qc = build_quantization_config([(scheme, ["x"])], [], {})
    group = qc["config_groups"]["group_0"]
    assert scheme_from_ct("group_0", group, qc["mxrun"]["groups"]["group_0"]).activations.min_rows == 65
    assert scheme_from_ct("group_0", group).activations.min_rows is None
