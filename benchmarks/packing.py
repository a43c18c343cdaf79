"""Useful (non-pad) tokens per second with packing vs padding, on the demo corpus or a mixed-length one, through
honed.

    .venv/bin/python benchmarks/packing.py            # 10 steps x 2 repeats each + 16 interleaved (~20 min)
    .venv/bin/python benchmarks/packing.py --quick    # 4 steps x 1 repeat + 4 interleaved
    .venv/bin/python benchmarks/packing.py --corpus mixed --steps 6 --repeats 1 --interleaved-steps 6   # ~15 min

With `--corpus mixed` (`train_runs.mixed_corpus_config`: ICD-10 pairs and KJV text windows of ~20 to 1,024
tokens in random order, data.max_seq_len 1024) the layouts are padded and padding_free (no packed prepare: the
padding-free batches are honed's default) and the result goes to benchmarks/results/packing_mixed.json with the
corpus's length distribution and padding fraction (`length_profile`), which bounds the gain.

The demo corpus (jobs/prepare_icd10.yaml) is prepared twice (cached under /tmp/honed-bench-train):
  padded        data.pack off, optim.padding_free false: one example a row, each batch right-padded to its
                longest row (the baseline: what a padding collator does)
  packed        data.pack.seq_len 512: examples concatenated into 512-token rows, position ids restarting per
                example; run padding-free (optim.padding_free true: attention per example, padding tail dropped)
  padding_free  optim.padding_free true on unpacked data: each batch's examples back to back in one row
and the same LoRA job (SmolLM2-135M-Instruct, r 16, fp32, 1 worker, 1 thread, lr 2e-3, the same number of
steps, batches in shard order) trains on each: padded and padding_free with batch 8 (~530 non-pad tokens a
step), packed with batch 1 (~485 a step), so a step holds about the same number of real tokens. The figure
is honed's own non-pad tokens/s (efficiency.json), each run a fresh process, the order reversed every other
repeat; the ratio is packed / padded per repeat and its median; `best_steps` compares the fastest third of
each side's steps (pooled over repeats), which other jobs on a shared machine disturb least.
`upper_bound_from_padding_alone` is what packing could gain if it cost nothing else: 1 / (1 - padding
fraction of the padded side).

Then one process trains the three layouts interleaved (benchmarks/train_loops.py `interleaved`,
`--interleaved-steps` steps): at step s each layout trains its own batch s on the same model, the order
rotating every step, so all three meet the same machine within seconds of each other. Its ratios
(`interleaved`) separate effects of a few percent, which the fresh-process repeats on a shared machine cannot
(their spread is ±10-30 %). With `--variant-repeats N` (off by default: ~10 min) one more process times a
forward + backward of the first padded and the first packed batch from the HF model's own loss to honed's
padded step (`step_breakdown.loss_variants`): what each costs per non-pad token when packed rows are run as
transformers runs them (one 512-position attention under a block-diagonal mask) and padded ones.
Writes `benchmarks/results/packing.json`.
"""

from __future__ import annotations

from harness import MODEL, Measured, alternating, at_least, best_steps, log, main, present, public, ratio, spread
from train_runs import (
    LORA,
    MIXED,
    WARMUP_STEPS_EXCLUDED,
    add_run_options,
    honed_step_rates,
    honed_wall_rate,
    length_profile,
    model_path,
    prepared_dataset,
    run_honed,
    start,
    step_token_counts,
)

GOAL = 2.0
KINDS = {"demo": ("padded", "packed", "padding_free"), "mixed": ("padded", "padding_free")}  # by --corpus
FLAT = {"padded": False, "packed": True, "padding_free": True}  # optim.padding_free of each layout


def options(parser) -> None:
    add_run_options(parser, steps=10)
    parser.add_argument("--corpus", choices=tuple(KINDS), default="demo", help="demo: ICD-10 pairs, ~66 tokens "
                        "each; mixed: ICD-10 pairs and text windows, ~20-1,024 tokens")
    parser.add_argument("--seq-len", type=int, default=512, help="packed row length")
    parser.add_argument("--packed-batch-size", type=int, default=1, help="packed batch (rows of --seq-len)")
    parser.add_argument("--interleaved-steps", type=int, default=16, help="steps per layout, in one process")
    parser.add_argument("--variant-repeats", type=int, default=0, help="HF-loss forward+backward timings (0: skip)")


