"""`honed train` at its defaults vs TRL's `SFTTrainer` and `transformers.Trainer` on the same LoRA job: steady-
state non-pad tokens/s, whole-job wall time, and the loss curves overlaid.

    .venv/bin/pip install -e ".[bench]"                   # trl==1.16.0: benchmark-only, never a runtime need
    .venv/bin/python benchmarks/train_vs_trl.py           # demo 24 + 80 steps, mixed 8 steps x 3 (~75 min, 2 CPUs)
    .venv/bin/python benchmarks/train_vs_trl.py --quick   # demo 6 steps, mixed 4 (a smoke run)
    .venv/bin/python benchmarks/train_vs_trl.py --long-steps 0 --sides honed,trl   # skip the 80-step job and HF

Every side trains SmolLM2-135M-Instruct with LoRA r 16 / alpha 32 / dropout 0.05 on all linear layers, fp32 on
CPU, global batch 16 (honed's default: 2 workers x 8), the same rows in the same order (the prepared shards in
shard order: TRL and HF use a sequential sampler), fused AdamW lr 2e-3, 10 warm-up steps then cosine, grad clip
1.0, weight decay 0, seed 0, and 2 CPU threads in all:

  honed  `honed.train.trainer.train(cfg)` at its defaults (`train_runs.honed_default_config`: 2 Ray Train
         workers x 1 torch thread, padding-free batches, a log every 10 steps, final validation on up to 64
         rows a source, export check, report), in a fresh driver process connecting to a Ray started before
         the jobs (`--honed-ray running`, the default: as `ray job submit` finds a cluster; the result records
         it) or starting its own (`--honed-ray fresh`)
  trl    TRL 1.16 `SFTTrainer`, 1 process x 2 threads, on the pre-tokenized rows and their prepared labels, at
         its fastest settings valid on this CPU (`train_loops.TRL_SETTINGS`): padded batches (padding_free on
         CPU runs SDPA under a block-diagonal mask and measured slower here, 163 vs 175 tok/s), no gradient
         checkpointing (TRL's default is on; memory is no constraint), fp32: honed trains fp32 on CPU, and every
         side keeps the same numerics. TRL's bf16 autocast is faster where the CPU has bf16 matmuls: on the EPYC
         VM (avx512_bf16) 113 vs 86 tok/s, 10 demo steps (2026-12-05); honed in bf16 (`model.dtype: bf16`) was
         not compared. `--trl-precision bf16` runs TRL under bf16 autocast while honed stays at its defaults (fp32):
         TRL at its fastest on such a CPU against honed as users run it. TRL's chunked LM head stays on (its default).
         On the mixed corpus `padding_free=True` (TRL_BY_CORPUS): padded batches of 16 rows up to 1,024 tokens
         without gradient checkpointing were killed for memory at 23.6 GB on this 24 GB machine, and
         padding-free, which drops the corpus's ~80 % padding, is TRL's fastest setting that fits
  hf     `transformers.Trainer` + `DataCollatorForSeq2Seq`, 1 process x 2 threads (train_vs_hf_trainer's loop)

Jobs: the demo corpus (jobs/prepare_icd10.yaml, ~66 tokens an example) for `--short-steps` and
`--long-steps` steps; the mixed-length corpus (`train_runs.mixed_corpus_config`: ICD-10 pairs and KJV text
windows, 20 to 1,024 tokens, random order) for `--mixed-steps`, `--mixed-repeats` times a side (3): on this
2-core VM one 8-step run a side gave 1.96 in one invocation and 2.79 in another, the sides moving 10-30 %
between runs, so its ratios are the medians over back-to-back pairs. Each run is a fresh process, sides in
alternating order. Figures:
  steady state  non-pad tokens/s over the steps after the first 2: honed's own meter (efficiency.json: each
                worker's step from the batch fetch to the optimizer step; the slowest worker), TRL's and HF's
                step ends (a callback); with `wall`, honed's live log between logged steps (reports included)
  whole job     the process's wall time from start to exit: imports, Ray's start (honed), model load, data,
                the steps, honed's final validation, export check and report, TRL/HF's adapter save; where
                it went: `job_phases`
  loss curves   every step's loss (TRL, HF) and honed's logged window means, one panel a job:
                benchmarks/results/train_vs_trl_loss.png
Writes `benchmarks/results/train_vs_trl.json`.
"""

from __future__ import annotations

import os
import statistics
from pathlib import Path
from types import SimpleNamespace

