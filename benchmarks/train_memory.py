"""Peak memory of a training process for full / lora / qlora fine-tuning of the same model on the same batch.

    .venv/bin/python benchmarks/train_memory.py            # 4 steps per method, honed + bare (~12 min on 2 CPUs)
    .venv/bin/python benchmarks/train_memory.py --quick    # 3 steps, honed only

SmolLM2-135M-Instruct, batch 8 of the prepared demo corpus, 1 worker, 1 thread; full: fp32 master weights +
torch AdamW; lora: frozen fp32 base (CPU; bf16 on GPU) + r 16 adapters on all linear layers; qlora: the same
adapters over an NF4 double-quantised base (bitsandbytes), compute in fp32 on CPU (bf16 on GPU).

Each run is a fresh process (so one run's peak never carries into another's):
  honed  a fresh driver with its own local Ray calls `train(cfg)`; the figure is the Ray Train worker's
         peak: `peak_memory_mb` of its efficiency.json (max RSS of the worker process on CPU, CUDA max
         allocated on GPU). The worker's RSS is also sampled from outside every 0.25 s (the curve shows
         loading vs training).
  bare   the same model and steps in a plain process (no Ray): max RSS, and what the weights, gradients and
         optimizer state hold (`memory_parts`), which separates the method's own memory from the rest.
  floor  a fresh process that only imports torch + transformers + peft (+ Ray Train + honed, + bitsandbytes):
         the RSS every CPU training process pays before it loads anything.

The ratio is qlora / lora (honed, peak memory); `ratio_above_floor` subtracts the import floor from both.
Two more honed runs (not with --quick / --no-ac) add honed's own memory switch, activation checkpointing
(`method.activation_checkpointing: true`), to lora and qlora: `ratio_with_activation_checkpointing`.
Writes `benchmarks/results/train_memory.json`.
"""

from __future__ import annotations

import argparse
import json
import time

from _train_bench import (
    LORA,
    MODEL,
    WORK,
    commit,
    honed_config,
    log,
    machine_info,
    prepared_dataset,
    public,
    resolve_model_path,
    run_process,
    write_result,
)

