"""`honed train`: a prepared dataset → Ray Train `TorchTrainer` → an adapter (or a full model) with metadata.

    honed train jobs/train_lora.yaml optim.lr=1e-3 scaling.num_workers=2

Writes `output_dir/`: adapter/ (PEFT safetensors + honed.json) for lora/qlora/prefix/ia3 or model/ (a full HF
model + honed.json) for full fine-tuning, metrics.jsonl, efficiency.json (with `phases`: where the job's time
went, also printed), progress.jsonl (the live log), train.yaml, report.md with plots/ and tensorboard/
(honed.report); Ray Train's checkpoints live under `storage_path` (default `output_dir/checkpoints`). Rerunning
the same command with the same `name` and `storage_path` resumes from the latest checkpoint. With
`register: {name: icd10-lora}` the adapter is also added to the adapter registry (honed.registry) as icd10-lora@N.

`data_dir`, `output_dir`, `storage_path` and the registry may be object-storage URIs (s3://...) and the model
any reference honed.models resolves: workers read the shards from storage and resolve the model on their own
node, the driver exports into a local staging dir and uploads it (honed.storage.staged); no shared disk needed.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from honed.artifacts import (
    EFFICIENCY_FILE, METRICS_FILE, PROBE_FILE, RUN_CONFIG, manifest_sha256, read_efficiency, read_manifest,
    write_efficiency, write_meta,
)
from honed.config import TrainConfig, dump_config
from honed.models import weights_hash
from honed.report import preload as preload_report, write_train_report
from honed.runtime import run_task, task_device
from honed.storage import absolute, filesystem, is_uri, join, staged, upload_dir
from honed.train.backends import artifact_name
from honed.train.loop import train_loop_per_worker
from honed.train.checkpointing import export_check
from honed.train.collate import numpy_batch
from honed.train.plan import RunPlan, plan_run

# Shard reads are light (tokenized Parquet): a quarter CPU each, so nodes whose CPUs the training workers
# mostly hold can still stream them (a 1-CPU read task would wait forever next to two 0.5-CPU workers).
READ_ARGS = {"num_cpus": 0.25}
HEALTH_CHECK_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
PREEMPTION_WATCHER_ENV = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "generation_config.json")


def train(cfg: TrainConfig, callbacks: list | None = None, plan: RunPlan | None = None,
          in_process: bool = False, on_report=None, sole_run: bool = False) -> dict:
    """Fit on the connected Ray cluster; returns the final metrics (with `efficiency` and `export_check`).
    `callbacks` go to the TorchTrainer's RunConfig (honed.tune passes Ray's TuneReportCallback); `plan`: the
    run's plan when a preflight (`honed train`) already made it, else it is planned here. `in_process`: a
    one-worker run trains in this process (honed.train.in_process; a Tune trial's), every report going to
    `on_report(metrics, checkpoint)` instead of `callbacks`. `sole_run`: the driver ends when the run does (the
    `honed train` command), so Ray frees the run's resources with the job (`unneeded_callbacks`)."""
    from ray.data import ExecutionOptions
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig

    marks = {"start": time.time()}
    manifest = read_manifest(cfg.data_dir)
    plan = plan or plan_run(cfg, manifest)
    shards = join(absolute(cfg.data_dir), "shards")
    val_rows = validation_rows(join(shards, "val"), manifest, cfg.val_max_examples)
    inline = inline_train_rows(join(shards, "train"), cfg.inline_data_mb) if cfg.inline_data_mb else None
    loop_config = {"cfg": cfg, "plan": plan, "val_rows": val_rows, "train_rows": inline}
    if in_process:
        return train_here(cfg, manifest, plan, loop_config, on_report, marks)
    resources = {"CPU": cfg.scaling.cpus_per_worker} | ({"GPU": 1} if cfg.scaling.use_gpu else {})
    trainer = trainer_class(streams_data=inline is None, sole_run=sole_run)(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=cfg.scaling.num_workers, use_gpu=cfg.scaling.use_gpu,
                                     resources_per_worker=resources,
                                     placement_strategy=cfg.scaling.placement_strategy),
        datasets=None if inline is not None else datasets(cfg),
        # Not split: every worker reads the same ordered stream and takes its slice of each global batch
        # (honed.train.loop), which makes steps independent of reader timing and resume exact.
        dataset_config=DataConfig(datasets_to_split=[], execution_options=ExecutionOptions(preserve_order=True)),
        run_config=RunConfig(
            name=cfg.name, storage_path=plan.storage_path,
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints,
                                               checkpoint_score_attribute=cfg.checkpoint_metric,
                                               checkpoint_score_order="min"),
            failure_config=FailureConfig(max_failures=cfg.scaling.max_failures), callbacks=callbacks),
    )
    print(f"[honed.train] {cfg.method.name}{deepspeed_label(cfg)}: {plan.total_steps} steps on "
          f"{cfg.scaling.num_workers} workers ({plan.steps_per_epoch} per epoch); train set "
          f"{'read by the driver' if inline is not None else 'streamed by Ray Data'}", flush=True)
    # Ray Train's controller looks at its workers every 2 s by default, so a finished run waited ~2 s to be
    # noticed (final_checkpoint 4.8 → 2.0 s on the demo job); a poll is one tiny actor call per worker.
    os.environ.setdefault(HEALTH_CHECK_ENV, "0.5")  # propagated to the controller by fit()
    # Ray Train's preemption watcher (an actor per run, a fresh process started beside the workers' set-up) only
    # marks drained nodes for `ray.train.get_preemption_info`, which honed does not read: a restart after a lost
    # node is Ray Train's failure handling (scaling.max_failures) either way. Set the variable to 1 to keep it.
    os.environ.setdefault(PREEMPTION_WATCHER_ENV, "0")
    # The driver waits through fit(); its report's imports run meanwhile instead of after the workers are done
    threading.Thread(target=preload_report, daemon=True, name="honed-report-imports").start()
    marks["fit"] = time.time()
    result = trainer.fit()
    marks["fitted"] = time.time()
    return finish(cfg, manifest, plan, result, marks)