from harness import MODEL, RESULTS, ROOT, WORK, Measured, RunningRay, alternating, at_least, log, main, public, ratio
from train_runs import (
    LORA,
    MIXED,
    honed_default_config,
    honed_wall_rate,
    length_profile,
    prepared_dataset,
    run_loop,
    start,
    step_token_counts,
)

TRL_BY_CORPUS = {"mixed": {"padding_free": True}}  # over train_loops.TRL_SETTINGS: see the docstring
GOALS = {"steady_demo": 1.5, "steady_mixed": 2.0, "wall_short": 1.0, "wall_long": 1.3}
SIDE_KEYS = ("nonpad_tokens_per_s", "step_time_s", "process_wall_s", "job_phases", "losses", "final_loss",
             "loadavg_1min_before_after", "waited_for_quiet_s")


def options(parser) -> None:
    parser.add_argument("--short-steps", type=int, default=24, help="steps of the short demo-corpus job")
    parser.add_argument("--long-steps", type=int, default=80, help="steps of the long demo-corpus job (0: skip)")
    parser.add_argument("--mixed-steps", type=int, default=8, help="steps of the mixed-corpus job (0: skip)")
    parser.add_argument("--sides", default="honed,trl,hf", help="sides of the short demo job")
    parser.add_argument("--long-sides", default="honed,trl", help="sides of the long demo job")
    parser.add_argument("--mixed-sides", default="honed,trl", help="sides of the mixed-corpus job")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                        help="numerics of both sides: fp32 (honed's default on CPU), or bf16 autocast (honed "
                             "model.dtype bfloat16, TRL bf16=True; honed and TRL sides only)")
    parser.add_argument("--trl-precision", choices=("same", "bf16"), default="same",
                        help="TRL's numerics: the same as honed's (--precision), or bf16 autocast, TRL's fastest "
                             "setting on a CPU with bf16 matmuls, while honed stays at --precision")
    parser.add_argument("--mixed-repeats", type=int, default=3,
                        help="runs a side of the mixed-corpus job, sides in alternating order; its ratios are the "
                             "medians over the repeats (each a back-to-back pair)")
    parser.add_argument("--honed-ray", choices=("running", "fresh"), default="running",
                        help="honed's jobs go to a Ray started before them (as `ray job submit` finds a cluster) "
                             "or each starts its own in its process")
    parser.add_argument("--batch-size", type=int, default=16, help="global batch (honed's default: 2 workers x 8)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of TRL's and HF's process (honed: "
                                                              "2 workers x 1)")


def jobs(args) -> list[tuple[str, str, int, list[str], int]]:
    """(name, corpus, steps, sides, repeats) of every job to run."""
    out = [(f"demo_{args.short_steps}", "demo", args.short_steps, args.sides, 1),
           (f"demo_{args.long_steps}", "demo", args.long_steps, args.long_sides, 1),
           (f"mixed_{args.mixed_steps}", "mixed", args.mixed_steps, args.mixed_sides, args.mixed_repeats)]
    return [(name, corpus, steps, sides.split(","), repeats) for name, corpus, steps, sides, repeats in out
            if steps > 0 and repeats > 0]


def measure(args) -> Measured:
    if args.precision == "bf16" and any("hf" in sides for _, _, _, sides, _ in jobs(args)):
        raise SystemExit("--precision bf16 runs the honed and TRL sides only: drop hf from --sides")
    ray = RunningRay(os.cpu_count() or 1) if args.honed_ray == "running" else None
    try:
        if ray:
            ray.wait()
            args.ray_address = ray.address
        return measure_jobs(args)
    finally:
        if ray:
            ray.stop()


