"""`honed serve` as Kubernetes runs it: a real subprocess serving the tiny model and a registry, over real HTTP.

A request for a diverged adapter (finite factors so large that its activations overflow) fails alone: a 500
`decode_failed` (or OpenAI's error event once a stream has begun) while the requests decoding beside it answer
as they do alone. Then SIGTERM stops the process as Kubernetes stops a pod: Serve shut down, exit 0, and no
native stack dump (Ray's own SIGTERM handler prints one and aborts)."""

import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest
from lora_adapters import write_adapter

HONED = str(Path(sys.executable).parent / "honed")


def wait_until_serving(proc: subprocess.Popen, url: str, timeout_s: float = 240) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        assert proc.poll() is None, f"`honed serve` exited early ({proc.returncode}):\n{proc.stdout.read()[-3000:]}"
        try:
            urllib.request.urlopen(url, timeout=5)
            return
        except OSError:
            time.sleep(1)
    raise AssertionError(f"`honed serve` did not answer {url} within {timeout_s:.0f}s")


@pytest.fixture(scope="module")
def server(tiny_model, free_port, tmp_path_factory):
    """`honed serve` in a process group of its own; yields (process, base URL); killed if a test left it running."""
    from honed.registry import Registry

    work = tmp_path_factory.mktemp("serve-process")
    registry = Registry(str(work / "registry"))
    registry.add("healthy", write_adapter(tiny_model, work / "healthy", seed=1))
    registry.add("diverged", write_adapter(tiny_model, work / "diverged", seed=2, fill=1e38))
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    with tempfile.TemporaryDirectory(prefix="rsig", dir="/tmp") as ray_tmp:  # Ray's socket paths stay short
        proc = subprocess.Popen(
            [HONED, "serve", f"model.name_or_path={tiny_model}", f"registry={work / 'registry'}", f"port={port}",
             "num_cpus=0.5", "max_tokens=16", "batch_wait_timeout_s=0.2"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env | {"RAY_TMPDIR": ray_tmp},
            start_new_session=True)
        try:
            wait_until_serving(proc, f"http://127.0.0.1:{port}/v1/models")
            yield proc, f"http://127.0.0.1:{port}/v1"
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def test_a_diverged_adapters_request_fails_alone(server):
    client = openai.OpenAI(base_url=server[1], api_key="none", max_retries=0, timeout=120)

    def ask(model: str) -> str:
        return client.completions.create(model=model, prompt="Code E11", max_tokens=8, temperature=0.8,
                                          seed=3).choices[0].text

    alone = {name: ask(name) for name in ("base", "healthy")}
    with pytest.raises(openai.InternalServerError):
        ask("diverged")  # loads it: below, all three arrive within one batch wait and prefill together
    with ThreadPoolExecutor(5) as pool:  # within one batch_wait_timeout: decoded as one batch
        futures = {name: pool.submit(ask, name) for name in ("base", "healthy", "diverged")}
    with pytest.raises(openai.InternalServerError) as err:
        futures["diverged"].result()
    assert err.value.body["code"] == "decode_failed" and "not finite" in err.value.body["message"]
    assert {name: futures[name].result() for name in ("base", "healthy")} == alone
    with pytest.raises(openai.APIError, match="not finite"):  # after the stream began: OpenAI's error event
        list(client.completions.create(model="diverged", prompt="Code E11", max_tokens=8, stream=True))
    assert ask("healthy") == alone["healthy"]  # the replica serves on


def test_sigterm_shuts_serve_down_cleanly(server):
    proc, url = server
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, output[-3000:]
    assert "SIGTERM received" not in output and "logging.cc" not in output, output[-3000:]
    assert "[honed.serve] stopping" in output
    with pytest.raises(OSError):
        urllib.request.urlopen(f"{url}/models", timeout=5)
