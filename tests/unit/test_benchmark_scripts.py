"""The benchmark scripts parse their options and resolve their settings without running (`--dry-run`), and
the GPU runner lists one `--gpu` command per training benchmark: the flow a GPU machine would run, checked
here on CPU. The measurements themselves are benchmarks, never tests."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TRAINING = ["train_overhead", "train_vs_hf_trainer", "train_mfu", "train_memory", "packing"]


@pytest.mark.parametrize("name", TRAINING)
@pytest.mark.parametrize("flags, expect", [([], {"quick": False, "gpu": False}),
                                           (["--quick", "--gpu"], {"quick": True, "gpu": True})])
def test_training_benchmark_resolves_its_settings(name, flags, expect):
    done = subprocess.run([sys.executable, f"benchmarks/{name}.py", *flags, "--dry-run"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    settings = json.loads(done.stdout.strip().splitlines()[-1])
    assert {k: settings[k] for k in expect} == expect
    assert "torch" not in done.stderr  # the drivers import neither torch nor Ray themselves


def test_gpu_runner_lists_every_training_benchmark_with_gpu_flags():
    done = subprocess.run(["bash", "benchmarks/gpu/run_train_benchmarks.sh", "--dry-run"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    commands = [line for line in done.stdout.splitlines() if "benchmarks/" in line and line.endswith(".json")]
    assert [Path(c.split()[1]).stem for c in commands] == TRAINING
    assert all("--gpu" in c and "--out benchmarks/results/gpu/" in c for c in commands)
    resolved = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(resolved) == len(TRAINING) and all(r["gpu"] for r in resolved)


def test_gpu_runner_refuses_unknown_arguments():
    done = subprocess.run(["bash", "benchmarks/gpu/run_train_benchmarks.sh", "--fast"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2 and "unknown argument: --fast" in done.stderr


@pytest.mark.parametrize("flags, expect", [([], {"adapters": 8, "loads": [8, 16], "repeats": 2}),
                                           (["--quick"], {"adapters": 4, "loads": [4], "repeats": 1}),
                                           (["--loads", "4,12"], {"loads": [4, 12]})])
def test_serving_benchmark_resolves_its_settings(flags, expect):
    done = subprocess.run([sys.executable, "benchmarks/serve_adapters.py", *flags, "--dry-run"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    settings = json.loads(done.stdout.strip().splitlines()[-1])
    assert {k: settings[k] for k in expect} == expect
