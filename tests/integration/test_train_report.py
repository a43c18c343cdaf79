"""The report a real `honed train` run (the session's 2-worker LoRA run) writes at its export: report.md holds the
numbers of its metrics.jsonl and efficiency.json, the plots and TensorBoard event files exist."""

import json
from pathlib import Path

from _run_logs import read_jsonl


def test_train_run_writes_its_report_with_the_run_numbers(trained):
    run = Path(trained["dir"])
    history = read_jsonl(run / "metrics.jsonl")
    efficiency = json.loads((run / "efficiency.json").read_text())
    report = (run / "report.md").read_text()
    assert trained["final"]["report"] == str(run / "report.md")
    last = history[-1]
    for key in ("loss", "val_loss", "val_loss/icd10", "val_loss/kjv", "lr", "tokens_per_s"):
        assert f"| {key} | {last[key]:.6g} | {last['step']} |" in report, key
    assert f"| tokens_per_s | {efficiency['tokens_per_s']:.6g} |" in report
    assert f"| mfu | {efficiency['mfu']:.6g} |" in report
    for name in ("loss", "lr", "throughput"):
        assert (run / "plots" / f"{name}.png").stat().st_size > 1000, name
    assert not (run / "plots" / "preference.png").exists()
    events = list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1 and events[0].stat().st_size > 500
