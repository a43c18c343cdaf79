"""What every benchmark script shares, so that a script holds only its measurement: what to run, what to
compare, its goals.

    def options(parser):                         # the script's own flags
        parser.add_argument("--steps", type=int, default=10)

    def measure(args) -> Measured:               # runs, compares, states its goals
        ...
        return Measured("honed vs a bare loop", {"config": ..., "ratio": r}, [at_least("honed / bare", r, 0.97)])

    if __name__ == "__main__":
        main("train_overhead", __doc__, measure, options=options, quick={"steps": 4, "repeats": 1}, repeats=3)

`main` parses the common flags: --quick (the script's smoke settings), --repeats (where the benchmark repeats
a comparison), --gpu (where it can run on a GPU), --dry-run (print the resolved settings and exit), --out (the
result file, default benchmarks/results/NAME.json); records the machine and the commit; runs `measure`; and
writes {"benchmark", "what", "quick", "date", "machine", "commit", "library_uncommitted_changes", <the
benchmark's figures>, "goals": [{"name", "value", "goal", "met"}]}.

Every measured run is a fresh process (`run_process` starts `SCRIPT KIND SPEC RESULT`, `child_main` answers
it), so no run inherits a warm allocator, a grown heap or a loaded model from another. Before each the harness
waits for a quiet machine; it records the load before and after and samples the process tree
(`process_sampler`). `alternating` repeats a comparison, reversing the order every other repeat; ratios are
taken within a repeat against a baseline run beside it, because these shared machines are noisy.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from process_sampler import ProcSampler

from honed.runtime import cpu_model

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
WORK = Path(os.environ.get("HONED_BENCH_WORK", "/tmp/honed-bench-train"))
MODEL = "smollm2-135m-instruct"  # every benchmark's model; honed resolves it once into ~/.cache/honed/models
FASTEST_THIRD = "fastest third of the measured steps, all repeats pooled"


def log(message: str) -> None:
    print(f"[bench] {message}", flush=True)


# --------------------------------------------------------------------------- the command line and the file
@dataclass
class Measured:
    """What a benchmark's `measure(args)` returns."""

    what: str  # one sentence: what ran, what it is compared with
    figures: dict  # the benchmark's own keys of the result file (config, repeats, ratios, ...)
    goals: list[dict] = field(default_factory=list)  # `at_least` / `at_most` entries


def main(name: str, doc: str, measure: Callable[[argparse.Namespace], Measured], *,
         options: Callable[[argparse.ArgumentParser], None] | None = None, quick: dict | None = None,
         repeats: int | None = None, gpu: str | None = None, children: dict[str, Callable[[dict], dict]] | None = None,
         file_name: Callable[[argparse.Namespace], str] | None = None) -> None:
    """A benchmark script's entry point: parse the flags, `measure`, write the result file.

    `quick` holds the settings --quick applies, `repeats` the default of --repeats (no flag when None), `gpu`
    the help of --gpu (no flag when None), `children` the entries a fresh process of this script may run
    (`SCRIPT KIND SPEC RESULT`, see `run_process`), `file_name` the result file's name when flags decide it."""
    if children and sys.argv[1:2] and sys.argv[1] in children:
        child_main(children)
        return
    args = parse_args(name, doc, options, quick or {}, repeats, gpu)
    machine = machine_info()
    date = time.strftime("%Y-%m-%d %H:%M")
    measured = measure(args)
    result = {"benchmark": name, "what": measured.what, "quick": args.quick, "date": date, "machine": machine,
              **commit(), **measured.figures, "goals": measured.goals}
    path = write_result(result, args.out or RESULTS / f"{file_name(args) if file_name else name}.json")
    goals = "; ".join(f"{g['name']} {g['value']} (goal {g['goal']}: {'met' if g['met'] else 'NOT met'})"
                      for g in measured.goals)
    log(f"{goals or 'result'} → {path}")


