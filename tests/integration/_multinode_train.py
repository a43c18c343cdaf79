"""Helper of test_train_resilience (run in a subprocess, since the test process already has a local Ray):
start a 2-node local Ray cluster (`ray.cluster_utils.Cluster`: a head and one worker node, 2 logical CPUs each),
train 2 LoRA workers placed STRICT_SPREAD on it, write the result as JSON, and take the cluster down.

    RAY_TMPDIR=/tmp/short python tests/integration/_multinode_train.py --model M --data D --out O --result R.json
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

STEPS = 8
NODE_CPUS = 2


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True, help="a prepared dataset dir")
    parser.add_argument("--out", required=True)
    parser.add_argument("--result", required=True)
    args = parser.parse_args()
    assert os.environ.get("RAY_TMPDIR"), "set RAY_TMPDIR (a short path of this cluster's own)"
    os.environ.pop("RAY_ADDRESS", None)
    # With the dashboard off, Ray still advertises 127.0.0.1:8265 as this cluster's state API, and Ray Train's
    # PlacementGroupCleaner polls it to see whether the run's controller is alive: another Ray's dashboard on
    # that port answers "no such actor", and the cleaner then removes this run's placement group (its workers
    # die mid-run). Point the state API at a closed port instead: the cleaner's queries fail and it only warns.
    os.environ["RAY_API_SERVER_ADDRESS"] = "http://127.0.0.1:1"

    import ray
    from ray.cluster_utils import Cluster

    from honed.config import TrainConfig
    from honed.runtime import _quiet_data_logs
    from honed.train.trainer import train

    started = time.monotonic()
    # Every port dynamic (Ray's default for these nodes), the dashboard off: nothing collides with another
    # Ray on this machine. 2 logical CPUs a node: a worker takes 0.5 and Ray Data's parquet read tasks ask
    # for 1 CPU each, which a node left with 0.5 can never schedule (the run then hangs in backpressure).
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": NODE_CPUS, "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=NODE_CPUS)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, logging_level="WARNING")
        _quiet_data_logs()
        nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
        print(f"[multinode] cluster up in {time.monotonic() - started:.0f}s: {nodes}", flush=True)
        cfg = TrainConfig.model_validate({
            "model": {"name_or_path": args.model}, "data_dir": args.data, "output_dir": args.out,
            "optim": {"lr": 2e-2, "max_steps": STEPS, "batch_size": 8, "warmup_steps": 1},
            "method": {"lora": {"r": 8, "alpha": 16, "dropout": 0.0}},
            "scaling": {"num_workers": 2, "cpus_per_worker": 0.5, "placement_strategy": "STRICT_SPREAD"},
            "log_every": 2, "checkpoint_every": STEPS, "name": "multinode",
        })
        metrics = train(cfg)
        history = [json.loads(line) for line in Path(args.out, "metrics.jsonl").read_text().splitlines()]
        Path(args.result).write_text(json.dumps({
            "nodes": nodes, "total_steps": STEPS, "history": history,
            "metrics": {k: v for k, v in metrics.items() if k not in ("efficiency", "export_check")},
            "efficiency": metrics["efficiency"], "seconds": round(time.monotonic() - started, 1),
        }, indent=2, default=str))
        print(f"[multinode] trained in {time.monotonic() - started:.0f}s", flush=True)
    finally:
        ray.shutdown()
        cluster.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
