"""`honed submit` and `honed jobs` against a 2-node `ray start` cluster started by the test: a prepare + train job
(one training worker on each node, STRICT_SPREAD) streams its logs and is stopped mid-run by `honed jobs stop`
(STOPPED, training halts); resubmitting the train step resumes from the last registered checkpoint and finishes,
with the dataset, the checkpoints and the adapter in the paths the job's configs name."""

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

# pytest puts tests/integration on sys.path
from _run_logs import (
    CHECKPOINT_MANAGER_SNAPSHOT_FILENAME,
    logged_steps,
    read_jsonl,
    registered_checkpoint_step,
)

BIN = Path(sys.executable).parent
TOTAL_STEPS, LOG_EVERY, CHECKPOINT_EVERY = 24, 2, 4
RUN = "cluster-lora"


@pytest.fixture
def two_node_cluster(ray_nodes):
    """A `ray start --head` and a `ray start --address` node, 2 CPUs each."""
    nodes = ray_nodes()
    nodes.start_head()
    nodes.add_node()
    nodes.wait_for_nodes(2)
    nodes.wait_for_jobs()
    return nodes


def honed(nodes, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "honed"), *args, "--address", nodes.address], env=nodes.env,
                          capture_output=True, text=True, timeout=timeout, check=False)


def write_jobs(work: Path, model: str, data: Path, out: Path, storage: Path) -> None:
    """prepare.yaml + train.yaml, and two job files: prepare-then-train, and the train step alone."""
    (work / "prepare.yaml").write_text(yaml.safe_dump({
        "model": {"name_or_path": model}, "output_dir": str(data),
        "data": {"max_seq_len": 160, "sources": [
            {"name": "icd10", "kind": "icd10", "chapters": ["4"], "max_records": 700},
            {"name": "kjv", "kind": "kjv", "max_records": 40, "eval_only": True}]}}))
    (work / "train.yaml").write_text(yaml.safe_dump({
        "model": {"name_or_path": model}, "data_dir": str(data), "output_dir": str(out),
        "storage_path": str(storage), "name": RUN,
        "optim": {"lr": 2e-2, "max_steps": TOTAL_STEPS, "batch_size": 4, "warmup_steps": 2},
        "method": {"lora": {"r": 8, "alpha": 16, "dropout": 0.0}},
        "scaling": {"num_workers": 2, "cpus_per_worker": 0.5, "placement_strategy": "STRICT_SPREAD"},
        "log_every": LOG_EVERY, "checkpoint_every": CHECKPOINT_EVERY}))
    honed_cli = f"{sys.executable} -m honed.cli"  # this venv's python: a job's PATH is the raylet's
    runtime_env = {"working_dir": str(work), "env_vars": {"TOKENIZERS_PARALLELISM": "false"}}
    for name, entrypoint, submission_id in [
        ("first", f"bash -c '{honed_cli} prepare prepare.yaml && {honed_cli} train train.yaml'", "prepare-train-1"),
        ("rerun", f"{honed_cli} train train.yaml", "train-rerun-1"),
    ]:
        (work / f"{name}.yaml").write_text(yaml.safe_dump({
            "entrypoint": entrypoint, "runtime_env": runtime_env, "submission_id": submission_id,
            "metadata": {"test": "cluster-jobs"}}))


def wait_for_checkpoint(snapshot: Path, proc: subprocess.Popen, log: Path) -> int:
    """The step of the first checkpoint Ray Train's controller registers (what a rerun restores from)."""
    deadline = time.monotonic() + 600
    while (step := registered_checkpoint_step(snapshot)) < CHECKPOINT_EVERY:
        assert proc.poll() is None, f"`honed submit` ended before a checkpoint:\n{log.read_text()[-4000:]}"
        assert time.monotonic() < deadline, f"no checkpoint registered in 600 s:\n{log.read_text()[-4000:]}"
        time.sleep(0.2)
    return step


