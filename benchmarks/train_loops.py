"""The training runs the benchmarks measure, each in a fresh process started by `train_runs`:

    python benchmarks/train_loops.py KIND SPEC_JSON RESULT_JSON

  honed        a driver with its own local Ray calls `honed.train.trainer.train(cfg)` (Ray Train TorchTrainer,
               fresh worker processes) and returns the run's efficiency report, metrics and live-log times
  bare         a plain PyTorch (+ peft) loop, timed per step and per phase: the same shards in the same order,
               the same warm-up + cosine schedule, gradient clipping 1.0. SPEC `kernels` says what it computes:
                 honed  (default) the step of honed's per-worker loop: honed's model builder (CPU LoRA dropout),
                        fused AdamW with honed's parameter groups, honed's batches (padding-free rows as honed's
                        default, padded when SPEC `padding_free` is false) and loss (logits at labelled positions
                        only): what is left is Ray Train + the loop
                 plain  a bare eager loop: the HF model and peft as they come, the model's own loss (`labels=`,
                        logits at every position), torch AdamW's default implementation
               then, as SPEC asks, a profile, the AdamW implementations or the tensor peak (`step_breakdown`)
  hf           `transformers.Trainer` + peft on the same rows: the HF comparison
  trl          TRL's `SFTTrainer` + peft on the same rows (benchmark-only: pip install -e .[bench])
  interleaved  one LoRA model trained on several batch layouts step by step in turn in this one process: a
               same-machine-state A/B for effects smaller than the noise between processes
  variants     `step_breakdown.loss_variants` on the first batch of each of several datasets
  floor        the resident memory of a process that has imported what a training worker imports
  prepare      (not measured) `honed prepare` of a job config; model_path: the model's local directory

honed's internals are imported inside the functions that use them (`floor` measures what importing them
costs, and the benchmark drivers import neither torch nor Ray): every such import of the benchmarks is in
this file, but for the numpy-only `honed.train.batching` in train_runs.
"""

from __future__ import annotations

import os
import random
import resource
import shutil
import time
from pathlib import Path

from harness import WORK, child_main
from train_runs import GROUP_BY_LENGTH, LORA, WARMUP_STEPS_EXCLUDED, batched_rows, train_rows

PROCESS_START = time.time()  # the job's wall time counts from here: imports are part of every job


# ------------------------------------------------------------------------------------------ honed itself
def honed_main(spec: dict) -> dict:
    """In a fresh driver process: local Ray (or the running one at `ray_address`), one `train(cfg)`, its efficiency report, live log and where the
    whole job's wall time went (`job_phases`)."""
    import ray

    from honed.artifacts import LIVE_LOG, read_jsonl, read_metrics
    from honed.config import TrainConfig
    from honed.runtime import _quiet_data_logs
    from honed.train.trainer import train

    cfg = TrainConfig.model_validate(spec["config"])
    shutil.rmtree(cfg.output_dir, ignore_errors=True)  # a leftover run of the same name would be resumed
    Path(cfg.output_dir).mkdir(parents=True)
    gpu = cfg.scaling.use_gpu
    marks = {"imported": time.time()}
    if spec.get("ray_address"):  # a running Ray (harness.RunningRay), as a job submitted to a cluster finds it
        ray.init(address=spec["ray_address"], logging_level="WARNING")
    else:  # address="local": a fresh Ray of our own, never another session's cluster on the same machine
        ray.init(address="local", num_cpus=spec.get("ray_cpus", os.cpu_count()), num_gpus=1 if gpu else 0,
                 include_dashboard=False, logging_level="WARNING")
    _quiet_data_logs()
    marks["ray_ready"] = started = time.time()
    metrics = train(cfg)
    marks["trained"] = time.time()
    ray.shutdown()
    marks["shut_down"] = time.time()
    live = [r for r in read_jsonl(Path(cfg.output_dir) / LIVE_LOG) if "step" in r and "loss" in r]
    return {"train_call_s": round(marks["trained"] - started, 1), "efficiency": metrics["efficiency"],
            "final_loss": metrics.get("loss"), "history": read_metrics(cfg.output_dir),
            "live_times": [{"step": r["step"], "time": r["time"], "loss": r.get("loss")} for r in live],
            "job_phases": job_phases(marks, [r["time"] for r in live])}


