"""The forgetting gate: base vs tuned scores checked against `gate` thresholds (`honed.config.GateSettings`).

    result = gate_checks(scores, domain_sources=["icd10"], probe_sources=["kjv"], gate=cfg.gate,
                         changes=intervals["change"])   # honed.eval.intervals.metric_intervals
    result["passed"], [c["name"] for c in result["checks"] if not c["passed"]]

Checks: the perplexity of each eval-only source (general text) may rise by at most `max_general_ppl_increase`
(relative); `domain_metric` must improve by at least `min_domain_gain` (absolute; `loss` per domain source must
fall). With `require_interval` (the default) the whole confidence interval of the change must clear the limit
(the gain's lower bound, the rise's upper bound), and the change itself too. A check whose metric or interval is
missing fails: a gate never passes on what it did not measure.
"""

from __future__ import annotations

GATE_FAILED_STATUS = 3  # `honed eval` exit status when the gate fails (1: an error, 2: a bad config)


def gate_checks(scores: dict[str, dict], domain_sources: list[str], probe_sources: list[str], gate,
                changes: dict[str, dict] | None = None) -> dict:
    """`changes`: the paired intervals of the change per metric (`{metric: {absolute, relative}}`)."""
    def check(name: str, metric: str, limit: float, op: str, relative: bool = False) -> dict:
        interval = (changes or {}).get(metric, {}).get("relative" if relative else "absolute")
        return compare(name, metric, scores, limit, op, relative, interval, gate.require_interval)

    checks = []
    if gate.max_general_ppl_increase is not None:
        if not probe_sources:
            checks.append(missing("general_ppl", "ppl/<eval_only source>", gate.max_general_ppl_increase, "<=",
                                  "the dataset has no eval_only (general-text) source"))
        for source in probe_sources:
            checks.append(check(f"general_ppl/{source}", f"ppl/{source}", gate.max_general_ppl_increase, "<=",
                                relative=True))
    if gate.min_domain_gain is not None:
        if gate.domain_metric == "loss":
            if not domain_sources:
                checks.append(missing("domain_loss", "loss/<domain source>", -gate.min_domain_gain, "<=",
                                      "the dataset has no domain (not eval_only) validation source"))
            for source in domain_sources:
                checks.append(check(f"domain_loss/{source}", f"loss/{source}", -gate.min_domain_gain, "<="))
        else:
            checks.append(check(f"domain_{gate.domain_metric}", gate.domain_metric, gate.min_domain_gain, ">="))
    return {"passed": all(c["passed"] for c in checks), "require_interval": gate.require_interval,
            "checks": checks}


def compare(name: str, metric: str, scores: dict[str, dict], limit: float, op: str, relative: bool = False,
            interval: list[float] | None = None, require_interval: bool = False) -> dict:
    """`change` (tuned − base, or tuned / base − 1 when `relative`) compared with `limit` by `op`; with
    `require_interval` the bound of `interval` on the limit's side (low for ≥, high for ≤) is compared too."""
    base, tuned = scores["base"].get(metric), scores.get("tuned", {}).get(metric)
    if base is None or tuned is None:
        return missing(name, metric, limit, op, f"{metric} was not measured for both models")
    change = tuned / base - 1 if relative else tuned - base
    passed = clears(change, limit, op)  # NaN fails either way
    if require_interval:
        passed = passed and interval is not None and clears(interval[0 if op == ">=" else 1], limit, op)
    return {"name": name, "metric": metric, "base": base, "tuned": tuned, "change": round(change, 6),
            "interval": interval, "require_interval": require_interval, "relative": relative, "op": op,
            "limit": limit, "passed": bool(passed)}


def clears(value: float, limit: float, op: str) -> bool:
    return value <= limit if op == "<=" else value >= limit


def missing(name: str, metric: str, limit: float, op: str, note: str) -> dict:
    return {"name": name, "metric": metric, "base": None, "tuned": None, "change": None, "interval": None,
            "relative": False, "op": op, "limit": limit, "passed": False, "note": note}


def describe(c: dict) -> str:
    """One line per check: `general_ppl/kjv: change +12.00 % > limit +10.00 %` (a failure) or `... ≤ ...`; with
    a required interval the bound that was compared: `domain_token_f1: change +0.1500 (95 % CI +0.0400 to
    +0.2600), lower bound +0.0400 < limit +0.1000` (the CI at `bootstrap.level`)."""
    if c["change"] is None:
        return f"{c['name']}: {c['note']}"
    fmt = (lambda v: f"{v:+.2%}") if c["relative"] else (lambda v: f"{v:+.4f}")
    line = f"{c['name']}: change {fmt(c['change'])}"
    if not c.get("require_interval"):
        return f"{line} {sign(c['change'], c)} limit {fmt(c['limit'])}"
    if c["interval"] is None:
        return f"{line}; no confidence interval was measured for {c['metric']}, and the gate requires one"
    low, high = c["interval"]
    bound, value = ("lower bound", low) if c["op"] == ">=" else ("upper bound", high)
    if not clears(c["change"], c["limit"], c["op"]):
        bound, value = "change", c["change"]
    return f"{line} (CI {fmt(low)} to {fmt(high)}), {bound} {fmt(value)} {sign(value, c)} limit {fmt(c['limit'])}"


def sign(value: float, c: dict) -> str:
    ok = clears(value, c["limit"], c["op"])
    return {("<=", True): "≤", ("<=", False): ">", (">=", True): "≥", (">=", False): "<"}[(c["op"], ok)]


def failure_reason(result: dict) -> str | None:
    """The failed checks, `; `-joined (None when the gate passed): what the registry records as the reason."""
    failed = [describe(c) for c in result["checks"] if not c["passed"]]
    return "forgetting gate failed: " + "; ".join(failed) if failed else None
