"""Ray Train resilience: a training worker SIGKILLed mid-run (the run restarts from its last checkpoint and
finishes), the `honed train` command's controller SIGKILLed (its placement group freed with the job), and a
2-worker run placed STRICT_SPREAD over a 2-node local Ray cluster."""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import pytest
from _run_logs import CHECKPOINT_MANAGER_SNAPSHOT_FILENAME, logged_steps, read_jsonl, registered_checkpoint_step

HERE = Path(__file__).parent
TOTAL_STEPS, CHECKPOINT_EVERY = 15, 3


def train_workers() -> list[psutil.Process]:
    """This session's live Ray Train worker actors (`ray::RayTrainWorker...`, not the TrainController)."""
    return actor_processes("RayTrainWorker")


def actor_processes(title_part: str) -> list[psutil.Process]:
    """This session's live actor processes whose title holds `title_part`: children of the raylet that
    `ray_local` started under this process, so no other Ray on the machine is touched."""
    found = []
    for raylet in psutil.Process().children():
        try:
            if raylet.name() != "raylet":
                continue
            for proc in raylet.children():
                title = " ".join(proc.cmdline()) or proc.name()
                if title_part in title and proc.status() != psutil.STATUS_ZOMBIE:
                    found.append(proc)
        except psutil.Error:
            pass
    return found


def stop_run(thread: threading.Thread) -> None:
    """A failed test must not leave its run training in the session's Ray: kill its workers until the run has
    used up its max_failures and `train` returns."""
    deadline = time.monotonic() + 120
    while thread.is_alive() and time.monotonic() < deadline:
        for proc in train_workers():
            try:
                proc.kill()
            except psutil.Error:
                pass
        thread.join(timeout=5)


@pytest.mark.slow
def test_killed_worker_resumes_from_last_checkpoint(ray_local, prepared, tiny_model, tmp_path):
    from honed.config import TrainConfig
    from honed.train.trainer import train

    out = tmp_path / "run"
    cfg = TrainConfig.model_validate({
        "model": {"name_or_path": tiny_model}, "data_dir": prepared["dir"], "output_dir": str(out),
        "optim": {"lr": 2e-2, "max_steps": TOTAL_STEPS, "batch_size": 8, "warmup_steps": 2},
        "method": {"lora": {"r": 8, "alpha": 16, "dropout": 0.0}},
        "scaling": {"num_workers": 2, "max_failures": 1},
        "log_every": 1, "checkpoint_every": CHECKPOINT_EVERY, "name": "resilience",
    })
    live = out / "progress.jsonl"
    snapshot = out / "checkpoints" / "resilience" / CHECKPOINT_MANAGER_SNAPSHOT_FILENAME
    outcome: dict = {}

    def run():
        try:
            outcome["metrics"] = train(cfg)
        except BaseException as e:  # noqa: BLE001 - reported by the test thread
            outcome["error"] = e

    thread = threading.Thread(target=run, name="resilience-train", daemon=True)
    started = time.monotonic()
    thread.start()
    try:
        victim, registered, before = kill_between_checkpoints(thread, live, snapshot, outcome)
        killed_at = time.monotonic() - started
        thread.join(timeout=300)
        assert not thread.is_alive(), f"the run did not finish after the kill: {read_jsonl(live)[-3:]}"
    finally:
        stop_run(thread)
    if "error" in outcome:
        raise outcome["error"]
    metrics = outcome["metrics"]
    elapsed = time.monotonic() - started

    records = read_jsonl(live)
    resumed = [i for i, r in enumerate(records) if r.get("event") == "resumed"]
    assert len(resumed) == 1, records
    before_kill, after = logged_steps(records[:resumed[0]]), logged_steps(records[resumed[0] + 1:])
    resume_step = records[resumed[0]]["step"]

    # the restart restored the checkpoint the controller had registered when the worker died
    assert resume_step == registered >= CHECKPOINT_EVERY, (resume_step, registered, before_kill)
    # at most the step in flight was logged after the kill (by a surviving rank 0 past its last collective)
    assert before <= before_kill[-1] <= before + 1, (before, before_kill)
    # before the kill: 1..k once each; after: resume_step+1..15 once each
    assert before_kill == list(range(1, before_kill[-1] + 1))
    assert before_kill[-1] >= 5
    assert after == list(range(resume_step + 1, TOTAL_STEPS + 1))
    redone = sorted(set(before_kill) & set(after))
    assert redone == list(range(resume_step + 1, before_kill[-1] + 1))
    assert len(redone) <= CHECKPOINT_EVERY, redone

    # the run finished, and its checkpointed history has every step exactly once
    assert metrics["step"] == TOTAL_STEPS
    history = read_jsonl(out / "metrics.jsonl")
    assert [m["step"] for m in history] == list(range(1, TOTAL_STEPS + 1))
    assert history[-1]["loss"] < history[0]["loss"], [m["loss"] for m in history]
    workers_after = json.loads((out / "efficiency.json").read_text())["workers"]
    assert sorted(w["rank"] for w in workers_after) == [0, 1]
    assert victim.pid not in {w["pid"] for w in workers_after}
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    print(f"\n[resilience] killed pid {victim.pid} at step {before_kill[-1]}, {killed_at:.0f}s in; resumed at "
          f"{resume_step}; redone {redone}; {elapsed:.0f}s in all")


