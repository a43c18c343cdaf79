"""`honed submit` / `honed jobs` without a cluster: job files are validated (and every shipped one matches the
`ray job submit` command in its header), bad input is named before Ray is contacted, the address is picked in
the documented order, and an unreachable cluster gives a clear error instead of a traceback."""

import ast
import json
import shlex
from pathlib import Path

import pytest
import yaml

from honed.cli import main, parse_command, parser
from honed.config import ConfigError
from honed.jobs import DEFAULT_ADDRESS, honed_args, load_job, resolve_address, shell_commands

ROOT = Path(__file__).resolve().parents[2]
SUBMIT_FILES = sorted((ROOT / "jobs" / "submit").glob("*.yaml"))
WORKFLOWS = {"prepare", "train", "tune", "eval", "merge", "serve", "demo", "registry"}  # every honed stage with a CLI


@pytest.fixture
def job_dir(tmp_path, monkeypatch):
    """A working_dir with a valid train config; relative paths resolve from here, as for `ray job submit`."""
    (tmp_path / "train.yaml").write_text("optim: {max_steps: 4}\n")
    monkeypatch.chdir(tmp_path)
    for var in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
        monkeypatch.delenv(var, raising=False)
    return tmp_path


def write_job(path: Path, **fields) -> str:
    job = {"entrypoint": "python -m honed.cli train train.yaml", "runtime_env": {"working_dir": "."}} | fields
    path.write_text(yaml.safe_dump(job))
    return str(path)


def header_command(path: Path) -> list[str]:
    lines = path.read_text().splitlines()
    assert lines[0] == f"# honed submit jobs/submit/{path.name}"
    assert lines[1].startswith("# ray job submit ")
    return shlex.split(lines[1][2:])


def test_a_job_file_ships_for_every_workflow():
    commands = {argv[3] for p in SUBMIT_FILES for argv in shell_commands(load_job_at_root(p)[0].entrypoint)}
    assert commands == WORKFLOWS
    methods = {argv[4] for p in SUBMIT_FILES for argv in shell_commands(load_job_at_root(p)[0].entrypoint)
               if argv[3] == "train"}
    assert {"jobs/train_lora.yaml", "jobs/train_qlora.yaml", "jobs/train_full_zero3.yaml"} <= methods


def load_job_at_root(path: Path):
    import os

    cwd = os.getcwd()
    os.chdir(ROOT)  # shipped job files are submitted from the repository root
    try:
        return load_job(str(path), parse_command)
    finally:
        os.chdir(cwd)


@pytest.mark.parametrize("path", SUBMIT_FILES, ids=lambda p: p.name)
def test_shipped_job_file_is_valid_and_equals_its_ray_job_submit_header(path):
    job, runtime_env = load_job_at_root(path)  # also parses each honed command and loads its config
    argv = header_command(path)
    split = argv.index("--")
    options = dict(zip(argv[3:split:2], argv[4:split:2]))
    assert argv[:3] == ["ray", "job", "submit"]
    assert argv[split + 1:] == shlex.split(job.entrypoint)
    assert options["--runtime-env"] == job.runtime_env == "jobs/runtime_env.yaml"
    assert json.loads(options["--metadata-json"]) == job.metadata
    assert options["--address"] == DEFAULT_ADDRESS and job.address is None
    assert runtime_env["working_dir"] == "." and "platform/honed" in runtime_env["py_modules"]
    for argv in shell_commands(job.entrypoint):
        assert argv[:3] == ["python", "-m", "honed.cli"], "the cluster may not have the `honed` script installed"


