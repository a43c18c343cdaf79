"""`honed tune` on a real local Ray: four trials of one worker on the tiny model, under ASHA on val_loss, run twice:
trained in the trials' own processes, which Tune reuses (the default), and each fitting a real 1-worker
TorchTrainer. Two sane learning rates run first (two at a time); two that cannot move the loss in 12 steps (1e-7,
1e-6) come after them and trail at the first rung, so ASHA stops them after one validation (and a Ray Train run's
workers are released). The results table, best_train.yaml, the registered adapter, the reports, plots and
TensorBoard files are read back; running the finished experiment again restores it and reruns nothing.

About 1 minute in process and 3 with Ray Train on a 2-CPU machine (Ray Train's start-up per trial dominates; a
step takes ~0.05 s)."""

from __future__ import annotations

import csv
import time
from pathlib import Path

import pytest
import yaml
from _run_logs import read_jsonl

from honed.tune import PG_FILE

STEPS, EVERY = 12, 3
"""Validations at steps 3, 6, 9, 12; ASHA rungs at 1 and 2 validations (max_t defaults to 4 - 1)."""
LRS = [2e-2, 1e-2, 1e-7, 1e-6]
"""Grid order is run order: the sane rates record the first rung before the hopeless ones reach it."""


@pytest.fixture(scope="module", params=["in_process", "ray_train"])
def tune_cfg(request, prepared, tiny_model, tmp_path_factory):
    """The search, with trials trained in their own reused process (the default) or each fitting a Ray Train
    worker group (`trials_in_process: false`, what trials of several workers do)."""
    from honed.config import TuneConfig

    out = tmp_path_factory.mktemp("tune")
    return TuneConfig.model_validate({
        "train": {
            "model": {"name_or_path": tiny_model}, "data_dir": prepared["dir"],
            "method": {"lora": {"r": 8, "alpha": 16, "dropout": 0.0}},
            "optim": {"max_steps": STEPS, "batch_size": 8, "warmup_steps": 0, "schedule": "constant"},
            "scaling": {"num_workers": 1, "cpus_per_worker": 0.4},
            "log_every": EVERY, "checkpoint_every": EVERY, "keep_checkpoints": 1, "val_max_examples": 24,
        },
        "space": {"optim.lr": {"grid": LRS}},
        "search": {"algorithm": "grid", "num_samples": 1},
        "scheduler": {"name": "asha", "grace_period": 1, "reduction_factor": 2},
        "max_concurrent_trials": 2, "trial_cpus": 0.05,  # 2 x 0.45 CPU: Ray Data keeps one CPU to list the shards
        "trials_in_process": request.param == "in_process",
        "output_dir": str(out / "tune"), "name": "tiny-tune",
        "register": {"registry": str(out / "registry"), "name": "tiny-best"},
    })


def alive_actors(ray_local) -> dict[str, str]:
    return {actor_id: a["ActorClassName"] for actor_id, a in ray_local._private.state.actors().items()
            if a["State"] == "ALIVE"}


@pytest.fixture(scope="module")
def tuned(tune_cfg, ray_local):
    from honed.tune import tune

    before = set(alive_actors(ray_local))  # the session's Ray may hold other tests' actors: only ours are judged
    summary = tune(tune_cfg)
    return summary | {"actors_before": before}


def read_results(cfg) -> list[dict]:
    with open(Path(cfg.output_dir) / "results.csv") as fh:
        return list(csv.DictReader(fh))


