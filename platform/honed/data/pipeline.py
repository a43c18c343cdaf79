"""`honed prepare` on Ray Data: read → parse → normalise → filter → redact → decontaminate → template +
tokenize → deduplicate → mix → split → shuffle → pack → write.

    honed prepare jobs/prepare_icd10.yaml output_dir=runs/data

Everything streams through Ray Data on whatever cluster is connected: files are read by tasks (one file per
task, in chunks), records are processed by a pool of actors, and deduplication is a hash shuffle of LSH
bucket keys across the whole corpus (O(n)). The driver only ever holds file names, the eval-set n-grams, the
duplicate edges and counters, never the corpus.

Writes `output_dir/`:
  shards/train/*.parquet   training rows: examples, or packed rows of `pack.seq_len` tokens
  shards/val/*.parquet     held-out examples of every source, unpacked (per-source validation)
  quarantine/*.json        broken records with source, origin (file:line) and reason
  manifest.json            counts that reconcile (read = kept + dropped + quarantined) per source and per
                           stage, filter/PII/dedup/token/packing statistics, source hashes, template, tokenizer
  report.md, token_lengths.png
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

from honed import __version__
from honed.config import PII_TYPES, PrepareConfig, dump_config
from honed.data.records import (
    DROPPED, KEPT, QUARANTINED, BadRecord, assign_split, empty_field, encode_example, encode_preference, encode_texts,
    group_key, identical_answers, map_texts, parse_record, unit_hash,
)
from honed.data.sources import DERIVED, FileReader, builtin_rows, list_files
from honed.data.templates import resolve_template
from honed.models import load_tokenizer, resolve_model, tokenizer_hash, weights_hash

# Preference pairs keep the chosen conversation in input_ids/labels (so any method can train on them) and the
# rejected one beside it; other rows leave the rejected columns empty.
SHARD_COLUMNS = ["source", "group", "id", "kind", "prompt", "response", "text", "messages", "input_ids", "labels",
                 "num_tokens", "chosen", "rejected", "rejected_input_ids", "rejected_labels"]
PACKED_COLUMNS = ["input_ids", "labels", "position_ids", "num_tokens", "num_examples"]
QUARANTINE_COLUMNS = ["source", "origin", "reason", "detail", "raw"]
# Where each drop or quarantine reason happens; the manifest's per-stage in/out counts follow this order.
STAGES = ["read", "parse", "normalize", "filter", "pii", "decontaminate", "template", "dedup", "mix"]
READ_REASONS = {"not_utf8", "too_large", "malformed_csv", "unsupported_value"}
HIST_BINS = 32
# Ray Data coalesces a reader's output into blocks of up to 128 MB and hands a block to one actor: small
# blocks let every cleaning actor work, also on a single large file.
BLOCK_BYTES = 4 << 20


def stage_of(status: str, reason: str) -> str:
    if reason.startswith("empty_"):
        return "normalize"
    if status == QUARANTINED:
        return "read" if reason in READ_REASONS else "parse"
    if reason.startswith("quality_"):
        return "filter"
    if reason == "contaminated":
        return "decontaminate"
    if reason in ("too_long", "too_few_tokens"):
        return "template"
    if reason.endswith("_duplicate"):
        return "dedup"
    return "mix"


# ------------------------------------------------------------------------------------- per-record work
class ExampleProcessor:
    """Ray Data actor: reader rows → one processed row each, with a status, a reason, the tokenized example
    and the keys deduplication needs. Quarantined rows keep their raw text (2,000 characters) and origin."""

    def __init__(self, model_path: str, settings: dict, decontam=None):
        from honed.data.dedup import MinHasher

        self.tokenizer = load_tokenizer(model_path)
        self.s = settings
        self.decontam = decontam
        dd = settings["dedup"]
        self.hasher = MinHasher(dd["num_perm"], seed=1) if dd["near"] else None

    def __call__(self, batch: dict[str, np.ndarray]):
        import pyarrow as pa

        out = defaultdict(list)
        rows = [self.clean(str(s), str(r), str(e)) for s, r, e in zip(batch["source"], batch["raw"], batch["error"])]
        self.encode(rows, [str(s) for s in batch["source"]])
        self.add_dedup_keys(rows)
        for row, source, origin, rid in zip(rows, batch["source"], batch["origin"], batch["id"]):
            row.update(source=str(source), origin=str(origin), id=int(rid))
            for key in OUTPUT_KEYS:
                out[key].append(row.get(key, EMPTY[key]))
        # An explicit schema keeps token lists as plain Arrow lists in every block and in the shards.
        return pa.table({key: list_array(out[key], OUTPUT_TYPES[key]) if pa.types.is_list(OUTPUT_TYPES[key])
                         else pa.array(out[key], type=OUTPUT_TYPES[key]) for key in OUTPUT_KEYS})

    def clean(self, source: str, raw: str, error: str) -> dict:
        """Parse → normalise → filter → redact → decontaminate one record; a survivor comes back with status
        `pending` and its record, for `encode` to tokenize with the rest of the batch."""
        from honed.data.pii import redact
        from honed.data.quality import normalize_text, quality_reason, text_of

        s = self.s
        if error:
            reason, _, detail = error.partition(": ")
            return {"status": QUARANTINED, "reason": reason, "raw": raw[:2000], "detail": detail}
        src = s["sources"][source]
        try:
            record = parse_record(raw, src["fields"], src["format"])
        except BadRecord as err:
            return {"status": QUARANTINED, "reason": err.reason, "raw": raw[:2000], "detail": str(err)}
        norm = s["normalize"]
        record = map_texts(record, lambda t: normalize_text(t, norm["unicode"], norm["strip_html"]))
        empty = empty_field(record)
        if empty:  # an empty record is broken input, not a filter's choice: quarantined with its raw text
            return {"status": QUARANTINED, "reason": f"empty_{empty}", "raw": raw[:2000],
                    "detail": f"'{empty}' is empty after normalisation"}
        if identical_answers(record):
            return {"status": QUARANTINED, "reason": "identical_pair", "raw": raw[:2000],
                    "detail": "chosen and rejected are the same text after normalisation: no preference to learn"}
        if s["filters"] is not None:
            failed = quality_reason(text_of(record), s["filters"])
            if failed:
                return {"status": DROPPED, "reason": f"quality_{failed}"}
        pii = Counter()
        if s["pii"]:
            def scrub(text: str) -> str:
                clean, counts = redact(text, s["pii"])
                pii.update(counts)
                return clean
            record = map_texts(record, scrub)
        text = text_of(record)
        if self.decontam is not None and not src["eval_only"] and self.decontam.contaminated(text):
            return {"status": DROPPED, "reason": "contaminated", **_pii_columns(pii)}
        return {"status": "pending", "record": record, "dedup_text": text, **_pii_columns(pii)}

    def encode(self, rows: list[dict], sources: list[str]) -> None:
        """Template + tokenize the pending rows (raw text in one batched tokenizer call), apply the token
        limits, assign the split."""
        s = self.s
        pending = [(row, source) for row, source in zip(rows, sources) if row["status"] == "pending"]
        texts = [row for row, _ in pending if row["record"]["kind"] == "text"]
        for row, ids in zip(texts, encode_texts([r["record"]["text"] for r in texts], self.tokenizer)):
            row["encoded"] = {"input_ids": ids, "labels": list(ids)}
        for row, source in pending:
            record = row.pop("record")
            if record["kind"] == "preference":
                encoded = encode_preference(record, self.tokenizer, s["system_prompt"], s["chat_template"])
            else:
                encoded = row.pop("encoded", None) or encode_example(
                    record, self.tokenizer, s["system_prompt"], s["loss_on"], s["chat_template"])
            # a pair is as long as its longer answer's conversation; both must fit max_seq_len
            n_tokens = max(len(encoded["input_ids"]), len(encoded.get("rejected_input_ids", ())))
            if n_tokens > s["max_seq_len"] or (s["min_tokens"] and n_tokens < s["min_tokens"]):
                row.update(status=DROPPED, reason="too_long" if n_tokens > s["max_seq_len"] else "too_few_tokens")
                continue
            src = s["sources"][source]
            group = group_key(record)
            split = "val" if src["eval_only"] else assign_split(s["seed"], source, group, src["val_fraction"])
            row.update(status=KEPT, reason="", split=split, group=group, num_tokens=n_tokens, kind=record["kind"],
                       **encoded, **shard_texts(record))

    def add_dedup_keys(self, rows: list[dict]) -> None:
        from honed.data.dedup import exact_key

        kept = [r for r in rows if r["status"] == KEPT]
        dd = self.s["dedup"]
        for r in rows:
            if r["status"] != KEPT:
                r.pop("dedup_text", None)
        if not kept:
            return
        if dd["exact"]:
            for r in kept:
                r["exact_key"] = exact_key(r["dedup_text"])
        if self.hasher is not None:
            sigs = self.hasher.signatures([r["dedup_text"] for r in kept], dd["shingle_words"])
            for r, sig in zip(kept, sigs):
                r["signature"] = sig.astype(np.int64).tolist()
        for r in kept:
            del r["dedup_text"]


def shard_texts(record: dict) -> dict:
    """The text columns of a kept row. A preference pair with a one-turn question also fills prompt/response
    (question, chosen answer), so evaluation can ask it like any instruction example."""
    out = {k: record.get(k, "") for k in ("prompt", "response", "text", "chosen", "rejected")}
    if "messages" in record:
        out["messages"] = json.dumps(record["messages"], ensure_ascii=False)
    if record["kind"] == "preference" and len(record["messages"]) == 1:
        out |= {"prompt": record["messages"][0]["content"], "response": record["chosen"], "messages": ""}
    return out


def list_array(lists: list[list[int]], list_type):
    """Lists of ints → an Arrow list array through flat numpy buffers (much faster than `pa.array`)."""
    import itertools

    import pyarrow as pa

    lengths = np.fromiter((len(x) for x in lists), dtype=np.int32, count=len(lists))
    offsets = np.zeros(len(lists) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    values = np.fromiter(itertools.chain.from_iterable(lists), dtype=list_type.value_type.to_pandas_dtype(),
                         count=int(offsets[-1]))
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))


def _pii_columns(counts: Counter) -> dict:
    return {f"pii_{t}": counts.get(t, 0) for t in PII_TYPES}


EMPTY = {
    "source": "", "id": 0, "origin": "", "status": "", "reason": "", "detail": "", "raw": "", "split": "",
    "group": "", "kind": "", "prompt": "", "response": "", "text": "", "messages": "", "input_ids": [], "labels": [],
    "num_tokens": 0, "chosen": "", "rejected": "", "rejected_input_ids": [], "rejected_labels": [],
    "exact_key": 0, "signature": [],
    **{f"pii_{t}": 0 for t in PII_TYPES},
}
OUTPUT_KEYS = list(EMPTY)


def _output_types() -> dict:
    import pyarrow as pa

    ints = {"id": pa.int64(), "num_tokens": pa.int32(), "exact_key": pa.int64(),
            "input_ids": pa.list_(pa.int32()), "labels": pa.list_(pa.int32()), "signature": pa.list_(pa.int64()),
            "rejected_input_ids": pa.list_(pa.int32()), "rejected_labels": pa.list_(pa.int32()),
            **{f"pii_{t}": pa.int32() for t in PII_TYPES}}
    return {key: ints.get(key, pa.string()) for key in OUTPUT_KEYS}


OUTPUT_TYPES = _output_types()


# ----------------------------------------------------------------------------------------------- read
def read_rows(cfg: PrepareConfig, files: dict[str, list[str]]):
    """One Ray dataset of reader rows over every configured source (see `honed.data.sources`)."""
    import ray.data

    parts = []
    for index, source in enumerate(cfg.data.sources):
        if source.name in files:
            paths = files[source.name]
            listing = ray.data.from_items([{"path": p, "file_index": i} for i, p in enumerate(paths)],
                                          override_num_blocks=len(paths))
            # Reading is I/O and line splitting; a reader task blocked on a full downstream queue must not
            # hold a CPU the cleaning actors need, so readers take no CPU slot (and at most two run at once).
            parts.append(listing.map_batches(
                read_files, fn_kwargs={"source": source, "source_index": index,
                                       "max_record_bytes": cfg.data.max_record_bytes},
                batch_size=1, num_cpus=0, concurrency=2))
        else:
            parts.append(ray.data.from_items(builtin_rows(source, index, cfg.data.seed)))
    return parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]


def read_files(batch: dict, source, source_index: int, max_record_bytes: int):
    """Ray Data task: the records of one listed file, as batches (see `FileReader`)."""
    yield from FileReader(source, source_index, max_record_bytes)(batch)


def source_files(cfg: PrepareConfig) -> dict[str, list[str]]:
    """Every file source's files, listed up front: a missing or unreadable path fails before Ray work."""
    return {s.name: list_files(s) for s in cfg.data.sources if s.path}


