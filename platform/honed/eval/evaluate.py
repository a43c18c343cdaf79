"""`honed eval`: the base model and a tuned one (base + adapter, a registry version, or a merged model) scored on
the same held-out sets, side by side.

    honed eval jobs/eval_icd10.yaml adapter=runs/train/adapter
    honed eval jobs/eval_icd10.yaml registry=runs/registry adapter=icd10@2 --gate   # exit 3 when the gate fails

Per validation source: mean token loss and perplexity (domain sets score the response tokens, general text
scores every token: the forgetting probe). On each domain instruction source: greedy answers (`generate_examples`
per source) with the stored template and stop strings, scored by exact match, token F1 and ROUGE-L; on preference
pairs, preference accuracy (`honed.eval.preference`). Every loss, perplexity and task metric gets a confidence
interval by bootstrap over its items, per model and paired for the change (`honed.eval.intervals`). Then the
forgetting gate (`honed.eval.gate`, on the changes and their intervals),
the bias probe (`honed.eval.bias`) and the decontamination check (`honed.eval.contamination`). Writes
`output_dir/eval.json`, `eval.md` and `plots/*.png`; a gate result on a registry version sets its `promotable`.

`data_dir`, `output_dir`, `adapter`, `merged` and the registry may be object-storage URIs: the driver reads the
held-out rows from a local copy of the dataset, and each scoring task resolves the model and fetches the adapter
on its own node (no shared disk).
"""

from __future__ import annotations

import contextlib
import json
import math
import re
from collections import Counter

import pyarrow.parquet as pq
import torch

from honed.config import EvalConfig
from honed.artifacts import read_manifest
from honed.eval.bias import load_probes, pair_gaps, summarize
from honed.eval.contamination import contamination_check, eval_file_items, row_text
from honed.eval.gate import failure_reason, gate_checks
from honed.eval.intervals import metric_intervals, paired_interval
from honed.eval.preference import score_pairs
from honed.eval.report import comparison_table, write_report
from honed.eval.samples import pick_questions, spread, validation_rows
from honed.generation import generate, render_chat
from honed.models import load_model, load_tokenizer, model_dir, resolve_model
from honed.retrieval.search import with_passages
from honed.storage import absolute, is_uri, join, local_copy, staged
from honed.runtime import task_device
from honed.train.dpo import is_pair
from honed.train.collate import collate
from honed.train.losses import row_losses

__all__ = ["comparison_table", "evaluate", "exact_match", "rouge_l", "spread", "token_f1"]


def evaluate(cfg: EvalConfig) -> dict:
    manifest = read_manifest(cfg.data_dir)
    model_path = cfg.model.name_or_path  # resolved by each scoring task on its node
    tuned = resolve_tuned(cfg)
    with local_copy(cfg.data_dir) as data_dir:
        rows = validation_rows(str(data_dir))
    by_source = {source: spread(source_rows, cfg.max_examples) for source, source_rows in rows.items()}
    probes = {s["name"] for s in manifest["sources"] if s["eval_only"]}
    questions = pick_questions(rows, probes, cfg.generate_examples)
    pairs = load_probes(cfg.bias.path) if cfg.bias.enabled else []
    rag = with_passages(questions, cfg.retrieval) if cfg.retrieval else []
    args = (cfg.model.dtype, by_source, questions, manifest["template"], cfg.model_dump(), pairs)
    models = {"base": (model_path, None)}
    if tuned:
        models["tuned"] = (tuned["path"], None) if tuned["kind"] == "merged" else (model_path, tuned["path"])
    print(f"[honed.eval] scoring {', '.join(models)} on {', '.join(by_source)} + {len(questions)} generated answers"
          f" + {len(pairs)} bias probe pairs", flush=True)
    import ray

    score = ray.remote(num_cpus=1, num_gpus=1 if cfg.use_gpu else 0)(score_model)
    refs = [score.remote(path, *args, adapter=adapter, rag_questions=rag,
                         revision=cfg.model.revision if path == model_path else None)
            for path, adapter in models.values()]
    decontamination = check_contamination(cfg, manifest) if cfg.decontamination else None
    scores = dict(zip(models, ray.get(refs)))
    probe_sources = sorted(probes & set(by_source))
    intervals = metric_intervals({k: v["items"] for k, v in scores.items()}, cfg.bootstrap)
    result = {"scores": {k: v["metrics"] for k, v in scores.items()}, "intervals": intervals,
              "samples": {k: v["samples"] for k, v in scores.items()},
              "domain_sources": sorted(set(by_source) - probes), "probe_sources": probe_sources,
              "adapter": cfg.adapter, "model": cfg.model.name_or_path, "tuned": tuned,
              "bias": summarize(pairs, {k: v["bias"] for k, v in scores.items()}, cfg.bias.max_shift) if pairs else None,
              "decontamination": decontamination}
    if cfg.retrieval:
        result["retrieval"] = retrieval_result(cfg, scores)
    if cfg.gate.enabled:
        result["gate"] = gate_checks(result["scores"], result["domain_sources"], probe_sources, cfg.gate,
                                     intervals["change"])
        if tuned.get("ref"):
            result["gate"]["registry"] = {"ref": tuned["ref"], "promotable": result["gate"]["passed"]}
    with staged(cfg.output_dir) as out:  # output_dir itself, or a local dir uploaded to its URI at the end
        (out / "eval.json").write_text(json.dumps(result, indent=2))
        write_report(result, out)
    print(comparison_table(result["scores"], intervals), flush=True)
    if cfg.gate.enabled and tuned.get("ref"):
        from honed.registry import Registry

        reason = failure_reason(result["gate"]) or "forgetting gate passed"
        Registry(cfg.registry).set_promotable(tuned["ref"], result["gate"]["passed"], reason)
    return result