def test_asha_stops_the_hopeless_trials_and_the_table_is_sorted(tuned, tune_cfg):
    rows = read_results(tune_cfg)
    assert len(rows) == 4 and not any(r["error"] for r in rows), rows
    by_lr = {float(r["optim.lr"]): r for r in rows}
    assert set(by_lr) == set(LRS)
    stopped = [r for r in rows if r["status"] == "stopped early"]
    assert {float(r["optim.lr"]) for r in stopped} >= {1e-7}, rows
    for r in stopped:  # stopped at the first rung, well before the end
        assert int(r["validations"]) < STEPS // EVERY and int(r["last_step"]) < STEPS
    completed = [r for r in rows if r["status"] == "completed"]
    assert completed and all(int(r["validations"]) == STEPS // EVERY for r in completed)
    finals = [float(r["val_loss"]) for r in rows]
    assert finals == sorted(finals) and rows[0]["status"] == "completed"
    assert float(rows[0]["optim.lr"]) in LRS[:2]
    assert [r["trial"] for r in rows] == [r["trial"] for r in tuned["rows"]]
    table = (Path(tune_cfg.output_dir) / "results.md").read_text()
    assert table.index(rows[0]["trial"]) < table.index(stopped[0]["trial"])


def test_best_config_is_a_ready_train_config(tuned, tune_cfg):
    from honed.config import TrainConfig, load_config

    best = tuned["best"]
    cfg = load_config(TrainConfig, Path(tune_cfg.output_dir) / "best_train.yaml")
    assert cfg.optim.lr == best["config"]["optim.lr"]
    assert (cfg.optim.max_steps, cfg.method.lora.r, cfg.data_dir) == (STEPS, 8, tune_cfg.train.data_dir)
    assert cfg.output_dir == str(Path(tune_cfg.output_dir) / "best") and cfg.name == "tiny-tune-best"


def test_best_adapter_is_registered(tuned, tune_cfg):
    from honed.registry import Registry, safetensors_sha256

    registry = Registry(tune_cfg.register.registry)
    assert tuned["registered"] == "tiny-best@1" and registry.versions("tiny-best") == [1]
    adapter = Path(tuned["best"]["dir"]) / "adapter"
    assert registry.show("tiny-best@1")["adapter_sha256"] == safetensors_sha256(adapter)


def test_every_trial_reported_each_validation_and_its_run_wrote_a_report(tuned, tune_cfg):
    best = tuned["best"]
    run = Path(best["dir"])
    history = read_jsonl(run / "metrics.jsonl")
    validations = [m for m in history if "val_loss" in m]
    assert [m["step"] for m in validations] == [3, 6, 9, 12]
    assert best["curve"] == ([3, 6, 9, 12], [m["val_loss"] for m in validations])
    report = (run / "report.md").read_text()
    assert f"| val_loss | {validations[-1]['val_loss']:.6g} | {STEPS} |" in report
    assert all((run / "plots" / f"{name}.png").stat().st_size > 1000 for name in ("loss", "lr", "throughput"))
    for row in tuned["rows"]:
        if row["status"] == "stopped early":  # never exported: no adapter, but its live log stopped early
            assert not (Path(row["dir"]) / "adapter").exists()
            assert max(m["step"] for m in read_jsonl(Path(row["dir"]) / "progress.jsonl")) < STEPS


def test_tune_report_plot_and_tensorboard_files(tuned, tune_cfg):
    from honed.tune import experiment_dir

    out = Path(tune_cfg.output_dir)
    report = (out / "report.md").read_text()
    assert f"Best: **{tuned['best']['trial']}**, val_loss = {tuned['best']['final']:.6g}" in report
    stopped = sum(r["status"] == "stopped early" for r in tuned["rows"])
    assert f"4 trials ({4 - stopped} completed, {stopped} stopped early, 0 error)" in report
    assert (out / "plots" / "trials.png").stat().st_size > 1000
    trial_dirs = [p for p in Path(experiment_dir(tune_cfg)).iterdir() if p.name.startswith("trial_")]
    assert len(trial_dirs) == 4
    assert all(list(p.glob("events.out.tfevents.*")) for p in trial_dirs), "Tune's TBXLoggerCallback wrote no events"


def test_stopped_trials_leave_no_train_actors_or_placement_groups(tuned, tune_cfg, ray_local):
    from ray.util import placement_group_table

    deadline = time.time() + 60
    while True:
        alive = [name for actor_id, name in alive_actors(ray_local).items() if actor_id not in tuned["actors_before"]]
        live_groups = [g for g in placement_group_table().values() if g["state"] != "REMOVED"]
        free_cpus = ray_local.available_resources().get("CPU")  # the raylet reports releases a moment late
        if not live_groups and not any("Train" in name for name in alive) and free_cpus == 2.0:
            break
        if time.time() > deadline:
            break
        time.sleep(1)
    assert not live_groups, live_groups
    assert not [name for name in alive if "Train" in name], alive
    assert free_cpus == 2.0, (free_cpus, alive)
    for row in tuned["rows"]:  # each Ray Train run had a placement group of its own, now removed
        record = Path(row["dir"]) / PG_FILE
        assert record.is_file() != tune_cfg.trials_in_process  # a trial in its own process has no worker group
        if record.is_file():
            assert placement_group_table()[record.read_text().strip()]["state"] == "REMOVED"


def test_trials_in_process_reuse_warm_processes(tuned, tune_cfg):
    """Four trials, two at a time, trained in two processes: each process (its imports, its torch) served two
    trials; each trial's Tune results come from the process it trained in. A Ray Train trial's driver process is
    fresh for every trial."""
    from honed.tune import experiment_dir

    pids = {}
    for trial in Path(experiment_dir(tune_cfg)).glob("trial_*"):
        results = read_jsonl(trial / "result.json")
        assert results and len({r["pid"] for r in results}) == 1
        pids[trial.name] = results[0]["pid"]
    assert len(pids) == 4
    if tune_cfg.trials_in_process:
        assert len(set(pids.values())) == 2, pids
    else:
        assert len(set(pids.values())) == 4, pids


def test_a_finished_experiment_is_restored_not_rerun(tuned, tune_cfg):
    from honed.tune import tune

    logs = {row["trial"]: len(read_jsonl(Path(row["dir"]) / "progress.jsonl")) for row in tuned["rows"]}
    again = tune(tune_cfg)
    assert [(r["trial"], r["status"], r["final"]) for r in again["rows"]] == \
        [(r["trial"], r["status"], r["final"]) for r in tuned["rows"]]
    assert logs == {row["trial"]: len(read_jsonl(Path(row["dir"]) / "progress.jsonl")) for row in again["rows"]}
    assert again["registered"] == "tiny-best@1"  # the same weights are not registered twice


def test_cli_refuses_resume_without_an_experiment(tune_cfg, tmp_path, capsys):
    from honed.cli import main

    path = tmp_path / "tune.yaml"
    data = tune_cfg.model_dump(mode="json", exclude_unset=True)
    path.write_text(yaml.safe_dump(data | {"name": "never-ran", "output_dir": str(tmp_path / "t")}))
    assert main(["tune", str(path), "--resume"]) == 1
    assert "--resume: no tune experiment at" in capsys.readouterr().err


@pytest.mark.slow
def test_an_interrupted_search_resumes_without_rerunning_finished_trials(tune_cfg, ray_local, tmp_path):
    """`honed tune` in its own process and its own local Ray, interrupted (SIGINT) once the first of two trials has
    finished and the second is starting; `honed tune --resume` then runs the second only. ~4 minutes."""
    import os
    import signal
    import subprocess
    import sys

    data = tune_cfg.model_dump(mode="json", exclude_unset=True) | {
        "space": {"optim.lr": {"grid": LRS[:2]}}, "max_concurrent_trials": 1, "scheduler": {"name": "fifo"},
        "output_dir": str(tmp_path / "tune"), "name": "interrupted", "register": None}
    path = tmp_path / "tune.yaml"
    path.write_text(yaml.safe_dump(data))
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    env["RAY_ADDRESS"] = "local"  # a Ray of its own, never another cluster on this machine
    trials = tmp_path / "tune" / "trials"

    def started() -> list[Path]:  # a trial's dir appears when its TorchTrainer sets up its storage
        return sorted(trials.glob("trial_*"))

    proc = subprocess.Popen([sys.executable, "-m", "honed.cli", "tune", str(path)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 400
    while not (len(started()) == 2 and list(trials.glob("*/adapter/honed.json"))) and proc.poll() is None:
        assert time.time() < deadline, "the first trial never finished"
        time.sleep(1)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 1 and "interrupted with 1 trial(s) unfinished" in out, out[-3000:]
    finished = next(p.parent for p in trials.glob("*/adapter/honed.json")).parent
    lines = len(read_jsonl(finished / "progress.jsonl"))

    again = subprocess.run([sys.executable, "-m", "honed.cli", "tune", str(path), "--resume"], env=env,
                           capture_output=True, text=True, timeout=600, check=False)
    assert again.returncode == 0, (again.stdout + again.stderr)[-3000:]
    assert "continuing the experiment at" in again.stdout
    rows = read_results(load_tune(path))
    assert [r["status"] for r in rows] == ["completed", "completed"] and len({r["trial"] for r in rows}) == 2
    assert len(read_jsonl(finished / "progress.jsonl")) == lines  # the finished trial did not run again


def load_tune(path: Path):
    from honed.config import TuneConfig, load_config

    return load_config(TuneConfig, path)
