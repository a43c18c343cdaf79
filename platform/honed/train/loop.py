"""The per-worker training loop, top to bottom: build, (resume), loop, validate, checkpoint, report.

Runs inside Ray Train workers (`TorchTrainer(train_loop_per_worker, ...)`); `config` is a plain dict built
by `honed.train.trainer.train` from a validated `TrainConfig`.

Data: every worker iterates the same ordered stream of global micro-batches (`batch_size x world` rows) and
trains on its own slice of each, so the examples of a step, and hence the loss curve, do not depend on which
worker reads faster; on resume the stream is replayed from the start of the epoch and the micro-batches
already trained are skipped. A global micro-batch that runs short still gives every worker a row (a
zero-weight copy), so collective-heavy backends (ZeRO-3) see the same number of forwards on every rank.
"""

from __future__ import annotations

import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from honed.models import load_tokenizer
from honed.train.attention import BOUNDARY_KEYS, flatten, use_varlen
from honed.train.batching import length_grouped
from honed.train.backends import make_backend
from honed.train.efficiency import Meter, efficiency_report, format_report, measure_peak_flops, peak_memory_mb
from honed.train.methods import build_model, compile_decoder, compute_dtype, count_params

PROGRESS_FILE = "progress.json"
METRICS_FILE = "metrics.jsonl"
EFFICIENCY_FILE = "efficiency.json"
PROBE_FILE = "probe.pt"
RNG_DIR = "rng"


