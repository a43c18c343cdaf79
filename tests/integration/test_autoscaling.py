"""Ray's autoscaler for real on one machine: cluster/fake-multinode.yaml on a `ray start --head` with
RAY_FAKE_CLUSTER=1, and cluster/autoscaling_demo.py asking for more CPUs than the head has. The autoscaler adds
worker nodes until the work fits, and removes them once they have been idle for idle_timeout_minutes.

This is what `ray.cluster_utils.AutoscalingCluster` starts, started here by hand: that helper runs
`ray stop --force` (which takes down every Ray on the machine, other sessions' included) and builds its config
from an example file this Ray wheel does not ship; here the head gets ports and a temp dir of its own."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
FAKE = ROOT / "cluster" / "fake-multinode.yaml"


@pytest.mark.slow  # 91 s here, most of it the head starting on 2 busy cores
def test_autoscaler_adds_workers_for_work_and_removes_them_when_idle(ray_nodes, tmp_path):
    config = yaml.safe_load(FAKE.read_text())
    nodes = ray_nodes(RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S="1")  # a check each second, not each 5
    config["provider"]["gcs_address"] = nodes.gcs_address  # fake workers join this head, not <ip>:6379
    path = tmp_path / "fake-multinode.yaml"
    path.write_text(yaml.safe_dump(config))
    head_cpus = config["available_node_types"][config["head_node_type"]]["resources"]["CPU"]
    worker = config["available_node_types"]["cpu_worker"]
    assert worker["max_workers"] == config["max_workers"] == 2
    nodes.start_head(f"--autoscaling-config={path}", num_cpus=head_cpus)
    nodes.wait_for_nodes(1)

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
