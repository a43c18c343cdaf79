"""The run plan: what a validated `TrainConfig` means on its prepared dataset, computed once on the driver.

    plan = plan_run(cfg)                    # ValueError when config and dataset do not fit together
    TorchTrainer(train_loop_per_worker, train_loop_config={"cfg": cfg, "plan": plan}, ...)

The plan is frozen: the driver, every worker and the export read the same steps, batch geometry, sources and
paths, and nothing re-derives them from the config.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from honed.artifacts import LIVE_LOG, read_manifest
from honed.config import TrainConfig


@dataclasses.dataclass(frozen=True)
class RunPlan:
    model_path: str  # the resolved base model dir ("" when planned without resolving it, e.g. a preflight)
    total_steps: int
    steps_per_epoch: int
    micro_batches_per_epoch: int  # per worker: steps_per_epoch x grad_accum_steps
    global_micro_batch: int  # rows of one micro-step across all workers: batch_size x num_workers
    val_batch_size: int  # rows per worker in a validation batch
    validate_at_checkpoints: bool
    domain_sources: tuple[str, ...]  # trained-on sources: `val_loss` pools these
    packed: bool
    train_rows: int
    live_log: str  # output_dir/progress.jsonl, appended to by rank 0
    storage_path: str  # Ray Train's storage (checkpoints), local absolute path or a URI


def plan_run(cfg: TrainConfig, model_path: str = "", manifest: dict | None = None) -> RunPlan:
    """The plan for `cfg` on its prepared dataset; ValueError naming what does not fit."""
    manifest = read_manifest(cfg.data_dir) if manifest is None else manifest
    packed = bool(manifest.get("shards", {}).get("packed"))
    check_method_data(cfg, manifest, packed, model_path)
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
    return RunPlan(
        model_path=model_path, total_steps=total, steps_per_epoch=steps_per_epoch,
        micro_batches_per_epoch=steps_per_epoch * cfg.optim.grad_accum_steps,
        global_micro_batch=cfg.optim.batch_size * cfg.scaling.num_workers, val_batch_size=cfg.optim.batch_size * 2,
        validate_at_checkpoints=cfg.validate_at_checkpoints or bool(cfg.checkpoint_metric) or bool(cfg.early_stopping),
        domain_sources=tuple(domain_sources(manifest)), packed=packed, train_rows=n_train,
        live_log=str((Path(cfg.output_dir) / LIVE_LOG).resolve()), storage_path=storage_path(cfg))


def check_method_data(cfg: TrainConfig, manifest: dict, packed: bool, model_path: str) -> None:
    """The dataset suits the method: prefix and dpo need unpacked shards, dpo needs pairs (and an SFT adapter
    of this base)."""
    if packed and cfg.method.name == "prefix":
        raise ValueError("prefix tuning needs unpacked shards (its virtual tokens would have to be repeated "
                         "for every example in a packed row); prepare with data.pack.seq_len: null")
    if cfg.method.name != "dpo":
        return
    check_preference_data(manifest, packed)
    if cfg.method.dpo.adapter:
        from honed.models import weights_hash
        from honed.train.dpo import check_sft_adapter

        check_sft_adapter(cfg.method.dpo.adapter, weights_hash(model_path) if model_path else None)


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


def domain_sources(manifest: dict) -> list[str]:
    """Sources trained on (not eval-only probes): `val_loss` averages over these."""
    return [name for name, c in manifest["counts"]["by_source"].items() if c.get("train")]


def storage_path(cfg: TrainConfig) -> str:
    if cfg.storage_path and "://" in cfg.storage_path:
        return cfg.storage_path
    return str(Path(cfg.storage_path or Path(cfg.output_dir) / "checkpoints").resolve())


def run_dir(cfg: TrainConfig) -> str:
    base = storage_path(cfg)
    return f"{base.rstrip('/')}/{cfg.name}" if "://" in base else str(Path(base) / cfg.name)


def run_checkpoints(cfg: TrainConfig) -> list[str] | None:
    """The run's checkpoint dirs in local storage (None for cloud storage, which is not listed here)."""
    path = run_dir(cfg)
    if "://" in path:
        return None
    return sorted(str(p) for p in Path(path).glob("checkpoint_*") if p.is_dir())
