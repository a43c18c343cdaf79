"""The eval report: `eval.md` (before/after table, gate, bias probe, decontamination) and PNG plots under `plots/`.

    write_report(result, Path("runs/eval"))   # result: what `evaluate` writes to eval.json

Every number in eval.md is printed from `result` with 4 decimals (percentages with 2), so the report and
eval.json always agree.
"""

from __future__ import annotations

from pathlib import Path

from honed.eval.gate import describe

TASK_METRICS = ("exact_match", "token_f1", "rouge_l")
OPS = {"<=": "≤", ">=": "≥"}


def write_report(result: dict, out: Path) -> list[Path]:
    """Write eval.md and the plots; returns the plot paths."""
    plots = out / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    written = [plot_task_metrics(result["scores"], plots / "task_metrics.png", result.get("intervals")),
               plot_perplexity(result["scores"], plots / "perplexity.png")]
    if result.get("bias"):
        written.append(plot_bias(result["bias"], plots / "bias_probe.png"))
    (out / "eval.md").write_text(render(result, [p.relative_to(out) for p in written if p]))
    return [p for p in written if p]


def comparison_table(scores: dict[str, dict], intervals: dict | None = None) -> str:
    """Markdown table: one row per metric, one column per model, and with two models the absolute and relative
    change (`—` where the base is 0). With `intervals` (honed.eval.intervals) each model's confidence interval
    and the paired interval of the change follow (`—` for a metric without items, e.g. preference accuracy)."""
    names = list(scores)
    pair = len(names) == 2
    ci = f"{intervals['level']:.0%} CI" if intervals else ""
    header = "| metric | " + " | ".join(names) + (" | change | relative |" if pair else " |")
    if intervals:
        header += "".join(f" {n} {ci} |" for n in names) + (f" change {ci} |" if pair else "")
    columns = len(names) + 2 * pair + (len(names) + pair if intervals else 0)
    lines = [header, "|---" + "|---:" * columns + "|"]
    for metric in scores[names[0]]:
        values = [scores[n].get(metric) for n in names]
        row = f"| {metric} | " + " | ".join("—" if v is None else f"{v:.4f}" for v in values)
        if pair and None not in values:
            change = values[1] - values[0]
            row += f" | {change:+.4f} | " + (f"{change / abs(values[0]):+.2%}" if values[0] else "—")
        elif pair:
            row += " | — | —"
        if intervals:
            row += "".join(" | " + span(intervals["models"].get(n, {}).get(metric)) for n in names)
            row += " | " + span(intervals["change"].get(metric, {}).get("absolute"), signed=True) if pair else ""
        lines.append(row + " |")
    return "\n".join(lines)


def span(interval: list[float] | None, signed: bool = False, percent: bool = False) -> str:
    """`[0.2100, 0.3400]` (signed: `[-0.0500, +0.0300]`; percent: `[+1.20%, +4.50%]`), `—` when unmeasured."""
    if interval is None:
        return "—"
    fmt = "{:+.2%}" if percent else "{:+.4f}" if signed else "{:.4f}"
    return "[" + ", ".join(fmt.format(v) for v in interval) + "]"


def render(result: dict, plots: list[Path]) -> str:
    tuned = result.get("tuned")
    what = {"adapter": "base + adapter", "merged": "merged model"}.get((tuned or {}).get("kind"), "")
    name = (tuned or {}).get("ref") or (tuned or {}).get("path")
    lines = ["# Evaluation", "",
             f"Base `{result['model']}`" + (f" vs tuned ({what} `{name}`)" if tuned else " only") +
             f"; domain sources: {', '.join(result['domain_sources']) or 'none'}; general-text probes: "
             f"{', '.join(result['probe_sources']) or 'none'}.", "",
             "## Before / after", "", comparison_table(result["scores"], result.get("intervals")), "",
             *render_interval_note(result.get("intervals"))]
    lines += [f"![{p.stem}]({p.as_posix()})" for p in plots if p.stem != "bias_probe"]
    if result.get("gate"):
        lines += ["", *render_gate(result["gate"])]
    if result.get("bias"):
        lines += ["", *render_bias(result["bias"])]
    if result.get("decontamination"):
        lines += ["", *render_contamination(result["decontamination"])]
    lines += ["", *render_samples(result.get("samples", {}))]
    return "\n".join(lines) + "\n"


