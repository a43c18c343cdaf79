"""`honed prepare` on Ray Data: read → parse/clean → template + tokenize → split → write.

    honed prepare jobs/prepare_icd10.yaml output_dir=runs/data

Writes `output_dir/`:
  shards/train/*.parquet   shuffled training examples (input_ids, labels, source, ...)
  shards/val/*.parquet     held-out examples of every source (per-source validation)
  quarantine/*.json        broken records with source, origin and reason
  manifest.json            counts that reconcile (read = kept + dropped + quarantined), template, tokenizer
  report.md                the counts as a table
"""

from __future__ import annotations

import json
import shutil
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

from honed import __version__
from honed.config import PrepareConfig, dump_config
from honed.data.records import (
    DROPPED, KEPT, QUARANTINED, BadRecord, assign_split, clean_text, encode_example, group_key, parse_record,
)
from honed.data.sources import builtin_rows, jsonl_files
from honed.models import load_tokenizer, resolve_model, tokenizer_hash, weights_hash

SHARD_COLUMNS = ["source", "group", "prompt", "response", "text", "input_ids", "labels", "num_tokens"]


class ExampleProcessor:
    """Ray Data UDF: turns `{source, raw, origin}` rows into examples, each with a status and reason.
    Quarantined rows keep their raw text (first 2,000 characters) for the quarantine file."""

    def __init__(self, model_path: str, cfg: dict):
        self.tokenizer = load_tokenizer(model_path)
        self.cfg = cfg  # {"system_prompt", "max_seq_len", "loss_on", "seed", "val": {source: (fraction, eval_only)}}

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        out = defaultdict(list)
        for source, raw, origin in zip(batch["source"], batch["raw"], batch["origin"]):
            row = self.process(str(source), raw)
            row.update(source=str(source), origin=str(origin))
            for key in _OUTPUT_KEYS:
                out[key].append(row.get(key, _EMPTY[key]))
        return dict(out)

    def process(self, source: str, raw: bytes) -> dict:
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            return {"status": QUARANTINED, "reason": "not_utf8", "raw": repr(raw)[:2000], "detail": str(err)}
        try:
            record = parse_record(raw)
        except BadRecord as err:
            return {"status": QUARANTINED, "reason": err.reason, "raw": raw[:2000], "detail": str(err)}
        for field in ("prompt", "response", "text"):
            if field in record:
                record[field] = clean_text(record[field])
                if not record[field]:
                    return {"status": DROPPED, "reason": f"empty_{field}"}
        encoded = encode_example(record, self.tokenizer, self.cfg["system_prompt"], self.cfg["loss_on"])
        n_tokens = len(encoded["input_ids"])
        if n_tokens > self.cfg["max_seq_len"]:
            return {"status": DROPPED, "reason": "too_long"}
        fraction, eval_only = self.cfg["val"][source]
        group = group_key(record)
        split = "val" if eval_only else assign_split(self.cfg["seed"], source, group, fraction)
        return {
            "status": KEPT, "reason": "", "split": split, "group": group, "num_tokens": n_tokens,
            "prompt": record.get("prompt", ""), "response": record.get("response", ""),
            "text": record.get("text", ""), **encoded,
        }


_EMPTY = {
    "source": "", "origin": "", "status": "", "reason": "", "detail": "", "raw": "", "split": "", "group": "",
    "prompt": "", "response": "", "text": "", "input_ids": [], "labels": [], "num_tokens": 0,
}
_OUTPUT_KEYS = list(_EMPTY)


def read_rows(cfg: PrepareConfig):
    """One Ray dataset of `{source, raw: bytes, origin}` rows over every configured source."""
    import ray.data

    parts = []
    for source in cfg.data.sources:
        if source.kind == "jsonl":
            # Read bytes, not text: one non-UTF-8 line must quarantine that line, not fail the whole file.
            files = ray.data.read_binary_files(jsonl_files(source), include_paths=True)
            parts.append(files.flat_map(split_lines, fn_kwargs={"source": source.name}))
        else:
            parts.append(ray.data.from_items(builtin_rows(source, cfg.data.seed)))
    return parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]


def split_lines(row: dict, source: str) -> list[dict]:
    """A JSONL file → one row per non-blank line, its origin `path:line` (1-based)."""
    return [{"source": source, "raw": line, "origin": f"{row['path']}:{number}"}
            for number, line in enumerate(row["bytes"].splitlines(), start=1) if line.strip()]


