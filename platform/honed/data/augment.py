"""Paraphrase augmentation inside `honed prepare` (`data.augment`): a model rewrites the question (and optionally
the answer) of every kept training instruction record `variants` times, in Ray Data batch inference.

    honed prepare jobs/prepare_augment_icd10.yaml data.augment.variants=3
    marked, generated = augment_records(marked, cfg, settings, decontam, dedup_params)   # in the pipeline

Flow, after the read records were deduplicated (so no variant descends from a record dedup dropped):
  kept train instruction rows → `Paraphraser` actors (the model loaded once per actor; `concurrency` actors,
  `num_gpus` each) → reader-shaped rows → `VariantProcessor` (the same parse/normalise/filter/redact/decontaminate/
  template/split as read records, then `variant_problem`: a variant equal or near its source, missing a code or
  number of it, or no longer a question is dropped) → a second dedup pass over the kept read records and the
  variants, whose result drops variants only (a read record keeps what the first pass decided).

A variant keeps its source's group, so the split puts it beside its source: in training. Validation records are
never paraphrased, so validation holds read records only. A variant's `augmented_from` is its source's id (-1 for
read records) and its own id sorts after every read record's (`VARIANT_ID_BASE`), so dedup always keeps the
original. Empty paraphrases are quarantined (`empty_prompt` / `empty_response`) with their raw text.
"""

from __future__ import annotations

import json
import re
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

from honed.config import PrepareConfig
from honed.data.corpus_dedup import duplicate_table, find_duplicates, mark_duplicates
from honed.data.dedup import exact_key, shingle_hashes
from honed.data.processing import ExampleProcessor
from honed.data.records import DROPPED, KEPT, unit_hash
from honed.models import check_model, load_model, resolve_model

# Read record ids use bits 0-62 with the source index in bits 55-62 (`honed.data.sources.record_id`); with fewer
# than 128 sources (the config checks) bit 62 is free, so ids with it set sort after every read record.
VARIANT_ID_BASE = 1 << 62
# "Rewritten question:", "**Answer:**" and the like, which instruction models put before the text asked for.
_LABEL = re.compile(r"^(?:\*\*)?\s*(?:(?:rewritten|paraphrased|new|reworded)\s+)?(?:question|answer)\s*:\s*(?:\*\*)?\s*",
                    re.IGNORECASE)
_QUOTES = {'"': '"', "'": "'", "“": "”", "‘": "’", "«": "»"}


def variant_id(source_id: int, k: int) -> int:
    """The id of paraphrase `k` of record `source_id`: seeded by both, in [2^62, 2^63)."""
    return VARIANT_ID_BASE | int(unit_hash(f"variant:{source_id}:{k}") * VARIANT_ID_BASE)


def clean_paraphrase(text: str) -> str:
    """A model's reply → the paraphrase: its first non-empty line (after an introduction ending in a colon, such as
    "Here is the rewritten question:"), without a leading label or wrapping quotes."""
    lines = [line.strip() for line in text.splitlines() if line.strip()] or [""]
    line = lines[1] if len(lines) > 1 and lines[0].endswith(":") else lines[0]
    line = _LABEL.sub("", line).strip()
    while len(line) >= 2 and _QUOTES.get(line[0]) == line[-1]:
        line = line[1:-1].strip()
    return line


def source_similarity(variant: str, source: str, shingle_words: int) -> float:
    """Jaccard similarity of two texts' word shingles (dedup's normalised words); 1.0 when their exact keys match."""
    if exact_key(variant) == exact_key(source):
        return 1.0
    a, b = set(shingle_hashes(variant, shingle_words).tolist()), set(shingle_hashes(source, shingle_words).tolist())
    return len(a & b) / len(a | b) if a | b else 1.0


