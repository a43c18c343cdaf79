"""Bootstrap confidence intervals (honed.eval.intervals): coverage on a case with a known mean, the seed, the paired
change, losses and perplexities from per-row items, and how they reach eval.md."""

import math

import numpy as np
import pytest

from honed.config import ConfigError, EvalConfig, load_config
from honed.config.eval import BootstrapSettings
from honed.eval.intervals import draws, mean_interval, metric_intervals, paired_interval, resampled_figures
from honed.eval.report import comparison_table, render


def test_95_percent_intervals_cover_the_true_mean_about_95_percent_of_the_time():
    """200 answers right with probability 0.3, drawn 400 times: the true 0.3 falls inside ~95 % of the intervals."""
    rng = np.random.default_rng(1)
    covered = [lo <= 0.3 <= hi for lo, hi in (mean_interval(list(rng.random(200) < 0.3), resamples=500, seed=s)
                                              for s in range(400))]
    assert 0.91 <= np.mean(covered) <= 0.98, np.mean(covered)  # binomial sd at 400 trials: 0.011


def test_interval_width_matches_the_standard_error():
    values = [1.0] * 60 + [0.0] * 140  # mean 0.3 over 200 items
    low, high = mean_interval(values)
    assert low < 0.3 < high
    assert high - low == pytest.approx(2 * 1.96 * math.sqrt(0.3 * 0.7 / 200), rel=0.15)


def test_same_seed_same_interval_other_seed_close():
    values = list(np.random.default_rng(0).random(150))
    assert mean_interval(values, seed=7) == mean_interval(values, seed=7)
    other = mean_interval(values, seed=8)
    assert other != mean_interval(values, seed=7)
    assert other == pytest.approx(mean_interval(values, seed=7), abs=0.01)
    assert (draws(5, 3, seed=2) == draws(5, 3, seed=2)).all()


def test_paired_change_is_far_narrower_than_the_unpaired_intervals():
    """Items differ a lot in difficulty, tuning adds 0.05 to each: side by side the two intervals overlap, the
    paired interval of the change lies clearly above 0."""
    rng = np.random.default_rng(3)
    base = list(rng.random(200))
    tuned = [b + 0.05 + rng.normal(0, 0.01) for b in base]
    base_ci, tuned_ci = mean_interval(base), mean_interval(tuned)
    assert tuned_ci[0] < base_ci[1]  # overlapping
    low, high = paired_interval(base, tuned)
    assert 0.04 < low < 0.05 < high < 0.06
    with pytest.raises(ValueError, match="the same items: 2 base vs 1 tuned"):
        paired_interval([0.0, 1.0], [1.0])


def test_identical_models_give_a_zero_change_interval():
    items = {"exact_match": [(1.0, 1), (0.0, 1), (1.0, 1)], "loss/kjv": [(12.0, 4), (3.0, 2), (20.0, 5)]}
    out = metric_intervals({"base": items, "tuned": items}, BootstrapSettings(resamples=200))
    assert out["change"]["exact_match"] == {"absolute": [0.0, 0.0]}
    assert out["change"]["ppl/kjv"] == {"absolute": [0.0, 0.0], "relative": [0.0, 0.0]}


def test_loss_and_perplexity_intervals_are_token_weighted_like_the_figure():
    rows = [(float(s), int(n)) for s, n in zip(np.random.default_rng(4).uniform(5, 60, 80),
                                                np.random.default_rng(5).integers(2, 30, 80))]
    settings = BootstrapSettings(resamples=400, seed=3)
    out = metric_intervals({"base": {"loss/docs": rows}}, settings)
    loss = sum(s for s, _ in rows) / sum(n for _, n in rows)
    low, high = out["models"]["base"]["loss/docs"]
    assert low < loss < high
    assert out["models"]["base"]["ppl/docs"] == pytest.approx([math.exp(low), math.exp(high)], rel=1e-3)
    assert out["items"] == {"loss/docs": 80} and out["change"] == {}  # one model: no change
    # the figure of a draw is Σ sums / Σ tokens of the drawn rows, not the mean of per-row means
    picks = np.array([[0, 0, 1]])
    assert resampled_figures(rows[:2], picks)[0] == pytest.approx((2 * rows[0][0] + rows[1][0]) /
                                                                  (2 * rows[0][1] + rows[1][1]))


