"""honed.storage and model resolution against a real S3-compatible server (moto on 127.0.0.1) and a pre-seeded
offline Hugging Face cache: URIs read and written, node-local copies fetched once, models from anywhere, clear
errors for what is missing."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import pytest
from s3_server import BUCKET, moto_s3


@pytest.fixture(scope="module")
def s3():
    """moto's S3 server on 127.0.0.1; pyarrow and boto3 find it through AWS_ENDPOINT_URL_S3."""
    with moto_s3():
        yield f"s3://{BUCKET}"


@pytest.fixture
def node(tmp_path, monkeypatch):
    """This test's own node cache (HONED_CACHE)."""
    monkeypatch.setenv("HONED_CACHE", str(tmp_path / "node-cache"))
    return tmp_path / "node-cache"


@pytest.fixture(scope="module")
def s3_model(s3, tiny_model):
    from honed.storage import upload_dir

    return upload_dir(tiny_model, f"{s3}/models/tiny")


def test_files_round_trip_through_object_storage(s3, tmp_path):
    from honed.storage import download_dir, is_dir, is_file, join, read_text, upload_dir, write_text

    base = join(s3, "rt")
    assert base == f"{s3}/rt" and join(tmp_path, "a", "b") == str(tmp_path / "a" / "b")
    write_text(join(base, "one.txt"), "eins")
    assert read_text(join(base, "one.txt")) == "eins" and is_file(join(base, "one.txt")) and is_dir(base)
    assert not is_file(join(base, "two.txt"))
    (tmp_path / "up" / "sub").mkdir(parents=True)
    (tmp_path / "up" / "sub" / "x.bin").write_bytes(b"\x00\x01")
    upload_dir(tmp_path / "up", join(base, "dir"))
    copy = download_dir(join(base, "dir"), tmp_path / "down")
    assert (copy / "sub" / "x.bin").read_bytes() == b"\x00\x01"
    with pytest.raises(FileNotFoundError, match="rt/nothing"):
        download_dir(join(base, "nothing"), tmp_path / "none")
    with pytest.raises(FileNotFoundError, match="two.txt"):
        read_text(join(base, "two.txt"))


def test_staged_output_is_uploaded_only_when_the_stage_succeeds(s3):
    from honed.storage import is_file, read_text, staged

    with staged(f"{s3}/staged/ok") as out:
        (out / "report.md").write_text("done")
    assert read_text(f"{s3}/staged/ok/report.md") == "done"
    with pytest.raises(RuntimeError):
        with staged(f"{s3}/staged/failed") as out:
            (out / "report.md").write_text("half")
            raise RuntimeError("the stage failed")
    assert not is_file(f"{s3}/staged/failed/report.md")


def test_artifacts_read_and_write_hand_off_files_on_object_storage(s3):
    from honed.artifacts import manifest_sha256, read_manifest, read_meta, read_metrics, write_manifest, write_meta
    from honed.artifacts import write_metrics

    data = f"{s3}/artifacts/data"
    write_manifest(data, {"counts": {"total": {"train": 3}}})
    assert read_manifest(data)["counts"]["total"]["train"] == 3 and len(manifest_sha256(data)) == 64
    write_meta(f"{s3}/artifacts/adapter", {"base_model": "x"})
    assert read_meta(f"{s3}/artifacts/adapter") == {"base_model": "x"} and read_meta(f"{s3}/artifacts/none") == {}
    write_metrics(f"{s3}/artifacts/run", [{"step": 1}, {"step": 2}])
    assert [m["step"] for m in read_metrics(f"{s3}/artifacts/run")] == [1, 2]
    with pytest.raises(FileNotFoundError, match=f"no prepared dataset at '{s3}/artifacts/never'"):
        read_manifest(f"{s3}/artifacts/never")


