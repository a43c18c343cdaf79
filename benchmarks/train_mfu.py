"""Model FLOPs utilisation of full fine-tuning on this machine: honed vs a bare eager PyTorch loop, and what
limits it.

    .venv/bin/python benchmarks/train_mfu.py            # 8 steps x 2 repeats + a profile (~10 min on 2 CPUs)
    .venv/bin/python benchmarks/train_mfu.py --quick    # 4 steps x 1 repeat, 1 profiled step
    .venv/bin/python benchmarks/train_mfu.py --compile  # honed with optim.compile → train_mfu_compiled.json

Full fine-tuning of SmolLM2-135M-Instruct (every weight, fp32 master weights, AdamW lr 2e-5, grad clip
1.0), batch 8 of the prepared demo corpus, 1 worker, 1 torch thread.

  MFU = 6 · N · (non-pad tokens/s) / peak      (PaLM convention, honed.train.efficiency; N = all parameters)
  peak = fp32 matmul FLOP/s of one thread, measured by `honed.train.efficiency.measure_peak_flops` (a 1024²
         matmul, best of ~1 s) inside each training process; `mfu_common_peak` uses the best peak any process
         measured in this invocation (the least disturbed by other load) for both.

  honed  `train(cfg)` under Ray Train (1 worker); MFU from its efficiency.json.
  bare   a plain eager loop (benchmarks/train_loops.py `bare`, kernels "plain"): the HF model's own loss over
         every position, torch AdamW's default implementation, batches in shard order: the reference.
  profile  honed's step (kernels "honed": fused AdamW, labelled-only logits, padding-free rows) in a bare
         process, 3 steps then `--profile-steps` under torch.profiler: self time by op category (matmul,
         attention, softmax/CE, optimizer, elementwise, ...), the matmul FLOPs the profiler counts and the
         FLOP/s those matmuls achieve, the per-phase split, and AdamW implementations timed side by side
         (benchmarks/step_breakdown.py).

Runs alternate (bare, honed; honed, bare) in fresh processes; honed logs every step, so `best_steps` gives
both MFUs from the fastest third of the steps (pooled over repeats): those other jobs on a shared machine
disturbed least. Writes `benchmarks/results/train_mfu.json`.
"""

from __future__ import annotations