def retrieval_result(cfg: EvalConfig, scores: dict) -> dict:
    """Per model, each task metric without and with retrieval and the paired interval of the gain (the same
    questions answered both ways), and the answers given with passages (each with its `sources`)."""
    b, models = cfg.bootstrap, {}
    for model, score in scores.items():
        plain, rag, metrics = score["samples"], score["retrieval_samples"], score["metrics"]
        models[model] = {name: {"without": metrics.get(name), "with": metrics.get(f"retrieval/{name}"),
                                "gain_interval": paired_interval([s[name] for s in plain], [s[name] for s in rag],
                                                                 b.resamples, b.level, b.seed)}
                         for name in TASK_METRICS if plain}
    return {**cfg.retrieval.model_dump(), "models": models,
            "samples": {model: score["retrieval_samples"] for model, score in scores.items()}}


def resolve_tuned(cfg: EvalConfig) -> dict | None:
    """The tuned model: `{kind: adapter | merged, path, ref}`; a registry ref becomes its canonical `name@N` and a
    local directory holding that version (downloaded when the registry is remote)."""
    if cfg.merged:
        return {"kind": "merged", "path": absolute(cfg.merged), "ref": None}
    if not cfg.adapter:
        return None
    if not cfg.registry:
        return {"kind": "adapter", "path": absolute(cfg.adapter), "ref": None}
    from honed.registry import Registry

    registry = Registry(cfg.registry)
    ref = registry.resolve(cfg.adapter)
    if is_uri(cfg.registry):  # the scoring task fetches the version on its own node
        return {"kind": "adapter", "path": join(cfg.registry, *ref.split("@")), "ref": ref}
    return {"kind": "adapter", "path": registry.local_dir(ref), "ref": ref}


def check_contamination(cfg: EvalConfig, manifest: dict) -> dict:
    """Every validation row and the dataset's extra eval files against the training shards, at the dataset's n
    (packed shards are decoded with the model's tokenizer, resolved here)."""
    shards = join(absolute(cfg.data_dir), "shards")  # pyarrow reads a local path or a URI
    rows = pq.read_table(join(shards, "val"), columns=["source", "text", "prompt", "response",
                                                       "messages"]).to_pylist()
    items = [{"source": r["source"], "text": row_text(r)} for r in rows]
    paths = manifest.get("config", {}).get("data", {}).get("decontaminate", {}).get("paths", [])
    extra, missing = eval_file_items(paths)
    packed = manifest.get("shards", {}).get("packed", False)
    report = contamination_check(items + extra, join(shards, "train"),
                                 manifest.get("decontamination", {}).get("ngram", 13),
                                 tokenizer=load_tokenizer(model_dir(cfg.model)) if packed else None)
    return report | {"missing_files": missing}


