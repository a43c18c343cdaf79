"""What goes into a prepared dataset's manifest besides its settings, and the report written from it: counts
that reconcile per source and per stage, record kinds, PII, token statistics, source identities.

    stats = record_statistics(final, read_only, max_seq_len, overlap, enabled)   # counts, kinds, stages, pii, chunk
    tokens = token_stats(rows, max_seq_len)   # the shard rows (windows)
    (out / "report.md").write_text(render_report(manifest))

Every statistic is computed by Ray Data as block-wise partials (one pass each, no shuffle); the driver only
sums small rows. The manifest file itself is read and written by `honed.artifacts`.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

from honed.config import PII_TYPES, PrepareConfig
from honed.data.exchange import block_rows
from honed.data.records import KEPT, QUARANTINED, window_spans
from honed.data.sources import DERIVED, builtin_rows

# Where each drop or quarantine reason happens; the manifest's per-stage in/out counts follow this order.
STAGES = ["read", "parse", "normalize", "filter", "pii", "decontaminate", "template", "dedup", "mix"]
READ_REASONS = {"not_utf8", "too_large", "malformed_csv", "unsupported_value"}
HIST_BINS = 32


def record_statistics(final, read_only: bool, size: int, overlap: int, chunk_enabled: bool) -> dict:
    """The manifest's `counts`, `stages`, `pii` (of the records as read: paraphrases left out when `read_only`),
    `kinds` and `chunk` entries (of every kept row), in one pass over the marked rows: each block's tallies are
    summed on the driver (a few rows a block), where Ray's groupby would start a hash shuffle per statistic."""
    columns = ["source", "status", "reason", "split", "kind", "num_tokens", "augmented_from"]
    tallies = [json.loads(r["tally"]) for r in block_rows(final, block_tally, columns + [f"pii_{t}" for t in PII_TYPES],
                                                           read_only=read_only, size=size, overlap=overlap)]
    counts, kinds, chunk, pii = Counter(), Counter(), defaultdict(Counter), Counter()
    for t in tallies:
        counts.update({tuple(k): n for k, n in t["counts"]})
        kinds.update({tuple(k): n for k, n in t["kinds"]})
        pii.update(t["pii"])
        for name, c in t["chunk"].items():
            chunk[name].update(c)
    rows = [{"source": k[0], "status": k[1], "reason": k[2], "split": k[3], "count()": n} for k, n in counts.items()]
    by_kind: dict[str, dict[str, dict[str, int]]] = {}
    for (split, source, kind), n in sorted(kinds.items()):
        by_kind.setdefault(split, {}).setdefault(source, {})[kind] = n
    return {"counts": reconcile(rows), "kinds": by_kind, "stages": stage_counts(rows),
            "pii": {t: int(pii[t]) for t in PII_TYPES},
            "chunk": {"enabled": chunk_enabled, "window": size, "overlap": overlap,
                      "by_source": {name: dict(c) for name, c in sorted(chunk.items())}}}


def block_tally(batch: dict[str, np.ndarray], read_only: bool, size: int, overlap: int) -> dict[str, list]:
    """One block's tallies for `record_statistics`, as one JSON row."""
    read = batch["augmented_from"] < 0 if read_only else np.ones(len(batch["source"]), bool)
    kept = batch["status"] == KEPT
    counts = Counter(zip(*(batch[k][read].tolist() for k in ("source", "status", "reason", "split"))))
    kinds = Counter(zip(*(batch[k][kept].tolist() for k in ("split", "source", "kind"))))
    chunk = {}
    for source in np.unique(batch["source"][kept]).tolist():  # documents and the windows long ones become
        lengths = batch["num_tokens"][kept & (batch["source"] == source)]
        long = lengths[lengths > size]
        chunk[source] = {"documents": len(lengths), "chunked": len(long),
                         "windows": sum(len(window_spans(int(n), size, overlap)) for n in long)}
    pii = {t: int(batch[f"pii_{t}"][read].sum()) for t in PII_TYPES}
    tally = {"counts": [[list(k), n] for k, n in counts.items()], "kinds": [[list(k), n] for k, n in kinds.items()],
             "chunk": chunk, "pii": pii}
    return {"tally": [json.dumps(tally)]}


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


def stage_of(status: str, reason: str) -> str:
    """The stage (one of `STAGES`) that removes a row of this status and reason."""
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
    for row in block_rows(kept, partial, ["split", "num_tokens"]):
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
    if m.get("augment", {}).get("enabled"):
        lines += augment_lines(m["augment"])
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
    c = m.get("chunk", {})
    chunked = {name: v for name, v in c.get("by_source", {}).items() if v["chunked"]}
    if chunked:
        lines += ["", f"Long text documents cut into windows of {c['window']} tokens (overlap {c['overlap']}): "
                  + "; ".join(f"{name}: {v['chunked']} of {v['documents']} documents → {v['windows']} windows"
                              for name, v in chunked.items()) + "."]
    p = m["packing"]
    if p["enabled"]:
        lines += ["", f"Packing: {p['examples']} examples into {p['rows']} rows of {p['seq_len']} tokens, "
                      f"efficiency {p['efficiency']:.1%} (non-pad tokens / all tokens)."]
    tm = m["template"]
    lines += ["", f"Template `{tm['name']}`: system prompt {tm['system_prompt']!r}, loss on {tm['loss_on']}, "
                  f"stop {tm['stop']}, EOS {tm['eos_token']!r}."]
    return "\n".join(lines) + "\n"


def augment_lines(a: dict) -> list[str]:
    """The report's augmentation section (`honed.data.augment.augment_stats`): counts per source and examples."""
    lines = ["", "## Augmentation", "",
             f"{a['variants']} paraphrase(s) of {' and '.join(a['fields'])} per training record by `{a['model']}`"
             f"{' + ' + a['adapter'] if a['adapter'] else ''} (temperature {a['temperature']}); not in the counts "
             "above, which are of records as read. Validation holds no paraphrases.", "",
             "| source | records | generated | kept | dropped | quarantined | records keeping 0, 1, … |",
             "|---|---:|---:|---:|---|---|---|"]
    lines += [f"| {name} | {c['records']} | {c['generated']} | {c['kept']} | {_reasons(c['dropped'])} | "
              f"{_reasons(c['quarantined'])} | {_reasons(c['kept_per_record'])} |" for name, c in a["by_source"].items()]
    return lines + [f"- {e['source']!r} → {e['variant']!r}" for e in a["examples"]]


def _reasons(counter: dict) -> str:
    return ", ".join(f"{k}: {v}" for k, v in sorted(counter.items())) or "0"
