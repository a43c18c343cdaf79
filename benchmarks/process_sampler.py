"""The memory and CPU time of a measured process tree, sampled from outside while it runs.

    sampler = ProcSampler(proc.pid, needle="RayTrainWorker")   # a thread samples every 0.25 s
    proc.wait(); sampler.stop()
    sampler.summary()                                           # peak RSS, a ~60-point RSS curve
    cpu_between(sampler.samples, t0, t1)                        # CPU seconds used between two wall-clock times

Throughput per CPU-second is what other load on a shared machine disturbs least, so the benchmarks state it
beside wall-clock rates.
"""

from __future__ import annotations

import itertools
import threading
import time
from pathlib import Path

import psutil


class ProcSampler:
    """Samples, every `every` s, the descendants of `pid`: RSS and CPU time (user + system) of the processes
    whose command line holds `needle`, and the CPU time of all of them."""

    def __init__(self, pid: int, needle: str, every: float = 0.25):
        self.root, self.needle, self.every = psutil.Process(pid), needle, every
        # (time.time(), rss MiB of the matches, their cpu s, cpu s of the tree, {process label: cpu s},
        #  minor page faults of the matches)
        self.samples: list[tuple] = []
        self.pids: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                procs = [self.root, *self.root.children(recursive=True)]
            except psutil.Error:
                procs = []
            if procs:
                self.samples.append(self._sample(procs))
            self._stop.wait(self.every)

    def _sample(self, procs: list) -> tuple:
        rss = cpu = tree = 0.0
        faults = 0
        matched = False
        by_name: dict[str, float] = {}
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
        return time.time(), round(rss, 1) if matched else 0.0, round(cpu, 3), round(tree, 3), by_name, faults

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


def minor_faults(pid: int) -> int:
    """Minor page faults of a process so far (/proc/PID/stat field 10): fresh pages the kernel had to map
    (and zero), e.g. when freed memory went back to the OS and is allocated again."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[7])
    except (OSError, IndexError, ValueError):
        return 0


def process_label(cmdline: list[str]) -> str:
    """A short name for a process of a benchmark's tree: Ray's process title (`ray::TrainController...`),
    a Ray binary (raylet, gcs_server), or the Python script it runs with its first word argument (a measured
    run's `train_loops.py honed`)."""
    if not cmdline:
        return "?"
    first = cmdline[0]
    if first.startswith("ray::"):
        return first.split()[0].split(".")[0]
    base = Path(first).name
    if not base.startswith("python"):
        return base
    at = next((i for i, a in enumerate(cmdline[1:], start=1) if a.endswith(".py")), None)
    if at is None:
        return base
    script = Path(cmdline[at]).name
    word = cmdline[at + 1] if at + 1 < len(cmdline) and not cmdline[at + 1].startswith("-") else ""
    return f"{script} {word}".strip()


def cpu_between(samples: list, t0: float, t1: float) -> dict | None:
    """CPU seconds used by the matched processes and by the whole tree between wall-clock times t0 and t1
    (linear interpolation between samples), their minor page faults and the CPU seconds of each process."""
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
    by_name = {k: round(v - first[4].get(k, 0.0), 2) for k, v in last[4].items()}
    return {"worker_minor_faults": last[5] - first[5],
            "worker_cpu_s": round(at(t1, 2) - at(t0, 2), 3), "tree_cpu_s": round(at(t1, 3) - at(t0, 3), 3),
            "cpu_s_by_process (nearest samples inside the window)":
                dict(sorted(((k, v) for k, v in by_name.items() if v >= 0.05), key=lambda kv: -kv[1]))}
