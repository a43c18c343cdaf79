"""Shared parts of the training benchmarks (train_overhead, train_vs_hf_trainer, train_mfu, train_memory,
packing): the prepared demo corpus, one honed run or one bare PyTorch run in a fresh process, and the result
file. Not a benchmark itself.

Every measured run is its own process, so no run inherits a warm allocator, a grown heap or a loaded model
from another:

  honed   `python benchmarks/_train_bench.py honed SPEC RESULT`: a driver with its own local Ray calls
          `honed.train.trainer.train(cfg)` (Ray Train TorchTrainer, fresh worker processes) and writes the
          run's efficiency.json, metrics and live-log timestamps to RESULT.
  bare    `python benchmarks/_train_bench.py bare SPEC RESULT`: a plain PyTorch (+ peft) loop, timed per step
          and per phase, with an optional torch.profiler pass: same shards in the same order, same collate,
          AdamW, the same warm-up + cosine schedule, gradient clipping 1.0. SPEC `kernels` says what it
          computes:
            honed  (default) the same step as honed's per-worker loop: honed's model builder (CPU LoRA
                   dropout), fused AdamW with honed's parameter groups, honed's batches (padding-free rows
                   as honed's default, padded when SPEC `padding_free` is false) and loss (logits at
                   labelled positions only): what is left is Ray Train + the loop
            plain  what a bare eager loop does: the HF model and peft as they come, the model's own loss
                   (`labels=`, logits at every position), torch AdamW's default implementation
  interleaved  `python benchmarks/_train_bench.py interleaved SPEC RESULT`: one LoRA model trained on
          several batch layouts (padded, padding-free, packed) step by step in turn in this one process
          (`interleaved_main`): a same-machine-state A/B for effects smaller than the noise between processes.

The caller (the benchmark script) imports neither torch nor Ray; it samples the memory and CPU time of the
processes it starts (`run_process` → `ProcSampler`), so throughput can also be stated per CPU-second, which
other load on a shared machine disturbs far less than wall-clock time.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
WORK = Path(os.environ.get("HONED_BENCH_WORK", "/tmp/honed-bench-train"))
MODEL = "smollm2-135m-instruct"
WARMUP_STEPS_EXCLUDED = 2  # as honed.train.efficiency.Meter: the first optimizer steps are not timed
LORA = {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": "all-linear"}  # jobs/demo.yaml's adapter


# ------------------------------------------------------------------------------------------- bookkeeping
def commit() -> dict:
    """HEAD and whether the library code (platform/) differs from it: other engineers edit the tree."""
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=False).stdout.strip()
        except OSError:
            return ""
    dirty = [line[3:] for line in git("status", "--porcelain", "platform").splitlines()]
    return {"commit": git("rev-parse", "--short", "HEAD") or "unknown", "library_uncommitted_changes": dirty}


def machine_info() -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpus": os.cpu_count(), "cpu_model": cpu, "python": platform.python_version(),
            "platform": platform.platform(), "loadavg_at_start": [round(x, 2) for x in os.getloadavg()]}
    try:
        mem = Path("/proc/meminfo").read_text().split("\n")[0].split()[1]
        info["memory_gib"] = round(int(mem) / 2**20, 1)
    except (OSError, IndexError, ValueError):
        pass
    gpus = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                          capture_output=True, text=True, check=False) if shutil.which("nvidia-smi") else None
    if gpus and gpus.returncode == 0:
        info["gpus"] = [g.strip() for g in gpus.stdout.strip().splitlines()]
    code = ("import json, torch, transformers, peft, ray; print(json.dumps({'torch': torch.__version__, "
            "'transformers': transformers.__version__, 'peft': peft.__version__, 'ray': ray.__version__}))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    if done.returncode == 0:
        info["versions"] = json.loads(done.stdout.strip().splitlines()[-1])
    return info


def parse_args(parser, name: str, gpu_help: str, quick: dict):
    """Add the options every training benchmark has last (--gpu, --dry-run, --out), parse, apply `quick`'s
    settings under --quick, and under --dry-run print the resolved settings and exit."""
    parser.add_argument("--gpu", action="store_true", help=gpu_help)
    parser.add_argument("--dry-run", action="store_true", help="print the resolved settings and exit")
    parser.add_argument("--out", help=f"result file (default benchmarks/results/{name}.json)")
    args = parser.parse_args()
    if args.quick:
        vars(args).update(quick)
    if args.dry_run:
        print(json.dumps(vars(args)))
        raise SystemExit(0)
    return args


def write_result(name: str, result: dict, out: str | None = None) -> Path:
    path = Path(out) if out else RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    result.setdefault("machine", {})["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def spread(values: list[float]) -> dict:
    """median, min, max of per-repeat figures."""
    if not values:
        return {}
    return {"median": round(statistics.median(values), 4), "min": round(min(values), 4),
            "max": round(max(values), 4), "n": len(values)}


def log(message: str) -> None:
    print(f"[bench] {message}", flush=True)


# ------------------------------------------------------------------------------------------ the dataset
def prepared_dataset(pack_seq_len: int | None = None) -> Path:
    """The demo corpus (jobs/prepare_icd10.yaml: ICD-10 chapters 4, 9, 10 instruction pairs, KJV probe)
    prepared once under WORK and reused while its config is unchanged; packed into rows of
    `pack_seq_len` tokens when given. Prepared in a fresh subprocess with its own local Ray."""
    name = f"data-packed{pack_seq_len}" if pack_seq_len else "data-padded"
    out = WORK / name
    overrides = [f"output_dir={out}"]
    if pack_seq_len:
        overrides += ["data.pack.enabled=true", f"data.pack.seq_len={pack_seq_len}"]
    marker = WORK / f"{name}.json"
    key = {"config": "jobs/prepare_icd10.yaml", "overrides": overrides,
           "config_text": (ROOT / "jobs" / "prepare_icd10.yaml").read_text()}
    if (out / "manifest.json").is_file() and marker.is_file() and json.loads(marker.read_text()) == key:
        return out
    log(f"preparing the demo corpus → {out} (once; ~2-3 min on 2 CPUs)")
    WORK.mkdir(parents=True, exist_ok=True)
    code = ("import sys, ray; from honed.config import PrepareConfig, load_config; "
            "from honed.data.pipeline import prepare; from honed.runtime import _quiet_data_logs; "
            "ray.init(address='local', include_dashboard=False, logging_level='WARNING'); _quiet_data_logs(); "
            "prepare(load_config(PrepareConfig, sys.argv[1], sys.argv[2:]))")
    done = subprocess.run([sys.executable, "-c", code, str(ROOT / "jobs" / "prepare_icd10.yaml"), *overrides],
                          cwd=ROOT, env=bench_env(2), capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"prepare failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    marker.write_text(json.dumps(key))
    return out


def train_rows(data_dir: Path, n: int) -> list[dict]:
    """The first `n` training rows in shard order (the order honed's loop and the bare loop read)."""
    import pyarrow.parquet as pq

    files = sorted((Path(data_dir) / "shards" / "train").glob("*.parquet"))
    rows: list[dict] = []
    for f in files:
        table = pq.read_table(f)
        cols = [c for c in ("input_ids", "labels", "position_ids", "num_tokens") if c in table.column_names]
        rows += table.select(cols).slice(0, n - len(rows)).to_pylist()
        if len(rows) >= n:
            break
    return rows


GROUP_BY_LENGTH = 1  # honed's default optim.group_by_length (off)


def batched_rows(data_dir: Path, batch_size: int, steps: int, group: int = GROUP_BY_LENGTH) -> list[dict]:
    """The rows of the first `steps` batches in the order honed's loop trains them (1 worker, epoch 0, seed 0):
    shard order, then length-grouped over windows of `group` batches (honed.train.batching)."""
    from honed.train.batching import length_grouped

    windows = -(-steps // group) if group > 1 else steps
    rows = train_rows(data_dir, batch_size * windows * max(group, 1))
    plain = [{"input_ids": [r["input_ids"] for r in rows[j:j + batch_size]],
              "index": list(range(j, min(j + batch_size, len(rows))))} for j in range(0, len(rows), batch_size)]
    if "position_ids" in rows[0]:
        return rows[:batch_size * steps]
    grouped = length_grouped(iter(plain), group, seed=(0, 0))
    return [rows[i] for b in itertools.islice(grouped, steps) for i in b["index"]]


def step_token_counts(data_dir: Path, batch_size: int, steps: int, group: int = GROUP_BY_LENGTH,
                      flat: bool = False) -> list[dict]:
    """Per optimizer step (1 worker, no accumulation): tokens fed (padded rows; with `flat`, padding-free
    rows: the non-pad tokens), non-pad, labelled."""
    rows = batched_rows(data_dir, batch_size, steps, group)
    out = []
    for s in range(steps):
        batch = rows[s * batch_size:(s + 1) * batch_size]
        lengths = [len(r["input_ids"]) for r in batch]
        nonpad = sum(r["num_tokens"] for r in batch) if "position_ids" in batch[0] else sum(lengths)
        labelled = sum(sum(1 for y in r["labels"][1:] if y != -100) for r in batch)
        out.append({"fed": nonpad if flat else max(lengths) * len(batch), "nonpad": nonpad, "labelled": labelled})
    return out


def resolve_model_path(name: str = MODEL) -> str:
    """The local HF directory of the model (converted once by honed), resolved in a subprocess."""
    code = "import sys; from honed.models import resolve_model; print(resolve_model(sys.argv[1]))"
    done = subprocess.run([sys.executable, "-c", code, name], capture_output=True, text=True, check=True)
    return done.stdout.strip().splitlines()[-1]


# ----------------------------------------------------------------------------------------- processes
def bench_env(threads: int) -> dict:
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false",
                "RAY_DATA_DISABLE_PROGRESS_BARS": "1", "PYTHONUNBUFFERED": "1"})
    return env


