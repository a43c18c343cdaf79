"""`honed index`: a retrieval index over a domain corpus, built with Ray Data.

    honed index jobs/index_icd10.yaml output_dir=runs/icd10/index
    honed index sources="[{name: notes, kind: jsonl, path: s3://bucket/notes/}]" output_dir=s3://bucket/index

Reading and cleaning are prepare's (`honed.data.sources` readers, then parse → normalise → quality filter →
PII redaction); each kept record's text is cut into word chunks (a Ray Data stage), and the driver fits BM25
(bm25s) over the chunks and writes the directory (`honed.retrieval.search.write_index`). The driver holds every
chunk: the index is meant for a domain corpus (thousands to a few hundred thousand passages), not a web crawl.
"""

from __future__ import annotations

import time
from collections import Counter

from honed import __version__
from honed.config import FILE_KINDS, DataConfig, PrepareConfig
from honed.config.index import IndexConfig
from honed.retrieval.search import IndexNotFound, index_exists, write_index

TITLE_CHARS = 80


def build_index(cfg: IndexConfig) -> dict:
    """Read, clean and chunk `cfg.sources` on the connected Ray cluster, fit BM25, write `cfg.output_dir`;
    returns its index.json."""
    from honed.data.pipeline import BLOCK_BYTES, data_context, read_rows, source_files

    started = time.time()
    check_sources(cfg)
    reading = reading_config(cfg)
    files = source_files(reading)  # fails up front on a missing or unreadable input
    with data_context(preserve_order=True, target_max_block_size=BLOCK_BYTES):  # same input → same chunk order
        rows = read_rows(reading, files).map_batches(
            chunk_records, fn_kwargs={"settings": chunk_settings(cfg)}, batch_format="numpy").take_all()
    chunks, counts = unique_chunks(rows)
    meta = {"honed_version": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "seconds": round(time.time() - started, 1), "counts": counts, "top_k": cfg.top_k,
            "chunk_words": cfg.chunk_words, "chunk_overlap": cfg.chunk_overlap, "config": cfg.model_dump(mode="json")}
    return write_index(chunks, meta, cfg.output_dir)


def check_sources(cfg: IndexConfig) -> None:
    if not cfg.sources:
        raise ValueError("index: `sources` is empty: name the corpus as prepare's data.sources, e.g. "
                         "sources=\"[{name: icd10, kind: icd10, chapters: ['4']}]\" (kinds: jsonl, parquet, csv, "
                         "text, icd10, icd10_pairs, kjv)")


def missing_retrieval_inputs(command: str, cfg) -> str | None:
    """What stops a command before Ray starts: for `index` no sources or an unreadable file, for `eval` and
    `serve` a `retrieval` index that is not there (named, with the command that builds it)."""
    from honed.data.sources import list_files

    if command == "index":
        try:
            check_sources(cfg)
            for source in cfg.sources:
                if source.kind in FILE_KINDS:
                    list_files(source)
        except (ValueError, FileNotFoundError, PermissionError) as err:
            return str(err)
        return None
    settings = list(cfg.retrieval.values()) if command == "serve" else [cfg.retrieval] if cfg.retrieval else []
    missing = [s.index for s in settings if not index_exists(s.index)]
    return str(IndexNotFound(missing[0])) if missing else None


def reading_config(cfg: IndexConfig) -> PrepareConfig:
    """What prepare's readers take (`read_rows` reads sources, seed and the record size limit from it)."""
    return PrepareConfig(data=DataConfig(sources=cfg.sources, seed=cfg.seed, max_record_bytes=cfg.max_record_bytes))


def chunk_settings(cfg: IndexConfig) -> dict:
    """What `chunk_records` needs of the config, as a plain dict (cheap to ship to Ray tasks)."""
    return {"sources": {s.name: {"fields": s.fields.model_dump(), "format": s.format} for s in cfg.sources},
            "normalize": cfg.normalize.model_dump(), "filters": cfg.filters if cfg.filters.enabled else None,
            "pii": list(cfg.pii.types) if cfg.pii.enabled else [], "words": cfg.chunk_words,
            "overlap": cfg.chunk_overlap}


def chunk_records(batch: dict, settings: dict) -> dict:
    """Ray Data stage: reader rows → a row per chunk of each kept record (`status` kept) and one row per record
    left out (`status` dropped or quarantined, with its reason) so the driver can count them."""
    out = {k: [] for k in ("id", "title", "source", "text", "status", "reason")}
    for source, origin, raw, error in zip(batch["source"], batch["origin"], batch["raw"], batch["error"]):
        text, status, reason = clean_text(str(source), str(raw), str(error), settings)
        pieces = split_words(text, settings["words"], settings["overlap"]) if status == "kept" else [""]
        title = text.split("\n", 1)[0][:TITLE_CHARS]
        for n, piece in enumerate(pieces):
            row = {"id": f"{source}:{origin}#{n}", "title": title, "source": str(source), "text": piece,
                   "status": status, "reason": reason}
            for key, value in row.items():
                out[key].append(value)
    return out


def clean_text(source: str, raw: str, error: str, settings: dict) -> tuple[str, str, str]:
    """(text, status, reason) of one reader row: prepare's parse → normalise → quality filter → PII redaction
    (`honed.data.processing.ExampleProcessor.clean` without the training-only steps)."""
    from honed.data.pii import redact
    from honed.data.quality import normalize_text, quality_reason, text_of
    from honed.data.records import BadRecord, empty_field, map_texts, parse_record

    if error:
        return "", "quarantined", error.partition(": ")[0]
    src, norm = settings["sources"][source], settings["normalize"]
    try:
        record = parse_record(raw, src["fields"], src["format"])
    except BadRecord as err:
        return "", "quarantined", err.reason
    record = map_texts(record, lambda t: normalize_text(t, norm["unicode"], norm["strip_html"]))
    empty = empty_field(record)
    if empty:
        return "", "quarantined", f"empty_{empty}"
    text = text_of(record)
    failed = quality_reason(text, settings["filters"]) if settings["filters"] is not None else None
    if failed:
        return "", "dropped", f"quality_{failed}"
    if settings["pii"]:
        text = redact(text, settings["pii"])[0]
    return text, "kept", ""


def split_words(text: str, size: int, overlap: int) -> list[str]:
    """`text` cut into chunks of `size` words, each repeating `overlap` words of the one before; a text of at most
    `size` words is one chunk, as written. The last chunk ends at the text's end."""
    words = text.split()
    if len(words) <= size:
        return [text]
    step = size - overlap
    starts = list(range(0, len(words) - size, step)) + [len(words) - size]
    return [" ".join(words[start:start + size]) for start in starts]


def unique_chunks(rows: list[dict]) -> tuple[list[dict], dict]:
    """The kept chunks, first of each identical text only, and the counts index.json reports."""
    chunks, seen = [], set()
    left_out = Counter((r["status"], r["reason"]) for r in rows if r["status"] != "kept")
    kept = [r for r in rows if r["status"] == "kept"]
    for row in kept:
        if row["text"] not in seen:
            seen.add(row["text"])
            chunks.append({k: row[k] for k in ("id", "title", "source", "text")})
    records = len({r["id"].rsplit("#", 1)[0] for r in kept})
    counts = {"read": records + sum(left_out.values()), "kept_records": records, "chunks": len(chunks),
              "duplicate_chunks": len(kept) - len(chunks),
              "dropped": {reason: n for (status, reason), n in left_out.items() if status == "dropped"},
              "quarantined": {reason: n for (status, reason), n in left_out.items() if status == "quarantined"}}
    return chunks, counts
