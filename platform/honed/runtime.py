"""Connecting to Ray: local by default, a cluster with `--address` or `RAY_ADDRESS`, and the driver of a
`ray job submit` attaches to its cluster on its own."""

from __future__ import annotations

import os


def init_ray(address: str | None = None) -> None:
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    # Local runs keep their logs quiet; worker prints (training progress) still reach the driver.
    ray.init(address=address, log_to_driver=True, configure_logging=True, logging_level="WARNING")
    _quiet_data_logs()
    _data_stats_on_driver_node()


def _data_stats_on_driver_node() -> None:
    """Ray Data's stats actor is detached and pinned to the node of whoever creates it first. Left to Ray Train,
    that is a worker's node, which an autoscaler may have added for the run and then can never remove (seen on
    the fake multi-node cluster). Created here, it lives on the driver's node. Best effort: the function is
    internal to Ray Data."""
    try:
        from ray.data._internal.stats import get_or_create_stats_actor
    except ImportError:
        return
    get_or_create_stats_actor()


def _quiet_data_logs() -> None:
    import sys

    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.print_on_execution_start = False
    # Off a terminal (CI, `ray job submit` logs) Ray Data's progress bars become a line per update;
    # honed prints its own stage and step progress instead.
    ctx.enable_progress_bars = sys.stdout.isatty()


def run_task(fn, *args, num_cpus: float = 1, num_gpus: float = 0, **kwargs):
    """Run `fn` as a Ray task (on the cluster when connected to one, on a GPU node with `num_gpus`) and wait for
    its result."""
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    # Never inside the caller's placement group: a Tune trial captures its child tasks into its own group, whose
    # bundles hold only the trial driver's share (the export check after a trial's fit could never be placed).
    outside = PlacementGroupSchedulingStrategy(placement_group=None)
    task = ray.remote(num_cpus=num_cpus, num_gpus=num_gpus, scheduling_strategy=outside)(fn)
    return ray.get(task.remote(*args, **kwargs))


def task_device(use_gpu: bool):
    """The device a task runs on: the GPU Ray gave it (`num_gpus=1`), else the CPU."""
    import torch

    if use_gpu and not torch.cuda.is_available():
        raise RuntimeError("use_gpu is set but this task sees no CUDA device (CUDA_VISIBLE_DEVICES="
                           f"{os.environ.get('CUDA_VISIBLE_DEVICES')!r}); does the cluster have GPU nodes?")
    return torch.device("cuda" if use_gpu else "cpu")


def cpu_model() -> str:
    """This machine's CPU model (/proc/cpuinfo's "model name", else what `platform` knows): what a measured CPU
    figure holds for."""
    import platform
    from pathlib import Path

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"
