"""`engine: vllm` without vLLM: what the ServeConfig turns into for Ray Serve LLM (LLMConfig arguments), the
configs refused with the key and what is allowed, the registry publishing versions in the flat layout vLLM reads,
and the install hint when vLLM is missing. The real engine runs in tests/vllm_serving (opt-in, its own venv)."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from honed.config import ServeConfig
from honed.serve.vllm_engine import llm_config_args

SCALING = {"num_replicas": 2}


def args_for(tmp_path, **cfg) -> dict:
    config = ServeConfig.model_validate({"engine": "vllm"} | cfg)
    return llm_config_args(config, config.base_name, str(tmp_path), config.vllm_adapter_root(), SCALING)


def test_gpu_defaults_lora_and_scaling_reach_the_llm_config(tmp_path):
    args = args_for(tmp_path, registry="s3://bucket/registry", max_adapters_per_replica=6,
                    vllm={"tensor_parallel_size": 4, "accelerator_type": "H100", "max_model_len": 8192,
                          "engine_kwargs": {"gpu_memory_utilization": 0.85}})
    assert args["model_loading_config"] == {"model_id": "base", "model_source": str(tmp_path)}
    assert args["accelerator_config"] == {"kind": "gpu"} and args["accelerator_type"] == "H100"
    assert args["engine_kwargs"] == {"tensor_parallel_size": 4, "dtype": "bfloat16", "max_model_len": 8192,
                                     "enable_lora": True, "max_lora_rank": 16, "max_loras": 6,
                                     "gpu_memory_utilization": 0.85}
    assert args["lora_config"] == {"dynamic_lora_loading_path": "s3://bucket/registry/_vllm",
                                   "max_num_adapters_per_replica": 6}
    assert args["deployment_config"] == SCALING


def test_cpu_float32_and_no_lora_without_adapters(tmp_path):
    args = args_for(tmp_path, model={"name_or_path": "x", "dtype": "auto"}, max_ongoing_requests=64,
                    vllm={"accelerator": "cpu", "max_loras": 2})
    assert args["accelerator_config"] == {"kind": "cpu"}
    assert args["engine_kwargs"] == {"tensor_parallel_size": 1, "dtype": "float32"}  # honed's auto: fp32 on CPU
    assert "lora_config" not in args and args["deployment_config"] == SCALING | {"max_ongoing_requests": 64}


def test_configured_adapters_are_published_under_the_given_root(tmp_path):
    args = args_for(tmp_path, adapters={"icd10": "/x"}, vllm={"adapter_root": "gs://b/adapters/", "max_loras": 2})
    assert args["lora_config"]["dynamic_lora_loading_path"] == "gs://b/adapters"
    assert args["engine_kwargs"]["max_loras"] == 2


@pytest.mark.parametrize("cfg, message", [
    ({"vllm": {"engine_kwargs": {"device": "cpu"}}}, "engine_kwargs.device is not passed through: set vllm.acc"),
    ({"vllm": {"engine_kwargs": {"max_loras": 4}}}, "set vllm.max_loras"),
    ({"vllm": {"adapter_root": "/local/dir"}}, "adapter_root '/local/dir' is not an object-storage URI"),
    ({"vllm": {"accelerator": "tpu"}}, "'gpu' or 'cpu'"),
    ({"engine": "vllm", "num_gpus": 1}, "num_gpus .* is for engine: honed"),
    ({"engine": "sglang"}, "'honed' or 'vllm'"),
    ({"vllm": {"tensor_parallel_size": 0}}, "greater than 0"),
])
def test_bad_vllm_settings_are_refused(cfg, message):
    with pytest.raises(ValueError, match=message):
        ServeConfig.model_validate(cfg)


def test_a_local_registry_needs_an_object_storage_root():
    with pytest.raises(ValueError, match="set vllm.adapter_root to an s3:// or gs:// URI"):
        ServeConfig(engine="vllm", registry="runs/registry").vllm_adapter_root()
    assert ServeConfig(engine="vllm").vllm_adapter_root() is None  # no adapters: no root needed


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")
def test_without_vllm_the_app_says_how_to_install_it(tiny_model):
    from honed.serve.app import build_app

    with pytest.raises(ImportError, match="make vllm-venv"):
        build_app({"engine": "vllm", "model": {"name_or_path": tiny_model}, "vllm": {"accelerator": "cpu"}})


@pytest.fixture
def registry_with_version(tmp_path, tiny_model):
    from peft import LoraConfig, get_peft_model

    from honed.models import load_model, weights_hash
    from honed.registry import Registry

    model, _ = load_model(tiny_model, "float32", "cpu")
    torch.manual_seed(0)
    adapter = tmp_path / "adapter"
    get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False)).save_pretrained(adapter)
    (adapter / "honed.json").write_text(json.dumps({"base_weights_sha256": weights_hash(tiny_model)}))
    registry = Registry(str(tmp_path / "registry"))
    registry.add("icd10", str(adapter))
    registry.add("icd10", str(adapter))
    return registry


def test_publish_copies_a_version_flat_with_honed_json(registry_with_version, tmp_path):
    registry, root = registry_with_version, tmp_path / "registry" / "_vllm"
    assert registry.publish("icd10", str(root)) == "icd10@2"
    published = root / "icd10@2"
    assert {p.name for p in published.iterdir()} >= {"adapter_config.json", "adapter_model.safetensors", "honed.json"}
    meta = json.loads((published / "honed.json").read_text())
    assert meta["adapter_sha256"] == registry.show("icd10@2")["adapter_sha256"] and meta["version"] == 2
    assert [row["name"] for row in registry.list()] == ["icd10", "icd10"]  # `_vllm` is not an adapter name


def test_publish_keeps_a_matching_copy_and_replaces_an_altered_one(registry_with_version, tmp_path):
    registry, root = registry_with_version, tmp_path / "published"
    registry.publish("icd10@1", str(root))
    weights = root / "icd10@1" / "adapter_model.safetensors"
    weights.write_bytes(b"kept: the recorded sha matches, so nothing is copied again")
    registry.publish("icd10@1", str(root))
    assert weights.read_bytes().startswith(b"kept")
    meta = json.loads((root / "icd10@1" / "honed.json").read_text())
    (root / "icd10@1" / "honed.json").write_text(json.dumps(meta | {"adapter_sha256": "0" * 64}))
    registry.publish("icd10@1", str(root))
    assert not weights.read_bytes().startswith(b"kept")


def test_publish_of_an_unknown_version_names_the_known_ones(registry_with_version, tmp_path):
    from honed.registry import AdapterNotFound

    with pytest.raises(AdapterNotFound, match="icd10@1, icd10@2"):
        registry_with_version.publish("icd10@7", str(tmp_path / "published"))
    assert not Path(tmp_path / "published").exists()


def test_the_rayservice_example_serves_a_sharded_model_with_vllm():
    import yaml

    root = Path(__file__).resolve().parents[2]
    doc = yaml.safe_load((root / "cluster" / "kuberay" / "rayservice-vllm.yaml").read_text())
    (app,) = yaml.safe_load(doc["spec"]["serveConfigV2"])["applications"]
    assert app["import_path"] == "honed.serve.app:build_app"
    cfg = ServeConfig.model_validate(app["args"])
    assert cfg.engine == "vllm" and cfg.vllm.accelerator == "gpu" and cfg.registry.startswith("s3://")
    (workers,) = doc["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    gpus = int(workers["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
    assert gpus == cfg.vllm.tensor_parallel_size  # one replica's shards on one pod
    assert workers["maxReplicas"] == cfg.autoscaling.max_replicas
    args = llm_config_args(cfg, cfg.base_name, cfg.model.name_or_path, cfg.vllm_adapter_root(), {"num_replicas": 1})
    assert args["engine_kwargs"]["dtype"] == "bfloat16" and args["lora_config"]["dynamic_lora_loading_path"] == \
        "s3://your-bucket/honed/registry/_vllm"
