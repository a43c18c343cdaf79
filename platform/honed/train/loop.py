"""The per-worker training loop, top to bottom: set up → step loop → report.

    TorchTrainer(train_loop_per_worker, train_loop_config={"cfg": cfg, "plan": plan, "val_rows": rows,
                                                           "train_rows": table_or_None})

Runs inside Ray Train workers; `cfg` is the validated `TrainConfig`, `plan` the frozen `RunPlan` the driver
built once (honed.train.plan). The loss is chosen by method (`objective_for`); validation
(honed.train.validation) and checkpointing (honed.train.checkpointing) are plain functions of the `Worker`.

Data: every worker iterates the same ordered stream of global micro-batches (`batch_size x world` rows) and
trains on its own slice of each, so the examples of a step, and hence the loss curve, do not depend on which
worker reads faster; on resume the stream is replayed from the start of the epoch and the micro-batches
already trained are skipped. A global micro-batch that runs short still gives every worker a row (a
zero-weight copy), so collective-heavy backends (ZeRO-3) see the same number of forwards on every rank. A train
set under `inline_data_mb` comes read by the driver and is served as the same stream (`InlineStream`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import torch

from honed.config import TrainConfig
from honed.models import load_tokenizer
from honed.train import session
from honed.train.attention import use_varlen
from honed.train.backends import make_backend, model_hidden_size, run_deepspeed_config
from honed.train.batching import length_grouped
from honed.train.checkpointing import RunState, restore, save_checkpoint, seed_everything
from honed.train.collate import RowCost, numpy_batch, rank_rows
from honed.train.efficiency import (
    AnonPeak, device_peak_flops, efficiency_report, format_report, held_params, matmul_params, peak_memory_mb,
    row_cost, rss_anon_mb, tensor_mb,
)
from honed.train.losses import LMObjective
from honed.train.methods import (
    big_allocations_mapped, bitsandbytes_loaded, build_model, compile_decoder, compute_dtype, count_params,
    keep_bitsandbytes_out, needs_bitsandbytes, sharded_loading,
)
from honed.train.plan import RunPlan
from honed.train.validation import all_reduce_sum, should_stop, validate


class Phases:
    """Seconds this worker spent by phase (set-up, waiting for the first batch, training steps, validation,
    checkpoints), for the run's `phases` (honed.train.trainer.job_phases adds the driver's part)."""

    def __init__(self):
        self.started_at = time.time()
        self.seconds: dict[str, float] = {}

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    @contextlib.contextmanager
    def timed(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - start)

    def report(self) -> dict:
        return {"started_at": self.started_at, "finished_at": time.time()} | {
            f"{name}_s": round(seconds, 3) for name, seconds in self.seconds.items()}


@dataclasses.dataclass
class Worker:
    """What one training process holds for the whole run."""

    cfg: TrainConfig
    plan: RunPlan
    backend: object  # honed.train.backends.TorchBackend or DeepSpeedBackend
    objective: object  # LMObjective or honed.train.dpo.DPOObjective
    pad_id: int
    device: torch.device
    rank: int
    world: int
    trainable_params: int
    total_params: int
    peak_flops: tuple[float, str]  # FLOP/s of this worker's device, and where the figure comes from
    load: dict = dataclasses.field(default_factory=dict)  # memory and parameters held while the model loaded
    zero3: object = None  # transformers' HfDeepSpeedConfig under ZeRO-3: alive as long as the model
    val_rows: dict | None = None  # the capped validation set as columns, read once by the driver
    phases: Phases = dataclasses.field(default_factory=Phases)  # where this worker's time went
    # what a row costs beyond its tokens, training and validating: how global batches are split between ranks
    train_cost: RowCost = RowCost()
    val_cost: RowCost = RowCost()


def train_loop_per_worker(config: dict) -> None:
    cfg, plan = config["cfg"], config["plan"]
    phases = Phases()
    if session.in_ray_train_worker() and not needs_bitsandbytes(cfg.method, cfg.optim):
        keep_bitsandbytes_out()  # before peft is imported: its import would pull bitsandbytes in (~1 s a worker)
    # Ray Data starts the train stream while the model loads; a small train set came with the config
    stream = EarlyStream(plan) if config.get("train_rows") is None else InlineStream(config["train_rows"], plan)
    with phases.timed("worker_setup"):
        worker = setup(cfg, plan, phases)
        worker.val_rows, worker.phases = config["val_rows"], phases
        with phases.timed("worker_setup.restore"):
            state = restore(worker)
    if state is None:
        state = RunState()
    elif worker.rank == 0:
        progress(f"resumed at step {state.step}/{plan.total_steps}")
        live_log(plan.live_log, {"event": "resumed", "step": state.step})
    if state.step >= plan.total_steps:  # a rerun of a finished run
        return
    window = Window()
    step_start = time.perf_counter()
    worker.backend.train()
    for epoch, micro_batches in optimizer_steps(worker, state, stream):
        if "first_batch" not in phases.seconds:  # what is left of Ray Data's start-up after the set-up
            phases.add("first_batch", time.perf_counter() - step_start)
            step_start = time.perf_counter()
        inputs = [worker.objective.collate(rows, worker.pad_id, worker.device) for rows in micro_batches]
        share = objective_share(worker, inputs)
        step_tokens = [0, 0, 0]  # fed, non-pad, labelled: this worker, this optimizer step
        for k, micro in enumerate(inputs):
            boundary = k == len(inputs) - 1
            with worker.backend.no_sync(boundary):
                with worker.backend.autocast():
                    loss_sum, units, sums = worker.objective.loss(worker.backend.module, micro)
                worker.backend.backward(loss_sum * share, boundary)
            window.add(loss_sum.item(), units, sums)
            labelled = int((micro["labels"][:, 1:] != -100).sum())
            for j, n in enumerate((micro["input_ids"].numel(), micro["n_tokens"], labelled)):
                step_tokens[j] += n
        grad_norm = worker.backend.step()
        state.step += 1
        step_time = time.perf_counter() - step_start
        state.meter.add(step_time, *step_tokens)
        phases.add("training_steps", step_time)
        window.tokens += step_tokens[1]
        if end_of_step(worker, state, window, epoch, grad_norm):
            return
        if state.step % cfg.log_every == 0 or state.step % cfg.checkpoint_every == 0:
            window = Window()
        step_start = time.perf_counter()


def objective_share(worker: Worker, inputs: list[dict]) -> float:
    """The factor that turns a micro-batch's summed loss into its share of the step's objective: the mean over
    every unit (labelled token, or pair for dpo) of the global batch, across ranks and micro-batches. DDP and
    DeepSpeed average gradients over the `world` ranks, hence world / total. One all-reduce of a number per step."""
    (total,) = all_reduce_sum([float(sum(worker.objective.units(x) for x in inputs))])
    return worker.world / max(total, 1.0)


def setup(cfg: TrainConfig, plan: RunPlan, phases: Phases | None = None) -> Worker:
    """Threads, seeds, the pad id, the model with its method applied, the backend, the objective and the peak
    FLOP/s that MFU is measured against; each part timed into `phases` as `worker_setup.<part>`."""
    phases = phases or Phases()
    torch.set_num_threads(cfg.scaling.torch_threads)
    rank, world = session.rank_and_world()
    device = session.device()

    seed_everything(cfg.seed)  # identical initial weights (LoRA matrices, prefixes) on every rank
    with phases.timed("worker_setup.tokenizer"):  # only for the pad id, when prepare did not record it
        pad_id = plan.pad_id if plan.pad_id is not None else load_tokenizer(plan.model_path).pad_token_id
    ds_config = run_deepspeed_config(cfg, device, model_hidden_size(plan.model_path)) \
        if cfg.method.deepspeed.enabled else None
    zero3 = sharded_loading(ds_config)  # ZeRO-3: each rank builds only its partition of the model
    with AnonPeak() as loading, big_allocations_mapped(enabled=zero3 is not None), phases.timed("worker_setup.model"):
        model = build_model(cfg.method, plan.model_path, cfg.model.dtype, device, cfg.model.attn_implementation)
    trainable, total = count_params(model)
    load = {"baseline_anon_mb": round(loading.baseline_mb, 1), "peak_anon_mb": round(loading.peak_mb, 1),
            "params_held": held_params(model), "params_total": total, "fp32_model_mb": round(total * 4 / 2**20, 1),
            "zero3": zero3 is not None, "bitsandbytes_loaded": bitsandbytes_loaded()}
    progress(f"rank {rank} loaded {load['params_held']:,} of {total:,} parameter values; anonymous memory "
             f"{load['baseline_anon_mb']:.0f} → peak {load['peak_anon_mb']:.0f} MB (fp32 model: "
             f"{load['fp32_model_mb']:.0f} MB)")
    if cfg.optim.padding_free:
        load["attention"] = use_varlen(model)  # the kernel's own varlen path, or honed's per-example SDPA
    if cfg.optim.compile:
        compile_decoder(model)
    with phases.timed("worker_setup.backend"):
        backend = make_backend(model, cfg, plan.total_steps, device, ds_config)
    seed_everything(cfg.seed + rank)  # then one dropout stream per rank
    with phases.timed("worker_setup.peak_flops"):
        peak = peak_flops(cfg, device)
    params = matmul_params(model, total, trainable)
    return Worker(cfg=cfg, plan=plan, backend=backend, objective=objective_for(cfg, backend.model),
                  pad_id=pad_id, device=device, rank=rank, world=world, trainable_params=trainable,
                  total_params=total, peak_flops=peak, load=load, zero3=zero3,
                  train_cost=row_cost(model, cfg.method.name, params),
                  val_cost=row_cost(model, cfg.method.name, params, training=False))


def objective_for(cfg: TrainConfig, model):
    """The loss by method: DPO's preference loss, or the next-token loss of every other method."""
    if cfg.method.name == "dpo":
        from honed.train.dpo import DPOObjective

        return DPOObjective(cfg.method.dpo, model)
    return LMObjective(flat=bool(cfg.optim.padding_free))


