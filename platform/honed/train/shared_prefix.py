"""Validation rows that open alike (a chat template's system prompt) score their common prefix once.

    inputs = prefixed_inputs(model, rows, device)   # a flattened batch with the prefix run once, or None
    losses = row_losses(model, inputs)              # (honed.train.losses) as on the whole rows

Every ICD-10 validation row of the demo opens with the same 26-token system prompt: a quarter of the
validation set's tokens, computed again for every row. Serving engines cache such a prefix (vLLM's prefix
caching); validation does the same for one batch: the prefix runs once through the model, its keys and values
are kept per layer, and the rows that share it run only their remainder, with position ids continuing after the
prefix and attention over the prefix's keys and values then their own (`honed_varlen` reads them:
honed.train.attention.prefix_attention). No scored position lies inside the prefix (it is capped before every
member's first labelled token), so the row losses are the whole rows' up to float rounding.

Used by validation only (no gradients) for padding-free runs whose attention is `honed_varlen`; never with
prompt-learning methods (prefix tuning's own keys and values), a kernel that reads the boundaries itself, or ZeRO-3.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch

from honed.train.attention import IMPLEMENTATION, unwrapped
from honed.train.collate import flat_row

MIN_PREFIX = 8  # tokens: below this, the extra forward pass and attention calls cost more than they save
KEY_TOKENS = 4  # rows are grouped by their first KEY_TOKENS tokens before the common prefix is measured


@dataclass
class SharedPrefix:
    """`tokens` shared by the rows `members` (indices into the batch); `layers` ((keys, values) per decoder layer,
    as the attention calls see them) once the prefix has run, and which flattened segments attend to them."""
    tokens: np.ndarray
    members: list[int]
    layers: list[tuple[torch.Tensor, torch.Tensor]] | None = None
    segments: list[bool] | None = None

    @property
    def length(self) -> int:
        return len(self.tokens)


def find_shared_prefix(input_ids, labels, min_tokens: int = MIN_PREFIX) -> SharedPrefix | None:
    """The largest group of rows opening with the same tokens and their longest common prefix, cut before the
    first labelled token of any member (and its predecessor, whose logit predicts it) so that no scored position
    falls inside it; None when no two rows share `min_tokens` tokens that way. Rows scored from earlier on
    (plain text windows are labelled from their first token) are never members."""
    caps = [min(len(x) - 1, unscored(y) - 1) for x, y in zip(input_ids, labels)]  # the most a row could share
    heads = {i: tuple(np.asarray(input_ids[i][:KEY_TOKENS]).tolist()) for i, cap in enumerate(caps)
             if cap >= min_tokens}
    if not heads:
        return None
    head, count = Counter(heads.values()).most_common(1)[0]
    if count < 2:
        return None
    members = [i for i, h in heads.items() if h == head]
    first = np.asarray(input_ids[members[0]])
    length = min(caps[i] for i in members)  # every member keeps a token of its own and no scored position
    for i in members[1:]:
        differs = np.flatnonzero(np.asarray(input_ids[i])[:length] != first[:length])
        if len(differs):
            length = int(differs[0])
    if length < min_tokens:
        return None
    return SharedPrefix(tokens=first[:length].copy(), members=members)


def unscored(labels) -> int:
    """How many tokens open a row before its first labelled one (all of them for a row without labels)."""
    labelled = np.flatnonzero(np.asarray(labels) != -100)
    return int(labelled[0]) if len(labelled) else len(labels)


@torch.no_grad()
def run_prefix(model, prefix: SharedPrefix, device: torch.device) -> SharedPrefix | None:
    """Run the prefix once and keep every layer's keys and values; None (score the whole rows) when the model's
    cache does not hold one full-attention entry per layer."""
    ids = torch.as_tensor(prefix.tokens, dtype=torch.long, device=device)[None]
    out = unwrapped(model)(input_ids=ids, use_cache=True, logits_to_keep=1)  # a rank's own pass: no DDP hooks
    cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)  # renamed `cache` in transformers 5.2x
    layers = getattr(cache, "layers", None)
    if not layers or any(getattr(layer, "keys", None) is None or layer.keys.shape[-2] != prefix.length
                         for layer in layers):
        return None
    prefix.layers = [(layer.keys, layer.values) for layer in layers]
    return prefix


def strip_prefix(batch: dict, prefix: SharedPrefix) -> dict:
    """The batch with each member's prefix removed (its remainder keeps its labels); the columns collate reads."""
    members = set(prefix.members)
    out = {}
    for key in ("input_ids", "labels"):
        column = np.empty(len(batch[key]), dtype=object)
        column[:] = [np.asarray(v)[prefix.length:] if i in members else np.asarray(v)
                     for i, v in enumerate(batch[key])]
        out[key] = column
    return out


def continue_positions(inputs: dict, prefix: SharedPrefix) -> dict:
    """Shift the position ids of the members' segments in a flattened row by the prefix's length and mark which
    segments attend to the prefix (flattened rows keep the batch's order: segment i is row i)."""
    bounds = inputs["cu_seq_lens_q"].tolist()
    positions = inputs["position_ids"].clone()
    for i in prefix.members:
        positions[0, bounds[i]:bounds[i + 1]] += prefix.length
    members = set(prefix.members)
    prefix.segments = [i in members for i in range(len(bounds) - 1)]
    return inputs | {"position_ids": positions}


def prefixed_inputs(model, rows: dict, device: torch.device) -> dict | None:
    """A validation batch flattened (honed.train.collate.flat_row) with the prefix its largest group of rows
    shares run once and stripped from them; None when the model cannot take it (`shares_prefixes`) or no group
    shares `MIN_PREFIX` tokens: then the batch is collated whole."""
    if not shares_prefixes(model):
        return None
    prefix = find_shared_prefix(rows["input_ids"], rows["labels"])
    if prefix is None or run_prefix(model, prefix, device) is None:
        return None
    inputs = flat_row(strip_prefix(rows, prefix), device)
    return continue_positions(inputs, prefix) | {"shared_prefix": prefix}


def shares_prefixes(model) -> bool:
    """Whether `model` (a transformers model, a peft wrapper, or either inside DDP / a DeepSpeed engine) runs its
    attention through `honed_varlen`, the implementation that reads a shared prefix, and no prompt-learning
    method (prefix tuning brings keys and values of its own), and not partitioned by ZeRO-3."""
    inner = unwrapped(model)
    first = next(inner.parameters(), None)
    if first is not None and hasattr(first, "ds_id"):
        # ZeRO-3 gathers every layer's partitions collectively in each forward pass, and ranks score different
        # rows: one finding a prefix would run a pass the others do not
        return False
    peft_config = getattr(inner, "active_peft_config", None)
    if peft_config is not None and peft_config.is_prompt_learning:
        return False
    base = inner.get_base_model() if hasattr(inner, "get_base_model") else inner
    return str(getattr(base.config, "_attn_implementation", "")) == IMPLEMENTATION

