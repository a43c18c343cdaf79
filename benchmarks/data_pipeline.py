"""Throughput of the whole `honed prepare` pipeline on a generated corpus, how it scales, and the wall time of a
small `honed prepare`.

    .venv/bin/python benchmarks/data_pipeline.py                  # 200 MB corpus (and a 400 MB one)
    .venv/bin/python benchmarks/data_pipeline.py --mb 20 --skip-double   # a quick look (--quick: the same)
    .venv/bin/python benchmarks/data_pipeline.py --small-only --out benchmarks/results/data_pipeline_small.json
    git archive HEAD platform | tar -x -C /tmp/base && \
      .venv/bin/python benchmarks/data_pipeline.py --baseline-source /tmp/base/platform   # + the old code's figures

The corpus is synthetic text (`honed.data.synthetic`: Zipf-distributed pseudo-words, 80-300 words a
document) in JSONL files, with planted near duplicates (10 %) and exact duplicates (5 %). Every stage runs:
read, parse, normalise, quality filters, PII redaction, MinHash + LSH dedup across the corpus, template +
tokenization with the real SmolLM2 tokenizer, split, shuffle, packing into 2,048-token rows, Parquet write.

Three runs, each in a fresh process with its own local Ray (so nothing is shared or warm):
  A  corpus ×1 on 1 CPU      B  corpus ×1 on 2 CPUs      C  corpus ×2 on 2 CPUs
and the ratios: B/A throughput (what a second CPU buys; goal ≥ 1.6) and C/B time (≈ 2 when the pipeline, dedup
included, is linear in corpus size; informative, skipped with --skip-double). Each run records `cores_busy`: the
machine's busy CPU time over the run's wall (from /proc/stat; the run is alone on a quiet machine), since a "1 CPU"
Ray (one task at a time) still leaves the driver, the raylet and the tokenizer's own threads the other cores.
With --pin, A and B run again with the whole process tree bound to 1 and 2 cores (sched_setaffinity before Ray
starts; everything inherits it): `throughput_2cpu_over_1cpu_pinned` is what a second core gives a machine.

Then the small prepare: 1,000 ICD-10-CM instruction records in one JSONL file, the demo's settings
(jobs/prepare_icd10.yaml: filters, PII, exact + near dedup, tokenizer template), `--small-repeats` times, each in
a fresh process that starts a local Ray of 2 CPUs before the timer (as `ray job submit` finds a cluster up); the
median wall of `prepare` is the figure (goal ≤ 15 s). With --baseline-source (a copy of another commit's
`platform/`) the same runs alternate with that code, for a before/after under the same load.
Writes `benchmarks/results/data_pipeline.json`.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import statistics

from harness import MODEL, Measured, alternating, at_least, at_most, log, main, public, run_process

FILE_MB = 25
SMALL_RECORDS = 1000
DEMO_CONFIG = Path(__file__).resolve().parents[1] / "jobs" / "prepare_icd10.yaml"


def options(parser) -> None:
    parser.add_argument("--mb", type=int, default=200, help="corpus size in MB of text (the 2x run doubles it)")
    parser.add_argument("--model", default=MODEL)
    parser.add_argument("--work", default="/tmp/honed-bench-data")
    parser.add_argument("--skip-double", action="store_true", help="skip the 2x corpus run (its ratio is informative)")
    parser.add_argument("--small-repeats", type=int, default=3, help="runs of the 1,000-record prepare (median)")
    parser.add_argument("--small-only", action="store_true", help="only the 1,000-record prepare and its goal")
    parser.add_argument("--pin", action="store_true", help="also run A and B bound to 1 and 2 cores")
    parser.add_argument("--baseline-source", help="a copy of another commit's platform/ dir: its small prepare too")


def measure(args) -> Measured:
    work = Path(args.work)
    figures = {} if args.small_only else corpus_scaling(args, work)
    figures["small_prepare"] = small = small_prepare(args, work)
    goals = [] if args.small_only else [
        at_least("throughput 2 CPUs / 1 CPU, corpus", figures["ratios"]["throughput_2cpu_over_1cpu"], 1.6)]
    goals.append(at_most(f"honed prepare of {SMALL_RECORDS} records, wall s after Ray is up (median)",
                         small["current"]["median_s"], 15))
    what = ("full honed prepare (read → clean → filter → PII → MinHash/LSH dedup → template + tokenize → split → "
            "shuffle → pack 2048 → Parquet) on synthetic JSONL text at 1 and 2 CPUs, local Ray; and a "
            f"{SMALL_RECORDS}-record ICD-10 JSONL prepare with the demo's settings")
    return Measured(what, figures, goals)


def corpus_scaling(args, work: Path) -> dict:
    """Runs A (1 CPU), B (2 CPUs) and, without --skip-double, C (2x corpus, 2 CPUs); their rates and ratios."""
    one = generate(work / f"corpus-{args.mb}mb", args.mb, seed=0)
    mb_one = one["bytes"] / 1e6
    a = pipeline(work / f"corpus-{args.mb}mb", 1, work / "out-a", args.model)
    b = pipeline(work / f"corpus-{args.mb}mb", 2, work / "out-b", args.model)
    runs = {"x1_1cpu": a | {"mb_per_s": round(mb_one / a["seconds"], 3)},
            "x1_2cpu": b | {"mb_per_s": round(mb_one / b["seconds"], 3)}}
    ratios = {
        "throughput_2cpu_over_1cpu": round(a["seconds"] / b["seconds"], 3),
        "near_dup_recall_x1": round(b["dedup"]["near_removed"] / max(one["planted"]["near"], 1), 3),
        "exact_dup_recall_x1": round(b["dedup"]["exact_removed"] / max(one["planted"]["exact"], 1), 3),
    }
    corpus = {"x1": one}
    if not args.skip_double:
        corpus["x2"] = two = generate(work / f"corpus-{2 * args.mb}mb", 2 * args.mb, seed=0)
        c = pipeline(work / f"corpus-{2 * args.mb}mb", 2, work / "out-c", args.model)
        runs["x2_2cpu"] = c | {"mb_per_s": round(two["bytes"] / 1e6 / c["seconds"], 3)}
        ratios["time_2x_corpus_over_1x"] = round(c["seconds"] / b["seconds"], 3)
    if args.pin:
        for cpus in (1, 2):
            run = pipeline(work / f"corpus-{args.mb}mb", cpus, work / f"out-pinned-{cpus}", args.model, pin=True)
            runs[f"x1_{cpus}cpu_pinned"] = run | {"mb_per_s": round(mb_one / run["seconds"], 3)}
        ratios["throughput_2cpu_over_1cpu_pinned"] = round(runs["x1_1cpu_pinned"]["seconds"]
                                                            / runs["x1_2cpu_pinned"]["seconds"], 3)
    print(json.dumps(ratios, indent=2))
    log("MB/s: " + ", ".join(f"{k} {v['mb_per_s']}" for k, v in runs.items()))
    return {"corpus": corpus, "runs": runs, "ratios": ratios}


def small_prepare(args, work: Path) -> dict:
    """The 1,000-record prepare, `--small-repeats` fresh processes (alternating with the baseline code when
    given); per side the runs and the median wall of `prepare`."""
    path = small_corpus(work / f"icd10-{SMALL_RECORDS}.jsonl")
    sides = {"current": None} | ({"baseline": args.baseline_source} if args.baseline_source else {})
    runs: dict[str, list] = {side: [] for side in sides}

    def run(side: str, repeat: int) -> dict:
        spec = {"corpus": str(path), "out": str(work / f"out-small-{side}"), "model": args.model}
        env = dict(os.environ)
        if sides[side]:  # the other commit's package first on the path
            env["PYTHONPATH"] = os.pathsep.join([str(Path(sides[side]).resolve()), env.get("PYTHONPATH", "")])
        result = public(run_process(__file__, "small", spec, f"small-{side}-{repeat}", env=env))
        log(f"  {side}: {result['seconds']} s {result['phase_seconds']}")
        return {k: v for k, v in result.items() if k not in ("proc", "log")}

    for _, done in alternating(args.small_repeats, list(sides), run):
        for side, result in done.items():
            runs[side].append(result)
    out = {"records": SMALL_RECORDS, "config": str(DEMO_CONFIG.relative_to(DEMO_CONFIG.parents[1])), "cpus": 2}
    for side, results in runs.items():
        out[side] = {"median_s": round(statistics.median(r["seconds"] for r in results), 1), "runs": results}
    if args.baseline_source:
        out["baseline"]["source"] = args.baseline_source
        out["speedup_median"] = round(out["baseline"]["median_s"] / out["current"]["median_s"], 2)
    return out


def small_corpus(path: Path) -> Path:
    """`SMALL_RECORDS` ICD-10-CM instruction records (the demo's chapters) as one JSONL file."""
    from honed.data.sources import icd10_records

    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        records = icd10_records(["4", "9", "10"], SMALL_RECORDS, 0)
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def small_main(spec: dict) -> dict:
    """One small prepare in this process: a local Ray of 2 CPUs started first, then `prepare` timed."""
    import ray

    from honed.config import PrepareConfig
    from honed.config.base import read_yaml

    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    raw = read_yaml(DEMO_CONFIG)
    raw["data"]["sources"] = [{"name": "icd10", "kind": "jsonl", "path": spec["corpus"]}]
    raw["data"].pop("decontaminate")  # it names the demo's kjv source
    cfg = PrepareConfig.model_validate(raw | {"output_dir": spec["out"], "model": {"name_or_path": spec["model"]}})
    manifest, timing = timed_prepare(cfg)
    ray.shutdown()
    return timing | {"phase_seconds": manifest["phase_seconds"], "counts": manifest["counts"]["total"]}


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


def pipeline(corpus: Path, cpus: int, out: Path, model: str, pin: bool = False) -> dict:
    """`pipeline_main` in a fresh process, in this environment (the pipeline's Ray workers pick their threads)."""
    log(f"{corpus.name} on {cpus} CPU(s){' (process tree bound to as many cores)' if pin else ''} ...")
    spec = {"corpus": str(corpus), "cpus": cpus, "out": str(out), "model": model, "pin": pin}
    run = run_process(__file__, "pipeline", spec, f"pipeline-{corpus.name}-{cpus}cpu{'-pinned' * pin}",
                      env=dict(os.environ))
    log(f"  {run['seconds']} s, {run['cores_busy']} cores busy")
    return {k: v for k, v in public(run).items() if k not in ("proc", "log")}


def pipeline_main(spec: dict) -> dict:
    """One pipeline run in this process, on a local Ray of `cpus` CPUs."""
    import ray

    from honed.config import PrepareConfig
    from honed.runtime import _quiet_data_logs

    if spec.get("pin"):  # before Ray starts: the raylet, GCS and every worker inherit the affinity
        os.sched_setaffinity(0, set(sorted(os.sched_getaffinity(0))[:spec["cpus"]]))
    ray.init(num_cpus=spec["cpus"], include_dashboard=False, logging_level="WARNING")
    _quiet_data_logs()
    cfg = PrepareConfig.model_validate({
        "model": {"name_or_path": spec["model"]}, "output_dir": spec["out"],
        "data": {"sources": [{"name": "corpus", "kind": "jsonl", "path": spec["corpus"]}],
                 "max_seq_len": 2048, "system_prompt": None, "pack": {"enabled": True, "seq_len": 2048}},
    })
    manifest, timing = timed_prepare(cfg)
    ray.shutdown()
    return timing | {"pinned": bool(spec.get("pin")), "phase_seconds": manifest["phase_seconds"],
                     "counts": manifest["counts"]["total"], "stages": manifest["stages"],
                     "dedup": {k: v for k, v in manifest["dedup"].items() if k != "examples"},
                     "packing": manifest["packing"], "tokens": manifest["tokens"]["train"]["total"]}


def timed_prepare(cfg) -> tuple[dict, dict]:
    """`prepare(cfg)`'s manifest, and its wall seconds with the machine's cores busy meanwhile."""
    from honed.data.pipeline import prepare

    busy_before, started = busy_cpu_seconds(), time.perf_counter()
    manifest = prepare(cfg)
    seconds = time.perf_counter() - started
    cores_busy = (busy_cpu_seconds() - busy_before) / seconds
    return manifest, {"seconds": round(seconds, 1), "cores_busy": round(cores_busy, 2)}


def busy_cpu_seconds() -> float:
    """The machine's non-idle CPU seconds so far, all cores (/proc/stat: user … steal, not idle or iowait)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


if __name__ == "__main__":
    main("data_pipeline", __doc__, measure, options=options, quick={"mb": 20, "skip_double": True},
         children={"pipeline": pipeline_main, "small": small_main})
