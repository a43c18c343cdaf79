"""`honed prepare` on Ray Data: read → parse → normalise → filter → redact → decontaminate → template +
tokenize → deduplicate → [paraphrase, `data.augment`] → mix → split → cut long text documents into windows →
shuffle → pack → write.

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

`output_dir` may be an object-storage URI (s3://bucket/runs/data): shards and quarantine are written there by
Ray Data's tasks, the rest is staged locally and uploaded at the end. The model's tokenizer is resolved on each
node that needs it (honed.models.resolve_model), so nodes share no disk.
"""

from __future__ import annotations

import contextlib
import functools
import json
import time
from pathlib import Path

import numpy as np

from honed import __version__
from honed.artifacts import write_manifest
from honed.config import FILE_KINDS, PrepareConfig, SourceConfig, dump_config
from honed.data.augment import augment_records, augment_stats
from honed.data.corpus_dedup import duplicate_table, find_duplicates, mark_duplicates
from honed.data.dedup import NgramIndex, lsh_params
from honed.data.exchange import select_rows
from honed.data.manifest import (
    plot_histogram, record_statistics, render_report, source_identities, token_stats,
)
from honed.data.processing import ExampleProcessor, split_windows
from honed.data.quality import normalize_text, text_of
from honed.data.records import KEPT, BadRecord, parse_record, unit_hash
from honed.data.shards import (
    SHARD_COLUMNS, apply_mix, mix_rates, pack_group, packing_stats, seed_keys, seeded_order, write_quarantine,
    write_shards,
)
from honed.data.sources import FileReader, builtin_rows, list_files
from honed.data.templates import resolve_template
from honed.models import load_tokenizer, model_dir, resolve_model, tokenizer_hash, weights_hash
from honed.storage import absolute, delete_dir, join, staged

# Ray Data coalesces a reader's output into blocks of up to 128 MB and hands a block to one actor: small
# blocks let every cleaning actor work, also on a single large file.
BLOCK_BYTES = 4 << 20
# Shard rows: an example, or one window of a long text document (`window` counts from 0 within the document)
ROW_COLUMNS = SHARD_COLUMNS + ["window", "augmented_from"]  # a paraphrase's source id; -1: a record as read


def prepare(cfg: PrepareConfig) -> dict:
    """Run the pipeline on the connected Ray cluster; returns the manifest."""
    started = time.time()
    files = source_files(cfg)  # fails up front on a missing or unreadable input
    for sub in ("shards", "quarantine"):
        delete_dir(join(cfg.output_dir, sub))
    with staged(cfg.output_dir) as out:  # output_dir itself, or a local dir uploaded to its URI at the end
        with data_context(preserve_order=True, target_max_block_size=BLOCK_BYTES):  # same input + seed → same bytes
            return run_pipeline(cfg, files, out, started)