def train_loop_per_worker(config: dict) -> None:
    import ray.train
    import ray.train.torch

    torch.set_num_threads(config["torch_threads"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()

    seed_everything(config["seed"])  # identical initial weights (LoRA matrices, prefixes) on every rank
    tokenizer = load_tokenizer(config["model_path"])
    model = build_model(config["method"], config["model_path"], config["dtype"], device)
    if padding_free(config):
        use_varlen(model)
    if config["optim"].get("compile"):
        compile_decoder(model)
    trainable, total_params = count_params(model)
    backend = make_backend(model, config, device)
    seed_everything(config["seed"] + rank)  # then one dropout stream per rank
    peak, peak_source = config["peak_flops"], "config"
    if not peak:
        peak = measure_peak_flops(device, compute_dtype(config["dtype"], device))
        peak_source = f"measured matmul ({compute_dtype(config['dtype'], device)}, {config['torch_threads']} threads)"

    run = {"step": 0, "history": [], "meter": Meter().state()}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:  # Ray Train hands back the latest checkpoint after a worker failure or a rerun of the run
        with checkpoint.as_directory() as ckpt_dir:
            backend.load(ckpt_dir, rank)
            run = json.loads(Path(ckpt_dir, PROGRESS_FILE).read_text())
            rng = Path(ckpt_dir, RNG_DIR, f"rank{rank}.pt")
            if rng.is_file():  # absent when the run resumes with more workers than it had
                set_rng_state(torch.load(rng, weights_only=False))
        if rank == 0:
            progress(f"resumed at step {run['step']}/{config['total_steps']}")
            live_log(config, {"event": "resumed", "step": run["step"]})
    meter = Meter()
    meter.restore(run["meter"])

    loop = Loop(config, backend, tokenizer.pad_token_id, device, rank, world)
    loop.run(run, meter, trainable=trainable, total_params=total_params, peak=(peak, peak_source))


def padding_free(config: dict) -> bool:
    """Whether training batches run as one flattened row (`optim.padding_free`; TrainConfig refuses it for
    prefix and dpo)."""
    return bool(config["optim"].get("padding_free"))


class LMObjective:
    """Next-token loss on the labelled tokens: every method but dpo (see honed.train.dpo.DPOObjective)."""

    def __init__(self, flat: bool = False):
        self.flat = flat

    def collate(self, batch: dict, pad_id: int, device: torch.device) -> dict:
        return collate(batch, pad_id, device, flat=self.flat)

    def loss(self, module, inputs: dict) -> tuple[torch.Tensor, int, dict[str, float]]:
        """Mean token loss, the number of labelled tokens (its weight in the window), and no extra sums."""
        loss, n = causal_lm_loss(module, inputs)
        return loss, n, {}

    @torch.no_grad()
    def row_scores(self, module, rows: dict, pad_id: int, device: torch.device) -> list[tuple[str, float, dict]]:
        return lm_row_scores(module, rows, pad_id, device)


def make_objective(config: dict, model):
    if config["method"]["name"] == "dpo":
        from honed.train.dpo import DPOObjective

        return DPOObjective(config["method"]["dpo"], model)
    return LMObjective(flat=padding_free(config))


class Loop:
    def __init__(self, config: dict, backend, pad_id: int, device: torch.device, rank: int, world: int):
        self.config, self.backend, self.pad_id, self.device = config, backend, pad_id, device
        self.rank, self.world = rank, world
        self.optim = config["optim"]
        self.probe_rows: dict | None = None
        self.objective = make_objective(config, backend.model)

    def run(self, run: dict, meter: Meter, *, trainable: int, total_params: int, peak: tuple[float, str]) -> None:
        import ray.train

        config, optim = self.config, self.optim
        total, per_epoch, accum = config["total_steps"], config["steps_per_epoch"], optim["grad_accum_steps"]
        shard = ray.train.get_dataset_shard("train")
        window = new_window()
        step_start = time.perf_counter()
        step_tokens = [0, 0, 0]  # fed, non-pad, labelled: this worker, this optimizer step
        stop = run["step"] >= total
        self.backend.train()
        while not stop:
            epoch, done_in_epoch = divmod(run["step"], per_epoch)
            skip = done_in_epoch * accum  # micro-batches of this epoch already trained
            batches = shard.iter_batches(batch_size=optim["batch_size"] * self.world, batch_format="numpy",
                                         drop_last=True)
            batches = length_grouped(batches, optim["group_by_length"], seed=(config["seed"], epoch))
            for i, global_batch in enumerate(batches):
                if i < skip:
                    continue
                if i >= per_epoch * accum:
                    break
                boundary = (i + 1) % accum == 0
                inputs = self.objective.collate(my_rows(global_batch, self.rank, self.world), self.pad_id, self.device)
                with self.backend.no_sync(boundary):
                    with self.backend.autocast():
                        loss, weight, sums = self.objective.loss(self.backend.module, inputs)
                    self.backend.backward(loss, boundary)
                window["loss_sum"] += loss.item() * weight
                window["loss_tokens"] += weight
                for key, value in sums.items():
                    window["sums"][key] = window["sums"].get(key, 0.0) + value
                labelled = int((inputs["labels"][:, 1:] != -100).sum())
                for j, n in enumerate((inputs["input_ids"].numel(), inputs["n_tokens"], labelled)):
                    step_tokens[j] += n
                if not boundary:
                    continue
                grad_norm = self.backend.step()
                run["step"] += 1
                now = time.perf_counter()
                meter.add(now - step_start, *step_tokens)
                window["tokens"] += step_tokens[1]
                step_tokens = [0, 0, 0]
                stop = self.after_step(run, meter, window, epoch, grad_norm,
                                       trainable=trainable, total_params=total_params, peak=peak)
                if stop:
                    break
                if run["step"] % config["log_every"] == 0 or run["step"] % config["checkpoint_every"] == 0:
                    window = new_window()
                step_start = time.perf_counter()

    def after_step(self, run: dict, meter: Meter, window: dict, epoch: int, grad_norm: float, **final) -> bool:
        """Log, validate, checkpoint; returns True when training is over (last step or early stop)."""
        config, step = self.config, run["step"]
        last = step >= config["total_steps"]
        save = last or step % config["checkpoint_every"] == 0
        if not (save or step % config["log_every"] == 0):
            return False
        metrics = self.window_metrics(window, step, epoch, grad_norm)
        early_stop = False
        if save and (last or config["validate_at_checkpoints"]):
            metrics.update(self.validate())
            early_stop = should_stop(run["history"] + [metrics], config.get("early_stopping"))
            if early_stop and self.rank == 0:
                progress(f"early stop at step {step}: {config['early_stopping']['metric']} has not improved "
                         f"for {config['early_stopping']['patience']} validations")
        metrics["peak_memory_mb"] = round(peak_memory_mb(self.device)[0], 1)
        run["history"].append(metrics)
        run["meter"] = meter.state()
        if self.rank == 0:
            progress(format_metrics(metrics, config["total_steps"]))
            live_log(config, metrics)
        if not save and not early_stop:
            ray_report(metrics)
            return False
        done = last or early_stop
        efficiency = self.efficiency(meter, **final) if done else None
        self.checkpoint(metrics, run, efficiency, final=done)
        return done

    def window_metrics(self, window: dict, step: int, epoch: int, grad_norm: float) -> dict:
        elapsed = time.perf_counter() - window["start"]
        keys = sorted(window["sums"])
        loss_sum, loss_tokens, tokens, *extra = all_reduce_sum(
            [window["loss_sum"], window["loss_tokens"], window["tokens"]] + [window["sums"][k] for k in keys])
        metrics = {"step": step, "epoch": epoch, "lr": self.backend.lr, "loss": round(loss_sum / max(loss_tokens, 1), 5),
                   "grad_norm": round(grad_norm, 4), "tokens_per_s": round(tokens / max(elapsed, 1e-9), 1)}
        if keys:  # dpo: reward accuracy and margins of the window's training pairs
            from honed.train.dpo import pair_metrics

            metrics |= pair_metrics(dict(zip(keys, extra)))
        return metrics

    @torch.no_grad()
    def validate(self) -> dict:
        """Per validation source over the whole (capped) validation set: the mean token loss, or for preference
        pairs under dpo the mean DPO loss with reward accuracy and margin; `val_loss` (and the reward figures)
        pool the domain (trained) sources, weighted by tokens (pairs)."""
        import ray.train

        self.backend.train(False)
        sums: dict[str, dict[str, float]] = {}
        batches = ray.train.get_dataset_shard("val").iter_batches(
            batch_size=self.config["val_batch_size"] * self.world, batch_format="numpy")
        for global_batch in batches:
            if self.probe_rows is None:  # the export check reuses two rows instead of reading the set again
                self.probe_rows = {k: v[:2] for k, v in global_batch.items()}
            rows = my_rows(global_batch, self.rank, self.world)
            with self.backend.autocast():
                scored = self.objective.row_scores(self.backend.module, rows, self.pad_id, self.device)
            for source, weight, values in scored:
                acc = sums.setdefault(source, {})
                for key, value in values.items():
                    acc[key] = acc.get(key, 0.0) + value * weight
        self.backend.train(True)
        return validation_metrics(all_reduce_sums(sums), self.config["domain_sources"])

    def efficiency(self, meter: Meter, *, trainable: int, total_params: int, peak: tuple[float, str]) -> dict:
        import torch.distributed as dist

        import ray

        memory, kind = peak_memory_mb(self.device)
        mine = {"meter": meter.state(), "memory": memory, "rank": self.rank,
                "node_id": ray.get_runtime_context().get_node_id(), "pid": os.getpid()}
        gathered = [mine]
        if dist.is_initialized() and self.world > 1:
            gathered = [None] * self.world
            dist.all_gather_object(gathered, mine)
        return efficiency_report([g["meter"] for g in gathered], total_params=total_params,
                                 trainable_params=trainable, peak_flops=peak[0], peak_flops_source=peak[1],
                                 memory_mb=[g["memory"] for g in gathered], memory_kind=kind,
                                 method=self.config["method"]["name"], world_size=self.world) | {
            "workers": [{k: g[k] for k in ("rank", "node_id", "pid")} for g in gathered]}

    def checkpoint(self, metrics: dict, run: dict, efficiency: dict | None, final: bool) -> None:
        """Every rank writes its part (its RNG; DeepSpeed partitions) and reports; Ray Train merges the
        directories into one checkpoint in `storage_path`."""
        import ray.train

        with tempfile.TemporaryDirectory() as tmp:
            self.backend.save(tmp, self.rank)
            Path(tmp, RNG_DIR).mkdir()
            torch.save(rng_state(), Path(tmp, RNG_DIR, f"rank{self.rank}.pt"))
            probe = self.probe_logits() if final else None
            if self.rank == 0:
                Path(tmp, PROGRESS_FILE).write_text(json.dumps(run))
                Path(tmp, METRICS_FILE).write_text("".join(json.dumps(m) + "\n" for m in run["history"]))
                if efficiency:
                    Path(tmp, EFFICIENCY_FILE).write_text(json.dumps(efficiency, indent=2))
                    progress(format_report(efficiency))
                if probe:
                    torch.save(probe, Path(tmp, PROBE_FILE))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))

    @torch.no_grad()
    def probe_logits(self) -> dict:
        """Logits of the trained model on two validation rows: the export is checked against them."""
        if self.probe_rows is None:
            self.validate()
        inputs = collate(self.probe_rows, self.pad_id, self.device)
        self.backend.train(False)
        with self.backend.autocast():
            logits = self.backend.module(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"),
                                         position_ids=inputs.get("position_ids"), use_cache=False).logits
        self.backend.train(True)
        keep = {k: v.cpu() for k, v in inputs.items() if isinstance(v, torch.Tensor)}
        return {"inputs": keep, "logits": logits.float().cpu()}


