"""`honed demo`: the whole slice on the embedded SmolLM2-135M-Instruct and bundled ICD-10-CM data.

    honed demo                          # writes runs/demo/
    honed demo optim.max_steps=40 run_dir=runs/quick

Stages and their artifacts under `run_dir`: data/ (shards, manifest), train/ (adapter, metrics),
eval/ (before/after table), merged/ (HF model + merge.json), registry/ (the adapter registered with its eval,
served from there), report.md (all of it, with timings).
"""

from __future__ import annotations

import json
import shutil
import time
import urllib.error
import urllib.request
from pathlib import Path

from honed.config import DemoConfig, MergeConfig, PrepareConfig, ServeConfig, TrainConfig
from honed.registry import Registry
from honed.runtime import run_task

ADAPTER_NAME = "icd10"


def run_demo(cfg: DemoConfig) -> dict:
    from honed.data.pipeline import prepare
    from honed.eval.evaluate import evaluate
    from honed.merge import merge
    from honed.serve import deploy
    from honed.train.trainer import train

    run = Path(cfg.run_dir).resolve()
    for stage in ("data", "train", "eval", "merged"):
        shutil.rmtree(run / stage, ignore_errors=True)  # a demo run starts fresh, never resumes an old one
    timings: dict[str, float] = {}

    def stage(name: str, fn, *args):
        print(f"\n[honed.demo] ── {name} ──", flush=True)
        started = time.time()
        result = fn(*args)
        timings[name] = round(time.time() - started, 1)
        print(f"[honed.demo] {name} done in {timings[name]:.0f}s", flush=True)
        return result

    manifest = stage("prepare", prepare, PrepareConfig(model=cfg.model, data=cfg.data, output_dir=str(run / "data")))
    train_cfg = TrainConfig(model=cfg.model, method=cfg.method, optim=cfg.optim, scaling=cfg.scaling,
                            data_dir=str(run / "data"), output_dir=str(run / "train"), name="demo")
    final = stage("train", train, train_cfg)
    adapter = str(run / "train" / "adapter")
    eval_cfg = cfg.eval.model_copy(update={"model": cfg.model, "adapter": adapter, "data_dir": str(run / "data"),
                                           "output_dir": str(run / "eval")})
    scores = stage("eval", evaluate, eval_cfg)
    merged = stage("merge", run_task, merge, MergeConfig(model=cfg.model, adapter=adapter,
                                                         output_dir=str(run / "merged")))
    # The bridge to serving: the adapter and its eval become the next version of `icd10` in the run's registry
    # (kept across demo runs: icd10@1, @2, …), which the endpoint serves as `icd10` (its latest version).
    registered = Registry(str(run / "registry")).add(ADAPTER_NAME, adapter, json.loads((run / "eval" / "eval.json").read_text()))
    print(f"[honed.demo] registered {registered} in {run / 'registry'}", flush=True)
    serve_cfg = cfg.serve.model_copy(update={"model": cfg.model, "registry": str(run / "registry"),
                                             "merged": {f"{ADAPTER_NAME}-merged": str(run / "merged")}})
    answers = stage("serve", ask_endpoint, serve_cfg, cfg.question, deploy)

    summary = {"timings_s": timings, "counts": manifest["counts"]["total"], "final_train_metrics": final,
               "scores": scores["scores"], "merge": merged, "registered": registered, "served_answers": answers}
    (run / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    (run / "report.md").write_text(render_report(summary, run))
    print("\n" + (run / "report.md").read_text(), flush=True)
    return summary


def ask_endpoint(cfg: ServeConfig, question: str, deploy) -> dict[str, str]:
    """Start the endpoint, ask the base, the adapter and the merged model the same question, shut down."""
    url = deploy.start(cfg)
    try:
        answers = {}
        for model in (cfg.base_name, ADAPTER_NAME, *cfg.merged):
            body = {"model": model, "messages": [{"role": "user", "content": question}],
                    "max_tokens": 48, "temperature": 0}
            reply = post_json(f"{url}/chat/completions", body)
            answers[model] = reply["choices"][0]["message"]["content"]
            print(f"[honed.demo] {url} model={model!r}\n  Q: {question}\n  A: {answers[model]}", flush=True)
        return answers
    finally:
        deploy.stop()


def post_json(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as err:
        raise RuntimeError(f"{url} answered {err.code}: {err.read().decode(errors='replace')}") from None


def render_report(summary: dict, run: Path) -> str:
    from honed.eval.evaluate import comparison_table
    from honed.train.efficiency import format_report

    timings = ", ".join(f"{k} {v:.0f}s" for k, v in summary["timings_s"].items())
    lines = [
        "# honed demo", "",
        f"Run dir: `{run}`. Stage times: {timings} (total {sum(summary['timings_s'].values()):.0f}s).", "",
        f"Data: {summary['counts']}", "",
        f"Training ({summary['final_train_metrics'].get('step')} steps): loss "
        f"{summary['final_train_metrics'].get('loss')}, "
        + format_report(summary["final_train_metrics"]["efficiency"]), "",
        "## Before (base) / after (base + LoRA adapter), held-out ICD-10-CM codes", "",
        comparison_table(summary["scores"]), "",
        f"Merge: max |merged − adapter logits| = {summary['merge']['max_abs_logit_diff']:.2e} "
        f"(tolerance {summary['merge']['tolerance']:.0e}).", "",
        f"Registered as `{summary['registered']}` in `{run / 'registry'}`, served from there as `{ADAPTER_NAME}` "
        f"(its latest version); the merged model as `{ADAPTER_NAME}-merged`.", "",
        "## Served answers", "",
    ]
    lines += [f"- `{model}`: {answer!r}" for model, answer in summary["served_answers"].items()]
    return "\n".join(lines) + "\n"