def run_pipeline(cfg: PrepareConfig, files: dict[str, list[str]], out: Path, started: float) -> dict:
    """The whole run inside `prepare`'s Ray Data settings, one phase after the other; returns the manifest."""
    import ray
    import ray.data
    from ray.data.expressions import col

    phases = Phases()
    model_path = model_dir(cfg.model)
    model_ref = (cfg.model.name_or_path, cfg.model.revision)  # actors resolve it on their own node
    tokenizer = load_tokenizer(model_path)
    template = resolve_template(cfg.data.template.name, tokenizer)
    dedup_params = lsh_settings(cfg)
    decontam = decontamination_index(cfg)
    settings = processor_settings(cfg, template, dedup_params)
    workers = cfg.data.num_workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
    print(f"[honed.prepare] sources {', '.join(s.name for s in cfg.data.sources)} → {cfg.output_dir} "
          f"({workers} processing actors)", flush=True)
    processed = read_rows(cfg, files).map_batches(
        NodeExampleProcessor, fn_constructor_kwargs={"model_ref": model_ref, "settings": settings,
                                                     "decontam": decontam},
        batch_size=256, batch_format="numpy", compute=ray.data.ActorPoolStrategy(min_size=1, max_size=workers),
    ).materialize()
    phases.done("read_clean_tokenize", f"{processed.count()} records read, cleaned and tokenized")

    duplicates, dedup_stats = find_duplicates(processed, cfg, dedup_params)
    phases.done("dedup", f"{len(duplicates)} duplicates in {dedup_stats['clusters']} clusters")
    dup_ref = ray.put(duplicate_table(duplicates))
    marked = processed.map_batches(mark_duplicates, fn_kwargs={"table": dup_ref}, batch_format="pyarrow")
    if cfg.data.augment.enabled:
        marked, generated = augment_records(marked, cfg, settings, decontam, dedup_params)
        phases.done("augment", f"{generated} paraphrases generated, cleaned and deduplicated")
    rates = mix_rates(cfg, marked)
    final = marked.map_batches(apply_mix, fn_kwargs={"rates": rates, "seed": cfg.data.seed},
                               batch_format="pyarrow").materialize()
    phases.done("mix", "duplicates marked, mix applied")

    kept = final.filter(expr=col("status") == KEPT)
    chunk = cfg.data.chunk
    rows = kept.map_batches(split_windows_on_node, fn_kwargs={"size": cfg.data.max_seq_len, "overlap": chunk.overlap,
                                                              "model_ref": model_ref},
                            batch_format="pyarrow").materialize()  # cut once; read by the shards and statistics
    train, val = (select_rows(rows, "split", split, ROW_COLUMNS) for split in ("train", "val"))
    tokens = token_stats(rows, cfg.data.max_seq_len)
    keys = functools.partial(window_shuffle_keys, seed=cfg.data.seed)
    packing = {"enabled": cfg.data.pack.enabled}
    if cfg.data.pack.enabled:  # shuffled and packed in one exchange: groups of ~PACK_GROUP shuffled examples
        seq_len = cfg.data.pack.seq_len or cfg.data.max_seq_len
        train = seeded_order(train, keys, functools.partial(pack_group, seq_len=seq_len, pad_id=tokenizer.pad_token_id))
        packing |= packing_stats(train, seq_len, tokens["train"]["examples"])
    else:
        train = seeded_order(train, keys)
    shards = join(absolute(cfg.output_dir), "shards")  # written by Ray Data tasks on any node: path or URI
    train_tokens = packing["rows"] * packing["seq_len"] if cfg.data.pack.enabled else tokens["train"]["total"]
    train_rows = write_shards(train, join(shards, "train"), "train", train_tokens)
    val_rows = write_shards(val, join(shards, "val"), "val", tokens["val"]["total"])
    write_quarantine(final, join(absolute(cfg.output_dir), "quarantine"))
    phases.done("shuffle_pack_write", f"{train_rows} training rows, {val_rows} validation rows written")

    manifest = {
        "honed_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "seconds": round(time.time() - started, 1),
        "phase_seconds": phases.seconds,  # the same dict: the statistics phase below lands in it too
        # counts, stages, pii (of the records as read), kinds and chunk (of the kept rows)
        **record_statistics(final, cfg.data.augment.enabled, cfg.data.max_seq_len, chunk.overlap, chunk.enabled),
        "augment": augment_stats(final, cfg),  # paraphrases: generated, kept, dropped per source
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
                  "tokenizer_sha256": tokenizer_hash(model_path), "pad_token_id": tokenizer.pad_token_id},
        "sources": source_identities(cfg, files),
        "decontamination": {"ngram": cfg.data.decontaminate.ngram, "eval_ngrams": len(decontam) if decontam else 0},
        "config": json.loads(json.dumps(cfg.model_dump(mode="json"))),
    }
    phases.done("statistics", "counts, PII, token and source statistics")
    manifest["seconds"] = round(time.time() - started, 1)
    write_manifest(out, manifest)
    (out / "prepare.yaml").write_text(dump_config(cfg))
    plot_histogram(manifest["tokens"], out / "token_lengths.png")
    (out / "report.md").write_text(render_report(manifest))
    return manifest


