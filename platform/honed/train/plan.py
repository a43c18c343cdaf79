"""The run plan: what a validated `TrainConfig` means on its prepared dataset, computed once on the driver.

    plan = plan_run(cfg)                    # ValueError when config and dataset do not fit together
    TorchTrainer(train_loop_per_worker, train_loop_config={"cfg": cfg, "plan": plan, "val_rows": rows}, ...)
    plan.model_path                         # in a worker: the base model's dir on this node (fetched once)

The plan is frozen: the driver, every worker and the export read the same steps, batch geometry, sources and
paths, and nothing re-derives them from the config. The base model travels as its reference (a builtin name, a
local dir, a Hub ID or a URI) and becomes a local directory only where it loads: nodes share no disk.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from honed.artifacts import LIVE_LOG, read_manifest
from honed.config import TrainConfig
from honed.storage import is_uri, join


@dataclasses.dataclass(frozen=True)
class RunPlan:
    model: str  # model.name_or_path, checked to exist (honed.models.check_model)
    model_revision: str | None  # model.revision (Hub IDs)
    total_steps: int
    steps_per_epoch: int
    micro_batches_per_epoch: int  # per worker: steps_per_epoch x grad_accum_steps
    global_micro_batch: int  # rows of one micro-step across all workers: batch_size x num_workers
    val_batch_size: int  # rows per worker in a validation batch
    validate_at_checkpoints: bool
    domain_sources: tuple[str, ...]  # trained-on sources: `val_loss` pools these
    packed: bool
    train_rows: int
    live_log: str  # output_dir/progress.jsonl, appended to by rank 0 ("" when output_dir is a URI)
    storage_path: str  # Ray Train's storage (checkpoints), local absolute path or a URI
    pad_id: int | None = None  # the tokenizer's pad id as prepare recorded it for this model (None: workers load it)

    @property
    def model_path(self) -> str:
        """The base model's local directory on the node that asks (a Ray worker): resolved there, fetched once
        per node (honed.models.resolve_model)."""
        from honed.models import resolve_model

        return resolve_model(self.model, self.model_revision)


def plan_run(cfg: TrainConfig, manifest: dict | None = None) -> RunPlan:
    """The plan for `cfg` on its prepared dataset; FileNotFoundError for a missing model, ValueError naming what
    does not fit. The model is checked to exist (nothing is downloaded here)."""
    from honed.models import check_model

    manifest = read_manifest(cfg.data_dir) if manifest is None else manifest
    packed = bool(manifest.get("shards", {}).get("packed"))
    kind = check_model(cfg.model.name_or_path, cfg.model.revision)
    check_method_data(cfg, manifest, packed, cfg.model.name_or_path if kind == "local" else "")
    n_train = manifest.get("shards", {}).get("train_rows", manifest["counts"]["total"]["train"])
    if not manifest.get("shards", {}).get("val_rows", manifest["counts"]["total"].get("val", 1)):
        raise ValueError(f"the dataset at '{cfg.data_dir}' has no validation rows; honed train validates on them and "
                         "checks the export against two of them: prepare it again with a larger data.val_fraction "
                         "(or the source's val_fraction) or more records")
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
        model=cfg.model.name_or_path, model_revision=cfg.model.revision, total_steps=total, steps_per_epoch=steps_per_epoch,
        micro_batches_per_epoch=steps_per_epoch * cfg.optim.grad_accum_steps,
        global_micro_batch=cfg.optim.batch_size * cfg.scaling.num_workers, val_batch_size=cfg.optim.batch_size * 2,
        validate_at_checkpoints=cfg.validate_at_checkpoints or bool(cfg.checkpoint_metric) or bool(cfg.early_stopping),
        domain_sources=tuple(domain_sources(manifest)), packed=packed, train_rows=n_train,
        live_log="" if is_uri(cfg.output_dir) else str((Path(cfg.output_dir) / LIVE_LOG).resolve()),
        storage_path=storage_path(cfg), pad_id=recorded_pad_id(cfg, manifest))


def recorded_pad_id(cfg: TrainConfig, manifest: dict) -> int | None:
    """The pad id prepare recorded, when it tokenized with this run's model (a worker then skips loading the
    tokenizer, ~2 s of its set-up, for this one number)."""
    model = manifest.get("model", {})
    pad = model.get("pad_token_id")
    return int(pad) if pad is not None and model.get("name_or_path") == cfg.model.name_or_path else None


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
    """Ray Train's storage: `storage_path`, else `output_dir/checkpoints` (a URI when output_dir is one)."""
    path = cfg.storage_path or join(cfg.output_dir, "checkpoints")
    return path if is_uri(path) else str(Path(path).resolve())


def run_dir(cfg: TrainConfig) -> str:
    base = storage_path(cfg)
    return f"{base.rstrip('/')}/{cfg.name}" if "://" in base else str(Path(base) / cfg.name)


def run_checkpoints(cfg: TrainConfig) -> list[str] | None:
    """The run's checkpoint dirs in local storage (None for cloud storage, which is not listed here)."""
    path = run_dir(cfg)
    if "://" in path:
        return None
    return sorted(str(p) for p in Path(path).glob("checkpoint_*") if p.is_dir())
