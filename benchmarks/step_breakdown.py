"""Where one training step's time and memory go, measured inside a `train_loops` process (imports torch).

    profile_steps(step, range(3, 5), device)       # torch.profiler: self time by op category and phase
    optimizer_variants(params, lr, 3, sync)        # AdamW default / foreach / fused, side by side
    tensor_memory(step, 5, model, optimizer, dev)  # peak bytes held in tensors during one step
    loss_variants(model, batch, device, 3, honed_loss=..., fast_dropout=...)   # HF's loss → honed's step

`step(s)` trains batch `s` and returns its timings (`train_loops.BareStep`). train_mfu reports the profile and
the AdamW timings, train_memory the tensor peak, train_vs_hf_trainer and packing the loss variants.
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile


# ---------------------------------------------------------------------------------------------- memory
def tensor_mb(tensors) -> float:
    return round(sum(t.numel() * t.element_size() for t in tensors) / 2**20, 1)


def memory_parts(model, optimizer) -> dict:
    """Bytes held by weights (as stored: 4-bit packed for qlora), trainable weights (= their gradients) and
    the optimizer state."""
    params = list(model.parameters())
    state = [v for st in optimizer.state.values() for v in st.values() if hasattr(v, "numel")]
    return {"weights_mb": tensor_mb(params), "buffers_mb": tensor_mb(model.buffers()),
            "trainable_weights_mb (= grads)": tensor_mb(p for p in params if p.requires_grad),
            "optimizer_state_mb": tensor_mb(state)}


def tensor_memory(one_step, step: int, model, optimizer, device) -> dict:
    """Peak bytes held in tensors during one more training step: the CPU counterpart of CUDA's max allocated.

    held    what lives between steps: every parameter and buffer as stored (4-bit packed for qlora; weights
            memory-mapped from the checkpoint count too, since training reads them every step) and the
            optimizer state (gradients are freed by zero_grad(set_to_none=True))
    step    the highest running sum of the step's allocations minus frees, op by op (torch.profiler with
            profile_memory: activations, saved tensors, gradients, temporaries, the optimizer's scratch)
    RSS is reported beside it but cannot compare methods here: it counts the checkpoint pages a loader has
    touched (all of them for qlora, which read every weight to quantize it) and the interpreter and libraries."""
    parts = memory_parts(model, optimizer)
    held = parts["weights_mb"] + parts["buffers_mb"] + parts["optimizer_state_mb"]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        one_step(step)
        return {"held_mb": held, "peak_mb": round(torch.cuda.max_memory_allocated(device) / 2**20, 1),
                "kind": "cuda_max_allocated", "parts": parts}
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        one_step(step)
    live = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        live += event.self_cpu_memory_usage
        peak = max(peak, live)
    return {"held_mb": held, "step_peak_mb": round(peak / 2**20, 1), "peak_mb": round(held + peak / 2**20, 1),
            "kind": "tensor bytes (parameters + buffers + optimizer state + the step's peak allocations)",
            "parts": parts}


# ------------------------------------------------------------------------------------------- the optimizer
def optimizer_variants(params: list, lr: float, repeats: int, sync) -> dict:
    """Seconds per AdamW step over `params` (random gradients) for torch's implementations: the default
    (on CPU: one tensor at a time), foreach (multi-tensor) and fused; interleaved, median of `repeats`. Each
    keeps its own state (the default's first, then foreach's, fused's: ~2x the weights each)."""
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    originals = [p.detach().clone() for p in params]
    kinds = {"default": {}, "foreach": {"foreach": True}, "fused": {"fused": True}}
    optimizers, out = {}, {}
    for name, kwargs in kinds.items():
        try:
            optimizers[name] = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, **kwargs)
            optimizers[name].step()  # allocates the state
        except (RuntimeError, TypeError) as err:
            out[name] = f"unavailable: {err}"
    times: dict[str, list[float]] = {k: [] for k in optimizers}
    for _ in range(repeats):
        for name, opt in optimizers.items():
            sync()
            t0 = time.perf_counter()
            opt.step()
            sync()
            times[name].append(time.perf_counter() - t0)
    with torch.no_grad():
        for p, o in zip(params, originals):
            p.copy_(o)
            p.grad = None
    out |= {name: round(statistics.median(v), 4) for name, v in times.items()}
    return {"seconds_per_step": out, "params": sum(p.numel() for p in params), "repeats": repeats,
            "all": {k: [round(x, 4) for x in v] for k, v in times.items()}}