def job_phases(marks: dict, step_times: list[float]) -> dict:
    """The whole job's wall time in parts, from this process's start (`PROCESS_START`): Python imports, Ray's
    start, `train()` up to the first logged step (Ray Train's workers, model load, data set-up, the steps up
    to it), the steps between the first and the last logged one, the rest of `train()` (checkpoint copy,
    export check, report; the final validation runs before the last step is logged), Ray's shutdown."""
    first, last = (step_times[0], step_times[-1]) if step_times else (marks["trained"], marks["trained"])
    parts = {"python_imports_s": marks["imported"] - PROCESS_START,
             "ray_start_s": marks["ray_ready"] - marks["imported"],
             "to_first_logged_step_s": first - marks["ray_ready"], "logged_steps_s": last - first,
             "after_last_logged_step_s": marks["trained"] - last,
             "ray_shutdown_s": marks["shut_down"] - marks["trained"]}
    return {k: round(v, 2) for k, v in parts.items()} | {"job_s": round(marks["shut_down"] - PROCESS_START, 2)}


def honed_model_and_optimizer(spec: dict, device):
    """honed's own model builder (peft config, CPU dropout, activation checkpointing) and optimizer (fused
    AdamW or the named bitsandbytes one, honed's param groups) for spec `method`, `lr`, `lora`, `optimizer`."""
    from honed.config import MethodConfig, OptimConfig
    from honed.train.methods import build_model, make_optimizer, param_groups

    name = spec["method"]
    method = MethodConfig(name=name, activation_checkpointing=spec.get("activation_checkpointing", False),
                          **({"lora": spec.get("lora", LORA)} if name in ("lora", "qlora") else {}))
    optim = OptimConfig(lr=spec["lr"], weight_decay=0.0, optimizer=spec.get("optimizer", "adamw"))
    model = build_model(method, spec["model_path"], "auto", device)
    return model, make_optimizer(optim, param_groups(model, method, optim))


def collate_rows(batch: list[dict], pad_id: int, device, flat: bool = False) -> dict:
    """honed's collate over a list of shard rows: right-padded (or stacked packed) rows, or with `flat` one
    padding-free row (optim.padding_free); `n_tokens` counts the non-pad tokens."""
    from honed.train.collate import collate

    return collate({k: [r[k] for r in batch] for k in batch[0]}, pad_id, device, flat=flat)


def honed_loss(model, inputs: dict):
    """honed's loss: mean CE over labelled tokens, logits at labelled positions only; (loss, labelled tokens)."""
    from honed.train.losses import causal_lm_loss

    return causal_lm_loss(model, inputs)


def loss_variants(model, batch: dict, device, repeats: int) -> dict:
    """`step_breakdown.loss_variants` with honed's loss and CPU LoRA dropout."""
    from honed.train.methods import use_fast_dropout
    from step_breakdown import loss_variants as variants

    return variants(model, batch, device, repeats, honed_loss=honed_loss, fast_dropout=use_fast_dropout)


def pad_id_of(model_path: str) -> int:
    """honed's tokenizer loader: eos when the model has no pad token."""
    from honed.models import load_tokenizer

    return load_tokenizer(model_path).pad_token_id


def set_up(spec: dict):
    """SPEC's torch threads and seed; the device (SPEC `gpu`: CUDA)."""
    import torch

    torch.set_num_threads(spec.get("threads", 1))
    seed_all(spec.get("seed", 0))
    return torch.device("cuda" if spec.get("gpu") else "cpu")


