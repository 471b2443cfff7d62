"""``extends``: merge order, scheme override by name, skip accumulation, chains, cycles, built-in parents."""

import re
from pathlib import Path
from textwrap import dedent

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mxrun.engine.layers import LayerKind
from mxrun.engine.loader import load_recipe
from mxrun.engine.matching import Matcher
from mxrun.engine.schemes import ScaleRule, UnsupportedPolicy


def _write(directory: Path, name: str, body: str) -> Path:
    path = directory / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(dedent(body))
    return path


PARENT = """\
    version: 1
    name: parent
    description: the parent
    on_unsupported: error
    schemes:
      experts: {preset: mxfp8}
      attn: {preset: fp8-channel}
    rules:
      - {name: p-experts, match: '.*experts.*', scheme: experts}
      - {name: p-all, match: '.*', scheme: attn}
    skip:
      - lm_head
"""


def test_child_rules_come_first_and_schemes_override_by_name(tmp_path: Path) -> None:
    _write(tmp_path, "base/parent.yaml", PARENT)
    child = _write(
        tmp_path,
        "team/child.yaml",
        """\
        version: 1
        name: child
        description: the child
        extends: ../base/parent.yaml
        schemes:
          experts:
            preset: mxfp8
            weights: {scale_rule: floor}
        rules:
          - {name: c-attn, match: '.*self_attn.*', scheme: fp8-block}
        skip:
          - {match: '.*router', reason: keep routers}
        """,
    )
    result = load_recipe(child)
    assert result.diagnostics == []
    recipe = result.recipe
    assert recipe is not None
    assert [r.name for r in recipe.rules] == ["c-attn", "p-experts", "p-all"]
    assert recipe.schemes["experts"].weights.scale_rule is ScaleRule.FLOOR  # child's definition wins whole
    assert [s.pattern for s in recipe.skips] == ["lm_head", ".*router"]
    assert recipe.on_unsupported is UnsupportedPolicy.ERROR  # inherited, child did not set it
    assert recipe.name == "child" and recipe.description == "the child"
    assert recipe.files[0].endswith("child.yaml") and recipe.files[1].endswith("parent.yaml")
    # rule origins point into the file that wrote them
    assert recipe.rules[0].origin.file.endswith("child.yaml")
    assert recipe.rules[1].origin.file.endswith("parent.yaml") and recipe.rules[1].origin.line == 9


def test_extends_builtin_by_name(tmp_path: Path) -> None:
    child = _write(
        tmp_path,
        "c.yaml",
        """\
        version: 1
        name: c
        description: mxfp8 but attention per-channel
        extends: mxfp8
        rules:
          - {match: '.*self_attn.*', scheme: fp8-channel}
        """,
    )
    recipe = load_recipe(child).recipe
    assert recipe is not None
    assert [r.scheme for r in recipe.rules] == ["fp8-channel", "mxfp8"]
    assert "lm_head" in [s.pattern for s in recipe.skips]


def test_three_level_chain_and_diagnostics_point_at_the_parent(tmp_path: Path) -> None:
    _write(
        tmp_path, "a.yaml", "version: 1\nname: a\ndescription: a\nrules:\n  - {match: 'x(', scheme: mxfp8}\n"
    )
    _write(tmp_path, "b.yaml", "version: 1\nname: b\ndescription: b\nextends: a.yaml\n")
    c = _write(tmp_path, "c.yaml", "version: 1\nname: c\ndescription: c\nextends: b.yaml\n")
    result = load_recipe(c)
    assert result.recipe is None
    lines = [d.format() for d in result.diagnostics]
    assert len(lines) == 1 and lines[0].endswith(
        "a.yaml:5:15: error: invalid regex: missing ), unterminated subpattern"
    )


def test_self_cycle(tmp_path: Path) -> None:
    me = _write(tmp_path, "me.yaml", "version: 1\nname: me\ndescription: me\nextends: ./me.yaml\n")
    result = load_recipe(me)
    assert result.recipe is None
    assert [d.code for d in result.diagnostics] == ["extends-cycle"]
    assert "me.yaml -> " in result.diagnostics[0].message