@pytest.mark.parametrize("fields, expected", [
    ({"entrypont": "x"}, "entrypont: unknown key; allowed here: entrypoint, runtime_env, address, submission_id"),
    ({"entrypoint_num_cpus": "two"}, "entrypoint_num_cpus = 'two'"),
    ({"entrypoint_num_gpus": -1}, "entrypoint_num_gpus = -1: Input should be greater than or equal to 0"),
    ({"metadata": {"owner": 3}}, "metadata.owner = 3: Input should be a valid string"),
    ({"entrypoint": "  "}, "the entrypoint is empty"),
    ({"submission_id": "a b"}, "submission_id = 'a b': String should match pattern"),
    ({"runtime_env": "envs/missing.yaml"}, "runtime_env file not found: envs/missing.yaml"),
    ({"runtime_env": {"working_dir": ".", "pipp": ["x"]}}, "runtime_env: unknown key(s) pipp; allowed: working_dir"),
    ({"runtime_env": {"pip": 3}}, "runtime_env: runtime_env['pip'] must be of type str or List[str]"),
    ({"runtime_env": {"env_vars": {"A": 1}}}, "runtime_env: runtime_env['env_vars'] must be of type Dict[str, str]"),
    ({"runtime_env": {"working_dir": "nowhere"}}, "runtime_env.working_dir: local path nowhere does not exist"),
    ({"entrypoint": "python -m honed.cli train train.yaml optim.lrr=1"},
     "entrypoint: honed train: invalid TrainConfig in train.yaml:\n  optim.lrr: unknown key; allowed here: lr,"),
    ({"entrypoint": "bash -c 'echo start && python -m honed.cli train missing.yaml'"},
     "entrypoint: honed train config missing.yaml not found in the working_dir"),
    ({"entrypoint": "honed trian train.yaml"}, "entrypoint: `honed trian train.yaml` is not a valid honed command"),
    ({"entrypoint": "python -m honed.cli train 'train.yaml"}, "entrypoint: not a valid shell command"),
])
def test_bad_job_file_is_named_before_ray(job_dir, fields, expected):
    with pytest.raises(ConfigError) as err:
        load_job(write_job(job_dir / "job.yaml", **fields), parse_command)
    assert expected in str(err.value)


def test_runtime_env_from_a_file_and_remote_working_dir_skip_local_checks(job_dir):
    (job_dir / "env.yaml").write_text("working_dir: s3://bucket/honed.zip\nenv_vars: {A: '1'}\n")
    _, runtime_env = load_job(write_job(job_dir / "job.yaml", runtime_env="env.yaml",
                                        entrypoint="python -m honed.cli train cluster-only.yaml"), parse_command)
    assert runtime_env == {"working_dir": "s3://bucket/honed.zip", "env_vars": {"A": "1"}}
    (job_dir / "list.yaml").write_text("- a\n")
    with pytest.raises(ConfigError, match="runtime_env file list.yaml must hold a mapping, got list"):
        load_job(write_job(job_dir / "job.yaml", runtime_env="list.yaml"), parse_command)


def test_shell_commands_split_chains_and_look_inside_bash_c():
    assert shell_commands("a 1 && b 2; c||d | e") == [["a", "1"], ["b", "2"], ["c"], ["d"], ["e"]]
    assert shell_commands("cd /app && bash -c 'honed prepare p.yaml && honed train t.yaml x=1'") == [
        ["cd", "/app"], ["honed", "prepare", "p.yaml"], ["honed", "train", "t.yaml", "x=1"]]
    assert honed_args(["python", "-m", "honed.cli", "train", "t.yaml"]) == ["train", "t.yaml"]
    assert honed_args(["/opt/venv/bin/honed", "eval"]) == ["eval"]
    assert honed_args(["honed", "train", "t.yaml", ">", "log", "2", ">&", "1"]) is None  # left to the shell
    assert honed_args(["python", "train.py"]) is None


def test_parse_command_reads_honed_arguments_as_main_does():
    assert parse_command(["train", "t.yaml", "optim.lr=1"]) == ("train", "t.yaml", ["optim.lr=1"])
    assert parse_command(["train", "optim.lr=1", "name=x"]) == ("train", None, ["optim.lr=1", "name=x"])
    assert parse_command(["registry", "list"]) == ("registry", None, [])
    with pytest.raises(SystemExit):
        parse_command(["trian", "t.yaml"])


