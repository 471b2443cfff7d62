"""Matching semantics: full match, first match wins, skips win, kind filters; RE2 agrees with Python's re."""

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mxrun.engine.layers import LayerKind
from mxrun.engine.matching import Matcher
from mxrun.engine.patterns import PatternError, PatternSet, check_pattern
from mxrun.engine.recipe import Recipe, Rule, SkipRule
from mxrun.engine.schemes import preset_scheme

LINEAR, EXPERTS = LayerKind.LINEAR, LayerKind.MOE_EXPERTS


def _recipe(rules: list[Rule], skips: list[SkipRule] = ()) -> Recipe:
    schemes = {name: preset_scheme(name) for name in ("mxfp8", "fp8-channel", "fp8-block")}
    return Recipe(1, "t", "t", schemes, tuple(rules), tuple(skips))


def test_patterns_full_match_the_name() -> None:
    matcher = Matcher(_recipe([Rule("r", "q_proj", "mxfp8")]))
    assert matcher.explain("q_proj", LINEAR).winner is not None
    # neither a prefix nor a suffix match counts: the peers that search or anchor only the start differ here
    assert matcher.explain("model.layers.0.self_attn.q_proj", LINEAR).winner is None
    assert matcher.explain("q_proj_extra", LINEAR).winner is None


def test_first_matching_rule_wins_and_explanation_says_why() -> None:
    rules = [Rule("experts", ".*experts.*", "mxfp8"), Rule("all", ".*", "fp8-channel")]
    why = Matcher(_recipe(rules)).explain("model.layers.0.mlp.experts.gate_up_proj", EXPERTS)
    assert why.winner is not None and why.winner.name == "experts"
    assert [r.name for r in why.matched] == ["experts", "all"]
    text = "\n".join(why.lines())
    assert "matches first -> scheme 'mxfp8'" in text
    assert "'experts' comes earlier (first match wins)" in text


def test_explanation_says_what_the_scheme_computes() -> None:
    """The winner's scheme in one line, ``min_rows`` included; nothing for a skipped layer."""
    from mxrun.engine.schemes import build_scheme

    decode, _ = build_scheme("decode", {"preset": "mxfp8", "activations": {"min_rows": 65}})
    recipe = _recipe([Rule("all", ".*", "decode")], [SkipRule("lm_head")])
    recipe = Recipe(**{**vars(recipe), "schemes": {**recipe.schemes, "decode": decode}})
    text = "\n".join(Matcher(recipe).explain("model.layers.0.mlp.down_proj", LINEAR).lines())
    assert "scheme   'decode': MXFP8 weights (E8M0 per 32, round_up); MXFP8 activations (round_up)" in text
    assert "from 65 rows (fewer rows run weight-only)" in text
    assert "scheme   " not in "\n".join(Matcher(recipe).explain("lm_head", LINEAR).lines())
    block = preset_scheme("fp8-block").describe()
    assert block == "FP8 weights, one scale per 128x128 block; FP8 activations, one scale per 1x128 group"
    assert (
        preset_scheme("fp8-channel-weight-only")
        .describe()
        .endswith("activations stay bf16/fp16 (weight-only)")
    )


def test_skip_wins_over_an_earlier_rule() -> None:
    why = Matcher(_recipe([Rule("all", ".*", "mxfp8")], [SkipRule("lm_head")])).explain("lm_head", LINEAR)
    assert why.winner is None and why.skips
    assert "skips always win" in "\n".join(why.lines())


def test_kind_filter() -> None:
    rules = [Rule("experts-only", ".*", "mxfp8", frozenset({EXPERTS})), Rule("rest", ".*", "fp8-channel")]
    matcher = Matcher(_recipe(rules))
    assert matcher.explain("a.experts.down_proj", EXPERTS).winner.name == "experts-only"
    why = matcher.explain("a.q_proj", LINEAR)
    assert why.winner.name == "rest"
    assert [r.name for r in why.kind_filtered] == ["experts-only"]
    assert "kind 'linear' is not in [moe_experts]" in "\n".join(why.lines())


def test_skip_kind_filter() -> None:
    skip = SkipRule(".*gate", frozenset({LINEAR}))
    matcher = Matcher(_recipe([Rule("all", ".*", "mxfp8")], [skip]))
    assert matcher.explain("m.gate", LINEAR).winner is None
    assert matcher.explain("m.gate", EXPERTS).winner is not None


def test_hostile_patterns_run_in_linear_time() -> None:
    # Catastrophic for a backtracking engine: (a+)+$ against 'aaaa...b'. RE2 answers at once.
    patterns = PatternSet(["(a+)+", "(a|aa)+", "(.*a){20}"])
    assert patterns.match("a" * 50_000 + "b") == []
    assert patterns.match("a" * 30) == [0, 1, 2]


@pytest.mark.parametrize("pattern", ["(?=a)", "(?<!x)y", r"(a)\1"])
def test_backtracking_only_features_are_refused(pattern: str) -> None:
    with pytest.raises(PatternError, match="RE2"):
        check_pattern(pattern)


def test_syntax_error_offset() -> None:
    with pytest.raises(PatternError) as info:
        check_pattern("abc[")
    assert info.value.offset == 3


_ATOMS = ["a", "b", ".", r"\.", r"\d", "[ab]", "(a|b)", "(a.b)", "x"]


@st.composite
def _patterns(draw: st.DrawFn) -> str:
    parts = draw(st.lists(st.sampled_from(_ATOMS), min_size=1, max_size=5))
    quant = draw(
        st.lists(st.sampled_from(["", "*", "+", "?", "{2}"]), min_size=len(parts), max_size=len(parts))
    )
    return "".join(p + q for p, q in zip(parts, quant, strict=True))


@settings(max_examples=200, deadline=None)
@given(
    patterns=st.lists(_patterns(), min_size=1, max_size=6),
    names=st.lists(st.text(alphabet="ab.x1", max_size=8), min_size=1, max_size=10),
)
def test_pattern_set_agrees_with_python_re_fullmatch(patterns: list[str], names: list[str]) -> None:
    pattern_set = PatternSet(patterns)
    for name in names:
        expected = [i for i, p in enumerate(patterns) if re.fullmatch(p, name)]
        assert pattern_set.match(name) == expected


@settings(max_examples=150, deadline=None)
@given(
    rules=st.lists(st.tuples(_patterns(), st.sampled_from([None, LINEAR, EXPERTS])), min_size=1, max_size=5),
    skips=st.lists(_patterns(), max_size=2),
    name=st.text(alphabet="ab.x1", max_size=8),
    kind=st.sampled_from([LINEAR, EXPERTS]),
)
def test_winner_is_first_admitting_full_match_unless_skipped(rules, skips, name, kind) -> None:
    recipe_rules = [
        Rule(f"r{i}", p, "mxfp8", None if k is None else frozenset({k})) for i, (p, k) in enumerate(rules)
    ]
    why = Matcher(_recipe(recipe_rules, [SkipRule(p) for p in skips])).explain(name, kind)
    if any(re.fullmatch(p, name) for p in skips):
        assert why.winner is None and why.skips
        return
    expected = next((r for r in recipe_rules if re.fullmatch(r.pattern, name) and r.admits(kind)), None)
    assert why.winner == expected
