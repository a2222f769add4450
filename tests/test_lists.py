"""One comma-list parser for the CLI, the app and method parameters (analysis/lists.py)."""
from __future__ import annotations

import pytest

from analysis.errors import PlanError

from analysis.plan import parse_layers
from analysis.lists import comma_list
from analysis.methods import get_method


def test_parts_are_stripped_converted_and_blank_parts_dropped():
    assert comma_list(" 0.7, 0.5 ,", float) == [0.7, 0.5]
    assert comma_list("4,7,10", int) == [4, 7, 10]
    assert comma_list((4, "7"), int) == [4, 7]
    assert comma_list(" , ", int) == []


def test_a_bad_part_raises_the_callers_error_naming_the_list():
    with pytest.raises(PlanError, match=r"^--x must be comma-separated numbers such as 1,2, got '1,two'$"):
        comma_list("1,two", float, "--x", PlanError, "1,2")


def test_layers_blank_means_the_default_and_bad_text_is_a_plan_error():
    assert parse_layers(None) is None and parse_layers(" ") is None
    assert parse_layers("4, 7,10") == (4, 7, 10)
    with pytest.raises(PlanError, match="reduction layers must be comma-separated block numbers"):
        parse_layers("4;7")


def test_tome_r_list_parses_like_the_cli_list():
    spec = next(p for p in get_method("tome").params if p.name == "r")
    assert spec.parse("13") == 13 and spec.parse("16, 16,8") == (16, 16, 8) and spec.parse([4, 4]) == (4, 4)
    with pytest.raises(ValueError, match="r must be comma-separated integers"):
        spec.parse("1 3")
    with pytest.raises(ValueError, match="r is empty"):
        spec.parse(",")