def seed_all(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def compute_dtype(device):
    import torch

    return torch.bfloat16 if device.type == "cuda" else torch.float32


# ------------------------------------------------------------------------------------ the bare loop
def bare_main(spec: dict) -> dict:
    """A bare PyTorch (+ peft) training loop in this process; see the module docstring."""
    from transformers import get_scheduler

    from honed.train.attention import use_varlen
    from honed.train.efficiency import measure_peak_flops

    device = set_up(spec)
    plain = spec.get("kernels", "honed") == "plain"
    pad_id = pad_id_of(spec["model_path"])
    model, optimizer = plain_model_and_optimizer(spec, device) if plain else honed_model_and_optimizer(spec, device)
    steps, extra = spec["steps"], spec.get("profile_steps", 0)
    scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=spec.get("warmup", 10), num_training_steps=steps)
    seed_all(spec.get("seed", 0))  # the dropout stream, as honed re-seeds (seed + rank 0) after building
    peak = measure_peak_flops(device, compute_dtype(device)) if spec.get("measure_peak") else None
    # honed's batches (length-grouped like its loop) or, for the plain loop, shard order
    needed = steps + extra + (1 if spec.get("tensor_memory") else 0)
    if spec.get("synthetic_length"):  # long text: every position labelled, as a text source's windows are
        rows = synthetic_rows(spec["synthetic_length"], spec["batch_size"] * needed, pad_id)
    else:
        rows = batched_rows(Path(spec["data_dir"]), spec["batch_size"], needed,
                            1 if plain else spec.get("group_by_length", GROUP_BY_LENGTH))
    if spec.get("logit_budget"):  # the loss's chunking threshold (honed.train.losses.LOGIT_BUDGET)
        import honed.train.losses

        honed.train.losses.LOGIT_BUDGET = spec["logit_budget"]
    flat = not plain and spec.get("padding_free", True)  # honed's loop: optim.padding_free (on for lora/full)
    if flat:
        use_varlen(model)
    step = BareStep(model, optimizer, scheduler, rows, spec["batch_size"], pad_id, device, plain, flat)
    model.train()
    result = bare_summary([step(s) for s in range(steps)], model, optimizer, device, peak)
    return result | step_diagnostics(spec, step, steps, extra, device)


def synthetic_rows(length: int, n: int, pad_id: int) -> list[dict]:
    """`n` rows of `length` random tokens (seeded), every position labelled."""
    import numpy as np

    rng = np.random.default_rng(0)
    ids = [rng.integers(pad_id + 1 if pad_id < 100 else 100, 40000, size=length).tolist() for _ in range(n)]
    return [{"input_ids": x, "labels": x} for x in ids]


def step_diagnostics(spec: dict, step, steps: int, extra: int, device) -> dict:
    """What SPEC asks of `step_breakdown` after the timed steps: a profile of `profile_steps` more steps, the
    tensor peak of one more, AdamW implementations side by side."""
    from step_breakdown import optimizer_variants, profile_steps, tensor_memory

    out = {}
    if extra:
        out["profile"] = profile_steps(step, range(steps, steps + extra), device)
    if spec.get("tensor_memory"):
        out["tensor_memory"] = tensor_memory(step, steps + extra, step.model, step.optimizer, device)
    if spec.get("optimizer_variants"):
        out["optimizer_variants"] = optimizer_variants(step.params, spec["lr"], spec["optimizer_variants"], step.sync)
    return out


