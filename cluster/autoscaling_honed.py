"""Autoscaling shown with honed's own work: `honed train` and `honed serve` on a cluster that starts as its head.

    RAY_FAKE_CLUSTER=1 ray start --head --num-cpus=1 --autoscaling-config=cluster/fake-multinode.yaml --block
    python -c "from honed.models import make_tiny_model; make_tiny_model('runs/auto/tiny')"
    honed prepare jobs/prepare_icd10.yaml model.name_or_path=runs/auto/tiny output_dir=runs/auto/data
    python cluster/autoscaling_honed.py --address auto --model runs/auto/tiny --data runs/auto/data \\
        --workdir runs/auto --out runs/auto/timeline.json
Override example: ... --train-workers 3 --clients 8   (any base model works: --model smollm2-135m-instruct)

1. train: `honed train` with `--train-workers` × `--cpus-per-worker` CPUs, more than the head holds; the
   autoscaler adds nodes, the run finishes (metrics.jsonl, adapter/); then the added nodes idle out.
2. serve: `honed serve --detach` serves the base and the adapter just trained, one replica of 1 CPU
   (`autoscaling` min 1, max 2, target `--target` requests in flight); `--clients` concurrent chat requests
   keep more than the target in flight until a second replica is placed on a node the autoscaler added; then
   the load stops, Serve goes back to one replica and the autoscaler removes the idle node.

Every change of the alive nodes, the train workers' nodes or the replicas' nodes is a row of the timeline
(`--out`, JSON; tests/integration/test_autoscaling.py reads it). The train and serve configs written to
`--workdir` are plain honed YAML: rerun them by hand with `honed train` / `honed serve`.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import ray
import yaml
from honed.artifacts import read_adapter_meta, read_metrics
from honed.serve.deploy import APP_NAME

from autoscaling_demo import NodeWatch  # cluster/ is this script's directory, first on sys.path

# the actors watched: Ray Train's workers and the replicas of honed's model deployment (Serve's actor names)
ROLES = {"train_worker": "RayTrainWorker", "replica": f"ServeReplica:{APP_NAME}:ModelServer"}
ADAPTER = "autoscaled"  # the adapter trained here, served under this name


def honed(args: list[str], log: Path, address: str) -> subprocess.Popen:
    """`honed <args> --address <address>` as a child process, its output in `log`."""
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, "-m", "honed.cli", *args, "--address", address], stdout=out,
                                stderr=subprocess.STDOUT)


def finish(proc: subprocess.Popen, watch: NodeWatch, log: Path, timeout_s: float) -> None:
    """Watch the cluster until `proc` exits; a failure or a timeout raises with the end of its log."""
    deadline = time.monotonic() + timeout_s
    while proc.poll() is None and time.monotonic() < deadline:
        watch.alive()
        time.sleep(0.5)
    if proc.poll() is None:
        proc.kill()
    if proc.wait() != 0:
        raise RuntimeError(f"`{' '.join(proc.args[2:])}` failed (exit {proc.returncode}, {timeout_s:.0f}s allowed):"
                           f"\n{log.read_text(errors='replace')[-4000:]}")


def train(args, watch: NodeWatch, workdir: Path) -> dict:
    """`honed train` asking for more CPUs than the head has; returns its output files and the workers' nodes."""
    out = workdir / "train"
    config = {"model": {"name_or_path": args.model}, "data_dir": args.data, "output_dir": str(out),
              "name": "autoscaling", "log_every": 2, "checkpoint_every": args.steps,
              "optim": {"max_steps": args.steps, "batch_size": 4, "warmup_steps": 1},
              "scaling": {"num_workers": args.train_workers, "cpus_per_worker": args.cpus_per_worker}}
    path = workdir / "train.yaml"
    path.write_text(yaml.safe_dump(config))
    start = len(watch.rows)
    watch.alive(f"honed train: {args.train_workers} workers × {args.cpus_per_worker:g} CPU")
    finish(honed(["train", str(path), "--restart"], workdir / "train.log", args.address), watch,
           workdir / "train.log", args.timeout)
    watch.alive("honed train finished")
    workers = {a: n for row in watch.rows[start:] for a, n in row["train_worker"].items()}
    metrics = read_metrics(out)
    return {"config": str(path), "worker_nodes": workers, "metrics": metrics, "adapter": str(out / "adapter"),
            "adapter_base_model": read_adapter_meta(out / "adapter")["base_model"]}


