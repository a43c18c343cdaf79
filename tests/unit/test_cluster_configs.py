"""Cluster files are checked on a laptop: launcher YAMLs against Ray's own autoscaler schema, KubeRay
manifests for the fields KubeRay needs, one image per manifest, GPU limits equal to requests, and honed
entry points that parse."""

import json
import shlex
from pathlib import Path

import jsonschema
import pytest
import yaml

from honed.config import CONFIGS, ServeConfig, load_config
from honed.cli import parser

ROOT = Path(__file__).resolve().parents[2]
FAKE = ROOT / "cluster" / "fake-multinode.yaml"
LAUNCHER = sorted(p for p in (ROOT / "cluster").glob("*.yaml") if p != FAKE)
KUBERAY = sorted((ROOT / "cluster" / "kuberay").glob("*.yaml"))


def ray_schema() -> dict:
    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def test_cluster_files_are_shipped():
    names = {p.name for p in LAUNCHER}
    assert {"aws-minimal.yaml", "aws-full.yaml", "gcp-minimal.yaml", "gcp-full.yaml"} <= names
    assert FAKE.is_file()
    assert {p.name for p in KUBERAY} == {"raycluster.yaml", "rayjob-finetune.yaml", "rayservice.yaml"}


@pytest.mark.parametrize("path", LAUNCHER, ids=lambda p: p.name)
def test_launcher_config_matches_rays_schema(path):
    config = yaml.safe_load(path.read_text())
    jsonschema.validate(config, ray_schema())
    assert path.read_text().startswith(f"# ray up cluster/{path.name}")
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    workers = [t for name, t in types.items() if name != config["head_node_type"]]
    assert any(t["resources"].get("GPU") for t in workers), "no GPU worker type for training"
    assert sum(t.get("min_workers", 0) for t in workers) <= config["max_workers"]
    assert all(t.get("min_workers", 0) <= t["max_workers"] for t in workers)
    assert any("pip install -e ~/honed" in c for c in config["setup_commands"])
    assert config["file_mounts"]["~/honed"] == "."


def test_fake_multinode_config_is_what_the_autoscaler_accepts():
    from ray.autoscaler._private.util import validate_config

    config = yaml.safe_load(FAKE.read_text())
    jsonschema.validate(config, ray_schema())
    validate_config(config)  # what the autoscaler runs on this raw file (the fake provider fills no defaults)
    assert FAKE.read_text().startswith("# RAY_FAKE_CLUSTER=1 ray start --head --num-cpus=1 "
                                       "--autoscaling-config=cluster/fake-multinode.yaml")
    assert config["provider"]["type"] == "fake_multinode"
    head = config["available_node_types"][config["head_node_type"]]
    assert config["head_node_type"] == "ray.head.default" and head["max_workers"] == 0
    assert head["resources"] == {"CPU": 1}  # the header's --num-cpus
    workers = [t for name, t in config["available_node_types"].items() if name != config["head_node_type"]]
    assert all(t.get("min_workers", 0) == 0 for t in workers), "idle workers must be removable"
    assert sum(t["max_workers"] for t in workers) >= config["max_workers"] >= 2
    assert config["idle_timeout_minutes"] <= 0.2


def kuberay_docs():
    return [(p, yaml.safe_load(p.read_text())) for p in KUBERAY]


def containers(spec: dict) -> list[dict]:
    groups = [spec["headGroupSpec"], *spec.get("workerGroupSpecs", [])]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


def cluster_spec(doc: dict) -> dict:
    return {"RayCluster": lambda d: d["spec"], "RayJob": lambda d: d["spec"]["rayClusterSpec"],
            "RayService": lambda d: d["spec"]["rayClusterConfig"]}[doc["kind"]](doc)


@pytest.mark.parametrize("path, doc", kuberay_docs(), ids=lambda x: x.name if isinstance(x, Path) else "")
def test_kuberay_manifest_is_consistent(path, doc):
    assert doc["apiVersion"] == "ray.io/v1" and doc["metadata"]["name"]
    spec = cluster_spec(doc)
    assert spec["enableInTreeAutoscaling"] is True
    assert len({c["image"] for c in containers(spec)}) == 1, "head and workers must run one image"
    for c in containers(spec):
        assert c["resources"]["requests"] == c["resources"]["limits"], c["name"]
    for group in spec["workerGroupSpecs"]:
        assert group["minReplicas"] <= group.get("replicas", 0) <= group["maxReplicas"]
    assert any("nvidia.com/gpu" in c["resources"]["limits"] for c in containers(spec))


def test_rayjob_entrypoint_runs_honed_commands_that_parse():
    doc = yaml.safe_load((ROOT / "cluster" / "kuberay" / "rayjob-finetune.yaml").read_text())
    script = shlex.split(doc["spec"]["entrypoint"])[2]
    commands = [shlex.split(part) for part in script.split("&&")[1:]]
    assert [c[3] for c in commands] == ["prepare", "train"]
    for argv in commands:
        assert argv[:3] == ["python", "-m", "honed.cli"]
        args = parser().parse_args(argv[3:])
        cfg = load_config(CONFIGS[args.command], ROOT / args.config, args.overrides)
        assert cfg is not None
    assert cfg.scaling.use_gpu is True


def test_rayservice_serves_the_honed_app():
    doc = yaml.safe_load((ROOT / "cluster" / "kuberay" / "rayservice.yaml").read_text())
    serve_config = yaml.safe_load(doc["spec"]["serveConfigV2"])
    (app,) = serve_config["applications"]
    assert app["import_path"] == "honed.serve.app:build_app"
    cfg = ServeConfig.model_validate(app["args"])
    assert cfg.registry.startswith("s3://") and cfg.num_gpus == 1
    assert 1 <= cfg.autoscaling.min_replicas < cfg.autoscaling.max_replicas
    assert "deployments" not in app  # replica options come from the args, through build_app