def measure(args) -> Measured:
    from honed.artifacts import read_manifest

    kinds = KINDS[args.corpus]
    subject = kinds[1]  # packed on the demo corpus, padding_free on the mixed one
    data = {"padded": prepared_dataset(corpus=args.corpus)}
    if "packed" in kinds:
        data["packed"] = prepared_dataset(args.seq_len, corpus=args.corpus)
    manifests = {k: read_manifest(d) for k, d in data.items()}
    data["padding_free"] = data["padded"]
    batch = {"padded": args.batch_size, "packed": args.packed_batch_size, "padding_free": args.batch_size}
    steps = max(args.steps, args.interleaved_steps)
    tokens = {k: step_token_counts(data[k], batch[k], steps, flat=FLAT[k]) for k in kinds}

    def run(kind: str, r: int) -> dict:
        honed = run_honed(f"packing-{kind}-{r}", data[kind], args, batch_size=batch[kind], log_every=1,
                          extra={"optim.padding_free": FLAT[kind]})  # log_every 1: per-step rates (`best_steps`)
        e = honed["efficiency"]
        log(f"  {kind}: {e['nonpad_tokens_per_s']:.1f} non-pad tok/s (padding {e['padding_fraction']:.1%})")
        return layout_figures(honed, tokens[kind])

    repeats = []
    for order, runs in alternating(args.repeats, kinds, run):
        rep = compare(order, runs)
        repeats.append(rep)
        log(f"  packed/padded {rep.get('ratio_packed_over_padded')} (per worker CPU-s "
            f"{rep['ratio_per_worker_cpu_s']}); padding-free/padded {rep['ratio_padding_free_over_padded']}")
    interleaved = interleaved_layouts(data, batch, args, kinds)
    variants, what_if, per_variant_ratio = (loss_variants(data, batch, args) if args.variant_repeats and
                                            "packed" in kinds else (None, {}, {}))

    ratios = [r[f"ratio_{subject}_over_padded"] for r in repeats]
    if repeats:
        median, source = spread(ratios)["median"], "median over repeats"
        padding = spread([r["padded"]["padding_fraction"] for r in repeats])["median"]
    else:  # --repeats 0: the interleaved layouts alone (one process: no Ray, robust to other jobs' load)
        median, source = interleaved.get(f"{subject}_over_padded"), "one process, layouts interleaved"
        measured = tokens["padded"][WARMUP_STEPS_EXCLUDED:args.interleaved_steps]
        padding = 1 - sum(t["nonpad"] for t in measured) / sum(t["fed"] for t in measured)
    goal = at_least(f"{args.corpus} corpus: {subject} / padded non-pad tokens/s, {source}", median, GOAL)
    figures = {
        "config": {"model": MODEL, "method": "lora", "lora": LORA, "steps": args.steps,
                   "warmup_steps_excluded": WARMUP_STEPS_EXCLUDED, "batch_padded": args.batch_size,
                   "batch_packed": args.packed_batch_size, "seq_len": args.seq_len, "threads": args.threads,
                   "gpu": args.gpu, "repeats": args.repeats, "data": {k: str(d) for k, d in data.items()},
                   "corpus": args.corpus, "layouts": kinds, "subject": subject,
                   "nonpad_tokens_per_step": {k: [t["nonpad"] for t in v] for k, v in tokens.items()},
                   "labelled_tokens_per_step": {k: [t["labelled"] for t in v] for k, v in tokens.items()}},
        "corpus": {"train_examples": manifests["padded"]["tokens"]["train"]["examples"],
                   "mean_tokens": manifests["padded"]["tokens"]["train"]["mean"],
                   "max_tokens": manifests["padded"]["tokens"]["train"]["max"],
                   "packing": manifests["packed"]["packing"] if "packed" in kinds else None,
                   "padded_batch_nonpad_fraction (measured)": round(1 - padding, 4),
                   "length_profile": length_profile(data["padded"], args.batch_size, args.steps),
                   **({"mixed_corpus": MIXED} if args.corpus == "mixed" else {})},
        "repeats": repeats,
        "ratio": median, "ratio_spread": spread(ratios),
        "best_steps": best_steps({k: [x for r in repeats for x in r[k]["step_rates"]] for k in kinds},
                                 subject, "padded"),
        "ratio_per_worker_cpu_s_spread": spread(present(repeats, "ratio_per_worker_cpu_s")),
        "upper_bound_from_padding_alone": round(1 / (1 - padding), 4),
        "padding_free": {"ratio_over_padded_spread": spread([r["ratio_padding_free_over_padded"] for r in repeats]),
                         "what": "the unpacked rows with optim.padding_free true: each "
                                 "batch's examples in one row, attention per example, no padding"},
        "interleaved": interleaved,
        "loss_variants": variants, "nonpad_tokens_per_fwd_bwd_s": what_if,
        "packed_over_padded_by_loss_variant": per_variant_ratio,
        "goal": goal["goal"], "met": goal["met"],
    }
    log(f"{subject}/padded non-pad tokens/s: median {median} {ratios}; padding in the padded batches {padding:.1%} "
        f"(bound from padding alone {figures['upper_bound_from_padding_alone']}); by loss variant (fwd+bwd) "
        f"{per_variant_ratio}")
    what = (f"the demo corpus packed into {args.seq_len}-token rows (run padding-free) vs one example a row, "
            "right-padded per batch; and honed's padding-free batches (optim.padding_free) of the unpacked rows"
            if args.corpus == "demo" else "the mixed-length corpus (~20-1,024 tokens) in honed's padding-free "
            "batches (optim.padding_free, its default) vs one example a row, right-padded per batch")
    return Measured(f"LoRA on SmolLM2-135M-Instruct through honed: non-pad tokens/s on {what}", figures, [goal])


