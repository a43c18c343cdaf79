"""A one-worker training run in the calling process: how a Tune trial of one worker trains (honed.tune), so that
Tune can hand the same warm process to the next trial (`reuse_actors`) instead of every trial starting a Ray Train
controller and a worker that imports torch, transformers and peft again (~9-13 s a trial on 2 CPUs).

Ray Train's own local mode (`ScalingConfig(num_workers=0)`) cannot serve here: inside a Tune trial Ray refuses the
ray.train calls, and in Ray 2.60 that mode persists no checkpoint and runs no RunConfig callback. So the loop asks
honed.train.session, which a `Local` session answers here, and this module gives the run what Ray Train would:
  - a reported checkpoint is persisted to `storage_path/name/checkpoint_<n>` (a local path or a URI), keeping
    `num_to_keep` of them (the best by `score`, lowest first, and always the latest), listed in an index file;
  - the run resumes from the latest persisted one, so a rerun (or Tune's retry of an interrupted trial) goes on
    where the run stopped, as a Ray Train run does;
  - every report goes to `on_report(metrics, checkpoint)` (honed.tune forwards the validations to Tune), the
    role RunConfig callbacks play for a Ray Train run.
The training loop is the same function Ray Train workers run (honed.train.loop.train_loop_per_worker).
"""

from __future__ import annotations

import json
from collections.abc import Callable

from honed.storage import delete_dir, filesystem, is_file, is_uri, join, read_text, upload_dir, write_text
from honed.train.session import Local, local

INDEX_FILE = "honed_checkpoints.json"


class PersistedCheckpoints:
    """The run's checkpoints in `run_dir` (local or a URI): an index of {name, metrics} in the order written."""

    def __init__(self, run_dir: str, num_to_keep: int | None, score: str | None):
        self.run_dir, self.num_to_keep, self.score = run_dir, num_to_keep, score
        index = join(run_dir, INDEX_FILE)
        self.kept: list[dict] = json.loads(read_text(index))["checkpoints"] if is_file(index) else []

    def add(self, local_dir: str, metrics: dict) -> str:
        """Copy the reported checkpoint directory into the run dir, drop what `num_to_keep` no longer keeps; returns
        the persisted checkpoint's path."""
        number = int(self.kept[-1]["name"].rsplit("_", 1)[1]) + 1 if self.kept else 0
        name = f"checkpoint_{number:06d}"
        path = join(self.run_dir, name)
        delete_dir(path)  # a partial copy left by a crash before its index entry
        upload_dir(local_dir, path)
        self.kept.append({"name": name, "metrics": metrics})
        dropped = self.dropped()
        self.kept = [c for c in self.kept if c not in dropped]
        # the index first: a crash in between leaves a stray directory, never an entry without its files
        write_text(join(self.run_dir, INDEX_FILE), json.dumps({"checkpoints": self.kept}, indent=1, default=str))
        for entry in dropped:
            delete_dir(join(self.run_dir, entry["name"]))
        return path

    def dropped(self) -> list[dict]:
        """The entries beyond `num_to_keep`: the worst by `score` (lowest kept), never the latest."""
        if not self.num_to_keep or len(self.kept) <= self.num_to_keep:
            return []
        *older, latest = self.kept
        ranked = sorted(older, key=lambda c: c["metrics"].get(self.score, float("inf")) if self.score else 0)
        keep_older = ranked[:self.num_to_keep - 1] if self.score else older[len(older) - self.num_to_keep + 1:]
        return [c for c in older if c not in keep_older]

    def latest(self):
        """The latest persisted checkpoint as a ray.train.Checkpoint, or None."""
        from ray.train import Checkpoint

        if not self.kept:
            return None
        path = join(self.run_dir, self.kept[-1]["name"])
        if is_uri(path):
            fs, inner = filesystem(path)
            return Checkpoint(inner, filesystem=fs)
        return Checkpoint(path)


def run_in_process(train_func: Callable[[dict], None], config: dict, *, device, run_dir: str, num_to_keep: int | None,
                   score: str | None, on_report: Callable[[dict, object], None] | None = None,
                   datasets: dict | None = None):
    """Run `train_func(config)` here as the only worker of a run whose checkpoints live in `run_dir`, on `device`;
    returns a ray.train.Result like TorchTrainer.fit()'s (metrics of the last report, the latest checkpoint). A
    failure raises as it is."""
    from ray.train import Result

    checkpoints = PersistedCheckpoints(run_dir, num_to_keep, score)
    last: dict = {}

    def report(metrics: dict, checkpoint_dir: str | None) -> None:
        checkpoint = None
        if checkpoint_dir:
            checkpoints.add(checkpoint_dir, metrics)
            checkpoint = session.resume_from = checkpoints.latest()
        last["metrics"] = metrics
        if on_report:
            on_report(metrics, checkpoint)

    with local(Local(device=device, report=report, resume_from=checkpoints.latest(), datasets=datasets)) as session:
        train_func(config)
    return Result(metrics=last.get("metrics"), checkpoint=checkpoints.latest(), path=run_dir, error=None)
