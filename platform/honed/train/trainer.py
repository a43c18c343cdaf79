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

import hashlib
import json
import shutil
from pathlib import Path

import torch

from honed.config import TrainConfig, dump_config
from honed.data.pipeline import load_manifest
from honed.models import resolve_model, weights_hash
from honed.registry import META, read_meta
from honed.report import write_train_report
from honed.train.backends import artifact_name
from honed.train.loop import EFFICIENCY_FILE, METRICS_FILE, PROBE_FILE, train_loop_per_worker

ADAPTER_META = META  # honed.json, described in honed.registry, which reads it without torch
LIVE_LOG = "progress.jsonl"
# Shard reads are light (tokenized Parquet): a quarter CPU each, so nodes whose CPUs the training workers
# mostly hold can still stream them (a 1-CPU read task would wait forever next to two 0.5-CPU workers).
READ_ARGS = {"num_cpus": 0.25}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "generation_config.json")


def train(cfg: TrainConfig, callbacks: list | None = None) -> dict:
    """Fit on the connected Ray cluster; returns the final metrics (with `efficiency` and `export_check`).
    `callbacks` go to the TorchTrainer's RunConfig (honed.tune passes Ray's TuneReportCallback)."""
    import ray.data
    from ray.data import ExecutionOptions
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    manifest = load_manifest(cfg.data_dir)
    model_path = resolve_model(cfg.model.name_or_path)
    loop_config = build_loop_config(cfg, manifest, model_path)
    shards = Path(cfg.data_dir).resolve() / "shards"
    resources = {"CPU": cfg.scaling.cpus_per_worker} | ({"GPU": 1} if cfg.scaling.use_gpu else {})
    score = cfg.checkpoint_metric
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=cfg.scaling.num_workers, use_gpu=cfg.scaling.use_gpu,
                                     resources_per_worker=resources,
                                     placement_strategy=cfg.scaling.placement_strategy),
        datasets={"train": ray.data.read_parquet(str(shards / "train"), ray_remote_args=READ_ARGS),
                  "val": validation_dataset(shards / "val", manifest, cfg.val_max_examples)},
        # Not split: every worker reads the same ordered stream and takes its slice of each global batch
        # (honed.train.loop), which makes steps independent of reader timing and resume exact.
        dataset_config=DataConfig(datasets_to_split=[], execution_options=ExecutionOptions(preserve_order=True)),
        run_config=RunConfig(
            name=cfg.name, storage_path=storage_path(cfg),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints, checkpoint_score_attribute=score,
                                               checkpoint_score_order="min"),
            failure_config=FailureConfig(max_failures=cfg.scaling.max_failures), callbacks=callbacks),
    )
    print(f"[honed.train] {cfg.method.name}{deepspeed_label(cfg)}: {loop_config['total_steps']} steps on "
          f"{cfg.scaling.num_workers} workers ({loop_config['steps_per_epoch']} per epoch)", flush=True)
    result = trainer.fit()
    metrics = export_result(result, cfg, manifest, model_path)
    metrics["report"] = str(write_train_report(cfg.output_dir))
    if cfg.register:  # PEFT methods only (the config refuses `register` with method full)
        metrics["registered"] = register_adapter(cfg)
    return metrics


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


def domain_sources(manifest: dict) -> list[str]:
    """Sources trained on (not eval-only probes): `val_loss` averages over these."""
    return [name for name, c in manifest["counts"]["by_source"].items() if c.get("train")]


def build_loop_config(cfg: TrainConfig, manifest: dict, model_path: str) -> dict:
    packed = bool(manifest.get("shards", {}).get("packed"))
    if packed and cfg.method.name == "prefix":
        raise ValueError("prefix tuning needs unpacked shards (its virtual tokens would have to be repeated "
                         "for every example in a packed row); prepare with data.pack.seq_len: null")
    if cfg.method.name == "dpo":
        check_preference_data(manifest, packed)
        if cfg.method.dpo.adapter:
            from honed.train.dpo import check_sft_adapter

            check_sft_adapter(cfg.method.dpo.adapter, weights_hash(model_path) if model_path else None)
    n_train = manifest.get("shards", {}).get("train_rows", manifest["counts"]["total"]["train"])
    per_step = cfg.scaling.num_workers * cfg.optim.batch_size * cfg.optim.grad_accum_steps
    steps_per_epoch = n_train // per_step
    if steps_per_epoch == 0:
        raise ValueError(f"{n_train} training rows cannot fill one step of {cfg.scaling.num_workers} workers x "
                         f"batch_size {cfg.optim.batch_size} x grad_accum_steps {cfg.optim.grad_accum_steps}; "
                         "lower one of them")
    total = steps_per_epoch * cfg.optim.epochs
    if cfg.optim.max_steps:
        total = min(total, cfg.optim.max_steps)
    validate = cfg.validate_at_checkpoints or bool(cfg.checkpoint_metric) or bool(cfg.early_stopping)
    return {
        "model_path": model_path, "dtype": cfg.model.dtype, "method": cfg.method.model_dump(),
        "optim": cfg.optim.model_dump(), "torch_threads": cfg.scaling.torch_threads, "seed": cfg.seed,
        "total_steps": total, "steps_per_epoch": steps_per_epoch, "log_every": cfg.log_every,
        "checkpoint_every": cfg.checkpoint_every, "validate_at_checkpoints": validate,
        "early_stopping": cfg.early_stopping.model_dump() if cfg.early_stopping else None,
        "val_batch_size": cfg.optim.batch_size * 2, "domain_sources": domain_sources(manifest),
        "peak_flops": cfg.peak_flops, "live_log": str((Path(cfg.output_dir) / LIVE_LOG).resolve()),
    }


