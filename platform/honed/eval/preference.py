"""Preference accuracy on held-out pairs: how often a model gives the chosen answer a higher log-probability than
the rejected one, for the base, an SFT adapter and a DPO adapter alike (no reference model involved).

    scores = preference_scores(model_path, "auto", pairs, {"sft": "runs/sft/adapter", "dpo": "runs/dpo/adapter"})

An answer's score is the summed log-probability of its tokens after the question, rendered with the training
template; `preference_accuracy` is the share of pairs where the chosen answer scores higher (ties count as
wrong), `logp_margin` the mean difference in nats. Summed log-probabilities favour the shorter answer, so
`preference_accuracy_per_token` compares per-token means as well. During DPO training the run's own
`reward_accuracy` measures the same against the reference model instead.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import torch

from honed.eval.samples import spread
from honed.train.dpo import collate_pairs, is_pair, object_column, pair_logps


def held_out_pairs(data_dir: str, limit: int | None = None) -> list[dict]:
    """The validation split's preference pairs (token ids as prepared), in a stable order."""
    columns = ["source", "group", "prompt", "chosen", "rejected", "input_ids", "labels", "rejected_input_ids",
               "rejected_labels"]
    table = pq.read_table(Path(data_dir) / "shards" / "val", columns=columns).to_pylist()
    pairs = sorted((r for r in table if is_pair(r["rejected_input_ids"])),
                   key=lambda r: (r["source"], r["group"], r["prompt"]))
    return pairs if limit is None else spread(pairs, limit)


@torch.no_grad()
def score_pairs(model, pairs: list[dict], pad_id: int, batch_size: int = 8) -> dict:
    """Preference accuracy (summed and per-token log-probabilities) and the mean log-prob margin."""
    summed, averaged = [], []
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i: i + batch_size]
        batch = {k: object_column([r[k] for r in chunk])
                 for k in ("input_ids", "labels", "rejected_input_ids", "rejected_labels")}
        inputs = collate_pairs(batch, pad_id, model.device)
        for average, out in ((False, summed), (True, averaged)):
            chosen, rejected = pair_logps(model, inputs, average=average)
            out += (chosen - rejected).tolist()
    n = max(len(summed), 1)
    return {"pairs": len(summed), "preference_accuracy": round(sum(d > 0 for d in summed) / n, 4),
            "preference_accuracy_per_token": round(sum(d > 0 for d in averaged) / n, 4),
            "logp_margin": round(sum(summed) / n, 4)}


def score_model(model_path: str, dtype: str, pairs: list[dict], adapter: str | None = None) -> dict:
    """Runs as a Ray task: one model (the base, or base + adapter) on the pairs."""
    from honed.models import load_model

    torch.set_num_threads(1)
    model, tokenizer = load_model(model_path, dtype, adapter=adapter)
    return score_pairs(model.eval(), pairs, tokenizer.pad_token_id)


def preference_scores(model_path: str, dtype: str, pairs: list[dict], adapters: dict[str, str]) -> dict[str, dict]:
    """`{"base": scores, <label>: scores, ...}`: the base and each adapter as its own Ray task."""
    import ray

    labels = ["base", *adapters]
    task = ray.remote(num_cpus=1)(score_model)
    refs = [task.remote(model_path, dtype, pairs, adapters.get(label)) for label in labels]
    return dict(zip(labels, ray.get(refs)))


def preference_table(scores: dict[str, dict]) -> str:
    lines = ["| model | pairs | preference accuracy | per-token accuracy | log-prob margin |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {label} | {s['pairs']} | {s['preference_accuracy']:.3f} | {s['preference_accuracy_per_token']:.3f} "
              f"| {s['logp_margin']:+.3f} |" for label, s in scores.items()]
    return "\n".join(lines)
