"""A CPU replica's linear layers with their weights prepacked for oneDNN, as inference engines do on CPU.

    pack_linears(model)    # on CPU, fp32 / bf16: every plain nn.Linear becomes a PackedLinear (the head excepted)

torch's `linear` on CPU hands each product to MKL with the weight in its stored layout; for the few rows of a
decode step MKL re-blocks the weight on every call. oneDNN can block it once, at load
(`mkldnn._reorder_linear_weight`), and then stream it (`mkldnn._linear_pointwise`). On a 2-core AMD EPYC, 2
threads, 8 rows: [8 x 576]·[576 x 1536] 185 vs 91 µs, [8 x 1536]·[1536 x 576] 191 vs 95 µs, one row about equal;
a SmolLM2-135M decode step of 8 rows on the base 93-108 vs 63-65 ms. The products are the same up to float
rounding (oneDNN sums in another order: ~1e-6 of the largest output in fp32).

A `PackedLinear` holds only the packed weight (the plain one is released) and serves inference only: the packed
weight takes no gradient, and `state_dict` does not carry it. The output projection is left as it is (it is
usually tied to the embeddings, whose plain weight must stay; honed.serve.head gives it its own fast path).
Before packing, each distinct layer shape is checked against `linear` on a random input; a mismatch leaves the
model as it was (a oneDNN that computes wrongly on this CPU must not serve).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger(__name__)

PACKED_DTYPES = (torch.float32, torch.bfloat16)
BATCH_HINT = 8  # rows the packing is tuned for (a decode batch); any number of rows is computed correctly
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2}  # max |packed - linear| / max |linear| of the check


def available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


class PackedLinear(nn.Module):
    """`linear.forward`, with the weight prepacked by oneDNN (inference only)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.dtype = linear.weight.dtype
        packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), BATCH_HINT)
        self.register_buffer("packed", packed, persistent=False)
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def pack_linears(model: nn.Module) -> int:
    """Replace every plain `nn.Linear` of a CPU model in fp32 or bf16 by a `PackedLinear`, except the output
    projection; how many were replaced (0: not a CPU model, another dtype, no oneDNN, or the check failed)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    skip = {id(m) for m in head.modules()} if isinstance(head, nn.Module) else set()  # the head, and in a wrapper
    targets = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
               if type(child) is nn.Linear and id(child) not in skip and child.weight.device.type == "cpu"
               and child.weight.dtype in PACKED_DTYPES]
    if not targets or not available():
        return 0
    checked: set[tuple] = set()
    for _, name, linear in targets:
        key = (linear.in_features, linear.out_features, linear.weight.dtype, linear.bias is not None)
        if key not in checked:
            problem = check(linear)
            if problem:
                log.warning("serving keeps torch's linear: oneDNN's prepacked product of layer '%s' %s", name, problem)
                return 0
            checked.add(key)
    for parent, name, linear in targets:
        setattr(parent, name, PackedLinear(linear))
    return len(targets)


@torch.inference_mode()
def check(linear: nn.Linear) -> str | None:
    """None when the packed product of `linear` matches `linear` on random rows (3 and 1), else what differed."""
    packed = PackedLinear(linear)
    generator = torch.Generator().manual_seed(0)
    for rows in (3, 1):
        x = torch.randn(rows, linear.in_features, generator=generator).to(linear.weight.dtype)
        want, got = linear(x).float(), packed(x).float()
        scale = want.abs().max().clamp_min(1e-30)
        error = float((got - want).abs().max() / scale)
        if not error <= TOLERANCE[linear.weight.dtype]:  # NaN fails too
            return f"differs from torch's linear by {error:.2g} of its largest value on {rows} row(s)"
    return None