def measure_jobs(args) -> Measured:
    results = {}
    for name, corpus, steps, sides, repeats in jobs(args):
        data = prepared_dataset(corpus=corpus)
        tokens = step_token_counts(data, args.batch_size, steps)
        log(f"job {name}: {steps} steps of {args.batch_size} on the {corpus} corpus, sides {sides}, "
            f"{repeats} repeat(s)")

        def side_run(kind: str, r: int) -> dict:
            tag = f"vs-trl-{name}-{kind}" + (f"-r{r + 1}" if repeats > 1 else "")
            return run_side(kind, tag, data, steps, args, corpus)

        rounds = [(order, job_figures(runs, tokens)) for order, runs in alternating(repeats, sides, side_run)]
        results[name] = over_repeats(rounds) | {
            "corpus": corpus, "steps": steps, "length_profile": length_profile(data, args.batch_size, steps)}
        log(f"  {name}: " + ", ".join(f"{k} {v}" for k, v in results[name]["ratios"].items()) + "; " + ", ".join(
            f"{side} {figures['nonpad_tokens_per_s']} tok/s" for side, figures in results[name]["sides"].items()))
    plot = plot_losses(results, (ROOT / args.out).with_suffix("") if args.out else RESULTS / "train_vs_trl")
    shown = plot.relative_to(ROOT) if plot.is_relative_to(ROOT) else plot  # --out may point outside the repo
    figures = {"config": config(args), "jobs": results, "loss_plot": str(shown)}
    return Measured("LoRA on SmolLM2-135M-Instruct, global batch 16, 2 CPU threads: honed train at its defaults "
                    "(2 Ray workers, padding-free) vs TRL SFTTrainer and transformers.Trainer (1 process, padded); "
                    "steady-state non-pad tokens/s and whole-job wall time", figures, goals(results, args))


def run_side(kind: str, tag: str, data: Path, steps: int, args, corpus: str) -> dict:
    """One side's run in a fresh process: honed at its defaults, or TRL / HF with the job's settings; a run that
    failed (on a shared machine: killed for memory others hold) is recorded with its error, not fatal."""
    try:
        return run_one(kind, tag, data, steps, args, corpus)
    except RuntimeError as err:
        log(f"  {kind} failed: {str(err)[:300]}")
        return {"error": str(err)[:2000]}


def run_one(kind: str, tag: str, data: Path, steps: int, args, corpus: str) -> dict:
    if kind == "honed":
        config = honed_default_config(data, WORK / "runs" / tag, steps)
        if args.precision == "bf16":
            config["model"]["dtype"] = "bfloat16"
        run = start("honed", {"config": config, "threads": 1, "ray_address": getattr(args, "ray_address", None)}, tag)
        return public(run) | {"nonpad_tokens_per_s": run["efficiency"]["nonpad_tokens_per_s"],
                              "step_time_s": run["efficiency"]["step_time_s"], "_run": run}
    job = SimpleNamespace(steps=steps, batch_size=args.batch_size, threads=args.threads, gpu=False)
    bf16 = {"bf16": True} if trl_precision(args) == "bf16" else {}
    trl = {"trl": TRL_BY_CORPUS.get(corpus, {}) | bf16} if kind == "trl" else {}
    return public(run_loop(kind, tag, data, job, lr=2e-3, variant_repeats=0, **trl))


def trl_precision(args) -> str:
    """TRL's numerics: `--trl-precision`, or honed's `--precision` where it is `same`."""
    return args.precision if args.trl_precision == "same" else args.trl_precision


def job_figures(runs: dict, tokens: list[dict]) -> dict:
    """Each side's figures and honed's ratios over the others: steady-state rate (higher is better for
    honed) and whole-job wall time (the other's over honed's: above 1 when honed finishes first)."""
    sides = {kind: run for kind, run in runs.items() if "error" in run}  # failed: their error only
    for kind, run in ((k, r) for k, r in runs.items() if k not in sides):
        sides[kind] = {k: run[k] for k in SIDE_KEYS if k in run}
        if kind == "honed":
            sides[kind] |= {"wall": honed_wall_rate(run["_run"], tokens), "live_times": run["live_times"]}
        else:
            sides[kind]["same_batches_as_honed"] = run["tokens_per_step"] == [t["nonpad"] for t in tokens]
    ratios = {}
    measured = [k for k in sides if "error" not in sides[k]]
    for other in (k for k in measured if k != "honed"):
        if "honed" in measured:
            ratios[f"steady_honed_over_{other}"] = ratio(sides["honed"]["nonpad_tokens_per_s"],
                                                         sides[other]["nonpad_tokens_per_s"])
            ratios[f"wall_{other}_over_honed"] = ratio(sides[other]["process_wall_s"], sides["honed"]["process_wall_s"])
    return {"sides": sides, "ratios": ratios}