def peak_flops(cfg: TrainConfig, device: torch.device) -> tuple[float, str]:
    """MFU's peak for this worker (honed.train.efficiency.device_peak_flops): its node's best measured figure,
    measured again by every worker at the same moment, after a barrier, when any worker has none."""
    import torch.distributed as dist

    def barrier() -> None:
        if dist.is_initialized():
            dist.barrier()

    def everyone(have: bool) -> bool:
        (count,) = all_reduce_sum([float(have)])
        return count == (dist.get_world_size() if dist.is_initialized() else 1)

    return device_peak_flops(device, compute_dtype(cfg.model.dtype, device), cfg.efficiency.peak_flops, barrier,
                             everyone)


class EarlyStream:
    """The train stream's first pass, started in a thread at once: its first global micro-batch is read while
    the worker loads the model (Ray Data's start-up took ~7 s on 2 CPUs, as long as the set-up). Every epoch
    reads the same ordered stream, so the first pass serves whichever epoch the run starts (or resumes) in."""

    def __init__(self, plan: RunPlan):
        import threading

        self.shard, self.batch_size = session.dataset_shard("train"), plan.global_micro_batch
        self.batches, self.first, self.error = self.epoch(), None, None
        self.thread = threading.Thread(target=self._read_first, daemon=True)
        self.thread.start()

    def epoch(self):
        return iter(self.shard.iter_batches(batch_size=self.batch_size, batch_format="numpy", drop_last=True))

    def _read_first(self) -> None:
        try:
            self.first = next(self.batches, None)
        except BaseException as err:  # raised in the training thread, where Ray Train sees it
            self.error = err

    def first_pass(self):
        """The first pass over the stream, starting with the batch read early."""
        self.thread.join()
        if self.error:
            raise self.error
        if self.first is not None:
            yield self.first
            yield from self.batches