TRANSIENT = ("timed out during startup", "GCS has become overloaded", "Failed to connect to GCS")


def run_process(kind: str, spec: dict, tag: str, needle: str | None = None, timeout: float = 3600,
                script: str | None = None, retries: int = 2) -> dict:
    """`_run_process` again (up to `retries` times) when a local Ray failed to start: on a machine overloaded
    by other jobs its GCS or raylet can miss the start-up deadline. Nothing was measured in such a try."""
    for attempt in range(retries + 1):
        try:
            return _run_process(kind, spec, tag, needle, timeout, script) | ({"retries": attempt} if attempt else {})
        except RuntimeError as err:
            if attempt == retries or not any(t in str(err) for t in TRANSIENT):
                raise
            log(f"  {tag}: Ray did not start (machine overloaded?); trying again")
    raise AssertionError("unreachable")


def _run_process(kind: str, spec: dict, tag: str, needle: str | None = None, timeout: float = 3600,
                 script: str | None = None) -> dict:
    """Run `SCRIPT KIND SPEC RESULT` (default script: this file) in a fresh process and return its result.

    While it runs, the process tree is sampled every 0.25 s (`ProcSampler`): the resident memory and CPU
    time of the processes whose command line holds `needle` (default: the training process of `kind`: Ray
    Train's worker for honed, the script itself otherwise), and the CPU time of the whole tree (for honed:
    the driver, its local Ray's GCS, raylet, controller, Ray Data and worker processes). Returned as `proc`."""
    WORK.mkdir(parents=True, exist_ok=True)
    result_path = WORK / "results" / f"{tag}.json"
    result_path.parent.mkdir(parents=True, exist_ok=True)
    result_path.unlink(missing_ok=True)
    log_path = WORK / "logs" / f"{tag}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    script = script or str(Path(__file__))
    needle = needle or ("RayTrainWorker" if kind == "honed" else f"{Path(script).name} {kind}")
    cmd = [sys.executable, script, kind, json.dumps(spec), str(result_path)]
    waited = wait_for_quiet()
    load_before = round(os.getloadavg()[0], 2)
    started = time.perf_counter()
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=bench_env(spec.get("threads", 1)), stdout=log_file,
                                stderr=subprocess.STDOUT)
        sampler = ProcSampler(proc.pid, needle)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = -9
        sampler.stop()
    wall = time.perf_counter() - started
    if rc != 0 or not result_path.is_file():
        tail = log_path.read_text()[-4000:]
        raise RuntimeError(f"{kind} run '{tag}' failed (rc {rc}); log {log_path}:\n{tail}")
    result = json.loads(result_path.read_text())
    result["process_wall_s"] = round(wall, 1)
    result["loadavg_1min_before_after"] = [load_before, round(os.getloadavg()[0], 2)]
    result["waited_for_quiet_s"] = waited
    result["log"] = str(log_path)
    result["proc"] = sampler.summary()
    result["_samples"] = sampler.samples  # full series, for cpu_between(); dropped before writing results
    return result


