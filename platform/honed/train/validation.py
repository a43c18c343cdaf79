"""Per-source validation inside the workers, and when training stops early.

    metrics = validate(worker)            # {"val_loss": ..., "val_loss/<source>": ..., dpo: "val_reward_*"}
    should_stop(history, cfg.early_stopping)

The capped validation set is read once by the driver and handed to every worker (`Worker.val_rows`): no Ray
Data execution per worker or per call. Every worker scores its slice of each global validation batch; the sums
are added across workers before the means are taken, so the figures do not depend on the number of workers.
"""

from __future__ import annotations

import numpy as np
import torch

from honed.config import EarlyStopping
from honed.train.collate import rank_rows
from honed.train.dpo import pair_metrics


@torch.no_grad()
def validate(worker) -> dict:
    """Per validation source over the whole (capped) validation set: the mean token loss, or for preference
    pairs under dpo the mean DPO loss with reward accuracy and margin; `val_loss` (and the reward figures)
    pool the domain (trained) sources, weighted by tokens (pairs)."""
    backend = worker.backend
    backend.train(False)
    sums: dict[str, dict[str, float]] = {}
    for global_batch in global_batches(worker.val_rows, worker.plan.val_batch_size * worker.world):
        rows = rank_rows(global_batch, worker.rank, worker.world, worker.val_cost)
        with backend.autocast():
            scored = worker.objective.row_scores(backend.module, rows, worker.pad_id, worker.device)
        for source, weight, values in scored:
            acc = sums.setdefault(source, {})
            for key, value in values.items():
                acc[key] = acc.get(key, 0.0) + value * weight
    backend.train(True)
    return validation_metrics(all_reduce_sums(sums), list(worker.plan.domain_sources))


def global_batches(rows: dict[str, np.ndarray], size: int):
    """The capped validation set (columns, as the driver read it: honed.train.trainer.validation_rows) in global
    batches of `size` rows, in order."""
    n = len(next(iter(rows.values())))
    for lo in range(0, n, size):
        yield {k: v[lo:lo + size] for k, v in rows.items()}


def validation_metrics(sums: dict[str, dict[str, float]], domain_sources: list[str]) -> dict:
    """`val_loss/<source>` (token loss, or DPO loss for a source of pairs), `val_reward_*` for pairs, and the
    pooled `val_loss` / `val_reward_*` over the domain sources."""

    def loss(acc: dict) -> float:
        if acc.get("pairs"):
            return acc["dpo_loss"] / acc["pairs"]
        return acc.get("loss", 0.0) / max(acc.get("tokens", 0.0), 1)

    out = {}
    for source, acc in sums.items():
        out[f"val_loss/{source}"] = round(loss(acc), 5)
        if acc.get("pairs"):
            out |= pair_metrics(acc, prefix="val_", suffix=f"/{source}")
    domain = [sums[s] for s in domain_sources if s in sums]
    if domain:
        pooled: dict[str, float] = {}
        pairs = [acc for acc in domain if acc.get("pairs")]
        for acc in pairs or domain:  # a dpo run pools its pair sources; any other its token losses
            for key, value in acc.items():
                pooled[key] = pooled.get(key, 0.0) + value
        out["val_loss"] = round(loss(pooled), 5)
        if pairs:
            out |= pair_metrics(pooled, prefix="val_")
    return out


def should_stop(history: list[dict], early: EarlyStopping | None) -> bool:
    """True when the last `patience` validations did not beat the best earlier one by more than `min_delta`
    (an equal value is no improvement)."""
    if not early:
        return False
    values = [m[early.metric] for m in history if early.metric in m]
    if len(values) <= early.patience:
        return False
    best_before = min(values[:-early.patience])
    return min(values[-early.patience:]) >= best_before - early.min_delta


def all_reduce_sum(values: list[float]) -> list[float]:
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=collective_device())
    dist.all_reduce(t)
    return t.tolist()


def collective_device() -> torch.device:
    """Where a tensor must be for the process group's collectives: the worker's GPU under NCCL alone (Ray Train's
    backend for GPU workers, which has no CPU transport: a CPU tensor's all_reduce fails there), else the CPU."""
    import torch.distributed as dist

    if str(dist.get_backend()) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sums(sums: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """Sum each source's named sums across workers; gathered as objects since sources and names differ by rank."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return dict(sorted(sums.items()))
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, sums)
    merged: dict[str, dict[str, float]] = {}
    for part in gathered:
        for source, values in part.items():
            acc = merged.setdefault(source, {})
            for key, value in values.items():
                acc[key] = acc.get(key, 0.0) + value
    return dict(sorted(merged.items()))
