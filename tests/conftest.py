"""Shared fixtures: a tiny random-init model, a local Ray, the prepared/trained artifacts of the integration
chain (prepare → train → eval/merge/serve), each built once per session, and `ray start` clusters of a test's own."""

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

BIN = Path(sys.executable).parent

os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# A line Ray forwards to this driver from an actor's output, e.g. "\x1b[36m(PlacementGroupCleaner pid=41)\x1b[0m ...".
RAY_FORWARDED_LINE = re.compile(r"^(\x1b\[[0-9;]*m)?\([^)\n]*pid=\d+[^)\n]*\)")


@pytest.fixture
def own_output(capsys):
    """capsys.readouterr() less the lines Ray forwards from actors: those arrive whenever Ray's log thread gets
    to them, e.g. from the placement-group cleaner of a Ray Train run an earlier test left in ray_local."""

    def drop_forwarded(text: str) -> str:
        return "".join(line for line in text.splitlines(keepends=True) if not RAY_FORWARDED_LINE.match(line))

    def read():
        captured = capsys.readouterr()
        return captured._replace(out=drop_forwarded(captured.out), err=drop_forwarded(captured.err))

    return read


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
    from honed.config import DEMO_SYSTEM_PROMPT, PrepareConfig
    from honed.data.pipeline import prepare

    out = tmp_path_factory.mktemp("prepared") / "data"
    cfg = PrepareConfig.model_validate({
        "model": {"name_or_path": tiny_model},
        "output_dir": str(out),
        # the ICD-10 demo's prompt, as the tests of served adapters expect a training system prompt to apply
        "data": {"max_seq_len": 160, "system_prompt": DEMO_SYSTEM_PROMPT, "sources": [
            {"name": "icd10", "kind": "icd10", "chapters": ["4"], "max_records": 700},
            {"name": "kjv", "kind": "kjv", "max_records": 40, "eval_only": True},
            {"name": "extra", "kind": "jsonl", "path": str(corpus_with_bad_records)},
        ]},
    })
    return {"dir": str(out), "manifest": prepare(cfg), "config": cfg}


@pytest.fixture(scope="session")
def trained(prepared, tiny_model, tmp_path_factory, actors_started) -> dict:
    """A 2-worker LoRA run on the tiny model (real TorchTrainer.fit), its adapter registered as `tuned`."""
    from honed.config import TrainConfig
    from honed.train.trainer import train

    out = tmp_path_factory.mktemp("train") / "run"
    cfg = TrainConfig.model_validate({
        "model": {"name_or_path": tiny_model}, "data_dir": prepared["dir"], "output_dir": str(out),
        "optim": {"lr": 2e-2, "max_steps": 36, "batch_size": 8, "warmup_steps": 2},
        "method": {"lora": {"r": 16, "alpha": 32, "dropout": 0.0}},
        "log_every": 6, "checkpoint_every": 18,
        "register": {"registry": str(out.parent / "registry"), "name": "tuned"},
    })
    with actors_started() as actor_classes:  # read now: a later test may restart Ray
        metrics = train(cfg)
    return {"dir": str(out), "adapter": str(out / "adapter"), "final": metrics, "config": cfg,
            "registry": str(out.parent / "registry"), "actor_classes": actor_classes}


@pytest.fixture(scope="session")
def actors_started():
    """`with actors_started() as started:` fills the set `started`, when the block ends, with the class names of
    the actors the block started on the connected Ray (ones that died already count: the GCS keeps them)."""

    @contextlib.contextmanager
    def started():
        before = set(gcs_actor_classes())
        names: set[str] = set()
        yield names
        names.update(name for actor, name in gcs_actor_classes().items() if actor not in before)

    return started


def gcs_actor_classes() -> dict[str, str]:
    """Every actor the connected Ray's GCS knows (dead ones too): its class name by actor id."""
    import ray._private.state

    return {actor_id: actor["ActorClassName"] for actor_id, actor in ray._private.state.actors().items()}