def parse_args(name: str, doc: str, options, quick: dict, repeats: int | None, gpu: str | None):
    """The common flags around the script's own (`options`); under --quick `quick`'s settings apply; under
    --dry-run the resolved settings are printed as one JSON line and the process exits."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="smoke settings: " + ", ".join(f"{k}={v}" for k, v in quick.items()))
    if repeats:
        parser.add_argument("--repeats", type=int, default=repeats,
                            help="runs of the whole comparison (fresh processes or apps each); ratios are medians")
    if options:
        options(parser)
    if gpu:
        parser.add_argument("--gpu", action="store_true", help=gpu)
    parser.add_argument("--dry-run", action="store_true", help="print the resolved settings and exit")
    parser.add_argument("--out", help=f"result file (default benchmarks/results/{name}.json)")
    args = parser.parse_args()
    if args.quick:
        vars(args).update(quick)
    if args.dry_run:
        print(json.dumps(settings(args)))
        raise SystemExit(0)
    return args


def settings(args: argparse.Namespace) -> dict:
    """The flags that decide what is measured (all but --out and --dry-run)."""
    return {k: v for k, v in vars(args).items() if k not in ("out", "dry_run")}


def write_result(result: dict, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    result.setdefault("machine", {})["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path


def commit() -> dict:
    """HEAD and the library files (platform/) that differ from it: other engineers edit the tree."""
    def git(*args: str) -> str:
        try:
            done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=False)
            return done.stdout.rstrip()  # not strip(): porcelain lines start with a space
        except OSError:
            return ""
    dirty = [line[3:] for line in git("status", "--porcelain", "platform").splitlines()]
    return {"commit": git("rev-parse", "--short", "HEAD") or "unknown", "library_uncommitted_changes": dirty}


def machine_info() -> dict:
    """CPUs, memory, GPUs, Python, the load average now and the versions of torch, transformers, peft, Ray
    (read in a subprocess: the benchmark's own process imports neither torch nor Ray)."""
    info = {"cpus": os.cpu_count(), "cpu_model": cpu_model(), "python": platform.python_version(),
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


# ------------------------------------------------------------------------------- repeats, ratios, goals
def alternating(repeats: int, kinds: Sequence[str], run: Callable[[str, int], dict]) -> Iterator[tuple[list, dict]]:
    """`run(kind, repeat)` for every kind, `repeats` times: in `kinds`' order on even repeats, reversed on odd
    ones, so that no side always goes first while other jobs' load drifts. Yields (order, {kind: result}) after
    each repeat, so its ratios compare runs made back to back."""
    for r in range(repeats):
        order = list(kinds) if r % 2 == 0 else list(kinds)[::-1]
        runs = {}
        for kind in order:
            log(f"repeat {r + 1}/{repeats}: {kind} ...")
            runs[kind] = run(kind, r)
        yield order, runs


def ratio(value: float | None, baseline: float | None, digits: int = 4) -> float | None:
    """value / baseline, rounded; None when either is missing."""
    return round(value / baseline, digits) if value and baseline else None


def present(rows: list[dict], key: str) -> list:
    """`key` of each row that has a figure for it (not None or 0)."""
    return [r[key] for r in rows if r.get(key)]


def spread(values: list[float]) -> dict:
    """median, min, max of per-repeat figures."""
    if not values:
        return {}
    return {"median": round(statistics.median(values), 4), "min": round(min(values), 4),
            "max": round(max(values), 4), "n": len(values)}


def best_rate(rates: list[float], fraction: float = 1 / 3) -> float | None:
    """Mean of the fastest `fraction` of per-step rates: on a machine where other jobs come and go, the
    steps nobody disturbed; a contention-robust estimate of the undisturbed rate."""
    if not rates:
        return None
    top = sorted(rates, reverse=True)[:max(1, math.ceil(len(rates) * fraction))]
    return round(sum(top) / len(top), 2)


def best_steps(pooled: dict[str, list[float]], subject: str, baseline: str, goal: float | None = None) -> dict:
    """Each side's `best_rate` over its per-step rates pooled over the repeats, subject / baseline, and whether
    that ratio reaches `goal` (when given)."""
    best = {k: best_rate(v) for k, v in pooled.items()}
    out = {"fraction": FASTEST_THIRD, **best, "ratio": ratio(best[subject], best[baseline])}
    if goal is not None:
        out["met"] = out["ratio"] >= goal if out["ratio"] else None
    return out


def at_least(name: str, value: float | None, goal: float) -> dict:
    """A goal met when `value` >= `goal` (not met when nothing was measured)."""
    return {"name": name, "value": value, "goal": f">= {goal}", "met": value is not None and value >= goal}


def at_most(name: str, value: float | None, goal: float) -> dict:
    """A goal met when `value` <= `goal` (not met when nothing was measured)."""
    return {"name": name, "value": value, "goal": f"<= {goal}", "met": value is not None and value <= goal}


# ----------------------------------------------------------------------------------- fresh processes
def bench_env(threads: int) -> dict:
    """This environment with `threads` math threads, tokenizers single-threaded, no Ray Data progress bars."""
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false",
                "RAY_DATA_DISABLE_PROGRESS_BARS": "1", "PYTHONUNBUFFERED": "1"})
    return env


