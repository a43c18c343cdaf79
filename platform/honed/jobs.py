"""`honed submit` and `honed jobs`: a thin layer over Ray's Jobs SDK (`ray.job_submission.JobSubmissionClient`)
that runs a honed stage on a cluster as a Ray job.

    honed submit jobs/submit/train_lora.yaml                   # submit, stream the logs, exit with the job's status
    honed submit jobs/submit/train_lora.yaml --no-wait submission_id=icd10-lora-2
    honed jobs list | honed jobs status ID | honed jobs logs ID [--follow] | honed jobs stop ID

A job file holds what `ray job submit` takes: the entrypoint (a shell command run in the working_dir), the
runtime_env (inline, or the path of a YAML file such as jobs/runtime_env.yaml) and optional resources for the
entrypoint. It is validated before Ray is contacted; honed commands in the entrypoint are parsed and their
configs loaded too. Relative paths are read from the current directory, as `ray job submit` reads them.

Address: `--address`, else the job file's `address`, else RAY_API_SERVER_ADDRESS / RAY_ADDRESS, else
http://127.0.0.1:8265 (the dashboard of a `ray start --head` on this machine). A cluster started with token
auth wants RAY_AUTH_MODE=token here as well (the token is read from ~/.ray/auth_token or RAY_AUTH_TOKEN).

honed.cli parses those command lines and calls the functions here; from Python:

    from honed.cli import parse_command
    job, runtime_env = load_job("jobs/submit/train_lora.yaml", parse_command, ["submission_id=icd10-lora-2"])
    status = submit(job, runtime_env, resolve_address(None, job.address), wait=False)
"""

from __future__ import annotations

import os
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, field_validator

from honed.config import CONFIGS, ConfigError, Section, load_config

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
SUCCEEDED, TERMINAL = "SUCCEEDED", ("SUCCEEDED", "FAILED", "STOPPED")
# What Ray's RuntimeEnv knows besides its private `_`-keys; Ray itself would take any other key for a plugin.
RUNTIME_ENV_KEYS = ("working_dir", "py_modules", "py_executable", "excludes", "pip", "uv", "conda", "env_vars",
                    "container", "image_uri", "java_jars", "worker_process_setup_hook", "config")
SHELL_SEPARATORS = ("&&", "||", ";", "|")

# `honed` arguments -> (command, config path or None, overrides); SystemExit when they are not a honed command.
# Passed in (honed.cli.parse_command) rather than imported: honed.cli imports this module.
ParseCommand = Callable[[list[str]], tuple[str, str | None, list[str]]]


class JobFile(Section):
    """A Ray job in one file: the arguments of `JobSubmissionClient.submit_job`, plus where to send it."""

    entrypoint: str
    """Shell command run on the cluster from the working_dir, e.g. `python -m honed.cli train jobs/train_lora.yaml`
    (`python -m honed.cli` needs only the package on the path; the `honed` script needs honed installed)."""
    runtime_env: str | dict[str, Any] = {}
    """Ray runtime_env inline (working_dir, py_modules, pip, env_vars, ...) or the path of a YAML file holding one."""
    address: str | None = None
    """Jobs API address of the cluster (its dashboard, http://<head>:8265); `--address` wins over it."""
    submission_id: str | None = Field(default=None, pattern=r"^[A-Za-z0-9._-]+$")
    """Unique per cluster; Ray generates one when unset (a rerun needs a new one)."""
    entrypoint_num_cpus: float = Field(default=0, ge=0)
    """CPUs reserved for the entrypoint process itself, apart from the tasks and actors it starts."""
    entrypoint_num_gpus: float = Field(default=0, ge=0)
    entrypoint_memory: int = Field(default=0, ge=0)
    """Bytes of memory reserved for the entrypoint process."""
    entrypoint_resources: dict[str, float] = {}
    """Custom resources for the entrypoint, e.g. {head: 1} to keep the driver on the head node."""
    metadata: dict[str, str] = {}
    """Labels shown by `honed jobs list` and the dashboard."""

    @field_validator("entrypoint")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("the entrypoint is empty; give the shell command to run, e.g. "
                             "python -m honed.cli train jobs/train_lora.yaml")
        return value


def load_job(path: str, parse_command: ParseCommand,
             overrides: Sequence[str] = ()) -> tuple[JobFile, dict[str, Any]]:
    """The validated job file and its runtime_env (read from its file when given as a path); ConfigError else.
    `parse_command` reads each honed command of the entrypoint (honed.cli.parse_command)."""
    job = load_config(JobFile, path, list(overrides))
    runtime_env = load_runtime_env(job.runtime_env)
    check_honed_commands(job.entrypoint, runtime_env.get("working_dir"), parse_command)
    return job, runtime_env