class RayNodes:
    """One Ray cluster of a test's own, each node a `ray start --block` in a process group of its own, with its own
    GCS, dashboard and agent ports (the session's local Ray, other tests' clusters and other users of this machine
    hold Ray's defaults) and its own short temp dir (Ray's socket paths must stay under 107 bytes). Token auth as
    `ray start` turns it on: the CLI and the Jobs SDK need RAY_AUTH_MODE=token, which `env` carries."""

    def __init__(self, free_port, extra_env: dict):
        self.free_port = free_port
        self.gcs, self.dashboard = free_port(), free_port()
        self.address = f"http://127.0.0.1:{self.dashboard}"  # the Jobs API (`honed submit --address`)
        self.temp_dirs: list[str] = []
        self.procs: list[subprocess.Popen] = []
        self.last_error = ""  # of the last `ray` command that failed while polling
        root = self.new_temp_dir()
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
        self.env = env | {"RAY_AUTH_MODE": "token", "RAY_TMPDIR": root} | extra_env

    @property
    def gcs_address(self) -> str:
        from ray._private.services import get_node_ip_address

        return f"{get_node_ip_address()}:{self.gcs}"  # where the head's GCS listens (Ray's own choice of IP)

    def new_temp_dir(self) -> str:
        self.temp_dirs.append(tempfile.mkdtemp(prefix="rayn", dir="/tmp"))
        return self.temp_dirs[-1]

    def start(self, *args: str) -> None:
        temp_dir = self.new_temp_dir()
        with open(Path(temp_dir) / "ray-start.log", "wb") as log:  # the child keeps its own descriptor
            self.procs.append(subprocess.Popen(
                [str(BIN / "ray"), "start", "--block", f"--temp-dir={temp_dir}", "--disable-usage-stats",
                 f"--dashboard-agent-listen-port={self.free_port()}", f"--dashboard-agent-grpc-port={self.free_port()}",
                 f"--metrics-export-port={self.free_port()}", f"--runtime-env-agent-port={self.free_port()}", *args],
                env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))

    def start_head(self, *args: str, num_cpus: float = 2) -> None:
        self.start("--head", f"--port={self.gcs}", f"--num-cpus={num_cpus}", "--include-dashboard=true",
                   f"--dashboard-port={self.dashboard}", "--dashboard-host=127.0.0.1", *args)

    def add_node(self, num_cpus: float = 2) -> None:
        self.start(f"--address={self.gcs_address}", f"--num-cpus={num_cpus}")

    def wait_for_jobs(self, timeout_s: float = 120) -> None:
        """Ready means a job actually runs: the job server answers before its agent can take jobs."""
        def job_runs() -> bool:
            probe = self.ray("job", "submit", "--address", self.address, "--", "echo", "ready")
            self.last_error = "" if probe.returncode == 0 else probe.stdout + probe.stderr
            return probe.returncode == 0

        self.poll(job_runs, timeout_s, "the head node's job server never answered")

    def alive_nodes(self) -> list[str]:
        listed = self.ray("list", "nodes", "--address", self.address, "--format", "json", "--filter", "state=ALIVE")
        if listed.returncode != 0 or "[" not in listed.stdout:  # "No resource in the cluster" while it starts
            self.last_error = listed.stdout + listed.stderr
            return []
        return [n["node_id"] for n in json.loads(listed.stdout[listed.stdout.index("["):])]

    def wait_for_nodes(self, count: int, timeout_s: float = 120) -> list[str]:
        self.poll(lambda: len(self.alive_nodes()) == count, timeout_s, f"the cluster never had {count} nodes alive")
        return self.alive_nodes()

    def ray(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / "ray"), *args], env=self.env, capture_output=True, text=True, timeout=120,
                              check=False)

    def poll(self, ready, timeout_s: float, failure: str) -> None:
        deadline = time.time() + timeout_s
        while not ready():
            exited = [p for p in self.procs if p.poll() is not None]
            if exited:
                pytest.fail(f"`ray start` exited ({exited[0].args[2:4]}):\n{self.logs()[-3000:]}")
            if time.time() > deadline:
                pytest.fail(f"{failure} within {timeout_s:.0f}s ({self.last_error[-1000:]}):\n{self.logs()[-3000:]}")
            time.sleep(2)

    def logs(self) -> str:
        return "".join(p.read_text(errors="replace") for d in self.temp_dirs for p in Path(d).glob("ray-start.log"))

    def stop(self) -> list[str]:
        """SIGTERM each node, workers first (its `--block` process takes its Ray processes down), then SIGKILL
        whatever outlived it; returns what had to be killed."""
        leaked = []
        for proc in reversed(self.procs):
            try:
                tree = psutil.Process(proc.pid).children(recursive=True)
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=60)
            except (psutil.Error, ProcessLookupError):
                tree = []
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            _, alive = psutil.wait_procs(tree, timeout=20)
            for p in alive:
                try:
                    leaked.append(f"{p.pid} {p.name()}")
                    p.kill()
                except psutil.Error:
                    pass
        for d in self.temp_dirs:
            shutil.rmtree(d, ignore_errors=True)
        self.procs, self.temp_dirs = [], []
        return leaked


@pytest.fixture
def ray_nodes(free_port):
    """`ray_nodes(**env)` → a new RayNodes (start its head and nodes yourself); every one is stopped afterwards."""
    made: list[RayNodes] = []

    def make(**extra_env: str) -> RayNodes:
        made.append(RayNodes(free_port, extra_env))
        return made[-1]

    yield make
    for nodes in made:
        nodes.stop()


@pytest.fixture
def head_node(ray_nodes):
    """A `ray start --head` cluster (2 CPUs) whose Jobs API takes jobs: (its address, the env to call it with)."""
    nodes = ray_nodes()
    nodes.start_head()
    nodes.wait_for_jobs()
    return nodes.address, nodes.env