@functools.cache
def trainer_class(streams_data: bool, sole_run: bool = False) -> type:
    """Ray Train's `TorchTrainer`, less the default callbacks that cost this run start-up time and serve it nothing
    (`unneeded_callbacks`); the stock trainer where there are none."""
    from ray.train.torch import TorchTrainer

    unneeded = unneeded_callbacks(streams_data, sole_run)
    if not unneeded or not hasattr(TorchTrainer, "_create_default_callbacks"):
        return TorchTrainer

    class LeanTorchTrainer(TorchTrainer):
        def _create_default_callbacks(self):
            return [c for c in super()._create_default_callbacks() if not isinstance(c, unneeded)]

    return LeanTorchTrainer


def unneeded_callbacks(streams_data: bool, sole_run: bool) -> tuple[type, ...]:
    """The Ray Train V2 default callbacks a run can do without; each starts a process of its own for every run.

    - The datasets callback, for a run without Ray Datasets (`streams_data` False: the driver read the train set
      and hands it to the workers inline, as `inline_data_mb` allows). It starts a DatasetManager actor (a fresh
      process importing Ray Train and Ray Data) and sends every worker Ray Data's context (a `ray.data` import
      each), datasets or not, to serve `ray.train.get_dataset_shard`, which such a run never calls. Demo job on
      2 CPUs: fixed cost 32.34 → 28.95 s (medians of 4 alternating pairs of 2-step jobs on one running Ray).
    - The placement-group cleaner, for a run whose driver ends with it (`sole_run`: the `honed train` command,
      alone or as a `ray job submit` entrypoint). The cleaner is a detached actor that frees the workers' group
      if the controller dies while its driver lives on (a Tune sweep, a notebook). The controller waits for its
      process to start before the workers train, it asks the dashboard every second whether the controller
      lives, and the shutdown waits for it to stop. When the command's controller dies, `fit()` raises, the
      command exits and Ray frees the group with the job (tests/integration/test_train_resilience.py).
      31.4 → 28.9 s, measured as above on top of the first.

    A callback this Ray does not have where honed looks for it (Ray Train V1, a callback moved or renamed) stays."""
    unneeded = []
    if not streams_data:
        with contextlib.suppress(ImportError):
            from ray.train.v2._internal.callbacks.datasets import DatasetsCallback

            unneeded.append(DatasetsCallback)
    if sole_run:
        with contextlib.suppress(ImportError):
            from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback

            unneeded.append(PlacementGroupCleanerCallback)
    return tuple(unneeded)