# ------------------------------------------------------------------------------------------- the profile
OP_CATEGORIES = [  # (category, predicate on the aten op name); first match wins
    ("matmul (mm/addmm/bmm)", lambda n: n in ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm",
                                              "aten::addmv", "aten::mv", "aten::dot")),
    ("attention (sdpa)", lambda n: "scaled_dot_product" in n or "flash_attention" in n or "efficient_attention" in n),
    ("optimizer + grad clip (foreach)", lambda n: n.startswith("aten::_foreach") or "adam" in n.lower()),
    ("softmax / cross-entropy", lambda n: "softmax" in n or "nll_loss" in n or "cross_entropy" in n),
    ("embedding", lambda n: "embedding" in n),
    ("copies / layout (copy_, cat, contiguous, to)", lambda n: n in (
        "aten::copy_", "aten::cat", "aten::clone", "aten::contiguous", "aten::_to_copy", "aten::index",
        "aten::index_put_", "aten::_index_put_impl_", "aten::fill_", "aten::zero_", "aten::zeros", "aten::empty",
        "aten::empty_strided", "aten::new_zeros", "aten::resize_", "aten::gather", "aten::scatter",
        "aten::scatter_add_", "aten::masked_fill", "aten::masked_fill_", "aten::where", "aten::full")),
]


def categorize(name: str) -> str:
    for category, match in OP_CATEGORIES:
        if match(name):
            return category
    if name.startswith("aten::"):
        return "elementwise / norms / activations (other aten ops)"
    return "framework (autograd engine, python, record_function)"


def profile_steps(one_step, steps, device) -> dict:
    """torch.profiler over a few training steps: self time per op category, matmul FLOPs, top ops; on CPU also
    the share of each phase (`record_function("phase:...")` around data, forward, backward, optimizer)."""
    use_cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if use_cuda else [])
    started = time.perf_counter()
    with profile(activities=activities, with_flops=True) as prof:
        per_step = [one_step(s) for s in steps]
    wall = time.perf_counter() - started
    by_cat: dict[str, float] = {}
    rows = []
    matmul_flops = matmul_us = 0.0
    for e in prof.key_averages():
        self_us = (e.self_device_time_total if use_cuda else e.self_cpu_time_total)
        if e.key.startswith("phase:") or self_us <= 0:
            continue
        cat = categorize(e.key)
        by_cat[cat] = by_cat.get(cat, 0.0) + self_us
        rows.append((self_us, e.key, e.count, e.flops or 0))
        if cat.startswith("matmul"):
            matmul_flops += e.flops or 0
            matmul_us += self_us
    total = sum(by_cat.values())
    rows.sort(reverse=True)
    ranked = sorted(by_cat.items(), key=lambda kv: -kv[1])
    out = {
        "steps": len(per_step), "wall_s": round(wall, 3), "clock": "device" if use_cuda else "cpu self time",
        "profiled_step_s": [round(s["seconds"], 3) for s in per_step],
        "total_self_s": round(total / 1e6, 3),
        "share_by_category": {k: round(v / total, 4) for k, v in ranked},
        "seconds_by_category": {k: round(v / 1e6, 3) for k, v in ranked},
        "matmul_flops": matmul_flops, "matmul_seconds": round(matmul_us / 1e6, 3),
        "matmul_achieved_flops_per_s": round(matmul_flops / (matmul_us / 1e6), 1) if matmul_us else None,
        "top_ops": [{"op": k, "self_s": round(us / 1e6, 3), "share": round(us / total, 4), "calls": c,
                     "flops": f} for us, k, c, f in rows[:15]],
    }
    return out if use_cuda else out | phase_shares(prof)


def phase_shares(prof) -> dict:
    """CPU self time of every op attributed to its enclosing `phase:` record (forward / backward / ...)."""
    matrix: dict[str, dict[str, float]] = {}
    for e in prof.events():
        if e.name.startswith("phase:") or e.self_cpu_time_total <= 0:
            continue
        parent, phase = e.cpu_parent, "outside phases"
        while parent is not None:
            if parent.name.startswith("phase:"):
                phase = parent.name[len("phase:"):]
                break
            parent = parent.cpu_parent
        row = matrix.setdefault(phase, {})
        cat = categorize(e.name)
        row[cat] = row.get(cat, 0.0) + e.self_cpu_time_total
    grand = sum(sum(r.values()) for r in matrix.values()) or 1.0
    return {"share_by_phase": {ph: round(sum(r.values()) / grand, 4) for ph, r in matrix.items()},
            "share_by_phase_and_category": {
                ph: {c: round(v / grand, 4) for c, v in sorted(r.items(), key=lambda kv: -kv[1]) if v / grand >= 0.001}
                for ph, r in matrix.items()}}