def wait_for_quiet(max_load: float | None = None, max_wait: float | None = None) -> float:
    """Wait (up to HONED_BENCH_MAX_WAIT s, default 120) until the 1-minute load average is below
    HONED_BENCH_MAX_LOAD (default 1.5 x CPUs): other people's jobs on a shared machine; returns seconds waited.
    The load is recorded with every run either way."""
    max_load = max_load or float(os.environ.get("HONED_BENCH_MAX_LOAD", str(1.5 * (os.cpu_count() or 1))))
    max_wait = float(os.environ.get("HONED_BENCH_MAX_WAIT", "120")) if max_wait is None else max_wait
    started = time.perf_counter()
    while os.getloadavg()[0] > max_load and time.perf_counter() - started < max_wait:
        time.sleep(5)
    return round(time.perf_counter() - started, 1)


def minor_faults(pid: int) -> int:
    """Minor page faults of a process so far (/proc/PID/stat field 10): fresh pages the kernel had to map
    (and zero), e.g. when freed memory went back to the OS and is allocated again."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[7])
    except (OSError, IndexError, ValueError):
        return 0


def process_label(cmdline: list[str]) -> str:
    """A short name for a process of a benchmark's tree: Ray's process title (`ray::TrainController...`),
    a Ray binary (raylet, gcs_server) or the Python script it runs."""
    if not cmdline:
        return "?"
    first = cmdline[0]
    if first.startswith("ray::"):
        return first.split()[0].split(".")[0]
    base = Path(first).name
    if base.startswith("python"):
        script = next((Path(a).name for a in cmdline[1:] if a.endswith(".py")), None)
        if script:
            return script if script != "_train_bench.py" else f"{script} {cmdline[2] if len(cmdline) > 2 else ''}".strip()
        return base
    return base


class ProcSampler:
    """Samples, every `every` s, the descendants of `pid`: RSS and CPU time (user + system) of the processes
    whose command line holds `needle`, and the CPU time of all of them."""

    def __init__(self, pid: int, needle: str, every: float = 0.25):
        import psutil

        self.root, self.needle, self.every = psutil.Process(pid), needle, every
        # (time.time(), rss MiB of the matches, their cpu s, cpu s of the tree, {process label: cpu s},
        #  minor page faults of the matches)
        self.samples: list[tuple] = []
        self.pids: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            rss = cpu = tree = 0.0
            faults = 0
            matched = False
            by_name: dict[str, float] = {}
            try:
                procs = [self.root, *self.root.children(recursive=True)]
            except psutil.Error:
                procs = []
            for p in procs:
                try:
                    t = p.cpu_times()
                    used = t.user + t.system
                    tree += used
                    cmdline = p.cmdline()
                    name = process_label(cmdline)
                    by_name[name] = round(by_name.get(name, 0.0) + used, 3)
                    if self.needle in " ".join(cmdline):
                        matched = True
                        rss += p.memory_info().rss / 2**20
                        cpu += used
                        faults += minor_faults(p.pid)
                        self.pids.add(p.pid)
                except psutil.Error:
                    continue
            if procs:
                self.samples.append((time.time(), round(rss, 1) if matched else 0.0, round(cpu, 3), round(tree, 3),
                                     by_name, faults))
            self._stop.wait(self.every)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def summary(self) -> dict:
        rss = [s[1] for s in self.samples if s[1]]
        start = self.samples[0][0] if self.samples else 0.0
        step = max(1, len(self.samples) // 60)  # keep the curve small: ~60 points
        return {"needle": self.needle, "matched_pids": sorted(self.pids), "samples": len(self.samples),
                "rss_peak_mb": round(max(rss), 1) if rss else None,
                "rss_curve_s_mb": [(round(s[0] - start, 1), s[1]) for s in self.samples[::step] if s[1]]}


def cpu_between(samples: list, t0: float, t1: float) -> dict | None:
    """CPU seconds used by the matched processes and by the whole tree between wall-clock times t0 and t1
    (linear interpolation between samples)."""
    if not samples or t0 < samples[0][0] or t1 > samples[-1][0]:
        return None

    def at(t: float, col: int) -> float:
        for a, b in itertools.pairwise(samples):
            if a[0] <= t <= b[0]:
                w = (t - a[0]) / max(b[0] - a[0], 1e-9)
                return a[col] + w * (b[col] - a[col])
        return samples[-1][col]
    first = next(s for s in samples if s[0] >= t0)
    last = next(s for s in reversed(samples) if s[0] <= t1)
    by_name = {k: round(v - first[4].get(k, 0.0), 2) for k, v in last[4].items()} if len(first) > 4 else {}
    faults = {"worker_minor_faults": last[5] - first[5]} if len(first) > 5 else {}
    return faults | {"worker_cpu_s": round(at(t1, 2) - at(t0, 2), 3), "tree_cpu_s": round(at(t1, 3) - at(t0, 3), 3),
            "cpu_s_by_process (nearest samples inside the window)":
                dict(sorted(((k, v) for k, v in by_name.items() if v >= 0.05), key=lambda kv: -kv[1]))}


def public(result: dict) -> dict:
    """A run's result without the raw sample series."""
    return {k: v for k, v in result.items() if not k.startswith("_")}


# ---------------------------------------------------------------------------------------- honed (driver)
def honed_config(data_dir: Path, out_dir: Path, *, method: str = "lora", steps: int, batch_size: int = 8,
                 lr: float = 2e-3, warmup: int = 10, threads: int = 1, gpu: bool = False, seed: int = 0,
                 peak_flops: float | None = None, log_every: int = 5, extra: dict | None = None) -> dict:
    """A TrainConfig (as a dict) for one worker; checkpoints only at the end, a tiny final validation."""
    method_cfg: dict = {"name": method}
    if method in ("lora", "qlora"):
        method_cfg["lora"] = dict(LORA)
    cfg = {
        "model": {"name_or_path": MODEL, "dtype": "auto"},
        "method": method_cfg,
        "optim": {"lr": lr, "max_steps": steps, "batch_size": batch_size, "warmup_steps": warmup,
                  "schedule": "cosine", "grad_clip": 1.0},
        "scaling": {"num_workers": 1, "use_gpu": gpu, "cpus_per_worker": 4 if gpu else 0.5,
                    "torch_threads": threads},
        "data_dir": str(data_dir), "output_dir": str(out_dir), "name": "bench",
        "seed": seed, "log_every": log_every, "checkpoint_every": max(steps, 1), "val_max_examples": 8,
    }
    if peak_flops:
        cfg["peak_flops"] = peak_flops
    for key, value in (extra or {}).items():  # "a.b": value
        node = cfg
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return cfg