# ------------------------------------------------------------------------------------------- pipeline
def col(name: str):
    from ray.data.expressions import col as column

    return column(name)


def prepare(cfg: PrepareConfig) -> dict:
    """Run the pipeline on the connected Ray cluster; returns the manifest."""
    started = time.time()
    files = source_files(cfg)  # fails up front on a missing or unreadable input
    out = Path(cfg.output_dir)
    for sub in ("shards", "quarantine"):
        shutil.rmtree(out / sub, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    with data_context(preserve_order=True, target_max_block_size=BLOCK_BYTES):  # same input + seed → same bytes
        return run_pipeline(cfg, files, out, started)


@contextlib.contextmanager
def data_context(preserve_order: bool, target_max_block_size: int):
    """Ray Data settings for the duration of a run, restored afterwards (the context is process-wide)."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    saved = ctx.execution_options.preserve_order, ctx.target_max_block_size
    ctx.execution_options.preserve_order, ctx.target_max_block_size = preserve_order, target_max_block_size
    try:
        yield ctx
    finally:
        ctx.execution_options.preserve_order, ctx.target_max_block_size = saved


def run_pipeline(cfg: PrepareConfig, files: dict[str, list[str]], out: Path, started: float) -> dict:
    import ray
    import ray.data

    phases = Phases()
    model_path = resolve_model(cfg.model.name_or_path)
    tokenizer = load_tokenizer(model_path)
    template = resolve_template(cfg.data.template.name, tokenizer)
    dedup_params = lsh_settings(cfg)
    decontam = decontamination_index(cfg, files)
    settings = processor_settings(cfg, template, dedup_params)
    workers = cfg.data.num_workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
    print(f"[honed.prepare] sources {', '.join(s.name for s in cfg.data.sources)} → {out} "
          f"({workers} processing actors)", flush=True)
    processed = read_rows(cfg, files).map_batches(
        ExampleProcessor, fn_constructor_kwargs={"model_path": model_path, "settings": settings,
                                                 "decontam": decontam},
        batch_size=256, batch_format="numpy", compute=ray.data.ActorPoolStrategy(min_size=1, max_size=workers),
    ).materialize()
    phases.done("read_clean_tokenize", f"{processed.count()} records read, cleaned and tokenized")

    duplicates, dedup_stats = find_duplicates(processed, cfg, dedup_params)
    phases.done("dedup", f"{len(duplicates)} duplicates in {dedup_stats['clusters']} clusters")
    dup_ref = ray.put(duplicate_table(duplicates))
    marked = processed.map_batches(mark_duplicates, fn_kwargs={"table": dup_ref}, batch_format="pyarrow")
    rates = mix_rates(cfg, marked)
    final = marked.map_batches(apply_mix, fn_kwargs={"rates": rates, "seed": cfg.data.seed},
                               batch_format="pyarrow").materialize()
    phases.done("mix", "duplicates marked, mix applied")

    kept = final.filter(expr=col("status") == KEPT)
    train = kept.filter(expr=col("split") == "train").select_columns(SHARD_COLUMNS)
    val = kept.filter(expr=col("split") == "val").select_columns(SHARD_COLUMNS)
    tokens = token_stats(kept, cfg.data.max_seq_len)
    train = seeded_shuffle(train, cfg.data.seed)
    packing = {"enabled": cfg.data.pack.enabled}
    if cfg.data.pack.enabled:
        seq_len = cfg.data.pack.seq_len or cfg.data.max_seq_len
        train = train.map_batches(pack_examples, fn_kwargs={"seq_len": seq_len, "pad_id": tokenizer.pad_token_id},
                                  batch_size=4096, batch_format="numpy").materialize()
        packing |= packing_stats(train, seq_len, tokens["train"]["examples"])
    train_rows = write_shards(train, out / "shards" / "train", "train")
    val_rows = write_shards(val, out / "shards" / "val", "val")
    quarantined = final.filter(expr=col("status") == QUARANTINED).select_columns(QUARANTINE_COLUMNS)
    if quarantined.count():
        quarantined.write_json(str((out / "quarantine").resolve()))
    phases.done("shuffle_pack_write", f"{train_rows} training rows, {val_rows} validation rows written")

    counts = final.groupby(["source", "status", "reason", "split"]).count().take_all()
    kinds: dict[str, dict[str, dict[str, int]]] = {}  # split → source → record kind → kept rows
    for row in kept.groupby(["split", "source", "kind"]).count().take_all():
        kinds.setdefault(row["split"], {}).setdefault(row["source"], {})[row["kind"]] = row["count()"]
    manifest = {
        "honed_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "seconds": round(time.time() - started, 1),
        "phase_seconds": phases.seconds,
        "counts": reconcile(counts),
        "kinds": kinds,
        "stages": stage_counts(counts),
        "pii": pii_counts(final),
        "dedup": dedup_stats,
        "mix": rates,
        "tokens": tokens,
        "packing": packing,
        "shards": {"train_rows": train_rows, "val_rows": val_rows, "packed": cfg.data.pack.enabled},
        "template": {
            "name": template["name"],
            "chat_template": template["chat_template"],
            "stop": template["stop"],
            "system_prompt": cfg.data.system_prompt,
            "loss_on": cfg.data.loss_on,
            "eos_token": tokenizer.eos_token,
        },
        "model": {"name_or_path": cfg.model.name_or_path, "weights_sha256": weights_hash(model_path),
                  "tokenizer_sha256": tokenizer_hash(model_path)},
        "sources": source_identities(cfg, files),
        "decontamination": {"ngram": cfg.data.decontaminate.ngram, "eval_ngrams": len(decontam) if decontam else 0},
        "config": json.loads(json.dumps(cfg.model_dump(mode="json"))),
    }
    phases.done("statistics", "counts, PII, token and source statistics")
    manifest["seconds"] = round(time.time() - started, 1)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    (out / "prepare.yaml").write_text(dump_config(cfg))
    plot_histogram(manifest["tokens"], out / "token_lengths.png")
    (out / "report.md").write_text(render_report(manifest))
    return manifest


class Phases:
    """Wall time of each phase of the run, printed as it ends and kept for the manifest."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def done(self, name: str, message: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = round(now - self._last, 1)
        self._last = now
        print(f"[honed.prepare] {name}: {message} ({self.seconds[name]} s)", flush=True)


def processor_settings(cfg: PrepareConfig, template: dict, dedup_params: dict) -> dict:
    d = cfg.data
    return {
        "system_prompt": d.system_prompt, "max_seq_len": d.max_seq_len, "loss_on": d.loss_on, "seed": d.seed,
        "chat_template": template["chat_template"], "min_tokens": d.filters.min_tokens if d.filters.enabled else None,
        "normalize": d.normalize.model_dump(),
        "filters": d.filters if d.filters.enabled else None,
        "pii": list(d.pii.types) if d.pii.enabled else [],
        "dedup": dedup_params,
        "sources": {s.name: {"fields": s.fields.model_dump(), "format": s.format, "eval_only": s.eval_only,
                             "val_fraction": s.val_fraction if s.val_fraction is not None else d.val_fraction}
                    for s in d.sources},
    }


def lsh_settings(cfg: PrepareConfig) -> dict:
    from honed.data.dedup import lsh_params

    dd = cfg.data.dedup
    bands, rows = (dd.bands, dd.rows) if dd.bands else lsh_params(dd.threshold, dd.num_perm)
    return {"exact": dd.exact, "near": dd.near, "num_perm": dd.num_perm, "shingle_words": dd.shingle_words,
            "threshold": dd.threshold, "bands": bands, "rows": rows}


# ----------------------------------------------------------------------------------- decontamination
def decontamination_index(cfg: PrepareConfig, files: dict[str, list[str]]):
    """N-grams of every eval set (files in `decontaminate.paths` and eval-only sources named there),
    normalised like training text; None when there is nothing to decontaminate against."""
    from honed.config import SourceConfig
    from honed.data.dedup import NgramIndex
    from honed.data.quality import normalize_text, text_of

    dc = cfg.data.decontaminate
    if not dc.paths and not dc.sources:
        return None
    texts = []
    eval_sources = [s for s in cfg.data.sources if s.name in dc.sources]
    eval_sources += [SourceConfig(name=f"eval-{i}", kind="jsonl", path=p) for i, p in enumerate(dc.paths)]
    for index, source in enumerate(eval_sources):
        if source.path:
            reader = FileReader(source, index, cfg.data.max_record_bytes)
            raws = [raw for path in list_files(source) for _, _, raw, error in reader.records(path) if not error]
        else:
            raws = [r["raw"] for r in builtin_rows(source, index, cfg.data.seed)]
        for raw in raws:
            try:
                record = parse_record(raw, source.fields.model_dump(), source.format)
            except BadRecord:
                continue
            texts.append(normalize_text(text_of(record), cfg.data.normalize.unicode, cfg.data.normalize.strip_html))
    return NgramIndex(texts, dc.ngram)


# ------------------------------------------------------------------------------------- deduplication
def find_duplicates(processed, cfg: PrepareConfig, params: dict) -> tuple[dict[int, tuple[int, str]], dict]:
    """`{id: (kept representative id, reason)}` for every exact or near duplicate of an earlier record.

    Each record's keys (its exact hash, its LSH band keys) become rows; a hash shuffle puts equal keys in one
    block, where every member of a bucket is linked to the bucket's smallest id (star edges, linear in the
    bucket). Only these edges reach the driver. LSH candidates are then verified: an edge stands only when
    the two MinHash signatures agree on at least `threshold` of their entries (the estimated Jaccard
    similarity), which removes band collisions of unrelated records. Union-find turns the edges into
    clusters whose smallest (first-read) id is kept."""
    from honed.data.dedup import resolve_clusters

    dd = cfg.data.dedup
    stats = {"exact": dd.exact, "near": dd.near, "threshold": dd.threshold, "num_perm": dd.num_perm,
             "shingle_words": dd.shingle_words}
    dups: dict[int, tuple[int, str]] = {}
    kept = processed.filter(expr=col("status") == KEPT)
    n_blocks = max(2, processed.num_blocks())
    exact_edges: list[tuple[int, int]] = []
    if dd.exact:
        keys = kept.select_columns(["id", "exact_key"]).rename_columns({"exact_key": "key"})
        exact_edges = bucket_edges(keys, n_blocks)
        for rid, rep in resolve_clusters(exact_edges).items():
            dups[rid] = (rep, "exact_duplicate")
    near_edges: list[tuple[int, int]] = []
    if dd.near:
        keys = kept.select_columns(["id", "signature"]).map_batches(
            band_rows, fn_kwargs={"bands": params["bands"], "rows": params["rows"]}, batch_format="numpy")
        candidates = bucket_edges(keys, n_blocks)
        near_edges = verify_edges(kept, candidates, dd.threshold)
        stats |= {"bands": params["bands"], "rows": params["rows"], "candidate_pairs": len(set(candidates)),
                  "verified_pairs": len(set(near_edges))}
        for rid, rep in resolve_clusters(near_edges + exact_edges).items():
            dups.setdefault(rid, (rep, "near_duplicate"))
    clusters = Counter(rep for rep, _ in dups.values())
    stats |= {
        "exact_removed": sum(1 for _, r in dups.values() if r == "exact_duplicate"),
        "near_removed": sum(1 for _, r in dups.values() if r == "near_duplicate"),
        "clusters": len(clusters),
        "largest_cluster": (max(clusters.values()) + 1) if clusters else 0,
        "examples": cluster_examples(processed, dups),
    }
    return dups, stats


def band_rows(batch: dict[str, np.ndarray], bands: int, rows: int) -> dict[str, np.ndarray]:
    """One `{id, key}` row per LSH band of each record."""
    from honed.data.dedup import band_keys

    if len(batch["id"]) == 0:
        return {"id": np.array([], dtype=np.int64), "key": np.array([], dtype=np.int64)}
    keys = band_keys(np.stack(batch["signature"]), bands, rows)
    return {"id": np.repeat(batch["id"].astype(np.int64), bands), "key": keys.ravel()}


def verify_edges(kept, edges: list[tuple[int, int]], threshold: float) -> list[tuple[int, int]]:
    """The candidate edges whose two records' signatures estimate a Jaccard similarity ≥ threshold."""
    import ray

    from honed.data.dedup import estimated_jaccard

    if not edges:
        return []
    wanted = ray.put(np.unique(np.array(edges, dtype=np.int64)))

    def pick(batch: dict[str, np.ndarray], ids) -> dict[str, np.ndarray]:
        hit = np.isin(batch["id"].astype(np.int64), ray.get(ids))
        return {"id": batch["id"][hit], "signature": batch["signature"][hit]}

    rows = kept.select_columns(["id", "signature"]).map_batches(
        pick, fn_kwargs={"ids": wanted}, batch_format="numpy").take_all()
    signatures = {int(r["id"]): np.asarray(r["signature"]) for r in rows}
    return [(a, b) for a, b in sorted(set(edges))
            if estimated_jaccard(signatures[a], signatures[b]) >= threshold]


def bucket_edges(keys, n_blocks: int) -> list[tuple[int, int]]:
    """(id, smallest id of its bucket) for every non-smallest member of every bucket."""
    edges = keys.repartition(n_blocks, keys=["key"]).map_batches(
        star_edges, batch_size=None, batch_format="numpy").take_all()
    return [(int(e["id"]), int(e["rep"])) for e in edges]


def star_edges(block: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Within one hash partition: every row whose bucket holds a smaller id, linked to that smallest id."""
    if len(block["key"]) == 0:
        return {"id": np.array([], dtype=np.int64), "rep": np.array([], dtype=np.int64)}
    order = np.lexsort((block["id"], block["key"]))
    key, ids = block["key"][order], block["id"][order].astype(np.int64)
    starts = np.r_[True, key[1:] != key[:-1]]
    first = ids[np.maximum.accumulate(np.where(starts, np.arange(len(ids)), 0))]
    linked = ids != first
    return {"id": ids[linked], "rep": first[linked]}


DUP_REASONS = ("exact_duplicate", "near_duplicate")


def duplicate_table(dups: dict[int, tuple[int, str]]) -> dict[str, np.ndarray]:
    """The duplicate map as sorted arrays: shipped once through the object store, read without copying."""
    ids = np.array(sorted(dups), dtype=np.int64)
    codes = np.array([DUP_REASONS.index(dups[int(i)][1]) for i in ids], dtype=np.int8)
    return {"id": ids, "reason": codes}


def mark_duplicates(batch, table):
    """Drop (status, reason) the kept rows listed in the duplicate table; works on Arrow batches (the
    pipeline) and on dicts of arrays (tests)."""
    import ray

    table = ray.get(table) if isinstance(table, ray.ObjectRef) else table
    ids, status, reason = (_column(batch, k) for k in ("id", "status", "reason"))
    ids = ids.astype(np.int64)
    pos = np.minimum(np.searchsorted(table["id"], ids), max(len(table["id"]) - 1, 0))
    hit = (table["id"][pos] == ids) & (status == KEPT) if len(table["id"]) else np.zeros(len(ids), bool)
    status[hit] = DROPPED
    reason[hit] = [DUP_REASONS[c] for c in table["reason"][pos[hit]]]
    return _with_columns(batch, status=status, reason=reason)


def _column(batch, name: str) -> np.ndarray:
    column = batch[name]
    values = column.to_numpy(zero_copy_only=False) if hasattr(column, "to_numpy") else np.asarray(column)
    return values.astype(object) if values.dtype.kind in "OUS" else values


def _with_columns(batch, **columns: np.ndarray):
    """`batch` with some columns replaced: Arrow tables stay Arrow (their list columns untouched)."""
    if isinstance(batch, dict):
        return batch | columns
    import pyarrow as pa

    for name, values in columns.items():
        batch = batch.set_column(batch.schema.get_field_index(name), name, pa.array(values.tolist(), pa.string()))
    return batch


def cluster_examples(processed, dups: dict[int, tuple[int, str]], limit: int = 3) -> list[dict]:
    """A few near-duplicate pairs (origins) for the report, so a reader can judge the threshold."""
    near = sorted((rid, rep) for rid, (rep, r) in dups.items() if r == "near_duplicate")[:limit]
    if not near:
        return []
    wanted = {i for pair in near for i in pair}
    origins = {int(r["id"]): r["origin"] for r in processed.filter(
        lambda row: int(row["id"]) in wanted).select_columns(["id", "origin"]).take_all()}
    return [{"duplicate": origins.get(rid), "kept": origins.get(rep)} for rid, rep in near]


# ---------------------------------------------------------------------------------------------- mix
def mix_rates(cfg: PrepareConfig, marked) -> dict:
    """Sampling rate per weighted source so kept training examples follow the weights without repeating
    any: the scarcest source (relative to its weight) is used in full, the others are subsampled."""
    weighted = {s.name: s.weight for s in cfg.data.sources if s.weight and not s.eval_only}
    if not weighted:
        return {}
    rows = marked.filter(expr=(col("status") == KEPT) & (col("split") == "train")).groupby("source").count().take_all()
    available = {r["source"]: r["count()"] for r in rows}
    total_weight = sum(weighted.values())
    shares = {name: w / total_weight for name, w in weighted.items()}
    budget = min(available.get(name, 0) / share for name, share in shares.items())
    return {name: {"weight": weighted[name], "share": round(share, 4), "available": available.get(name, 0),
                   "rate": min(1.0, budget * share / available[name]) if available.get(name) else 0.0}
            for name, share in shares.items()}


def apply_mix(batch, rates: dict, seed: int):
    """Drop (`mix_subsampled`) each kept training row of a weighted source with 1 − its rate, by a seeded
    hash of its id, so the choice does not depend on how rows fall into blocks."""
    if not rates:
        return batch
    status, reason, split = (_column(batch, k) for k in ("status", "reason", "split"))
    for i, (source, rid) in enumerate(zip(_column(batch, "source"), _column(batch, "id"))):
        rate = rates.get(str(source), {}).get("rate", 1.0)
        if status[i] == KEPT and split[i] == "train" and unit_hash(f"{seed}:mix:{rid}") >= rate:
            status[i], reason[i] = DROPPED, "mix_subsampled"
    return _with_columns(batch, status=status, reason=reason)


# --------------------------------------------------------------------------------- shuffle and pack
def seeded_shuffle(ds, seed: int):
    """A global shuffle that is a pure function of (seed, ids): sort by a seeded hash of each id."""
    def add_key(batch):
        import pyarrow as pa

        keys = [int.from_bytes(hashlib.blake2b(f"{seed}:{i}".encode(), digest_size=8).digest(), "big") >> 1
                for i in batch.column("id").to_pylist()]
        return batch.append_column("shuffle_key", pa.array(keys, pa.int64()))

    return ds.map_batches(add_key, batch_format="pyarrow").sort("shuffle_key").drop_columns(["shuffle_key"])


def pack_examples(batch: dict[str, np.ndarray], seq_len: int, pad_id: int):
    """Best-fit-decreasing packing of a batch of examples into rows of `seq_len` tokens. Position ids
    restart at 0 for every example (and for the padding tail), which is how the model's attention mask
    keeps each example to itself; padding carries label -100."""
    lengths = [len(x) for x in batch["input_ids"]]
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    free: list[int] = []
    for i in order:
        fits = [b for b, room in enumerate(free) if room >= lengths[i]]
        if fits:
            b = min(fits, key=lambda b: free[b])
            bins[b].append(i)
            free[b] -= lengths[i]
        else:
            bins.append([i])
            free.append(seq_len - lengths[i])
    out = defaultdict(list)
    for members in bins:
        ids, labels, positions = [], [], []
        for i in members:
            ids += list(batch["input_ids"][i])
            labels += list(batch["labels"][i])
            positions += list(range(lengths[i]))
        used = len(ids)
        ids += [pad_id] * (seq_len - used)
        labels += [-100] * (seq_len - used)
        positions += list(range(seq_len - used))
        out["input_ids"].append(ids)
        out["labels"].append(labels)
        out["position_ids"].append(positions)
        out["num_tokens"].append(used)
        out["num_examples"].append(len(members))
    return packed_table(out)


def packed_table(columns: dict[str, list]):
    """Plain Arrow lists (not Ray's tensor extension type), so any Parquet reader loads the shards."""
    import pyarrow as pa

    lists = {k: pa.array(columns.get(k, []), type=pa.list_(pa.int32())) for k in ("input_ids", "labels", "position_ids")}
    return pa.table(lists | {k: pa.array(columns.get(k, []), type=pa.int32()) for k in ("num_tokens", "num_examples")})


def packing_stats(packed, seq_len: int, n_examples: int) -> dict:
    from ray.data.aggregate import Count, Sum

    stats = packed.aggregate(Sum("num_tokens"), Count())
    rows, used = int(stats["count()"]), int(stats["sum(num_tokens)"] or 0)
    return {"seq_len": seq_len, "rows": rows, "examples": n_examples,
            "efficiency": round(used / max(rows * seq_len, 1), 4)}


def write_shards(ds, path: Path, prefix: str, rows_per_shard: int = 50_000) -> int:
    """Write deterministic Parquet shards (`prefix-00000.parquet`, ...) and return the row count."""
    import ray.data
    from ray.data.datasource import FilenameProvider

    class Names(FilenameProvider):  # the default names hold random write ids
        def get_filename_for_task(self, write_uuid, task_index):
            return f"{prefix}-{task_index:05d}.parquet"

    n = ds.count()
    path.mkdir(parents=True, exist_ok=True)
    if n:
        ds.repartition(max(1, -(-n // rows_per_shard))).write_parquet(
            str(path.resolve()), filename_provider=Names(), mode=ray.data.SaveMode.OVERWRITE)
    return n


# ---------------------------------------------------------------------------------------- statistics
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


def stage_counts(rows: list[dict]) -> list[dict]:
    """Records in and out of each stage, in pipeline order, with what each stage removed and why."""
    removed: dict[str, Counter] = defaultdict(Counter)
    total = 0
    for row in rows:
        total += row["count()"]
        if row["status"] != KEPT:
            removed[stage_of(row["status"], row["reason"])][row["reason"]] += row["count()"]
    stages, current = [], total
    for stage in STAGES:
        gone = sum(removed[stage].values())
        stages.append({"stage": stage, "in": current, "out": current - gone, "removed": dict(removed[stage])})
        current -= gone
    return stages


def pii_counts(final) -> dict[str, int]:
    from ray.data.aggregate import Sum

    stats = final.aggregate(*[Sum(f"pii_{t}") for t in PII_TYPES])
    return {t: int(stats[f"sum(pii_{t})"] or 0) for t in PII_TYPES}


def token_stats(kept, max_seq_len: int) -> dict:
    """Per split: examples, total/mean/max tokens and a token-length histogram, in one pass over the kept
    examples (block-wise partials summed on the driver)."""
    edges = np.linspace(0, max_seq_len, HIST_BINS + 1)

    def partial(batch: dict[str, np.ndarray]) -> dict[str, list]:
        out = {"split": [], "counts": [], "total": [], "max": []}
        for split in ("train", "val"):
            lengths = batch["num_tokens"][batch["split"] == split].astype(np.int64)
            out["split"].append(split)
            out["counts"].append(np.histogram(lengths, bins=edges)[0].tolist())
            out["total"].append(int(lengths.sum()))
            out["max"].append(int(lengths.max()) if len(lengths) else 0)
        return out

    hist = {split: np.zeros(HIST_BINS, dtype=np.int64) for split in ("train", "val")}
    total, largest = dict.fromkeys(hist, 0), dict.fromkeys(hist, 0)
    for row in kept.select_columns(["split", "num_tokens"]).map_batches(partial, batch_format="numpy").take_all():
        split = row["split"]
        hist[split] += np.asarray(row["counts"], dtype=np.int64)
        total[split] += int(row["total"])
        largest[split] = max(largest[split], int(row["max"]))
    out = {}
    for split in hist:
        n = int(hist[split].sum())  # every kept example has 0 < tokens ≤ max_seq_len, so it is in a bin
        out[split] = {"examples": n, "total": total[split], "mean": round(total[split] / n, 2) if n else 0.0,
                      "max": largest[split]}
    return out | {"histogram": {"edges": edges.round(1).tolist(), "train": hist["train"].tolist(),
                                "val": hist["val"].tolist()}}


def source_identities(cfg: PrepareConfig, files: dict[str, list[str]]) -> list[dict]:
    """Each source's config and a content hash of each input (files hashed in Ray tasks, in parallel)."""
    import ray.data

    all_files = [p for paths in files.values() for p in paths]
    hashes = {}
    if all_files:
        rows = ray.data.from_items([{"path": p} for p in all_files], override_num_blocks=len(all_files)).map(
            _hash_file).take_all()
        hashes = {r["path"]: (r["sha256"], r["bytes"]) for r in rows}
    out = []
    for index, source in enumerate(cfg.data.sources):
        entry = source.model_dump(mode="json")
        if source.name in files:
            entry["files"] = [{"path": p, "sha256": hashes[p][0], "bytes": hashes[p][1]} for p in files[source.name]]
        else:
            digest = hashlib.sha256()
            for row in builtin_rows(source, index, cfg.data.seed):
                digest.update(row["raw"].encode())
            entry["records_sha256"] = digest.hexdigest()
            if source.kind in DERIVED:
                entry["derived"] = DERIVED[source.kind]
        out.append(entry)
    return out


def _hash_file(row: dict) -> dict:
    from honed.data.sources import _open

    digest, size = hashlib.sha256(), 0
    with _open(row["path"]) as f:
        while chunk := f.read(8 << 20):
            digest.update(chunk)
            size += len(chunk)
    return {"path": row["path"], "sha256": digest.hexdigest(), "bytes": size}


# ------------------------------------------------------------------------------------------- report
def plot_histogram(tokens: dict, path: Path) -> None:
    from honed.report import pyplot

    plt = pyplot()
    hist = tokens["histogram"]
    edges = np.asarray(hist["edges"])
    fig, ax = plt.subplots(figsize=(7, 3.5))
    width = edges[1] - edges[0]
    ax.bar(edges[:-1], hist["train"], width=width, align="edge", alpha=0.7, label="train")
    ax.bar(edges[:-1], hist["val"], width=width, align="edge", alpha=0.7, label="validation")
    ax.set_xlabel("tokens per example")
    ax.set_ylabel("examples")
    ax.set_title("Token lengths of kept examples")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def render_report(m: dict) -> str:
    lines = ["# Prepared dataset", "", "## Records per source", "",
             "| source | read | train | val | dropped | quarantined |", "|---|---:|---:|---:|---:|---:|"]
    for name, c in m["counts"]["by_source"].items():
        lines.append(f"| {name} | {c['read']} | {c['train']} | {c['val']} | "
                     f"{_reasons(c['dropped'])} | {_reasons(c['quarantined'])} |")
    lines += ["", "## Stages", "", "| stage | in | out | removed |", "|---|---:|---:|---|"]
    lines += [f"| {s['stage']} | {s['in']} | {s['out']} | {_reasons(s['removed'])} |" for s in m["stages"]]
    d = m["dedup"]
    lines += ["", "## Deduplication", "",
              f"Exact duplicates removed: {d['exact_removed']}; near duplicates removed: {d['near_removed']} "
              f"(MinHash {d['num_perm']} permutations, {d['shingle_words']}-word shingles, threshold "
              f"{d['threshold']}{', %s bands × %s rows' % (d['bands'], d['rows']) if 'bands' in d else ''}); "
              f"{d['clusters']} clusters, the largest of {d['largest_cluster']} records."]
    lines += [f"- `{e['duplicate']}` duplicates `{e['kept']}`" for e in d["examples"]]
    lines += ["", "## PII redacted", "", ", ".join(f"{k}: {v}" for k, v in m["pii"].items())]
    if m["mix"]:
        lines += ["", "## Mix", "", "| source | weight | share | available | rate |", "|---|---:|---:|---:|---:|"]
        lines += [f"| {k} | {v['weight']} | {v['share']} | {v['available']} | {v['rate']:.3f} |"
                  for k, v in m["mix"].items()]
    t = m["tokens"]
    lines += ["", "## Tokens", "",
              f"Training: {t['train']['total']} tokens over {t['train']['examples']} examples (mean "
              f"{t['train']['mean']}, max {t['train']['max']}); validation: {t['val']['total']} tokens over "
              f"{t['val']['examples']} examples.", "", "![token lengths](token_lengths.png)"]
    p = m["packing"]
    if p["enabled"]:
        lines += ["", f"Packing: {p['examples']} examples into {p['rows']} rows of {p['seq_len']} tokens, "
                      f"efficiency {p['efficiency']:.1%} (non-pad tokens / all tokens)."]
    tm = m["template"]
    lines += ["", f"Template `{tm['name']}`: system prompt {tm['system_prompt']!r}, loss on {tm['loss_on']}, "
                  f"stop {tm['stop']}, EOS {tm['eos_token']!r}."]
    return "\n".join(lines) + "\n"


def _reasons(counter: dict) -> str:
    return ", ".join(f"{k}: {v}" for k, v in sorted(counter.items())) or "0"


def load_manifest(data_dir: str) -> dict:
    path = Path(data_dir) / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(f"no prepared dataset at '{data_dir}' (manifest.json missing): run `honed prepare`")
    return json.loads(path.read_text())