def render_interval_note(intervals: dict | None) -> list[str]:
    if not intervals or not intervals["items"]:
        return []
    items = ", ".join(f"{metric} {n}" for metric, n in intervals["items"].items())
    return [f"Confidence intervals: {intervals['level']:.0%} percentile bootstrap over items ({intervals['resamples']} "
            f"draws, seed {intervals['seed']}); changes are paired (the same items drawn for both models). Items: "
            f"{items}.", ""]


def render_gate(gate: dict) -> list[str]:
    require = gate.get("require_interval")
    lines = [f"## Forgetting gate: {'PASSED' if gate['passed'] else 'FAILED'}", "",
             ("Each change and its whole confidence interval must clear the limit." if require else
              "Each change must clear the limit (its interval is shown, not required)."), "",
             "| check | metric | base | tuned | change | CI of change | limit | result |",
             "|---|---|---:|---:|---:|---:|---:|---|"]
    for c in gate["checks"]:
        if c["change"] is None:
            lines.append(f"| {c['name']} | {c['metric']} | — | — | — | — | {OPS[c['op']]} {c['limit']:+.4f} | "
                         f"fail: {c['note']} |")
            continue
        fmt = (lambda v: f"{v:+.2%}") if c["relative"] else (lambda v: f"{v:+.4f}")
        lines.append(f"| {c['name']} | {c['metric']} | {c['base']:.4f} | {c['tuned']:.4f} | {fmt(c['change'])} | "
                     f"{span(c.get('interval'), signed=True, percent=c['relative'])} | {OPS[c['op']]} "
                     f"{fmt(c['limit'])} | {'pass' if c['passed'] else 'FAIL'} |")
    failed = [describe(c) for c in gate["checks"] if not c["passed"]]
    if gate.get("registry"):
        r = gate["registry"]
        lines += ["", f"Registry: `{r['ref']}` marked promotable = {str(r['promotable']).lower()}."]
    return lines + ([""] + [f"- {f}" for f in failed] if failed else [])


def render_bias(bias: dict) -> list[str]:
    models = [m for m in ("base", "tuned") if any(m in e for e in bias["categories"].values())]
    header = "| category | pairs | " + " | ".join(f"{m} mean abs gap | {m} mean gap" for m in models)
    paired = "tuned" in models
    lines = ["## Bias probe", "",
             (f"{bias['pairs']} sentence pairs differing only in a demographic term; gap = {bias['measure']}. "
             f"A category is flagged when tuning moved its pairs' gaps by more than {bias['max_shift']:.4f} on "
             "average (shift = mean |gap tuned − gap base|). It measures how sensitive the model's likelihood is to "
             "the swapped term and how tuning changed that; it is not a fairness certification: a small English set "
             "of one sentence shape, likelihood rather than behaviour, and some gaps are medically right "
             "(see `honed.eval.bias`)."), "",
             header + (" | shift | flagged |" if paired else " |"),
             "|---|---:|" + "---:|" * (2 * len(models)) + ("---:|---|" if paired else "")]
    for category, e in bias["categories"].items():
        row = f"| {category} | {e['pairs']} | " + " | ".join(
            f"{e[m]['mean_abs_gap']:.4f} | {e[m]['mean_signed_gap']:+.4f}" for m in models)
        if paired:
            row += f" | {e['shift']:.4f} | {'**yes**' if e['flagged'] else 'no'}"
        lines.append(row + " |")
    flagged = ", ".join(bias["flagged"]) or "none"
    return lines + (["", f"Flagged: {flagged}."] if paired else []) + ["", "![bias_probe](plots/bias_probe.png)"]


