"""`honed tune`: Ray Tune over `honed train` runs — a search space over train-config keys, random / grid / Optuna
(TPE) search, ASHA early stopping on a validation metric.

    honed tune jobs/tune_lora.yaml search.num_samples=8 max_concurrent_trials=2

Each trial is a function (`run_trial`) that builds its TrainConfig from `train` and its sampled values and trains
through honed.train.trainer.train; every validation reaches Tune (one Tune iteration each), where ASHA stops weak
trials and Optuna learns. A trial of one worker (`trials_in_process`, the default) trains in the trial's own
process (honed.train.in_process, on `trial_cpus + cpus_per_worker`), which Tune reuses for the next trial
(`reuse_actors`): no Ray Train controller, worker start or imports per trial. Any other trial (several workers,
DeepSpeed) is a driver on `trial_cpus` fitting a TorchTrainer whose RunConfig carries a `TuneReportCallback`; when
it is stopped its driver actor ends, and with it its Ray Train controller and workers; ReleaseWorkers then removes
the workers' placement group.

Writes `output_dir/`: trials/<trial>/ (each trial's train output_dir: adapter, metrics.jsonl, report.md, ...),
results.csv and results.md (one row per trial, sorted by `metric`), best_train.yaml (the best completed trial's
config, ready for `honed train`), report.md with plots/trials.png. The Tune experiment (per-trial result logs,
TensorBoard event files, the state `Tuner.restore` reads) lives at `storage_path/name`. `output_dir` and
`storage_path` may be object-storage URIs (s3://...): trials on any node train into them, the tables and reports
are written in a local staging dir and uploaded, so no node needs a shared disk. Running the same config
again continues an interrupted experiment: finished trials are kept, unfinished and errored ones run again (each
trial's own Ray Train run resuming from its latest checkpoint).
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

from ray.tune import Callback

from honed.artifacts import META
from honed.config import TrainConfig, TuneConfig, dump_config
from honed.report import PLOTS_DIR, plot_panels
from honed.storage import absolute, delete_dir, is_file, join, local_copy, read_text, staged, write_text

TRIALS_DIR = "trials"
PG_FILE = "placement_group_id"
COMPLETED, STOPPED, ERROR, UNFINISHED = "completed", "stopped early", "error", "unfinished"


def tune(cfg: TuneConfig) -> dict:
    """Run the search on the connected Ray cluster (or continue the experiment `name` in storage); returns a summary
    with the sorted trial rows, the best trial and the files written."""
    from ray import tune as rt

    cfg = with_absolute_paths(cfg)
    warn_cpu_budget(cfg)
    trainable = rt.with_resources(rt.with_parameters(run_trial, settings=cfg), trial_resources(cfg))
    path = experiment_dir(cfg)
    if rt.Tuner.can_restore(path):
        print(f"[honed.tune] continuing the experiment at {path}", flush=True)
        tuner = rt.Tuner.restore(path, trainable, resume_unfinished=True, resume_errored=True)
    else:
        tuner = rt.Tuner(trainable, param_space=param_space(cfg), tune_config=tune_config(cfg),
                         run_config=rt.RunConfig(name=cfg.name, storage_path=experiment_storage(cfg), verbose=1,
                                                 callbacks=[ReleaseWorkers(cfg.output_dir), *tracking_callbacks(cfg)]))
    grid = tuner.fit()
    statuses = {Path(t.path).name: t.status for t in rt.ExperimentAnalysis(path).trials}
    return write_results(cfg, trial_rows(grid, cfg, statuses))


def preflight(cfg: TuneConfig, resume: bool = False, restart: bool = False) -> str | None:
    """What stops the search before Ray starts (None when nothing does): `train` not fitting its dataset, tracking
    that cannot run here, `resume` without an experiment to continue. `restart` deletes the experiment and its
    trials (local or in object storage)."""
    from ray import tune as rt

    from honed.train.plan import plan_run

    try:
        plan_run(cfg.trial_config({}))
    except (FileNotFoundError, ValueError) as err:  # a missing model or data, or a plan that does not fit
        return str(err)
    if cfg.tracking.mlflow_uri and missing_tracking():
        return missing_tracking()
    path = experiment_dir(cfg)
    if resume and not rt.Tuner.can_restore(path):
        return f"--resume: no tune experiment at {path} to continue; drop --resume"
    if restart:
        delete_dir(path)
        delete_dir(join(cfg.output_dir, TRIALS_DIR))
    return None


def warn_cpu_budget(cfg: TuneConfig) -> None:
    """Ray Data lists the shards with a 1-CPU task per dataset: trials that leave the cluster under one free CPU
    hang in Ray Data backpressure without an error, so say so up front (an autoscaling cluster may still grow)."""
    import ray

    scaling = cfg.train.scaling
    held = cfg.max_concurrent_trials * (cfg.trial_cpus + scaling.num_workers * scaling.cpus_per_worker)
    total = ray.cluster_resources().get("CPU", 0)
    if total - held < 1:
        print(f"[honed.tune] warning: {cfg.max_concurrent_trials} trial(s) at once hold {held:g} of the cluster's "
              f"{total:g} CPUs, leaving Ray Data under the 1 CPU it needs to list the shards; the trials may wait "
              "forever. Lower max_concurrent_trials, train.scaling.cpus_per_worker or trial_cpus.", flush=True)


def in_process(cfg: TuneConfig) -> bool:
    """Whether trials train in their own (reused) process: `trials_in_process`, one worker without DeepSpeed (whose
    engine sets up a process group of its own), and scaling the search does not vary (a trial's resources are
    fixed before its sample is known)."""
    train = cfg.train
    return (cfg.trials_in_process and train.scaling.num_workers == 1 and not train.method.deepspeed.enabled
            and not any(key.startswith(("scaling.", "method.deepspeed")) for key in cfg.space))


def trial_resources(cfg: TuneConfig) -> dict:
    """A trial's resources: its driver's CPUs, plus its worker's CPUs (and GPU) when it trains in its own process."""
    if not in_process(cfg):
        return {"CPU": cfg.trial_cpus}
    scaling = cfg.train.scaling
    return {"CPU": cfg.trial_cpus + scaling.cpus_per_worker} | ({"GPU": 1} if scaling.use_gpu else {})


