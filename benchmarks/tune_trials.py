"""The start-up each `honed tune` trial pays: trials trained in their own process, which Tune reuses for the next
trial (the default, `trials_in_process: true`), vs each trial fitting a Ray Train worker group (`false`).

    .venv/bin/python benchmarks/tune_trials.py            # 6 trials of 4 steps in each mode (~6 min on 2 CPUs)
    .venv/bin/python benchmarks/tune_trials.py --quick    # 2 trials of 2 steps

The search: `python -m honed.cli tune` submitted to a running Ray (a `ray start --head` of the benchmark's own,
started before the timer) on the prepared demo corpus (jobs/prepare_icd10.yaml) with the real model; LoRA as
jobs/demo.yaml's, one worker x 1 thread a trial, 2 trials at a time (0.4 + 0.05 CPU each), a grid of --trials
learning rates, --steps optimizer steps and one validation (32 rows a source) per trial, FIFO. Both modes run in
one invocation, the same search, Ray Train first.

  search wall        the CLI process's wall time, per trial: / trials
  start-up           per trial, from its efficiency.json `phases`: `workers_start_s` (from the fit call to the
                     training function: Ray Train's controller and worker processes, their imports) +
                     `worker_setup_s` (model load, backend; a fresh process's first torch work); the mean over trials
  fixed cost         per trial, `fixed_s`: its train() less its training steps
  processes          the trial processes (the `pid` of Tune's results)
Goals: mean start-up in process <= 0.25 x Ray Train's (trials no longer start processes and import the stack);
in process, the trials ran in at most `max_concurrent_trials` processes.
Writes `benchmarks/results/tune_trials.json`; the machine's load is recorded before and after each search.
"""

from __future__ import annotations

import json
import os
import statistics
from pathlib import Path

import yaml

from harness import MODEL, WORK, Measured, RunningRay, at_most, log, main, ratio, run_honed
from train_runs import LORA, prepared_dataset

CONCURRENT = 2
START_UP_RATIO_GOAL = 0.25


def options(parser) -> None:
    parser.add_argument("--trials", type=int, default=6, help="trials per search (a grid of learning rates)")
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps per trial")


def tune_config(data: Path, out: Path, trials: int, steps: int, in_process: bool) -> dict:
    lrs = [round(2e-3 * 1.5 ** k, 6) for k in range(trials)]
    return {
        "train": {"model": {"name_or_path": MODEL}, "method": {"name": "lora", "lora": dict(LORA)},
                  "optim": {"max_steps": steps, "warmup_steps": 0},
                  "scaling": {"num_workers": 1, "cpus_per_worker": 0.4, "torch_threads": 1},
                  "data_dir": str(data), "checkpoint_every": steps, "keep_checkpoints": 1, "val_max_examples": 32},
        "space": {"optim.lr": {"grid": lrs}}, "search": {"algorithm": "grid", "num_samples": 1},
        "scheduler": {"name": "fifo"}, "max_concurrent_trials": CONCURRENT, "trial_cpus": 0.05,
        "trials_in_process": in_process, "output_dir": str(out), "name": "bench-tune"}


def measure(args) -> Measured:
    data = prepared_dataset()
    ray = RunningRay(os.cpu_count() or 1)
    searches = {}
    try:
        ray.wait()
        for mode, in_process in (("ray_train", False), ("in_process", True)):
            out = WORK / "runs" / f"tune-{mode}"
            config = WORK / f"tune_{mode}.yaml"
            config.write_text(yaml.safe_dump(tune_config(data, out, args.trials, args.steps, in_process)))
            searches[mode] = run_search(config, out, ray.client_env)
            s = searches[mode]
            log(f"{mode}: search {s['search_wall_s']} s ({s['wall_per_trial_s']} s a trial), start-up a trial "
                f"{s['start_up_mean_s']} s, fixed {s['fixed_mean_s']} s, {s['processes']} trial processes")
    finally:
        ray.stop()
    inp, rt = searches["in_process"], searches["ray_train"]
    start_up = ratio(inp["start_up_mean_s"], rt["start_up_mean_s"], 3)
    figures = {"config": {"model": MODEL, "trials": args.trials, "steps": args.steps, "data": str(data),
                          "max_concurrent_trials": CONCURRENT,
                          "trial": "1 worker x 1 thread, 0.4 + 0.05 CPU, LoRA as jobs/demo.yaml, 32 val rows a source"},
               "searches": searches,
               "in_process_over_ray_train": {"start_up": start_up,
                                             "fixed": ratio(inp["fixed_mean_s"], rt["fixed_mean_s"], 3),
                                             "search_wall": ratio(inp["search_wall_s"], rt["search_wall_s"], 3)}}
    return Measured("`honed tune` trials of one worker: trained in their own process, reused by Tune for the next "
                    "trial (the default), vs each fitting a Ray Train worker group; the start-up each trial pays",
                    figures,
                    [at_most("mean per-trial start-up (worker start + set-up), in process / Ray Train", start_up,
                             START_UP_RATIO_GOAL),
                     at_most("trial processes in process (max_concurrent_trials = 2)", inp["processes"], CONCURRENT)])


def run_search(config: Path, out: Path, env: dict) -> dict:
    """`honed tune CONFIG` from an empty output dir, timed from outside; each trial's phases read back."""
    search = run_honed("tune", config, out, env)
    trials = {}
    for trial in sorted((out / "trials").glob("trial_*")):
        phases = json.loads((trial / "efficiency.json").read_text())["phases"]
        trials[trial.name] = {"start_up_s": round(phases["workers_start_s"] + phases["worker_setup_s"], 2),
                              **{k: phases[k] for k in ("workers_start_s", "worker_setup_s", "fixed_s",
                                                        "training_steps_s", "train_s")}}
    pids = {json.loads(line)["pid"] for result in (out / "bench-tune").glob("trial_*/result.json")
            for line in result.read_text().splitlines() if line.strip()}
    wall = search.pop("wall_s")
    return {"search_wall_s": round(wall, 2), "wall_per_trial_s": round(wall / max(len(trials), 1), 2),
            "start_up_mean_s": round(statistics.mean(t["start_up_s"] for t in trials.values()), 2),
            "fixed_mean_s": round(statistics.mean(t["fixed_s"] for t in trials.values()), 2),
            "processes": len(pids), "trials": trials, **search}


if __name__ == "__main__":
    main("tune_trials", __doc__, measure, options=options, quick={"trials": 2, "steps": 2})