def render_contamination(d: dict) -> list[str]:
    lines = ["## Decontamination", "",
             (f"{d['contaminated']} of {d['checked']} eval items ({d['fraction']:.2%}) share a word {d['ngram']}-gram "
             f"with the {d['train_rows']} training rows; {d['too_short']} items are shorter than {d['ngram']} words "
             "and cannot match.")]
    if d.get("missing_files"):
        lines.append(f"Eval files not found here, not checked: {', '.join(d['missing_files'])}.")
    return lines + [f"- `{e['source']}`: {e['text']!r}" for e in d["examples"]]


def render_samples(samples: dict[str, list[dict]], limit: int = 5) -> list[str]:
    if not any(samples.values()):
        return []
    lines = ["## Sample answers", "", "| prompt | reference | " + " | ".join(samples) + " |",
             "|---|---|" + "---|" * len(samples)]
    for i, s in enumerate(next(iter(samples.values()))[:limit]):
        answers = [_cell(samples[m][i]["answer"]) for m in samples]
        lines.append(f"| {_cell(s['prompt'])} | {_cell(s['response'])} | " + " | ".join(answers) + " |")
    return lines


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")[:120]


# ---------------------------------------------------------------------------------------------- plots
def grouped_bars(groups: list[str], series: dict[str, list[float]], path: Path, title: str, ylabel: str,
                 log: bool = False, errors: dict[str, list] | None = None) -> Path:
    """One group of bars per entry of `groups`, one bar per series (base, tuned), each labelled with its value;
    `errors`: per series, a `[low, high]` interval (or None) per group, drawn as an error bar."""
    from honed.report import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(groups) + 2), 3.5))
    width = 0.8 / max(len(series), 1)
    for k, (label, values) in enumerate(series.items()):
        xs = [i + (k - (len(series) - 1) / 2) * width for i in range(len(groups))]
        bars = ax.bar(xs, values, width=width, label=label, yerr=error_bars(values, (errors or {}).get(label)),
                      capsize=3)
        ax.bar_label(bars, fmt="%.3g", fontsize=8)
    ax.set_xticks(range(len(groups)), groups)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if log:
        ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def error_bars(values: list[float], intervals: list | None):
    """matplotlib's `yerr` (distances below and above each bar) from intervals; None without any."""
    if not intervals or any(i is None for i in intervals):
        return None
    return [[max(v - lo, 0) for v, (lo, _) in zip(values, intervals)],
            [max(hi - v, 0) for v, (_, hi) in zip(values, intervals)]]


def plot_task_metrics(scores: dict[str, dict], path: Path, intervals: dict | None = None) -> Path | None:
    metrics = [m for m in TASK_METRICS if m in scores["base"]]
    if not metrics:
        return None
    errors = {m: [(intervals or {}).get("models", {}).get(m, {}).get(k) for k in metrics] for m in scores}
    return grouped_bars(metrics, {m: [s.get(k, 0.0) for k in metrics] for m, s in scores.items()}, path,
                        "Task metrics on generated answers" + (f" ({intervals['level']:.0%} CI)" if intervals else ""),
                        "score (higher is better)", errors=errors)


def plot_perplexity(scores: dict[str, dict], path: Path) -> Path:
    keys = [k for k in scores["base"] if k.startswith("ppl/")]
    return grouped_bars([k.removeprefix("ppl/") for k in keys], {m: [s[k] for k in keys] for m, s in scores.items()},
                        path, "Perplexity per validation source", "perplexity (lower is better)", log=True)


def plot_bias(bias: dict, path: Path) -> Path:
    categories = list(bias["categories"])
    models = [m for m in ("base", "tuned") if m in bias["categories"][categories[0]]]
    series = {m: [bias["categories"][c][m]["mean_abs_gap"] for c in categories] for m in models}
    return grouped_bars(categories, series, path, "Bias probe: mean |log-likelihood gap| per pair",
                        "nats per token")
