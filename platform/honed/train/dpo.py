"""Direct Preference Optimization: the loss, the pair log-probabilities it needs, and the reference model.

    policy_c, policy_r = pair_logps(module, collate_pairs(rows, pad_id, device))
    losses, chosen_rewards, rejected_rewards = preference_loss(policy_c, policy_r, ref_c, ref_r, beta=0.1)

A pair is one question with a chosen and a rejected answer (`honed prepare` keeps the chosen conversation in
`input_ids`/`labels` and the rejected one in `rejected_input_ids`/`rejected_labels`, labels on the final answer
only). Both answers run through the model in one right-padded batch (chosen rows first); an answer's
log-probability is the sum of its labelled tokens' log-probabilities (IPO: their mean).

With Δ = (log π(c) − log π_ref(c)) − (log π(r) − log π_ref(r)):
  sigmoid   −(1 − ε)·log σ(β·Δ) − ε·log σ(−β·Δ)     DPO (Rafailov et al. 2023); ε > 0: conservative DPO
  ipo       (Δ − 1/(2β))²                          IPO (Azar et al. 2023), on per-token mean log-probs
  hinge     max(0, 1 − β·Δ)                        SLiC-style hinge (Zhao et al. 2023)
The implicit rewards are β·(log π − log π_ref) of each answer; reward accuracy is the share of pairs whose
chosen reward beats the rejected one, the margin their mean difference.

The reference is the model training started from, computed in the same process without a second copy of the
base weights: the base with the trained adapter switched off, or, when training starts from an SFT adapter,
the base with a frozen copy of that adapter (peft adapter `reference`) selected per forward.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
import torch.nn.functional as F

from honed.artifacts import read_meta
from honed.config import DPOSettings
from honed.train.collate import collate
from honed.train.losses import lm_row_scores, scored_token_losses

REFERENCE_ADAPTER = "reference"
# Sums a rank accumulates for the metrics (all-reduced, then divided by `pairs`).
PAIR_STATS = ("pairs", "correct", "margin", "chosen", "rejected")


def is_pair(row_rejected_ids) -> bool:
    return row_rejected_ids is not None and len(row_rejected_ids) > 0


def object_column(values: list) -> np.ndarray:
    """A 1-D object array of token lists, as Ray Data hands them (np.array would stack equal lengths)."""
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out


def collate_pairs(batch: dict[str, np.ndarray], pad_id: int, device: torch.device) -> dict:
    """Chosen rows then rejected rows of a batch of pairs, right-padded into one batch (`pairs` = B)."""
    missing = [i for i, r in enumerate(batch["rejected_input_ids"]) if not is_pair(r)]
    if missing:
        sources = sorted({str(batch["source"][i]) for i in missing}) if "source" in batch else ["?"]
        raise ValueError(f"method dpo needs preference pairs; rows of source {', '.join(sources)} have no rejected "
                         "answer (prepare records with prompt/messages + chosen + rejected)")
    rows = {"input_ids": list(batch["input_ids"]) + list(batch["rejected_input_ids"]),
            "labels": list(batch["labels"]) + list(batch["rejected_labels"])}
    return collate(rows, pad_id, device) | {"pairs": len(batch["input_ids"])}


def pair_logps(model, inputs: dict, average: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities of the chosen and of the rejected answers ([B] each): sums over labelled tokens, or
    means with `average` (IPO)."""
    losses, rows = scored_token_losses(model, inputs)
    n = inputs["labels"].shape[0]
    logps = torch.zeros(n, dtype=losses.dtype, device=losses.device).index_add(0, rows, -losses)
    if average:
        logps = logps / torch.bincount(rows, minlength=n).clamp(min=1).to(logps.dtype)
    b = inputs["pairs"]
    return logps[:b], logps[b:]


def preference_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
                    ref_rejected: torch.Tensor, beta: float, loss: str = "sigmoid",
                    label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair losses and the chosen and rejected implicit rewards (detached), see the module docstring."""
    chosen_ratio, rejected_ratio = policy_chosen - ref_chosen, policy_rejected - ref_rejected
    delta = chosen_ratio - rejected_ratio
    if loss == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * delta) - label_smoothing * F.logsigmoid(-beta * delta)
    elif loss == "ipo":
        losses = (delta - 1 / (2 * beta)) ** 2
    elif loss == "hinge":
        losses = torch.relu(1 - beta * delta)
    else:
        raise ValueError(f"unknown DPO loss '{loss}'; choose sigmoid, ipo or hinge")
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def pair_stats(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, weights=None) -> dict[str, float]:
    """The sums behind reward accuracy and margins (ties count as wrong)."""
    w = torch.ones_like(chosen_rewards) if weights is None else torch.as_tensor(weights, dtype=chosen_rewards.dtype)
    return {"pairs": float(w.sum()), "correct": float(((chosen_rewards > rejected_rewards).to(w.dtype) * w).sum()),
            "margin": float(((chosen_rewards - rejected_rewards) * w).sum()),
            "chosen": float((chosen_rewards * w).sum()), "rejected": float((rejected_rewards * w).sum())}


def pair_metrics(sums: dict[str, float], prefix: str = "", suffix: str = "") -> dict[str, float]:
    """reward_accuracy, reward_margin, chosen_reward, rejected_reward from summed `pair_stats`."""
    n = max(sums.get("pairs", 0.0), 1e-9)
    names = {"correct": "reward_accuracy", "margin": "reward_margin", "chosen": "chosen_reward",
             "rejected": "rejected_reward"}
    return {f"{prefix}{name}{suffix}": round(sums.get(key, 0.0) / n, 5) for key, name in names.items()}


class Reference:
    """The frozen starting model, evaluated through the policy's own modules (see the module docstring)."""

    def __init__(self, model, from_adapter: bool):
        self.model, self.from_adapter = model, from_adapter

    @torch.no_grad()
    def logps(self, inputs: dict, average: bool) -> tuple[torch.Tensor, torch.Tensor]:
        was_training = self.model.training
        self.model.eval()  # no dropout in the reference (peft's per-row adapter choice needs eval mode too)
        try:
            with self.selected(inputs["input_ids"].shape[0]) as kwargs:
                return pair_logps(_with_kwargs(self.model, kwargs), inputs, average)
        finally:
            self.model.train(was_training)

    @contextlib.contextmanager
    def selected(self, rows: int):
        if self.from_adapter:
            yield {"adapter_names": [REFERENCE_ADAPTER] * rows}
        else:
            with self.model.disable_adapter():
                yield {}


