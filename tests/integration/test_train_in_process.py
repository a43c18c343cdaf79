"""A one-worker run trained in the calling process (honed.train.in_process: what a Tune trial of one worker does):
it trains what the same run on a Ray Train worker trains, persists its checkpoints where Ray Train would keep them
(`keep_checkpoints`, the latest always), and a run interrupted after a checkpoint and rerun continues from it on
the uninterrupted curve, as a Ray Train run does. The tiny model; ~1 minute on a 2-CPU machine, most of it the one
Ray Train run the in-process runs are compared with.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from _run_logs import read_jsonl

STEPS, EVERY = 6, 2
REL_TOL = 1e-4
"""Per-step loss, in process vs a Ray Train worker, and resumed vs uninterrupted (relative): the same arithmetic on
one CPU thread, so the curves agree to the 5 decimals metrics.jsonl keeps; neighbouring steps differ by 1e-2 to 1."""


def make_config(tiny_model: str, data_dir: str, out: Path, name: str = "inproc"):
    from honed.config import TrainConfig

    return TrainConfig.model_validate({
        "model": {"name_or_path": tiny_model}, "data_dir": data_dir, "output_dir": str(out), "name": name,
        "method": {"name": "lora", "lora": {"r": 8, "alpha": 16, "dropout": 0.1}},
        "optim": {"max_steps": STEPS, "batch_size": 8, "warmup_steps": 0, "schedule": "cosine", "lr": 1e-2},
        "scaling": {"num_workers": 1, "torch_threads": 1},
        "log_every": 1, "checkpoint_every": EVERY, "keep_checkpoints": 2, "validate_at_checkpoints": True,
        "val_max_examples": 16,
    })


def assert_same_curve(got: list[dict], want: list[dict]) -> None:
    assert [m["step"] for m in got] == [m["step"] for m in want] == list(range(1, STEPS + 1))
    for g, w in zip(got, want):
        assert g["loss"] == pytest.approx(w["loss"], rel=REL_TOL), (g["step"], g["loss"], w["loss"])
        assert g["lr"] == pytest.approx(w["lr"], rel=1e-9, abs=1e-12), g["step"]


@pytest.fixture(scope="module")
def uninterrupted(ray_local, tiny_model, prepared, tmp_path_factory):
    from honed.train.trainer import train

    out = tmp_path_factory.mktemp("inproc") / "run"
    reports: list[tuple[dict, object]] = []
    final = train(make_config(tiny_model, prepared["dir"], out), in_process=True,
                  on_report=lambda metrics, checkpoint: reports.append((metrics, checkpoint)))
    return {"out": out, "final": final, "reports": reports}


def test_in_process_trains_what_a_ray_train_worker_trains(uninterrupted, ray_local, tiny_model, prepared, tmp_path):
    from honed.train.trainer import train

    out = tmp_path / "ray_train"
    final = train(make_config(tiny_model, prepared["dir"], out))
    assert_same_curve(read_jsonl(uninterrupted["out"] / "metrics.jsonl"), read_jsonl(out / "metrics.jsonl"))
    assert uninterrupted["final"]["val_loss"] == pytest.approx(final["val_loss"], rel=REL_TOL)
    check = uninterrupted["final"]["export_check"]
    assert check["max_abs_diff"] <= check["tolerance"]
    meta = json.loads((uninterrupted["out"] / "adapter" / "honed.json").read_text())
    assert meta["checkpoint"].startswith(str(uninterrupted["out"] / "checkpoints" / "inproc" / "checkpoint_"))


def test_every_report_is_passed_on_and_checkpoints_are_persisted(uninterrupted):
    from honed.train.in_process import INDEX_FILE

    reports = uninterrupted["reports"]
    with_checkpoint = [(m["step"], c.path) for m, c in reports if c is not None]
    assert [step for step, _ in with_checkpoint] == [2, 4, 6]
    assert all("val_loss" in m for m, c in reports if c is not None)
    assert [m["step"] for m, _ in reports] == list(range(1, STEPS + 1))  # log_every 1: each step once
    run_dir = uninterrupted["out"] / "checkpoints" / "inproc"
    index = json.loads((run_dir / INDEX_FILE).read_text())["checkpoints"]
    assert [c["metrics"]["step"] for c in index] == [4, 6]  # keep_checkpoints: 2, the latest ones
    assert sorted(p.name for p in run_dir.glob("checkpoint_*")) == [c["name"] for c in index]
    assert Path(with_checkpoint[-1][1]) == run_dir / index[-1]["name"]
    assert (run_dir / index[-1]["name"] / "adapter" / "adapter_model.safetensors").is_file()


def test_an_interrupted_run_resumes_from_its_last_checkpoint(uninterrupted, ray_local, tiny_model, prepared,
                                                             tmp_path):
    from honed.train.trainer import train

    class Interrupted(Exception):
        pass

    def stop_at_second_checkpoint(metrics: dict, checkpoint) -> None:
        if checkpoint is not None and metrics["step"] == 2 * EVERY:
            raise Interrupted

    out = tmp_path / "run"
    cfg = make_config(tiny_model, prepared["dir"], out)
    with pytest.raises(Interrupted):
        train(cfg, in_process=True, on_report=stop_at_second_checkpoint)
    assert not (out / "adapter").exists()
    first = read_jsonl(out / "progress.jsonl")

    final = train(cfg, in_process=True)
    events = read_jsonl(out / "progress.jsonl")[len(first):]
    assert [(e.get("event"), e["step"]) for e in events][:1] == [("resumed", 2 * EVERY)]
    assert [e["step"] for e in events if "event" not in e] == list(range(2 * EVERY + 1, STEPS + 1))
    assert_same_curve(read_jsonl(out / "metrics.jsonl"), read_jsonl(uninterrupted["out"] / "metrics.jsonl"))
    assert final["val_loss"] == pytest.approx(uninterrupted["final"]["val_loss"], rel=REL_TOL)


def test_a_run_of_several_workers_is_refused_in_process(tiny_model, prepared, tmp_path):
    from honed.train.trainer import train

    cfg = make_config(tiny_model, prepared["dir"], tmp_path).model_copy(deep=True)
    cfg.scaling.num_workers = 2
    with pytest.raises(ValueError, match="one worker; scaling.num_workers is 2"):
        train(cfg, in_process=True)