def honed_main(spec: dict, result_path: str) -> None:
    """In a fresh driver process: local Ray, one `train(cfg)`, its efficiency report and live log."""
    import ray

    from honed.config import TrainConfig
    from honed.runtime import _quiet_data_logs
    from honed.train.trainer import train

    cfg = TrainConfig.model_validate(spec["config"])
    shutil.rmtree(cfg.output_dir, ignore_errors=True)  # a leftover run of the same name would be resumed
    Path(cfg.output_dir).mkdir(parents=True)
    gpu = cfg.scaling.use_gpu
    # address="local": a fresh Ray of our own, never another session's cluster on the same machine
    ray.init(address="local", num_cpus=spec.get("ray_cpus", os.cpu_count()), num_gpus=1 if gpu else 0,
             include_dashboard=False, logging_level="WARNING")
    _quiet_data_logs()
    started = time.perf_counter()
    metrics = train(cfg)
    seconds = time.perf_counter() - started
    ray.shutdown()
    out = Path(cfg.output_dir)
    live = [json.loads(line) for line in (out / "progress.jsonl").read_text().splitlines() if line.strip()]
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    result = {"train_call_s": round(seconds, 1), "efficiency": metrics["efficiency"],
              "final_loss": metrics.get("loss"), "history": history,
              "live_times": [{"step": r["step"], "time": r["time"], "loss": r.get("loss")} for r in live
                             if "step" in r and "loss" in r],
              "export_check": metrics.get("export_check")}
    Path(result_path).write_text(json.dumps(result))


def honed_wall_rate(result: dict, tokens: list[dict]) -> dict | None:
    """Non-pad tokens/s between the first logged step after warm-up and the last logged step before the
    final one (which also validates): everything the loop does, Ray Train reporting included, timed by the
    worker's live log (`progress.jsonl`: one record per logged step with its wall-clock time). With the
    process samples, also tokens per CPU-second of the training worker and of the whole Ray tree."""
    times = {r["step"]: r["time"] for r in result["live_times"]}
    last = max(times) if times else 0
    usable = sorted(s for s in times if WARMUP_STEPS_EXCLUDED <= s < last)
    if len(usable) < 2:
        return None
    a, b = usable[0], usable[-1]
    n = sum(t["nonpad"] for t in tokens[a:b])  # steps a+1 .. b
    out = {"from_step": a, "to_step": b, "seconds": round(times[b] - times[a], 3),
           "nonpad_tokens": n, "nonpad_tokens_per_s": round(n / (times[b] - times[a]), 2)}
    cpu = cpu_between(result.get("_samples", []), times[a], times[b])
    if cpu:
        out |= cpu | {"nonpad_tokens_per_worker_cpu_s": round(n / max(cpu["worker_cpu_s"], 1e-9), 2),
                      "nonpad_tokens_per_tree_cpu_s": round(n / max(cpu["tree_cpu_s"], 1e-9), 2),
                      "worker_cpu_utilisation": round(cpu["worker_cpu_s"] / (times[b] - times[a]), 3)}
    return out


def honed_step_rates(result: dict, tokens: list[dict]) -> list[float]:
    """Per-step non-pad tokens/s of a honed run logged every step: step k's tokens over the live-log time
    between steps k-1 and k (everything the loop did, Ray Train's report included), for the steps after the
    warm-up and before the last (whose log entry waits for the final validation)."""
    times = {r["step"]: r["time"] for r in result["live_times"]}
    last = max(times) if times else 0
    return [round(tokens[k - 1]["nonpad"] / (times[k] - times[k - 1]), 2)
            for k in range(WARMUP_STEPS_EXCLUDED + 1, last) if k in times and k - 1 in times]


def bare_step_rates(result: dict) -> list[float]:
    return [round(s["nonpad"] / s["seconds"], 2) for s in result["per_step"][WARMUP_STEPS_EXCLUDED:]]


def best_rate(rates: list[float], fraction: float = 1 / 3) -> float | None:
    """Mean of the fastest `fraction` of per-step rates: on a machine where other jobs come and go, the
    steps nobody disturbed; a contention-robust estimate of the undisturbed rate."""
    if not rates:
        return None
    top = sorted(rates, reverse=True)[:max(1, math.ceil(len(rates) * fraction))]
    return round(sum(top) / len(top), 2)


def bare_cpu_rate(result: dict) -> dict:
    """The bare run's measured steps per CPU-second of its process (time.process_time per step)."""
    measured = result["per_step"][WARMUP_STEPS_EXCLUDED:]
    cpu = sum(s["cpu_s"] for s in measured)
    wall = sum(s["seconds"] for s in measured)
    n = sum(s["nonpad"] for s in measured)
    out = {"cpu_s": round(cpu, 3), "nonpad_tokens_per_cpu_s": round(n / max(cpu, 1e-9), 2),
           "cpu_utilisation": round(cpu / max(wall, 1e-9), 3)}
    if measured and "minor_faults" in measured[0]:
        out |= {"minor_faults_per_step": round(sum(s["minor_faults"] for s in measured) / len(measured)),
                "sys_s_per_step": round(sum(s["sys_s"] for s in measured) / len(measured), 4)}
    return out


