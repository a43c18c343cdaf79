"""The `honed` command: one subcommand per stage, each reading one YAML config plus `key=value` overrides.

    honed demo                                    # the whole slice on the embedded default model
    honed prepare jobs/prepare_icd10.yaml output_dir=runs/data
    honed train jobs/train_lora.yaml optim.lr=1e-3 --address ray://head:10001
    honed tune jobs/tune_lora.yaml search.num_samples=8 max_concurrent_trials=2   # Ray Tune over train runs
    ray job submit --working-dir . -- honed train jobs/train_lora.yaml
    honed submit jobs/submit/train_lora.yaml --address http://head:8265   # the same as a Ray job (honed.jobs)
    honed registry add icd10-lora runs/train/adapter --eval runs/eval/eval.json   # → icd10-lora@1 (honed.registry)

Local Ray by default; `--address` or `RAY_ADDRESS` points the same command at a cluster. Configs are
validated before Ray starts: a bad key, type or value exits with status 2 and names what is allowed; a
failed forgetting gate (`honed eval --gate`) exits with status 3, after eval.json and the report are written.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from honed import jobs, registry
from honed.artifacts import MANIFEST
from honed.config import CONFIGS, ConfigError, dump_config, load_config

COMMANDS = {
    "prepare": "clean, template, tokenize and split a corpus with Ray Data",
    "train": "fine-tune with Ray Train (full/DeepSpeed, LoRA, QLoRA, prefix, IA3) from a prepared dataset",
    "tune": "search train-config values with Ray Tune (random/grid/Optuna, ASHA), each trial a Ray Train run",
    "eval": "score base vs base+adapter on the held-out sets",
    "merge": "merge an adapter into its base and verify the logits",
    "serve": "serve base + adapters behind an OpenAI-compatible endpoint (Ray Serve)",
    "demo": "prepare → train → eval → merge → serve on the embedded default model",
    "index": "build a retrieval index (BM25) over a domain corpus with Ray Data, for serve and eval `retrieval`",
}
JOB_ACTIONS = {
    "list": "list the cluster's jobs, oldest first",
    "status": "show a job's status and message",
    "logs": "print a job's logs (--follow: stream them until it ends, exit with its status)",
    "stop": "stop a running job and wait until it is STOPPED",
}
REGISTRY_ACTIONS = {
    "add": "register an adapter directory as the next version of NAME; prints NAME@N",
    "list": "list every version: base model, hashes, promotable, eval figures",
    "show": "print a version's honed.json (REF: name, name@N or name@latest)",
    "remove": "delete one version (name@N) or every version of a name",
    "publish": "copy a version to ROOT/<name@N>/, the flat layout vLLM loads adapters from; prints that id",
}


# Commands whose runs continue where they stopped when rerun: what --resume continues, what --restart does.
RESUMABLE = {
    "train": ("the run `name` from its latest checkpoint",
              "delete the run's local checkpoints first and train from step 0"),
    "tune": ("the experiment `name` (Tuner.restore)",
             "delete the experiment and its trials (local or object storage) first and search from scratch"),
}


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="honed", description="Turn a general LLM into a domain specialist on Ray.")
    subs = top.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_text in COMMANDS.items():
        sub = subs.add_parser(name, help=help_text, description=help_text)
        sub.add_argument("config", nargs="?", help="YAML config (a Serve config file for `serve`)")
        sub.add_argument("overrides", nargs="*", metavar="key=value", help="override a config value, e.g. optim.lr=1e-3")
        sub.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
        sub.add_argument("--print-config", action="store_true", help="print the validated config and exit")
        if name == "serve":
            sub.add_argument("--detach", action="store_true", help="deploy and return instead of blocking")
        if name == "demo":
            sub.add_argument("--with-dpo", action="store_true",
                             help="after SFT, run DPO from the SFT adapter on derived preference pairs (dpo.enabled)")
        if name == "eval":
            sub.add_argument("--gate", action="store_true",
                             help="apply the forgetting gate (config `gate`): exit 3 when it fails, and set a registry "
                                  "version's promotable (same as gate.enabled=true)")
        if name in RESUMABLE:
            how = sub.add_mutually_exclusive_group()
            what, restart = RESUMABLE[name]
            how.add_argument("--resume", action="store_true",
                             help=f"continue {what}; fail if there is none (without a flag an existing one is "
                                  "continued, a new one started)")
            how.add_argument("--restart", action="store_true", help=restart)
    add_job_commands(subs)
    add_registry_commands(subs)
    return top


def add_job_commands(subs) -> None:
    """`honed submit` and `honed jobs ACTION` (honed.jobs)."""
    sub = subs.add_parser("submit", help="submit a job file to a Ray cluster, stream its logs, exit with its status",
                          description="Submit a job file (see jobs/submit/) to a Ray cluster with Ray's Jobs SDK, "
                                      "stream its logs, exit 0 when it SUCCEEDED, 1 otherwise, 2 for a bad job file.")
    sub.add_argument("job", help="job YAML (see jobs/submit/)")
    sub.add_argument("overrides", nargs="*", metavar="key=value",
                     help="override a job file value, e.g. submission_id=x")
    sub.add_argument("--address",
                     help=f"Jobs API address (default: the file's, RAY_ADDRESS, else {jobs.DEFAULT_ADDRESS})")
    sub.add_argument("--no-wait", action="store_true", help="submit and return instead of streaming the logs")
    sub.add_argument("--print-config", action="store_true", help="print the validated job and exit")
    jobs_parser = subs.add_parser("jobs", help="list, inspect, follow or stop Ray jobs",
                                  description="Ray jobs on a cluster.")
    actions = jobs_parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    for name, help_text in JOB_ACTIONS.items():
        action = actions.add_parser(name, help=help_text, description=help_text)
        if name != "list":
            action.add_argument("id", help="submission id (or Ray job id)")
        action.add_argument("--address", help=f"Jobs API address (default: RAY_ADDRESS, else {jobs.DEFAULT_ADDRESS})")
        if name == "logs":
            action.add_argument("--follow", action="store_true", help="stream until the job ends")
        if name == "stop":
            action.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for STOPPED (default 60)")


def add_registry_commands(subs) -> None:
    """`honed registry ACTION` (honed.registry)."""
    registry_parser = subs.add_parser("registry", help="add, list, show or remove adapters in an adapter registry",
                                      description=registry.__doc__.split("\n\n")[0])
    actions = registry_parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    default, fallback = os.environ.get("HONED_REGISTRY", registry.DEFAULT_REGISTRY), registry.DEFAULT_REGISTRY
    for name, help_text in REGISTRY_ACTIONS.items():
        action = actions.add_parser(name, help=help_text, description=help_text)
        if name == "add":
            action.add_argument("name", help="adapter name: a-z 0-9 . _ -, at most 64 characters")
            action.add_argument("adapter_dir", help="adapter directory exported by `honed train` (output_dir/adapter)")
            action.add_argument("--eval", metavar="FILE", help="eval.json written by `honed eval`, kept under `eval`")
        elif name in ("show", "remove", "publish"):
            action.add_argument("ref", help="name, name@N or name@latest")
        elif name == "list":
            action.add_argument("--json", action="store_true", help="print the rows as JSON")
        if name == "publish":
            action.add_argument("--to", metavar="URI", help="where vLLM reads adapters (`vllm.adapter_root`; "
                                "default: <registry>/_vllm, where `engine: vllm` publishes on first use)")
        action.add_argument("--registry", metavar="URI", default=default,
                            help=f"registry directory or URI (default: HONED_REGISTRY, else {fallback})")


def split_config_arg(args: argparse.Namespace) -> tuple[str | None, list[str]]:
    """`honed train optim.lr=1` has no config file: argparse puts the first override in `config`."""
    if args.config and "=" in args.config and not args.config.endswith((".yaml", ".yml")):
        return None, [args.config, *args.overrides]
    return args.config, list(args.overrides)


def parse_command(argv: list[str]) -> tuple[str, str | None, list[str]]:
    """(command, config path or None, overrides) of `honed` arguments, read as `main` reads them; SystemExit (after
    argparse's usage message) when they are no honed command. honed.jobs checks job entrypoints with it."""
    args = parser().parse_args(argv)
    if args.command not in CONFIGS:
        return args.command, None, []
    return (args.command, *split_config_arg(args))


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.command in ("submit", "jobs"):
        return run_job_command(args)
    if args.command == "registry":
        return run_registry_command(args)
    path, overrides = split_config_arg(args)
    if getattr(args, "with_dpo", False):
        overrides.append("dpo.enabled=true")
    if getattr(args, "gate", False):
        overrides.append("gate.enabled=true")
    try:
        cfg = load_config(CONFIGS[args.command], path, overrides)
    except ConfigError as err:
        print(f"honed {args.command}: {err}", file=sys.stderr)
        return 2
    if args.print_config:
        print(dump_config(cfg), end="")
        return 0
    missing, plan = missing_inputs(args.command, cfg), None
    if not missing:
        missing, plan = preflight(args, cfg)
    if missing:
        print(f"honed {args.command}: {missing}", file=sys.stderr)
        return 1
    from honed.runtime import init_ray

    started = time.time()
    init_ray(args.address)
    try:
        status = run(args.command, cfg, detach=getattr(args, "detach", False), plan=plan) or 0
    except (FileNotFoundError, ValueError) as err:
        print(f"honed {args.command}: {err}", file=sys.stderr)
        return 1
    print(f"[honed] {args.command} finished in {time.time() - started:.0f}s", flush=True)
    return status


def missing_inputs(command: str, cfg) -> str | None:
    """The artifact an earlier stage should have written, checked before Ray starts."""
    model = getattr(cfg, "model", None) or getattr(getattr(cfg, "train", None), "model", None)
    if model is not None and command in ("prepare", "eval", "merge", "serve", "tune"):  # train: in its plan
        from honed.models import check_model

        try:
            check_model(model.name_or_path, model.revision)  # exists? (nothing downloaded: nodes fetch their own)
        except (FileNotFoundError, ValueError) as err:
            return str(err)
    if command == "prepare":
        from honed.config import FILE_KINDS, SourceConfig
        from honed.data.sources import list_files

        inputs = [s for s in cfg.data.sources if s.kind in FILE_KINDS] + [
            SourceConfig(name="decontaminate", kind="jsonl", path=p) for p in cfg.data.decontaminate.paths]
        try:
            for source in inputs:
                list_files(source)
        except (FileNotFoundError, PermissionError) as err:
            return str(err)
    if command in ("index", "eval", "serve"):
        from honed.retrieval.index import missing_retrieval_inputs

        missing = missing_retrieval_inputs(command, cfg)
        if missing:
            return missing
    needs = []
    if command in ("train", "eval"):
        needs.append((cfg.data_dir, MANIFEST, "prepared dataset", "honed prepare"))
    if command == "tune":
        needs.append((cfg.train.data_dir, MANIFEST, "prepared dataset", "honed prepare"))
    if command in ("eval", "merge") and cfg.adapter and not getattr(cfg, "registry", None):
        needs.append((cfg.adapter, "adapter_config.json", "adapter", "honed train"))
    if command == "eval" and cfg.merged:
        needs.append((cfg.merged, "config.json", "merged model", "honed merge"))
    if command == "eval" and cfg.registry:
        from honed.registry import Registry

        try:
            Registry(cfg.registry).resolve(cfg.adapter)
        except (ValueError, OSError) as err:
            return str(err)
    from honed.storage import is_file, join

    for directory, name, kind, producer in needs:  # a local dir or an object-storage URI
        if not is_file(join(directory, name)):
            return f"no {kind} at {directory} ({name} not found; `{producer}` writes one)"
    return None


def preflight(args: argparse.Namespace, cfg) -> tuple[str | None, object]:
    """Train and tune checks against the model, the prepared dataset and the run's storage, before Ray starts:
    (what stops the run or None, the training's RunPlan, planned here once and handed to `honed.train`)."""
    if args.command == "tune":
        from honed.tune import preflight as tune_preflight

        return tune_preflight(cfg, resume=args.resume, restart=args.restart), None
    if args.command != "train":
        return None, None
    from honed.train.plan import plan_run, run_checkpoints, run_dir

    try:
        plan = plan_run(cfg)  # checks the model exists; workers resolve it on their own nodes
    except (FileNotFoundError, ValueError) as err:
        return str(err), None
    checkpoints = run_checkpoints(cfg)
    if args.resume and checkpoints is not None and not checkpoints:
        return (f"--resume: run '{cfg.name}' has no checkpoint under {cfg.storage_path or cfg.output_dir}; "
                "drop --resume"), None
    if args.restart:
        import shutil

        if "://" in run_dir(cfg):
            return "--restart deletes local runs only; choose a new `name` for a cloud storage_path", None
        shutil.rmtree(run_dir(cfg), ignore_errors=True)
    return None, plan


def run(command: str, cfg, detach: bool = False, plan=None) -> int | None:
    """Run one stage (`plan`: the preflight's RunPlan for train); a non-zero int is the exit status (a failed
    eval gate)."""
    if command == "prepare":
        from honed.data.pipeline import prepare

        counts = prepare(cfg)["counts"]["total"]
        print(f"[honed.prepare] {counts} → {cfg.output_dir}", flush=True)
    elif command == "train":
        from honed.train.backends import artifact_name
        from honed.train.trainer import train

        train(cfg, plan=plan, sole_run=True)  # the command's job ends with the run
        print(f"[honed.train] {artifact_name(cfg.method)} → {cfg.output_dir}/{artifact_name(cfg.method)}", flush=True)
    elif command == "tune":
        from honed.tune import tune

        tune(cfg)
    elif command == "eval":
        from honed.eval.evaluate import evaluate
        from honed.eval.gate import GATE_FAILED_STATUS, describe

        gate = evaluate(cfg).get("gate")
        if gate and not gate["passed"]:
            failed = "; ".join(describe(c) for c in gate["checks"] if not c["passed"])
            print(f"honed eval: forgetting gate failed: {failed}", file=sys.stderr)
            return GATE_FAILED_STATUS
    elif command == "merge":
        from honed.merge import merge
        from honed.runtime import run_task

        report = run_task(merge, cfg, num_gpus=1 if cfg.use_gpu else 0)
        print(f"[honed.merge] max |Δlogit| {report['max_abs_logit_diff']:.2e} ≤ {report['tolerance']:.0e} "
              f"({report['dtype']} on {report['device']}) → {cfg.output_dir}", flush=True)
    elif command == "serve":
        from honed.serve.deploy import serve_forever

        serve_forever(cfg, detach)
    elif command == "demo":
        from honed.demo import run_demo

        run_demo(cfg)
    elif command == "index":
        from honed.retrieval.index import build_index

        meta = build_index(cfg)
        print(f"[honed.index] {meta['counts']['kept_records']} records → {meta['chunks']} chunks → "
              f"{cfg.output_dir}", flush=True)


def run_job_command(args: argparse.Namespace) -> int:
    """`honed submit` / `honed jobs ACTION`: a Jobs API failure exits 1 with one line, a bad job file 2."""
    from ray.exceptions import AuthenticationError

    name = "submit" if args.command == "submit" else f"jobs {args.action}"
    try:
        return submit(args) if args.command == "submit" else run_job_action(args)
    except (OSError, RuntimeError, AuthenticationError, ValueError) as err:  # OSError: refused / lost connections
        print(f"honed {name}: {err}", file=sys.stderr)
        return 1


def submit(args: argparse.Namespace) -> int:
    try:
        job, runtime_env = jobs.load_job(args.job, parse_command, args.overrides)
    except ConfigError as err:
        print(f"honed submit: {err}", file=sys.stderr)
        return 2
    address = jobs.resolve_address(args.address, job.address)
    if args.print_config:
        print(dump_config(job.model_copy(update={"address": address, "runtime_env": runtime_env})), end="")
        return 0
    return jobs.submit(job, runtime_env, address, wait=not args.no_wait)


def run_job_action(args: argparse.Namespace) -> int:
    client = jobs.connect(jobs.resolve_address(args.address))
    if args.action == "list":
        return jobs.list_jobs(client)
    if args.action == "status":
        return jobs.job_status(client, args.id)
    if args.action == "logs":
        return jobs.follow(client, args.id) if args.follow else jobs.print_logs(client, args.id)
    return jobs.stop_job(client, args.id, timeout_s=args.timeout)


def run_registry_command(args: argparse.Namespace) -> int:
    """`honed registry ACTION`: prints its result; a bad name, ref, adapter dir or --eval file, or an unreachable
    bucket, exits 2 with one line."""
    try:
        print(registry_action(registry.Registry(args.registry), args))
    except (ValueError, OSError) as err:  # RegistryError is a ValueError
        print(f"honed registry: {err}", file=sys.stderr)
        return 2
    return 0


def registry_action(adapters: registry.Registry, args: argparse.Namespace) -> str:
    if args.action == "add":
        results = json.loads(Path(args.eval).read_text()) if args.eval else None
        return adapters.add(args.name, args.adapter_dir, eval_results=results)
    if args.action == "show":
        return json.dumps(adapters.show(args.ref), indent=2)
    if args.action == "remove":
        return "\n".join(f"removed {ref}" for ref in adapters.remove(args.ref))
    if args.action == "publish":
        root = args.to or args.registry.rstrip("/") + "/_vllm"
        return adapters.publish(args.ref, root if "://" in root else str(Path(root).resolve()))
    rows = adapters.list()
    return json.dumps(rows, indent=2) if args.json else registry.list_table(rows)


if __name__ == "__main__":
    sys.exit(main())
