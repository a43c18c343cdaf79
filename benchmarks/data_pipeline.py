"""Throughput of the whole `honed prepare` pipeline on a generated corpus, and how it scales.

    .venv/bin/python benchmarks/data_pipeline.py            # 200 MB corpus (and a 400 MB one)
    .venv/bin/python benchmarks/data_pipeline.py --mb 20    # a quick look (--quick: the same)

The corpus is synthetic text (`honed.data.synthetic`: Zipf-distributed pseudo-words, 80-300 words a
document) in JSONL files, with planted near duplicates (10 %) and exact duplicates (5 %). Every stage runs:
read, parse, normalise, quality filters, PII redaction, MinHash + LSH dedup across the corpus, template +
tokenization with the real SmolLM2 tokenizer, split, shuffle, packing into 2,048-token rows, Parquet write.

Three runs, each in a fresh process with its own local Ray (so nothing is shared or warm):
  A  corpus ×1 on 1 CPU      B  corpus ×1 on 2 CPUs      C  corpus ×2 on 2 CPUs
and the ratios: B/A throughput (what a second CPU buys) and C/B time (≈ 2 when the pipeline, dedup
included, is linear in corpus size). Writes `benchmarks/results/data_pipeline.json`.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from harness import MODEL, Measured, log, main, public, run_process

FILE_MB = 25


def options(parser) -> None:
    parser.add_argument("--mb", type=int, default=200, help="corpus size in MB of text (the 2x run doubles it)")
    parser.add_argument("--model", default=MODEL)
    parser.add_argument("--work", default="/tmp/honed-bench-data")


def measure(args) -> Measured:
    work = Path(args.work)
    one = generate(work / f"corpus-{args.mb}mb", args.mb, seed=0)
    two = generate(work / f"corpus-{2 * args.mb}mb", 2 * args.mb, seed=0)
    mb_one, mb_two = one["bytes"] / 1e6, two["bytes"] / 1e6
    a = pipeline(work / f"corpus-{args.mb}mb", 1, work / "out-a", args.model)
    b = pipeline(work / f"corpus-{args.mb}mb", 2, work / "out-b", args.model)
    c = pipeline(work / f"corpus-{2 * args.mb}mb", 2, work / "out-c", args.model)
    figures = {
        "corpus": {"x1": one, "x2": two},
        "runs": {
            "x1_1cpu": a | {"mb_per_s": round(mb_one / a["seconds"], 3)},
            "x1_2cpu": b | {"mb_per_s": round(mb_one / b["seconds"], 3)},
            "x2_2cpu": c | {"mb_per_s": round(mb_two / c["seconds"], 3)},
        },
        "ratios": {
            "throughput_2cpu_over_1cpu": round(a["seconds"] / b["seconds"], 3),
            "time_2x_corpus_over_1x": round(c["seconds"] / b["seconds"], 3),
            "near_dup_recall_x1": round(b["dedup"]["near_removed"] / max(one["planted"]["near"], 1), 3),
            "exact_dup_recall_x1": round(b["dedup"]["exact_removed"] / max(one["planted"]["exact"], 1), 3),
        },
    }
    print(json.dumps(figures["ratios"], indent=2))
    runs = figures["runs"]
    log(f"MB/s: 1 CPU {runs['x1_1cpu']['mb_per_s']}, 2 CPUs {runs['x1_2cpu']['mb_per_s']}, "
        f"2x corpus {runs['x2_2cpu']['mb_per_s']}")
    return Measured("full honed prepare (read → clean → filter → PII → MinHash/LSH dedup → template + tokenize → "
                    "split → shuffle → pack 2048 → Parquet) on synthetic JSONL text, local Ray", figures)


def generate(root: Path, total_mb: int, seed: int = 0) -> dict:
    """`total_mb` of text in JSONL files of ~25 MB; returns the planted duplicate counts."""
    from honed.data.synthetic import iter_synthetic_text

    root.mkdir(parents=True, exist_ok=True)
    marker = root.with_suffix(".json")  # next to the corpus, not in it (a .json file is read as input)
    if marker.is_file() and json.loads(marker.read_text())["mb"] == total_mb:
        return json.loads(marker.read_text())
    planted = {"original": 0, "near": 0, "exact": 0}
    index, size, out = 0, 0, None
    for record in iter_synthetic_text(total_mb * 10**6, seed=seed):
        if out is None or size >= FILE_MB * 10**6:
            if out:
                out.close()
            out, size = open(root / f"part-{index:03d}.jsonl", "w"), 0
            index += 1
        line = json.dumps({"text": record["text"]}) + "\n"
        out.write(line)
        size += len(line)
        planted[record["kind"]] += 1
    out.close()
    info = {"mb": total_mb, "files": index, "records": sum(planted.values()), "planted": planted,
            "bytes": sum(p.stat().st_size for p in root.glob("*.jsonl"))}
    marker.write_text(json.dumps(info))
    return info


def pipeline(corpus: Path, cpus: int, out: Path, model: str) -> dict:
    """`pipeline_main` in a fresh process, in this environment (the pipeline's Ray workers pick their threads)."""
    log(f"{corpus.name} on {cpus} CPU(s) ...")
    spec = {"corpus": str(corpus), "cpus": cpus, "out": str(out), "model": model}
    run = run_process(__file__, "pipeline", spec, f"pipeline-{corpus.name}-{cpus}cpu", env=dict(os.environ))
    log(f"  {run['seconds']} s")
    return {k: v for k, v in public(run).items() if k not in ("proc", "log")}


def pipeline_main(spec: dict) -> dict:
    """One pipeline run in this process, on a local Ray of `cpus` CPUs."""
    import ray

    from honed.config import PrepareConfig
    from honed.data.pipeline import prepare
    from honed.runtime import _quiet_data_logs

    ray.init(num_cpus=spec["cpus"], include_dashboard=False, logging_level="WARNING")
    _quiet_data_logs()
    cfg = PrepareConfig.model_validate({
        "model": {"name_or_path": spec["model"]}, "output_dir": spec["out"],
        "data": {"sources": [{"name": "corpus", "kind": "jsonl", "path": spec["corpus"]}],
                 "max_seq_len": 2048, "system_prompt": None, "pack": {"enabled": True, "seq_len": 2048}},
    })
    started = time.perf_counter()
    manifest = prepare(cfg)
    seconds = time.perf_counter() - started
    ray.shutdown()
    return {"seconds": round(seconds, 1), "phase_seconds": manifest["phase_seconds"],
            "counts": manifest["counts"]["total"], "stages": manifest["stages"],
            "dedup": {k: v for k, v in manifest["dedup"].items() if k != "examples"},
            "packing": manifest["packing"], "tokens": manifest["tokens"]["train"]["total"]}


if __name__ == "__main__":
    main("data_pipeline", __doc__, measure, options=options, quick={"mb": 20}, children={"pipeline": pipeline_main})
