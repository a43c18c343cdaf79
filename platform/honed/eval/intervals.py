"""Confidence intervals by bootstrap over items, for each model's figures and for the change tuning made.

    items = {"base": {"token_f1": [(0.5, 1), (0.0, 1), ...], "loss/icd10": [(41.3, 12), ...]}, "tuned": {...}}
    intervals = metric_intervals(items, BootstrapSettings(resamples=1000, level=0.95, seed=0))
    intervals["models"]["tuned"]["token_f1"]         # [low, high] of the tuned model's mean token F1
    intervals["change"]["token_f1"]["absolute"]      # [low, high] of tuned − base, paired over the same items
    intervals["change"]["ppl/kjv"]["relative"]       # [low, high] of tuned / base − 1

An item is one scored unit as `(sum, count)`: a generated answer `(score, 1)`, a validation row `(summed token
loss, labelled tokens)`. A figure is Σ sum / Σ count over the items, so a mean score, or the token-weighted
mean loss exactly as `honed eval` computes it (perplexity is its exp). Each of `resamples` draws picks
len(items) items with replacement; the interval is the central `level` share of the figure over the draws
(the percentile bootstrap). Changes are paired: base and tuned are scored on the same items, so one draw
picks the same items for both and the per-item correlation (most of the spread between items) cancels; the
interval of the change is then much narrower than the two models' intervals side by side suggest. The draws
depend on the item count and the seed only, so a rerun gives the same intervals, and every metric measured on
the same number of items is resampled with the same draws.
"""

from __future__ import annotations

import math

import numpy as np

MAX_LOSS = 50.0  # perplexity is exp(min(loss, 50)), as in honed.eval.evaluate: no overflow on a diverged model


def draws(n: int, resamples: int, seed: int) -> np.ndarray:
    """`resamples` × `n` item indices drawn with replacement."""
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def resampled_figures(items: list[tuple[float, float]], picks: np.ndarray) -> np.ndarray:
    """Σ sum / Σ count of the picked items, one figure per draw."""
    values = np.asarray(items, dtype=np.float64).reshape(-1, 2)
    return values[picks, 0].sum(axis=1) / np.maximum(values[picks, 1].sum(axis=1), 1e-12)


def percentile_interval(figures: np.ndarray, level: float) -> list[float]:
    """The central `level` share of the draws' figures; NaN bounds where a figure is not finite (a diverged
    model), so a gate reading them fails."""
    if not np.isfinite(figures).all():
        return [math.nan, math.nan]
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(figures, [tail, 100 - tail])
    return [float(low), float(high)]


def mean_interval(values: list[float], resamples: int = 1000, level: float = 0.95, seed: int = 0) -> list[float]:
    """Interval of the mean of per-item scores (e.g. exact match of each generated answer)."""
    return percentile_interval(resampled_figures([(v, 1) for v in values], draws(len(values), resamples, seed)),
                               level)


def paired_interval(base: list[float], tuned: list[float], resamples: int = 1000, level: float = 0.95,
                    seed: int = 0) -> list[float]:
    """Interval of mean(tuned) − mean(base) over the same items, resampled together."""
    if len(base) != len(tuned):
        raise ValueError(f"paired scores need the same items: {len(base)} base vs {len(tuned)} tuned")
    return percentile_interval(resampled_figures([(t - b, 1) for b, t in zip(base, tuned)],
                                                 draws(len(base), resamples, seed)), level)


def metric_intervals(items: dict[str, dict[str, list]], settings) -> dict:
    """Intervals of every metric with items, per model and (with a `tuned` model) of the change; `ppl/<source>`
    comes from the items of `loss/<source>`. `settings`: resamples, level and seed (BootstrapSettings)."""
    models = {model: {} for model in items}
    change: dict[str, dict] = {}
    counts = {metric: len(rows) for metric, rows in items.get("base", {}).items()}
    for metric, n in counts.items():
        if not n:
            continue
        picks = draws(n, settings.resamples, settings.seed)
        figures = {model: resampled_figures(per_metric[metric], picks) for model, per_metric in items.items()
                   if len(per_metric.get(metric, ())) == n}
        for name, transform in figure_names(metric):
            for model, values in figures.items():
                models[model][name] = rounded(percentile_interval(transform(values), settings.level))
            if {"base", "tuned"} <= set(figures):
                change[name] = changes(name, transform(figures["base"]), transform(figures["tuned"]),
                                       settings.level)
    return {"level": settings.level, "resamples": settings.resamples, "seed": settings.seed,
            "items": {m: n for m, n in counts.items() if n}, "models": models, "change": change}


def figure_names(metric: str) -> list[tuple[str, object]]:
    """The figures one kind of item gives: a loss also gives its perplexity."""
    if metric.startswith("loss/"):
        perplexity = ("ppl/" + metric.removeprefix("loss/"), lambda v: np.exp(np.minimum(v, MAX_LOSS)))
        return [(metric, lambda v: v), perplexity]
    return [(metric, lambda v: v)]


def changes(name: str, base: np.ndarray, tuned: np.ndarray, level: float) -> dict:
    """Paired intervals of tuned − base, and for perplexities of tuned / base − 1 (what the gate limits)."""
    out = {"absolute": rounded(percentile_interval(tuned - base, level))}
    if name.startswith("ppl/"):
        with np.errstate(divide="ignore", invalid="ignore"):
            out["relative"] = rounded(percentile_interval(tuned / base - 1, level), digits=6)
    return out


def rounded(interval: list[float], digits: int = 4) -> list[float]:
    return [round(v, digits) if math.isfinite(v) else v for v in interval]
