"""Many LoRA adapters resident on one base model, applied per row: the serving side of LoRA.

Each targeted linear layer of the base is wrapped once (`MultiLoraLinear`) and keeps every resident adapter's
factors stacked by slot: A as [slots, r, in] and B·scaling as [out, slots, r] (ranks zero-padded to the
largest; slot 0 is the base: zeros). A forward reads the slot of each row from the shared `SlotRows`:
  - all rows on the base: the base layer alone;
  - all rows on one adapter: y = W·x + B·(A·x), two small matmuls (on CPU, on one thread when small:
    SMALL_PRODUCT);
  - rows on different adapters, decoding (one token a row): x times every slot's A at once ([slots·r, in],
    a view), the other slots' blocks of each row set to zero (a fill, not a multiply: another slot's overflow
    must not reach this row as inf·0 = NaN), times every slot's B ([out, slots·r]) added into the base output in
    place: two matmuls and a fill, no copies;
  - rows on different adapters, prefill: A and B gathered per row and applied with batched matmuls (the
    BGMV idea of Punica / S-LoRA).
So one forward serves a batch whatever adapters its rows name.

peft's own mixed-batch path (`adapter_names`) loops in Python over the adapters of a batch in every layer; at
8 adapters × 210 layers of SmolLM2 that loop costs more than the base forward. Adapter files are the peft
format (adapter_config.json + adapter_model.safetensors); what this path cannot apply exactly (DoRA, trained
biases, embeddings, modules_to_save, rank/alpha patterns) is refused with the reason, never approximated.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import nn

from honed.serve.packed import PackedLinear

BASE_SLOT = 0
SMALL_PRODUCT = 1 << 21
"""On CPU, adapter products of at most this many multiply-adds (x's elements x the ranks applied: a decode step's
8 rows x 576 inputs x 8 adapters' 16 ranks is 590 k) run on one thread. They are tiny next to the base's, and
MKL splits them across threads anyway: on 2 cores each then cost ~100 µs of starting and joining threads instead
of ~10-30 µs of work. A SmolLM2-135M decode step of 8 rows on one adapter (2 threads, base prepacked:
honed.serve.packed) took 100 ms with its adapter products on 2 threads, 77-83 ms on one; the base alone 63 ms."""


class AdapterNotServable(ValueError):
    """An adapter this path cannot apply exactly; the message says why and what to do instead."""


class SlotRows:
    """The slot of each row of the forward in progress (set by the caller before each forward)."""

    def __init__(self):
        self.uniform: int | None = BASE_SLOT  # the one slot of every row, or None when rows differ
        self.rows: torch.Tensor | None = None
        self.masks: dict[tuple[int, int], torch.Tensor] = {}

    def set(self, slots: list[int], device) -> None:
        self.masks = {}
        if len(set(slots)) == 1:
            self.uniform, self.rows = slots[0], None
        else:
            self.uniform, self.rows = None, torch.tensor(slots, device=device)

    def others(self, n_slots: int, rank: int) -> torch.Tensor:
        """[rows, n_slots·rank]: True outside each row's own slot block (built once per forward and shape)."""
        if (n_slots, rank) not in self.masks:
            onehot = torch.nn.functional.one_hot(self.rows, n_slots).bool()
            self.masks[n_slots, rank] = ~onehot.repeat_interleave(rank, dim=1)
        return self.masks[n_slots, rank]


class MultiLoraLinear(nn.Module):
    """A base linear layer plus every resident adapter's factors: A as [slots, r, in], B·scaling as
    [out, slots, r], so both read as one matrix over all slots ([slots·r, in], [out, slots·r]) without a copy."""

    def __init__(self, base: nn.Linear | PackedLinear, rows: SlotRows):
        super().__init__()
        self.base, self.slot_rows = base, rows
        like = {"dtype": base.dtype} if isinstance(base, PackedLinear) else \
            {"dtype": base.weight.dtype, "device": base.weight.device}
        self.register_buffer("lora_a", torch.zeros(1, 0, base.in_features, **like), persistent=False)
        self.register_buffer("lora_b", torch.zeros(base.out_features, 1, 0, **like), persistent=False)
        self.filled: set[int] = set()
        self.transposed: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # slot → (Aᵀ, (B·scaling)ᵀ) views

    def reserve(self, slot: int) -> None:
        """Room up to `slot` (zeros), so a batch may address any resident slot in every wrapped layer."""
        if slot >= self.lora_a.shape[0]:
            self.transposed.clear()  # views of the stacks being replaced
            grow = slot + 1 - self.lora_a.shape[0]
            out, _, r = self.lora_b.shape
            self.lora_a = torch.cat([self.lora_a, self.lora_a.new_zeros(grow, *self.lora_a.shape[1:])])
            self.lora_b = torch.cat([self.lora_b, self.lora_b.new_zeros(out, grow, r)], 1)

    def put(self, slot: int, a: torch.Tensor, b_scaled: torch.Tensor) -> None:
        self.reserve(slot)
        r = a.shape[0]
        if r > self.lora_a.shape[1]:  # a larger rank than any so far: zero-pad every slot to it
            self.transposed.clear()
            grow = r - self.lora_a.shape[1]
            n, _, d_in = self.lora_a.shape
            self.lora_a = torch.cat([self.lora_a, self.lora_a.new_zeros(n, grow, d_in)], 1)
            self.lora_b = torch.cat([self.lora_b, self.lora_b.new_zeros(self.lora_b.shape[0], n, grow)], 2)
        self.clear(slot)
        self.lora_a[slot, :r] = a.to(self.lora_a.dtype)
        self.lora_b[:, slot, :r] = b_scaled.to(self.lora_b.dtype)
        self.filled.add(slot)

    def clear(self, slot: int) -> None:
        self.lora_a[slot].zero_()
        self.lora_b[:, slot].zero_()
        self.filled.discard(slot)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        uniform = self.slot_rows.uniform
        if uniform is not None and uniform not in self.filled:  # the base, or an adapter not targeting this layer
            return y
        threads = torch.get_num_threads()
        ranks = self.lora_a.shape[1] * (1 if uniform is not None else self.lora_a.shape[0])
        if threads == 1 or x.device.type != "cpu" or x.numel() * ranks > SMALL_PRODUCT:
            return self._add_lora(x, y, uniform)
        torch.set_num_threads(1)  # a small product: splitting it costs the threads more than it saves
        try:
            return self._add_lora(x, y, uniform)
        finally:
            torch.set_num_threads(threads)

    def _add_lora(self, x: torch.Tensor, y: torch.Tensor, uniform: int | None) -> torch.Tensor:
        if uniform is not None:
            if uniform not in self.transposed:  # made once per slot, not twice per layer and step
                self.transposed[uniform] = (self.lora_a[uniform].T, self.lora_b[:, uniform].T)
            a_t, b_t = self.transposed[uniform]
            flat = y.view(-1, y.shape[-1])  # y += B·(A·x), accumulated in place: no temporary of y's size
            flat.addmm_(torch.mm(x.reshape(-1, x.shape[-1]), a_t), b_t)
            return y
        n_slots, r, d_in = self.lora_a.shape
        if x.shape[1] == 1:  # decoding: one token a row; every slot's A at once, each row keeps its own block
            xa = x.reshape(-1, d_in) @ self.lora_a.view(n_slots * r, d_in).T  # [rows, slots·r]
            xa.masked_fill_(self.slot_rows.others(n_slots, r), 0.0)
            y.view(-1, y.shape[-1]).addmm_(xa, self.lora_b.view(-1, n_slots * r).T)
            return y
        rows = self.slot_rows.rows  # prefill: many tokens a row; gather each row's own factors
        a, b = self.lora_a[rows], self.lora_b[:, rows].transpose(0, 1)  # [rows, r, in], [rows, out, r]
        return y + torch.bmm(torch.bmm(x, a.transpose(1, 2)), b.transpose(1, 2))


class MultiLora:
    """The adapters resident on `model` and their slots (the stacks grow to the most ever resident at once;
    the multiplexing LRU bounds that, plus adapters evicted while their requests still decode)."""

    def __init__(self, model: nn.Module):
        self.model, self.device = model, next(model.parameters()).device
        self.rows = SlotRows()
        self.slots: dict[str, int] = {}
        self.layers: dict[str, MultiLoraLinear] = {}

    def load(self, name: str, adapter_dir: str) -> None:
        """Read a peft LoRA adapter and place it in a free slot; nothing changes if it cannot be applied."""
        from safetensors.torch import load_file

        config = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
        check_config(config)
        weights = load_file(str(Path(adapter_dir) / "adapter_model.safetensors"))
        factors = self._factors(weights, config)
        self.unload(name)  # a reload replaces the old factors
        taken = set(self.slots.values())
        slot = next(s for s in range(1, len(taken) + 2) if s not in taken)
        try:
            for module_name, (a, b) in factors.items():
                self._layer(module_name).put(slot, a, b)
            for layer in self.layers.values():
                layer.reserve(slot)
        except BaseException:
            for layer in self.layers.values():
                layer.clear(slot)
            raise
        self.slots[name] = slot

    def unload(self, name: str) -> None:
        slot = self.slots.pop(name, None)
        if slot is not None:
            for layer in self.layers.values():
                layer.clear(slot)

    def select(self, names: list[str], base: str) -> None:
        """Route the next forward's rows: `base` rows to the base, the others to their adapters."""
        self.rows.set([BASE_SLOT if n == base else self.slots[n] for n in names], self.device)

    def _factors(self, weights: dict, config: dict) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """module name → (A [r, in], B·scaling [out, r]), checked against the base's layers."""
        pairs: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in weights.items():
            stem, _, kind = key.rpartition(".lora_")
            if kind not in ("A.weight", "B.weight"):
                raise AdapterNotServable(f"adapter weight '{key}' is not a LoRA A/B matrix of a linear layer "
                                         "(embeddings, biases and modules_to_save are not applied per row)")
            pairs.setdefault(stem.removeprefix("base_model.model."), {})[kind[0]] = tensor
        factors = {}
        for module_name, ab in pairs.items():
            if set(ab) != {"A", "B"}:
                raise AdapterNotServable(f"adapter layer '{module_name}' lacks its LoRA {'AB'.replace(''.join(ab), '')}")
            try:
                base = self.model.get_submodule(module_name)
            except AttributeError:
                raise AdapterNotServable(f"adapter layer '{module_name}' does not exist in the served base") from None
            base = base.base if isinstance(base, MultiLoraLinear) else base
            a, b = ab["A"], ab["B"]
            if not (a.isfinite().all() and b.isfinite().all()):  # would turn every row of a mixed batch to NaN
                raise ValueError(f"adapter layer '{module_name}' has NaN or infinite weights (its training "
                                 "diverged): register a version trained with a lower learning rate")
            linear = isinstance(base, (nn.Linear, PackedLinear))
            if not linear or a.shape[1] != base.in_features or b.shape[0] != base.out_features:
                raise AdapterNotServable(f"adapter layer '{module_name}' (A {tuple(a.shape)}, B {tuple(b.shape)}) "
                                         f"does not fit the served base's layer {base}")
            r = a.shape[0]
            scaling = config["lora_alpha"] / (math.sqrt(r) if config.get("use_rslora") else r)
            factors[module_name] = (a, b * scaling)
        return factors

    def _layer(self, module_name: str) -> MultiLoraLinear:
        if module_name not in self.layers:
            parent_name, _, child = module_name.rpartition(".")
            parent = self.model.get_submodule(parent_name)
            wrapped = MultiLoraLinear(getattr(parent, child), self.rows)
            wrapped.reserve(max(self.slots.values(), default=BASE_SLOT))
            setattr(parent, child, wrapped)
            self.layers[module_name] = wrapped
        return self.layers[module_name]


def check_config(config: dict) -> None:
    """Refuse what the per-row path would not apply exactly."""
    problems = []
    if config.get("peft_type") != "LORA":
        problems.append(f"it is a {config.get('peft_type')} adapter, not LoRA")
    if config.get("use_dora"):
        problems.append("it uses DoRA")
    if config.get("bias", "none") != "none" or config.get("lora_bias"):
        problems.append("it trains biases")
    if config.get("modules_to_save"):
        problems.append(f"it saves whole modules ({config['modules_to_save']})")
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        problems.append("it has per-layer rank/alpha patterns")
    if problems:
        raise AdapterNotServable("; ".join(problems) + ". Serve it merged instead: `honed merge`, then list the "
                                 "merged model under `merged` in the serve config")
