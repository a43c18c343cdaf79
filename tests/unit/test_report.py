"""The run report (honed.report) from a hand-written metrics.jsonl: report.md holds the run's numbers, the plots
exist (preference.png only for preference runs), TensorBoard event files hold every metric at its step."""

import json
import struct
from pathlib import Path

import pytest

from honed.report import write_train_report

ROWS = [
    {"step": 5, "epoch": 0, "lr": 1e-3, "loss": 2.5, "grad_norm": 1.2, "tokens_per_s": 900.0, "peak_memory_mb": 410.0},
    {"step": 10, "epoch": 0, "lr": 8e-4, "loss": 2.0, "grad_norm": 0.9, "tokens_per_s": 950.5, "val_loss": 2.1,
     "val_loss/icd10": 2.1, "val_loss/kjv": 4.25, "peak_memory_mb": 412.0},
    {"step": 15, "epoch": 1, "lr": 5e-4, "loss": 1.61234, "grad_norm": 0.7, "tokens_per_s": 1000.0,
     "peak_memory_mb": 415.0},
    {"step": 20, "epoch": 1, "lr": 1e-4, "loss": 1.4, "grad_norm": 0.5, "tokens_per_s": 990.0, "val_loss": 1.55555,
     "val_loss/icd10": 1.55555, "val_loss/kjv": 4.375, "peak_memory_mb": 420.0},
]
PREFERENCE = {"reward_accuracy": 0.75, "reward_margin": 0.4, "chosen_reward": 0.1, "rejected_reward": -0.3}


def write_run(tmp_path: Path, rows: list[dict], efficiency: dict | None = None) -> Path:
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if efficiency:
        (tmp_path / "efficiency.json").write_text(json.dumps(efficiency))
    return tmp_path


def scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    """Tag → [(step, value)] read back from the TFRecord event files (length, crc, Event proto, crc)."""
    from tensorboardX.proto.event_pb2 import Event

    logged: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(logdir.glob("events.out.tfevents.*")):
        data, pos = path.read_bytes(), 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            event = Event.FromString(data[pos + 12:pos + 12 + length])
            pos += 12 + length + 4
            for value in event.summary.value:
                logged.setdefault(value.tag, []).append((event.step, value.simple_value))
    return logged


def test_report_holds_the_final_and_validation_numbers_and_the_plots_exist(tmp_path):
    out = write_run(tmp_path, ROWS, {"tokens_per_s": 980.5, "mfu": 0.4321, "method": "lora"})
    report = write_train_report(out).read_text()
    assert "| loss | 1.4 | 20 |" in report and "| val_loss | 1.55555 | 20 |" in report
    assert "| tokens_per_s | 990 | 20 |" in report and "| lr | 0.0001 | 20 |" in report
    assert "| val_loss/kjv | 4.25 | 4.375 |" in report  # first → last validation, per source
    assert "| mfu | 0.4321 |" in report and "| method | lora |" in report
    for name in ("loss", "lr", "throughput"):
        assert (out / "plots" / f"{name}.png").stat().st_size > 1000
        assert f"](plots/{name}.png)" in report
    assert not (out / "plots" / "preference.png").exists()


def test_tensorboard_holds_every_metric_at_its_step_once_even_when_rewritten(tmp_path):
    out = write_run(tmp_path, ROWS)
    write_train_report(out)
    write_train_report(out)  # a resumed run reports again: the directory is rewritten, not appended to
    logged = scalars(out / "tensorboard")
    assert logged["loss"] == [(r["step"], pytest.approx(r["loss"])) for r in ROWS]  # stored as float32
    assert logged["val_loss/kjv"] == [(10, 4.25), (20, 4.375)]
    assert "step" not in logged and "epoch" not in logged


def test_tensorboard_event_file_is_written(tmp_path):
    out = write_run(tmp_path, ROWS)
    write_train_report(out)
    events = list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1 and events[0].stat().st_size > 200


def test_preference_runs_get_their_plot(tmp_path):
    rows = [r | PREFERENCE for r in ROWS]
    rows[-1] |= {"val_reward_accuracy": 0.8, "val_reward_margin": 0.5, "val_reward_accuracy/icd10": 0.8}
    out = write_run(tmp_path, rows)
    report = write_train_report(out).read_text()
    assert (out / "plots" / "preference.png").stat().st_size > 1000
    assert "](plots/preference.png)" in report and "| val_reward_accuracy | – | 0.8 |" in report


def test_an_empty_metrics_file_is_named(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("")
    with pytest.raises(ValueError, match="metrics.jsonl holds no metrics"):
        write_train_report(tmp_path)