def imported_modules(tree: ast.AST) -> set[str]:
    """Every module a file imports, at the top or inside a function (`from honed import cli` gives honed.cli)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return names


@pytest.mark.parametrize("module", ["jobs", "registry"])
def test_the_cli_is_above_jobs_and_registry(module):
    """honed.cli imports both and builds their argparse commands; they take what they need of it as arguments
    (jobs.load_job's parse_command)."""
    tree = ast.parse((ROOT / "platform" / "honed" / f"{module}.py").read_text())
    assert not {name for name in imported_modules(tree) if name == "honed.cli" or name.startswith("honed.cli.")}
    argparse_calls = {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)
                      and node.attr in ("ArgumentParser", "add_parser", "add_subparsers", "add_argument")}
    assert not argparse_calls


def test_submit_cli_exits_2_naming_the_problem(job_dir, capsys):
    assert main(["submit", "nope.yaml"]) == 2
    assert "honed submit: config file not found: nope.yaml" in capsys.readouterr().err
    path = write_job(job_dir / "job.yaml")
    assert main(["submit", path, "entrypoint_num_cpus=-1"]) == 2
    assert "entrypoint_num_cpus = -1: Input should be greater than or equal to 0" in capsys.readouterr().err


def printed_job(own_output, argv: list[str]) -> dict:
    assert main(argv) == 0
    return yaml.safe_load(own_output().out)


def test_address_order_flag_then_file_then_environment_then_default(job_dir, own_output, monkeypatch):
    bare, pinned = write_job(job_dir / "bare.yaml"), write_job(job_dir / "pinned.yaml", address="http://file:8265")
    assert printed_job(own_output, ["submit", bare, "--print-config"])["address"] == DEFAULT_ADDRESS
    monkeypatch.setenv("RAY_ADDRESS", "http://env:8265")
    assert printed_job(own_output, ["submit", bare, "--print-config"])["address"] == "http://env:8265"
    assert printed_job(own_output, ["submit", pinned, "--print-config"])["address"] == "http://file:8265"
    assert printed_job(own_output, ["submit", pinned, "--print-config", "--address", "http://flag:8265"])["address"] \
        == "http://flag:8265"
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", "http://api:8265")  # Ray's own Jobs API variable goes first
    assert resolve_address(None) == "http://api:8265"


def test_print_config_shows_overrides_and_the_runtime_env_read_from_its_file(job_dir, own_output):
    (job_dir / "env.yaml").write_text("working_dir: .\nexcludes: [runs]\n")
    job = printed_job(own_output, ["submit", write_job(job_dir / "job.yaml", runtime_env="env.yaml"),
                                   "submission_id=run-2", "metadata.owner=me", "entrypoint_num_cpus=0.5",
                                   "--print-config"])
    assert job["submission_id"] == "run-2" and job["metadata"] == {"owner": "me"}
    assert job["entrypoint_num_cpus"] == 0.5
    assert job["runtime_env"] == {"working_dir": ".", "excludes": ["runs"]}


def test_jobs_subcommands_parse():
    args = parser().parse_args(["jobs", "stop", "raysubmit_1", "--address", "http://h:8265", "--timeout", "5"])
    assert (args.command, args.action, args.id, args.address, args.timeout) == ("jobs", "stop", "raysubmit_1",
                                                                               "http://h:8265", 5.0)
    assert parser().parse_args(["jobs", "logs", "x", "--follow"]).follow
    assert parser().parse_args(["submit", "j.yaml", "a=1", "--no-wait"]).overrides == ["a=1"]
    for argv in (["jobs"], ["jobs", "status"], ["jobs", "remove", "x"]):
        with pytest.raises(SystemExit):
            parser().parse_args(argv)


def test_unreachable_cluster_is_a_clear_error_and_the_flag_beats_ray_address(job_dir, own_output, monkeypatch,
                                                                          free_port):
    flag, env = f"http://127.0.0.1:{free_port()}", f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("RAY_ADDRESS", env)  # Ray alone would let this win over the address it is handed
    assert main(["jobs", "list", "--address", flag]) == 1
    err = own_output().err
    assert err.startswith(f"honed jobs list: Failed to connect to Ray at address: {flag}.")
    assert "Is a cluster running there?" in err and env not in err
    assert main(["submit", write_job(job_dir / "job.yaml"), "--no-wait"]) == 1
    assert f"honed submit: Failed to connect to Ray at address: {env}." in own_output().err
