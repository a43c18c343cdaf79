"""Padding-free batches: every example of a micro-batch back to back in one row, attention kept inside each.

A right-padded batch spends the transformer's matmuls on padding (9 % of the demo corpus's batches); a
packed row under a block-diagonal mask spends attention on the whole row (SDPA's masked kernel over 512
positions where a padded batch attends over ~70). `flatten` lays the examples of a batch (or the examples
inside packed rows) end to end with restarting position ids and the boundaries as `cu_seq_lens_q/k` +
`max_length_q/k` — the keyword arguments transformers hands to every attention call. On GPUs with
flash-attn, `flash_attention_2` reads exactly these (its variable-length kernel); everywhere else the model
runs `varlen_sdpa`, registered below as the attention implementation `honed_varlen`: one causal SDPA call per
example, so no token attends across an example and none attends to padding. A call without boundaries (a
padded batch, a mask, generation) goes to transformers' own SDPA path, so a model set to `honed_varlen` gives
the same results as `sdpa` everywhere else.

Which kernel a model loads with is `model.attn_implementation` (`attention_kernel`): `auto` takes
`flash_attention_2` where it can run (a CUDA device, the flash-attn package, a 16-bit compute dtype) and `sdpa`
elsewhere. Padding-free batches keep the loaded kernel when it reads the boundaries (flash attention) and
switch to `honed_varlen` otherwise (`use_varlen`).
"""

from __future__ import annotations

from itertools import pairwise

import numpy as np
import torch

IMPLEMENTATION = "honed_varlen"
BOUNDARY_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")
KERNELS = ("auto", "sdpa", "eager", "flash_attention_2")  # the values of model.attn_implementation
FLASH_DTYPES = (torch.bfloat16, torch.float16)  # flash-attn has no fp32 kernel


def choose_kernel(requested: str, device_type: str, dtype: torch.dtype, flash_attn: bool) -> str:
    """The attention implementation to load a model with, from `model.attn_implementation` (one of `KERNELS`),
    the device type (`cuda`, `cpu`, ...), the compute dtype and whether the flash-attn package is installed.

    `auto`: `flash_attention_2` on CUDA with flash-attn and a 16-bit compute dtype, else `sdpa`. An explicit
    `flash_attention_2` where it cannot run is an error, not a silent fallback."""
    if requested not in KERNELS:
        raise ValueError(f"model.attn_implementation '{requested}' is not allowed; use one of {', '.join(KERNELS)}")
    flash_runs = device_type == "cuda" and flash_attn and dtype in FLASH_DTYPES
    if requested == "auto":
        return "flash_attention_2" if flash_runs else "sdpa"
    if requested == "flash_attention_2" and not flash_runs:
        raise ValueError(
            f"model.attn_implementation 'flash_attention_2' needs a CUDA device, the flash-attn package (>= 2.3.3: "
            f"pip install flash-attn) and compute dtype bfloat16 or float16; here: device {device_type}, flash-attn "
            f"{'installed' if flash_attn else 'not installed'}, dtype {str(dtype).removeprefix('torch.')}. "
            "Use auto (flash_attention_2 where it runs, sdpa elsewhere), sdpa or eager")
    return requested


def attention_kernel(requested: str, device: torch.device, dtype: torch.dtype) -> str:
    """`choose_kernel` for this process, with flash-attn's presence checked as transformers checks it."""
    from transformers.utils import is_flash_attn_2_available

    return choose_kernel(requested, device.type, dtype, device.type == "cuda" and is_flash_attn_2_available())


def reads_boundaries(kernel: str) -> bool:
    """Whether an attention implementation runs a flattened row by the `BOUNDARY_KEYS` it is handed (flash
    attention's variable-length kernel does; sdpa and eager ignore them and would attend across examples)."""
    return kernel.startswith("flash_attention")


