"""Runs whose model, data and artifacts live in object storage (a real S3-compatible server, moto on 127.0.0.1):
`honed prepare` writes shards to s3://, `honed train` reads the model and the shards from s3://, writes checkpoints,
adapter and report there and registers the adapter in an s3:// registry. The fast test runs on the local Ray from a
driver directory that stays empty; the slow one on two `ray start` nodes, each with its own HONED_CACHE and HF_HOME
(no shared disk), ending with `honed serve` answering with the registered adapter."""

from __future__ import annotations

import json

import pytest
from _two_node_s3 import seed_corpus
from s3_server import BUCKET, moto_s3


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    with moto_s3() as env:
        yield env


@pytest.fixture(scope="module")
def ray_s3(s3, tmp_path_factory):
    """The local Ray (2 CPUs, as `ray_local`) with workers that see the S3 endpoint and a node cache of their own.
    A Ray the session already started is restarted with that environment and restored afterwards."""
    import ray

    from honed.runtime import _quiet_data_logs

    restore = ray.is_initialized()
    ray.shutdown()
    cache = tmp_path_factory.mktemp("worker-cache")
    env = s3 | {"RAY_API_SERVER_ADDRESS": "http://127.0.0.1:1", "HONED_CACHE": str(cache)}
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING", runtime_env={"env_vars": env})
    _quiet_data_logs()
    yield cache
    ray.shutdown()
    if restore:
        ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING",
                 runtime_env={"env_vars": {"RAY_API_SERVER_ADDRESS": "http://127.0.0.1:1"}})


def test_prepare_and_train_on_object_storage(s3, ray_s3, tiny_model, tmp_path, monkeypatch):
    from honed.artifacts import read_manifest, read_meta, read_metrics
    from honed.config import EvalConfig, PrepareConfig, TrainConfig
    from honed.data.pipeline import prepare
    from honed.eval.evaluate import evaluate
    from honed.models import weights_hash
    from honed.registry import Registry
    import pyarrow.parquet as pq

    from honed.storage import filesystem, is_dir, is_file, read_text, upload_dir
    from honed.train.trainer import train

    root = f"s3://{BUCKET}/fast"
    model = upload_dir(tiny_model, f"{root}/models/tiny")
    corpus = seed_corpus(f"{root}/corpus/extra.jsonl")
    driver_dir = tmp_path / "driver"
    driver_dir.mkdir()
    monkeypatch.chdir(driver_dir)  # relative paths would land here: nothing may
    monkeypatch.setenv("HONED_CACHE", str(tmp_path / "driver-cache"))

    manifest = prepare(PrepareConfig.model_validate({
        "model": {"name_or_path": model}, "output_dir": f"{root}/data",
        "data": {"max_seq_len": 128, "pack": {"enabled": False}, "sources": [
            {"name": "icd10", "kind": "icd10", "chapters": ["4"], "max_records": 160},
            {"name": "extra", "kind": "jsonl", "path": corpus}]}}))
    assert read_manifest(f"{root}/data")["counts"] == manifest["counts"]
    assert manifest["counts"]["by_source"]["extra"]["read"] == 3
    fs, shards = filesystem(f"{root}/data/shards/train")
    assert pq.read_table(shards, filesystem=fs).num_rows == manifest["shards"]["train_rows"] > 0
    assert is_file(f"{root}/data/report.md") and is_file(f"{root}/data/prepare.yaml")

    cfg = TrainConfig.model_validate({
        "model": {"name_or_path": model}, "data_dir": f"{root}/data", "output_dir": f"{root}/train",
        "optim": {"lr": 2e-2, "max_steps": 4, "batch_size": 4, "warmup_steps": 1},
        "method": {"lora": {"r": 8, "alpha": 16, "dropout": 0.0}},
        "scaling": {"num_workers": 2, "cpus_per_worker": 0.5}, "log_every": 2, "checkpoint_every": 4,
        "register": {"registry": f"{root}/registry", "name": "tuned"},
    })
    metrics = train(cfg)
    assert metrics["registered"] == "tuned@1" and metrics["report"] == f"{root}/train/report.md"
    assert [m["step"] for m in read_metrics(f"{root}/train")] == [2, 4]
    meta = read_meta(f"{root}/train/adapter")
    assert meta["base_model"] == model and meta["base_weights_sha256"] == weights_hash(tiny_model)
    assert is_file(f"{root}/train/adapter/adapter_model.safetensors") and is_file(f"{root}/train/train.yaml")
    assert is_dir(f"{root}/train/checkpoints")
    assert Registry(f"{root}/registry").show("tuned")["adapter_sha256"]
    result = evaluate(EvalConfig.model_validate({
        "model": {"name_or_path": model}, "data_dir": f"{root}/data", "registry": f"{root}/registry",
        "adapter": "tuned", "output_dir": f"{root}/eval", "max_examples": 8, "generate_examples": 2,
        "max_new_tokens": 4, "bias": {"enabled": False}}))
    assert result["tuned"]["ref"] == "tuned@1" and set(result["scores"]) == {"base", "tuned"}
    assert json.loads(read_text(f"{root}/eval/eval.json"))["scores"] == result["scores"]
    assert list(driver_dir.iterdir()) == []  # the driver wrote nothing locally
    assert any((ray_s3 / "models").glob("tiny-*/model.safetensors"))  # the workers' node copy of the model


def test_a_missing_model_on_object_storage_stops_train_before_any_worker(s3, ray_s3):
    from honed.config import TrainConfig
    from honed.train.trainer import train

    cfg = TrainConfig.model_validate({"model": {"name_or_path": f"s3://{BUCKET}/nowhere/model"},
                                      "data_dir": f"s3://{BUCKET}/fast/data", "output_dir": f"s3://{BUCKET}/x"})
    with pytest.raises(FileNotFoundError, match=f"model 's3://{BUCKET}/nowhere/model': no config.json"):
        train(cfg)


@pytest.mark.slow
def test_two_nodes_without_a_shared_disk(s3, ray_nodes, tiny_model, tmp_path, free_port):
    """Prepare → train (one worker per node) → register → serve, every artifact in s3://; each node has its own
    HONED_CACHE and HF_HOME, the driver runs in a directory no node reads."""
    import ray
    from _two_node_s3 import run_two_node_flow

    ray.shutdown()  # one Ray cluster of ours at a time: this test's own two nodes
    result = run_two_node_flow(s3, ray_nodes, tiny_model, tmp_path, free_port())
    print(json.dumps(result, default=sorted, indent=1))
    assert result["registered"] == "tuned@1"
    for node, cache in result["node_caches"].items():  # each node's training worker fetched the model itself
        assert len(cache) == 1, f"node {node}: {cache}"
    assert result["served_models"] >= {"base", "tuned"}
    answer = result["answer"]  # the adapter, from the s3 registry, answered over HTTP
    assert answer["model"] == "tuned@1" and answer["choices"][0]["finish_reason"] in ("stop", "length"), answer
    assert result["driver_files"] == []