# ------------------------------------------------------------------------------------- bare PyTorch loop
def bare_main(spec: dict, result_path: str) -> None:
    """A bare PyTorch (+ peft) training loop in this process; see the module docstring."""
    import random

    import numpy as np
    import torch

    threads = spec.get("threads", 1)
    torch.set_num_threads(threads)
    device = torch.device("cuda" if spec.get("gpu") else "cpu")
    model_path = spec["model_path"]
    compute = torch.bfloat16 if device.type == "cuda" else torch.float32

    def seed_all(seed: int) -> None:
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)

    from transformers import get_scheduler

    from honed.models import load_tokenizer

    seed_all(spec.get("seed", 0))
    pad_id = load_tokenizer(model_path).pad_token_id  # honed's loader: eos when the model has no pad token
    plain = spec.get("kernels", "honed") == "plain"
    load_started = time.perf_counter()
    if plain:
        model = build_bare_model(spec, device)
        optimizer = torch.optim.AdamW([{"params": [p for p in model.parameters() if p.requires_grad],
                                        "lr": spec["lr"], "weight_decay": 0.0}], lr=spec["lr"], betas=(0.9, 0.999),
                                      weight_decay=0.0)
    else:
        model, optimizer = honed_model_and_optimizer(spec, device)
    load_s = time.perf_counter() - load_started
    params = [p for p in model.parameters() if p.requires_grad]
    total_params = sum(p.quant_state.shape.numel() if getattr(p, "quant_state", None) is not None else p.numel()
                       for p in model.parameters())
    steps, batch_size = spec["steps"], spec["batch_size"]
    scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=spec.get("warmup", 10), num_training_steps=steps)
    seed_all(spec.get("seed", 0))  # the dropout stream, as honed re-seeds (seed + rank 0) after building
    peak = None
    if spec.get("measure_peak"):
        from honed.train.efficiency import measure_peak_flops

        peak = measure_peak_flops(device, compute)
    extra = spec.get("profile_steps", 0)
    # honed's batches (length-grouped like its loop) or, for the plain loop, shard order
    needed = steps + extra + (1 if spec.get("tensor_memory") else 0)
    rows = batched_rows(Path(spec["data_dir"]), batch_size, needed,
                        1 if plain else spec.get("group_by_length", GROUP_BY_LENGTH))
    autocast = torch.autocast(device.type, dtype=compute, enabled=compute != torch.float32)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)

    flat = not plain and spec.get("padding_free", True)  # honed's loop: optim.padding_free (on for lora/full)
    if flat:
        from honed.train.attention import use_varlen

        use_varlen(model)

    def collate(batch: list[dict]) -> dict:
        return collate_rows(batch, pad_id, device, flat)

    def loss_fn(inputs: dict) -> tuple[torch.Tensor, int]:
        """plain: the model's own loss (logits at every position); honed: honed's loss (logits at labelled
        positions only, no mask on right-padded rows)."""
        if not plain:
            from honed.train.loop import causal_lm_loss

            return causal_lm_loss(model, inputs)
        out = model(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"),
                    position_ids=inputs.get("position_ids"), labels=inputs["labels"], use_cache=False)
        return out.loss, int((inputs["labels"][:, 1:] != -100).sum())

    from torch.profiler import record_function

    def one_step(s: int) -> dict:
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        c0 = time.process_time()
        t0 = time.perf_counter()
        with record_function("phase:data"):
            inputs = collate(rows[s * batch_size:(s + 1) * batch_size])
        sync()
        t1 = time.perf_counter()
        with record_function("phase:forward"), autocast:
            loss, n_loss = loss_fn(inputs)
        sync()
        t2 = time.perf_counter()
        with record_function("phase:backward"):
            loss.backward()
        sync()
        t3 = time.perf_counter()
        with record_function("phase:optimizer"):
            norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            loss_value, norm = loss.item(), float(norm)
        t4 = time.perf_counter()
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        return {"seconds": t4 - t0, "cpu_s": time.process_time() - c0, "sys_s": r1.ru_stime - r0.ru_stime,
                "minor_faults": r1.ru_minflt - r0.ru_minflt, "data_s": t1 - t0, "forward_s": t2 - t1,
                "backward_s": t3 - t2, "optimizer_s": t4 - t3, "fed": int(inputs["input_ids"].numel()),
                "nonpad": inputs["n_tokens"], "labelled": n_loss, "loss": loss_value, "grad_norm": norm}

    model.train()
    per_step = [one_step(s) for s in range(steps)]
    if device.type == "cuda":
        peak_mem, mem_kind = torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_allocated"
    else:
        peak_mem, mem_kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "cpu_max_rss"
    measured = per_step[WARMUP_STEPS_EXCLUDED:]
    seconds = sum(s["seconds"] for s in measured)
    nonpad = sum(s["nonpad"] for s in measured)
    result = {
        "load_s": round(load_s, 2), "total_params": total_params, "trainable_params": sum(p.numel() for p in params),
        "per_step": [{k: (round(v, 5) if isinstance(v, float) else v) for k, v in s.items()} for s in per_step],
        "measured_steps": len(measured), "seconds": round(seconds, 4),
        "step_time_s": round(seconds / max(len(measured), 1), 4),
        "tokens_per_s": round(sum(s["fed"] for s in measured) / seconds, 2) if seconds else None,
        "nonpad_tokens_per_s": round(nonpad / seconds, 2) if seconds else None,
        "phase_share": {k: round(sum(s[k] for s in measured) / seconds, 4)
                        for k in ("data_s", "forward_s", "backward_s", "optimizer_s")} if seconds else None,
        "peak_flops": peak, "peak_memory_mb": round(peak_mem, 1), "memory_kind": mem_kind,
        "threads": torch.get_num_threads(), "memory_parts": memory_parts(model, optimizer),
    }
    if peak and seconds:
        result["mfu"] = round(6 * total_params * nonpad / seconds / peak, 4)
    if extra:
        result["profile"] = profile_steps(one_step, range(steps, steps + extra), device)
    if spec.get("tensor_memory"):
        result["tensor_memory"] = tensor_memory(one_step, steps + extra, model, optimizer, device)
    if spec.get("optimizer_variants"):
        result["optimizer_variants"] = optimizer_variants(params, spec["lr"], spec["optimizer_variants"], sync)
    if spec.get("variants"):  # where a step's time goes by loss variant, on the first batch
        result["loss_variants"] = loss_variants(model, collate(rows[:batch_size]), device, spec["variants"],
                                                device.type == "cuda")
    Path(result_path).write_text(json.dumps(result))