def run_trial(config: dict, settings: TuneConfig) -> None:
    """One trial: `settings.train` with the sampled `config` (dotted keys), trained under output_dir/trials/<trial>
    and validated at every checkpoint; its validations go to Tune. A bad combination raises ConfigError, which
    fails this trial only."""
    from ray import tune as rt

    trial = rt.get_context().get_trial_name()
    cfg = settings.trial_config(config, output_dir=join(settings.output_dir, TRIALS_DIR, trial), name=trial,
                                validate_at_checkpoints=True)
    from honed.train.trainer import train

    if in_process(settings):
        train(cfg, in_process=True, on_report=validation_to_tune(settings.metric))
    else:
        train(cfg, callbacks=[validation_report(settings.metric), record_placement_group(cfg.output_dir)])


def validation_to_tune(metric: str):
    """For a trial trained in its own process: each report holding `metric` (a validation) goes to Tune with its
    checkpoint's path, as Ray's TuneReportCallback passes it on for a Ray Train run."""
    from ray import tune as rt
    from ray.tune.integration.ray_train import CHECKPOINT_PATH_KEY

    def report(metrics: dict, checkpoint) -> None:
        if metric in metrics:
            rt.report(metrics | ({CHECKPOINT_PATH_KEY: checkpoint.path} if checkpoint else {}))

    return report


def validation_report(metric: str):
    """Ray's TuneReportCallback, passing on only the reports that hold `metric` (the validations): log-step
    reports would reach the scheduler and the searcher without the value they rank by."""
    from ray.tune.integration.ray_train import TuneReportCallback

    class ValidationReport(TuneReportCallback):
        def after_report(self, run_context, metrics, checkpoint):
            if metric in metrics[0]:
                super().after_report(run_context, metrics, checkpoint)

    return ValidationReport()


def record_placement_group(trial_dir: str):
    """A Ray Train worker-group callback (an internal hook Ray Train accepts in RunConfig callbacks) that writes the
    id of the workers' placement group to trial_dir/PG_FILE (a local path or a URI), for ReleaseWorkers."""
    from ray.train.v2._internal.execution.callback import WorkerGroupCallback

    class RecordPlacementGroup(WorkerGroupCallback):
        def after_worker_group_start(self, worker_group) -> None:
            group = worker_group.get_worker_group_state().placement_group_handle.placement_group
            write_text(join(trial_dir, PG_FILE), group.id.hex())

    return RecordPlacementGroup()


