"""Useful (non-pad) tokens per second with packing vs padding, on the demo corpus, through honed.

    .venv/bin/python benchmarks/packing.py            # 10 steps x 2 repeats each + 16 interleaved (~20 min)
    .venv/bin/python benchmarks/packing.py --quick    # 4 steps x 1 repeat + 4 interleaved

The demo corpus (jobs/prepare_icd10.yaml) is prepared twice (cached under /tmp/honed-bench-train):
  padded        data.pack off, optim.padding_free false: one example a row, each batch right-padded to its
                longest row (the baseline: what a padding collator does)
  packed        data.pack.seq_len 512: examples concatenated into 512-token rows, position ids restarting per
                example; run padding-free (optim.padding_free true: attention per example, padding tail dropped)
  padding_free  optim.padding_free true on unpacked data: each batch's examples back to back in one row
and the same LoRA job (SmolLM2-135M-Instruct, r 16, fp32, 1 worker, 1 thread, lr 2e-3, the same number of
steps, batches in shard order) trains on each: padded and padding_free with batch 8 (~530 non-pad tokens a
step), packed with batch 1 (~485 a step), so a step holds about the same number of real tokens. The figure is honed's own non-pad tokens/s
(efficiency.json), each run a fresh process, the order reversed every other repeat; the ratio is packed /
padded per repeat and its median; `best_steps` compares the fastest third of each side's steps (pooled over
repeats), which other jobs on a shared machine disturb least. `upper_bound_from_padding_alone` is what
packing could gain if it cost nothing else: 1 / (1 - padding fraction of the padded side).

Then one process trains the three layouts interleaved (`_train_bench.interleaved_main`, `--interleaved-steps`
steps): at step s each layout trains its own batch s on the same model, the order rotating every step, so
all three meet the same machine within seconds of each other. Its ratios (`interleaved`) separate effects of
a few percent, which the fresh-process repeats on a shared machine cannot (their spread is ±10-30 %).
With `--variant-repeats N` (off by default: ~10 min) one more process times a forward + backward of the
first padded and the first packed batch from the HF model's own loss to honed's padded step
(`_train_bench.loss_variants`): what each costs per non-pad token when packed rows are run as transformers
runs them (one 512-position attention under a block-diagonal mask) and padded ones.
Writes `benchmarks/results/packing.json`.
"""

from __future__ import annotations

import argparse
import json
import time

from _train_bench import (
    LORA,
    MODEL,
    WARMUP_STEPS_EXCLUDED,
    WORK,
    best_rate,
    commit,
    honed_config,
    honed_step_rates,
    honed_wall_rate,
    log,
    machine_info,
    parse_args,
    prepared_dataset,
    public,
    resolve_model_path,
    run_process,
    spread,
    step_token_counts,
    write_result,
)

