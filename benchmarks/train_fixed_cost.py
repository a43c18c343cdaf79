"""The fixed cost of a `honed train` job: the whole job's wall time minus its training steps, by phase.

    .venv/bin/python benchmarks/train_fixed_cost.py          # 8-step jobs: 3 on a running Ray, 1 fresh (~7 min)
    .venv/bin/python benchmarks/train_fixed_cost.py --quick  # 4 steps, one job each

The job: `python -m honed.cli train` in a fresh process on the prepared demo corpus (jobs/prepare_icd10.yaml),
at honed's defaults (`train_runs.honed_default_config`: 2 workers x batch 8 x 1 thread, LoRA as jobs/demo.yaml,
final validation on `val_max_examples` rows a source, the export check, the report), --steps optimizer steps.

Jobs in one invocation: --repeats (3) submitted to a running Ray (a `ray start --head` of the benchmark's own,
started before the timer, as `ray job submit` finds a cluster: the goal is the median one's, its phases shown)
and one in a fresh process that starts its own Ray. Issue 22.2 asks for the fixed cost with each part reported
and names reusing an already running Ray as one way there: the goal is the job on a running Ray. The fresh
process is reported beside it, with `ray_start_stop_s`: its time outside `train()` less the median job's, i.e.
what starting and stopping a local Ray added (until 2026-12-05 it was listed as a second <= 30 s goal).

Repeats because this VM's single-job figure moved from 36.1 s (03:08) to 50.2 s (06:05) with the same
validation-free code paths: steps 4.4 vs 4.9 s, workers' start 10.2 vs 19.0 s, model load 5.0 vs 8.2 s. Seen on
it, not proven the cause: memory the host has taken back (kdamond pages out what sat idle for a minute; freed pages
go back to the host) costs ~6 s a GB to touch again, ~0.4 s when just freed, and every worker touches over a GB
(imports, the fp32 model).

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

import yaml

from harness import MODEL, RESULTS, WORK, Measured, RunningRay, at_most, log, main, run_honed, spread
from train_runs import honed_default_config, prepared_dataset

GOAL_S = 30.0


def options(parser) -> None:
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps of the job")


def measure(args) -> Measured:
    data = prepared_dataset()
    out = WORK / "runs" / "fixed-cost"
    config = WORK / "fixed_cost.yaml"
    config.write_text(yaml.safe_dump(honed_default_config(data, out, args.steps)))
    ray = RunningRay(os.cpu_count() or 1)
    try:
        ray.wait()
        jobs = [run_job(config, out, ray.client_env) for _ in range(args.repeats)]
    finally:
        ray.stop()
    fresh = run_job(config, out)
    cluster = median_job(jobs)
    figures = {"config": {"model": MODEL, "steps": args.steps, "data": str(data),
                          "job": "honed_default_config: 2 workers x batch 8 x 1 thread, padding-free, LoRA"},
               "job": cluster, "fixed_s_by_repeat": [j["fixed_s"] for j in jobs],
               "fixed_s": spread([j["fixed_s"] for j in jobs]),
               "job_fresh_process": fresh,
               "ray_start_stop_s": round(fresh["outside_train_s"] - cluster["outside_train_s"], 2),
               "previous_result": previous_result()}
    for name, job in (("running Ray", cluster), ("fresh process", fresh)):
        log(f"{name}: whole job {job['job_wall_s']} s, training steps {job['training_steps_s']} s, "
            f"fixed {job['fixed_s']} s")
    return Measured("`honed train` on the demo corpus at its defaults: whole-job wall time minus the training steps, "
                    "by phase — submitted to a running Ray (as `ray job submit` finds a cluster) and in a fresh "
                    "process that starts its own", figures,
                    [at_most("fixed cost, job on a running Ray: whole-job wall - training-step time (s)",
                             cluster["fixed_s"], GOAL_S)])


def median_job(jobs: list[dict]) -> dict:
    """The job of median fixed cost (the lower middle one of an even number): its phases stay one job's."""
    return sorted(jobs, key=lambda j: j["fixed_s"])[(len(jobs) - 1) // 2]


def previous_result() -> dict | None:
    """The last result file's date, commit and job figures: what this run is compared with."""
    path = RESULTS / "train_fixed_cost.json"
    if not path.is_file():
        return None
    last = json.loads(path.read_text())
    return {k: last.get(k) for k in ("date", "commit", "job", "goals")}


def run_job(config, out, env: dict | None = None) -> dict:
    """`honed train CONFIG` from an empty output dir, timed from outside."""
    job = run_honed("train", config, out, env)
    return job_figures(json.loads((out / "efficiency.json").read_text()), job.pop("wall_s")) | job


def job_figures(efficiency: dict, wall: float) -> dict:
    """The job's parts from its efficiency.json `phases` and the process's wall time."""
    phases = efficiency["phases"]
    return {"job_wall_s": round(wall, 2), "training_steps_s": phases["training_steps_s"],
            "fixed_s": round(wall - phases["training_steps_s"], 2),
            "outside_train_s": round(wall - phases["train_s"], 2), "phases": phases,
            "worker_setup_parts": efficiency.get("worker_setup_parts"),
            "step_time_s": efficiency.get("step_time_s")}


if __name__ == "__main__":
    main("train_fixed_cost", __doc__, measure, options=options, quick={"steps": 4, "repeats": 1}, repeats=3)