def my_rows(batch: dict[str, np.ndarray], rank: int, world: int) -> dict[str, np.ndarray]:
    """This rank's contiguous slice of a global batch, with a `_weight` column; a rank left without rows gets
    one zero-weight copy of the first row so every rank runs the same number of forwards."""
    n = len(next(iter(batch.values())))
    per = -(-n // world)
    lo, hi = min(rank * per, n), min((rank + 1) * per, n)
    if lo == hi:
        return {k: v[:1] for k, v in batch.items()} | {"_weight": np.zeros(1)}
    return {k: v[lo:hi] for k, v in batch.items()} | {"_weight": np.ones(hi - lo)}


def should_stop(history: list[dict], early: dict | None) -> bool:
    """True when the last `patience` validations did not beat the best earlier one by more than `min_delta`
    (an equal value is no improvement)."""
    if not early:
        return False
    values = [m[early["metric"]] for m in history if early["metric"] in m]
    if len(values) <= early["patience"]:
        return False
    best_before = min(values[:-early["patience"]])
    return min(values[-early["patience"]:]) >= best_before - early["min_delta"]


def scored_token_losses(model, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token losses of the labelled positions only, flattened, and the batch row of each.

    The 49k-way vocabulary projection and its softmax are the largest single cost of a small model's step;
    prompts (system + question) and padding carry no loss, so the model is asked for logits at labelled
    positions only (a boolean `logits_to_keep`: hidden states are gathered before `lm_head`)."""
    labels = inputs["labels"]
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != -100  # logits at position p predict token p + 1
    # Packed rows carry position ids and no mask: the model then keeps attention inside each example
    # (transformers builds that block-diagonal mask only when no KV cache is in play, hence use_cache=False).
    mask = inputs.get("attention_mask")
    if mask is not None and bool((mask[:, 1:] <= mask[:, :-1]).all()):
        # Right padding only: causal attention already keeps every real token from seeing the padding after
        # it, so the mask changes nothing that is scored, and without it SDPA runs its unmasked causal kernel.
        mask = None
    boundaries = {k: inputs[k] for k in BOUNDARY_KEYS if k in inputs}  # a flattened row's examples
    logits = model(input_ids=inputs["input_ids"], attention_mask=mask, position_ids=inputs.get("position_ids"),
                   use_cache=False, logits_to_keep=keep, **boundaries).logits
    if logits.dim() == 3:  # a model without boolean logits_to_keep returned every position
        logits = logits[keep]
    targets = labels[:, 1:][keep[:, :-1]]
    losses = torch.nn.functional.cross_entropy(logits.float(), targets, reduction="none")
    return losses, keep.nonzero()[:, 0]


def causal_lm_loss(model, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Mean loss over the batch's labelled tokens, and their number."""
    losses, _ = scored_token_losses(model, inputs)
    n = losses.numel()
    return losses.sum() / max(n, 1), n


def lm_row_scores(module, rows: dict, pad_id: int, device: torch.device) -> list[tuple[str, float, dict]]:
    """(source, weight, {loss, tokens}) per row: the summed token loss of each validation row."""
    losses = row_losses(module, collate(rows, pad_id, device))
    return [(str(source), float(weight), {"loss": loss_sum, "tokens": n})
            for source, weight, (loss_sum, n) in zip(rows["source"], rows["_weight"], losses)]


def validation_metrics(sums: dict[str, dict[str, float]], domain_sources: list[str]) -> dict:
    """`val_loss/<source>` (token loss, or DPO loss for a source of pairs), `val_reward_*` for pairs, and the
    pooled `val_loss` / `val_reward_*` over the domain sources."""
    from honed.train.dpo import pair_metrics

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


def row_losses(model, inputs: dict[str, torch.Tensor]) -> list[tuple[float, int]]:
    """(sum of losses, number of labelled tokens) per row, for per-source validation."""
    losses, rows = scored_token_losses(model, inputs)
    n_rows = inputs["labels"].shape[0]
    sums = torch.zeros(n_rows, dtype=torch.float64).index_add_(0, rows, losses.double())
    counts = torch.bincount(rows, minlength=n_rows)
    return [(float(s), int(n)) for s, n in zip(sums, counts)]


def collate(batch: dict[str, np.ndarray], pad_id: int, device: torch.device, flat: bool = False) -> dict:
    """Right-pad a batch of variable-length examples (padding gets attention 0 and label -100), or stack a
    batch of packed rows with their position ids; `flat`: every example in one row with its boundaries
    (`honed.train.attention.flatten`). `n_tokens` counts the real (non-pad) tokens."""
    if flat:
        packed = "position_ids" in batch
        row, boundaries = flatten(batch["input_ids"], batch["labels"], batch["position_ids"] if packed else None,
                                  batch["num_tokens"] if packed else None)
        return ({k: v.to(device) for k, v in row.items()}
                | {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in boundaries.items()}
                | {"n_tokens": int(row["input_ids"].shape[1])})
    if "position_ids" in batch:
        stacked = {k: torch.tensor(np.stack(batch[k]), dtype=torch.long).to(device)
                   for k in ("input_ids", "labels", "position_ids")}
        return stacked | {"n_tokens": int(np.sum(batch["num_tokens"]))}
    lengths = [len(x) for x in batch["input_ids"]]
    width = max(lengths)
    ids = torch.full((len(lengths), width), pad_id, dtype=torch.long)
    labels = torch.full((len(lengths), width), -100, dtype=torch.long)
    mask = torch.zeros((len(lengths), width), dtype=torch.long)
    for row, (x, y, n) in enumerate(zip(batch["input_ids"], batch["labels"], lengths)):
        ids[row, :n] = torch.tensor(x)
        labels[row, :n] = torch.tensor(y)
        mask[row, :n] = 1
    return {"input_ids": ids.to(device), "labels": labels.to(device), "attention_mask": mask.to(device),
            "n_tokens": sum(lengths)}


def all_reduce_sum(values: list[float]) -> list[float]:
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


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


def new_window() -> dict:
    """Counters between two reports: throughput and loss are averaged over this window."""
    return {"tokens": 0, "loss_tokens": 0, "loss_sum": 0.0, "sums": {}, "start": time.perf_counter()}


def ray_report(metrics: dict) -> None:
    import ray.train

    ray.train.report(metrics)  # every worker reports: it is a barrier


def progress(message: str) -> None:
    # Straight to the process's stdout: Ray Train patches `print` to go through its logger *and* the
    # console, which shows every line twice on the driver.
    print(f"[honed.train] {message}", file=sys.__stdout__, flush=True)


def live_log(config: dict, record: dict) -> None:
    """Append to the run's live log (`output_dir/progress.jsonl` on rank 0's node): every logged step as it
    happens, steps redone after a failure included, plus `resumed` events."""
    path = config.get("live_log")
    if not path:
        return
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)  # output_dir need not exist yet (storage_path elsewhere)
        with open(path, "a") as fh:
            fh.write(json.dumps(record | {"time": round(time.time(), 3)}) + "\n")
    except OSError:
        pass  # rank 0 on a node without the driver's filesystem: the checkpointed metrics.jsonl is authoritative


def format_metrics(m: dict, total_steps: int) -> str:
    val = " ".join(f"{k}={v:.4f}" for k, v in m.items() if k.startswith("val_loss"))
    return (f"step {m['step']}/{total_steps} loss {m['loss']:.4f} lr {m['lr']:.2e} "
            f"{m['tokens_per_s']:.0f} tok/s {val}").rstrip()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
