"""`honed train`: a prepared dataset → Ray Train `TorchTrainer` → an adapter (or a full model) with metadata.

    honed train jobs/train_lora.yaml optim.lr=1e-3 scaling.num_workers=2

Writes `output_dir/`: adapter/ (PEFT safetensors + honed.json) for lora/qlora/prefix/ia3 or model/ (a full HF
model + honed.json) for full fine-tuning, metrics.jsonl, efficiency.json, progress.jsonl (the live log),
train.yaml, report.md with plots/ and tensorboard/ (honed.report); Ray Train's checkpoints live under
`storage_path` (default `output_dir/checkpoints`). Rerunning the same command with the same `name` and
`storage_path` resumes from the latest checkpoint. With
`register: {name: icd10-lora}` the adapter is also added to the adapter registry (honed.registry) as icd10-lora@N.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from honed.artifacts import (
    EFFICIENCY_FILE, METRICS_FILE, PROBE_FILE, RUN_CONFIG, manifest_sha256, read_efficiency, read_manifest, write_meta,
)
from honed.config import TrainConfig, dump_config
from honed.models import resolve_model, weights_hash
from honed.report import write_train_report
from honed.runtime import run_task, task_device
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
    plan = plan or plan_run(cfg, resolve_model(cfg.model.name_or_path), manifest)
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
    metrics = export_result(result, cfg, manifest, plan)
    metrics["report"] = str(write_train_report(cfg.output_dir))
    if cfg.register:  # PEFT methods only (the config refuses `register` with method full)
        metrics["registered"] = register_adapter(cfg)
    return metrics


def datasets(cfg: TrainConfig, manifest: dict) -> dict:
    import ray.data

    shards = Path(cfg.data_dir).resolve() / "shards"
    return {"train": ray.data.read_parquet(str(shards / "train"), ray_remote_args=READ_ARGS),
            "val": validation_dataset(shards / "val", manifest, cfg.val_max_examples)}


def register_adapter(cfg: TrainConfig) -> str:
    """Add the exported adapter to `cfg.register.registry` as the next version of `cfg.register.name`."""
    from honed.registry import Registry

    ref = Registry(cfg.register.registry).add(cfg.register.name, str(Path(cfg.output_dir) / "adapter"))
    print(f"[honed.train] registered {ref} in {cfg.register.registry}", flush=True)
    return ref


def deepspeed_label(cfg: TrainConfig) -> str:
    ds = cfg.method.deepspeed
    if not ds.enabled:
        return ""
    offload = [name for name, on in (("optimizer", ds.offload_optimizer), ("params", ds.offload_params)) if on]
    return f" + DeepSpeed ZeRO-{ds.zero_stage}" + (f" (offload {', '.join(offload)})" if offload else "")


def validation_dataset(path: Path, manifest: dict, per_source: int):
    """At most `per_source` rows of each source's validation set, so every source keeps its voice."""
    import ray.data
    from ray.data.expressions import col

    val = ray.data.read_parquet(str(path), ray_remote_args=READ_ARGS)
    sources = [name for name, c in manifest["counts"]["by_source"].items() if c["val"]]
    parts = [val.filter(expr=col("source") == name).limit(per_source) for name in sources]
    return parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]


def export_result(result, cfg: TrainConfig, manifest: dict, plan: RunPlan) -> dict:
    """Copy the final artifact, metrics and efficiency report out of Ray Train storage, describe the artifact in
    honed.json, and check that it reloads to the logits the trained model gave."""
    if result.error:
        raise result.error
    out = Path(cfg.output_dir).resolve()  # the export check is a Ray task: it may run in another directory
    out.mkdir(parents=True, exist_ok=True)
    name = artifact_name(cfg.method)
    artifact = out / name
    shutil.rmtree(artifact, ignore_errors=True)
    with result.checkpoint.as_directory() as ckpt:
        shutil.copytree(Path(ckpt) / name, artifact)
        for f in (METRICS_FILE, EFFICIENCY_FILE):
            shutil.copy(Path(ckpt) / f, out / f)
        probe = torch.load(Path(ckpt) / PROBE_FILE, weights_only=False)
    if name == "model":  # a complete HF model directory: tokenizer and chat template travel with it
        for f in TOKENIZER_FILES:
            if (Path(plan.model_path) / f).is_file() and not (artifact / f).exists():
                shutil.copy(Path(plan.model_path) / f, artifact / f)
    check = run_task(verify_export, cfg, plan.model_path, str(artifact), probe,
                     num_cpus=cfg.scaling.cpus_per_worker, num_gpus=1 if cfg.scaling.use_gpu else 0)
    metrics = dict(result.metrics or {}) | {"efficiency": read_efficiency(out), "export_check": check}
    write_meta(artifact, {
        "base_model": cfg.model.name_or_path,
        "base_weights_sha256": weights_hash(plan.model_path),
        "method": cfg.method.model_dump(),
        "template": manifest["template"],
        "data_manifest_sha256": manifest_sha256(cfg.data_dir),
        "final_metrics": result.metrics,
        "export_check": check,
        "checkpoint": result.checkpoint.path,
    })
    (out / RUN_CONFIG).write_text(dump_config(cfg))
    print(f"[honed.train] exported {artifact} (reloaded logits match the trained model within "
          f"{check['max_abs_diff']:.2e})", flush=True)
    return metrics


class ExportMismatch(RuntimeError):
    """The exported artifact, reloaded, computes other logits than the trained model did."""


def verify_export(cfg: TrainConfig, model_path: str, artifact: str, probe: dict) -> dict:
    """Runs as a Ray task on the training's accelerator: the exported artifact, loaded the way users load it in
    the dtype it trained in, against the logits the trained model gave on the probe rows (same autocast as
    training). Tolerance by dtype (honed.merge.tolerance_for: fp32 1e-3; bf16/fp16 a share of the logits)."""
    from honed.merge import tolerance_for

    device = task_device(cfg.scaling.use_gpu)
    compute = compute_dtype(cfg.model.dtype, device)
    model = load_artifact(cfg, model_path, Path(artifact), device).eval()
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
    return check


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
