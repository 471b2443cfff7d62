"""Resolution of a recipe against layers: decisions, sources, model-aware warnings, fused groups, policy."""

from pathlib import Path
from textwrap import dedent

from mxrun.engine.layers import Layer, LayerKind
from mxrun.engine.loader import load_recipe_or_raise
from mxrun.engine.plan import Decision, resolve_layers

L, E = LayerKind.LINEAR, LayerKind.MOE_EXPERTS


def _moe_layers(hidden: int = 64, inter: int = 32, experts: int = 4) -> list[Layer]:
    layers = []
    for i in range(2):
        p = f"model.layers.{i}"
        for proj, n in (("q", hidden), ("k", hidden // 2), ("v", hidden // 2)):
            layers.append(
                Layer(f"{p}.self_attn.{proj}_proj", L, (n, hidden), "bfloat16", f"{p}.self_attn.qkv")
            )
        layers.append(Layer(f"{p}.self_attn.o_proj", L, (hidden, hidden), "bfloat16"))
        layers.append(Layer(f"{p}.mlp.gate", L, (experts, hidden), "bfloat16"))
        layers.append(
            Layer(
                f"{p}.mlp.experts.gate_up_proj",
                E,
                (experts, 2 * inter, hidden),
                "bfloat16",
                f"{p}.mlp.experts",
            )
        )
        layers.append(
            Layer(f"{p}.mlp.experts.down_proj", E, (experts, hidden, inter), "bfloat16", f"{p}.mlp.experts")
        )
    layers.append(Layer("lm_head", L, (1000, hidden), "bfloat16"))
    return layers


def _recipe(tmp_path: Path, body: str):
    path = tmp_path / "r.yaml"
    path.write_text("version: 1\nname: r\ndescription: r\n" + dedent(body))
    return load_recipe_or_raise(path)


def test_builtin_mixed_recipe_decides_every_layer() -> None:
    plan = resolve_layers(load_recipe_or_raise("mixed-moe"), _moe_layers())
    assert plan.diagnostics == ()
    by_name = {e.layer.name: e for e in plan.entries}
    assert by_name["model.layers.0.self_attn.q_proj"].scheme.name == "attention"
    assert by_name["model.layers.1.mlp.experts.down_proj"].scheme.name == "experts"
    assert by_name["model.layers.0.mlp.gate"].decision is Decision.SKIPPED
    assert by_name["lm_head"].decision is Decision.SKIPPED
    assert by_name["model.layers.0.self_attn.q_proj"].source.endswith("mixed-moe.yaml:26:5")
    summary = plan.summary()
    assert summary["quantized"] == 12 and summary["layers"] == 15
    assert summary["bytes_after"] < summary["bytes_before"]
    assert plan.to_json()["fingerprint"] == plan.recipe.fingerprint


def test_rule_and_skip_that_match_nothing_warn_at_their_position(tmp_path: Path) -> None:
    recipe = _recipe(
        tmp_path,
        """\
        rules:
          - {name: typo, match: 'model\\.layer\\.\\d+\\..*', scheme: mxfp8}
          - {name: all, match: '.*', scheme: fp8-channel}
        skip:
          - 'lm_head'
          - 'output_layer'
        """,
    )
    plan = resolve_layers(recipe, _moe_layers())
    lines = [d.format() for d in plan.diagnostics]
    assert lines == [
        f"{tmp_path}/r.yaml:5:25: warning: rule 'typo' matches no layer of this model (patterns full-match "
        "the whole layer name; prefix with '.*' to match a suffix)",
        f"{tmp_path}/r.yaml:9:5: warning: skip 'output_layer' matches no layer of this model (only Linear "
        "and MoE expert weights are layers; embeddings and norms are never quantized)",
    ]


def test_rule_whose_matches_are_all_taken_is_shadowed(tmp_path: Path) -> None:
    recipe = _recipe(
        tmp_path,
        """\
        rules:
          - {name: attn, match: '.*self_attn.*', scheme: fp8-channel}
          - {name: q-only, match: '.*q_proj', scheme: mxfp8}
          - {name: rest, match: '.*', scheme: mxfp8}
        """,
    )
    plan = resolve_layers(recipe, _moe_layers())
    (diag,) = plan.diagnostics
    assert diag.code == "rule-shadowed" and "'q-only' matches 2 layer(s)" in diag.message
    assert diag.position.line == 6


def test_split_fused_group_is_an_error_naming_group_and_rules(tmp_path: Path) -> None:
    recipe = _recipe(
        tmp_path,
        """\
        rules:
          - {name: q, match: '.*q_proj', scheme: mxfp8}
          - {name: all, match: '.*', scheme: fp8-channel}
        """,
    )
    plan = resolve_layers(recipe, _moe_layers())
    errors = [d for d in plan.diagnostics if d.code == "split-group"]
    assert len(errors) == 2  # one per attention block
    message = errors[0].message
    assert "fused group model.layers.0.self_attn.qkv" in message
    assert "q_proj -> mxfp8 by" in message and "k_proj -> fp8-channel by" in message


def test_experts_split_by_skip_is_an_error(tmp_path: Path) -> None:
    recipe = _recipe(
        tmp_path,
        """\
        rules:
          - {match: '.*', scheme: mxfp8}
        skip:
          - '.*experts\\.down_proj'
        """,
    )
    codes = [d.code for d in resolve_layers(recipe, _moe_layers()).diagnostics]
    assert codes.count("split-group") == 2


def test_unsupported_layers_follow_policy(tmp_path: Path) -> None:
    odd = [Layer("a", L, (64, 100), "bfloat16"), Layer("b", L, (64, 128), "float16")]
    skip_plan = resolve_layers(_recipe(tmp_path, "rules:\n  - {match: '.*', scheme: mxfp8}\n"), odd)
    assert [e.decision for e in skip_plan.entries] == [Decision.UNSUPPORTED, Decision.QUANTIZE]
    (warning,) = skip_plan.diagnostics
    assert (
        warning.code == "unsupported-layers"
        and "cannot serve 1 layer(s), left unquantized: a" in warning.message
    )
    assert skip_plan.entries[0].bytes_after == skip_plan.entries[0].bytes_before

    error_plan = resolve_layers(
        _recipe(tmp_path, "on_unsupported: error\nrules:\n  - {match: '.*', scheme: mxfp8}\n"), odd
    )
    errors = [d for d in error_plan.diagnostics if d.severity.value == "error"]
    assert len(errors) == 1 and errors[0].message.startswith("layer a: scheme 'mxfp8' cannot serve it")


def test_builtin_recipes_do_not_warn_about_generic_skips() -> None:
    dense = [Layer("model.layers.0.mlp.up_proj", L, (128, 64), "bfloat16")]
    plan = resolve_layers(load_recipe_or_raise("fp8-channel"), dense)
    assert plan.diagnostics == ()


def test_unsupported_member_leaves_its_whole_group_unquantized(tmp_path: Path) -> None:
    layers = _moe_layers(hidden=64, inter=48)  # experts.down_proj has in_features 48: not a multiple of 32
    plan = resolve_layers(_recipe(tmp_path, "rules:\n  - {match: '.*experts.*', scheme: mxfp8}\n"), layers)
    assert [d.code for d in plan.diagnostics] == ["unsupported-layers"]
    gate_up = plan.entry("model.layers.0.mlp.experts.gate_up_proj")
    assert gate_up.decision is Decision.UNSUPPORTED
    assert "fused group model.layers.0.mlp.experts has a member" in gate_up.reason
    assert "cannot serve 4 layer(s)" in plan.diagnostics[0].message