class ReleaseWorkers(Callback):
    """When a trial ends, removes its Ray Train placement group if it is still there. A stopped trial's driver dies
    with its Ray Train controller, and a placement group outlives the actor that made it: Ray Train's own cleaner
    removes it only where the state API (the dashboard) answers; without this its CPUs stay reserved and the next
    trials can starve Ray Data."""

    def __init__(self, output_dir: str):
        self.output_dir = output_dir

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        release_placement_group(join(self.output_dir, TRIALS_DIR, trial_name(trial)))

    on_trial_error = on_trial_complete


def release_placement_group(trial_dir: str) -> bool:
    """Remove the placement group recorded in trial_dir (a local path or a URI) unless Ray Train removed it already;
    True if removed."""
    from ray._raylet import PlacementGroupID
    from ray.util.placement_group import PlacementGroup, placement_group_table, remove_placement_group

    record = join(trial_dir, PG_FILE)
    if not is_file(record):
        return False
    group = PlacementGroup(PlacementGroupID.from_hex(read_text(record).strip()))
    if placement_group_table(group).get("state") in (None, "REMOVED"):
        return False
    remove_placement_group(group)
    return True


def with_absolute_paths(cfg: TuneConfig) -> TuneConfig:
    """Trials run in their own working directory (Tune changes it): relative paths are resolved here, once."""
    train = cfg.train
    model = train.model
    if Path(model.name_or_path).exists():
        model = model.model_copy(update={"name_or_path": str(Path(model.name_or_path).resolve())})
    train = train.model_copy(update={"data_dir": absolute(train.data_dir), "model": model})
    update = {"train": train, "output_dir": absolute(cfg.output_dir)}  # URIs stay as they are
    if cfg.register:
        update["register"] = cfg.register.model_copy(update={"registry": absolute(cfg.register.registry)})
    return cfg.model_copy(update=update)


def experiment_storage(cfg: TuneConfig) -> str:
    """Where Ray Tune keeps experiments: `storage_path`, else `output_dir` (a URI goes to Tune as it is: pyarrow.fs)."""
    return absolute(cfg.storage_path or cfg.output_dir)


def experiment_dir(cfg: TuneConfig) -> str:
    return join(experiment_storage(cfg), cfg.name)


def param_space(cfg: TuneConfig) -> dict:
    """The space as Ray Tune domains, keyed by the dotted train keys."""
    from ray import tune as rt

    make = {"loguniform": rt.loguniform, "uniform": rt.uniform, "randint": rt.randint}
    space = {}
    for key, domain in cfg.space.items():
        if domain.kind in make:
            space[key] = make[domain.kind](*domain.args)
        else:
            space[key] = (rt.grid_search if domain.kind == "grid" else rt.choice)(list(domain.args))
    return space


def validations_per_trial(train: TrainConfig) -> int:
    """Validations a full trial of `train` reports: one per checkpoint and the final one."""
    from honed.train.plan import plan_run

    total = plan_run(train).total_steps
    return math.ceil(total / train.checkpoint_every)


def tune_config(cfg: TuneConfig):
    from ray import tune as rt
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    if cfg.search.algorithm == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        search, limit = OptunaSearch(seed=cfg.search.seed), cfg.max_concurrent_trials  # Tune wraps it in a limiter
    else:  # Tune ignores max_concurrent_trials for a generator it is handed: the generator limits itself
        search, limit = BasicVariantGenerator(max_concurrent=cfg.max_concurrent_trials,
                                              random_state=cfg.search.seed), None
    s = cfg.scheduler
    if s.name == "asha":
        max_t = s.max_t or max(validations_per_trial(cfg.trial_config({})) - 1, s.grace_period)
        # stop_last_trials=False: a trial past the last rung runs to its end (and is exported)
        scheduler = ASHAScheduler(time_attr="training_iteration", max_t=max_t, grace_period=s.grace_period,
                                  reduction_factor=s.reduction_factor, stop_last_trials=False)
    else:
        scheduler = FIFOScheduler()
    return rt.TuneConfig(metric=cfg.metric, mode=cfg.mode, search_alg=search, scheduler=scheduler,
                         num_samples=cfg.search.num_samples, max_concurrent_trials=limit, reuse_actors=in_process(cfg),
                         trial_name_creator=trial_name, trial_dirname_creator=trial_name)


def trial_name(trial) -> str:
    return f"trial_{trial.trial_id}"


def tracking_callbacks(cfg: TuneConfig) -> list:
    """Tune adds its CSV, JSON and TensorBoard (tensorboardX) loggers itself; MLflow when configured."""
    if not cfg.tracking.mlflow_uri:
        return []
    from ray.air.integrations.mlflow import MLflowLoggerCallback

    return [MLflowLoggerCallback(tracking_uri=cfg.tracking.mlflow_uri,
                                 experiment_name=cfg.tracking.mlflow_experiment or cfg.name)]