def varlen_sdpa(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
                is_causal: bool | None = None, cu_seq_lens_q: torch.Tensor | None = None, **kwargs):
    """Attention of one flattened row (batch 1) segment by segment, or transformers' SDPA without boundaries;
    with `shared_prefix` (validation: honed.train.shared_prefix) some segments also attend to a prefix run once.

    query (1, heads, tokens, dim); key/value (1, kv_heads, tokens, dim); returns (1, tokens, heads, dim) as
    every transformers attention function does."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if cu_seq_lens_q is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    if query.shape[0] != 1:
        raise ValueError(f"{IMPLEMENTATION} takes one flattened row with cu_seq_lens_q, "
                         f"got a batch of {query.shape[0]}")
    gqa = query.shape[1] != key.shape[1]  # grouped-query attention: key/value heads shared, never copied
    # split, not slices: the backward of a split is one concatenation, where every slice's backward would
    # write its gradient into a zeroed copy of the whole row (three per example per layer)
    lengths = [hi - lo for lo, hi in pairwise(cu_seq_lens_q.tolist())]
    prefix = kwargs.get("shared_prefix")  # validation rows continuing a prefix run once (honed.train.shared_prefix)
    if prefix is not None:
        out = prefix_attention(query, key, value, prefix.layers[module.layer_idx], prefix.segments, lengths,
                               scaling, gqa)
        return out.transpose(1, 2).contiguous(), None
    parts = [torch.nn.functional.scaled_dot_product_attention(
        q, k, v, is_causal=True, scale=scaling, dropout_p=dropout if module.training else 0.0, enable_gqa=gqa)
        for q, k, v in zip(query.split(lengths, dim=2), key.split(lengths, dim=2), value.split(lengths, dim=2))]
    return torch.cat(parts, dim=2).transpose(1, 2).contiguous(), None


def prefix_attention(query, key, value, prefix_kv: tuple[torch.Tensor, torch.Tensor], attends: list[bool],
                     lengths: list[int], scaling, gqa: bool) -> torch.Tensor:
    """One flattened row's attention when some segments (`attends`) continue a prefix whose keys and values
    (`prefix_kv`, this layer's) were computed once (honed.train.shared_prefix): those attend to the prefix then
    causally to their own tokens; the others causally to their own. Returns (1, heads, tokens, dim) like the
    per-segment SDPA calls of `varlen_sdpa`."""
    sdpa = torch.nn.functional.scaled_dot_product_attention
    prefix_k, prefix_v = prefix_kv
    size = prefix_k.shape[2]
    parts = []
    for continues, q, k, v in zip(attends, query.split(lengths, dim=2), key.split(lengths, dim=2),
                                  value.split(lengths, dim=2)):
        if not continues:
            parts.append(sdpa(q, k, v, is_causal=True, scale=scaling, enable_gqa=gqa))
            continue
        n = q.shape[2]
        visible = torch.ones(n, size + n, dtype=torch.bool, device=q.device).tril(diagonal=size)
        parts.append(sdpa(q, torch.cat([prefix_k, k], dim=2), torch.cat([prefix_v, v], dim=2), attn_mask=visible,
                          scale=scaling, enable_gqa=gqa))
    return torch.cat(parts, dim=2)


def register() -> str:
    """Make `honed_varlen` an attention implementation transformers knows (masks built as for `sdpa`)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(IMPLEMENTATION, varlen_sdpa)
    ALL_MASK_ATTENTION_FUNCTIONS.register(IMPLEMENTATION, sdpa_mask)
    return IMPLEMENTATION


def unwrapped(model):
    """The model inside DDP or a DeepSpeed engine (itself when it is not wrapped)."""
    while hasattr(model, "module"):
        model = model.module
    return model


def use_varlen(model) -> str:
    """Make `model` (a transformers model, or a peft wrapper of one) ready for flattened rows: it keeps a kernel
    that reads the boundaries itself (flash attention) and switches to `honed_varlen` otherwise. Returns the
    kernel padding-free batches now run with."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    kernel = str(base.config._attn_implementation)
    if reads_boundaries(kernel):
        return kernel
    base.set_attn_implementation(register())
    return IMPLEMENTATION


def packed_spans(positions, n: int) -> list[tuple[int, int]]:
    """The examples of a packed row as (start, end) spans over its first `n` (non-pad) positions: a new one
    wherever the position ids restart at 0 (a row whose ids never do is one example)."""
    starts = np.flatnonzero(np.asarray(positions)[:n] == 0).tolist() or [0]
    return list(zip(starts, starts[1:] + [n]))


def flatten(input_ids: list, labels: list, position_ids: list | None = None, lengths: list[int] | None = None):
    """The examples of a batch in one row: (input_ids, labels, position_ids, boundaries), each (1, tokens).

    Unpacked rows are examples; packed rows (`position_ids` given, `lengths` = their non-pad tokens) are cut
    where the position ids restart and their padding tail dropped. The first token of every example gets label
    -100: in a padded batch nothing predicts it, and here the previous example's last token would."""
    ids, labs, pos, bounds = [], [], [], [0]
    for row, (x, y) in enumerate(zip(input_ids, labels)):
        x, y = np.asarray(x), np.asarray(y).copy()
        if position_ids is None:
            segments = [(0, len(x))]
            p = np.arange(len(x))
        else:
            n = int(lengths[row]) if lengths is not None else len(x)
            x, y, p = x[:n], y[:n], np.asarray(position_ids[row])[:n]
            segments = packed_spans(p, n)
        for lo, hi in segments:
            if hi > lo:
                y[lo] = -100
                bounds.append(bounds[-1] + hi - lo)
        ids.append(x)
        labs.append(y)
        pos.append(p)
    bounds_t = torch.tensor(bounds, dtype=torch.int32)
    longest = int(np.diff(bounds).max()) if len(bounds) > 1 else 0
    row = {"input_ids": torch.from_numpy(np.concatenate(ids).astype(np.int64))[None],
           "labels": torch.from_numpy(np.concatenate(labs).astype(np.int64))[None],
           "position_ids": torch.from_numpy(np.concatenate(pos).astype(np.int64))[None]}
    boundaries = {"cu_seq_lens_q": bounds_t, "cu_seq_lens_k": bounds_t, "max_length_q": longest,
                  "max_length_k": longest}
    return row, boundaries