def test_three_file_cycle_prints_the_chain(tmp_path: Path) -> None:
    for this, parent in (("x", "y"), ("y", "z"), ("z", "x")):
        _write(
            tmp_path, f"{this}.yaml", f"version: 1\nname: {this}\ndescription: d\nextends: {parent}.yaml\n"
        )
    result = load_recipe(tmp_path / "x.yaml")
    (cycle,) = [d for d in result.diagnostics if d.code == "extends-cycle"]
    names = [Path(part.strip()).name for part in cycle.message.split(": ", 1)[1].split("->")]
    assert names == ["x.yaml", "y.yaml", "z.yaml", "x.yaml"]


def test_parent_version_is_checked_too(tmp_path: Path) -> None:
    _write(tmp_path, "p.yaml", "version: 7\nname: p\ndescription: p\n")
    c = _write(tmp_path, "c.yaml", "version: 1\nname: c\ndescription: c\nextends: p.yaml\n")
    codes = [d.code for d in load_recipe(c).diagnostics]
    assert codes == ["extends-invalid", "unsupported-version"]


def test_fingerprint_ignores_presentation_but_not_meaning(tmp_path: Path) -> None:
    a = _write(tmp_path, "a.yaml", PARENT)
    reformatted = _write(
        tmp_path,
        "b.yaml",
        """\
        # a comment, other key order, other metadata
        description: something else entirely
        name: renamed
        version: 1
        skip: [lm_head]
        rules:
          - match: '.*experts.*'
            scheme: experts
            name: renamed-rule
          - {match: '.*', scheme: attn}
        schemes:
          attn: {preset: fp8-channel}
          experts:
            preset: mxfp8
            weights: {scale_rule: round_up}
        on_unsupported: error
        """,
    )
    reordered = _write(
        tmp_path,
        "c.yaml",
        PARENT.replace("p-experts", "X").replace(
            "- {name: X, match: '.*experts.*', scheme: experts}\n      - {name: p-all, match: '.*', scheme: attn}",
            "- {name: p-all, match: '.*', scheme: attn}\n      - {name: X, match: '.*experts.*', scheme: experts}",
        ),
    )
    fa, fb, fc = (load_recipe(p).recipe.fingerprint for p in (a, reformatted, reordered))
    assert fa == fb
    assert fa != fc  # rule order changes which rule wins
    assert fa.startswith("sha256:") and len(fa) == len("sha256:") + 64


_NAMES = ["a.q_proj", "a.k_proj", "b.experts.gate_up_proj", "lm_head", "b.mlp.gate"]
_PATTERNS = [".*", ".*q_proj", ".*_proj", "a\\..*", ".*experts.*", "lm_head", "b\\..*", ".*gate.*"]


def _yaml_rules(rules: list[tuple[str, str]]) -> str:
    return "".join(f"  - {{match: '{p}', scheme: {s}}}\n" for p, s in rules)


_RULES = st.lists(
    st.tuples(st.sampled_from(_PATTERNS), st.sampled_from(["mxfp8", "fp8-channel"])), max_size=4
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    parent_rules=_RULES,
    child_rules=_RULES,
    parent_skips=st.lists(st.sampled_from(_PATTERNS), max_size=2),
    child_skips=st.lists(st.sampled_from(_PATTERNS), max_size=2),
)
def test_merge_property(tmp_path: Path, parent_rules, child_rules, parent_skips, child_skips) -> None:
    """For any parent and child: the merged recipe decides each name as 'skip if any skip of either matches,
    else the child's first match, else the parent's first match'."""

    def body(name: str, rules, skips, extra: str = "") -> str:
        text = f"version: 1\nname: {name}\ndescription: d\n{extra}"
        if rules:
            text += "rules:\n" + _yaml_rules(rules)
        if skips:
            text += "skip:\n" + "".join(f"  - '{p}'\n" for p in skips)
        return text

    (tmp_path / "parent.yaml").write_text(body("parent", parent_rules, parent_skips))
    (tmp_path / "child.yaml").write_text(body("child", child_rules, child_skips, "extends: parent.yaml\n"))
    recipe = load_recipe(tmp_path / "child.yaml").recipe
    assert recipe is not None
    assert [(r.pattern, r.scheme) for r in recipe.rules] == child_rules + parent_rules
    matcher = Matcher(recipe)
    for name in _NAMES:
        why = matcher.explain(name, LayerKind.LINEAR)
        if any(re.fullmatch(p, name) for p in parent_skips + child_skips):
            assert why.winner is None and why.skips
            continue
        expected = next((s for p, s in child_rules + parent_rules if re.fullmatch(p, name)), None)
        assert (why.winner.scheme if why.winner else None) == expected
