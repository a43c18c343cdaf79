"""`honed train`: a prepared dataset → Ray Train `TorchTrainer` → an adapter with its metadata.

    honed train jobs/train_lora.yaml optim.lr=1e-3 scaling.num_workers=2

Writes `output_dir/`: adapter/ (PEFT safetensors + honed.json), metrics.jsonl, train.yaml, and Ray Train's
checkpoints under `storage_path` (default `output_dir/checkpoints`). Rerunning the same command with the
same `name` and `storage_path` resumes from the latest checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from honed.config import TrainConfig, dump_config
from honed.data.pipeline import load_manifest
from honed.models import resolve_model, weights_hash
from honed.train.loop import METRICS_FILE, train_loop_per_worker

ADAPTER_META = "honed.json"


def train(cfg: TrainConfig) -> dict:
    """Fit on the connected Ray cluster; returns the final metrics."""
    import ray.data
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    manifest = load_manifest(cfg.data_dir)
    model_path = resolve_model(cfg.model.name_or_path)
    loop_config = build_loop_config(cfg, manifest, model_path)
    shards = Path(cfg.data_dir).resolve() / "shards"
    resources = {"CPU": cfg.scaling.cpus_per_worker} | ({"GPU": 1} if cfg.scaling.use_gpu else {})
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=cfg.scaling.num_workers, use_gpu=cfg.scaling.use_gpu,
                                     resources_per_worker=resources),
        datasets={"train": ray.data.read_parquet(str(shards / "train")),
                  "val": validation_dataset(shards / "val", manifest, cfg.val_max_examples)},
        run_config=RunConfig(name=cfg.name, storage_path=storage_path(cfg),
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints)),
    )
    print(f"[honed.train] {loop_config['total_steps']} steps on {cfg.scaling.num_workers} workers "
          f"({loop_config['steps_per_epoch']} per epoch)", flush=True)
    result = trainer.fit()
    return export_result(result, cfg, manifest, model_path)


def validation_dataset(path: Path, manifest: dict, per_source: int):
    """At most `per_source` rows of each source's validation set, so every source keeps its voice."""
    import ray.data
    from ray.data.expressions import col

    val = ray.data.read_parquet(str(path))
    sources = [name for name, c in manifest["counts"]["by_source"].items() if c["val"]]
    parts = [val.filter(expr=col("source") == name).limit(per_source) for name in sources]
    return parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]


def build_loop_config(cfg: TrainConfig, manifest: dict, model_path: str) -> dict:
    n_train = manifest.get("shards", {}).get("train_rows", manifest["counts"]["total"]["train"])
    per_step = cfg.scaling.num_workers * cfg.optim.batch_size
    steps_per_epoch = n_train // per_step
    if steps_per_epoch == 0:
        raise ValueError(f"{n_train} training examples cannot fill one step of {cfg.scaling.num_workers} workers "
                         f"x batch_size {cfg.optim.batch_size}; lower optim.batch_size or scaling.num_workers")
    total = steps_per_epoch * cfg.optim.epochs
    if cfg.optim.max_steps:
        total = min(total, cfg.optim.max_steps)
    return {
        "model_path": model_path, "dtype": cfg.model.dtype, "lora": cfg.method.lora.model_dump(),
        "optim": cfg.optim.model_dump(), "torch_threads": cfg.scaling.torch_threads, "seed": cfg.seed,
        "total_steps": total, "steps_per_epoch": steps_per_epoch, "log_every": cfg.log_every,
        "checkpoint_every": cfg.checkpoint_every, "validate_at_checkpoints": cfg.validate_at_checkpoints,
        "val_batch_size": cfg.optim.batch_size * 2,
    }


def storage_path(cfg: TrainConfig) -> str:
    if cfg.storage_path and "://" in cfg.storage_path:
        return cfg.storage_path
    return str(Path(cfg.storage_path or Path(cfg.output_dir) / "checkpoints").resolve())


def export_result(result, cfg: TrainConfig, manifest: dict, model_path: str) -> dict:
    """Copy the final adapter and metrics out of Ray Train storage and describe the adapter in honed.json."""
    if result.error:
        raise result.error
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    adapter = out / "adapter"
    shutil.rmtree(adapter, ignore_errors=True)
    with result.checkpoint.as_directory() as ckpt:
        shutil.copytree(Path(ckpt) / "adapter", adapter)
        shutil.copy(Path(ckpt) / METRICS_FILE, out / METRICS_FILE)
    meta = {
        "base_model": cfg.model.name_or_path,
        "base_weights_sha256": weights_hash(model_path),
        "method": cfg.method.model_dump(),
        "template": manifest["template"],
        "data_manifest_sha256": hashlib.sha256(
            (Path(cfg.data_dir) / "manifest.json").read_bytes()).hexdigest(),
        "final_metrics": result.metrics,
        "checkpoint": result.checkpoint.path,
    }
    (adapter / ADAPTER_META).write_text(json.dumps(meta, indent=2))
    (out / "train.yaml").write_text(dump_config(cfg))
    return result.metrics


def read_adapter_meta(adapter_dir: str) -> dict:
    path = Path(adapter_dir) / ADAPTER_META
    if not (Path(adapter_dir) / "adapter_config.json").is_file():
        raise FileNotFoundError(f"'{adapter_dir}' is not an adapter directory (adapter_config.json missing)")
    return json.loads(path.read_text()) if path.is_file() else {}
