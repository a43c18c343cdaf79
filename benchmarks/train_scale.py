"""Per-worker memory of full fine-tuning a ≥ 400 M parameter model under DDP, ZeRO-2 and ZeRO-3 at 1 and 2 workers.

    .venv/bin/python benchmarks/train_scale.py            # 6 runs of `honed train` (~30 min on 2 CPUs)
    .venv/bin/python benchmarks/train_scale.py --quick    # ZeRO-3 at 1 and 2 workers only

The model is a random-init Llama written from a config (24 layers x 1024, ~400 M parameters, 1.6 GB in fp32;
honed.models.make_random_model) with the tiny test tokenizer, so nothing is downloaded; the data is 200 ICD-10
instruction pairs prepared with that tokenizer. Each run is `honed train` (Ray Train, fp32 on CPU, batch 1,
`--steps` steps) in a fresh driver process; the figures come from its efficiency.json, per worker:
  load_peak_mb     anonymous resident memory (RssAnon) added while the model was built: file-backed pages of the
                   memory-mapped safetensors are not counted (honed.train.efficiency.AnonPeak)
  model_state_mb   tensor storage alive in the worker after its last optimizer step, each storage once
                   (honed.train.efficiency.tensor_mb): parameters (under ZeRO-3 the rank's partition), gradients,
                   Adam moments, fp32 master copies and the backend's flat buffers — the model state. DDP's
                   gradient buckets live in C++ and are not seen, so DDP's figure is low by one gradient copy
  steady_mb        RssAnon added by the end of training over the worker's baseline before loading: the model
                   state plus what the process keeps besides (allocator slack, gathered layers, activations' heap)
The goal: ZeRO-3's per-worker model-state memory at 2 workers ≤ 0.6x its value at 1 worker (ideal 0.5x); the
same ratio of `steady_mb` is reported next to it.
Writes `benchmarks/results/train_scale.json`.
"""

from __future__ import annotations

from pathlib import Path

from harness import WORK, Measured, at_most, bench_env, call, child_main, log, main, public, run_process

SCRIPT = Path(__file__)
GOAL = 0.6
BACKENDS = {"ddp": None, "zero2": 2, "zero3": 3}


def options(parser) -> None:
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps of each run")
    parser.add_argument("--layers", type=int, default=24, help="decoder layers of the 1024-wide random model")
    parser.add_argument("--backends", default="ddp,zero2,zero3", help="comma-separated: ddp, zero2, zero3")


def measure(args) -> Measured:
    setup = call(SCRIPT, "setup", {"layers": args.layers}, env=bench_env(2))
    runs = {}
    for backend in args.backends.split(","):
        for workers in (1, 2):
            tag = f"scale-{backend}-{workers}w"
            log(f"{tag}: honed train, {args.steps} steps ...")
            result = public(run_process(SCRIPT, "train", setup | {"backend": backend, "workers": workers,
                                                                   "steps": args.steps, "tag": tag}, tag,
                                        needle="RayTrainWorker", env=bench_env(1)))
            runs[tag] = summarize(result)
            log(f"  per worker: load +{runs[tag]['load_peak_mb']} MB, model state {runs[tag]['model_state_mb']} MB, "
                f"steady +{runs[tag]['steady_mb']} MB")
    backends = args.backends.split(",")
    ratios = {b: round(runs[f"scale-{b}-2w"]["model_state_mb"] / runs[f"scale-{b}-1w"]["model_state_mb"], 3)
              for b in backends}
    rss_ratios = {b: round(runs[f"scale-{b}-2w"]["steady_mb"] / runs[f"scale-{b}-1w"]["steady_mb"], 3)
                  for b in backends}
    goal = at_most("ZeRO-3 per-worker model-state memory, 2 workers / 1 worker", ratios.get("zero3"), GOAL)
    figures = {"config": {"layers": args.layers, "hidden": 1024, "params": setup["params"], "steps": args.steps,
                          "batch_size": 1, "dtype": "float32", "device": "cpu"},
               "runs": runs, "model_state_ratio_2w_over_1w": ratios, "steady_rss_ratio_2w_over_1w": rss_ratios}
    return Measured("per-worker anonymous memory while loading and after training of full fine-tuning a "
                    f"{setup['params'] / 1e6:.0f} M parameter random model with honed train under DDP, ZeRO-2 and "
                    "ZeRO-3 at 1 and 2 workers", figures, [goal])


