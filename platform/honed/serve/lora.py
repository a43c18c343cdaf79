"""Many LoRA adapters resident on one base model, applied per row: the serving side of LoRA.

Each targeted linear layer of the base is wrapped once (`MultiLoraLinear`) and keeps every resident adapter's
factors stacked by slot, as right-hand sides of `x @ ...`: A as [slots, in, r] and B·scaling as [slots, r, out]
(ranks zero-padded to the largest; slot 0 is the base: zeros). A forward reads the slot of each row from the
shared `SlotRows`:
  - all rows on the base: the base layer alone;
  - all rows on one adapter: y = x·W + (x·A)·B, two small matmuls;
  - rows on different adapters (decoding or prefill): the rows are placed by slot into a zero-padded
    [slots, k rows, in] block (k: the most rows any adapter has), once per input that several projections share
    (q/k/v, gate/up), and two batched matmuls apply each slot's own A and B (views of the stacks, no copies of
    the factors); each row's result is added back to its own output. Every factor is read once and multiplied
    only with its own rows, so a row never sees another adapter's numbers (no inf·0 = NaN from a diverged
    neighbour). The idea of Punica's / S-LoRA's batched LoRA kernels, in plain torch.
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

BASE_SLOT = 0


class AdapterNotServable(ValueError):
    """An adapter this path cannot apply exactly; the message says why and what to do instead."""


class SlotRows:
    """The slot of each row of the forward in progress (`set` by the caller before each forward), and for a
    mixed batch where each row goes in the slot-grouped block: row `rows[i]` at position `place[i]` of
    [top slots · k, ...] (rows of slot s at (s-1)·k + 0, 1, ...; base rows are in no place)."""

    def __init__(self):
        self.uniform: int | None = BASE_SLOT  # the one slot of every row, or None when rows differ
        self.used: set[int] = set()
        self.top = self.k = 0
        self.rows = self.place = None
        self.every_row = False  # whether every row has a place (none on the base)
        self._input = self._block = None  # the last input grouped, and its block: shared by q/k/v, gate/up

    def set(self, slots: list[int], device) -> None:
        self.used, self._input = set(slots) - {BASE_SLOT}, None
        if len(set(slots)) == 1:
            self.uniform = slots[0]
            return
        self.uniform, self.top = None, max(slots)
        seen = [0] * (self.top + 1)
        rows, place = [], []
        for i, s in enumerate(slots):
            if s != BASE_SLOT:
                rows.append(i)
                place.append(s)
                seen[s] += 1
        self.k = max(seen)
        counted = [0] * (self.top + 1)
        for j, s in enumerate(place):  # (s-1)·k plus how many rows of slot s came before
            place[j], counted[s] = (s - 1) * self.k + counted[s], counted[s] + 1
        self.every_row = len(rows) == len(slots)
        self.rows, self.place = torch.tensor(rows, device=device), torch.tensor(place, device=device)

    def grouped(self, x: torch.Tensor) -> torch.Tensor:
        """`x` [rows, tokens, in] as [top, k·tokens, in]: each slot's rows, zeros where a slot has fewer."""
        if x is not self._input:
            rows, tokens, d_in = x.shape
            flat = x.reshape(rows, tokens * d_in)
            block = x.new_zeros(self.top * self.k, tokens * d_in)
            block.index_copy_(0, self.place, flat if self.every_row else flat.index_select(0, self.rows))
            self._input, self._block = x, block.view(self.top, self.k * tokens, d_in)
        return self._block


