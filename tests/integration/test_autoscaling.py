"""Ray's autoscaler for real on one machine: cluster/fake-multinode.yaml on a `ray start --head` with
RAY_FAKE_CLUSTER=1, and cluster/autoscaling_demo.py asking for more CPUs than the head has. The autoscaler adds
worker nodes until the work fits, and removes them once they have been idle for idle_timeout_minutes.

This is what `ray.cluster_utils.AutoscalingCluster` starts, started here by hand: that helper runs
`ray stop --force` (which takes down every Ray on the machine, other sessions' included) and builds its config
from an example file this Ray wheel does not ship; here the head gets ports and a temp dir of its own.

The same with honed's own work: cluster/autoscaling_honed.py runs `honed train` asking for more CPUs than the head
has and `honed serve` under more requests than its autoscaling target, and writes the timeline this test reads."""

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
FAKE = ROOT / "cluster" / "fake-multinode.yaml"


def start_fake_cluster(ray_nodes, tmp_path) -> tuple:
    """A head of fake-multinode.yaml's size whose autoscaler starts fake workers (RayNodes, dict of the config)."""
    config = yaml.safe_load(FAKE.read_text())
    # AUTOSCALER_UPDATE_INTERVAL_S: a check each second, not each 5. RAY_memory_monitor_refresh_ms=0: every fake
    # node sees the whole machine's memory, other users' processes included, and Ray's monitor killed this
    # cluster's 100 MB workers for memory others held (seen here).
    nodes = ray_nodes(RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S="1", RAY_memory_monitor_refresh_ms="0")
    # Ray Train's placement-group cleaner asks the state API, which cannot pick among this machine's Ray instances
    nodes.env["RAY_API_SERVER_ADDRESS"] = nodes.address
    config["provider"]["gcs_address"] = nodes.gcs_address  # fake workers join this head, not <ip>:6379
    path = tmp_path / "fake-multinode.yaml"
    path.write_text(yaml.safe_dump(config))
    nodes.start_head(f"--autoscaling-config={path}",
                     num_cpus=config["available_node_types"][config["head_node_type"]]["resources"]["CPU"])
    nodes.wait_for_nodes(1)
    return nodes, config


@pytest.mark.slow  # 91 s here, most of it the head starting on 2 busy cores
def test_autoscaler_adds_workers_for_work_and_removes_them_when_idle(ray_nodes, tmp_path):
    nodes, config = start_fake_cluster(ray_nodes, tmp_path)
    head_cpus = config["available_node_types"][config["head_node_type"]]["resources"]["CPU"]
    worker = config["available_node_types"]["cpu_worker"]
    assert worker["max_workers"] == config["max_workers"] == 2

    # one CPU more than the head and one worker hold: the autoscaler must add both workers
    actors = head_cpus + worker["resources"]["CPU"] + 1
    result = tmp_path / "timeline.json"
    started = time.monotonic()
    run = subprocess.run([sys.executable, str(ROOT / "cluster" / "autoscaling_demo.py"), "--address",
                          nodes.gcs_address, "--actors", str(actors), "--timeout", "240", "--out", str(result)],
                         env=nodes.env, capture_output=True, text=True, timeout=600, check=False)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:] + nodes.logs()[-2000:]
    elapsed = time.monotonic() - started

    timeline = json.loads(result.read_text())
    head, rows = timeline["head"], timeline["timeline"]
    assert rows[0]["nodes"] == [head]  # min_workers 0: only the head before the work arrives
    added = {n for r in rows for n in r["nodes"]} - {head}
    assert len(added) == 2, rows
    placed = next(r for r in rows if (r["event"] or "").startswith("all"))
    assert set(placed["nodes"]) == {head, *added} and placed["cpus"] == head_cpus + 2 * worker["resources"]["CPU"]
    assert set(timeline["actor_nodes"]) == {head, *added}  # the new nodes ran the work
    assert rows[-1]["nodes"] == [head]  # and were removed once idle
    removed_at = next(r["t"] for r in rows if r["t"] >= timeline["released_at"] and r["nodes"] == [head])
    idle_s = config["idle_timeout_minutes"] * 60
    assert removed_at - timeline["released_at"] >= idle_s - 1, (idle_s, rows)  # not before the idle timeout
    assert nodes.stop() == []  # nothing outlives the cluster
    print(f"\n[autoscaling] {len(added)} workers added by {placed['t']:.0f}s, removed "
          f"{removed_at - timeline['released_at']:.0f}s after the work ended; {elapsed:.0f}s in all\n{run.stdout}")