class BareStep:
    """`step(s)` trains batch `s` of `rows` and returns its timings: collate, forward + loss, backward, then
    clipping 1.0, the optimizer and the schedule; each phase inside `record_function("phase:...")` for the
    profiler. `plain`: the model's own loss; otherwise honed's."""

    def __init__(self, model, optimizer, scheduler, rows: list[dict], batch_size: int, pad_id: int, device,
                 plain: bool, flat: bool):
        import torch

        self.model, self.optimizer, self.scheduler, self.rows = model, optimizer, scheduler, rows
        self.batch_size, self.pad_id, self.device, self.plain, self.flat = batch_size, pad_id, device, plain, flat
        self.params = [p for p in model.parameters() if p.requires_grad]
        compute = compute_dtype(device)
        self.autocast = torch.autocast(device.type, dtype=compute, enabled=compute != torch.float32)
        self.sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)

    def loss(self, inputs: dict):
        """(loss, labelled tokens): plain: the model's own loss (logits at every position); honed: honed's
        loss (logits at labelled positions only, no mask on right-padded rows)."""
        if not self.plain:
            return honed_loss(self.model, inputs)
        out = self.model(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"),
                         position_ids=inputs.get("position_ids"), labels=inputs["labels"], use_cache=False)
        return out.loss, int((inputs["labels"][:, 1:] != -100).sum())

    def __call__(self, s: int) -> dict:
        import torch
        from torch.profiler import record_function

        r0, c0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.process_time(), time.perf_counter()
        with record_function("phase:data"):
            inputs = collate_rows(self.rows[s * self.batch_size:(s + 1) * self.batch_size], self.pad_id,
                                  self.device, self.flat)
        self.sync()
        t1 = time.perf_counter()
        with record_function("phase:forward"), self.autocast:
            loss, n_loss = self.loss(inputs)
        self.sync()
        t2 = time.perf_counter()
        with record_function("phase:backward"):
            loss.backward()
        self.sync()
        t3 = time.perf_counter()
        with record_function("phase:optimizer"):
            norm = torch.nn.utils.clip_grad_norm_(self.params, 1.0)
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            loss_value, norm = loss.item(), float(norm)
        t4 = time.perf_counter()
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        return {"seconds": t4 - t0, "cpu_s": time.process_time() - c0, "sys_s": r1.ru_stime - r0.ru_stime,
                "minor_faults": r1.ru_minflt - r0.ru_minflt, "data_s": t1 - t0, "forward_s": t2 - t1,
                "backward_s": t3 - t2, "optimizer_s": t4 - t3, "fed": int(inputs["input_ids"].numel()),
                "nonpad": inputs["n_tokens"], "labelled": n_loss, "loss": loss_value, "grad_norm": norm}


def bare_summary(per_step: list[dict], model, optimizer, device, peak: float | None) -> dict:
    """Rates over the steps after the warm-up, the model's size, peak memory (CUDA max allocated, or the
    process's max RSS) and, with a measured `peak`, MFU (6 · all parameters · non-pad tokens/s / peak)."""
    import torch

    from step_breakdown import memory_parts

    if device.type == "cuda":
        peak_mem, mem_kind = torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_allocated"
    else:
        peak_mem, mem_kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "cpu_max_rss"
    params = list(model.parameters())
    total_params = sum(p.quant_state.shape.numel() if getattr(p, "quant_state", None) is not None else p.numel()
                       for p in params)
    measured = per_step[WARMUP_STEPS_EXCLUDED:]
    seconds = sum(s["seconds"] for s in measured)
    nonpad = sum(s["nonpad"] for s in measured)
    result = {
        "total_params": total_params, "trainable_params": sum(p.numel() for p in params if p.requires_grad),
        "per_step": [{k: (round(v, 5) if isinstance(v, float) else v) for k, v in s.items()} for s in per_step],
        "measured_steps": len(measured), "seconds": round(seconds, 4),
        "step_time_s": round(seconds / max(len(measured), 1), 4),
        "tokens_per_s": round(sum(s["fed"] for s in measured) / seconds, 2) if seconds else None,
        "nonpad_tokens_per_s": round(nonpad / seconds, 2) if seconds else None,
        "phase_share": {k: round(sum(s[k] for s in measured) / seconds, 4)
                        for k in ("data_s", "forward_s", "backward_s", "optimizer_s")} if seconds else None,
        "peak_flops": peak, "peak_memory_mb": round(peak_mem, 1), "memory_kind": mem_kind,
        "threads": torch.get_num_threads(), "memory_parts": memory_parts(model, optimizer),
    }
    if peak and seconds:
        result["mfu"] = round(6 * total_params * nonpad / seconds / peak, 4)
    return result


