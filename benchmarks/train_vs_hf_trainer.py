"""honed vs Hugging Face `transformers.Trainer` + peft on the same LoRA job: non-pad tokens per second.

    .venv/bin/python benchmarks/train_vs_hf_trainer.py            # 10 steps x 3 repeats (~10 min on 2 CPUs)
    .venv/bin/python benchmarks/train_vs_hf_trainer.py --quick    # 4 steps x 1 repeat (a smoke run)

The job (as in train_overhead.py): LoRA r 16 / alpha 32 / dropout 0.05 on all linear layers of SmolLM2-135M-
Instruct, fp32 on CPU (bf16 on GPU), batch 8 of the prepared demo corpus in shard order, fused AdamW (torch;
the default of both) lr 2e-3, 10 warm-up steps then cosine, grad clip 1.0, weight decay 0, one torch thread,
seed 0.

  honed  `honed.train.trainer.train(cfg)` (Ray Train, 1 worker): non-pad tokens/s from its efficiency.json.
  HF     `transformers.Trainer` (sequential sampler, so the same rows in the same order) over the same rows
         with `DataCollatorForSeq2Seq` (right padding to the longest row, labels padded with -100), the model
         computing its own loss (`labels=`: logits over every position, mean CE over labelled tokens); timed
         from the end of step 2 to the end of the last step with a callback; non-pad tokens counted from each
         batch's attention mask (the same count honed uses). benchmarks/train_loops.py `hf`.

Runs alternate (HF, honed; honed, HF; ...) in fresh processes; the ratio is honed / HF per repeat and its
median. As in train_overhead.py, honed logs every step so that `best_steps` (the fastest third of each
side's measured steps, pooled over repeats: the steps other jobs on a shared machine did not disturb) and
per-CPU-second figures can be given too. After its run, the HF process also times one forward + backward
of the first batch from the HF model's own loss to honed's step, one change at a time (see
`step_breakdown.loss_variants`: full logits; labelled positions only; no mask on right-padded rows; honed's
CPU LoRA dropout), interleaved, median of repeats: where honed's lead comes from.
Writes `benchmarks/results/train_vs_hf_trainer.json`.
"""

from __future__ import annotations

from harness import MODEL, Measured, alternating, at_least, best_steps, log, main, present, ratio, spread
from train_runs import (
    LORA,
    WARMUP_STEPS_EXCLUDED,
    add_run_options,
    honed_step_rates,
    honed_wall_rate,
    prepared_dataset,
    run_honed,
    run_loop,
    step_token_counts,
)

GOAL = 1.15
LOG_EVERY = 1  # honed reports every step (10x its default): its live log then times every step
HF_KEYS = ("nonpad_tokens_per_s", "nonpad_tokens_per_cpu_s", "cpu_s", "seconds", "measured_steps", "step_seconds",
           "train_loss", "threads", "process_wall_s", "loadavg_1min_before_after", "where_time_goes")


def options(parser) -> None:
    add_run_options(parser, steps=10)
    parser.add_argument("--variant-repeats", type=int, default=3, help="timed passes per loss variant")


