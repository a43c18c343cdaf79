"""The per-worker training loop, top to bottom: load, wrap, (resume), loop, validate, report.

Runs inside Ray Train workers (`TorchTrainer(train_loop_per_worker, ...)`); `config` is a plain dict built
by `honed.train.trainer.train` from a validated `TrainConfig`.
"""

from __future__ import annotations

import json
import os
import random
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from honed.models import device_dtype, load_tokenizer

STATE_FILE = "trainer_state.pt"
METRICS_FILE = "metrics.jsonl"


def train_loop_per_worker(config: dict) -> None:
    import ray.train
    import ray.train.torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, get_scheduler

    torch.set_num_threads(config["torch_threads"])
    seed_everything(config["seed"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()

    tokenizer = load_tokenizer(config["model_path"])
    base = AutoModelForCausalLM.from_pretrained(
        config["model_path"], dtype=device_dtype(config["dtype"], device))
    model = get_peft_model(base, lora_config(config["lora"]))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total_params = sum(p.numel() for p in model.parameters())
    # Rotary buffers are constants: skipping their per-step broadcast saves a collective per forward.
    ddp_model = ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"broadcast_buffers": False})

    optim = config["optim"]
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=optim["lr"], weight_decay=optim["weight_decay"])
    total_steps = config["total_steps"]
    schedule = {"constant": "constant_with_warmup"}.get(optim["schedule"], optim["schedule"])
    scheduler = get_scheduler(schedule, optimizer, num_warmup_steps=optim["warmup_steps"],
                              num_training_steps=total_steps)

    step, history = 0, []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:  # Ray Train restores the latest checkpoint after a failure or a rerun of the same run
        with checkpoint.as_directory() as ckpt_dir:
            step, history = load_state(ckpt_dir, model, optimizer, scheduler)
        if rank == 0:
            progress(f"resumed at step {step}/{total_steps}")

    pad_id = tokenizer.pad_token_id
    shard = ray.train.get_dataset_shard("train")
    steps_per_epoch = config["steps_per_epoch"]
    window = new_window()
    ddp_model.train()
    while step < total_steps:
        epoch, skip = divmod(step, steps_per_epoch)
        batches = shard.iter_batches(batch_size=optim["batch_size"], batch_format="numpy", drop_last=True)
        for i, batch in enumerate(batches):
            if i < skip:
                continue  # data position on resume: the first `skip` batches of this epoch were trained on
            if i >= steps_per_epoch or step >= total_steps:
                break
            inputs = collate(batch, pad_id, device)
            loss, n_loss = causal_lm_loss(ddp_model, inputs)
            loss.backward()
            if optim["grad_clip"]:
                torch.nn.utils.clip_grad_norm_(model.parameters(), optim["grad_clip"])
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            window["tokens"] += inputs["n_tokens"]
            window["loss_tokens"] += n_loss
            window["loss_sum"] += loss.item() * n_loss

            last = step == total_steps
            if step % config["log_every"] == 0 or last or step % config["checkpoint_every"] == 0:
                metrics = window_metrics(window, step, epoch, scheduler.get_last_lr()[0], world)
                save = last or step % config["checkpoint_every"] == 0
                if save and (last or config["validate_at_checkpoints"]):
                    metrics.update(validate(model, pad_id, device, config["val_batch_size"]))
                metrics.update(trainable_params=trainable, total_params=total_params,
                               peak_rss_mb=round(peak_rss_mb(), 1))
                history.append(metrics)
                if rank == 0:
                    progress(format_metrics(metrics, total_steps))
                report(metrics, history, model, optimizer, scheduler, step, rank, save)
                window = new_window()