@pytest.mark.slow
def test_prepare_train_job_on_two_nodes_is_stopped_and_a_rerun_resumes(two_node_cluster, tiny_model, tmp_path):
    nodes = two_node_cluster
    work, data, out, storage = (tmp_path / d for d in ("work", "data", "out", "storage"))
    work.mkdir()
    out.mkdir()  # rank 0 appends progress.jsonl to output_dir during training; honed train creates it only at export
    write_jobs(work, tiny_model, data, out, storage)
    live, snapshot = out / "progress.jsonl", storage / RUN / CHECKPOINT_MANAGER_SNAPSHOT_FILENAME
    started = time.monotonic()

    # prepare + train, followed by `honed submit` (logs streamed), stopped once a checkpoint is registered
    log = tmp_path / "first.log"
    with open(log, "w") as fh:
        first = subprocess.Popen([str(BIN / "honed"), "submit", str(work / "first.yaml"), "--address", nodes.address],
                                 env=nodes.env, stdout=fh, stderr=subprocess.STDOUT)
    try:
        registered = wait_for_checkpoint(snapshot, first, log)
        stop = honed(nodes, "jobs", "stop", "prepare-train-1")
        first.wait(timeout=120)
    finally:
        if first.poll() is None:
            first.kill()
    stopped_after = time.monotonic() - started
    streamed = log.read_text()
    assert stop.returncode == 0 and "[honed.jobs] job prepare-train-1 STOPPED" in stop.stdout, stop
    assert first.returncode == 1, streamed[-4000:]  # `honed submit` exits non-zero for a job that did not succeed
    assert "[honed.submit] job prepare-train-1 submitted" in streamed
    assert "[honed.prepare]" in streamed and f"[honed.train] step {LOG_EVERY}/{TOTAL_STEPS}" in streamed
    assert "[honed.submit] job prepare-train-1 STOPPED" in streamed
    assert honed(nodes, "jobs", "status", "prepare-train-1").stdout.startswith("prepare-train-1: STOPPED")
    assert (data / "manifest.json").is_file() and list((data / "shards" / "train").glob("*.parquet"))
    time.sleep(3)  # the driver's actors (controller, workers) go down just after the job is marked STOPPED
    at_stop = logged_steps(read_jsonl(live))
    time.sleep(6)
    assert logged_steps(read_jsonl(live)) == at_stop, "training went on after the job was stopped"
    assert at_stop[-1] < TOTAL_STEPS and not (out / "adapter").exists()

    # the train step again, as a new job: resumes from the checkpoint and finishes on both nodes
    rerun = honed(nodes, "submit", str(work / "rerun.yaml"), timeout=600)
    rerun_log = rerun.stdout + rerun.stderr
    assert rerun.returncode == 0, rerun_log[-4000:]
    assert "[honed.submit] job train-rerun-1 SUCCEEDED" in rerun_log
    resumed = re.search(rf"\[honed\.train\] resumed at step (\d+)/{TOTAL_STEPS}", rerun_log)
    assert resumed, rerun_log[-4000:]
    resume_step = int(resumed.group(1))
    assert registered <= resume_step <= at_stop[-1] and resume_step % CHECKPOINT_EVERY == 0
    records = read_jsonl(live)
    event = next(i for i, r in enumerate(records) if r.get("event") == "resumed")
    assert logged_steps(records[event + 1:]) == list(range(resume_step + LOG_EVERY, TOTAL_STEPS + 1, LOG_EVERY))
    history = read_jsonl(out / "metrics.jsonl")  # the checkpointed history: every logged step once
    assert [m["step"] for m in history] == list(range(LOG_EVERY, TOTAL_STEPS + 1, LOG_EVERY))

    workers = json.loads((out / "efficiency.json").read_text())["workers"]
    assert sorted(w["rank"] for w in workers) == [0, 1]
    assert {w["node_id"] for w in workers} == set(nodes.alive_nodes())  # one training worker on each node
    adapter = out / "adapter"
    assert (adapter / "adapter_model.safetensors").is_file()
    assert json.loads((adapter / "honed.json").read_text())["final_metrics"]["step"] == TOTAL_STEPS
    assert list((storage / RUN).glob("checkpoint_*")) and snapshot.is_file()  # Ray Train's storage: storage_path

    listed = honed(nodes, "jobs", "list").stdout
    assert re.search(r"prepare-train-1\s+STOPPED", listed) and re.search(r"train-rerun-1\s+SUCCEEDED", listed)
    assert "[honed.prepare]" in honed(nodes, "jobs", "logs", "prepare-train-1").stdout
    print(f"\n[cluster-jobs] stopped at step {at_stop[-1]} ({stopped_after:.0f}s in), resumed at {resume_step}; "
          f"workers on {sorted(w['node_id'][:8] for w in workers)}; {time.monotonic() - started:.0f}s in all")