def missing_tracking() -> str | None:
    """Why the configured tracking cannot run here (None when it can)."""
    import importlib.util

    if importlib.util.find_spec("mlflow") is None:
        return "tracking.mlflow_uri is set but mlflow is not installed here (pip install mlflow), or remove it"
    return None


# ------------------------------------------------------------------------------------------------- results
def trial_rows(grid, cfg: TuneConfig, statuses: dict[str, str]) -> list[dict]:
    """One row per trial with its sampled values, `metric` curve and status; `statuses` holds Tune's trial
    statuses by trial name: TERMINATED without an export is a trial the scheduler stopped, RUNNING or PENDING one
    an interrupted experiment left unfinished."""
    rows = []
    for result in grid:
        name = Path(result.path).name
        frame = result.metrics_dataframe
        curve = ([], [])
        if frame is not None and cfg.metric in frame and "step" in frame:
            points = frame[["step", cfg.metric]].dropna()
            curve = (points["step"].tolist(), points[cfg.metric].tolist())
        out = join(cfg.output_dir, TRIALS_DIR, name)
        exported = any(is_file(join(out, artifact, META)) for artifact in ("adapter", "model"))
        status = statuses.get(name)
        status = ERROR if result.error or status == "ERROR" else COMPLETED if exported else \
            STOPPED if status == "TERMINATED" else UNFINISHED
        values = curve[1]
        rows.append({
            "trial": name, "status": status, "config": dict(result.config or {}),
            "final": values[-1] if values else None,
            "best": (min(values) if cfg.mode == "min" else max(values)) if values else None,
            "validations": len(values), "last_step": int(curve[0][-1]) if curve[0] else None,
            "curve": curve, "dir": out,
            "error": str(result.error).strip().splitlines()[-1][:300] if result.error else "",
        })
    return rows


def ranked(rows: list[dict], mode: str) -> list[dict]:
    """Best first by the final metric; trials without one, then failed trials, last."""
    sign = 1 if mode == "min" else -1
    return sorted(rows, key=lambda r: (r["status"] == ERROR, r["final"] is None,
                                       sign * r["final"] if r["final"] is not None else 0, r["trial"]))


def write_results(cfg: TuneConfig, rows: list[dict]) -> dict:
    """results.csv / results.md (best first), plots/trials.png, report.md; best_train.yaml and the registration
    when a trial completed. ValueError (after writing the tables) when none did or the search was interrupted."""
    rows = ranked(rows, cfg.mode)
    keys = list(cfg.space)
    table = results_table(rows, keys, cfg.metric)
    summary = {"rows": rows, "results": join(cfg.output_dir, "results.csv"),
               "plot": join(cfg.output_dir, PLOTS_DIR, "trials.png")}
    best = next((r for r in rows if r["status"] == COMPLETED), None)
    with staged(cfg.output_dir) as out:  # output_dir itself, or a local dir uploaded to its URI at the end
        write_csv(out / "results.csv", rows, keys, cfg.metric)
        (out / "results.md").write_text(table + "\n")
        trial_curves(rows, cfg.metric, out / PLOTS_DIR / "trials.png")
        if best:
            summary |= {"best": best, "best_train": write_best_train(cfg, best, len(rows), out)}
            if cfg.register:
                summary["registered"] = register_best(cfg, join(best["dir"], "adapter"))
        (out / "report.md").write_text(render_report(cfg, rows, best, table, summary))
    print(f"[honed.tune] {len(rows)} trials → {join(cfg.output_dir, 'results.md')}\n{table}", flush=True)
    unfinished = sum(r["status"] == UNFINISHED for r in rows)
    if unfinished:
        raise ValueError(f"the experiment was interrupted with {unfinished} trial(s) unfinished; run the same command "
                         f"again to continue it (Tuner.restore from {experiment_dir(cfg)})")
    if not best:
        raise ValueError(f"no trial of {cfg.name} completed ({', '.join(sorted({r['status'] for r in rows}))}); "
                         f"see {join(cfg.output_dir, 'results.md')}")
    return summary


def register_best(cfg: TuneConfig, adapter: str) -> str:
    """Add the best adapter (a local dir or a URI) to the registry as the next version of `register.name`, unless
    that name's latest version already holds these weights (a rerun of a finished experiment registers nothing
    new)."""
    with local_copy(adapter) as local:
        return register_local_adapter(cfg, local)