def plain_model_and_optimizer(spec: dict, device):
    """`plain_model` and torch AdamW's default implementation over its trainable weights."""
    import torch

    model = plain_model(spec, device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([{"params": trainable, "lr": spec["lr"], "weight_decay": 0.0}], lr=spec["lr"],
                                  betas=(0.9, 0.999), weight_decay=0.0)
    return model, optimizer


def plain_model(spec: dict, device):
    """The HF model as it comes, for spec `method` full (fp32 master weights) or lora (the base frozen in the
    compute dtype, peft adapters as jobs/demo.yaml's: `LORA`)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    weights = torch.float32 if spec["method"] == "full" else compute_dtype(device)
    model = AutoModelForCausalLM.from_pretrained(spec["model_path"], dtype=weights).to(device)
    model.config.use_cache = False  # as honed: no KV cache built during training
    if spec["method"] == "lora":
        lora = spec.get("lora", LORA)
        model = get_peft_model(model, LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                                                 target_modules=lora["target_modules"], task_type="CAUSAL_LM"))
    return model


# ------------------------------------------------------------------ the HF Trainer and TRL comparisons
# TRL's SFTTrainer at its fastest on a CPU in honed's numerics (benchmarks/train_vs_trl.py says why): fp32 as
# honed trains on CPU (TRL's bf16 autocast is faster where the CPU has bf16 matmuls: 1.3x on the EPYC VM),
# no gradient checkpointing (its default on; memory is no constraint here),
# padded batches (padding_free on CPU runs SDPA with a block-diagonal mask: 163 vs 175 tok/s measured).
TRL_SETTINGS = {"gradient_checkpointing": False, "max_length": None, "padding_free": False}


def hf_main(spec: dict) -> dict:
    """`transformers.Trainer` with `DataCollatorForSeq2Seq` (right padding, labels padded with -100): see
    `trainer_main`; then, with SPEC `variant_repeats`, `loss_variants` on the first batch: where honed's lead
    comes from."""
    return trainer_main(spec, hf_trainer)


def trl_main(spec: dict) -> dict:
    """TRL's `SFTTrainer` (`TRL_SETTINGS`, SPEC `trl` overriding them) on the same pre-tokenized rows and labels,
    its own collator: see `trainer_main`."""
    return trainer_main(spec, trl_trainer)


def trainer_main(spec: dict, make_trainer) -> dict:
    """A Hugging Face-style trainer (`make_trainer`) over `plain_model`'s LoRA model and the first steps x batch
    rows in shard order (sequential sampler: the same rows in the same order as honed), the model's own loss;
    every step's end timed with a callback, its non-pad tokens counted from the batch and its loss recorded;
    the adapter saved at the end, as honed exports its own. `job_phases` as honed's: where the job's wall
    time went."""
    import torch
    from transformers import AutoTokenizer, TrainerCallback, set_seed

    device = set_up(spec)
    gpu = device.type == "cuda"
    set_seed(spec["seed"])
    tokenizer = AutoTokenizer.from_pretrained(spec["model_path"])
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    model = plain_model({"method": "lora", **spec}, device)
    steps, bs = spec["steps"], spec["batch_size"]
    rows = train_rows(Path(spec["data_dir"]), steps * bs)
    marks: list[tuple[float, float]] = []  # (perf_counter, process_time) at each step end
    tokens: list[int] = []
    losses: list[float] = []

    class Timer(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if gpu:
                torch.cuda.synchronize()
            marks.append((time.perf_counter(), time.process_time()))

    args = dict(output_dir=str(WORK / "runs" / make_trainer.__name__), per_device_train_batch_size=bs,
                max_steps=steps, learning_rate=spec["lr"], lr_scheduler_type="cosine", warmup_steps=spec["warmup"],
                weight_decay=0.0, max_grad_norm=1.0, optim="adamw_torch_fused", adam_beta1=0.9, adam_beta2=0.999,
                logging_steps=10**6, save_strategy="no", eval_strategy="no", report_to="none", use_cpu=not gpu,
                bf16=gpu, dataloader_num_workers=0, train_sampling_strategy="sequential", seed=spec["seed"],
                disable_tqdm=True)
    trainer, collator = make_trainer(spec, model, tokenizer, rows, args, counting(tokens, losses))
    trainer.add_callback(Timer())
    times = {"ready": time.time()}
    out = trainer.train()
    times["trained"] = time.time()
    trainer.save_model(str(WORK / "runs" / make_trainer.__name__ / "adapter"))
    times["saved"] = time.time()
    result = hf_rates(marks, tokens) | {
        "train_s": round(times["trained"] - times["ready"], 2), "train_loss": out.training_loss, "losses": losses,
        "threads": torch.get_num_threads(),
        "job_phases": {"to_train_start_s": round(times["ready"] - PROCESS_START, 2),
                       "train_s": round(times["trained"] - times["ready"], 2),
                       "save_adapter_s": round(times["saved"] - times["trained"], 2),
                       "job_s": round(times["saved"] - PROCESS_START, 2)}}
    if spec.get("variant_repeats") and collator:
        result["where_time_goes"] = loss_variants(model, collator(rows_with_mask(rows[:bs])), device,
                                                  spec["variant_repeats"])
    return result


def counting(tokens: list[int], losses: list[float]):
    """A mixin for a Trainer class: each training batch's non-pad tokens into `tokens`, its loss into `losses`."""
    def mixin(base):
        class Counting(base):
            def compute_loss(self, model, inputs, *args, **kwargs):
                mask = inputs.get("attention_mask")  # none in padding-free batches: every token is real
                tokens.append(int(mask.sum()) if mask is not None else int(inputs["input_ids"].numel()))
                out = super().compute_loss(model, inputs, *args, **kwargs)
                losses.append(round(float((out[0] if isinstance(out, tuple) else out).detach()), 5))
                return out
        return Counting
    return mixin


def rows_with_mask(rows: list[dict]) -> list[dict]:
    return [{"input_ids": r["input_ids"], "labels": r["labels"], "attention_mask": [1] * len(r["input_ids"])}
            for r in rows]


def hf_trainer(spec: dict, model, tokenizer, rows: list[dict], args: dict, mixin):
    """`transformers.Trainer` with `DataCollatorForSeq2Seq` (right padding to the longest row, labels padded
    with -100); (trainer, collator)."""
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100, return_tensors="pt")
    trainer = mixin(Trainer)(model=model, args=TrainingArguments(**args), train_dataset=rows_with_mask(rows),
                             data_collator=collator)
    return trainer, collator