def prepare(cfg: PrepareConfig) -> dict:
    """Run the pipeline on the connected Ray cluster; returns the manifest."""
    import ray.data

    started = time.time()
    out = Path(cfg.output_dir)
    for sub in ("shards", "quarantine"):
        shutil.rmtree(out / sub, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    model_path = resolve_model(cfg.model.name_or_path)
    proc_cfg = {
        "system_prompt": cfg.data.system_prompt, "max_seq_len": cfg.data.max_seq_len,
        "loss_on": cfg.data.loss_on, "seed": cfg.data.seed,
        "val": {s.name: (s.val_fraction if s.val_fraction is not None else cfg.data.val_fraction, s.eval_only)
                for s in cfg.data.sources},
    }
    print(f"[honed.prepare] sources {', '.join(s.name for s in cfg.data.sources)} → {out}", flush=True)
    processed = read_rows(cfg).map_batches(
        ExampleProcessor, fn_constructor_kwargs={"model_path": model_path, "cfg": proc_cfg},
        batch_size=256, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=1),
    ).materialize()

    print(f"[honed.prepare] {processed.count()} records parsed, cleaned and tokenized; writing shards", flush=True)
    kept = processed.filter(expr="status == 'kept'")
    train = kept.filter(expr="split == 'train'").select_columns(SHARD_COLUMNS)
    train.random_shuffle(seed=cfg.data.seed).write_parquet(str((out / "shards" / "train").resolve()))
    kept.filter(expr="split == 'val'").select_columns(SHARD_COLUMNS).write_parquet(
        str((out / "shards" / "val").resolve()))
    quarantined = processed.filter(expr="status == 'quarantined'")
    if quarantined.count():
        quarantined.select_columns(["source", "origin", "reason", "detail", "raw"]).write_json(
            str((out / "quarantine").resolve()))

    tokenizer = load_tokenizer(model_path)
    counts = processed.groupby(["source", "status", "reason", "split"]).count().take_all()
    manifest = {
        "honed_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "seconds": round(time.time() - started, 1),
        "counts": reconcile(counts),
        "tokens": token_stats(train),
        "template": {
            "chat_template": tokenizer.chat_template,
            "system_prompt": cfg.data.system_prompt,
            "loss_on": cfg.data.loss_on,
            "eos_token": tokenizer.eos_token,
        },
        "model": {"name_or_path": cfg.model.name_or_path, "weights_sha256": weights_hash(model_path),
                  "tokenizer_sha256": tokenizer_hash(model_path)},
        "sources": [s.model_dump() for s in cfg.data.sources],
        "config": json.loads(json.dumps(cfg.model_dump(mode="json"))),
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    (out / "prepare.yaml").write_text(dump_config(cfg))
    (out / "report.md").write_text(render_report(manifest))
    return manifest


def reconcile(rows: list[dict]) -> dict:
    """Per source: read = train + val + dropped + quarantined, with per-reason counts."""
    per_source: dict[str, dict] = {}
    for row in rows:
        c = per_source.setdefault(row["source"], {"read": 0, "train": 0, "val": 0, "dropped": Counter(),
                                                  "quarantined": Counter()})
        n = row["count()"]
        c["read"] += n
        if row["status"] == KEPT:
            c[row["split"]] += n
        else:
            c[row["status"]][row["reason"]] += n
    totals = Counter()
    for c in per_source.values():
        c["dropped"], c["quarantined"] = dict(c["dropped"]), dict(c["quarantined"])
        totals.update({"read": c["read"], "train": c["train"], "val": c["val"],
                       "dropped": sum(c["dropped"].values()), "quarantined": sum(c["quarantined"].values())})
    return {"total": dict(totals), "by_source": per_source}


def token_stats(train) -> dict:
    if train.count() == 0:
        return {"examples": 0, "total": 0, "mean": 0.0, "max": 0}
    stats = train.aggregate(*_token_aggs())
    return {"examples": train.count(), "total": int(stats["sum(num_tokens)"]),
            "mean": round(float(stats["mean(num_tokens)"]), 2), "max": int(stats["max(num_tokens)"])}


def _token_aggs():
    from ray.data.aggregate import Max, Mean, Sum

    return Sum("num_tokens"), Mean("num_tokens"), Max("num_tokens")


def render_report(manifest: dict) -> str:
    lines = ["# Prepared dataset", "", "| source | read | train | val | dropped | quarantined |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, c in manifest["counts"]["by_source"].items():
        lines.append(f"| {name} | {c['read']} | {c['train']} | {c['val']} | "
                     f"{_reasons(c['dropped'])} | {_reasons(c['quarantined'])} |")
    t = manifest["tokens"]
    lines += ["", f"Training tokens: {t['total']} over {t['examples']} examples (mean {t['mean']}, max {t['max']}).",
              f"Template: system prompt {manifest['template']['system_prompt']!r}, loss on "
              f"{manifest['template']['loss_on']}, EOS {manifest['template']['eos_token']!r}."]
    return "\n".join(lines) + "\n"


def _reasons(counter: dict) -> str:
    return ", ".join(f"{k}: {v}" for k, v in sorted(counter.items())) or "0"


def load_manifest(data_dir: str) -> dict:
    path = Path(data_dir) / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(f"no prepared dataset at '{data_dir}' (manifest.json missing): run `honed prepare`")
    return json.loads(path.read_text())