def load_runtime_env(value: str | dict[str, Any]) -> dict[str, Any]:
    if isinstance(value, str):
        path = Path(value)
        if not path.is_file():
            raise ConfigError(f"runtime_env file not found: {value} (relative paths are read from the current "
                              f"directory, {Path.cwd()}, as `ray job submit --runtime-env` reads them)")
        value = yaml.safe_load(path.read_text()) or {}
        if not isinstance(value, dict):
            raise ConfigError(f"runtime_env file {path} must hold a mapping, got {type(value).__name__}")
    unknown = sorted(set(value) - set(RUNTIME_ENV_KEYS))
    if unknown:
        raise ConfigError(f"runtime_env: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(RUNTIME_ENV_KEYS)}")
    modules = value.get("py_modules") if isinstance(value.get("py_modules"), list) else []
    for key, local in [("working_dir", value.get("working_dir")), *[("py_modules", m) for m in modules]]:
        if isinstance(local, str) and "://" not in local and not Path(local).exists():
            raise ConfigError(f"runtime_env.{key}: local path {local} does not exist (read from {Path.cwd()})")
    from ray.runtime_env import RuntimeEnv

    try:
        RuntimeEnv(**value)  # Ray's own type checks: pip a list of str, env_vars str -> str, ...
    except (TypeError, ValueError) as err:
        raise ConfigError(f"runtime_env: {err}") from None
    return value


def check_honed_commands(entrypoint: str, working_dir: str | None, parse_command: ParseCommand) -> None:
    """Parse each honed command of the entrypoint and load its config (from a local working_dir), so a typo
    fails here rather than on the cluster."""
    for argv in shell_commands(entrypoint):
        args = honed_args(argv)
        if args is None:
            continue
        try:
            command, config, overrides = parse_command(args)
        except SystemExit:
            raise ConfigError(f"entrypoint: `{shlex.join(argv)}` is not a valid honed command "
                              f"(see `honed {args[0] if args else ''} --help`)") from None
        if command not in CONFIGS:
            continue
        if config and working_dir and "://" not in working_dir:
            config = Path(working_dir) / config
            if not config.is_file():
                raise ConfigError(f"entrypoint: honed {command} config {config} not found in the working_dir")
        elif config:
            continue  # resolved on the cluster; nothing local to check
        try:
            load_config(CONFIGS[command], config, overrides)
        except ConfigError as err:
            raise ConfigError(f"entrypoint: honed {command}: {err}") from None


def shell_commands(entrypoint: str) -> list[list[str]]:
    lexer = shlex.shlex(entrypoint, posix=True, punctuation_chars=True)  # `a;b` is two commands, as in a shell
    lexer.whitespace_split = True
    try:
        words = list(lexer)
    except ValueError as err:
        raise ConfigError(f"entrypoint: not a valid shell command ({err}): {entrypoint}") from None
    commands, current = [], []
    for word in [*words, ";"]:
        if word not in SHELL_SEPARATORS:
            current.append(word)
            continue
        if len(current) == 3 and Path(current[0]).name in ("bash", "sh") and current[1] == "-c":
            commands += shell_commands(current[2])  # `bash -c '… && …'`: the commands inside
        elif current:
            commands.append(current)
        current = []
    return commands


def honed_args(argv: list[str]) -> list[str] | None:
    """The honed arguments of `python -m honed.cli ...` or `honed ...`, None for any other command (or one with
    redirections, subshells or `&`, which are left to the shell)."""
    if any(set(word) <= set("<>&()") for word in argv):
        return None
    if len(argv) >= 3 and Path(argv[0]).name.startswith("python") and argv[1:3] == ["-m", "honed.cli"]:
        return argv[3:]
    if Path(argv[0]).name == "honed":
        return argv[1:]
    return None


def resolve_address(flag: str | None, from_file: str | None = None) -> str:
    env = os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")
    return flag or from_file or env or DEFAULT_ADDRESS


