"""honed.train.in_process.PersistedCheckpoints: which checkpoints a run in one process keeps (Ray Train's
CheckpointConfig semantics: `num_to_keep`, the best by a score when one is given, always the latest) and that the
index survives a new process (what a resumed run reads)."""

from __future__ import annotations

import pytest

from honed.train.in_process import PersistedCheckpoints


def add(kept: PersistedCheckpoints, src, step: int, loss: float | None = None) -> str:
    d = src / f"c{step}"
    d.mkdir()
    (d / "state.txt").write_text(str(step))
    return kept.add(str(d), {"step": step} | ({"val_loss": loss} if loss is not None else {}))


@pytest.mark.parametrize("score, losses, kept_steps", [
    (None, [3.0, 1.0, 2.0, 4.0], [3, 4]),          # the latest two
    ("val_loss", [3.0, 1.0, 2.0, 4.0], [2, 4]),    # the best (step 2) and the latest
    ("val_loss", [3.0, 1.0, 0.5, 4.0], [3, 4]),    # a better one replaces the best
    ("val_loss", [None, 1.0, None, None], [2, 4]),  # reports without the score are dropped first
])
def test_keeps_the_best_and_the_latest(tmp_path, score, losses, kept_steps):
    run = tmp_path / "run"
    kept = PersistedCheckpoints(str(run), 2, score)
    for step, loss in enumerate(losses, start=1):
        add(kept, tmp_path, step, loss)
    assert [c["metrics"]["step"] for c in kept.kept] == kept_steps
    assert sorted(p.name for p in run.glob("checkpoint_*")) == [c["name"] for c in kept.kept]
    assert (run / kept.kept[-1]["name"] / "state.txt").read_text() == str(len(losses))


def test_a_new_process_resumes_from_the_latest_and_numbers_on(tmp_path):
    run = tmp_path / "run"
    first = PersistedCheckpoints(str(run), 3, None)
    assert first.latest() is None
    add(first, tmp_path, 1)
    add(first, tmp_path, 2)
    again = PersistedCheckpoints(str(run), 3, None)
    assert again.latest().path == str(run / "checkpoint_000001")
    assert add(again, tmp_path, 3) == str(run / "checkpoint_000002")
    assert [c["name"] for c in PersistedCheckpoints(str(run), 3, None).kept] == [
        "checkpoint_000000", "checkpoint_000001", "checkpoint_000002"]