def trl_trainer(spec: dict, model, tokenizer, rows: list[dict], args: dict, mixin):
    """TRL's `SFTTrainer` on the rows as a pre-tokenized `datasets.Dataset` (input_ids and the prepared
    labels, which TRL uses as they are), TRL's own collator; (trainer, None)."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    dataset = Dataset.from_list([{"input_ids": r["input_ids"], "labels": r["labels"]} for r in rows])
    config = SFTConfig(**(args | TRL_SETTINGS | spec.get("trl", {})))  # SPEC `trl` overrides the common args too
    return mixin(SFTTrainer)(model=model, args=config, train_dataset=dataset, processing_class=tokenizer), None


def hf_rates(marks: list[tuple[float, float]], tokens: list[int]) -> dict:
    """The HF run's non-pad tokens per second and per CPU-second over the steps after the warm-up."""
    k = WARMUP_STEPS_EXCLUDED
    seconds = marks[-1][0] - marks[k - 1][0]
    cpu = marks[-1][1] - marks[k - 1][1]
    nonpad = sum(tokens[k:])
    return {"steps": len(marks), "step_seconds": [round(b[0] - a[0], 4) for a, b in zip(marks, marks[1:])],
            "tokens_per_step": tokens, "measured_steps": len(marks) - k, "seconds": round(seconds, 3),
            "nonpad_tokens_per_s": round(nonpad / seconds, 2), "cpu_s": round(cpu, 3),
            "nonpad_tokens_per_cpu_s": round(nonpad / max(cpu, 1e-9), 2)}