def honed_model_and_optimizer(spec: dict, device):
    """honed's own model builder (peft config, CPU dropout, activation checkpointing) and optimizer (fused
    AdamW or the named bitsandbytes one, honed's param groups) for spec `method`, `lr`, `lora`, `optimizer`."""
    from honed.config import MethodConfig, OptimConfig
    from honed.train.methods import build_model, make_optimizer, param_groups

    name = spec["method"]
    method = MethodConfig(name=name, activation_checkpointing=spec.get("activation_checkpointing", False),
                          **({"lora": spec.get("lora", LORA)} if name in ("lora", "qlora") else {})).model_dump()
    settings = OptimConfig(lr=spec["lr"], weight_decay=0.0, optimizer=spec.get("optimizer", "adamw")).model_dump()
    model = build_model(method, spec["model_path"], "auto", device)
    return model, make_optimizer(settings, param_groups(model, method, settings))


def collate_rows(batch: list[dict], pad_id: int, device, flat: bool = False) -> dict:
    """honed.train.loop.collate over a list of shard rows: right-padded (or stacked packed) rows, or with
    `flat` one padding-free row (optim.padding_free); `n_tokens` counts the non-pad tokens."""
    from honed.train.loop import collate

    return collate({k: [r[k] for r in batch] for k in batch[0]}, pad_id, device, flat=flat)


def variants_main(spec: dict, result_path: str) -> None:
    """`loss_variants` on the first batch of each dataset in `spec['batches']` ({name: [data_dir, batch size]})
    with the model of `spec['method']`, in one process (the same model for every batch)."""
    import torch

    from honed.models import load_tokenizer

    torch.set_num_threads(spec.get("threads", 1))
    device = torch.device("cuda" if spec.get("gpu") else "cpu")
    torch.manual_seed(spec.get("seed", 0))
    pad_id = load_tokenizer(spec["model_path"]).pad_token_id
    model = build_bare_model(spec, device)
    out = {}
    for name, (data_dir, batch_size) in spec["batches"].items():
        batch = collate_rows(train_rows(Path(data_dir), batch_size), pad_id, device)
        out[name] = loss_variants(model, batch, device, spec.get("repeats", 3), device.type == "cuda")
        out[name]["nonpad_tokens"] = batch["n_tokens"]
    Path(result_path).write_text(json.dumps(out))


def interleaved_main(spec: dict, result_path: str) -> None:
    """One model, several batch layouts, their training steps interleaved in this process.

    spec `arms` = {name: {"data_dir", "batch_size", "flat"}}: at step s every arm trains its own batch s
    (forward + backward + clipping + fused AdamW, honed's model builder, loss and collate; `flat` = padding-free
    rows), the arms' order rotating each step. Every arm meets the same machine state, allocator and weights
    within one step of each other, so the ratios separate effects far smaller than the spread between fresh
    processes on a shared machine. The model runs `honed_varlen`, which hands batches without boundaries to
    transformers' SDPA path unchanged."""
    import torch

    from honed.models import load_tokenizer
    from honed.train.attention import use_varlen
    from honed.train.loop import causal_lm_loss

    torch.set_num_threads(spec.get("threads", 1))
    torch.manual_seed(spec.get("seed", 0))
    device = torch.device("cuda" if spec.get("gpu") else "cpu")
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")  # as honed on GPU
    model, optimizer = honed_model_and_optimizer({"method": "lora", "lr": 2e-4, **spec}, device)
    use_varlen(model)
    params = [p for p in model.parameters() if p.requires_grad]
    pad_id = load_tokenizer(spec["model_path"]).pad_token_id
    arms = spec["arms"]
    steps = spec["steps"]
    rows = {name: batched_rows(Path(a["data_dir"]), a["batch_size"], steps) for name, a in arms.items()}
    names = list(arms)
    per_step: dict[str, list[dict]] = {name: [] for name in names}
    model.train()
    for s in range(steps):
        for name in names[s % len(names):] + names[:s % len(names)]:
            size = arms[name]["batch_size"]
            t0 = time.perf_counter()
            inputs = collate_rows(rows[name][s * size:(s + 1) * size], pad_id, device, arms[name]["flat"])
            with autocast:
                loss, _ = causal_lm_loss(model, inputs)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            sync()
            per_step[name].append({"seconds": round(time.perf_counter() - t0, 5), "nonpad": inputs["n_tokens"],
                                   "fed": int(inputs["input_ids"].numel()), "loss": round(loss.item(), 5)})
    out = {}
    for name, measured in per_step.items():
        kept = measured[WARMUP_STEPS_EXCLUDED:]
        seconds = sum(m["seconds"] for m in kept)
        out[name] = {"per_step": measured, "nonpad_tokens_per_s": round(sum(m["nonpad"] for m in kept) / seconds, 2),
                     "step_rates": [round(m["nonpad"] / m["seconds"], 2) for m in kept]}
    Path(result_path).write_text(json.dumps({"arms": out, "threads": torch.get_num_threads(),
                                             "warmup_steps_excluded": WARMUP_STEPS_EXCLUDED}))


