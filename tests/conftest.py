"""Shared fixtures: a tiny random-init model, a local Ray, and the prepared/trained artifacts of the
integration chain (prepare → train → eval/merge/serve), each built once per session."""

import json
import os
import socket
from pathlib import Path

import pytest

os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    from honed.models import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="session")
def ray_local():
    """A real local Ray with the CPU budget of a CI machine."""
    import ray

    if not ray.is_initialized():
        # Without a dashboard Ray still points its state API at 127.0.0.1:8265; when another cluster's dashboard
        # answers there, Ray Train's placement-group cleaner takes our controller for dead and removes the
        # workers' placement group. A closed port makes its queries fail harmlessly instead.
        ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING",
                 runtime_env={"env_vars": {"RAY_API_SERVER_ADDRESS": "http://127.0.0.1:1"}})
    from honed.runtime import _quiet_data_logs

    _quiet_data_logs()
    yield ray
    ray.shutdown()


def pick_free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def free_port():
    """A function returning a loopback port nothing listens on right now."""
    return pick_free_port


def write_jsonl(path: Path, lines: list) -> Path:
    """Lines are JSON values (dumped) or raw strings/bytes (written as they are)."""
    with open(path, "wb") as f:
        for line in lines:
            if not isinstance(line, (str, bytes)):
                line = json.dumps(line)
            f.write(line if isinstance(line, bytes) else line.encode())
            f.write(b"\n")
    return path


@pytest.fixture(scope="session")
def corpus_with_bad_records(tmp_path_factory) -> Path:
    """A JSONL file with three good records and one of each kind of bad record."""
    return write_jsonl(tmp_path_factory.mktemp("corpus") / "extra.jsonl", [
        {"prompt": "What is  code X1?\x07", "response": "A made-up code.", "group": "x1"},
        {"prompt": "What is code X2?", "response": "Another made-up code."},
        {"text": "Plain text   for continued pre-training."},
        "{not json",
        {"prompt": "only a prompt"},
        {"prompt": "wrong type", "response": 3},
        [1, 2, 3],
        b"\xff\xfe not utf-8",
        {"prompt": "   ", "response": "empty prompt after cleaning"},
    ])


@pytest.fixture(scope="session")
def prepared(ray_local, tiny_model, corpus_with_bad_records, tmp_path_factory) -> dict:
    from honed.config import PrepareConfig
    from honed.data.pipeline import prepare

    out = tmp_path_factory.mktemp("prepared") / "data"
    cfg = PrepareConfig.model_validate({
        "model": {"name_or_path": tiny_model},
        "output_dir": str(out),
        "data": {"max_seq_len": 160, "sources": [
            {"name": "icd10", "kind": "icd10", "chapters": ["4"], "max_records": 700},
            {"name": "kjv", "kind": "kjv", "max_records": 40, "eval_only": True},
            {"name": "extra", "kind": "jsonl", "path": str(corpus_with_bad_records)},
        ]},
    })
    return {"dir": str(out), "manifest": prepare(cfg), "config": cfg}


@pytest.fixture(scope="session")
def trained(prepared, tiny_model, tmp_path_factory) -> dict:
    """A 2-worker LoRA run on the tiny model (real TorchTrainer.fit)."""
    from honed.config import TrainConfig
    from honed.train.trainer import train

    out = tmp_path_factory.mktemp("train") / "run"
    cfg = TrainConfig.model_validate({
        "model": {"name_or_path": tiny_model}, "data_dir": prepared["dir"], "output_dir": str(out),
        "optim": {"lr": 2e-2, "max_steps": 36, "batch_size": 8, "warmup_steps": 2},
        "method": {"lora": {"r": 16, "alpha": 32, "dropout": 0.0}},
        "log_every": 6, "checkpoint_every": 18,
    })
    metrics = train(cfg)
    return {"dir": str(out), "adapter": str(out / "adapter"), "final": metrics, "config": cfg}
