"""Peak memory of full / lora / qlora fine-tuning of the same model on the same batch.

    .venv/bin/python benchmarks/train_memory.py            # 6 variants + 3 honed runs (~12 min on 2 CPUs)
    .venv/bin/python benchmarks/train_memory.py --quick    # 2 steps before the measured one, no honed runs

SmolLM2-135M-Instruct, batch 8 of the prepared demo corpus, 1 thread; full: fp32 master weights + fused
AdamW; lora: frozen fp32 base (CPU; bf16 on GPU) + r 16 adapters on all linear layers; qlora: the same
adapters over an NF4 double-quantised base (bitsandbytes), compute in fp32 on CPU (bf16 on GPU).

The figure (`peak_mb`) is the peak of bytes held in tensors during a training step, the CPU counterpart of
CUDA's max allocated (`step_breakdown.tensor_memory`): parameters and buffers as stored + optimizer state +
the highest running total of the step's own allocations (activations, saved tensors, gradients,
temporaries), measured op by op with torch.profiler in a fresh process that builds the model with honed's
builder and trains with honed's optimizer and loss (benchmarks/train_loops.py `bare`, kernels "honed"); on a
GPU it is CUDA max allocated. Variants:
  full, lora, qlora           as honed runs them by default
  lora+ac, qlora+ac           with `method.activation_checkpointing: true` (each block recomputed in backward)
  qlora+ac+adamw_8bit         and bitsandbytes' 8-bit AdamW for the adapters (`optim.optimizer: adamw_8bit`)
The goal compares qlora with lora-fp32 on the same settings (with and without activation checkpointing).

Process RSS is reported too, from honed's own runs (Ray Train worker: `peak_memory_mb` in efficiency.json,
max RSS; not with --quick) and an import floor, but it does not compare methods on this machine: it counts
whatever pages of the checkpoint file a loader touched (qlora reads every weight to quantise it; lora maps
them lazily), the interpreter and the libraries (~530 MB before any model).
Writes `benchmarks/results/train_memory.json`.
"""

from __future__ import annotations

from harness import MODEL, Measured, at_most, log, main, public
from train_runs import LORA, add_run_options, prepared_dataset, run_honed, run_loop, start

GOAL = 0.45
METHODS = ("full", "lora", "qlora")
VARIANTS = {  # name: (method, activation checkpointing, optimizer)
    "full": ("full", False, "adamw"), "lora": ("lora", False, "adamw"), "qlora": ("qlora", False, "adamw"),
    "lora+ac": ("lora", True, "adamw"), "qlora+ac": ("qlora", True, "adamw"),
    "qlora+ac+adamw_8bit": ("qlora", True, "adamw_8bit"),
}


LONG = (1024, 4096)  # tokens per example of the long-text case, every position labelled
UNCHUNKED = 1 << 62  # a logit budget no batch reaches: the whole-vocabulary projection at once, as before


def options(parser) -> None:
    add_run_options(parser, steps=3, steps_help="steps before the measured one")
    parser.add_argument("--no-honed", action="store_true", help="skip honed's Ray Train runs (process RSS)")
    parser.add_argument("--long-only", action="store_true", help="only the long-text case (chunked loss)")


def measure(args) -> Measured:
    data = prepared_dataset()
    long = long_text(data, args)
    if args.long_only:
        return Measured("peak tensor memory of a LoRA step on long text examples (every position labelled), the LM "
                        "loss scored whole vs in chunks (honed.train.losses.LOGIT_BUDGET)", {"long_text": long},
                        long_goals(long))
    tensors = {variant: tensor_peak(variant, data, args) for variant in VARIANTS}
    process_rss = None if args.no_honed else honed_rss(data, args)

    def ratio(a: str, b: str) -> float:
        return round(tensors[a]["peak_mb"] / tensors[b]["peak_mb"], 4)

    ratios = {"qlora / lora": ratio("qlora", "lora"), "qlora+ac / lora+ac": ratio("qlora+ac", "lora+ac"),
              "qlora+ac+adamw_8bit / lora+ac": ratio("qlora+ac+adamw_8bit", "lora+ac"),
              "qlora / full": ratio("qlora", "full"), "lora / full": ratio("lora", "full")}
    goal = at_most("qlora / lora-fp32 peak tensor memory, same settings (best of with and without activation "
                   "checkpointing)", min(ratios["qlora+ac / lora+ac"], ratios["qlora / lora"]), GOAL)
    figures = {
        "config": {"model": MODEL, "steps_before_measured": args.steps, "batch_size": args.batch_size,
                   "threads": args.threads, "gpu": args.gpu, "lora": LORA,
                   "qlora_quant": "nf4, double quant, compute dtype auto", "data": str(data),
                   "variants": {k: dict(zip(("method", "activation_checkpointing", "optimizer"), v))
                                for k, v in VARIANTS.items()}},
        "tensor_peak": tensors,
        "ratios": ratios,
        "process_rss": process_rss,
        "goal": f"qlora / lora-fp32 <= {GOAL} (same settings)", "met": goal["met"],
    }
    log("peak tensor MB: " + ", ".join(f"{k} {v['peak_mb']:.0f}" for k, v in tensors.items()) + f"; ratios {ratios}")
    figures["long_text"] = long
    return Measured("peak tensor memory of a training step (parameters + buffers + optimizer state + the step's "
                    "peak allocations; CUDA max allocated on GPU) for full / lora / qlora on SmolLM2-135M-Instruct, "
                    f"batch {args.batch_size}, each in a fresh process with honed's model builder, optimizer and loss",
                    figures, [goal, *long_goals(long)])