def _with_kwargs(model, kwargs: dict):
    if not kwargs:
        return model
    return lambda **inputs: model(**inputs, **kwargs)


class DPOObjective:
    """What the training loop asks of a method: collate a micro-batch, and its loss, weight and metric sums."""

    def __init__(self, settings: DPOSettings, model):
        self.beta, self.kind, self.smoothing = settings.beta, settings.loss, settings.label_smoothing
        self.average = self.kind == "ipo"
        self.reference = Reference(model, from_adapter=bool(settings.adapter))

    def collate(self, batch: dict, pad_id: int, device: torch.device) -> dict:
        return collate_pairs(batch, pad_id, device)

    def scores(self, module, inputs: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        ref_c, ref_r = self.reference.logps(inputs, self.average)
        pol_c, pol_r = pair_logps(module, inputs, self.average)
        return preference_loss(pol_c, pol_r, ref_c, ref_r, self.beta, self.kind, self.smoothing)

    def units(self, inputs: dict) -> int:
        """Pairs of a collated micro-batch: the step's objective is the mean DPO loss over its pairs."""
        return int(inputs["pairs"])

    def loss(self, module, inputs: dict) -> tuple[torch.Tensor, int, dict[str, float]]:
        """Summed loss over the micro-batch's pairs, the number of pairs, and the reward sums."""
        losses, chosen, rejected = self.scores(module, inputs)
        return losses.sum(), int(inputs["pairs"]), pair_stats(chosen, rejected)

    @torch.no_grad()
    def row_scores(self, module, rows: dict, pad_id: int, device: torch.device) -> list[tuple[str, float, dict]]:
        """(source, weight, sums) per validation row: pairs get the DPO loss and reward sums; other rows (a
        general-text probe) their language-model loss, as every method scores them."""
        pairs = np.array([is_pair(r) for r in rows["rejected_input_ids"]]) if "rejected_input_ids" in rows \
            else np.zeros(len(rows["input_ids"]), dtype=bool)
        out = []
        if (~pairs).any():
            out += lm_row_scores(module, {k: v[~pairs] for k, v in rows.items()}, pad_id, device)
        if pairs.any():
            picked = {k: v[pairs] for k, v in rows.items()}
            losses, chosen, rejected = self.scores(module, collate_pairs(picked, pad_id, device))
            for i, (source, weight) in enumerate(zip(picked["source"], picked["_weight"])):
                sums = pair_stats(chosen[i:i + 1], rejected[i:i + 1]) | {"dpo_loss": float(losses[i])}
                out.append((str(source), float(weight), sums))
        return out


def check_sft_adapter(path: str, base_weights_sha256: str | None = None) -> dict:
    """The SFT adapter's peft config, after checking it is a LoRA adapter (of this base, when both hashes are
    known); ValueError naming what is wrong otherwise."""
    import json
    from pathlib import Path

    config_file = Path(path) / "adapter_config.json"
    if not config_file.is_file():
        raise ValueError(f"method.dpo.adapter '{path}' is not an adapter directory (adapter_config.json missing); "
                         "give the output_dir/adapter of a `honed train` LoRA run")
    config = json.loads(config_file.read_text())
    if config.get("peft_type") != "LORA":
        raise ValueError(f"method.dpo.adapter '{path}' is a {config.get('peft_type')} adapter; DPO continues LoRA "
                         "adapters only (train the SFT stage with method lora)")
    trained_on = read_meta(path).get("base_weights_sha256")
    if base_weights_sha256 and trained_on and trained_on != base_weights_sha256:
        raise ValueError(f"method.dpo.adapter '{path}' was trained on other base weights (sha256 {trained_on[:12]}) "
                         f"than model.name_or_path ({base_weights_sha256[:12]}); use the SFT run's base model")
    return config
