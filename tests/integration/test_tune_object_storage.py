"""`honed tune` with its output_dir and registry in object storage (a real S3-compatible server, moto on 127.0.0.1):
the CLI runs two trials (one worker each, trained in the trials' own processes, on the tiny model, from the local
prepared dataset) from a driver directory that must stay empty. The results, best_train.yaml, every trial's run,
checkpoints and adapter and the Tune experiment itself are read back from the bucket, the best adapter from the s3:// registry, and
`--restart` deletes the experiment and its trials there."""

from __future__ import annotations

import csv
import io

import pytest
import yaml
from s3_server import BUCKET
from test_object_storage import ray_s3, s3  # noqa: F401 (moto, and the local Ray whose workers see it)

ROOT = f"s3://{BUCKET}/tune-s3"
OUT, REGISTRY, NAME = f"{ROOT}/tune", f"{ROOT}/registry", "tiny-s3-tune"
LRS = [2e-2, 1e-2]


@pytest.fixture(scope="module")
def tune_yaml(prepared, tiny_model, tmp_path_factory):
    """The config file (local, outside the driver dir). `prepared` comes first: it needs the session's Ray, which
    ray_s3 then restarts with the S3 environment."""
    path = tmp_path_factory.mktemp("tune-s3-config") / "tune.yaml"
    path.write_text(yaml.safe_dump({
        "train": {
            "model": {"name_or_path": tiny_model}, "data_dir": prepared["dir"],
            "method": {"lora": {"r": 8, "alpha": 16, "dropout": 0.0}},
            "optim": {"max_steps": 2, "batch_size": 8, "warmup_steps": 0, "schedule": "constant"},
            "scaling": {"num_workers": 1, "cpus_per_worker": 0.4},
            "log_every": 1, "checkpoint_every": 2, "keep_checkpoints": 1, "val_max_examples": 8,
        },
        "space": {"optim.lr": {"grid": LRS}}, "search": {"algorithm": "grid", "num_samples": 1},
        "scheduler": {"name": "fifo"}, "max_concurrent_trials": 2, "trial_cpus": 0.05,
        "output_dir": OUT, "name": NAME, "register": {"registry": REGISTRY, "name": "tiny-s3-best"},
    }))
    return path


@pytest.fixture(scope="module")
def tuned(tune_yaml, ray_s3, tmp_path_factory):  # noqa: F811
    from honed.cli import main

    driver = tmp_path_factory.mktemp("tune-s3-driver")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(driver)  # relative paths would land here: nothing may
        patch.setenv("HONED_CACHE", str(tmp_path_factory.mktemp("tune-s3-cache")))
        status = main(["tune", str(tune_yaml)])
    return {"status": status, "driver": driver}


def results() -> list[dict]:
    from honed.storage import read_text

    return list(csv.DictReader(io.StringIO(read_text(f"{OUT}/results.csv"))))


def test_results_and_best_config_are_in_the_bucket(tuned, prepared):
    from honed.storage import is_file, read_text

    assert tuned["status"] == 0
    rows = results()
    assert [r["status"] for r in rows] == ["completed", "completed"], rows
    assert sorted(float(r["optim.lr"]) for r in rows) == sorted(LRS)
    best = yaml.safe_load(read_text(f"{OUT}/best_train.yaml"))
    assert best["optim"]["lr"] == float(rows[0]["optim.lr"])
    assert (best["output_dir"], best["name"], best["data_dir"]) == (f"{OUT}/best", f"{NAME}-best", prepared["dir"])
    assert all(is_file(f"{OUT}/{name}") for name in ("results.md", "report.md", "plots/trials.png"))
    assert rows[0]["trial"] in read_text(f"{OUT}/report.md")


def test_every_trial_ran_into_the_bucket(tuned):
    import json

    from honed.storage import is_dir, is_file, read_text
    from honed.train.in_process import INDEX_FILE

    for row in results():
        trial = f"{OUT}/trials/{row['trial']}"
        assert is_file(f"{trial}/adapter/adapter_model.safetensors") and is_file(f"{trial}/adapter/honed.json")
        assert is_file(f"{trial}/metrics.jsonl")
        # trained in the trial's own process: its checkpoints persisted to the bucket by honed, not Ray Train
        run = f"{trial}/checkpoints/{row['trial']}"
        kept = json.loads(read_text(f"{run}/{INDEX_FILE}"))["checkpoints"]
        assert [c["metrics"]["step"] for c in kept] == [2]
        assert is_file(f"{run}/{kept[0]['name']}/adapter/adapter_model.safetensors")
        assert not is_file(f"{trial}/placement_group_id")  # no Ray Train worker group
    assert is_dir(f"{OUT}/{NAME}")  # the Tune experiment: storage_path defaults to output_dir, a URI


def test_best_adapter_is_registered_in_the_s3_registry(tuned):
    from honed.registry import Registry, safetensors_sha256
    from honed.storage import local_copy

    best = results()[0]["trial"]
    with local_copy(f"{OUT}/trials/{best}/adapter") as adapter:
        sha = safetensors_sha256(adapter)
    registry = Registry(REGISTRY)
    assert registry.versions("tiny-s3-best") == [1]
    assert registry.show("tiny-s3-best@1")["adapter_sha256"] == sha


def test_the_driver_wrote_nothing_in_its_working_dir(tuned):
    assert list(tuned["driver"].iterdir()) == []


def test_restart_deletes_the_experiment_and_trials_in_the_bucket(tuned, tune_yaml):
    from honed.config import TuneConfig, load_config
    from honed.storage import is_dir, is_file
    from honed.tune import preflight

    assert preflight(load_config(TuneConfig, tune_yaml), restart=True) is None
    assert not is_dir(f"{OUT}/trials") and not is_dir(f"{OUT}/{NAME}")
    assert is_file(f"{OUT}/results.csv")  # the tables stay until the next run rewrites them
