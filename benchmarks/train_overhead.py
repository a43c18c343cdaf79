"""What Ray Train + honed's loop cost over a bare PyTorch + peft loop: the same LoRA job both ways.

    .venv/bin/python benchmarks/train_overhead.py            # 10 steps x 3 repeats (~10 min on 2 CPUs)
    .venv/bin/python benchmarks/train_overhead.py --quick    # 4 steps x 1 repeat (a smoke run)

The job: LoRA (r 16, alpha 32, dropout 0.05, all linear layers; jobs/demo.yaml's adapter) on SmolLM2-135M-
Instruct, fp32 on CPU, batch 8 of the prepared demo corpus (jobs/prepare_icd10.yaml, unpacked), AdamW lr 2e-3,
10 warm-up steps then cosine, grad clip 1.0, one torch thread, seed 0.

  honed  `honed.train.trainer.train(cfg)`: Ray Train TorchTrainer, 1 worker (0.5 CPU), Ray Data streaming the
         shards; tokens/s from its own efficiency.json (Meter: steps 3.. timed from the end of the previous
         step's bookkeeping to the end of the optimizer step, data wait included).
  bare   the same step with nothing around it (benchmarks/train_loops.py `bare`): the same rows in the same
         order, honed's model builder, optimizer, collate and loss (mean CE over labelled tokens, logits at
         labelled positions only), the same schedule and clipping; timed the same way over the same steps.

Both start from the same seed and consume the random stream in the same order, so their per-step losses
are compared too (`loss_check`): equal losses show it is the same computation. Runs alternate (bare, honed;
then honed, bare; ...) each in a fresh process; the ratio is honed / bare non-pad tokens/s per repeat (the
two runs of one repeat are back to back), and its median over repeats. honed logs (and reports to Ray
Train) every step here, 10x its default, so its live log times every step:
  wall        honed's tokens over the live log's wall-clock time (Ray Train reporting included)
  best_steps  the fastest third of the measured steps of each side, pooled over repeats: on a shared machine
              whose other jobs come and go, the steps nobody disturbed
  per CPU-s   tokens per CPU-second of the training process (honed: the Ray Train worker, sampled from
              outside; bare: time.process_time), and per CPU-second of honed's whole process tree (driver,
              GCS, raylet, controller, Ray Data): what Ray costs in CPU, whoever else runs
Writes `benchmarks/results/train_overhead.json`.
"""

from __future__ import annotations

from harness import MODEL, Measured, alternating, at_least, best_steps, log, main, present, ratio, spread
from train_runs import (
    WARMUP_STEPS_EXCLUDED,
    add_run_options,
    bare_cpu_rate,
    bare_step_rates,
    honed_step_rates,
    honed_wall_rate,
    prepared_dataset,
    run_honed,
    run_loop,
    step_token_counts,
)

GOAL = 0.97
LOG_EVERY = 1  # every step reports to Ray Train (honed's default is every 10): per-step times, a strict test


def measure(args) -> Measured:
    data = prepared_dataset()
    tokens = step_token_counts(data, args.batch_size, args.steps)

    def run(kind: str, r: int) -> dict:
        tag = f"overhead-{kind}-{r}"
        if kind == "honed":
            return run_honed(tag, data, args, log_every=LOG_EVERY)
        return run_loop("bare", tag, data, args, method="lora", lr=2e-3, measure_peak=True)

    repeats = []
    for order, runs in alternating(args.repeats, ["bare", "honed"], run):
        repeats.append(compare(order, runs["honed"], runs["bare"], tokens, args.steps))
        rep = repeats[-1]
        log(f"  ratio honed/bare {rep['ratio_honed_over_bare']} (wall {rep['ratio_wall_honed_over_bare']}, per worker "
            f"CPU-s {rep['ratio_per_worker_cpu_s']}, per Ray-tree CPU-s {rep['ratio_per_tree_cpu_s']}), "
            f"loss max |diff| {rep['loss_check']['max_abs_diff']}")

    ratios = [r["ratio_honed_over_bare"] for r in repeats]
    median = spread(ratios)["median"]
    pooled = {k: [x for r in repeats for x in r["step_rates"][k]] for k in ("honed", "bare")}
    best = best_steps(pooled, "honed", "bare", GOAL)
    goal = at_least("honed / bare non-pad tokens/s, median over repeats", median, GOAL)
    figures = {
        "config": {"model": MODEL, "method": "lora", "steps": args.steps,
                   "warmup_steps_excluded": WARMUP_STEPS_EXCLUDED,
                   "batch_size": args.batch_size, "threads": args.threads, "gpu": args.gpu, "repeats": args.repeats,
                   "data": str(data), "log_every": LOG_EVERY,
                   "nonpad_tokens_per_step": [t["nonpad"] for t in tokens],
                   "fed_tokens_per_step": [t["fed"] for t in tokens]},
        "repeats": repeats,
        "ratio": median,
        "ratio_spread": spread(ratios),
        "best_steps": best,
        "ratio_wall_spread": spread(present(repeats, "ratio_wall_honed_over_bare")),
        "ratio_per_worker_cpu_s_spread": spread(present(repeats, "ratio_per_worker_cpu_s")),
        "ratio_per_tree_cpu_s_spread": spread(present(repeats, "ratio_per_tree_cpu_s")),
        "goal": goal["goal"], "met": goal["met"],
    }
    log(f"honed/bare non-pad tokens/s: median {median} over {len(ratios)} repeat(s) {ratios}; fastest third of "
        f"steps {best['ratio']}")
    return Measured("LoRA on SmolLM2-135M-Instruct: honed under Ray Train (1 worker) vs a bare PyTorch + peft loop "
                    "doing the same work; steady-state non-pad tokens/s (first 2 steps excluded)", figures, [goal])