# ------------------------------------------------------------------- one process, several batch layouts
def interleaved_main(spec: dict) -> dict:
    """One model, several batch layouts, their training steps interleaved in this process.

    spec `arms` = {name: {"data_dir", "batch_size", "flat"}}: at step s every arm trains its own batch s
    (forward + backward + clipping + fused AdamW, honed's model builder, loss and collate; `flat` = padding-free
    rows), the arms' order rotating each step. Every arm meets the same machine state, allocator and weights
    within one step of each other, so the ratios separate effects far smaller than the spread between fresh
    processes on a shared machine. The model runs `honed_varlen`, which hands batches without boundaries to
    transformers' SDPA path unchanged."""
    import torch

    from honed.train.attention import use_varlen

    device = set_up(spec)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")  # as honed on GPU
    model, optimizer = honed_model_and_optimizer({"method": "lora", "lr": 2e-4, **spec}, device)
    use_varlen(model)
    params = [p for p in model.parameters() if p.requires_grad]
    pad_id = pad_id_of(spec["model_path"])
    arms, steps = spec["arms"], spec["steps"]
    rows = {name: batched_rows(Path(a["data_dir"]), a["batch_size"], steps) for name, a in arms.items()}
    names = list(arms)
    per_step: dict[str, list[dict]] = {name: [] for name in names}
    model.train()
    for s in range(steps):
        for name in names[s % len(names):] + names[:s % len(names)]:
            size = arms[name]["batch_size"]
            t0 = time.perf_counter()
            inputs = collate_rows(rows[name][s * size:(s + 1) * size], pad_id, device, arms[name]["flat"])
            with autocast:
                loss, _ = honed_loss(model, inputs)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            sync()
            per_step[name].append({"seconds": round(time.perf_counter() - t0, 5), "nonpad": inputs["n_tokens"],
                                   "fed": int(inputs["input_ids"].numel()), "loss": round(loss.item(), 5)})
    return {"arms": {name: arm_rates(measured) for name, measured in per_step.items()},
            "threads": torch.get_num_threads(), "warmup_steps_excluded": WARMUP_STEPS_EXCLUDED}


def arm_rates(per_step: list[dict]) -> dict:
    kept = per_step[WARMUP_STEPS_EXCLUDED:]
    seconds = sum(m["seconds"] for m in kept)
    return {"per_step": per_step, "nonpad_tokens_per_s": round(sum(m["nonpad"] for m in kept) / seconds, 2),
            "step_rates": [round(m["nonpad"] / m["seconds"], 2) for m in kept]}


def variants_main(spec: dict) -> dict:
    """`loss_variants` on the first batch of each dataset in `spec['batches']` ({name: [data_dir, batch size]})
    with `plain_model` of `spec['method']`, in one process (the same model for every batch)."""
    device = set_up(spec)
    pad_id = pad_id_of(spec["model_path"])
    model = plain_model(spec, device)
    out = {}
    for name, (data_dir, batch_size) in spec["batches"].items():
        batch = collate_rows(train_rows(Path(data_dir), batch_size), pad_id, device)
        out[name] = loss_variants(model, batch, device, spec.get("repeats", 3)) | {"nonpad_tokens": batch["n_tokens"]}
    return out


# ------------------------------------------------------------------------------------------- the rest
def floor_main(spec: dict) -> dict:
    """The resident memory of a process that has imported what a training worker imports, nothing loaded."""
    import peft  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401
    from transformers import AutoModelForCausalLM  # noqa: F401

    rss = {"torch_transformers_peft_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    import ray.train.torch  # noqa: F401

    import honed.train.loop  # noqa: F401

    rss["plus_ray_train_and_honed_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if spec.get("bitsandbytes"):
        import bitsandbytes  # noqa: F401

        rss["plus_bitsandbytes_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {k: round(v, 1) for k, v in rss.items()}


def prepare_main(spec: dict) -> dict:
    """`honed prepare` of spec `config` (a job file) with `overrides`, on a local Ray of its own."""
    import ray

    from honed.config import PrepareConfig, load_config
    from honed.data.pipeline import prepare
    from honed.runtime import _quiet_data_logs

    ray.init(address="local", include_dashboard=False, logging_level="WARNING")
    _quiet_data_logs()
    prepare(load_config(PrepareConfig, spec["config"], spec["overrides"]))
    return {}


def model_path_main(spec: dict) -> dict:
    """The local HF directory of model `name` (honed converts the built-in model once)."""
    from honed.models import resolve_model

    return {"path": resolve_model(spec["name"])}


ENTRIES = {"honed": honed_main, "bare": bare_main, "hf": hf_main, "trl": trl_main, "interleaved": interleaved_main,
           "variants": variants_main, "floor": floor_main, "prepare": prepare_main, "model_path": model_path_main}

if __name__ == "__main__":
    child_main(ENTRIES)
