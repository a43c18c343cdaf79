"""Readers of a training run's own files, shared by the integration tests: the live log (progress.jsonl,
metrics.jsonl) and Ray Train's checkpoint-manager snapshot."""

import json
from pathlib import Path

try:
    from ray.train.v2._internal.constants import CHECKPOINT_MANAGER_SNAPSHOT_FILENAME
except ImportError:  # pragma: no cover - the name Ray 2.60 uses
    CHECKPOINT_MANAGER_SNAPSHOT_FILENAME = "checkpoint_manager_snapshot.json"


def read_jsonl(path: Path) -> list[dict]:
    """Complete lines only: the file may be mid-append."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return records


def logged_steps(records: list[dict]) -> list[int]:
    return [r["step"] for r in records if "event" not in r]


def registered_checkpoint_step(snapshot: Path) -> int:
    """The step of the latest checkpoint Ray Train's controller has registered (what a restart restores):
    a checkpoint a worker has written but the controller has not polled yet is lost with that worker."""
    try:
        latest = json.loads(snapshot.read_text()).get("latest_checkpoint_result")
    except (OSError, json.JSONDecodeError):  # absent, or being rewritten
        return 0
    return int(latest["metrics"]["step"]) if latest else 0