def loss_variants(model, batch: dict, device, repeats: int, gpu: bool) -> dict:
    """One forward + backward on `batch` (right-padded with an attention mask, or packed with position ids)
    for each variant, interleaved, `repeats` times each (after one untimed pass each); medians. From what
    the HF model computes by itself to honed's step, one change at a time:

      full_logits         the HF model's own loss (`labels=`): lm_head over the vocabulary at every position
      labelled_masked     lm_head + CE only at the labelled positions, attention mask passed
      labelled_unmasked   the same without the mask on right-padded rows (honed.train.loop.causal_lm_loss)
      honed_step          that, with honed's CPU LoRA dropout (honed.train.methods.FastDropout) in the model
      backbone_only       the transformer body alone (no lm_head, no CE), the model's own dropout: the floor
    """
    import torch
    import torch.nn.functional as F

    from honed.train.loop import causal_lm_loss
    from honed.train.methods import use_fast_dropout

    batch = {k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    body = base.model
    ids, labels = batch["input_ids"], batch["labels"]
    extra = {k: batch[k] for k in ("attention_mask", "position_ids") if k in batch}
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=gpu)
    dropouts = [(d, k, d[k]) for m in model.modules() if isinstance(d := getattr(m, "lora_dropout", None),
                                                                     torch.nn.ModuleDict) for k in d]

    def model_dropout():
        for holder, key, original in dropouts:
            holder[key] = original

    def full_logits():
        return model(input_ids=ids, labels=labels, use_cache=False, **extra).loss

    def labelled_masked():
        keep = torch.zeros_like(labels, dtype=torch.bool)
        keep[:, :-1] = labels[:, 1:] != -100
        logits = model(input_ids=ids, use_cache=False, logits_to_keep=keep, **extra).logits
        return F.cross_entropy(logits.float(), labels[:, 1:][keep[:, :-1]])

    def labelled_unmasked():
        return causal_lm_loss(model, batch)[0]

    def honed_step():
        use_fast_dropout(model)
        try:
            return causal_lm_loss(model, batch)[0]
        finally:
            model_dropout()

    def backbone_only():
        return body(input_ids=ids, use_cache=False, **extra).last_hidden_state.float().mean()

    variants = {"full_logits": full_logits, "labelled_masked": labelled_masked,
                "labelled_unmasked": labelled_unmasked, "honed_step": honed_step, "backbone_only": backbone_only}
    times: dict[str, list[float]] = {k: [] for k in variants}
    losses: dict[str, float] = {}
    model.train()
    sync = (lambda: torch.cuda.synchronize(device)) if gpu else (lambda: None)

    def timed(fn) -> tuple[float, float]:
        sync()
        t0 = time.perf_counter()
        with autocast:
            loss = fn()
        loss.backward()  # honed_step's FastDropout modules are out again, but autograd kept their masks
        sync()
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - t0, float(loss)

    for fn in variants.values():
        timed(fn)
    for _ in range(repeats):
        for name, fn in variants.items():
            seconds, losses[name] = timed(fn)
            times[name].append(seconds)
    med = {k: statistics.median(v) for k, v in times.items()}
    nonpad = int(batch["attention_mask"].sum()) if "attention_mask" in batch else int(ids.numel())
    labelled = int((labels[:, 1:] != -100).sum())
    return {
        "batch_shape": list(ids.shape), "packed": "position_ids" in batch, "positions_with_tokens": nonpad,
        "labelled_tokens": labelled, "repeats": repeats, "lora_dropouts": len(dropouts),
        "fwd_bwd_seconds_median": {k: round(v, 4) for k, v in med.items()},
        "fwd_bwd_seconds_all": {k: [round(x, 4) for x in v] for k, v in times.items()},
        "loss_values (dropout makes them differ)": {k: round(v, 5) for k, v in losses.items()},
        "logit_positions": {"full_logits": int(ids.numel()), "labelled": labelled},
        "speedup_over_full_logits": {k: round(med["full_logits"] / v, 4) for k, v in med.items()},
        "lm_head_and_ce_share_of_full_logits": round(1 - med["backbone_only"] / med["full_logits"], 4),
    }


def build_bare_model(spec: dict, device):
    """The model as honed builds it for `spec['method']` (full: fp32 master weights; lora: frozen base in the
    compute dtype + peft adapters; qlora: NF4 double-quant base prepared for k-bit training + adapters)."""
    import torch
    from transformers import AutoModelForCausalLM

    method, model_path = spec["method"], spec["model_path"]
    compute = torch.bfloat16 if device.type == "cuda" else torch.float32
    if method == "qlora":
        from peft import prepare_model_for_kbit_training
        from transformers import BitsAndBytesConfig

        bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                 bnb_4bit_compute_dtype=compute)
        model = AutoModelForCausalLM.from_pretrained(model_path, quantization_config=bnb, dtype=compute,
                                                     device_map={"": device})
        for module in model.modules():  # as honed: no bf16 repacking shortcut on CPU
            if hasattr(module, "support_avx512bf16_for_cpu"):
                module.support_avx512bf16_for_cpu = False
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    else:
        weights = torch.float32 if method == "full" else compute
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=weights).to(device)
    model.config.use_cache = False
    if method in ("lora", "qlora"):
        from peft import LoraConfig, get_peft_model

        lora = spec.get("lora", LORA)
        model = get_peft_model(model, LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                                                 target_modules=lora["target_modules"], task_type="CAUSAL_LM"))
    return model


def tensor_mb(tensors) -> float:
    return round(sum(t.numel() * t.element_size() for t in tensors) / 2**20, 1)


def memory_parts(model, optimizer) -> dict:
    """Bytes held by weights (as stored: 4-bit packed for qlora), trainable weights (= their gradients) and
    the optimizer state."""
    params = list(model.parameters())
    state = [v for st in optimizer.state.values() for v in st.values() if hasattr(v, "numel")]
    return {"weights_mb": tensor_mb(params), "buffers_mb": tensor_mb(model.buffers()),
            "trainable_weights_mb (= grads)": tensor_mb(p for p in params if p.requires_grad),
            "optimizer_state_mb": tensor_mb(state)}