def compare(order: list[str], honed: dict, bare: dict, tokens: list[dict], steps: int) -> dict:
    """One repeat: both sides' rates (wall, per step, per CPU-second), their ratios and the loss check."""
    wall = honed_wall_rate(honed, tokens)
    w = wall or {}
    bare_cpu = bare_cpu_rate(bare)
    bare_windows = window_losses(bare["per_step"], LOG_EVERY, steps)
    diffs = [abs(h["loss"] - bare_windows[h["step"]]) for h in honed["history"] if h["step"] in bare_windows]
    e = honed["efficiency"]
    h_rate, b_rate = e["nonpad_tokens_per_s"], bare["nonpad_tokens_per_s"]
    return {
        "order": order,
        "honed": {"nonpad_tokens_per_s": h_rate, "tokens_per_s": e["tokens_per_s"], "step_time_s": e["step_time_s"],
                  "measured_steps": e["measured_steps"], "wall": wall,
                  "train_call_s": honed["train_call_s"], "process_wall_s": honed["process_wall_s"],
                  "outside_steps_s": round(honed["process_wall_s"] - e["step_time_s"] * steps, 1),
                  "peak_memory_mb": e["peak_memory_mb"], "mfu": e["mfu"], "peak_flops": e["peak_flops_per_worker"],
                  "loadavg_1min_before_after": honed["loadavg_1min_before_after"],
                  "window_losses": {h["step"]: h["loss"] for h in honed["history"]}},
        "bare": {"nonpad_tokens_per_s": b_rate, "tokens_per_s": bare["tokens_per_s"],
                 "step_time_s": bare["step_time_s"], "measured_steps": bare["measured_steps"], "cpu": bare_cpu,
                 "phase_share": bare["phase_share"], "process_wall_s": bare["process_wall_s"],
                 "outside_steps_s": round(bare["process_wall_s"] - sum(s["seconds"] for s in bare["per_step"]), 1),
                 "peak_memory_mb": bare["peak_memory_mb"], "mfu": bare.get("mfu"), "peak_flops": bare["peak_flops"],
                 "loadavg_1min_before_after": bare["loadavg_1min_before_after"],
                 "step_seconds": [s["seconds"] for s in bare["per_step"]],
                 "window_losses": {k: round(v, 5) for k, v in bare_windows.items()}},
        "step_rates": {"honed": honed_step_rates(honed, tokens), "bare": bare_step_rates(bare)},
        "ratio_honed_over_bare": ratio(h_rate, b_rate),
        "ratio_wall_honed_over_bare": ratio(w.get("nonpad_tokens_per_s"), b_rate),
        "ratio_per_worker_cpu_s": ratio(w.get("nonpad_tokens_per_worker_cpu_s"), bare_cpu["nonpad_tokens_per_cpu_s"]),
        "ratio_per_tree_cpu_s": ratio(w.get("nonpad_tokens_per_tree_cpu_s"), bare_cpu["nonpad_tokens_per_cpu_s"]),
        "loss_check": {"windows": len(diffs), "max_abs_diff": round(max(diffs), 6) if diffs else None},
    }


def window_losses(per_step: list[dict], log_every: int, total: int) -> dict[int, float]:
    """The bare run's losses averaged like honed's log windows (token-weighted, reset after each log)."""
    out, acc, n = {}, 0.0, 0
    for i, s in enumerate(per_step, start=1):
        acc += s["loss"] * s["labelled"]
        n += s["labelled"]
        if i % log_every == 0 or i == total:
            out[i] = acc / max(n, 1)
            acc, n = 0.0, 0
    return out


if __name__ == "__main__":
    main("train_overhead", __doc__, measure, options=lambda p: add_run_options(p, steps=10),
         quick={"steps": 4, "repeats": 1}, repeats=3, gpu="CUDA, bf16 compute (honed's dtype auto), NCCL")
