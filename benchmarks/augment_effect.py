"""What paraphrase augmentation does to held-out figures: the demo's LoRA trained on a small ICD-10-CM set as read,
and on the same set grown by paraphrases (`data.augment`), both scored on the same validation questions.

    .venv/bin/python benchmarks/augment_effect.py                     # 300 records, 2 paraphrases each, 60 steps
    .venv/bin/python benchmarks/augment_effect.py --records 150 --steps 30 --quick
    .venv/bin/python benchmarks/augment_effect.py --keep-unchecked    # → augment_effect_unchecked.json

Each arm runs prepare → train → eval in a fresh process with its own local Ray (2 CPUs), from
jobs/prepare_augment_icd10.yaml (augmentation on or off), jobs/train_lora.yaml and the eval defaults. Both arms
train the same number of steps: augmentation changes what the steps see, not how many there are. Validation is
the same in both (paraphrases keep their source's group and never reach validation), so the figures compare
directly. Writes `benchmarks/results/augment_effect.json`; the goal (augmented token F1 ≥ plain) is a question
the run answers, not a claim.
"""

from __future__ import annotations

import os
from pathlib import Path

from harness import ROOT, WORK, Measured, at_least, log, main, public, run_process

FIGURES = ("exact_match", "token_f1", "rouge_l", "loss/icd10")


def options(parser) -> None:
    parser.add_argument("--records", type=int, default=300, help="ICD-10-CM records read (max_records)")
    parser.add_argument("--variants", type=int, default=2, help="paraphrases per training record")
    parser.add_argument("--steps", type=int, default=60, help="training steps of each arm")
    parser.add_argument("--questions", type=int, default=100, help="validation questions answered per arm")
    parser.add_argument("--keep-unchecked", action="store_true",
                        help="turn off augment.require_question and require_numbers: the embedded 135M model's "
                             "paraphrases fail both checks, so with them on its augmented set equals the plain one")


def measure(args) -> Measured:
    arms = {}
    for arm in ("plain", "augmented"):
        log(f"{arm}: prepare → train → eval ...")
        spec = {"arm": arm, "records": args.records, "variants": args.variants, "steps": args.steps,
                "questions": args.questions, "work": str(WORK / "augment_effect" / arm),
                "checks": not args.keep_unchecked}
        arms[arm] = {k: v for k, v in public(run_process(__file__, "arm", spec, f"augment-{arm}",
                                                         env=dict(os.environ), timeout=7200)).items()
                     if k not in ("proc", "log")}
        log(f"  {arms[arm]['tuned']}")
    plain, augmented = arms["plain"]["tuned"], arms["augmented"]["tuned"]
    change = {k: round(augmented[k] - plain[k], 4) for k in FIGURES if k in plain and k in augmented}
    return Measured("demo LoRA on a small ICD-10-CM set, with and without paraphrase augmentation (same steps, same "
                    "validation questions); held-out exact match, token F1, ROUGE-L of each adapter",
                    {"arms": arms, "augmented_minus_plain": change},
                    [at_least("augmented − plain token F1", change.get("token_f1"), 0.0)])


def arm_main(spec: dict) -> dict:
    """One arm in this process: prepare (augmentation on or off) → LoRA → eval, on a local Ray of 2 CPUs."""
    import ray

    from honed.config import EvalConfig, PrepareConfig, TrainConfig, load_config
    from honed.data.pipeline import prepare
    from honed.eval.evaluate import evaluate
    from honed.runtime import _quiet_data_logs
    from honed.train.trainer import train

    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    _quiet_data_logs()
    work = Path(spec["work"])
    data = load_config(PrepareConfig, ROOT / "jobs" / "prepare_augment_icd10.yaml", [
        f"output_dir={work / 'data'}", f"data.sources.0.max_records={spec['records']}",
        f"data.augment.enabled={spec['arm'] == 'augmented'}", f"data.augment.variants={spec['variants']}",
        f"data.augment.require_question={spec['checks']}", f"data.augment.require_numbers={spec['checks']}"])
    manifest = prepare(data)
    train_cfg = load_config(TrainConfig, ROOT / "jobs" / "train_lora.yaml", [
        f"data_dir={work / 'data'}", f"output_dir={work / 'train'}", f"optim.max_steps={spec['steps']}",
        "scaling.num_workers=2", "scaling.cpus_per_worker=0.5", f"name=augment-{spec['arm']}"])
    metrics = train(train_cfg)
    scores = evaluate(EvalConfig(model=data.model, adapter=str(work / "train" / "adapter"), data_dir=str(work / "data"),
                                 output_dir=str(work / "eval"), generate_examples=spec["questions"],
                                 decontamination=False))
    ray.shutdown()
    return {"counts": manifest["counts"]["by_source"]["icd10"], "augment": manifest["augment"],
            "train_rows": manifest["shards"]["train_rows"], "phase_seconds": manifest["phase_seconds"],
            "train_final": {k: v for k, v in metrics.items() if isinstance(v, (int, float))},
            "base": scores["scores"]["base"], "tuned": scores["scores"]["tuned"]}


if __name__ == "__main__":
    main("augment_effect", __doc__, measure, options=options, quick={"records": 120, "steps": 20, "questions": 40},
         children={"arm": arm_main},
         file_name=lambda args: "augment_effect_unchecked" if args.keep_unchecked else "augment_effect")