def test_node_cache_fetches_once_per_node_under_a_lock(s3, node, monkeypatch):
    from honed import storage

    storage.write_text(f"{s3}/cached/config.json", "{}")
    downloads = []
    real = storage.download_dir
    monkeypatch.setattr(storage, "download_dir", lambda *a: downloads.append(a) or real(*a))  # a spy: it counts
    results = []
    threads = [threading.Thread(target=lambda: results.append(storage.node_cache(f"{s3}/cached", "models")))
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(downloads) == 1 and len(set(results)) == 1 and (results[0] / "config.json").is_file()
    assert results[0].parent == node / "models"
    with pytest.raises(FileNotFoundError, match="no config.json"):
        storage.node_cache(f"{s3}/absent", "models", required="config.json")


def test_models_resolve_from_object_storage_on_the_node(s3_model, node):
    from honed.models import check_model, load_tokenizer, resolve_model, weights_hash

    assert check_model(s3_model) == "uri"
    assert not (node / "models").exists()  # the check downloads nothing
    path = resolve_model(s3_model)
    assert Path(path).parent == node / "models" and (Path(path) / "model.safetensors").is_file()
    assert load_tokenizer(path).eos_token == "<|im_end|>"
    assert resolve_model(s3_model) == path and weights_hash(path)


def test_missing_or_unreachable_models_are_named(s3, tmp_path):
    from honed.models import check_model

    with pytest.raises(FileNotFoundError, match=f"model '{s3}/models/none': no config.json"):
        check_model(f"{s3}/models/none")
    with pytest.raises(FileNotFoundError, match="model 'ftp://nowhere/x' is unreachable"):
        check_model("ftp://nowhere/x")
    with pytest.raises(FileNotFoundError, match=r"neither a builtin nor a model directory.*Hugging Face Hub ID"):
        check_model(str(tmp_path))
    with pytest.raises(ValueError, match="model.revision 'v1' applies to Hugging Face Hub IDs only"):
        check_model(f"{s3}/models/none", revision="v1")


def seed_hub_cache(cache: Path, repo: str, model_dir: str, revision: str) -> Path:
    """The Hugging Face cache layout of one downloaded snapshot: models--org--name/{snapshots/<rev>, refs/main}."""
    repo_dir = cache / f"models--{repo.replace('/', '--')}"
    snapshot = repo_dir / "snapshots" / revision
    shutil.copytree(model_dir, snapshot)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(revision)
    return snapshot


@pytest.fixture
def offline_hub(tmp_path, tiny_model, monkeypatch):
    from huggingface_hub import constants

    cache = tmp_path / "hf-hub"
    revision = "0123456789abcdef0123456789abcdef01234567"
    snapshot = seed_hub_cache(cache, "honed-test/tiny", tiny_model, revision)
    # huggingface_hub reads HF_HUB_OFFLINE / HF_HUB_CACHE once at import; a fresh process (a Ray worker started
    # with the env) sees the env, this one needs its constants set.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return snapshot, revision


def test_hub_ids_resolve_from_an_offline_hugging_face_cache(offline_hub):
    from honed.models import check_model, resolve_model

    snapshot, revision = offline_hub
    assert check_model("honed-test/tiny") == "hub"
    assert Path(resolve_model("honed-test/tiny")) == snapshot
    assert Path(resolve_model("honed-test/tiny", revision)) == snapshot
    assert json.loads((snapshot / "config.json").read_text())["num_hidden_layers"] == 2
    with pytest.raises(FileNotFoundError, match="model 'honed-test/other' is neither in the Hugging Face cache"):
        check_model("honed-test/other")
    with pytest.raises(FileNotFoundError, match=r"model 'honed-test/tiny' \(revision v9\) could not be fetched"):
        resolve_model("honed-test/tiny", "v9")


def test_a_run_plan_carries_the_model_reference_not_a_driver_path(s3_model, node, tmp_path):
    from honed.artifacts import write_manifest
    from honed.config import TrainConfig
    from honed.train.plan import plan_run

    data = f"{s3_model.rsplit('/models/', 1)[0]}/plan/data"
    write_manifest(data, {"counts": {"total": {"train": 64}, "by_source": {"a": {"train": 64, "val": 4}}},
                          "shards": {"train_rows": 64, "packed": True}})
    cfg = TrainConfig.model_validate({"model": {"name_or_path": s3_model}, "data_dir": data,
                                      "output_dir": f"{data}-run", "optim": {"batch_size": 4}})
    plan = plan_run(cfg)
    assert plan.model == s3_model and plan.storage_path == f"{data}-run/checkpoints" and plan.live_log == ""
    assert not (node / "models").exists()  # planning checked the model, downloaded nothing
    assert Path(plan.model_path).parent == node / "models"  # a worker resolves it where it runs
    missing = cfg.model_copy(update={"model": cfg.model.model_copy(update={"name_or_path": f"{data}/nomodel"})})
    with pytest.raises(FileNotFoundError, match="nomodel': no config.json"):
        plan_run(missing)


def test_merge_reads_its_adapter_from_and_writes_the_model_to_object_storage(s3, s3_model, tiny_model, node,
                                                                                tmp_path):
    from lora_adapters import write_adapter

    from honed.artifacts import read_meta
    from honed.config import MergeConfig
    from honed.merge import merge
    from honed.storage import is_file, read_text, upload_dir

    adapter = upload_dir(write_adapter(tiny_model, tmp_path / "adapter", seed=1), f"{s3}/merge/adapter")
    report = merge(MergeConfig(model={"name_or_path": s3_model}, adapter=adapter, output_dir=f"{s3}/merge/merged"))
    assert report["max_abs_logit_diff"] <= report["tolerance"] and report["adapter"] == adapter
    assert json.loads(read_text(f"{s3}/merge/merged/merge.json"))["reloaded_diff"] == report["reloaded_diff"]
    assert is_file(f"{s3}/merge/merged/model.safetensors") and is_file(f"{s3}/merge/merged/tokenizer.json")
    assert read_meta(f"{s3}/merge/merged")["merged_from"] == adapter


def test_weights_hash_is_remembered_per_node_until_a_file_changes(tiny_model, node, tmp_path):
    import hashlib

    from honed.models import weights_hash

    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    weights = next(model.glob("*.safetensors"))
    first = weights_hash(str(model))
    assert first == hashlib.sha256(weights.read_bytes()).hexdigest()  # one file: the hash of its bytes
    assert len(list((node / "weights_sha256").iterdir())) == 1
    assert weights_hash(str(model)) == first  # read back from the node's cache
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # same size, new bytes and mtime: hashed again
    weights.write_bytes(bytes(data))
    changed = weights_hash(str(model))
    assert changed != first and changed == hashlib.sha256(bytes(data)).hexdigest()
