"""`honed eval`: the base model and base + adapter scored on the same held-out sets, side by side.

    honed eval jobs/eval.yaml adapter=runs/train/adapter

Per validation source: mean token loss and perplexity (domain sets score the response tokens, general text
scores every token: the forgetting probe). On domain instruction data: greedy answers with the training
template, scored by exact match and token F1. Writes `output_dir/eval.json` and `eval.md`.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import torch

from honed.config import EvalConfig
from honed.data.pipeline import load_manifest
from honed.generation import generate, render_chat
from honed.models import load_model, resolve_model
from honed.train.loop import collate, row_losses


def evaluate(cfg: EvalConfig) -> dict:
    manifest = load_manifest(cfg.data_dir)
    model_path = resolve_model(cfg.model.name_or_path)
    by_source = validation_sets(cfg.data_dir, cfg.max_examples)
    probes = {s["name"] for s in manifest["sources"] if s["eval_only"]}
    questions = pick_questions(by_source, probes, cfg.generate_examples)
    args = (model_path, cfg.model.dtype, by_source, questions, manifest["template"], cfg.model_dump())
    labels = ["base"] + (["tuned"] if cfg.adapter else [])
    adapters = [None] + ([str(Path(cfg.adapter).resolve())] if cfg.adapter else [])
    print(f"[honed.eval] scoring {', '.join(labels)} on {', '.join(by_source)} "
          f"+ {len(questions)} generated answers", flush=True)
    import ray

    refs = [ray.remote(num_cpus=1)(score_model).remote(*args, adapter=a) for a in adapters]
    scores = dict(zip(labels, ray.get(refs)))
    result = {"scores": {k: v["metrics"] for k, v in scores.items()},
              "samples": {k: v["samples"] for k, v in scores.items()},
              "domain_sources": sorted(set(by_source) - probes), "probe_sources": sorted(probes & set(by_source)),
              "adapter": cfg.adapter, "model": cfg.model.name_or_path}
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps(result, indent=2))
    table = comparison_table(result["scores"])
    (out / "eval.md").write_text("# Evaluation\n\n" + table + "\n")
    print(table, flush=True)
    return result


def validation_sets(data_dir: str, max_examples: int) -> dict[str, list[dict]]:
    """Validation rows per source, in a stable order (sorted by group), at most `max_examples` each."""
    table = pq.read_table(Path(data_dir) / "shards" / "val").to_pylist()
    by_source: dict[str, list[dict]] = {}
    for row in sorted(table, key=lambda r: (r["source"], r["group"], r["prompt"], r["text"])):
        by_source.setdefault(row["source"], []).append(row)
    return {s: spread(rows, max_examples) for s, rows in by_source.items()}


def pick_questions(by_source: dict[str, list[dict]], probes: set[str], n: int) -> list[dict]:
    rows = [r for s, rs in by_source.items() if s not in probes for r in rs if r["prompt"]]
    return [{"prompt": r["prompt"], "response": r["response"]} for r in spread(rows, n)]


def spread(rows: list, n: int) -> list:
    """`n` rows evenly spaced over the list (all of them when there are fewer)."""
    if len(rows) <= n:
        return rows
    return [rows[i * len(rows) // n] for i in range(n)]


def score_model(model_path: str, dtype: str, by_source: dict, questions: list[dict], template: dict,
                cfg: dict, adapter: str | None = None) -> dict:
    """Runs as a Ray task: loss/perplexity per source and generation metrics for one model."""
    torch.set_num_threads(1)
    model, tokenizer = load_model(model_path, dtype)
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    metrics = {}
    for source, rows in by_source.items():
        loss = mean_loss(model, rows, tokenizer.pad_token_id, cfg["batch_size"])
        metrics[f"loss/{source}"] = round(loss, 4)
        metrics[f"ppl/{source}"] = round(math.exp(min(loss, 50)), 3)
    samples = []
    for i in range(0, len(questions), cfg["batch_size"]):
        batch = questions[i: i + cfg["batch_size"]]
        prompts = [render_chat(tokenizer, [{"role": "user", "content": q["prompt"]}], template)
                   for q in batch]
        for q, c in zip(batch, generate(model, tokenizer, prompts, cfg["max_new_tokens"])):
            samples.append({**q, "answer": c.text})
    if samples:
        metrics["exact_match"] = round(sum(exact_match(s["answer"], s["response"]) for s in samples) / len(samples), 4)
        metrics["token_f1"] = round(sum(token_f1(s["answer"], s["response"]) for s in samples) / len(samples), 4)
    return {"metrics": metrics, "samples": samples}


@torch.no_grad()
def mean_loss(model, rows: list[dict], pad_id: int, batch_size: int) -> float:
    total, count = 0.0, 0
    for i in range(0, len(rows), batch_size):
        chunk = rows[i: i + batch_size]
        inputs = collate({"input_ids": [r["input_ids"] for r in chunk], "labels": [r["labels"] for r in chunk]},
                         pad_id, model.device)
        for s, n in row_losses(model, inputs):
            total, count = total + s, count + n
    return total / max(count, 1)


def normalize_answer(text: str) -> str:
    return re.sub(r"\s+", " ", text.strip().lower()).rstrip(".")


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(reference))


def token_f1(prediction: str, reference: str) -> float:
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    common = sum((Counter(pred) & Counter(ref)).values())
    if not pred or not ref or not common:
        return float(pred == ref)
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def comparison_table(scores: dict[str, dict]) -> str:
    """Markdown table: one row per metric, one column per model, and the change when both are present."""
    names = list(scores)
    header = "| metric | " + " | ".join(names) + (" | change |" if len(names) == 2 else " |")
    lines = [header, "|---" * (len(names) + 1 + (len(names) == 2)) + "|"]
    for metric in scores[names[0]]:
        values = [scores[n].get(metric) for n in names]
        row = f"| {metric} | " + " | ".join(f"{v:.4f}" for v in values)
        if len(names) == 2:
            row += f" | {values[1] - values[0]:+.4f}"
        lines.append(row + " |")
    return "\n".join(lines)