class MultiLoraLinear(nn.Module):
    """A base linear layer plus every resident adapter's factors, as right-hand sides of `x @ ...`: A as
    [slots, in, r], B·scaling as [slots, r, out] (each slot's block contiguous: a slot or a run of slots is a
    view, in the layout a product with few rows reads fastest)."""

    def __init__(self, base: nn.Linear, rows: SlotRows):
        super().__init__()
        self.base, self.slot_rows = base, rows
        w = base.weight
        self.register_buffer("lora_a", w.new_zeros(1, base.in_features, 0), persistent=False)
        self.register_buffer("lora_b", w.new_zeros(1, 0, base.out_features), persistent=False)
        self.filled: set[int] = set()

    def reserve(self, slot: int) -> None:
        """Room up to `slot` (zeros), so a batch may address any resident slot in every wrapped layer."""
        if slot >= self.lora_a.shape[0]:
            grow = slot + 1 - self.lora_a.shape[0]
            self.lora_a = torch.cat([self.lora_a, self.lora_a.new_zeros(grow, *self.lora_a.shape[1:])])
            self.lora_b = torch.cat([self.lora_b, self.lora_b.new_zeros(grow, *self.lora_b.shape[1:])])

    def put(self, slot: int, a: torch.Tensor, b_scaled: torch.Tensor) -> None:
        self.reserve(slot)
        r = a.shape[0]
        if r > self.lora_a.shape[2]:  # a larger rank than any so far: zero-pad every slot to it
            n, d_in, old = self.lora_a.shape
            self.lora_a = torch.cat([self.lora_a, self.lora_a.new_zeros(n, d_in, r - old)], 2)
            self.lora_b = torch.cat([self.lora_b, self.lora_b.new_zeros(n, r - old, self.lora_b.shape[2])], 1)
        self.clear(slot)
        self.lora_a[slot, :, :r] = a.T.to(self.lora_a.dtype)
        self.lora_b[slot, :r] = b_scaled.T.to(self.lora_b.dtype)
        self.filled.add(slot)

    def clear(self, slot: int) -> None:
        self.lora_a[slot].zero_()
        self.lora_b[slot].zero_()
        self.filled.discard(slot)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        rows = self.slot_rows
        if rows.uniform is not None:
            if rows.uniform not in self.filled:  # the base, or an adapter that does not target this layer
                return y
            return y.add_((x @ self.lora_a[rows.uniform]) @ self.lora_b[rows.uniform])
        if self.filled.isdisjoint(rows.used):  # no adapter of this batch targets this layer
            return y
        a, b = self.lora_a[1:rows.top + 1], self.lora_b[1:rows.top + 1]  # slots 1..top: views
        delta = torch.bmm(torch.bmm(rows.grouped(x), a), b)  # [top, k·tokens, out]
        delta = delta.view(rows.top * rows.k, -1).index_select(0, rows.place)  # [placed rows, tokens·out]
        flat = y.view(y.shape[0], -1)
        if rows.every_row:
            flat.add_(delta)
        else:
            flat.index_add_(0, rows.rows, delta)
        return y


class MultiLora:
    """The adapters resident on `model` and their slots (the stacks grow to the most ever resident at once;
    the multiplexing LRU bounds that, plus adapters evicted while their requests still decode)."""

    def __init__(self, model: nn.Module, decode_rows: int = 1):
        """`decode_rows`: the batch a decode step usually has (the serve config's max_batch_size); above 1, on
        CPU, every linear layer also keeps its weights packed for products of exactly that many rows
        (`PackedLinear`: a second copy of the linear weights in memory)."""
        self.model, self.device = model, next(model.parameters()).device
        if self.device.type == "cpu" and decode_rows > 1 and torch.backends.mkl.is_available():
            pack_linears(model, decode_rows)
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
            if not isinstance(base, nn.Linear) or a.shape[1] != base.in_features or b.shape[0] != base.out_features:
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


class PackedLinear(nn.Linear):
    """A linear layer whose product with exactly `rows` rows (a full decode step) uses weights packed once
    for MKL's sgemm (`torch.ops.mkl._mkl_linear`, what inductor's CPU freezing uses); other shapes take the
    plain product. A plain sgemm repacks the weight panel on every call, and with few rows that repacking is most
    of the cost: SmolLM2's linear layers, 2 threads, 8 rows: 46 → 34 ms a step (1 row: 20 ms either way)."""

    @classmethod
    def packing(cls, linear: nn.Linear, rows: int) -> PackedLinear:
        packed = cls(linear.in_features, linear.out_features, linear.bias is not None, device="meta")
        packed.weight, packed.bias = linear.weight, linear.bias  # the same parameters: tied weights stay tied
        packed.rows = rows
        packed.packed = torch.ops.mkl._mkl_reorder_linear_weight(linear.weight.detach(), rows)
        return packed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() == self.rows * self.in_features and not torch.is_grad_enabled():
            return torch.ops.mkl._mkl_linear(x, self.packed, self.weight, self.bias, self.rows)
        return super().forward(x)


def pack_linears(model: nn.Module, rows: int) -> None:
    """Swap every plain fp32 linear layer of `model` for a `PackedLinear` packed for `rows` rows."""
    for name, module in list(model.named_modules()):
        if type(module) is nn.Linear and module.weight.dtype == torch.float32:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, PackedLinear.packing(module, rows))


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