from harness import MODEL, Measured, alternating, at_least, best_rate, log, main, present, spread
from train_runs import (
    GROUP_BY_LENGTH,
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

LR = 2e-5
GOAL = 0.60
PROFILE_WARMUP = 3  # steps before the profiled ones


def options(parser) -> None:
    add_run_options(parser, steps=8)
    parser.add_argument("--profile-steps", type=int, default=2)
    parser.add_argument("--group-by-length", type=int, default=GROUP_BY_LENGTH,
                        help="honed's optim.group_by_length (default: honed's default, off)")
    parser.add_argument("--compile", action="store_true",
                        help="honed with optim.compile (torch.compile'd decoder) → train_mfu_compiled.json")
    parser.add_argument("--peak-flops", type=float, help="a datasheet peak (e.g. 989e12 for H100/H200 dense bf16): "
                                                           "adds MFU against it")


def measure(args) -> Measured:
    data = prepared_dataset()
    tokens = step_token_counts(data, args.batch_size, args.steps, args.group_by_length)

    def run(kind: str, r: int) -> dict:
        tag = f"mfu-{kind}-{r}"
        if kind == "honed":
            return run_honed(tag, data, args, method="full", lr=LR, log_every=1,  # every step: `best_steps`
                             extra={"optim.group_by_length": args.group_by_length, "optim.compile": args.compile})
        return run_loop("bare", tag, data, args, method="full", lr=LR, measure_peak=True, kernels="plain")

    runs = [r for _, r in alternating(args.repeats, ["bare", "honed"], run)]
    # Where honed's step time goes: the same computation as honed's worker (kernels "honed") under the profiler
    profiled = {}
    if args.profile_steps:
        log(f"profile: honed's step in a bare process ({PROFILE_WARMUP} + {args.profile_steps} steps) ...")
        profiled = run_loop("bare", "mfu-profile", data, args, method="full", lr=LR, steps=PROFILE_WARMUP,
                            measure_peak=False, kernels="honed", profile_steps=args.profile_steps,
                            group_by_length=args.group_by_length, optimizer_variants=1 if args.quick else 3)

    # Both sides' MFU against each process's own peak and against the best peak measured in this invocation.
    peaks = [r["honed"]["efficiency"]["peak_flops_per_worker"] for r in runs] + [r["bare"]["peak_flops"] for r in runs]
    common = max(peaks)
    n_params = runs[0]["honed"]["efficiency"]["total_params"]
    rows = [compare(r["honed"], r["bare"], tokens, n_params, common, args.peak_flops) for r in runs]
    profile, optimizer = profiled.get("profile"), profiled.get("optimizer_variants")
    best = {k: best_rate([x for r in rows for x in r[k]["step_rates"]]) for k in ("honed", "bare")}
    best_steps = {"fraction": "fastest third of the measured steps, all repeats pooled",
                  **{f"{k}_nonpad_tokens_per_s": v for k, v in best.items()},
                  **{f"{k}_mfu_common_peak": round(6 * n_params * v / common, 4) for k, v in best.items() if v}}
    honed_mfu = [r["honed"]["mfu"] for r in rows]
    bare_mfu = [r["bare"]["mfu"] for r in rows]
    median = spread([r["honed"]["mfu_common_peak"] for r in rows])["median"]
    goal = at_least("honed MFU against the common peak, median over repeats", median, GOAL)
    figures = {
        "config": {"model": MODEL, "method": "full", "steps": args.steps,
                   "warmup_steps_excluded": WARMUP_STEPS_EXCLUDED,
                   "batch_size": args.batch_size, "lr": LR, "threads": args.threads, "gpu": args.gpu,
                   "repeats": args.repeats, "profile_steps": args.profile_steps, "data": str(data),
                   "total_params": n_params, "datasheet_peak_flops": args.peak_flops,
                   "group_by_length": args.group_by_length, "compile": args.compile},
        "peaks_measured": peaks, "common_peak_flops": common,
        "repeats": rows,
        "mfu": {"honed": spread(honed_mfu), "bare": spread(bare_mfu),
                "honed_common_peak": spread([r["honed"]["mfu_common_peak"] for r in rows]),
                "bare_common_peak": spread([r["bare"]["mfu_common_peak"] for r in rows]),
                "honed_per_worker_cpu_s": spread(present([r["honed"] for r in rows], "mfu_per_worker_cpu_s")),
                "bare_per_cpu_s": spread([r["bare"]["mfu_per_cpu_s"] for r in rows])},
        "best_steps": best_steps,
        "ratio_honed_over_bare": spread([r["honed"]["nonpad_tokens_per_s"] / r["bare"]["nonpad_tokens_per_s"]
                                         for r in rows]),
        "profile": profile, "optimizer_variants": optimizer,
        "analysis": analysis(profile, data, args, n_params, common) if profile else {},
        "goal": f">= {GOAL} (honed, common peak, median)", "met": goal["met"],
    }
    log(f"MFU honed {honed_mfu}, bare {bare_mfu} (own peaks); common peak {common / 1e9:.1f} GFLOP/s; fastest "
        f"third of steps: {best_steps}")
    if optimizer:
        log(f"AdamW step over {optimizer['params']:,} params (s): {optimizer['seconds_per_step']}")
    if profile:
        log("honed step self time by phase: " + ", ".join(f"{k} {v:.0%}" for k, v in
                                                        profile.get("share_by_phase", {}).items()))
        log("honed step self time by category: " + ", ".join(f"{k} {v:.0%}" for k, v in
                                                           profile["share_by_category"].items()))
    return Measured("full fine-tuning of SmolLM2-135M-Instruct, 1 worker, 1 thread: MFU = 6·N·non-pad tokens/s / "
                    "measured fp32 matmul peak, honed (Ray Train) vs a plain eager PyTorch loop; profile of honed's "
                    "step", figures, [goal])


def compare(honed: dict, bare: dict, tokens: list[dict], n_params: int, common: float, datasheet: float | None) -> dict:
    """One repeat: each side's rate and MFU against its own peak, the common peak, per CPU-second and the
    datasheet peak (when given)."""
    e = honed["efficiency"]
    wall = honed_wall_rate(honed, tokens)
    bare_cpu = bare_cpu_rate(bare)

    def mfu(rate: float, peak: float) -> float:
        return round(6 * n_params * rate / peak, 4)
    row = {
        "honed": {"nonpad_tokens_per_s": e["nonpad_tokens_per_s"], "step_time_s": e["step_time_s"],
                  "measured_steps": e["measured_steps"], "peak_flops": e["peak_flops_per_worker"],
                  "mfu": e["mfu"], "mfu_common_peak": mfu(e["nonpad_tokens_per_s"], common),
                  "wall": wall, "peak_memory_mb": e["peak_memory_mb"],
                  "loadavg_1min_before_after": honed["loadavg_1min_before_after"]},
        "bare": {"nonpad_tokens_per_s": bare["nonpad_tokens_per_s"], "step_time_s": bare["step_time_s"],
                 "measured_steps": bare["measured_steps"], "peak_flops": bare["peak_flops"], "mfu": bare["mfu"],
                 "mfu_common_peak": mfu(bare["nonpad_tokens_per_s"], common),
                 "cpu": bare_cpu, "phase_share": bare["phase_share"], "memory_parts": bare["memory_parts"],
                 "peak_memory_mb": bare["peak_memory_mb"], "step_seconds": [s["seconds"] for s in bare["per_step"]],
                 "loadavg_1min_before_after": bare["loadavg_1min_before_after"]},
    }
    if wall and "nonpad_tokens_per_worker_cpu_s" in wall:
        # MFU per CPU-second: what the MFU would be if the process had had its core to itself
        row["honed"]["mfu_per_worker_cpu_s"] = mfu(wall["nonpad_tokens_per_worker_cpu_s"], common)
    row["bare"]["mfu_per_cpu_s"] = mfu(bare_cpu["nonpad_tokens_per_cpu_s"], common)
    if datasheet:
        row["honed"]["mfu_datasheet_peak"] = mfu(e["nonpad_tokens_per_s"], datasheet)
        row["bare"]["mfu_datasheet_peak"] = mfu(bare["nonpad_tokens_per_s"], datasheet)
    row["honed"]["step_rates"] = honed_step_rates(honed, tokens)
    row["bare"]["step_rates"] = bare_step_rates(bare)
    return row


def analysis(profile: dict, data, args, n_params: int, common: float) -> dict:
    """The profiler's matmul FLOPs per token beside 6N, and the FLOP/s those matmuls reached."""
    counts = step_token_counts(data, args.batch_size, PROFILE_WARMUP + args.profile_steps,
                               args.group_by_length, flat=True)[PROFILE_WARMUP:]  # the profile runs padding-free
    achieved = profile["matmul_achieved_flops_per_s"]
    return {
        "matmul_flops_per_nonpad_token (profiler)": round(profile["matmul_flops"] / sum(t["nonpad"] for t in counts)),
        "six_n": 6 * n_params,
        "matmul_flops_per_fed_token (profiler)": round(profile["matmul_flops"] / sum(t["fed"] for t in counts)),
        "matmul_achieved_flops_per_s": achieved,
        "matmul_achieved_over_common_peak": round(achieved / common, 4) if achieved else None,
        "note": "6N counts every parameter for every non-pad token; the profiler's matmul FLOPs cover honed's "
                "default padding-free rows (no padding), lm_head only at labelled positions (honed's loss), and "
                "no attention score FLOPs (fused SDPA kernel).",
    }


if __name__ == "__main__":
    main("train_mfu", __doc__, measure, options=options, quick={"steps": 4, "repeats": 1, "profile_steps": 1},
         repeats=2, gpu="CUDA, bf16 autocast over fp32 master weights",
         file_name=lambda args: "train_mfu_compiled" if args.compile else "train_mfu")