def layout_figures(run: dict, tokens: list[dict]) -> dict:
    e = run["efficiency"]
    return {"nonpad_tokens_per_s": e["nonpad_tokens_per_s"], "tokens_per_s": e["tokens_per_s"],
            "padding_fraction": e["padding_fraction"], "step_time_s": e["step_time_s"],
            "measured_steps": e["measured_steps"], "labelled_tokens": e["labelled_tokens"],
            "wall": honed_wall_rate(run, tokens), "final_loss": run["final_loss"],
            "step_rates": honed_step_rates(run, tokens), "peak_memory_mb": e["peak_memory_mb"],
            "loadavg_1min_before_after": run["loadavg_1min_before_after"]}


def compare(order: list[str], runs: dict) -> dict:
    """One repeat: each layout / padded (packed, padding-free), by wall-clock rate, and the first of them
    (`KINDS`' subject) / padded per worker CPU-second."""
    subject = "packed" if "packed" in runs else "padding_free"
    mine, padded = runs[subject]["wall"] or {}, runs["padded"]["wall"] or {}
    padded_rate = runs["padded"]["nonpad_tokens_per_s"]
    return {"order": order, **runs,
            **{f"ratio_{k}_over_padded": ratio(runs[k]["nonpad_tokens_per_s"], padded_rate)
               for k in runs if k != "padded"},
            "ratio_per_worker_cpu_s": ratio(mine.get("nonpad_tokens_per_worker_cpu_s"),
                                            padded.get("nonpad_tokens_per_worker_cpu_s"))}


def interleaved_layouts(data: dict, batch: dict, args, kinds: tuple[str, ...]) -> dict:
    """The layouts trained step by step in turn in one process: same-machine-state ratios."""
    if not args.interleaved_steps:
        return {}
    log(f"the layouts interleaved in one process ({args.interleaved_steps} steps each) ...")
    arms = {k: {"data_dir": str(data[k]), "batch_size": batch[k], "flat": FLAT[k]} for k in kinds}
    mixed = public(start("interleaved", {"model_path": model_path(), "threads": args.threads, "gpu": args.gpu,
                                         "steps": args.interleaved_steps, "arms": arms}, "packing-interleaved"))["arms"]
    out = {"what": "one process, one model; at step s each layout trains its own batch s, order rotating; "
                   "non-pad tokens/s over the measured steps",
           "steps": args.interleaved_steps,
           **{k: {"nonpad_tokens_per_s": v["nonpad_tokens_per_s"], "step_rates": v["step_rates"]}
              for k, v in mixed.items()}}
    for kind in kinds[1:]:
        paired = [a / b for a, b in zip(mixed[kind]["step_rates"], mixed["padded"]["step_rates"])]
        out[f"{kind}_over_padded"] = ratio(mixed[kind]["nonpad_tokens_per_s"], mixed["padded"]["nonpad_tokens_per_s"])
        out[f"{kind}_over_padded_per_step"] = spread(paired)
    log(f"  interleaved: packed/padded {out.get('packed_over_padded')}, "
        f"padding-free/padded {out['padding_free_over_padded']}")
    return out


def loss_variants(data: dict, batch: dict, args) -> tuple[dict, dict, dict]:
    """Forward + backward of the first padded and packed batch per loss variant; non-pad tokens per second of
    each, and packed / padded per variant."""
    log("loss variants on the first padded and packed batch ...")
    variants = public(start("variants", {
        "method": "lora", "model_path": model_path(), "threads": args.threads, "gpu": args.gpu,
        "repeats": args.variant_repeats, "batches": {k: [str(data[k]), batch[k]] for k in ("padded", "packed")}},
        "packing-variants"))
    what_if = {kind: {name: round(variants[kind]["nonpad_tokens"] / s, 2)
                      for name, s in variants[kind]["fwd_bwd_seconds_median"].items()} for kind in ("padded", "packed")}
    per_variant = {name: round(what_if["packed"][name] / what_if["padded"][name], 4) for name in what_if["packed"]}
    return variants, what_if, per_variant


if __name__ == "__main__":
    main("packing", __doc__, measure, options=options, quick={"steps": 4, "repeats": 1, "interleaved_steps": 4},
         repeats=2, gpu="CUDA, bf16", file_name=lambda a: "packing" if a.corpus == "demo" else f"packing_{a.corpus}")
