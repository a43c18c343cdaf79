"""Helpers of test_object_storage: a seeded corpus and the two-node flow without a shared disk.

    with moto_s3() as env:               # tests/s3_server.py: moto on 127.0.0.1, the bucket BUCKET
        seed_corpus(f"s3://{BUCKET}/corpus/extra.jsonl")
"""

from __future__ import annotations

import json

from s3_server import BUCKET
CORPUS = [{"prompt": "What is code X1?", "response": "A made-up code.", "group": "x1"},
          {"prompt": "What is code X2?", "response": "Another made-up code."},
          {"text": "Plain text for continued pre-training."}]


def seed_corpus(uri: str) -> str:
    """A three-record JSONL corpus written to `uri`."""
    from honed.storage import write_text

    write_text(uri, "".join(json.dumps(r) + "\n" for r in CORPUS))
    return uri


def run_two_node_flow(s3_env: dict, ray_nodes, tiny_model: str, work, port: int) -> dict:
    """On a `ray start` head + worker node, each with its own HONED_CACHE and HF_HOME: `honed prepare` → `honed
    train` (2 workers, STRICT_SPREAD: one per node) → register → `honed serve --detach`, every artifact in s3://,
    the driver in an empty directory of its own. Returns what the test asserts on."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    import yaml

    from honed.storage import upload_dir

    root = f"s3://{BUCKET}/two-node"
    model = upload_dir(tiny_model, f"{root}/models/tiny")
    corpus = seed_corpus(f"{root}/corpus/extra.jsonl")
    caches = {name: Path(work, f"{name}-cache") for name in ("head", "worker", "driver")}
    nodes = ray_nodes(**s3_env)
    base_env = dict(nodes.env)
    nodes.env = base_env | node_env(work, "head")
    nodes.start_head(num_cpus=2)
    nodes.env = base_env | node_env(work, "worker")
    nodes.add_node(num_cpus=2)
    nodes.wait_for_nodes(2)
    driver_env = base_env | node_env(work, "driver")
    driver_dir, configs = Path(work, "driver"), Path(work, "configs")
    driver_dir.mkdir()
    configs.mkdir()
    honed = [sys.executable, "-m", "honed.cli"]

    def stage(command: str, config: dict, *extra: str) -> str:
        path = configs / f"{command}.yaml"
        path.write_text(yaml.safe_dump(config))
        done = subprocess.run([*honed, command, str(path), "--address", nodes.gcs_address, *extra], cwd=driver_dir,
                              env=driver_env, capture_output=True, text=True, timeout=900, check=False)
        assert done.returncode == 0, f"honed {command} failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
        return done.stdout

    stage("prepare", {"model": {"name_or_path": model}, "output_dir": f"{root}/data",
                      "data": {"max_seq_len": 128, "pack": {"enabled": False}, "sources": [
                          {"name": "icd10", "kind": "icd10", "chapters": ["4"], "max_records": 160},
                          {"name": "extra", "kind": "jsonl", "path": corpus}]}})
    for node in ("head", "worker"):  # what training fetches, it fetches itself
        shutil.rmtree(caches[node] / "models", ignore_errors=True)
    stage("train", {"model": {"name_or_path": model}, "data_dir": f"{root}/data", "output_dir": f"{root}/train",
                    "optim": {"lr": 2e-2, "max_steps": 4, "batch_size": 4, "warmup_steps": 1},
                    "method": {"lora": {"r": 8, "alpha": 16, "dropout": 0.0}},
                    "scaling": {"num_workers": 2, "cpus_per_worker": 0.5, "placement_strategy": "STRICT_SPREAD"},
                    "log_every": 2, "checkpoint_every": 4,
                    "register": {"registry": f"{root}/registry", "name": "tuned"}})
    node_caches = {node: sorted(p.name for p in (caches[node] / "models").glob("tiny-*") if p.is_dir())
                   for node in ("head", "worker")}
    stage("serve", {"model": {"name_or_path": model}, "registry": f"{root}/registry", "port": port,
                    "num_cpus": 0.5, "max_tokens": 8}, "--detach")
    from honed.registry import Registry

    return {"registered": Registry(f"{root}/registry").resolve("tuned"), "node_caches": node_caches,
            "served_models": served_models(port), "answer": ask(port, "tuned@1", "What is code X1?"),
            "driver_files": sorted(p.name for p in driver_dir.iterdir())}


def node_env(work, name: str) -> dict:
    """A node's (or the driver's) own caches: nothing on disk is shared."""
    from pathlib import Path

    return {"HONED_CACHE": str(Path(work, f"{name}-cache")), "HF_HOME": str(Path(work, f"{name}-hf"))}


def served_models(port: int) -> set[str]:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=60) as response:
        return {m["id"] for m in json.loads(response.read())["data"]}


def ask(port: int, model: str, question: str) -> dict:
    """The chat completion's response body (a few steps of a tiny model may answer with an empty text)."""
    import urllib.request

    body = json.dumps({"model": model, "messages": [{"role": "user", "content": question}], "max_tokens": 8})
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=body.encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=300) as response:
        return json.loads(response.read())