TRANSIENT = ("timed out during startup", "GCS has become overloaded", "Failed to connect to GCS")


def run_process(script: str | Path, kind: str, spec: dict, tag: str, *, needle: str | None = None,
                env: dict | None = None, timeout: float = 3600, retries: int = 2) -> dict:
    """`script KIND SPEC RESULT` in a fresh process (`child_main` at the other end), its result with the process
    figures added (see `_run_process`). Tried again (up to `retries` times) when a local Ray failed to start:
    on a machine overloaded by other jobs its GCS or raylet can miss the start-up deadline; nothing was
    measured in such a try. `env` defaults to `bench_env` with SPEC's `threads` (1)."""
    for attempt in range(retries + 1):
        try:
            result = _run_process(script, kind, spec, tag, needle, env, timeout)
            return result | ({"retries": attempt} if attempt else {})
        except RuntimeError as err:
            if attempt == retries or not any(t in str(err) for t in TRANSIENT):
                raise
            log(f"  {tag}: Ray did not start (machine overloaded?); trying again")
    raise AssertionError("unreachable")


def _run_process(script, kind: str, spec: dict, tag: str, needle: str | None, env: dict | None,
                 timeout: float) -> dict:
    """While the process runs, its tree is sampled every 0.25 s (`ProcSampler`): the resident memory and CPU
    time of the processes whose command line holds `needle` (default: `SCRIPT KIND` itself), and the CPU
    time of the whole tree. Returned as `proc`; the raw series as `_samples` (see `public`)."""
    result_path, log_path = WORK / "results" / f"{tag}.json", WORK / "logs" / f"{tag}.log"
    for path in (result_path, log_path):
        path.parent.mkdir(parents=True, exist_ok=True)
    result_path.unlink(missing_ok=True)
    cmd = [sys.executable, str(script), kind, json.dumps(spec), str(result_path)]
    waited = wait_for_quiet()
    load_before = round(os.getloadavg()[0], 2)
    started = time.perf_counter()
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env or bench_env(spec.get("threads", 1)), stdout=log_file,
                                stderr=subprocess.STDOUT)
        sampler = ProcSampler(proc.pid, needle or f"{Path(script).name} {kind}")
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
    return json.loads(result_path.read_text()) | {
        "process_wall_s": round(wall, 1), "loadavg_1min_before_after": [load_before, round(os.getloadavg()[0], 2)],
        "waited_for_quiet_s": waited, "log": str(log_path), "proc": sampler.summary(), "_samples": sampler.samples}


def child_main(entries: dict[str, Callable[[dict], dict]]) -> None:
    """The far end of `run_process`: `SCRIPT KIND SPEC RESULT` writes `entries[KIND](SPEC)` to RESULT."""
    kind, spec, result_path = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
    Path(result_path).write_text(json.dumps(entries[kind](spec)))


