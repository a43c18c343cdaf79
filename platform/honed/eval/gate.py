"""The forgetting gate: base vs tuned scores checked against `gate` thresholds (`honed.config.GateSettings`).

    result = gate_checks(scores, domain_sources=["icd10"], probe_sources=["kjv"], gate=cfg.gate)
    result["passed"], [c["name"] for c in result["checks"] if not c["passed"]]

Checks: the perplexity of each eval-only source (general text) may rise by at most `max_general_ppl_increase`
(relative); `domain_metric` must improve by at least `min_domain_gain` (absolute; `loss` per domain source must
fall). A check whose metric is missing fails: a gate never passes on what it did not measure.
"""

from __future__ import annotations

GATE_FAILED_STATUS = 3  # `honed eval` exit status when the gate fails (1: an error, 2: a bad config)


def gate_checks(scores: dict[str, dict], domain_sources: list[str], probe_sources: list[str], gate) -> dict:
    checks = []
    if gate.max_general_ppl_increase is not None:
        if not probe_sources:
            checks.append(missing("general_ppl", "ppl/<eval_only source>", gate.max_general_ppl_increase, "<=",
                                  "the dataset has no eval_only (general-text) source"))
        for source in probe_sources:
            checks.append(check(f"general_ppl/{source}", f"ppl/{source}", scores, gate.max_general_ppl_increase,
                                "<=", relative=True))
    if gate.min_domain_gain is not None:
        if gate.domain_metric == "loss":
            if not domain_sources:
                checks.append(missing("domain_loss", "loss/<domain source>", -gate.min_domain_gain, "<=",
                                      "the dataset has no domain (not eval_only) validation source"))
            for source in domain_sources:
                checks.append(check(f"domain_loss/{source}", f"loss/{source}", scores, -gate.min_domain_gain, "<="))
        else:
            checks.append(check(f"domain_{gate.domain_metric}", gate.domain_metric, scores, gate.min_domain_gain,
                                ">="))
    return {"passed": all(c["passed"] for c in checks), "checks": checks}


def check(name: str, metric: str, scores: dict[str, dict], limit: float, op: str, relative: bool = False) -> dict:
    """`change` (tuned − base, or tuned / base − 1 when `relative`) compared with `limit` by `op`."""
    base, tuned = scores["base"].get(metric), scores.get("tuned", {}).get(metric)
    if base is None or tuned is None:
        return missing(name, metric, limit, op, f"{metric} was not measured for both models")
    change = tuned / base - 1 if relative else tuned - base
    passed = change <= limit if op == "<=" else change >= limit  # NaN fails either way
    return {"name": name, "metric": metric, "base": base, "tuned": tuned, "change": round(change, 6),
            "relative": relative, "op": op, "limit": limit, "passed": bool(passed)}


def missing(name: str, metric: str, limit: float, op: str, note: str) -> dict:
    return {"name": name, "metric": metric, "base": None, "tuned": None, "change": None, "relative": False,
            "op": op, "limit": limit, "passed": False, "note": note}


def describe(c: dict) -> str:
    """One line per check: `general_ppl/kjv: +12.00 % > limit +10.00 %` (a failure) or `... ≤ ...`."""
    if c["change"] is None:
        return f"{c['name']}: {c['note']}"
    fmt = (lambda v: f"{v:+.2%}") if c["relative"] else (lambda v: f"{v:+.4f}")
    sign = {("<=", True): "≤", ("<=", False): ">", (">=", True): "≥", (">=", False): "<"}[(c["op"], c["passed"])]
    return f"{c['name']}: change {fmt(c['change'])} {sign} limit {fmt(c['limit'])}"


def failure_reason(result: dict) -> str | None:
    """The failed checks, `; `-joined (None when the gate passed): what the registry records as the reason."""
    failed = [describe(c) for c in result["checks"] if not c["passed"]]
    return "forgetting gate failed: " + "; ".join(failed) if failed else None
