"""The language-model objective: next-token cross-entropy on labelled positions only.

    loss, n = causal_lm_loss(model, collate(rows, pad_id, device))    # mean over the n labelled tokens
    per_row = row_losses(model, inputs)                                 # (loss sum, tokens) per row

`LMObjective` is what the training loop asks of every method but dpo (`honed.train.dpo.DPOObjective` offers
the same three calls): collate a micro-batch, its loss with the weight it carries, per-row validation scores.
"""

from __future__ import annotations

import torch

from honed.train.attention import BOUNDARY_KEYS
from honed.train.collate import collate


def scored_token_losses(model, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token losses of the labelled positions only, flattened, and the batch row of each.

    The 49k-way vocabulary projection and its softmax are the largest single cost of a small model's step;
    prompts (system + question) and padding carry no loss, so the model is asked for logits at labelled
    positions only (a boolean `logits_to_keep`: hidden states are gathered before `lm_head`)."""
    labels = inputs["labels"]
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != -100  # logits at position p predict token p + 1
    # Packed rows carry position ids and no mask: the model then keeps attention inside each example
    # (transformers builds that block-diagonal mask only when no KV cache is in play, hence use_cache=False).
    mask = inputs.get("attention_mask")
    if mask is not None and bool((mask[:, 1:] <= mask[:, :-1]).all()):
        # Right padding only: causal attention already keeps every real token from seeing the padding after
        # it, so the mask changes nothing that is scored, and without it SDPA runs its unmasked causal kernel.
        mask = None
    boundaries = {k: inputs[k] for k in BOUNDARY_KEYS if k in inputs}  # a flattened row's examples
    logits = model(input_ids=inputs["input_ids"], attention_mask=mask, position_ids=inputs.get("position_ids"),
                   use_cache=False, logits_to_keep=keep, **boundaries).logits
    if logits.dim() == 3:  # a model without boolean logits_to_keep returned every position
        logits = logits[keep]
    targets = labels[:, 1:][keep[:, :-1]]
    losses = torch.nn.functional.cross_entropy(logits.float(), targets, reduction="none")
    return losses, keep.nonzero()[:, 0]


def causal_lm_loss(model, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Mean loss over the batch's labelled tokens, and their number."""
    losses, _ = scored_token_losses(model, inputs)
    n = losses.numel()
    return losses.sum() / max(n, 1), n


def row_losses(model, inputs: dict[str, torch.Tensor]) -> list[tuple[float, int]]:
    """(sum of losses, number of labelled tokens) per row, for per-source validation."""
    losses, rows = scored_token_losses(model, inputs)
    n_rows = inputs["labels"].shape[0]
    sums = torch.zeros(n_rows, dtype=torch.float64).index_add_(0, rows, losses.double())
    counts = torch.bincount(rows, minlength=n_rows)
    return [(float(s), int(n)) for s, n in zip(sums, counts)]


def lm_row_scores(module, rows: dict, pad_id: int, device: torch.device) -> list[tuple[str, float, dict]]:
    """(source, weight, {loss, tokens}) per row: the summed token loss of each validation row."""
    losses = row_losses(module, collate(rows, pad_id, device))
    return [(str(source), float(weight), {"loss": loss_sum, "tokens": n})
            for source, weight, (loss_sum, n) in zip(rows["source"], rows["_weight"], losses)]


class LMObjective:
    """Next-token loss on the labelled tokens: every method but dpo (see honed.train.dpo.DPOObjective)."""

    def __init__(self, flat: bool = False):
        self.flat = flat

    def collate(self, batch: dict, pad_id: int, device: torch.device) -> dict:
        return collate(batch, pad_id, device, flat=self.flat)

    def loss(self, module, inputs: dict) -> tuple[torch.Tensor, int, dict[str, float]]:
        """Mean token loss, the number of labelled tokens (its weight in the window), and no extra sums."""
        loss, n = causal_lm_loss(module, inputs)
        return loss, n, {}

    @torch.no_grad()
    def row_scores(self, module, rows: dict, pad_id: int, device: torch.device) -> list[tuple[str, float, dict]]:
        return lm_row_scores(module, rows, pad_id, device)