class InlineStream:
    """The train set the driver read whole (`inline_data_mb`: honed.train.trainer.inline_train_rows), served as
    the stream Ray Data would give: the same ordered global micro-batches, the last short one dropped."""

    def __init__(self, table, plan: RunPlan):
        self.table, self.batch_size = table, plan.global_micro_batch

    def epoch(self):
        whole = self.table.num_rows - self.table.num_rows % self.batch_size
        for lo in range(0, whole, self.batch_size):
            yield numpy_batch(self.table.slice(lo, self.batch_size))

    def first_pass(self):
        return self.epoch()


def optimizer_steps(worker: Worker, state: RunState, stream: EarlyStream | InlineStream):
    """(epoch, this rank's rows of each micro-batch) for every optimizer step still to train, epoch after epoch;
    the steps of the current epoch that `state` already trained are skipped."""
    optim, plan = worker.cfg.optim, worker.plan
    passes = 0
    while True:
        epoch, done_in_epoch = divmod(state.step, plan.steps_per_epoch)
        skip = done_in_epoch * optim.grad_accum_steps  # micro-batches of this epoch already trained
        batches = stream.first_pass() if passes == 0 else stream.epoch()
        passes += 1
        batches = length_grouped(batches, optim.group_by_length, seed=(worker.cfg.seed, epoch))
        step: list[dict] = []
        for i, global_batch in enumerate(batches):
            if i < skip:
                continue
            if i >= plan.micro_batches_per_epoch:
                break
            step.append(rank_rows(global_batch, worker.rank, worker.world, worker.train_cost))
            if len(step) == optim.grad_accum_steps:
                yield epoch, step
                step = []