class NodeExampleProcessor(ExampleProcessor):
    """The per-record actor with its tokenizer from the model resolved on the actor's own node."""

    def __init__(self, model_ref: tuple[str, str | None], settings: dict, decontam=None):
        tokenizer_threads_within_allocation()
        super().__init__(node_model(*model_ref), settings, decontam)


def tokenizer_threads_within_allocation() -> None:
    """A Ray worker holding one CPU tokenizes on one thread. The tokenizers library spreads a batch over every
    core of the machine by default, so each 1-CPU actor took CPU time from the others (and a "1 CPU" Ray from
    the cores it was not given: 1.28 cores busy). Read at each call, so setting it in the actor is enough."""
    import os

    import ray

    if ray.is_initialized() and ray.get_runtime_context().get_assigned_resources().get("CPU", 0) <= 1:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"


def split_windows_on_node(batch, size: int, overlap: int, model_ref: tuple[str, str | None]):
    """`split_windows` with the tokenizer of the model resolved on this node."""
    return split_windows(batch, size, overlap, node_model(*model_ref))


@functools.cache  # once per worker process (a Hub lookup may cost a request)
def node_model(name_or_path: str, revision: str | None) -> str:
    return resolve_model(name_or_path, revision)


def window_shuffle_keys(table, seed: int) -> np.ndarray:
    """`seed_keys` of the record id, which the windows of one document share: a window after the first is
    shuffled under an id of its own (window 0 keeps the record's, so rows never cut shuffle as before)."""
    import pyarrow as pa

    ids, windows = table.column("id").to_pylist(), table.column("window").to_pylist()
    own = [i if w == 0 else int(unit_hash(f"{i}:{w}") * 2**63) for i, w in zip(ids, windows)]
    return seed_keys(pa.table({"id": pa.array(own, pa.int64())}), seed)


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


# ----------------------------------------------------------------------------------------------- read
def source_files(cfg: PrepareConfig) -> dict[str, list[str]]:
    """Every file source's files, listed up front: a missing or unreadable path fails before Ray work."""
    return {s.name: list_files(s) for s in cfg.data.sources if s.kind in FILE_KINDS}  # feedback: read as pairs


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


# ------------------------------------------------------------------------------------------- settings
def processor_settings(cfg: PrepareConfig, template: dict, dedup_params: dict) -> dict:
    """What every `ExampleProcessor` actor needs of the config, as a plain dict (cheap to ship to actors)."""
    d = cfg.data
    return {
        "system_prompt": d.system_prompt, "max_seq_len": d.max_seq_len, "loss_on": d.loss_on, "seed": d.seed,
        "chunk": d.chunk.enabled,
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
    """The dedup config with its LSH geometry resolved: `bands` × `rows` from the config or `lsh_params`."""
    dd = cfg.data.dedup
    bands, rows = (dd.bands, dd.rows) if dd.bands else lsh_params(dd.threshold, dd.num_perm)
    return {"exact": dd.exact, "near": dd.near, "num_perm": dd.num_perm, "shingle_words": dd.shingle_words,
            "threshold": dd.threshold, "bands": bands, "rows": rows}


def decontamination_index(cfg: PrepareConfig):
    """N-grams of every eval set (files in `decontaminate.paths` and eval-only sources named there),
    normalised like training text; None when there is nothing to decontaminate against."""
    dc = cfg.data.decontaminate
    if not dc.paths and not dc.sources:
        return None
    texts = []
    eval_sources = [s for s in cfg.data.sources if s.name in dc.sources]
    eval_sources += [SourceConfig(name=f"eval-{i}", kind="jsonl", path=p) for i, p in enumerate(dc.paths)]
    for index, source in enumerate(eval_sources):
        if source.kind in FILE_KINDS:
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
