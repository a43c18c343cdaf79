"""The fixed cost of a training job, and what cut it: the capped validation set read once by the driver (local
path and a real S3-compatible server), cut into global batches in the worker, a small train set read inline,
the Ray Train callbacks a run has no use for left out, and the run's `phases`."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from s3_server import BUCKET, moto_s3

MANIFEST = {"counts": {"by_source": {"kjv": {"val": 3}, "icd10": {"val": 4}, "probe_free": {"val": 0}}}}


def write_val_shards(directory) -> None:
    """Two Parquet files whose rows interleave the sources, token lists of varying length."""
    rows = [{"source": "icd10" if i % 3 else "kjv", "input_ids": list(range(i + 2)),
             "labels": [-100] + list(range(i + 1)), "num_tokens": i + 2} for i in range(7)]
    for part, chunk in enumerate((rows[:4], rows[4:])):
        pq.write_table(pa.Table.from_pylist(chunk), f"{directory}/val-{part}.parquet")


def check_capped(rows: dict) -> None:
    # each source's first rows in file order (kjv: 2 and 5 tokens, icd10: 3 and 4), then longest first: a
    # validation batch pads to its longest row
    assert [len(x) for x in rows["input_ids"]] == [5, 4, 3, 2]
    assert list(rows["source"]) == ["kjv", "icd10", "icd10", "kjv"]
    assert rows["input_ids"].dtype == object and isinstance(rows["input_ids"][0], np.ndarray)  # as Ray Data's batches
    assert list(rows["num_tokens"]) == [5, 4, 3, 2]


def test_validation_rows_take_the_first_rows_of_each_source(tmp_path):
    from honed.train.trainer import validation_rows

    write_val_shards(tmp_path)
    check_capped(validation_rows(tmp_path, MANIFEST, 2))
    assert len(validation_rows(tmp_path, MANIFEST, 100)["source"]) == 7


def test_validation_rows_read_from_object_storage(tmp_path):
    from honed.storage import upload_dir
    from honed.train.trainer import validation_rows

    write_val_shards(tmp_path)
    with moto_s3():
        uri = upload_dir(tmp_path, f"s3://{BUCKET}/data/shards/val")
        check_capped(validation_rows(uri, MANIFEST, 2))


def test_global_batches_cover_the_set_in_order():
    from honed.train.validation import global_batches

    rows = {"source": np.array(list("abcdefg")), "num_tokens": np.arange(7)}
    batches = list(global_batches(rows, 3))
    assert [list(b["source"]) for b in batches] == [["a", "b", "c"], ["d", "e", "f"], ["g"]]


def test_job_phases_split_the_run_into_its_parts():
    from honed.train.trainer import format_phases, job_phases

    marks = {"start": 100.0, "fit": 101.0, "fitted": 150.0, "exported": 152.0, "reported": 153.0, "done": 153.5}
    worker = {"started_at": 105.0, "finished_at": 147.0, "worker_setup_s": 4.0, "worker_setup.model_s": 2.5,
              "first_batch_s": 3.0, "training_steps_s": 30.0, "validation_s": 4.5}
    phases = job_phases(marks, worker)
    assert "worker_setup.model_s" not in phases  # a part of worker_setup_s, not a stretch of its own
    assert phases["workers_start_s"] == 4.0 and phases["final_checkpoint_s"] == 3.0
    assert phases["export_s"] == 2.0 and phases["report_s"] == 1.0 and phases["after_report_s"] == 0.5
    assert phases["train_s"] == 53.5 and phases["fixed_s"] == 23.5  # all but the training steps
    line = format_phases(phases, {"model_s": 2.5})
    assert "fixed cost 23.5 s" in line and "validation 4.5" in line and "worker setup 4.0 (model 2.5)" in line


def test_worker_phases_add_up_by_name():
    from honed.train.loop import Phases

    phases = Phases()
    phases.add("validation", 1.5)
    with phases.timed("validation"):
        pass
    phases.add("checkpoints", 2.0)
    report = phases.report()
    assert 1.5 <= report["validation_s"] < 1.6 and report["checkpoints_s"] == 2.0
    assert report["finished_at"] >= report["started_at"]


@pytest.mark.parametrize("cap", [0, -1])
def test_val_max_examples_must_be_positive(cap):
    from pydantic import ValidationError

    from honed.config import TrainConfig

    with pytest.raises(ValidationError, match="val_max_examples"):
        TrainConfig.model_validate({"val_max_examples": cap})


def test_a_small_train_set_is_read_whole_in_ray_datas_order(tmp_path):
    from honed.train.plan import RunPlan
    from honed.train.loop import InlineStream
    from honed.train.trainer import inline_train_rows

    for part in (1, 0):  # written out of order: read back by sorted path, as Ray Data streams them
        rows = [{"source": "icd10", "input_ids": list(range(i + 1)), "num_tokens": i + 1}
                for i in range(4 * part, 4 * part + 4)]
        pq.write_table(pa.Table.from_pylist(rows), tmp_path / f"train-0000{part}.parquet")
    size_mb = sum(f.stat().st_size for f in tmp_path.iterdir()) / 2**20
    assert inline_train_rows(tmp_path, size_mb * 0.99) is None  # over the limit: Ray Data streams it
    table = inline_train_rows(tmp_path, size_mb)
    plan = RunPlan(model="m", model_revision=None, total_steps=1, steps_per_epoch=1, micro_batches_per_epoch=1,
                   global_micro_batch=3, val_batch_size=1, validate_at_checkpoints=False, domain_sources=("icd10",),
                   packed=False, train_rows=8, live_log="", storage_path=str(tmp_path))
    batches = list(InlineStream(table, plan).epoch())
    assert [list(b["num_tokens"]) for b in batches] == [[1, 2, 3], [4, 5, 6]]  # the short last batch dropped
    assert batches[0]["input_ids"].dtype == object and list(batches[1]["input_ids"][2]) == list(range(6))


@pytest.mark.parametrize("streams_data, sole_run, left_out", [
    (True, False, set()), (False, False, {"DatasetsCallback"}), (True, True, {"PlacementGroupCleanerCallback"}),
    (False, True, {"DatasetsCallback", "PlacementGroupCleanerCallback"})])
def test_a_run_leaves_out_only_the_ray_train_callbacks_it_has_no_use_for(streams_data, sole_run, left_out):
    """Ray Train V2 builds its datasets callback (a DatasetManager actor, Ray Data's context sent to every worker)
    and its placement-group cleaner (a detached actor) for every run. A run whose train set the driver hands over
    inline gets a trainer without the first; a run whose driver ends with it (`honed train`) without the second.
    Every other callback stays, in its order. A Ray that moved either callback fails the import here."""
    from ray.train import ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
    from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback

    from honed.train.trainer import trainer_class

    def callbacks(cls) -> list[type]:
        trainer = cls(lambda config: None, scaling_config=ScalingConfig(num_workers=2))
        return [type(c) for c in trainer._create_default_callbacks()]

    stock = callbacks(TorchTrainer)
    assert {DatasetsCallback, PlacementGroupCleanerCallback} <= set(stock)
    lean = trainer_class(streams_data=streams_data, sole_run=sole_run)
    assert issubclass(lean, TorchTrainer) and trainer_class(streams_data=streams_data, sole_run=sole_run) is lean
    assert (lean is TorchTrainer) == (not left_out)
    assert callbacks(lean) == [c for c in stock if c.__name__ not in left_out]


def test_workers_take_the_pad_id_prepare_recorded_for_the_same_model_only():
    from honed.config import TrainConfig
    from honed.train.plan import recorded_pad_id

    cfg = TrainConfig.model_validate({"model": {"name_or_path": "smollm2-135m-instruct"}})
    manifest = {"model": {"name_or_path": "smollm2-135m-instruct", "pad_token_id": 2}}
    assert recorded_pad_id(cfg, manifest) == 2
    assert recorded_pad_id(cfg, {"model": {"name_or_path": "other-model", "pad_token_id": 2}}) is None
    assert recorded_pad_id(cfg, {"model": {"name_or_path": "smollm2-135m-instruct"}}) is None  # an older manifest