GOAL = 2.0
KINDS = ("padded", "packed", "padding_free")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="4 steps, 1 repeat, 1 variant pass")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=512, help="packed row length")
    parser.add_argument("--batch-size", type=int, default=8, help="padded batch (examples)")
    parser.add_argument("--packed-batch-size", type=int, default=1, help="packed batch (rows of --seq-len)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--interleaved-steps", type=int, default=16, help="steps per layout, in one process")
    parser.add_argument("--variant-repeats", type=int, default=0, help="HF-loss forward+backward timings (0: skip)")
    args = parse_args(parser, "packing", "CUDA, bf16", quick={"steps": 4, "repeats": 1, "interleaved_steps": 4})
    log_every = 1  # every step in the live log: per-step rates (`best_steps`)

    data = {"padded": prepared_dataset(), "packed": prepared_dataset(args.seq_len)}
    manifests = {k: json.loads((d / "manifest.json").read_text()) for k, d in data.items()}
    data["padding_free"] = data["padded"]
    batch = {"padded": args.batch_size, "packed": args.packed_batch_size, "padding_free": args.batch_size}
    flat = {"padded": False, "packed": True, "padding_free": True}
    tokens = {k: step_token_counts(d, batch[k], args.steps, flat=flat[k]) for k, d in data.items()}
    repeats = []
    for r in range(args.repeats):
        order = list(KINDS) if r % 2 == 0 else list(KINDS)[::-1]
        runs = {}
        for kind in order:
            tag = f"packing-{kind}-{r}"
            log(f"repeat {r + 1}/{args.repeats}: {kind} (batch {batch[kind]}, {args.steps} steps) ...")
            cfg = honed_config(data[kind], WORK / "runs" / tag, method="lora", steps=args.steps, batch_size=batch[kind],
                               threads=args.threads, gpu=args.gpu, log_every=log_every,
                               extra={"optim.padding_free": flat[kind]})
            run = run_process("honed", {"config": cfg, "threads": args.threads}, tag)
            e = run["efficiency"]
            runs[kind] = {"nonpad_tokens_per_s": e["nonpad_tokens_per_s"], "tokens_per_s": e["tokens_per_s"],
                          "padding_fraction": e["padding_fraction"], "step_time_s": e["step_time_s"],
                          "measured_steps": e["measured_steps"], "labelled_tokens": e["labelled_tokens"],
                          "wall": honed_wall_rate(run, tokens[kind]), "final_loss": run["final_loss"],
                          "step_rates": honed_step_rates(run, tokens[kind]),
                          "peak_memory_mb": e["peak_memory_mb"],
                          "loadavg_1min_before_after": run["loadavg_1min_before_after"]}
            log(f"  {kind}: {e['nonpad_tokens_per_s']:.1f} non-pad tok/s (padding {e['padding_fraction']:.1%})")
        ratio = round(runs["packed"]["nonpad_tokens_per_s"] / runs["padded"]["nonpad_tokens_per_s"], 4)
        ratio_free = round(runs["padding_free"]["nonpad_tokens_per_s"] / runs["padded"]["nonpad_tokens_per_s"], 4)
        walls = [runs[k]["wall"] for k in ("packed", "padded")]
        cpu_ratio = None
        if all(w and "nonpad_tokens_per_worker_cpu_s" in w for w in walls):
            cpu_ratio = round(walls[0]["nonpad_tokens_per_worker_cpu_s"] / walls[1]["nonpad_tokens_per_worker_cpu_s"], 4)
        repeats.append({"order": order, **runs, "ratio_packed_over_padded": ratio,
                        "ratio_padding_free_over_padded": ratio_free,
                        "ratio_per_worker_cpu_s": cpu_ratio})
        log(f"  packed/padded {ratio} (per worker CPU-s {cpu_ratio}); padding-free/padded {ratio_free}")

    log(f"the three layouts interleaved in one process ({args.interleaved_steps} steps each) ...")
    arms = {k: {"data_dir": str(data[k]), "batch_size": batch[k], "flat": flat[k]} for k in KINDS}
    mixed = public(run_process("interleaved", {"model_path": resolve_model_path(), "threads": args.threads,
                                               "gpu": args.gpu, "steps": args.interleaved_steps, "arms": arms},
                               "packing-interleaved"))
    interleaved = {"what": "one process, one model; at step s each layout trains its own batch s, order rotating; "
                           "non-pad tokens/s over the measured steps",
                   "steps": args.interleaved_steps,
                   **{k: {"nonpad_tokens_per_s": v["nonpad_tokens_per_s"], "step_rates": v["step_rates"]}
                      for k, v in mixed["arms"].items()}}
    for kind in ("packed", "padding_free"):
        paired = [a / b for a, b in zip(mixed["arms"][kind]["step_rates"], mixed["arms"]["padded"]["step_rates"])]
        interleaved[f"{kind}_over_padded"] = round(mixed["arms"][kind]["nonpad_tokens_per_s"]
                                                   / mixed["arms"]["padded"]["nonpad_tokens_per_s"], 4)
        interleaved[f"{kind}_over_padded_per_step"] = spread(paired)
    log(f"  interleaved: packed/padded {interleaved['packed_over_padded']}, "
        f"padding-free/padded {interleaved['padding_free_over_padded']}")

    variants, what_if, per_variant_ratio = None, {}, {}
    if args.variant_repeats:
        log("loss variants on the first padded and packed batch ...")
        variants = public(run_process("variants", {
            "method": "lora", "model_path": resolve_model_path(), "threads": args.threads, "gpu": args.gpu,
            "repeats": args.variant_repeats,
            "batches": {k: [str(data[k]), batch[k]] for k in ("padded", "packed")}}, "packing-variants"))
        for kind in ("padded", "packed"):
            v = variants[kind]
            what_if[kind] = {name: round(v["nonpad_tokens"] / s, 2) for name, s in v["fwd_bwd_seconds_median"].items()}
        per_variant_ratio = {name: round(what_if["packed"][name] / what_if["padded"][name], 4)
                             for name in what_if["packed"]}

    ratios = [r["ratio_packed_over_padded"] for r in repeats]
    ratio = spread(ratios)["median"]
    best = {k: best_rate([x for r in repeats for x in r[k]["step_rates"]]) for k in KINDS}
    best_ratio = round(best["packed"] / best["padded"], 4) if best["packed"] and best["padded"] else None
    padding = [r["padded"]["padding_fraction"] for r in repeats]
    ratios_free = [r["ratio_padding_free_over_padded"] for r in repeats]
    result = {
        "benchmark": "packing",
        "what": "LoRA on SmolLM2-135M-Instruct through honed: non-pad tokens/s on the demo corpus packed into "
                f"{args.seq_len}-token rows (run padding-free) vs one example a row, right-padded per batch; and "
                "honed's padding-free batches (optim.padding_free) of the unpacked rows",
        "quick": args.quick, "date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine_info(), **commit(),
        "config": {"model": MODEL, "method": "lora", "lora": LORA, "steps": args.steps,
                   "warmup_steps_excluded": WARMUP_STEPS_EXCLUDED, "batch_padded": args.batch_size,
                   "batch_packed": args.packed_batch_size, "seq_len": args.seq_len, "threads": args.threads,
                   "gpu": args.gpu, "repeats": args.repeats, "data": {k: str(d) for k, d in data.items()},
                   "nonpad_tokens_per_step": {k: [t["nonpad"] for t in v] for k, v in tokens.items()},
                   "labelled_tokens_per_step": {k: [t["labelled"] for t in v] for k, v in tokens.items()}},
        "corpus": {"train_examples": manifests["padded"]["tokens"]["train"]["examples"],
                   "mean_tokens": manifests["padded"]["tokens"]["train"]["mean"],
                   "max_tokens": manifests["padded"]["tokens"]["train"]["max"],
                   "packing": manifests["packed"]["packing"],
                   "padded_batch_nonpad_fraction (measured)": round(1 - spread(padding)["median"], 4)},
        "repeats": repeats,
        "ratio": ratio, "ratio_spread": spread(ratios),
        "best_steps": {"fraction": "fastest third of the measured steps, all repeats pooled", **best,
                       "ratio": best_ratio},
        "ratio_per_worker_cpu_s_spread": spread([r["ratio_per_worker_cpu_s"] for r in repeats
                                                 if r["ratio_per_worker_cpu_s"]]),
        "upper_bound_from_padding_alone": round(1 / (1 - spread(padding)["median"]), 4),
        "padding_free": {"ratio_over_padded_spread": spread(ratios_free),
                         "what": "the unpacked rows with optim.padding_free true: each "
                                 "batch's examples in one row, attention per example, no padding"},
        "interleaved": interleaved,
        "loss_variants": variants, "nonpad_tokens_per_fwd_bwd_s": what_if,
        "packed_over_padded_by_loss_variant": per_variant_ratio,
        "goal": f">= {GOAL}", "met": ratio >= GOAL,
    }
    out = write_result("packing", result, args.out)
    log(f"packed/padded non-pad tokens/s: median {ratio} {ratios}; fastest third of steps {best_ratio}; padding in the padded batches "
        f"{spread(padding)['median']:.1%} (bound from padding alone {result['upper_bound_from_padding_alone']}); "
        f"interleaved in one process: packed/padded {interleaved['packed_over_padded']}, padding-free/padded "
        f"{interleaved['padding_free_over_padded']}; by loss variant (fwd+bwd) {per_variant_ratio} (goal >= {GOAL}: {'met' if result['met'] else 'NOT met'}) "
        f"→ {out}")


if __name__ == "__main__":
    main()