def call(script: str | Path, kind: str, spec: dict, *, env: dict | None = None) -> dict:
    """`script KIND SPEC RESULT` in a fresh process, not measured (a preparation: a dataset, a model path);
    its result, or RuntimeError with the end of its output."""
    with tempfile.TemporaryDirectory() as tmp:
        result_path = Path(tmp) / "result.json"
        done = subprocess.run([sys.executable, str(script), kind, json.dumps(spec), str(result_path)], cwd=ROOT,
                              env=env, capture_output=True, text=True, check=False)
        if done.returncode != 0 or not result_path.is_file():
            raise RuntimeError(f"{kind} failed (rc {done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        return json.loads(result_path.read_text())


def public(result: dict) -> dict:
    """A run's result without the raw sample series."""
    return {k: v for k, v in result.items() if not k.startswith("_")}


def wait_for_quiet() -> float:
    """Wait (up to HONED_BENCH_MAX_WAIT s, default 120) until the 1-minute load average is below
    HONED_BENCH_MAX_LOAD (default 1.5 x CPUs): other people's jobs on a shared machine; returns seconds waited.
    The load is recorded with every run either way."""
    max_load = float(os.environ.get("HONED_BENCH_MAX_LOAD", str(1.5 * (os.cpu_count() or 1))))
    max_wait = float(os.environ.get("HONED_BENCH_MAX_WAIT", "120"))
    started = time.perf_counter()
    while os.getloadavg()[0] > max_load and time.perf_counter() - started < max_wait:
        time.sleep(5)
    return round(time.perf_counter() - started, 1)


def run_honed(command: str, config: str | Path, out: str | Path, env: dict | None = None) -> dict:
    """`python -m honed.cli COMMAND CONFIG` from an empty `out` (a leftover run would resume), in a fresh process
    timed from outside, after waiting for a quiet machine: its wall time, the wait and the load before and after.
    RuntimeError with the output's tail when it fails."""
    shutil.rmtree(out, ignore_errors=True)
    waited = wait_for_quiet()
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "honed.cli", command, str(config)], cwd=ROOT,
                          env=bench_env(1) | (env or {}), capture_output=True, text=True, timeout=3600, check=False)
    wall = time.perf_counter() - start
    if done.returncode:
        raise RuntimeError(f"honed {command} failed ({done.returncode}): {(done.stdout + done.stderr)[-3000:]}")
    return {"wall_s": wall, "waited_for_quiet_s": waited,
            "loadavg_1min_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)]}


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RunningRay:
    """A Ray head of the benchmark's own (`ray start --head --block` in a session of its own, its own ports and
    temp dir: other Ray users of the machine are left alone), as a job submitted to a cluster finds it; `client_env`
    points a child process at it. Stopped by signalling its process group."""

    def __init__(self, num_cpus: int):
        self.temp_dir = tempfile.mkdtemp(prefix="rayb", dir="/tmp")  # Ray's socket paths must stay short
        self.gcs = free_port()
        ports = [f"--{flag}={free_port()}" for flag in ("dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                                         "metrics-export-port", "runtime-env-agent-port")]
        # `ray start` turns token auth on; its drivers then need RAY_AUTH_MODE=token too (`client_env`)
        self.env = {k: v for k, v in bench_env(1).items() if k != "RAY_ADDRESS"} | {"RAY_AUTH_MODE": "token"}
        self.log = open(Path(self.temp_dir) / "ray-start.log", "wb")
        self.proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", f"--port={self.gcs}",
             f"--num-cpus={num_cpus}", "--include-dashboard=false", "--disable-usage-stats",
             f"--temp-dir={self.temp_dir}", *ports],
            env=self.env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        self.address = f"127.0.0.1:{self.gcs}"
        self.client_env = {"RAY_ADDRESS": self.address, "RAY_AUTH_MODE": "token"}

    def wait(self, timeout_s: float = 120) -> None:
        """Until a driver connects and runs a task (the head's raylet then has its idle workers up)."""
        probe = "import ray; ray.init(); ray.get(ray.remote(lambda: 1).remote())"
        deadline = time.time() + timeout_s
        while subprocess.run([sys.executable, "-c", probe], env=self.env | self.client_env,
                             capture_output=True, timeout=timeout_s).returncode:
            if self.proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"ray start never answered: {Path(self.temp_dir, 'ray-start.log').read_text()[-2000:]}")
            time.sleep(2)

    def stop(self) -> None:
        import signal

        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=60)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.log.close()
        shutil.rmtree(self.temp_dir, ignore_errors=True)