# ------------------------------------------------------------------------------------------ generation
class Paraphraser:
    """Ray Data actor: rows of kept instruction records (`source, id, origin, group, prompt, response`) → for each,
    `variants` reader-shaped rows (`source, id, origin, raw, error`) plus `augmented_from`, `source_prompt` and
    `source_response` (for `VariantProcessor`'s checks). The model is loaded once per actor."""

    def __init__(self, model_ref: tuple[str, str | None], adapter_dir: str | None, aug, seed: int):
        import torch

        model_path = resolve_model(*model_ref)  # on the actor's own node
        device = "cuda" if aug.num_gpus > 0 and torch.cuda.is_available() else "cpu"
        if device == "cpu":
            torch.set_num_threads(1)  # one CPU per actor: more threads thrash on a shared node
        self.model, self.tokenizer = load_model(model_path, device=device, adapter=adapter_dir)
        self.model.eval()
        self.aug, self.seed = aug, seed

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        records = [{k: batch[k][i] for k in batch} | {"id": int(batch["id"][i])} for i in range(len(batch["id"]))]
        jobs = [(r, k, field) for r in records for k in range(self.aug.variants) for field in self.aug.fields]
        texts = self.paraphrase([self.prompt(r, field) for r, _, field in jobs],
                                [self.job_seed(r["id"], k, field) for r, k, field in jobs])
        rewritten = defaultdict(dict)  # (record id, k) → field → (paraphrase, error)
        for (r, k, field), text in zip(jobs, texts):
            rewritten[(r["id"], k)][field] = text
        out = defaultdict(list)
        for r in records:
            for k in range(self.aug.variants):
                for key, value in self.variant_row(r, k, rewritten[(r["id"], k)]).items():
                    out[key].append(value)
        return dict(out)

    def prompt(self, record: dict, field: str) -> str:
        template = self.aug.question_prompt if field == "question" else self.aug.answer_prompt
        text = record["prompt"] if field == "question" else record["response"]
        return template.replace("{text}", text)

    def job_seed(self, record_id: int, k: int, field: str) -> int:
        return int(unit_hash(f"{self.seed}:augment:{record_id}:{k}:{field}") * 2**62)

    def paraphrase(self, requests: list[str], seeds: list[int]) -> list[tuple[str, str]]:
        """(cleaned paraphrase, error) per request, decoded `batch_size` sequences at a time."""
        from honed.generation import DecodeJob, decode_steps, render_chat

        a, out = self.aug, []
        for start in range(0, len(requests), a.batch_size):
            jobs = [DecodeJob(self.tokenizer(render_chat(self.tokenizer, [{"role": "user", "content": text}]),
                                             add_special_tokens=False)["input_ids"], a.max_new_tokens,
                              a.temperature, a.top_p, seed=seed)
                    for text, seed in zip(requests[start:start + a.batch_size], seeds[start:start + a.batch_size])]
            done: list[tuple[str, str]] = [("", "")] * len(jobs)
            for events in decode_steps(self.model, self.tokenizer, jobs):
                for i, event in enumerate(events):
                    if event and "error" in event:
                        done[i] = ("", f"generation_failed: {event['error']}")
                    elif event and "done" in event:
                        done[i] = (clean_paraphrase(event["done"].text), "")
            out += done
        return out

    def variant_row(self, record: dict, k: int, fields: dict[str, tuple[str, str]]) -> dict:
        question, q_error = fields["question"]
        answer, a_error = fields.get("answer", (record["response"], ""))
        raw = json.dumps({"prompt": question, "response": answer, "group": record["group"]}, ensure_ascii=False)
        return {"source": record["source"], "id": variant_id(record["id"], k),
                "origin": f"{record['origin']} (paraphrase {k + 1})", "raw": raw, "error": q_error or a_error,
                "augmented_from": record["id"], "source_prompt": record["prompt"],
                "source_response": record["response"]}


# --------------------------------------------------------------------------------------------- checking
class VariantProcessor(ExampleProcessor):
    """`ExampleProcessor` for paraphrase rows (instruction records in honed's field names, whatever their source's
    mapping); then a kept variant that fails `variant_problem` against its source is dropped with that reason, and
    `augmented_from` is set. `rules`: see `variant_rules`."""

    def __init__(self, model_ref: tuple[str, str | None], settings: dict, decontam, rules: dict):
        sources = {name: src | {"fields": {}, "format": "instruction"} for name, src in settings["sources"].items()}
        super().__init__(resolve_model(*model_ref), settings | {"sources": sources}, decontam)
        self.rules = rules

    def __call__(self, batch: dict[str, np.ndarray]):
        import pyarrow as pa

        table = super().__call__(batch)  # one row out per row in, in order
        status, reason = table["status"].to_pylist(), table["reason"].to_pylist()
        variants = zip(table["prompt"].to_pylist(), table["response"].to_pylist())
        sources = zip(batch["source_prompt"], batch["source_response"])
        for i, (variant, source) in enumerate(zip(variants, sources)):
            problem = variant_problem(variant, (str(source[0]), str(source[1])), self.rules) if status[i] == KEPT else ""
            if problem:
                status[i], reason[i] = DROPPED, problem
        columns = {"status": pa.array(status, pa.string()), "reason": pa.array(reason, pa.string()),
                   "augmented_from": pa.array(batch["augmented_from"].astype(np.int64))}
        for name, values in columns.items():
            table = table.set_column(table.schema.get_field_index(name), name, values)
        return table