GOAL = 0.45
METHODS = ("full", "lora", "qlora")
# honed's own memory option on top (method.activation_checkpointing): recompute each block in the backward
AC_VARIANTS = {"lora+ac": "lora", "qlora+ac": "qlora"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 steps, honed only")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-bare", action="store_true", help="skip the bare (no Ray) runs")
    parser.add_argument("--no-ac", action="store_true", help="skip lora / qlora with activation checkpointing")
    parser.add_argument("--gpu", action="store_true", help="CUDA, bf16 compute; memory = CUDA max allocated")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved settings and exit")
    parser.add_argument("--out", help="result file (default benchmarks/results/train_memory.json)")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.no_bare, args.no_ac = 3, True, True

    if args.dry_run:
        print(json.dumps(vars(args)))
        return
    data = prepared_dataset()
    model_path = resolve_model_path()
    floor = public(run_process("floor", {"bitsandbytes": True}, "memory-floor"))
    log("import floor (MB): " + ", ".join(f"{k} {v}" for k, v in floor.items() if k.endswith("_mb")))
    honed, bare = {}, {}
    variants = {m: m for m in METHODS} | ({} if args.no_ac else AC_VARIANTS)
    for variant, method in variants.items():
        tag = f"memory-honed-{variant.replace('+', '-')}"
        log(f"honed {variant} ({args.steps} steps) ...")
        extra = {"method.activation_checkpointing": True} if variant.endswith("+ac") else None
        cfg = honed_config(data, WORK / "runs" / tag, method=method, steps=args.steps, batch_size=args.batch_size,
                           threads=args.threads, gpu=args.gpu, lr=2e-5 if method == "full" else 2e-3,
                           log_every=1, peak_flops=1e11, extra=extra)  # fixed peak: no matmul benchmark here
        run = run_process("honed", {"config": cfg, "threads": args.threads}, tag)
        e = run["efficiency"]
        honed[variant] = {"peak_memory_mb": e["peak_memory_mb"], "memory_kind": e["memory_kind"],
                         "rss_sampled_peak_mb": run["proc"]["rss_peak_mb"], "rss_curve_s_mb": run["proc"]["rss_curve_s_mb"],
                         "per_step_peak_memory_mb": [h.get("peak_memory_mb") for h in run["history"]],
                         "trainable_params": e["trainable_params"], "total_params": e["total_params"],
                         "step_time_s": e["step_time_s"], "nonpad_tokens_per_s": e["nonpad_tokens_per_s"],
                         "process_wall_s": run["process_wall_s"]}
        log(f"  {variant}: peak {e['peak_memory_mb']:.0f} MB ({e['memory_kind']}), sampled RSS peak "
            f"{run['proc']['rss_peak_mb']} MB")
        if not args.no_bare and variant in METHODS:
            spec = {"method": method, "model_path": model_path, "data_dir": str(data), "steps": args.steps,
                    "batch_size": args.batch_size, "lr": 2e-5 if method == "full" else 2e-3, "warmup": 10,
                    "threads": args.threads, "gpu": args.gpu, "seed": 0}
            b = public(run_process("bare", spec, f"memory-bare-{method}"))
            bare[method] = {"peak_memory_mb": b["peak_memory_mb"], "memory_kind": b["memory_kind"],
                            "rss_sampled_peak_mb": b["proc"]["rss_peak_mb"], "rss_curve_s_mb": b["proc"]["rss_curve_s_mb"],
                            "memory_parts": b["memory_parts"], "step_time_s": b["step_time_s"],
                            "load_s": b["load_s"]}
            log(f"  bare {method}: peak {b['peak_memory_mb']:.0f} MB, parts {b['memory_parts']}")

    ratio = round(honed["qlora"]["peak_memory_mb"] / honed["lora"]["peak_memory_mb"], 4)
    # what every CPU worker holds before loading anything (qlora's also has bitsandbytes imported)
    floor_lora = 0.0 if args.gpu else floor["plus_ray_train_and_honed_mb"]
    floor_qlora = 0.0 if args.gpu else floor["plus_bitsandbytes_mb"]
    above = round((honed["qlora"]["peak_memory_mb"] - floor_qlora) / (honed["lora"]["peak_memory_mb"] - floor_lora), 4)
    result = {
        "benchmark": "train_memory",
        "what": "peak memory of the training process (honed's Ray Train worker; bare process for reference) for "
                "full / lora / qlora on SmolLM2-135M-Instruct, batch 8, each in a fresh process",
        "quick": args.quick, "date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine_info(), **commit(),
        "config": {"model": MODEL, "steps": args.steps, "batch_size": args.batch_size, "threads": args.threads,
                   "gpu": args.gpu, "lora": LORA, "qlora_quant": "nf4, double quant, compute dtype auto",
                   "data": str(data)},
        "import_floor_mb": public(floor),
        "honed": honed, "bare": bare,
        "ratio": ratio,
        "ratio_qlora_over_full": round(honed["qlora"]["peak_memory_mb"] / honed["full"]["peak_memory_mb"], 4),
        "ratio_above_floor": above if not args.gpu else None,
        "ratio_with_activation_checkpointing": {
            "qlora+ac / lora": round(honed["qlora+ac"]["peak_memory_mb"] / honed["lora"]["peak_memory_mb"], 4),
            "qlora+ac / lora+ac": round(honed["qlora+ac"]["peak_memory_mb"] / honed["lora+ac"]["peak_memory_mb"], 4),
        } if "qlora+ac" in honed else None,
        "ratio_bare": round(bare["qlora"]["peak_memory_mb"] / bare["lora"]["peak_memory_mb"], 4) if bare else None,
        "goal": f"qlora / lora <= {GOAL}", "met": ratio <= GOAL,
    }
    out = write_result("train_memory", result, args.out)
    log("peak MB honed: " + ", ".join(f"{m} {honed[m]['peak_memory_mb']:.0f}" for m in honed) +
        f"; qlora/lora {ratio} (above the ~{floor_lora:.0f} MB import floor: {above}) (goal <= {GOAL}: "
        f"{'met' if result['met'] else 'NOT met'}) → {out}")


if __name__ == "__main__":
    main()