def long_text(data, args) -> dict:
    """LoRA, batch 1, examples of 1,024 and 4,096 tokens all labelled: the step's peak tensor memory with the loss
    over the whole vocabulary at once (before) and in chunks of positions (honed's default, after)."""
    out = {}
    for length in LONG:
        for name, budget in (("whole", UNCHUNKED), ("chunked", None)):
            log(f"long text {length} tokens, loss {name}: {args.steps} steps + 1 measured ...")
            b = public(run_loop("bare", f"memory-long-{length}-{name}", data, args, method="lora", lr=2e-3,
                                kernels="honed", batch_size=1, synthetic_length=length, tensor_memory=True,
                                **({"logit_budget": budget} if budget else {})))
            t = b["tensor_memory"]
            out[f"{length}/{name}"] = {"peak_mb": t["peak_mb"], "step_peak_mb": t.get("step_peak_mb"),
                                       "held_mb": t["held_mb"], "step_time_s": b["step_time_s"],
                                       "process_max_rss_mb": b["peak_memory_mb"]}
            log(f"  peak {t['peak_mb']:.0f} MB (step {t.get('step_peak_mb', 0):.0f} MB)")
    return out


def long_goals(long: dict) -> list[dict]:
    """Chunking keeps a 4x longer example's step peak (above the model and optimizer it holds) growing at most
    linearly, and never above the whole-vocabulary loss."""
    after = {n: long[f"{n}/chunked"]["peak_mb"] - long[f"{n}/chunked"]["held_mb"] for n in LONG}
    return [at_most("4,096-token / 1,024-token step peak with the chunked loss", round(after[4096] / after[1024], 3),
                    4.0),
            at_most("4,096-token step peak, chunked / whole-vocabulary loss",
                    round(long["4096/chunked"]["peak_mb"] / long["4096/whole"]["peak_mb"], 3), 1.0)]


def tensor_peak(variant: str, data, args) -> dict:
    """`args.steps` steps, then one under the profiler's memory accounting (`step_breakdown.tensor_memory`)."""
    method, ac, optimizer = VARIANTS[variant]
    log(f"{variant}: {args.steps} steps + 1 measured ...")
    b = public(run_loop("bare", f"memory-{variant.replace('+', '-')}", data, args, method=method,
                        lr=2e-5 if method == "full" else 2e-3, kernels="honed", activation_checkpointing=ac,
                        optimizer=optimizer, tensor_memory=True))
    t = b["tensor_memory"]
    log(f"  peak {t['peak_mb']:.0f} MB = held {t['held_mb']:.0f} + step {t.get('step_peak_mb', 0):.0f} "
        f"(parts {t['parts']}); process max RSS {b['peak_memory_mb']:.0f} MB")
    return {**t, "process_max_rss_mb": b["peak_memory_mb"], "step_time_s": b["step_time_s"],
            "trainable_params": b["trainable_params"], "total_params": b["total_params"]}


def honed_rss(data, args) -> dict:
    """The Ray Train worker's max RSS in honed's own run of each method, and the import floor."""
    floor = public(start("floor", {"bitsandbytes": True}, "memory-floor"))
    honed = {}
    for method in METHODS:
        log(f"honed {method}: process RSS ...")
        run = run_honed(f"memory-honed-{method}", data, args, method=method, steps=args.steps + 1,
                        lr=2e-5 if method == "full" else 2e-3, log_every=1, peak_flops=1e11)
        e = run["efficiency"]
        honed[method] = {"peak_memory_mb": e["peak_memory_mb"], "memory_kind": e["memory_kind"],
                         "rss_sampled_peak_mb": run["proc"]["rss_peak_mb"],
                         "rss_curve_s_mb": run["proc"]["rss_curve_s_mb"], "process_wall_s": run["process_wall_s"]}
        log(f"  {method}: worker max RSS {e['peak_memory_mb']:.0f} MB")
    return {"honed_worker": honed, "import_floor_mb": floor}


if __name__ == "__main__":
    main("train_memory", __doc__, measure, options=options, quick={"steps": 2, "no_honed": True},
         gpu="CUDA, bf16 compute; memory = CUDA max allocated")