def variant_rules(cfg: PrepareConfig) -> dict:
    """What `variant_problem` checks, from the config (a plain dict for the actors)."""
    aug = cfg.data.augment
    return {"fields": list(aug.fields), "threshold": cfg.data.dedup.threshold,
            "shingle_words": cfg.data.dedup.shingle_words, "numbers": aug.require_numbers,
            "question": aug.require_question}


def variant_problem(variant: tuple[str, str], source: tuple[str, str], rules: dict) -> str:
    """Why a paraphrase `(question, answer)` of `source` is dropped, or "" when it stays: `same_as_source` (equal
    after dedup's normalisation), `near_source` (shingle Jaccard ≥ threshold), `lost_numbers` (a token with a
    digit of the source, such as a code, is missing), `not_a_question` (the source asks, the paraphrase does not:
    small models answer instead of rewriting)."""
    def text(qa: tuple[str, str]) -> str:
        return qa[0] + ("\n" + qa[1] if "answer" in rules["fields"] else "")

    similarity = source_similarity(text(variant), text(source), rules["shingle_words"])
    if similarity >= rules["threshold"]:
        return "same_as_source" if similarity == 1.0 else "near_source"
    if rules["numbers"] and not numbered_terms(text(source)) <= numbered_terms(text(variant)):
        return "lost_numbers"
    if rules["question"] and source[0].rstrip().endswith("?") and not variant[0].rstrip().endswith("?"):
        return "not_a_question"
    return ""


def numbered_terms(text: str) -> set[str]:
    """The words holding a digit (codes, numbers, dates), casefolded, without surrounding punctuation."""
    return {word.strip(".,;:!?()[]{}\"'“”‘’").casefold() for word in text.split() if any(c.isdigit() for c in word)}


# --------------------------------------------------------------------------------------------- pipeline
def augment_records(marked, cfg: PrepareConfig, settings: dict, decontam, dedup_params: dict):
    """`marked` (read records after dedup) with the paraphrases of its kept training instruction records appended,
    each processed and dedup-marked; returns (that dataset, materialized, and the number of paraphrases)."""
    from ray.data.expressions import col

    names = cfg.data.augment.sources or [s.name for s in cfg.data.sources if not s.eval_only]
    chosen = marked.filter(expr=(col("status") == KEPT) & (col("split") == "train") & (col("kind") == "instruction")
                           & col("source").is_in(names))
    chosen = chosen.select_columns(["source", "id", "origin", "group", "prompt", "response"]).materialize()
    if not chosen.count():
        return marked.materialize(), 0
    variants = mark_variant_duplicates(marked, generate_variants(chosen, cfg, settings, decontam), cfg, dedup_params)
    return marked.union(variants).materialize(), variants.count()


