"""honed vs Hugging Face `transformers.Trainer` + peft on the same LoRA job: non-pad tokens per second.

    .venv/bin/python benchmarks/train_vs_hf_trainer.py            # 10 steps x 3 repeats (~10 min on 2 CPUs)
    .venv/bin/python benchmarks/train_vs_hf_trainer.py --quick    # 4 steps x 1 repeat (a smoke run)

The job (as in train_overhead.py): LoRA r 16 / alpha 32 / dropout 0.05 on all linear layers of SmolLM2-135M-
Instruct, fp32 on CPU (bf16 on GPU), batch 8 of the prepared demo corpus in shard order, fused AdamW (torch;
the default of both) lr 2e-3,
10 warm-up steps then cosine, grad clip 1.0, weight decay 0, one torch thread, seed 0.

  honed  `honed.train.trainer.train(cfg)` (Ray Train, 1 worker): non-pad tokens/s from its efficiency.json.
  HF     `transformers.Trainer` (sequential sampler, so the same rows in the same order) over the same rows
         with `DataCollatorForSeq2Seq` (right padding to the longest row, labels padded with -100), the model
         computing its own loss (`labels=`: logits over every position, mean CE over labelled tokens); timed
         from the end of step 2 to the end of the last step with a callback; non-pad tokens counted from each
         batch's attention mask (the same count honed uses).

Runs alternate (HF, honed; honed, HF; ...) in fresh processes; the ratio is honed / HF per repeat and its
median. As in train_overhead.py, honed logs every step so that `best_steps` (the fastest third of each
side's measured steps, pooled over repeats: the steps other jobs on a shared machine did not disturb) and
per-CPU-second figures can be given too. After its run, the HF process also times one forward + backward
of the first batch from the HF model's own loss to honed's step, one change at a time (see
`_train_bench.loss_variants`: full logits; labelled positions only; no mask on right-padded rows; honed's
CPU LoRA dropout), interleaved, median of repeats: where honed's lead comes from.
Writes `benchmarks/results/train_vs_hf_trainer.json`.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

from _train_bench import (
    LORA,
    MODEL,
    WARMUP_STEPS_EXCLUDED,
    WORK,
    best_rate,
    commit,
    honed_config,
    honed_step_rates,
    honed_wall_rate,
    log,
    loss_variants,
    machine_info,
    parse_args,
    prepared_dataset,
    resolve_model_path,
    run_process,
    spread,
    step_token_counts,
    train_rows,
    write_result,
)

GOAL = 1.15


# ------------------------------------------------------------------------------------- the HF process
def hf_main(spec: dict, result_path: str) -> None:
    import torch

    torch.set_num_threads(spec["threads"])
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForSeq2Seq,
        Trainer,
        TrainerCallback,
        TrainingArguments,
        set_seed,
    )

    gpu = spec["gpu"]
    device = torch.device("cuda" if gpu else "cpu")
    set_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(spec["model_path"])
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    model = AutoModelForCausalLM.from_pretrained(spec["model_path"], dtype=torch.bfloat16 if gpu else torch.float32)
    model.config.use_cache = False  # as honed: no KV cache built during training
    model = get_peft_model(model, LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                                             target_modules=LORA["target_modules"], task_type="CAUSAL_LM"))
    steps, bs = spec["steps"], spec["batch_size"]
    rows = train_rows(Path(spec["data_dir"]), steps * bs)
    dataset = [{"input_ids": r["input_ids"], "labels": r["labels"], "attention_mask": [1] * len(r["input_ids"])}
               for r in rows]
    collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100, return_tensors="pt")

    marks: list[tuple[float, float]] = []  # (perf_counter, process_time) at each step end
    tokens: list[int] = []

    class Timer(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if gpu:
                torch.cuda.synchronize()
            marks.append((time.perf_counter(), time.process_time()))

    class CountingTrainer(Trainer):
        def compute_loss(self, model, inputs, *args, **kwargs):
            tokens.append(int(inputs["attention_mask"].sum()))
            return super().compute_loss(model, inputs, *args, **kwargs)

    out_dir = WORK / "runs" / "hf-trainer"
    args = TrainingArguments(
        output_dir=str(out_dir), per_device_train_batch_size=bs, max_steps=steps, learning_rate=spec["lr"],
        lr_scheduler_type="cosine", warmup_steps=10, weight_decay=0.0, max_grad_norm=1.0, optim="adamw_torch_fused",
        adam_beta1=0.9, adam_beta2=0.999, logging_steps=10**6, save_strategy="no", eval_strategy="no",
        report_to="none", use_cpu=not gpu, bf16=gpu, dataloader_num_workers=0, train_sampling_strategy="sequential",
        seed=0, disable_tqdm=True)
    trainer = CountingTrainer(model=model, args=args, train_dataset=dataset, data_collator=collator,
                              callbacks=[Timer()])
    started = time.perf_counter()
    out = trainer.train()
    train_s = time.perf_counter() - started
    k = WARMUP_STEPS_EXCLUDED
    seconds = marks[-1][0] - marks[k - 1][0]
    cpu = marks[-1][1] - marks[k - 1][1]
    nonpad = sum(tokens[k:])
    result = {
        "train_s": round(train_s, 2), "train_loss": out.training_loss, "steps": len(marks),
        "step_seconds": [round(b[0] - a[0], 4) for a, b in itertools.pairwise(marks)],
        "tokens_per_step": tokens, "measured_steps": len(marks) - k, "seconds": round(seconds, 3),
        "nonpad_tokens_per_s": round(nonpad / seconds, 2), "cpu_s": round(cpu, 3),
        "nonpad_tokens_per_cpu_s": round(nonpad / max(cpu, 1e-9), 2), "threads": torch.get_num_threads(),
    }
    result["where_time_goes"] = loss_variants(model, collator([dataset[i] for i in range(bs)]), device,
                                              spec["variant_repeats"], gpu)
    Path(result_path).write_text(json.dumps(result))


# ----------------------------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="4 steps, 1 repeat")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--variant-repeats", type=int, default=3, help="timed passes per loss variant")
    args = parse_args(parser, "train_vs_hf_trainer", "CUDA, bf16 (honed's dtype auto; HF bf16=True)", quick={"steps": 4, "repeats": 1, "variant_repeats": 1})
    log_every = 1  # honed reports every step (10x its default): its live log then times every step

    data = prepared_dataset()
    tokens = step_token_counts(data, args.batch_size, args.steps)
    model_path = resolve_model_path()
    repeats = []
    for r in range(args.repeats):
        order = ["hf", "honed"] if r % 2 == 0 else ["honed", "hf"]
        runs = {}
        for kind in order:
            tag = f"vs-hf-{kind}-{r}"
            log(f"repeat {r + 1}/{args.repeats}: {kind} ({args.steps} steps) ...")
            if kind == "honed":
                cfg = honed_config(data, WORK / "runs" / tag, method="lora", steps=args.steps,
                                   batch_size=args.batch_size, threads=args.threads, gpu=args.gpu, log_every=log_every)
                runs[kind] = run_process("honed", {"config": cfg, "threads": args.threads}, tag)
                rate = runs[kind]["efficiency"]["nonpad_tokens_per_s"]
            else:
                spec = {"model_path": model_path, "data_dir": str(data), "steps": args.steps,
                        "batch_size": args.batch_size, "lr": 2e-3, "threads": args.threads, "gpu": args.gpu,
                        "variant_repeats": args.variant_repeats}
                runs[kind] = run_process("hf", spec, tag, script=__file__)
                rate = runs[kind]["nonpad_tokens_per_s"]
            log(f"  {kind}: {rate:.1f} non-pad tokens/s")
        honed, hf = runs["honed"], runs["hf"]
        wall = honed_wall_rate(honed, tokens)
        h_rate = honed["efficiency"]["nonpad_tokens_per_s"]
        same_tokens = hf["tokens_per_step"] == [t["nonpad"] for t in tokens]
        repeats.append({
            "order": order,
            "honed": {"nonpad_tokens_per_s": h_rate, "step_time_s": honed["efficiency"]["step_time_s"],
                      "measured_steps": honed["efficiency"]["measured_steps"], "wall": wall,
                      "final_loss": honed["final_loss"], "process_wall_s": honed["process_wall_s"],
                      "loadavg_1min_before_after": honed["loadavg_1min_before_after"]},
            "hf": {k: hf[k] for k in ("nonpad_tokens_per_s", "nonpad_tokens_per_cpu_s", "cpu_s", "seconds",
                                      "measured_steps", "step_seconds", "train_loss", "threads", "process_wall_s",
                                      "loadavg_1min_before_after", "where_time_goes")},
            "same_batches_as_honed": same_tokens,
            "step_rates": {"honed": honed_step_rates(honed, tokens),
                           # step_seconds[j] is step j+2 (1-based); steps 3.. are measured
                           "hf": [round(hf["tokens_per_step"][j + 1] / sec, 2)
                                  for j, sec in enumerate(hf["step_seconds"]) if j + 2 > WARMUP_STEPS_EXCLUDED]},
            "ratio_honed_over_hf": round(h_rate / hf["nonpad_tokens_per_s"], 4),
            "ratio_wall_honed_over_hf": round(wall["nonpad_tokens_per_s"] / hf["nonpad_tokens_per_s"], 4) if wall else None,
            "ratio_per_worker_cpu_s": round(wall["nonpad_tokens_per_worker_cpu_s"] / hf["nonpad_tokens_per_cpu_s"], 4)
            if wall and "nonpad_tokens_per_worker_cpu_s" in wall else None,
        })
        rep = repeats[-1]
        log(f"  ratio honed/HF {rep['ratio_honed_over_hf']} (wall {rep['ratio_wall_honed_over_hf']}, per worker CPU-s "
            f"{rep['ratio_per_worker_cpu_s']}); lm_head+CE share of HF fwd+bwd "
            f"{hf['where_time_goes']['lm_head_and_ce_share_of_full_logits']}")

    ratios = [r["ratio_honed_over_hf"] for r in repeats]
    walls = [r["ratio_wall_honed_over_hf"] for r in repeats if r["ratio_wall_honed_over_hf"]]
    cpus = [r["ratio_per_worker_cpu_s"] for r in repeats if r["ratio_per_worker_cpu_s"]]
    variants = [r["hf"]["where_time_goes"] for r in repeats]
    ratio = spread(ratios)["median"]
    pooled = {k: [x for r in repeats for x in r["step_rates"][k]] for k in ("honed", "hf")}
    best = {k: best_rate(v) for k, v in pooled.items()}
    best_ratio = round(best["honed"] / best["hf"], 4) if best["honed"] and best["hf"] else None
    result = {
        "benchmark": "train_vs_hf_trainer",
        "what": "LoRA on SmolLM2-135M-Instruct: honed (Ray Train, 1 worker) vs transformers.Trainer + peft "
                "(DataCollatorForSeq2Seq); steady-state non-pad tokens/s (first 2 steps excluded)",
        "quick": args.quick, "date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine_info(), **commit(),
        "config": {"model": MODEL, "method": "lora", "lora": LORA, "steps": args.steps, "batch_size": args.batch_size,
                   "lr": 2e-3, "warmup": 10, "schedule": "cosine", "optimizer": "torch fused AdamW (HF's default optim=adamw_torch_fused; honed's default)",
                   "threads": args.threads, "gpu": args.gpu, "repeats": args.repeats, "data": str(data),
                   "honed_log_every": log_every},
        "repeats": repeats,
        "ratio": ratio, "ratio_spread": spread(ratios), "ratio_wall_spread": spread(walls),
        "best_steps": {"fraction": "fastest third of the measured steps, all repeats pooled", **best,
                       "ratio": best_ratio, "met": best_ratio >= GOAL if best_ratio else None},
        "ratio_per_worker_cpu_s_spread": spread(cpus),
        "where_time_goes_summary": {
            "lm_head_and_ce_share_of_full_logits": spread([v["lm_head_and_ce_share_of_full_logits"] for v in variants]),
            "speedup_over_full_logits": {k: spread([v["speedup_over_full_logits"][k] for v in variants])
                                         for k in (variants[0]["speedup_over_full_logits"] if variants else {})}},
        "goal": f">= {GOAL}", "met": ratio >= GOAL,
    }
    out = write_result("train_vs_hf_trainer", result, args.out)
    log(f"honed/HF non-pad tokens/s: median {ratio} {ratios}; fastest third of steps {best_ratio}; wall-clock "
        f"{walls}; per CPU-s {cpus} "
        f"(goal >= {GOAL}: {'met' if result['met'] else 'NOT met'}) → {out}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "hf":
        hf_main(json.loads(sys.argv[2]), sys.argv[3])
    else:
        main()