def train_here(cfg: TrainConfig, manifest: dict, plan: RunPlan, loop_config: dict, on_report, marks: dict) -> dict:
    """The run as the only worker in this process (honed.train.in_process): what a Tune trial of one worker does,
    in the trial's own process, which Tune reuses for the next trial."""
    from honed.train.in_process import run_in_process

    if cfg.scaling.num_workers != 1:
        raise ValueError(f"a run in this process has one worker; scaling.num_workers is {cfg.scaling.num_workers}")
    train_set = None
    if loop_config["train_rows"] is None:  # streamed by Ray Data here, in the order a Ray Train worker reads it
        train_set = datasets(cfg)["train"]
        train_set.context.execution_options.preserve_order = True
    print(f"[honed.train] {cfg.method.name}: {plan.total_steps} steps in this process (one worker)", flush=True)
    marks["fit"] = time.time()
    result = run_in_process(train_loop_per_worker, loop_config, device=task_device(cfg.scaling.use_gpu),
                            run_dir=join(plan.storage_path, cfg.name), num_to_keep=cfg.keep_checkpoints,
                            score=cfg.checkpoint_metric, on_report=on_report,
                            datasets=None if train_set is None else {"train": train_set.iterator()})
    marks["fitted"] = time.time()
    return finish(cfg, manifest, plan, result, marks)


def finish(cfg: TrainConfig, manifest: dict, plan: RunPlan, result, marks: dict) -> dict:
    """Export the fitted run's artifact, write its report, register it (`register`), record where the time went."""
    with staged(cfg.output_dir) as out:  # output_dir itself, or a local dir uploaded to its URI at the end
        metrics = export_result(result, cfg, manifest, plan, out)
        marks["exported"] = time.time()
        metrics["report"] = join(cfg.output_dir, write_train_report(out).name)
        marks["reported"] = time.time()
        if cfg.register:  # PEFT methods only (the config refuses `register` with method full)
            metrics["registered"] = register_adapter(cfg, out / "adapter")
        record_phases(out, metrics, marks)
    return metrics


def record_phases(out: Path, metrics: dict, marks: dict) -> None:
    """Where `train()`'s wall time went (`job_phases`), added to the run's efficiency.json (and `metrics`) as
    `phases` and printed: the fixed cost is everything but the training steps."""
    efficiency = metrics.get("efficiency")
    if not efficiency or "worker_phases" not in efficiency:
        return
    marks["done"] = time.time()
    worker = efficiency.pop("worker_phases")
    if worker["started_at"] < marks["start"]:  # a rerun of a finished run: these are the earlier run's workers
        write_efficiency(out, efficiency)
        print("[honed.train] the run had finished: nothing trained, its artifact exported again", flush=True)
        return
    efficiency["phases"] = job_phases(marks, worker)
    # the worker set-up's parts (tokenizer, model, backend, peak_flops, restore): inside worker_setup_s
    efficiency["worker_setup_parts"] = {k.split(".", 1)[1]: v for k, v in worker.items() if "." in k}
    write_efficiency(out, efficiency)
    print(f"[honed.train] {format_phases(efficiency['phases'], efficiency['worker_setup_parts'])}", flush=True)


def job_phases(marks: dict, worker: dict) -> dict:
    """Seconds of `train()` by phase, from the driver's `marks` (wall-clock times: start, fit, fitted, exported,
    reported, done) and rank 0's `worker` phases (honed.train.loop.Phases.report); `fixed_s` is all but
    `training_steps_s`. Worker and driver share a clock on one node; on a cluster `workers_start_s` and
    `final_checkpoint_s` carry the nodes' clock offset."""
    parts = {"plan_and_val_read_s": marks["fit"] - marks["start"],
             "workers_start_s": worker["started_at"] - marks["fit"],
             **{k: v for k, v in worker.items() if k.endswith("_s") and "." not in k},
             "final_checkpoint_s": marks["fitted"] - worker["finished_at"],
             "export_s": marks["exported"] - marks["fitted"], "report_s": marks["reported"] - marks["exported"],
             "after_report_s": marks["done"] - marks["reported"]}
    total = marks["done"] - marks["start"]
    return {k: round(v, 2) for k, v in parts.items()} | {
        "train_s": round(total, 2), "fixed_s": round(total - worker["training_steps_s"], 2)}


