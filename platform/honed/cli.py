"""The `honed` command: one subcommand per stage, each reading one YAML config plus `key=value` overrides.

    honed demo                                    # the whole slice on the embedded default model
    honed prepare jobs/prepare_icd10.yaml output_dir=runs/data
    honed train jobs/train_lora.yaml optim.lr=1e-3 --address ray://head:10001
    ray job submit --working-dir . -- honed train jobs/train_lora.yaml
    honed submit jobs/submit/train_lora.yaml --address http://head:8265   # the same as a Ray job (honed.jobs)
    honed registry add icd10-lora runs/train/adapter --eval runs/eval/eval.json   # → icd10-lora@1 (honed.registry)

Local Ray by default; `--address` or `RAY_ADDRESS` points the same command at a cluster. Configs are
validated before Ray starts: a bad key, type or value exits with status 2 and names what is allowed.
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
    "eval": "score base vs base+adapter on the held-out sets",
    "merge": "merge an adapter into its base and verify the logits",
    "serve": "serve base + adapters behind an OpenAI-compatible endpoint (Ray Serve)",
    "demo": "prepare → train → eval → merge → serve on the embedded default model",
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
        if name == "train":
            how = sub.add_mutually_exclusive_group()
            how.add_argument("--resume", action="store_true",
                             help="continue the run `name` from its latest checkpoint; fail if it has none "
                                  "(without a flag an existing run is continued, a new one started)")
            how.add_argument("--restart", action="store_true",
                             help="delete the run's local checkpoints first and train from step 0")
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
        run(args.command, cfg, detach=getattr(args, "detach", False))
    except (FileNotFoundError, ValueError) as err:
        print(f"honed {args.command}: {err}", file=sys.stderr)
        return 1
    print(f"[honed] {args.command} finished in {time.time() - started:.0f}s", flush=True)
    return 0


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
    if command in ("eval", "merge") and cfg.adapter:
        needs.append((Path(cfg.adapter) / "adapter_config.json", "adapter", "honed train"))
    for path, kind, producer in needs:
        if not path.is_file():
            return f"no {kind} at {path.parent} ({path.name} not found; `{producer}` writes one)"
    return None


def preflight(args: argparse.Namespace, cfg) -> str | None:
    """Train-only checks against the prepared dataset and the run's storage, before Ray starts."""
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


def run(command: str, cfg, detach: bool = False) -> None:
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
    elif command == "eval":
        from honed.eval.evaluate import evaluate

        evaluate(cfg)
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