def floor_main(spec: dict, result_path: str) -> None:
    """The resident memory of a process that has imported what a training worker imports, nothing loaded."""
    import peft  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401
    from transformers import AutoModelForCausalLM  # noqa: F401

    rss = {"torch_transformers_peft_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    import ray.train.torch  # noqa: F401

    import honed.train.loop  # noqa: F401

    rss["plus_ray_train_and_honed_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if spec.get("bitsandbytes"):
        import bitsandbytes  # noqa: F401

        rss["plus_bitsandbytes_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    Path(result_path).write_text(json.dumps({k: round(v, 1) for k, v in rss.items()}))


def optimizer_variants(params: list, lr: float, repeats: int, sync) -> dict:
    """Seconds per AdamW step over `params` (random gradients) for torch's implementations: the default
    (on CPU: one tensor at a time), foreach (multi-tensor) and fused; interleaved, median of `repeats`. Each
    keeps its own state (the default's first, then foreach's, fused's: ~2x the weights each)."""
    import torch

    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    originals = [p.detach().clone() for p in params]
    kinds = {"default": {}, "foreach": {"foreach": True}, "fused": {"fused": True}}
    optimizers, out = {}, {}
    for name, kwargs in kinds.items():
        try:
            optimizers[name] = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, **kwargs)
            optimizers[name].step()  # allocates the state
        except (RuntimeError, TypeError) as err:
            out[name] = f"unavailable: {err}"
    times: dict[str, list[float]] = {k: [] for k in optimizers}
    for _ in range(repeats):
        for name, opt in optimizers.items():
            sync()
            t0 = time.perf_counter()
            opt.step()
            sync()
            times[name].append(time.perf_counter() - t0)
    with torch.no_grad():
        for p, o in zip(params, originals):
            p.copy_(o)
            p.grad = None
    out |= {name: round(statistics.median(v), 4) for name, v in times.items()}
    return {"seconds_per_step": out, "params": sum(p.numel() for p in params), "repeats": repeats,
            "all": {k: [round(x, 4) for x in v] for k, v in times.items()}}


OP_CATEGORIES = [  # (category, predicate on the aten op name); first match wins
    ("matmul (mm/addmm/bmm)", lambda n: n in ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm",
                                              "aten::addmv", "aten::mv", "aten::dot")),
    ("attention (sdpa)", lambda n: "scaled_dot_product" in n or "flash_attention" in n or "efficient_attention" in n),
    ("optimizer + grad clip (foreach)", lambda n: n.startswith("aten::_foreach") or "adam" in n.lower()),
    ("softmax / cross-entropy", lambda n: "softmax" in n or "nll_loss" in n or "cross_entropy" in n),
    ("embedding", lambda n: "embedding" in n),
    ("copies / layout (copy_, cat, contiguous, to)", lambda n: n in (
        "aten::copy_", "aten::cat", "aten::clone", "aten::contiguous", "aten::_to_copy", "aten::index",
        "aten::index_put_", "aten::_index_put_impl_", "aten::fill_", "aten::zero_", "aten::zeros", "aten::empty",
        "aten::empty_strided", "aten::new_zeros", "aten::resize_", "aten::gather", "aten::scatter",
        "aten::scatter_add_", "aten::masked_fill", "aten::masked_fill_", "aten::where", "aten::full")),
]


def categorize(name: str) -> str:
    for category, match in OP_CATEGORIES:
        if match(name):
            return category
    if name.startswith("aten::"):
        return "elementwise / norms / activations (other aten ops)"
    return "framework (autograd engine, python, record_function)"


def tensor_memory(one_step, step: int, model, optimizer, device) -> dict:
    """Peak bytes held in tensors during one more training step: the CPU counterpart of CUDA's max allocated.

    held    what lives between steps: every parameter and buffer as stored (4-bit packed for qlora; weights
            memory-mapped from the checkpoint count too, since training reads them every step) and the
            optimizer state (gradients are freed by zero_grad(set_to_none=True))
    step    the highest running sum of the step's allocations minus frees, op by op (torch.profiler with
            profile_memory: activations, saved tensors, gradients, temporaries, the optimizer's scratch)
    RSS is reported beside it but cannot compare methods here: it counts the checkpoint pages a loader has
    touched (all of them for qlora, which read every weight to quantize it) and the interpreter and libraries."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    parts = memory_parts(model, optimizer)
    held = parts["weights_mb"] + parts["buffers_mb"] + parts["optimizer_state_mb"]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        one_step(step)
        return {"held_mb": held, "peak_mb": round(torch.cuda.max_memory_allocated(device) / 2**20, 1),
                "kind": "cuda_max_allocated", "parts": parts}
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        one_step(step)
    live = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        live += event.self_cpu_memory_usage
        peak = max(peak, live)
    return {"held_mb": held, "step_peak_mb": round(peak / 2**20, 1), "peak_mb": round(held + peak / 2**20, 1),
            "kind": "tensor bytes (parameters + buffers + optimizer state + the step's peak allocations)",
            "parts": parts}


def profile_steps(one_step, steps, device) -> dict:
    """torch.profiler over a few training steps: self time per op category, matmul FLOPs, top ops."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    started = time.perf_counter()
    with profile(activities=activities, with_flops=True) as prof:
        per_step = [one_step(s) for s in steps]
    wall = time.perf_counter() - started
    use_cuda = device.type == "cuda"
    by_cat: dict[str, float] = {}
    rows = []
    matmul_flops = matmul_us = 0.0
    for e in prof.key_averages():
        if e.key.startswith("phase:"):
            continue
        self_us = (e.self_device_time_total if use_cuda else e.self_cpu_time_total)
        if self_us <= 0:
            continue
        cat = categorize(e.key)
        by_cat[cat] = by_cat.get(cat, 0.0) + self_us
        rows.append((self_us, e.key, e.count, e.flops or 0))
        if cat.startswith("matmul"):
            matmul_flops += e.flops or 0
            matmul_us += self_us
    total = sum(by_cat.values())
    rows.sort(reverse=True)
    out = {
        "steps": len(per_step), "wall_s": round(wall, 3), "clock": "device" if use_cuda else "cpu self time",
        "profiled_step_s": [round(s["seconds"], 3) for s in per_step],
        "total_self_s": round(total / 1e6, 3),
        "share_by_category": {k: round(v / total, 4) for k, v in sorted(by_cat.items(), key=lambda kv: -kv[1])},
        "seconds_by_category": {k: round(v / 1e6, 3) for k, v in sorted(by_cat.items(), key=lambda kv: -kv[1])},
        "matmul_flops": matmul_flops, "matmul_seconds": round(matmul_us / 1e6, 3),
        "matmul_achieved_flops_per_s": round(matmul_flops / (matmul_us / 1e6), 1) if matmul_us else None,
        "top_ops": [{"op": k, "self_s": round(us / 1e6, 3), "share": round(us / total, 4), "calls": c,
                     "flops": f} for us, k, c, f in rows[:15]],
    }
    if not use_cuda:  # CPU: attribute every op's self time to its phase (forward / backward / optimizer ...)
        matrix: dict[str, dict[str, float]] = {}
        for e in prof.events():
            if e.name.startswith("phase:") or e.self_cpu_time_total <= 0:
                continue
            parent, phase = e.cpu_parent, "outside phases"
            while parent is not None:
                if parent.name.startswith("phase:"):
                    phase = parent.name[len("phase:"):]
                    break
                parent = parent.cpu_parent
            row = matrix.setdefault(phase, {})
            cat = categorize(e.name)
            row[cat] = row.get(cat, 0.0) + e.self_cpu_time_total
        grand = sum(sum(r.values()) for r in matrix.values()) or 1.0
        out["share_by_phase"] = {ph: round(sum(r.values()) / grand, 4) for ph, r in matrix.items()}
        out["share_by_phase_and_category"] = {
            ph: {c: round(v / grand, 4) for c, v in sorted(r.items(), key=lambda kv: -kv[1]) if v / grand >= 0.001}
            for ph, r in matrix.items()}
    return out


def main() -> None:
    kind, spec, result_path = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
    {"honed": honed_main, "bare": bare_main, "floor": floor_main, "variants": variants_main,
     "interleaved": interleaved_main}[kind](spec, result_path)


if __name__ == "__main__":
    main()