def register_local_adapter(cfg: TuneConfig, adapter: Path) -> str:
    from honed.registry import Registry, safetensors_sha256

    registry = Registry(cfg.register.registry)
    name = cfg.register.name
    if registry.versions(name) and registry.show(name)["adapter_sha256"] == safetensors_sha256(adapter):
        ref = registry.resolve(name)
        print(f"[honed.tune] the best adapter is already registered as {ref}", flush=True)
        return ref
    ref = registry.add(name, str(adapter))
    print(f"[honed.tune] registered {ref} in {cfg.register.registry}", flush=True)
    return ref


def write_best_train(cfg: TuneConfig, best: dict, n_trials: int, out: Path) -> str:
    """The best trial's train config, with its own output_dir and run name, written to `out` (output_dir or its
    staging copy): `honed train best_train.yaml`. Returns its path under output_dir."""
    path = join(cfg.output_dir, "best_train.yaml")
    train = cfg.trial_config(best["config"], output_dir=join(cfg.output_dir, "best"), name=f"{cfg.name}-best")
    (out / "best_train.yaml").write_text(
        f"# honed train {path}\n# The best of {n_trials} trials of honed tune experiment {cfg.name}: "
        f"{best['trial']}, {cfg.metric} = {best['final']:.6g} at step {best['last_step']}.\n" + dump_config(train))
    return path


def cell(value) -> str:
    if value is None:
        return ""
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def write_csv(path: Path, rows: list[dict], keys: list[str], metric: str) -> None:
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["rank", "trial", "status", *keys, metric, f"best_{metric}", "validations", "last_step",
                         "error"])
        for rank, r in enumerate(rows, 1):
            writer.writerow([rank, r["trial"], r["status"], *(r["config"].get(k) for k in keys), r["final"],
                             r["best"], r["validations"], r["last_step"], r["error"]])


def results_table(rows: list[dict], keys: list[str], metric: str) -> str:
    head = ["#", "trial", "status", *keys, f"{metric} (final)", f"best {metric}", "validations", "last step"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * 3 + "---:|" * (len(head) - 3)]
    for rank, r in enumerate(rows, 1):
        values = [rank, r["trial"], r["status"] + (f": {r['error']}" if r["error"] else ""),
                  *(r["config"].get(k) for k in keys), r["final"], r["best"], r["validations"], r["last_step"]]
        lines.append("| " + " | ".join(cell(v).replace("|", "/") for v in values) + " |")
    return "\n".join(lines)


def trial_curves(rows: list[dict], metric: str, path: Path) -> Path:
    """`metric` against the training step for every trial; stopped trials dashed, failed and unfinished ones dotted."""
    style = {COMPLETED: {}, STOPPED: {"linestyle": "--"}, ERROR: {"linestyle": ":"}, UNFINISHED: {"linestyle": ":"}}
    curves = {f"{r['trial']} ({r['status']})": r["curve"] for r in rows if r["curve"][0]}
    styles = {f"{r['trial']} ({r['status']})": style[r["status"]] for r in rows}
    return plot_panels(path, [(f"{metric} per trial", metric, curves)], styles=styles)


def render_report(cfg: TuneConfig, rows: list[dict], best: dict | None, table: str, summary: dict) -> str:
    counts = {s: sum(r["status"] == s for r in rows) for s in (COMPLETED, STOPPED, ERROR, UNFINISHED)}
    counts = {s: n for s, n in counts.items() if n or s != UNFINISHED}
    tally = ", ".join(f"{n} {s}" for s, n in counts.items())
    how = f"search {cfg.search.algorithm}, scheduler {cfg.scheduler.name}, {cfg.mode}imising {cfg.metric}"
    lines = [f"# Tune experiment {cfg.name}", "", f"{len(rows)} trials ({tally}); {how}.", ""]
    if best:
        lines += [f"Best: **{best['trial']}**, {cfg.metric} = {best['final']:.6g} at step {best['last_step']} with "
                  + ", ".join(f"{k} = {cell(v)}" for k, v in best["config"].items())
                  + f". Its config: `{summary['best_train']}`; its run: `{best['dir']}`."]
        if summary.get("registered"):
            lines += ["", f"Registered as `{summary['registered']}` in `{cfg.register.registry}`."]
    lines += ["", "## Trials", "", table, "", "## Curves", "", f"![trials]({PLOTS_DIR}/trials.png)", "",
              f"TensorBoard: `tensorboard --logdir {experiment_dir(cfg)}` (one run per trial).", ""]
    return "\n".join(lines)
