"""Typed reads of the YAML tree: a value that would crash a later int() or comparison is a problem by
path, and so is a tree too deep or too large to walk."""

from __future__ import annotations

import pytest

from gateway.yaml_tree import MAX_DEPTH, MAX_VALUES, YamlTree


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf"), "nan", "inf", "-Infinity"])
def test_number_refuses_non_finite_values(value: object) -> None:
    tree = YamlTree({})
    assert tree.number({"n": value}, "n", "server", 5.0) == 5.0
    assert tree.problems == [f"server.n: expected a number >= 0.0, got {float(value)!r}"]  # type: ignore[arg-type]


def test_number_takes_finite_values_and_integers_past_float_range() -> None:
    tree = YamlTree({})
    assert tree.number({"n": "2.5"}, "n", "server", 1.0) == 2.5
    assert tree.number({"n": 10**400}, "n", "server", 1.0) == 10**400
    assert tree.problems == []


def test_interpolate_refuses_a_tree_nested_too_deep() -> None:
    tree = YamlTree({})
    deep: list[object] = []
    for _ in range(MAX_DEPTH + 5):
        deep = [deep]
    tree.interpolate({"a": deep}, "")
    assert tree.problems == ["a" + "[0]" * MAX_DEPTH + ": nested more than 32 levels deep"]


def test_interpolate_refuses_aliases_expanding_past_the_limit() -> None:
    tree = YamlTree({})
    shared: list[object] = ["x"] * 10
    for _ in range(6):  # the same list referenced 10 times per level, as YAML aliases give: 10^7 values
        shared = [shared] * 10
    tree.interpolate({"bomb": shared}, "")
    assert len(tree.problems) == 1
    assert tree.problems[0].endswith(f"more than {MAX_VALUES} values (YAML aliases expanded)")