def test_relative_perplexity_change_is_paired():
    base = [(2.0 * n, n) for n in range(1, 41)]          # loss 2.0 on every row
    tuned = [(2.1 * n, n) for n in range(1, 41)]         # loss 2.1: perplexity × e^0.1
    out = metric_intervals({"base": {"loss/kjv": base}, "tuned": {"loss/kjv": tuned}}, BootstrapSettings())
    assert out["change"]["ppl/kjv"]["relative"] == pytest.approx([math.exp(0.1) - 1] * 2, abs=1e-6)
    assert out["change"]["loss/kjv"]["absolute"] == pytest.approx([0.1, 0.1], abs=1e-6)


def test_a_diverged_model_gets_nan_bounds():
    out = metric_intervals({"base": {"loss/x": [(1.0, 1), (2.0, 1)]},
                            "tuned": {"loss/x": [(math.inf, 1), (2.0, 1)]}}, BootstrapSettings(resamples=100))
    assert all(math.isnan(v) for v in out["models"]["tuned"]["loss/x"] + out["change"]["loss/x"]["absolute"])


@pytest.mark.parametrize("override, message", [
    ("bootstrap.level=1", "bootstrap.level = 1: Input should be less than 1"),
    ("bootstrap.resamples=10", "bootstrap.resamples = 10: Input should be greater than or equal to 100"),
    ("bootstrap.draws=5", "bootstrap.draws: unknown key; allowed here: resamples, level, seed"),
    ("gate.require_interval=maybe", "gate.require_interval = 'maybe'"),
])
def test_bad_bootstrap_settings_are_named(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(EvalConfig, None, [override])
    assert message in str(err.value)


def test_tables_show_each_models_interval_and_the_paired_change():
    scores = {"base": {"token_f1": 0.1, "preference_accuracy": 0.5}, "tuned": {"token_f1": 0.45,
                                                                               "preference_accuracy": 0.7}}
    intervals = {"level": 0.95, "resamples": 1000, "seed": 0, "items": {"token_f1": 200},
                 "models": {"base": {"token_f1": [0.08, 0.12]}, "tuned": {"token_f1": [0.4, 0.5]}},
                 "change": {"token_f1": {"absolute": [0.3, 0.4]}}}
    table = comparison_table(scores, intervals)
    assert "| metric | base | tuned | change | relative | base 95% CI | tuned 95% CI | change 95% CI |" in table
    assert ("| token_f1 | 0.1000 | 0.4500 | +0.3500 | +350.00% | [0.0800, 0.1200] | [0.4000, 0.5000] | "
            "[+0.3000, +0.4000] |") in table
    assert "| preference_accuracy | 0.5000 | 0.7000 | +0.2000 | +40.00% | — | — | — |" in table
    assert table.splitlines()[1].count("|") == table.splitlines()[0].count("|")
    md = render({"scores": scores, "intervals": intervals, "model": "m", "tuned": None, "domain_sources": ["d"],
                 "probe_sources": [], "samples": {}}, [])
    assert "95% percentile bootstrap over items (1000 draws, seed 0)" in md and "Items: token_f1 200." in md


def test_gate_table_shows_the_interval_it_required():
    from honed.config import GateSettings
    from honed.eval.gate import gate_checks
    from honed.eval.report import render_gate

    scores = {"base": {"ppl/kjv": 80.0, "token_f1": 0.1}, "tuned": {"ppl/kjv": 86.0, "token_f1": 0.45}}
    changes = {"ppl/kjv": {"absolute": [2.0, 10.0], "relative": [0.025, 0.125]}, "token_f1": {"absolute": [0.15, 0.55]}}
    gate = gate_checks(scores, ["d"], ["kjv"], GateSettings(enabled=True, min_domain_gain=0.2), changes)
    lines = render_gate(gate)
    assert "Each change and its whole confidence interval must clear the limit." in lines
    assert "| general_ppl/kjv | ppl/kjv | 80.0000 | 86.0000 | +7.50% | [+2.50%, +12.50%] | ≤ +10.00% | FAIL |" in lines
    assert "| domain_token_f1 | token_f1 | 0.1000 | 0.4500 | +0.3500 | [+0.1500, +0.5500] | ≥ +0.2000 | FAIL |" in lines
    assert "- domain_token_f1: change +0.3500 (CI +0.1500 to +0.5500), lower bound +0.1500 < limit +0.2000" in lines