def connect(address: str):
    from ray.job_submission import JobSubmissionClient

    # Ray lets RAY_API_SERVER_ADDRESS / RAY_ADDRESS override the address it is handed; honed's own order
    # (flag, job file, environment) has already picked one.
    saved = {k: os.environ.pop(k) for k in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS") if k in os.environ}
    try:
        return JobSubmissionClient(address)
    except ConnectionError as err:
        raise ConnectionError(f"{err} Is a cluster running there? `ray start --head` serves the Jobs API on its "
                              "dashboard port (8265); pass --address or set RAY_ADDRESS") from None
    finally:
        os.environ.update(saved)


# ------------------------------------------------------------------------------------------------- commands
# What `honed submit` and `honed jobs ACTION` run once honed.cli has parsed them; each returns the exit status.
def submit(job: JobFile, runtime_env: dict[str, Any], address: str, wait: bool = True) -> int:
    """Submit a job from `load_job` to the cluster at `address` (`resolve_address`); with `wait`, stream its logs
    and return 0 when it SUCCEEDED, 1 otherwise."""
    client = connect(address)
    submission_id = client.submit_job(
        entrypoint=job.entrypoint, runtime_env=runtime_env, submission_id=job.submission_id,
        metadata=job.metadata or None, entrypoint_num_cpus=job.entrypoint_num_cpus or None,
        entrypoint_num_gpus=job.entrypoint_num_gpus or None, entrypoint_memory=job.entrypoint_memory or None,
        entrypoint_resources=job.entrypoint_resources or None)
    print(f"[honed.submit] job {submission_id} submitted to {address}", flush=True)
    if not wait:
        print(f"[honed.submit] follow it: honed jobs logs {submission_id} --follow --address {address}", flush=True)
        return 0
    return follow(client, submission_id)


def follow(client, submission_id: str) -> int:
    """Stream the job's logs until it ends; 0 when it SUCCEEDED, 1 otherwise (130 when interrupted here)."""
    import asyncio

    async def stream() -> None:
        async for chunk in client.tail_job_logs(submission_id):
            print(chunk, end="", flush=True)

    try:
        try:
            asyncio.run(stream())
        except RuntimeError as err:  # the log stream broke, not the job
            raise RuntimeError(f"{err}; job {submission_id} may still be running: honed jobs status {submission_id}")
        status = wait_until_done(client, submission_id, timeout_s=None)
    except KeyboardInterrupt:
        print(f"\n[honed.submit] no longer following; job {submission_id} keeps running "
              f"(`honed jobs stop {submission_id}` stops it)", file=sys.stderr)
        return 130
    return report_end(client, submission_id, status)


def wait_until_done(client, submission_id: str, timeout_s: float | None) -> str:
    """The job's status once terminal (the log stream can close a moment before the status changes), or its
    status when `timeout_s` runs out."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        status = str(client.get_job_status(submission_id))
        if status in TERMINAL or (deadline is not None and time.monotonic() > deadline):
            return status
        time.sleep(0.5)


def report_end(client, submission_id: str, status: str) -> int:
    message = client.get_job_info(submission_id).message
    tail = f": {message}" if message and status != SUCCEEDED else ""
    print(f"[honed.submit] job {submission_id} {status}{tail}", flush=True)
    return 0 if status == SUCCEEDED else 1


def list_jobs(client) -> int:
    jobs = sorted(client.list_jobs(), key=lambda j: j.start_time or 0)
    print(f"{'SUBMISSION ID':<28} {'STATUS':<10} {'STARTED':<19} ENTRYPOINT")
    for j in jobs:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(j.start_time / 1000)) if j.start_time else "-"
        print(f"{j.submission_id or j.job_id:<28} {j.status!s:<10} {started:<19} {j.entrypoint}")
    return 0


def job_status(client, submission_id: str) -> int:
    info = client.get_job_info(submission_id)
    print(f"{submission_id}: {info.status}" + (f" ({info.message})" if info.message else ""))
    return 0


def print_logs(client, submission_id: str) -> int:
    """The job's logs so far (`follow` streams them until it ends)."""
    print(client.get_job_logs(submission_id), end="")
    return 0


def stop_job(client, submission_id: str, timeout_s: float) -> int:
    """Ray sends SIGTERM to the entrypoint's process group, then SIGKILL; wait for the STOPPED status."""
    was_running = client.stop_job(submission_id)
    status = wait_until_done(client, submission_id, timeout_s=timeout_s)
    if not was_running and status in TERMINAL:
        print(f"[honed.jobs] job {submission_id} was not running: {status}")
        return 0
    print(f"[honed.jobs] job {submission_id} {status}" + ("" if status in TERMINAL else
                                                          f" after {timeout_s:.0f}s; it is still stopping"))
    return 0 if status in TERMINAL else 1