def check_preference_data(manifest: dict, packed: bool) -> None:
    """DPO trains on pairs only: unpacked shards whose every training row is a preference pair."""
    if packed:
        raise ValueError("method dpo needs unpacked shards (a pair's two answers are scored against each other); "
                         "prepare with data.pack.enabled: false")
    if "kinds" not in manifest:
        raise ValueError("method dpo: this dataset's manifest predates preference pairs; prepare it again")
    others = {source: {k: n for k, n in kinds.items() if k != "preference"}
              for source, kinds in manifest["kinds"].get("train", {}).items()}
    others = {source: kinds for source, kinds in others.items() if kinds}
    if others:
        found = "; ".join(f"{s}: {', '.join(f'{n} {k}' for k, n in kinds.items())}" for s, kinds in others.items())
        raise ValueError(f"method dpo trains on preference pairs (prompt/messages + chosen + rejected), but training "
                         f"rows of other kinds are present ({found}); make those sources eval_only or drop them")
    if not manifest["kinds"].get("train"):
        raise ValueError("method dpo: the dataset has no training pairs")


def plan_run(cfg: TrainConfig) -> dict:
    """The loop config for `cfg` on its prepared dataset; raises ValueError when they do not fit together."""
    return build_loop_config(cfg, load_manifest(cfg.data_dir), "")


def run_dir(cfg: TrainConfig) -> str:
    base = storage_path(cfg)
    return f"{base.rstrip('/')}/{cfg.name}" if "://" in base else str(Path(base) / cfg.name)


def run_checkpoints(cfg: TrainConfig) -> list[str] | None:
    """The run's checkpoint dirs in local storage (None for cloud storage, which is not listed here)."""
    path = run_dir(cfg)
    if "://" in path:
        return None
    return sorted(str(p) for p in Path(path).glob("checkpoint_*") if p.is_dir())


def storage_path(cfg: TrainConfig) -> str:
    if cfg.storage_path and "://" in cfg.storage_path:
        return cfg.storage_path
    return str(Path(cfg.storage_path or Path(cfg.output_dir) / "checkpoints").resolve())


def export_result(result, cfg: TrainConfig, manifest: dict, model_path: str) -> dict:
    """Copy the final artifact, metrics and efficiency report out of Ray Train storage, describe the artifact in
    honed.json, and check that it reloads to the logits the trained model gave."""
    if result.error:
        raise result.error
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    name = artifact_name(cfg.method.model_dump())
    artifact = out / name
    shutil.rmtree(artifact, ignore_errors=True)
    with result.checkpoint.as_directory() as ckpt:
        shutil.copytree(Path(ckpt) / name, artifact)
        for f in (METRICS_FILE, EFFICIENCY_FILE):
            shutil.copy(Path(ckpt) / f, out / f)
        probe = torch.load(Path(ckpt) / PROBE_FILE, weights_only=False)
    if name == "model":  # a complete HF model directory: tokenizer and chat template travel with it
        for f in TOKENIZER_FILES:
            if (Path(model_path) / f).is_file() and not (artifact / f).exists():
                shutil.copy(Path(model_path) / f, artifact / f)
    efficiency = json.loads((out / EFFICIENCY_FILE).read_text())
    check = verify_export(cfg, model_path, artifact, probe)
    metrics = dict(result.metrics or {}) | {"efficiency": efficiency, "export_check": check}
    meta = {
        "base_model": cfg.model.name_or_path,
        "base_weights_sha256": weights_hash(model_path),
        "method": cfg.method.model_dump(),
        "template": manifest["template"],
        "data_manifest_sha256": hashlib.sha256((Path(cfg.data_dir) / "manifest.json").read_bytes()).hexdigest(),
        "final_metrics": result.metrics,
        "export_check": check,
        "checkpoint": result.checkpoint.path,
    }
    (artifact / ADAPTER_META).write_text(json.dumps(meta, indent=2))
    (out / "train.yaml").write_text(dump_config(cfg))
    print(f"[honed.train] exported {artifact} (reloaded logits match the trained model within "
          f"{check['max_abs_diff']:.2e})", flush=True)
    return metrics


def load_artifact(cfg: TrainConfig, model_path: str, artifact: Path):
    """The exported artifact as a model, loaded the way users load it (base + adapter, or the full dir)."""
    from honed.train.methods import load_base

    method = cfg.method.model_dump()
    if method["name"] == "full":
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(artifact, dtype=torch.float32)
    from peft import PeftModel

    return PeftModel.from_pretrained(load_base(method, model_path, cfg.model.dtype, torch.device("cpu")), artifact)


def verify_export(cfg: TrainConfig, model_path: str, artifact: Path, probe: dict) -> dict:
    model = load_artifact(cfg, model_path, artifact).eval()
    inputs = probe["inputs"]
    with torch.no_grad():
        logits = model(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"),
                       position_ids=inputs.get("position_ids"), use_cache=False).logits.float()
    diff = float((logits - probe["logits"]).abs().max())
    return {"max_abs_diff": diff, "max_abs_logit": float(probe["logits"].abs().max()),
            "rows": int(inputs["input_ids"].shape[0])}


def read_adapter_meta(adapter_dir: str) -> dict:
    if not (Path(adapter_dir) / "adapter_config.json").is_file():
        raise FileNotFoundError(f"'{adapter_dir}' is not an adapter directory (adapter_config.json missing)")
    return read_meta(adapter_dir)