def generate_variants(chosen, cfg: PrepareConfig, settings: dict, decontam):
    """Paraphrase rows of `chosen`, processed like read records and checked against their source (materialized).
    Each step is materialized before the next: generation actors hold their CPUs (or GPUs) for the whole step, so
    nothing upstream may still need one (on 2 CPUs a lazy chain waits forever)."""
    import ray
    import ray.data

    aug = cfg.data.augment
    prepare_model = (cfg.model.name_or_path, cfg.model.revision)
    generated = chosen.map_batches(
        Paraphraser, fn_constructor_kwargs={"model_ref": paraphrase_model(aug) or prepare_model,
                                            "adapter_dir": adapter_dir(aug), "aug": aug, "seed": cfg.data.seed},
        batch_size=max(1, aug.batch_size // (aug.variants * len(aug.fields))), batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=aug.concurrency), num_cpus=1, num_gpus=aug.num_gpus).materialize()
    workers = cfg.data.num_workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
    return generated.map_batches(
        VariantProcessor, fn_constructor_kwargs={"model_ref": prepare_model, "settings": settings, "decontam": decontam,
                                                 "rules": variant_rules(cfg)},
        batch_size=256, batch_format="numpy", compute=ray.data.ActorPoolStrategy(min_size=1, max_size=workers),
    ).materialize()


def mark_variant_duplicates(marked, variants, cfg: PrepareConfig, dedup_params: dict):
    """`variants` with those that duplicate a kept read record or another variant dropped. Dedup runs over both,
    but only variants are marked: a variant bridging two read records must not drop either of them."""
    import ray
    from ray.data.expressions import col

    both = marked.filter(expr=col("status") == KEPT).union(variants).materialize()
    dups, _ = find_duplicates(both, cfg, dedup_params)
    table = ray.put(duplicate_table({i: d for i, d in dups.items() if i >= VARIANT_ID_BASE}))
    return variants.map_batches(mark_duplicates, fn_kwargs={"table": table}, batch_format="pyarrow")


def paraphrase_model(aug) -> tuple[str, None] | None:
    """`augment.model` as a model ref for the actors, checked on the driver first (a clear error before Ray work)."""
    if not aug.model:
        return None
    try:
        check_model(aug.model)  # exists? each actor resolves it on its own node
    except (FileNotFoundError, ValueError) as err:
        raise FileNotFoundError(f"augment.model: {err}") from None
    return aug.model, None


def adapter_dir(aug) -> str | None:
    """The local directory of `augment.adapter`: the directory itself, or a registry version's files."""
    if not aug.adapter:
        return None
    if aug.registry:
        from honed.registry import Registry

        registry = Registry(aug.registry)
        return registry.local_dir(registry.resolve(aug.adapter))
    if not (Path(aug.adapter) / "adapter_config.json").is_file():
        raise FileNotFoundError(f"augment.adapter = '{aug.adapter}' is not a PEFT adapter directory (no "
                                "adapter_config.json); give one, or a ref with augment.registry")
    return str(Path(aug.adapter).resolve())


def augment_stats(final, cfg: PrepareConfig) -> dict:
    """The manifest's `augment` entry: per source, the records paraphrased, variants generated, kept (train),
    dropped and quarantined by reason, and how many records kept 0, 1, … of their variants; a few examples."""
    from ray.data.expressions import col

    aug = cfg.data.augment
    if not aug.enabled:
        return {"enabled": False}
    variants = final.filter(expr=col("augmented_from") >= 0)
    by_source = count_variants(variants.select_columns(["source", "augmented_from", "status", "reason"])
                               .iter_batches(batch_format="numpy", batch_size=65536))
    totals = {key: sum(c[key] for c in by_source.values()) for key in ("records", "generated", "kept")}
    return {"enabled": True, "model": aug.model or cfg.model.name_or_path, "adapter": aug.adapter,
            "variants": aug.variants, "fields": list(aug.fields), "temperature": aug.temperature,
            "total": totals, "by_source": by_source, "examples": examples(final, variants)}


def count_variants(batches) -> dict[str, dict]:
    """Per source, from batches of variant rows (`source, augmented_from, status, reason`), streamed through the
    driver in one pass (a few small columns; O(records) memory for the per-record tallies)."""
    outcomes: dict[str, Counter] = defaultdict(Counter)  # source → (status, reason) → variants
    kept: dict[str, Counter] = defaultdict(Counter)  # source → record id → variants kept
    for batch in batches:
        for source, record, status, reason in zip(batch["source"], batch["augmented_from"], batch["status"],
                                                  batch["reason"]):
            outcomes[source][(status, "" if status == KEPT else reason)] += 1
            kept[source][int(record)] += status == KEPT
    by_source = {}
    for source, counts in sorted(outcomes.items()):
        c = {"records": len(kept[source]), "generated": sum(counts.values()), "kept": counts[(KEPT, "")]}
        for status in ("dropped", "quarantined"):
            c[status] = dict(sorted((reason, n) for (s, reason), n in counts.items() if s == status))
        c["kept_per_record"] = {str(k): n for k, n in sorted(Counter(kept[source].values()).items())}
        by_source[str(source)] = c
    return by_source


def examples(final, variants, limit: int = 5) -> list[dict]:
    """A few kept paraphrases beside their source questions, so a reader can judge them."""
    from ray.data.expressions import col

    kept = variants.filter(expr=col("status") == KEPT).select_columns(["augmented_from", "prompt"]).take(limit)
    ids = [int(r["augmented_from"]) for r in kept]
    sources = {int(r["id"]): r["prompt"] for r in final.filter(expr=col("id").is_in(ids))
               .select_columns(["id", "prompt"]).take_all()} if ids else {}
    return [{"source": sources.get(int(r["augmented_from"]), ""), "variant": r["prompt"]} for r in kept]