# ---------------------------------------------------------------------------------------- loss variants
def loss_variants(model, batch: dict, device, repeats: int, *, honed_loss, fast_dropout) -> dict:
    """One forward + backward on `batch` (right-padded with an attention mask, or packed with position ids)
    for each variant, interleaved, `repeats` times each (after one untimed pass each); medians. From what
    the HF model computes by itself to honed's step, one change at a time:

      full_logits         the HF model's own loss (`labels=`): lm_head over the vocabulary at every position
      labelled_masked     lm_head + CE only at the labelled positions, attention mask passed
      labelled_unmasked   the same without the mask on right-padded rows (`honed_loss`: honed's causal_lm_loss)
      honed_step          that, with honed's CPU LoRA dropout (`fast_dropout`: honed's use_fast_dropout) in the model
      backbone_only       the transformer body alone (no lm_head, no CE), the model's own dropout: the floor
    """
    batch = {k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
    ids, labels = batch["input_ids"], batch["labels"]
    dropouts = [(d, k, d[k]) for m in model.modules() if isinstance(d := getattr(m, "lora_dropout", None),
                                                                     torch.nn.ModuleDict) for k in d]
    variants = variant_losses(model, batch, dropouts, honed_loss, fast_dropout)
    times, losses = time_variants(model, variants, device, repeats)
    med = {k: statistics.median(v) for k, v in times.items()}
    nonpad = int(batch["attention_mask"].sum()) if "attention_mask" in batch else int(ids.numel())
    labelled = int((labels[:, 1:] != -100).sum())
    return {
        "batch_shape": list(ids.shape), "packed": "position_ids" in batch, "positions_with_tokens": nonpad,
        "labelled_tokens": labelled, "repeats": repeats, "lora_dropouts": len(dropouts),
        "fwd_bwd_seconds_median": {k: round(v, 4) for k, v in med.items()},
        "fwd_bwd_seconds_all": {k: [round(x, 4) for x in v] for k, v in times.items()},
        "loss_values (dropout makes them differ)": {k: round(v, 5) for k, v in losses.items()},
        "logit_positions": {"full_logits": int(ids.numel()), "labelled": labelled},
        "speedup_over_full_logits": {k: round(med["full_logits"] / v, 4) for k, v in med.items()},
        "lm_head_and_ce_share_of_full_logits": round(1 - med["backbone_only"] / med["full_logits"], 4),
    }


def variant_losses(model, batch: dict, dropouts: list, honed_loss, fast_dropout) -> dict:
    """The loss functions of `loss_variants`, each a forward on `batch` returning a scalar to backpropagate."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    ids, labels = batch["input_ids"], batch["labels"]
    extra = {k: batch[k] for k in ("attention_mask", "position_ids") if k in batch}

    def labelled_masked():
        keep = torch.zeros_like(labels, dtype=torch.bool)
        keep[:, :-1] = labels[:, 1:] != -100
        logits = model(input_ids=ids, use_cache=False, logits_to_keep=keep, **extra).logits
        return F.cross_entropy(logits.float(), labels[:, 1:][keep[:, :-1]])

    def honed_step():
        fast_dropout(model)
        try:
            return honed_loss(model, batch)[0]
        finally:  # the model's own dropout modules back for the other variants
            for holder, key, original in dropouts:
                holder[key] = original

    def backbone_only():
        return base.model(input_ids=ids, use_cache=False, **extra).last_hidden_state.float().mean()

    return {"full_logits": lambda: model(input_ids=ids, labels=labels, use_cache=False, **extra).loss,
            "labelled_masked": labelled_masked, "labelled_unmasked": lambda: honed_loss(model, batch)[0],
            "honed_step": honed_step, "backbone_only": backbone_only}


def time_variants(model, variants: dict, device, repeats: int) -> tuple[dict, dict]:
    """Seconds of forward + backward of each variant (one untimed pass each first, then `repeats` rounds
    interleaved) and each one's last loss."""
    gpu = device.type == "cuda"
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=gpu)
    sync = (lambda: torch.cuda.synchronize(device)) if gpu else (lambda: None)
    model.train()

    def timed(fn) -> tuple[float, float]:
        sync()
        t0 = time.perf_counter()
        with autocast:
            loss = fn()
        loss.backward()  # honed_step's FastDropout modules are out again, but autograd kept their masks
        sync()
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - t0, float(loss)

    for fn in variants.values():
        timed(fn)
    times: dict[str, list[float]] = {k: [] for k in variants}
    losses: dict[str, float] = {}
    for _ in range(repeats):
        for name, fn in variants.items():
            seconds, losses[name] = timed(fn)
            times[name].append(seconds)
    return times, losses