def honed_prepare(model: str, out: Path) -> None:
    """A small ICD-10 dataset for `model`, prepared on a local Ray of its own that is gone before the cluster starts."""
    config = out.parent / "prepare.yaml"
    config.write_text(yaml.safe_dump({"model": {"name_or_path": model}, "output_dir": str(out), "data": {
        "max_seq_len": 160, "sources": [{"name": "icd10", "kind": "icd10", "chapters": ["4"], "max_records": 300},
                                        {"name": "kjv", "kind": "kjv", "max_records": 40, "eval_only": True}]}}))
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    with tempfile.TemporaryDirectory(prefix="rayp", dir="/tmp", ignore_cleanup_errors=True) as ray_tmp:
        run = subprocess.run([sys.executable, "-m", "honed.cli", "prepare", str(config)], capture_output=True,
                             text=True, env=env | {"RAY_TMPDIR": ray_tmp}, timeout=900, check=False)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]


def rows_between(rows: list[dict], first: str, last: str) -> list[dict]:
    """The timeline rows from the event starting with `first` to the one starting with `last`, both included."""
    starts = [i for i, r in enumerate(rows) if (r["event"] or "").startswith(first)]
    ends = [i for i, r in enumerate(rows) if (r["event"] or "").startswith(last)]
    assert starts and ends, (first, last, rows)
    return rows[starts[0]:ends[0] + 1]


@pytest.mark.slow  # minutes: the head, two rounds of fake nodes coming and going, a training run and a Serve app
def test_honed_train_and_serve_make_the_autoscaler_add_nodes_and_remove_them(ray_nodes, tiny_model, free_port,
                                                                              tmp_path):
    data = tmp_path / "data"
    honed_prepare(tiny_model, data)
    nodes, config = start_fake_cluster(ray_nodes, tmp_path)
    result_path = tmp_path / "timeline.json"
    started = time.monotonic()
    run = subprocess.run([sys.executable, str(ROOT / "cluster" / "autoscaling_honed.py"), "--address",
                          nodes.gcs_address, "--model", tiny_model, "--data", str(data), "--workdir",
                          str(tmp_path / "work"), "--port", str(free_port()), "--timeout", "600", "--out",
                          str(result_path)], env=nodes.env, capture_output=True, text=True, timeout=1800, check=False)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:] + nodes.logs()[-2000:]
    elapsed = time.monotonic() - started
    result = json.loads(result_path.read_text())
    head, rows, train, serve = result["head"], result["timeline"], result["train"], result["serve"]
    assert rows[0]["nodes"] == [head]  # min_workers 0: the head alone before honed asks for anything

    # train: 2 workers × 1 CPU on a 1-CPU head → nodes added, a worker on one of them, the run complete
    training = rows_between(rows, "honed train:", "honed train finished")
    train_added = {n for r in training for n in r["nodes"]} - {head}
    assert train_added, training
    assert len(train["worker_nodes"]) == 2 and set(train["worker_nodes"].values()) & train_added, train
    assert train["metrics"][-1]["step"] == 6 and train["adapter_base_model"]
    assert rows_between(rows, "train's nodes removed", "train's nodes removed")[0]["nodes"] == [head]

    # serve: load above the target → a second replica on a node added for it; no request lost
    serving = rows_between(rows, "honed serve:", "added nodes removed")
    serve_added = {n for r in serving for n in r["nodes"]} - {head}
    scaled = rows_between(rows, "second replica", "second replica")[0]
    assert len(scaled["replica"]) == 2 and set(scaled["replica"].values()) & serve_added, scaled
    assert len(serve["replica_nodes"]) == 2 and serve["answered"] > 0 and serve["failed"] == 0, serve

    # and back: one replica, then the head alone, the node removed no sooner than the idle timeout
    one = rows_between(rows, "back to 1 replica", "back to 1 replica")[0]
    assert len(one["replica"]) == 1
    assert rows[-1]["nodes"] == [head] and not serve_added & set(rows[-1]["nodes"])
    replica_gone = next(r["t"] for r in serving if len(r["replica"]) == 1 and r["t"] > scaled["t"])
    removed = next(r["t"] for r in serving if r["t"] > replica_gone and r["nodes"] == [head])
    assert removed - replica_gone >= config["idle_timeout_minutes"] * 60 - 1, serving
    assert nodes.stop() == []  # nothing outlives the cluster
    print(f"\n[autoscaling] honed train + serve: {elapsed:.0f}s\n{run.stdout}")


def test_node_watch_records_the_node_of_each_actor_of_a_role(ray_local):
    sys.path.insert(0, str(ROOT / "cluster"))
    from autoscaling_demo import NodeWatch

    class Probe:
        def node(self) -> str:
            return ray_local.get_runtime_context().get_node_id()

    watch = NodeWatch({"probe": Probe.__qualname__})  # Ray's actor table names a class by its qualified name
    watch.alive("before")
    probe = ray_local.remote(num_cpus=0)(Probe).remote()
    node = ray_local.get(probe.node.remote())
    watch.alive()
    ray_local.kill(probe)
    watch.wait(lambda alive: not watch.rows[-1]["probe"], 60)
    assert watch.rows[0]["probe"] == {} and list(watch.rows[1]["probe"].values()) == [node]
    assert watch.rows[1]["nodes"] == [node] and watch.rows[-1]["probe"] == {}
