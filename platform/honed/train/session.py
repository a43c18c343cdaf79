"""The run a training function is in, as honed's loop asks about it: its rank and world, its device, the train
stream, the checkpoint to resume from, and where reports go.

In a Ray Train worker every answer comes from ray.train. In a run this process holds itself (honed.train.in_process:
a Tune trial's one worker, in the trial's own process) they come from the `Local` session set around it: inside a
Tune trial Ray refuses ray.train's calls ("deprecated when running in a function passed to Ray Tune"), so the loop
asks here and never calls ray.train directly.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class Local:
    """The only worker of a run in this process: `report(metrics, checkpoint_dir)` persists and passes on what the
    loop reports; `resume_from` is the checkpoint (a ray.train.Checkpoint) the run starts from, or None."""

    device: torch.device
    report: Callable[[dict, str | None], None]
    resume_from: object = None
    datasets: dict | None = None


_local: Local | None = None


@contextlib.contextmanager
def local(session: Local):
    """Answer the loop's questions from `session` while the block runs."""
    global _local
    _local = session
    try:
        yield session
    finally:
        _local = None


def in_ray_train_worker() -> bool:
    """Whether the loop's answers come from Ray Train: this process runs a Ray Train training function and no
    `Local` session is set. A Train worker has imported ray.train long before it asks; a process that never
    imported it (the GPU check script, where Ray is not installed) is not one, and Ray is not imported to find
    that out."""
    if _local is not None or "ray.train" not in sys.modules:
        return False
    import ray.train

    try:
        ray.train.get_context()
    except RuntimeError:  # "cannot be used outside of a Ray Train training function"
        return False
    return True


def rank_and_world() -> tuple[int, int]:
    if _local:
        return 0, 1
    import ray.train

    ctx = ray.train.get_context()
    return ctx.get_world_rank(), ctx.get_world_size()


def device() -> torch.device:
    if _local:
        return _local.device
    import ray.train.torch

    return ray.train.torch.get_device()


def dataset_shard(name: str):
    if _local:
        return _local.datasets[name]
    import ray.train

    return ray.train.get_dataset_shard(name)


def checkpoint():
    """The checkpoint this run resumes from (after a failure, or a rerun of the same run), or None."""
    if _local:
        return _local.resume_from
    import ray.train

    return ray.train.get_checkpoint()


def report(metrics: dict, checkpoint_dir: str | None = None) -> None:
    """Report `metrics`, with the checkpoint written in the local directory `checkpoint_dir` (copied away before
    this returns). In Ray Train every worker reports: it is a barrier."""
    if _local:
        _local.report(metrics, checkpoint_dir)
        return
    import ray.train

    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir
                     else None)