def measure(args) -> Measured:
    data = prepared_dataset()
    tokens = step_token_counts(data, args.batch_size, args.steps)

    def run(kind: str, r: int) -> dict:
        tag = f"vs-hf-{kind}-{r}"
        if kind == "honed":
            return run_honed(tag, data, args, log_every=LOG_EVERY)
        return run_loop("hf", tag, data, args, lr=2e-3, variant_repeats=args.variant_repeats)

    repeats = []
    for order, runs in alternating(args.repeats, ["hf", "honed"], run):
        repeats.append(compare(order, runs["honed"], runs["hf"], tokens))
        rep = repeats[-1]
        log(f"  ratio honed/HF {rep['ratio_honed_over_hf']} (wall {rep['ratio_wall_honed_over_hf']}, per worker CPU-s "
            f"{rep['ratio_per_worker_cpu_s']}); lm_head+CE share of HF fwd+bwd "
            f"{rep['hf']['where_time_goes']['lm_head_and_ce_share_of_full_logits']}")

    ratios = [r["ratio_honed_over_hf"] for r in repeats]
    variants = [r["hf"]["where_time_goes"] for r in repeats]
    median = spread(ratios)["median"]
    pooled = {k: [x for r in repeats for x in r["step_rates"][k]] for k in ("honed", "hf")}
    best = best_steps(pooled, "honed", "hf", GOAL)
    goal = at_least("honed / HF Trainer non-pad tokens/s, median over repeats", median, GOAL)
    figures = {
        "config": {"model": MODEL, "method": "lora", "lora": LORA, "steps": args.steps, "batch_size": args.batch_size,
                   "lr": 2e-3, "warmup": 10, "schedule": "cosine",
                   "optimizer": "torch fused AdamW (HF's default optim=adamw_torch_fused; honed's default)",
                   "threads": args.threads, "gpu": args.gpu, "repeats": args.repeats, "data": str(data),
                   "honed_log_every": LOG_EVERY},
        "repeats": repeats,
        "ratio": median, "ratio_spread": spread(ratios),
        "ratio_wall_spread": spread(present(repeats, "ratio_wall_honed_over_hf")),
        "best_steps": best,
        "ratio_per_worker_cpu_s_spread": spread(present(repeats, "ratio_per_worker_cpu_s")),
        "where_time_goes_summary": {
            "lm_head_and_ce_share_of_full_logits": spread([v["lm_head_and_ce_share_of_full_logits"] for v in variants]),
            "speedup_over_full_logits": {k: spread([v["speedup_over_full_logits"][k] for v in variants])
                                         for k in (variants[0]["speedup_over_full_logits"] if variants else {})}},
        "goal": goal["goal"], "met": goal["met"],
    }
    log(f"honed/HF non-pad tokens/s: median {median} {ratios}; fastest third of steps {best['ratio']}")
    return Measured("LoRA on SmolLM2-135M-Instruct: honed (Ray Train, 1 worker) vs transformers.Trainer + peft "
                    "(DataCollatorForSeq2Seq); steady-state non-pad tokens/s (first 2 steps excluded)", figures, [goal])


def compare(order: list[str], honed: dict, hf: dict, tokens: list[dict]) -> dict:
    """One repeat: both sides' rates, per step and per CPU-second, and their ratios."""
    wall = honed_wall_rate(honed, tokens)
    w = wall or {}
    h_rate = honed["efficiency"]["nonpad_tokens_per_s"]
    return {
        "order": order,
        "honed": {"nonpad_tokens_per_s": h_rate, "step_time_s": honed["efficiency"]["step_time_s"],
                  "measured_steps": honed["efficiency"]["measured_steps"], "wall": wall,
                  "final_loss": honed["final_loss"], "process_wall_s": honed["process_wall_s"],
                  "loadavg_1min_before_after": honed["loadavg_1min_before_after"]},
        "hf": {k: hf[k] for k in HF_KEYS},
        "same_batches_as_honed": hf["tokens_per_step"] == [t["nonpad"] for t in tokens],
        "step_rates": {"honed": honed_step_rates(honed, tokens),
                       # step_seconds[j] is step j+2 (1-based); steps 3.. are measured
                       "hf": [round(hf["tokens_per_step"][j + 1] / sec, 2)
                              for j, sec in enumerate(hf["step_seconds"]) if j + 2 > WARMUP_STEPS_EXCLUDED]},
        "ratio_honed_over_hf": ratio(h_rate, hf["nonpad_tokens_per_s"]),
        "ratio_wall_honed_over_hf": ratio(w.get("nonpad_tokens_per_s"), hf["nonpad_tokens_per_s"]),
        "ratio_per_worker_cpu_s": ratio(w.get("nonpad_tokens_per_worker_cpu_s"), hf["nonpad_tokens_per_cpu_s"]),
    }


if __name__ == "__main__":
    main("train_vs_hf_trainer", __doc__, measure, options=options,
         quick={"steps": 4, "repeats": 1, "variant_repeats": 1}, repeats=3,
         gpu="CUDA, bf16 (honed's dtype auto; HF bf16=True)")
