"""Task metrics and the before/after table."""

import pytest

from honed.eval.evaluate import comparison_table, exact_match, spread, token_f1


def test_exact_match_ignores_case_spacing_and_final_period():
    assert exact_match("  E11: Type 2 diabetes mellitus. ", "e11: type 2  diabetes mellitus") == 1.0
    assert exact_match("E11: Type 1 diabetes mellitus", "E11: Type 2 diabetes mellitus") == 0.0


def test_token_f1():
    assert token_f1("type 2 diabetes", "type 2 diabetes") == 1.0
    assert token_f1("type 2 diabetes", "type 2 diabetes mellitus") == pytest.approx(2 * 1 * 0.75 / 1.75)
    assert token_f1("", "x") == 0.0 and token_f1("a", "b") == 0.0


def test_spread_picks_evenly():
    assert spread(list(range(10)), 3) == [0, 3, 6]
    assert spread([1, 2], 5) == [1, 2]


def test_comparison_table_has_change_column():
    table = comparison_table({"base": {"loss/x": 2.0, "exact_match": 0.0},
                              "tuned": {"loss/x": 1.5, "exact_match": 0.25}})
    assert "| loss/x | 2.0000 | 1.5000 | -0.5000 |" in table
    assert "| exact_match | 0.0000 | 0.2500 | +0.2500 |" in table