def over_repeats(rounds: list[tuple[list[str], dict]]) -> dict:
    """A job's figures from its repeats ((order, `job_figures`) each): one repeat's as they are; over several,
    each ratio's median over the repeats (each ratio compares runs made back to back), the sides of the repeat
    whose steady-state ratio over TRL is the median one (its loss curves are the ones plotted), and every
    repeat's order, ratios and rates."""
    if len(rounds) == 1:
        order, figures = rounds[0]
        return figures | {"order": order}
    keys = sorted({key for _, figures in rounds for key in figures["ratios"]})
    ratios = {}
    for key in keys:
        values = [figures["ratios"][key] for _, figures in rounds if figures["ratios"].get(key)]
        if values:
            ratios[key] = round(statistics.median(values), 4)
    steady = [figures["ratios"].get("steady_honed_over_trl") or 0.0 for _, figures in rounds]
    middle = sorted(range(len(rounds)), key=lambda i: steady[i])[(len(rounds) - 1) // 2]
    by_repeat = [{"order": order, "ratios": figures["ratios"],
                  **{key: {kind: side.get(key) for kind, side in figures["sides"].items()}
                     for key in ("nonpad_tokens_per_s", "process_wall_s")}} for order, figures in rounds]
    return {"sides": rounds[middle][1]["sides"], "sides_of_repeat": middle + 1, "ratios": ratios,
            "repeats": by_repeat, "order": rounds[0][0]}


def goals(results: dict, args) -> list[dict]:
    """The issue's goals from the jobs that ran (a goal whose job did not run is reported unmet, value None):
    steady state on the demo corpus (its longest job) and the mixed corpus; whole-job wall time of the short
    (24-step) and the long (80-step) demo job."""
    demo = sorted((r for r in results.values() if r["corpus"] == "demo"), key=lambda r: r["steps"])

    def ratio_of(job: dict | None, key: str) -> float | None:
        return job["ratios"].get(key) if job else None

    short, long = results.get(f"demo_{args.short_steps}"), results.get(f"demo_{args.long_steps}")
    return [at_least("demo corpus: honed / TRL steady-state non-pad tokens/s",
                     ratio_of(demo[-1] if demo else None, "steady_honed_over_trl"), GOALS["steady_demo"]),
            at_least("mixed corpus: honed / TRL steady-state non-pad tokens/s",
                     ratio_of(results.get(f"mixed_{args.mixed_steps}"), "steady_honed_over_trl"),
                     GOALS["steady_mixed"]),
            at_least(f"{args.short_steps or 'short (not run)'}-step demo job: TRL whole-job wall / honed's",
                     ratio_of(short, "wall_trl_over_honed"), GOALS["wall_short"]),
            at_least(f"{args.long_steps or 'long (not run)'}-step demo job: TRL whole-job wall / honed's",
                     ratio_of(long, "wall_trl_over_honed"), GOALS["wall_long"])]


def config(args) -> dict:
    from train_loops import TRL_SETTINGS  # no torch at import: the driver may read it

    return {"model": MODEL, "method": "lora", "lora": LORA, "global_batch": args.batch_size, "lr": 2e-3,
            "warmup": 10, "schedule": "cosine", "optimizer": "torch fused AdamW (all sides)",
            "honed": "honed_default_config: 2 workers x batch 8 x 1 thread, padding-free",
            "honed_ray": args.honed_ray + (": a Ray head started before the jobs, every honed job connects to it"
                                           if args.honed_ray == "running" else ": each job starts its own Ray"),
            "trl": {"version": "1.16.0", "settings": TRL_SETTINGS, "settings_by_corpus": TRL_BY_CORPUS,
                    "threads": args.threads, "processes": 1},
            "hf": {"threads": args.threads, "processes": 1, "collator": "DataCollatorForSeq2Seq"},
            "precision": args.precision,
            "trl_precision": trl_precision(args),
            "mixed_corpus": MIXED, "jobs": [(*j[:3], j[4]) for j in jobs(args)]}


def plot_losses(results: dict, stem: Path) -> Path:
    """One panel a job: TRL's and HF's loss at every step, honed's logged window means (markers)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 3.8), squeeze=False)
    for ax, (name, job) in zip(axes[0], results.items()):
        for kind, side in ((k, s) for k, s in job["sides"].items() if "error" not in s):
            if kind == "honed":
                points = [(r["step"], r["loss"]) for r in side["live_times"]]
                ax.plot(*zip(*points), "o-", label="honed (logged window mean)", zorder=3)
            else:
                ax.plot(range(1, len(side["losses"]) + 1), side["losses"], lw=1, alpha=0.8, label=f"{kind} (per step)")
        ax.set(title=f"{name} ({job['corpus']} corpus)", xlabel="optimizer step", ylabel="training loss")
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = stem.with_name(stem.name + "_loss.png")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


if __name__ == "__main__":
    main("train_vs_trl", __doc__, measure, options=options,
         quick={"short_steps": 6, "long_steps": 0, "mixed_steps": 4, "sides": "honed,trl", "mixed_repeats": 1})
