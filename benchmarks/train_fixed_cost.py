"""The fixed cost of a `honed train` job: the whole job's wall time minus its training steps, by phase.

    .venv/bin/python benchmarks/train_fixed_cost.py            # an 8-step job (~2 min on 2 CPUs)
    .venv/bin/python benchmarks/train_fixed_cost.py --quick    # 4 steps

The job: `python -m honed.cli train` in a fresh process on the prepared demo corpus (jobs/prepare_icd10.yaml),
at honed's defaults (`train_runs.honed_default_config`: 2 workers x batch 8 x 1 thread, LoRA as jobs/demo.yaml,
final validation on `val_max_examples` rows a source, the export check, the report), --steps optimizer steps.

  whole job        the CLI process's wall time, start to exit
  training steps   `training_steps_s` of the run's efficiency.json `phases` (rank 0's optimizer steps, the first
                   batch's wait excluded)
  fixed cost       whole job - training steps; goal <= 30 s (issue 22.2)
  parts            every entry of `phases` (the driver's plan and validation read, the workers' start and set-up,
                   Ray Data's first batch, validation, checkpoints, export check, report) and `outside_train_s`:
                   the CLI's imports, Ray's start, preflight and shutdown around `train()`
Writes `benchmarks/results/train_fixed_cost.json`; the machine is shared: its load is recorded before and after.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import yaml

from harness import MODEL, ROOT, WORK, Measured, at_most, bench_env, log, main, wait_for_quiet
from train_runs import honed_default_config, prepared_dataset

GOAL_S = 30.0


def options(parser) -> None:
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps of the job")


def measure(args) -> Measured:
    data = prepared_dataset()
    out = WORK / "runs" / "fixed-cost"
    config = WORK / "fixed_cost.yaml"
    config.write_text(yaml.safe_dump(honed_default_config(data, out, args.steps)))
    job = run_job(config, out)
    figures = {"config": {"model": MODEL, "steps": args.steps, "data": str(data),
                          "job": "honed_default_config: 2 workers x batch 8 x 1 thread, padding-free, LoRA"},
               "job": job}
    log(f"whole job {job['job_wall_s']} s, training steps {job['training_steps_s']} s, fixed {job['fixed_s']} s")
    return Measured("`honed train` on the demo corpus at its defaults in a fresh process: whole-job wall time minus "
                    "the training steps, by phase", figures,
                    [at_most("fixed cost: whole-job wall - training-step time (s)", job["fixed_s"], GOAL_S)])


def run_job(config, out) -> dict:
    """`honed train CONFIG` from an empty output dir (a leftover run would resume), timed from outside."""
    subprocess.run(["rm", "-rf", str(out)], check=True)
    waited = wait_for_quiet()
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "honed.cli", "train", str(config)], cwd=ROOT, env=bench_env(1),
                          capture_output=True, text=True, timeout=3600, check=False)
    wall = time.perf_counter() - start
    if done.returncode:
        raise RuntimeError(f"honed train failed ({done.returncode}): {done.stderr[-3000:]}")
    return job_figures(json.loads((out / "efficiency.json").read_text()), wall) | {
        "waited_for_quiet_s": waited, "loadavg_1min_before_after": [round(load_before, 2),
                                                                     round(os.getloadavg()[0], 2)]}


def job_figures(efficiency: dict, wall: float) -> dict:
    """The job's parts from its efficiency.json `phases` and the process's wall time."""
    phases = efficiency["phases"]
    return {"job_wall_s": round(wall, 2), "training_steps_s": phases["training_steps_s"],
            "fixed_s": round(wall - phases["training_steps_s"], 2),
            "outside_train_s": round(wall - phases["train_s"], 2), "phases": phases,
            "step_time_s": efficiency.get("step_time_s")}


if __name__ == "__main__":
    main("train_fixed_cost", __doc__, measure, options=options, quick={"steps": 4})
