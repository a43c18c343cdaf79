"""The vocabulary projection of a decode step on CPU, computed as W·hᵀ.

A decode step projects a few rows (one a sequence) onto the vocabulary, [rows, d] x [d, V] with V = 49,152 for
SmolLM2: the largest matmul of the step. As torch's `linear` computes it (h·Wᵀ) the CPU kernels take a poor path
for few rows: on a 2-core AMD EPYC, 11.1 ms for one row (a matrix-vector product) and 19.6 ms for eight, against
3.0 ms and 7.1 ms for the same product taken as W·hᵀ with at least two rows (torch 2.13 CPU; the model's other
projections, whose weights are far smaller, show no such gap).
`RowsLastHead` takes that path for up to `MAX_ROWS` rows (one row is doubled, its copy dropped) and leaves larger
inputs (a prefill that keeps every position's logits) to `linear`. The weight stays the model's own parameter, so
tied embeddings stay tied.
"""

from __future__ import annotations

import torch
from torch import nn

MAX_ROWS = 32


class RowsLastHead(nn.Module):
    """`head` (an nn.Linear onto the vocabulary) computing few rows as W·hᵀ; the same logits as `head(h)`."""

    def __init__(self, head: nn.Linear):
        super().__init__()
        self.head = head

    @property
    def weight(self) -> nn.Parameter:
        return self.head.weight

    @property
    def bias(self):
        return self.head.bias

    @property
    def in_features(self) -> int:
        return self.head.in_features

    @property
    def out_features(self) -> int:
        return self.head.out_features

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        flat = h.reshape(-1, h.shape[-1])
        rows = flat.shape[0]
        if rows > MAX_ROWS or torch.is_grad_enabled():
            return self.head(h)
        if rows == 1:  # a matrix-vector product is the slow path itself
            flat = torch.cat([flat, flat])
        logits = (self.head.weight @ flat.T)[:, :rows].T  # [rows, V], a transposed view
        if self.head.bias is not None:
            logits = logits + self.head.bias
        return logits.reshape(*h.shape[:-1], logits.shape[-1])


def rows_last_head(model) -> None:
    """Give a CPU model's vocabulary projection the W·hᵀ path (a model without an output projection is left as is)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if isinstance(head, nn.Linear) and head.weight.device.type == "cpu":
        model.set_output_embeddings(RowsLastHead(head))