def scored_token_losses(model, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token next-token losses [batch, positions] and the mask of labelled ones.

    Logits over the 49k vocabulary are built only from the first labelled position on: prompts (system +
    question) carry no loss, so projecting them would be wasted work and memory."""
    labels = inputs["labels"]
    scored = (labels[:, 1:] != -100).any(dim=0).nonzero()
    start = int(scored[0]) if len(scored) else 0  # logits at position p predict token p + 1
    # Packed rows carry position ids and no mask: the model then keeps attention inside each example
    # (transformers builds that block-diagonal mask only when no KV cache is in play, hence use_cache=False).
    logits = model(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"),
                   position_ids=inputs.get("position_ids"), use_cache=False,
                   logits_to_keep=labels.shape[1] - start).logits[:, :-1]
    targets = labels[:, start + 1:]
    losses = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-100, reduction="none")
    return losses.view(targets.shape), targets != -100


def causal_lm_loss(model, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Mean loss over the batch's labelled tokens, and their number."""
    losses, mask = scored_token_losses(model, inputs)
    n = int(mask.sum())
    return losses.sum() / max(n, 1), n


def row_losses(model, inputs: dict[str, torch.Tensor]) -> list[tuple[float, int]]:
    """(sum of losses, number of labelled tokens) per row, for per-source validation."""
    losses, mask = scored_token_losses(model, inputs)
    return [(float(s), int(n)) for s, n in zip(losses.sum(dim=1), mask.sum(dim=1))]


def lora_config(settings: dict):
    from peft import LoraConfig

    return LoraConfig(r=settings["r"], lora_alpha=settings["alpha"], lora_dropout=settings["dropout"],
                      target_modules=settings["target_modules"], task_type="CAUSAL_LM")


def collate(batch: dict[str, np.ndarray], pad_id: int, device: torch.device) -> dict:
    """Right-pad a batch of variable-length examples (padding gets attention 0 and label -100), or stack a
    batch of packed rows with their position ids. `n_tokens` counts the real (non-pad) tokens."""
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


@torch.no_grad()
def validate(model, pad_id: int, device: torch.device, batch_size: int) -> dict:
    """Mean token loss per validation source, summed over all workers' shards."""
    import ray.train

    model.eval()
    sums: dict[str, list[float]] = {}
    for batch in ray.train.get_dataset_shard("val").iter_batches(batch_size=batch_size, batch_format="numpy"):
        for source, (loss_sum, n) in zip(batch["source"], row_losses(model, collate(batch, pad_id, device))):
            acc = sums.setdefault(str(source), [0.0, 0.0])
            acc[0] += loss_sum
            acc[1] += n
    model.train()
    return {f"val_loss/{source}": round(total / max(n, 1), 5) for source, (total, n) in all_reduce_sums(sums).items()}


def all_reduce_sums(sums: dict[str, list[float]]) -> dict[str, tuple[float, float]]:
    """Sum per-source [loss, tokens] across workers; sources are gathered first since shards differ."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return {k: tuple(v) for k, v in sums.items()}
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, sums)
    merged: dict[str, list[float]] = {}
    for part in gathered:
        for source, (loss, n) in part.items():
            acc = merged.setdefault(source, [0.0, 0.0])
            acc[0] += loss
            acc[1] += n
    return {k: tuple(v) for k, v in sorted(merged.items())}


def new_window() -> dict:
    """Counters between two reports: throughput and loss are averaged over this window."""
    return {"tokens": 0, "loss_tokens": 0, "loss_sum": 0.0, "start": time.perf_counter()}


def window_metrics(window: dict, step: int, epoch: int, lr: float, world: int) -> dict:
    elapsed = time.perf_counter() - window["start"]
    return {
        "step": step, "epoch": epoch, "lr": lr,
        "loss": round(window["loss_sum"] / max(window["loss_tokens"], 1), 5),
        # every worker runs the same number of steps on same-sized batches, so tokens scale with world size
        "tokens_per_s": round(window["tokens"] * world / max(elapsed, 1e-9), 1),
    }


def progress(message: str) -> None:
    # Straight to the process's stdout: Ray Train patches `print` to go through its logger *and* the
    # console, which shows every line twice on the driver.
    print(f"[honed.train] {message}", file=sys.__stdout__, flush=True)


def format_metrics(m: dict, total_steps: int) -> str:
    val = " ".join(f"{k}={v:.4f}" for k, v in m.items() if k.startswith("val_loss/"))
    return (f"step {m['step']}/{total_steps} loss {m['loss']:.4f} lr {m['lr']:.2e} "
            f"{m['tokens_per_s']:.0f} tok/s {val}").rstrip()


def report(metrics, history, model, optimizer, scheduler, step, rank, save: bool) -> None:
    """Every worker reports (it is a barrier); rank 0 attaches the checkpoint."""
    import ray.train

    if not (save and rank == 0):
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(os.path.join(tmp, "adapter"))
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "step": step,
                    "rng": rng_state()}, os.path.join(tmp, STATE_FILE))
        Path(tmp, METRICS_FILE).write_text("".join(json.dumps(m) + "\n" for m in history))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def load_state(ckpt_dir: str, model, optimizer, scheduler) -> tuple[int, list[dict]]:
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    set_peft_model_state_dict(model, load_file(os.path.join(ckpt_dir, "adapter", "adapter_model.safetensors")))
    state = torch.load(os.path.join(ckpt_dir, STATE_FILE), weights_only=False)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    history = [json.loads(line) for line in Path(ckpt_dir, METRICS_FILE).read_text().splitlines()]
    return state["step"], history


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


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
