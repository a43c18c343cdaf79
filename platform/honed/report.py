"""Run reports: a training run's `metrics.jsonl` (+ `efficiency.json`) → `report.md`, `plots/*.png` and TensorBoard
event files; the plotting primitive also draws `honed tune`'s trial curves.

    write_train_report("runs/icd10/train")   # done by `honed train` after the export

Writes `report.md` (final figures, per-source validation first → last, efficiency), `plots/loss.png` (train loss,
`val_loss` and each `val_loss/<source>` against the step), `plots/lr.png`, `plots/throughput.png`, and for
preference (DPO) runs `plots/preference.png`; `tensorboard/` holds every numeric metric by step.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from honed.artifacts import METRICS_FILE, read_efficiency, read_metrics

PLOTS_DIR = "plots"
TENSORBOARD_DIR = "tensorboard"
REPORT_FILE = "report.md"
PREFERENCE_KEYS = ("reward_accuracy", "reward_margin", "chosen_reward", "rejected_reward")
NOT_PLOTTED = ("step", "epoch")

Series = dict[str, tuple[list[float], list[float]]]
"""Curve label → (x values, y values)."""


def series(rows: list[dict], key: str, x: str = "step") -> tuple[list[float], list[float]]:
    """(x, value) of the rows that hold `key`."""
    picked = [(r[x], r[key]) for r in rows if isinstance(r.get(key), (int, float)) and x in r]
    return [p[0] for p in picked], [p[1] for p in picked]


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend (no display on workers and CI): every honed plot draws here."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def preload() -> None:
    """Import what the report draws and logs with (matplotlib, tensorboardX: ~1 s on a CPU core), so a driver can
    do it in a thread while it waits for its workers and not after them (honed.train.trainer)."""
    pyplot()
    import tensorboardX  # noqa: F401


def plot_panels(path: Path, panels: list[tuple[str, str, Series]], xlabel: str = "step",
                styles: dict[str, dict] | None = None) -> Path:
    """One PNG with a panel per (title, y label, series), side by side; `styles` gives matplotlib keyword
    arguments per curve label (e.g. a dashed line for a stopped trial)."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 3.8), squeeze=False)
    for ax, (title, ylabel, curves) in zip(axes[0], panels):
        for label, (xs, ys) in curves.items():
            ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, markersize=3, label=label,
                    **(styles or {}).get(label, {}))
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if len(curves) > 1:
            ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def train_plots(rows: list[dict], plots: Path) -> list[Path]:
    """The run's plots under `plots`; preference.png only when the run reported preference metrics."""
    val_keys = sorted({k for r in rows for k in r if k.startswith("val_loss")})
    made = [
        plot_panels(plots / "loss.png", [("Loss", "mean token loss", {
            k if k != "loss" else "train loss": series(rows, k) for k in ["loss", *val_keys]})]),
        plot_panels(plots / "lr.png", [("Learning rate", "lr", {"lr": series(rows, "lr")})]),
        plot_panels(plots / "throughput.png", [("Throughput", "tokens/s (all workers)",
                                                {"tokens_per_s": series(rows, "tokens_per_s")})]),
    ]
    keys = {k for r in rows for k in r}
    accuracy = sorted(k for k in keys if k == "reward_accuracy" or k.startswith("val_reward_accuracy"))
    rewards = sorted(k for k in keys if k in PREFERENCE_KEYS[1:] or k.startswith("val_reward_margin"))
    if accuracy or rewards:
        panels = [(title, ylabel, {k: series(rows, k) for k in ks}) for title, ylabel, ks in (
            ("Preference accuracy", "chosen reward > rejected", accuracy), ("Rewards", "implicit reward", rewards))
            if ks]
        made.append(plot_panels(plots / "preference.png", panels))
    return made


def write_tensorboard(rows: list[dict], logdir: Path) -> Path:
    """Every numeric metric as a TensorBoard scalar at its step (tensorboardX, which Ray Tune's logger uses too);
    the directory is rewritten, so a resumed run does not log its steps twice."""
    from tensorboardX import SummaryWriter

    shutil.rmtree(logdir, ignore_errors=True)
    with SummaryWriter(str(logdir)) as writer:
        for row in rows:
            for key, value in row.items():
                if key not in NOT_PLOTTED and isinstance(value, (int, float)) and not isinstance(value, bool):
                    writer.add_scalar(key, value, global_step=int(row["step"]))
    return logdir


def figure(value) -> str:
    """A metric as the report prints it: up to 6 significant digits (metrics.jsonl keeps 5 decimals)."""
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def final_values(rows: list[dict]) -> dict[str, tuple[int, object]]:
    """Each metric's last value and the step it was reported at."""
    last: dict[str, tuple[int, object]] = {}
    for row in rows:
        for key, value in row.items():
            if key != "step":
                last[key] = (row["step"], value)
    return last


def render_train_report(rows: list[dict], efficiency: dict | None, plots: list[Path], title: str) -> str:
    lines = [f"# {title}", "", f"{rows[-1]['step']} steps, {len(rows)} logged points.", "",
             "## Final metrics", "", "| metric | value | at step |", "|---|---:|---:|"]
    lines += [f"| {k} | {figure(v)} | {step} |" for k, (step, v) in final_values(rows).items()]
    validations = [r for r in rows if "val_loss" in r or any(k.startswith("val_") for k in r)]
    if validations:
        first, last = validations[0], validations[-1]
        keys = sorted(k for k in last if k.startswith("val_"))
        lines += ["", "## Validation", "", f"| metric | step {first['step']} | step {last['step']} |",
                  "|---|---:|---:|"]
        lines += [f"| {k} | {figure(first.get(k, '–'))} | {figure(last[k])} |" for k in keys]
    if efficiency:
        lines += ["", "## Efficiency", "", "| figure | value |", "|---|---:|"]
        lines += [f"| {k} | {figure(v)} |" for k, v in efficiency.items() if isinstance(v, (int, float, str))]
    lines += ["", "## Plots", ""] + [f"![{p.stem}]({PLOTS_DIR}/{p.name})" for p in plots]
    return "\n".join(lines) + "\n"


def write_train_report(output_dir: str | Path) -> Path:
    """`report.md`, `plots/` and `tensorboard/` of the run exported to `output_dir`; returns the report's path."""
    out = Path(output_dir)
    rows = read_metrics(out)
    if not rows:
        raise ValueError(f"{out / METRICS_FILE} holds no metrics; nothing to report")
    efficiency = read_efficiency(out)
    plots = train_plots(rows, out / PLOTS_DIR)
    write_tensorboard(rows, out / TENSORBOARD_DIR)
    report = out / REPORT_FILE
    report.write_text(render_train_report(rows, efficiency, plots, f"Training run {out.name}"))
    return report
