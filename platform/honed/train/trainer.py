"""`honed train`: a prepared dataset → Ray Train `TorchTrainer` → an adapter (or a full model) with metadata.

    honed train jobs/train_lora.yaml optim.lr=1e-3 scaling.num_workers=2

Writes `output_dir/`: adapter/ (PEFT safetensors + honed.json) for lora/qlora/prefix/ia3 or model/ (a full HF
model + honed.json) for full fine-tuning, metrics.jsonl, efficiency.json, progress.jsonl (the live log),
train.yaml, report.md with plots/ and tensorboard/ (honed.report); Ray Train's checkpoints live under
`storage_path` (default `output_dir/checkpoints`). Rerunning the same command with the same `name` and
`storage_path` resumes from the latest checkpoint. With
`register: {name: icd10-lora}` the adapter is also added to the adapter registry (honed.registry) as icd10-lora@N.

`data_dir`, `output_dir`, `storage_path` and the registry may be object-storage URIs (s3://...) and the model
any reference honed.models resolves: workers read the shards from storage and resolve the model on their own
node, the driver exports into a local staging dir and uploads it (honed.storage.staged); no shared disk needed.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from honed.artifacts import (
    EFFICIENCY_FILE, METRICS_FILE, PROBE_FILE, RUN_CONFIG, manifest_sha256, read_efficiency, read_manifest, write_meta,
)
from honed.config import TrainConfig, dump_config
from honed.models import weights_hash
from honed.report import write_train_report
from honed.runtime import run_task, task_device
from honed.storage import absolute, is_uri, join, staged, upload_dir
from honed.train.backends import artifact_name
from honed.train.loop import train_loop_per_worker
from honed.train.methods import compute_dtype
from honed.train.plan import RunPlan, plan_run

# Shard reads are light (tokenized Parquet): a quarter CPU each, so nodes whose CPUs the training workers
# mostly hold can still stream them (a 1-CPU read task would wait forever next to two 0.5-CPU workers).
READ_ARGS = {"num_cpus": 0.25}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "generation_config.json")


def train(cfg: TrainConfig, callbacks: list | None = None, plan: RunPlan | None = None) -> dict:
    """Fit on the connected Ray cluster; returns the final metrics (with `efficiency` and `export_check`).
    `callbacks` go to the TorchTrainer's RunConfig (honed.tune passes Ray's TuneReportCallback); `plan`: the
    run's plan when a preflight (`honed train`) already made it, else it is planned here."""
    from ray.data import ExecutionOptions
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    manifest = read_manifest(cfg.data_dir)
    plan = plan or plan_run(cfg, manifest)
    resources = {"CPU": cfg.scaling.cpus_per_worker} | ({"GPU": 1} if cfg.scaling.use_gpu else {})
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg, "plan": plan},
        scaling_config=ScalingConfig(num_workers=cfg.scaling.num_workers, use_gpu=cfg.scaling.use_gpu,
                                     resources_per_worker=resources,
                                     placement_strategy=cfg.scaling.placement_strategy),
        datasets=datasets(cfg, manifest),
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
          f"{cfg.scaling.num_workers} workers ({plan.steps_per_epoch} per epoch)", flush=True)
    result = trainer.fit()
    with staged(cfg.output_dir) as out:  # output_dir itself, or a local dir uploaded to its URI at the end
        metrics = export_result(result, cfg, manifest, plan, out)
        metrics["report"] = join(cfg.output_dir, write_train_report(out).name)
        if cfg.register:  # PEFT methods only (the config refuses `register` with method full)
            metrics["registered"] = register_adapter(cfg, out / "adapter")
    return metrics


def datasets(cfg: TrainConfig, manifest: dict) -> dict:
    import ray.data

    shards = join(absolute(cfg.data_dir), "shards")  # read by Ray Data tasks on any node: local path or URI
    return {"train": ray.data.read_parquet(join(shards, "train"), ray_remote_args=READ_ARGS),
            "val": validation_dataset(join(shards, "val"), manifest, cfg.val_max_examples)}


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


def validation_dataset(path: str | Path, manifest: dict, per_source: int):
    """At most `per_source` rows of each source's validation set, so every source keeps its voice."""
    import ray.data
    from ray.data.expressions import col

    val = ray.data.read_parquet(str(path), ray_remote_args=READ_ARGS)
    sources = [name for name, c in manifest["counts"]["by_source"].items() if c["val"]]
    parts = [val.filter(expr=col("source") == name).limit(per_source) for name in sources]
    return parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]


def export_result(result, cfg: TrainConfig, manifest: dict, plan: RunPlan, out: Path) -> dict:
    """Copy the final artifact, metrics and efficiency report out of Ray Train storage into `out` (the local
    output dir or its staging copy), describe the artifact in honed.json, and check (a Ray task, on a node that
    holds the base model) that it reloads to the logits the trained model gave."""
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
    check, base_sha = run_task(verify_export, cfg, plan, reachable, probe,
                               num_cpus=cfg.scaling.cpus_per_worker, num_gpus=1 if cfg.scaling.use_gpu else 0)
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
    """Runs as a Ray task on the training's accelerator: the exported artifact (a local dir or a URI), loaded the
    way users load it in the dtype it trained in, against the logits the trained model gave on the probe rows
    (same autocast as training). Tolerance by dtype (honed.merge.tolerance_for: fp32 1e-3; bf16/fp16 a share of
    the logits). Returns the check and the base weights' sha256 (hashed here, where the base model is)."""
    from honed.merge import tolerance_for
    from honed.storage import local_copy

    device = task_device(cfg.scaling.use_gpu)
    compute = compute_dtype(cfg.model.dtype, device)
    model_path = plan.model_path
    with local_copy(artifact) as local:
        model = load_artifact(cfg, model_path, local, device).eval()
    inputs = {k: v.to(device) for k, v in probe["inputs"].items()}
    with torch.no_grad(), torch.autocast(device.type, dtype=compute, enabled=compute != torch.float32):
        logits = model(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"),
                       position_ids=inputs.get("position_ids"), use_cache=False).logits.float().cpu()
    diff, scale = float((logits - probe["logits"]).abs().max()), float(probe["logits"].abs().max())
    check = {"max_abs_diff": diff, "max_abs_logit": scale, "rows": int(inputs["input_ids"].shape[0]),
             "tolerance": tolerance_for(compute, scale, quantized=False), "dtype": str(compute).removeprefix("torch."),
             "device": device.type}
    if diff > check["tolerance"]:
        raise ExportMismatch(f"the exported {artifact} reloads to logits {diff:.2e} away from the trained model's "
                             f"(tolerance {check['tolerance']:.1e} in {check['dtype']}): the export is not the "
                             "model that was trained")
    return check, weights_hash(model_path)


def load_artifact(cfg: TrainConfig, model_path: str, artifact: Path, device: torch.device):
    """The exported artifact as a model on `device`, loaded the way users load it (base + adapter, or the full
    dir) in the dtype it trained in."""
    from honed.train.methods import load_base, weights_dtype

    if cfg.method.name == "full":
        from transformers import AutoModelForCausalLM

        dtype = weights_dtype(cfg.method, compute_dtype(cfg.model.dtype, device))
        return AutoModelForCausalLM.from_pretrained(artifact, dtype=dtype, device_map={"": device})
    from peft import PeftModel

    return PeftModel.from_pretrained(load_base(cfg.method, model_path, cfg.model.dtype, device), artifact)
