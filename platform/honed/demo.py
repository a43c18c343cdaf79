"""`honed demo`: the whole slice on the embedded SmolLM2-135M-Instruct and bundled ICD-10-CM data.

    honed demo                          # writes runs/demo/
    honed demo optim.max_steps=40 run_dir=runs/quick
    honed demo --with-dpo               # then DPO from the SFT adapter on derived preference pairs

Stages and their artifacts under `run_dir`: data/ (shards, manifest), train/ (adapter, metrics),
eval/ (before/after table), merged/ (HF model + merge.json), registry/ (the adapter registered with its eval,
served from there), report.md (all of it, with timings); with DPO also pairs/ (the preference dataset) and
dpo/ (the DPO run), registered as icd10-dpo and served beside icd10.
"""

from __future__ import annotations

import json
import shutil
import time
import urllib.error
import urllib.request
from pathlib import Path

from honed.config import DemoConfig, MergeConfig, MethodConfig, PrepareConfig, ServeConfig, TrainConfig
from honed.registry import Registry
from honed.runtime import run_task

ADAPTER_NAME = "icd10"
DPO_NAME = "icd10-dpo"


def run_demo(cfg: DemoConfig) -> dict:
    from honed.data.pipeline import prepare
    from honed.eval.evaluate import evaluate
    from honed.merge import merge
    from honed.serve import deploy
    from honed.train.trainer import train

    run = Path(cfg.run_dir).resolve()
    for stage in ("data", "train", "eval", "merged", "pairs", "dpo"):
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
    preference = run_dpo_stages(cfg, run, adapter, stage) if cfg.dpo.enabled else None
    serve_cfg = cfg.serve.model_copy(update={"model": cfg.model, "registry": str(run / "registry"),
                                             "merged": {f"{ADAPTER_NAME}-merged": str(run / "merged")}})
    asked = (ADAPTER_NAME, DPO_NAME) if preference else (ADAPTER_NAME,)
    answers = stage("serve", ask_endpoint, serve_cfg, cfg.question, deploy, asked)

    summary = {"timings_s": timings, "counts": manifest["counts"]["total"], "final_train_metrics": final,
               "scores": scores["scores"], "merge": merged, "registered": registered, "served_answers": answers}
    if preference:
        summary["dpo"] = preference
    (run / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    (run / "report.md").write_text(render_report(summary, run))
    print("\n" + (run / "report.md").read_text(), flush=True)
    return summary


def run_dpo_stages(cfg: DemoConfig, run: Path, sft_adapter: str, stage) -> dict:
    """Pairs → DPO from the SFT adapter → preference accuracy of base / SFT / DPO on held-out pairs → register."""
    from honed.data.pipeline import prepare
    from honed.eval.preference import held_out_pairs, preference_scores
    from honed.models import model_dir
    from honed.train.trainer import train

    # The domain sources again, as derived pairs under the same names: the split hashes (source, code), so the
    # held-out pairs ask about codes the SFT run never trained on.
    sources = [s.model_copy(update={"kind": "icd10_pairs", "max_records": cfg.dpo.max_pairs})
               if s.kind == "icd10" else s for s in cfg.data.sources]
    data = cfg.data.model_copy(update={"sources": sources, "pack": cfg.data.pack.model_copy(update={"enabled": False})})
    stage("prepare pairs", prepare, PrepareConfig(model=cfg.model, data=data, output_dir=str(run / "pairs")))
    method = MethodConfig(name="dpo", dpo=cfg.dpo.dpo.model_copy(update={"adapter": sft_adapter}))
    dpo_cfg = TrainConfig(model=cfg.model, method=method, optim=cfg.dpo.optim, scaling=cfg.scaling,
                          data_dir=str(run / "pairs"), output_dir=str(run / "dpo"), name="demo-dpo",
                          checkpoint_every=cfg.dpo.optim.max_steps or 50)
    final = stage("dpo", train, dpo_cfg)
    dpo_adapter = str(run / "dpo" / "adapter")
    pairs = held_out_pairs(str(run / "pairs"), cfg.dpo.eval_pairs)
    scores = stage("preference eval", preference_scores, model_dir(cfg.model), cfg.model.dtype,
                   pairs, {"sft": sft_adapter, "dpo": dpo_adapter})
    result = {"final_train_metrics": final, "preference": scores, "eval_pairs": len(pairs)}
    (run / "dpo" / "preference.json").write_text(json.dumps(scores, indent=2))
    result["registered"] = Registry(str(run / "registry")).add(DPO_NAME, dpo_adapter, {"preference": scores})
    print(f"[honed.demo] registered {result['registered']} in {run / 'registry'}", flush=True)
    return result


def ask_endpoint(cfg: ServeConfig, question: str, deploy, adapters: tuple[str, ...] = (ADAPTER_NAME,)) -> dict[str, str]:
    """Start the endpoint, ask the base, the adapters and the merged model the same question, shut down."""
    url = deploy.start(cfg)
    try:
        answers = {}
        for model in (cfg.base_name, *adapters, *cfg.merged):
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
    ]
    if "dpo" in summary:
        from honed.eval.preference import preference_table

        d, m = summary["dpo"], summary["dpo"]["final_train_metrics"]
        lines += ["## Preference tuning (DPO from the SFT adapter)", "",
                  f"{m.get('step')} DPO steps on derived ICD-10-CM pairs: loss {m.get('loss')}, reward accuracy "
                  f"{m.get('reward_accuracy')}, margin {m.get('reward_margin')} (training window); held-out pairs "
                  f"(codes unseen in both trainings) before and after:", "",
                  preference_table(d["preference"]), "",
                  f"Registered as `{d['registered']}`, served as `{DPO_NAME}`.", ""]
    lines += ["## Served answers", ""]
    lines += [f"- `{model}`: {answer!r}" for model, answer in summary["served_answers"].items()]
    return "\n".join(lines) + "\n"