class ChatLoad:
    """`clients` threads, each sending chat completions one after another until stopped."""

    def __init__(self, url: str, clients: int) -> None:
        self.url, self.answered, self.failed, self.errors = url, 0, 0, []
        self.stopping, self.counting = threading.Event(), threading.Lock()
        self.threads = [threading.Thread(target=self.client, daemon=True) for _ in range(clients)]

    def client(self) -> None:
        body = json.dumps({"model": ADAPTER, "max_tokens": 24,
                           "messages": [{"role": "user", "content": "What does ICD-10-CM code E11.9 mean?"}]})
        while not self.stopping.is_set():
            request = urllib.request.Request(f"{self.url}/chat/completions", data=body.encode(),
                                             headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=120) as response:
                    answer = json.load(response)["choices"][0]["message"]["content"]
                error = None if isinstance(answer, str) else f"not an answer: {answer!r}"
            except Exception as err:  # counted, not raised: the timeline reports failures and the load goes on
                error = repr(err)
            with self.counting:
                self.answered += error is None
                self.failed += error is not None
                self.errors = (self.errors + [error])[-5:] if error else self.errors

    def __enter__(self) -> "ChatLoad":
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopping.set()
        for thread in self.threads:
            thread.join(timeout=150)


def serve_config(args, workdir: Path, adapter: str) -> Path:
    config = {"model": {"name_or_path": args.model}, "adapters": {ADAPTER: adapter}, "port": args.port,
              "max_tokens": 32, "max_batch_size": 2, "num_cpus": 1,
              "autoscaling": {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": args.target,
                              "upscale_delay_s": 1, "downscale_delay_s": 5}}
    path = workdir / "serve.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def serve(args, watch: NodeWatch, workdir: Path, adapter: str) -> dict:
    """`honed serve` under more requests in flight than its target until a replica lands on an added node,
    then without load until it is back to one replica and the cluster back to its nodes before."""
    path, before = serve_config(args, workdir, adapter), watch.alive()
    finish(honed(["serve", str(path), "--detach"], workdir / "serve.log", args.address), watch,
           workdir / "serve.log", args.timeout)
    watch.alive("honed serve: 1 replica, autoscaling up to 2")
    start = len(watch.rows)

    def on_added_node(alive: set[str]) -> bool:
        replicas = watch.rows[-1]["replica"]
        return len(replicas) == 2 and any(node in alive - before for node in replicas.values())

    with ChatLoad(f"http://127.0.0.1:{args.port}/v1", args.clients) as load:
        watch.alive(f"load: {args.clients} clients, target {args.target:g} in flight per replica")
        watch.wait(on_added_node, args.timeout)
        watch.alive("second replica placed on an added node")
        time.sleep(args.hold)  # requests keep coming while two replicas serve them
    watch.alive(f"load stopped: {load.answered} answered, {load.failed} failed")
    watch.wait(lambda alive: len(watch.rows[-1]["replica"]) == 1, args.timeout)
    watch.alive("back to 1 replica")
    watch.wait(lambda alive: alive == before, args.timeout)
    watch.alive("added nodes removed")
    replicas = {a: n for row in watch.rows[start:] for a, n in row["replica"].items()}
    return {"config": str(path), "replica_nodes": replicas, "answered": load.answered, "failed": load.failed,
            "errors": load.errors, "clients": args.clients, "target_ongoing_requests": args.target}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--address", default="auto", help="the cluster's GCS address (default: auto)")
    parser.add_argument("--model", required=True, help="base model (a HF dir or honed's builtin name)")
    parser.add_argument("--data", required=True, help="a dataset dir made by `honed prepare` with that model")
    parser.add_argument("--workdir", required=True, help="where the configs, logs and the run go")
    parser.add_argument("--train-workers", type=int, default=2, help="training workers (default 2)")
    parser.add_argument("--cpus-per-worker", type=float, default=1, help="CPUs per training worker (default 1)")
    parser.add_argument("--steps", type=int, default=6, help="training steps (default 6)")
    parser.add_argument("--port", type=int, default=8000, help="the endpoint's port (default 8000)")
    parser.add_argument("--clients", type=int, default=6, help="concurrent chat clients (default 6)")
    parser.add_argument("--target", type=float, default=2, help="target_ongoing_requests per replica (default 2)")
    parser.add_argument("--hold", type=float, default=5, help="seconds of load once scaled out (default 5)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds allowed for each step (default 600)")
    parser.add_argument("--out", help="write the timeline here as JSON")
    args = parser.parse_args()

    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    ray.init(address=args.address, logging_level="WARNING")
    head = ray.get_runtime_context().get_node_id()
    # Ray Data's stats actor is detached and lives on the node of the process that creates it: left to Ray Train
    # that was a train worker on an added node, which then never idled (seen here). honed's drivers create it on
    # their own node (honed.runtime.init_ray), so nothing is needed here.
    watch = NodeWatch(ROLES)
    watch.alive("start")
    result = {"head": head, "timeline": watch.rows}
    try:
        result["train"] = train(args, watch, workdir)
        watch.wait(lambda alive: alive == {head}, args.timeout)
        watch.alive("train's nodes removed")
        result["serve"] = serve(args, watch, workdir, result["train"]["adapter"])
    finally:  # the timeline so far, also when a step failed
        from ray import serve as ray_serve

        ray_serve.shutdown()
        if args.out:
            Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