def test_the_train_command_frees_its_placement_group_when_its_controller_dies(ray_local, prepared, tiny_model, tmp_path,
                                                                             actors_started):
    """`honed train` runs without Ray Train's placement-group cleaner (honed.train.trainer.unneeded_callbacks):
    the command's driver is its job. Its controller SIGKILLed mid-run, the command fails and Ray frees the
    workers' placement group with the job, which is what the cleaner is there to do."""
    import ray
    import yaml
    from ray.util import placement_group_table

    out = tmp_path / "run"
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"name_or_path": tiny_model}, "data_dir": prepared["dir"], "output_dir": str(out),
        "optim": {"lr": 2e-2, "max_steps": 500, "batch_size": 8}, "method": {"lora": {"r": 8, "alpha": 16}},
        "log_every": 1, "checkpoint_every": 500, "name": "controller-dies"}))
    before = set(placement_group_table())
    launched = time.time()  # the command's controller starts seconds later
    with open(tmp_path / "cli.log", "w") as log, actors_started() as started:
        cli = subprocess.Popen([sys.executable, "-m", "honed.cli", "train", str(config),
                                "--address", ray.get_runtime_context().gcs_address],
                               stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
        try:
            deadline = time.monotonic() + 240
            while not logged_steps(read_jsonl(out / "progress.jsonl")) and cli.poll() is None:
                assert time.monotonic() < deadline, "the run logged no step"
                time.sleep(0.2)
            table = placement_group_table()
            groups = {pg: table[pg] for pg in table.keys() - before}
            # the command's controller: an earlier run's may still be exiting
            (controller,) = [p for p in actor_processes("TrainController") if p.create_time() >= launched]
            controller.kill()
            status = cli.wait(timeout=120)
        finally:
            if cli.poll() is None:
                cli.kill()
    output = (tmp_path / "cli.log").read_text()
    assert status != 0 and "ActorDiedError" in output, output[-2000:]
    assert "PlacementGroupCleaner" not in started and any("RayTrainWorker" in name for name in started), started
    assert len(groups) == 1 and next(iter(groups.values()))["state"] == "CREATED", groups
    (group,) = groups
    deadline = time.monotonic() + 60
    while (state := placement_group_table()[group]["state"]) != "REMOVED":
        assert time.monotonic() < deadline, f"the run's placement group is still {state} after the command exited"
        time.sleep(0.5)


def kill_between_checkpoints(thread, live: Path, snapshot: Path, outcome: dict):
    """SIGKILL one training worker once step >= 5 is logged and a checkpoint is registered, while the last logged
    step is not itself a checkpoint step (whose report could be in flight). Ray Train's per-worker result queue
    holds one report, so the registered checkpoint trails the logged step by about two steps, and steps advance
    about one per controller poll (2 s), so a 20 ms watch sees every step.

    Returns the killed process, the registered checkpoint step read right after the kill (what a restart
    restores: a checkpoint reported but not yet polled by the controller dies with the worker) and the last step
    logged before the kill."""
    deadline = time.monotonic() + 240
    while True:
        assert thread.is_alive(), f"training ended before the kill: {outcome}"
        assert time.monotonic() < deadline, f"no step >= 5 past a checkpoint: {read_jsonl(live)[-3:]}"
        steps = logged_steps(read_jsonl(live))
        last = steps[-1] if steps else 0
        registered = registered_checkpoint_step(snapshot)
        assert last < TOTAL_STEPS - 2, f"no kill window found before step {last}; checkpoint {registered}"
        if last >= 5 and registered >= CHECKPOINT_EVERY and registered < last < registered + CHECKPOINT_EVERY:
            break
        time.sleep(0.02)
    workers = train_workers()
    assert len(workers) == 2, workers
    victim = max(workers, key=lambda p: p.pid)
    victim.send_signal(signal.SIGKILL)
    registered = registered_checkpoint_step(snapshot)
    return victim, registered, logged_steps(read_jsonl(live))[-1]


# ------------------------------------------------------------------------------------------- multi-node
def descendants(pid: int) -> dict[int, float]:
    """pid -> create_time of every live descendant (create_time guards against pid reuse)."""
    try:
        procs = psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return {}
    seen = {}
    for p in procs:
        try:
            seen[p.pid] = p.create_time()
        except psutil.Error:
            pass
    return seen


def still_alive(seen: dict[int, float]) -> list[psutil.Process]:
    alive = []
    for pid, created in seen.items():
        try:
            p = psutil.Process(pid)
            if p.create_time() == created and p.status() != psutil.STATUS_ZOMBIE:
                alive.append(p)
        except psutil.Error:
            pass
    return alive


def describe(procs: list[psutil.Process]) -> list[str]:
    out = []
    for p in procs:
        try:
            out.append(f"{p.pid} {p.name()}")
        except psutil.Error:
            pass
    return out


def kill_all(procs: list[psutil.Process]) -> None:
    for p in procs:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(procs, timeout=10)


@pytest.mark.slow
def test_strict_spread_run_uses_both_nodes_of_a_two_node_cluster(prepared, tiny_model, tmp_path):
    # A cluster of its own in a subprocess (this process already holds `ray_local`): its own short temp dir
    # (Ray's socket paths must stay under 107 bytes), dynamic ports for every node.
    ray_tmp = tempfile.mkdtemp(prefix="rmn", dir="/tmp")
    result_file, log_file = tmp_path / "result.json", tmp_path / "multinode.log"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {
        "RAY_TMPDIR": ray_tmp, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, str(HERE / "_multinode_train.py"), "--model", tiny_model, "--data", prepared["dir"],
           "--out", str(tmp_path / "run"), "--result", str(result_file)]
    started = time.monotonic()
    seen: dict[int, float] = {}
    timed_out = False
    limit_s = 900  # ~3 min on a quiet 2-core machine; 8 min seen with other test sessions running
    with open(log_file, "wb") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            while proc.poll() is None:  # remember every process the run starts, to check none outlives it
                seen |= descendants(proc.pid)
                if time.monotonic() - started > limit_s:
                    timed_out = True
                    break
                time.sleep(1)
        finally:
            if proc.poll() is None:
                seen |= descendants(proc.pid)
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
    elapsed = time.monotonic() - started
    # Ray's processes go down with the cluster; give them a moment, then remove (and report) any left over
    deadline = time.monotonic() + 20
    while still_alive(seen) and time.monotonic() < deadline:
        time.sleep(0.5)
    leaked = still_alive(seen)
    leaked_desc = describe(leaked)
    kill_all(leaked)
    shutil.rmtree(ray_tmp, ignore_errors=True)
    tail = log_file.read_text(errors="replace")[-4000:]
    assert not timed_out, f"the 2-node run took over {limit_s} s and was killed (leaked: {leaked_desc}):\n{tail}"
    assert proc.returncode == 0, tail
    assert not leaked_desc, f"processes outlived the 2-node cluster: {leaked_desc}"
    assert len(seen) >= 4, seen  # gcs, raylets, workers really ran under the subprocess

    result = json.loads(result_file.read_text())
    nodes = result["nodes"]
    assert len(nodes) == 2 and len(set(nodes)) == 2, nodes
    workers = result["efficiency"]["workers"]
    assert sorted(w["rank"] for w in workers) == [0, 1]
    assert {w["node_id"] for w in workers} == set(nodes)  # one worker on each node
    losses = [m["loss"] for m in result["history"]]
    assert result["metrics"]["step"] == result["total_steps"]
    assert losses[-1] < losses[0], losses
    print(f"\n[multinode] workers on {[w['node_id'][:8] for w in workers]}; losses {losses}; {elapsed:.0f}s")