def score_model(model_path: str, dtype: str, by_source: dict, questions: list[dict], template: dict, cfg: dict,
                bias_pairs: list[dict], adapter: str | None = None, rag_questions: list[dict] = (),
                revision: str | None = None) -> dict:
    """Runs as a Ray task (on a GPU with `use_gpu`): loss/perplexity per source, generation metrics and bias
    probe gaps for one model, and each figure's items `(sum, count)` for its confidence interval.
    `model_path`: any model reference (honed.models.resolve_model, with `revision`), resolved on this node;
    `adapter`: a local dir or a URI (fetched here).
    `rag_questions` (the same questions with retrieved passages in the prompt) are scored as `retrieval/<metric>`."""
    torch.set_num_threads(1)
    with local_copy(adapter) if adapter else contextlib.nullcontext() as adapter_dir:
        model, tokenizer = load_model(resolve_model(model_path, revision), dtype, device=task_device(cfg["use_gpu"]),
                                      adapter=str(adapter_dir) if adapter else None)
    model.eval()
    metrics, items = {}, {}
    for source, rows in by_source.items():
        losses = items[f"loss/{source}"] = row_loss_items(model, rows, tokenizer.pad_token_id, cfg["batch_size"])
        loss = sum(s for s, _ in losses) / max(sum(n for _, n in losses), 1)
        metrics[f"loss/{source}"] = round(loss, 4)
        metrics[f"ppl/{source}"] = round(math.exp(min(loss, 50)), 3)
    samples = answer_questions(model, tokenizer, questions, template, cfg)
    rag_samples = answer_questions(model, tokenizer, list(rag_questions), template, cfg)
    for prefix, scored in (("", samples), ("retrieval/", rag_samples)):
        for name in TASK_METRICS if scored else ():
            items[prefix + name] = [(s[name], 1) for s in scored]
            metrics[prefix + name] = round(sum(s[name] for s in scored) / len(scored), 4)
    pairs = [r for rows in by_source.values() for r in rows if is_pair(r.get("rejected_input_ids"))]
    if pairs:  # preference pairs (a DPO dataset): how often the chosen answer is the more likely one
        preference = score_pairs(model, pairs, tokenizer.pad_token_id, cfg["batch_size"])
        metrics |= {k: v for k, v in preference.items() if k != "pairs"}
    gaps = pair_gaps(model, tokenizer, bias_pairs, cfg["batch_size"]) if bias_pairs else []
    return {"metrics": metrics, "samples": samples, "bias": gaps, "items": items, "retrieval_samples": rag_samples}


def answer_questions(model, tokenizer, questions: list[dict], template: dict, cfg: dict) -> list[dict]:
    """Greedy answers with the dataset's template and stop strings, each scored by every task metric."""
    samples = []
    for i in range(0, len(questions), cfg["batch_size"]):
        batch = questions[i: i + cfg["batch_size"]]
        prompts = [render_chat(tokenizer, [{"role": "user", "content": q["prompt"]}], template) for q in batch]
        completions = generate(model, tokenizer, prompts, cfg["max_new_tokens"], stop=template.get("stop"))
        samples += [{**q, "answer": c.text} | {name: fn(c.text, q["response"]) for name, fn in TASK_METRICS.items()}
                    for q, c in zip(batch, completions)]
    return samples


@torch.no_grad()
def row_loss_items(model, rows: list[dict], pad_id: int, batch_size: int) -> list[tuple[float, int]]:
    """(summed token loss, labelled tokens) per row: the source's mean loss is Σ sums / Σ tokens."""
    items = []
    for i in range(0, len(rows), batch_size):
        chunk = rows[i: i + batch_size]
        inputs = collate({"input_ids": [r["input_ids"] for r in chunk], "labels": [r["labels"] for r in chunk]},
                         pad_id, model.device)
        items += row_losses(model, inputs)
    return items


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


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1: longest common subsequence of the normalised words over prediction (precision) and reference
    (recall); 1.0 when both are empty."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    lcs = lcs_length(pred, ref)
    if not lcs:
        return 0.0
    precision, recall = lcs / len(pred), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


def lcs_length(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence, one row of the dynamic programme at a time."""
    row = [0] * (len(b) + 1)
    for x in a:
        diagonal = 0
        for j, y in enumerate(b, 1):
            diagonal, row[j] = row[j], diagonal + 1 if x == y else max(row[j], row[j - 1])
    return row[-1]


TASK_METRICS = {"exact_match": exact_match, "token_f1": token_f1, "rouge_l": rouge_l}