def format_phases(phases: dict, setup_parts: dict | None = None) -> str:
    def named(items) -> str:
        return ", ".join(f"{k.removesuffix('_s').replace('_', ' ')} {v:.1f}" for k, v in items)

    parts = named((k, v) for k, v in phases.items() if k not in ("train_s", "fixed_s"))
    if setup_parts:
        parts = parts.replace(f"worker setup {phases['worker_setup_s']:.1f}",
                              f"worker setup {phases['worker_setup_s']:.1f} ({named(setup_parts.items())})", 1)
    return f"{phases['train_s']:.1f} s in train(), fixed cost {phases['fixed_s']:.1f} s (seconds: {parts})"


def datasets(cfg: TrainConfig) -> dict:
    import ray.data

    shards = join(absolute(cfg.data_dir), "shards")  # read by Ray Data tasks on any node: local path or URI
    return {"train": ray.data.read_parquet(join(shards, "train"), **READ_ARGS)}


def register_adapter(cfg: TrainConfig, adapter: Path) -> str:
    """Add the exported adapter (its local copy `adapter`) to `cfg.register.registry` as the next version of
    `cfg.register.name`."""
    from honed.registry import Registry

    ref = Registry(cfg.register.registry).add(cfg.register.name, str(adapter))
    print(f"[honed.train] registered {ref} in {cfg.register.registry}", flush=True)
    return ref


def deepspeed_label(cfg: TrainConfig) -> str:
    ds = cfg.method.deepspeed
    if not ds.enabled:
        return ""
    offload = [name for name, on in (("optimizer", ds.offload_optimizer), ("params", ds.offload_params)) if on]
    return f" + DeepSpeed ZeRO-{ds.zero_stage}" + (f" (offload {', '.join(offload)})" if offload else "")


def validation_rows(path: str | Path, manifest: dict, per_source: int) -> dict[str, np.ndarray]:
    """The first `per_source` rows of each source's validation set (so every source keeps its voice), longest
    first, as numpy columns like a Ray Data batch. Read here once with pyarrow
    and handed to the workers: the capped set is small, and a Ray Data execution per worker cost ~9 s."""
    import pyarrow.compute as pc
    import pyarrow.dataset as pads

    fs, root = filesystem(path) if is_uri(path) else (None, str(path))
    val = pads.dataset(root, format="parquet", filesystem=fs)
    sources = [name for name, c in manifest["counts"]["by_source"].items() if c["val"]]
    table = pa.concat_tables([val.filter(pc.field("source") == name).head(per_source) for name in sources])
    if "input_ids" in table.column_names:  # longest first: a validation batch pads to its longest row (-15 %)
        table = table.take(pc.sort_indices(pc.list_value_length(table["input_ids"]), sort_keys=[("", "descending")]))
    return numpy_batch(table)


def inline_train_rows(path: str | Path, limit_mb: float) -> pa.Table | None:
    """The train shards as one table, files in the order Ray Data streams them (sorted paths), when they hold at
    most `limit_mb` MB on disk (`inline_data_mb`); None for a larger set, which Ray Data streams."""
    import pyarrow.dataset as pads
    import pyarrow.fs as pafs

    fs, root = filesystem(path) if is_uri(path) else (pafs.LocalFileSystem(), str(path))
    files = sorted((f for f in fs.get_file_info(pafs.FileSelector(root, recursive=True))
                    if f.type == pafs.FileType.File and f.path.endswith(".parquet")), key=lambda f: f.path)
    if not files or sum(f.size for f in files) > limit_mb * 2**20:
        return None
    return pads.dataset([f.path for f in files], format="parquet", filesystem=fs).to_table()


