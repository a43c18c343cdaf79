"""`ray job submit -- honed train` against a `ray start --head` cluster started by this test."""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent


@pytest.fixture
def head_node(free_port):
    """A separate Ray cluster (its own GCS and dashboard ports); `--block` ties its life to this process."""
    gcs, dashboard = free_port(), free_port()
    temp_dir = tempfile.mkdtemp(prefix="rayh", dir="/tmp")  # Ray's socket paths must stay under 107 bytes
    env = os.environ | {"RAY_AUTH_MODE": "token"}
    proc = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", f"--port={gcs}", "--num-cpus=2",
         "--include-dashboard=true", f"--dashboard-port={dashboard}", "--dashboard-host=127.0.0.1",
         f"--temp-dir={temp_dir}", "--disable-usage-stats",
         # the test session's own local Ray already holds the default agent ports on this machine
         f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
         f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"
    deadline = time.time() + 120
    while time.time() < deadline:
        # ready means a job actually runs: the job server answers before its agent can take jobs
        probe = subprocess.run([str(BIN / "ray"), "job", "submit", "--address", address, "--", "echo", "ready"],
                               env=env, capture_output=True, text=True)
        if probe.returncode == 0:
            break
        if proc.poll() is not None:
            pytest.fail("ray start --head exited: " + proc.stdout.read().decode(errors="replace")[-3000:])
        time.sleep(2)
    else:
        pytest.fail("the head node's job server never answered")
    yield address, env
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
    shutil.rmtree(temp_dir, ignore_errors=True)


def test_ray_job_submit_runs_honed_train(head_node, prepared, tiny_model, tmp_path):
    address, env = head_node
    job_dir = tmp_path / "job"
    job_dir.mkdir()
    out = tmp_path / "out"
    (job_dir / "train.yaml").write_text(
        f"model: {{name_or_path: {tiny_model}}}\ndata_dir: {prepared['dir']}\noutput_dir: {out}\n"
        "optim: {max_steps: 4, batch_size: 4}\nlog_every: 2\nname: submitted\n")
    submit = subprocess.run(
        [str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", str(job_dir), "--",
         str(BIN / "honed"), "train", "train.yaml"],
        env=env, capture_output=True, text=True, timeout=600)
    log = submit.stdout + submit.stderr
    assert submit.returncode == 0, log[-4000:]
    assert "succeeded" in log.lower()
    assert "[honed.train] step 4/4" in log                     # worker progress streamed back
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert json.loads((out / "adapter" / "honed.json").read_text())["final_metrics"]["step"] == 4
    shutil.rmtree(out)
