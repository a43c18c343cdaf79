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
import sys
import time
from pathlib import Path

from honed import jobs, registry
from honed.config import CONFIGS, ConfigError, dump_config, load_config

COMMANDS = {
    "prepare": "clean, template, tokenize and split a corpus with Ray Data",
    "train": "fine-tune with Ray Train (full/DeepSpeed, LoRA, QLoRA, prefix, IA3) from a prepared dataset",
    "tune": "search train-config values with Ray Tune (random/grid/Optuna, ASHA), each trial a Ray Train run",
    "eval": "score base vs base+adapter on the held-out sets",
    "merge": "merge an adapter into its base and verify the logits",
    "serve": "serve base + adapters behind an OpenAI-compatible endpoint (Ray Serve)",
    "demo": "prepare → train → eval → merge → serve on the embedded default model",
}


# Commands whose runs continue where they stopped when rerun: what --resume continues, what --restart does.
RESUMABLE = {
    "train": ("the run `name` from its latest checkpoint",
              "delete the run's local checkpoints first and train from step 0"),
    "tune": ("the experiment `name` (Tuner.restore)",
             "delete the local experiment and its trials first and search from scratch"),
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
    jobs.add_commands(subs)
    registry.add_commands(subs)
    return top


def split_config_arg(args: argparse.Namespace) -> tuple[str | None, list[str]]:
    """`honed train optim.lr=1` has no config file: argparse puts the first override in `config`."""
    if args.config and "=" in args.config and not args.config.endswith((".yaml", ".yml")):
        return None, [args.config, *args.overrides]
    return args.config, list(args.overrides)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.command in ("submit", "jobs"):
        return jobs.main(args)
    if args.command == "registry":
        return registry.main(args)
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
    missing = missing_inputs(args.command, cfg) or preflight(args, cfg)
    if missing:
        print(f"honed {args.command}: {missing}", file=sys.stderr)
        return 1
    from honed.runtime import init_ray

    started = time.time()
    init_ray(args.address)
    try:
        status = run(args.command, cfg, detach=getattr(args, "detach", False)) or 0
    except (FileNotFoundError, ValueError) as err:
        print(f"honed {args.command}: {err}", file=sys.stderr)
        return 1
    print(f"[honed] {args.command} finished in {time.time() - started:.0f}s", flush=True)
    return status


def missing_inputs(command: str, cfg) -> str | None:
    """The artifact an earlier stage should have written, checked before Ray starts."""
    if command == "prepare":
        from honed.config import SourceConfig
        from honed.data.sources import list_files

        inputs = [s for s in cfg.data.sources if s.path] + [
            SourceConfig(name="decontaminate", kind="jsonl", path=p) for p in cfg.data.decontaminate.paths]
        try:
            for source in inputs:
                list_files(source)
        except (FileNotFoundError, PermissionError) as err:
            return str(err)
    needs = []
    if command in ("train", "eval"):
        needs.append((Path(cfg.data_dir) / "manifest.json", "prepared dataset", "honed prepare"))
    if command == "tune":
        needs.append((Path(cfg.train.data_dir) / "manifest.json", "prepared dataset", "honed prepare"))
    if command in ("eval", "merge") and cfg.adapter and not getattr(cfg, "registry", None):
        needs.append((Path(cfg.adapter) / "adapter_config.json", "adapter", "honed train"))
    if command == "eval" and cfg.merged:
        needs.append((Path(cfg.merged) / "config.json", "merged model", "honed merge"))
    if command == "eval" and cfg.registry:
        from honed.registry import Registry

        try:
            Registry(cfg.registry).resolve(cfg.adapter)
        except (ValueError, OSError) as err:
            return str(err)
    for path, kind, producer in needs:
        if not path.is_file():
            return f"no {kind} at {path.parent} ({path.name} not found; `{producer}` writes one)"
    return None


def preflight(args: argparse.Namespace, cfg) -> str | None:
    """Train and tune checks against the prepared dataset and the run's storage, before Ray starts."""
    if args.command == "tune":
        from honed.tune import preflight as tune_preflight

        return tune_preflight(cfg, resume=args.resume, restart=args.restart)
    if args.command != "train":
        return None
    from honed.train.trainer import plan_run, run_checkpoints

    try:
        plan_run(cfg)
    except ValueError as err:
        return str(err)
    checkpoints = run_checkpoints(cfg)
    if args.resume and checkpoints is not None and not checkpoints:
        return f"--resume: run '{cfg.name}' has no checkpoint under {cfg.storage_path or cfg.output_dir}; drop --resume"
    if args.restart:
        import shutil

        from honed.train.trainer import run_dir

        if "://" in run_dir(cfg):
            return "--restart deletes local runs only; choose a new `name` for a cloud storage_path"
        shutil.rmtree(run_dir(cfg), ignore_errors=True)
    return None


def run(command: str, cfg, detach: bool = False) -> int | None:
    """Run one stage; a non-zero int is the exit status (a failed eval gate)."""
    if command == "prepare":
        from honed.data.pipeline import prepare

        counts = prepare(cfg)["counts"]["total"]
        print(f"[honed.prepare] {counts} → {cfg.output_dir}", flush=True)
    elif command == "train":
        from honed.train.trainer import train

        from honed.train.backends import artifact_name

        train(cfg)
        print(f"[honed.train] {artifact_name(cfg.method.model_dump())} → {cfg.output_dir}/"
              f"{artifact_name(cfg.method.model_dump())}", flush=True)
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

        report = run_task(merge, cfg)
        print(f"[honed.merge] max |Δlogit| {report['max_abs_logit_diff']:.2e} ≤ {cfg.tolerance:.0e} → "
              f"{cfg.output_dir}", flush=True)
    elif command == "serve":
        from honed.serve.deploy import serve_forever

        serve_forever(cfg, detach)
    elif command == "demo":
        from honed.demo import run_demo

        run_demo(cfg)


if __name__ == "__main__":
    sys.exit(main())
