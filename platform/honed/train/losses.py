"""The language-model objective: next-token cross-entropy on labelled positions only.

    loss, n = causal_lm_loss(model, collate(rows, pad_id, device))    # mean over the n labelled tokens
    per_row = row_losses(model, inputs)                                 # (loss sum, tokens) per row

`LMObjective` is what the training loop asks of every method but dpo (`honed.train.dpo.DPOObjective` offers
the same three calls): collate a micro-batch, its loss with the weight it carries, per-row validation scores.
"""

from __future__ import annotations

import contextlib
import functools

import torch
from torch.utils.checkpoint import checkpoint

from honed.train.attention import BOUNDARY_KEYS, unwrapped
from honed.train.collate import collate
from honed.train.shared_prefix import prefixed_inputs


def scored_token_losses(model, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token losses of the labelled positions only, flattened, and the example each belongs to: its batch
    row, or in a flattened row (padding-free: `cu_seq_lens_q` given) the example by its boundaries.

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
    # a flattened row's examples, and the prefix some of them continue (validation: honed.train.shared_prefix)
    boundaries = {k: inputs[k] for k in (*BOUNDARY_KEYS, "shared_prefix") if k in inputs}
    targets = labels[:, 1:][keep[:, :-1]]
    with hidden_states_out(model) as head:  # the decoder's output at the kept positions, the head applied below
        hidden = model(input_ids=inputs["input_ids"], attention_mask=mask, position_ids=inputs.get("position_ids"),
                       use_cache=False, logits_to_keep=keep if boolean_logits_to_keep() else 0, **boundaries).logits
    if hidden.dim() == 3:  # a model without boolean logits_to_keep returned every position
        hidden = hidden[keep]
    owners = scored_examples(keep, inputs.get("cu_seq_lens_q"))
    if head is None:  # the model post-processes its logits (soft-capping, scaling): they came whole
        return torch.nn.functional.cross_entropy(hidden.float(), targets, reduction="none"), owners
    return chunked_cross_entropy(head, hidden, targets), owners


def scored_examples(keep: torch.Tensor, bounds: torch.Tensor | None) -> torch.Tensor:
    """The example of each kept position (`keep`: [rows, positions], row-major as the losses come): the row, or
    within one flattened row the example whose span [bounds[e], bounds[e + 1]) holds the position. A kept
    position p predicts token p + 1, which is never an example's first token (flatten labels those -100), so p
    and its target lie in one example."""
    kept = keep.nonzero()
    if bounds is None:
        return kept[:, 0]
    return torch.searchsorted(bounds[1:].to(kept.device, torch.long), kept[:, 1], right=True)


@functools.cache
def boolean_logits_to_keep() -> bool:
    """Whether this transformers takes a boolean [batch, positions] `logits_to_keep` (older versions, e.g. 5.17,
    take only an int: then every position comes back and is selected here)."""
    import transformers.modeling_utils

    return hasattr(transformers.modeling_utils, "slice_logits_to_keep")


LOGIT_BUDGET = 1 << 26
"""Logits materialised at once by the loss: 64 M floats (256 MB in fp32, ~3x that with softmax and its gradient).
A batch's labelled positions x the vocabulary above that are scored in chunks (a 49k vocabulary: 1,365
positions a chunk; 128k: 512), so memory stays bounded as sequences grow; each chunk's logits are recomputed in
the backward pass instead of kept (one extra vocabulary projection, paid only by batches that need chunks)."""


@contextlib.contextmanager
def hidden_states_out(model):
    """While active, `model(...)` returns the final hidden states where it would return logits, and the block
    gets the output head to apply (None, and the model unchanged, for models whose forward transforms the head's
    output: logit soft-capping or scaling)."""
    inner = unwrapped(model)  # DDP, DeepSpeed engine
    config = getattr(inner, "config", None)
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    if head is None or getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", 1.0) != 1.0:
        yield None
        return
    head.forward = _identity  # an instance attribute shadows the class's forward; module hooks still run
    try:
        yield head
    finally:
        del head.forward


def _identity(hidden: torch.Tensor) -> torch.Tensor:
    return hidden


def chunked_cross_entropy(head, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-position cross-entropy of `head(hidden)` against `targets`, at most LOGIT_BUDGET logits at a time."""
    vocab = getattr(head, "out_features", None) or head.weight.shape[0]  # ZeRO-3 partitions leave weight empty
    chunk = max(1, LOGIT_BUDGET // vocab)
    if hidden.shape[0] <= chunk:
        return _head_cross_entropy(head, hidden, targets)
    return torch.cat([checkpoint(_head_cross_entropy, head, h, t, use_reentrant=False)
                      for h, t in zip(hidden.split(chunk), targets.split(chunk))])


def _head_cross_entropy(head, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(head(hidden).float(), targets, reduction="none")


def causal_lm_loss(model, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Mean loss over the batch's labelled tokens, and their number."""
    losses, _ = scored_token_losses(model, inputs)
    n = losses.numel()
    return losses.sum() / max(n, 1), n


def row_losses(model, inputs: dict[str, torch.Tensor]) -> list[tuple[float, int]]:
    """(sum of losses, number of labelled tokens) per example, for per-source validation: per row of a padded
    batch, per example of a flattened row."""
    losses, rows = scored_token_losses(model, inputs)
    bounds = inputs.get("cu_seq_lens_q")
    n_rows = inputs["labels"].shape[0] if bounds is None else len(bounds) - 1
    # on the losses' device (a GPU's: a CPU accumulator cannot take CUDA indices), then one copy to the host
    sums = torch.zeros(n_rows, dtype=torch.float64, device=losses.device).index_add_(0, rows, losses.double())
    counts = torch.bincount(rows, minlength=n_rows)
    return [(float(s), int(n)) for s, n in zip(sums.tolist(), counts.tolist())]


def lm_row_scores(module, rows: dict, pad_id: int, device: torch.device,
                  flat: bool = False) -> list[tuple[str, float, dict]]:
    """(source, weight, {loss, tokens}) per row: the summed token loss of each validation row. `flat`: the rows
    scored as one flattened row (padding-free, as the run trains) unless they are packed, whose examples are not
    one row each; a prefix that several rows open with runs once (honed.train.shared_prefix)."""
    flat = flat and "position_ids" not in rows
    inputs = prefixed_inputs(module, rows, device) if flat else None  # a shared prefix run once
    losses = row_losses(module, inputs if inputs is not None else collate(rows, pad_id, device, flat=flat))
    return [(str(source), float(weight), {"loss": loss_sum, "tokens": n})
            for source, weight, (loss_sum, n) in zip(rows["source"], rows["_weight"], losses)]


class LMObjective:
    """Next-token loss on the labelled tokens: every method but dpo (see honed.train.dpo.DPOObjective).

    The objective of an optimizer step is the mean over every labelled token of the global batch (all ranks,
    all micro-batches): `loss` gives a micro-batch's summed token loss and `units` its number of tokens, and the
    loop divides by the step's total (honed.train.loop), so neither the number of workers nor gradient
    accumulation changes what is minimised."""

    def __init__(self, flat: bool = False):
        self.flat = flat

    def collate(self, batch: dict, pad_id: int, device: torch.device) -> dict:
        return collate(batch, pad_id, device, flat=self.flat)

    def units(self, inputs: dict) -> int:
        """Labelled tokens of a collated micro-batch (what `loss` sums over)."""
        return int((inputs["labels"][:, 1:] != -100).sum())

    def loss(self, module, inputs: dict) -> tuple[torch.Tensor, int, dict[str, float]]:
        """Summed token loss, the number of labelled tokens, and no extra sums."""
        losses, _ = scored_token_losses(module, inputs)
        return losses.sum(), losses.numel(), {}

    @torch.no_grad()
    def row_scores(self, module, rows: dict, pad_id: int, device: torch.device) -> list[tuple[str, float, dict]]:
        return lm_row_scores(module, rows, pad_id, device, flat=self.flat)
