"""What one stage hands the next, read and written in one place (no torch, no Ray, no training driver).

    manifest = read_manifest("runs/data")              # honed prepare → train / eval / tune
    meta = read_meta("runs/train/adapter")             # honed.json: honed train / merge → registry / serve / eval
    rows = read_metrics("runs/train")                  # metrics.jsonl: honed train → report / tune / demo

Each path may be a local directory or an object-storage URI (honed.storage). A dataset dir holds `manifest.json` (counts that reconcile per source, template, tokenizer and model hashes,
shard geometry); an adapter or model dir holds `honed.json` (base model and its weights hash, method, template
with stop strings, data manifest hash, final metrics, export check); a run dir holds `metrics.jsonl` (one line
per logged step), `efficiency.json`, `progress.jsonl` (the live log) and `train.yaml`. Inside a Ray Train
checkpoint the same metrics and efficiency files sit beside `progress.json` (the resume state) and `probe.pt`
(the export check's logits).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from honed.storage import is_file, join, read_bytes, read_text, write_text

MANIFEST = "manifest.json"
META = "honed.json"
METRICS_FILE = "metrics.jsonl"
EFFICIENCY_FILE = "efficiency.json"
LIVE_LOG = "progress.jsonl"
RUN_CONFIG = "train.yaml"
# inside a training checkpoint
PROGRESS_FILE = "progress.json"
PROBE_FILE = "probe.pt"
RNG_DIR = "rng"


def read_manifest(data_dir: str | Path) -> dict:
    """The manifest of a prepared dataset (a local dir or a URI); FileNotFoundError naming the dir when it was
    never prepared."""
    path = join(data_dir, MANIFEST)
    if not is_file(path):
        raise FileNotFoundError(f"no prepared dataset at '{data_dir}' (manifest.json missing): run `honed prepare`")
    return json.loads(read_text(path))


def write_manifest(data_dir: str | Path, manifest: dict) -> str:
    path = join(data_dir, MANIFEST)
    write_text(path, json.dumps(manifest, indent=2))
    return path


def manifest_sha256(data_dir: str | Path) -> str:
    """The digest an adapter's honed.json records as `data_manifest_sha256`."""
    return hashlib.sha256(read_bytes(join(data_dir, MANIFEST))).hexdigest()


def read_meta(artifact_dir: str | Path) -> dict:
    """The honed.json of an adapter or model dir ({} when it has none, e.g. a model honed did not write)."""
    path = join(artifact_dir, META)
    return json.loads(read_text(path)) if is_file(path) else {}


def write_meta(artifact_dir: str | Path, meta: dict) -> str:
    path = join(artifact_dir, META)
    write_text(path, json.dumps(meta, indent=2))
    return path


def read_adapter_meta(adapter_dir: str | Path) -> dict:
    """honed.json of a PEFT adapter dir; FileNotFoundError when the dir holds no adapter."""
    if not is_file(join(adapter_dir, "adapter_config.json")):
        raise FileNotFoundError(f"'{adapter_dir}' is not an adapter directory (adapter_config.json missing)")
    return read_meta(adapter_dir)


def read_jsonl(path: str | Path) -> list[dict]:
    """Every JSON line of a file ([] when it does not exist)."""
    if not is_file(path):
        return []
    return [json.loads(line) for line in read_text(path).splitlines() if line.strip()]


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The logged steps of an exported run (metrics.jsonl), oldest first."""
    return read_jsonl(join(run_dir, METRICS_FILE))


def read_efficiency(run_dir: str | Path) -> dict | None:
    path = join(run_dir, EFFICIENCY_FILE)
    return json.loads(read_text(path)) if is_file(path) else None


def write_metrics(directory: str | Path, history: list[dict]) -> None:
    write_text(join(directory, METRICS_FILE), "".join(json.dumps(m) + "\n" for m in history))


def write_efficiency(directory: str | Path, efficiency: dict) -> None:
    write_text(join(directory, EFFICIENCY_FILE), json.dumps(efficiency, indent=2))