def export_result(result, cfg: TrainConfig, manifest: dict, plan: RunPlan, out: Path) -> dict:
    """Copy the final artifact, metrics and efficiency report out of Ray Train storage into `out` (the local
    output dir or its staging copy), describe the artifact in honed.json, and check that it reloads to the logits the
    trained model gave: rank 0 checked an adapter before its last report (honed.train.checkpointing), a full
    model is checked here by a Ray task on a node that holds the base model."""
    if result.error:
        raise result.error
    name = artifact_name(cfg.method)
    artifact = out / name
    shutil.rmtree(artifact, ignore_errors=True)
    with result.checkpoint.as_directory() as ckpt:
        shutil.copytree(Path(ckpt) / name, artifact)
        for f in (METRICS_FILE, EFFICIENCY_FILE):
            shutil.copy(Path(ckpt) / f, out / f)
        probe = torch.load(Path(ckpt) / PROBE_FILE, weights_only=False)
    if name == "model":  # a complete HF model directory: tokenizer and chat template travel with it
        for f, data in run_task(model_files, plan, TOKENIZER_FILES, num_cpus=0.1).items():
            if not (artifact / f).exists():
                (artifact / f).write_bytes(data)
    # The check task may run on another node: it reads the artifact where that node can see it.
    reachable = upload_dir(artifact, join(cfg.output_dir, name)) if is_uri(cfg.output_dir) else str(artifact)
    if "check" in probe:  # checked by rank 0 on the exported files before it reported the final checkpoint
        check, base_sha = probe["check"], probe["base_weights_sha256"]
    else:
        check, base_sha = run_task(verify_export, cfg, plan, reachable, probe,
                                   num_cpus=cfg.scaling.cpus_per_worker, num_gpus=1 if cfg.scaling.use_gpu else 0)
    refuse_mismatch(check, join(cfg.output_dir, name))
    metrics = dict(result.metrics or {}) | {"efficiency": read_efficiency(out), "export_check": check}
    write_meta(artifact, {
        "base_model": cfg.model.name_or_path,
        "base_weights_sha256": base_sha,
        "method": cfg.method.model_dump(),
        "template": manifest["template"],
        "data_manifest_sha256": manifest_sha256(cfg.data_dir),
        "final_metrics": result.metrics,
        "export_check": check,
        "checkpoint": result.checkpoint.path,
    })
    (out / RUN_CONFIG).write_text(dump_config(cfg))
    print(f"[honed.train] exported {join(cfg.output_dir, name)} (reloaded logits match the trained model within "
          f"{check['max_abs_diff']:.2e})", flush=True)
    return metrics


def model_files(plan: RunPlan, names: tuple[str, ...]) -> dict[str, bytes]:
    """A Ray task: the named files of the base model (those it has), read on a node that resolves it."""
    base = Path(plan.model_path)
    return {f: (base / f).read_bytes() for f in names if (base / f).is_file()}


class ExportMismatch(RuntimeError):
    """The exported artifact, reloaded, computes other logits than the trained model did."""


def verify_export(cfg: TrainConfig, plan: RunPlan, artifact: str, probe: dict) -> tuple[dict, str]:
    """Runs as a Ray task on the training's accelerator, where the workers did not check the export themselves
    (full fine-tuning, DeepSpeed: no room for a second model copy there): honed.train.checkpointing.export_check
    on the exported artifact (a local dir or a URI). Returns the check and the base weights' sha256 (hashed
    here, where the base model is)."""
    from honed.storage import local_copy

    with local_copy(artifact) as local:
        check = export_check(cfg, plan.model_path, local, probe, task_device(cfg.scaling.use_gpu))
    return check, weights_hash(plan.model_path)


def refuse_mismatch(check: dict, artifact: str) -> None:
    """ExportMismatch when the reloaded export's logits are further from the trained model's than the tolerance."""
    if check["max_abs_diff"] > check["tolerance"]:
        raise ExportMismatch(f"the exported {artifact} reloads to logits {check['max_abs_diff']:.2e} away from the "
                             f"trained model's (tolerance {check['tolerance']:.1e} in {check['dtype']}): the export "
                             "is not the model that was trained")