def summarize(result: dict) -> dict:
    workers = result["efficiency"]["workers"]
    grown = [w["load"]["peak_anon_mb"] - w["load"]["baseline_anon_mb"] for w in workers]
    steady = [w["load"]["anon_mb_after_training"] - w["load"]["baseline_anon_mb"] for w in workers]
    return {"load_peak_mb": round(max(grown), 1), "steady_mb": round(max(steady), 1),
            "model_state_mb": max(w["load"]["tensor_mb_after_training"] for w in workers),
            "params_held_at_load": [w["load"]["params_held"] for w in workers],
            "fp32_model_mb": workers[0]["load"]["fp32_model_mb"], "loss": result["losses"],
            "process_wall_s": result["process_wall_s"], "loadavg_1min_before_after": result["loadavg_1min_before_after"]}


# ------------------------------------------------------------------------------ the fresh processes
def setup_child(spec: dict) -> dict:
    """The random model and its prepared dataset, made once under WORK."""
    from honed.config import PrepareConfig
    from honed.data.pipeline import prepare
    from honed.models import make_random_model, make_tiny_model
    from honed.runtime import init_ray

    base = WORK / f"scale-{spec['layers']}"
    model = base / "model"
    if not (model / "config.json").is_file():
        make_random_model(model, make_tiny_model(base / "tokenizer"), layers=spec["layers"])
    data = base / "data"
    if not (data / "manifest.json").is_file():
        init_ray()
        prepare(PrepareConfig.model_validate({
            "model": {"name_or_path": str(model)}, "output_dir": str(data),
            "data": {"max_seq_len": 128, "sources": [{"name": "icd10", "kind": "icd10", "chapters": ["4"],
                                                      "max_records": 200}]}}))
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model)
    h, i, n = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    params = n * (4 * h * h + 3 * h * i + 2 * h) + config.vocab_size * h + h
    return {"model": str(model), "data": str(data), "params": params}


def train_child(spec: dict) -> dict:
    import json
    import shutil

    from honed.config import TrainConfig
    from honed.runtime import init_ray
    from honed.train.trainer import train

    out = WORK / "runs" / spec["tag"]
    shutil.rmtree(out, ignore_errors=True)  # a run left by an earlier invocation would resume, measuring nothing
    stage = BACKENDS[spec["backend"]]
    init_ray()
    train(TrainConfig.model_validate({
        "model": {"name_or_path": spec["model"]}, "data_dir": spec["data"], "output_dir": str(out),
        "name": spec["tag"], "storage_path": str(out / "checkpoints"),
        "method": {"name": "full"} | ({"deepspeed": {"zero_stage": stage}} if stage else {}),
        "optim": {"max_steps": spec["steps"], "batch_size": 1, "lr": 1e-4, "warmup_steps": 0},
        "scaling": {"num_workers": spec["workers"], "cpus_per_worker": 0.5},
        "log_every": 1, "checkpoint_every": spec["steps"], "val_max_examples": 2,
        "efficiency": {"peak_flops": 1e11}}))  # MFU is not this benchmark's figure: skip the matmul
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    result = {"efficiency": json.loads((out / "efficiency.json").read_text()), "losses": [m["loss"] for m in history]}
    shutil.rmtree(out, ignore_errors=True)  # checkpoints and export of a 403 M model: 6-9 GB a run, never read again
    return result


if __name__ == "__main__":
    main("train_scale", __doc__, measure, options=options, quick={"backends": "zero3"},
         children={"setup": setup_child, "train": train_child})