class Window:
    """Counters between two reports: throughput and loss are averaged over this window."""

    def __init__(self):
        self.tokens, self.loss_tokens, self.loss_sum = 0, 0, 0.0
        self.sums: dict[str, float] = {}
        self.start = time.perf_counter()

    def add(self, loss_sum: float, units: int, sums: dict[str, float]) -> None:
        self.loss_sum += loss_sum
        self.loss_tokens += units
        for key, value in sums.items():
            self.sums[key] = self.sums.get(key, 0.0) + value


def end_of_step(worker: Worker, state: RunState, window: Window, epoch: int, grad_norm: float) -> bool:
    """Log, validate, checkpoint as the step calls for; True when training is over (last step or early stop)."""
    cfg, step = worker.cfg, state.step
    last = step >= worker.plan.total_steps
    save = last or step % cfg.checkpoint_every == 0
    if not (save or step % cfg.log_every == 0):
        return False
    metrics = window_metrics(worker, window, step, epoch, grad_norm)
    early_stop = False
    if save and (last or worker.plan.validate_at_checkpoints):
        with worker.phases.timed("validation"):
            metrics.update(validate(worker))
        early_stop = should_stop(state.history + [metrics], cfg.early_stopping)
        if early_stop and worker.rank == 0:
            progress(f"early stop at step {step}: {cfg.early_stopping.metric} has not improved "
                     f"for {cfg.early_stopping.patience} validations")
    metrics["peak_memory_mb"] = round(peak_memory_mb(worker.device)[0], 1)
    state.history.append(metrics)
    if worker.rank == 0:
        progress(format_metrics(metrics, worker.plan.total_steps))
        live_log(worker.plan.live_log, metrics)
    if not save and not early_stop:
        session.report(metrics)
        return False
    done = last or early_stop
    efficiency = run_efficiency(worker, state) if done else None
    if efficiency and worker.rank == 0:
        progress(format_report(efficiency))
    with worker.phases.timed("checkpoints"):  # the final one ends after the report: the driver times it
        save_checkpoint(worker, state, metrics, efficiency, final=done)
    return done


def window_metrics(worker: Worker, window: Window, step: int, epoch: int, grad_norm: float) -> dict:
    elapsed = time.perf_counter() - window.start
    keys = sorted(window.sums)
    loss_sum, loss_tokens, tokens, *extra = all_reduce_sum(
        [window.loss_sum, window.loss_tokens, window.tokens] + [window.sums[k] for k in keys])
    metrics = {"step": step, "epoch": epoch, "lr": worker.backend.lr, "loss": round(loss_sum / max(loss_tokens, 1), 5),
               "grad_norm": round(grad_norm, 4), "tokens_per_s": round(tokens / max(elapsed, 1e-9), 1)}
    if keys:  # dpo: reward accuracy and margins of the window's training pairs
        from honed.train.dpo import pair_metrics

        metrics |= pair_metrics(dict(zip(keys, extra)))
    return metrics


def run_efficiency(worker: Worker, state: RunState) -> dict:
    """The run's efficiency report from every worker's meter and peak memory (gathered to all ranks)."""
    import torch.distributed as dist

    import ray

    memory, kind = peak_memory_mb(worker.device)
    mine = {"meter": state.meter.state(), "memory": memory, "rank": worker.rank,
            "node_id": ray.get_runtime_context().get_node_id(), "pid": os.getpid(),
            "load": worker.load | {"anon_mb_after_training": round(rss_anon_mb(), 1),
                                   "tensor_mb_after_training": round(tensor_mb(worker.device.type), 1)}}
    gathered = [mine]
    if dist.is_initialized() and worker.world > 1:
        gathered = [None] * worker.world
        dist.all_gather_object(gathered, mine)
    return efficiency_report([g["meter"] for g in gathered], total_params=worker.total_params,
                             trainable_params=worker.trainable_params, peak_flops=worker.peak_flops[0],
                             params=matmul_params(worker.backend.model, worker.total_params, worker.trainable_params),
                             peak_flops_source=worker.peak_flops[1], memory_mb=[g["memory"] for g in gathered],
                             memory_kind=kind, method=worker.cfg.method.name, world_size=worker.world) | {
        "workers": [{k: g[k] for k in ("rank", "node_id", "pid", "load")} for g in gathered],
        "worker_phases": worker.phases.report()}




def progress(message: str) -> None:
    # Straight to the process's stdout: Ray Train patches `print` to go through its logger *and* the
    # console, which shows every line twice on the driver.
    print(f"[honed.train] {message}", file=sys.__stdout__, flush=True)


def live_log(path: str, record: dict) -> None:
    """Append to the run's live log (`output_dir/progress.jsonl` on rank 0's node): every logged step as it
    happens, steps redone after a failure included, plus `resumed` events."""
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
